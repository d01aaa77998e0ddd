//! Terms of service: `GET /v2/terms` from the file in `terms.path`, re-read on SIGHUP (a broken
//! edit keeps the terms in force), a broken file at start stops the node naming it.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::{base_config, run_to_exit, signal, TestNode};

const V1: &str = "master_version: v1\ndocs:\n  tos:\n    version: '1.0'\n    langs:\n      en: {name: Terms, url: 'https://example.org/tos-1-en.html'}\n";
const V2: &str = "master_version: v2\ndocs:\n  tos:\n    version: '2.0'\n    langs:\n      en: {name: Terms, url: 'https://example.org/tos-2-en.html'}\n      de: {name: Nutzungsbedingungen, url: 'https://example.org/tos-2-de.html'}\n";

#[tokio::test]
async fn terms_are_served_and_reread_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let terms_path = dir.path().join("terms.yaml");
    std::fs::write(&terms_path, V1).unwrap();
    let config = base_config(dir.path(), "terms.test").replacen(
        "[general]\n",
        &format!("[general]\nterms.path = {}\n", terms_path.display()),
        1,
    );
    let node = TestNode::start_with_config(dir.path(), &config);
    let (status, body) = node.get("/_matrix/identity/v2/terms").await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"policies": {"tos": {"version": "1.0", "en": {"name": "Terms", "url": "https://example.org/tos-1-en.html"}}}})
    );

    // A new version, picked up on SIGHUP.
    std::fs::write(&terms_path, V2).unwrap();
    signal(node.pid(), "HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = node.get("/_matrix/identity/v2/terms").await;
        if body["policies"]["tos"]["version"] == "2.0" {
            assert_eq!(
                body["policies"]["tos"]["de"]["url"],
                "https://example.org/tos-2-de.html"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not reload the terms: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A broken edit: logged, and version 2 stays in force.
    std::fs::write(&terms_path, "master_version: [").unwrap();
    signal(node.pid(), "HUP");
    node.wait_for_log("the terms in force stay", Duration::from_secs(10))
        .await;
    let (_, body) = node.get("/_matrix/identity/v2/terms").await;
    assert_eq!(body["policies"]["tos"]["version"], "2.0");
}

#[tokio::test]
async fn no_terms_means_no_policies() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start_with_config(dir.path(), &base_config(dir.path(), "terms.test"));
    let (status, body) = node.get("/_matrix/identity/v2/terms").await;
    assert_eq!((status, body), (200, json!({"policies": {}})));
}

#[test]
fn a_broken_terms_file_stops_startup_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let terms_path = dir.path().join("terms.yaml");
    std::fs::write(
        &terms_path,
        "master_version: v1\ndocs:\n  tos:\n    version: 1\n",
    )
    .unwrap();
    let config = base_config(dir.path(), "terms.test").replacen(
        "[general]\n",
        &format!("[general]\nterms.path = {}\n", terms_path.display()),
        1,
    );
    std::fs::write(dir.path().join("sydent.conf"), config).unwrap();
    let (code, _, stderr) = run_to_exit(dir.path(), &["--config", "sydent.conf"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("[general] terms.path")
            && stderr.contains("terms.yaml")
            && stderr.contains("langs"),
        "{stderr}"
    );
}
