//! A real SMTP server for the tests: aiosmtpd (from PyPI, in a venv of its own made by
//! tests/smtp/setup.sh), saving each message it accepts as `<n>.eml` and its envelope as
//! `<n>.json` in a directory.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;

/// A running aiosmtpd that saves what it receives in `dir`.
pub struct Sink {
    pub port: u16,
    pub dir: PathBuf,
    child: Child,
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Sink {
    /// Stops the server: its port refuses connections from now on.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn smtp_python() -> String {
    let out = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/smtp/setup.sh"))
        .output()
        .expect("tests/smtp/setup.sh runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap()
        .trim()
        .to_string()
}

impl Sink {
    pub fn start(root: &Path, mode: &str, tls: Option<(&Path, &Path)>) -> Self {
        let port = free_port();
        let dir = root.join(format!("mail-{mode}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut cmd = Command::new(smtp_python());
        cmd.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/smtp/sink.py"))
            .arg(port.to_string())
            .arg(&dir)
            .arg(mode);
        if let Some((cert, key)) = tls {
            cmd.arg(cert).arg(key);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready");
        Self { port, dir, child }
    }

    /// The n-th message received (from 1) and its envelope, waiting for it.
    pub fn received(&self, n: usize) -> (String, serde_json::Value) {
        let envelope = self.dir.join(format!("{n}.json"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !envelope.exists() {
            assert!(Instant::now() < deadline, "message {n} never arrived");
            std::thread::sleep(Duration::from_millis(20));
        }
        (
            std::fs::read_to_string(self.dir.join(format!("{n}.eml"))).unwrap(),
            serde_json::from_str(&std::fs::read_to_string(envelope).unwrap()).unwrap(),
        )
    }
}

impl Sink {
    /// How many messages have arrived so far.
    pub fn count(&self) -> usize {
        (1..)
            .take_while(|n| self.dir.join(format!("{n}.json")).exists())
            .count()
    }
}
