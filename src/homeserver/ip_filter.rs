//! Which addresses outbound requests (homeservers, their well-known files) may reach:
//! `[general] ip.blacklist` (empty: the private and special ranges below, Sydent's list plus
//! `0.0.0.0/8` and `::/128`, which Sydent's comment promises and its code forgets) minus
//! `ip.whitelist`. An IPv6 address that carries an IPv4 one (mapped `::ffff:a.b.c.d`,
//! compatible `::a.b.c.d`, 6to4 `2002:aabb:ccdd::/48`) is judged by that IPv4 address too, so
//! `::ffff:127.0.0.1` is as refused as `127.0.0.1`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// Refused unless whitelisted, when `ip.blacklist` is empty.
const DEFAULT_BLACKLIST: &[&str] = &[
    "0.0.0.0/8",
    "127.0.0.0/8",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "192.0.0.0/24",
    "169.254.0.0/16",
    "192.88.99.0/24",
    "198.18.0.0/15",
    "192.0.2.0/24",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "::/128",
    "::1/128",
    "fe80::/10",
    "fc00::/7",
    "2001:db8::/32",
    "ff00::/8",
    "fec0::/10",
];

#[derive(Debug, Clone)]
pub struct IpFilter {
    blacklist: Vec<IpNet>,
    whitelist: Vec<IpNet>,
}

impl IpFilter {
    /// The filter of `ip.blacklist` (empty: the default ranges) and `ip.whitelist`.
    pub fn new(blacklist: &[IpNet], whitelist: &[IpNet]) -> Self {
        let blacklist = if blacklist.is_empty() {
            DEFAULT_BLACKLIST
                .iter()
                .map(|net| net.parse().expect("built-in range parses"))
                .collect()
        } else {
            blacklist.to_vec()
        };
        Self {
            blacklist,
            whitelist: whitelist.to_vec(),
        }
    }

    /// May an outbound connection go to `ip`?
    pub fn allows(&self, ip: IpAddr) -> bool {
        let forms = forms(ip);
        if forms
            .iter()
            .flatten()
            .any(|ip| self.whitelist.iter().any(|net| net.contains(ip)))
        {
            return true;
        }
        !forms
            .iter()
            .flatten()
            .any(|ip| self.blacklist.iter().any(|net| net.contains(ip)))
    }
}

/// `ip` and the IPv4 address an IPv6 one carries, if any.
fn forms(ip: IpAddr) -> [Option<IpAddr>; 2] {
    let embedded = match ip {
        IpAddr::V4(_) => None,
        IpAddr::V6(v6) => embedded_v4(v6).map(IpAddr::V4),
    };
    [Some(ip), embedded]
}

fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = v6.segments();
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    // IPv4-compatible ::a.b.c.d (not :: and ::1, which are IPv6's own).
    if s[..6] == [0; 6] && (s[6] != 0 || s[7] > 1) {
        return Some(Ipv4Addr::new(
            (s[6] >> 8) as u8,
            s[6] as u8,
            (s[7] >> 8) as u8,
            s[7] as u8,
        ));
    }
    // 6to4: 2002:aabb:ccdd::/48 carries a.b.c.d.
    if s[0] == 0x2002 {
        return Some(Ipv4Addr::new(
            (s[1] >> 8) as u8,
            s[1] as u8,
            (s[2] >> 8) as u8,
            s[2] as u8,
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn the_default_list_refuses_private_and_special_addresses() {
        let filter = IpFilter::new(&[], &[]);
        for refused in [
            "127.0.0.1",
            "10.1.2.3",
            "172.20.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::127.0.0.1",
            "2002:7f00:1::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(!filter.allows(ip(refused)), "{refused} allowed");
        }
        for allowed in [
            "1.1.1.1",
            "2606:4700::1111",
            "::ffff:1.1.1.1",
            "2002:101:101::1",
        ] {
            assert!(filter.allows(ip(allowed)), "{allowed} refused");
        }
    }

    #[test]
    fn the_whitelist_wins_and_a_configured_blacklist_replaces_the_default() {
        let whitelist: Vec<IpNet> = vec!["127.0.0.0/8".parse().unwrap()];
        let filter = IpFilter::new(&[], &whitelist);
        assert!(filter.allows(ip("127.0.0.1")));
        assert!(filter.allows(ip("::ffff:127.0.0.1")));
        assert!(!filter.allows(ip("10.0.0.1")));
        let filter = IpFilter::new(&["8.8.8.0/24".parse().unwrap()], &[]);
        assert!(!filter.allows(ip("8.8.8.8")));
        assert!(filter.allows(ip("127.0.0.1")));
    }
}
