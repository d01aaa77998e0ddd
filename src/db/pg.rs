//! PostgreSQL as a node's database (issue 19, being built): where the server is, how the node
//! authenticates and proves the server's identity, and the lock that keeps a database to one
//! node. The connection is `tokio-postgres` with TLS by rustls: no libpq, no OpenSSL.
//!
//! - The URI is libpq's: `postgresql://user[:password]@host[:port]/dbname[?param=value&…]`.
//!   `sslmode` is `disable`, `prefer` (the default, as libpq), `require`, `verify-ca` or
//!   `verify-full`; every mode but `disable` verifies the server's certificate chain and name
//!   (rustls always does), so `require` is as strict as `verify-full`. `sslrootcert` names the
//!   PEM file of the CA(s) to trust, else the system's roots are used.
//! - The password: the URI's, else the file `password_file` names (its first line), else
//!   `PGPASSWORD`.
//! - One node per database: each node holds a session advisory lock on its database for as
//!   long as it runs ([`lock_database`]); a second node is refused at start.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio_postgres::config::SslMode;

/// The advisory lock key every sydent-rs node takes on its database ("sydent-rs" in ASCII,
/// as a big-endian integer, cut to 63 bits).
pub const LOCK_KEY: i64 = 0x7379_6465_6e74_2d72;

/// A PostgreSQL server and database, checked and ready to connect to.
#[derive(Clone)]
pub struct PgTarget {
    config: tokio_postgres::Config,
    /// `None`: `sslmode=disable`.
    tls: Option<Arc<rustls::ClientConfig>>,
    /// The URI without its password, for logs and messages.
    pub shown: String,
}

impl std::fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTarget")
            .field("shown", &self.shown)
            .finish_non_exhaustive()
    }
}

/// Why a target cannot be used, or a connection failed: a sentence for the admin.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PgError(pub String);

impl PgTarget {
    /// Checks `uri` and gathers the password and the trusted roots. `env_password` is
    /// `PGPASSWORD` (a parameter, so that tests need not set the process's environment).
    pub fn parse(
        uri: &str,
        password_file: Option<&Path>,
        env_password: Option<String>,
    ) -> Result<Self, PgError> {
        let invalid = |why: String| PgError(format!("not a PostgreSQL URI ({why})"));
        let (base, query) = match uri.split_once('?') {
            Some((base, query)) => (base, query),
            None => (uri, ""),
        };
        if !(base.starts_with("postgresql://") || base.starts_with("postgres://")) {
            return Err(invalid(
                "it must start with postgresql:// or postgres://".into(),
            ));
        }
        // sslmode and sslrootcert are taken out here: tokio-postgres knows only
        // disable/prefer/require, and reads no CA file.
        let mut mode = "prefer".to_string();
        let mut root_file = None;
        let mut rest = Vec::new();
        for (key, value) in form_pairs(query) {
            match key.as_str() {
                "sslmode" => mode = value,
                "sslrootcert" => root_file = Some(value),
                _ => rest.push((key, value)),
            }
        }
        let ssl_mode = match mode.as_str() {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" | "verify-ca" | "verify-full" => SslMode::Require,
            other => {
                return Err(invalid(format!(
                    "sslmode={other}: use disable, prefer, require, verify-ca or verify-full"
                )))
            }
        };
        let kept = serde_urlencoded::to_string(&rest).map_err(|e| invalid(e.to_string()))?;
        let uri_without = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{kept}")
        };
        let mut config =
            tokio_postgres::Config::from_str(&uri_without).map_err(|e| invalid(e.to_string()))?;
        config.ssl_mode(ssl_mode);
        if config.get_dbname().is_none() {
            return Err(invalid("it names no database: …/dbname".into()));
        }
        if config.get_user().is_none() {
            return Err(invalid("it names no user: postgresql://user@host/…".into()));
        }
        if config.get_password().is_none() {
            if let Some(path) = password_file {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    PgError(format!(
                        "[db] db.password_file: cannot read {}: {e}",
                        path.display()
                    ))
                })?;
                let password = text.lines().next().unwrap_or_default();
                if password.is_empty() {
                    return Err(PgError(format!(
                        "[db] db.password_file: {} is empty",
                        path.display()
                    )));
                }
                config.password(password);
            } else if let Some(password) = env_password.filter(|p| !p.is_empty()) {
                config.password(password);
            }
        }
        let tls = match ssl_mode {
            SslMode::Disable => None,
            _ => Some(Arc::new(client_config(root_file.as_deref())?)),
        };
        Ok(Self {
            shown: shown(&config, &mode),
            config,
            tls,
        })
    }

    /// Connects; the connection's task runs on the current runtime and ends with the client.
    pub async fn connect(&self) -> Result<tokio_postgres::Client, PgError> {
        let failed = |e: tokio_postgres::Error| {
            PgError(format!("cannot connect to {}: {}", self.shown, explain(&e)))
        };
        let client = match &self.tls {
            None => {
                let (client, connection) = self
                    .config
                    .connect(tokio_postgres::NoTls)
                    .await
                    .map_err(failed)?;
                tokio::spawn(connection);
                client
            }
            Some(tls) => {
                let make = tokio_postgres_rustls::MakeRustlsConnect::new((**tls).clone());
                let (client, connection) = self.config.connect(make).await.map_err(failed)?;
                tokio::spawn(connection);
                client
            }
        };
        Ok(client)
    }
}

/// Takes this node's advisory lock on the database `client` is connected to, for as long as
/// that connection lives; refuses when another session (another node) holds it.
pub async fn lock_database(client: &tokio_postgres::Client, shown: &str) -> Result<(), PgError> {
    let row = client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&LOCK_KEY])
        .await
        .map_err(|e| {
            PgError(format!(
                "{shown}: cannot take the node's lock: {}",
                explain(&e)
            ))
        })?;
    if row.get::<_, bool>(0) {
        Ok(())
    } else {
        Err(PgError(format!(
            "{shown} is in use by another node (it holds the advisory lock {LOCK_KEY}): one \
             database serves one node; nodes scale out through the mesh"
        )))
    }
}

/// The error with its causes: tokio-postgres puts the server's message or the TLS reason in
/// its source.
fn explain(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} ({})", db.message(), db.code().code());
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    text
}

/// rustls with ring, verifying the server against `root_file`'s CAs or the system's.
fn client_config(root_file: Option<&str>) -> Result<rustls::ClientConfig, PgError> {
    let mut roots = rustls::RootCertStore::empty();
    match root_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| PgError(format!("sslrootcert={path}: {e}")))?;
            if certs.is_empty() {
                return Err(PgError(format!("sslrootcert={path}: no certificate in it")));
            }
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| PgError(format!("sslrootcert={path}: {e}")))?;
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    rustls::ClientConfig::builder_with_provider(crate::mesh::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| PgError(e.to_string()))
        .map(|builder| builder.with_root_certificates(roots).with_no_client_auth())
}

/// `postgresql://user@host:port/dbname?sslmode=…`, without the password.
fn shown(config: &tokio_postgres::Config, mode: &str) -> String {
    let host = config
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(name) => name.clone(),
            tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .unwrap_or_default();
    let port = config
        .get_ports()
        .first()
        .map(|p| format!(":{p}"))
        .unwrap_or_default();
    format!(
        "postgresql://{}@{host}{port}/{}?sslmode={mode}",
        config.get_user().unwrap_or_default(),
        config.get_dbname().unwrap_or_default()
    )
}

/// `key=value` pairs of a URI's query, decoded.
fn form_pairs(query: &str) -> Vec<(String, String)> {
    serde_urlencoded::from_str(query).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_are_checked_and_their_password_never_shown() {
        let target = PgTarget::parse(
            "postgresql://sydent:s3cret@db.example.org:5433/identity?sslmode=verify-full",
            None,
            None,
        )
        .unwrap();
        assert_eq!(
            target.shown,
            "postgresql://sydent@db.example.org:5433/identity?sslmode=verify-full"
        );
        assert!(!format!("{target:?}").contains("s3cret"));
        for (uri, why) in [
            ("mysql://u@h/d", "must start with postgresql://"),
            ("postgresql://u@h/d?sslmode=allow-ish", "sslmode=allow-ish"),
            ("postgresql://u@h", "names no database"),
            ("postgresql://h/d", "names no user"),
            (
                "postgresql://u@h/d?sslrootcert=/nonexistent/ca.pem",
                "sslrootcert=/nonexistent/ca.pem",
            ),
        ] {
            let e = PgTarget::parse(uri, None, None).unwrap_err().to_string();
            assert!(e.contains(why), "{uri}: {e}");
        }
        let e = PgTarget::parse("postgresql://u@h/d", Some(Path::new("/nonexistent")), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("[db] db.password_file"), "{e}");
    }
}
