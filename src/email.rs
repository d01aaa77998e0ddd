//! Sending mail (validation and invite emails): lettre's asynchronous SMTP client over rustls,
//! as `[email]` configures it: `email.smtphost` / `email.smtpport`, optional
//! `email.smtpusername` / `email.smtppassword`, `email.hostname` as the HELO name,
//! `email.tlsmode` (`0` plain, `SSL`/`TLS` implicit TLS, `STARTTLS`; certificates always
//! verified, against the system roots) and `email.from` as the envelope sender. Messages are
//! sent as rendered from Sydent's templates, headers included (the templates write them).
//! Sending runs on the async runtime: it never blocks an arbiter thread.

use std::sync::Mutex;
use std::time::Duration;

use lettre::address::{Address, Envelope};
use lettre::transport::smtp::authentication::{Credentials, DEFAULT_MECHANISMS};
#[allow(deprecated)] // the only way to wrap a stream lettre put TLS on
use lettre::transport::smtp::client::AsyncNetworkStream;
use lettre::transport::smtp::client::{
    AsyncSmtpConnection, AsyncTokioStream, Certificate, CertificateStore, TlsParameters,
};
use lettre::transport::smtp::extension::ClientId;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::config::{EmailConfig, SmtpTls};

/// How long one SMTP conversation may take.
const SMTP_TIMEOUT: Duration = Duration::from_secs(20);
/// Idle connections kept for the next mails.
const IDLE_CONNECTIONS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum EmailError {
    /// The address is not one SMTP can carry (the caller answers `M_INVALID_EMAIL`).
    #[error("'{0}' is not a valid email address")]
    InvalidAddress(String),
    /// The SMTP server could not be reached or refused the mail (`M_EMAIL_SEND_ERROR`).
    #[error("could not send the email: {0}")]
    Send(String),
}

/// The configured SMTP server and the idle connections to it, shared by every sender.
///
/// Connections are made here rather than by lettre's transport, to set `TCP_NODELAY`: lettre
/// writes a message and its closing `.` in two writes, and with Nagle's algorithm the second
/// waits for the server's delayed ACK of the first (40 ms per mail on Linux, measured: the
/// transport's pool sent ~300 mails/s to a sink whatever its speed).
pub struct Mailer {
    host: String,
    port: u16,
    tls_mode: SmtpTls,
    tls: Option<TlsParameters>,
    hello: ClientId,
    credentials: Option<Credentials>,
    from: Option<Address>,
    /// A plain `Mutex`: held only to push or pop a connection, never across I/O.
    idle: Mutex<Vec<AsyncSmtpConnection>>,
    /// Sends and failures, counted once the metrics are on ([`Self::count_in`]).
    counters: std::sync::OnceLock<crate::metrics::SendCounters>,
}

impl Mailer {
    /// The mailer `[email]` describes, trusting the system's roots.
    pub fn new(config: &EmailConfig) -> Result<Self, String> {
        Self::with_roots(config, &[])
    }

    /// The mailer `[email]` describes; with `extra_roots` (PEM), those are trusted instead of
    /// the system's roots (tests with a CA of their own).
    pub fn with_roots(config: &EmailConfig, extra_roots: &[Vec<u8>]) -> Result<Self, String> {
        crate::mesh::tls::install_default_provider();
        let host = config.smtp_host.clone();
        let tls = match config.tls_mode {
            SmtpTls::None => None,
            SmtpTls::StartTls | SmtpTls::Implicit => {
                let mut builder = TlsParameters::builder(host.clone());
                if !extra_roots.is_empty() {
                    builder = builder.certificate_store(CertificateStore::None);
                }
                for pem in extra_roots {
                    let cert = Certificate::from_pem(pem).map_err(|e| e.to_string())?;
                    builder = builder.add_root_certificate(cert);
                }
                Some(builder.build_rustls().map_err(|e| e.to_string())?)
            }
        };
        let hello = if config.hostname.trim().is_empty() {
            ClientId::Domain("localhost".into())
        } else {
            ClientId::Domain(config.hostname.trim().to_string())
        };
        Ok(Self {
            counters: std::sync::OnceLock::new(),
            host,
            port: config.smtp_port,
            tls_mode: config.tls_mode,
            tls,
            hello,
            credentials: (!config.smtp_username.is_empty()).then(|| {
                Credentials::new(config.smtp_username.clone(), config.smtp_password.clone())
            }),
            from: envelope_sender(&config.from),
            idle: Mutex::new(Vec::new()),
        })
    }

    /// Hands `message` (a whole RFC 5322 message, headers included) to the SMTP server for
    /// `to`; Ok once the server accepted it.
    /// Counts every send in `counters` from now on (Sydent's `sydent_emails_sent`).
    pub fn count_in(&self, counters: crate::metrics::SendCounters) {
        let _ = self.counters.set(counters);
    }

    /// Sends `message` to `to`, counted when the metrics are on.
    pub async fn send(&self, to: &str, message: &[u8]) -> Result<(), EmailError> {
        let sent = self.send_once(to, message).await;
        if let Some(counters) = self.counters.get() {
            counters.record(sent.is_ok());
        }
        sent
    }

    async fn send_once(&self, to: &str, message: &[u8]) -> Result<(), EmailError> {
        let to_address: Address = to
            .parse()
            .map_err(|_| EmailError::InvalidAddress(to.to_string()))?;
        let envelope = Envelope::new(self.from.clone(), vec![to_address])
            .map_err(|e| EmailError::Send(e.to_string()))?;
        let message = crlf_lines(message);
        let sending = async {
            let mut conn = self.connection().await?;
            conn.send(&envelope, &message)
                .await
                .map_err(|e| crate::mesh::tls::describe_error(&e))?;
            Ok::<_, String>(conn)
        };
        match tokio::time::timeout(SMTP_TIMEOUT, sending).await {
            Ok(Ok(conn)) => {
                self.put_back(conn);
                Ok(())
            }
            Ok(Err(e)) => Err(EmailError::Send(e)),
            Err(_) => Err(EmailError::Send(format!(
                "no answer from {}:{} within {} s",
                self.host,
                self.port,
                SMTP_TIMEOUT.as_secs()
            ))),
        }
    }

    /// An idle connection that still answers, or a new one.
    async fn connection(&self) -> Result<AsyncSmtpConnection, String> {
        loop {
            let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            match idle {
                Some(mut conn) => {
                    if conn.test_connected().await {
                        return Ok(conn);
                    }
                }
                None => return self.connect().await,
            }
        }
    }

    fn put_back(&self, conn: AsyncSmtpConnection) {
        if conn.has_broken() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < IDLE_CONNECTIONS {
            idle.push(conn);
        }
    }

    /// Connects (TCP with `TCP_NODELAY`), then TLS as `email.tlsmode` says, EHLO, and the
    /// login when a username is set.
    async fn connect(&self) -> Result<AsyncSmtpConnection, String> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("cannot connect to {}:{}: {e}", self.host, self.port))?;
        tcp.set_nodelay(true).map_err(|e| e.to_string())?;
        let smtp = |e: lettre::transport::smtp::Error| crate::mesh::tls::describe_error(&e);
        let mut conn = match (&self.tls_mode, &self.tls) {
            (SmtpTls::Implicit, Some(tls)) => {
                #[allow(deprecated)]
                let mut stream = AsyncNetworkStream::use_existing_tokio1(Box::new(tcp));
                stream.upgrade_tls(tls.clone()).await.map_err(smtp)?;
                AsyncSmtpConnection::connect_with_transport(
                    Box::new(TlsStream(stream)),
                    &self.hello,
                )
                .await
                .map_err(smtp)?
            }
            _ => AsyncSmtpConnection::connect_with_transport(Box::new(tcp), &self.hello)
                .await
                .map_err(smtp)?,
        };
        if let (SmtpTls::StartTls, Some(tls)) = (&self.tls_mode, &self.tls) {
            conn.starttls(tls.clone(), &self.hello)
                .await
                .map_err(smtp)?;
        }
        if let Some(credentials) = &self.credentials {
            conn.auth(DEFAULT_MECHANISMS, credentials)
                .await
                .map_err(smtp)?;
        }
        Ok(conn)
    }
}

/// A stream lettre already wrapped in TLS (futures-io), handed back to it as a tokio
/// transport.
#[allow(deprecated)]
struct TlsStream(AsyncNetworkStream);

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsStream")
    }
}

impl AsyncTokioStream for TlsStream {
    fn peer_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.0.peer_addr()
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let n = std::task::ready!(futures_io::AsyncRead::poll_read(
            std::pin::Pin::new(&mut self.0),
            cx,
            buf.initialize_unfilled()
        ))?;
        buf.advance(n);
        std::task::Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        futures_io::AsyncWrite::poll_write(std::pin::Pin::new(&mut self.0), cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        futures_io::AsyncWrite::poll_flush(std::pin::Pin::new(&mut self.0), cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        futures_io::AsyncWrite::poll_close(std::pin::Pin::new(&mut self.0), cx)
    }
}

/// `message` with every line ending in CRLF, as SMTP requires: templates are files with
/// bare LF line ends (Python's smtplib converts them the same way when Sydent sends).
fn crlf_lines(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + message.len() / 32);
    let mut previous = 0u8;
    for &b in message {
        if b == b'\n' && previous != b'\r' {
            out.push(b'\r');
        }
        out.push(b);
        previous = b;
    }
    out
}

/// The envelope sender from `email.from`, which may be a display form (`Name <addr>`, with
/// Sydent's `%(host)s`-style values already interpolated); None when it holds no address.
fn envelope_sender(from: &str) -> Option<Address> {
    let address = match (from.rfind('<'), from.rfind('>')) {
        (Some(start), Some(end)) if start < end => &from[start + 1..end],
        _ => from,
    };
    address.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::{crlf_lines, envelope_sender};

    #[test]
    fn lines_end_in_crlf() {
        assert_eq!(crlf_lines(b"a\nb\r\nc\n\n"), b"a\r\nb\r\nc\r\n\r\n");
        assert_eq!(crlf_lines(b"\r\r\n"), b"\r\r\n");
    }

    #[test]
    fn the_envelope_sender_comes_out_of_the_display_form() {
        assert_eq!(
            envelope_sender("Sydent Validation <noreply@example.org>").map(|a| a.to_string()),
            Some("noreply@example.org".into())
        );
        assert_eq!(
            envelope_sender("noreply@example.org").map(|a| a.to_string()),
            Some("noreply@example.org".into())
        );
        assert_eq!(envelope_sender("nobody"), None);
    }
}
