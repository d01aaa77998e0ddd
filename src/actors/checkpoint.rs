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

use std::time::Duration;

use actix::prelude::*;
use diesel::SqliteConnection;

/// How often the WAL is checkpointed.
pub const INTERVAL: Duration = Duration::from_millis(100);

fn checkpoint(conn: &mut SqliteConnection) -> diesel::QueryResult<()> {
    use diesel::connection::SimpleConnection;
    conn.batch_execute("PRAGMA wal_checkpoint(PASSIVE);")
}

pub struct Checkpointer {
    /// `None` while a checkpoint runs on the blocking thread.
    conn: Option<SqliteConnection>,
    failures: u32,
}

impl Checkpointer {
    /// `conn`: a connection of its own to the store's database.
    pub fn new(conn: SqliteConnection) -> Self {
        Self {
            conn: Some(conn),
            failures: 0,
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
        ctx.run_interval(INTERVAL, |act, ctx| act.checkpoint(ctx));
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
