//! Mutual TLS for replication, rustls only: the node's certificate and key (Sydent's combined
//! PEM, or a separate key file), the trust roots (the mesh CA, else the system roots), the
//! listener's config that requires a client certificate, the pushers' client config that
//! presents it, and the names a peer's certificate proves.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::config::HttpConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("[http] {key}: {message}")]
    Setting { key: &'static str, message: String },
    #[error("replication client: {0}")]
    Client(String),
}

fn setting(key: &'static str, message: impl Into<String>) -> TlsError {
    TlsError::Setting {
        key,
        message: message.into(),
    }
}

/// The ring provider: the only one compiled in (no OpenSSL, no aws-lc).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs ring as the process default, for libraries (reqwest) that ask for the default.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The node's replication identity and trust roots, loaded once at start.
#[derive(Clone)]
pub struct MeshTls {
    pub chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    pub roots: Arc<RootCertStore>,
    /// True when the roots are the system's (no `replication.https.cacert`).
    pub system_roots: bool,
}

impl std::fmt::Debug for MeshTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshTls")
            .field("chain", &self.chain.len())
            .field("roots", &self.roots.len())
            .field("system_roots", &self.system_roots)
            .finish()
    }
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| setting(key, format!("cannot read {}: {e}", path.display())))
}

impl MeshTls {
    /// Loads the material the config names; `None` when `replication.https.certfile` is empty
    /// (replication off, as in Sydent).
    pub fn load(http: &HttpConfig) -> Result<Option<Self>, TlsError> {
        let Some(certfile) = &http.replication_certfile else {
            return Ok(None);
        };
        Self::from_files(
            certfile,
            http.replication_keyfile.as_deref(),
            http.replication_cacert.as_deref(),
        )
        .map(Some)
    }

    pub fn from_files(
        certfile: &Path,
        keyfile: Option<&Path>,
        cacert: Option<&Path>,
    ) -> Result<Self, TlsError> {
        const CERT: &str = "replication.https.certfile";
        const KEY: &str = "replication.https.keyfile";
        const CA: &str = "replication.https.cacert";
        let cert_pem = read(CERT, certfile)?;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| setting(CERT, format!("{}: bad PEM: {e}", certfile.display())))?;
        if chain.is_empty() {
            return Err(setting(
                CERT,
                format!("{} holds no certificate", certfile.display()),
            ));
        }
        let (key_name, key_path, key_pem) = match keyfile {
            Some(path) => (KEY, path, read(KEY, path)?),
            None => (CERT, certfile, cert_pem.clone()),
        };
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
            setting(
                key_name,
                format!("{}: no usable private key: {e}", key_path.display()),
            )
        })?;
        let (roots, system_roots) = match cacert {
            Some(path) => {
                let pem = read(CA, path)?;
                let mut roots = RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(&pem) {
                    let cert =
                        cert.map_err(|e| setting(CA, format!("{}: bad PEM: {e}", path.display())))?;
                    roots.add(cert).map_err(|e| {
                        setting(CA, format!("{}: not a CA certificate: {e}", path.display()))
                    })?;
                }
                if roots.is_empty() {
                    return Err(setting(
                        CA,
                        format!("{} holds no certificate", path.display()),
                    ));
                }
                (roots, false)
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                let mut roots = RootCertStore::empty();
                let (added, _) = roots.add_parsable_certificates(found.certs);
                if added == 0 {
                    return Err(setting(
                        CA,
                        "empty, and no system CA certificates were found: set the mesh CA",
                    ));
                }
                (roots, true)
            }
        };
        let tls = Self {
            chain,
            key: Arc::new(key),
            roots: Arc::new(roots),
            system_roots,
        };
        // Fail at start, naming the key, rather than at the first connection.
        tls.server_config()?;
        Ok(tls)
    }

    /// The listener's config: a client certificate chaining to the roots is required.
    pub fn server_config(&self) -> Result<ServerConfig, TlsError> {
        const CERT: &str = "replication.https.certfile";
        let provider = provider();
        let verifier = WebPkiClientVerifier::builder_with_provider(
            Arc::clone(&self.roots),
            Arc::clone(&provider),
        )
        .build()
        .map_err(|e| setting("replication.https.cacert", e.to_string()))?;
        ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| setting(CERT, e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| {
                setting(
                    CERT,
                    format!("certificate and key do not work together: {e}"),
                )
            })
    }

    /// The HTTP client the push queues share: mutual TLS with [`Self::client_config`], kept-alive
    /// connections, a 5 s connect and a 30 s request timeout.
    pub fn push_client(&self) -> Result<reqwest::Client, TlsError> {
        reqwest::Client::builder()
            .use_preconfigured_tls(self.client_config()?)
            .user_agent(concat!("sydent-rs/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .build()
            .map_err(|e| TlsError::Client(e.to_string()))
    }

    /// The pushers' config: verifies the peer's certificate and hostname against the roots and
    /// presents ours.
    pub fn client_config(&self) -> Result<ClientConfig, TlsError> {
        ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| setting("replication.https.certfile", e.to_string()))?
            .with_root_certificates(Arc::clone(&self.roots))
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| {
                setting(
                    "replication.https.certfile",
                    format!("unusable as a client certificate: {e}"),
                )
            })
    }
}

/// An error with its causes (for a reqwest or SMTP error the TLS reason is usually a few
/// levels down).
pub fn describe_error(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The names a verified peer certificate proves: its DNS subject alternative names, then its
/// subject common name(s) (Sydent identifies peers by CN).
pub fn certificate_names(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                names.push(dns.to_ascii_lowercase());
            }
        }
    }
    for cn in cert.subject().iter_common_name() {
        if let Ok(cn) = cn.as_str() {
            names.push(cn.to_ascii_lowercase());
        }
    }
    names
}

/// The names other nodes can reach this node by: the DNS names and IP addresses of its
/// certificate's subject alternative names (what a TLS client checks the URL's host against;
/// the common name is not used for that).
fn reachable_names(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::DNSName(dns) => {
                    names.push(dns.to_ascii_lowercase());
                }
                x509_parser::extensions::GeneralName::IPAddress(bytes) => {
                    let ip = match bytes.len() {
                        4 => <[u8; 4]>::try_from(*bytes).ok().map(std::net::IpAddr::from),
                        16 => <[u8; 16]>::try_from(*bytes)
                            .ok()
                            .map(std::net::IpAddr::from),
                        _ => None,
                    };
                    names.extend(ip.map(|ip| ip.to_string()));
                }
                _ => {}
            }
        }
    }
    names
}

fn host_matches(host: &str, name: &str) -> bool {
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return name.parse::<std::net::IpAddr>() == Ok(ip);
    }
    match name.strip_prefix("*.") {
        // A wildcard covers exactly one label.
        Some(suffix) => host
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == suffix),
        None => host == name,
    }
}

/// For `peer-file --url`: a warning when the node's own certificate does not name the URL's
/// host, since every peer's push to that URL would then fail the TLS check (and which names
/// it does have). None when it does, or when there is no certificate to check.
pub fn url_host_warning(http: &HttpConfig, url: &str) -> Option<String> {
    let Some(certfile) = &http.replication_certfile else {
        return Some(
            "replication is off on this node (no [http] replication.https.certfile): peers cannot push to it"
                .into(),
        );
    };
    let pem = std::fs::read(certfile).ok()?;
    let cert = CertificateDer::pem_slice_iter(&pem).next()?.ok()?;
    let authority = url
        .strip_prefix("https://")?
        .split('/')
        .next()
        .unwrap_or_default();
    let host = match authority.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    }
    .to_ascii_lowercase();
    let names = reachable_names(&cert);
    if names.iter().any(|name| host_matches(&host, name)) {
        return None;
    }
    Some(format!(
        "this node's certificate ({}) does not name '{host}', so peers pushing to {url} will fail \
         its TLS check; its names are: {}. Use one of them in --url, or a certificate that names \
         '{host}' (sydent-rs new-mesh --local adds 127.0.0.1 and ::1)",
        certfile.display(),
        if names.is_empty() {
            "none (no subject alternative names)".to_string()
        } else {
            names.join(", ")
        }
    ))
}

#[cfg(test)]
mod tests {
    use super::host_matches;

    #[test]
    fn hosts_match_names_as_tls_clients_do() {
        assert!(host_matches("node1.example.org", "node1.example.org"));
        assert!(host_matches("127.0.0.1", "127.0.0.1"));
        assert!(host_matches("::1", "::1"));
        assert!(host_matches("a.example.org", "*.example.org"));
        assert!(!host_matches("a.b.example.org", "*.example.org"));
        assert!(!host_matches("example.org", "*.example.org"));
        assert!(!host_matches("127.0.0.1", "node1.example.org"));
        assert!(!host_matches("node2.example.org", "node1.example.org"));
    }
}
