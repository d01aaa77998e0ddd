//! One replication push queue per peer.
//!
//! A `Pusher` owns its peer's cursor (the last local id the peer acknowledged). Woken by the
//! association store announcing a newer local id (no timer: a lone bind is on its way within
//! milliseconds), it takes the rows after its cursor from the node's
//! [`Outbox`](super::outbox::Outbox), which reads and signs them once for every queue, and
//! POSTs them to the peer in Sydent's format. One push is in flight at a time: the rows
//! committed while it is in flight go together in the next one, so under load pushes get
//! larger (up to [`BATCH_SIZE`] rows) rather than more numerous. A queue that is further behind
//! than the outbox holds (its peer was down) reads its batches from the database on its own
//! connection, reading and signing the next while the peer handles the current one.
//!
//! The cursor only moves when the peer accepts a push, and the rows after it are always sent
//! in id order (the peer skips what is at or below its mark for this node). A failed push is
//! retried with capped exponential backoff and jitter, and the batch is never skipped.
//! Acknowledged cursors are saved by the outbox, off the push path. Pushers share nothing but
//! the outbox and the HTTP client's connection pool, so one slow or dead peer delays no other
//! peer and no client request.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use diesel::SqliteConnection;
use rand_core::{OsRng, RngCore};
use serde::Serialize;
use tokio::sync::{watch, Notify};

use super::outbox::{read_signed, Acked, AckedCursor, Outbox, OutgoingRow, Take, Taken};
use crate::crypto::NodeSigningKey;
use crate::db::queries;
use crate::mesh::peers::Peer;
use crate::mesh::tls::describe_error;
use crate::mesh::wire::PushBody;
use crate::metrics::AtomicHistogram;
use crate::types::ServerName;

/// Associations per push, at most. ~350 bytes each: a push stays well under a megabyte.
pub const BATCH_SIZE: usize = 1000;
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A push with nothing in it: the hello a pusher sends when it starts caught up.
const EMPTY_PUSH: &[u8] = br#"{"sgAssocs":{}}"#;

/// What `GET /_matrix/identity/internal/replication` shows for a peer.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PushStatus {
    /// The last local id the peer acknowledged (-1: none yet).
    pub cursor: i64,
    /// Local rows after the cursor, as of the last read.
    pub backlog: i64,
    /// Associations this pusher delivered since start.
    pub pushed: u64,
    /// Pushes that delivered them (`pushed / pushes`: associations per push, which grows
    /// with the load as pushes coalesce).
    pub pushes: u64,
    pub last_success_ts: Option<i64>,
    pub last_error: Option<String>,
    pub last_error_ts: Option<i64>,
    /// Pushes that failed since start.
    pub errors: u64,
    /// While `retrying`: when the next attempt is due (ms since the epoch) unless the peer
    /// shows it is back first; `None` otherwise.
    pub next_attempt_ts: Option<i64>,
    /// `starting`, `pushing`, `idle` (caught up) or `retrying`.
    pub state: &'static str,
}

/// A pusher's status, written by the pusher and read by the status page. A mutex rather than a
/// message to the actor: a status read must answer even while the pusher is busy mid-push
/// (its actor context is occupied by the push loop), and the lock is held only to copy a few
/// fields, never across I/O.
pub type SharedStatus = Arc<Mutex<PushStatus>>;

/// Everything a push queue needs; built by the peer registry.
pub struct Pusher {
    pub peer: Peer,
    pub own_name: ServerName,
    pub db_file: String,
    pub signing_key: NodeSigningKey,
    pub client: reqwest::Client,
    pub local_id: watch::Receiver<i64>,
    pub outbox: Addr<Outbox>,
    pub status: SharedStatus,
    pub wake: Arc<Notify>,
    /// Replication lag to this peer, when the metrics are on.
    pub lag: Option<AtomicHistogram>,
}

/// Stops a pusher (its peer was removed or changed). An in-flight push is abandoned; the
/// cursor only moves on acknowledged batches, so nothing is lost.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopPusher;

impl Actor for Pusher {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        log::info!(
            "replication: pushing to {} at {} ({})",
            self.peer.server_name,
            self.peer.base_url,
            self.peer.source
        );
        let job = PushLoop {
            peer_name: self.peer.server_name.clone(),
            url: self.peer.push_url(),
            own_name: self.own_name.clone(),
            db_file: self.db_file.clone(),
            signing_key: self.signing_key.clone(),
            client: self.client.clone(),
            local_id: self.local_id.clone(),
            outbox: self.outbox.clone(),
            status: Arc::clone(&self.status),
            wake: Arc::clone(&self.wake),
            lag: self.lag.clone(),
            conn: None,
        };
        ctx.spawn(job.run().into_actor(self));
    }
}

impl Handler<StopPusher> for Pusher {
    type Result = ();

    fn handle(&mut self, _: StopPusher, ctx: &mut Context<Self>) {
        log::info!("replication: stopped pushing to {}", self.peer.server_name);
        ctx.stop();
    }
}

struct PushLoop {
    peer_name: ServerName,
    url: String,
    own_name: ServerName,
    db_file: String,
    signing_key: NodeSigningKey,
    client: reqwest::Client,
    local_id: watch::Receiver<i64>,
    outbox: Addr<Outbox>,
    status: SharedStatus,
    wake: Arc<Notify>,
    lag: Option<AtomicHistogram>,
    /// Travels to the blocking thread and back, like the store's.
    conn: Option<SqliteConnection>,
}

/// A push ready to send: its body and the id it acknowledges.
struct Batch {
    body: Vec<u8>,
    count: usize,
    last_id: i64,
    backlog: i64,
    /// Read from the database and full: the queue is catching up, more follow at once.
    catching_up: bool,
    /// Each row's `ts` (ms): the lag is measured from it when the peer acknowledges.
    row_ts: Vec<i64>,
}

impl Batch {
    /// `None` for no rows.
    fn new(rows: &[Arc<OutgoingRow>], backlog: usize) -> Result<Option<Self>, String> {
        let Some(last) = rows.last() else {
            return Ok(None);
        };
        let body = PushBody {
            sg_assocs: rows
                .iter()
                .map(|row| (row.id.to_string(), &*row.signed))
                .collect(),
        };
        Ok(Some(Self {
            body: serde_json::to_vec(&body).map_err(|e| e.to_string())?,
            count: rows.len(),
            last_id: last.id,
            backlog: i64::try_from(backlog).unwrap_or(i64::MAX),
            catching_up: false,
            row_ts: rows.iter().map(|row| row.ts).collect(),
        }))
    }
}

impl PushLoop {
    fn update(&self, f: impl FnOnce(&mut PushStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Runs `f` with the read connection on a blocking thread.
    async fn with_db<T: Send + 'static>(
        &mut self,
        f: impl FnOnce(&mut SqliteConnection) -> Result<T, String> + Send + 'static,
    ) -> Result<T, String> {
        let conn = self.conn.take();
        let db_file = self.db_file.clone();
        let joined = actix_web::rt::task::spawn_blocking(move || {
            let mut conn = crate::db::kept_or_connect(conn, &db_file).map_err(|e| e.to_string())?;
            let result = f(&mut conn);
            Ok::<_, String>((conn, result))
        })
        .await
        .map_err(|e| format!("database thread failed: {e}"))?;
        let (conn, result) = joined?;
        self.conn = Some(conn);
        result
    }

    async fn run(mut self) {
        let mut backoff = BACKOFF_MIN;
        let saved = loop {
            let name = self.peer_name.clone();
            match self
                .with_db(move |c| queries::peer_cursor(c, &name).map_err(|e| e.to_string()))
                .await
            {
                Ok(cursor) => break cursor,
                Err(e) => {
                    self.failed(format!("reading the cursor: {e}"));
                    backoff = self.pause(backoff).await;
                }
            }
        };
        // A queue replaced (its peer's URL changed) goes on from what its predecessor had
        // acknowledged, which the outbox may not have saved yet.
        let acked = self
            .outbox
            .send(AckedCursor(self.peer_name.clone()))
            .await
            .ok()
            .flatten();
        let mut cursor = acked.unwrap_or(saved);
        self.update(|s| s.cursor = cursor);
        let mut greeted = false;
        // Since the last failure, nothing has reached the peer.
        let mut failing = false;
        // While catching up from the database: the next batch, read and signed while the peer
        // handles the current one.
        let mut prefetched: Option<Batch> = None;
        loop {
            let batch = match prefetched.take() {
                Some(batch) => Some(batch),
                // Mark the newest local id as seen before taking rows: a bind committed after
                // this point wakes the wait below even if this take already includes it.
                // (Only a take made after the mark may decide that we are caught up.)
                None if *self.local_id.borrow_and_update() <= cursor => None,
                None => match self.take(cursor).await {
                    Ok(batch) => batch,
                    Err(e) => {
                        self.failed(format!("reading local associations: {e}"));
                        backoff = self.pause(backoff).await;
                        continue;
                    }
                },
            };
            let Some(batch) = batch else {
                self.update(|s| {
                    s.backlog = 0;
                    s.state = "idle";
                });
                if !greeted {
                    // Caught up at start: an empty push tells the peer we are (back) up, so
                    // its pusher to us leaves its backoff at once instead of after up to
                    // BACKOFF_MAX. Sydent answers it 200 too.
                    greeted = true;
                    if let Err(e) = post(&self.client, &self.url, EMPTY_PUSH.to_vec()).await {
                        log::debug!("replication: hello to {} failed: {e}", self.peer_name);
                    }
                }
                if self.local_id.changed().await.is_err() {
                    return; // the store has stopped: the node is shutting down
                }
                continue;
            };
            self.update(|s| {
                s.backlog = batch.backlog;
                s.state = "pushing";
            });
            let (client, url) = (self.client.clone(), self.url.clone());
            let (posted, next) = if batch.catching_up {
                tokio::join!(post(&client, &url, batch.body), self.read(batch.last_id))
            } else {
                // What is committed while this push is in flight goes in the next one.
                (post(&client, &url, batch.body).await, Ok(None))
            };
            match posted {
                Ok(()) => {
                    prefetched = next.ok().flatten();
                    greeted = true;
                    if std::mem::take(&mut failing) {
                        log::info!(
                            "replication: {} is reachable again; resuming after id {cursor}",
                            self.peer_name
                        );
                    }
                    cursor = batch.last_id;
                    let now = crate::now_ms();
                    if let Some(lag) = &self.lag {
                        for ts in &batch.row_ts {
                            lag.observe((now - ts).max(0) as f64 / 1000.0);
                        }
                    }
                    self.outbox.do_send(Acked {
                        peer: self.peer_name.clone(),
                        cursor,
                        at_ms: now,
                    });
                    self.update(|s| {
                        s.cursor = cursor;
                        s.backlog -= batch.count as i64;
                        s.pushed += batch.count as u64;
                        s.pushes += 1;
                        s.last_success_ts = Some(now);
                        s.last_error = None;
                    });
                    backoff = BACKOFF_MIN;
                }
                Err(e) => {
                    self.failed(e);
                    failing = true;
                    backoff = self.pause(backoff).await;
                }
            }
        }
    }

    fn failed(&self, error: String) {
        log::warn!(
            "replication: push to {} failed (will retry): {error}",
            self.peer_name
        );
        self.update(|s| {
            s.last_error = Some(error);
            s.last_error_ts = Some(crate::now_ms());
            s.errors += 1;
            s.state = "retrying";
        });
    }

    /// Sleeps `backoff` ± 25 % (the status shows until when) and returns the next, doubled and
    /// capped; returns at once, with the backoff reset, when the peer is known to be back (it
    /// pushed to us).
    async fn pause(&self, backoff: Duration) -> Duration {
        let jitter = 0.75 + (OsRng.next_u32() as f64 / u32::MAX as f64) * 0.5;
        let wait = backoff.mul_f64(jitter);
        self.update(|s| s.next_attempt_ts = Some(crate::now_ms() + wait.as_millis() as i64));
        let next = tokio::select! {
            _ = tokio::time::sleep(wait) => (backoff * 2).min(BACKOFF_MAX),
            _ = self.wake.notified() => BACKOFF_MIN,
        };
        self.update(|s| s.next_attempt_ts = None);
        next
    }

    /// The next batch after `cursor`, from the outbox or, when the cursor is before what the
    /// outbox holds, from the database; `None` when caught up.
    async fn take(&mut self, cursor: i64) -> Result<Option<Batch>, String> {
        match self.outbox.send(Take { after: cursor }).await {
            Ok(Ok(Taken::Rows { rows, backlog })) => Batch::new(&rows, backlog),
            Ok(Ok(Taken::Behind)) => self.read(cursor).await,
            Ok(Err(e)) => Err(e),
            Err(_) => Err("the outbox has stopped".into()),
        }
    }

    /// The next batch after `cursor` read from the database and signed, or `None` when caught
    /// up.
    async fn read(&mut self, cursor: i64) -> Result<Option<Batch>, String> {
        let own_name = self.own_name.clone();
        let key = self.signing_key.clone();
        self.with_db(move |c| {
            let rows = read_signed(c, cursor, BATCH_SIZE, &own_name, &key)?;
            let full = rows.len() == BATCH_SIZE;
            // Counted only when there is more than a batch: else the batch is the backlog.
            let backlog = if full {
                let count = queries::count_local_after(c, cursor).map_err(|e| e.to_string())?;
                usize::try_from(count).unwrap_or(usize::MAX)
            } else {
                rows.len()
            };
            let batch = Batch::new(&rows, backlog)?;
            Ok(batch.map(|batch| Batch {
                catching_up: full,
                ..batch
            }))
        })
        .await
    }
}

/// POSTs a push body to a peer; any 2xx is success (as Sydent).
async fn post(client: &reqwest::Client, url: &str, body: Vec<u8>) -> Result<(), String> {
    let response = client
        .post(url)
        .header("Content-Type", "application/json")
        .body(body)
        .send()
        .await
        .map_err(|e| describe_error(&e))?;
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let text = response.text().await.unwrap_or_default();
    let text: String = text.chars().take(300).collect();
    Err(format!("{url} answered {status}: {text}"))
}
