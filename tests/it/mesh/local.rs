//! The README's two-node mesh on one host, as written: `new-mesh --local` makes the CA, the
//! certificates (with loopback addresses), configs and peers.d; `peer-file` warns about a URL
//! its certificate does not name; both nodes start from the generated configs and replicate.
//! Only the ports are moved to free ones (tests run in parallel), and `new-mesh` run again
//! rewrites the peer files from the configs as they now are, keeping every key.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::harness::{free_port, run_to_exit, TestNode};

fn new_mesh(root: &Path) -> String {
    let (code, stdout, stderr) = run_to_exit(
        root,
        &[
            "new-mesh", "--local", "--certs", "certs", "--peers", "peers.d", "node1", "node2",
        ],
    );
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    stdout
}

/// Moves a generated config's ports (client and internal to OS-picked ones, replication to
/// `replication`), changing nothing else.
fn move_ports(config: &Path, replication: u16) {
    let text = std::fs::read_to_string(config).unwrap();
    let moved: String = text
        .lines()
        .map(|line| match line.split_once(" = ") {
            Some(("clientapi.http.port" | "internalapi.http.port", _)) => {
                format!("{} = 0\n", line.split_once(" = ").unwrap().0)
            }
            Some(("replication.https.port", _)) => {
                format!("replication.https.port = {replication}\n")
            }
            _ => format!("{line}\n"),
        })
        .collect();
    std::fs::write(config, moved).unwrap();
}

#[tokio::test]
async fn two_local_nodes_made_by_new_mesh_replicate() {
    let root = tempfile::tempdir().unwrap();
    let made = new_mesh(root.path());
    assert!(made.contains("mesh-ca.pem"), "{made}");
    let config1 = root.path().join("certs/node1/sydent.conf");
    let config2 = root.path().join("certs/node2/sydent.conf");
    let text = std::fs::read_to_string(&config1).unwrap();
    assert!(text.contains("replication.https.port = 11434"), "{text}");
    assert!(
        text.contains("clientapi.http.bind_address = 127.0.0.1"),
        "{text}"
    );

    let (port1, port2) = (free_port(), free_port());
    move_ports(&config1, port1);
    move_ports(&config2, port2);
    let again = new_mesh(root.path());
    assert!(
        again.contains("kept") && !again.contains("made "),
        "{again}"
    );
    let peer2 = std::fs::read_to_string(root.path().join("peers.d/node2.conf")).unwrap();
    assert!(
        peer2.contains(&format!("base_replication_url = https://127.0.0.1:{port2}")),
        "{peer2}"
    );

    // peer-file: quiet for a URL the certificate names, a warning naming the names otherwise.
    let config1_arg = config1.display().to_string();
    let url = format!("https://127.0.0.1:{port1}");
    let (code, stdout, stderr) = run_to_exit(
        root.path(),
        &["--config", &config1_arg, "peer-file", "--url", &url],
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("server_name = node1"), "{stdout}");
    assert!(!stderr.contains("warning"), "{stderr}");
    let (code, _, stderr) = run_to_exit(
        root.path(),
        &[
            "--config",
            &config1_arg,
            "peer-file",
            "--url",
            "https://node1.example.org:4434",
        ],
    );
    assert_eq!(code, Some(0));
    assert!(
        stderr.contains("does not name 'node1.example.org'")
            && stderr.contains("node1, 127.0.0.1, ::1"),
        "{stderr}"
    );

    let node1 = TestNode::start(root.path(), &config1).expect("node1 starts");
    let node2 = TestNode::start(root.path(), &config2).expect("node2 starts");
    node1
        .internal_3pid("bind", "walk@example.org", "@walk:node1")
        .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while node2.lookup_mxid("walk@example.org").await.is_none() {
        assert!(
            Instant::now() < deadline,
            "node2 never got the binding:\n{}\n{}",
            node1.log_text(),
            node2.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    node2
        .internal_3pid("bind", "back@example.org", "@back:node2")
        .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while node1.lookup_mxid("back@example.org").await.as_deref() != Some("@back:node2") {
        assert!(Instant::now() < deadline, "node1 never got node2's binding");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
