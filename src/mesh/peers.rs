//! Who the peers are: files in `peers.d` (one INI file per peer, shareable by the whole mesh),
//! plus Sydent's ways — `peers`/`peer_pubkeys` rows in the database, with the push URL from a
//! `[peer.NAME] base_replication_url` section of sydent.conf.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::config::PeerSection;
use crate::crypto::VerifyKey;
use crate::types::ServerName;

/// Where the push for a peer goes: Sydent's path under its base URL.
pub const PUSH_PATH: &str = "_matrix/identity/replicate/v1/push";
/// Where a peer reads back what this node holds of an origin's bindings (sydent-rs only: a
/// node rebuilt from its peers, `crate::rebuild`).
pub const HELD_PATH: &str = "_matrix/identity/replicate/v1/associations";

/// Sydent's DB peers with no port and no `[peer.NAME]` section: Sydent falls back to port
/// 1001, which nothing listens on; the replication listener's default is 4434.
const DEFAULT_PEER_PORT: i64 = 4434;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerSource {
    File(PathBuf),
    Database,
}

impl std::fmt::Display for PeerSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(path) => write!(f, "{}", path.display()),
            Self::Database => f.write_str("database (peers table)"),
        }
    }
}

/// One replication peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Its `server.name`: the name it signs with and its certificate names.
    pub server_name: ServerName,
    /// e.g. `https://node2.example.org:4434` (no trailing slash).
    pub base_url: String,
    pub verify_key: VerifyKey,
    pub source: PeerSource,
}

impl Peer {
    pub fn push_url(&self) -> String {
        format!("{}/{PUSH_PATH}", self.base_url.trim_end_matches('/'))
    }

    pub fn held_url(&self) -> String {
        format!("{}/{HELD_PATH}", self.base_url.trim_end_matches('/'))
    }
}

/// A peer file, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerFile {
    pub server_name: ServerName,
    pub base_url: String,
    pub verify_key: VerifyKey,
}

/// The text of this node's own peer file, for the other nodes' peers.d.
pub fn peer_file_text(server_name: &str, base_url: &str, verify_key: &VerifyKey) -> String {
    format!(
        "# Replication peer {server_name}: copy into the peers.d directory of every node of the mesh.\n\
         [peer]\nserver_name = {server_name}\nbase_replication_url = {base_url}\npublic_key = {}\n",
        verify_key.to_base64()
    )
}

/// Checks a base replication URL: https, a host, no query.
pub fn check_base_url(url: &str) -> Result<String, String> {
    let url = url.trim().trim_end_matches('/');
    let Some(rest) = url.strip_prefix("https://") else {
        return Err(format!(
            "base_replication_url '{url}' must start with https://"
        ));
    };
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() || rest.contains(['?', '#', ' ']) {
        return Err(format!(
            "base_replication_url '{url}' is not a valid https URL"
        ));
    }
    Ok(url.to_string())
}

/// Parses one peer file. The error names what is wrong (the caller adds the file name).
pub fn parse_peer_file(text: &str) -> Result<PeerFile, String> {
    let mut ini = configparser::ini::Ini::new();
    let mut defaults = ini.defaults();
    defaults.enable_inline_comments = false;
    ini.load_defaults(defaults);
    ini.read(text.to_string())
        .map_err(|e| format!("cannot parse: {e}"))?;
    if !ini.sections().iter().any(|s| s == "peer") {
        return Err("no [peer] section".into());
    }
    let get = |key: &str| -> Result<String, String> {
        ini.get("peer", key)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| format!("[peer] {key} is missing"))
    };
    let server_name = ServerName::parse(&get("server_name")?.to_ascii_lowercase())
        .map_err(|e| format!("[peer] server_name: {e}"))?;
    let base_url =
        check_base_url(&get("base_replication_url")?).map_err(|e| format!("[peer] {e}"))?;
    let verify_key = VerifyKey::from_base64(&get("public_key")?)
        .map_err(|e| format!("[peer] public_key: {e}"))?;
    Ok(PeerFile {
        server_name,
        base_url,
        verify_key,
    })
}

/// The outcome of reading peers.d: the peers by file, and one warning per file skipped.
#[derive(Debug, Default)]
pub struct Scan {
    pub peers: Vec<(PathBuf, PeerFile)>,
    pub problems: Vec<String>,
}

/// Reads every `*.conf` file of `dir` in name order. A missing directory is no peers; a
/// malformed file is reported and skipped.
pub fn scan_dir(dir: &Path) -> Scan {
    let mut scan = Scan::default();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return scan,
        Err(e) => {
            scan.problems
                .push(format!("peers: cannot read {}: {e}", dir.display()));
            return scan;
        }
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "conf") && p.is_file())
        .collect();
    paths.sort();
    for path in paths {
        match std::fs::read_to_string(&path)
            .map_err(|e| e.to_string())
            .and_then(|t| parse_peer_file(&t))
        {
            Ok(peer) => scan.peers.push((path, peer)),
            Err(e) => scan
                .problems
                .push(format!("peers: skipping {}: {e}", path.display())),
        }
    }
    scan
}

/// A peer row of Sydent's database: `peers` (active) joined with its ed25519 `peer_pubkeys`.
#[derive(Debug, Clone)]
pub struct DbPeer {
    pub name: String,
    pub port: Option<i64>,
    pub key: String,
}

/// Merges the sources into the active peer set, keyed by server name: peers.d first, then
/// database peers not named by a file. The node's own name is skipped everywhere.
pub fn merge(
    own_name: &str,
    scan: &Scan,
    db_peers: &[DbPeer],
    sections: &[PeerSection],
) -> (BTreeMap<String, Peer>, Vec<String>) {
    let mut peers = BTreeMap::new();
    let mut problems = Vec::new();
    for (path, file) in &scan.peers {
        if file.server_name == own_name {
            continue;
        }
        if let Some(first) = peers.get(file.server_name.as_str()) {
            let first: &Peer = first;
            problems.push(format!(
                "peers: skipping {}: {} is already defined by {}",
                path.display(),
                file.server_name,
                first.source
            ));
            continue;
        }
        peers.insert(
            file.server_name.to_string(),
            Peer {
                server_name: file.server_name.clone(),
                base_url: file.base_url.clone(),
                verify_key: file.verify_key,
                source: PeerSource::File(path.clone()),
            },
        );
    }
    for row in db_peers {
        let name = row.name.to_ascii_lowercase();
        if name == own_name || peers.contains_key(&name) {
            continue;
        }
        let server_name = match ServerName::parse(&name) {
            Ok(server_name) => server_name,
            Err(e) => {
                problems.push(format!("peers: skipping database peer: {e}"));
                continue;
            }
        };
        let key = match VerifyKey::from_base64(&row.key).or_else(|_| VerifyKey::from_hex(&row.key))
        {
            Ok(key) => key,
            Err(e) => {
                problems.push(format!(
                    "peers: skipping database peer {name}: peer_pubkeys key: {e}"
                ));
                continue;
            }
        };
        let base_url = match sections.iter().find(|s| s.name.eq_ignore_ascii_case(&name)) {
            Some(section) => match check_base_url(&section.base_replication_url) {
                Ok(url) => url,
                Err(e) => {
                    problems.push(format!(
                        "peers: skipping database peer {name}: [peer.{name}] {e}"
                    ));
                    continue;
                }
            },
            None => format!("https://{name}:{}", row.port.unwrap_or(DEFAULT_PEER_PORT)),
        };
        peers.insert(
            name.clone(),
            Peer {
                server_name,
                base_url,
                verify_key: key,
                source: PeerSource::Database,
            },
        );
    }
    (peers, problems)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::NodeSigningKey;

    fn key() -> VerifyKey {
        NodeSigningKey::generate().verify_key()
    }

    #[test]
    fn peer_file_round_trips_and_rejects_bad_files() {
        let k = key();
        let text = peer_file_text("node2.example.org", "https://node2.example.org:4434/", &k);
        let parsed = parse_peer_file(&text).unwrap();
        assert_eq!(
            parsed,
            PeerFile {
                server_name: ServerName::parse("node2.example.org").unwrap(),
                base_url: "https://node2.example.org:4434".into(),
                verify_key: k
            }
        );
        let cases = [
            ("", "no [peer] section"),
            ("[peer]\nserver_name = a.example\npublic_key = x\n", "[peer] base_replication_url is missing"),
            (
                "[peer]\nserver_name = a.example\nbase_replication_url = http://a.example\npublic_key = x\n",
                "must start with https://",
            ),
            (
                "[peer]\nserver_name = a.example\nbase_replication_url = https://a.example\npublic_key = nope\n",
                "[peer] public_key:",
            ),
            (
                "[peer]\nserver_name = bad name\nbase_replication_url = https://a.example\npublic_key = x\n",
                "not a valid server name",
            ),
        ];
        for (text, expected) in cases {
            let err = parse_peer_file(text).unwrap_err();
            assert!(err.contains(expected), "{text:?}: {err}");
        }
    }

    #[test]
    fn merge_skips_self_prefers_files_and_reads_sydent_rows() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (key(), key());
        std::fs::write(
            dir.path().join("me.conf"),
            peer_file_text("me.example", "https://me.example", &a),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("b.conf"),
            peer_file_text("b.example", "https://b.example:1", &b),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("b2.conf"),
            peer_file_text("b.example", "https://other", &b),
        )
        .unwrap();
        std::fs::write(dir.path().join("broken.conf"), "[peer]\n").unwrap();
        std::fs::write(dir.path().join("README.md"), "not a peer").unwrap();
        let scan = scan_dir(dir.path());
        assert_eq!(scan.peers.len(), 3);
        assert_eq!(scan.problems.len(), 1);
        assert!(
            scan.problems[0].contains("broken.conf"),
            "{:?}",
            scan.problems
        );
        let db = vec![
            DbPeer {
                name: "b.example".into(),
                port: None,
                key: a.to_base64(),
            },
            DbPeer {
                name: "c.example".into(),
                port: None,
                key: a.to_base64(),
            },
            DbPeer {
                name: "d.example".into(),
                port: Some(9),
                key: a.to_base64(),
            },
        ];
        let sections = vec![PeerSection {
            name: "c.example".into(),
            base_replication_url: "https://c-int:4434/".into(),
        }];
        let (peers, problems) = merge("me.example", &scan, &db, &sections);
        assert_eq!(
            peers.keys().collect::<Vec<_>>(),
            ["b.example", "c.example", "d.example"]
        );
        assert_eq!(peers["b.example"].base_url, "https://b.example:1");
        assert_eq!(peers["b.example"].verify_key, b);
        assert_eq!(
            peers["c.example"].push_url(),
            "https://c-int:4434/_matrix/identity/replicate/v1/push"
        );
        assert_eq!(peers["d.example"].base_url, "https://d.example:9");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("b2.conf"));
    }

    #[test]
    fn hex_keys_from_sydent_rows_are_accepted() {
        let k = key();
        let hex: String = crate::crypto::decode_base64(&k.to_base64())
            .unwrap()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(VerifyKey::from_hex(&hex).ok(), Some(k));
    }
}
