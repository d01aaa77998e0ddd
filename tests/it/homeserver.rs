//! The homeserver client against a real HTTPS server made here (a test CA, a certificate for
//! `localhost`), through the real resolution code: the IP filter after DNS, the well-known
//! delegation, the host-name check of the certificate, the size cap.

use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sydent_rs::homeserver::{HomeserverClient, HomeserverError, IpFilter};

use crate::mesh::harness::TestCa;

/// A homeserver stand-in: HTTPS on a loopback port with a certificate for `names`; records the
/// Host header of each userinfo request. The well-known file delegates to `localhost:<port>`.
/// `openid/userinfo` knows two OpenID tokens: `good` is `@alice:<the Host header>`, `evil` is a
/// user of another server; any other is 401 `M_UNKNOWN_TOKEN`.
pub struct FakeHomeserver {
    pub port: u16,
    pub hosts: Arc<Mutex<Vec<String>>>,
    handle: actix_web::dev::ServerHandle,
}

impl FakeHomeserver {
    pub fn start(ca: &TestCa, names: &[&str]) -> Self {
        let (cert_pem, key_pem) = ca.cert_for(names[0], names);
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .unwrap();
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
        let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let hosts = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let hosts = Arc::clone(&hosts);
            std::thread::spawn(move || {
                actix_web::rt::System::new().block_on(async move {
                    let server = HttpServer::new(move || {
                        let hosts = Arc::clone(&hosts);
                        App::new()
                            .route(
                                "/.well-known/matrix/server",
                                web::get().to(move || async move {
                                    HttpResponse::Ok()
                                        .insert_header(("Cache-Control", "max-age=60"))
                                        .json(serde_json::json!({"m.server": format!("localhost:{port}")}))
                                }),
                            )
                            .route(
                                "/_matrix/federation/v1/openid/userinfo",
                                web::get().to(move |req: HttpRequest| {
                                    let hosts = Arc::clone(&hosts);
                                    async move {
                                        let host = req
                                            .headers()
                                            .get("host")
                                            .and_then(|h| h.to_str().ok())
                                            .unwrap_or_default()
                                            .to_string();
                                        hosts.lock().unwrap().push(host.clone());
                                        match req.query_string() {
                                            "access_token=good" => HttpResponse::Ok()
                                                .json(serde_json::json!({"sub": format!("@alice:{host}")})),
                                            "access_token=evil" => HttpResponse::Ok()
                                                .json(serde_json::json!({"sub": "@mallory:evil.example"})),
                                            _ => HttpResponse::Unauthorized().json(serde_json::json!(
                                                {"errcode": "M_UNKNOWN_TOKEN", "error": "Invalid access token"}
                                            )),
                                        }
                                    }
                                }),
                            )
                            .route(
                                "/big",
                                web::get().to(|| async { HttpResponse::Ok().body(vec![b'x'; 100_000]) }),
                            )
                    })
                    .workers(1)
                    .disable_signals()
                    .listen_rustls_0_23(listener, tls)
                    .unwrap()
                    .run();
                    tx.send(server.handle()).unwrap();
                    server.await.unwrap();
                });
            });
        }
        let handle = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        Self {
            port,
            hosts,
            handle,
        }
    }
}

impl Drop for FakeHomeserver {
    fn drop(&mut self) {
        let handle = self.handle.clone();
        std::thread::spawn(move || actix_web::rt::System::new().block_on(handle.stop(false)));
    }
}

fn client(ca: &TestCa, whitelist: &[&str], well_known_port: u16) -> HomeserverClient {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca.cert_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let whitelist: Vec<ipnet::IpNet> = whitelist.iter().map(|n| n.parse().unwrap()).collect();
    HomeserverClient::with_roots(IpFilter::new(&[], &whitelist), true, roots, well_known_port)
        .unwrap()
}

const USERINFO: &str = "/_matrix/federation/v1/openid/userinfo?access_token=good";

#[tokio::test]
async fn loopback_homeservers_are_refused_unless_whitelisted() {
    let ca = TestCa::new("homeserver test CA");
    let hs = FakeHomeserver::start(&ca, &["localhost"]);
    let name = format!("localhost:{}", hs.port);
    let refused = client(&ca, &[], hs.port);
    for server in [
        name.clone(),
        format!("127.0.0.1:{}", hs.port),
        format!("[::1]:{}", hs.port),
    ] {
        let err = refused.get(&server, USERINFO, 5 * 1024).await.unwrap_err();
        assert!(
            matches!(err, HomeserverError::Blocked(_)),
            "{server}: {err}"
        );
    }
    assert!(
        hs.hosts.lock().unwrap().is_empty(),
        "a refused request reached the server"
    );

    let allowed = client(&ca, &["127.0.0.0/8", "::1/128"], hs.port);
    let answer = allowed.get(&name, USERINFO, 5 * 1024).await.unwrap();
    assert_eq!(answer.status, 200);
    let body: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
    assert_eq!(body["sub"], format!("@alice:{name}"));
    assert_eq!(hs.hosts.lock().unwrap().as_slice(), [name.as_str()]);
}

#[tokio::test]
async fn a_server_name_without_port_is_delegated_by_its_well_known_file() {
    let ca = TestCa::new("homeserver test CA");
    let hs = FakeHomeserver::start(&ca, &["localhost"]);
    let client = client(&ca, &["127.0.0.0/8", "::1/128"], hs.port);
    let answer = client.get("localhost", USERINFO, 5 * 1024).await.unwrap();
    assert_eq!(answer.status, 200);
    // The request went where m.server said, with the delegated name as Host.
    assert_eq!(
        hs.hosts.lock().unwrap().as_slice(),
        [format!("localhost:{}", hs.port)]
    );
}

#[tokio::test]
async fn a_certificate_for_another_name_is_refused() {
    let ca = TestCa::new("homeserver test CA");
    // Issued by a trusted CA, but for other.example.org only: Sydent would accept it.
    let hs = FakeHomeserver::start(&ca, &["other.example.org"]);
    let client = client(&ca, &["127.0.0.0/8", "::1/128"], hs.port);
    let err = client
        .get(&format!("localhost:{}", hs.port), USERINFO, 5 * 1024)
        .await
        .unwrap_err();
    match &err {
        HomeserverError::Unreachable { message, .. } => {
            assert!(message.contains("certificate"), "{message}")
        }
        other => panic!("{other}"),
    }
    assert!(hs.hosts.lock().unwrap().is_empty());
}

#[tokio::test]
async fn answers_past_the_limit_are_refused() {
    let ca = TestCa::new("homeserver test CA");
    let hs = FakeHomeserver::start(&ca, &["localhost"]);
    let client = client(&ca, &["127.0.0.0/8", "::1/128"], hs.port);
    let name = format!("localhost:{}", hs.port);
    let err = client.get(&name, "/big", 50 * 1024).await.unwrap_err();
    assert!(
        matches!(err, HomeserverError::TooLarge { limit: 51200, .. }),
        "{err}"
    );
    assert_eq!(
        client.get(&name, "/big", 100_000).await.unwrap().body.len(),
        100_000
    );
}

/// A DNS server on a loopback UDP port answering `_matrix-fed._tcp.<name>.` with one SRV record
/// (`localhost.`, `port`) and NXDOMAIN to everything else.
fn start_dns(name: &str, port: u16) -> std::net::SocketAddr {
    use hickory_resolver::proto::op::{Message, MessageType, ResponseCode};
    use hickory_resolver::proto::rr::rdata::SRV;
    use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
    use hickory_resolver::proto::serialize::binary::{BinDecodable, BinEncodable};
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    let wanted = format!("_matrix-fed._tcp.{name}.");
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            let Ok(query) = Message::from_bytes(&buf[..n]) else {
                continue;
            };
            let mut answer = Message::new();
            answer
                .set_id(query.id())
                .set_message_type(MessageType::Response)
                .set_op_code(query.op_code())
                .set_recursion_desired(query.recursion_desired())
                .set_recursion_available(true)
                .add_queries(query.queries().to_vec());
            let srv = query.queries().iter().find(|q| {
                q.query_type() == RecordType::SRV
                    && q.name().to_ascii().eq_ignore_ascii_case(&wanted)
            });
            match srv {
                Some(q) => {
                    answer.add_answer(Record::from_rdata(
                        q.name().clone(),
                        60,
                        RData::SRV(SRV::new(
                            10,
                            5,
                            port,
                            Name::from_ascii("localhost.").unwrap(),
                        )),
                    ));
                }
                None => {
                    answer.set_response_code(ResponseCode::NXDomain);
                }
            }
            let _ = socket.send_to(&answer.to_bytes().unwrap(), from);
        }
    });
    addr
}

#[tokio::test]
async fn an_srv_record_sends_the_connection_elsewhere_and_the_certificate_names_the_server() {
    let ca = TestCa::new("homeserver test CA");
    // The homeserver's certificate names srv.test, the server name; the SRV record points the
    // connection at localhost:<port>. No well-known file answers for srv.test (it does not
    // resolve), so discovery goes on to SRV.
    let hs = FakeHomeserver::start(&ca, &["srv.test"]);
    let dns = start_dns("srv.test", hs.port);
    let client = client(&ca, &["127.0.0.0/8", "::1/128"], hs.port).with_nameserver(dns);
    let answer = client.get("srv.test", USERINFO, 5 * 1024).await.unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(hs.hosts.lock().unwrap().as_slice(), ["srv.test"]);

    // The same through a refusing filter: the SRV target's address is checked, not the name's.
    let refused = self::client(&ca, &[], hs.port).with_nameserver(dns);
    let err = refused
        .get("srv.test", USERINFO, 5 * 1024)
        .await
        .unwrap_err();
    assert!(matches!(err, HomeserverError::Blocked(_)), "{err}");
}
