//! The upstream identity server (`[proxy]`) and the order of the sources, end to end: a node
//! with `[ldap]` (a real slapd) and `[proxy]` pointing at a second real sydent-rs node answers
//! directory people from the directory, what the directory does not know from the upstream
//! (single lookups with the upstream's own signature), and the rest from its own bindings, in
//! the order `precedence` says; hashed lookups are never forwarded; with an access token the
//! upstream is asked only hashed; the directory wins over a binding made since the last sync;
//! an upstream or a directory that stops, hangs or answers garbage costs only its own answers.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use sydent_rs::crypto::lookup_hash;

use crate::account::{account_and_pepper, register, start_trusting, v2_lookup};
use crate::directory::ldap_section;
use crate::harness::matrix_hs::MatrixHomeserver;
use crate::harness::slapd::{person, Slapd, ADMIN_PW};
use crate::harness::sms_gateway::FakeSmsGateway;
use crate::harness::{base_config, client, get_json, signal, TestCa, TestNode};

/// People in the directory: alice, and dora (whom the upstream binds to another Matrix ID).
fn people() -> String {
    [
        person("Alice", &["uid: alice", "mail: alice@example.org"]),
        person("Dora", &["uid: dora", "mail: dora@example.org"]),
    ]
    .concat()
}

/// The upstream: a sydent-rs node of its own (plain HTTP on loopback), which may register v2
/// accounts of `hs`, with uma (only there), shared (also bound on the node, to someone else)
/// and dora (the directory's person, bound there to someone else).
async fn start_upstream(dir: &std::path::Path, ca: &TestCa) -> TestNode {
    // log.level DEBUG: its access log shows what the node sent it.
    let config = base_config(dir, "upstream.test").replacen(
        "[general]\n",
        "[general]\nip.whitelist = 127.0.0.0/8, ::1/128\nlog.level = DEBUG\n",
        1,
    );
    let upstream = start_trusting(dir, &config, ca, &[("RUST_LOG", "info")]);
    for (address, mxid) in [
        ("uma@outside.org", "@uma:outside.org"),
        ("shared@example.org", "@shared:outside.org"),
        ("dora@example.org", "@dora:outside.org"),
    ] {
        upstream.internal_3pid("bind", address, mxid).await;
    }
    upstream
}

/// The node: the directory, `proxy` lines, and its own bindings lou (only here) and shared.
async fn start_node(dir: &std::path::Path, slapd: &Slapd, ca: &TestCa, proxy: &str) -> TestNode {
    let config = format!(
        "{}{}{proxy}",
        base_config(dir, "id.test").replacen(
            "[general]\n",
            "[general]\nip.whitelist = 127.0.0.0/8, ::1/128\n",
            1
        ),
        ldap_section(slapd, ADMIN_PW, "3600")
    );
    let node = start_trusting(dir, &config, ca, &[("RUST_LOG", "info")]);
    node.internal_3pid("bind", "lou@local.org", "@lou:example.org")
        .await;
    node.internal_3pid("bind", "shared@example.org", "@shared:example.org")
        .await;
    wait_synced(&node).await;
    node
}

async fn wait_synced(node: &TestNode) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = get_json(&format!(
            "{}/_matrix/identity/internal/directory",
            node.internal()
        ))
        .await;
        if status["last_sync_ts"].is_i64() {
            return;
        }
        assert!(Instant::now() < deadline, "no sync: {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn upstream_status(node: &TestNode) -> Value {
    get_json(&format!(
        "{}/_matrix/identity/internal/upstream",
        node.internal()
    ))
    .await
}

/// A v1 lookup's status and body text, as sent.
async fn lookup_text(url: &str, address: &str) -> (u16, String) {
    let response = client()
        .get(format!(
            "{url}/_matrix/identity/api/v1/lookup?medium=email&address={}",
            address.replace('@', "%40")
        ))
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

async fn lookup_mxid(node: &TestNode, address: &str) -> Value {
    let (status, text) = lookup_text(&node.client_url, address).await;
    assert_eq!(status, 200, "{address}: {text}");
    let body: Value = serde_json::from_str(&text).unwrap();
    body.get("mxid").cloned().unwrap_or(Value::Null)
}

/// bulk_lookup of `addresses` (emails): address → mxid.
async fn bulk(node: &TestNode, addresses: &[&str]) -> Value {
    let threepids: Vec<Value> = addresses.iter().map(|a| json!(["email", a])).collect();
    let (status, body) = node
        .post(
            "/_matrix/identity/api/v1/bulk_lookup",
            &json!({ "threepids": threepids }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let mut found = serde_json::Map::new();
    for triple in body["threepids"].as_array().unwrap() {
        assert_eq!(triple[0], "email", "{body}");
        let previous = found.insert(triple[1].as_str().unwrap().into(), triple[2].clone());
        assert!(previous.is_none(), "answered twice: {body}");
    }
    Value::Object(found)
}

/// Asks `node` every address of ASKED by bulk_lookup and one by one, and checks both answer
/// `expected`; then checks that its answer for uma (the upstream's person) is the upstream's
/// own, byte for byte, and returns it.
async fn assert_answers(node: &TestNode, upstream: &TestNode, expected: &Value) -> Value {
    assert_eq!(&bulk(node, &ASKED).await, expected);
    for address in ASKED {
        assert_eq!(
            lookup_mxid(node, address).await,
            expected[address],
            "{address}"
        );
    }
    let (_, ours) = lookup_text(&node.client_url, "uma@outside.org").await;
    let (_, theirs) = lookup_text(&upstream.client_url, "uma@outside.org").await;
    assert_eq!(ours, theirs);
    serde_json::from_str(&ours).unwrap()
}

const ASKED: [&str; 6] = [
    "alice@example.org",
    "dora@example.org",
    "uma@outside.org",
    "shared@example.org",
    "lou@local.org",
    "nobody@outside.org",
];

#[tokio::test]
async fn sources_answer_in_order_and_a_source_that_stops_costs_only_its_answers() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("homeserver CA");
    let hs = MatrixHomeserver::start(&ca);
    let mut slapd = Slapd::start(&dir.path().join("slapd"));
    slapd.add(&people());
    let upstream_dir = dir.path().join("upstream");
    std::fs::create_dir(&upstream_dir).unwrap();
    let mut upstream = start_upstream(&upstream_dir, &ca).await;
    let node_dir = dir.path().join("node");
    std::fs::create_dir(&node_dir).unwrap();
    let proxy = format!(
        "[proxy]\nidentity = {}/\ntimeout = 2\n",
        upstream.client_url
    );
    let node = start_node(&node_dir, &slapd, &ca, &proxy).await;

    // The directory, then the upstream, then this node: bulk_lookup ...
    let expected = json!({
        "alice@example.org": "@alice:example.org",
        "dora@example.org": "@dora:example.org",
        "uma@outside.org": "@uma:outside.org",
        "shared@example.org": "@shared:outside.org",
        "lou@local.org": "@lou:example.org",
    });
    // ... and one by one, the same order; the upstream's answer is its own, signature intact.
    let signed = assert_answers(&node, &upstream, &expected).await;
    let signers: Vec<&String> = signed["signatures"].as_object().unwrap().keys().collect();
    assert_eq!(signers, ["upstream.test"], "{signed}");

    // v2 with algorithm none takes the same path; a hashed lookup is never forwarded.
    let account = account_and_pepper(&node, &hs).await;
    let addresses: Vec<String> = ASKED.iter().map(|a| format!("{a} email")).collect();
    let found = v2_lookup(&node, &account, "none", &addresses).await;
    let mappings: serde_json::Map<String, Value> = expected
        .as_object()
        .unwrap()
        .iter()
        .map(|(address, mxid)| (format!("{address} email"), mxid.clone()))
        .collect();
    assert_eq!(found, Value::Object(mappings));
    let before = upstream_status(&node).await;
    let hashes: Vec<String> = ["uma@outside.org", "alice@example.org", "shared@example.org"]
        .iter()
        .map(|a| lookup_hash(a, "email", &account.1))
        .collect();
    assert_eq!(
        v2_lookup(&node, &account, "sha256", &hashes).await,
        json!({&hashes[1]: "@alice:example.org", &hashes[2]: "@shared:example.org"}),
        "the upstream's uma is not found by hash, shared is this node's"
    );
    let after = upstream_status(&node).await;
    assert_eq!(after["requests"], before["requests"], "{after}");
    // One forwarded request per client request, counted, in the log without addresses.
    assert_eq!(after["enabled"], true);
    assert_eq!(after["hashed"], false);
    assert_eq!(after["failures"], 0, "{after}");
    // bulk, the 4 single lookups the directory does not answer, uma's again, v2 none.
    assert_eq!(after["requests"], 1 + 4 + 1 + 1, "{after}");
    assert!(after["last_request_ts"].is_i64(), "{after}");
    let log = node.log_text();
    let forwarded: Vec<&str> = log.lines().filter(|l| l.contains("upstream: ")).collect();
    assert_eq!(forwarded.len(), 7, "{log}");
    for line in forwarded {
        assert!(!line.contains('@'), "an address in the log: {line}");
    }

    // The upstream stops: the directory and this node still answer, at once, never a 500.
    upstream.stop();
    let started = Instant::now();
    let without = bulk(&node, &ASKED).await;
    assert_eq!(
        without,
        json!({
            "alice@example.org": "@alice:example.org",
            "dora@example.org": "@dora:example.org",
            "shared@example.org": "@shared:example.org",
            "lou@local.org": "@lou:example.org",
        })
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(lookup_mxid(&node, "uma@outside.org").await, Value::Null);
    let failed = upstream_status(&node).await;
    assert_eq!(failed["failures"], 2, "{failed}");
    assert!(
        failed["last_error"]
            .as_str()
            .unwrap()
            .contains("cannot reach the upstream"),
        "{failed}"
    );
    // The directory stops too: its people are still answered from the mirror.
    slapd.stop();
    assert_eq!(
        bulk(
            &node,
            &["alice@example.org", "lou@local.org", "nobody@outside.org"]
        )
        .await,
        json!({"alice@example.org": "@alice:example.org", "lou@local.org": "@lou:example.org"})
    );
    assert_eq!(
        lookup_mxid(&node, "dora@example.org").await,
        "@dora:example.org"
    );
}

#[tokio::test]
async fn local_first_and_an_upstream_asked_only_by_hash() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("homeserver CA");
    let hs = MatrixHomeserver::start(&ca);
    let slapd = Slapd::start(&dir.path().join("slapd"));
    slapd.add(&people());
    let upstream_dir = dir.path().join("upstream");
    std::fs::create_dir(&upstream_dir).unwrap();
    let upstream = start_upstream(&upstream_dir, &ca).await;
    // The node's account at the upstream.
    let (status, account) = register(&upstream, &hs.openid_token("node"), &hs.server_name).await;
    assert_eq!(status, 200, "{account}");
    let node_dir = dir.path().join("node");
    std::fs::create_dir(&node_dir).unwrap();
    let proxy = format!(
        "[proxy]\nidentity = {}\naccess_token = {}\nprecedence = local_first\n",
        upstream.client_url,
        account["token"].as_str().unwrap()
    );
    let node = start_node(&node_dir, &slapd, &ca, &proxy).await;

    // The directory, then this node, then the upstream.
    let expected = json!({
        "alice@example.org": "@alice:example.org",
        "dora@example.org": "@dora:example.org",
        "uma@outside.org": "@uma:outside.org",
        "shared@example.org": "@shared:example.org",
        "lou@local.org": "@lou:example.org",
    });
    assert_answers(&node, &upstream, &expected).await;

    // What reached the upstream: hashed lookups, and a v1 lookup only for the address it
    // answered by hash (one it holds, so knows already); never a bulk_lookup.
    let status = upstream_status(&node).await;
    assert_eq!(status["hashed"], true, "{status}");
    assert_eq!(status["failures"], 0, "{status}");
    // bulk (uma, nobody) + single uma + single nobody + single uma again.
    assert_eq!(status["requests"], 4, "{status}");
    assert_eq!(status["threepids_forwarded"], 5, "{status}");
    assert_eq!(status["threepids_answered"], 3, "{status}");
    // The upstream logs a request once it has answered it, and the harness reads its stderr
    // on a thread of its own: wait for the eight lines (hash_details, four v2 lookups, three
    // v1 lookups) before counting them.
    let forwarded = |log: &str| {
        log.lines()
            .filter(|l| l.contains("\"GET /_matrix") || l.contains("\"POST /_matrix"))
            .filter(|l| !l.contains("/internal/") && !l.contains("/account/register"))
            .count()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while forwarded(&upstream.log_text()) < 8 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let log = upstream.log_text();
    let requests: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("\"GET /_matrix") || l.contains("\"POST /_matrix"))
        .filter(|l| !l.contains("/internal/") && !l.contains("/account/register"))
        .collect();
    let count = |what: &str| requests.iter().filter(|l| l.contains(what)).count();
    assert_eq!(
        count("/v2/hash_details"),
        1,
        "the pepper is kept: {requests:#?}"
    );
    assert_eq!(count("/v2/lookup"), 4, "{requests:#?}");
    assert_eq!(
        count("/api/v1/lookup"),
        3,
        "the test's own and uma's twice: {requests:#?}"
    );
    assert_eq!(count("bulk_lookup"), 0, "{requests:#?}");
}

#[tokio::test]
async fn the_directory_wins_over_a_binding_made_since_the_last_sync() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("homeserver CA");
    let hs = MatrixHomeserver::start(&ca);
    let slapd = Slapd::start(&dir.path().join("slapd"));
    slapd.add(&people());
    let node_dir = dir.path().join("node");
    std::fs::create_dir(&node_dir).unwrap();
    let node = start_node(&node_dir, &slapd, &ca, "").await;

    // Someone binds alice's address to another account, after the sync.
    let bound = node
        .internal_3pid("bind", "alice@example.org", "@mallory:example.org")
        .await;
    assert_eq!(bound["mxid"], "@mallory:example.org");
    // Every lookup path still answers the directory's Matrix ID.
    let (_, text) = lookup_text(&node.client_url, "alice@example.org").await;
    let signed: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(signed["mxid"], "@alice:example.org", "{signed}");
    assert!(
        signed["signatures"]["id.test"]["ed25519:0"].is_string(),
        "{signed}"
    );
    let key = get_json(&format!(
        "{}/_matrix/identity/api/v1/pubkey/ed25519:0",
        node.client_url
    ))
    .await;
    let key =
        sydent_rs::crypto::VerifyKey::from_base64(key["public_key"].as_str().unwrap()).unwrap();
    sydent_rs::crypto::verify_json(signed.as_object().unwrap(), "id.test", "ed25519:0", &key)
        .expect("signed by this node");
    assert_eq!(
        bulk(&node, &["alice@example.org"]).await,
        json!({"alice@example.org": "@alice:example.org"})
    );
    let account = account_and_pepper(&node, &hs).await;
    let hash = lookup_hash("alice@example.org", "email", &account.1);
    let found = v2_lookup(&node, &account, "sha256", std::slice::from_ref(&hash)).await;
    assert_eq!(found[&hash], "@alice:example.org", "{found}");
    // store-invite of the address: in use, by the directory's person.
    let (status, body) = node
        .post(
            "/_matrix/identity/api/v1/store-invite",
            &json!({"medium": "email", "address": "alice@example.org", "room_id": "!r:example.org",
                    "sender": "@s:example.org"}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["errcode"], "M_THREEPID_IN_USE", "{body}");
    assert_eq!(body["mxid"], "@alice:example.org", "{body}");
}

#[tokio::test]
async fn an_upstream_that_hangs_or_answers_garbage_costs_only_its_answers() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("homeserver CA");
    let slapd = Slapd::start(&dir.path().join("slapd"));
    slapd.add(&people());

    // A real upstream that hangs (stopped with SIGSTOP: it accepts, never answers).
    let upstream_dir = dir.path().join("upstream");
    std::fs::create_dir(&upstream_dir).unwrap();
    let upstream = start_upstream(&upstream_dir, &ca).await;
    let node_dir = dir.path().join("node");
    std::fs::create_dir(&node_dir).unwrap();
    let proxy = format!("[proxy]\nidentity = {}\ntimeout = 1\n", upstream.client_url);
    let mut node = start_node(&node_dir, &slapd, &ca, &proxy).await;
    signal(upstream.pid(), "STOP");
    let started = Instant::now();
    assert_eq!(
        bulk(
            &node,
            &["alice@example.org", "uma@outside.org", "lou@local.org"]
        )
        .await,
        json!({"alice@example.org": "@alice:example.org", "lou@local.org": "@lou:example.org"})
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
    let status = upstream_status(&node).await;
    assert!(
        status["last_error"]
            .as_str()
            .unwrap()
            .contains("did not answer within 1000 ms"),
        "{status}"
    );
    signal(upstream.pid(), "CONT");
    assert_eq!(
        lookup_mxid(&node, "uma@outside.org").await,
        "@uma:outside.org"
    );
    node.stop();

    // An upstream answering garbage, then too much: the rest still answers. It also shows
    // what the node sends: one bulk_lookup per request, only what the directory lacks.
    let (url, recorder) = FakeSmsGateway::start();
    let base = url.trim_end_matches(crate::harness::sms_gateway::MT_PATH);
    let config = std::fs::read_to_string(&node.config_path)
        .unwrap()
        .replace(&upstream.client_url, base);
    let node = start_trusting(&node_dir, &config, &ca, &[("RUST_LOG", "info")]);
    recorder.reply(
        200,
        &[("Content-Type", "text/html")],
        "<html>not json</html>",
    );
    let asked = ["alice@example.org", "Uma@Outside.org", "lou@local.org"];
    let local =
        json!({"alice@example.org": "@alice:example.org", "lou@local.org": "@lou:example.org"});
    assert_eq!(bulk(&node, &asked).await, local);
    let sent = recorder.requests();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].method, "POST");
    assert_eq!(sent[0].path, "/_matrix/identity/api/v1/bulk_lookup");
    assert_eq!(
        sent[0].json(),
        json!({"threepids": [["email", "uma@outside.org"], ["email", "lou@local.org"]]})
    );
    let big = format!(
        "{{\"threepids\": [{}]}}",
        "[\"email\",\"x\",\"@x:y\"],".repeat(200_000)
    );
    recorder.reply(200, &[], &big);
    assert_eq!(bulk(&node, &asked).await, local);
    recorder.reply(500, &[], "{\"errcode\": \"M_UNKNOWN\"}");
    let (status, text) = lookup_text(&node.client_url, "uma@outside.org").await;
    assert_eq!((status, text.as_str()), (200, "{}"));
    let status = upstream_status(&node).await;
    assert_eq!(status["failures"], 3, "{status}");
    assert!(
        status["last_error"]
            .as_str()
            .unwrap()
            .contains("answered 500 M_UNKNOWN"),
        "{status}"
    );
    let log = node.log_text();
    assert!(log.contains("is not what that endpoint answers"), "{log}");
    assert!(log.contains("larger than 4194304 bytes"), "{log}");
}
