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
}
