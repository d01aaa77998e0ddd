//! The association store: the one owner of writes to `local_threepid_associations` and
//! `global_threepid_associations`.
//!
//! Handlers queue a [`Bind`] (built and signed on the handler's thread), and the replication
//! receiver an [`ApplyReplicated`], through a [`StoreQueue`], straight into the pending
//! writes; unbinds are sent as [`Unbind`]. Writes that arrive while a transaction is being
//! committed wait in `pending` and are committed together in the next one (group commit); if
//! one write of a batch fails, the batch is rolled back and retried write by write, so a
//! failing write fails alone. The SQLite work runs on a blocking thread (`spawn_blocking`),
//! never on the actor's arbiter: the commit thread holds the connection while writes keep
//! coming, taking each next batch itself, and hands it back when none are left, so there is
//! never more than one transaction at a time. On that thread, after the commit, the
//! batch is applied to the [`SharedIndex`], the pushers are woken (newest local id) and only
//! then are the writers answered: a client always reads its own writes. The connection
//! commits with `synchronous = FULL`, so an answered write is on disk; should the commit
//! thread panic, the store stops and the node exits for its supervisor to restart it
//! ([`AssociationStore::new`]).

use std::sync::Arc;

use actix::prelude::*;
use diesel::SqliteConnection;
use tokio::sync::{oneshot, watch};

use super::checkpoint::Written;
use crate::accounts::AccountWrite;
use crate::association::ThreepidAssociation;
use crate::crypto::{lookup_hash, NodeSigningKey};
use crate::db::directory::MirrorWrite;
use crate::db::invites::{self as invite_db, NewDelivery};
use crate::db::queries::{self, NewLocalRow, OriginMark, Tombstone};
use crate::db::sessions::SessionWrite;
use crate::db::{DbError, GlobalRow};
use crate::invite::{onbind_body, InviteWrite, PendingInviteKeys};
use crate::lookup_index::{Change, LookupIndex, SharedIndex, Signatures};
use crate::types::{Mxid, ServerName, Threepid};

/// Most writes committed in one transaction; the rest wait for the next one.
const MAX_BATCH: usize = 2048;
/// Messages the mailbox holds before `send` waits (backpressure on the HTTP handlers).
const MAILBOX_CAPACITY: usize = 4096;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The text of a `diesel` error (which is not `Clone`, and a failed commit answers every
    /// writer of its batch).
    #[error("database error: {0}")]
    Db(String),
    #[error("signing failed: {0}")]
    Sign(String),
    #[error("the association store has stopped")]
    Stopped,
    /// A peer pushed rows of its own at or below what was already applied from it, but newer
    /// than it: its ids started again (a new database under the same name). Nothing of the
    /// push is applied.
    #[error(
        "{origin} pushed id {pushed_id} (ts {pushed_ts}), but ids up to {} (ts up to {}) were \
         already applied from it: its ids started again, as with a new database. Its pushes \
         are refused until an admin runs `sydent-rs forget-origin {origin}` on this node \
         (see the README)",
        mark.origin_id, mark.ts
    )]
    OriginIdsRestarted {
        origin: String,
        mark: OriginMark,
        pushed_id: i64,
        pushed_ts: i64,
    },
}

/// Sent by the client and internal bind handlers: bind a 3PID to an mxid now, replacing any
/// earlier binding of it made on this node. Answers the signed association as JSON text (what
/// is stored and served; handlers send it as it is).
///
/// Built with [`Bind::new`] on the handler's thread, which signs it there: signing is the
/// costliest step of a bind and the store's own thread must stay free to batch.
#[derive(Message, Debug)]
#[rtype(result = "Result<Arc<str>, StoreError>")]
pub struct Bind(PreparedBind);

impl Bind {
    /// Builds and signs the association. Its `ts` is now, or just after the newest binding of
    /// the 3PID that `index` holds if a peer's clock put that one ahead of ours: a bind made
    /// here must win over what is already there (lookups answer the newest `ts`). It is valid
    /// from now either way.
    pub fn new(
        ctx: &StoreContext,
        index: &SharedIndex,
        threepid: Threepid,
        mxid: Mxid,
    ) -> Result<Self, StoreError> {
        let now = (ctx.now_ms)();
        // While the index warms up after a start this is not known: the bind's ts is now.
        let newest = index
            .read(|i| i.newest_ts(threepid.medium, &threepid.address))
            .flatten();
        let ts = newest.map_or(now, |newest| now.max(newest.saturating_add(1)));
        PreparedBind::new(ctx, &threepid, &mxid, now, ts).map(Self)
    }
}

/// Sent by the unbind handlers (client API, with a session or signed by the homeserver, and
/// internal API): remove the binding of `threepid` to `mxid`, when it is the one lookups on
/// this node answer, made here or on a peer. The node writes a tombstone of its own, newer
/// than every binding of the 3PID it knows, which replication carries to peers and which
/// removes those bindings everywhere (see [`ApplyReplicated`]). Answers whether a binding was
/// removed (false when the 3PID is not bound to that mxid: unbind is idempotent).
#[derive(Message, Debug, Clone)]
#[rtype(result = "Result<bool, StoreError>")]
pub struct Unbind {
    pub threepid: Threepid,
    pub mxid: Mxid,
}

pub use crate::mesh::verify::Replicated;

/// Sent by the replication receiver: apply a verified batch from `origin`, all or nothing.
/// Rows at or below the origin's mark (the highest id applied from it) are re-sends or late
/// copies and are skipped; above it, bindings go into the global table and a tombstone removes
/// that origin's older rows for its 3PID and every other origin's row for it with an older
/// `ts` (the last write wins), and the mark moves to the batch's last id. Answers how many
/// rows were applied; refuses the whole batch with [`StoreError::OriginIdsRestarted`] when
/// the origin's ids started again.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Result<usize, StoreError>")]
pub struct ApplyReplicated {
    pub origin: ServerName,
    /// In ascending `origin_id` order.
    pub items: Vec<Replicated>,
}

/// A write to the v2 account tables (the store is the database's single writer). Answers
/// whether it changed anything (a logout of an unknown token does not); the caller mirrors it
/// into `crate::accounts::Accounts` once it is committed.
#[derive(Message, Debug)]
#[rtype(result = "Result<bool, StoreError>")]
pub struct WriteAccount(pub AccountWrite);

/// Sent by `Node::stop`: answers once every write received before it has been committed.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Flush;

/// A bind with its association built and signed (ts = when the store received it).
#[derive(Debug)]
pub struct PreparedBind {
    assoc: ThreepidAssociation,
    /// The signed association, serialized once.
    sg_assoc: Arc<str>,
    /// Our `ed25519:0` signature in it, for the lookup index (`None`: another key id).
    signature: Option<[u8; 64]>,
    hash: String,
}

impl PreparedBind {
    fn new(
        ctx: &StoreContext,
        threepid: &Threepid,
        mxid: &Mxid,
        now: i64,
        ts: i64,
    ) -> Result<Self, StoreError> {
        let Threepid { medium, address } = threepid;
        let assoc = ThreepidAssociation {
            ts,
            ..ThreepidAssociation::binding(medium.as_str(), address, mxid.as_str(), now)
        };
        let (signed, signature) = assoc.signed_text(&ctx.server_name, &ctx.signing_key)?;
        Ok(Self {
            sg_assoc: signed.into(),
            // The index keeps our signature compactly only under `ed25519:0`.
            signature: (ctx.signing_key.key_id() == "ed25519:0").then_some(signature),
            hash: lookup_hash(address, medium.as_str(), &ctx.pepper),
            assoc,
        })
    }
}

/// What the store needs to build rows: immutable, shared with the blocking thread.
#[derive(Debug)]
pub struct StoreContext {
    pub server_name: ServerName,
    pub signing_key: NodeSigningKey,
    pub pepper: String,
    /// Clock in milliseconds since the epoch (a parameter so tests can fix time).
    pub now_ms: fn() -> i64,
    /// Test-only fault hook: the commit thread panics when it writes a bind of this address
    /// (`SYDENT_RS_TEST_PANIC_ON_BIND`), so the tests can see what a broken store does.
    pub panic_on_bind: Option<String>,
    /// The 3PIDs that may have invites waiting: a bind (local or replicated) of one of them
    /// queues the onbind delivery of its invites in the same transaction.
    pub pending_invites: Arc<PendingInviteKeys>,
    /// Where committed onbind deliveries go (the delivery actor); `None` in tools that only
    /// write.
    pub onbind: Option<tokio::sync::mpsc::UnboundedSender<QueuedDelivery>>,
    /// Binds and unbinds made here, counted once the metrics are on.
    pub counters: std::sync::OnceLock<crate::metrics::WriteCounters>,
}

/// An onbind delivery committed to the queue table, for the delivery actor.
#[derive(Debug, Clone)]
pub struct QueuedDelivery {
    pub id: i64,
    /// The homeserver: the mxid's server name.
    pub destination: String,
    pub medium: String,
    pub address: String,
    pub body: Arc<str>,
    pub created_ts: i64,
}

impl QueuedDelivery {
    /// A delivery left queued before the start (its 3PID read back from its body).
    pub fn from_row(row: crate::db::invites::DeliveryRow) -> Self {
        let threepid = serde_json::from_str::<serde_json::Value>(&row.body).ok();
        let field = |name: &str| {
            threepid
                .as_ref()
                .and_then(|b| b.get(name)?.as_str().map(str::to_string))
                .unwrap_or_default()
        };
        Self {
            id: row.id,
            medium: field("medium"),
            address: field("address"),
            destination: row.destination,
            body: row.body.into(),
            created_ts: row.created_ts,
        }
    }
}

enum Write {
    /// Signed on the handler's thread before it was sent, so the commit thread only writes.
    Bind(PreparedBind, oneshot::Sender<Result<Arc<str>, StoreError>>),
    Unbind(Unbind, oneshot::Sender<Result<bool, StoreError>>),
    Replicated(ApplyReplicated, oneshot::Sender<Result<usize, StoreError>>),
    Account(AccountWrite, oneshot::Sender<Result<bool, StoreError>>),
    Session(SessionWrite, oneshot::Sender<Result<(), StoreError>>),
    Invite(InviteWrite, oneshot::Sender<Result<(), StoreError>>),
    Mirror(MirrorWrite, oneshot::Sender<Result<(), StoreError>>),
    /// Not a write: the sender of an invite token (`sign-ed25519`), read on the writer's
    /// connection so that it sees every committed invite (also of a `:memory:` database).
    InviteSender(String, oneshot::Sender<Result<Option<String>, StoreError>>),
    Flush(oneshot::Sender<()>),
}

/// A committed write's effect, applied to the index after the commit.
enum Applied {
    Bound {
        signed: Arc<str>,
        /// Our signature in `signed`, when the index can keep it compactly.
        signature: Option<[u8; 64]>,
        row: GlobalRow,
        /// The 3PID had invites waiting: their delivery, queued with the bind (its body, the
        /// association with the invites, is also the bind's answer, as in Sydent).
        onbind: Option<Box<QueuedDelivery>>,
    },
    Unbound {
        /// The tombstone written: (local id, ts); None when nothing was bound to that mxid.
        tombstone: Option<(i64, i64)>,
        threepid: Threepid,
    },
    Replicated {
        origin: String,
        inserted: Vec<GlobalRow>,
        /// (medium, address, tombstone origin id, tombstone ts)
        removed: Vec<(String, String, i64, i64)>,
        /// Invites this node held for bindings in the batch, queued for delivery.
        onbind: Vec<QueuedDelivery>,
    },
    Account(bool),
    InviteSender(Option<String>),
    Nothing,
}

/// Writes waiting for a commit. A mutex rather than a field of the actor alone: the commit
/// thread takes the next batch itself as soon as it has answered the last one, without a
/// round trip through the actor's thread and a new blocking task per batch, and binds are
/// queued by the HTTP workers themselves ([`StoreQueue`]). Held only to push or to take a
/// batch, never across a commit.
type Pending = Arc<std::sync::Mutex<Queue>>;

#[derive(Default)]
struct Queue {
    writes: Vec<Write>,
    /// Set by whoever queues a write while no commit thread runs (and who then starts one);
    /// cleared by the commit thread when it finds nothing left. While it is set, queueing a
    /// write needs no message to the actor: the running thread will take it.
    committing: bool,
    /// The store has stopped: nothing queued will be committed.
    stopped: bool,
}

impl Queue {
    /// Queues `write` unless the store has stopped (then it is dropped, and with it its
    /// reply channel). Answers whether the caller must start the commit thread (none is
    /// running or about to).
    fn push(&mut self, write: Write) -> Result<bool, StoreError> {
        if self.stopped {
            return Err(StoreError::Stopped);
        }
        self.writes.push(write);
        Ok(!std::mem::replace(&mut self.committing, true))
    }
}

/// Writes most in the store's queue from the HTTP workers at once; a write waits for room
/// beyond them (as a full mailbox made it wait before they bypassed it).
const QUEUED_WRITES: usize = MAILBOX_CAPACITY;

/// How the HTTP workers queue binds and received pushes: straight into the store's pending
/// writes, waking the actor only when no commit thread is running. A write through the
/// actor's mailbox woke the actor's thread every time, only for it to push the write into
/// the same queue (measured: a tenth of a bind's CPU).
#[derive(Clone)]
pub struct StoreQueue {
    pending: Pending,
    store: Addr<AssociationStore>,
    room: Arc<tokio::sync::Semaphore>,
}

impl StoreQueue {
    /// Commits `bind` with the next batch; answers as the [`Bind`] message does.
    pub async fn bind(&self, bind: Bind) -> Result<Arc<str>, StoreError> {
        self.submit(|tx| Write::Bind(bind.0, tx)).await
    }

    /// Applies a verified push with the next batch; answers as the [`ApplyReplicated`]
    /// message does.
    pub async fn apply_replicated(&self, push: ApplyReplicated) -> Result<usize, StoreError> {
        self.submit(|tx| Write::Replicated(push, tx)).await
    }

    /// Queues a session write now, in the caller's order (the validation-session actor's
    /// decisions reach the database in the order it took them), without waiting for room:
    /// the actor is one writer and answers each write's client only once it is committed.
    /// The returned future answers when it is.
    pub fn write_session(
        &self,
        write: SessionWrite,
    ) -> impl std::future::Future<Output = Result<(), StoreError>> {
        self.queue_now(|tx| Write::Session(write, tx))
    }

    /// Queues an invite write (as [`Self::write_session`]: in the caller's order, without
    /// waiting for room); the future answers once it is committed.
    pub fn write_invite(
        &self,
        write: InviteWrite,
    ) -> impl std::future::Future<Output = Result<(), StoreError>> {
        self.queue_now(|tx| Write::Invite(write, tx))
    }

    /// Queues a write to the directory mirror's table (as [`Self::write_session`]).
    pub fn write_mirror(
        &self,
        write: MirrorWrite,
    ) -> impl std::future::Future<Output = Result<(), StoreError>> {
        self.queue_now(|tx| Write::Mirror(write, tx))
    }

    fn queue_now(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<(), StoreError>>) -> Write,
    ) -> impl std::future::Future<Output = Result<(), StoreError>> {
        let (tx, rx) = oneshot::channel();
        let queued = lock(&self.pending).push(make(tx));
        if let Ok(true) = queued {
            self.store.do_send(StartCommit);
        }
        async move {
            queued?;
            rx.await.unwrap_or(Err(StoreError::Stopped))
        }
    }

    /// The sender of the invite whose token this is, if it is still stored.
    pub async fn invite_sender(&self, token: String) -> Result<Option<String>, StoreError> {
        self.submit(|tx| Write::InviteSender(token, tx)).await
    }

    async fn submit<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Write,
    ) -> Result<T, StoreError> {
        let _room = self.room.acquire().await.map_err(|_| StoreError::Stopped)?;
        let (tx, rx) = oneshot::channel();
        let start = lock(&self.pending).push(make(tx))?;
        if start {
            self.store.do_send(StartCommit);
        }
        rx.await.unwrap_or(Err(StoreError::Stopped))
    }
}

/// Sent by a [`StoreQueue`] that queued a write while no commit thread ran. Carries no data
/// (the write is in the queue already), so `do_send` loses nothing: should the store have
/// stopped, the queue is marked stopped and emptied, which answers the writer.
#[derive(Message)]
#[rtype(result = "()")]
struct StartCommit;

pub struct AssociationStore {
    /// `None` while the commit thread holds it.
    conn: Option<SqliteConnection>,
    pending: Pending,
    ctx: Arc<StoreContext>,
    index: SharedIndex,
    /// The newest committed local id: the replication pushers wait on it.
    local_id: Arc<watch::Sender<i64>>,
    /// Rows committed since the start, for the WAL checkpointer.
    written: Written,
    /// Told why, should the store stop because it can no longer commit (see [`Self::new`]).
    failed: Option<oneshot::Sender<String>>,
}

impl AssociationStore {
    /// `local_id` starts at the newest local id in the database. Should the commit thread
    /// panic, the connection is gone with it: the store stops (every write waiting or sent
    /// later fails with [`StoreError::Stopped`], nothing is half committed) and sends the
    /// reason on `failed`, on which the node stops with a non-zero exit so that its supervisor
    /// starts it again on a fresh connection, rather than serving reads and failing every bind.
    pub fn new(
        conn: SqliteConnection,
        ctx: Arc<StoreContext>,
        index: SharedIndex,
        local_id: watch::Sender<i64>,
        written: Written,
        failed: oneshot::Sender<String>,
    ) -> Self {
        Self {
            conn: Some(conn),
            pending: Pending::default(),
            ctx,
            index,
            local_id: Arc::new(local_id),
            written,
            failed: Some(failed),
        }
    }

    /// Starts the actor; answers its address and the handle the HTTP workers queue binds
    /// through.
    pub fn start_with_queue(self) -> (Addr<Self>, StoreQueue) {
        let pending = Arc::clone(&self.pending);
        let store = self.start();
        let queue = StoreQueue {
            pending,
            store: store.clone(),
            room: Arc::new(tokio::sync::Semaphore::new(QUEUED_WRITES)),
        };
        (store, queue)
    }

    /// Starts the commit thread unless it is running already: it commits the pending writes,
    /// batch after batch, until none are left, then hands the connection back.
    fn flush(&mut self, ctx: &mut Context<Self>) {
        if lock(&self.pending).writes.is_empty() {
            return;
        }
        let Some(mut conn) = self.conn.take() else {
            return; // the running commit thread will take them
        };
        let pending = Arc::clone(&self.pending);
        let store_ctx = Arc::clone(&self.ctx);
        let index = self.index.clone();
        let local_id = Arc::clone(&self.local_id);
        let written = Arc::clone(&self.written);
        // Commit, update the index and answer the writers all on the blocking thread: the
        // answers do not wait for a hop back to this actor.
        let job = actix_web::rt::task::spawn_blocking(move || loop {
            let batch: Vec<Write> = {
                let mut pending = lock(&pending);
                if pending.writes.is_empty() {
                    // The next write queued starts a thread again (see `Queue::push`).
                    pending.committing = false;
                    return conn;
                }
                let take = pending.writes.len().min(MAX_BATCH);
                pending.writes.drain(..take).collect()
            };
            let outcome = commit_batch(&mut conn, &store_ctx, &batch);
            finish_batch(&index, &store_ctx, &local_id, &written, batch, outcome);
        });
        ctx.spawn(job.into_actor(self).map(|joined, act, ctx| {
            match joined {
                Ok(conn) => {
                    act.conn = Some(conn);
                    act.flush(ctx);
                }
                Err(panic) => {
                    // The connection and the batch's reply channels were lost with the thread;
                    // the waiting handlers see `Stopped`. Nothing was committed half-way.
                    let reason = format!("the commit thread panicked: {panic}");
                    log::error!("association store: {reason}");
                    act.close();
                    if let Some(failed) = act.failed.take() {
                        let _ = failed.send(reason);
                    }
                    ctx.stop();
                }
            }
        }));
    }
}

/// Updates the index with what was committed, then answers every writer in the batch.
fn finish_batch(
    index: &SharedIndex,
    ctx: &StoreContext,
    local_id: &watch::Sender<i64>,
    written: &Written,
    batch: Vec<Write>,
    outcome: Result<Vec<Result<Applied, StoreError>>, DbError>,
) {
    let results: Vec<Result<Applied, StoreError>> = match outcome {
        Ok(results) => results,
        Err(e) => {
            log::error!(
                "association store: commit of {} writes failed: {e}",
                batch.len()
            );
            let err = StoreError::from(e);
            batch.iter().map(|_| Err(err.clone())).collect()
        }
    };
    let mut newest_local = None;
    let mut changes = Vec::new();
    let mut deliveries = Vec::new();
    for applied in results.iter().flatten() {
        match applied {
            Applied::Bound {
                row,
                signature,
                onbind,
                ..
            } => {
                deliveries.extend(onbind.iter().map(|d| (**d).clone()));
                newest_local = newest_local.max(Some(row.origin_id));
                if let Some(counters) = ctx.counters.get() {
                    counters.binds.inc();
                }
                let signatures = match signature {
                    Some(signature) => Signatures::Own(*signature),
                    None => Signatures::FromRow,
                };
                changes.push(Change::Insert(row.clone(), signatures));
            }
            Applied::Replicated {
                origin,
                inserted,
                removed,
                onbind,
            } => {
                deliveries.extend(onbind.iter().cloned());
                for row in inserted {
                    changes.push(Change::Insert(row.clone(), Signatures::FromRow));
                }
                for (medium, address, id, ts) in removed {
                    if let Some(medium) = crate::types::Medium::parse(medium) {
                        changes.push(Change::Remove {
                            origin: origin.clone(),
                            medium,
                            address: address.clone(),
                            before_origin_id: *id,
                            before_ts: *ts,
                        });
                    }
                }
            }
            Applied::Unbound {
                tombstone: Some((id, ts)),
                threepid,
            } => {
                newest_local = newest_local.max(Some(*id));
                if let Some(counters) = ctx.counters.get() {
                    counters.unbinds.inc();
                }
                changes.push(Change::Remove {
                    origin: ctx.server_name.to_string(),
                    medium: threepid.medium,
                    address: threepid.address.clone(),
                    before_origin_id: *id,
                    before_ts: *ts,
                });
            }
            _ => {}
        }
    }
    for (write, result) in batch.iter().zip(&results) {
        if let (Write::Invite(InviteWrite::Store(invite), _), Ok(_)) = (write, result) {
            ctx.pending_invites.insert(&invite.medium, &invite.address);
        }
    }
    for delivery in deliveries {
        ctx.pending_invites
            .remove(&delivery.medium, &delivery.address);
        if let Some(onbind) = &ctx.onbind {
            // Closed only while the node stops: the delivery is in the table for next start.
            let _ = onbind.send(delivery);
        }
    }
    // One change per row written (a binding inserted, or a tombstone applied to a 3PID).
    written.fetch_add(changes.len() as u64, std::sync::atomic::Ordering::Relaxed);
    index.apply(changes);
    // Wake the replication pushers: the rows are committed, so they can read them.
    if let Some(id) = newest_local {
        local_id.send_if_modified(|current| {
            let newer = id > *current;
            *current = (*current).max(id);
            newer
        });
    }
    for (write, result) in batch.into_iter().zip(results) {
        // A closed receiver means the client went away; the write is committed anyway.
        match write {
            Write::Bind(_, reply) => {
                let _ = reply.send(result.and_then(|a| match a {
                    Applied::Bound {
                        onbind: Some(onbind),
                        ..
                    } => Ok(onbind.body),
                    Applied::Bound { signed, .. } => Ok(signed),
                    _ => Err(StoreError::Db("a bind was applied as an unbind".into())),
                }));
            }
            Write::Unbind(_, reply) => {
                let _ = reply.send(result.map(|a| {
                    matches!(
                        a,
                        Applied::Unbound {
                            tombstone: Some(_),
                            ..
                        }
                    )
                }));
            }
            Write::Replicated(_, reply) => {
                let _ = reply.send(result.map(|a| match a {
                    Applied::Replicated { inserted, .. } => inserted.len(),
                    _ => 0,
                }));
            }
            Write::Account(_, reply) => {
                let _ = reply.send(result.map(|a| matches!(a, Applied::Account(true))));
            }
            Write::Session(_, reply) | Write::Invite(_, reply) | Write::Mirror(_, reply) => {
                let _ = reply.send(result.map(|_| ()));
            }
            Write::InviteSender(_, reply) => {
                let _ = reply.send(result.map(|a| match a {
                    Applied::InviteSender(sender) => sender,
                    _ => None,
                }));
            }
            Write::Flush(reply) => {
                let _ = reply.send(());
            }
        }
    }
}

impl AssociationStore {
    fn enqueue<T: Send + 'static>(
        &mut self,
        ctx: &mut Context<Self>,
        make: impl FnOnce(oneshot::Sender<T>) -> Write,
    ) -> oneshot::Receiver<T> {
        let (tx, rx) = oneshot::channel();
        // A stopped store drops the write, and with it `tx`: the writer sees `Stopped`.
        let _ = lock(&self.pending).push(make(tx));
        self.flush(ctx);
        rx
    }

    /// Marks the queue stopped and drops what waits in it (its writers see `Stopped`).
    fn close(&mut self) {
        let dropped = {
            let mut pending = lock(&self.pending);
            pending.stopped = true;
            std::mem::take(&mut pending.writes)
        };
        drop(dropped);
    }
}

fn lock(pending: &Pending) -> std::sync::MutexGuard<'_, Queue> {
    // Poisoned only if a push or a drain panicked: the vector itself is whole.
    pending.lock().unwrap_or_else(|e| e.into_inner())
}

impl From<DbError> for StoreError {
    fn from(e: DbError) -> Self {
        Self::Db(e.to_string())
    }
}

impl From<crate::crypto::SignError> for StoreError {
    fn from(e: crate::crypto::SignError) -> Self {
        Self::Sign(e.to_string())
    }
}

impl Actor for AssociationStore {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(MAILBOX_CAPACITY);
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        self.close();
    }
}

impl Handler<StartCommit> for AssociationStore {
    type Result = ();

    fn handle(&mut self, _: StartCommit, ctx: &mut Context<Self>) {
        self.flush(ctx);
    }
}

impl Handler<Bind> for AssociationStore {
    type Result = ResponseFuture<Result<Arc<str>, StoreError>>;

    fn handle(&mut self, msg: Bind, ctx: &mut Context<Self>) -> Self::Result {
        let rx = self.enqueue(ctx, |tx| Write::Bind(msg.0, tx));
        Box::pin(async move { rx.await.unwrap_or(Err(StoreError::Stopped)) })
    }
}

impl Handler<Unbind> for AssociationStore {
    type Result = ResponseFuture<Result<bool, StoreError>>;

    fn handle(&mut self, msg: Unbind, ctx: &mut Context<Self>) -> Self::Result {
        let rx = self.enqueue(ctx, |tx| Write::Unbind(msg, tx));
        Box::pin(async move { rx.await.unwrap_or(Err(StoreError::Stopped)) })
    }
}

impl Handler<ApplyReplicated> for AssociationStore {
    type Result = ResponseFuture<Result<usize, StoreError>>;

    fn handle(&mut self, msg: ApplyReplicated, ctx: &mut Context<Self>) -> Self::Result {
        let rx = self.enqueue(ctx, |tx| Write::Replicated(msg, tx));
        Box::pin(async move { rx.await.unwrap_or(Err(StoreError::Stopped)) })
    }
}

impl Handler<WriteAccount> for AssociationStore {
    type Result = ResponseFuture<Result<bool, StoreError>>;

    fn handle(&mut self, msg: WriteAccount, ctx: &mut Context<Self>) -> Self::Result {
        let rx = self.enqueue(ctx, |tx| Write::Account(msg.0, tx));
        Box::pin(async move { rx.await.unwrap_or(Err(StoreError::Stopped)) })
    }
}

impl Handler<Flush> for AssociationStore {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: Flush, ctx: &mut Context<Self>) -> Self::Result {
        let rx = self.enqueue(ctx, Write::Flush);
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}

/// Commits the whole batch in one transaction. Should one write fail, that transaction is
/// rolled back and each write is retried in a transaction of its own, so a failing write
/// fails alone. (Not a savepoint per write: SQLite copies every page a savepoint touches, which
/// cost a quarter of the bind path.)
fn commit_batch(
    conn: &mut SqliteConnection,
    ctx: &StoreContext,
    batch: &[Write],
) -> Result<Vec<Result<Applied, StoreError>>, DbError> {
    let now = (ctx.now_ms)();
    let together = conn.immediate_transaction(|c| {
        batch
            .iter()
            .map(|write| apply(c, ctx, write, now))
            .collect::<Result<Vec<_>, StoreError>>()
            .map_err(BatchFailed::Write)
    });
    match together {
        Ok(applied) => Ok(applied.into_iter().map(Ok).collect()),
        Err(BatchFailed::Db(e)) => Err(e),
        Err(BatchFailed::Write(e)) => {
            log::warn!("association store: a write in a batch of {} failed ({e}); committing them one by one", batch.len());
            Ok(batch
                .iter()
                .map(|write| {
                    conn.immediate_transaction(|c| {
                        apply(c, ctx, write, now).map_err(BatchFailed::Write)
                    })
                    .map_err(|e| match e {
                        BatchFailed::Db(e) => StoreError::from(e),
                        BatchFailed::Write(e) => e,
                    })
                })
                .collect())
        }
    }
}

/// Why a batch transaction rolled back.
enum BatchFailed {
    Db(DbError),
    Write(StoreError),
}

impl From<DbError> for BatchFailed {
    fn from(e: DbError) -> Self {
        Self::Db(e)
    }
}

fn apply(
    conn: &mut SqliteConnection,
    ctx: &StoreContext,
    write: &Write,
    now: i64,
) -> Result<Applied, StoreError> {
    match write {
        Write::Bind(bind, _) => apply_bind(conn, ctx, bind),
        Write::Unbind(unbind, _) => apply_unbind(conn, ctx, unbind, now),
        Write::Replicated(batch, _) => apply_replicated(conn, ctx, batch),
        Write::Account(write, _) => apply_account(conn, write, now),
        Write::Session(write, _) => {
            crate::db::sessions::apply(conn, write)?;
            Ok(Applied::Nothing)
        }
        Write::Invite(write, _) => {
            invite_db::apply(conn, write)?;
            Ok(Applied::Nothing)
        }
        Write::Mirror(write, _) => {
            crate::db::directory::apply(conn, write)?;
            Ok(Applied::Nothing)
        }
        Write::InviteSender(token, _) => {
            Ok(Applied::InviteSender(invite_db::sender_of(conn, token)?))
        }
        Write::Flush(_) => Ok(Applied::Nothing),
    }
}

fn apply_account(
    conn: &mut SqliteConnection,
    write: &AccountWrite,
    now: i64,
) -> Result<Applied, StoreError> {
    use crate::db::accounts;
    let changed = match write {
        AccountWrite::Register {
            user_id,
            stored_token,
        } => accounts::register(conn, user_id, stored_token, now).map(|()| true)?,
        AccountWrite::Logout { stored_token } => accounts::logout(conn, stored_token)?,
        AccountWrite::AcceptTerms {
            user_id,
            urls,
            consent_version,
        } => accounts::accept_terms(conn, user_id, urls, consent_version.as_deref())
            .map(|()| true)?,
    };
    Ok(Applied::Account(changed))
}

fn apply_bind(
    conn: &mut SqliteConnection,
    ctx: &StoreContext,
    bind: &PreparedBind,
) -> Result<Applied, StoreError> {
    let assoc = &bind.assoc;
    if ctx.panic_on_bind.as_deref() == Some(assoc.address.as_str()) {
        panic!("SYDENT_RS_TEST_PANIC_ON_BIND: a bind of {}", assoc.address);
    }
    let id = queries::replace_local(
        conn,
        &NewLocalRow {
            medium: &assoc.medium,
            address: &assoc.address,
            mxid: assoc.mxid.as_deref(),
            ts: assoc.ts,
            not_before: assoc.not_before,
            not_after: assoc.not_after,
            lookup_hash: Some(&bind.hash),
        },
    )?;
    let row = GlobalRow {
        medium: assoc.medium.clone(),
        address: assoc.address.clone(),
        mxid: assoc.mxid.clone().unwrap_or_default(),
        ts: assoc.ts,
        not_before: assoc.not_before.unwrap_or(assoc.ts),
        not_after: assoc.not_after.unwrap_or(i64::MAX),
        origin_server: ctx.server_name.to_string(),
        origin_id: id,
        sg_assoc: bind.sg_assoc.to_string(),
        lookup_hash: Some(bind.hash.clone()),
    };
    // The id is new and larger than any of ours: no re-send or newer row to check for.
    queries::supersede_global(conn, &row)?;
    let onbind = queue_invites(conn, ctx, &row, || Ok(assoc.to_json()))?.map(Box::new);
    Ok(Applied::Bound {
        signed: Arc::clone(&bind.sg_assoc),
        signature: bind.signature,
        row,
        onbind,
    })
}

/// A verified batch from a peer, inside the caller's transaction: all of it or none of it.
fn apply_replicated(
    conn: &mut SqliteConnection,
    ctx: &StoreContext,
    batch: &ApplyReplicated,
) -> Result<Applied, StoreError> {
    let mark = queries::origin_mark(conn, &batch.origin)?;
    if let Some(mark) = mark {
        // Below the mark and newer than it: not something we had, but a new sequence.
        if let Some(item) = batch
            .items
            .iter()
            .find(|i| i.origin_id <= mark.origin_id && i.ts > mark.ts)
        {
            return Err(StoreError::OriginIdsRestarted {
                origin: batch.origin.to_string(),
                mark,
                pushed_id: item.origin_id,
                pushed_ts: item.ts,
            });
        }
    }
    let above = mark.map_or(i64::MIN, |m| m.origin_id);
    let mut inserted = Vec::new();
    let mut removed = Vec::new();
    let mut onbind = Vec::new();
    let mut new_mark = mark;
    for item in batch.items.iter().filter(|i| i.origin_id > above) {
        new_mark = Some(OriginMark {
            origin_id: item.origin_id,
            ts: new_mark.map_or(item.ts, |m| m.ts.max(item.ts)),
        });
        match &item.mxid {
            Some(mxid) => {
                let row = GlobalRow {
                    medium: item.medium.clone(),
                    address: item.address.clone(),
                    mxid: mxid.clone(),
                    ts: item.ts,
                    not_before: item.not_before,
                    not_after: item.not_after,
                    origin_server: batch.origin.to_string(),
                    origin_id: item.origin_id,
                    sg_assoc: item.sg_assoc.clone(),
                    lookup_hash: Some(lookup_hash(&item.address, &item.medium, &ctx.pepper)),
                };
                // Above the mark: newer than every row of this origin stored here.
                queries::supersede_global(conn, &row)?;
                // The invites this node stored reach the invitee wherever the address was
                // bound: the association as received, with the invites, signed by us.
                let received = || {
                    serde_json::from_str(&row.sg_assoc)
                        .map_err(|e| StoreError::Db(format!("a stored association: {e}")))
                };
                onbind.extend(queue_invites(conn, ctx, &row, received)?);
                inserted.push(row);
            }
            None => {
                queries::delete_global_before_tombstone(
                    conn,
                    &Tombstone {
                        origin: &batch.origin,
                        medium: &item.medium,
                        address: &item.address,
                        origin_id: item.origin_id,
                        ts: item.ts,
                    },
                )?;
                removed.push((
                    item.medium.clone(),
                    item.address.clone(),
                    item.origin_id,
                    item.ts,
                ));
            }
        }
    }
    if new_mark != mark {
        if let Some(new_mark) = new_mark {
            queries::set_origin_mark(conn, &batch.origin, new_mark)?;
        }
    }
    Ok(Applied::Replicated {
        origin: batch.origin.to_string(),
        inserted,
        removed,
        onbind,
    })
}

/// Queues the onbind delivery of the invites waiting for `row`'s 3PID, if any (inside the
/// bind's transaction): its body is `association` (built only then) with the invites, signed
/// by this node.
fn queue_invites(
    conn: &mut SqliteConnection,
    ctx: &StoreContext,
    row: &GlobalRow,
    association: impl FnOnce() -> Result<serde_json::Map<String, serde_json::Value>, StoreError>,
) -> Result<Option<QueuedDelivery>, StoreError> {
    if !ctx.pending_invites.may_have(&row.medium, &row.address) {
        return Ok(None);
    }
    let invites = invite_db::pending_for(conn, &row.medium, &row.address)?;
    if invites.is_empty() {
        return Ok(None);
    }
    let body = onbind_body(association()?, &invites, &ctx.server_name, &ctx.signing_key)?;
    let destination = row
        .mxid
        .split_once(':')
        .map_or("", |(_, server)| server)
        .to_string();
    let created_ts = (ctx.now_ms)();
    let ids: Vec<i64> = invites.iter().map(|i| i.id).collect();
    let id = invite_db::claim_delivery(
        conn,
        &NewDelivery {
            destination: &destination,
            mxid: &row.mxid,
            body: &body,
            created_ts,
            invite_ids: &ids,
        },
    )?;
    Ok(Some(QueuedDelivery {
        id,
        destination,
        medium: row.medium.clone(),
        address: row.address.clone(),
        body: body.into(),
        created_ts,
    }))
}

fn apply_unbind(
    conn: &mut SqliteConnection,
    ctx: &StoreContext,
    unbind: &Unbind,
    now: i64,
) -> Result<Applied, StoreError> {
    let Threepid { medium, address } = &unbind.threepid;
    let rows = queries::global_for(conn, medium.as_str(), address)?;
    let newest_ts = rows.iter().map(|row| row.ts).max();
    if current_mxid(ctx, rows, &unbind.threepid, now).as_deref() != Some(unbind.mxid.as_str()) {
        return Ok(Applied::Unbound {
            tombstone: None,
            threepid: unbind.threepid.clone(),
        });
    }
    // Newer than every binding of the 3PID known here, whoever made it, so that it removes
    // them on every node (a peer's clock may be ahead of ours).
    let ts = newest_ts.map_or(now, |newest| now.max(newest.saturating_add(1)));
    let id = queries::replace_local(
        conn,
        &NewLocalRow {
            medium: medium.as_str(),
            address,
            mxid: None,
            ts,
            not_before: None,
            not_after: None,
            lookup_hash: None,
        },
    )?;
    queries::delete_global_before_tombstone(
        conn,
        &Tombstone {
            origin: &ctx.server_name,
            medium: medium.as_str(),
            address,
            origin_id: id,
            ts,
        },
    )?;
    Ok(Applied::Unbound {
        tombstone: Some((id, ts)),
        threepid: unbind.threepid.clone(),
    })
}

/// The Matrix ID a lookup on this node answers for `threepid` at `now`, among its global
/// `rows`: chosen by the lookup index itself, so that an unbind removes exactly what lookups
/// show.
fn current_mxid(
    ctx: &StoreContext,
    rows: Vec<GlobalRow>,
    threepid: &Threepid,
    now: i64,
) -> Option<String> {
    let mut index = LookupIndex::new(&ctx.server_name, &ctx.pepper, rows.len());
    for row in rows {
        index.insert(row, Signatures::FromRow);
    }
    index
        .get(threepid.medium, &threepid.address, now)
        .map(|found| found.mxid().to_string())
}
