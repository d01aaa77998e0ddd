//! Sending mail (validation and invite emails): lettre's asynchronous SMTP client over rustls,
//! as `[email]` configures it: `email.smtphost` / `email.smtpport`, optional
//! `email.smtpusername` / `email.smtppassword`, `email.hostname` as the HELO name,
//! `email.tlsmode` (`0` plain, `SSL`/`TLS` implicit TLS, `STARTTLS`; certificates always
//! verified, against the system roots) and `email.from` as the envelope sender. Messages are
//! sent as rendered from Sydent's templates, headers included (the templates write them).
//! Sending runs on the async runtime: it never blocks an arbiter thread.

use std::time::Duration;

use lettre::address::{Address, Envelope};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, CertificateStore, Tls, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};

use crate::config::{EmailConfig, SmtpTls};

/// How long one SMTP conversation may take.
const SMTP_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum EmailError {
    /// The address is not one SMTP can carry (the caller answers `M_INVALID_EMAIL`).
    #[error("'{0}' is not a valid email address")]
    InvalidAddress(String),
    /// The SMTP server could not be reached or refused the mail (`M_EMAIL_SEND_ERROR`).
    #[error("could not send the email: {0}")]
    Send(String),
}

/// The configured SMTP server, one client shared by every sender (connections pooled).
pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Option<Address>,
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
        let tls_parameters = || -> Result<TlsParameters, String> {
            let mut builder = TlsParameters::builder(host.clone());
            if !extra_roots.is_empty() {
                builder = builder.certificate_store(CertificateStore::None);
            }
            for pem in extra_roots {
                let cert = Certificate::from_pem(pem).map_err(|e| e.to_string())?;
                builder = builder.add_root_certificate(cert);
            }
            builder.build_rustls().map_err(|e| e.to_string())
        };
        let tls = match config.tls_mode {
            SmtpTls::None => Tls::None,
            SmtpTls::StartTls => Tls::Required(tls_parameters()?),
            SmtpTls::Implicit => Tls::Wrapper(tls_parameters()?),
        };
        let hello = if config.hostname.trim().is_empty() {
            ClientId::Domain("localhost".into())
        } else {
            ClientId::Domain(config.hostname.trim().to_string())
        };
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
            .port(config.smtp_port)
            .tls(tls)
            .hello_name(hello)
            .timeout(Some(SMTP_TIMEOUT));
        if !config.smtp_username.is_empty() {
            builder = builder.credentials(Credentials::new(
                config.smtp_username.clone(),
                config.smtp_password.clone(),
            ));
        }
        Ok(Self {
            transport: builder.build(),
            from: envelope_sender(&config.from),
        })
    }

    /// Hands `message` (a whole RFC 5322 message, headers included) to the SMTP server for
    /// `to`; Ok once the server accepted it.
    pub async fn send(&self, to: &str, message: &[u8]) -> Result<(), EmailError> {
        let to_address: Address = to
            .parse()
            .map_err(|_| EmailError::InvalidAddress(to.to_string()))?;
        let envelope = Envelope::new(self.from.clone(), vec![to_address])
            .map_err(|e| EmailError::Send(e.to_string()))?;
        self.transport
            .send_raw(&envelope, &crlf_lines(message))
            .await
            .map(|_| ())
            .map_err(|e| EmailError::Send(crate::mesh::tls::describe_error(&e)))
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
