//! The queries the association store runs, each inside a transaction the caller owns.

use diesel::prelude::*;

use super::schema::{global_threepid_associations as global, local_threepid_associations as local};

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
    diesel::replace_into(local::table)
        .values(row)
        .returning(local::id)
        .get_result(conn)
}

/// The local binding of a 3PID, if any (tombstones included).
pub fn local_for(
    conn: &mut SqliteConnection,
    medium: &str,
    address: &str,
) -> QueryResult<Option<LocalRow>> {
    local::table
        .filter(local::medium.eq(medium).and(local::address.eq(address)))
        .select(LocalRow::as_select())
        .load_iter(conn)?
        .next()
        .transpose()
}

/// Puts `row` into the global table after removing what the same origin said before about
/// the same 3PID (a rebind supersedes the origin's older binding; other origins' rows stay and
/// the newest `ts` wins at lookup). A re-sent row (same origin and id) is ignored.
/// Returns whether the row was new.
pub fn put_global(conn: &mut SqliteConnection, row: &GlobalRow) -> QueryResult<bool> {
    let already = global::table
        .filter(
            global::origin_server
                .eq(&row.origin_server)
                .and(global::origin_id.eq(row.origin_id)),
        )
        .select(global::id)
        .load_iter::<i64, _>(conn)?
        .next()
        .is_some();
    if already {
        return Ok(false);
    }
    delete_global_from_origin(
        conn,
        &row.origin_server,
        &row.medium,
        &row.address,
        row.origin_id,
    )?;
    diesel::insert_into(global::table)
        .values(row)
        .execute(conn)?;
    Ok(true)
}

/// Removes `origin`'s rows for a 3PID that are older than `before_origin_id` (its tombstone or
/// rebind). Returns how many were removed.
pub fn delete_global_from_origin(
    conn: &mut SqliteConnection,
    origin: &str,
    medium: &str,
    address: &str,
    before_origin_id: i64,
) -> QueryResult<usize> {
    diesel::delete(
        global::table.filter(
            global::origin_server
                .eq(origin)
                .and(global::medium.eq(medium))
                .and(global::address.eq(address))
                .and(global::origin_id.lt(before_origin_id)),
        ),
    )
    .execute(conn)
}

/// Every global row, for building the in-memory lookup index at start.
pub fn all_global(conn: &mut SqliteConnection) -> QueryResult<Vec<GlobalRow>> {
    global::table.select(GlobalRow::as_select()).load(conn)
}

/// Every invite (ephemeral) public key this node has issued, for `pubkey/ephemeral/isvalid`.
pub fn ephemeral_public_keys(conn: &mut SqliteConnection) -> QueryResult<Vec<String>> {
    use super::schema::ephemeral_public_keys::dsl::*;
    ephemeral_public_keys.select(public_key).load(conn)
}
