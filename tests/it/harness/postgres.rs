//! A real PostgreSQL server for the database tests: Debian's `postgresql` (which .ci/run
//! installs), a throw-away cluster made with `initdb` in a directory of its own, started with
//! `pg_ctl` on a loopback port picked at run time. Over TCP it takes TLS only (a certificate
//! for `localhost` and `127.0.0.1` from a [`TestCa`] of its own) and passwords (SCRAM);
//! the harness itself talks to it over its Unix socket with `psql`.
//!
//! PostgreSQL refuses to run as root: when the tests run as root, the cluster belongs to and
//! runs as the `postgres` user the package creates (`runuser`), in a directory under the
//! system's temporary directory that user can reach. `fsync` is off: a test's cluster never
//! outlives a crash of the machine.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::{free_port, TestCa};

pub const USER: &str = "postgres";
pub const PASSWORD: &str = "pg-secret";

pub struct Postgres {
    pub dir: PathBuf,
    pub port: u16,
    /// The CA file that vouches for the server's certificate.
    pub ca_file: PathBuf,
    bin: PathBuf,
    /// `runuser -u postgres --` when the tests run as root.
    as_user: Vec<String>,
    running: bool,
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.running {
            let _ = self.pg_ctl(&["-m", "immediate", "-w", "stop"]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The newest `/usr/lib/postgresql/<version>/bin`.
fn bin_dir() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is installed (.ci/run installs Debian's postgresql)")
        .filter_map(Result::ok)
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            Some((version, e.path().join("bin")))
        })
        .filter(|(_, bin)| bin.join("initdb").exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .expect("an initdb under /usr/lib/postgresql")
        .1
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|l| l.split_whitespace().next() == Some("0"))
        })
        .unwrap_or(false)
}

fn checked(output: Output, what: &str) -> String {
    assert!(
        output.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

impl Postgres {
    /// A running cluster, with only its `postgres` database and superuser.
    pub fn start() -> Self {
        let as_user: Vec<String> = if is_root() {
            ["runuser", "-u", USER, "--"].map(String::from).to_vec()
        } else {
            Vec::new()
        };
        let dir = std::env::temp_dir().join(format!(
            "sydent-rs-pg-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = TestCa::new("PostgreSQL test CA");
        let (cert, key) = ca.cert_for("localhost", &["localhost", "127.0.0.1"]);
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, &ca.cert_pem).unwrap();
        std::fs::write(dir.join("server.crt"), cert).unwrap();
        std::fs::write(dir.join("server.key"), key).unwrap();
        std::fs::write(dir.join("pw"), PASSWORD).unwrap();
        let mut pg = Self {
            dir,
            port: free_port(),
            ca_file,
            bin: bin_dir(),
            as_user,
            running: false,
        };
        if !pg.as_user.is_empty() {
            checked(
                Command::new("chown")
                    .args(["-R", &format!("{USER}:")])
                    .arg(&pg.dir)
                    .output()
                    .unwrap(),
                "chown",
            );
        }
        pg.run_as(
            "initdb",
            &[
                "-D",
                pg.data().to_str().unwrap(),
                "-U",
                USER,
                &format!("--pwfile={}", pg.dir.join("pw").display()),
                "-A",
                "scram-sha-256",
                "--auth-local=trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            ],
        );
        let data = pg.data();
        for file in ["server.crt", "server.key"] {
            std::fs::rename(pg.dir.join(file), data.join(file)).unwrap();
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            data.join("server.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let mut conf = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        conf.push_str(&format!(
            "port = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             fsync = off\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n",
            pg.port,
            pg.dir.display()
        ));
        std::fs::write(data.join("postgresql.conf"), conf).unwrap();
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 scram-sha-256\n\
             hostnossl all all 0.0.0.0/0 reject\n",
        )
        .unwrap();
        pg.start_server();
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn run_as(&self, program: &str, args: &[&str]) -> String {
        let program = self.bin.join(program);
        let (first, rest): (&Path, Vec<&str>) = match self.as_user.split_first() {
            Some((runuser, user_args)) => (
                Path::new(runuser.as_str()),
                user_args
                    .iter()
                    .map(String::as_str)
                    .chain([program.to_str().unwrap()])
                    .chain(args.iter().copied())
                    .collect(),
            ),
            None => (program.as_path(), args.to_vec()),
        };
        checked(
            Command::new(first).args(&rest).output().unwrap(),
            &format!("{} {}", program.display(), args.join(" ")),
        )
    }

    fn pg_ctl(&self, args: &[&str]) -> String {
        let (data, log) = (self.data(), self.dir.join("server.log"));
        let mut all = vec!["-D", data.to_str().unwrap(), "-l", log.to_str().unwrap()];
        all.extend_from_slice(args);
        self.run_as("pg_ctl", &all)
    }

    fn start_server(&mut self) {
        self.pg_ctl(&["-w", "-t", "30", "start"]);
        self.running = true;
    }

    /// Stops the server at once (as a crash would; `restart` brings it back).
    pub fn stop(&mut self) {
        self.pg_ctl(&["-m", "immediate", "-w", "stop"]);
        self.running = false;
    }

    /// Starts the server again on the same port and data.
    pub fn restart(&mut self) {
        if self.running {
            self.stop();
        }
        self.start_server();
    }

    /// `postgresql://postgres:<password>@localhost:<port>/<db>` with the password, or without
    /// it (`with_password` false: it comes from a file or PGPASSWORD).
    pub fn uri(&self, db: &str, with_password: bool) -> String {
        match with_password {
            true => format!(
                "postgresql://{USER}:{PASSWORD}@localhost:{}/{db}",
                self.port
            ),
            false => format!("postgresql://{USER}@localhost:{}/{db}", self.port),
        }
    }

    /// Runs `sql` with `psql` over the Unix socket, as the superuser, in `db`; answers its
    /// output (unaligned, tuples only).
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let port = self.port.to_string();
        self.run_as(
            "psql",
            &[
                "-h",
                self.dir.to_str().unwrap(),
                "-p",
                &port,
                "-U",
                USER,
                "-d",
                db,
                "-v",
                "ON_ERROR_STOP=1",
                "-At",
                "-c",
                sql,
            ],
        )
    }

    /// Makes an empty database `name`.
    pub fn create_db(&self, name: &str) {
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\""));
    }
}
