//! The client API over HTTPS (`[http] clientapi.https.*`): rustls, HTTP/1.1 and HTTP/2, and a
//! certificate re-read on SIGHUP, so an ACME renewal takes effect without a restart.
//!
//! The listener's rustls config asks [`ReloadingCert`] for the certificate of each new
//! handshake; a reload swaps what it answers. Connections already open keep the session they
//! negotiated: nothing is dropped. A reload that cannot read or use the new files (a renewal
//! half-written, a key that does not match) keeps the certificate in force and says why.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

use crate::config::ClientHttps;
use crate::mesh::tls::provider;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("[http] {key}: cannot read {path}: {error}")]
    Read {
        key: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("[http] {key}: {path}: {message}")]
    Unusable {
        key: &'static str,
        path: PathBuf,
        message: String,
    },
}

/// The certificate the HTTPS listener presents, swapped by [`ReloadingCert::reload`].
#[derive(Debug)]
pub struct ReloadingCert {
    certfile: PathBuf,
    keyfile: Option<PathBuf>,
    /// A lock, not an actor: rustls asks synchronously, once per handshake, and holds it only
    /// to clone an `Arc`; a reload holds it only to swap one in.
    current: RwLock<Arc<CertifiedKey>>,
}

const CERT: &str = "clientapi.https.certfile";
const KEY: &str = "clientapi.https.keyfile";

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, CertError> {
    std::fs::read(path).map_err(|error| CertError::Read {
        key,
        path: path.to_path_buf(),
        error,
    })
}

/// The certificate chain and key in the files, checked to belong together.
fn load(certfile: &Path, keyfile: Option<&Path>) -> Result<Arc<CertifiedKey>, CertError> {
    let unusable = |key, path: &Path, message: String| CertError::Unusable {
        key,
        path: path.to_path_buf(),
        message,
    };
    let cert_pem = read(CERT, certfile)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| unusable(CERT, certfile, format!("bad PEM: {e}")))?;
    if chain.is_empty() {
        return Err(unusable(CERT, certfile, "holds no certificate".into()));
    }
    let (key_name, key_path, key_pem) = match keyfile {
        Some(path) => (KEY, path, read(KEY, path)?),
        None => (CERT, certfile, cert_pem.clone()),
    };
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| unusable(key_name, key_path, format!("no usable private key: {e}")))?;
    let certified = CertifiedKey::from_der(chain, key, &provider()).map_err(|e| {
        unusable(
            key_name,
            key_path,
            format!("does not fit the certificate: {e}"),
        )
    })?;
    Ok(Arc::new(certified))
}

impl ReloadingCert {
    /// Loads the files `https` names; an error names the key.
    pub fn new(https: &ClientHttps) -> Result<Arc<Self>, CertError> {
        let current = load(&https.certfile, https.keyfile.as_deref())?;
        Ok(Arc::new(Self {
            certfile: https.certfile.clone(),
            keyfile: https.keyfile.clone(),
            current: RwLock::new(current),
        }))
    }

    /// Reads the files again: new handshakes get the new certificate; on an error the one
    /// in force stays.
    pub fn reload(&self) -> Result<(), CertError> {
        let fresh = load(&self.certfile, self.keyfile.as_deref())?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }

    /// The listener's rustls config: this certificate, HTTP/2 and HTTP/1.1 offered by ALPN.
    pub fn server_config(self: &Arc<Self>) -> Result<ServerConfig, rustls::Error> {
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(self) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(
            &self.current.read().unwrap_or_else(|e| e.into_inner()),
        ))
    }
}
