//! Interop with a real Sydent 2.6.1 (installed into a venv by `tests/sydent/setup.sh`):
//! a sydent-rs node and a Sydent node replicate to each other over mutual TLS, both ways,
//! binds and unbinds. Facts about Sydent's side: tests/sydent/NOTES.md.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sydent_rs::crypto::NodeSigningKey;

use crate::harness::matrix_hs::MatrixHomeserver;
use crate::harness::smtp::Sink;
use crate::harness::{client, set_up, signal, wait_with_deadline, TestNode};
use crate::mesh::harness::{mesh_config, port_of, TestCa};
use crate::onbind::check_onbind;
use sydent_rs::crypto::VerifyKey;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs the idempotent setup (once per test process: two setups at once would clobber the
/// venv) and returns the venv's python, which has Sydent and its Jinja2.
pub(crate) fn sydent_python() -> PathBuf {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON
        .get_or_init(|| {
            set_up(
                "tests/sydent/setup.sh",
                &[],
                "Sydent 2.6.1 could not be installed (needs python3 and pip)",
            )
        })
        .clone()
}

struct SydentNode {
    child: Child,
    client: String,
    internal: String,
    dir: PathBuf,
}

/// Sydent could not bind the replication port it was given: someone took it first.
struct PortTaken;

impl SydentNode {
    /// Starts Sydent with its replication listener on `replication_port` (its other listeners
    /// on ports the OS picks).
    fn start(
        python: &Path,
        dir: &Path,
        (certfile, cacert): (&Path, &Path),
        key: &NodeSigningKey,
        replication_port: u16,
        peer: &str,
        settings: &[String],
    ) -> Result<Self, PortTaken> {
        // The launcher's own errors (a port in use among them) go to stderr, Sydent's to its log.
        let stderr_path = dir.join("launcher.err");
        let stderr = std::fs::File::create(&stderr_path).expect("create launcher.err");
        let mut child = Command::new(python)
            .arg(repo().join("tests/sydent/run_sydent.py"))
            .args([
                "--dir",
                dir.to_str().unwrap(),
                "--server-name",
                "sydent.test",
            ])
            .args(["--client-port", "0", "--internal-port", "0"])
            .args(["--replication-port", &replication_port.to_string()])
            .args([
                "--certfile",
                certfile.to_str().unwrap(),
                "--cacert",
                cacert.to_str().unwrap(),
            ])
            .args(["--signing-key", &key.to_sydent_string(), "--peer", peer])
            .args(settings.iter().flat_map(|kv| ["--set", kv.as_str()]))
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start Sydent");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let ready = loop {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(line) if line.starts_with("SYDENT READY") => break line,
                Ok(_) => continue,
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let err = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                    if err.contains(&format!(
                        ":{replication_port}: [Errno 98] Address already in use"
                    )) {
                        return Err(PortTaken);
                    }
                    let log = std::fs::read_to_string(dir.join("sydent.log")).unwrap_or_default();
                    panic!("Sydent did not start; its stderr:\n{err}\nits log:\n{log}");
                }
            }
        };
        let field = |name: &str| {
            ready
                .split_whitespace()
                .find_map(|f| f.strip_prefix(&format!("{name}=")))
                .unwrap_or_else(|| panic!("{name} in {ready}"))
                .to_string()
        };
        assert_eq!(
            port_of(field("replication").trim_end_matches('/')),
            replication_port
        );
        assert_eq!(field("verify_key"), key.verify_key().to_base64());
        Ok(Self {
            client: field("client"),
            internal: field("internal"),
            child,
            dir: dir.to_path_buf(),
        })
    }

    async fn lookup(&self, address: &str) -> Value {
        let url = format!(
            "{}/_matrix/identity/api/v1/lookup?medium=email&address={}",
            self.client,
            address.replace('@', "%40")
        );
        crate::harness::get_json(&url).await
    }

    async fn internal(&self, what: &str, address: &str, mxid: &str) -> Value {
        let url = format!("{}/_matrix/identity/internal/{what}", self.internal);
        let resp = client()
            .post(url)
            .json(&json!({"medium": "email", "address": address, "mxid": mxid}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.json().await.unwrap()
    }
}

impl Drop for SydentNode {
    fn drop(&mut self) {
        signal(self.child.id(), "TERM");
        wait_with_deadline(&mut self.child, Duration::from_secs(20));
    }
}

/// Polls `f` until it yields `expected` (Sydent pushes on a 10 s timer: allow several ticks
/// on a loaded machine).
async fn eventually<F, Fut>(what: &str, expected: Option<&str>, mut f: F, log: impl Fn() -> String)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Value>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = f().await;
        if got["mxid"].as_str() == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: still {got}; logs:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn replicates_both_ways_with_a_real_sydent() {
    let python = sydent_python();
    let root = tempfile::tempdir().unwrap();
    let ca = TestCa::new("interop CA");
    // A homeserver for invites (trusted by sydent-rs through SSL_CERT_FILE) and a mail sink
    // for both implementations' invite mails.
    let hs = MatrixHomeserver::start(&ca);
    let sink = Sink::start(root.path(), "plain", None);
    let hs_ca = root.path().join("homeserver-ca.pem");
    std::fs::write(&hs_ca, &ca.cert_pem).unwrap();
    let trust_hs = [("SSL_CERT_FILE", hs_ca.to_str().unwrap())];
    let mail_config = format!(
        "[email]\nemail.smtphost = 127.0.0.1\nemail.smtpport = {}\n",
        sink.port
    );
    let peers_dir = root.path().join("peers.d");
    std::fs::create_dir(&peers_dir).unwrap();

    // sydent-rs first, once, to create its database and key.
    let rust_dir = root.path().join("rust");
    std::fs::create_dir(&rust_dir).unwrap();
    let (certfile, cacert) = ca.write_node_files(&rust_dir, "rust.test");
    let rust_config = mesh_config(&rust_dir, "rust.test", &peers_dir, &certfile, &cacert).replacen(
        "[general]\n",
        "[general]\nip.whitelist = 127.0.0.0/8, ::1/128\n",
        1,
    ) + &mail_config;
    let mut first = TestNode::start_with_config(&rust_dir, &rust_config);
    assert!(first.stop().success());
    let (code, rust_peer_file, err) = crate::harness::run_to_exit(
        &rust_dir,
        &[
            "--config",
            rust_dir.join("sydent.conf").to_str().unwrap(),
            "peer-file",
            "--url",
            "https://localhost:1",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    let rust_key = rust_peer_file
        .lines()
        .find_map(|l| l.strip_prefix("public_key = "))
        .unwrap()
        .to_string();

    // Sydent in sydent-rs's database the way a Sydent admin configures peers: rows in `peers`
    // and `peer_pubkeys`, the URL in a [peer.NAME] section (written below; peers.d is the other
    // way, covered by the mesh tests).
    let sydent_key = NodeSigningKey::generate();
    {
        use diesel::connection::SimpleConnection;
        use diesel::Connection;
        let mut conn =
            diesel::SqliteConnection::establish(rust_dir.join("sydent.db").to_str().unwrap())
                .unwrap();
        conn.batch_execute(&format!(
            "INSERT INTO peers (name, port, lastSentVersion, active) VALUES ('sydent.test', NULL, NULL, 1);
             INSERT INTO peer_pubkeys (peername, alg, key) VALUES ('sydent.test', 'ed25519', '{}');",
            sydent_key.verify_key().to_base64()
        ))
        .unwrap();
    }
    let config_path = rust_dir.join("sydent.conf");
    let rust_config = std::fs::read_to_string(&config_path).unwrap();
    let sydent_dir = root.path().join("sydent");
    std::fs::create_dir(&sydent_dir).unwrap();
    let (sydent_cert, sydent_ca) = ca.write_node_files(&sydent_dir, "sydent.test");

    // Each side names the other before it runs. sydent-rs takes a port from the OS and reports
    // it; Sydent is given one found free here, and if something takes it before Sydent binds
    // it, both start again on a fresh one.
    let mut attempts = 0;
    let (rust, sydent) = loop {
        attempts += 1;
        let sydent_port = crate::harness::free_port();
        std::fs::write(
            &config_path,
            format!(
                "{rust_config}\n[peer.sydent.test]\nbase_replication_url = https://localhost:{sydent_port}\n"
            ),
        )
        .unwrap();
        let rust = TestNode::start_with_env(&rust_dir, &config_path, &trust_hs).unwrap();
        let rust_port = port_of(rust.replication_addr.as_deref().unwrap());
        match SydentNode::start(
            &python,
            &sydent_dir,
            (&sydent_cert, &sydent_ca),
            &sydent_key,
            sydent_port,
            &format!("rust.test=https://localhost:{rust_port}={rust_key}"),
            &[
                format!(
                    "general:templates.path={}",
                    crate::templates::sydent_res().display()
                ),
                "email:email.smtphost=127.0.0.1".into(),
                format!("email:email.smtpport={}", sink.port),
            ],
        ) {
            Ok(sydent) => break (rust, sydent),
            Err(PortTaken) if attempts < 5 => {
                eprintln!("port {sydent_port} was taken before Sydent bound it; again");
            }
            Err(PortTaken) => panic!("5 ports in a row were taken before Sydent bound them"),
        }
    };
    let logs = || {
        format!(
            "--- sydent-rs:\n{}\n--- Sydent:\n{}",
            crate::mesh::harness::tail(&rust.log_text()),
            crate::mesh::harness::tail(
                &std::fs::read_to_string(sydent.dir.join("sydent.log")).unwrap_or_default()
            )
        )
    };
    // Mxids on localhost:1: Sydent calls the mxid's homeserver on bind, and loopback is in its
    // outbound blocklist, so nothing leaves the machine (NOTES.md g).
    let rust_lookup = |address: &'static str| {
        let rust = &rust;
        move || async move {
            rust.get(&format!(
                "/_matrix/identity/api/v1/lookup?medium=email&address={}",
                address.replace('@', "%40")
            ))
            .await
            .1
        }
    };

    // sydent-rs → Sydent: a bind, pushed at once; Sydent verifies our signature and serves it.
    let signed = rust
        .internal_3pid("bind", "Rusty@Example.com", "@rusty:localhost:1")
        .await;
    eventually(
        "Sydent sees the sydent-rs bind",
        Some("@rusty:localhost:1"),
        || sydent.lookup("rusty@example.com"),
        logs,
    )
    .await;
    let on_sydent = sydent.lookup("rusty@example.com").await;
    assert_eq!(
        on_sydent["signatures"]["rust.test"],
        signed["signatures"]["rust.test"]
    );
    assert!(
        on_sydent["signatures"]["sydent.test"].is_object(),
        "{on_sydent}"
    );

    // Sydent → sydent-rs: a bind, pushed on Sydent's next tick.
    let from_sydent = sydent
        .internal("bind", "py@example.com", "@py:localhost:1")
        .await;
    eventually(
        "sydent-rs sees the Sydent bind",
        Some("@py:localhost:1"),
        rust_lookup("py@example.com"),
        logs,
    )
    .await;
    let (_, on_rust) = rust
        .get("/_matrix/identity/api/v1/lookup?medium=email&address=py%40example.com")
        .await;
    assert_eq!(
        on_rust["signatures"]["sydent.test"],
        from_sydent["signatures"]["sydent.test"]
    );

    // Unbinds both ways: tombstones from either implementation are understood by the other.
    sydent
        .internal("unbind", "py@example.com", "@py:localhost:1")
        .await;
    rust.internal_3pid("unbind", "rusty@example.com", "@rusty:localhost:1")
        .await;
    eventually(
        "Sydent drops the unbound address",
        None,
        || sydent.lookup("rusty@example.com"),
        logs,
    )
    .await;
    eventually(
        "sydent-rs drops the unbound address",
        None,
        rust_lookup("py@example.com"),
        logs,
    )
    .await;

    // sydent-rs's status page shows Sydent caught up, once sydent-rs has read Sydent's answer
    // (a moment after Sydent serves what it was pushed).
    let status_url = format!("{}/_matrix/identity/internal/replication", rust.internal());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = crate::harness::get_json(&status_url).await;
        let sydent_queue = &status["peers"]["sydent.test"];
        if sydent_queue["cursor"] == status["local_id"] {
            assert_eq!(sydent_queue["backlog"], 0, "{status}");
            break;
        }
        assert!(Instant::now() < deadline, "{status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // An invite stored on sydent-rs, its invitee bound on Sydent: the binding Sydent pushes
    // makes sydent-rs deliver its invite (no identity server does this in Sydent's protocol).
    let (status, stored) = rust
        .post(
            "/_matrix/identity/api/v1/store-invite",
            &json!({"medium": "email", "address": "invitee@example.com", "room_id": "!r:other.hs", "sender": "@dan:other.hs"}),
        )
        .await;
    assert_eq!(status, 200, "{stored}");
    let invitee = hs.mxid("invitee");
    sydent
        .internal("bind", "invitee@example.com", &invitee)
        .await;
    let rust_verify = VerifyKey::from_base64(&rust_key).unwrap();
    let delivered = invites_onbind(&hs, &logs).await;
    check_onbind(
        &delivered,
        "rust.test",
        &rust_verify,
        &invitee,
        &[stored["token"].as_str().unwrap()],
    );

    // One more from sydent-rs, for Sydent to hold when it is replaced below.
    rust.internal_3pid("bind", "fromrust@example.com", "@fr:localhost:1")
        .await;
    eventually(
        "Sydent sees the second sydent-rs bind",
        Some("@fr:localhost:1"),
        || sydent.lookup("fromrust@example.com"),
        logs,
    )
    .await;
    drop(rust);

    // A sydent-rs node rebuilt from its peers skips Sydent ones (they have no such endpoint)
    // and says so; with no other peer nothing can be restored, and the command fails.
    let sydent_url = std::fs::read_to_string(&config_path)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("base_replication_url = "))
        .unwrap()
        .to_string();
    std::fs::write(
        peers_dir.join("sydent.test.conf"),
        sydent_rs::mesh::peers::peer_file_text(
            "sydent.test",
            &sydent_url,
            &sydent_key.verify_key(),
        ),
    )
    .unwrap();
    let lost_config = rust_dir.join("lost.conf");
    std::fs::write(
        &lost_config,
        std::fs::read_to_string(&config_path).unwrap().replace(
            &format!("db.file = {}/sydent.db", rust_dir.display()),
            &format!("db.file = {}/lost.db", rust_dir.display()),
        ),
    )
    .unwrap();
    let (code, out, err) = crate::harness::run_to_exit(
        &rust_dir,
        &[
            "--config",
            lost_config.to_str().unwrap(),
            "rebuild-from-peers",
        ],
    );
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        err.contains("no peer could be read (sydent.test: not a sydent-rs node"),
        "{err}"
    );

    // The switch: Sydent stops, sydent-rs starts on Sydent's own database and key, and serves
    // what Sydent had: its own binding as Sydent signed it, the one it had received, and
    // nothing that was unbound.
    let kept = sydent
        .internal("bind", "stays@example.com", "@stays:localhost:1")
        .await;
    // An invite Sydent stores (its tables, its token): delivered by sydent-rs after the switch.
    let response = client()
        .post(format!("{}/_matrix/identity/api/v1/store-invite", sydent.client))
        .json(&json!({"medium": "email", "address": "Legacy@Example.com", "room_id": "!old:other.hs", "sender": "@dan:other.hs"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let sydent_invite: Value = response.json().await.unwrap();
    let sydent_db = sydent.dir.join("sydent.db");
    drop(sydent);
    let switch_dir = root.path().join("switch");
    std::fs::create_dir(&switch_dir).unwrap();
    let config = format!(
        "{}[crypto]\ned25519.signingkey = {}\n",
        crate::harness::base_config(&switch_dir, "sydent.test")
            .replace(
                &format!("db.file = {}/sydent.db", switch_dir.display()),
                &format!("db.file = {}", sydent_db.display())
            )
            .replacen(
                "[general]\n",
                "[general]\nip.whitelist = 127.0.0.0/8, ::1/128\n",
                1
            ),
        sydent_key.to_sydent_string()
    );
    let switch_config = switch_dir.join("sydent.conf");
    std::fs::write(&switch_config, &config).unwrap();
    let switched = TestNode::start_with_env(&switch_dir, &switch_config, &trust_hs).unwrap();
    let (_, served) = switched
        .get("/_matrix/identity/api/v1/lookup?medium=email&address=stays%40example.com")
        .await;
    assert_eq!(served, kept, "Sydent's own binding, as Sydent signed it");
    let (_, bulk) = switched
        .post(
            "/_matrix/identity/api/v1/bulk_lookup",
            &json!({"threepids": [["email", "stays@example.com"], ["email", "fromrust@example.com"],
                                  ["email", "rusty@example.com"], ["email", "py@example.com"]]}),
        )
        .await;
    assert_eq!(
        bulk,
        json!({"threepids": [["email", "fromrust@example.com", "@fr:localhost:1"],
                             ["email", "stays@example.com", "@stays:localhost:1"]]}),
        "unbound ones stay unbound"
    );

    // The invite Sydent stored is delivered when its address is bound, signed with the key
    // the node took over from Sydent.
    let before = hs.onbinds().len();
    let legacy = hs.mxid("legacy");
    switched
        .internal_3pid("bind", "legacy@example.com", &legacy)
        .await;
    let received = crate::onbind::onbinds(&hs, before + 1, &switched).await;
    check_onbind(
        &received[before],
        "sydent.test",
        &sydent_key.verify_key(),
        &legacy,
        &[sydent_invite["token"].as_str().unwrap()],
    );
}

/// The first onbind `hs` received that carries invites (Sydent's own callbacks carry none, and
/// its IP blocklist keeps them from loopback anyway).
async fn invites_onbind(hs: &MatrixHomeserver, logs: &impl Fn() -> String) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let found = hs
            .onbinds()
            .into_iter()
            .find(|b| b["invites"].as_array().is_some_and(|i| !i.is_empty()));
        if let Some(found) = found {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "no invite delivered; logs:\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
