//! Directory benchmark (issue 17 target): a release node with `[ldap]` pointing at a real
//! OpenLDAP (the tests' harness) holding PEOPLE people (10,000 by default), each with an email
//! and a phone number: how long the first sync takes (the paged search, then every binding
//! committed), from the node's own status, and from the node's start.
//!
//!   cargo bench --bench directory          (needs slapd and ldap-utils: .ci/run installs them)

#[path = "../tests/it/harness/mod.rs"]
mod harness;

use std::time::{Duration, Instant};

use harness::slapd::{person, Slapd, ADMIN_DN, ADMIN_PW, PEOPLE};
use harness::{base_config, get_json, TestNode};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let n: usize = env_or("PEOPLE", 10_000);
    let dir = tempfile::tempdir().unwrap();
    let slapd = Slapd::start(dir.path());
    let loading = Instant::now();
    let ldif: String = (0..n)
        .map(|i| {
            person(
                &format!("Person {i}"),
                &[
                    &format!("uid: p{i}"),
                    &format!("mail: Person.{i}@Example.org"),
                    &format!("telephoneNumber: +44 7700 {:06}", i),
                ],
            )
        })
        .collect();
    slapd.add(&ldif);
    println!(
        "{n} people added to slapd in {:.1} s",
        loading.elapsed().as_secs_f64()
    );
    let node_dir = dir.path().join("node");
    std::fs::create_dir(&node_dir).unwrap();
    let config = format!(
        "{}[ldap]\nuri = {}\nbase = {PEOPLE}\nemail = mail\nmsisdn = telephoneNumber\n\
         id_attr = uid\nhs_name = example.org\nbind_dn = {ADMIN_DN}\nbind_pw = {ADMIN_PW}\n\
         timeout = 10\nsync_interval = 3600\n",
        base_config(&node_dir, "bench.test"),
        slapd.uri()
    );
    let _ = harness::client();
    let started = Instant::now();
    let node = TestNode::start_with_config(&node_dir, &config);
    let url = format!("{}/_matrix/identity/internal/directory", node.internal());
    let status = loop {
        let status = get_json(&url).await;
        if status["last_sync_ts"].is_i64() || status["last_error"].is_string() {
            break status;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "{status}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let wall = started.elapsed();
    assert!(status["last_error"].is_null(), "{status}");
    println!(
        "first sync: {} bindings ({n} people, email and phone) mirrored in {} ms (search and \
         commits, the node's own figure); {:.2} s from the node's start",
        status["entries"],
        status["last_sync_ms"],
        wall.as_secs_f64()
    );
    let (_, found) = node
        .get("/_matrix/identity/api/v1/lookup?medium=msisdn&address=447700009999")
        .await;
    assert_eq!(found["mxid"], "@p9999:example.org", "{found}");

    // bulk_lookup of 1,000 directory people's 3PIDs (served from the mirror), 16 in flight.
    let body = serde_json::json!({"threepids": (0..1000)
        .map(|i| {
            if i % 2 == 0 {
                serde_json::json!(["email", format!("person.{i}@example.org")])
            } else {
                serde_json::json!(["msisdn", format!("447700{:06}", i)])
            }
        })
        .collect::<Vec<_>>()});
    let deadline = Instant::now() + Duration::from_secs(5);
    let requests = futures_util::future::join_all((0..16).map(|_| {
        let (node, body) = (&node, &body);
        async move {
            let mut n = 0;
            while Instant::now() < deadline {
                let (status, found) = node
                    .post("/_matrix/identity/api/v1/bulk_lookup", body)
                    .await;
                assert_eq!(status, 200);
                assert_eq!(found["threepids"].as_array().map(Vec::len), Some(1000));
                n += 1;
            }
            n
        }
    }))
    .await
    .into_iter()
    .sum::<usize>();
    println!(
        "bulk_lookup of 1,000 directory 3PIDs, 16 in flight: {:.0} req/s (the bench's client \
         parses every answer on the same 2 cores)",
        requests as f64 / 5.0
    );

    // Live look-through: people added after the sync, each looked up once (a search, then
    // the bind), then again (from the mirror).
    let late = 200;
    let ldif: String = (0..late)
        .map(|i| {
            person(
                &format!("Late {i}"),
                &[
                    &format!("uid: late{i}"),
                    &format!("mail: late{i}@example.org"),
                ],
            )
        })
        .collect();
    slapd.add(&ldif);
    let mut live = lookups(&node, late).await;
    let mut mirrored = lookups(&node, late).await;
    live.sort();
    mirrored.sort();
    let p = |v: &[Duration], q: f64| {
        v[((v.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1000.0
    };
    println!(
        "v1 lookup of a person the mirror does not hold yet (live look-through, {late} people): \
         p50 {:.2} ms, p99 {:.2} ms; the same lookups from the mirror: p50 {:.2} ms, p99 {:.2} ms",
        p(&live, 0.5),
        p(&live, 0.99),
        p(&mirrored, 0.5),
        p(&mirrored, 0.99)
    );
}

/// The time of each v1 lookup of `late0..late<n>@example.org`, checking each answer.
async fn lookups(node: &TestNode, n: usize) -> Vec<Duration> {
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        let (_, found) = node
            .get(&format!(
                "/_matrix/identity/api/v1/lookup?medium=email&address=late{i}%40example.org"
            ))
            .await;
        times.push(t.elapsed());
        assert_eq!(found["mxid"], format!("@late{i}:example.org"), "{found}");
    }
    times
}
