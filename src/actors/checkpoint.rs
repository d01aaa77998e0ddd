//! The WAL checkpointer: copies committed pages from the write-ahead log back into the
//! database file, on its own connection and thread.
//!
//! SQLite normally does this inside whichever commit pushes the WAL past 1,000 pages, which
//! puts a checkpoint (reads, writes, an fsync) on the store's commit path every few hundred
//! binds: measured, a fifth of bind throughput. Here a passive checkpoint (which never blocks
//! the writer) runs every [`INTERVAL`] on another thread, and the store's connection only
//! checkpoints itself past [`crate::db::STORE_AUTOCHECKPOINT_PAGES`], by which time nearly
//! everything has been copied already: its checkpoint is then short, and it resets the log
//! (a passive checkpoint racing a busy writer never completes, so it never can).
//!
//! It checkpoints by how much the store wrote ([`Written`]), not on every tick: after
//! [`ROWS_PER_CHECKPOINT`] rows, or [`MAX_DELAY`] after the first row not yet checkpointed.
//! A node taking a few writes a second (a mesh replicating binds that trickle in) then pays
//! one checkpoint, and its fsyncs, a second instead of ten, and an idle node none at all.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use diesel::SqliteConnection;

/// How often the checkpointer looks at what the store wrote.
pub const INTERVAL: Duration = Duration::from_millis(100);
/// Rows written since the last checkpoint that make the next tick checkpoint (a few
/// megabytes of WAL: binds touch some eight pages each, less in batches).
pub const ROWS_PER_CHECKPOINT: u64 = 256;
/// At most this long between a row's commit and the checkpoint that copies it.
pub const MAX_DELAY: Duration = Duration::from_secs(1);

/// Rows the store has committed since it started: the store adds, the checkpointer reads.
pub type Written = Arc<AtomicU64>;

fn checkpoint(conn: &mut SqliteConnection) -> diesel::QueryResult<()> {
    use diesel::connection::SimpleConnection;
    conn.batch_execute("PRAGMA wal_checkpoint(PASSIVE);")
}

pub struct Checkpointer {
    /// `None` while a checkpoint runs on the blocking thread.
    conn: Option<SqliteConnection>,
    failures: u32,
    written: Written,
    /// `written` as of the last checkpoint started.
    checkpointed: u64,
    /// When the first row not yet checkpointed was seen.
    pending_since: Option<Instant>,
}

impl Checkpointer {
    /// `conn`: a connection of its own to the store's database; `written`: the store's count
    /// of rows committed.
    pub fn new(conn: SqliteConnection, written: Written) -> Self {
        Self {
            conn: Some(conn),
            failures: 0,
            written,
            checkpointed: 0,
            pending_since: None,
        }
    }

    /// On each tick: checkpoints if enough was written, or if a row has waited long enough.
    fn tick(&mut self, ctx: &mut Context<Self>, now: Instant) {
        let written = self.written.load(Ordering::Relaxed);
        let rows = written.saturating_sub(self.checkpointed);
        if rows == 0 || self.conn.is_none() {
            return;
        }
        let since = *self.pending_since.get_or_insert(now);
        if rows >= ROWS_PER_CHECKPOINT || now.duration_since(since) >= MAX_DELAY {
            self.checkpointed = written;
            self.pending_since = None;
            self.checkpoint(ctx);
        }
    }

    fn checkpoint(&mut self, ctx: &mut Context<Self>) {
        let Some(conn) = self.conn.take() else {
            return; // still running
        };
        let job = actix_web::rt::task::spawn_blocking(move || {
            let mut conn = conn;
            let result = checkpoint(&mut conn);
            (conn, result)
        });
        ctx.spawn(job.into_actor(self).map(|joined, act, _| match joined {
            Ok((conn, result)) => {
                act.conn = Some(conn);
                match result {
                    Ok(()) => act.failures = 0,
                    Err(e) => {
                        act.failures += 1;
                        if act.failures == 1 || act.failures % 100 == 0 {
                            log::warn!("WAL checkpoint failed ({} times): {e}", act.failures);
                        }
                    }
                }
            }
            Err(e) => log::error!("WAL checkpoint thread failed: {e}"),
        }));
    }
}

impl Actor for Checkpointer {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(INTERVAL, |act, ctx| act.tick(ctx, Instant::now()));
    }
}

/// Stops the checkpointer (node shutdown; SQLite checkpoints when the last connection closes).
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopCheckpointer;

impl Handler<StopCheckpointer> for Checkpointer {
    type Result = ();

    fn handle(&mut self, _: StopCheckpointer, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}
