//! The queries the association store runs, each inside a transaction the caller owns.

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use diesel::sqlite::Sqlite;

use super::schema::{
    global_threepid_associations as global, local_threepid_associations as local,
    replication_origin_marks as marks,
};

/// A row of `local_threepid_associations`: a binding made on this node, or its tombstone
/// (`mxid` NULL). Its `id` is the replication sequence number (`originId` on peers).
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = local)]
pub struct LocalRow {
    pub id: i64,
    pub medium: String,
    pub address: String,
    pub mxid: Option<String>,
    pub ts: Option<i64>,
    pub not_before: Option<i64>,
    pub not_after: Option<i64>,
}

/// The insert form of [`LocalRow`].
#[derive(Debug, Insertable)]
#[diesel(table_name = local)]
pub struct NewLocalRow<'a> {
    pub medium: &'a str,
    pub address: &'a str,
    pub mxid: Option<&'a str>,
    pub ts: i64,
    pub not_before: Option<i64>,
    pub not_after: Option<i64>,
    pub lookup_hash: Option<&'a str>,
}

/// A row of `global_threepid_associations`: a binding known to this node, from any origin,
/// with the signed association as its origin signed it.
#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = global)]
pub struct GlobalRow {
    pub medium: String,
    pub address: String,
    pub mxid: String,
    pub ts: i64,
    pub not_before: i64,
    pub not_after: i64,
    pub origin_server: String,
    pub origin_id: i64,
    pub sg_assoc: String,
    pub lookup_hash: Option<String>,
}

/// Writes a local row, replacing the one for the same 3PID (Sydent's `REPLACE INTO`: the
/// replacement gets a new, larger id, so peers receive it after everything before it).
pub fn replace_local(conn: &mut SqliteConnection, row: &NewLocalRow<'_>) -> QueryResult<i64> {
    ReplaceLocal(row).get_result(conn)
}

const REPLACE_LOCAL: &str = "REPLACE INTO local_threepid_associations \
     (medium, address, mxid, ts, notBefore, notAfter, lookup_hash) \
     VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id";

/// [`REPLACE_LOCAL`] as a statement diesel prepares once per connection (the DSL form builds
/// its SQL on every bind to look it up in diesel's statement cache: 5.5 % of a bind).
#[derive(Debug, Clone, Copy)]
struct ReplaceLocal<'a>(&'a NewLocalRow<'a>);

impl diesel::query_builder::QueryId for ReplaceLocal<'_> {
    type QueryId = ReplaceLocal<'static>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl diesel::query_builder::Query for ReplaceLocal<'_> {
    type SqlType = BigInt;
}

impl diesel::query_builder::QueryFragment<diesel::sqlite::Sqlite> for ReplaceLocal<'_> {
    fn walk_ast<'b>(
        &'b self,
        mut out: diesel::query_builder::AstPass<'_, 'b, diesel::sqlite::Sqlite>,
    ) -> QueryResult<()> {
        use diesel::sql_types::Nullable;
        let row = self.0;
        let mut parts = REPLACE_LOCAL.split('?');
        out.push_sql(parts.next().unwrap_or_default());
        out.push_bind_param::<Text, _>(row.medium)?;
        out.push_sql(parts.next().unwrap_or_default());
        out.push_bind_param::<Text, _>(row.address)?;
        out.push_sql(parts.next().unwrap_or_default());
        out.push_bind_param::<Nullable<Text>, _>(&row.mxid)?;
        out.push_sql(parts.next().unwrap_or_default());
        out.push_bind_param::<BigInt, _>(&row.ts)?;
        out.push_sql(parts.next().unwrap_or_default());
        out.push_bind_param::<Nullable<BigInt>, _>(&row.not_before)?;
        out.push_sql(parts.next().unwrap_or_default());
        out.push_bind_param::<Nullable<BigInt>, _>(&row.not_after)?;
        out.push_sql(parts.next().unwrap_or_default());
        out.push_bind_param::<Nullable<Text>, _>(&row.lookup_hash)?;
        out.push_sql(parts.next().unwrap_or_default());
        Ok(())
    }
}

impl RunQueryDsl<SqliteConnection> for ReplaceLocal<'_> {}

/// Every origin's rows for one 3PID (lookups while the index warms up, unbinds).
pub fn global_for(
    conn: &mut SqliteConnection,
    medium: &str,
    address: &str,
) -> QueryResult<Vec<GlobalRow>> {
    global::table
        .filter(global::medium.eq(medium).and(global::address.eq(address)))
        .select(GlobalRow::as_select())
        .load(conn)
}

/// Every row whose `lookup_hash` is one of `hashes` (v2 lookups while the index warms up).
pub fn global_by_lookup_hash(
    conn: &mut SqliteConnection,
    hashes: &[String],
) -> QueryResult<Vec<GlobalRow>> {
    let mut rows = Vec::new();
    // SQLite binds at most 32,766 parameters a statement.
    for chunk in hashes.chunks(10_000) {
        rows.extend(
            global::table
                .filter(global::lookup_hash.eq_any(chunk))
                .select(GlobalRow::as_select())
                .load(conn)?,
        );
    }
    Ok(rows)
}

// One origin's rows for one 3PID. `+originServer` makes SQLite use the (medium, address)
// index: left to itself it walks every row of the origin through (originServer, originId),
// and a bind's cost grew with the table.
const OLDER_FROM_ORIGIN_DELETE: &str = "DELETE FROM global_threepid_associations \
     WHERE medium = ? AND address = ? AND +originServer = ? AND originId < ?";

/// [`OLDER_FROM_ORIGIN_DELETE`] as a statement diesel prepares once per connection: it runs
/// for every bind and every replicated row, and diesel compiles a `sql_query` again on every
/// run (a twentieth of a 20-node mesh's CPU went to that).
#[derive(Debug, Clone, Copy)]
struct OlderFromOrigin<'a> {
    medium: &'a str,
    address: &'a str,
    origin: &'a str,
    before_origin_id: i64,
}

impl diesel::query_builder::QueryId for OlderFromOrigin<'_> {
    type QueryId = OlderFromOrigin<'static>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl diesel::query_builder::QueryFragment<diesel::sqlite::Sqlite> for OlderFromOrigin<'_> {
    fn walk_ast<'b>(
        &'b self,
        mut out: diesel::query_builder::AstPass<'_, 'b, diesel::sqlite::Sqlite>,
    ) -> QueryResult<()> {
        // The text of OLDER_FROM_ORIGIN_DELETE with its four parameters bound.
        let mut parts = OLDER_FROM_ORIGIN_DELETE.split('?');
        out.push_sql(parts.next().unwrap_or_default());
        out.push_bind_param::<Text, _>(self.medium)?;
        out.push_sql(parts.next().unwrap_or_default());
        out.push_bind_param::<Text, _>(self.address)?;
        out.push_sql(parts.next().unwrap_or_default());
        out.push_bind_param::<Text, _>(self.origin)?;
        out.push_sql(parts.next().unwrap_or_default());
        out.push_bind_param::<BigInt, _>(&self.before_origin_id)?;
        out.push_sql(parts.next().unwrap_or_default());
        Ok(())
    }
}

impl RunQueryDsl<SqliteConnection> for OlderFromOrigin<'_> {}

/// How far an origin's pushes have been applied: its highest `originId` and the newest `ts`
/// among the rows up to it (a row pushed later with an id at or below the mark but a newer
/// `ts` cannot be a re-send: the origin's ids started again).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Queryable)]
pub struct OriginMark {
    pub origin_id: i64,
    pub ts: i64,
}

/// The mark of `origin`, if anything of it was ever applied.
pub fn origin_mark(conn: &mut SqliteConnection, origin: &str) -> QueryResult<Option<OriginMark>> {
    marks::table
        .filter(marks::origin_server.eq(origin))
        .select((marks::max_origin_id, marks::max_origin_ts))
        // Not `first`: its `LIMIT ?` would compile the statement again on every push (see
        // `local_after`); `origin_server` is the key, so there is one row at most.
        .get_result::<OriginMark>(conn)
        .optional()
}

/// Sets `origin`'s mark (the store only ever moves it forward). `REPLACE` rather than an
/// upsert: diesel compiles an `ON CONFLICT … DO UPDATE` again on every run, and this runs for
/// every push; the row is the whole mark, so replacing it is the same.
pub fn set_origin_mark(
    conn: &mut SqliteConnection,
    origin: &str,
    mark: OriginMark,
) -> QueryResult<()> {
    diesel::replace_into(marks::table)
        .values((
            marks::origin_server.eq(origin),
            marks::max_origin_id.eq(mark.origin_id),
            marks::max_origin_ts.eq(mark.ts),
        ))
        .execute(conn)
        .map(|_| ())
}

/// Forgets everything `origin` ever pushed: its rows of the global table and its mark (the
/// admin's step when a peer starts again on a new database). Returns the rows removed.
pub fn forget_origin(conn: &mut SqliteConnection, origin: &str) -> QueryResult<usize> {
    conn.transaction(|c| {
        diesel::delete(marks::table.filter(marks::origin_server.eq(origin))).execute(c)?;
        diesel::delete(global::table.filter(global::origin_server.eq(origin))).execute(c)
    })
}

/// Puts `row` into the global table, removing its origin's older rows for the same 3PID. The
/// caller knows the row is newer than anything of its origin stored: a bind just made here
/// (its id is new and the largest), or a peer's row above that peer's [`OriginMark`].
pub fn supersede_global(conn: &mut SqliteConnection, row: &GlobalRow) -> QueryResult<()> {
    delete_global_from_origin(
        conn,
        &row.origin_server,
        &row.medium,
        &row.address,
        row.origin_id,
    )?;
    InsertGlobal(row).execute(conn).map(|_| ())
}

const INSERT_GLOBAL: &str = "INSERT INTO global_threepid_associations \
     (medium, address, mxid, ts, notBefore, notAfter, originServer, originId, sgAssoc, lookup_hash) \
     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)";

/// [`INSERT_GLOBAL`] as a statement diesel prepares once per connection (see [`ReplaceLocal`]).
#[derive(Debug, Clone, Copy)]
struct InsertGlobal<'a>(&'a GlobalRow);

impl diesel::query_builder::QueryId for InsertGlobal<'_> {
    type QueryId = InsertGlobal<'static>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl diesel::query_builder::QueryFragment<diesel::sqlite::Sqlite> for InsertGlobal<'_> {
    fn walk_ast<'b>(
        &'b self,
        mut out: diesel::query_builder::AstPass<'_, 'b, diesel::sqlite::Sqlite>,
    ) -> QueryResult<()> {
        use diesel::sql_types::Nullable;
        let row = self.0;
        let mut parts = INSERT_GLOBAL.split('?');
        out.push_sql(parts.next().unwrap_or_default());
        out.push_bind_param::<Text, _>(&row.medium)?;
        out.push_sql(parts.next().unwrap_or_default());
        out.push_bind_param::<Text, _>(&row.address)?;
        out.push_sql(parts.next().unwrap_or_default());
        out.push_bind_param::<Text, _>(&row.mxid)?;
        out.push_sql(parts.next().unwrap_or_default());
        out.push_bind_param::<BigInt, _>(&row.ts)?;
        out.push_sql(parts.next().unwrap_or_default());
        out.push_bind_param::<BigInt, _>(&row.not_before)?;
        out.push_sql(parts.next().unwrap_or_default());
        out.push_bind_param::<BigInt, _>(&row.not_after)?;
        out.push_sql(parts.next().unwrap_or_default());
        out.push_bind_param::<Text, _>(&row.origin_server)?;
        out.push_sql(parts.next().unwrap_or_default());
        out.push_bind_param::<BigInt, _>(&row.origin_id)?;
        out.push_sql(parts.next().unwrap_or_default());
        out.push_bind_param::<Text, _>(&row.sg_assoc)?;
        out.push_sql(parts.next().unwrap_or_default());
        out.push_bind_param::<Nullable<Text>, _>(&row.lookup_hash)?;
        out.push_sql(parts.next().unwrap_or_default());
        Ok(())
    }
}

impl RunQueryDsl<SqliteConnection> for InsertGlobal<'_> {}

/// Removes `origin`'s rows for a 3PID that are older than `before_origin_id` (its rebind; a
/// tombstone goes through [`delete_global_before_tombstone`]). Returns how many were removed.
pub fn delete_global_from_origin(
    conn: &mut SqliteConnection,
    origin: &str,
    medium: &str,
    address: &str,
    before_origin_id: i64,
) -> QueryResult<usize> {
    OlderFromOrigin {
        medium,
        address,
        origin,
        before_origin_id,
    }
    .execute(conn)
}

/// Applies a tombstone to the global table: removes its origin's rows for the 3PID older than
/// it (by id), and every other origin's row for the 3PID with an older `ts` (the last write
/// wins, whoever made the binding). Returns how many were removed. (Sydent removes every
/// origin's rows whatever their `ts`.)
pub fn delete_global_before_tombstone(
    conn: &mut SqliteConnection,
    tombstone: &Tombstone<'_>,
) -> QueryResult<usize> {
    diesel::delete(global::table.filter(tombstone.superseded())).execute(conn)
}

/// A tombstone as the global table sees it.
#[derive(Debug, Clone, Copy)]
pub struct Tombstone<'a> {
    pub origin: &'a str,
    pub medium: &'a str,
    pub address: &'a str,
    /// The origin's local id for it.
    pub origin_id: i64,
    pub ts: i64,
}

type GlobalPredicate<'a> =
    Box<dyn BoxableExpression<global::table, Sqlite, SqlType = diesel::sql_types::Bool> + 'a>;

impl<'a> Tombstone<'a> {
    /// The rows it removes.
    fn superseded(&self) -> GlobalPredicate<'a> {
        let of_origin = global::origin_server
            .eq(self.origin)
            .and(global::origin_id.lt(self.origin_id));
        let older_elsewhere = global::origin_server
            .ne(self.origin)
            .and(global::ts.lt(self.ts));
        Box::new(
            global::medium
                .eq(self.medium)
                .and(global::address.eq(self.address))
                .and(of_origin.or(older_elsewhere)),
        )
    }
}

/// Hands every global row to `f`, one at a time (the index is built without holding the
/// whole table in memory).
pub fn for_each_global(
    conn: &mut SqliteConnection,
    mut f: impl FnMut(GlobalRow),
) -> QueryResult<usize> {
    let mut count = 0;
    for row in global::table
        .select(GlobalRow::as_select())
        .load_iter::<GlobalRow, diesel::connection::DefaultLoadingMode>(conn)?
    {
        f(row?);
        count += 1;
    }
    Ok(count)
}

/// How many rows the global table holds (the index reserves room for them).
pub fn count_global(conn: &mut SqliteConnection) -> QueryResult<usize> {
    global::table
        .count()
        .get_result::<i64>(conn)
        .map(|n| usize::try_from(n).unwrap_or(0))
}

/// Every invite (ephemeral) public key this node has issued, for `pubkey/ephemeral/isvalid`.
pub fn ephemeral_public_keys(conn: &mut SqliteConnection) -> QueryResult<Vec<String>> {
    use super::schema::ephemeral_public_keys::dsl::*;
    ephemeral_public_keys.select(public_key).load(conn)
}

/// Local rows (bindings and tombstones) after replication cursor `after`, in id order, at most
/// `limit` of them.
///
/// No `LIMIT ?`: SQLite (the bundled 3.53) marks a statement whose LIMIT is a bound parameter
/// to be compiled again whenever that parameter is bound, i.e. on every run (measured: a tenth
/// of a 20-node mesh's CPU went to parsing it), and the push queues run this once per push.
/// Stepping through the rows and stopping after `limit` reads no more.
pub fn local_after(
    conn: &mut SqliteConnection,
    after: i64,
    limit: usize,
) -> QueryResult<Vec<LocalRow>> {
    local::table
        .filter(local::id.gt(after))
        .order(local::id.asc())
        .select(LocalRow::as_select())
        .load_iter::<LocalRow, diesel::connection::DefaultLoadingMode>(conn)?
        .take(limit)
        .collect()
}

/// How many local rows lie after `after`: a peer's backlog.
pub fn count_local_after(conn: &mut SqliteConnection, after: i64) -> QueryResult<i64> {
    local::table
        .filter(local::id.gt(after))
        .count()
        .get_result(conn)
}

/// The newest local id (-1 when there is none), where the pushers' wake-up signal starts.
pub fn max_local_id(conn: &mut SqliteConnection) -> QueryResult<i64> {
    local::table
        .select(diesel::dsl::max(local::id))
        .first::<Option<i64>>(conn)
        .map(|id| id.unwrap_or(-1))
}

/// Sydent's database peers: active rows of `peers` with an ed25519 `peer_pubkeys` row.
pub fn db_peers(conn: &mut SqliteConnection) -> QueryResult<Vec<(String, Option<i64>, String)>> {
    use super::schema::{peer_pubkeys, peers};
    peers::table
        .inner_join(peer_pubkeys::table.on(peer_pubkeys::peername.eq(peers::name)))
        .filter(peers::active.eq(1).and(peer_pubkeys::alg.eq("ed25519")))
        .select((peers::name, peers::port, peer_pubkeys::key))
        .load(conn)
}

/// A peer's replication cursor (`peers.lastSentVersion`; -1 = nothing sent). A peer from
/// peers.d gets a row (inactive, so Sydent's own loader would not pick it up) the first time.
pub fn peer_cursor(conn: &mut SqliteConnection, name: &str) -> QueryResult<i64> {
    use super::schema::peers;
    diesel::insert_or_ignore_into(peers::table)
        .values((peers::name.eq(name), peers::active.eq(0)))
        .execute(conn)?;
    peers::table
        .filter(peers::name.eq(name))
        .select(peers::last_sent_version)
        .first::<Option<i64>>(conn)
        .map(|v| v.unwrap_or(-1))
}

/// Records that a peer acknowledged everything up to `cursor`.
pub fn set_peer_cursor(
    conn: &mut SqliteConnection,
    name: &str,
    cursor: i64,
    now_ms: i64,
) -> QueryResult<()> {
    use super::schema::peers;
    diesel::update(peers::table.filter(peers::name.eq(name)))
        .set((
            peers::last_sent_version.eq(cursor),
            peers::last_poke_succeeded_at.eq(now_ms),
        ))
        .execute(conn)
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use diesel::prelude::*;

    #[derive(QueryableByName)]
    struct Plan {
        #[diesel(sql_type = diesel::sql_types::Text)]
        detail: String,
    }

    /// The query of the bind and replication paths (the same SQL text as above) must find
    /// one origin's rows for one 3PID through the 3PID index: walking the origin's rows made
    /// each bind cost grow with the table (2,000 binds/s at 10 k rows, 2 at 45 k).
    #[test]
    fn per_threepid_queries_use_the_threepid_index() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plan.db");
        let (mut conn, _) = crate::db::open(path.to_str().unwrap()).unwrap();
        let sql = super::OLDER_FROM_ORIGIN_DELETE;
        let plan: Vec<Plan> = diesel::sql_query(format!("EXPLAIN QUERY PLAN {sql}"))
            .bind::<diesel::sql_types::Text, _>("email")
            .bind::<diesel::sql_types::Text, _>("x@example.org")
            .bind::<diesel::sql_types::Text, _>("a.example")
            .bind::<diesel::sql_types::BigInt, _>(5)
            .load(&mut conn)
            .unwrap();
        assert_uses_threepid_index(plan, sql);
        // And that text is what runs.
        let run = super::OlderFromOrigin {
            medium: "email",
            address: "x@example.org",
            origin: "a.example",
            before_origin_id: 5,
        };
        let rendered = diesel::debug_query::<diesel::sqlite::Sqlite, _>(&run).to_string();
        assert!(
            rendered.starts_with(&format!("{sql} -- binds: ")),
            "{rendered}"
        );
    }

    /// A tombstone runs rarely, but its query must still find the 3PID's rows through the
    /// 3PID index, not walk the table.
    #[test]
    fn a_tombstone_finds_its_rows_through_the_threepid_index() {
        let dir = tempfile::tempdir().unwrap();
        let (mut conn, _) = crate::db::open(dir.path().join("a.db").to_str().unwrap()).unwrap();
        let tombstone = super::Tombstone {
            origin: "a.example",
            medium: "email",
            address: "x@example.org",
            origin_id: 5,
            ts: 9,
        };
        let query = diesel::debug_query::<diesel::sqlite::Sqlite, _>(&diesel::delete(
            super::global::table.filter(tombstone.superseded()),
        ))
        .to_string();
        // Its parameters as literals: only the plan matters.
        let sql = query
            .split(" -- binds:")
            .next()
            .unwrap()
            .replace('?', "'x'");
        let plan: Vec<Plan> = diesel::sql_query(format!("EXPLAIN QUERY PLAN {sql}"))
            .load(&mut conn)
            .unwrap();
        assert_uses_threepid_index(plan, &sql);
    }

    /// `plan`, the query plan of `sql`, finds rows through the (medium, address) index.
    fn assert_uses_threepid_index(plan: Vec<Plan>, sql: &str) {
        let plan: Vec<String> = plan.into_iter().map(|p| p.detail).collect();
        assert!(
            plan.iter()
                .any(|d| d.contains("INDEX global_threepid_medium_address ")),
            "{sql}: {plan:?}"
        );
    }

    fn global_row(origin: &str, origin_id: i64, mxid: &str, ts: i64) -> super::GlobalRow {
        super::GlobalRow {
            medium: "email".into(),
            address: "x@example.org".into(),
            mxid: mxid.into(),
            ts,
            not_before: ts,
            not_after: ts + 1_000_000,
            origin_server: origin.into(),
            origin_id,
            sg_assoc: "{}".into(),
            lookup_hash: None,
        }
    }

    /// Last writer wins: a tombstone of origin X removes X's older rows and other origins'
    /// rows older than it, but not another origin's newer binding, nor other 3PIDs.
    #[test]
    fn a_tombstone_removes_older_rows_of_every_origin_and_keeps_newer_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (mut conn, _) = crate::db::open(dir.path().join("a.db").to_str().unwrap()).unwrap();
        for row in [
            global_row("x.example", 3, "@a:x.example", 100),
            global_row("y.example", 7, "@b:y.example", 150),
            global_row("z.example", 2, "@c:z.example", 250),
            super::GlobalRow {
                address: "other@example.org".into(),
                ..global_row("y.example", 8, "@d:y.example", 50)
            },
        ] {
            super::supersede_global(&mut conn, &row).unwrap();
        }
        // X's tombstone (its id 4) at ts 200.
        let tombstone = super::Tombstone {
            origin: "x.example",
            medium: "email",
            address: "x@example.org",
            origin_id: 4,
            ts: 200,
        };
        let removed = super::delete_global_before_tombstone(&mut conn, &tombstone).unwrap();
        assert_eq!(removed, 2);
        let left: Vec<(String, String)> = super::global::table
            .select((super::global::address, super::global::mxid))
            .order(super::global::mxid)
            .load(&mut conn)
            .unwrap();
        assert_eq!(
            left,
            [
                ("x@example.org".to_string(), "@c:z.example".to_string()),
                ("other@example.org".to_string(), "@d:y.example".to_string()),
            ]
        );
    }

    fn bind(conn: &mut SqliteConnection, address: &str, mxid: Option<&str>) -> i64 {
        super::replace_local(
            conn,
            &super::NewLocalRow {
                medium: "email",
                address,
                mxid,
                ts: 1,
                not_before: None,
                not_after: None,
                lookup_hash: None,
            },
        )
        .unwrap()
    }

    /// What the push queues read: the rows after a cursor, oldest first, at most `limit`; a
    /// later row of the same 3PID (here its unbind) replaces the earlier with a newer id.
    #[test]
    fn local_after_reads_in_id_order_up_to_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let (mut conn, _) = crate::db::open(dir.path().join("a.db").to_str().unwrap()).unwrap();
        let ids: Vec<i64> = (0..5)
            .map(|n| {
                bind(
                    &mut conn,
                    &format!("u{n}@example.org"),
                    Some("@u:a.example"),
                )
            })
            .collect();
        let unbound = bind(&mut conn, "u1@example.org", None);
        let read = |conn: &mut SqliteConnection, after, limit| -> Vec<i64> {
            super::local_after(conn, after, limit)
                .unwrap()
                .iter()
                .map(|r| r.id)
                .collect()
        };
        assert_eq!(
            read(&mut conn, -1, 100),
            [ids[0], ids[2], ids[3], ids[4], unbound]
        );
        assert_eq!(read(&mut conn, ids[2], 2), [ids[3], ids[4]]);
        assert_eq!(read(&mut conn, unbound, 100), Vec::<i64>::new());
    }

    #[test]
    fn an_origin_mark_is_replaced_by_the_next() {
        use super::OriginMark;
        let dir = tempfile::tempdir().unwrap();
        let (mut conn, _) = crate::db::open(dir.path().join("a.db").to_str().unwrap()).unwrap();
        assert_eq!(super::origin_mark(&mut conn, "b.example").unwrap(), None);
        for (origin_id, ts) in [(3, 30), (7, 70)] {
            super::set_origin_mark(&mut conn, "b.example", OriginMark { origin_id, ts }).unwrap();
        }
        super::set_origin_mark(
            &mut conn,
            "c.example",
            OriginMark {
                origin_id: 1,
                ts: 1,
            },
        )
        .unwrap();
        assert_eq!(
            super::origin_mark(&mut conn, "b.example").unwrap(),
            Some(OriginMark {
                origin_id: 7,
                ts: 70
            })
        );
    }
}
