//! The mailer against a real SMTP server (aiosmtpd, from PyPI, in a venv of its own: see
//! tests/smtp/): plain SMTP, STARTTLS and implicit TLS with a test CA, a certificate from
//! another CA refused, a server that is down, an address SMTP cannot carry.

use std::path::Path;
use std::time::Duration;

use sydent_rs::config::Config;
use sydent_rs::email::{EmailError, Mailer};

use crate::harness::free_port;
use crate::harness::smtp::Sink;
use crate::mesh::harness::TestCa;

fn email_config(root: &Path, port: u16, tls_mode: &str) -> sydent_rs::config::EmailConfig {
    let path = root.join(format!("sydent-{tls_mode}-{port}.conf"));
    std::fs::write(
        &path,
        format!(
            "[general]\nserver.name = mail.test\n[email]\nemail.smtphost = localhost\n\
             email.smtpport = {port}\nemail.tlsmode = {tls_mode}\nemail.hostname = id.mail.test\n\
             email.from = Sydent Validation <noreply@mail.test>\n"
        ),
    )
    .unwrap();
    Config::load(&path, &|_| None).unwrap().config.email
}

const MESSAGE: &str = "From: Sydent Validation <noreply@mail.test>\r\nTo: alice@example.org\r\n\
    Subject: Confirm your email address\r\n\r\nYour code is 123456.\r\n";

#[tokio::test]
async fn mail_goes_out_plain_and_over_both_kinds_of_tls() {
    let root = tempfile::tempdir().unwrap();
    let ca = TestCa::new("smtp test CA");
    let (cert, key) = ca.cert_for("localhost", &["localhost"]);
    let (cert_file, key_file) = (root.path().join("smtp.pem"), root.path().join("smtp.key"));
    std::fs::write(&cert_file, cert).unwrap();
    std::fs::write(&key_file, key).unwrap();
    let roots = vec![ca.cert_pem.clone().into_bytes()];
    for (mode, tls_mode) in [
        ("plain", "0"),
        ("starttls", "STARTTLS"),
        ("implicit", "SSL"),
    ] {
        let tls = (mode != "plain").then_some((cert_file.as_path(), key_file.as_path()));
        let sink = Sink::start(root.path(), mode, tls);
        let mailer =
            Mailer::with_roots(&email_config(root.path(), sink.port, tls_mode), &roots).unwrap();
        mailer
            .send("alice@example.org", MESSAGE.as_bytes())
            .await
            .unwrap();
        let (message, envelope) = sink.received(1);
        assert!(
            message.contains("Your code is 123456."),
            "{mode}: {message}"
        );
        assert_eq!(envelope["from"], "noreply@mail.test", "{mode}");
        assert_eq!(
            envelope["to"],
            serde_json::json!(["alice@example.org"]),
            "{mode}"
        );
        assert_eq!(envelope["tls"], mode != "plain", "{mode}");
    }
}

#[tokio::test]
async fn refusals_are_errors_and_nothing_is_sent() {
    let root = tempfile::tempdir().unwrap();
    let ca = TestCa::new("smtp test CA");
    let other = TestCa::new("another CA");
    let (cert, key) = ca.cert_for("localhost", &["localhost"]);
    let (cert_file, key_file) = (root.path().join("smtp.pem"), root.path().join("smtp.key"));
    std::fs::write(&cert_file, cert).unwrap();
    std::fs::write(&key_file, key).unwrap();
    let sink = Sink::start(root.path(), "starttls", Some((&cert_file, &key_file)));

    // A server whose certificate another CA issued.
    let config = email_config(root.path(), sink.port, "STARTTLS");
    let mailer = Mailer::with_roots(&config, &[other.cert_pem.clone().into_bytes()]).unwrap();
    let err = mailer
        .send("alice@example.org", MESSAGE.as_bytes())
        .await
        .unwrap_err();
    assert!(
        matches!(err, EmailError::Send(ref m) if m.contains("certificate")),
        "{err}"
    );
    // Plain SMTP to a server that requires STARTTLS.
    let plain = Mailer::with_roots(&email_config(root.path(), sink.port, "0"), &[]).unwrap();
    assert!(matches!(
        plain.send("alice@example.org", MESSAGE.as_bytes()).await,
        Err(EmailError::Send(_))
    ));
    // An address SMTP cannot carry.
    let good = Mailer::with_roots(&config, &[ca.cert_pem.clone().into_bytes()]).unwrap();
    assert!(matches!(
        good.send("not an address", MESSAGE.as_bytes()).await,
        Err(EmailError::InvalidAddress(_))
    ));
    std::thread::sleep(Duration::from_millis(200));
    assert!(!sink.dir.join("1.json").exists(), "a refused mail arrived");

    // Nothing listening.
    let down = Mailer::with_roots(&email_config(root.path(), free_port(), "0"), &[]).unwrap();
    assert!(matches!(
        down.send("alice@example.org", MESSAGE.as_bytes()).await,
        Err(EmailError::Send(_))
    ));
}
