//! Test nodes: a temp directory with a `sydent.conf`, the real binary started on ports the OS
//! picks (port 0; the node logs the addresses it got), stopped with SIGTERM or killed.

#![allow(dead_code)] // not every test module uses every helper

pub mod matrix_hs;
pub mod postgres;
pub mod slapd;
pub mod sms_gateway;
mod test_ca;

pub use test_ca::TestCa;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod smtp;

pub const BINARY: &str = env!("CARGO_BIN_EXE_sydent-rs");
/// How long a node may take to start (a debug build on a busy 2-core machine).
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The HTTP client for the tests (plain HTTP; the rustls provider must be chosen first). One
/// per test thread: building a client loads the system roots, far slower than a request, and
/// its pooled connections belong to the test's runtime.
pub fn client() -> reqwest::Client {
    thread_local! {
        static CLIENT: reqwest::Client = {
            let _ = rustls::crypto::ring::default_provider().install_default();
            reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .expect("reqwest client builds")
        };
    }
    CLIENT.with(reqwest::Client::clone)
}

/// The config lines every test node gets: loopback, OS-picked ports, files in its own dir.
pub fn base_config(dir: &Path, server_name: &str) -> String {
    format!(
        "[general]\nserver.name = {server_name}\npidfile.path = {dir}/sydent.pid\n\
         [db]\ndb.file = {dir}/sydent.db\n\
         [http]\nclientapi.http.bind_address = 127.0.0.1\nclientapi.http.port = 0\n\
         clientapi.http.workers = 1\n\
         internalapi.http.bind_address = 127.0.0.1\ninternalapi.http.port = 0\n",
        dir = dir.display()
    )
}

pub struct TestNode {
    pub dir: PathBuf,
    pub config_path: PathBuf,
    child: Option<Child>,
    /// Everything the node wrote to stderr so far.
    pub log: Arc<Mutex<String>>,
    /// e.g. `http://127.0.0.1:41234` (`https://…` when plain HTTP is off)
    pub client_url: String,
    /// The client API over HTTPS, when `clientapi.https.port` is set.
    pub client_https_url: Option<String>,
    pub internal_url: Option<String>,
    /// e.g. `127.0.0.1:41235`, when replication is on.
    pub replication_addr: Option<String>,
}

impl TestNode {
    /// Starts the binary with `--config <config_path>` and waits until it serves.
    pub fn start(dir: &Path, config_path: &Path) -> Result<TestNode, String> {
        Self::start_with_env(dir, config_path, &[])
    }

    /// [`Self::start`] with these environment variables.
    pub fn start_with_env(
        dir: &Path,
        config_path: &Path,
        env: &[(&str, &str)],
    ) -> Result<TestNode, String> {
        Self::start_cmd(
            dir,
            config_path,
            Command::new(BINARY)
                .arg("--config")
                .arg(config_path)
                .envs(env.iter().copied()),
        )
    }

    /// Writes `config` to `<dir>/sydent.conf` and starts a node on it.
    pub fn start_with_config(dir: &Path, config: &str) -> TestNode {
        let path = dir.join("sydent.conf");
        std::fs::write(&path, config).expect("write config");
        Self::start(dir, &path).unwrap_or_else(|e| panic!("node did not start: {e}"))
    }

    pub fn start_cmd(
        dir: &Path,
        config_path: &Path,
        cmd: &mut Command,
    ) -> Result<TestNode, String> {
        let mut child = cmd
            .current_dir(dir)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn {BINARY}: {e}"))?;
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel::<String>();
        let stderr = child.stderr.take().expect("piped stderr");
        {
            let log = Arc::clone(&log);
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    log.lock().unwrap().push_str(&format!("{line}\n"));
                    let _ = tx.send(line);
                }
            });
        }
        // With `log.path` set the node logs to that file: follow it instead, for as long as the
        // node's log is kept (by the TestNode or the stderr reader).
        let log_file = std::fs::read_to_string(config_path).ok().and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("log.path = ")
                    .map(|p| PathBuf::from(p.trim()))
            })
        });
        if let Some(path) = log_file {
            let log = Arc::downgrade(&log);
            std::thread::spawn(move || {
                let mut seen = 0;
                while let Some(log) = log.upgrade() {
                    let text = std::fs::read(&path).unwrap_or_default();
                    // Whole lines only: one being written is read on the next round.
                    let end = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
                    for line in
                        String::from_utf8_lossy(text.get(seen..end).unwrap_or_default()).lines()
                    {
                        log.lock().unwrap().push_str(&format!("{line}\n"));
                        let _ = tx.send(line.to_string()); // heard only while starting
                    }
                    seen = seen.max(end);
                    drop(log);
                    std::thread::sleep(Duration::from_millis(20));
                }
            });
        }
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.contains("client API on http") => {
                    // With replication on, its address follows on the next line.
                    let replication_on = std::fs::read_to_string(config_path)
                        .is_ok_and(|c| c.contains("replication.https.certfile = /"));
                    let mut replication_addr = None;
                    if replication_on {
                        let left = deadline.saturating_duration_since(Instant::now());
                        while let Ok(next) = rx.recv_timeout(left) {
                            if let Some(rest) = next.split("replication on https://").nth(1) {
                                replication_addr =
                                    rest.split([',', ' ']).next().map(str::to_string);
                                break;
                            }
                        }
                    }
                    if let Err(e) = wait_for_signal_handlers(child.id(), deadline) {
                        let _ = child.kill();
                        let _ = child.wait();
                        return Err(format!("{e}; its log:\n{}", log.lock().unwrap()));
                    }
                    let url_after = |marker: &str| {
                        line.split(marker).nth(1).map(|rest| {
                            format!("http://{}", rest.split([',', ' ']).next().unwrap_or(""))
                        })
                    };
                    return Ok(TestNode {
                        dir: dir.to_path_buf(),
                        config_path: config_path.to_path_buf(),
                        child: Some(child),
                        log,
                        // The plain URL, or the HTTPS one when plain HTTP is off.
                        client_url: line
                            .split("client API on ")
                            .nth(1)
                            .and_then(|rest| rest.split([',', ' ']).next())
                            .expect("client url")
                            .to_string(),
                        client_https_url: line.split("https://").nth(1).map(|rest| {
                            format!("https://{}", rest.split([',', ' ']).next().unwrap_or(""))
                        }),
                        internal_url: url_after("internal API on http://"),
                        replication_addr,
                    });
                }
                Ok(_) => continue,
                Err(_) => {
                    let status = child.try_wait().ok().flatten();
                    let _ = child.kill();
                    let _ = child.wait();
                    std::thread::sleep(Duration::from_millis(100)); // let the reader drain
                    return Err(format!(
                        "node exited or timed out (status {status:?}); its log:\n{}",
                        log.lock().unwrap()
                    ));
                }
            }
        }
    }

    pub fn internal(&self) -> &str {
        self.internal_url.as_deref().expect("internal API enabled")
    }

    /// The running process, for tests that signal it themselves.
    pub fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("running")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGTERM, then wait for the exit.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        signal(child.id(), "TERM");
        wait_with_deadline(&mut child, Duration::from_secs(20))
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// POST JSON to the internal API; returns (status, body).
    pub async fn internal_post(&self, path: &str, body: &Value) -> (u16, Value) {
        let resp = client()
            .post(format!("{}{path}", self.internal()))
            .json(body)
            .send()
            .await
            .expect("internal API answers");
        let status = resp.status().as_u16();
        (status, resp.json().await.expect("JSON body"))
    }

    /// Bind or unbind `address` (an email) on the internal API; asserts 200 and returns the
    /// answer.
    pub async fn internal_3pid(&self, what: &str, address: &str, mxid: &str) -> Value {
        let (status, body) = self
            .internal_post(
                &format!("/_matrix/identity/internal/{what}"),
                &serde_json::json!({"medium": "email", "address": address, "mxid": mxid}),
            )
            .await;
        assert_eq!(status, 200, "{what} {address}: {body}");
        body
    }

    /// Waits until the node's log contains `needle`.
    pub async fn wait_for_log(&self, needle: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.log_text().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in the log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// GET on the client API; returns (status, body).
    pub async fn get(&self, path_and_query: &str) -> (u16, Value) {
        let resp = client()
            .get(format!("{}{path_and_query}", self.client_url))
            .send()
            .await
            .expect("client API answers");
        let status = resp.status().as_u16();
        (status, resp.json().await.expect("JSON body"))
    }

    /// The mxid a v1 lookup answers for the email `address` (None: no binding).
    pub async fn lookup_mxid(&self, address: &str) -> Option<String> {
        let (status, body) = self
            .get(&format!(
                "/_matrix/identity/api/v1/lookup?medium=email&address={}",
                address.replace('@', "%40")
            ))
            .await;
        assert_eq!(status, 200, "{body}");
        body["mxid"].as_str().map(str::to_string)
    }

    /// POST JSON to the client API; returns (status, body).
    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let resp = client()
            .post(format!("{}{path}", self.client_url))
            .json(body)
            .send()
            .await
            .expect("client API answers");
        let status = resp.status().as_u16();
        (status, resp.json().await.expect("JSON body"))
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until process `pid` catches SIGTERM, SIGINT and SIGHUP (`SigCgt` in
/// `/proc/<pid>/status`). A node logs that it serves before it installs its handlers (in
/// `main`, after `Node::start` returns), and a signal in between kills it outright: a test
/// that stops or HUPs a node right after start must not land there.
fn wait_for_signal_handlers(pid: u32, deadline: Instant) -> Result<(), String> {
    // Bit n - 1 for signal n: SIGTERM 15, SIGINT 2, SIGHUP 1.
    const WANTED: u64 = (1 << 14) | (1 << 1) | 1;
    loop {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .map_err(|e| format!("reading /proc/{pid}/status: {e}"))?;
        let caught = status
            .lines()
            .find_map(|l| l.strip_prefix("SigCgt:"))
            .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
            .unwrap_or(0);
        if caught & WANTED == WANTED {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the node never caught SIGTERM, SIGINT and SIGHUP (SigCgt {caught:x})"
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

pub fn signal(pid: u32, name: &str) {
    Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .expect("kill(1) runs");
}

pub fn wait_with_deadline(child: &mut Child, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("process did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs the binary to completion (for commands and for startups that must fail); one that is
/// still running after 30 s (a node that started when it should not have) is killed and fails
/// the test.
pub fn run_to_exit(dir: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    use std::io::Read;
    let mut child = Command::new(BINARY)
        .args(args)
        .current_dir(dir)
        .env_remove("SYDENT_CONF")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("binary runs");
    let read_all = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let stdout = read_all(Box::new(child.stdout.take().expect("piped stdout")));
    let stderr = read_all(Box::new(child.stderr.take().expect("piped stderr")));
    let status = wait_with_deadline(&mut child, Duration::from_secs(30));
    (
        status.code(),
        stdout.join().expect("stdout reader"),
        stderr.join().expect("stderr reader"),
    )
}

/// A loopback port free right now (for configs that must name their port before start; a
/// node itself is given port 0).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free loopback port")
}

/// GET `url`, its JSON body.
pub async fn get_json(url: &str) -> Value {
    client()
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .json()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: not JSON: {e}"))
}

/// The test vectors made with Sydent's Python libraries.
pub fn vectors() -> Value {
    serde_json::from_str(include_str!("../../vectors/matrix-signing.json")).expect("vectors parse")
}

/// Runs one of the idempotent set-up scripts under `tests/` (`tests/sydent/setup.sh`, ...)
/// with `args` and returns the last line it printed on stdout: the path it set up. Its stderr
/// shows in the test's output; a failure stops the test with `failure`.
pub fn set_up(script: &str, args: &[&std::ffi::OsStr], failure: &str) -> PathBuf {
    let out = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join(script))
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .expect("bash runs");
    assert!(out.status.success(), "{script} failed: {failure}");
    let stdout = String::from_utf8(out.stdout).expect("a UTF-8 path");
    PathBuf::from(
        stdout
            .lines()
            .last()
            .expect("a path on the last line")
            .trim(),
    )
}
