//! `sydent-rs new-mesh`: everything a mesh of nodes needs, made in one step, with no OpenSSL: a
//! mesh CA, and per node a certificate (CN and DNS name = the node's name; server and client
//! authentication), a complete `sydent.conf` holding a new signing key, and the node's file in
//! the shared `peers.d`. Two layouts: for the containers of `docker-compose.yml` (paths inside
//! the container, standard ports), or `local` for several nodes on this host (loopback
//! addresses in the certificates, a port range per node, host paths).
//!
//! Secrets are never replaced without `force`: a CA, certificate or config that exists is kept,
//! so re-running with one more node name adds that node to the mesh.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::config::Config;
use crate::crypto::NodeSigningKey;
use crate::types::ServerName;

/// Where the files of a container node are, inside its container (`docker-compose.yml` mounts
/// `certs/<node>/` here, read-only).
pub const CONTAINER_NODE_DIR: &str = "/etc/sydent-rs";
/// Where the shared `peers.d` is mounted inside the containers.
pub const CONTAINER_PEERS_DIR: &str = "/peers.d";
/// The container's data volume (database and pid file), as in Sydent's image.
pub const CONTAINER_DATA_DIR: &str = "/data";

/// At most this many nodes in the `local` layout (each takes a block of 1,000 ports).
const MAX_LOCAL_NODES: usize = 50;

#[derive(Debug, thiserror::Error)]
pub enum NewMeshError {
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("certificate: {0}")]
    Certificate(#[from] rcgen::Error),
}

fn file_error(path: &Path, e: impl std::fmt::Display) -> NewMeshError {
    NewMeshError::File {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// What to make.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The mesh CA goes here, each node's files in a directory of its own under it.
    pub certs_dir: PathBuf,
    /// The shared peers directory; one `<node>.conf` per node is written.
    pub peers_dir: PathBuf,
    pub nodes: Vec<String>,
    /// Several nodes on this host: loopback addresses in the certificates, node i (from 1)
    /// on ports 10090 + 1000·i (client), 10091 + 1000·i (internal), 10434 + 1000·i
    /// (replication), 10095 + 1000·i (metrics), host paths. Otherwise the container layout
    /// (metrics on 9095).
    pub local: bool,
    /// Replace existing keys, certificates and configs.
    pub force: bool,
}

/// One node's files, as [`new_mesh`] left them.
#[derive(Debug, Clone)]
pub struct NodeFiles {
    pub name: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub peer_file: PathBuf,
    pub replication_url: String,
}

/// What [`new_mesh`] did: one line per file made or kept, and the nodes.
#[derive(Debug, Default)]
pub struct Outcome {
    pub lines: Vec<String>,
    pub nodes: Vec<NodeFiles>,
}

/// Makes (or completes) the mesh the plan describes.
pub fn new_mesh(plan: &Plan) -> Result<Outcome, NewMeshError> {
    let names = check_names(&plan.nodes, plan.local)?;
    let mut out = Outcome::default();
    make_dir(&plan.certs_dir, 0o755)?;
    make_dir(&plan.peers_dir, 0o755)?;
    // Host paths are written into the local configs: make them absolute.
    let certs_dir = absolute(&plan.certs_dir)?;
    let peers_dir = absolute(&plan.peers_dir)?;

    let (ca, ca_pem, ca_new) = mesh_ca(&certs_dir, plan.force, &mut out)?;
    for (index, name) in names.iter().enumerate() {
        let node = node_files(
            plan,
            &certs_dir,
            &peers_dir,
            index + 1,
            name,
            (&ca, &ca_pem, ca_new),
            &mut out,
        )?;
        out.nodes.push(node);
    }
    Ok(out)
}

fn check_names(nodes: &[String], local: bool) -> Result<Vec<ServerName>, NewMeshError> {
    if nodes.is_empty() {
        return Err(NewMeshError::Invalid("name at least one node".into()));
    }
    if local && nodes.len() > MAX_LOCAL_NODES {
        return Err(NewMeshError::Invalid(format!(
            "at most {MAX_LOCAL_NODES} nodes with --local"
        )));
    }
    let mut names = Vec::new();
    for node in nodes {
        // A host name: it is a directory, a file name, a DNS name in a certificate and a
        // container's name.
        let plain = !node.is_empty()
            && node
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
            && !node.starts_with(['-', '.']);
        let name = ServerName::parse(&node.to_ascii_lowercase())
            .ok()
            .filter(|_| plain)
            .ok_or_else(|| {
                NewMeshError::Invalid(format!(
                    "'{node}' is not a host name (letters, digits, '-' and '.'; no port)"
                ))
            })?;
        if names.contains(&name) {
            return Err(NewMeshError::Invalid(format!("'{node}' is named twice")));
        }
        names.push(name);
    }
    Ok(names)
}

type Ca = Issuer<'static, KeyPair>;

/// The mesh CA: loaded when both its files exist (unless `force`), else made.
fn mesh_ca(dir: &Path, force: bool, out: &mut Outcome) -> Result<(Ca, String, bool), NewMeshError> {
    let cert_path = dir.join("mesh-ca.pem");
    let key_path = dir.join("mesh-ca.key");
    if !force && (cert_path.exists() || key_path.exists()) {
        let cert_pem = read(&cert_path)?;
        let key_pem = read(&key_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| file_error(&key_path, e))?;
        let ca = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| file_error(&cert_path, e))?;
        out.lines
            .push(format!("kept    {} (and its key)", cert_path.display()));
        return Ok((ca, cert_pem, false));
    }
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "sydent-rs mesh CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2046, 1, 1);
    let cert = params.self_signed(&key)?;
    write_file(&key_path, &key.serialize_pem(), 0o600)?;
    write_file(&cert_path, &cert.pem(), 0o644)?;
    out.lines.push(format!(
        "made    {} and {} (keep the key offline: it issues every node's certificate)",
        cert_path.display(),
        key_path.display()
    ));
    Ok((Issuer::new(params, key), cert.pem(), true))
}

#[allow(clippy::too_many_arguments)]
fn node_files(
    plan: &Plan,
    certs_dir: &Path,
    peers_dir: &Path,
    index: usize,
    name: &ServerName,
    (ca, ca_pem, ca_new): (&Ca, &str, bool),
    out: &mut Outcome,
) -> Result<NodeFiles, NewMeshError> {
    let dir = certs_dir.join(name.as_str());
    // Readable by the node's group: in a container the node runs as its own user, with the
    // group of these files added (docker-compose.yml's group_add).
    make_dir(&dir, 0o750)?;
    let cert_path = dir.join(format!("{name}.pem"));
    let key_path = dir.join(format!("{name}.key"));
    if plan.force || ca_new || !cert_path.exists() || !key_path.exists() {
        let (cert, key) = node_certificate(name, plan.local, ca)?;
        write_file(&key_path, &key, 0o640)?;
        write_file(&cert_path, &cert, 0o644)?;
        out.lines.push(format!("made    {}", cert_path.display()));
    } else {
        out.lines.push(format!("kept    {}", cert_path.display()));
    }
    write_file(&dir.join("mesh-ca.pem"), ca_pem, 0o644)?;

    let config_path = dir.join("sydent.conf");
    if plan.force || !config_path.exists() {
        let key = NodeSigningKey::generate();
        let text = node_config(plan.local, index, name, &dir, peers_dir, &key);
        write_file(&config_path, &text, 0o640)?;
        out.lines.push(format!("made    {}", config_path.display()));
    } else {
        out.lines.push(format!(
            "kept    {} (its signing key stays)",
            config_path.display()
        ));
    }
    // The peer file always follows the config as it is now.
    let loaded = Config::load(&config_path, &|_| None).map_err(|e| file_error(&config_path, e))?;
    let config = loaded.config;
    let host = if plan.local {
        "127.0.0.1".to_string()
    } else {
        name.to_string()
    };
    let replication_url = format!("https://{host}:{}", config.http.replication_port);
    let peer_file = peers_dir.join(format!("{name}.conf"));
    write_file(
        &peer_file,
        &super::peers::peer_file_text(
            &config.general.server_name,
            &replication_url,
            &config.crypto.signing_key.verify_key(),
        ),
        0o644,
    )?;
    out.lines.push(format!("wrote   {}", peer_file.display()));
    Ok(NodeFiles {
        name: name.to_string(),
        dir,
        config: config_path,
        peer_file,
        replication_url,
    })
}

/// (certificate PEM, key PEM) for a node, issued by the mesh CA.
fn node_certificate(name: &str, local: bool, ca: &Ca) -> Result<(String, String), NewMeshError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![name.to_string()])?;
    params.distinguished_name.push(DnType::CommonName, name);
    if local {
        params.subject_alt_names.extend([
            SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)),
        ]);
    }
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2046, 1, 1);
    let cert = params.signed_by(&key, ca)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The node's `sydent.conf`: every key with its default, plus its name, key, listeners,
/// certificate and peers.
fn node_config(
    local: bool,
    index: usize,
    name: &str,
    dir: &Path,
    peers_dir: &Path,
    key: &NodeSigningKey,
) -> String {
    let path_of = |file: &str| {
        if local {
            dir.join(file).display().to_string()
        } else {
            format!("{CONTAINER_NODE_DIR}/{file}")
        }
    };
    let (address, data, peers, ports) = if local {
        let base = 1000 * index as u32;
        (
            "127.0.0.1".to_string(),
            dir.display().to_string(),
            peers_dir.display().to_string(),
            (10090 + base, 10091 + base, 10434 + base, 10095 + base),
        )
    } else {
        (
            "::".to_string(),
            CONTAINER_DATA_DIR.to_string(),
            CONTAINER_PEERS_DIR.to_string(),
            (8090, 8091, 4434, 9095),
        )
    };
    crate::config::text_with(&[
        ("general", "server.name", name.to_string()),
        ("general", "pidfile.path", format!("{data}/sydent.pid")),
        ("general", "peers.path", peers),
        ("general", "prometheus_port", ports.3.to_string()),
        ("general", "prometheus_addr", address.clone()),
        ("db", "db.file", format!("{data}/sydent.db")),
        ("http", "clientapi.http.bind_address", address.clone()),
        ("http", "clientapi.http.port", ports.0.to_string()),
        ("http", "internalapi.http.bind_address", address.clone()),
        ("http", "internalapi.http.port", ports.1.to_string()),
        ("http", "replication.https.bind_address", address),
        ("http", "replication.https.port", ports.2.to_string()),
        (
            "http",
            "replication.https.certfile",
            path_of(&format!("{name}.pem")),
        ),
        (
            "http",
            "replication.https.keyfile",
            path_of(&format!("{name}.key")),
        ),
        ("http", "replication.https.cacert", path_of("mesh-ca.pem")),
        ("crypto", "ed25519.signingkey", key.to_sydent_string()),
    ])
}

fn absolute(path: &Path) -> Result<PathBuf, NewMeshError> {
    std::fs::canonicalize(path).map_err(|e| file_error(path, e))
}

fn make_dir(path: &Path, mode: u32) -> Result<(), NewMeshError> {
    std::fs::create_dir_all(path).map_err(|e| file_error(path, e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| file_error(path, e))
}

fn read(path: &Path) -> Result<String, NewMeshError> {
    std::fs::read_to_string(path).map_err(|e| {
        file_error(
            path,
            format!("{e} (the CA needs both mesh-ca.pem and mesh-ca.key; --force makes a new one)"),
        )
    })
}

/// Writes `text` to `path` with `mode`, through a temporary file and a rename.
fn write_file(path: &Path, text: &str, mode: u32) -> Result<(), NewMeshError> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        // A file left by an earlier run keeps its mode otherwise.
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| file_error(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::peers::parse_peer_file;
    use crate::mesh::tls::{certificate_names, MeshTls};

    fn plan(root: &Path, nodes: &[&str], local: bool) -> Plan {
        Plan {
            certs_dir: root.join("certs"),
            peers_dir: root.join("peers.d"),
            nodes: nodes.iter().map(|n| n.to_string()).collect(),
            local,
            force: false,
        }
    }

    #[test]
    fn local_mesh_configs_load_and_certificates_chain_to_the_ca() {
        let root = tempfile::tempdir().unwrap();
        let out = new_mesh(&plan(root.path(), &["node1", "node2"], true)).unwrap();
        assert_eq!(out.nodes.len(), 2);
        for (i, node) in out.nodes.iter().enumerate() {
            let config = Config::load(&node.config, &|_| None).unwrap().config;
            assert_eq!(config.general.server_name.as_str(), node.name);
            let base = 1000 * (i as u16 + 1);
            assert_eq!(config.http.replication_port, 10434 + base);
            assert_eq!(
                node.replication_url,
                format!("https://127.0.0.1:{}", 10434 + base)
            );
            // The certificate, key and CA work together as the node will load them.
            let tls = MeshTls::load(&config.http).unwrap().unwrap();
            assert!(!tls.system_roots);
            let names = certificate_names(&tls.chain[0]);
            assert!(names.contains(&node.name), "{names:?}");
            let peer = parse_peer_file(&std::fs::read_to_string(&node.peer_file).unwrap()).unwrap();
            assert_eq!(peer.server_name.as_str(), node.name);
            assert_eq!(
                peer.verify_key.to_base64(),
                config.crypto.signing_key.verify_key().to_base64()
            );
            let key_mode = std::fs::metadata(node.dir.join(format!("{}.key", node.name)))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(key_mode & 0o777, 0o640);
        }
        let ca_key_mode = std::fs::metadata(root.path().join("certs/mesh-ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(ca_key_mode & 0o777, 0o600);
    }

    #[test]
    fn rerunning_keeps_keys_and_adds_a_node() {
        let root = tempfile::tempdir().unwrap();
        new_mesh(&plan(root.path(), &["a.test", "b.test"], false)).unwrap();
        let config_a = root.path().join("certs/a.test/sydent.conf");
        let before = std::fs::read_to_string(&config_a).unwrap();
        let ca_before = std::fs::read_to_string(root.path().join("certs/mesh-ca.key")).unwrap();
        let out = new_mesh(&plan(root.path(), &["a.test", "b.test", "c.test"], false)).unwrap();
        assert_eq!(std::fs::read_to_string(&config_a).unwrap(), before);
        assert_eq!(
            std::fs::read_to_string(root.path().join("certs/mesh-ca.key")).unwrap(),
            ca_before
        );
        assert!(out
            .lines
            .iter()
            .any(|l| l.starts_with("kept") && l.contains("a.test")));
        // The new node's certificate is issued by the kept CA.
        let config = Config::load(&out.nodes[2].config, &|_| None)
            .unwrap()
            .config;
        assert!(config.http.replication_certfile.is_some());
        let c_cert = root.path().join("certs/c.test/c.test.pem");
        let tls = MeshTls::from_files(
            &c_cert,
            Some(&root.path().join("certs/c.test/c.test.key")),
            Some(&root.path().join("certs/mesh-ca.pem")),
        )
        .unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            tls.roots.clone(),
            crate::mesh::tls::provider(),
        )
        .build()
        .unwrap();
        verifier
            .verify_client_cert(&tls.chain[0], &[], rustls::pki_types::UnixTime::now())
            .expect("c.test's certificate chains to the kept CA");
        // Container layout: paths inside the container, the name as the URL's host.
        assert_eq!(out.nodes[2].replication_url, "https://c.test:4434");
        let text = std::fs::read_to_string(&out.nodes[2].config).unwrap();
        assert!(text.contains("replication.https.certfile = /etc/sydent-rs/c.test.pem"));
        assert!(text.contains("db.file = /data/sydent.db"));

        // --force replaces the key.
        let mut forced = plan(root.path(), &["a.test"], false);
        forced.force = true;
        new_mesh(&forced).unwrap();
        assert_ne!(std::fs::read_to_string(&config_a).unwrap(), before);
    }

    #[test]
    fn bad_names_are_refused_before_anything_is_written() {
        let root = tempfile::tempdir().unwrap();
        for bad in ["node1:8448", "../x", "", "-a", "a b"] {
            let err = new_mesh(&plan(root.path(), &[bad], false)).unwrap_err();
            assert!(err.to_string().contains("not a host name"), "{bad}: {err}");
        }
        let err = new_mesh(&plan(root.path(), &["a", "A"], false)).unwrap_err();
        assert!(err.to_string().contains("named twice"), "{err}");
        assert!(!root.path().join("certs").exists());
    }
}
