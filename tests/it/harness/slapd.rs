//! A real OpenLDAP server for the directory tests: Debian's `slapd` (packages `slapd` and
//! `ldap-utils`, which .ci/run installs), started from a `slapd.conf` written into a
//! directory of the test's, with its mdb database there and the stock schemas (core, cosine,
//! inetorgperson, nis). It listens on `ldap://127.0.0.1:<port>/` (StartTLS offered) and
//! `ldaps://127.0.0.1:<port>/`, ports picked at run time, with a certificate from a
//! [`TestCa`] of its own for `localhost` and `127.0.0.1`.
//!
//! slapd runs in the foreground (`-d stats`) as whoever runs the tests, root or not:
//! everything it touches is in its directory. Its log has one line per operation, so a test
//! can count searches or see that StartTLS came before the bind. Entries are added, changed
//! and removed while it runs with `ldapadd`, `ldapmodify` and `ldapdelete` as the admin.
//! Like a directory admin would for a service account, answers are limited to 500 entries
//! but a paged search may read everything.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, TestCa};

pub const SUFFIX: &str = "dc=example,dc=org";
/// Where the tests' people live.
pub const PEOPLE: &str = "ou=people,dc=example,dc=org";
pub const ADMIN_DN: &str = "cn=admin,dc=example,dc=org";
pub const ADMIN_PW: &str = "admin-secret";

const SLAPD: &str = "/usr/sbin/slapd";
const START_TIMEOUT: Duration = Duration::from_secs(20);

pub struct Slapd {
    pub dir: PathBuf,
    pub port: u16,
    pub ldaps_port: u16,
    /// The CA file that vouches for the server's certificate.
    pub ca_file: PathBuf,
    child: Option<Child>,
    log_file: PathBuf,
}

impl Drop for Slapd {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Slapd {
    /// A running slapd in `<root>/slapd`, holding the suffix and [`PEOPLE`], nobody in it.
    pub fn start(root: &Path) -> Self {
        let dir = root.join("slapd");
        std::fs::create_dir_all(dir.join("db")).unwrap();
        let ca = TestCa::new("slapd test CA");
        let (cert, key) = ca.cert_for("localhost", &["localhost", "127.0.0.1"]);
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, &ca.cert_pem).unwrap();
        std::fs::write(dir.join("server.pem"), cert).unwrap();
        std::fs::write(dir.join("server.key"), key).unwrap();
        std::fs::write(dir.join("slapd.conf"), config(&dir)).unwrap();
        let mut slapd = Self {
            log_file: dir.join("slapd.log"),
            dir,
            port: free_port(),
            ldaps_port: free_port(),
            ca_file,
            child: None,
        };
        slapd.run();
        slapd.add(&format!(
            "dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\no: Example\n\
             dc: example\n\n\
             dn: {PEOPLE}\nobjectClass: organizationalUnit\nou: people\n"
        ));
        slapd
    }

    /// `ldap://127.0.0.1:<port>/` (plain, or StartTLS).
    pub fn uri(&self) -> String {
        format!("ldap://127.0.0.1:{}/", self.port)
    }

    /// `ldaps://127.0.0.1:<port>/`.
    pub fn ldaps_uri(&self) -> String {
        format!("ldaps://127.0.0.1:{}/", self.ldaps_port)
    }

    fn run(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_file)
            .unwrap();
        let child = Command::new(SLAPD)
            .arg("-d")
            .arg("stats")
            .arg("-f")
            .arg(self.dir.join("slapd.conf"))
            .arg("-h")
            .arg(format!("{} {}", self.uri(), self.ldaps_uri()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{SLAPD} does not start ({e}): apt-get install slapd"));
        self.child = Some(child);
        // Ready once it answers a search of the root DSE.
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("slapd exited ({status}):\n{}", self.log());
            }
            let answered = Command::new("ldapsearch")
                .args(["-x", "-LLL", "-s", "base", "-b", ""])
                .arg("-H")
                .arg(self.uri())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .expect("ldapsearch runs (apt-get install ldap-utils)")
                .success();
            if answered {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "slapd never answered:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills slapd: its ports refuse connections from now on; the database stays.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same ports, with the same entries.
    pub fn restart(&mut self) {
        self.stop();
        self.run();
    }

    /// Everything slapd logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    /// How many searches slapd has received so far (its checks of the root DSE included).
    pub fn searches(&self) -> usize {
        self.log().matches(" SRCH base=").count()
    }

    /// How many binds slapd has received so far.
    pub fn binds(&self) -> usize {
        self.log().matches(" BIND dn=").count()
    }

    /// Adds the entries of `ldif` (`dn: …` blocks separated by blank lines).
    pub fn add(&self, ldif: &str) {
        self.ldap_tool("ldapadd", &[], ldif);
    }

    /// Applies `ldif` changes (`changetype: modify` …).
    pub fn modify(&self, ldif: &str) {
        self.ldap_tool("ldapmodify", &[], ldif);
    }

    /// Removes the entry `dn`.
    pub fn delete(&self, dn: &str) {
        self.ldap_tool("ldapdelete", &[dn], "");
    }

    fn ldap_tool(&self, tool: &str, args: &[&str], stdin: &str) {
        let mut child = Command::new(tool)
            .args(["-x", "-D", ADMIN_DN, "-w", ADMIN_PW, "-H"])
            .arg(self.uri())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{tool} does not start ({e}): apt-get install ldap-utils"));
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{tool} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The person entry the tests use: `cn=<cn>` under [`PEOPLE`], with these extra lines
/// (`uid: …`, `mail: …`, `telephoneNumber: …`).
pub fn person(cn: &str, lines: &[&str]) -> String {
    let mut ldif =
        format!("dn: cn={cn},{PEOPLE}\nobjectClass: inetOrgPerson\ncn: {cn}\nsn: {cn}\n");
    for line in lines {
        ldif.push_str(line);
        ldif.push('\n');
    }
    ldif.push('\n');
    ldif
}

fn config(dir: &Path) -> String {
    let dir = dir.display();
    format!(
        "include /etc/ldap/schema/core.schema\n\
         include /etc/ldap/schema/cosine.schema\n\
         include /etc/ldap/schema/inetorgperson.schema\n\
         include /etc/ldap/schema/nis.schema\n\
         modulepath /usr/lib/ldap\n\
         moduleload back_mdb\n\
         pidfile {dir}/slapd.pid\n\
         argsfile {dir}/slapd.args\n\
         TLSCACertificateFile {dir}/ca.pem\n\
         TLSCertificateFile {dir}/server.pem\n\
         TLSCertificateKeyFile {dir}/server.key\n\
         sizelimit size.soft=500 size.hard=500 size.prtotal=unlimited\n\
         database mdb\n\
         maxsize 104857600\n\
         dbnosync\n\
         suffix \"{SUFFIX}\"\n\
         rootdn \"{ADMIN_DN}\"\n\
         rootpw {ADMIN_PW}\n\
         directory {dir}/db\n\
         index objectClass eq\n\
         index mail,telephoneNumber,uid eq\n"
    )
}
