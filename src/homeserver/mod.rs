//! The client this node uses to reach homeservers (OpenID userinfo at registration, their
//! signing keys in `keys.rs`; later onbind callbacks): Matrix server-name resolution as the
//! server-server spec says, TLS verified *including the host name* (Sydent skips the name
//! check), a connect and a total timeout and a size cap on every answer, and an IP filter
//! applied after DNS resolution (and to IP literals and redirects), so a homeserver name
//! resolving to a private address cannot make the node call into its own network.
//!
//! Resolution (spec: "Resolving server names"): an IP literal is used as it is (port given or
//! 8448); a name with an explicit port is used as it is; otherwise
//! `https://<name>/.well-known/matrix/server` is asked (cached as its Cache-Control says, at most
//! 48 h, 24 h by default; a failure is cached 1 h) and its `m.server` followed once (a name
//! with a port or an IP literal is used as it is); then the SRV records `_matrix-fed._tcp` and
//! `_matrix._tcp` of the (delegated) name (lowest priority, weighted choice); then port 8448.
//! The `Host` header is the (delegated) server name, and the certificate must name it, also
//! when an SRV record sends the connection to another host.

mod ip_filter;
pub mod keys;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_resolver::config::{NameServerConfigGroup, ResolverConfig, ResolverOpts};
use hickory_resolver::TokioAsyncResolver;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName as TlsName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

pub use ip_filter::IpFilter;
pub use keys::ServerKeys;

use crate::config::Config;
use crate::mesh::tls::{describe_error, provider};
use crate::types::ServerName;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Answers of `/.well-known/matrix/server` are read up to this size.
const WELL_KNOWN_LIMIT: usize = 50 * 1024;
const WELL_KNOWN_DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
const WELL_KNOWN_MAX_TTL: Duration = Duration::from_secs(48 * 3600);
const WELL_KNOWN_FAILURE_TTL: Duration = Duration::from_secs(3600);
const DEFAULT_FEDERATION_PORT: u16 = 8448;

#[derive(Debug, thiserror::Error)]
pub enum HomeserverError {
    #[error("'{0}' is not a valid server name")]
    InvalidServerName(String),
    #[error("{0} resolves to an address this node may not contact (ip.blacklist)")]
    Blocked(String),
    #[error("cannot reach {server}: {message}")]
    Unreachable { server: String, message: String },
    #[error("{server}'s answer is larger than {limit} bytes")]
    TooLarge { server: String, limit: usize },
}

/// An answer from a homeserver: its status and body (at most the limit asked for).
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Where a server name's requests go.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    /// `https://host:port`, the host being what the certificate must name.
    base_url: String,
    /// The `Host` header: the (delegated) server name.
    host_header: String,
    /// The host the connection goes to: the URL's, or an SRV record's target.
    connect_host: String,
}

/// host → the SRV target its connections go to (read by the federation client's resolver).
type SrvTargets = Arc<Mutex<HashMap<String, String>>>;

struct CachedWellKnown {
    delegated: Option<String>,
    expires: Instant,
}

pub struct HomeserverClient {
    federation: reqwest::Client,
    well_known_client: reqwest::Client,
    filter: Arc<IpFilter>,
    well_known: Mutex<HashMap<String, CachedWellKnown>>,
    /// 443 but in tests, which cannot listen there.
    well_known_port: u16,
    /// SRV lookups (None: no usable resolver configuration; discovery skips SRV).
    srv: Option<TokioAsyncResolver>,
    srv_targets: SrvTargets,
}

impl HomeserverClient {
    /// The node's client: the system's trust roots (`SSL_CERT_FILE` / `SSL_CERT_DIR` honoured),
    /// `federation.verifycerts`, `ip.blacklist` and `ip.whitelist`.
    pub fn new(config: &Config) -> Result<Self, String> {
        let mut roots = RootCertStore::empty();
        roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        let filter = IpFilter::new(&config.general.ip_blacklist, &config.general.ip_whitelist);
        Self::with_roots(filter, config.http.federation_verifycerts, roots, 443)
    }

    /// A client with these trust roots, asking for well-known files on `well_known_port`.
    pub fn with_roots(
        filter: IpFilter,
        verify_certificates: bool,
        roots: RootCertStore,
        well_known_port: u16,
    ) -> Result<Self, String> {
        crate::mesh::tls::install_default_provider();
        let filter = Arc::new(filter);
        let tls = tls_config(verify_certificates, roots).map_err(|e| e.to_string())?;
        let srv_targets = SrvTargets::default();
        let builder = |redirects: reqwest::redirect::Policy, srv: Option<SrvTargets>| {
            reqwest::Client::builder()
                .use_preconfigured_tls(tls.clone())
                .dns_resolver(Arc::new(FilteredResolver {
                    filter: Arc::clone(&filter),
                    srv_targets: srv,
                }))
                .no_proxy()
                .redirect(redirects)
                .connect_timeout(CONNECT_TIMEOUT)
                .timeout(REQUEST_TIMEOUT)
                .user_agent(concat!("sydent-rs/", env!("CARGO_PKG_VERSION")))
                .build()
                .map_err(|e| e.to_string())
        };
        // Federation requests are not redirected; well-known files may be, but never to an
        // address literal the filter refuses (host names go through the filtering resolver).
        let redirect_filter = Arc::clone(&filter);
        let well_known_redirects = reqwest::redirect::Policy::custom(move |attempt| {
            let literal = attempt.url().host_str().and_then(ip_literal);
            if attempt.previous().len() >= 5 {
                attempt.error("too many redirects")
            } else if literal.is_some_and(|ip| !redirect_filter.allows(ip)) {
                attempt.error("redirected to a refused address")
            } else {
                attempt.follow()
            }
        });
        let srv = match TokioAsyncResolver::tokio_from_system_conf() {
            Ok(resolver) => Some(resolver),
            Err(e) => {
                log::warn!("homeserver discovery skips SRV records: no DNS configuration ({e})");
                None
            }
        };
        Ok(Self {
            federation: builder(
                reqwest::redirect::Policy::none(),
                Some(Arc::clone(&srv_targets)),
            )?,
            well_known_client: builder(well_known_redirects, None)?,
            filter,
            well_known: Mutex::new(HashMap::new()),
            well_known_port,
            srv,
            srv_targets,
        })
    }

    /// Asks this DNS server (UDP and TCP) for SRV records instead of the system's (tests).
    pub fn with_nameserver(mut self, server: SocketAddr) -> Self {
        let servers = NameServerConfigGroup::from_ips_clear(&[server.ip()], server.port(), true);
        let config = ResolverConfig::from_parts(None, vec![], servers);
        self.srv = Some(TokioAsyncResolver::tokio(config, ResolverOpts::default()));
        self
    }

    /// GET `path_and_query` on homeserver `server_name`, reading at most `limit` bytes of the
    /// answer. The status is the caller's to judge.
    pub async fn get(
        &self,
        server_name: &str,
        path_and_query: &str,
        limit: usize,
    ) -> Result<Answer, HomeserverError> {
        self.send(
            server_name,
            reqwest::Method::GET,
            path_and_query,
            None,
            limit,
        )
        .await
    }

    /// POST the JSON text `body` to `path` on homeserver `server_name`, reading at most
    /// `limit` bytes of the answer. The status is the caller's to judge.
    pub async fn post_json(
        &self,
        server_name: &str,
        path: &str,
        body: impl Into<reqwest::Body>,
        limit: usize,
    ) -> Result<Answer, HomeserverError> {
        self.send(
            server_name,
            reqwest::Method::POST,
            path,
            Some(body.into()),
            limit,
        )
        .await
    }

    async fn send(
        &self,
        server_name: &str,
        method: reqwest::Method,
        path_and_query: &str,
        body: Option<reqwest::Body>,
        limit: usize,
    ) -> Result<Answer, HomeserverError> {
        let target = self.resolve(server_name).await?;
        let unreachable = |e: reqwest::Error| {
            if refused_address(&e) {
                HomeserverError::Blocked(server_name.to_string())
            } else {
                HomeserverError::Unreachable {
                    server: server_name.to_string(),
                    message: describe_error(&e),
                }
            }
        };
        let mut request = self
            .federation
            .request(method, format!("{}{path_and_query}", target.base_url))
            .header(reqwest::header::HOST, &target.host_header);
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        let response = request.send().await.map_err(unreachable)?;
        let status = response.status().as_u16();
        let body = read_capped(response, limit, server_name).await?;
        Ok(Answer { status, body })
    }

    /// Where `server_name`'s requests go (spec: "Resolving server names"), with every address
    /// it resolves to allowed by the IP filter.
    async fn resolve(&self, server_name: &str) -> Result<Target, HomeserverError> {
        let (host, port) = split_server_name(server_name)?;
        let target = if ip_literal(&host).is_some() || port.is_some() {
            direct_target(&host, port, server_name)
        } else {
            match self.delegation(&host).await {
                Some(delegated) => match split_server_name(&delegated) {
                    Ok((d_host, d_port)) if d_port.is_some() || ip_literal(&d_host).is_some() => {
                        direct_target(&d_host, d_port, &delegated)
                    }
                    Ok((d_host, _)) => self.srv_or_default(&d_host).await,
                    Err(_) => self.srv_or_default(&host).await,
                },
                None => self.srv_or_default(&host).await,
            }
        };
        self.check_literal(&target, server_name)?;
        Ok(target)
    }

    /// `host` through its SRV records, else on port 8448.
    async fn srv_or_default(&self, host: &str) -> Target {
        let found = self.srv_target(host).await;
        let mut targets = self.srv_targets.lock().expect("srv lock");
        match found {
            Some((connect_host, port)) => {
                targets.insert(host.to_string(), connect_host.clone());
                Target {
                    base_url: format!("https://{host}:{port}"),
                    host_header: host.to_string(),
                    connect_host,
                }
            }
            None => {
                targets.remove(host);
                fallback_target(host)
            }
        }
    }

    /// The SRV target of `host` (`_matrix-fed._tcp` first, then the older `_matrix._tcp`):
    /// among the records of the lowest priority, one chosen by weight (RFC 2782).
    async fn srv_target(&self, host: &str) -> Option<(String, u16)> {
        let resolver = self.srv.as_ref()?;
        for service in ["_matrix-fed._tcp", "_matrix._tcp"] {
            let lookup = match resolver.srv_lookup(format!("{service}.{host}.")).await {
                Ok(lookup) => lookup,
                Err(e) => {
                    log::debug!("no {service} SRV record for {host}: {e}");
                    continue;
                }
            };
            let Some(best) = lookup.iter().map(|r| r.priority()).min() else {
                continue;
            };
            let candidates: Vec<_> = lookup.iter().filter(|r| r.priority() == best).collect();
            let total: u32 = candidates.iter().map(|r| u32::from(r.weight())).sum();
            let mut pick = if total == 0 {
                0
            } else {
                rand_core::RngCore::next_u32(&mut rand_core::OsRng) % (total + 1)
            };
            let chosen = candidates
                .iter()
                .find(|r| {
                    let weight = u32::from(r.weight());
                    if pick <= weight {
                        true
                    } else {
                        pick -= weight;
                        false
                    }
                })
                .unwrap_or(&candidates[0]);
            let target = chosen.target().to_ascii();
            let target = target.trim_end_matches('.').to_ascii_lowercase();
            // A lone "." says the service is not offered there.
            if target.is_empty() {
                return None;
            }
            return Some((target, chosen.port()));
        }
        None
    }

    /// Refuses a target that is an address literal the filter does not allow (literals
    /// bypass the resolver, which judges every host name when it connects).
    fn check_literal(&self, target: &Target, server: &str) -> Result<(), HomeserverError> {
        match ip_literal(&target.connect_host) {
            Some(ip) if !self.filter.allows(ip) => {
                Err(HomeserverError::Blocked(server.to_string()))
            }
            _ => Ok(()),
        }
    }

    /// The `m.server` of `host`'s well-known file, from the cache or asked now.
    async fn delegation(&self, host: &str) -> Option<String> {
        let now = Instant::now();
        if let Some(cached) = self.well_known.lock().expect("cache lock").get(host) {
            if cached.expires > now {
                return cached.delegated.clone();
            }
        }
        let (delegated, ttl) = match self.fetch_well_known(host).await {
            Ok((delegated, ttl)) => (Some(delegated), ttl),
            Err(e) => {
                log::debug!("no usable /.well-known/matrix/server for {host}: {e}");
                (None, Some(WELL_KNOWN_FAILURE_TTL))
            }
        };
        if let Some(ttl) = ttl {
            self.well_known.lock().expect("cache lock").insert(
                host.to_string(),
                CachedWellKnown {
                    delegated: delegated.clone(),
                    expires: now + ttl,
                },
            );
        }
        delegated
    }

    /// (`m.server`, how long to cache it: None for `no-store`).
    async fn fetch_well_known(&self, host: &str) -> Result<(String, Option<Duration>), String> {
        let url = if self.well_known_port == 443 {
            format!("https://{host}/.well-known/matrix/server")
        } else {
            format!(
                "https://{host}:{}/.well-known/matrix/server",
                self.well_known_port
            )
        };
        let response = self
            .well_known_client
            .get(&url)
            .send()
            .await
            .map_err(|e| describe_error(&e))?;
        if response.status() != reqwest::StatusCode::OK {
            return Err(format!("status {}", response.status()));
        }
        let ttl = cache_ttl(response.headers());
        let body = read_capped(response, WELL_KNOWN_LIMIT, host)
            .await
            .map_err(|e| e.to_string())?;
        let json: serde_json::Value =
            serde_json::from_slice(&body).map_err(|_| "not JSON".to_string())?;
        let delegated = json
            .get("m.server")
            .and_then(|v| v.as_str())
            .ok_or("no string m.server")?;
        split_server_name(delegated).map_err(|e| e.to_string())?;
        Ok((delegated.to_string(), ttl))
    }
}

/// A target used as given: an IP literal or a name with a port (8448 when none).
fn direct_target(host: &str, port: Option<u16>, server_name: &str) -> Target {
    let port = port.unwrap_or(DEFAULT_FEDERATION_PORT);
    Target {
        base_url: format!("https://{}:{port}", bracketed(host)),
        host_header: server_name.to_string(),
        connect_host: host.to_string(),
    }
}

/// No delegation and no SRV record: the name on port 8448.
fn fallback_target(host: &str) -> Target {
    Target {
        base_url: format!("https://{host}:{DEFAULT_FEDERATION_PORT}"),
        host_header: host.to_string(),
        connect_host: host.to_string(),
    }
}

fn bracketed(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

fn ip_literal(host: &str) -> Option<IpAddr> {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

/// (host, port) of a Matrix server name (the grammar of [`ServerName`]), the host lowercased
/// and an IPv6 address without its brackets.
fn split_server_name(name: &str) -> Result<(String, Option<u16>), HomeserverError> {
    let name = name.to_ascii_lowercase();
    let invalid = || HomeserverError::InvalidServerName(name.clone());
    ServerName::parse(&name).map_err(|_| invalid())?;
    let (host, port) = match name.strip_prefix('[') {
        Some(rest) => {
            let (v6, tail) = rest.split_once(']').ok_or_else(invalid)?;
            (v6, tail.strip_prefix(':'))
        }
        None => match name.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (name.as_str(), None),
        },
    };
    let port = port
        .map(|p| p.parse::<u16>().map_err(|_| invalid()))
        .transpose()?;
    Ok((host.to_string(), port))
}

/// How long a well-known answer may be cached: `no-store` → None; `max-age` capped at 48 h;
/// else 24 h.
fn cache_ttl(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let cache_control = headers
        .get_all(reqwest::header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|d| d.trim().to_ascii_lowercase())
        .collect::<Vec<_>>();
    if cache_control.iter().any(|d| d == "no-store") {
        return None;
    }
    let max_age = cache_control.iter().find_map(|d| {
        d.strip_prefix("max-age=")?
            .trim_matches('"')
            .parse::<u64>()
            .ok()
    });
    Some(
        max_age
            .map(Duration::from_secs)
            .unwrap_or(WELL_KNOWN_DEFAULT_TTL)
            .min(WELL_KNOWN_MAX_TTL),
    )
}

/// The body, or TooLarge as soon as it passes `limit` bytes.
async fn read_capped(
    response: reqwest::Response,
    limit: usize,
    server: &str,
) -> Result<Vec<u8>, HomeserverError> {
    read_body_capped(response, limit)
        .await
        .map_err(|e| match e {
            CappedReadError::TooLarge => HomeserverError::TooLarge {
                server: server.to_string(),
                limit,
            },
            CappedReadError::Failed(e) => HomeserverError::Unreachable {
                server: server.to_string(),
                message: describe_error(&e),
            },
        })
}

/// Why [`read_body_capped`] gave up.
#[derive(Debug)]
pub(crate) enum CappedReadError {
    /// The body is longer than the limit (announced or read).
    TooLarge,
    Failed(reqwest::Error),
}

/// A response body read up to `limit` bytes, refused as soon as it passes them (outbound
/// answers are untrusted: the homeserver client and the SMS sender both read through here).
pub(crate) async fn read_body_capped(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, CappedReadError> {
    if response.content_length().is_some_and(|n| n > limit as u64) {
        return Err(CappedReadError::TooLarge);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(CappedReadError::Failed)? {
        if body.len() + chunk.len() > limit {
            return Err(CappedReadError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The resolver's refusal of a host name that resolves to an address `ip.blacklist` covers.
#[derive(Debug, thiserror::Error)]
#[error("{0} resolves to an address refused by ip.blacklist")]
struct RefusedAddress(String);

/// Whether a request failed because the resolver refused its host's addresses.
pub(crate) fn refused_address(e: &reqwest::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        if cause.is::<RefusedAddress>() {
            return true;
        }
        source = cause.source();
    }
    false
}

/// Resolves host names with the system resolver, refusing them when any address is filtered.
/// For the federation client, a host with an SRV target resolves to that target's addresses.
/// (IP literals never reach a resolver: a client checks those itself.)
pub(crate) struct FilteredResolver {
    filter: Arc<IpFilter>,
    srv_targets: Option<SrvTargets>,
}

impl FilteredResolver {
    /// A resolver for clients that go where their URLs say (no SRV targets).
    pub(crate) fn new(filter: Arc<IpFilter>) -> Self {
        Self {
            filter,
            srv_targets: None,
        }
    }
}

impl Resolve for FilteredResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let filter = Arc::clone(&self.filter);
        let host = self
            .srv_targets
            .as_ref()
            .and_then(|targets| {
                targets
                    .lock()
                    .expect("srv lock")
                    .get(name.as_str())
                    .cloned()
            })
            .unwrap_or_else(|| name.as_str().to_owned());
        Box::pin(async move {
            let all: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if all.iter().any(|a| !filter.allows(a.ip())) {
                return Err(
                    Box::new(RefusedAddress(host)) as Box<dyn std::error::Error + Send + Sync>
                );
            }
            Ok(Box::new(all.into_iter()) as Addrs)
        })
    }
}

/// A ring client config: certificates verified against `roots` (host name included), or any
/// certificate accepted when `verify` is false.
pub(crate) fn tls_config(
    verify: bool,
    roots: RootCertStore,
) -> Result<ClientConfig, rustls::Error> {
    let builder =
        ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    Ok(if verify {
        builder
            .with_root_certificates(Arc::new(roots))
            .with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate))
            .with_no_client_auth()
    })
}

/// `federation.verifycerts = false`: any certificate is accepted (as in Sydent; for tests
/// against homeservers with self-signed certificates only).
#[derive(Debug)]
struct AcceptAnyCertificate;

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &TlsName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_split_as_the_spec_says() {
        let ok = |name: &str, host: &str, port: Option<u16>| {
            assert_eq!(
                split_server_name(name).unwrap(),
                (host.to_string(), port),
                "{name}"
            );
        };
        ok("Example.org", "example.org", None);
        ok("example.org:8449", "example.org", Some(8449));
        ok("1.2.3.4", "1.2.3.4", None);
        ok("1.2.3.4:80", "1.2.3.4", Some(80));
        ok("[::1]", "::1", None);
        ok("[2001:db8::1]:8448", "2001:db8::1", Some(8448));
        for bad in [
            "",
            "example.org:",
            "example.org:0",
            "example.org:08448",
            "example.org:70000",
            "exa mple.org",
            "-a.org",
            "a..org",
            "[::1",
            "[zz]:80",
            "::1",
            "example.org/x",
        ] {
            assert!(split_server_name(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn targets_follow_the_resolution_steps() {
        assert_eq!(
            direct_target("1.2.3.4", None, "1.2.3.4"),
            Target {
                base_url: "https://1.2.3.4:8448".into(),
                host_header: "1.2.3.4".into(),
                connect_host: "1.2.3.4".into(),
            }
        );
        assert_eq!(
            direct_target("2001:db8::1", Some(443), "[2001:db8::1]:443").base_url,
            "https://[2001:db8::1]:443"
        );
        assert_eq!(
            fallback_target("example.org"),
            Target {
                base_url: "https://example.org:8448".into(),
                host_header: "example.org".into(),
                connect_host: "example.org".into(),
            }
        );
    }

    #[test]
    fn well_known_cache_lifetimes() {
        use reqwest::header::{HeaderMap, HeaderValue, CACHE_CONTROL};
        let ttl = |value: Option<&str>| {
            let mut headers = HeaderMap::new();
            if let Some(v) = value {
                headers.insert(CACHE_CONTROL, HeaderValue::from_str(v).unwrap());
            }
            cache_ttl(&headers)
        };
        assert_eq!(ttl(None), Some(WELL_KNOWN_DEFAULT_TTL));
        assert_eq!(
            ttl(Some("public, max-age=600")),
            Some(Duration::from_secs(600))
        );
        assert_eq!(ttl(Some("max-age=9999999")), Some(WELL_KNOWN_MAX_TTL));
        assert_eq!(ttl(Some("no-store")), None);
    }
}
