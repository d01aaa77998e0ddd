//! The LDAP client (the `ldap3` crate on tokio and rustls/ring): `[ldap]`'s settings as
//! [`LdapSettings`], checked once by [`LdapClient::new`]; a [`LdapConnection`] that is
//! connected, secured and bound; and the two searches the directory needs.
//!
//! - **Connecting**: TCP within `timeout`; then for `ldaps://` a TLS handshake, or with
//!   `starttls` on an `ldap://` URI the StartTLS operation and the handshake, both **before**
//!   the bind (RFC 4513 §3.1.1; the slipeer fork never did StartTLS and sent `bind_pw` in
//!   clear). The server's certificate is always verified, host name included, against
//!   `cacert` when set, else the system's roots. Then a simple bind as `bind_dn`, or an
//!   anonymous one without it. Every step and every search reply has `timeout`.
//! - [`LdapConnection::search_all`]: a subtree search under `base` for entries holding any of
//!   the email or msisdn attributes, AND-ed with `filter`, asking only for `id_attr` and those
//!   attributes, in pages of [`PAGE_SIZE`] (RFC 2696). Any error fails the whole search:
//!   a partial answer is never returned as if it were the directory.
//! - [`LdapConnection::search_addresses`]: one search for a whole batch of addresses, an OR
//!   of equality assertions over every attribute of the address's medium, each value escaped
//!   as RFC 4515 asks (a lookup of `*` finds nothing). A Matrix msisdn (`15551234567`) is
//!   asked for in both forms a directory may hold (`+15551234567`, `15551234567`); with
//!   `telephoneNumber`'s matching rule, the server ignores spaces and hyphens (`+1 555-123-4567`
//!   matches), not dots or parentheses: those numbers are found by the full search only.
//! - What comes back is turned into bindings by [`super::entries`]. Attribute names are
//!   matched case-insensitively against those the server returns, which are the schema's
//!   primary names: configure `mail`, not an alias such as `rfc822Mailbox`. Referrals are
//!   not followed.
//!
//! Errors ([`LdapError`]) say which step failed and never carry the password.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ldap3::adapters::{Adapter, EntriesOnly, PagedResults};
use ldap3::{Ldap, LdapConnAsync, LdapConnSettings, LdapResult, Scope, SearchEntry, StdStream};
use reqwest::Url;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use super::entries::{BindingsBuilder, DirectoryBinding, DirectoryEntry, DirectorySnapshot};
use crate::mesh::tls::describe_error;
use crate::types::{Medium, Threepid};

/// Entries per page of the full search (RFC 2696). OpenLDAP's and Active Directory's default
/// limits per answer are 500 and 1000.
pub const PAGE_SIZE: i32 = 500;
/// The most bytes of assertions one address search sends; a larger batch takes several
/// searches. OpenLDAP refuses requests over 256 KiB from anonymous clients.
const MAX_FILTER_BYTES: usize = 64 * 1024;

pub use crate::config::LdapSettings;

#[derive(Debug, thiserror::Error)]
pub enum LdapError {
    /// A setting the client cannot use; nothing was sent.
    #[error("[ldap] {key}: {message}")]
    Settings { key: &'static str, message: String },
    /// No TCP connection: refused, unreachable, unknown host, or none within `timeout`.
    #[error("cannot connect to the LDAP server {uri}: {message}")]
    Connect { uri: String, message: String },
    /// StartTLS was refused or the TLS handshake failed, most often over a certificate that
    /// `cacert` does not vouch for or that names another host.
    #[error("TLS with the LDAP server {uri} failed: {message}")]
    Tls { uri: String, message: String },
    /// The server refused the bind (`who` is the bind DN, or `anonymous`).
    #[error("the LDAP server {uri} refused the bind as {who}: {message}")]
    Bind {
        uri: String,
        who: String,
        message: String,
    },
    /// A search failed, or the connection broke during it.
    #[error("LDAP search under '{base}' on {uri} failed: {message}")]
    Search {
        uri: String,
        base: String,
        message: String,
    },
    /// The server stopped answering: nothing came within `timeout` at this stage.
    #[error("the LDAP server {uri} did not answer within {timeout:?} ({stage})")]
    Timeout {
        uri: String,
        stage: &'static str,
        timeout: Duration,
    },
}

fn setting(key: &'static str, message: impl Into<String>) -> LdapError {
    LdapError::Settings {
        key,
        message: message.into(),
    }
}

/// Connects with one `[ldap]` configuration, checked once: the URI, the attributes, the
/// filter and the TLS roots. Cheap to clone; each [`Self::connect`] opens a new connection.
#[derive(Clone)]
pub struct LdapClient {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    settings: LdapSettings,
    url: Url,
    host: String,
    port: u16,
    /// Present for `ldaps://` and for StartTLS.
    tls: Option<Arc<ClientConfig>>,
    starttls: bool,
    /// `filter`, parenthesised.
    filter: Option<String>,
    /// The attribute names, lowercased, to read what the server returns.
    id_attr: String,
    email_attrs: Vec<String>,
    msisdn_attrs: Vec<String>,
    /// What searches ask for: `id_attr` and the medium attributes, as configured.
    requested: Vec<String>,
}

impl LdapClient {
    /// Checks `settings` and loads the TLS roots; sends nothing.
    pub fn new(settings: LdapSettings) -> Result<Self, LdapError> {
        let uri = settings.uri.trim();
        let url = Url::parse(uri).map_err(|e| setting("uri", format!("'{uri}': {e}")))?;
        let (tls_from_start, default_port) = match url.scheme() {
            "ldap" => (false, 389),
            "ldaps" => (true, 636),
            other => {
                return Err(setting(
                    "uri",
                    format!("'{uri}': the scheme must be ldap:// or ldaps://, not {other}://"),
                ))
            }
        };
        if !url.username().is_empty() || url.password().is_some() {
            return Err(setting(
                "uri",
                "must not hold credentials: use bind_dn and bind_pw",
            ));
        }
        // An IPv6 literal comes bracketed, as the URI writes it.
        let host = match url.host_str() {
            Some(host) if !host.is_empty() => host.trim_start_matches('[').trim_end_matches(']'),
            _ => return Err(setting("uri", format!("'{uri}' names no host"))),
        }
        .to_owned();
        let port = url.port().unwrap_or(default_port);
        let starttls = settings.starttls && !tls_from_start;

        if settings.base.trim().is_empty() {
            return Err(setting(
                "base",
                "empty: name the subtree that holds the people",
            ));
        }
        if !is_attribute_name(&settings.id_attr) {
            return Err(setting(
                "id_attr",
                format!("'{}' is not an attribute name", settings.id_attr),
            ));
        }
        for (key, attrs) in [
            ("email", &settings.email_attrs),
            ("msisdn", &settings.msisdn_attrs),
        ] {
            if let Some(bad) = attrs.iter().find(|a| !is_attribute_name(a)) {
                return Err(setting(key, format!("'{bad}' is not an attribute name")));
            }
        }
        if settings.email_attrs.is_empty() && settings.msisdn_attrs.is_empty() {
            return Err(setting(
                "email",
                "neither email nor msisdn names an attribute: the directory would answer nothing",
            ));
        }
        let filter = match settings.filter.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(f) if f.starts_with('(') => Some(f.to_owned()),
            Some(f) => Some(format!("({f})")),
        };
        if let Some(f) = &filter {
            if ldap3::parse_filter(f).is_err() {
                return Err(setting("filter", format!("'{f}' is not an LDAP filter")));
            }
        }
        let bind_dn = settings.bind_dn.as_deref().filter(|dn| !dn.is_empty());
        if bind_dn.is_some() && settings.bind_pw.as_deref().unwrap_or("").is_empty() {
            // RFC 4513 §5.1.2: a DN with an empty password is an unauthenticated bind, which
            // servers may answer as anonymous: a typo would silently change who searches.
            return Err(setting("bind_pw", "empty while bind_dn is set"));
        }
        let tls = if tls_from_start || starttls {
            let roots = roots(settings.cacert.as_deref())?;
            let config = crate::homeserver::tls_config(true, roots)
                .map_err(|e| setting("cacert", e.to_string()))?;
            Some(Arc::new(config))
        } else {
            if bind_dn.is_some() && !is_loopback(&host) {
                log::warn!(
                    "[ldap] bind_pw goes in clear to {uri}: set startls = true or use ldaps://"
                );
            }
            None
        };

        let lower = |attrs: &[String]| -> Vec<String> {
            attrs.iter().map(|a| a.to_ascii_lowercase()).collect()
        };
        let mut requested = vec![settings.id_attr.clone()];
        for attr in settings.email_attrs.iter().chain(&settings.msisdn_attrs) {
            if !requested.iter().any(|r| r.eq_ignore_ascii_case(attr)) {
                requested.push(attr.clone());
            }
        }
        Ok(Self {
            inner: Arc::new(ClientInner {
                id_attr: settings.id_attr.to_ascii_lowercase(),
                email_attrs: lower(&settings.email_attrs),
                msisdn_attrs: lower(&settings.msisdn_attrs),
                requested,
                filter,
                url,
                host,
                port,
                tls,
                starttls,
                settings,
            }),
        })
    }

    pub fn settings(&self) -> &LdapSettings {
        &self.inner.settings
    }

    /// A new connection, secured as configured and bound.
    pub async fn connect(&self) -> Result<LdapConnection, LdapError> {
        let inner = &self.inner;
        let timeout = inner.settings.timeout;
        let uri = || inner.settings.uri.trim().to_owned();
        let connect_error = |message: String| LdapError::Connect {
            uri: uri(),
            message,
        };
        // Our own TCP connection, so a refused or silent port reads as a connect error and
        // only what follows as TLS.
        let tcp = tokio::time::timeout(
            timeout,
            TcpStream::connect((inner.host.as_str(), inner.port)),
        )
        .await
        .map_err(|_| connect_error(format!("no connection within {timeout:?}")))?
        .map_err(|e| connect_error(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let tcp = tcp.into_std().map_err(|e| connect_error(e.to_string()))?;
        let mut conn_settings = LdapConnSettings::new()
            .set_conn_timeout(timeout)
            .set_std_stream(StdStream::Tcp(tcp));
        if let Some(tls) = &inner.tls {
            conn_settings = conn_settings
                .set_config(Arc::clone(tls))
                .set_starttls(inner.starttls);
        }
        let stage = if inner.starttls {
            "StartTLS"
        } else {
            "TLS handshake"
        };
        let (conn, ldap) = LdapConnAsync::from_url_with_settings(conn_settings, &inner.url)
            .await
            .map_err(|e| match e {
                ldap3::LdapError::Timeout { .. } => LdapError::Timeout {
                    uri: uri(),
                    stage,
                    timeout,
                },
                ldap3::LdapError::LdapResult { result } => LdapError::Tls {
                    uri: uri(),
                    message: format!("the server refused StartTLS: {result}"),
                },
                e if inner.tls.is_some() => LdapError::Tls {
                    uri: uri(),
                    message: tls_failure(&e, inner.settings.cacert.is_some()),
                },
                e => connect_error(describe_error(&e)),
            })?;
        let driver = tokio::spawn(async move {
            if let Err(e) = conn.drive().await {
                log::debug!("LDAP connection ended: {e}");
            }
        });
        let mut connection = LdapConnection {
            client: self.clone(),
            ldap,
            driver,
        };
        connection.bind().await?;
        Ok(connection)
    }

    /// [`LdapConnection::search_all`] on a connection of its own, unbound after a success and
    /// dropped after an error (a server that timed out is not waited for again).
    pub async fn search_all(&self) -> Result<DirectorySnapshot, LdapError> {
        let mut connection = self.connect().await?;
        let found = connection.search_all().await;
        if found.is_ok() {
            connection.close().await;
        }
        found
    }

    /// [`LdapConnection::search_addresses`] on a connection of its own.
    pub async fn search_addresses(
        &self,
        addresses: &[(Medium, String)],
    ) -> Result<Vec<DirectoryBinding>, LdapError> {
        let mut connection = self.connect().await?;
        let found = connection.search_addresses(addresses).await;
        if found.is_ok() {
            connection.close().await;
        }
        found
    }
}

/// Every person in the directory, on a connection made for it (see [`LdapConnection::search_all`]).
pub async fn search_all(settings: &LdapSettings) -> Result<DirectorySnapshot, LdapError> {
    LdapClient::new(settings.clone())?.search_all().await
}

/// The bindings the directory holds for `addresses`, on a connection made for it (see
/// [`LdapConnection::search_addresses`]).
pub async fn search_addresses(
    settings: &LdapSettings,
    addresses: &[(Medium, String)],
) -> Result<Vec<DirectoryBinding>, LdapError> {
    LdapClient::new(settings.clone())?
        .search_addresses(addresses)
        .await
}

/// A bound connection. After an error, drop it and connect again. Dropping it closes the
/// socket; [`Self::close`] unbinds first.
pub struct LdapConnection {
    client: LdapClient,
    ldap: Ldap,
    /// ldap3's connection task, which owns the socket.
    driver: JoinHandle<()>,
}

impl Drop for LdapConnection {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl LdapConnection {
    fn uri(&self) -> String {
        self.client.inner.settings.uri.trim().to_owned()
    }

    async fn bind(&mut self) -> Result<(), LdapError> {
        let settings = &self.client.inner.settings;
        let timeout = settings.timeout;
        let (dn, pw) = match settings.bind_dn.as_deref().filter(|dn| !dn.is_empty()) {
            Some(dn) => (dn, settings.bind_pw.as_deref().unwrap_or("")),
            None => ("", ""),
        };
        let who = if dn.is_empty() { "anonymous" } else { dn }.to_owned();
        let result = self.ldap.with_timeout(timeout).simple_bind(dn, pw).await;
        let message = match result {
            Ok(result) if result.rc == 0 => return Ok(()),
            Ok(result) => describe_result(&result),
            Err(ldap3::LdapError::Timeout { .. }) => {
                return Err(LdapError::Timeout {
                    uri: self.uri(),
                    stage: "bind",
                    timeout,
                })
            }
            Err(e) => describe_error(&e),
        };
        Err(LdapError::Bind {
            uri: self.uri(),
            who,
            message,
        })
    }

    /// Unbinds (politely, within `timeout`) and closes the connection.
    pub async fn close(mut self) {
        let timeout = self.client.inner.settings.timeout;
        let _ = tokio::time::timeout(timeout, self.ldap.unbind()).await;
    }

    /// True once the server closed the connection (or it broke).
    pub fn is_closed(&mut self) -> bool {
        self.ldap.is_closed()
    }

    /// Everyone under `base` holding an email or msisdn attribute, as bindings (paged, see
    /// the module doc). Entries without a usable Matrix ID are warned about, by DN.
    pub async fn search_all(&mut self) -> Result<DirectorySnapshot, LdapError> {
        let inner = Arc::clone(&self.client.inner);
        let attrs: Vec<&str> = inner
            .settings
            .email_attrs
            .iter()
            .chain(&inner.settings.msisdn_attrs)
            .map(String::as_str)
            .collect();
        let filter = and_filter(&any_present(&attrs), inner.filter.as_deref());
        let mut builder = BindingsBuilder::new(
            inner.settings.hs_name.as_deref(),
            &inner.settings.id_attr,
            log::Level::Warn,
        );
        self.search(&filter, &mut builder).await?;
        Ok(builder.finish())
    }

    /// The bindings for `addresses` (Matrix forms: casefolded emails, msisdn digits), in one
    /// search per [`MAX_FILTER_BYTES`] of filter. An address the directory does not hold,
    /// holds ambiguously, or that cannot be an address is left out. Nothing is logged above
    /// debug level: this serves lookups.
    pub async fn search_addresses(
        &mut self,
        addresses: &[(Medium, String)],
    ) -> Result<Vec<DirectoryBinding>, LdapError> {
        let inner = Arc::clone(&self.client.inner);
        let wanted: BTreeSet<(Medium, String)> = addresses
            .iter()
            .filter_map(|(medium, address)| query_form(*medium, address))
            .collect();
        let mut found = Vec::new();
        for batch in address_batches(
            &wanted,
            &inner.settings.email_attrs,
            &inner.settings.msisdn_attrs,
        ) {
            let filter = and_filter(&batch.filter, inner.filter.as_deref());
            let mut builder = BindingsBuilder::new(
                inner.settings.hs_name.as_deref(),
                &inner.settings.id_attr,
                log::Level::Debug,
            );
            self.search(&filter, &mut builder).await?;
            let snapshot = builder.finish();
            for (medium, _, dns) in &snapshot.ambiguous {
                log::debug!("LDAP: an {medium} address held by {dns:?} is ambiguous");
            }
            found.extend(snapshot.bindings.into_iter().filter(|binding| {
                batch
                    .addresses
                    .contains(&(binding.medium, binding.address.clone()))
            }));
        }
        Ok(found)
    }

    /// One paged subtree search under `base`, every entry handed to `builder`. Any error
    /// (including a result code other than success at the end) fails the whole search.
    async fn search(
        &mut self,
        filter: &str,
        builder: &mut BindingsBuilder,
    ) -> Result<(), LdapError> {
        let inner = Arc::clone(&self.client.inner);
        let timeout = inner.settings.timeout;
        let uri = self.uri();
        let failed = |e: ldap3::LdapError| match e {
            ldap3::LdapError::Timeout { .. } => LdapError::Timeout {
                uri: uri.clone(),
                stage: "search",
                timeout,
            },
            ldap3::LdapError::LdapResult { result } => {
                search_error(&inner, describe_result(&result))
            }
            e => search_error(&inner, describe_error(&e)),
        };
        let adapters: Vec<Box<dyn Adapter<String, Vec<String>>>> = vec![
            Box::new(EntriesOnly::new()),
            Box::new(PagedResults::new(PAGE_SIZE)),
        ];
        let mut stream = self
            .ldap
            .with_timeout(timeout)
            .streaming_search_with(
                adapters,
                &inner.settings.base,
                Scope::Subtree,
                filter,
                inner.requested.clone(),
            )
            .await
            .map_err(failed)?;
        while let Some(entry) = stream.next().await.map_err(failed)? {
            builder.add(inner.entry(SearchEntry::construct(entry)));
        }
        let result = stream.finish().await;
        if result.rc != 0 {
            return Err(search_error(&inner, describe_result(&result)));
        }
        Ok(())
    }
}

fn search_error(inner: &ClientInner, message: String) -> LdapError {
    LdapError::Search {
        uri: inner.settings.uri.trim().to_owned(),
        base: inner.settings.base.clone(),
        message,
    }
}

impl ClientInner {
    /// The values of the attributes that matter, by the names the server returned them under
    /// (any options such as `;lang-en` ignored).
    fn entry(&self, found: SearchEntry) -> DirectoryEntry {
        let mut entry = DirectoryEntry {
            dn: found.dn,
            ..DirectoryEntry::default()
        };
        for (name, values) in found.attrs {
            let name = name.split(';').next().unwrap_or("").to_ascii_lowercase();
            if name == self.id_attr {
                entry.ids.extend(values.iter().cloned());
            }
            if self.email_attrs.contains(&name) {
                entry.emails.extend(values.iter().cloned());
            }
            if self.msisdn_attrs.contains(&name) {
                entry.phones.extend(values);
            }
        }
        entry
    }
}

/// An LDAP result code in words (`rc=49 (invalidCredentials)` and the server's text), after
/// a hint for the usual mistakes.
fn describe_result(result: &LdapResult) -> String {
    let hint = match result.rc {
        49 => "wrong bind_dn or bind_pw: ",
        48 => "the server refuses this kind of bind (anonymous?): ",
        13 => "the server wants TLS first (startls = true or ldaps://): ",
        32 => "base does not exist: ",
        50 => "the bind DN may not search there: ",
        _ => "",
    };
    // ldap3 writes `rc=49 (invalidCredentials), dn: "…", text: "…"`.
    let full = result.to_string();
    let code = full.split(", dn: ").next().unwrap_or(&full);
    match result.text.trim() {
        "" => format!("{hint}{code}"),
        text => format!("{hint}{code}: {text}"),
    }
}

/// Why a TLS handshake failed: rustls' verdict (which tokio-rustls wraps in an I/O error),
/// with a hint when it is the server's certificate.
fn tls_failure(e: &ldap3::LdapError, own_ca: bool) -> String {
    let verdict = match e {
        ldap3::LdapError::Io { source } => source
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>()),
        ldap3::LdapError::Rustls { source } => Some(source),
        _ => None,
    };
    match verdict {
        Some(refused @ rustls::Error::InvalidCertificate(_)) => format!(
            "{refused} (the server's certificate must name this host and come from {})",
            if own_ca {
                "the CA in [ldap] cacert"
            } else {
                "a CA the system trusts: set [ldap] cacert"
            }
        ),
        Some(other) => other.to_string(),
        None => describe_error(e),
    }
}

/// The form an address is asked for in: emails casefolded as stored, msisdns as digits.
/// `None` for what cannot be an address of that medium (not asked at all): control
/// characters included, as OpenLDAP reads a value only up to a NUL (`a@b.org\0` would find
/// `a@b.org`). Everything else, however odd, is escaped on its way into the filter, and only
/// entries whose own value is the address asked for answer it.
fn query_form(medium: Medium, address: &str) -> Option<(Medium, String)> {
    let address = Threepid::lookup_key(medium, address.trim()).into_owned();
    let plausible = match medium {
        Medium::Email => !address.is_empty() && !address.chars().any(char::is_control),
        Medium::Msisdn => {
            (1..=15).contains(&address.len()) && address.bytes().all(|b| b.is_ascii_digit())
        }
    };
    plausible.then_some((medium, address))
}

/// One search's share of a batch: the addresses and the OR of their assertions.
struct AddressBatch {
    addresses: BTreeSet<(Medium, String)>,
    filter: String,
}

/// The assertions for `wanted`, split so that no filter exceeds [`MAX_FILTER_BYTES`]. An
/// email is asked of every email attribute; an msisdn of every msisdn attribute, as
/// `+<digits>` and as `<digits>`. A medium with no attribute is not asked.
fn address_batches(
    wanted: &BTreeSet<(Medium, String)>,
    email_attrs: &[String],
    msisdn_attrs: &[String],
) -> Vec<AddressBatch> {
    let mut batches = Vec::new();
    let mut addresses = BTreeSet::new();
    let mut terms = String::new();
    for (medium, address) in wanted {
        let mut own = String::new();
        match medium {
            Medium::Email => {
                for attr in email_attrs {
                    own.push_str(&equality(attr, address));
                }
            }
            Medium::Msisdn => {
                for attr in msisdn_attrs {
                    own.push_str(&equality(attr, &format!("+{address}")));
                    own.push_str(&equality(attr, address));
                }
            }
        }
        if own.is_empty() {
            continue;
        }
        if !terms.is_empty() && terms.len() + own.len() > MAX_FILTER_BYTES {
            batches.push(AddressBatch {
                addresses: std::mem::take(&mut addresses),
                filter: format!("(|{})", std::mem::take(&mut terms)),
            });
        }
        addresses.insert((*medium, address.clone()));
        terms.push_str(&own);
    }
    if !terms.is_empty() {
        batches.push(AddressBatch {
            addresses,
            filter: format!("(|{terms})"),
        });
    }
    batches
}

/// `(attr=value)` with the value escaped as RFC 4515 §3 asks: `*`, `(`, `)`, `\` and NUL as
/// `\2a`, `\28`, `\29`, `\5c`, `\00`.
fn equality(attr: &str, value: &str) -> String {
    format!("({attr}={})", ldap3::ldap_escape(value))
}

/// `(|(a=*)(b=*))`, or `(a=*)` for one attribute.
fn any_present(attrs: &[&str]) -> String {
    match attrs {
        [one] => format!("({one}=*)"),
        _ => format!(
            "(|{})",
            attrs.iter().map(|a| format!("({a}=*)")).collect::<String>()
        ),
    }
}

/// `inner` AND-ed with the configured filter, if any.
fn and_filter(inner: &str, configured: Option<&str>) -> String {
    match configured {
        Some(configured) => format!("(&{inner}{configured})"),
        None => inner.to_owned(),
    }
}

/// An attribute description without options: a name (`mail`, `sAMAccountName`) or an OID.
fn is_attribute_name(name: &str) -> bool {
    let descr = name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    let oid = !name.is_empty()
        && name
            .split('.')
            .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()));
    descr || oid
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The roots that vouch for the server: the certificates in `cacert`, else the system's.
fn roots(cacert: Option<&Path>) -> Result<RootCertStore, LdapError> {
    let mut roots = RootCertStore::empty();
    match cacert {
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| setting("cacert", format!("cannot read {}: {e}", path.display())))?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert
                    .map_err(|e| setting("cacert", format!("{}: bad PEM: {e}", path.display())))?;
                roots.add(cert).map_err(|e| {
                    setting(
                        "cacert",
                        format!("{}: not a CA certificate: {e}", path.display()),
                    )
                })?;
            }
            if roots.is_empty() {
                return Err(setting(
                    "cacert",
                    format!("{} holds no certificate", path.display()),
                ));
            }
        }
        None => {
            let (added, _) =
                roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            if added == 0 {
                return Err(setting(
                    "cacert",
                    "unset, and no system CA certificates were found: set it to the CA file",
                ));
            }
        }
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> LdapSettings {
        LdapSettings {
            uri: "ldap://ldap.example.org".into(),
            starttls: false,
            base: "ou=people,dc=example,dc=org".into(),
            email_attrs: vec!["mail".into(), "otherMailbox".into()],
            msisdn_attrs: vec!["telephoneNumber".into()],
            id_attr: "uid".into(),
            hs_name: Some("example.org".into()),
            bind_dn: None,
            bind_pw: None,
            filter: None,
            cacert: None,
            timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn filter_values_are_escaped_as_rfc_4515_asks() {
        assert_eq!(equality("mail", "*"), r"(mail=\2a)");
        assert_eq!(equality("mail", "a*"), r"(mail=a\2a)");
        assert_eq!(equality("mail", "x)(uid=*"), r"(mail=x\29\28uid=\2a)");
        assert_eq!(equality("mail", "\\"), r"(mail=\5c)");
        assert_eq!(equality("mail", "a\0b"), r"(mail=a\00b)");
        assert_eq!(
            equality("mail", "jöe@example.org"),
            "(mail=jöe@example.org)"
        );
        for value in ["*", "a*", "x)(uid=*", "\\", "\0"] {
            assert!(
                ldap3::parse_filter(equality("mail", value)).is_ok(),
                "{value:?}"
            );
        }
    }

    #[test]
    fn a_batch_asks_every_attribute_of_each_medium_in_one_filter() {
        let wanted: BTreeSet<_> = [
            query_form(Medium::Email, "Alice@Example.org").unwrap(),
            query_form(Medium::Msisdn, "+15551234567").unwrap(),
        ]
        .into();
        let s = settings();
        let batches = address_batches(&wanted, &s.email_attrs, &s.msisdn_attrs);
        assert_eq!(batches.len(), 1);
        assert_eq!(
            batches[0].filter,
            "(|(mail=alice@example.org)(otherMailbox=alice@example.org)\
             (telephoneNumber=+15551234567)(telephoneNumber=15551234567))"
        );
        assert!(ldap3::parse_filter(&batches[0].filter).is_ok());
        // No msisdn attribute: phone numbers are not asked.
        let batches = address_batches(&wanted, &s.email_attrs, &[]);
        assert_eq!(batches[0].addresses.len(), 1);
        assert!(!batches[0].filter.contains("555"));
    }

    #[test]
    fn a_large_batch_is_split_under_the_filter_budget() {
        let wanted: BTreeSet<_> = (0..5000)
            .map(|i| (Medium::Email, format!("person{i}@example.org")))
            .collect();
        let s = settings();
        let batches = address_batches(&wanted, &s.email_attrs, &s.msisdn_attrs);
        assert!(batches.len() > 1);
        assert!(batches
            .iter()
            .all(|b| b.filter.len() <= MAX_FILTER_BYTES + 3));
        let asked: usize = batches.iter().map(|b| b.addresses.len()).sum();
        assert_eq!(asked, 5000);
    }

    #[test]
    fn what_cannot_be_an_address_is_not_asked() {
        assert_eq!(query_form(Medium::Msisdn, "x)(uid=*"), None);
        assert_eq!(query_form(Medium::Msisdn, "1234567890123456"), None);
        assert_eq!(query_form(Medium::Email, " "), None);
        assert_eq!(query_form(Medium::Email, "alice@example.org\0"), None);
        assert_eq!(
            query_form(Medium::Email, "*"),
            Some((Medium::Email, "*".to_owned()))
        );
    }

    #[test]
    fn the_search_for_everyone_asks_for_any_medium_attribute() {
        assert_eq!(any_present(&["mail"]), "(mail=*)");
        assert_eq!(
            and_filter(
                &any_present(&["mail", "telephoneNumber"]),
                Some("(objectClass=person)")
            ),
            "(&(|(mail=*)(telephoneNumber=*))(objectClass=person))"
        );
    }

    #[test]
    fn settings_are_checked_before_anything_is_sent() {
        let check = |change: &dyn Fn(&mut LdapSettings), key: &str| {
            let mut s = settings();
            change(&mut s);
            match LdapClient::new(s) {
                Err(LdapError::Settings { key: k, .. }) => assert_eq!(k, key),
                Err(e) => panic!("{key}: {e}"),
                Ok(_) => panic!("{key}: accepted"),
            }
        };
        check(&|s| s.uri = "http://ldap.example.org".into(), "uri");
        check(&|s| s.uri = "ldap://user:pw@ldap.example.org".into(), "uri");
        check(&|s| s.base = " ".into(), "base");
        check(&|s| s.id_attr = "uid)(x".into(), "id_attr");
        check(&|s| s.email_attrs = vec!["mail=*".into()], "email");
        check(
            &|s| {
                s.email_attrs.clear();
                s.msisdn_attrs.clear();
            },
            "email",
        );
        check(&|s| s.filter = Some("(objectClass=person".into()), "filter");
        check(&|s| s.bind_dn = Some("cn=admin".into()), "bind_pw");
        check(
            &|s| {
                s.starttls = true;
                s.cacert = Some("/nonexistent/ca.pem".into());
            },
            "cacert",
        );
        let mut s = settings();
        s.filter = Some("objectClass=person".into());
        let client = LdapClient::new(s).unwrap();
        assert_eq!(client.inner.filter.as_deref(), Some("(objectClass=person)"));
        assert_eq!(
            client.inner.requested,
            ["uid", "mail", "otherMailbox", "telephoneNumber"]
        );
    }

    #[test]
    fn result_codes_read_as_words_with_a_hint() {
        let result = |rc, text: &str| LdapResult {
            rc,
            matched: String::new(),
            text: text.into(),
            refs: vec![],
            ctrls: vec![],
        };
        assert_eq!(
            describe_result(&result(49, "")),
            "wrong bind_dn or bind_pw: rc=49 (invalidCredentials)"
        );
        assert_eq!(
            describe_result(&result(4, "size limit exceeded")),
            "rc=4 (sizeLimitExceeded): size limit exceeded"
        );
    }

    #[test]
    fn the_password_stays_out_of_debug_output() {
        let mut s = settings();
        s.bind_dn = Some("cn=admin".into());
        s.bind_pw = Some("hunter2".into());
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    #[test]
    fn searches_can_run_on_any_tokio_worker() {
        fn assert_send<T: Send>(_: &T) {}
        let client = LdapClient::new(settings()).unwrap();
        assert_send(&client.search_all());
        assert_send(&client.search_addresses(&[]));
    }
}
