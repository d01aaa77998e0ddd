//! Replication benchmark (issue 3 targets), on loopback with three release nodes:
//! - latency: how long a new binding takes to be visible on both peers (p50, p99);
//! - catch-up: how fast a backlog of 100,000 associations reaches a peer that was down.
//!
//!   cargo bench --bench mesh            (BACKLOG=20000 for a shorter run)
//!
//! It reuses the integration tests' harness: real binaries, a CA made with rcgen, peers.d.

#[path = "../tests/it/harness/mod.rs"]
mod harness;
#[allow(dead_code)] // the tests use more of the harness than the bench
#[path = "../tests/it/mesh/harness.rs"]
mod mesh_harness;

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use mesh_harness::Mesh;

const A: usize = 0;
const B: usize = 1;
const C: usize = 2;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn visible(mesh: &Mesh, i: usize, address: &str) -> bool {
    mesh.lookup(i, address).await.is_some()
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let backlog: usize = std::env::var("BACKLOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let mut mesh = Mesh::start(&["a.bench", "b.bench", "c.bench"]).await;

    // Latency: one bind at a time on A, polled on B and C until both serve it.
    let mut latencies = Vec::new();
    for n in 0..300 {
        let address = format!("lat{n}@example.com");
        let start = Instant::now();
        mesh.bind(A, &address, &format!("@lat{n}:a.bench")).await;
        let (mut on_b, mut on_c) = (false, false);
        while !(on_b && on_c) {
            on_b = on_b || visible(&mesh, B, &address).await;
            on_c = on_c || visible(&mesh, C, &address).await;
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{address} never arrived"
            );
        }
        latencies.push(start.elapsed());
    }
    latencies.sort();
    println!(
        "bind on A -> visible on B and C: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} binds; includes the bind itself and polling)",
        percentile(&latencies, 0.5).as_secs_f64() * 1000.0,
        percentile(&latencies, 0.99).as_secs_f64() * 1000.0,
        latencies.last().unwrap().as_secs_f64() * 1000.0,
        latencies.len()
    );

    // Catch-up: C goes down, A takes `backlog` binds, C comes back.
    assert!(mesh.nodes[C].node.as_mut().unwrap().stop().success());
    let start = Instant::now();
    for chunk in (0..backlog).collect::<Vec<_>>().chunks(64) {
        join_all(chunk.iter().map(|n| {
            let address = format!("b{n}@example.com");
            let mxid = format!("@b{n}:a.bench");
            let mesh = &mesh;
            async move { mesh.bind(A, &address, &mxid).await }
        }))
        .await;
    }
    println!(
        "{backlog} binds on A while C was down: {:.1} s ({:.0} binds/s over HTTP, 64 in flight)",
        start.elapsed().as_secs_f64(),
        backlog as f64 / start.elapsed().as_secs_f64()
    );
    // Wait for B to be caught up too, so C's catch-up runs alone.
    wait_caught_up(&mesh, "b.bench").await;
    let start = Instant::now();
    mesh.restart(C);
    wait_caught_up(&mesh, "c.bench").await;
    let took = start.elapsed();
    let rows = count_rows(&mesh.nodes[C].db(), "a.bench");
    println!(
        "backlog of {backlog} reached C in {:.2} s after its restart: {:.0} associations/s ({rows} rows from A on C)",
        took.as_secs_f64(),
        backlog as f64 / took.as_secs_f64()
    );
    let _ = B;
}

/// Polls A's status page until `peer`'s cursor reaches A's newest local id.
async fn wait_caught_up(mesh: &Mesh, peer: &str) {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let status = mesh.status(A).await;
        if status["peers"][peer]["cursor"] == status["local_id"] {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{peer} never caught up: {status}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn count_rows(db: &std::path::Path, origin: &str) -> i64 {
    use diesel::prelude::*;
    let mut conn = SqliteConnection::establish(db.to_str().unwrap()).unwrap();
    use diesel::dsl::sql;
    diesel::select(sql::<diesel::sql_types::BigInt>(&format!(
        "(SELECT COUNT(*) FROM global_threepid_associations WHERE originServer = '{origin}')"
    )))
    .get_result(&mut conn)
    .unwrap()
}
