//! The live mesh status page in a real headless browser (Debian's chromium, installed by
//! `.ci/run`): it renders this node and its peer from the JSON status, and follows the peer
//! from `idle` to `retrying` when it is stopped, and back when it returns.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::get_json;
use crate::mesh::harness::{port_of, Mesh};

const CHROMIUM: &str = "/usr/bin/chromium";

/// The page as chromium's DOM holds it after its scripts ran (3 s of virtual time: the first
/// fetch and a few refreshes).
fn rendered(url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--virtual-time-budget=3000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .output()
        .unwrap_or_else(|e| panic!("{CHROMIUM} does not run ({e}): apt-get install chromium"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The state the page shows for `peer`, if it shows the peer.
fn shown_state(dom: &str, peer: &str) -> Option<String> {
    let row = &dom[dom.find(&format!("data-peer=\"{peer}\""))?..];
    let row = &row[..row.find("</tr>")?];
    let at = row.find("data-state=\"")? + "data-state=\"".len();
    Some(row[at..at + row[at..].find('"')?].to_string())
}

/// Renders the page until it shows `peer` in `state`; returns that DOM.
async fn until_shown(url: &str, peer: &str, state: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let url = url.to_string();
        let dom = tokio::task::spawn_blocking(move || rendered(&url))
            .await
            .unwrap();
        if shown_state(&dom, peer).as_deref() == Some(state) {
            return dom;
        }
        assert!(Instant::now() < deadline, "never {state}: {dom}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn the_status_page_follows_a_peer_going_down_and_back() {
    const A: usize = 0;
    const B: usize = 1;
    let mut mesh = Mesh::start(&["a.test", "b.test"]).await;
    mesh.bind(A, "page@example.org", "@page:example.org").await;
    mesh.wait_lookup(&[B], "page@example.org", Some("@page:example.org"))
        .await;
    let url = format!(
        "{}/_matrix/identity/internal/status",
        mesh.nodes[A].node().internal()
    );
    // Served as one page with no external assets.
    let page = crate::harness::client().get(&url).send().await.unwrap();
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    let html = page.text().await.unwrap();
    assert!(
        !html.contains("src=\"http") && !html.contains("href=\"http"),
        "{html}"
    );

    let dom = until_shown(&url, "b.test", "idle").await;
    assert!(dom.contains("<span id=\"node\">a.test</span>"), "{dom}");
    let status = get_json(&format!(
        "{}/_matrix/identity/internal/replication",
        mesh.nodes[A].node().internal()
    ))
    .await;
    assert_eq!(status["peers"]["b.test"]["state"], "idle", "{status}");

    // B stops; a bind on A cannot reach it.
    let b_port = port_of(mesh.nodes[B].node().replication_addr.as_deref().unwrap());
    assert!(mesh.nodes[B].node.as_mut().unwrap().stop().success());
    mesh.bind(A, "down@example.org", "@down:example.org").await;
    let dom = until_shown(&url, "b.test", "retrying").await;
    assert!(dom.contains("class=\"error\""), "{dom}");

    // B is back: the page shows it idle again, its backlog 0.
    mesh.restart_same_port(B, b_port);
    let dom = until_shown(&url, "b.test", "idle").await;
    let row = &dom[dom.find("data-peer=\"b.test\"").unwrap()..];
    assert!(row.contains("<td class=\"num backlog\">0</td>"), "{row}");
    mesh.wait_lookup(&[B], "down@example.org", Some("@down:example.org"))
        .await;
}
