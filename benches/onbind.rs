//! Onbind delivery benchmarks (issue 16 targets), a release node and the tests' homeserver
//! stand-in (HTTPS, a test CA, answering at once) on loopback:
//! - `steady`: INVITES addresses each with a pending invite are bound through the internal
//!   API (64 in flight) while the homeserver answers: deliveries per second, from the first
//!   bind to the last invite received;
//! - `backlog`: the homeserver is down (503) while another INVITES addresses are bound, so
//!   their deliveries wait in the queue; then it comes back: how long until every invite has
//!   arrived, and whether any arrived twice.
//!
//!   cargo bench --bench onbind              (INVITES=10000 by default)
//!
//! The invites are written into the node's database before it starts, as a Sydent (or
//! store-invite) leaves them: the bench measures delivery, not invite mails.

#[path = "../tests/it/harness/mod.rs"]
mod harness;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::Connection;
use futures_util::future::join_all;
use harness::matrix_hs::MatrixHomeserver;
use harness::{base_config, TestCa, TestNode, BINARY};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn seed_invites(db: &std::path::Path, prefix: &str, n: usize) {
    let mut conn = diesel::SqliteConnection::establish(db.to_str().unwrap()).unwrap();
    let mut sql = String::from("BEGIN;");
    for i in 0..n {
        sql.push_str(&format!(
            "INSERT INTO invite_tokens (medium, address, room_id, sender, token, received_ts) \
             VALUES ('email', '{prefix}-{i}@example.org', '!room:other.hs', '@dan:other.hs', \
             'tok{prefix}{i}', 0);"
        ));
    }
    sql.push_str("COMMIT;");
    conn.batch_execute(&sql).unwrap();
}

/// Binds `prefix-0..n` to Matrix IDs of `hs`, 64 in flight.
async fn bind_all(node: &TestNode, hs: &MatrixHomeserver, prefix: &str, n: usize) {
    let all: Vec<usize> = (0..n).collect();
    for chunk in all.chunks(64) {
        join_all(chunk.iter().map(|i| {
            let address = format!("{prefix}-{i}@example.org");
            let mxid = hs.mxid(&format!("{prefix}{i}"));
            async move { node.internal_3pid("bind", &address, &mxid).await }
        }))
        .await;
    }
}

/// Tokens of `prefix` received in onbind bodies, with how many times each was.
fn received(hs: &MatrixHomeserver, prefix: &str, after: usize) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for body in hs.onbinds().into_iter().skip(after) {
        for invite in body["invites"].as_array().into_iter().flatten() {
            let token = invite["token"].as_str().unwrap_or_default();
            if token.starts_with(&format!("tok{prefix}")) {
                *seen.entry(token.to_string()).or_default() += 1;
            }
        }
    }
    seen
}

async fn wait_for(hs: &MatrixHomeserver, prefix: &str, after: usize, n: usize) -> Duration {
    let start = Instant::now();
    while received(hs, prefix, after).len() < n {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "only {} of {n} {prefix} invites arrived",
            received(hs, prefix, after).len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    start.elapsed()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = env_or("INVITES", 10_000);
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("bench homeserver CA");
    let hs = MatrixHomeserver::start(&ca);
    let config = base_config(dir.path(), "bench.test").replacen(
        "[general]\n",
        "[general]\nip.whitelist = 127.0.0.0/8\n",
        1,
    );
    let config_path = dir.path().join("sydent.conf");
    std::fs::write(&config_path, &config).unwrap();
    let ca_file = dir.path().join("hs-ca.pem");
    std::fs::write(&ca_file, &ca.cert_pem).unwrap();
    let start_node = || {
        TestNode::start_cmd(
            dir.path(),
            &config_path,
            std::process::Command::new(BINARY)
                .arg("--config")
                .arg(&config_path)
                .env("SSL_CERT_FILE", &ca_file)
                .env_remove("SSL_CERT_DIR"),
        )
        .unwrap()
    };
    let mut node = start_node();
    assert!(node.stop().success());
    seed_invites(&dir.path().join("sydent.db"), "steady", n);
    seed_invites(&dir.path().join("sydent.db"), "backlog", n);
    let node = start_node();

    let _ = harness::client();
    let start = Instant::now();
    bind_all(&node, &hs, "steady", n).await;
    let bound = start.elapsed();
    wait_for(&hs, "steady", 0, n).await;
    let took = start.elapsed();
    let twice = received(&hs, "steady", 0)
        .values()
        .filter(|c| **c > 1)
        .count();
    println!(
        "steady: {n} invites delivered in {:.2} s from the first bind: {:.0} deliveries/s \
         (binds took {:.2} s); delivered more than once: {twice}",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64(),
        bound.as_secs_f64()
    );

    hs.set_down(true);
    bind_all(&node, &hs, "backlog", n).await;
    // Let the queue fail and back off fully (the worst case for how soon it notices).
    tokio::time::sleep(Duration::from_secs(8)).await;
    let before = hs.onbinds().len();
    hs.set_down(false);
    let first = wait_for(&hs, "backlog", before, 1).await;
    let took = wait_for(&hs, "backlog", before, n).await + first;
    let seen = received(&hs, "backlog", before);
    let twice = seen.values().filter(|c| **c > 1).count();
    println!(
        "backlog: {n} queued deliveries drained {:.2} s after the homeserver came back (the \
         first after {:.2} s: the backoff, at most 5 s; then {:.0}/s); delivered more than \
         once: {twice}",
        took.as_secs_f64(),
        first.as_secs_f64(),
        (n - 1) as f64 / (took - first).as_secs_f64()
    );
    drop(node);
}
