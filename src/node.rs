//! A running node: the start order (database → index → actors → HTTP servers) and the stop
//! order (HTTP servers drain in-flight requests → the store commits what it holds → pidfile
//! removed). `main` and the tests both go through [`Node::start`].

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::Arc;

use actix::{Actor, Addr};
use actix_web::dev::ServerHandle;
use actix_web::middleware::{from_fn, Condition, Logger};
use actix_web::{web, App, HttpServer};

use crate::accounts::Accounts;
use crate::actors::checkpoint::Checkpointer;
use crate::actors::directory::{DirectoryMirror, LiveLookup, StoreHandles};
use crate::actors::onbind::{Deliver, OnbindQueue};
use crate::actors::peers::{ActivePeers, PeerRegistry, PeerSources, Rescan, StopAll};
use crate::actors::sessions::ValidationSessions;
use crate::actors::store::{AssociationStore, Flush, QueuedDelivery, StoreContext};
use crate::client_tls::ReloadingCert;
use crate::config::Config;
use crate::config::Precedence;
use crate::db;
use crate::directory::{DirectoryView, LdapClient};
use crate::email::Mailer;
use crate::homeserver::{HomeserverClient, ServerKeys};
use crate::http::metrics::NodeSources;
use crate::http::validate::ValidationLimits;
use crate::http::{self, AppState};
use crate::invite::PendingInviteKeys;
use crate::lookup_index::{LookupIndex, SharedIndex};
use crate::mesh::tls::MeshTls;
use crate::metrics::Metrics;
use crate::resolve::{self, Resolver};
use crate::sms::SmsSender;
use crate::templates::Templates;
use crate::terms::{SharedTerms, Terms};
use crate::upstream::Upstream;

/// How long a graceful stop waits for in-flight requests.
const SHUTDOWN_TIMEOUT_SECS: u64 = 10;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// `[section] key: message`, naming the setting behind the failure.
    #[error("{key}: {message}")]
    Setting { key: &'static str, message: String },
    #[error(transparent)]
    Database(#[from] db::OpenError),
    #[error("{0}")]
    Other(String),
}

/// The sockets a node serves on, bound before the node starts (tests bind port 0).
pub struct Listeners {
    /// Plain HTTP, unless `clientapi.http.port` is empty.
    pub client: Option<TcpListener>,
    /// Bound when `clientapi.https.port` is set.
    pub client_https: Option<TcpListener>,
    pub internal: Option<TcpListener>,
    /// Bound when `replication.https.certfile` is set.
    pub replication: Option<TcpListener>,
    /// Bound when `prometheus_port` and `prometheus_addr` are both set (as Sydent).
    pub metrics: Option<TcpListener>,
}

impl Listeners {
    /// Binds the addresses the config names. `::` and `::1` fall back to `0.0.0.0` and
    /// `127.0.0.1` on hosts without IPv6 (many containers).
    pub fn bind(config: &Config) -> Result<Self, StartError> {
        let http = &config.http;
        let client = http
            .clientapi_port
            .map(|port| {
                listen(
                    "[http] clientapi.http.port",
                    &http.clientapi_bind_address,
                    port,
                )
            })
            .transpose()?;
        let client_https = http
            .clientapi_https
            .as_ref()
            .map(|https| {
                listen(
                    "[http] clientapi.https.port",
                    &https.bind_address,
                    https.port,
                )
            })
            .transpose()?;
        let internal = http
            .internalapi_port
            .map(|port| {
                listen(
                    "[http] internalapi.http.port",
                    &http.internalapi_bind_address,
                    port,
                )
            })
            .transpose()?;
        let replication = http
            .replication_certfile
            .as_ref()
            .map(|_| {
                listen(
                    "[http] replication.https.port",
                    &http.replication_bind_address,
                    http.replication_port,
                )
            })
            .transpose()?;
        let general = &config.general;
        let metrics = match (general.prometheus_port, &general.prometheus_addr) {
            (Some(port), Some(address)) => {
                Some(listen("[general] prometheus_port", address, port)?)
            }
            (None, None) => None,
            _ => {
                log::warn!(
                    "[general] prometheus_port and prometheus_addr are both needed: no metrics"
                );
                None
            }
        };
        Ok(Self {
            client,
            client_https,
            internal,
            replication,
            metrics,
        })
    }
}

/// Gives an app the metrics (when they are on), for the middleware that counts requests.
fn counted(metrics: &Option<web::Data<Metrics>>) -> impl FnOnce(&mut web::ServiceConfig) + '_ {
    move |cfg| {
        if let Some(metrics) = metrics {
            cfg.app_data(metrics.clone());
        }
    }
}

/// Binds one listener; a failure names the setting behind it.
fn listen(key: &'static str, address: &str, port: u16) -> Result<TcpListener, StartError> {
    bind_with_fallback(address, port).map_err(|e| StartError::Setting {
        key,
        message: format!("cannot listen on {address}:{port}: {e}"),
    })
}

fn bind_with_fallback(address: &str, port: u16) -> io::Result<TcpListener> {
    let host = address.trim_start_matches('[').trim_end_matches(']');
    let ip: std::net::IpAddr = host.parse().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("'{address}' is not an IP address"),
        )
    })?;
    match TcpListener::bind(SocketAddr::new(ip, port)) {
        Err(e) if ip.is_unspecified() && ip.is_ipv6() && e.kind() != io::ErrorKind::AddrInUse => {
            TcpListener::bind(("0.0.0.0", port))
        }
        Err(e) if ip.is_loopback() && ip.is_ipv6() && e.kind() != io::ErrorKind::AddrInUse => {
            TcpListener::bind(("127.0.0.1", port))
        }
        other => other,
    }
}

/// How the lookup index starts: loaded already, or to be loaded from a snapshot.
enum Warm {
    Loaded(LookupIndex),
    Snapshot(db::Snapshot),
}

/// A running HTTP server: its handle (to stop it) and its task.
type RunningServer = (
    ServerHandle,
    actix_web::rt::task::JoinHandle<io::Result<()>>,
);

/// Runs `server` on `listener` (TLS when `tls` is given) the way every listener of the node
/// runs: `workers` threads (0: one per core), no signal handling of its own (`main` owns the
/// signals and stops the node in order), in-flight requests given a bounded time to finish.
fn serve<F, I, S, B>(
    what: &str,
    server: HttpServer<F, I, S, B>,
    workers: usize,
    listeners: Vec<(TcpListener, Option<rustls::ServerConfig>)>,
) -> Result<RunningServer, StartError>
where
    F: Fn() -> I + Send + Clone + 'static,
    I: actix_service::IntoServiceFactory<S, actix_http::Request>,
    S: actix_web::dev::ServiceFactory<actix_http::Request, Config = actix_web::dev::AppConfig>
        + 'static,
    S::Error: Into<actix_web::Error> + 'static,
    S::InitError: std::fmt::Debug,
    S::Response: Into<actix_http::Response<B>> + 'static,
    <S::Service as actix_web::dev::Service<actix_http::Request>>::Future: 'static,
    S::Service: 'static,
    B: actix_web::body::MessageBody + 'static,
{
    let mut server = server
        .disable_signals()
        .shutdown_timeout(SHUTDOWN_TIMEOUT_SECS);
    if workers > 0 {
        server = server.workers(workers);
    }
    for (listener, tls) in listeners {
        server = match tls {
            None => server.listen(listener),
            Some(tls) => server.listen_rustls_0_23(listener, tls),
        }
        .map_err(|e| StartError::Other(format!("{what}: {e}")))?;
    }
    let server = server.run();
    Ok((server.handle(), actix_web::rt::spawn(server)))
}

/// A started node; [`Node::stop`] stops it in order.
pub struct Node {
    /// The plain HTTP client API, unless it is off.
    pub client_addr: Option<SocketAddr>,
    pub client_https_addr: Option<SocketAddr>,
    pub internal_addr: Option<SocketAddr>,
    servers: Vec<RunningServer>,
    pub replication_addr: Option<SocketAddr>,
    store: Addr<AssociationStore>,
    registry: Option<Addr<PeerRegistry>>,
    checkpointer: Option<Addr<Checkpointer>>,
    pidfile: Option<PathBuf>,
    /// Says why, if the association store stopped because it could not commit.
    failed: Option<tokio::sync::oneshot::Receiver<String>>,
    /// The client API's HTTPS certificate (re-read on SIGHUP).
    client_cert: Option<Arc<ReloadingCert>>,
    /// The terms in force and the file they come from (re-read on SIGHUP).
    terms: (SharedTerms, Option<PathBuf>),
}

impl Node {
    /// Opens the database, starts the actors and serves on `listeners`. Must run inside an
    /// actix `System`.
    pub async fn start(config: Arc<Config>, listeners: Listeners) -> Result<Self, StartError> {
        crate::mesh::tls::install_default_provider();
        let tls = MeshTls::load(&config.http).map_err(|e| StartError::Other(e.to_string()))?;
        if tls.is_some() && config.db.db_file == ":memory:" {
            return Err(StartError::Setting {
                key: "[db] db.file",
                message: "replication needs a database file: the push queues read it beside the store, which :memory: cannot share".into(),
            });
        }
        if tls.as_ref().is_some_and(|t| t.system_roots) {
            log::warn!(
                "replication: [http] replication.https.cacert is not set: any certificate from a public CA naming a peer is accepted (signatures are still checked). Set the mesh CA."
            );
        }
        let terms = match &config.general.terms_path {
            None => Terms::none(),
            Some(path) => Terms::load(path).map_err(|e| StartError::Setting {
                key: "[general] terms.path",
                message: format!("{}: {e}", path.display()),
            })?,
        };
        let terms = SharedTerms::new(terms);
        let db_file = config.db.db_file.clone();
        let (server_name, signing_key) = (
            config.general.server_name.clone(),
            config.crypto.signing_key.clone(),
        );
        let opening = std::time::Instant::now();
        let (
            conn,
            pepper,
            index,
            ephemeral_keys,
            max_local,
            checkpoint_conn,
            account_rows,
            session_rows,
            invite_state,
            mirror_rows,
        ) =
            actix_web::rt::task::spawn_blocking(move || {
                let (mut conn, pepper) = db::open(&db_file)?;
                let query = |source| db::OpenError::Query {
                    path: db_file.clone(),
                    source,
                };
                let casefolded =
                    db::casefold::casefold_emails(&mut conn, &server_name, &signing_key, &pepper)
                        .map_err(query)?;
                if let Some(c) = casefolded.filter(|c| *c != Default::default()) {
                    log::warn!(
                        "database {db_file}: casefolded email addresses stored before Sydent casefolded them: \
                         local rows {} rewritten, {} merged into a newer row; global rows {} rewritten, {} merged",
                        c.local_rewritten, c.local_merged, c.global_rewritten, c.global_merged
                    );
                }
                // WAL checkpoints on a connection of their own (not for :memory:, which has
                // no WAL and cannot be shared).
                let checkpoint_conn = if db_file == ":memory:" {
                    None
                } else {
                    let other = db::connect(&db_file)?;
                    db::defer_checkpoints(&mut conn).map_err(query)?;
                    Some(other)
                };
                // The index is loaded from a snapshot taken now, before the store's first
                // write, on a thread of its own: the node serves meanwhile, and what the store
                // commits is applied on top. `:memory:` cannot be shared: loaded here.
                let index = if db_file == ":memory:" {
                    let index = LookupIndex::load(&mut conn, &server_name, &pepper).map_err(query)?;
                    Warm::Loaded(index)
                } else {
                    Warm::Snapshot(db::snapshot(&db_file)?)
                };
                let ephemeral =
                    db::queries::ephemeral_public_keys(&mut conn).map_err(query)?;
                let max_local = db::queries::max_local_id(&mut conn).map_err(query)?;
                let account_rows = db::accounts::hash_stored_tokens(&mut conn)
                    .and_then(|hashed| {
                        if hashed > 0 {
                            let n = hashed;
                            log::warn!(
                                "database {db_file}: {n} access tokens Sydent stored in plaintext are now stored hashed"
                            );
                        }
                        db::accounts::load_all(&mut conn)
                    })
                    .map_err(query)?;
                let session_rows = db::sessions::load_since(
                    &mut conn,
                    crate::now_ms() - crate::actors::sessions::SESSION_RETENTION_MS,
                )
                .map_err(query)?;
                let invite_state = db::invites::load_state(&mut conn).map_err(query)?;
                let mirror_rows = db::directory::load(&mut conn).map_err(query)?;
                Ok::<_, db::OpenError>((
                    conn,
                    pepper,
                    index,
                    ephemeral,
                    max_local,
                    checkpoint_conn,
                    account_rows,
                    session_rows,
                    invite_state,
                    mirror_rows,
                ))
            })
            .await
            .map_err(|e| StartError::Other(format!("database open panicked: {e}")))??;
        log::info!(
            "database {} open in {} ms",
            config.db.db_file,
            opening.elapsed().as_millis()
        );
        let index = match index {
            Warm::Loaded(index) => SharedIndex::new(index),
            Warm::Snapshot(snapshot) => {
                let index =
                    SharedIndex::warming(&config.db.db_file, &config.general.server_name, &pepper);
                let delay = std::env::var("SYDENT_RS_TEST_WARM_UP_DELAY_MS")
                    .ok()
                    .and_then(|ms| ms.parse().ok())
                    .map_or(std::time::Duration::ZERO, std::time::Duration::from_millis);
                index
                    .load_in_background(snapshot, delay)
                    .map_err(|e| StartError::Other(format!("index loader: {e}")))?;
                index
            }
        };
        let written = crate::actors::checkpoint::Written::default();
        let checkpointer =
            checkpoint_conn.map(|c| Checkpointer::new(c, Arc::clone(&written)).start());
        let (local_id_tx, local_id) = tokio::sync::watch::channel(max_local);
        let pending_invites = Arc::new(PendingInviteKeys::default());
        for (medium, address) in &invite_state.pending {
            pending_invites.insert(medium, address);
        }
        let (onbind_tx, mut onbind_rx) = tokio::sync::mpsc::unbounded_channel();
        let store_ctx = Arc::new(StoreContext {
            server_name: config.general.server_name.clone(),
            signing_key: config.crypto.signing_key.clone(),
            pepper,
            now_ms: crate::now_ms,
            panic_on_bind: std::env::var("SYDENT_RS_TEST_PANIC_ON_BIND").ok(),
            pending_invites: Arc::clone(&pending_invites),
            onbind: Some(onbind_tx),
            counters: std::sync::OnceLock::new(),
        });
        let (failed_tx, failed) = tokio::sync::oneshot::channel();
        let (store, store_queue) = AssociationStore::new(
            conn,
            Arc::clone(&store_ctx),
            index.clone(),
            local_id_tx,
            written,
            failed_tx,
        )
        .start_with_queue();
        let sessions =
            ValidationSessions::new(session_rows, store_queue.clone(), crate::now_ms).start();
        let homeserver =
            Arc::new(HomeserverClient::new(&config).map_err(|e| StartError::Other(e.to_string()))?);
        let onbind = OnbindQueue::new(
            Arc::clone(&homeserver),
            store_queue.clone(),
            pending_invites,
            config.general.delete_tokens_on_bind,
            invite_state.given_up,
        )
        .start();
        for row in invite_state.queued {
            onbind.do_send(Deliver(QueuedDelivery::from_row(row)));
        }
        {
            let onbind = onbind.clone();
            actix_web::rt::spawn(async move {
                while let Some(delivery) = onbind_rx.recv().await {
                    onbind.do_send(Deliver(delivery));
                }
            });
        }
        // The template files are read once, off the arbiter (disk I/O).
        let templates_config = Arc::clone(&config);
        let templates =
            actix_web::rt::task::spawn_blocking(move || Templates::new(&templates_config))
                .await
                .map_err(|e| StartError::Other(format!("template loading panicked: {e}")))?
                .map_err(|e| StartError::Other(e.to_string()))?;
        let templates = Arc::new(templates);
        let mailer =
            Arc::new(
                Mailer::new(&config.email).map_err(|message| StartError::Setting {
                    key: "[email] email.tlsmode",
                    message,
                })?,
            );
        let sms = Arc::new(SmsSender::new(&config).map_err(|e| StartError::Other(e.to_string()))?);
        let (directory, directory_chain) = match &config.ldap {
            None => (None, None),
            Some(ldap) => {
                let settings = ldap.settings.clone();
                // Checked once here: a setting the client cannot use stops the start.
                let client = LdapClient::new(settings.clone())
                    .map_err(|e| StartError::Other(format!("[ldap] {e}")))?;
                let view = DirectoryView::new(&store_ctx.pepper);
                let handles = StoreHandles {
                    store: store.clone(),
                    queue: store_queue.clone(),
                    store_ctx: Arc::clone(&store_ctx),
                    index: index.clone(),
                };
                let mirror = DirectoryMirror::new(
                    settings,
                    ldap.sync_interval,
                    handles.clone(),
                    view.clone(),
                    mirror_rows,
                )
                .start();
                let live = ldap.live_lookup.then(|| {
                    LiveLookup::new(
                        client,
                        ldap.settings.timeout,
                        mirror.clone(),
                        view.clone(),
                        handles,
                    )
                });
                (Some(mirror), Some(resolve::Directory { view, live }))
            }
        };
        let upstream = match &config.proxy {
            None => None,
            Some(proxy) => {
                let upstream = Upstream::new(proxy).map_err(|message| StartError::Setting {
                    key: "[proxy] identity",
                    message,
                })?;
                log::info!(
                    "[proxy]: lookups this node cannot answer are forwarded to {} ({}, {})",
                    proxy.identity,
                    if proxy.access_token.is_some() {
                        "hashed, v2"
                    } else {
                        "in clear, v1 bulk_lookup"
                    },
                    match proxy.precedence {
                        Precedence::UpstreamFirst => "before this node's bindings",
                        Precedence::LocalFirst => "after this node's bindings",
                    }
                );
                Some(Arc::new(upstream))
            }
        };
        let resolver = Resolver::new(
            index.clone(),
            Arc::clone(&store_ctx),
            directory_chain,
            upstream,
            config
                .proxy
                .as_ref()
                .map_or(Precedence::UpstreamFirst, |p| p.precedence),
        );
        if config.http.client_http_base.trim().is_empty() {
            log::warn!(
                "[http] client_http_base is not set: the links in validation emails will be relative, and will not work"
            );
        }
        let active_peers = ActivePeers::default();
        // Prometheus metrics, when their listener is set: the senders and the store count
        // into them from now on.
        let metrics = listeners.metrics.as_ref().map(|_| {
            let metrics = Metrics::new(NodeSources {
                index: index.clone(),
                peers: tls.as_ref().map(|_| active_peers.clone()),
                upstream: resolver.upstream().cloned(),
            });
            mailer.count_in(metrics.emails.clone());
            sms.count_in(metrics.sms.clone());
            let _ = store_ctx.counters.set(metrics.writes.clone());
            web::Data::new(metrics)
        });
        let registry = match &tls {
            None => None,
            Some(tls) => {
                let sources = PeerSources {
                    own_name: config.general.server_name.clone(),
                    peers_dir: config.general.peers_path.clone(),
                    sections: config.peers.clone(),
                    db_file: config.db.db_file.clone(),
                };
                let client = tls
                    .push_client()
                    .map_err(|e| StartError::Other(e.to_string()))?;
                let scan_sources = sources.clone();
                let initial = actix_web::rt::task::spawn_blocking(move || scan_sources.load())
                    .await
                    .map_err(|e| StartError::Other(format!("peer scan panicked: {e}")))?;
                Some(
                    PeerRegistry::new(
                        sources,
                        config.crypto.signing_key.clone(),
                        client,
                        local_id.clone(),
                        active_peers.clone(),
                        initial,
                        metrics.as_ref().map(|m| m.clone().into_inner()),
                    )
                    .start(),
                )
            }
        };
        let state = web::Data::new(AppState {
            config: Arc::clone(&config),
            store: store.clone(),
            store_queue: store_queue.clone(),
            store_ctx,
            index,
            ephemeral_keys: Arc::new(std::sync::RwLock::new(ephemeral_keys.into_iter().collect())),
            local_id: local_id.clone(),
            replication: tls.as_ref().map(|_| active_peers.clone()),
            terms: terms.clone(),
            accounts: Accounts::from_rows(account_rows),
            server_keys: Arc::new(ServerKeys::new(Arc::clone(&homeserver))),
            homeserver,
            onbind,
            directory,
            resolver,
            sessions,
            templates,
            mailer,
            sms,
            limits: Arc::new(ValidationLimits::new(&config)),
        });

        let client_addr = listeners.client.as_ref().and_then(|l| l.local_addr().ok());
        let client_https_addr = listeners
            .client_https
            .as_ref()
            .and_then(|l| l.local_addr().ok());
        // The HTTPS certificate, checked now (a bad file stops the start naming its key) and
        // re-read on SIGHUP.
        let client_cert = match &config.http.clientapi_https {
            None => None,
            Some(https) => {
                Some(ReloadingCert::new(https).map_err(|e| StartError::Other(e.to_string()))?)
            }
        };
        let log_requests = config.general.log_level >= log::LevelFilter::Debug;
        let mut servers = Vec::new();
        {
            let state = state.clone();
            let app_config = Arc::clone(&config);
            let metrics = metrics.clone();
            let server = HttpServer::new(move || {
                let config = Arc::clone(&app_config);
                App::new()
                    .app_data(state.clone())
                    .app_data(http::payload_config())
                    .configure(counted(&metrics))
                    .wrap(Condition::new(
                        metrics.is_some(),
                        from_fn(http::metrics::record),
                    ))
                    // No query strings in the log: they hold the 3PIDs being looked up.
                    .wrap(Condition::new(
                        log_requests,
                        Logger::new("%a \"%{method}xi %U\" %s %b %Dms")
                            .custom_request_replace("method", |req| req.method().to_string()),
                    ))
                    .wrap(http::cors_headers())
                    .configure(move |cfg| http::client_api(cfg, &config))
                    .default_service(web::to(http::unknown_endpoint))
            });
            let workers = config.http.clientapi_workers;
            let mut client_listeners = Vec::new();
            if let Some(listener) = listeners.client {
                client_listeners.push((listener, None));
            }
            if let (Some(listener), Some(cert)) = (listeners.client_https, &client_cert) {
                let tls = cert
                    .server_config()
                    .map_err(|e| StartError::Other(format!("[http] clientapi.https: {e}")))?;
                client_listeners.push((listener, Some(tls)));
            }
            servers.push(serve("client API", server, workers, client_listeners)?);
        }

        let mut internal_addr = None;
        if let Some(listener) = listeners.internal {
            internal_addr = listener.local_addr().ok();
            let state = state.clone();
            let metrics = metrics.clone();
            let server = HttpServer::new(move || {
                App::new()
                    .app_data(state.clone())
                    .app_data(http::payload_config())
                    .configure(counted(&metrics))
                    .wrap(Condition::new(
                        metrics.is_some(),
                        from_fn(http::metrics::record),
                    ))
                    .configure(http::internal_api)
                    .default_service(web::to(http::unknown_endpoint))
            });
            servers.push(serve("internal API", server, 1, vec![(listener, None)])?);
        }

        let mut replication_addr = None;
        if let (Some(listener), Some(tls)) = (listeners.replication, &tls) {
            replication_addr = listener.local_addr().ok();
            let receiver = web::Data::new(http::replication::ReplicationState {
                peers: active_peers.clone(),
                store: store_queue.clone(),
                max_clock_skew_ms: i64::try_from(config.http.replication_max_clock_skew_secs)
                    .unwrap_or(i64::MAX / 1000)
                    .saturating_mul(1000),
                now_ms: crate::now_ms,
                own_name: config.general.server_name.clone(),
                signing_key: config.crypto.signing_key.clone(),
                held: crate::actors::peers::HeldReader {
                    db_file: config.db.db_file.clone(),
                    own_name: config.general.server_name.clone(),
                },
            });
            let server_config = tls
                .server_config()
                .map_err(|e| StartError::Other(e.to_string()))?;
            let metrics = metrics.clone();
            let server = HttpServer::new(move || {
                App::new()
                    .app_data(receiver.clone())
                    .configure(counted(&metrics))
                    .wrap(Condition::new(
                        metrics.is_some(),
                        from_fn(http::metrics::record),
                    ))
                    .configure(http::replication::configure_receiver)
                    .default_service(web::to(http::unknown_endpoint))
            })
            .on_connect(http::replication::on_connect)
            .max_connections(http::replication::MAX_CONNECTIONS);
            let running = serve(
                "replication listener",
                server,
                1,
                vec![(listener, Some(server_config))],
            )?;
            servers.push(running);
        }

        let mut metrics_addr = None;
        if let (Some(listener), Some(metrics)) = (listeners.metrics, &metrics) {
            metrics_addr = listener.local_addr().ok();
            let metrics = metrics.clone();
            let server = HttpServer::new(move || {
                App::new()
                    .app_data(metrics.clone())
                    .configure(http::metrics::configure)
                    .default_service(web::to(http::unknown_endpoint))
            });
            servers.push(serve("metrics", server, 1, vec![(listener, None)])?);
        }

        let pidfile = config.general.pidfile_path.clone();
        if let Some(path) = &pidfile {
            std::fs::write(path, format!("{}\n", std::process::id())).map_err(|e| {
                StartError::Setting {
                    key: "[general] pidfile.path",
                    message: format!("cannot write {}: {e}", path.display()),
                }
            })?;
        }
        let client_urls: Vec<String> = client_addr
            .map(|a| format!("http://{a}"))
            .into_iter()
            .chain(client_https_addr.map(|a| format!("https://{a}")))
            .collect();
        log::info!(
            "sydent-rs {} serving as {}: client API on {}{}",
            env!("CARGO_PKG_VERSION"),
            config.general.server_name,
            client_urls.join(" and "),
            internal_addr
                .map(|a| format!(", internal API on http://{a}"))
                .unwrap_or_default()
        );
        if let Some(addr) = metrics_addr {
            log::info!("metrics on http://{addr}/metrics");
        }
        if let Some(addr) = replication_addr {
            log::info!(
                "replication on https://{addr}, peers from {}",
                config.general.peers_path.display()
            );
        }
        Ok(Self {
            client_addr,
            client_https_addr,
            client_cert,
            internal_addr,
            replication_addr,
            servers,
            store,
            registry,
            checkpointer,
            pidfile,
            failed: Some(failed),
            terms: (terms, config.general.terms_path.clone()),
        })
    }

    /// A future that resolves with the reason if the association store stops because it can
    /// no longer commit: the node is then of no use for writes and should be stopped (`main`
    /// exits non-zero). Pending forever if the store stops normally, or when taken twice.
    pub fn store_failure(&mut self) -> impl std::future::Future<Output = String> + 'static {
        let failed = self.failed.take();
        async move {
            match failed {
                Some(failed) => match failed.await {
                    Ok(reason) => reason,
                    Err(_) => std::future::pending().await,
                },
                None => std::future::pending().await,
            }
        }
    }

    /// Re-reads peers.d and the peers table now (SIGHUP).
    pub fn reload_peers(&self) {
        if let Some(registry) = &self.registry {
            registry.do_send(Rescan);
        }
    }

    /// Re-reads the client API's HTTPS certificate and key (SIGHUP): new connections get the
    /// new certificate, open ones keep theirs; files that do not load keep the one in force.
    pub fn reload_certificate(&self) {
        let Some(cert) = &self.client_cert else {
            return;
        };
        match cert.reload() {
            Ok(()) => log::info!("client API certificate reloaded"),
            Err(e) => log::error!("{e}; the certificate in force stays"),
        }
    }

    /// Re-reads the terms file (SIGHUP). A file that does not load leaves the terms in force.
    pub fn reload_terms(&self) {
        let (shared, path) = &self.terms;
        let Some(path) = path else { return };
        match Terms::load(path) {
            Ok(terms) => {
                log::info!(
                    "terms reloaded from {}: master_version {}",
                    path.display(),
                    terms.master_version().unwrap_or_default()
                );
                shared.replace(terms);
            }
            Err(e) => log::error!(
                "[general] terms.path: {}: {e}; the terms in force stay",
                path.display()
            ),
        }
    }

    /// Stops accepting connections, lets in-flight requests finish, commits the store's pending
    /// writes and removes the pidfile.
    pub async fn stop(self) {
        if let Some(registry) = &self.registry {
            let _ = registry.send(StopAll).await;
        }
        for (handle, _) in &self.servers {
            handle.stop(true).await;
        }
        for (_, task) in self.servers {
            let _ = task.await;
        }
        if self.store.send(Flush).await.is_err() {
            log::warn!("the association store had already stopped");
        }
        if let Some(checkpointer) = &self.checkpointer {
            let _ = checkpointer
                .send(crate::actors::checkpoint::StopCheckpointer)
                .await;
        }
        if let Some(path) = &self.pidfile {
            let _ = std::fs::remove_file(path);
        }
        log::info!("stopped");
    }
}

/// Asks the node of `config` for its client API's status (`GET /_matrix/identity/api/v1`, on
/// loopback when it listens on every address), as a container health check does: Ok when it
/// answers 200 within 5 seconds.
pub fn check_health(config: &Config) -> Result<(), String> {
    let http = &config.http;
    let port = http
        .clientapi_port
        .ok_or("the health check asks the plain client API, and clientapi.http.port is empty")?;
    let host = http
        .clientapi_bind_address
        .trim_start_matches('[')
        .trim_end_matches(']');
    let ip: std::net::IpAddr = host
        .parse()
        .map_err(|_| format!("clientapi.http.bind_address '{host}' is not an IP address"))?;
    // The listener falls back to IPv4 when IPv6 is off (see bind_with_fallback): so does this.
    let candidates: Vec<std::net::IpAddr> = if ip.is_unspecified() || ip.is_loopback() {
        let mut ips = vec![std::net::IpAddr::from([127, 0, 0, 1])];
        if ip.is_ipv6() {
            ips.insert(0, std::net::Ipv6Addr::LOCALHOST.into());
        }
        ips
    } else {
        vec![ip]
    };
    crate::mesh::tls::install_default_provider();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(5))
            .build()
            .map_err(|e| e.to_string())?;
        let mut last_error = String::new();
        for ip in candidates {
            let url = format!(
                "http://{}/_matrix/identity/api/v1",
                SocketAddr::new(ip, port)
            );
            match client.get(&url).send().await {
                Ok(response) if response.status().is_success() => return Ok(()),
                Ok(response) => last_error = format!("{url}: {}", response.status()),
                Err(e) => last_error = format!("{url}: {e}"),
            }
        }
        Err(last_error)
    })
}
