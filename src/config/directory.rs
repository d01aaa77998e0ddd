//! `[ldap]` (the slipeer/sydent fork's keys, plus ours) and `[proxy]`: a directory as a source
//! of bindings, and an upstream identity server.

use std::path::PathBuf;
use std::time::Duration;

use super::parse::Reader;
use super::{comma_list, non_empty, ConfigError};

/// `[ldap]`, when `uri` is set: what the LDAP client needs, and how the mirror uses it.
#[derive(Debug, Clone)]
pub struct LdapConfig {
    pub settings: LdapSettings,
    pub sync_interval: Duration,
    pub live_lookup: bool,
}

/// The `[ldap]` section as the client needs it (plain data, read from `sydent.conf`; `crate::directory::LdapClient` checks it again).
#[derive(Clone, PartialEq, Eq)]
pub struct LdapSettings {
    /// `ldap://host[:port]` or `ldaps://host[:port]`.
    pub uri: String,
    /// StartTLS before the bind (for an `ldap://` URI; `ldaps://` is TLS from the start).
    pub starttls: bool,
    /// Searched as a subtree.
    pub base: String,
    /// The attributes holding email addresses (`email`), matched as an OR.
    pub email_attrs: Vec<String>,
    /// The attributes holding phone numbers (`msisdn`), matched as an OR.
    pub msisdn_attrs: Vec<String>,
    /// The attribute holding the user id (`uid`, `sAMAccountName`).
    pub id_attr: String,
    /// Set: the Matrix ID is `@<id>:<hs_name>`. Unset or empty: the id is the whole Matrix ID.
    pub hs_name: Option<String>,
    /// Unset: an anonymous bind.
    pub bind_dn: Option<String>,
    pub bind_pw: Option<String>,
    /// A complete filter AND-ed into every search, e.g. `(objectClass=inetOrgPerson)`.
    pub filter: Option<String>,
    /// The CA file (PEM) that vouches for the server's certificate; unset: the system roots.
    pub cacert: Option<PathBuf>,
    /// For the connection (TCP, TLS, bind) and for each answer of a search.
    pub timeout: Duration,
}

impl std::fmt::Debug for LdapSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LdapSettings")
            .field("uri", &self.uri)
            .field("starttls", &self.starttls)
            .field("base", &self.base)
            .field("email_attrs", &self.email_attrs)
            .field("msisdn_attrs", &self.msisdn_attrs)
            .field("id_attr", &self.id_attr)
            .field("hs_name", &self.hs_name)
            .field("bind_dn", &self.bind_dn)
            .field("bind_pw", &self.bind_pw.as_ref().map(|_| "<hidden>"))
            .field("filter", &self.filter)
            .field("cacert", &self.cacert)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Where the node's own bindings stand against the upstream's answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precedence {
    /// The fork's: directory, then upstream, then this node's bindings.
    UpstreamFirst,
    /// Directory, then this node's bindings, then upstream.
    LocalFirst,
}

/// `[proxy]`, when `identity` is set.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// The upstream's base URL, without a trailing `/`.
    pub identity: reqwest::Url,
    /// A v2 account token at the upstream: lookups go there hashed.
    pub access_token: Option<String>,
    pub precedence: Precedence,
    /// For the whole of one forwarded lookup (both requests of a hashed one).
    pub timeout: Duration,
}

pub(super) fn ldap(r: &Reader<'_>) -> Result<Option<LdapConfig>, ConfigError> {
    const S: &str = "ldap";
    let Some(uri) = non_empty(r.string(S, "uri")?) else {
        return Ok(None);
    };
    let scheme_ok = ["ldap://", "ldaps://"].iter().any(|scheme| {
        uri.get(..scheme.len())
            .is_some_and(|s| s.eq_ignore_ascii_case(scheme))
            && uri.len() > scheme.len()
    });
    if !scheme_ok {
        return Err(ConfigError::invalid(
            S,
            "uri",
            format!("'{uri}' is not ldap://host:port or ldaps://host:port"),
        ));
    }
    let startls = r.boolean(S, "startls")?;
    if startls && uri.to_ascii_lowercase().starts_with("ldaps://") {
        return Err(ConfigError::invalid(
            S,
            "startls",
            "an ldaps:// connection is TLS already: set startls = false, or use ldap://",
        ));
    }
    let required = |key: &str| {
        non_empty(r.string(S, key)?)
            .ok_or_else(|| ConfigError::invalid(S, key, "needed when [ldap] uri is set"))
    };
    let base = required("base")?;
    let id_attr = required("id_attr")?;
    let email_attrs = comma_list(&r.string(S, "email")?);
    let msisdn_attrs = comma_list(&r.string(S, "msisdn")?);
    if email_attrs.is_empty() && msisdn_attrs.is_empty() {
        return Err(ConfigError::invalid(
            S,
            "email",
            "neither email nor msisdn names an attribute: the directory would answer nothing",
        ));
    }
    let filter = non_empty(r.string(S, "filter")?);
    if let Some(filter) = &filter {
        if !balanced_filter(filter) {
            return Err(ConfigError::invalid(
                S,
                "filter",
                format!("'{filter}' is not one complete parenthesised filter"),
            ));
        }
    }
    let seconds = |key: &str| -> Result<Duration, ConfigError> {
        let n: f64 = r.number(S, key)?;
        if n.is_finite() && n > 0.0 {
            Ok(Duration::from_secs_f64(n))
        } else {
            Err(ConfigError::invalid(
                S,
                key,
                "must be a number of seconds above 0",
            ))
        }
    };
    Ok(Some(LdapConfig {
        settings: LdapSettings {
            uri,
            starttls: startls,
            base,
            email_attrs,
            msisdn_attrs,
            id_attr,
            hs_name: non_empty(r.string(S, "hs_name")?),
            bind_dn: non_empty(r.string(S, "bind_dn")?),
            bind_pw: non_empty(r.string(S, "bind_pw")?),
            filter,
            cacert: non_empty(r.string(S, "cacert")?).map(PathBuf::from),
            timeout: seconds("timeout")?,
        },
        sync_interval: seconds("sync_interval")?,
        live_lookup: r.boolean(S, "live_lookup")?,
    }))
}

/// Whether `filter` is one parenthesised filter: starts with `(`, ends with the `)` that
/// closes it, parentheses balanced (escaped ones, `\28` / `\29`, are not parentheses).
fn balanced_filter(filter: &str) -> bool {
    if !filter.starts_with('(') {
        return false;
    }
    let mut depth = 0usize;
    for (i, c) in filter.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth = match depth.checked_sub(1) {
                    Some(d) => d,
                    None => return false,
                };
                if depth == 0 && i + 1 != filter.len() {
                    return false;
                }
            }
            _ => {}
        }
    }
    depth == 0
}

pub(super) fn proxy(r: &Reader<'_>) -> Result<Option<ProxyConfig>, ConfigError> {
    const S: &str = "proxy";
    let Some(identity) = non_empty(r.string(S, "identity")?) else {
        return Ok(None);
    };
    let url = reqwest::Url::parse(identity.trim_end_matches('/'))
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
        .ok_or_else(|| {
            ConfigError::invalid(S, "identity", format!("'{identity}' is not an http(s) URL"))
        })?;
    let precedence = match r.string(S, "precedence")?.trim() {
        "upstream_first" => Precedence::UpstreamFirst,
        "local_first" => Precedence::LocalFirst,
        other => {
            return Err(ConfigError::invalid(
                S,
                "precedence",
                format!("'{other}' is not upstream_first or local_first"),
            ))
        }
    };
    let timeout: f64 = r.number(S, "timeout")?;
    if !(timeout.is_finite() && timeout > 0.0) {
        return Err(ConfigError::invalid(
            S,
            "timeout",
            "must be a number of seconds above 0",
        ));
    }
    Ok(Some(ProxyConfig {
        identity: url,
        access_token: non_empty(r.string(S, "access_token")?),
        precedence,
        timeout: Duration::from_secs_f64(timeout),
    }))
}

#[cfg(test)]
mod tests {
    use super::balanced_filter;

    #[test]
    fn filters_must_be_one_parenthesised_filter() {
        for good in [
            "(objectClass=person)",
            "(&(objectClass=user)(objectCategory=person))",
            "(cn=a\\29b)",
        ] {
            assert!(balanced_filter(good), "{good}");
        }
        for bad in [
            "objectClass=person",
            "(a=b)(c=d)",
            "(a=b",
            "(a=b))",
            "((a=b)",
        ] {
            assert!(!balanced_filter(bad), "{bad}");
        }
    }
}
