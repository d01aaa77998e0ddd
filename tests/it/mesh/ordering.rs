//! A peer's pushes arriving late, twice, from a database that started again, from a clock
//! that runs ahead, or from a stranger with a huge body: one node and a test "peer" that
//! signs associations itself and pushes them over mutual TLS, as a real peer would.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sydent_rs::association::ThreepidAssociation;
use sydent_rs::crypto::NodeSigningKey;
use sydent_rs::mesh::peers::peer_file_text;

use super::harness::{mesh_config, port_of, TestCa};
use super::{origin_rows, peer_client, signed};
use crate::harness::{run_to_exit, TestNode};

const PEER: &str = "peer.test";

/// A node that knows `peer.test` (its key in peers.d), and a client holding peer.test's
/// certificate from the mesh CA.
struct Rig {
    _root: tempfile::TempDir,
    ca: TestCa,
    dir: PathBuf,
    node: TestNode,
    key: NodeSigningKey,
    client: reqwest::Client,
}

impl Rig {
    fn start() -> Self {
        crate::harness::client(); // installs the rustls provider
        let root = tempfile::tempdir().unwrap();
        let ca = TestCa::new("mesh CA");
        let peers_dir = root.path().join("peers.d");
        std::fs::create_dir(&peers_dir).unwrap();
        let dir = root.path().join("node");
        std::fs::create_dir(&dir).unwrap();
        let (certfile, cacert) = ca.write_node_files(&dir, "node.test");
        let key = NodeSigningKey::generate();
        std::fs::write(
            peers_dir.join("peer.conf"),
            peer_file_text(PEER, "https://localhost:9", &key.verify_key()),
        )
        .unwrap();
        let config = mesh_config(&dir, "node.test", &peers_dir, &certfile, &cacert);
        let node = TestNode::start_with_config(&dir, &config);
        let client = peer_client(&ca, &root.path().join("node"), PEER);
        Self {
            _root: root,
            ca,
            dir,
            node,
            key,
            client,
        }
    }

    fn url(&self) -> String {
        format!(
            "https://localhost:{}/_matrix/identity/replicate/v1/push",
            port_of(self.node.replication_addr.as_deref().unwrap())
        )
    }

    /// A binding (or, with no mxid, a tombstone) of `address`, signed by the peer.
    fn assoc(&self, address: &str, mxid: Option<&str>, ts: i64) -> Value {
        signed(address, mxid, ts, PEER, &self.key)
    }

    /// A binding valid from now whose `ts` is `ahead_ms` ahead of our clock, as a peer with a
    /// clock ahead (or a hostile one) signs it.
    fn assoc_ahead(&self, address: &str, mxid: &str, ahead_ms: i64) -> Value {
        let now = sydent_rs::now_ms();
        let assoc = ThreepidAssociation {
            ts: now + ahead_ms,
            ..ThreepidAssociation::binding("email", address, mxid, now)
        };
        Value::Object(assoc.signed(PEER, &self.key).unwrap())
    }

    /// Pushes `{"sgAssocs": assocs}` as the peer; (status, body).
    async fn push(&self, assocs: Value) -> (u16, Value) {
        let resp = self
            .client
            .post(self.url())
            .json(&json!({ "sgAssocs": assocs }))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap())
    }

    /// The mxid a v1 lookup answers for `address`.
    async fn lookup(&self, address: &str) -> Option<String> {
        self.node.lookup_mxid(address).await
    }

    async fn status(&self) -> Value {
        crate::harness::get_json(&format!(
            "{}/_matrix/identity/internal/replication",
            self.node.internal()
        ))
        .await
    }

    fn db(&self) -> PathBuf {
        self.dir.join("sydent.db")
    }

    fn stop(&mut self) {
        assert!(self.node.stop().success());
    }

    fn start_again(&mut self) {
        self.node = TestNode::start(&self.dir, &self.dir.join("sydent.conf"))
            .unwrap_or_else(|e| panic!("restart: {e}"));
    }
}

#[tokio::test]
async fn an_unbind_stays_an_unbind_when_an_old_push_comes_late() {
    let mut rig = Rig::start();
    let now = sydent_rs::now_ms();
    let old_push = json!({"1": rig.assoc("late@example.com", Some("@late:peer.test"), now)});
    assert_eq!(rig.push(old_push.clone()).await.0, 200);
    assert_eq!(
        rig.lookup("late@example.com").await.as_deref(),
        Some("@late:peer.test")
    );
    // The peer unbinds: its tombstone (id 2) arrives and removes the binding.
    let (status, body) = rig
        .push(json!({"2": rig.assoc("late@example.com", None, now + 1)}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(rig.lookup("late@example.com").await, None);

    // The first push again, as when a push that timed out on the sender was still being
    // applied and is re-sent: accepted (the sender must move on), and nothing comes back.
    let (status, body) = rig.push(old_push.clone()).await;
    assert_eq!((status, body), (200, json!({"success": true})));
    assert_eq!(rig.lookup("late@example.com").await, None);
    assert_eq!(origin_rows(&rig.db(), PEER), (0, 0));

    // The same after a restart: the mark is in the database, not in memory.
    rig.stop();
    rig.start_again();
    assert_eq!(rig.push(old_push).await.0, 200);
    assert_eq!(rig.lookup("late@example.com").await, None);
    assert_eq!(origin_rows(&rig.db(), PEER), (0, 0));

    // A re-send mixed with new rows: the old ones are skipped, the new ones applied.
    let (status, body) = rig
        .push(json!({
            "1": rig.assoc("late@example.com", Some("@late:peer.test"), now),
            "3": rig.assoc("next@example.com", Some("@next:peer.test"), now + 2),
        }))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(rig.lookup("late@example.com").await, None);
    assert_eq!(
        rig.lookup("next@example.com").await.as_deref(),
        Some("@next:peer.test")
    );
}

#[tokio::test]
async fn a_peer_whose_ids_start_again_is_refused_loudly_until_forgotten() {
    let mut rig = Rig::start();
    let now = sydent_rs::now_ms();
    let first = json!({
        "1": rig.assoc("a@example.com", Some("@a:peer.test"), now),
        "2": rig.assoc("b@example.com", Some("@b:peer.test"), now),
    });
    assert_eq!(rig.push(first).await.0, 200);

    // The peer lost its database: its new id 1 is a different, newer binding.
    let again = json!({"1": rig.assoc("c@example.com", Some("@c:peer.test"), now + 1)});
    let (status, body) = rig.push(again.clone()).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["errcode"], "M_ORIGIN_IDS_RESTARTED", "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("forget-origin peer.test"),
        "{body}"
    );
    assert_eq!(rig.lookup("c@example.com").await, None);
    rig.node
        .wait_for_log("ids started again", Duration::from_secs(30))
        .await;
    let status = rig.status().await;
    let refused = &status["peers"][PEER]["last_refused"];
    assert_eq!(refused["errcode"], "M_ORIGIN_IDS_RESTARTED", "{status}");
    assert!(refused["ts"].is_i64(), "{status}");

    // forget-origin refuses to run beside the node, then forgets the peer's rows and mark.
    let config = rig.dir.join("sydent.conf");
    let args = ["--config", config.to_str().unwrap(), "forget-origin", PEER];
    let (code, _, err) = run_to_exit(&rig.dir, &args);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("stop it first"), "{err}");
    rig.stop();
    let (code, out, err) = run_to_exit(&rig.dir, &args);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("removed 2"), "{out}");
    rig.start_again();
    assert_eq!(rig.lookup("a@example.com").await, None);

    // The peer's re-sent history is applied from its first id, and the refusal is cleared.
    let (status, body) = rig.push(again).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        rig.lookup("c@example.com").await.as_deref(),
        Some("@c:peer.test")
    );
    let status = rig.status().await;
    assert!(status["peers"][PEER]["last_refused"].is_null(), "{status}");
}

#[tokio::test]
async fn a_clock_ahead_cannot_pin_a_threepid() {
    let rig = Rig::start();
    let now = sydent_rs::now_ms();
    // 11 minutes ahead (the default skew is 10): refused, its id named.
    let (status, body) = rig
        .push(json!({
            "1": rig.assoc("clock@example.com", Some("@ok:peer.test"), now),
            "2": rig.assoc_ahead("future@example.com", "@f:peer.test", 11 * 60_000),
        }))
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["errcode"], "M_INVALID_PARAM", "{body}");
    assert_eq!(body["failed_ids"], json!(["2"]), "{body}");
    assert_eq!(
        rig.lookup("clock@example.com").await,
        None,
        "all or nothing"
    );

    // 5 minutes ahead: within the skew, stored, and it wins over nothing.
    let (status, body) = rig
        .push(json!({"1": rig.assoc_ahead("clock@example.com", "@ahead:peer.test", 5 * 60_000)}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        rig.lookup("clock@example.com").await.as_deref(),
        Some("@ahead:peer.test")
    );
    // A bind made here afterwards wins although the peer's ts is ahead of our clock.
    let answer = rig
        .node
        .internal_3pid("bind", "clock@example.com", "@here:node.test")
        .await;
    assert!(
        answer["ts"].as_i64().unwrap() > now + 5 * 60_000,
        "{answer}"
    );
    assert!(
        answer["not_before"].as_i64().unwrap() <= sydent_rs::now_ms(),
        "valid at once: {answer}"
    );
    assert_eq!(
        rig.lookup("clock@example.com").await.as_deref(),
        Some("@here:node.test")
    );
}

#[tokio::test]
async fn signed_but_invalid_values_are_refused() {
    let rig = Rig::start();
    let now = sydent_rs::now_ms();
    for (address, mxid) in [
        ("not an email", "@x:peer.test"),
        ("ok@example.com", "no-at-sign"),
    ] {
        let (status, body) = rig
            .push(json!({"7": rig.assoc(address, Some(mxid), now)}))
            .await;
        assert_eq!(status, 400, "{address} {mxid}: {body}");
        assert_eq!(body["errcode"], "M_INVALID_PARAM", "{body}");
        assert_eq!(body["failed_ids"], json!(["7"]), "{body}");
    }
    assert_eq!(origin_rows(&rig.db(), PEER), (0, 0));
    // Addresses are normalised as the client API does.
    let (status, body) = rig
        .push(json!({"8": rig.assoc("Mixed@Example.COM", Some("@m:peer.test"), now)}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        rig.lookup("mixed@example.com").await.as_deref(),
        Some("@m:peer.test")
    );
}

/// The peak RSS of a process (VmHWM), in KiB: a body buffered and freed again still shows.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

#[tokio::test]
async fn a_stranger_is_refused_before_its_body_is_read() {
    let rig = Rig::start();
    let stranger = peer_client(&rig.ca, &rig.dir, "stranger.test");
    let before = peak_rss_kib(rig.node.pid());
    let body = vec![b' '; 30 * 1024 * 1024];
    let started = Instant::now();
    let resp = stranger
        .post(rig.url())
        .header("Content-Type", "application/json")
        .body(body)
        .send()
        .await
        .expect("the node answers before the body is sent");
    assert_eq!(resp.status(), 403);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["errcode"],
        "M_UNKNOWN_PEER"
    );
    let elapsed = started.elapsed();
    let grown = peak_rss_kib(rig.node.pid()).saturating_sub(before);
    assert!(
        grown < 8 * 1024,
        "peak RSS grew by {grown} KiB for a refused 30 MiB body (in {elapsed:?})"
    );

    // A peer's push over the cap is refused as JSON without reading it either.
    let huge = format!(
        r#"{{"sgAssocs": {{"1": "{}"}}}}"#,
        "x".repeat(3 * 1024 * 1024)
    );
    let resp = rig
        .client
        .post(rig.url())
        .header("Content-Type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["errcode"],
        "M_TOO_LARGE"
    );
}
