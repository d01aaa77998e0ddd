//! The `sydent-rs` command: runs a node (the default), or prints a new signing key.
//! Everything else lives in the library; this file only reads the command line, loads the
//! config, sets up logging and waits for a stop signal.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use sydent_rs::config::{Config, Loaded};
use sydent_rs::crypto::NodeSigningKey;
use sydent_rs::{Listeners, Node};

#[derive(Parser)]
#[command(
    version,
    about = "A Matrix identity server, drop-in for Sydent, with mutual-TLS replication"
)]
struct Cli {
    /// The config file (default: $SYDENT_CONF, else ./sydent.conf). Created with defaults and
    /// a new signing key if it does not exist.
    #[arg(long, short = 'c', value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Print a new value for `[crypto] ed25519.signingkey`.
    GenerateKey,
    /// Print this node's peers.d file (its name, replication URL and verify key), to copy into
    /// the peers.d directory of the other nodes of the mesh.
    PeerFile {
        /// The URL the other nodes reach this node's replication listener at,
        /// e.g. https://node1.example.org:4434
        #[arg(long)]
        url: String,
    },
    /// Forget everything a replication peer pushed (its bindings here and how far they had
    /// been applied), after that peer started again on a new database: its pushes are refused
    /// until then. Run it with this node stopped.
    ForgetOrigin {
        /// The peer's server name, as on the status page.
        server_name: String,
    },
    /// Rebuild this node's database from its replication peers, after it was lost: run it on
    /// an empty database (a new db.file), with the node stopped and the same signing key. It
    /// restores this node's bindings with their original ids (each verified with its own key),
    /// the peers' bindings, and where each peer's pushes resume; then start the node.
    RebuildFromPeers,
    /// Make a mesh: the mesh CA, and per node a certificate, a sydent.conf with a new signing
    /// key, and its file in the shared peers.d. Existing keys are kept (unless --force), so
    /// running it again with one more name adds a node.
    NewMesh {
        /// The nodes' names (host names: server.name, certificate name, container name).
        #[arg(required = true, value_name = "NAME")]
        nodes: Vec<String>,
        /// Nodes on this host: loopback addresses in the certificates, node i on ports
        /// 10090+1000i (client), 10091+1000i (internal), 10434+1000i (replication), host
        /// paths. Without it, the layout of docker-compose.yml's containers.
        #[arg(long)]
        local: bool,
        /// Where the CA and each node's directory go.
        #[arg(long, default_value = "certs", value_name = "DIR")]
        certs: PathBuf,
        /// The shared peers directory.
        #[arg(long, default_value = "peers.d", value_name = "DIR")]
        peers: PathBuf,
        /// Replace existing keys, certificates and configs.
        #[arg(long)]
        force: bool,
    },
    /// Exit 0 if the node of this config answers on its client API (for container health
    /// checks: a scratch image has no curl).
    Healthcheck,
    /// Print `sydent.conf.example`: every key with its default.
    #[command(hide = true)]
    ExampleConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::GenerateKey) => {
            let key = NodeSigningKey::generate();
            println!("{}", key.to_sydent_string());
            eprintln!(
                "verify key ({}): {}",
                key.key_id(),
                key.verify_key().to_base64()
            );
            ExitCode::SUCCESS
        }
        Some(Command::ExampleConfig) => {
            print!("{}", sydent_rs::config::example_text());
            ExitCode::SUCCESS
        }
        Some(Command::PeerFile { url }) => peer_file(cli.config, &url),
        Some(Command::ForgetOrigin { server_name }) => forget_origin(cli.config, &server_name),
        Some(Command::RebuildFromPeers) => rebuild_from_peers(cli.config),
        Some(Command::NewMesh {
            nodes,
            local,
            certs,
            peers,
            force,
        }) => new_mesh(sydent_rs::mesh::new_mesh::Plan {
            certs_dir: certs,
            peers_dir: peers,
            nodes,
            local,
            force,
        }),
        Some(Command::Healthcheck) => healthcheck(cli.config),
        None => run(cli.config),
    }
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("sydent-rs: {message}");
    ExitCode::from(1)
}

fn config_path(given: Option<PathBuf>) -> PathBuf {
    given
        .or_else(|| std::env::var_os("SYDENT_CONF").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("sydent.conf"))
}

fn peer_file(config_path_arg: Option<PathBuf>, url: &str) -> ExitCode {
    let env = |name: &str| std::env::var(name).ok();
    let loaded = match Config::load(&config_path(config_path_arg), &env) {
        Ok(loaded) => loaded,
        Err(e) => return fail(e),
    };
    let url = match sydent_rs::mesh::peers::check_base_url(url) {
        Ok(url) => url,
        Err(e) => return fail(format!("--url: {e}")),
    };
    // A URL whose host the certificate does not name fails every push: say so now.
    if let Some(warning) = sydent_rs::mesh::tls::url_host_warning(&loaded.config.http, &url) {
        eprintln!("warning: {warning}");
    }
    let general = &loaded.config.general;
    print!(
        "{}",
        sydent_rs::mesh::peers::peer_file_text(
            &general.server_name,
            &url,
            &loaded.config.crypto.signing_key.verify_key()
        )
    );
    ExitCode::SUCCESS
}

fn new_mesh(plan: sydent_rs::mesh::new_mesh::Plan) -> ExitCode {
    match sydent_rs::mesh::new_mesh::new_mesh(&plan) {
        Ok(outcome) => {
            for line in outcome.lines {
                println!("{line}");
            }
            if plan.local {
                println!("start each node with: sydent-rs --config <its sydent.conf>");
                for node in &outcome.nodes {
                    println!("  sydent-rs --config {}", node.config.display());
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

/// The config at the given path, which must exist: loading a missing one would write one with
/// a new signing key. `missing` says why it matters, after the path.
fn load_existing(config_path_arg: Option<PathBuf>, missing: &str) -> Result<Config, ExitCode> {
    let env = |name: &str| std::env::var(name).ok();
    let path = config_path(config_path_arg);
    if !path.exists() {
        return Err(fail(format!("{} does not exist{missing}", path.display())));
    }
    Config::load(&path, &env)
        .map(|loaded| loaded.config)
        .map_err(fail)
}

fn healthcheck(config_path_arg: Option<PathBuf>) -> ExitCode {
    // A new config would race the node's first start.
    let config = match load_existing(
        config_path_arg,
        " yet (unhealthy: the node writes it on its first start)",
    ) {
        Ok(config) => config,
        Err(code) => return code,
    };
    match sydent_rs::node::check_health(&config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(format!("unhealthy: {e}")),
    }
}

fn forget_origin(config_path_arg: Option<PathBuf>, origin: &str) -> ExitCode {
    let env = |name: &str| std::env::var(name).ok();
    let config = match Config::load(&config_path(config_path_arg), &env) {
        Ok(loaded) => loaded.config,
        Err(e) => return fail(e),
    };
    // The running node keeps the bindings in memory: it must not be running.
    if let Some(pid) = running_pid(&config) {
        return fail(format!(
            "the node is running (pid {pid}): stop it first, then run forget-origin again"
        ));
    }
    if config.general.server_name == origin {
        return fail(format!("{origin} is this node's own name"));
    }
    let result = sydent_rs::db::open(&config.db.db_file)
        .map_err(|e| e.to_string())
        .and_then(|(mut conn, _)| {
            sydent_rs::db::queries::forget_origin(&mut conn, origin).map_err(|e| e.to_string())
        });
    match result {
        Ok(removed) => {
            println!(
                "forgot {origin}: removed {removed} of its bindings; its next pushes are applied from its first id"
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

/// The pid of the node of `config` if it is running (by its pidfile).
fn running_pid(config: &Config) -> Option<u32> {
    config
        .general
        .pidfile_path
        .as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|text| text.trim().parse::<u32>().ok())
        .filter(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
}

fn rebuild_from_peers(config_path_arg: Option<PathBuf>) -> ExitCode {
    // A new signing key would verify nothing of the old node's.
    let config = match load_existing(
        config_path_arg,
        ": a rebuilt node needs its old config (its signing key)",
    ) {
        Ok(config) => config,
        Err(code) => return code,
    };
    if let Some(pid) = running_pid(&config) {
        return fail(format!(
            "the node is running (pid {pid}): stop it, then run rebuild-from-peers"
        ));
    }
    sydent_rs::mesh::tls::install_default_provider();
    let system = actix_web::rt::System::new();
    match system.block_on(sydent_rs::rebuild::rebuild(&config)) {
        Ok(outcome) => {
            for warning in &outcome.warnings {
                eprintln!("warning: {warning}");
            }
            for line in &outcome.lines {
                println!("{line}");
            }
            println!("done: start the node");
            ExitCode::SUCCESS
        }
        Err(e) => fail(format!(
            "rebuild-from-peers: {e} (nothing was restored: run it again)"
        )),
    }
}

fn run(config_path_arg: Option<PathBuf>) -> ExitCode {
    let path = config_path(config_path_arg);
    let env = |name: &str| std::env::var(name).ok();
    let Loaded {
        config,
        warnings,
        created,
    } = match Config::load(&path, &env) {
        Ok(loaded) => loaded,
        Err(e) => return fail(e),
    };
    if let Err(e) = init_logging(&config) {
        return fail(e);
    }
    if created {
        log::info!(
            "wrote a new config with a new signing key to {}",
            path.display()
        );
    }
    for warning in warnings {
        log::warn!("{warning}");
    }
    let listeners = match Listeners::bind(&config) {
        Ok(l) => l,
        Err(e) => return fail(e),
    };
    let config = Arc::new(config);
    let system = actix_web::rt::System::new();
    system.block_on(async move {
        // Before the node starts: once it logs that it serves, a supervisor (or a test) may
        // signal it at any moment, and an unhandled SIGTERM would kill it without a clean stop.
        let signals = match StopSignals::install() {
            Ok(signals) => signals,
            Err(e) => return fail(format!("cannot install signal handlers: {e}")),
        };
        let mut node = match Node::start(config, listeners).await {
            Ok(node) => node,
            Err(e) => return fail(e),
        };
        let failure = node.store_failure();
        let code = tokio::select! {
            _ = signals.wait(&node) => {
                log::info!("stop signal received: finishing in-flight requests");
                ExitCode::SUCCESS
            }
            reason = failure => {
                // Serving lookups while every bind fails helps no one: stop, and let the
                // supervisor (systemd, Docker's restart policy) start the node again.
                log::error!(
                    "stopping: the association store cannot commit ({reason}); exiting with code {EXIT_STORE_FAILED} so that a supervisor restarts the node"
                );
                ExitCode::from(EXIT_STORE_FAILED)
            }
        };
        node.stop().await;
        code
    })
}

/// The exit code when the association store failed (EX_SOFTWARE).
const EXIT_STORE_FAILED: u8 = 70;

/// SIGTERM, SIGINT (stop) and SIGHUP (re-read the replication peers, the terms and the HTTPS certificate), handled from before the
/// node starts.
struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Waits for SIGTERM or SIGINT; SIGHUP re-reads the peers, terms and certificate meanwhile.
    async fn wait(mut self, node: &Node) {
        loop {
            tokio::select! {
                _ = self.term.recv() => return,
                _ = self.int.recv() => return,
                _ = self.hup.recv() => {
                    node.reload_peers();
                    node.reload_terms();
                    node.reload_certificate();
                }
            }
        }
    }
}

/// env_logger at `[general] log.level` (RUST_LOG, when set, overrides it), to `log.path` when
/// set, else stderr.
fn init_logging(config: &Config) -> Result<(), String> {
    let mut builder = env_logger::Builder::new();
    builder.filter_level(config.general.log_level);
    // actix's own chatter (worker start/stop) only at debug.
    if config.general.log_level < log::LevelFilter::Debug {
        builder.filter_module("actix_server", log::LevelFilter::Warn);
    }
    if let Ok(spec) = std::env::var("RUST_LOG") {
        builder.parse_filters(&spec);
    }
    if let Some(path) = &config.general.log_path {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("[general] log.path: cannot open {}: {e}", path.display()))?;
        builder.target(env_logger::Target::Pipe(Box::new(file)));
    }
    builder.init();
    Ok(())
}
