//! The container image and `docker-compose.yml`, as an admin uses them (issue 13): the image is
//! built by `contrib/docker/build-image.sh` (static binary, FROM scratch, nothing pulled), the
//! mesh's files are made by `sydent-rs new-mesh`, and the three nodes run from the repository's
//! own compose file, under a project name, ports and paths of this test's own. A bind on node1
//! reaches node2 and node3; node3 stopped, then node2 cut off the network, each catches up
//! when it is back. A standalone container of the same image serves too. Everything made is
//! removed at the end, also when an assertion fails.
//!
//! When no Docker engine answers, the test prints a SKIP line and passes (the only test allowed
//! to: CI's machine has an engine).

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const BINARY: &str = env!("CARGO_BIN_EXE_sydent-rs");

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command) -> Output {
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?} did not run: {e}"));
    assert!(
        output.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

fn docker_answers() -> bool {
    Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `docker compose` when the v2 plugin exists, else `docker-compose` (1.29 here).
fn compose_cli() -> Vec<String> {
    let v2 = Command::new("docker")
        .args(["compose", "version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if v2 {
        vec!["docker".into(), "compose".into()]
    } else {
        vec!["docker-compose".into()]
    }
}

/// A loopback port free right now (this test binary does not share tests/it's harness).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// This test's compose project: the repository's file with this test's variables.
struct Project {
    cli: Vec<String>,
    name: String,
    env: Vec<(String, String)>,
    image: String,
    standalone: Option<(String, String)>,
}

impl Project {
    fn compose(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.cli[0]);
        cmd.args(&self.cli[1..])
            .arg("-f")
            .arg(repo().join("docker-compose.yml"))
            .arg("-p")
            .arg(&self.name)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    fn container(&self, service: &str) -> String {
        stdout(&run(&mut self.compose(&["ps", "-q", service])))
    }

    fn network(&self) -> String {
        // Compose names it <project>_mesh (both CLIs).
        format!("{}_mesh", self.name)
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        // Tear everything down, whatever happened: containers, network, volumes, the image.
        if let Some((container, volume)) = &self.standalone {
            let _ = Command::new("docker")
                .args(["rm", "-f", "-v", container])
                .output();
            let _ = Command::new("docker")
                .args(["volume", "rm", volume])
                .output();
        }
        let _ = self
            .compose(&["down", "-v", "--remove-orphans", "-t", "5"])
            .output();
        let _ = Command::new("docker")
            .args(["image", "rm", "-f", &self.image])
            .output();
    }
}

async fn get(url: &str) -> Option<Value> {
    let response = client().get(url).send().await.ok()?;
    if !response.status().is_success() {
        return None;
    }
    response.json().await.ok()
}

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

/// Polls `check` every 200 ms until it is true; fails after `limit` naming `what`.
async fn eventually<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn bind(internal: &str, address: &str, mxid: &str) {
    let response = client()
        .post(format!("{internal}/_matrix/identity/internal/bind"))
        .json(&json!({"medium": "email", "address": address, "mxid": mxid}))
        .send()
        .await
        .expect("bind request");
    assert_eq!(response.status(), 200, "bind {address}");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["mxid"], mxid);
    assert!(
        body["signatures"]["node1"]["ed25519:0"].is_string(),
        "{body}"
    );
}

async fn lookup(client_url: &str, address: &str) -> Option<String> {
    let url = format!(
        "{client_url}/_matrix/identity/api/v1/lookup?medium=email&address={}",
        address.replace('@', "%40")
    );
    get(&url).await?["mxid"].as_str().map(str::to_string)
}

/// Waits until every address in `addresses` is bound on the node at `client_url`.
async fn converged(node: &str, client_url: &str, addresses: &[String]) {
    for address in addresses {
        eventually(
            &format!("{address} looked up on {node}"),
            Duration::from_secs(60),
            || async { lookup(client_url, address).await.is_some() },
        )
        .await;
    }
}

fn addresses(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}@example.org")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_mesh_replicates_and_recovers_and_the_image_runs_standalone() {
    if !docker_answers() {
        println!("SKIP compose_mesh_replicates_and_recovers_and_the_image_runs_standalone: no Docker engine answers (`docker info` failed)");
        return;
    }
    let started = Instant::now();
    let id = format!("sydentrstest{}", std::process::id());
    let image = format!("sydent-rs:{id}");
    let files = tempfile::tempdir().unwrap();
    let certs = files.path().join("certs");
    let peers = files.path().join("peers.d");
    let ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
    let mut project = Project {
        cli: compose_cli(),
        name: id.clone(),
        env: vec![
            ("SYDENT_RS_IMAGE".into(), image.clone()),
            ("SYDENT_RS_CERTS".into(), certs.display().to_string()),
            ("SYDENT_RS_PEERS".into(), peers.display().to_string()),
            ("SYDENT_RS_NODE1_PORT".into(), ports[0].to_string()),
            ("SYDENT_RS_NODE1_INTERNAL_PORT".into(), ports[1].to_string()),
            ("SYDENT_RS_NODE2_PORT".into(), ports[2].to_string()),
            ("SYDENT_RS_NODE3_PORT".into(), ports[3].to_string()),
        ],
        image: image.clone(),
        standalone: None,
    };

    // The image: the documented script, a static binary in a scratch image.
    run(Command::new(repo().join("contrib/docker/build-image.sh")).arg(&image));
    let inspect = stdout(&run(Command::new("docker").args([
        "image",
        "inspect",
        "-f",
        "{{.Size}} {{.Config.User}} {{json .Config.Healthcheck.Test}}",
        &image,
    ])));
    let mut parts = inspect.splitn(3, ' ');
    let size: u64 = parts.next().unwrap().parse().unwrap();
    assert!(size <= 30_000_000, "image is {size} bytes");
    assert_eq!(parts.next(), Some("10001:10001"), "runs as a non-root user");
    assert!(parts.next().unwrap().contains("healthcheck"), "{inspect}");

    // The mesh's files, as the README makes them.
    let made = run(Command::new(BINARY)
        .args(["new-mesh", "--certs"])
        .arg(&certs)
        .arg("--peers")
        .arg(&peers)
        .args(["node1", "node2", "node3"]));
    assert!(
        stdout(&made).contains("peers.d/node3.conf"),
        "{}",
        stdout(&made)
    );
    let gid = std::fs::metadata(certs.join("node1/node1.key"))
        .map(|m| std::os::unix::fs::MetadataExt::gid(&m))
        .unwrap();
    project
        .env
        .push(("SYDENT_RS_CERTS_GID".into(), gid.to_string()));

    run(&mut project.compose(&["up", "-d", "--no-build"]));
    let node1 = format!("http://127.0.0.1:{}", ports[0]);
    let internal = format!("http://127.0.0.1:{}", ports[1]);
    let node2 = format!("http://127.0.0.1:{}", ports[2]);
    let node3 = format!("http://127.0.0.1:{}", ports[3]);
    for url in [&node1, &node2, &node3, &internal] {
        let status = if url == &internal {
            format!("{url}/_matrix/identity/internal/replication")
        } else {
            format!("{url}/_matrix/identity/api/v1")
        };
        eventually(
            &format!("{status} answers"),
            Duration::from_secs(60),
            || async { get(&status).await.is_some() },
        )
        .await;
    }
    // The containers' own health check (the binary checking itself) says healthy.
    for service in ["node1", "node2", "node3"] {
        let container = project.container(service);
        eventually(
            &format!("{service} healthy"),
            Duration::from_secs(60),
            || {
                let container = container.clone();
                async move {
                    let out = Command::new("docker")
                        .args(["inspect", "-f", "{{.State.Health.Status}}", &container])
                        .output()
                        .unwrap();
                    stdout(&out) == "healthy"
                }
            },
        )
        .await;
    }

    // A bind on node1 reaches node2 and node3 over mutual TLS.
    let first = addresses("first", 1);
    bind(&internal, &first[0], "@alice:node1").await;
    converged("node2", &node2, &first).await;
    converged("node3", &node3, &first).await;
    assert_eq!(
        lookup(&node3, &first[0]).await.as_deref(),
        Some("@alice:node1")
    );
    // node1's status page (through the published internal API) counts the push to both
    // peers once their answers are in: a peer serves the row before node1 has read its answer.
    let status_url = format!("{internal}/_matrix/identity/internal/replication");
    eventually(
        "node1's status page shows a push to node2 and node3",
        Duration::from_secs(30),
        || async {
            let status = get(&status_url).await.unwrap_or_default();
            ["node2", "node3"]
                .iter()
                .all(|peer| status["peers"][peer]["pushed"].as_u64().unwrap_or(0) >= 1)
        },
    )
    .await;

    // node3 stopped: binds go on; started again, it catches up.
    run(&mut project.compose(&["stop", "-t", "5", "node3"]));
    let while_stopped = addresses("stopped", 20);
    for address in &while_stopped {
        bind(&internal, address, "@bob:node1").await;
    }
    converged("node2", &node2, &while_stopped).await;
    run(&mut project.compose(&["start", "node3"]));
    converged("node3", &node3, &while_stopped).await;

    // node2 cut off the network: binds go on; reconnected, it catches up.
    let container2 = project.container("node2");
    run(Command::new("docker").args(["network", "disconnect", &project.network(), &container2]));
    let while_cut_off = addresses("partitioned", 20);
    for address in &while_cut_off {
        bind(&internal, address, "@carol:node1").await;
    }
    converged("node3", &node3, &while_cut_off).await;
    run(Command::new("docker").args([
        "network",
        "connect",
        "--alias",
        "node2",
        &project.network(),
        &container2,
    ]));
    converged("node2", &node2, &while_cut_off).await;
    converged("node2", &node2, &first).await;

    // The same image as a standalone node: a volume, a server name, nothing else.
    let volume = format!("{id}-standalone");
    let port = free_port();
    let internal_port = free_port();
    let container = stdout(&run(Command::new("docker").args([
        "run",
        "-d",
        "--name",
        &format!("{id}-standalone"),
        "-v",
        &format!("{volume}:/data"),
        "-e",
        "SYDENT_SERVER_NAME=id.example.test",
        "-p",
        &format!("127.0.0.1:{port}:8090"),
        "-p",
        &format!("127.0.0.1:{internal_port}:8091"),
        &image,
    ])));
    project.standalone = Some((container, volume));
    let standalone = format!("http://127.0.0.1:{port}");
    let standalone_internal = format!("http://127.0.0.1:{internal_port}");
    eventually(
        "the standalone container answers",
        Duration::from_secs(60),
        || async {
            get(&format!("{standalone}/_matrix/identity/api/v1"))
                .await
                .is_some()
        },
    )
    .await;
    let response = client()
        .post(format!(
            "{standalone_internal}/_matrix/identity/internal/bind"
        ))
        .json(&json!({"medium": "email", "address": "solo@example.org", "mxid": "@solo:example.test"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    // It wrote its config (with a new key) into the volume, named as told.
    assert!(
        body["signatures"]["id.example.test"]["ed25519:0"].is_string(),
        "{body}"
    );
    assert_eq!(
        lookup(&standalone, "solo@example.org").await.as_deref(),
        Some("@solo:example.test")
    );

    drop(project);
    let left = stdout(&run(Command::new("docker").args([
        "ps",
        "-a",
        "-q",
        "--filter",
        &format!("name={id}"),
    ])));
    assert!(left.is_empty(), "containers left: {left}");
    println!(
        "docker mesh test took {:.0} s",
        started.elapsed().as_secs_f64()
    );
}
