//! Upstream benchmark (issue 17): what forwarding to an upstream identity server costs. Two
//! release nodes on loopback: the upstream, with 1,000 bindings, and a node with `[proxy]`
//! pointing at it (no directory, no bindings of its own), asked in clear (v1 bulk_lookup) and
//! hashed (v2 hash_details + sha256 lookup, with an account at the upstream), beside the same
//! lookups answered by the upstream itself; then the upstream stopped.
//!
//!   cargo bench --bench upstream

#[path = "../tests/it/harness/mod.rs"]
mod harness;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use harness::matrix_hs::MatrixHomeserver;
use harness::{base_config, TestCa, TestNode, BINARY};

const BOUND: usize = 1_000;
const IN_FLIGHT: usize = 16;
const SECONDS: f64 = 4.0;

/// A node whose HTTPS clients trust `ca` (the homeserver stand-in's).
fn start(dir: &std::path::Path, config: &str, ca: &TestCa) -> TestNode {
    std::fs::create_dir_all(dir).unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, &ca.cert_pem).unwrap();
    let path = dir.join("sydent.conf");
    std::fs::write(&path, config).unwrap();
    TestNode::start_cmd(
        dir,
        &path,
        Command::new(BINARY)
            .arg("--config")
            .arg(&path)
            .env("SSL_CERT_FILE", &ca_file)
            .env("RUST_LOG", "warn"),
    )
    .unwrap()
}

/// Requests per second of `body` POSTed to `path`, IN_FLIGHT at once, each answer checked.
async fn rate(node: &TestNode, path: &str, body: &Value, check: impl Fn(&Value) + Copy) -> f64 {
    let deadline = Instant::now() + Duration::from_secs_f64(SECONDS);
    let done: usize = futures_util::future::join_all((0..IN_FLIGHT).map(|_| async move {
        let mut n = 0;
        while Instant::now() < deadline {
            let (status, answer) = node.post(path, body).await;
            assert_eq!(status, 200, "{answer}");
            check(&answer);
            n += 1;
        }
        n
    }))
    .await
    .into_iter()
    .sum();
    done as f64 / SECONDS
}

/// p50 and p99 (ms) of `n` v1 lookups of `address(i)`, one at a time.
async fn latency(node: &TestNode, n: usize, address: impl Fn(usize) -> String) -> (f64, f64) {
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        let started = Instant::now();
        let (status, _) = node
            .get(&format!(
                "/_matrix/identity/api/v1/lookup?medium=email&address={}",
                address(i).replace('@', "%40")
            ))
            .await;
        times.push(started.elapsed());
        assert_eq!(status, 200);
    }
    times.sort();
    let at = |q: f64| times[((n - 1) as f64 * q).round() as usize].as_secs_f64() * 1000.0;
    (at(0.5), at(0.99))
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let _ = harness::client();
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("homeserver CA");
    let hs = MatrixHomeserver::start(&ca);
    let whitelist = "[general]\nip.whitelist = 127.0.0.0/8, ::1/128\n";
    let upstream_dir = dir.path().join("upstream");
    let upstream = start(
        &upstream_dir,
        &base_config(&upstream_dir, "upstream.test").replacen("[general]\n", whitelist, 1),
        &ca,
    );
    for i in 0..BOUND {
        upstream
            .internal_3pid(
                "bind",
                &format!("u{i}@outside.org"),
                &format!("@u{i}:outside.org"),
            )
            .await;
    }
    let (status, account) = upstream
        .post(
            "/_matrix/identity/v2/account/register",
            &json!({"access_token": hs.openid_token("node"), "token_type": "Bearer",
                    "matrix_server_name": hs.server_name, "expires_in": 3600}),
        )
        .await;
    assert_eq!(status, 200, "{account}");
    let token = account["token"].as_str().unwrap();

    let hundred = json!({"threepids": (0..100)
        .map(|i| json!(["email", format!("u{}@outside.org", i * 7)]))
        .collect::<Vec<_>>()});
    let all_found =
        |answer: &Value| assert_eq!(answer["threepids"].as_array().map(Vec::len), Some(100));
    let direct = rate(
        &upstream,
        "/_matrix/identity/api/v1/bulk_lookup",
        &hundred,
        all_found,
    )
    .await;
    let (direct_p50, direct_p99) = latency(&upstream, 200, |i| format!("u{i}@outside.org")).await;
    println!(
        "the upstream itself: bulk_lookup of 100 3PIDs {direct:.0} req/s; v1 lookup p50 \
         {direct_p50:.2} ms, p99 {direct_p99:.2} ms"
    );

    for (mode, extra) in [
        ("in clear (v1 bulk_lookup)", String::new()),
        (
            "hashed (v2 sha256 lookup)",
            format!("access_token = {token}\n"),
        ),
    ] {
        let node_dir = dir
            .path()
            .join(if extra.is_empty() { "clear" } else { "hashed" });
        let config = format!(
            "{}[proxy]\nidentity = {}\n{extra}",
            base_config(&node_dir, "id.test"),
            upstream.client_url
        );
        let mut node = start(&node_dir, &config, &ca);
        let forwarded = rate(
            &node,
            "/_matrix/identity/api/v1/bulk_lookup",
            &hundred,
            all_found,
        )
        .await;
        let (p50, p99) = latency(&node, 200, |i| format!("u{i}@outside.org")).await;
        println!(
            "forwarded {mode}: bulk_lookup of 100 3PIDs {forwarded:.0} req/s; v1 lookup p50 \
             {p50:.2} ms, p99 {p99:.2} ms"
        );
        node.stop();
    }

    // The upstream gone: a lookup costs a refused connection.
    let node_dir = dir.path().join("down");
    let config = format!(
        "{}[proxy]\nidentity = {}\n",
        base_config(&node_dir, "id.test"),
        upstream.client_url
    );
    let node = start(&node_dir, &config, &ca);
    let mut upstream = upstream;
    upstream.stop();
    let (p50, p99) = latency(&node, 200, |i| format!("u{i}@outside.org")).await;
    println!("upstream stopped: v1 lookup answered without it, p50 {p50:.2} ms, p99 {p99:.2} ms");
}
