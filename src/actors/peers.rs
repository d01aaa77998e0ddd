//! The peer registry: knows the active peers and runs one [`Pusher`] per peer.
//!
//! It rescans peers.d (and Sydent's `peers` table) every few seconds and on SIGHUP, starts a
//! pusher for a new peer, stops the pusher of a removed one and restarts the pusher of a peer
//! whose URL or key changed. The scan is file and database I/O, so it runs on a blocking
//! thread. The active set is shared with the replication receiver (to identify and verify
//! pushing peers) and with the status endpoint.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::{watch, Notify};

use super::outbox::{Outbox, SaveCursors};
use super::pusher::{PushStatus, Pusher, SharedStatus, StopPusher};
use crate::config::PeerSection;
use crate::crypto::NodeSigningKey;
use crate::db::queries;
use crate::mesh::peers::{merge, scan_dir, DbPeer, Peer};
use crate::types::ServerName;

/// How often peers.d is rescanned without a SIGHUP.
pub const RESCAN_INTERVAL: Duration = Duration::from_secs(3);

/// An active peer as the receiver and the status endpoint see it.
#[derive(Debug, Clone)]
pub struct ActivePeer {
    pub peer: Peer,
    pub status: SharedStatus,
    /// Wakes this peer's pusher from its backoff: the receiver pulls it when the peer has
    /// just pushed to us (it is up again).
    pub wake: Arc<Notify>,
    /// What this peer pushed to us, counted by the receiver.
    pub inbound: Arc<Inbound>,
}

/// Pushes received from a peer (atomics: the receiver's workers count, the status page reads).
#[derive(Debug, Default)]
pub struct Inbound {
    /// Associations accepted from the peer since start.
    pub received: AtomicU64,
    /// When the peer's last accepted push arrived (ms; 0 = never).
    pub last_received_ts: AtomicI64,
    /// Why its last push was refused, until one is accepted. A mutex, not an actor: the
    /// receiver sets it once per push and the status page copies it; never held across I/O.
    refusal: Mutex<Option<Refusal>>,
}

/// A push this node refused, as the status page shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Refusal {
    pub ts: i64,
    pub errcode: &'static str,
    pub error: String,
}

impl Inbound {
    pub fn set_refusal(&self, refusal: Option<Refusal>) {
        *self.refusal.lock().unwrap_or_else(|e| e.into_inner()) = refusal;
    }

    pub fn refusal(&self) -> Option<Refusal> {
        self.refusal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The active peers by server name, shared read-mostly. A lock rather than asking the registry
/// actor: the receiver needs the pushing peer's key on every push, and the set changes only
/// when peers.d does; the registry is the only writer.
#[derive(Debug, Clone, Default)]
pub struct ActivePeers(Arc<RwLock<BTreeMap<String, ActivePeer>>>);

impl ActivePeers {
    pub fn get(&self, name: &str) -> Option<ActivePeer> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    pub fn all(&self) -> Vec<ActivePeer> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    fn set(&self, peers: BTreeMap<String, ActivePeer>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = peers;
    }
}

/// Where peers come from; cloned into each scan.
#[derive(Debug, Clone)]
pub struct PeerSources {
    pub own_name: ServerName,
    pub peers_dir: PathBuf,
    pub sections: Vec<PeerSection>,
    pub db_file: String,
}

impl PeerSources {
    /// Reads every source (blocking I/O). Returns the peers and the problems found.
    pub fn load(&self) -> (BTreeMap<String, Peer>, Vec<String>) {
        let scan = scan_dir(&self.peers_dir);
        let mut problems = scan.problems.clone();
        let db_peers = match crate::db::connect(&self.db_file)
            .map_err(|e| e.to_string())
            .and_then(|mut c| queries::db_peers(&mut c).map_err(|e| e.to_string()))
        {
            Ok(rows) => rows
                .into_iter()
                .map(|(name, port, key)| DbPeer { name, port, key })
                .collect(),
            Err(e) => {
                problems.push(format!("peers: cannot read the peers table: {e}"));
                Vec::new()
            }
        };
        let (peers, more) = merge(&self.own_name, &scan, &db_peers, &self.sections);
        problems.extend(more);
        (peers, problems)
    }
}

/// What this node holds of an origin's bindings, read for a peer rebuilding its database
/// (`GET …/replicate/v1/associations`): on a connection of its own, on a blocking thread, so
/// the read never waits behind the store's writes nor holds up the replication listener.
#[derive(Debug, Clone)]
pub struct HeldReader {
    pub db_file: String,
    pub own_name: ServerName,
}

impl HeldReader {
    /// `origin`'s bindings after origin id `after`, at most `limit`, and its mark.
    pub async fn read(
        &self,
        origin: ServerName,
        after: i64,
        limit: usize,
    ) -> Result<crate::db::rebuild::Held, String> {
        let reader = self.clone();
        actix_web::rt::task::spawn_blocking(move || {
            let mut conn = crate::db::connect(&reader.db_file).map_err(|e| e.to_string())?;
            crate::db::rebuild::held(&mut conn, &reader.own_name, &origin, after, limit)
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| format!("database thread: {e}"))?
    }
}

pub struct PeerRegistry {
    pub sources: PeerSources,
    pub signing_key: NodeSigningKey,
    pub client: reqwest::Client,
    pub local_id: watch::Receiver<i64>,
    pub active: ActivePeers,
    /// The first scan, made by `Node::start` before serving.
    pub initial: Option<BTreeMap<String, Peer>>,
    /// The rows and cursors every pusher shares, started with the first of them.
    outbox: Option<Addr<Outbox>>,
    /// Where pushers measure their replication lag, when the metrics are on.
    metrics: Option<Arc<crate::metrics::Metrics>>,
    pushers: BTreeMap<String, (ActivePeer, Addr<Pusher>)>,
    reported: Vec<String>,
    scanning: bool,
}

impl PeerRegistry {
    pub fn new(
        sources: PeerSources,
        signing_key: NodeSigningKey,
        client: reqwest::Client,
        local_id: watch::Receiver<i64>,
        active: ActivePeers,
        initial: (BTreeMap<String, Peer>, Vec<String>),
        metrics: Option<Arc<crate::metrics::Metrics>>,
    ) -> Self {
        let mut registry = Self {
            sources,
            signing_key,
            client,
            local_id,
            active,
            initial: Some(initial.0),
            outbox: None,
            metrics,
            pushers: BTreeMap::new(),
            reported: Vec::new(),
            scanning: false,
        };
        registry.report(initial.1);
        registry
    }

    /// Logs problems once, not on every rescan.
    fn report(&mut self, problems: Vec<String>) {
        for problem in &problems {
            if !self.reported.contains(problem) {
                log::warn!("{problem}");
            }
        }
        self.reported = problems;
    }

    fn apply(&mut self, peers: BTreeMap<String, Peer>) {
        let outbox = self
            .outbox
            .get_or_insert_with(|| {
                Outbox::new(
                    self.sources.own_name.clone(),
                    self.signing_key.clone(),
                    self.sources.db_file.clone(),
                    self.local_id.clone(),
                )
                .start()
            })
            .clone();
        let gone: Vec<String> = self
            .pushers
            .iter()
            .filter(|(name, (old, _))| peers.get(*name).is_none_or(|new| *new != old.peer))
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            if let Some((_, addr)) = self.pushers.remove(&name) {
                addr.do_send(StopPusher);
            }
        }
        for (name, peer) in &peers {
            if self.pushers.contains_key(name) {
                continue;
            }
            let status: SharedStatus = Arc::new(Mutex::new(PushStatus {
                cursor: -1,
                state: "starting",
                ..PushStatus::default()
            }));
            let active = ActivePeer {
                peer: peer.clone(),
                status,
                wake: Arc::new(Notify::new()),
                inbound: Arc::default(),
            };
            let addr = Pusher {
                peer: peer.clone(),
                own_name: self.sources.own_name.clone(),
                db_file: self.sources.db_file.clone(),
                signing_key: self.signing_key.clone(),
                client: self.client.clone(),
                local_id: self.local_id.clone(),
                outbox: outbox.clone(),
                status: Arc::clone(&active.status),
                wake: Arc::clone(&active.wake),
                lag: self.metrics.as_ref().map(|m| m.replication_lag(name)),
            }
            .start();
            self.pushers.insert(name.clone(), (active, addr));
        }
        self.active.set(
            self.pushers
                .iter()
                .map(|(name, (active, _))| (name.clone(), active.clone()))
                .collect(),
        );
    }

    fn rescan(&mut self, ctx: &mut Context<Self>) {
        if self.scanning {
            return;
        }
        self.scanning = true;
        let sources = self.sources.clone();
        let job = actix_web::rt::task::spawn_blocking(move || sources.load());
        ctx.spawn(job.into_actor(self).map(|joined, act, _| {
            act.scanning = false;
            match joined {
                Ok((peers, problems)) => {
                    act.report(problems);
                    act.apply(peers);
                }
                Err(e) => log::error!("peers: rescan failed: {e}"),
            }
        }));
    }
}

/// Rescan now (SIGHUP).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Rescan;

/// Stop every pusher (node shutdown); answered once their acknowledged cursors are saved.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopAll;

impl Actor for PeerRegistry {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if let Some(initial) = self.initial.take() {
            self.apply(initial);
        }
        ctx.run_interval(RESCAN_INTERVAL, |act, ctx| act.rescan(ctx));
    }
}

impl Handler<Rescan> for PeerRegistry {
    type Result = ();

    fn handle(&mut self, _: Rescan, ctx: &mut Context<Self>) {
        log::info!("peers: rescanning {}", self.sources.peers_dir.display());
        self.rescan(ctx);
    }
}

impl Handler<StopAll> for PeerRegistry {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: StopAll, ctx: &mut Context<Self>) -> Self::Result {
        for (_, (_, addr)) in std::mem::take(&mut self.pushers) {
            addr.do_send(StopPusher);
        }
        ctx.stop();
        let outbox = self.outbox.take();
        Box::pin(async move {
            if let Some(outbox) = outbox {
                let _ = outbox.send(SaveCursors).await;
            }
        })
    }
}
