//! The outbox: this node's newest bindings and unbindings, read from the database and signed
//! once for every peer's push queue, and the cursors those queues have had acknowledged.
//!
//! A [`Pusher`](super::pusher::Pusher) woken by a commit asks [`Take`] for the rows after its
//! cursor. The outbox answers from its window, the newest [`WINDOW_ROWS`] local rows, which it
//! extends by reading what was committed since (on a blocking thread, on its own connection)
//! when someone asks for more than it holds. The queues of a mesh are woken together, so one
//! read and one signature per row serve them all, where each queue used to read and sign for
//! itself. A queue whose cursor lies before the window (its peer was down, the node just
//! started) is told [`Taken::Behind`] and reads its batches from the database itself.
//!
//! Each queue reports an acknowledged push with [`Acked`]. The outbox saves the cursors that
//! moved to `peers.lastSentVersion`, all in one transaction, at most every [`SAVE_INTERVAL`],
//! and at once on [`SaveCursors`] (the node stopping): never on a queue's push path, and not
//! once per push and peer. A cursor saved late only means that after a crash a peer is sent
//! again rows it already has, which it skips (they are at or below its mark for this node).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use diesel::SqliteConnection;
use serde_json::value::RawValue;
use serde_json::Value;
use tokio::sync::{oneshot, watch};

use super::pusher::BATCH_SIZE;
use crate::association::ThreepidAssociation;
use crate::crypto::NodeSigningKey;
use crate::db::queries;
use crate::types::ServerName;

/// Rows the window holds: two full pushes, so a queue a push behind the others is still
/// served from memory (~700 KB).
pub const WINDOW_ROWS: usize = 2 * BATCH_SIZE;
/// How often, at most, acknowledged cursors are written to the database.
pub const SAVE_INTERVAL: Duration = Duration::from_secs(1);

/// A local row as it is pushed: its id (`originId` on the peers) and the association as this
/// node signed it.
#[derive(Debug)]
pub struct OutgoingRow {
    pub id: i64,
    /// When it was bound or unbound here (ms): what replication lag is measured from.
    pub ts: i64,
    pub signed: Box<RawValue>,
}

/// Reads up to `limit` local rows after `after`, in id order, and signs each.
pub fn read_signed(
    conn: &mut SqliteConnection,
    after: i64,
    limit: usize,
    own_name: &ServerName,
    key: &NodeSigningKey,
) -> Result<Vec<Arc<OutgoingRow>>, String> {
    let rows = queries::local_after(conn, after, limit).map_err(|e| e.to_string())?;
    rows.into_iter()
        .map(|row| {
            let assoc = ThreepidAssociation {
                medium: row.medium,
                address: row.address,
                mxid: row.mxid,
                ts: row.ts.unwrap_or(0),
                not_before: row.not_before,
                not_after: row.not_after,
            };
            let signed = assoc.signed(own_name, key).map_err(|e| e.to_string())?;
            let assoc_ts = assoc.ts;
            let signed = serde_json::value::to_raw_value(&Value::Object(signed))
                .map_err(|e| e.to_string())?;
            Ok(Arc::new(OutgoingRow {
                id: row.id,
                ts: assoc_ts,
                signed,
            }))
        })
        .collect()
}

/// Sent by a push queue that has rows to send (the store's newest local id is past its
/// cursor): the rows after `after`, at most [`BATCH_SIZE`]. Answered once the outbox holds
/// what was committed when it was asked, or the read failed.
#[derive(Message, Debug)]
#[rtype(result = "Result<Taken, String>")]
pub struct Take {
    pub after: i64,
}

#[derive(Debug)]
pub enum Taken {
    /// The rows after the cursor (none: nothing after it), and how many the window holds
    /// after the cursor in all (the queue's backlog, as far as the outbox knows it).
    Rows {
        rows: Vec<Arc<OutgoingRow>>,
        backlog: usize,
    },
    /// The cursor is before the window: read from the database.
    Behind,
}

/// Sent by a push queue after its peer acknowledged everything up to `cursor` (at `at_ms`).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Acked {
    pub peer: ServerName,
    pub cursor: i64,
    pub at_ms: i64,
}

/// Sent by a push queue when it starts: the newest cursor acknowledged by `peer` since this
/// node started, which may not be saved yet (a queue replaced because its peer's URL changed).
#[derive(Message, Debug)]
#[rtype(result = "Option<i64>")]
pub struct AckedCursor(pub ServerName);

/// Sent by the peer registry when the node stops: answers once every acknowledged cursor is
/// saved.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct SaveCursors;

pub struct Outbox {
    own_name: ServerName,
    signing_key: NodeSigningKey,
    db_file: String,
    /// The store's newest committed local id.
    local_id: watch::Receiver<i64>,
    /// Every local row with `from < id <= head`, as read (a row replaced since, by a rebind
    /// or an unbind of its 3PID, is still here: peers apply it and then its replacement).
    window: VecDeque<Arc<OutgoingRow>>,
    from: i64,
    head: i64,
    /// The read connection, `None` until opened and while a read runs.
    read_conn: Option<SqliteConnection>,
    reading: bool,
    /// Queues waiting for rows after `head`: (their cursor, the answer).
    waiting: Vec<(i64, oneshot::Sender<Result<Taken, String>>)>,
    /// The newest cursor each peer acknowledged since start, with when.
    acked: BTreeMap<ServerName, (i64, i64)>,
    /// Peers whose cursor moved since it was last saved.
    unsaved: Vec<ServerName>,
    save_conn: Option<SqliteConnection>,
    saving: bool,
    save_scheduled: bool,
    last_save: Option<Instant>,
    /// Answered when nothing is left unsaved.
    save_waiters: Vec<oneshot::Sender<()>>,
}

impl Outbox {
    /// The window starts empty at the store's newest local id: queues with older cursors read
    /// from the database until they reach it.
    pub fn new(
        own_name: ServerName,
        signing_key: NodeSigningKey,
        db_file: String,
        local_id: watch::Receiver<i64>,
    ) -> Self {
        let head = *local_id.borrow();
        Self {
            own_name,
            signing_key,
            db_file,
            local_id,
            window: VecDeque::new(),
            from: head,
            head,
            read_conn: None,
            reading: false,
            waiting: Vec::new(),
            acked: BTreeMap::new(),
            unsaved: Vec::new(),
            save_conn: None,
            saving: false,
            save_scheduled: false,
            last_save: None,
            save_waiters: Vec::new(),
        }
    }

    /// What the window holds after `after`; `None` when it needs a read first.
    fn answer(&self, after: i64) -> Option<Taken> {
        if after < self.from {
            return Some(Taken::Behind);
        }
        if after >= self.head && self.head < *self.local_id.borrow() {
            return None;
        }
        let start = self.window.partition_point(|row| row.id <= after);
        let rows = self
            .window
            .range(start..)
            .take(BATCH_SIZE)
            .cloned()
            .collect();
        Some(Taken::Rows {
            rows,
            backlog: self.window.len() - start,
        })
    }

    /// Reads what was committed after `head`, unless a read is already running.
    fn read(&mut self, ctx: &mut Context<Self>) {
        if self.reading {
            return;
        }
        self.reading = true;
        let conn = self.read_conn.take();
        // Committed before the read starts, so a read that is not cut short holds everything
        // up to it.
        let committed = *self.local_id.borrow();
        let (db_file, after) = (self.db_file.clone(), self.head);
        let (own_name, key) = (self.own_name.clone(), self.signing_key.clone());
        let job = actix_web::rt::task::spawn_blocking(move || {
            let mut conn = match crate::db::kept_or_connect(conn, &db_file) {
                Ok(conn) => conn,
                Err(e) => return (None, Err(e.to_string())),
            };
            let rows = read_signed(&mut conn, after, BATCH_SIZE, &own_name, &key);
            (Some(conn), rows)
        });
        ctx.spawn(job.into_actor(self).map(move |joined, act, ctx| {
            act.reading = false;
            let (conn, rows) = joined.unwrap_or_else(|e| (None, Err(format!("read thread: {e}"))));
            act.read_conn = conn;
            match rows {
                Ok(rows) => {
                    let complete = rows.len() < BATCH_SIZE;
                    act.append(rows);
                    if complete {
                        act.head = act.head.max(committed);
                    }
                    act.answer_waiting(ctx);
                }
                Err(e) => {
                    log::warn!("replication: cannot read local associations: {e}");
                    for (_, reply) in act.waiting.drain(..) {
                        let _ = reply.send(Err(e.clone()));
                    }
                }
            }
        }));
    }

    fn append(&mut self, rows: Vec<Arc<OutgoingRow>>) {
        if let Some(last) = rows.last() {
            self.head = last.id;
        }
        self.window.extend(rows);
        while self.window.len() > WINDOW_ROWS {
            if let Some(oldest) = self.window.pop_front() {
                self.from = oldest.id;
            }
        }
    }

    /// Answers the queues the window can serve now; reads again for the others.
    fn answer_waiting(&mut self, ctx: &mut Context<Self>) {
        let mut still = Vec::new();
        for (after, reply) in std::mem::take(&mut self.waiting) {
            match self.answer(after) {
                Some(taken) => {
                    let _ = reply.send(Ok(taken));
                }
                None => still.push((after, reply)),
            }
        }
        self.waiting = still;
        if !self.waiting.is_empty() {
            self.read(ctx);
        }
    }

    /// Saves the unsaved cursors once [`SAVE_INTERVAL`] has passed since the last save (at
    /// once when `now`), unless a save is running or scheduled.
    fn schedule_save(&mut self, ctx: &mut Context<Self>, now: bool) {
        if self.saving || (self.save_scheduled && !now) {
            return;
        }
        let wait = match self.last_save {
            Some(last) if !now => SAVE_INTERVAL.saturating_sub(last.elapsed()),
            _ => Duration::ZERO,
        };
        if wait.is_zero() {
            self.save(ctx);
        } else {
            self.save_scheduled = true;
            ctx.run_later(wait, |act, ctx| {
                act.save_scheduled = false;
                act.save(ctx);
            });
        }
    }

    fn save(&mut self, ctx: &mut Context<Self>) {
        if self.saving {
            return;
        }
        if self.unsaved.is_empty() {
            for waiter in self.save_waiters.drain(..) {
                let _ = waiter.send(());
            }
            return;
        }
        self.saving = true;
        let names = std::mem::take(&mut self.unsaved);
        let cursors: Vec<(ServerName, i64, i64)> = names
            .iter()
            .filter_map(|name| {
                let (cursor, at) = self.acked.get(name)?;
                Some((name.clone(), *cursor, *at))
            })
            .collect();
        let conn = self.save_conn.take();
        let db_file = self.db_file.clone();
        let job = actix_web::rt::task::spawn_blocking(move || {
            let mut conn = match crate::db::kept_or_connect(conn, &db_file) {
                Ok(conn) => conn,
                Err(e) => return (None, Err(e.to_string())),
            };
            let saved = conn
                .immediate_transaction(|c| {
                    cursors.iter().try_for_each(|(name, cursor, at)| {
                        queries::set_peer_cursor(c, name, *cursor, *at)
                    })
                })
                .map_err(|e: diesel::result::Error| e.to_string());
            (Some(conn), saved)
        });
        ctx.spawn(job.into_actor(self).map(move |joined, act, ctx| {
            act.saving = false;
            act.last_save = Some(Instant::now());
            let (conn, saved) = joined.unwrap_or_else(|e| (None, Err(format!("save thread: {e}"))));
            act.save_conn = conn;
            if let Err(e) = saved {
                // Kept in memory and tried again; a peer sent rows again only skips them.
                log::warn!("replication: cannot save the peers' cursors: {e}");
                for name in names {
                    if !act.unsaved.contains(&name) {
                        act.unsaved.push(name);
                    }
                }
            }
            let stopping = !act.save_waiters.is_empty();
            if act.unsaved.is_empty() {
                act.save(ctx); // answers the waiters
            } else {
                act.schedule_save(ctx, stopping);
            }
        }));
    }
}

impl Actor for Outbox {
    type Context = Context<Self>;
}

impl Handler<Take> for Outbox {
    type Result = ResponseFuture<Result<Taken, String>>;

    fn handle(&mut self, msg: Take, ctx: &mut Context<Self>) -> Self::Result {
        if let Some(taken) = self.answer(msg.after) {
            // Newer rows are read now, for the queue's next push.
            if self.head < *self.local_id.borrow() {
                self.read(ctx);
            }
            return Box::pin(async move { Ok(taken) });
        }
        let (tx, rx) = oneshot::channel();
        self.waiting.push((msg.after, tx));
        self.read(ctx);
        Box::pin(async move {
            rx.await
                .unwrap_or_else(|_| Err("the outbox has stopped".into()))
        })
    }
}

impl Handler<Acked> for Outbox {
    type Result = ();

    fn handle(&mut self, msg: Acked, ctx: &mut Context<Self>) {
        self.acked.insert(msg.peer.clone(), (msg.cursor, msg.at_ms));
        if !self.unsaved.contains(&msg.peer) {
            self.unsaved.push(msg.peer);
        }
        self.schedule_save(ctx, false);
    }
}

impl Handler<AckedCursor> for Outbox {
    type Result = Option<i64>;

    fn handle(&mut self, msg: AckedCursor, _: &mut Context<Self>) -> Option<i64> {
        self.acked.get(&msg.0).map(|(cursor, _)| *cursor)
    }
}

impl Handler<SaveCursors> for Outbox {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: SaveCursors, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        self.save_waiters.push(tx);
        self.schedule_save(ctx, true);
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}
