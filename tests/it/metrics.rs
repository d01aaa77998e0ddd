//! Prometheus metrics, scraped from a two-node mesh and parsed with Prometheus' reference
//! parser (the Python client library's OpenMetrics parser, tests/metrics/parse.py), never by a
//! regex over lines: Sydent's names and labels, our request latencies and binding counts, and
//! a stopped peer's backlog rising and falling back to 0 once it is back.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{client, TestCa, TestNode};
use crate::mesh::harness::{port_of, Mesh};
use crate::sydent_interop::sydent_python;

/// One sample of the exposition.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: Value,
    value: f64,
}

fn metrics_url(node: &TestNode) -> String {
    let log = node.log_text();
    let at = log
        .find("metrics on http://")
        .expect("the metrics listener is logged");
    let rest = &log[at + "metrics on ".len()..];
    rest[..rest.find(char::is_whitespace).unwrap_or(rest.len())].to_string()
}

/// Scrapes `node` and parses the whole answer.
async fn scrape(node: &TestNode) -> Vec<Sample> {
    let response = client().get(metrics_url(node)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    let text = response.text().await.unwrap();
    let mut parser = Command::new(sydent_python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/metrics/parse.py"
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut parser.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let out = parser.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the exposition does not parse: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line).unwrap();
            Sample {
                name: v["name"].as_str().unwrap().to_string(),
                labels: v["labels"].clone(),
                value: v["value"].as_f64().unwrap(),
            }
        })
        .collect()
}

/// The value of the sample `name` whose labels include `labels`.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| s.name == name && labels.iter().all(|(k, v)| s.labels[*k] == *v))
        .map(|s| s.value)
}

async fn wait_for(node: &TestNode, what: &str, done: impl Fn(&[Sample]) -> bool) -> Vec<Sample> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let samples = scrape(node).await;
        if done(&samples) {
            return samples;
        }
        assert!(Instant::now() < deadline, "{what}: {samples:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn mesh_metrics_count_requests_bindings_and_a_stopped_peers_backlog() {
    const A: usize = 0;
    const B: usize = 1;
    let mut mesh = Mesh::start_with(
        &["a.test", "b.test"],
        TestCa::new("metrics mesh CA"),
        "prometheus_port = 0\nprometheus_addr = 127.0.0.1\n",
        &[],
    )
    .await;
    for i in 0..3 {
        mesh.bind(A, &format!("m{i}@example.org"), "@m:example.org")
            .await;
    }
    mesh.wait_lookup(&[B], "m2@example.org", Some("@m:example.org"))
        .await;
    for _ in 0..4 {
        assert_eq!(
            mesh.lookup(A, "m0@example.org").await.as_deref(),
            Some("@m:example.org")
        );
    }
    let (status, _) = mesh.nodes[A]
        .node()
        .post(
            "/_matrix/identity/api/v1/bulk_lookup",
            &serde_json::json!({"threepids": [["email", "m1@example.org"]]}),
        )
        .await;
    assert_eq!(status, 200);

    let samples = scrape(mesh.nodes[A].node()).await;
    // Sydent's names and labels.
    let lookups = [("servlet", "LookupServlet"), ("method", "GET")];
    assert_eq!(
        value(&samples, "sydent_http_received_requests_total", &lookups),
        Some(4.0)
    );
    let bulk = [("servlet", "BulkLookupServlet"), ("method", "POST")];
    assert_eq!(
        value(&samples, "sydent_http_received_requests_total", &bulk),
        Some(1.0)
    );
    assert_eq!(value(&samples, "sydent_emails_sent_total", &[]), Some(0.0));
    let internal_binds = [
        ("servlet", "AuthenticatedBindThreePidServlet"),
        ("method", "POST"),
    ];
    assert_eq!(
        value(
            &samples,
            "sydent_http_received_requests_total",
            &internal_binds
        ),
        Some(3.0)
    );
    // Ours: latency per group, bindings, binds.
    let group = [("group", "lookup")];
    assert_eq!(
        value(
            &samples,
            "sydent_rs_http_request_duration_seconds_count",
            &group
        ),
        Some(5.0)
    );
    let inf = [("group", "lookup"), ("le", "+Inf")];
    assert_eq!(
        value(
            &samples,
            "sydent_rs_http_request_duration_seconds_bucket",
            &inf
        ),
        Some(5.0)
    );
    assert_eq!(
        value(&samples, "sydent_rs_bindings", &[("origin", "local")]),
        Some(3.0)
    );
    assert_eq!(
        value(&samples, "sydent_rs_bindings", &[("origin", "replicated")]),
        Some(0.0)
    );
    assert_eq!(value(&samples, "sydent_rs_binds_total", &[]), Some(3.0));
    let peer_b = [("peer", "b.test")];
    assert_eq!(
        value(&samples, "sydent_rs_peer_backlog", &peer_b),
        Some(0.0)
    );
    assert_eq!(
        value(&samples, "sydent_rs_peer_pushed_total", &peer_b),
        Some(3.0)
    );
    let on_b = scrape(mesh.nodes[B].node()).await;
    let pushes = [("servlet", "ReplicationPushServlet"), ("method", "POST")];
    assert!(
        value(&on_b, "sydent_http_received_requests_total", &pushes).unwrap_or(0.0) >= 1.0,
        "{on_b:#?}"
    );
    assert_eq!(
        value(&on_b, "sydent_rs_bindings", &[("origin", "replicated")]),
        Some(3.0)
    );
    assert_eq!(
        value(
            &on_b,
            "sydent_rs_peer_received_total",
            &[("peer", "a.test")]
        ),
        Some(3.0)
    );

    // B stops: A's backlog for it rises and push errors are counted ...
    let b_port = port_of(mesh.nodes[B].node().replication_addr.as_deref().unwrap());
    assert!(mesh.nodes[B].node.as_mut().unwrap().stop().success());
    for i in 3..8 {
        mesh.bind(A, &format!("m{i}@example.org"), "@m:example.org")
            .await;
    }
    let stalled = wait_for(mesh.nodes[A].node(), "B's backlog rises", |s| {
        value(s, "sydent_rs_peer_backlog", &peer_b).unwrap_or(0.0) > 0.0
            && value(s, "sydent_rs_peer_push_errors_total", &peer_b).unwrap_or(0.0) > 0.0
    })
    .await;
    assert!(value(&stalled, "sydent_rs_peer_seconds_since_success", &peer_b).unwrap() >= 0.0);
    // B stays down 1.5 s more: the downtime is what the lag of these five must show.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // ... and falls back to 0 once B is back.
    mesh.restart_same_port(B, b_port);
    let caught_up = wait_for(mesh.nodes[A].node(), "B's backlog back to 0", |s| {
        value(s, "sydent_rs_peer_backlog", &peer_b) == Some(0.0)
            && value(s, "sydent_rs_peer_pushed_total", &peer_b) == Some(8.0)
    })
    .await;
    assert_eq!(value(&caught_up, "sydent_rs_binds_total", &[]), Some(8.0));
    // Replication lag: one observation per association acknowledged; the first three within
    // a second, the five bound while B was down only once it was back.
    let lag = "sydent_rs_replication_lag_seconds";
    assert_eq!(
        value(&caught_up, &format!("{lag}_count"), &peer_b),
        Some(8.0)
    );
    let within_a_second = [("peer", "b.test"), ("le", "1.0")];
    let fast = value(&caught_up, &format!("{lag}_bucket"), &within_a_second).unwrap();
    assert_eq!(fast, 3.0, "{caught_up:#?}");
    mesh.wait_lookup(&[B], "m7@example.org", Some("@m:example.org"))
        .await;
}
