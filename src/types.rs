//! Domain values validated at the edge: a handler turns request strings into these, and
//! everything behind it (store, index, replication) trusts them.

use std::fmt;

/// The kind of third-party identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Medium {
    Email,
    Msisdn,
}

impl Medium {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "email" => Some(Self::Email),
            "msisdn" => Some(Self::Msisdn),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Email => "email",
            Self::Msisdn => "msisdn",
        }
    }
}

impl fmt::Display for Medium {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an address or Matrix ID was refused; the text goes to the client as the error message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidValue {
    #[error("unknown medium '{0}': expected 'email' or 'msisdn'")]
    Medium(String),
    #[error("'{0}' is not a valid email address")]
    Email(String),
    #[error("'{0}' is not a valid phone number: expected digits in international format")]
    Msisdn(String),
    #[error("'{0}' is not a valid Matrix user ID (@localpart:server)")]
    Mxid(String),
    #[error("'{0}' is not a valid server name (host or IP literal, optional :port)")]
    ServerName(String),
}

/// A third-party identifier in its normalised form: emails are Unicode-casefolded (as Python's
/// `str.casefold`, which Sydent uses), phone numbers are digits without a leading `+`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Threepid {
    pub medium: Medium,
    pub address: String,
}

/// The longest email address Sydent accepts.
const MAX_EMAIL_LEN: usize = 500;

impl Threepid {
    /// Validates and normalises `address` for `medium`.
    pub fn parse(medium: &str, address: &str) -> Result<Self, InvalidValue> {
        let medium = Medium::parse(medium).ok_or_else(|| InvalidValue::Medium(medium.into()))?;
        let address = match medium {
            Medium::Email => normalise_email(address)?,
            Medium::Msisdn => normalise_msisdn(address)?,
        };
        Ok(Self { medium, address })
    }

    /// The key a lookup uses: the same normalisation without rejecting anything, so a stored
    /// row Sydent wrote before it casefolded is still found.
    /// Borrowed when the address is already in that form (lowercase ASCII: every row written
    /// since Sydent casefolds), which spares the index an allocation per row and per lookup.
    pub fn lookup_key(medium: Medium, address: &str) -> std::borrow::Cow<'_, str> {
        use std::borrow::Cow;
        match medium {
            Medium::Email
                if address
                    .bytes()
                    .all(|b| b.is_ascii() && !b.is_ascii_uppercase()) =>
            {
                Cow::Borrowed(address)
            }
            Medium::Email => Cow::Owned(casefold(address)),
            Medium::Msisdn => Cow::Borrowed(address.strip_prefix('+').unwrap_or(address)),
        }
    }
}

fn normalise_email(address: &str) -> Result<String, InvalidValue> {
    let bad = || InvalidValue::Email(address.into());
    if address.is_empty() || address.chars().count() > MAX_EMAIL_LEN {
        return Err(bad());
    }
    // What Python's `parseaddr(a)[1] == a` lets through, minus quoted local parts: one bare
    // addr-spec, no display name, no whitespace, no brackets or list separators.
    let (local, domain) = address.rsplit_once('@').ok_or_else(bad)?;
    let forbidden = |c: char| c.is_whitespace() || c.is_control() || "<>()[],;:\"\\@".contains(c);
    if local.is_empty()
        || domain.is_empty()
        || local.chars().any(forbidden)
        || domain.chars().any(forbidden)
        || domain.split('.').any(str::is_empty)
        || local.starts_with('.')
        || local.ends_with('.')
    {
        return Err(bad());
    }
    Ok(casefold(address))
}

/// Unicode full case folding, as Python's `str.casefold`; for ASCII (nearly every address)
/// that is plain lowercasing, without walking Unicode tables.
pub fn casefold(text: &str) -> String {
    if text.is_ascii() {
        text.to_ascii_lowercase()
    } else {
        caseless::default_case_fold_str(text)
    }
}

fn normalise_msisdn(address: &str) -> Result<String, InvalidValue> {
    let digits = address.strip_prefix('+').unwrap_or(address);
    // E.164: at most 15 digits, no leading zero in the country code.
    if digits.is_empty()
        || digits.len() > 15
        || !digits.bytes().all(|b| b.is_ascii_digit())
        || digits.starts_with('0')
    {
        return Err(InvalidValue::Msisdn(address.into()));
    }
    Ok(digits.to_owned())
}

/// A Matrix user ID, `@localpart:server_name`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Mxid(String);

impl Mxid {
    pub fn parse(text: &str) -> Result<Self, InvalidValue> {
        let bad = || InvalidValue::Mxid(text.into());
        let rest = text.strip_prefix('@').ok_or_else(bad)?;
        let (local, server) = rest.split_once(':').ok_or_else(bad)?;
        if text.len() > 255
            || local.is_empty()
            || local
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || c == ':')
            || ServerName::parse(server).is_err()
        {
            return Err(bad());
        }
        Ok(Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The homeserver part, after the first `:`.
    pub fn server_name(&self) -> &str {
        self.0.split_once(':').map_or("", |(_, s)| s)
    }
}

impl fmt::Display for Mxid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A Matrix server name: this node's `server.name`, a replication peer's name, the server part
/// of a Matrix ID. One grammar for all three, checked where the name enters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServerName(String);

impl ServerName {
    pub fn parse(text: &str) -> Result<Self, InvalidValue> {
        if is_valid_server_name(text) {
            Ok(Self(text.to_owned()))
        } else {
            Err(InvalidValue::ServerName(text.into()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for ServerName {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for ServerName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ServerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq<str> for ServerName {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for ServerName {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

/// The Matrix server-name grammar: a DNS name, IPv4 literal or `[IPv6]` literal, with an
/// optional port 1..65535 written without leading zeros.
fn is_valid_server_name(name: &str) -> bool {
    let (host, port) = if let Some(rest) = name.strip_prefix('[') {
        match rest.split_once(']') {
            Some((ip6, tail)) => {
                if ip6.parse::<std::net::Ipv6Addr>().is_err() {
                    return false;
                }
                match tail {
                    "" => return true,
                    t => (
                        None,
                        t.strip_prefix(':').map(Some).unwrap_or(Some("invalid")),
                    ),
                }
            }
            None => return false,
        }
    } else {
        match name.rsplit_once(':') {
            Some((h, p)) => (Some(h), Some(p)),
            None => (Some(name), None),
        }
    };
    if let Some(port) = port {
        let valid = !port.is_empty()
            && port.len() <= 5
            && port.bytes().all(|b| b.is_ascii_digit())
            && !port.starts_with('0')
            && port.parse::<u32>().is_ok_and(|p| (1..=65535).contains(&p));
        if !valid {
            return false;
        }
    }
    match host {
        None => true,
        Some(host) => {
            !host.is_empty()
                && host.len() <= 255
                && host.split('.').all(|label| {
                    !label.is_empty()
                        && label.len() <= 63
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                        && !label.starts_with('-')
                        && !label.ends_with('-')
                })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_casefolded_and_checked() {
        let t = Threepid::parse("email", "Straße@EXAMPLE.org").unwrap();
        assert_eq!(t.address, "strasse@example.org");
        for bad in [
            "",
            "plain",
            "a@",
            "@b",
            "Nigel <n@x.org>",
            "a b@c.d",
            "a@b..c",
            "a@b@c",
            &format!("{}@x.org", "a".repeat(500)),
        ] {
            assert!(Threepid::parse("email", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn lookup_keys_casefold_only_what_needs_it() {
        use std::borrow::Cow;
        let key = Threepid::lookup_key(Medium::Email, "plain@example.org");
        assert!(matches!(key, Cow::Borrowed("plain@example.org")));
        assert_eq!(
            Threepid::lookup_key(Medium::Email, "Straße@X.org"),
            "strasse@x.org"
        );
        assert_eq!(Threepid::lookup_key(Medium::Email, "ǅ@x.org"), "ǆ@x.org");
        assert_eq!(
            Threepid::lookup_key(Medium::Email, "MiXed@X.org"),
            "mixed@x.org"
        );
        // Kelvin sign and long s are not ASCII: Unicode folding applies.
        assert_eq!(
            Threepid::lookup_key(Medium::Email, "\u{212A}ſ@x.org"),
            "ks@x.org"
        );
        assert_eq!(Threepid::lookup_key(Medium::Msisdn, "+4477"), "4477");
    }

    #[test]
    fn msisdns_are_digits_without_plus() {
        assert_eq!(
            Threepid::parse("msisdn", "+447700900123").unwrap().address,
            "447700900123"
        );
        for bad in ["", "+", "44 7700", "0123", "1234567890123456", "abc"] {
            assert!(Threepid::parse("msisdn", bad).is_err(), "{bad}");
        }
        assert!(matches!(
            Threepid::parse("phone", "1"),
            Err(InvalidValue::Medium(_))
        ));
    }

    #[test]
    fn server_names_have_one_grammar() {
        for good in [
            "example.org",
            "example.org:8448",
            "1.2.3.4",
            "[::1]:443",
            "localhost",
        ] {
            assert_eq!(ServerName::parse(good).unwrap().as_str(), good);
        }
        for bad in ["", "bad name", "x.org:0", "x_y.org", "[::1", "x.org:99999"] {
            assert_eq!(
                ServerName::parse(bad),
                Err(InvalidValue::ServerName(bad.into()))
            );
        }
    }

    #[test]
    fn mxids_and_server_names() {
        assert_eq!(
            Mxid::parse("@alice:example.org").unwrap().server_name(),
            "example.org"
        );
        assert!(Mxid::parse("@a:[::1]:8448").is_ok());
        assert!(Mxid::parse("@a:1.2.3.4:80").is_ok());
        for bad in [
            "alice:example.org",
            "@:example.org",
            "@alice",
            "@alice:",
            "@al ice:x.org",
            "@a:x.org:0",
            "@a:x.org:065",
            "@a:x_y.org",
            "@a:x.org/",
        ] {
            assert!(Mxid::parse(bad).is_err(), "{bad}");
        }
    }
}
