//! A Matrix homeserver stand-in that talks to a node as Synapse does: real HTTPS on a loopback
//! port with a certificate for `localhost` from a test CA (the node must trust it and
//! whitelist loopback, see `account::start_node_with`), server name `localhost:<port>`, and a
//! real ed25519 signing key (`ed25519:hs1`).
//!
//! It serves
//! - `GET /_matrix/key/v2/server`: its key, signed by itself, `valid_until_ts` an hour ahead
//!   unless a test sets it ([`MatrixHomeserver::set_key_valid_until`]), or signed with another
//!   key ([`MatrixHomeserver::set_key_answer_forged`]);
//! - `GET /_matrix/federation/v1/openid/userinfo?access_token=`: the tokens of
//!   [`MatrixHomeserver::openid_token`] are its users, others 401 `M_UNKNOWN_TOKEN`;
//! - `POST /_matrix/federation/v1/3pid/onbind`: 200 `{}`;
//! - anything else: 404 `M_UNRECOGNIZED`.
//!
//! It records every request it receives, also while "down" (then it answers 503 to
//! everything), and signs requests to identity servers as Synapse does
//! ([`MatrixHomeserver::x_matrix`]). The signing code here is its own (ed25519-dalek and
//! `serde_json`'s sorted compact output, canonical for the ASCII content the tests send), not
//! the node's, so a mistake in the node's canonical JSON cannot hide behind the same mistake
//! here.

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use base64::engine::general_purpose::STANDARD_NO_PAD;
use base64::Engine;
use ed25519_dalek::{Signer, SigningKey};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{json, Value};

use super::TestCa;

pub const KEY_PATH: &str = "/_matrix/key/v2/server";
pub const ONBIND_PATH: &str = "/_matrix/federation/v1/3pid/onbind";
const USERINFO_PATH: &str = "/_matrix/federation/v1/openid/userinfo";

/// One request the stand-in received.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    /// Path and query.
    pub path: String,
    /// The body as JSON (`Value::Null` when empty or not JSON).
    pub body: Value,
}

/// What the key endpoint answers.
#[derive(Debug, Clone, Copy)]
struct KeyAnswer {
    /// None: no `valid_until_ts` at all.
    valid_until_ts: Option<i64>,
    /// Signed with a key other than the one it lists.
    forged: bool,
}

struct Shared {
    server_name: String,
    key_id: String,
    key: SigningKey,
    requests: Mutex<Vec<Received>>,
    down: AtomicBool,
    key_answer: Mutex<KeyAnswer>,
    /// Onbinds for this Matrix ID are answered 403 (as Synapse refuses an invite it cannot
    /// take).
    refused_mxid: Mutex<Option<String>>,
}

pub struct MatrixHomeserver {
    pub port: u16,
    /// `localhost:<port>`: its server name, the origin of what it signs, the server part of
    /// its users' Matrix IDs.
    pub server_name: String,
    /// `ed25519:hs1`
    pub key_id: String,
    shared: Arc<Shared>,
    handle: actix_web::dev::ServerHandle,
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as i64
}

fn b64(bytes: impl AsRef<[u8]>) -> String {
    STANDARD_NO_PAD.encode(bytes)
}

/// `object` signed by `server` with `key` under `key_id`: the signature covers the object's
/// canonical JSON without `signatures` and `unsigned`.
fn sign(object: &mut Value, server: &str, key_id: &str, key: &SigningKey) {
    let mut content = object.clone();
    if let Some(map) = content.as_object_mut() {
        map.remove("signatures");
        map.remove("unsigned");
    }
    // serde_json's maps are sorted (no preserve_order in this build), its output compact.
    let canonical = serde_json::to_vec(&content).expect("JSON");
    let signature = b64(key.sign(&canonical).to_bytes());
    object["signatures"] = json!({ server: { key_id: signature } });
}

impl MatrixHomeserver {
    /// Starts it with a certificate for `localhost` issued by `ca`.
    pub fn start(ca: &TestCa) -> Self {
        let (cert_pem, key_pem) = ca.cert_for("localhost", &["localhost"]);
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .expect("test certificate");
        let tls_key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("test key");
        let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(certs, tls_key)
        .expect("TLS config");
        let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback port");
        let port = listener.local_addr().expect("bound").port();
        let server_name = format!("localhost:{port}");
        let shared = Arc::new(Shared {
            server_name: server_name.clone(),
            key_id: "ed25519:hs1".into(),
            key: SigningKey::generate(&mut rand_core::OsRng),
            requests: Mutex::new(Vec::new()),
            down: AtomicBool::new(false),
            key_answer: Mutex::new(KeyAnswer {
                valid_until_ts: Some(now_ms() + 3_600_000),
                forged: false,
            }),
            refused_mxid: Mutex::new(None),
        });
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let shared = Arc::clone(&shared);
            std::thread::spawn(move || {
                actix_web::rt::System::new().block_on(async move {
                    let server = HttpServer::new(move || {
                        App::new()
                            .app_data(web::Data::from(Arc::clone(&shared)))
                            .default_service(web::to(handle))
                    })
                    .workers(1)
                    .disable_signals()
                    .listen_rustls_0_23(listener, tls)
                    .expect("listen")
                    .run();
                    tx.send(server.handle()).expect("test thread waits");
                    server.await.expect("server runs");
                });
            });
        }
        let handle = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("homeserver stand-in started");
        Self {
            port,
            key_id: shared.key_id.clone(),
            server_name,
            shared,
            handle,
        }
    }

    /// The `Authorization` header value Synapse sends with a request to identity server
    /// `destination_is` (the `id_server` it was given): its signature over
    /// `{method, uri, origin, destination_is, content}`.
    pub fn x_matrix(
        &self,
        method: &str,
        uri: &str,
        destination_is: &str,
        content: &Value,
    ) -> String {
        self.x_matrix_signed_by(
            &self.shared.key,
            &self.key_id,
            method,
            uri,
            destination_is,
            content,
        )
    }

    /// [`Self::x_matrix`] signed with `key` under `key_id` (a forger's header).
    pub fn x_matrix_signed_by(
        &self,
        key: &SigningKey,
        key_id: &str,
        method: &str,
        uri: &str,
        destination_is: &str,
        content: &Value,
    ) -> String {
        let mut request = json!({
            "method": method,
            "uri": uri,
            "origin": self.server_name,
            "destination_is": destination_is,
            "content": content,
        });
        sign(&mut request, &self.server_name, key_id, key);
        let sig = request["signatures"][&self.server_name][key_id]
            .as_str()
            .expect("signed")
            .to_string();
        format!(
            "X-Matrix origin=\"{}\",key=\"{key_id}\",sig=\"{sig}\",destination=\"{destination_is}\"",
            self.server_name
        )
    }

    /// The OpenID token `openid/userinfo` answers with `@<localpart>:<server_name>`.
    pub fn openid_token(&self, localpart: &str) -> String {
        format!("openid-{localpart}")
    }

    /// `@<localpart>:<server_name>`
    pub fn mxid(&self, localpart: &str) -> String {
        format!("@{localpart}:{}", self.server_name)
    }

    /// Answers 403 to the onbinds for `mxid` (None: to none).
    pub fn refuse_onbinds_for(&self, mxid: Option<&str>) {
        *self.shared.refused_mxid.lock().expect("refused lock") = mxid.map(str::to_string);
    }

    /// Answers 503 to everything while `down`.
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
    }

    /// The `valid_until_ts` of the key answer (None: left out).
    pub fn set_key_valid_until(&self, valid_until_ts: Option<i64>) {
        self.key_answer().valid_until_ts = valid_until_ts;
    }

    /// Signs the key answer with another key than the one it lists.
    pub fn set_key_answer_forged(&self, forged: bool) {
        self.key_answer().forged = forged;
    }

    fn key_answer(&self) -> std::sync::MutexGuard<'_, KeyAnswer> {
        self.shared.key_answer.lock().expect("key answer lock")
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<Received> {
        self.shared.requests.lock().expect("requests lock").clone()
    }

    /// How many times its keys were asked for.
    pub fn key_fetches(&self) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.path.starts_with(KEY_PATH))
            .count()
    }

    /// The bodies of the onbind callbacks received.
    pub fn onbinds(&self) -> Vec<Value> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == "POST" && r.path.starts_with(ONBIND_PATH))
            .map(|r| r.body)
            .collect()
    }
}

impl Drop for MatrixHomeserver {
    fn drop(&mut self) {
        let handle = self.handle.clone();
        std::thread::spawn(move || actix_web::rt::System::new().block_on(handle.stop(false)));
    }
}

async fn handle(req: HttpRequest, body: web::Bytes, shared: web::Data<Shared>) -> HttpResponse {
    let path = req
        .uri()
        .path_and_query()
        .map_or_else(|| req.path().to_string(), |p| p.as_str().to_string());
    shared
        .requests
        .lock()
        .expect("requests lock")
        .push(Received {
            method: req.method().to_string(),
            path: path.clone(),
            body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        });
    if shared.down.load(Ordering::SeqCst) {
        return HttpResponse::ServiceUnavailable()
            .json(json!({"errcode": "M_UNKNOWN", "error": "down for the test"}));
    }
    match (req.method().as_str(), req.path()) {
        ("GET", KEY_PATH) => HttpResponse::Ok().json(key_answer(&shared)),
        ("GET", USERINFO_PATH) => {
            let token = serde_urlencoded::from_str::<Vec<(String, String)>>(req.query_string())
                .unwrap_or_default()
                .into_iter()
                .find_map(|(k, v)| (k == "access_token").then_some(v));
            match token.as_deref().and_then(|t| t.strip_prefix("openid-")) {
                Some(localpart) => HttpResponse::Ok()
                    .json(json!({"sub": format!("@{localpart}:{}", shared.server_name)})),
                None => HttpResponse::Unauthorized()
                    .json(json!({"errcode": "M_UNKNOWN_TOKEN", "error": "Invalid access token"})),
            }
        }
        ("POST", ONBIND_PATH) => {
            let refused = shared.refused_mxid.lock().expect("refused lock").clone();
            let mxid = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|b| b["mxid"].as_str().map(str::to_string));
            if refused.is_some() && refused == mxid {
                HttpResponse::Forbidden()
                    .json(json!({"errcode": "M_FORBIDDEN", "error": "refused for the test"}))
            } else {
                HttpResponse::Ok().json(json!({}))
            }
        }
        _ => HttpResponse::NotFound()
            .json(json!({"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"})),
    }
}

/// `GET /_matrix/key/v2/server` as Synapse answers it.
fn key_answer(shared: &Shared) -> Value {
    let settings = *shared.key_answer.lock().expect("key answer lock");
    let mut answer = json!({
        "server_name": shared.server_name,
        "verify_keys": {
            &shared.key_id: {"key": b64(shared.key.verifying_key().as_bytes())},
        },
        "old_verify_keys": {},
    });
    if let Some(ts) = settings.valid_until_ts {
        answer["valid_until_ts"] = json!(ts);
    }
    let signer = if settings.forged {
        SigningKey::generate(&mut rand_core::OsRng)
    } else {
        shared.key.clone()
    };
    sign(&mut answer, &shared.server_name, &shared.key_id, &signer);
    answer
}
