//! The directory mirror end to end: a node with `[ldap]` pointing at a real OpenLDAP
//! (harness/slapd.rs) binds the directory's people as its own bindings at start, so v1 and v2
//! (hashed) lookups find them and a replication peer receives them; a person added to the
//! directory is bound at the next sync, one removed is unbound (on the peer too); the
//! directory winning over another binding of the same address; a directory that is down or
//! refuses the node's password changes nothing and is reported.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use sydent_rs::crypto::lookup_hash;

use crate::account::{account_and_pepper, v2_lookup};
use crate::harness::matrix_hs::MatrixHomeserver;
use crate::harness::slapd::{person, Slapd, ADMIN_DN, ADMIN_PW, PEOPLE};
use crate::harness::{base_config, client, get_json, TestCa, TestNode};

/// The `[ldap]` lines of a node reading `slapd` (syncing every `interval` seconds).
pub fn ldap_section(slapd: &Slapd, password: &str, interval: &str) -> String {
    format!(
        "[ldap]\nuri = {}\nbase = {PEOPLE}\nemail = mail\nmsisdn = telephoneNumber\n\
         id_attr = uid\nhs_name = example.org\nbind_dn = {ADMIN_DN}\nbind_pw = {password}\n\
         filter = (objectClass=inetOrgPerson)\ntimeout = 2\nsync_interval = {interval}\n",
        slapd.uri()
    )
}

fn people() -> String {
    [
        person(
            "Alice",
            &[
                "uid: alice",
                "mail: Alice@Example.ORG",
                "telephoneNumber: +1 555-123-4567",
            ],
        ),
        person("Bob", &["uid: bob", "mail: bob@example.org"]),
    ]
    .concat()
}

/// A slapd in `dir` holding [`people`], and a node in `dir/node` mirroring it (hourly).
fn directory_and_node(dir: &std::path::Path) -> (Slapd, TestNode) {
    let _ = client();
    let slapd = Slapd::start(dir);
    slapd.add(&people());
    let node_dir = dir.join("node");
    std::fs::create_dir(&node_dir).unwrap();
    let config = format!(
        "{}{}",
        base_config(&node_dir, "id.test"),
        ldap_section(&slapd, ADMIN_PW, "3600")
    );
    let node = TestNode::start_with_config(&node_dir, &config);
    (slapd, node)
}

async fn status(node: &TestNode) -> Value {
    get_json(&format!(
        "{}/_matrix/identity/internal/directory",
        node.internal()
    ))
    .await
}

/// Waits until the directory's status satisfies `done`.
async fn wait_status(node: &TestNode, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = status(node).await;
        if done(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {status}\n{}",
            node.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn lookup(node: &TestNode, medium: &str, address: &str) -> Value {
    node.get(&format!(
        "/_matrix/identity/api/v1/lookup?medium={medium}&address={}",
        address.replace('@', "%40").replace('+', "%2B")
    ))
    .await
    .1
}

#[tokio::test]
async fn the_directory_is_mirrored_as_this_nodes_bindings() {
    let _ = client();
    let dir = tempfile::tempdir().unwrap();
    let slapd = Slapd::start(dir.path());
    slapd.add(&people());
    let node_dir = dir.path().join("node");
    std::fs::create_dir(&node_dir).unwrap();
    // A homeserver for a v2 account.
    let ca = TestCa::new("homeserver CA");
    let hs = MatrixHomeserver::start(&ca);
    let config = format!(
        "{}{}",
        base_config(&node_dir, "id.test").replacen(
            "[general]\n",
            "[general]\nip.whitelist = 127.0.0.0/8, ::1/128\n",
            1
        ),
        ldap_section(&slapd, ADMIN_PW, "3600")
    );
    let mut node = crate::account::start_trusting(&node_dir, &config, &ca, &[]);
    let first = wait_status(&node, "first sync", |s| s["last_sync_ts"].is_i64()).await;
    assert_eq!(first["entries"], 3, "{first}");
    assert_eq!(first["last_bound"], 3, "{first}");

    // v1: the stored, signed association of this node's binding.
    let alice = lookup(&node, "email", "alice@example.org").await;
    assert_eq!(alice["mxid"], "@alice:example.org", "{alice}");
    assert!(alice["signatures"]["id.test"].is_object(), "{alice}");
    let phone = lookup(&node, "msisdn", "15551234567").await;
    assert_eq!(phone["mxid"], "@alice:example.org", "{phone}");
    // v2, hashed: what the fork cannot answer at all.
    let account = account_and_pepper(&node, &hs).await;
    let hashed = lookup_hash("alice@example.org", "email", &account.1);
    let found = v2_lookup(&node, &account, "sha256", std::slice::from_ref(&hashed)).await;
    assert_eq!(found[&hashed], "@alice:example.org");

    // A person added to the directory is bound at the next sync; one removed is unbound.
    slapd.add(&person("Carol", &["uid: carol", "mail: carol@example.org"]));
    slapd.delete(&format!("cn=Bob,{PEOPLE}"));
    let (status_code, _) = node
        .internal_post("/_matrix/identity/internal/directory/sync", &json!({}))
        .await;
    assert_eq!(status_code, 200);
    let after = wait_status(&node, "second sync", |s| {
        s["last_sync_ts"] != first["last_sync_ts"]
    })
    .await;
    assert_eq!(after["entries"], 3, "{after}");
    assert_eq!(after["last_bound"], 1, "{after}");
    assert_eq!(after["last_unbound"], 1, "{after}");
    assert_eq!(
        lookup(&node, "email", "carol@example.org").await["mxid"],
        "@carol:example.org"
    );
    assert_eq!(lookup(&node, "email", "bob@example.org").await, json!({}));

    // The directory wins over another binding of its address, whatever its age.
    node.internal_3pid("bind", "alice@example.org", "@mallory:example.org")
        .await;
    node.internal_post("/_matrix/identity/internal/directory/sync", &json!({}))
        .await;
    let third = wait_status(&node, "third sync", |s| {
        s["last_sync_ts"] != after["last_sync_ts"]
    })
    .await;
    assert_eq!(third["last_bound"], 1, "{third}");
    assert_eq!(
        lookup(&node, "email", "alice@example.org").await["mxid"],
        "@alice:example.org"
    );

    // A restart, its index loading slowly: the first sync waits for it and binds no one again.
    assert!(node.stop().success());
    let config = std::fs::read_to_string(node_dir.join("sydent.conf")).unwrap();
    let node = crate::account::start_trusting(
        &node_dir,
        &config,
        &ca,
        &[("SYDENT_RS_TEST_WARM_UP_DELAY_MS", "1000")],
    );
    let restarted = wait_status(&node, "sync after the restart", |s| {
        s["last_sync_ts"].is_i64()
    })
    .await;
    assert_eq!(restarted["last_bound"], 0, "{restarted}");
    assert_eq!(restarted["entries"], 3, "{restarted}");
}

#[tokio::test]
async fn a_directory_that_fails_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (mut slapd, mut node) = directory_and_node(dir.path());
    let first = wait_status(&node, "first sync", |s| s["last_sync_ts"].is_i64()).await;
    // Alice's email and phone, Bob's email.
    assert_eq!(first["entries"], 3, "{first}");

    // The directory goes down: the sync fails, is reported, and nothing is unbound.
    slapd.stop();
    node.internal_post("/_matrix/identity/internal/directory/sync", &json!({}))
        .await;
    let down = wait_status(&node, "failed sync", |s| s["last_error"].is_string()).await;
    assert_eq!(down["entries"], 3, "{down}");
    assert_eq!(
        lookup(&node, "email", "bob@example.org").await["mxid"],
        "@bob:example.org"
    );

    // A wrong password: said clearly at start, and nothing removed either.
    assert!(node.stop().success());
    slapd.restart();
    let config = std::fs::read_to_string(&node.config_path).unwrap().replace(
        &format!("bind_pw = {ADMIN_PW}"),
        "bind_pw = not-the-password",
    );
    node = TestNode::start_with_config(&node.dir.clone(), &config);
    let refused = wait_status(&node, "refused bind", |s| s["last_error"].is_string()).await;
    let error = refused["last_error"].as_str().unwrap();
    assert!(error.to_lowercase().contains("bind"), "{error}");
    assert!(!error.contains("not-the-password"), "{error}");
    assert!(node.log_text().contains("directory: sync failed"));
    assert_eq!(
        lookup(&node, "email", "alice@example.org").await["mxid"],
        "@alice:example.org"
    );
}

/// A person removed from the directory disappears on the replication peers too: the mirror's
/// bindings and their tombstones replicate like any other.
#[tokio::test]
async fn mesh_the_directory_reaches_the_peers_and_so_do_its_removals() {
    use crate::mesh::harness::Mesh;
    let _ = client();
    let dir = tempfile::tempdir().unwrap();
    let slapd = Slapd::start(dir.path());
    slapd.add(&people());
    let mut mesh = Mesh::start(&["a.test", "b.test"]).await;
    // Only A reads the directory.
    assert!(mesh.nodes[0].node.take().unwrap().stop().success());
    let path = mesh.nodes[0].config_path();
    let config = std::fs::read_to_string(&path).unwrap() + &ldap_section(&slapd, ADMIN_PW, "3600");
    std::fs::write(&path, config).unwrap();
    mesh.restart(0);
    mesh.wait_for_peers(0, 1).await;
    mesh.wait_lookup(&[1], "alice@example.org", Some("@alice:example.org"))
        .await;
    mesh.wait_lookup(&[1], "bob@example.org", Some("@bob:example.org"))
        .await;

    slapd.delete(&format!("cn=Bob,{PEOPLE}"));
    let a = mesh.nodes[0].node();
    let (status, _) = a
        .internal_post("/_matrix/identity/internal/directory/sync", &json!({}))
        .await;
    assert_eq!(status, 200);
    mesh.wait_lookup(&[0, 1], "bob@example.org", None).await;
    mesh.wait_lookup(&[1], "alice@example.org", Some("@alice:example.org"))
        .await;
}

/// Live look-through: a person added to the directory a minute ago is found by the lookup
/// itself (then by the mirror, with no search); a bulk lookup asks for all its misses in one
/// search; the directory down costs a lookup at most the timeout, never an error.
#[tokio::test]
async fn live_look_through_finds_new_people_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (mut slapd, node) = directory_and_node(dir.path());
    wait_status(&node, "first sync", |s| s["last_sync_ts"].is_i64()).await;

    slapd.add(&person("Dan", &["uid: dan", "mail: Dan@Example.org"]));
    let dan = lookup(&node, "email", "dan@example.org").await;
    assert_eq!(dan["mxid"], "@dan:example.org", "{dan}");
    assert!(dan["signatures"]["id.test"].is_object(), "{dan}");
    wait_status(&node, "the hit mirrored", |s| s["entries"] == 4).await;
    let searches = slapd.searches();
    assert_eq!(
        lookup(&node, "email", "DAN@example.org").await["mxid"],
        "@dan:example.org"
    );
    assert_eq!(slapd.searches(), searches, "served from the mirror");

    slapd.add(
        &[
            person("Eve", &["uid: eve", "mail: eve@example.org"]),
            person("Frank", &["uid: frank", "telephoneNumber: +44 7700 900555"]),
        ]
        .concat(),
    );
    let searches = slapd.searches();
    let (status, bulk) = node
        .post(
            "/_matrix/identity/api/v1/bulk_lookup",
            &json!({"threepids": [["email", "eve@example.org"], ["msisdn", "447700900555"],
                                  ["email", "nobody@example.org"], ["email", "alice@example.org"]]}),
        )
        .await;
    assert_eq!(status, 200, "{bulk}");
    assert_eq!(
        bulk,
        json!({"threepids": [["email", "alice@example.org", "@alice:example.org"],
                             ["email", "eve@example.org", "@eve:example.org"],
                             ["msisdn", "447700900555", "@frank:example.org"]]})
    );
    assert_eq!(slapd.searches(), searches + 1, "one search for the misses");

    // An invite of an address the directory knows (not mirrored yet) is refused as Sydent
    // refuses an invite of a bound address.
    slapd.add(&person("Grace", &["uid: grace", "mail: grace@example.org"]));
    let (status, refused) = node
        .post(
            "/_matrix/identity/api/v1/store-invite",
            &json!({"medium": "email", "address": "Grace@example.org", "room_id": "!r:hs", "sender": "@x:hs"}),
        )
        .await;
    assert_eq!(
        (
            status,
            refused["errcode"].as_str(),
            refused["mxid"].as_str()
        ),
        (400, Some("M_THREEPID_IN_USE"), Some("@grace:example.org")),
        "{refused}"
    );

    // The directory down: lookups answer what the node holds, within the timeout (2 s).
    slapd.stop();
    let started = Instant::now();
    assert_eq!(
        lookup(&node, "email", "nobody@example.org").await,
        json!({})
    );
    let (status, bulk) = node
        .post(
            "/_matrix/identity/api/v1/bulk_lookup",
            &json!({"threepids": [["email", "nobody@example.org"], ["email", "eve@example.org"]]}),
        )
        .await;
    assert_eq!(status, 200, "{bulk}");
    assert_eq!(
        bulk,
        json!({"threepids": [["email", "eve@example.org", "@eve:example.org"]]})
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}
