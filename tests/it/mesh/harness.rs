//! A mesh of real nodes on loopback: a test CA ([`TestCa`]), one certificate per node (CN and
//! DNS SAN = its server name, plus `localhost` so peers can reach it at
//! `https://localhost:<port>`), one shared peers.d written with the real `peer-file` command.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

pub use crate::harness::TestCa;
use crate::harness::{base_config, get_json, run_to_exit, signal, TestNode};

/// A node's config with replication on: its certificate, the mesh CA and the shared peers.d.
pub fn mesh_config(
    dir: &Path,
    name: &str,
    peers_dir: &Path,
    certfile: &Path,
    cacert: &Path,
) -> String {
    base_config(dir, name)
        .replacen(
            "[general]\n",
            &format!("[general]\npeers.path = {}\n", peers_dir.display()),
            1,
        )
        .replacen(
            "[http]\n",
            &format!(
                "[http]\nreplication.https.certfile = {}\nreplication.https.cacert = {}\n\
                 replication.https.bind_address = 127.0.0.1\nreplication.https.port = 0\n",
                certfile.display(),
                cacert.display()
            ),
            1,
        )
}

pub struct MeshNode {
    pub name: String,
    pub dir: PathBuf,
    pub node: Option<TestNode>,
}

impl MeshNode {
    pub fn node(&self) -> &TestNode {
        self.node.as_ref().expect("node running")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("sydent.conf")
    }

    pub fn db(&self) -> PathBuf {
        self.dir.join("sydent.db")
    }
}

#[allow(dead_code)] // root and ca live as long as the mesh
pub struct Mesh {
    pub root: tempfile::TempDir,
    pub ca: TestCa,
    pub peers_dir: PathBuf,
    pub nodes: Vec<MeshNode>,
    /// The environment every node starts with.
    env: Vec<(String, String)>,
}

impl Mesh {
    /// Starts `names.len()` nodes, then introduces them to each other through peers.d.
    pub async fn start(names: &[&str]) -> Self {
        Self::start_with(names, TestCa::new("sydent-rs test mesh CA"), "", &[]).await
    }

    /// [`Self::start`] with the mesh's CA `ca`, more config for every node (`more`: lines for
    /// `[general]`, then any sections of its own) and environment variables (e.g. to reach a
    /// homeserver stand-in with a certificate from `ca`: `ip.whitelist` and `SSL_CERT_FILE`).
    pub async fn start_with(names: &[&str], ca: TestCa, more: &str, env: &[(&str, &str)]) -> Self {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let root = tempfile::tempdir().unwrap();
        let peers_dir = root.path().join("peers.d");
        std::fs::create_dir(&peers_dir).unwrap();
        let mut nodes = Vec::new();
        for name in names {
            let dir = root.path().join(name);
            std::fs::create_dir(&dir).unwrap();
            let (certfile, cacert) = ca.write_node_files(&dir, name);
            // Lines before the first section header of `more` go into [general]; its sections
            // are added at the end.
            let (general, sections) = match more.find("\n[") {
                Some(at) => more.split_at(at + 1),
                None => (more, ""),
            };
            let config = mesh_config(&dir, name, &peers_dir, &certfile, &cacert).replacen(
                "[general]\n",
                &format!("[general]\n{general}"),
                1,
            ) + sections;
            std::fs::write(dir.join("sydent.conf"), config).unwrap();
            let node = start_node(&dir, &env).unwrap_or_else(|e| panic!("{name}: {e}"));
            nodes.push(MeshNode {
                name: name.to_string(),
                dir,
                node: Some(node),
            });
        }
        let mesh = Self {
            root,
            ca,
            peers_dir,
            nodes,
            env,
        };
        for i in 0..mesh.nodes.len() {
            mesh.write_peer_file(i);
        }
        mesh.hup_all();
        for i in 0..mesh.nodes.len() {
            mesh.wait_for_peers(i, mesh.nodes.len() - 1).await;
        }
        mesh
    }

    pub fn peer_file_path(&self, i: usize) -> PathBuf {
        self.peers_dir.join(format!("{}.conf", self.nodes[i].name))
    }

    /// Writes node `i`'s peers.d file with the real `peer-file` command.
    pub fn write_peer_file(&self, i: usize) {
        let n = &self.nodes[i];
        let url = format!(
            "https://localhost:{}",
            port_of(
                n.node()
                    .replication_addr
                    .as_deref()
                    .expect("replication on")
            )
        );
        let (code, out, err) = run_to_exit(
            &n.dir,
            &[
                "--config",
                n.config_path().to_str().unwrap(),
                "peer-file",
                "--url",
                &url,
            ],
        );
        assert_eq!(code, Some(0), "peer-file failed: {err}");
        std::fs::write(self.peer_file_path(i), out).unwrap();
    }

    pub fn hup_all(&self) {
        for n in &self.nodes {
            if let Some(node) = &n.node {
                signal(node.pid(), "HUP");
            }
        }
    }

    /// Waits until node `i` lists `count` peers on its status page.
    pub async fn wait_for_peers(&self, i: usize, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let status = self.status(i).await;
            if status["peers"].as_object().map_or(0, |p| p.len()) == count {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {i} never saw {count} peers: {status}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn status(&self, i: usize) -> Value {
        let url = format!(
            "{}/_matrix/identity/internal/replication",
            self.nodes[i].node().internal()
        );
        get_json(&url).await
    }

    /// Restarts node `i` on the same directory (a new replication port: its peer file is
    /// rewritten and the others are told).
    pub fn restart(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        let node = start_node(&n.dir, &self.env).unwrap_or_else(|e| panic!("restart: {e}"));
        n.node = Some(node);
        self.write_peer_file(i);
        self.hup_all();
    }

    /// Restarts node `i` on its old replication port: its peer file stays valid and nobody is
    /// told, as when an admin restarts a node. `port` is the port it had.
    pub fn restart_same_port(&mut self, i: usize, port: u16) {
        let n = &mut self.nodes[i];
        let config = std::fs::read_to_string(n.config_path()).unwrap();
        std::fs::write(
            n.config_path(),
            config.replace(
                "replication.https.port = 0",
                &format!("replication.https.port = {port}"),
            ),
        )
        .unwrap();
        let node = start_node(&n.dir, &self.env).unwrap_or_else(|e| panic!("restart: {e}"));
        n.node = Some(node);
    }

    pub async fn bind(&self, i: usize, address: &str, mxid: &str) -> Value {
        self.nodes[i]
            .node()
            .internal_3pid("bind", address, mxid)
            .await
    }

    pub async fn unbind(&self, i: usize, address: &str, mxid: &str) {
        self.nodes[i]
            .node()
            .internal_3pid("unbind", address, mxid)
            .await;
    }

    /// The mxid node `i` answers for `address` (None: no binding).
    pub async fn lookup(&self, i: usize, address: &str) -> Option<String> {
        self.nodes[i].node().lookup_mxid(address).await
    }

    /// Waits until every node in `on` answers `expected` for `address`.
    pub async fn wait_lookup(&self, on: &[usize], address: &str, expected: Option<&str>) {
        let deadline = Instant::now() + Duration::from_secs(30);
        for &i in on {
            loop {
                let got = self.lookup(i, address).await;
                if got.as_deref() == expected {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "node {} answers {got:?} for {address}, expected {expected:?}; its log:\n{}",
                    self.nodes[i].name,
                    tail(&self.nodes[i].node().log_text())
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Starts the node of `dir` on its `sydent.conf`, with environment `env`.
fn start_node(dir: &Path, env: &[(String, String)]) -> Result<TestNode, String> {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    TestNode::start_with_env(dir, &dir.join("sydent.conf"), &env)
}

/// Keeps a stopped node's port from other tests' nodes until it restarts there: a listener that
/// closes every connection at once, so a push to it fails as fast as to a closed port. Dropping
/// it frees the port.
pub struct PortHold {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PortHold {
    pub fn new(port: u16) -> Self {
        let listener = std::net::TcpListener::bind(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("holding port {port}: {e}"));
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if listener.accept().is_err() {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            })
        };
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for PortHold {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

pub fn port_of(addr: &str) -> u16 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

pub fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
