//! Invites delivered on bind, against a homeserver stand-in (real HTTPS, a test CA, its own
//! ed25519 key) and a real SMTP server: store-invite → the mail → the invited address
//! validated and bound → the homeserver receives the invite with valid signatures, once; the
//! homeserver down during the bind and the node restarted → the delivery completes when it
//! comes back, and nothing is delivered twice.

use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use sydent_rs::crypto::{verify_json, VerifyKey};

use crate::harness::matrix_hs::MatrixHomeserver;
use crate::harness::smtp::Sink;
use crate::harness::{client, get_json, TestCa, TestNode};
use crate::validation::{call, count, start, token_and_link, validation_config};

pub struct OnbindRig {
    pub dir: tempfile::TempDir,
    pub sink: Sink,
    pub ca: TestCa,
    pub hs: MatrixHomeserver,
    pub node: TestNode,
}

impl OnbindRig {
    pub fn new() -> Self {
        Self::with_env(&[])
    }

    pub fn with_env(env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let sink = Sink::start(dir.path(), "plain", None);
        let ca = TestCa::new("homeserver CA");
        let hs = MatrixHomeserver::start(&ca);
        let config = validation_config(dir.path(), sink.port, &[]);
        let node = crate::account::start_trusting(dir.path(), &config, &ca, env);
        Self {
            dir,
            sink,
            ca,
            hs,
            node,
        }
    }

    /// Restarts the node on its config as it is now (with the signing key it wrote into it).
    pub fn restart(&mut self) {
        assert!(self.node.stop().success());
        let config = std::fs::read_to_string(self.dir.path().join("sydent.conf")).unwrap();
        self.node = start(self.dir.path(), &config, &self.ca);
    }

    pub fn db(&self) -> diesel::SqliteConnection {
        use diesel::Connection;
        let db = self.dir.path().join("sydent.db");
        diesel::SqliteConnection::establish(db.to_str().unwrap()).unwrap()
    }
}

/// Stores a v1 invite of `address` to `room` from `sender`; answers its token.
pub async fn invite(node: &TestNode, address: &str, room: &str, sender: &str) -> String {
    let (status, body) = call(
        node,
        "/_matrix/identity/api/v1/store-invite",
        None,
        &json!({"medium": "email", "address": address, "room_id": room, "sender": sender}),
    )
    .await;
    assert_eq!(status, 200, "{body} {}", node.log_text());
    body["token"].as_str().unwrap().to_string()
}

/// Waits until `hs` has received `n` onbind callbacks; answers them.
pub async fn onbinds(hs: &MatrixHomeserver, n: usize, node: &TestNode) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = hs.onbinds();
        if got.len() >= n {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "{} onbinds of {n}; node log:\n{}",
            got.len(),
            node.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The node's long-term public key.
pub async fn node_key(node: &TestNode) -> VerifyKey {
    let (_, key) = node.get("/_matrix/identity/v2/pubkey/ed25519:0").await;
    VerifyKey::from_base64(key["public_key"].as_str().unwrap()).unwrap()
}

/// Checks an onbind body: signed whole by `server` with `key`, for `mxid`, carrying exactly the
/// invites whose tokens are `tokens`, each with its own valid `signed` blob.
pub fn check_onbind(body: &Value, server: &str, key: &VerifyKey, mxid: &str, tokens: &[&str]) {
    let object: &Map<String, Value> = body.as_object().unwrap();
    verify_json(object, server, "ed25519:0", key).expect("the body is signed by the node");
    assert_eq!(body["mxid"], mxid);
    let invites = body["invites"].as_array().unwrap();
    let got: Vec<&str> = invites
        .iter()
        .map(|i| i["token"].as_str().unwrap())
        .collect();
    assert_eq!(got, tokens, "{body}");
    for invite in invites {
        assert_eq!(invite["mxid"], mxid);
        assert_eq!(invite["medium"], body["medium"]);
        assert_eq!(invite["address"], body["address"]);
        let signed = invite["signed"].as_object().unwrap();
        assert_eq!(signed["mxid"], mxid);
        assert_eq!(signed["token"], invite["token"]);
        verify_json(signed, server, "ed25519:0", key).expect("the invite is signed");
    }
}

#[tokio::test]
async fn an_invite_reaches_the_homeserver_when_the_address_is_validated_and_bound() {
    let _ = client();
    let rig = OnbindRig::new();
    let node = &rig.node;
    let token = invite(node, "Carol@Example.org", "!room:other.hs", "@dan:other.hs").await;
    let (mail, _) = rig.sink.received(1);
    assert!(mail.contains(&token), "the invite mail carries the token");

    // Carol validates her address (v1) and binds it to her Matrix ID.
    let secret = "carol-secret";
    let (status, body) = call(
        node,
        "/_matrix/identity/api/v1/validate/email/requestToken",
        None,
        &json!({"email": "carol@example.org", "client_secret": secret, "send_attempt": 1}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let sid = body["sid"].as_str().unwrap().to_string();
    let (mail, _) = rig.sink.received(2);
    let (validation_token, _) = token_and_link(&mail);
    let (status, body) = call(
        node,
        "/_matrix/identity/api/v1/validate/email/submitToken",
        None,
        &json!({"sid": sid, "client_secret": secret, "token": validation_token}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let carol = rig.hs.mxid("carol");
    let (status, bound) = call(
        node,
        "/_matrix/identity/api/v1/3pid/bind",
        None,
        &json!({"sid": sid, "client_secret": secret, "mxid": carol}),
    )
    .await;
    assert_eq!(status, 200, "{bound}");
    let key = node_key(node).await;
    // The bind's answer is the association with its invites, as Sydent's.
    check_onbind(&bound, "id.test", &key, &carol, &[&token]);
    assert_eq!(bound["medium"], "email");
    assert_eq!(bound["address"], "carol@example.org");

    let received = onbinds(&rig.hs, 1, node).await;
    check_onbind(&received[0], "id.test", &key, &carol, &[&token]);
    let invite = &received[0]["invites"][0];
    assert_eq!(invite["room_id"], "!room:other.hs");
    assert_eq!(invite["sender"], "@dan:other.hs");

    // Delivered: the token is gone (delete_tokens_on_bind), the queue is empty, and a rebind
    // sends nothing more.
    let mut db = rig.db();
    let deadline = Instant::now() + Duration::from_secs(10);
    while count(&mut db, "SELECT COUNT(*) AS n FROM onbind_deliveries") > 0 {
        assert!(Instant::now() < deadline, "the delivery stays queued");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(count(&mut db, "SELECT COUNT(*) AS n FROM invite_tokens"), 0);
    let rebound = node
        .internal_3pid("bind", "carol@example.org", &rig.hs.mxid("carol2"))
        .await;
    assert!(rebound.get("invites").is_none(), "{rebound}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(rig.hs.onbinds().len(), 1);
    let (status, body) = call(
        node,
        "/_matrix/identity/api/v1/sign-ed25519",
        None,
        &json!({"mxid": carol, "token": token, "private_key": "A".repeat(43)}),
    )
    .await;
    assert_eq!(
        (status, body["errcode"].as_str()),
        (404, Some("M_UNRECOGNIZED"))
    );
    let status = get_json(&format!(
        "{}/_matrix/identity/internal/onbind",
        node.internal()
    ))
    .await;
    assert_eq!(status["delivered"], 1, "{status}");
    assert_eq!(status["queued"], 0, "{status}");
}

#[tokio::test]
async fn a_delivery_survives_the_homeserver_down_and_a_restart_and_arrives_once() {
    let _ = client();
    let mut rig = OnbindRig::new();
    rig.hs.set_down(true);
    let first = invite(
        &rig.node,
        "erin@example.org",
        "!a:other.hs",
        "@dan:other.hs",
    )
    .await;
    let second = invite(
        &rig.node,
        "erin@example.org",
        "!b:other.hs",
        "@dan:other.hs",
    )
    .await;
    let erin = rig.hs.mxid("erin");
    rig.node
        .internal_3pid("bind", "Erin@Example.org", &erin)
        .await;
    // The homeserver answers 503: the node keeps trying, and says so.
    onbinds(&rig.hs, 2, &rig.node).await;
    let status = get_json(&format!(
        "{}/_matrix/identity/internal/onbind",
        rig.node.internal()
    ))
    .await;
    let destination = &status["destinations"][&rig.hs.server_name];
    assert_eq!(destination["state"], "retrying", "{status}");
    assert!(
        destination["last_error"].as_str().unwrap().contains("503"),
        "{status}"
    );
    {
        let mut db = rig.db();
        assert_eq!(
            count(&mut db, "SELECT COUNT(*) AS n FROM onbind_deliveries"),
            1
        );
        assert_eq!(
            count(
                &mut db,
                "SELECT COUNT(*) AS n FROM invite_tokens WHERE sent_ts IS NULL"
            ),
            2
        );
    }

    // The node restarts while the homeserver is still down, then the homeserver comes back.
    rig.restart();
    let attempts = rig.hs.onbinds().len();
    onbinds(&rig.hs, attempts + 1, &rig.node).await;
    rig.hs.set_down(false);
    let mut db = rig.db();
    let deadline = Instant::now() + Duration::from_secs(20);
    while count(&mut db, "SELECT COUNT(*) AS n FROM onbind_deliveries") > 0 {
        assert!(
            Instant::now() < deadline,
            "never delivered: {}",
            rig.node.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let delivered_at = rig.hs.onbinds().len();
    let key = node_key(&rig.node).await;
    let last = rig.hs.onbinds().pop().unwrap();
    check_onbind(&last, "id.test", &key, &erin, &[&first, &second]);
    assert_eq!(count(&mut db, "SELECT COUNT(*) AS n FROM invite_tokens"), 0);
    // Once delivered, never again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(rig.hs.onbinds().len(), delivered_at);
}

/// The invite is stored on A; the invitee validates and binds on B; the binding replicates to
/// A, and A delivers its invite, signed by A, once. B holds no invite and sends nothing.
#[tokio::test]
async fn mesh_an_invite_stored_on_one_node_reaches_the_invitee_bound_on_another() {
    use crate::mesh::harness::Mesh;
    const A: usize = 0;
    const B: usize = 1;
    let _ = client();
    let ca = TestCa::new("mesh and homeserver CA");
    let hs = MatrixHomeserver::start(&ca);
    let files = tempfile::tempdir().unwrap();
    let sink = Sink::start(files.path(), "plain", None);
    let ca_file = files.path().join("homeserver-ca.pem");
    std::fs::write(&ca_file, &ca.cert_pem).unwrap();
    let mesh = Mesh::start_with(
        &["a.test", "b.test"],
        ca,
        &format!(
            "ip.whitelist = 127.0.0.0/8, ::1/128\n\
             [email]\nemail.smtphost = 127.0.0.1\nemail.smtpport = {}\n",
            sink.port
        ),
        &[("SSL_CERT_FILE", ca_file.to_str().unwrap())],
    )
    .await;
    let a = mesh.nodes[A].node();
    let token = invite(a, "grace@example.org", "!room:other.hs", "@dan:other.hs").await;
    let grace = hs.mxid("grace");
    let bound = mesh.bind(B, "Grace@Example.org", &grace).await;
    assert!(bound.get("invites").is_none(), "B holds no invite: {bound}");
    let received = onbinds(&hs, 1, a).await;
    let key_a = node_key(a).await;
    check_onbind(&received[0], "a.test", &key_a, &grace, &[&token]);
    // The association's fields as B made it.
    for field in ["medium", "address", "mxid", "ts", "not_before", "not_after"] {
        assert_eq!(received[0][field], bound[field], "{field}");
    }
    // Once: B's later rebind, replicated too, finds nothing left to deliver.
    mesh.bind(B, "grace@example.org", &hs.mxid("grace2")).await;
    mesh.wait_lookup(&[A], "grace@example.org", Some(&hs.mxid("grace2")))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(hs.onbinds().len(), 1, "{:?}", hs.onbinds());
}

/// A delivery that keeps failing is given up (here after 1 s instead of 7 days): reported on the
/// status page and in the table with its reason, its invites released, so that the next bind
/// of the address delivers them once the homeserver answers.
#[tokio::test]
async fn a_delivery_given_up_is_reported_and_its_invites_wait_for_the_next_bind() {
    let _ = client();
    let rig = OnbindRig::with_env(&[("SYDENT_RS_TEST_ONBIND_GIVE_UP_MS", "1000")]);
    rig.hs.set_down(true);
    let token = invite(
        &rig.node,
        "heidi@example.org",
        "!a:other.hs",
        "@dan:other.hs",
    )
    .await;
    let heidi = rig.hs.mxid("heidi");
    rig.node
        .internal_3pid("bind", "heidi@example.org", &heidi)
        .await;
    let mut db = rig.db();
    let deadline = Instant::now() + Duration::from_secs(20);
    while count(
        &mut db,
        "SELECT COUNT(*) AS n FROM onbind_deliveries WHERE gave_up_ts IS NOT NULL \
         AND last_error LIKE '%503%'",
    ) == 0
    {
        assert!(
            Instant::now() < deadline,
            "never given up: {}",
            rig.node.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = get_json(&format!(
        "{}/_matrix/identity/internal/onbind",
        rig.node.internal()
    ))
    .await;
    assert_eq!(status["given_up"], 1, "{status}");
    assert_eq!(status["queued"], 0, "{status}");
    assert!(rig.node.log_text().contains("gave up delivering invites"));
    assert_eq!(
        count(
            &mut db,
            "SELECT COUNT(*) AS n FROM invite_tokens WHERE sent_ts IS NULL"
        ),
        1
    );
    assert_eq!(
        count(&mut db, "SELECT COUNT(*) AS n FROM onbind_delivery_invites"),
        0
    );

    // The homeserver is back; Heidi binds again: the invite goes out with this binding.
    rig.hs.set_down(false);
    let before = rig.hs.onbinds().len();
    rig.node
        .internal_3pid("bind", "heidi@example.org", &heidi)
        .await;
    let received = onbinds(&rig.hs, before + 1, &rig.node).await;
    let key = node_key(&rig.node).await;
    check_onbind(&received[before], "id.test", &key, &heidi, &[&token]);
}

/// A homeserver that refuses one delivery (a 4xx: it is up) does not hold up the others: the
/// refused one waits on its own and is delivered once the homeserver takes it.
#[tokio::test]
async fn a_refused_delivery_holds_up_no_other() {
    let _ = client();
    let rig = OnbindRig::new();
    let ivan = rig.hs.mxid("ivan");
    let judy = rig.hs.mxid("judy");
    rig.hs.refuse_onbinds_for(Some(&ivan));
    let ivan_token = invite(
        &rig.node,
        "ivan@example.org",
        "!a:other.hs",
        "@dan:other.hs",
    )
    .await;
    let judy_token = invite(
        &rig.node,
        "judy@example.org",
        "!a:other.hs",
        "@dan:other.hs",
    )
    .await;
    rig.node
        .internal_3pid("bind", "ivan@example.org", &ivan)
        .await;
    onbinds(&rig.hs, 1, &rig.node).await;
    let started = Instant::now();
    rig.node
        .internal_3pid("bind", "judy@example.org", &judy)
        .await;
    let key = node_key(&rig.node).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let judys = loop {
        let found = rig.hs.onbinds().into_iter().find(|b| b["mxid"] == judy);
        if let Some(found) = found {
            break found;
        }
        assert!(Instant::now() < deadline, "{}", rig.node.log_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // At once, not after a backoff.
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
    check_onbind(&judys, "id.test", &key, &judy, &[&judy_token]);
    // The stand-in records Judy's delivery as it receives it: the node takes the answer a
    // moment later, and is idle again once it has.
    let status_url = format!("{}/_matrix/identity/internal/onbind", rig.node.internal());
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        let status = get_json(&status_url).await;
        if status["destinations"][&rig.hs.server_name]["state"] == "idle"
            || Instant::now() > deadline
        {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let destination = &status["destinations"][&rig.hs.server_name];
    assert!(
        destination["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("403")),
        "{status}"
    );
    assert_eq!(destination["refused"], 1, "{status}");
    assert_eq!(destination["state"], "idle", "{status}");
    // Ivan's is tried again on its own and goes through once the homeserver takes it.
    rig.hs.refuse_onbinds_for(None);
    let mut db = rig.db();
    let deadline = Instant::now() + Duration::from_secs(20);
    while count(&mut db, "SELECT COUNT(*) AS n FROM onbind_deliveries") > 0 {
        assert!(Instant::now() < deadline, "{}", rig.node.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ivans: Vec<Value> = rig
        .hs
        .onbinds()
        .into_iter()
        .filter(|b| b["mxid"] == ivan)
        .collect();
    assert!(ivans.len() >= 2, "{ivans:?}");
    check_onbind(
        ivans.last().unwrap(),
        "id.test",
        &key,
        &ivan,
        &[&ivan_token],
    );
}
