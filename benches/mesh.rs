//! Replication benchmarks on loopback with release nodes (issue 3 and issue 12 targets):
//! - `single`: three nodes; how long a new binding on A takes to be visible on both peers,
//!   one bind at a time (p50, p99);
//! - `backlog`: three nodes; how fast a backlog of 100,000 associations reaches a peer that
//!   was down;
//! - `paced` and `burst`: a full mesh of N nodes (3, 10 and 20) taking binds on every node
//!   (1,000, bind k on node k mod N), either paced (100 binds/s over the whole mesh: binds
//!   trickling in) or all at once (64 in flight): the replication lag of each bind, from its
//!   answer on its origin to its row on every other node (p50, p99, max), and the CPU the whole
//!   mesh spends per replicated row (the nodes' utime + stime over the round, binds included,
//!   divided by binds × (N − 1)).
//!
//!   cargo bench --bench mesh                         (all of it, ~4 minutes)
//!   PARTS=paced,burst NODES=20 cargo bench --bench mesh
//!   BACKLOG=20000 ROUNDS=1 BINDS=2000 RATE=50 IN_FLIGHT=16 …   (the other knobs)
//!
//! - `rebuild`: three nodes; A takes `REBUILD` binds (100,000), its database is deleted and
//!   `rebuild-from-peers` restores it from B and C, three times: associations restored per
//!   second over the command's whole run (process start, TLS, reading, verifying, writing).
//!
//! It reuses the integration tests' harness: real binaries, a CA made with rcgen, peers.d.

#[path = "../tests/it/harness/mod.rs"]
mod harness;
#[allow(dead_code)] // the tests use more of the harness than the bench
#[path = "../tests/it/mesh/harness.rs"]
mod mesh_harness;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use diesel::prelude::*;
use futures_util::future::join_all;
use mesh_harness::Mesh;
use sydent_rs::db::schema::global_threepid_associations as global;

const A: usize = 0;
const B: usize = 1;
const C: usize = 2;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let parts =
        std::env::var("PARTS").unwrap_or_else(|_| "single,backlog,paced,burst,rebuild".into());
    let parts: Vec<&str> = parts.split(',').map(str::trim).collect();
    if parts.contains(&"single") || parts.contains(&"backlog") {
        let mut mesh = Mesh::start(&["a.bench", "b.bench", "c.bench"]).await;
        if parts.contains(&"single") {
            single_bind_latency(&mesh).await;
        }
        if parts.contains(&"backlog") {
            backlog_catch_up(&mut mesh).await;
        }
    }
    if parts.contains(&"rebuild") {
        rebuild_from_peers().await;
    }
    let mut arrivals = Vec::new();
    if parts.contains(&"paced") {
        arrivals.push(Arrival::Paced(env_or("RATE", 100.0)));
    }
    if parts.contains(&"burst") {
        arrivals.push(Arrival::AllAtOnce);
    }
    if !arrivals.is_empty() {
        let sizes = std::env::var("NODES").unwrap_or_else(|_| "3,10,20".into());
        for n in sizes.split(',').filter_map(|n| n.trim().parse().ok()) {
            full_mesh(n, &arrivals).await;
        }
    }
}

/// One bind at a time on A, polled on B and C until both serve it.
async fn single_bind_latency(mesh: &Mesh) {
    let mut latencies = Vec::new();
    for n in 0..300 {
        let address = format!("lat{n}@example.com");
        let start = Instant::now();
        mesh.bind(A, &address, &format!("@lat{n}:a.bench")).await;
        let (mut on_b, mut on_c) = (false, false);
        while !(on_b && on_c) {
            on_b = on_b || mesh.lookup(B, &address).await.is_some();
            on_c = on_c || mesh.lookup(C, &address).await.is_some();
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
        ms(percentile(&latencies, 0.5)),
        ms(percentile(&latencies, 0.99)),
        ms(*latencies.last().unwrap()),
        latencies.len()
    );
}

/// C goes down, A takes `BACKLOG` binds, C comes back: how fast does it catch up?
async fn backlog_catch_up(mesh: &mut Mesh) {
    let backlog: usize = env_or("BACKLOG", 100_000);
    assert!(mesh.nodes[C].node.as_mut().unwrap().stop().success());
    let start = Instant::now();
    for chunk in (0..backlog).collect::<Vec<_>>().chunks(64) {
        join_all(chunk.iter().map(|n| {
            let address = format!("b{n}@example.com");
            let mxid = format!("@b{n}:a.bench");
            let mesh = &*mesh;
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
    wait_caught_up(mesh, "b.bench").await;
    let start = Instant::now();
    mesh.restart(C);
    wait_caught_up(mesh, "c.bench").await;
    let took = start.elapsed();
    let rows = count_rows(&mesh.nodes[C].db(), "a.bench");
    println!(
        "backlog of {backlog} reached C in {:.2} s after its restart: {:.0} associations/s ({rows} rows from A on C)",
        took.as_secs_f64(),
        backlog as f64 / took.as_secs_f64()
    );
}

/// A's database rebuilt from B and C after `REBUILD` binds on A, three times.
async fn rebuild_from_peers() {
    let count: usize = env_or("REBUILD", 100_000);
    let mut mesh = Mesh::start(&["a.bench", "b.bench", "c.bench"]).await;
    for chunk in (0..count).collect::<Vec<_>>().chunks(64) {
        join_all(chunk.iter().map(|n| {
            let address = format!("r{n}@example.com");
            let mxid = format!("@r{n}:a.bench");
            let mesh = &mesh;
            async move { mesh.bind(A, &address, &mxid).await }
        }))
        .await;
    }
    wait_caught_up(&mesh, "b.bench").await;
    wait_caught_up(&mesh, "c.bench").await;
    mesh.nodes[A].node.take().unwrap().kill();
    let config = mesh.nodes[A].config_path();
    let mut rates = Vec::new();
    for round in 1..=3 {
        for suffix in ["", "-wal", "-shm"] {
            let mut path = mesh.nodes[A].db().into_os_string();
            path.push(suffix);
            let _ = std::fs::remove_file(path);
        }
        let start = Instant::now();
        // GNU time reports the command's peak memory (its last line of stderr).
        let output = std::process::Command::new("/usr/bin/time")
            .args(["-f", "%M", harness::BINARY, "--config"])
            .arg(&config)
            .arg("rebuild-from-peers")
            .output()
            .expect("/usr/bin/time runs");
        let took = start.elapsed().as_secs_f64();
        let (out, err) = (
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        );
        assert!(output.status.success(), "{out}{err}");
        let peak_kb: f64 = err.lines().last().unwrap().trim().parse().unwrap();
        assert!(
            out.contains(&format!("restored {count} of this node's bindings")),
            "{out}"
        );
        println!(
            "rebuild round {round}: {count} associations in {took:.2} s: {:.0} associations/s (whole command), peak RSS {:.0} MB; it said: {}",
            count as f64 / took,
            peak_kb / 1024.0,
            out.lines().rfind(|l| l.starts_with("restored")).unwrap_or_default()
        );
        rates.push(count as f64 / took);
    }
    rates.sort_by(f64::total_cmp);
    println!(
        "rebuild-from-peers of {count} associations: median {:.0} associations/s",
        rates[1]
    );
    mesh.restart(A);
    assert!(mesh.lookup(A, "r0@example.com").await.is_some());
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
    let mut conn = SqliteConnection::establish(db.to_str().unwrap()).unwrap();
    use diesel::dsl::sql;
    diesel::select(sql::<diesel::sql_types::BigInt>(&format!(
        "(SELECT COUNT(*) FROM global_threepid_associations WHERE originServer = '{origin}')"
    )))
    .get_result(&mut conn)
    .unwrap()
}

/// How the binds of a round arrive.
#[derive(Debug, Clone, Copy)]
enum Arrival {
    /// This many per second over the whole mesh, each on time whether or not the ones before
    /// were answered.
    Paced(f64),
    /// All together, `IN_FLIGHT` at a time.
    AllAtOnce,
}

/// A full mesh of `n` nodes; for each arrival, `ROUNDS` rounds of `BINDS` binds spread over
/// every node.
async fn full_mesh(n: usize, arrivals: &[Arrival]) {
    let binds: usize = env_or("BINDS", 1000);
    let rounds: usize = env_or("ROUNDS", 3);
    let in_flight: usize = env_or("IN_FLIGHT", 64);
    let names: Vec<String> = (0..n).map(|i| format!("n{i:02}.bench")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let mesh = Mesh::start(&names).await;
    let pids: Vec<u32> = mesh.nodes.iter().map(|m| m.node().pid()).collect();
    // What the idle mesh costs (checkpointer ticks, peers.d rescans), to judge the figures by,
    // once the start-up greetings are over.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_start = mesh_cpu_ticks(&pids);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = (mesh_cpu_ticks(&pids) - idle_start) as f64 / ticks_per_sec() / 2.0;
    println!(
        "{n} nodes, {binds} binds spread over them per round (idle mesh: {:.1} % of a core)",
        idle * 100.0
    );
    let mut round = 0;
    for &arrival in arrivals {
        let how = match arrival {
            Arrival::Paced(rate) => format!("paced, {rate} binds/s"),
            Arrival::AllAtOnce => format!("all at once, {in_flight} in flight"),
        };
        let mut results = Vec::new();
        for _ in 0..rounds {
            let result = burst_round(&mesh, &pids, round, binds, in_flight, arrival).await;
            round += 1;
            println!(
                "  {how}: lag p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; CPU {:.3} ms per replicated row ({:.2} s of CPU for {} rows in {:.2} s; the bench itself {:.2} s); {} rows per push",
                ms(result.p50),
                ms(result.p99),
                ms(result.max),
                result.cpu_per_row_ms(),
                result.cpu_secs,
                result.rows,
                result.wall.as_secs_f64(),
                result.bench_cpu_secs,
                result
                    .rows_per_push
                    .map_or("?".to_string(), |r| format!("{r:.1}"))
            );
            results.push(result);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let range = |f: &dyn Fn(&RoundResult) -> f64, digits: usize| {
            let lo = results.iter().map(f).fold(f64::INFINITY, f64::min);
            let hi = results.iter().map(f).fold(0.0, f64::max);
            format!("{lo:.digits$}–{hi:.digits$}")
        };
        println!(
            "  => {n} nodes, {how}: lag p50 {} ms, p99 {} ms, max {} ms; CPU {} ms per replicated row ({rounds} rounds)",
            range(&|r| ms(r.p50), 1),
            range(&|r| ms(r.p99), 1),
            range(&|r| ms(r.max), 1),
            range(&RoundResult::cpu_per_row_ms, 2),
        );
    }
}

struct RoundResult {
    p50: Duration,
    p99: Duration,
    max: Duration,
    cpu_secs: f64,
    rows: usize,
    wall: Duration,
    /// This process's CPU over the round (its clients and watcher), which the nodes did not
    /// have.
    bench_cpu_secs: f64,
    /// Associations per push, over every queue of the mesh.
    rows_per_push: Option<f64>,
}

impl RoundResult {
    fn cpu_per_row_ms(&self) -> f64 {
        self.cpu_secs * 1000.0 / self.rows as f64
    }
}

/// `binds` binds, bind k on node k mod n, at most `in_flight` at a time. Lag: from the bind's answer
/// on its origin until its row is in every other node's database (read by a thread of this
/// process, so the watching costs the nodes nothing; a node updates its lookup index in the
/// same step as it commits). CPU: the nodes' utime + stime from the first bind until every
/// row is everywhere.
async fn burst_round(
    mesh: &Mesh,
    pids: &[u32],
    round: usize,
    binds: usize,
    in_flight: usize,
    arrival: Arrival,
) -> RoundResult {
    let n = mesh.nodes.len();
    let address = |k: usize| format!("r{round}k{k}@example.com");
    let origin_of: HashMap<String, usize> = (0..binds).map(|k| (address(k), k % n)).collect();
    let pushes_before = pushes(mesh).await;
    let watcher = Watcher::start(mesh, origin_of.clone());
    let cpu_before = mesh_cpu_ticks(pids);
    let bench_before = cpu_ticks("self");
    let started = Instant::now();
    let acked: Mutex<Vec<Option<Instant>>> = Mutex::new(vec![None; binds]);
    let permits = tokio::sync::Semaphore::new(in_flight);
    join_all((0..binds).map(|k| {
        let (permits, acked) = (&permits, &acked);
        async move {
            if let Arrival::Paced(rate) = arrival {
                let due = started + Duration::from_secs_f64(k as f64 / rate);
                tokio::time::sleep_until(due.into()).await;
            }
            let _permit = permits.acquire().await.expect("semaphore open");
            mesh.bind(k % n, &address(k), &format!("@r{round}k{k}:bench"))
                .await;
            acked.lock().unwrap()[k] = Some(Instant::now());
        }
    }))
    .await;
    let (seen, done_at, cpu_after) = watcher.finish(mesh, &origin_of).await;
    let bench_cpu_secs = (cpu_ticks("self") - bench_before) as f64 / ticks_per_sec();
    let pushes_after = pushes(mesh).await;
    let acked = acked.into_inner().unwrap();
    let mut lags: Vec<Duration> = (0..binds)
        .map(|k| {
            let ack = acked[k].expect("every bind answered");
            let last = seen[&address(k)];
            last.saturating_duration_since(ack)
        })
        .collect();
    lags.sort();
    RoundResult {
        p50: percentile(&lags, 0.5),
        p99: percentile(&lags, 0.99),
        max: *lags.last().unwrap(),
        cpu_secs: (cpu_after - cpu_before) as f64 / ticks_per_sec(),
        rows: binds * (n - 1),
        wall: done_at - started,
        bench_cpu_secs,
        rows_per_push: match pushes_after.1 - pushes_before.1 {
            0 => None, // a build whose status page does not count pushes
            made => Some((pushes_after.0 - pushes_before.0) as f64 / made as f64),
        },
    }
}

/// Associations pushed and pushes made so far by every queue of the mesh (the status pages'
/// `pushed` and `pushes`; 0 pushes from a node that does not count them).
async fn pushes(mesh: &Mesh) -> (u64, u64) {
    let mut total = (0, 0);
    for i in 0..mesh.nodes.len() {
        let status = mesh.status(i).await;
        for queue in status["peers"]
            .as_object()
            .into_iter()
            .flat_map(|p| p.values())
        {
            total.0 += queue["pushed"].as_u64().unwrap_or(0);
            total.1 += queue["pushes"].as_u64().unwrap_or(0);
        }
    }
    total
}

/// A thread that reads every node's global table as rows arrive and notes, per address, when
/// the last of the other nodes stored it.
struct Watcher(std::thread::JoinHandle<Result<Arrivals, Vec<(String, usize)>>>);

/// When each address reached the last of its origin's peers, when the last one did, and the
/// nodes' CPU ticks then.
type Arrivals = (HashMap<String, Instant>, Instant, u64);

#[derive(QueryableByName)]
struct Arrived {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    id: i64,
    #[diesel(sql_type = diesel::sql_types::Text)]
    address: String,
}

impl Watcher {
    fn start(mesh: &Mesh, origin_of: HashMap<String, usize>) -> Self {
        let dbs: Vec<String> = mesh
            .nodes
            .iter()
            .map(|m| m.db().to_str().unwrap().to_string())
            .collect();
        let pids: Vec<u32> = mesh.nodes.iter().map(|m| m.node().pid()).collect();
        // Connected, and past the rows already there, before the first bind is made.
        let mut conns: Vec<SqliteConnection> = dbs
            .iter()
            .map(|db| {
                let mut c = SqliteConnection::establish(db).unwrap();
                diesel::sql_query("PRAGMA busy_timeout = 10000")
                    .execute(&mut c)
                    .unwrap();
                c
            })
            .collect();
        let mut after: Vec<i64> = conns
            .iter_mut()
            .map(|c| {
                diesel::select(diesel::dsl::sql::<diesel::sql_types::BigInt>(
                    "COALESCE((SELECT MAX(id) FROM global_threepid_associations), 0)",
                ))
                .get_result(c)
                .unwrap()
            })
            .collect();
        Self(std::thread::spawn(move || {
            let n = conns.len();
            // Per address: the nodes that have it (its origin from the start).
            let mut have: HashMap<&str, Vec<bool>> = origin_of
                .iter()
                .map(|(a, &o)| (a.as_str(), (0..n).map(|i| i == o).collect()))
                .collect();
            let mut seen = HashMap::new();
            let mut outstanding = origin_of.len() * (n - 1);
            let deadline = Instant::now() + Duration::from_secs(120);
            while outstanding > 0 {
                for (i, conn) in conns.iter_mut().enumerate() {
                    // Prepared once per connection (a sql_query would be compiled on every
                    // poll, and this thread shares the two cores with the nodes).
                    let rows: Vec<(i64, String)> = global::table
                        .filter(global::id.gt(after[i]))
                        .order(global::id.asc())
                        .select((global::id, global::address))
                        .load(conn)
                        .unwrap();
                    let now = Instant::now();
                    for (id, address) in rows {
                        let row = Arrived { id, address };
                        after[i] = row.id;
                        if origin_of.get(&row.address) == Some(&i) {
                            continue; // the origin's own row
                        }
                        let Some(nodes) = have.get_mut(row.address.as_str()) else {
                            continue;
                        };
                        assert!(!nodes[i], "{} stored twice on node {i}", row.address);
                        nodes[i] = true;
                        outstanding -= 1;
                        if nodes.iter().all(|&h| h) {
                            seen.insert(row.address.clone(), now);
                        }
                    }
                }
                if Instant::now() > deadline {
                    let mut missing: Vec<(String, usize)> = have
                        .iter()
                        .flat_map(|(a, nodes)| {
                            nodes
                                .iter()
                                .enumerate()
                                .filter(|(_, &h)| !h)
                                .map(|(i, _)| (a.to_string(), i))
                        })
                        .collect();
                    missing.sort();
                    return Err(missing);
                }
                if outstanding > 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            Ok((seen, Instant::now(), mesh_cpu_ticks(&pids)))
        }))
    }

    /// Waits for every row to be everywhere; on a timeout, shows what is missing where and
    /// what the origins' push queues say, and fails.
    async fn finish(self, mesh: &Mesh, origin_of: &HashMap<String, usize>) -> Arrivals {
        let thread = self.0;
        let result = tokio::task::spawn_blocking(move || thread.join().expect("watcher thread"))
            .await
            .expect("watcher join");
        match result {
            Ok(arrivals) => arrivals,
            Err(missing) => {
                for (address, i) in missing.iter().take(10) {
                    let origin = origin_of[address];
                    let status = mesh.status(origin).await;
                    let (name, origin_name) = (&mesh.nodes[*i].name, &mesh.nodes[origin].name);
                    let mut conn =
                        SqliteConnection::establish(mesh.nodes[*i].db().to_str().unwrap()).unwrap();
                    let there: Vec<Arrived> = diesel::sql_query(
                        "SELECT id, address FROM global_threepid_associations WHERE address = ?",
                    )
                    .bind::<diesel::sql_types::Text, _>(address)
                    .load(&mut conn)
                    .unwrap();
                    let mark: Vec<Arrived> = diesel::sql_query(
                        "SELECT max_origin_id AS id, origin_server AS address FROM replication_origin_marks WHERE origin_server = ?",
                    )
                    .bind::<diesel::sql_types::Text, _>(origin_name)
                    .load(&mut conn)
                    .unwrap();
                    eprintln!(
                        "{address} (from {origin_name}) never reached {name}: rows there {:?}, mark {:?}, lookup {:?}; {origin_name}'s queue to it: {}",
                        there.iter().map(|r| r.id).collect::<Vec<_>>(),
                        mark.iter().map(|r| r.id).collect::<Vec<_>>(),
                        mesh.lookup(*i, address).await,
                        status["peers"][name]
                    );
                }
                panic!("{} rows never arrived", missing.len());
            }
        }
    }
}

/// The nodes' utime + stime so far, in clock ticks (every thread, living or ended).
fn mesh_cpu_ticks(pids: &[u32]) -> u64 {
    pids.iter().map(|pid| cpu_ticks(&pid.to_string())).sum()
}

/// utime + stime of process `pid` (or `self`), in clock ticks.
fn cpu_ticks(pid: &str) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // After the command name (in parentheses, may hold spaces): state is field 3, utime
    // field 14, stime field 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn ticks_per_sec() -> f64 {
    // Linux's USER_HZ is 100 on every architecture the nodes run on.
    100.0
}
