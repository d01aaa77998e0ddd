//! The mesh: real nodes replicating over mutual TLS with certificates from a CA made in the
//! test, peers introduced through a shared peers.d.

pub mod harness;
mod local;
mod ordering;
mod rebuild;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use serde_json::{json, Map, Value};
use sydent_rs::association::ThreepidAssociation;
use sydent_rs::crypto::NodeSigningKey;
use sydent_rs::mesh::peers::peer_file_text;
use sydent_rs::mesh::tls::MeshTls;

use crate::harness::{signal, TestNode};
use crate::internal_bind::sqlite_rows;
use harness::{mesh_config, port_of, Mesh, PortHold, TestCa};

const A: usize = 0;
const B: usize = 1;
const C: usize = 2;

/// Rows of `origin` in a node's global table: (count, distinct origin ids).
fn origin_rows(db: &std::path::Path, origin: &str) -> (usize, usize) {
    let row = sqlite_rows(
        db,
        &format!(
            "SELECT COUNT(*) || ' ' || COUNT(DISTINCT originId) AS v FROM global_threepid_associations WHERE originServer = '{origin}'"
        ),
    );
    let mut parts = row[0].split(' ').map(|n| n.parse().unwrap());
    (parts.next().unwrap(), parts.next().unwrap())
}

async fn wait_origin_rows(mesh: &Mesh, i: usize, origin: &str, expected: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (count, distinct) = origin_rows(&mesh.nodes[i].db(), origin);
        assert_eq!(count, distinct, "duplicate rows of {origin} on node {i}");
        if count == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node {} has {count} of {expected} rows from {origin}; status: {}",
            mesh.nodes[i].name,
            mesh.status(i).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `count` binds on node `i`, 50 at a time: `<prefix><n>@example.com` → `@<prefix><n>:a.test`.
async fn bind_many(mesh: &Mesh, i: usize, prefix: &str, count: usize) {
    for chunk in (0..count).collect::<Vec<_>>().chunks(50) {
        join_all(chunk.iter().map(|n| {
            let address = format!("{prefix}{n}@example.com");
            let mxid = format!("@{prefix}{n}:a.test");
            async move { mesh.bind(i, &address, &mxid).await }
        }))
        .await;
    }
}

#[tokio::test]
async fn binds_unbinds_and_rebinds_reach_every_node() {
    let mesh = Mesh::start(&["a.test", "b.test", "c.test"]).await;

    // A bind on A, then on the others within moments (event-driven, no timer).
    let signed = mesh.bind(A, "x@example.com", "@x:a.test").await;
    mesh.wait_lookup(&[B, C], "x@example.com", Some("@x:a.test"))
        .await;
    // As the nodes measured it, from A's signature to B's commit (the test's polling does not
    // count). Generous, so a loaded 2-core machine passes: Sydent's pushes wait for a 10 s tick.
    let on_b = mesh.status(B).await;
    let latency = on_b["peers"]["a.test"]["last_received_ts"]
        .as_i64()
        .unwrap()
        - signed["ts"].as_i64().unwrap();
    assert!(latency < 20_000, "A's bind reached B after {latency} ms");
    // B serves A's association with A's signature intact.
    let (_, on_b) = mesh.nodes[B]
        .node()
        .get("/_matrix/identity/api/v1/lookup?medium=email&address=x%40example.com")
        .await;
    assert_eq!(on_b["signatures"]["a.test"], signed["signatures"]["a.test"]);
    assert!(
        on_b["signatures"]["b.test"].is_object(),
        "B countersigns: {on_b}"
    );

    // A later rebind of the same 3PID on B wins everywhere (later: a newer `ts`, in ms).
    while sydent_rs::now_ms() <= signed["ts"].as_i64().unwrap() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    mesh.bind(B, "x@example.com", "@x:b.test").await;
    mesh.wait_lookup(&[A, B, C], "x@example.com", Some("@x:b.test"))
        .await;

    // B's unbind writes a tombstone newer than every binding of the 3PID: A's older one goes
    // too, everywhere (the last write wins), rather than showing again. Then there is nothing
    // left for A to unbind.
    mesh.unbind(B, "x@example.com", "@x:b.test").await;
    mesh.wait_lookup(&[A, B, C], "x@example.com", None).await;
    for i in [A, B, C] {
        assert_eq!(origin_rows(&mesh.nodes[i].db(), "a.test"), (0, 0));
        assert_eq!(origin_rows(&mesh.nodes[i].db(), "b.test"), (0, 0));
    }
    mesh.unbind(A, "x@example.com", "@x:a.test").await;
    mesh.wait_lookup(&[A, B, C], "x@example.com", None).await;

    // A rebind on the origin replaces its older row on the peers too.
    mesh.bind(C, "y@example.com", "@old:c.test").await;
    mesh.bind(C, "y@example.com", "@new:c.test").await;
    mesh.wait_lookup(&[A, B], "y@example.com", Some("@new:c.test"))
        .await;
    for i in [A, B] {
        assert_eq!(
            sqlite_rows(&mesh.nodes[i].db(), "SELECT mxid AS v FROM global_threepid_associations WHERE address = 'y@example.com'"),
            ["@new:c.test"]
        );
    }

    // B counted what each peer pushed: A's bind (A's unbind found nothing to remove), C's two
    // binds. (B counts a push once it has committed it, just after its lookups see it.)
    wait_for_queue(&mesh, B, "c.test", |q| q["received"] == 2).await;
    let on_b = mesh.status(B).await;
    assert_eq!(on_b["peers"]["a.test"]["received"], 1, "{on_b}");
    assert!(
        on_b["peers"]["a.test"]["last_received_ts"].is_i64(),
        "{on_b}"
    );

    // The status page shows each peer caught up (once A has read the peers' answers).
    for peer in ["b.test", "c.test"] {
        wait_for_queue(&mesh, A, peer, |q| q["backlog"] == 0).await;
    }
    let status = mesh.status(A).await;
    let peers = status["peers"].as_object().unwrap();
    assert_eq!(peers.keys().collect::<Vec<_>>(), ["b.test", "c.test"]);
    for peer in peers.values() {
        assert_eq!(peer["backlog"], 0, "{status}");
        assert_eq!(peer["cursor"], status["local_id"], "{status}");
        assert!(peer["last_success_ts"].is_i64(), "{status}");
        assert!(peer["url"]
            .as_str()
            .unwrap()
            .ends_with("/_matrix/identity/replicate/v1/push"));
    }
}

#[tokio::test]
async fn a_peer_that_was_down_catches_up_without_loss_or_duplicates() {
    let mut mesh = Mesh::start(&["a.test", "b.test", "c.test"]).await;
    let status = mesh.nodes[B].node.as_mut().unwrap().stop();
    assert!(status.success());

    // 2,500 binds on A while B is down: more than A's outbox holds in memory, so B's queue
    // catches up from the database first.
    bind_many(&mesh, A, "u", 2500).await;
    // C has them all already; A reports the failure and B's backlog.
    wait_origin_rows(&mesh, C, "a.test", 2500).await;
    let status = wait_for_queue(&mesh, A, "b.test", |q| q["last_error"].is_string()).await;
    let b = &status["peers"]["b.test"];
    assert!(
        b["backlog"].as_i64().unwrap() > 0 || b["state"] == "retrying",
        "{status}"
    );

    // B comes back (on a new port: its peer file changes, the others rescan).
    mesh.restart(B);
    wait_origin_rows(&mesh, B, "a.test", 2500).await;
    mesh.wait_lookup(&[B], "u2499@example.com", Some("@u2499:a.test"))
        .await;
    mesh.wait_lookup(&[B], "u0@example.com", Some("@u0:a.test"))
        .await;
}

#[tokio::test]
async fn a_lone_bind_goes_at_once_and_binds_made_during_a_push_go_together() {
    let mut mesh = Mesh::start(&["a.test", "b.test"]).await;
    let queue = |status: &Value| {
        let q = &status["peers"]["b.test"];
        (q["pushed"].as_u64().unwrap(), q["pushes"].as_u64().unwrap())
    };

    // On an idle mesh a bind is pushed at once, alone.
    mesh.bind(A, "lone@example.com", "@lone:a.test").await;
    mesh.wait_lookup(&[B], "lone@example.com", Some("@lone:a.test"))
        .await;
    let status = wait_for_queue(&mesh, A, "b.test", |q| q["pushed"] == 1).await;
    assert_eq!(queue(&status), (1, 1), "{status}");

    // B freezes: A's push of the next bind is sent and waits for B's answer. The 9 binds made
    // meanwhile wait for it too, and then go together, in order, in one push.
    signal(mesh.nodes[B].node().pid(), "STOP");
    mesh.bind(A, "first@example.com", "@first:a.test").await;
    wait_for_queue(&mesh, A, "b.test", |q| q["state"] == "pushing").await;
    bind_many(&mesh, A, "during", 9).await;
    signal(mesh.nodes[B].node().pid(), "CONT");
    wait_origin_rows(&mesh, B, "a.test", 11).await;
    let status = wait_for_queue(&mesh, A, "b.test", |q| q["pushed"] == 11).await;
    assert_eq!(queue(&status), (11, 3), "{status}");
    assert_eq!(status["peers"]["b.test"]["cursor"], status["local_id"]);

    // The acknowledged cursor reaches A's database soon after (saved for every peer at once,
    // off the push path), and for certain when A stops.
    let local_id = status["local_id"].as_i64().unwrap();
    let saved = |mesh: &Mesh| {
        sqlite_rows(
            &mesh.nodes[A].db(),
            "SELECT CAST(lastSentVersion AS TEXT) AS v FROM peers WHERE name = 'b.test'",
        )
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while saved(&mesh) != [local_id.to_string()] {
        assert!(
            Instant::now() < deadline,
            "cursor saved: {:?}",
            saved(&mesh)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    mesh.bind(A, "last@example.com", "@last:a.test").await;
    wait_origin_rows(&mesh, B, "a.test", 12).await;
    wait_for_queue(&mesh, A, "b.test", |q| q["pushed"] == 12).await;
    assert!(mesh.nodes[A].node.as_mut().unwrap().stop().success());
    assert_eq!(saved(&mesh), [(local_id + 1).to_string()]);
}

#[tokio::test]
async fn a_node_killed_mid_push_converges_after_restart() {
    let mut mesh = Mesh::start(&["a.test", "b.test"]).await;
    // B has A's first 1,000 rows; then B freezes (SIGSTOP) and A binds 1,000 more: A's push of
    // them goes out and waits for an answer that cannot come yet.
    bind_many(&mesh, A, "k", 1000).await;
    wait_origin_rows(&mesh, B, "a.test", 1000).await;
    signal(mesh.nodes[B].node().pid(), "STOP");
    bind_many(&mesh, A, "m", 1000).await;
    let pushing = wait_for_queue(&mesh, A, "b.test", |q| q["state"] == "pushing").await;
    assert_ne!(
        pushing["peers"]["b.test"]["cursor"], pushing["local_id"],
        "{pushing}"
    );

    // A dies mid-push. B is still frozen, so its rows are what it had at that moment.
    mesh.nodes[A].node.as_mut().unwrap().kill();
    let (held, _) = origin_rows(&mesh.nodes[B].db(), "a.test");
    assert!(
        0 < held && held < 2000,
        "B had {held} of A's 2000 rows when A was killed: not mid-push"
    );

    // B thaws (and may still apply the push whose sender is gone); A comes back and re-sends
    // from its last acknowledged id. B ends with every row once.
    signal(mesh.nodes[B].node().pid(), "CONT");
    mesh.restart(A);
    wait_origin_rows(&mesh, B, "a.test", 2000).await;
}

/// Polls node `i`'s status until its queue to `peer` satisfies `ready` (60 s); returns that
/// status page.
async fn wait_for_queue(
    mesh: &Mesh,
    i: usize,
    peer: &str,
    ready: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = mesh.status(i).await;
        if ready(&status["peers"][peer]) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "{}'s queue to {peer} never got there: {status}",
            mesh.nodes[i].name
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A client that presents `name`'s certificate from `ca`.
fn peer_client(ca: &TestCa, dir: &std::path::Path, name: &str) -> reqwest::Client {
    let (certfile, cacert) = ca.write_node_files(dir, name);
    // The very client a node's push queues use.
    MeshTls::from_files(&certfile, None, Some(&cacert))
        .unwrap()
        .push_client()
        .unwrap()
}

fn signed(address: &str, mxid: Option<&str>, ts: i64, origin: &str, key: &NodeSigningKey) -> Value {
    let assoc = match mxid {
        Some(mxid) => ThreepidAssociation::binding("email", address, mxid, ts),
        None => ThreepidAssociation::tombstone("email", address, ts),
    };
    Value::Object(assoc.signed(origin, key).unwrap())
}

#[tokio::test]
async fn the_receiver_verifies_peers_and_signatures() {
    crate::harness::client(); // installs the rustls provider
    let root = tempfile::tempdir().unwrap();
    let ca = TestCa::new("mesh CA");
    let peers_dir = root.path().join("peers.d");
    std::fs::create_dir(&peers_dir).unwrap();
    let dir = root.path().join("node");
    std::fs::create_dir(&dir).unwrap();
    let (certfile, cacert) = ca.write_node_files(&dir, "node.test");
    // A separate key file works too (replication.https.keyfile).
    let pem = std::fs::read_to_string(&certfile).unwrap();
    let split = pem.find("-----BEGIN CERTIFICATE").unwrap();
    std::fs::write(dir.join("key.pem"), &pem[..split]).unwrap();
    std::fs::write(&certfile, &pem[split..]).unwrap();
    let config = mesh_config(&dir, "node.test", &peers_dir, &certfile, &cacert).replacen(
        "[http]\n",
        &format!(
            "[http]\nreplication.https.keyfile = {}\n",
            dir.join("key.pem").display()
        ),
        1,
    );
    // The rogue peer is known (peers.d) with this key; its URL goes nowhere.
    let rogue_key = NodeSigningKey::generate();
    std::fs::write(
        peers_dir.join("rogue.conf"),
        peer_file_text("rogue.test", "https://localhost:9", &rogue_key.verify_key()),
    )
    .unwrap();
    let node = TestNode::start_with_config(&dir, &config);
    let url = format!(
        "https://localhost:{}/_matrix/identity/replicate/v1/push",
        port_of(node.replication_addr.as_deref().unwrap())
    );
    let rogue = peer_client(&ca, &root.path().join("node"), "rogue.test");
    let lookup = |address: &str| {
        let path = format!(
            "/_matrix/identity/api/v1/lookup?medium=email&address={}",
            address.replace('@', "%40")
        );
        let node = &node;
        async move { node.get(&path).await.1 }
    };

    // One forged signature among valid ones: 400, its id named, nothing of the batch stored.
    let now = sydent_rs::now_ms();
    let forger = NodeSigningKey::generate();
    let body = json!({"sgAssocs": {
        "1": signed("p1@example.com", Some("@p1:rogue.test"), now, "rogue.test", &rogue_key),
        "2": signed("p2@example.com", Some("@p2:rogue.test"), now, "rogue.test", &forger),
        "3": signed("p3@example.com", Some("@p3:rogue.test"), now, "rogue.test", &rogue_key),
    }});
    let resp = rogue.post(&url).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 400);
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer["errcode"], "M_VERIFICATION_FAILED");
    assert_eq!(answer["failed_ids"], json!(["2"]));
    for address in ["p1@example.com", "p3@example.com"] {
        assert_eq!(
            lookup(address).await,
            json!({}),
            "{address} must not be stored"
        );
    }
    assert_eq!(origin_rows(&dir.join("sydent.db"), "rogue.test"), (0, 0));

    // The same batch, honestly signed, with `charset` in the Content-Type: stored, and a
    // re-send is idempotent.
    let mut assocs = Map::new();
    for (id, n) in [("1", 1), ("2", 2), ("3", 3)] {
        let address = format!("p{n}@example.com");
        assocs.insert(
            id.into(),
            signed(
                &address,
                Some(&format!("@p{n}:rogue.test")),
                now,
                "rogue.test",
                &rogue_key,
            ),
        );
    }
    let body = Value::Object(
        [("sgAssocs".to_string(), Value::Object(assocs))]
            .into_iter()
            .collect(),
    )
    .to_string();
    for _ in 0..2 {
        let resp = rogue
            .post(&url)
            .header("Content-Type", "application/json; charset=utf-8")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.json::<Value>().await.unwrap(),
            json!({"success": true})
        );
    }
    assert_eq!(lookup("p2@example.com").await["mxid"], "@p2:rogue.test");
    assert_eq!(origin_rows(&dir.join("sydent.db"), "rogue.test"), (3, 3));

    // A tombstone removes the origin's row (an older binding replayed after it: ordering.rs).
    let resp = rogue
        .post(&url)
        .json(&json!({"sgAssocs": {"4": signed("p1@example.com", None, now + 1, "rogue.test", &rogue_key)}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(lookup("p1@example.com").await, json!({}));

    // Not JSON, or no sgAssocs: M_BAD_JSON.
    for bad in ["not json", "{\"other\": 1}", "[]"] {
        let resp = rogue
            .post(&url)
            .header("Content-Type", "application/json")
            .body(bad)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
        assert_eq!(
            resp.json::<Value>().await.unwrap()["errcode"],
            "M_BAD_JSON",
            "{bad}"
        );
    }

    // Over the size limit, and strangers' bodies: ordering.rs.

    // A valid certificate naming a server that is not a peer: 403 M_UNKNOWN_PEER.
    let stranger = peer_client(&ca, &root.path().join("node"), "stranger.test");
    let resp = stranger
        .post(&url)
        .json(&json!({"sgAssocs": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["errcode"],
        "M_UNKNOWN_PEER"
    );

    // What the node holds of an origin, for a peer rebuilding itself: the origin's bindings
    // (the tombstoned one gone), countersigned, page by page, and how far the origin reached.
    let held_url = url.replace("/push", "/associations");
    let held = |client: reqwest::Client, query: &'static str| {
        let url = format!("{held_url}?{query}");
        async move {
            let resp = client.get(&url).send().await.unwrap();
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
        }
    };
    let (status, page) = held(rogue.clone(), "limit=1").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["origin"], "rogue.test");
    assert_eq!(page["mark"], json!({"origin_id": 4, "ts": now + 1}));
    assert_eq!(page["next_after"], 2);
    let first = &page["sgAssocs"]["2"];
    assert_eq!(first["mxid"], "@p2:rogue.test");
    let signers: Vec<&String> = first["signatures"].as_object().unwrap().keys().collect();
    assert_eq!(signers, ["node.test", "rogue.test"]);
    let (_, page) = held(rogue.clone(), "origin=rogue.test&after=2&limit=5").await;
    let ids: Vec<&str> = page["sgAssocs"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!((ids, &page["next_after"]), (vec!["3"], &Value::Null));
    let (_, page) = held(rogue.clone(), "origin=node.test&limit=0").await;
    assert_eq!(
        page,
        json!({"origin": "node.test", "mark": null, "sgAssocs": {}, "next_after": null})
    );
    for bad in [
        "limit=abc",
        "limit=10001",
        "limit=-1",
        "after=x",
        "origin=no%20name",
    ] {
        let (status, body) = held(rogue.clone(), bad).await;
        assert_eq!(
            (status, &body["errcode"]),
            (400, &json!("M_INVALID_PARAM")),
            "{bad}"
        );
    }
    let (status, body) = held(stranger.clone(), "").await;
    assert_eq!((status, &body["errcode"]), (403, &json!("M_UNKNOWN_PEER")));

    // A certificate from another CA, even naming a real peer: refused in the handshake.
    let other_dir = root.path().join("other");
    std::fs::create_dir(&other_dir).unwrap();
    let other_ca = TestCa::new("another CA");
    let (other_cert, _) = other_ca.write_node_files(&other_dir, "rogue.test");
    // Trust our mesh CA for the server, present the other CA's certificate.
    let tls = MeshTls::from_files(&other_cert, None, Some(&cacert)).unwrap();
    let impostor = tls.push_client().unwrap();
    let result = impostor
        .post(&url)
        .json(&json!({"sgAssocs": {}}))
        .send()
        .await;
    assert!(result.is_err(), "the handshake must fail: {result:?}");
    // And no certificate at all.
    let anonymous = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca.cert_pem.as_bytes()).unwrap()])
        .build()
        .unwrap();
    assert!(anonymous.post(&url).json(&json!({})).send().await.is_err());
}

#[tokio::test]
async fn peer_files_added_and_removed_at_run_time() {
    let mesh = Mesh::start(&["a.test", "b.test", "c.test"]).await;
    // C's file goes: A and B stop pushing to C (and refuse C's pushes).
    std::fs::remove_file(mesh.peer_file_path(C)).unwrap();
    mesh.hup_all();
    mesh.wait_for_peers(A, 1).await;
    mesh.wait_for_peers(B, 1).await;
    let received_from_a = |status: Value| status["peers"]["a.test"]["received"].clone();
    let before = received_from_a(mesh.status(C).await);
    mesh.bind(A, "late@example.com", "@late:a.test").await;
    mesh.bind(A, "later@example.com", "@later:a.test").await;
    // B has the later bind: A's push round after "late" is over, and none of it went to C.
    mesh.wait_lookup(&[B], "later@example.com", Some("@later:a.test"))
        .await;
    assert_eq!(mesh.lookup(C, "late@example.com").await, None);
    assert_eq!(received_from_a(mesh.status(C).await), before);
    mesh.bind(C, "fromc@example.com", "@c:c.test").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = mesh.status(C).await;
        if status["peers"]["a.test"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("M_UNKNOWN_PEER"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "C should see its pushes refused: {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(mesh.lookup(A, "fromc@example.com").await, None);

    // A malformed file is reported by name and skipped; nothing else changes.
    std::fs::write(
        mesh.peers_dir.join("broken.conf"),
        "[peer]\nserver_name = x.test\n",
    )
    .unwrap();
    mesh.hup_all();
    mesh.nodes[A]
        .node()
        .wait_for_log(
            "broken.conf: [peer] base_replication_url is missing",
            Duration::from_secs(30),
        )
        .await;
    mesh.bind(A, "after-broken@example.com", "@ab:a.test").await;
    mesh.wait_lookup(&[B], "after-broken@example.com", Some("@ab:a.test"))
        .await;

    // The file is back (found by the periodic rescan, no signal): C catches up both ways.
    mesh.write_peer_file(C);
    mesh.wait_lookup(&[C], "late@example.com", Some("@late:a.test"))
        .await;
    mesh.wait_lookup(&[A, B], "fromc@example.com", Some("@c:c.test"))
        .await;
}

/// A "peer" named `name` that completes the TLS handshake (its certificate from `ca`) and then
/// never answers: a push to it hangs until the push client's 30 s request timeout. Returns its
/// port.
fn tls_tarpit(ca: &TestCa, dir: &Path, name: &str) -> u16 {
    let (certfile, cacert) = ca.write_node_files(dir, name);
    let config = Arc::new(
        MeshTls::from_files(&certfile, None, Some(&cacert))
            .unwrap()
            .server_config()
            .unwrap(),
    );
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let (Ok(mut tcp), config) = (conn, Arc::clone(&config)) else {
                continue;
            };
            std::thread::spawn(move || {
                let mut tls = rustls::ServerConnection::new(config).unwrap();
                while tls.is_handshaking() {
                    if tls.complete_io(&mut tcp).is_err() {
                        return;
                    }
                }
                // Say nothing; swallow the request until the client gives up.
                let _ = std::io::copy(&mut tcp, &mut std::io::sink());
            });
        }
    });
    port
}

#[tokio::test]
async fn a_hung_peer_delays_no_one() {
    let mesh = Mesh::start(&["a.test", "b.test"]).await;
    // A row to push, so that a new queue starts with a push (not a hello).
    mesh.bind(A, "h-before@example.com", "@h:a.test").await;
    let dir = mesh.root.path().join("tarpit");
    std::fs::create_dir(&dir).unwrap();
    let tarpit_port = tls_tarpit(&mesh.ca, &dir, "tarpit.test");
    let key = NodeSigningKey::generate();
    std::fs::write(
        mesh.peers_dir.join("tarpit.conf"),
        peer_file_text(
            "tarpit.test",
            &format!("https://localhost:{tarpit_port}"),
            &key.verify_key(),
        ),
    )
    .unwrap();
    mesh.hup_all();
    wait_for_queue(&mesh, A, "tarpit.test", |q| q["state"] == "pushing").await;

    // While A's push to the tarpit hangs, A answers its clients and its queue to B delivers.
    for n in 0..20 {
        mesh.bind(A, &format!("h{n}@example.com"), "@h:a.test")
            .await;
    }
    mesh.wait_lookup(&[B], "h19@example.com", Some("@h:a.test"))
        .await;
    // A's status shows B caught up once A has read B's answer, moments after B has the rows.
    let status = wait_for_queue(&mesh, A, "b.test", |q| q["backlog"] == 0).await;
    assert_eq!(
        status["peers"]["b.test"]["cursor"], status["local_id"],
        "{status}"
    );
    let tarpit = &status["peers"]["tarpit.test"];
    // Still the first push, not yet given up on: B did not wait for it.
    assert_eq!(tarpit["state"], "pushing", "{status}");
    assert!(tarpit["last_error"].is_null(), "{status}");
    assert_ne!(tarpit["cursor"], status["local_id"], "{status}");
}

#[test]
fn bad_replication_settings_stop_startup_naming_the_key() {
    let root = tempfile::tempdir().unwrap();
    let ca = TestCa::new("mesh CA");
    let (certfile, cacert) = ca.write_node_files(root.path(), "n.test");
    let peers = root.path().join("peers.d");
    let config = mesh_config(root.path(), "n.test", &peers, &certfile, &cacert);
    std::fs::write(root.path().join("not-a-ca.pem"), "no certificate in here\n").unwrap();
    let cases = [
        (
            config.replace(
                &format!("db.file = {}/sydent.db", root.path().display()),
                "db.file = :memory:",
            ),
            "[db] db.file",
        ),
        (
            config.replace(&certfile.display().to_string(), "/nonexistent/cert.pem"),
            "[http] replication.https.certfile: cannot read /nonexistent/cert.pem",
        ),
        (
            config.replace(
                &cacert.display().to_string(),
                &root.path().join("not-a-ca.pem").display().to_string(),
            ),
            "[http] replication.https.cacert",
        ),
    ];
    for (text, expected) in cases {
        let path = root.path().join("bad.conf");
        std::fs::write(&path, &text).unwrap();
        let (code, _, err) =
            crate::harness::run_to_exit(root.path(), &["--config", path.to_str().unwrap()]);
        assert_eq!(code, Some(1), "{expected}: {err}");
        assert!(err.contains(expected), "expected {expected:?} in: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[tokio::test]
async fn a_peer_back_on_the_same_address_is_served_at_once() {
    let mut mesh = Mesh::start(&["a.test", "b.test"]).await;
    let b_port = port_of(mesh.nodes[B].node().replication_addr.as_deref().unwrap());
    // The test can only tell when B is up well before A's next attempt; on a machine too busy
    // for that, B goes down again and the test tries again.
    for attempt in 1..=3 {
        assert!(mesh.nodes[B].node.as_mut().unwrap().stop().success());
        let hold = PortHold::new(b_port);
        let address = format!("while-down{attempt}@example.com");
        mesh.bind(A, &address, "@w:a.test").await;
        // A's queue to B backs off (0.25, 0.5, 1, 2, 4, 8, then 10 s, each ± 25 %) until its
        // next attempt is at least 6 s away.
        let status = wait_for_queue(&mesh, A, "b.test", |q| {
            q["next_attempt_ts"]
                .as_i64()
                .is_some_and(|at| at - sydent_rs::now_ms() >= 6000)
        })
        .await;
        let next_attempt = status["peers"]["b.test"]["next_attempt_ts"]
            .as_i64()
            .unwrap();
        assert_eq!(status["peers"]["b.test"]["state"], "retrying", "{status}");

        // B comes back on the same address. Its queue to A says hello; A's queue to B leaves
        // its backoff at once.
        drop(hold);
        mesh.restart_same_port(B, b_port);
        let up = sydent_rs::now_ms();
        if next_attempt - up < 3000 {
            eprintln!(
                "try {attempt}: B was up only {} ms before A's next attempt; again",
                next_attempt - up
            );
            continue;
        }
        mesh.wait_lookup(&[B], &address, Some("@w:a.test")).await;
        let served = sydent_rs::now_ms();
        assert!(
            served < next_attempt,
            "B was served {} ms after A's scheduled attempt: it waited out the backoff",
            served - next_attempt
        );
        mesh.nodes[A]
            .node()
            .wait_for_log("b.test is reachable again", Duration::from_secs(30))
            .await;
        return;
    }
    panic!("B never came up well before A's next attempt in 3 tries");
}
