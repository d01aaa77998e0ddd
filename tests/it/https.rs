//! The client API over HTTPS (`clientapi.https.*`), with a certificate from a test CA: HTTP/2
//! and HTTP/1.1 by ALPN, a renewed certificate served after SIGHUP while a connection opened
//! before goes on working, a broken renewal keeping the one in force, and plain HTTP turned
//! off.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{base_config, run_to_exit, signal, TestCa, TestNode};

/// A rustls client config trusting only `ca`, offering `alpn`.
fn client_tls(ca: &TestCa, alpn: &[&[u8]]) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca.cert_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config
}

/// Writes a new certificate for `localhost` and its key; returns the certificate's DER.
fn write_cert(ca: &TestCa, dir: &Path) -> Vec<u8> {
    let (cert, key) = ca.cert_for("localhost", &["localhost"]);
    std::fs::write(dir.join("https.pem"), &cert).unwrap();
    std::fs::write(dir.join("https.key"), key).unwrap();
    CertificateDer::from_pem_slice(cert.as_bytes())
        .unwrap()
        .to_vec()
}

fn https_config(dir: &Path, plain: bool) -> String {
    let config = base_config(dir, "id.test").replacen(
        "[http]\n",
        &format!(
            "[http]\nclientapi.https.bind_address = 127.0.0.1\nclientapi.https.port = 0\n\
             clientapi.https.certfile = {0}/https.pem\nclientapi.https.keyfile = {0}/https.key\n",
            dir.display()
        ),
        1,
    );
    if plain {
        config
    } else {
        config.replace("clientapi.http.port = 0\n", "clientapi.http.port =\n")
    }
}

/// An open TLS connection to the node, and the certificate it presented.
async fn connect(
    node: &TestNode,
    ca: &TestCa,
) -> (
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    Vec<u8>,
) {
    let addr = node
        .client_https_url
        .as_deref()
        .unwrap()
        .trim_start_matches("https://");
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_tls(ca, &[b"http/1.1"])));
    let stream = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let presented = stream.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    (stream, presented)
}

/// One keep-alive HTTP/1.1 request on `stream`: the status line and body.
async fn request(
    stream: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    path: &str,
) -> (String, String) {
    let head = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: keep-alive\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "the connection was closed");
        received.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&received).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .expect("a content-length");
            if received.len() >= end + 4 + length {
                let status = text.lines().next().unwrap().to_string();
                return (status, text[end + 4..end + 4 + length].to_string());
            }
        }
    }
}

#[tokio::test]
async fn https_serves_http2_and_a_renewed_certificate_after_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("https test CA");
    let first = write_cert(&ca, dir.path());
    let node = TestNode::start_with_config(dir.path(), &https_config(dir.path(), true));
    let https = node.client_https_url.clone().expect("an https listener");
    assert!(
        node.client_url.starts_with("http://"),
        "{}",
        node.client_url
    );
    let addr: std::net::SocketAddr = https.trim_start_matches("https://").parse().unwrap();

    // HTTP/2 and HTTP/1.1, both by ALPN, with a client that trusts only the test CA.
    for (alpn, version) in [
        (&[&b"h2"[..], b"http/1.1"][..], reqwest::Version::HTTP_2),
        (&[&b"http/1.1"[..]][..], reqwest::Version::HTTP_11),
    ] {
        let mut builder = reqwest::Client::builder()
            .use_preconfigured_tls(client_tls(&ca, alpn))
            .resolve("localhost", addr);
        if version == reqwest::Version::HTTP_11 {
            builder = builder.http1_only();
        }
        let response = builder
            .build()
            .unwrap()
            .get(format!(
                "https://localhost:{}/_matrix/identity/versions",
                addr.port()
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(response.version(), version);
        let body: serde_json::Value = response.json().await.unwrap();
        assert!(body["versions"].is_array(), "{body}");
    }

    // A connection opened before the renewal ...
    let (mut open, presented) = connect(&node, &ca).await;
    assert_eq!(presented, first);
    let (status, _) = request(&mut open, "/_matrix/identity/versions").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    // ... the certificate is renewed and the node told (SIGHUP) ...
    let renewed = write_cert(&ca, dir.path());
    assert_ne!(renewed, first);
    signal(node.pid(), "HUP");
    node.wait_for_log("client API certificate reloaded", Duration::from_secs(10))
        .await;
    // ... new connections get the new one; the open one goes on working.
    let (mut fresh, presented) = connect(&node, &ca).await;
    assert_eq!(presented, renewed);
    let (status, body) = request(&mut fresh, "/_matrix/identity/api/v1").await;
    assert_eq!((status.as_str(), body.as_str()), ("HTTP/1.1 200 OK", "{}"));
    let (status, _) = request(&mut open, "/_matrix/identity/versions").await;
    assert_eq!(status, "HTTP/1.1 200 OK");

    // A renewal half-written: the error is said, the certificate in force stays.
    std::fs::write(
        dir.path().join("https.pem"),
        "-----BEGIN CERTIFICATE-----\ntrunc",
    )
    .unwrap();
    signal(node.pid(), "HUP");
    node.wait_for_log("the certificate in force stays", Duration::from_secs(10))
        .await;
    assert!(
        node.log_text().contains("clientapi.https.certfile"),
        "{}",
        node.log_text()
    );
    let (_, presented) = connect(&node, &ca).await;
    assert_eq!(presented, renewed);
}

#[tokio::test]
async fn plain_http_can_be_turned_off() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("https test CA");
    write_cert(&ca, dir.path());
    let node = TestNode::start_with_config(dir.path(), &https_config(dir.path(), false));
    assert!(
        node.client_url.starts_with("https://"),
        "{}",
        node.client_url
    );
    let (mut stream, _) = connect(&node, &ca).await;
    let (status, _) = request(&mut stream, "/_matrix/identity/versions").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    drop(node);

    // No client API at all, or HTTPS without a certificate: the start stops naming the key.
    let none = base_config(dir.path(), "id.test")
        .replace("clientapi.http.port = 0\n", "clientapi.http.port =\n");
    std::fs::write(dir.path().join("none.conf"), none).unwrap();
    let (code, _, stderr) = run_to_exit(dir.path(), &["--config", "none.conf"]);
    assert_ne!(code, Some(0));
    assert!(stderr.contains("clientapi.http.port"), "{stderr}");
    let no_cert = https_config(dir.path(), true).replace(
        &format!(
            "clientapi.https.certfile = {}/https.pem\n",
            dir.path().display()
        ),
        "",
    );
    std::fs::write(dir.path().join("nocert.conf"), no_cert).unwrap();
    let (code, _, stderr) = run_to_exit(dir.path(), &["--config", "nocert.conf"]);
    assert_ne!(code, Some(0));
    assert!(stderr.contains("clientapi.https.certfile"), "{stderr}");
}
