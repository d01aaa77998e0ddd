//! Starting, restarting and stopping a node the way an admin does: first start writes the
//! config with a new key, restarts keep key and data, SIGTERM exits 0 and removes the pidfile,
//! bad configs stop startup with one line naming the key.

use std::process::Command;
use std::time::Duration;

use serde_json::json;

use crate::harness::{base_config, run_to_exit, TestNode, BINARY};

/// How to run a command in a network namespace of its own, and how to enter it later:
/// `unshare -n` as root (CI), else inside a user namespace too where the kernel allows that.
fn own_network_namespace() -> (&'static [&'static str], &'static [&'static str]) {
    let works = |args: &[&str]| {
        Command::new("unshare")
            .args(args)
            .arg("true")
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if works(&["-n"]) {
        (&["-n"], &["-n"])
    } else if works(&["-r", "-n"]) {
        (&["-r", "-n"], &["-U", "-n", "--preserve-credentials"])
    } else {
        panic!("this test runs a node on port 8090 in a network namespace of its own: it needs `unshare -n` (root) or `unshare -rn` (unprivileged user namespaces)")
    }
}

#[tokio::test]
async fn first_start_writes_config_with_a_new_key_then_serves() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("sydent.conf");
    let db = dir.path().join("data.db");
    // Defaults only, as on a fresh machine; the env vars Sydent reads set the defaults. The
    // default client port is 8090: the node gets a network namespace of its own, where that
    // port is always free and nothing else on the machine is in the way.
    let (unshare, nsenter) = own_network_namespace();
    let mut cmd = Command::new("unshare");
    cmd.args(unshare)
        .arg(BINARY)
        .env("SYDENT_CONF", &conf)
        .env("SYDENT_SERVER_NAME", "fresh.example.org")
        .env("SYDENT_DB_PATH", &db)
        .env("SYDENT_PID_FILE", dir.path().join("fresh.pid"));
    let mut node = TestNode::start_cmd(dir.path(), &conf, &mut cmd)
        .unwrap_or_else(|log| panic!("the node did not start: {log}"));
    assert!(node.client_url.ends_with(":8090"), "{}", node.client_url);
    // Ask it from inside its namespace (whose loopback starts down).
    let in_namespace = |args: &[&str]| {
        let out = Command::new("nsenter")
            .args(["-t", &node.pid().to_string()])
            .args(nsenter)
            .args(args)
            .output()
            .expect("nsenter runs");
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    in_namespace(&["ip", "link", "set", "lo", "up"]);
    let versions = in_namespace(&[
        "curl",
        "-sS",
        "--fail",
        "--max-time",
        "20",
        "http://127.0.0.1:8090/_matrix/identity/versions",
    ]);
    let versions: serde_json::Value = serde_json::from_str(&versions).expect("JSON body");
    assert!(versions["versions"].is_array(), "{versions}");
    assert!(dir.path().join("fresh.pid").exists());
    assert!(node.stop().success());
    let text = std::fs::read_to_string(&conf).expect("config written on first start");
    for needle in [
        "[general]",
        "server.name = fresh.example.org",
        "[db]",
        &format!("db.file = {}", db.display()),
        "[http]",
        "clientapi.http.port = 8090",
        "[email]",
        "[sms]",
        "[crypto]",
        "ed25519.signingkey = ed25519 0 ",
    ] {
        assert!(
            text.contains(needle),
            "generated config lacks {needle:?}:\n{text}"
        );
    }
    assert!(db.exists(), "database created at SYDENT_DB_PATH");
}

#[tokio::test]
async fn restart_keeps_key_and_bindings_and_sigterm_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    // No key in the file: the node generates one and writes it into the existing file.
    let config = format!(
        "# my comment\n{}",
        base_config(dir.path(), "keep.example.org")
    );
    let mut node = TestNode::start_with_config(dir.path(), &config);
    let (_, key1) = node.get("/_matrix/identity/v2/pubkey/ed25519:0").await;
    let text = std::fs::read_to_string(dir.path().join("sydent.conf")).unwrap();
    assert!(
        text.contains("# my comment") && text.contains("ed25519.signingkey = ed25519 0 "),
        "{text}"
    );
    let (status, bound) = node
        .internal_post(
            "/_matrix/identity/internal/bind",
            &json!({"medium": "email", "address": "dave@example.org", "mxid": "@dave:example.org"}),
        )
        .await;
    assert_eq!(status, 200);
    let pidfile = dir.path().join("sydent.pid");
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(pid, node.pid());
    let status = node.stop();
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM exits 0; log:\n{}",
        node.log_text()
    );
    assert!(!pidfile.exists(), "pidfile removed on stop");

    let node = TestNode::start(dir.path(), &dir.path().join("sydent.conf")).unwrap();
    let (_, key2) = node.get("/_matrix/identity/v2/pubkey/ed25519:0").await;
    assert_eq!(key1, key2, "same signing key after restart");
    let (_, found) = node
        .get("/_matrix/identity/api/v1/lookup?medium=email&address=dave%40example.org")
        .await;
    assert_eq!(found, bound, "binding survives the restart");
}

#[test]
fn invalid_config_exits_1_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_config(dir.path(), "bad.example.org");
    for (change, key) in [
        (
            base.replace("clientapi.http.port = 0", "clientapi.http.port = eighty"),
            "[http] clientapi.http.port",
        ),
        (
            format!("{base}[crypto]\ned25519.signingkey = ed25519 0 notakey\n"),
            "[crypto] ed25519.signingkey",
        ),
        (
            base.replace("[general]\n", "[general]\nlog.level = LOUD\n"),
            "[general] log.level",
        ),
        (
            base.replace("[general]\n", "[general]\nenable_v1_access = maybe\n"),
            "[general] enable_v1_access",
        ),
    ] {
        let path = dir.path().join("bad.conf");
        std::fs::write(&path, &change).unwrap();
        let (code, _, stderr) = run_to_exit(dir.path(), &["--config", path.to_str().unwrap()]);
        assert_eq!(code, Some(1), "{key}: {stderr}");
        assert!(stderr.contains(key), "stderr does not name {key}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    }
}

#[tokio::test]
async fn unknown_keys_are_warned_about_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let config = base_config(dir.path(), "warn.example.org")
        .replace("[http]\n", "[http]\nclientapi.http.prot = 1\n");
    let mut node = TestNode::start_with_config(dir.path(), &config);
    assert!(
        node.log_text().contains("clientapi.http.prot"),
        "{}",
        node.log_text()
    );
    node.stop();
}

#[test]
fn generate_key_help_and_version() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out, _) = run_to_exit(dir.path(), &["generate-key"]);
    assert_eq!(code, Some(0));
    let key = sydent_rs::crypto::NodeSigningKey::from_sydent_str(out.trim())
        .expect("prints a usable key");
    assert_eq!(key.key_id(), "ed25519:0");
    let (code, out, _) = run_to_exit(dir.path(), &["--help"]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("--config") && out.contains("generate-key"),
        "{out}"
    );
    let (code, out, _) = run_to_exit(dir.path(), &["--version"]);
    assert_eq!(code, Some(0));
    assert!(out.contains(env!("CARGO_PKG_VERSION")));
}

/// `:memory:` works; `log.path` receives the log; even at DEBUG the looked-up 3PIDs are not
/// in it (requests are logged without their query strings).
#[tokio::test]
async fn memory_database_and_log_file_without_3pids() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("node.log");
    let config = base_config(dir.path(), "mem.example.org")
        .replace(
            &format!("db.file = {}/sydent.db", dir.path().display()),
            "db.file = :memory:",
        )
        .replacen(
            "[general]\n",
            &format!(
                "[general]\nlog.path = {}\nlog.level = DEBUG\n",
                log.display()
            ),
            1,
        );
    assert!(config.contains("db.file = :memory:"));
    let node = TestNode::start_with_config(dir.path(), &config);
    let (status, _) = node
        .internal_post(
            "/_matrix/identity/internal/bind",
            &json!({"medium": "email", "address": "secret.person@example.org", "mxid": "@s:example.org"}),
        )
        .await;
    assert_eq!(status, 200);
    let (_, found) = node
        .get("/_matrix/identity/api/v1/lookup?medium=email&address=secret.person%40example.org")
        .await;
    assert_eq!(found["mxid"], "@s:example.org");
    assert!(
        !dir.path().join("sydent.db").exists(),
        "nothing written to disk"
    );
    // Requests are logged at DEBUG, once the response is sent: the client may see the answer
    // first.
    node.wait_for_log("/_matrix/identity/api/v1/lookup", Duration::from_secs(30))
        .await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("serving as mem.example.org"), "{text}");
    assert!(!text.contains("secret.person"), "a 3PID was logged: {text}");
}

/// The config Sydent 2.6.1 itself writes on first start (every default in `[DEFAULT]`, empty
/// sections; key line emptied for the fixture) runs unchanged: no unknown-key warnings, and
/// the missing key is generated into its `[crypto]` line.
#[tokio::test]
async fn a_config_written_by_sydent_runs_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = include_str!("../fixtures/sydent-2.6.1-generated.conf");
    let config = fixture
        .replace("@DIR@", &dir.path().display().to_string())
        .replace("server.name = \n", "server.name = sydent.example.org\n")
        .replace(
            "clientapi.http.bind_address = ::\n",
            "clientapi.http.bind_address = 127.0.0.1\n",
        )
        .replace("clientapi.http.port = 8090\n", "clientapi.http.port = 0\n");
    let node = TestNode::start_with_config(dir.path(), &config);
    let (status, _) = node.get("/_matrix/identity/api/v1").await;
    assert_eq!(status, 200);
    let log = node.log_text();
    // Sydent's defaults leave two things an admin must know about: no brand folder under the
    // default `templates.path` (our built-in templates stand in) and no `client_http_base`.
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN"))
        .filter(|l| !l.contains("the built-in templates are used"))
        .filter(|l| !l.contains("client_http_base is not set"))
        .collect();
    assert!(warnings.is_empty(), "no other warnings expected: {log}");
    let written = std::fs::read_to_string(dir.path().join("sydent.conf")).unwrap();
    let key_line = written
        .lines()
        .skip_while(|l| *l != "[crypto]")
        .nth(1)
        .unwrap();
    assert!(
        key_line.starts_with("ed25519.signingkey = ed25519 0 "),
        "{written}"
    );
    // Only that line changed.
    assert_eq!(
        written
            .replacen(key_line, "ed25519.signingkey = ", 1)
            .trim_end(),
        config.trim_end()
    );
}

/// SIGTERM while binds are in flight: every bind that was answered 200 is in the database
/// after a restart (in-flight requests finish, the store commits what it holds); the others
/// were refused, never half-done. Also SIGINT stops the node with exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_loses_no_acknowledged_bind() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let mut node =
        TestNode::start_with_config(dir.path(), &base_config(dir.path(), "load.example.org"));
    let url = format!("{}/_matrix/identity/internal/bind", node.internal());
    let client = crate::harness::client();
    let answered = Arc::new(AtomicUsize::new(0));
    let stopped = Arc::new(AtomicBool::new(false));
    // A bind every 2 ms from before the SIGTERM until after the node has exited: some are
    // answered before it, some are in flight at it, the last ones find no node.
    let sender = {
        let (answered, stopped) = (Arc::clone(&answered), Arc::clone(&stopped));
        tokio::spawn(async move {
            let mut binds = Vec::new();
            let mut after_exit = 0;
            for n in 0.. {
                if stopped.load(Ordering::Relaxed) {
                    after_exit += 1;
                    if after_exit > 20 {
                        break;
                    }
                }
                let (client, url, answered) = (client.clone(), url.clone(), Arc::clone(&answered));
                binds.push(tokio::spawn(async move {
                    let resp = client
                        .post(url)
                        .json(&json!({"medium": "email", "address": format!("l{n}@example.org"), "mxid": "@l:example.org"}))
                        .send()
                        .await;
                    let status = resp.map(|r| r.status().as_u16()).unwrap_or(0);
                    if status == 200 {
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                    (n, status)
                }));
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            binds
        })
    };
    while answered.load(Ordering::Relaxed) < 100 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let status = node.stop();
    stopped.store(true, Ordering::Relaxed);
    assert_eq!(status.code(), Some(0), "{}", node.log_text());
    let binds = sender.await.unwrap();
    let sent = binds.len();
    let mut acknowledged = Vec::new();
    for bind in binds {
        let (n, status) = bind.await.unwrap();
        assert!(status == 200 || status == 0, "bind {n}: {status}");
        if status == 200 {
            acknowledged.push(n);
        }
    }
    assert!(
        acknowledged.len() >= 100,
        "the first binds made it before the stop"
    );
    assert!(
        acknowledged.len() < sent,
        "the stop came while binds were still coming"
    );

    let mut node = TestNode::start(dir.path(), &dir.path().join("sydent.conf")).unwrap();
    for n in &acknowledged {
        let (_, found) = node
            .get(&format!(
                "/_matrix/identity/api/v1/lookup?medium=email&address=l{n}%40example.org"
            ))
            .await;
        assert_eq!(
            found["mxid"], "@l:example.org",
            "acknowledged bind {n} lost"
        );
    }
    crate::harness::signal(node.pid(), "INT");
    let status = crate::harness::wait_with_deadline(node.child_mut(), Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "SIGINT exits 0");
}

/// A restarted node serves at once, before its lookup index is loaded: lookups read SQLite
/// meanwhile, and the binds and unbinds made during the warm-up are in the index once it is
/// ready (it was loaded from a snapshot taken before them).
#[tokio::test]
async fn a_restarted_node_serves_while_its_index_warms_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut node =
        TestNode::start_with_config(dir.path(), &base_config(dir.path(), "warm.example.org"));
    for (address, mxid) in [
        ("kept@example.org", "@kept:example.org"),
        ("gone@example.org", "@gone:example.org"),
        ("moved@example.org", "@old:example.org"),
    ] {
        node.internal_3pid("bind", address, mxid).await;
    }
    assert!(node.stop().success());

    let config = dir.path().join("sydent.conf");
    let mut cmd = std::process::Command::new(BINARY);
    cmd.arg("--config")
        .arg(&config)
        .env("SYDENT_RS_TEST_WARM_UP_DELAY_MS", "10000");
    let node = TestNode::start_cmd(dir.path(), &config, &mut cmd).unwrap();
    let mxid_of = |address: &'static str| node.lookup_mxid(address);
    let bulk = || {
        let node = &node;
        async move {
            let asked = json!({"threepids": [
                ["email", "kept@example.org"], ["email", "gone@example.org"],
                ["email", "moved@example.org"], ["email", "fresh@example.org"],
                ["email", "never@example.org"]]});
            node.post("/_matrix/identity/api/v1/bulk_lookup", &asked)
                .await
                .1
        }
    };
    let expected_bulk = json!({"threepids": [
        ["email", "fresh@example.org", "@fresh:example.org"],
        ["email", "kept@example.org", "@kept:example.org"],
        ["email", "moved@example.org", "@new:example.org"]]});

    // Warming up: answers from SQLite, and writes go on.
    assert_eq!(
        mxid_of("kept@example.org").await.as_deref(),
        Some("@kept:example.org")
    );
    node.internal_3pid("unbind", "gone@example.org", "@gone:example.org")
        .await;
    node.internal_3pid("bind", "moved@example.org", "@new:example.org")
        .await;
    node.internal_3pid("bind", "fresh@example.org", "@fresh:example.org")
        .await;
    assert_eq!(mxid_of("gone@example.org").await, None);
    assert_eq!(
        mxid_of("moved@example.org").await.as_deref(),
        Some("@new:example.org")
    );
    assert_eq!(bulk().await, expected_bulk);
    assert!(
        !node.log_text().contains("lookup index ready"),
        "the warm-up ended before the test could see it: {}",
        node.log_text()
    );

    // Ready: the same answers from memory, the warm-up's writes on top of the snapshot.
    node.wait_for_log("lookup index ready", std::time::Duration::from_secs(60))
        .await;
    assert_eq!(
        mxid_of("kept@example.org").await.as_deref(),
        Some("@kept:example.org")
    );
    assert_eq!(mxid_of("gone@example.org").await, None);
    assert_eq!(
        mxid_of("moved@example.org").await.as_deref(),
        Some("@new:example.org")
    );
    assert_eq!(bulk().await, expected_bulk);
}
