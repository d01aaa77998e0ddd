//! A node rebuilt from its peers (`crate::rebuild`): what a peer reads out for it (one
//! origin's bindings after an id, and how far that origin has reached the peer), and the one
//! transaction that restores them on the rebuilt node.

use diesel::prelude::*;
use diesel::sql_types::BigInt;

use super::queries::{self, OriginMark};
use super::schema::{global_threepid_associations as global, local_threepid_associations as local};
use super::GlobalRow;

/// What a node holds of one origin's bindings.
#[derive(Debug)]
pub struct Held {
    /// How far the origin has reached this node: for the node itself, its newest local id
    /// (binding or tombstone) and newest `ts`; for a peer, its [`OriginMark`]. `None`: nothing.
    pub mark: Option<OriginMark>,
    /// `(originId, sgAssoc)` in id order.
    pub rows: Vec<(i64, String)>,
}

/// `origin`'s bindings in the global table after origin id `after`, at most `limit` of them,
/// and the origin's mark, read together. The global table holds each origin's current
/// bindings, every tombstone known here already applied; tombstones themselves are not kept.
pub fn held(
    conn: &mut SqliteConnection,
    own_name: &str,
    origin: &str,
    after: i64,
    limit: usize,
) -> QueryResult<Held> {
    conn.transaction(|c| {
        let mark = if origin == own_name {
            own_mark(c)?
        } else {
            queries::origin_mark(c, origin)?
        };
        if limit == 0 {
            return Ok(Held {
                mark,
                rows: Vec::new(),
            });
        }
        // No `LIMIT ?` (see `queries::local_after`): stepping stops after `limit` rows.
        let rows = global::table
            .filter(
                global::origin_server
                    .eq(origin)
                    .and(global::origin_id.gt(after)),
            )
            .order(global::origin_id.asc())
            .select((global::origin_id, global::sg_assoc))
            .load_iter::<(i64, String), diesel::connection::DefaultLoadingMode>(c)?
            .take(limit)
            .collect::<QueryResult<Vec<_>>>()?;
        Ok(Held { mark, rows })
    })
}

/// This node's newest local id and `ts`: how far its own bindings have gone.
fn own_mark(conn: &mut SqliteConnection) -> QueryResult<Option<OriginMark>> {
    let (id, ts) = local::table
        .select((diesel::dsl::max(local::id), diesel::dsl::max(local::ts)))
        .get_result::<(Option<i64>, Option<i64>)>(conn)?;
    Ok(id.map(|origin_id| OriginMark {
        origin_id,
        ts: ts.unwrap_or(0),
    }))
}

/// How many local rows (this node's bindings and unbindings) the database holds.
pub fn count_local(conn: &mut SqliteConnection) -> QueryResult<i64> {
    local::table.count().get_result(conn)
}

/// One origin's bindings as a peer holds them, to restore.
#[derive(Debug)]
pub struct OriginRows {
    pub origin: String,
    /// The highest id of the origin the peer had reached (this node's ids go on above it).
    pub mark: OriginMark,
    /// Verified, one per 3PID, `origin_server` = `origin`, in id order.
    pub rows: Vec<GlobalRow>,
}

/// Everything a rebuild writes, in one transaction.
#[derive(Debug)]
pub struct Restore {
    /// This node's own bindings: restored as its local rows with their ids, and its ids go on
    /// above `mark` (the highest any peer reported: the peers may have seen a tombstone after
    /// the last binding).
    pub own: Option<OriginRows>,
    /// The peers' bindings, each origin replacing what this node holds of it unless this node
    /// has already reached further.
    pub others: Vec<OriginRows>,
    /// Per peer, the push cursor to resume at: the highest of our ids it holds.
    pub cursors: Vec<(String, i64)>,
    pub now_ms: i64,
}

/// What a rebuild wrote.
#[derive(Debug, Default)]
pub struct Restored {
    pub own: usize,
    /// Per origin: the rows restored, or `None` when this node already had more of it.
    pub others: Vec<(String, Option<usize>)>,
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(
        "this database already holds {0} bindings or unbindings made on this node: a rebuild \
         restores the node's own rows with their original ids, into a database that has none"
    )]
    NotEmpty(i64),
    #[error(transparent)]
    Db(#[from] diesel::result::Error),
}

/// Rows inserted by one statement (10 columns each; SQLite binds at most 32,766 values).
const INSERT_CHUNK: usize = 1_000;

/// Writes `plan` in one transaction: all of it, or nothing.
pub fn restore(conn: &mut SqliteConnection, plan: &Restore) -> Result<Restored, RestoreError> {
    // The whole restore is one transaction: with SQLite's default 2 MB page cache, the
    // indexes' pages would be spilled to the WAL and read back many times over.
    diesel::sql_query("PRAGMA cache_size = -262144").execute(conn)?;
    conn.immediate_transaction(|c| {
        let existing = count_local(c)?;
        if existing > 0 {
            return Err(RestoreError::NotEmpty(existing));
        }
        let mut restored = Restored::default();
        // The indexes are built again once the rows are in: sorting once is far faster than
        // inserting every row into five b-trees in 3PID and hash order.
        let indexes = drop_indexes(c)?;
        if let Some(own) = &plan.own {
            diesel::delete(global::table.filter(global::origin_server.eq(&own.origin)))
                .execute(c)?;
            // Many rows a statement: a statement per row took most of a rebuild's time.
            for chunk in own.rows.chunks(INSERT_CHUNK) {
                let locals: Vec<_> = chunk
                    .iter()
                    .map(|row| {
                        (
                            local::id.eq(row.origin_id),
                            local::medium.eq(&row.medium),
                            local::address.eq(&row.address),
                            local::mxid.eq(&row.mxid),
                            local::ts.eq(row.ts),
                            local::not_before.eq(row.not_before),
                            local::not_after.eq(row.not_after),
                            local::lookup_hash.eq(&row.lookup_hash),
                        )
                    })
                    .collect();
                diesel::insert_into(local::table)
                    .values(&locals)
                    .execute(c)?;
                diesel::insert_into(global::table)
                    .values(chunk)
                    .execute(c)?;
            }
            raise_local_sequence(c, own.mark.origin_id)?;
            restored.own = own.rows.len();
        }
        for other in &plan.others {
            let ours = queries::origin_mark(c, &other.origin)?;
            if ours.is_some_and(|ours| ours.origin_id > other.mark.origin_id) {
                restored.others.push((other.origin.clone(), None));
                continue;
            }
            diesel::delete(global::table.filter(global::origin_server.eq(&other.origin)))
                .execute(c)?;
            for chunk in other.rows.chunks(INSERT_CHUNK) {
                diesel::insert_into(global::table)
                    .values(chunk)
                    .execute(c)?;
            }
            queries::set_origin_mark(c, &other.origin, other.mark)?;
            restored
                .others
                .push((other.origin.clone(), Some(other.rows.len())));
        }
        for sql in indexes {
            diesel::sql_query(sql).execute(c)?;
        }
        for (peer, cursor) in &plan.cursors {
            queries::peer_cursor(c, peer)?;
            queries::set_peer_cursor(c, peer, *cursor, plan.now_ms)?;
        }
        Ok(restored)
    })
}

/// Drops the secondary indexes of the association tables, inside the caller's transaction;
/// answers the statements that create them again (as the migrations wrote them).
fn drop_indexes(conn: &mut SqliteConnection) -> QueryResult<Vec<String>> {
    #[derive(QueryableByName)]
    struct Index {
        #[diesel(sql_type = diesel::sql_types::Text)]
        name: String,
        #[diesel(sql_type = diesel::sql_types::Text)]
        sql: String,
    }
    let indexes = diesel::sql_query(
        "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL \
         AND tbl_name IN ('local_threepid_associations', 'global_threepid_associations')",
    )
    .load::<Index>(conn)?;
    for index in &indexes {
        // Names come from the schema itself; quoted as identifiers all the same.
        diesel::sql_query(format!(
            "DROP INDEX \"{}\"",
            index.name.replace('"', "\"\"")
        ))
        .execute(conn)?;
    }
    Ok(indexes.into_iter().map(|i| i.sql).collect())
}

/// Makes the next local id at least `above + 1` (SQLite's AUTOINCREMENT counter): ids the
/// peers have seen are never given again, even where the row itself is gone.
fn raise_local_sequence(conn: &mut SqliteConnection, above: i64) -> QueryResult<()> {
    let updated = diesel::sql_query(
        "UPDATE sqlite_sequence SET seq = MAX(seq, ?) WHERE name = 'local_threepid_associations'",
    )
    .bind::<BigInt, _>(above)
    .execute(conn)?;
    if updated == 0 {
        diesel::sql_query(
            "INSERT INTO sqlite_sequence (name, seq) VALUES ('local_threepid_associations', ?)",
        )
        .bind::<BigInt, _>(above)
        .execute(conn)?;
    }
    Ok(())
}
