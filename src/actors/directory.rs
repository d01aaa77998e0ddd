//! The directory mirror: the people of `[ldap]` as this node's bindings, so v1 and v2 lookups
//! find them (v2 by hash too, which the fork cannot do) and every replication peer receives
//! them.
//!
//! A full search at start and every `sync_interval`, compared with what is bound now:
//! - an address the directory gives a Matrix ID that is not what lookups answer on this node
//!   (new, changed, or bound otherwise since) is bound to it, as any bind made here: newer
//!   than every binding of the 3PID, so the directory wins whatever their ages;
//! - an address this node bound from the directory (`directory_mirror`) that the directory no
//!   longer holds is unbound (a tombstone, replicated), if it is still bound to that Matrix ID.
//!
//! A sync that fails (directory down, bad credentials) changes nothing, is reported (log,
//! status) and retried with backoff; a directory that answers with no one at all while the
//! mirror holds people is taken for a broken directory (a wrong base or filter) and changes
//! nothing either, with a warning.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use futures_util::future::join_all;
use serde::Serialize;

use super::store::{AssociationStore, Bind, StoreContext, StoreQueue, Unbind};
use crate::db::directory::{MirrorRow, MirrorWrite};
use crate::directory::{search_all, DirectorySnapshot, DirectoryView, LdapSettings};
use crate::lookup_index::SharedIndex;
use crate::types::{Medium, Mxid, Threepid};

/// Binds and unbinds of one sync in flight at once.
const IN_FLIGHT: usize = 64;
const FIRST_RETRY: Duration = Duration::from_secs(5);

/// What the internal status endpoint shows.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DirectoryStatus {
    pub last_sync_ts: Option<i64>,
    /// How long the last sync took, search included.
    pub last_sync_ms: Option<u64>,
    /// 3PIDs the mirror holds.
    pub entries: usize,
    pub last_bound: usize,
    pub last_unbound: usize,
    /// Addresses left out because entries with different Matrix IDs hold them.
    pub ambiguous: usize,
    /// Entries skipped (an id that makes no valid Matrix ID).
    pub skipped: usize,
    pub last_error: Option<String>,
    pub last_error_ts: Option<i64>,
    pub next_sync_ts: Option<i64>,
}

/// What the directory binds and unbinds through: the association store (its queue for
/// binds, its address for unbinds), what a bind is prepared with, and the lookup index.
#[derive(Clone)]
pub struct StoreHandles {
    pub store: Addr<AssociationStore>,
    pub queue: StoreQueue,
    pub store_ctx: Arc<StoreContext>,
    pub index: SharedIndex,
}

pub struct DirectoryMirror {
    settings: Arc<LdapSettings>,
    interval: Duration,
    store: Addr<AssociationStore>,
    queue: StoreQueue,
    store_ctx: Arc<StoreContext>,
    index: SharedIndex,
    /// (medium, address) → the Matrix ID this node bound from the directory.
    mirror: HashMap<(Medium, String), String>,
    /// The same, as the lookup paths read it (the directory wins between syncs).
    view: DirectoryView,
    status: DirectoryStatus,
    failures: u32,
    syncing: bool,
    /// The timer of the next sync.
    next: Option<SpawnHandle>,
    /// Ambiguous addresses already warned about (each once).
    warned: HashSet<(Medium, String)>,
}

impl DirectoryMirror {
    pub fn new(
        settings: LdapSettings,
        interval: Duration,
        handles: StoreHandles,
        view: DirectoryView,
        rows: Vec<MirrorRow>,
    ) -> Self {
        let StoreHandles {
            store,
            queue,
            store_ctx,
            index,
        } = handles;
        let mirror: HashMap<_, _> = rows
            .into_iter()
            .filter_map(|r| Some(((Medium::parse(&r.medium)?, r.address), r.mxid)))
            .collect();
        view.replace(&mirror);
        let status = DirectoryStatus {
            entries: mirror.len(),
            ..DirectoryStatus::default()
        };
        Self {
            settings: Arc::new(settings),
            interval,
            store,
            queue,
            store_ctx,
            index,
            mirror,
            view,
            status,
            failures: 0,
            syncing: false,
            next: None,
            warned: HashSet::new(),
        }
    }

    fn sync(&mut self, ctx: &mut Context<Self>) {
        if self.syncing {
            return;
        }
        // The comparison needs the lookup index: while it loads after a start, wait, rather
        // than bind every person again.
        if !self.index.is_ready() {
            ctx.run_later(Duration::from_millis(200), |act, ctx| act.sync(ctx));
            return;
        }
        self.syncing = true;
        let settings = Arc::clone(&self.settings);
        let started = std::time::Instant::now();
        let search = async move { search_all(&settings).await };
        ctx.spawn(
            search
                .into_actor(self)
                .map(move |result, act, ctx| match result {
                    Ok(snapshot) => {
                        let plan = act.plan(snapshot);
                        let apply = act.apply(plan);
                        ctx.spawn(
                            apply
                                .into_actor(act)
                                .map(move |applied, act, ctx| act.finish(applied, started, ctx)),
                        );
                    }
                    Err(e) => act.finish(Err(e.to_string()), started, ctx),
                }),
        );
    }

    fn finish(
        &mut self,
        applied: Result<Applied, String>,
        started: std::time::Instant,
        ctx: &mut Context<Self>,
    ) {
        self.syncing = false;
        match applied {
            Ok(done) => self.synced(done, started),
            Err(e) => self.failed(e),
        }
        self.schedule(ctx);
    }

    /// What a snapshot changes: the binds and unbinds to make.
    fn plan(&mut self, snapshot: DirectorySnapshot) -> Plan {
        self.status.ambiguous = snapshot.ambiguous.len();
        self.status.skipped = snapshot.skipped;
        for (medium, address, dns) in &snapshot.ambiguous {
            if self.warned.insert((*medium, address.clone())) {
                log::warn!(
                    "directory: an address is held by {} entries with different Matrix IDs and is not answered from the directory: {}",
                    dns.len(),
                    dns.join("; ")
                );
            }
        }
        if snapshot.bindings.is_empty() && !self.mirror.is_empty() {
            return Plan::Suspicious;
        }
        let now = crate::now_ms();
        let wanted: HashMap<(Medium, String), String> = snapshot
            .bindings
            .into_iter()
            .map(|b| ((b.medium, b.address), b.mxid))
            .collect();
        // What lookups answer now, for every 3PID the directory or the mirror names.
        let keys: Vec<(Medium, String)> =
            wanted.keys().chain(self.mirror.keys()).cloned().collect();
        let current: HashMap<(Medium, String), String> = self
            .index
            .read(|index| {
                keys.iter()
                    .filter_map(|(medium, address)| {
                        let found = index.get(*medium, address, now)?;
                        Some(((*medium, address.clone()), found.mxid().to_string()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let bind: Vec<(Medium, String, String)> = wanted
            .iter()
            .filter(|(key, mxid)| current.get(*key) != Some(*mxid))
            .map(|((m, a), mxid)| (*m, a.clone(), mxid.clone()))
            .collect();
        let unbind: Vec<(Medium, String, String)> = self
            .mirror
            .iter()
            .filter(|(key, _)| !wanted.contains_key(*key))
            .filter(|(key, mxid)| current.get(*key) == Some(*mxid))
            .map(|((m, a), mxid)| (*m, a.clone(), mxid.clone()))
            .collect();
        let left: Vec<(Medium, String)> = self
            .mirror
            .keys()
            .filter(|key| !wanted.contains_key(*key))
            .cloned()
            .collect();
        // Only what the table does not hold yet is written.
        let new_rows: Vec<MirrorRow> = wanted
            .iter()
            .filter(|(key, mxid)| self.mirror.get(*key) != Some(*mxid))
            .map(|((medium, address), mxid)| MirrorRow {
                medium: medium.as_str().to_string(),
                address: address.clone(),
                mxid: mxid.clone(),
            })
            .collect();
        Plan::Apply {
            wanted,
            bind,
            unbind,
            left,
            new_rows,
        }
    }

    /// Makes the binds and unbinds of `plan`, then records the mirror.
    fn apply(
        &mut self,
        plan: Plan,
    ) -> impl std::future::Future<Output = Result<Applied, String>> + 'static {
        let queue = self.queue.clone();
        let store = self.store.clone();
        let ctx = Arc::clone(&self.store_ctx);
        let index = self.index.clone();
        async move {
            let Plan::Apply {
                wanted,
                bind,
                unbind,
                left,
                new_rows,
            } = plan
            else {
                return Err(
                    "the directory answered with no one while the mirror holds people: \
                     nothing changed (check [ldap] base and filter)"
                        .to_string(),
                );
            };
            for chunk in bind.chunks(IN_FLIGHT) {
                let results = join_all(chunk.iter().map(|(medium, address, mxid)| {
                    let threepid = Threepid {
                        medium: *medium,
                        address: address.clone(),
                    };
                    let queue = queue.clone();
                    let prepared = Mxid::parse(mxid)
                        .map_err(|e| e.to_string())
                        .and_then(|mxid| {
                            Bind::new(&ctx, &index, threepid, mxid).map_err(|e| e.to_string())
                        });
                    async move { queue.bind(prepared?).await.map_err(|e| e.to_string()) }
                }))
                .await;
                results.into_iter().collect::<Result<Vec<_>, _>>()?;
            }
            for chunk in unbind.chunks(IN_FLIGHT) {
                let results = join_all(chunk.iter().map(|(medium, address, mxid)| {
                    let store = store.clone();
                    let message = Mxid::parse(mxid).map(|mxid| Unbind {
                        threepid: Threepid {
                            medium: *medium,
                            address: address.clone(),
                        },
                        mxid,
                    });
                    async move {
                        let message = message.map_err(|e| e.to_string())?;
                        store
                            .send(message)
                            .await
                            .map_err(|e| e.to_string())?
                            .map_err(|e| e.to_string())
                    }
                }))
                .await;
                results.into_iter().collect::<Result<Vec<_>, _>>()?;
            }
            if !new_rows.is_empty() {
                queue
                    .write_mirror(MirrorWrite::Upsert {
                        rows: new_rows,
                        now_ms: crate::now_ms(),
                    })
                    .await
                    .map_err(|e| e.to_string())?;
            }
            if !left.is_empty() {
                let gone = left
                    .iter()
                    .map(|(m, a)| (m.as_str().to_string(), a.clone()))
                    .collect();
                queue
                    .write_mirror(MirrorWrite::Remove(gone))
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Ok(Applied {
                mirror: wanted,
                bound: bind.len(),
                unbound: unbind.len(),
            })
        }
    }

    fn synced(&mut self, done: Applied, started: std::time::Instant) {
        self.failures = 0;
        self.mirror = done.mirror;
        self.view.replace(&self.mirror);
        self.status.entries = self.mirror.len();
        self.status.last_bound = done.bound;
        self.status.last_unbound = done.unbound;
        self.status.last_sync_ts = Some(crate::now_ms());
        self.status.last_sync_ms = Some(started.elapsed().as_millis() as u64);
        log::info!(
            "directory: synced {} entries in {} ms ({} bound, {} unbound)",
            self.mirror.len(),
            started.elapsed().as_millis(),
            done.bound,
            done.unbound
        );
    }

    fn failed(&mut self, error: String) {
        self.failures += 1;
        log::warn!("directory: sync failed, nothing changed: {error}");
        self.status.last_error = Some(error);
        self.status.last_error_ts = Some(crate::now_ms());
    }

    /// The next sync: after `sync_interval`, sooner after a failure (5 s, doubling).
    fn schedule(&mut self, ctx: &mut Context<Self>) {
        let wait = if self.failures == 0 {
            self.interval
        } else {
            FIRST_RETRY
                .saturating_mul(1 << self.failures.min(10).saturating_sub(1))
                .min(self.interval)
        };
        self.status.next_sync_ts = Some(crate::now_ms() + wait.as_millis() as i64);
        if let Some(earlier) = self.next.take() {
            ctx.cancel_future(earlier);
        }
        self.next = Some(ctx.run_later(wait, |act, ctx| act.sync(ctx)));
    }
}

enum Plan {
    Apply {
        wanted: HashMap<(Medium, String), String>,
        bind: Vec<(Medium, String, String)>,
        unbind: Vec<(Medium, String, String)>,
        left: Vec<(Medium, String)>,
        /// Rows `directory_mirror` does not hold yet (new or changed).
        new_rows: Vec<MirrorRow>,
    },
    /// Nobody in the directory while the mirror holds people.
    Suspicious,
}

struct Applied {
    mirror: HashMap<(Medium, String), String>,
    bound: usize,
    unbound: usize,
}

impl Actor for DirectoryMirror {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.sync(ctx);
    }
}

#[derive(Message)]
#[rtype(result = "DirectoryStatus")]
pub struct GetStatus;

impl Handler<GetStatus> for DirectoryMirror {
    type Result = MessageResult<GetStatus>;

    fn handle(&mut self, _: GetStatus, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.status.clone())
    }
}

/// Sent by an admin tool or a test: sync now (ignored while one runs).
#[derive(Message)]
#[rtype(result = "()")]
pub struct SyncNow;

impl Handler<SyncNow> for DirectoryMirror {
    type Result = ();

    fn handle(&mut self, _: SyncNow, ctx: &mut Context<Self>) {
        self.sync(ctx);
    }
}

/// Sent by a live look-through: the directory held these 3PIDs, now bound here.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Mirrored(pub Vec<(Medium, String, String)>);

impl Handler<Mirrored> for DirectoryMirror {
    type Result = ();

    fn handle(&mut self, msg: Mirrored, ctx: &mut Context<Self>) {
        let rows: Vec<MirrorRow> = msg
            .0
            .iter()
            .map(|(medium, address, mxid)| MirrorRow {
                medium: medium.as_str().to_string(),
                address: address.clone(),
                mxid: mxid.clone(),
            })
            .collect();
        for (medium, address, mxid) in msg.0 {
            self.mirror.insert((medium, address), mxid);
        }
        self.status.entries = self.mirror.len();
        let write = self.queue.write_mirror(MirrorWrite::Upsert {
            rows,
            now_ms: crate::now_ms(),
        });
        ctx.spawn(
            async move {
                if let Err(e) = write.await {
                    log::warn!("directory: a live look-through could not be recorded: {e}");
                }
            }
            .into_actor(self),
        );
    }
}

/// Live look-through (`[ldap] live_lookup`): the v1 lookup and bulk_lookup addresses that no
/// binding answers are asked of the directory at once, in one search per request; each hit is
/// bound here (so the mirror holds it from then on, and the peers get it) and answered. The
/// directory slow or down costs a lookup at most `timeout`, never an error.
#[derive(Clone)]
pub struct LiveLookup {
    client: crate::directory::LdapClient,
    timeout: Duration,
    mirror: Addr<DirectoryMirror>,
    view: DirectoryView,
    queue: StoreQueue,
    store_ctx: Arc<StoreContext>,
    index: SharedIndex,
    /// When a failure was last logged (ms): once a minute at most, not once per lookup.
    last_warned_ms: Arc<std::sync::atomic::AtomicI64>,
}

impl LiveLookup {
    pub fn new(
        client: crate::directory::LdapClient,
        timeout: Duration,
        mirror: Addr<DirectoryMirror>,
        view: DirectoryView,
        handles: StoreHandles,
    ) -> Self {
        let StoreHandles {
            queue,
            store_ctx,
            index,
            ..
        } = handles;
        Self {
            client,
            timeout,
            mirror,
            view,
            queue,
            store_ctx,
            index,
            last_warned_ms: Arc::default(),
        }
    }

    fn warn(&self, what: std::fmt::Arguments<'_>) {
        use std::sync::atomic::Ordering;
        let now = crate::now_ms();
        let last = self.last_warned_ms.load(Ordering::Relaxed);
        if now - last >= 60_000
            && self
                .last_warned_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            log::warn!("directory: {what} (said once a minute at most)");
        }
    }

    /// The directory's bindings of `misses` (normalised 3PIDs), each bound here first:
    /// (medium, address, mxid, the signed association).
    pub async fn find(
        &self,
        misses: &[(Medium, String)],
    ) -> Vec<(Medium, String, String, Arc<str>)> {
        if misses.is_empty() {
            return Vec::new();
        }
        let found =
            match tokio::time::timeout(self.timeout, self.client.search_addresses(misses)).await {
                Ok(Ok(found)) => found,
                Ok(Err(e)) => {
                    self.warn(format_args!(
                        "live look-through failed, lookups answered without it: {e}"
                    ));
                    return Vec::new();
                }
                Err(_) => {
                    self.warn(format_args!(
                        "live look-through took over {} ms, lookups answered without it",
                        self.timeout.as_millis()
                    ));
                    return Vec::new();
                }
            };
        let mut bound = Vec::new();
        for hit in found {
            let Ok(mxid) = Mxid::parse(&hit.mxid) else {
                continue;
            };
            let threepid = Threepid {
                medium: hit.medium,
                address: hit.address.clone(),
            };
            let signed = match Bind::new(&self.store_ctx, &self.index, threepid, mxid) {
                Ok(bind) => self.queue.bind(bind).await,
                Err(e) => Err(e),
            };
            match signed {
                Ok(signed) => bound.push((hit.medium, hit.address, hit.mxid, signed)),
                Err(e) => log::warn!("directory: a live look-through hit could not be bound: {e}"),
            }
        }
        if !bound.is_empty() {
            let hits: Vec<_> = bound
                .iter()
                .map(|(m, a, x, _)| (*m, a.clone(), x.clone()))
                .collect();
            // Lookups see the hits at once; the actor records them.
            self.view.insert(&hits);
            self.mirror.do_send(Mirrored(hits));
        }
        bound
    }
}
