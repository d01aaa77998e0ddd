//! One replication push queue per peer.
//!
//! A `Pusher` owns its peer's cursor (`peers.lastSentVersion`) and a read connection. It reads
//! the local rows after the cursor, signs them and POSTs them to the peer in Sydent's format,
//! batch after batch until caught up; then it waits for the association store to announce a
//! newer local id (no timer: a bind is on its way within milliseconds). A failed push is
//! retried with capped exponential backoff and jitter, and the batch is never skipped. Pushers
//! share nothing but the HTTP client's connection pool, so one slow or dead peer delays no
//! other peer and no client request.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use diesel::SqliteConnection;
use rand_core::{OsRng, RngCore};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{watch, Notify};

use crate::association::ThreepidAssociation;
use crate::crypto::NodeSigningKey;
use crate::db::queries;
use crate::mesh::peers::Peer;
use crate::mesh::wire::PushBody;
use crate::types::ServerName;

/// Associations per push. ~350 bytes each: a batch stays well under a megabyte.
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
    pub last_success_ts: Option<i64>,
    pub last_error: Option<String>,
    pub last_error_ts: Option<i64>,
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
    pub status: SharedStatus,
    pub wake: Arc<Notify>,
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
            status: Arc::clone(&self.status),
            wake: Arc::clone(&self.wake),
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
    status: SharedStatus,
    wake: Arc<Notify>,
    /// Travels to the blocking thread and back, like the store's.
    conn: Option<SqliteConnection>,
}

/// A batch read and signed: the push body and the id it acknowledges.
struct Batch {
    body: Vec<u8>,
    count: usize,
    last_id: i64,
    backlog: i64,
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
            let mut conn = match conn {
                Some(conn) => conn,
                None => crate::db::connect(&db_file).map_err(|e| e.to_string())?,
            };
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
        let mut cursor = loop {
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
        self.update(|s| s.cursor = cursor);
        let mut greeted = false;
        // Since the last failure, nothing has reached the peer.
        let mut failing = false;
        // The batch after the one in flight, read and signed while the peer handles that one.
        let mut prefetched: Option<Batch> = None;
        loop {
            let batch = match prefetched.take() {
                Some(batch) => Some(batch),
                None => {
                    // Mark the current local id as seen before reading: a bind committed after
                    // this point wakes the wait below even if this read already includes it.
                    // (Only a read made after the mark may decide that we are caught up.)
                    self.local_id.borrow_and_update();
                    match self.read(cursor).await {
                        Ok(batch) => batch,
                        Err(e) => {
                            self.failed(format!("reading local associations: {e}"));
                            backoff = self.pause(backoff).await;
                            continue;
                        }
                    }
                }
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
            let (posted, next) =
                tokio::join!(post(&client, &url, batch.body), self.read(batch.last_id));
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
                    let (name, now) = (self.peer_name.clone(), crate::now_ms());
                    if let Err(e) = self
                        .with_db(move |c| {
                            queries::set_peer_cursor(c, &name, cursor, now)
                                .map_err(|e| e.to_string())
                        })
                        .await
                    {
                        // The peer has the batch; if the cursor is lost it is re-sent after a
                        // restart, which the peer ignores (idempotent on origin and id).
                        log::warn!(
                            "replication: {}: cannot save the cursor: {e}",
                            self.peer_name
                        );
                    }
                    self.update(|s| {
                        s.cursor = cursor;
                        s.backlog -= batch.count as i64;
                        s.pushed += batch.count as u64;
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

    /// The next batch after `cursor`, signed, or `None` when caught up.
    async fn read(&mut self, cursor: i64) -> Result<Option<Batch>, String> {
        let own_name = self.own_name.clone();
        let key = self.signing_key.clone();
        self.with_db(move |c| {
            let rows = queries::local_after(c, cursor, BATCH_SIZE).map_err(|e| e.to_string())?;
            let Some(last) = rows.last() else {
                return Ok(None);
            };
            let last_id = last.id;
            let backlog = queries::count_local_after(c, cursor).map_err(|e| e.to_string())?;
            let mut body = PushBody::default();
            for row in &rows {
                let assoc = ThreepidAssociation {
                    medium: row.medium.clone(),
                    address: row.address.clone(),
                    mxid: row.mxid.clone(),
                    ts: row.ts.unwrap_or(0),
                    not_before: row.not_before,
                    not_after: row.not_after,
                };
                let signed = assoc.signed(&own_name, &key).map_err(|e| e.to_string())?;
                body.sg_assocs
                    .insert(row.id.to_string(), Value::Object(signed));
            }
            let body = serde_json::to_vec(&body).map_err(|e| e.to_string())?;
            Ok(Some(Batch {
                body,
                count: rows.len(),
                last_id,
                backlog,
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
        .map_err(|e| describe(&e))?;
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let text = response.text().await.unwrap_or_default();
    let text: String = text.chars().take(300).collect();
    Err(format!("{url} answered {status}: {text}"))
}

/// A reqwest error with its causes (the TLS reason is usually a few levels down).
fn describe(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
