//! Validation sessions in Sydent's tables: `threepid_validation_sessions` (one row per
//! session, `id` = the sid), `threepid_token_auths` (its token and the highest `send_attempt`
//! sent, found by `validationSession`: Sydent looked it up by its own row id, which is why its
//! `send_attempt` never stuck) and our `validation_session_extras` (`next_link`, wrong-token
//! count). Written only by the association store's commit thread (the single writer), always
//! as a session's whole state, in the order the validation-session actor decided them; read
//! whole once at start.

use std::collections::HashMap;

use diesel::prelude::*;

use super::schema::{
    threepid_token_auths as tokens, threepid_validation_sessions as sessions,
    validation_session_extras as extras,
};

/// One session as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRow {
    pub sid: i64,
    pub medium: String,
    /// As the client gave it (the bind casefolds emails).
    pub address: String,
    pub client_secret: String,
    pub validated: bool,
    /// Last modification (creation, a send, validation), ms.
    pub mtime: i64,
    pub token: String,
    /// Highest `send_attempt` sent (-1: none recorded, as Sydent leaves it).
    pub send_attempt: i64,
    pub next_link: Option<String>,
    pub failed_attempts: i64,
}

/// A change to the session tables, as the store commits it.
#[derive(Debug, Clone)]
pub enum SessionWrite {
    /// Writes the session's whole state, creating it if needed.
    Save(SessionRow),
    /// Marks a stored session validated at `mtime` (the one column pair that changes: a
    /// whole [`SessionWrite::Save`] would rewrite its token row too).
    Validated { sid: i64, mtime: i64 },
    /// Deletes these sessions (closed after too many wrong tokens).
    Delete(Vec<i64>),
    /// Deletes every session last modified before this time (ms): the periodic sweep.
    DeleteOlderThan(i64),
}

/// Every session modified at or after `since` (ms). A session with no token row (which
/// Sydent never leaves) is skipped.
pub fn load_since(conn: &mut SqliteConnection, since: i64) -> QueryResult<Vec<SessionRow>> {
    let rows: Vec<(i64, String, String, String, Option<i64>, i64)> = sessions::table
        .filter(sessions::mtime.ge(since))
        .select((
            sessions::id,
            sessions::medium,
            sessions::address,
            sessions::client_secret,
            sessions::validated,
            sessions::mtime,
        ))
        .load(conn)?;
    // The newest token row of each session (Sydent makes one; a later one wins if not).
    let mut token_of: HashMap<i64, (String, i64)> = HashMap::new();
    let token_rows: Vec<(i64, String, i64)> = tokens::table
        .order(tokens::id.asc())
        .select((
            tokens::validation_session,
            tokens::token,
            tokens::send_attempt_number,
        ))
        .load(conn)?;
    for (sid, token, attempt) in token_rows {
        token_of.insert(sid, (token, attempt));
    }
    let mut extra_of: HashMap<i64, (Option<String>, i64)> = extras::table
        .select((
            extras::session_id,
            extras::next_link,
            extras::failed_attempts,
        ))
        .load::<(i64, Option<String>, i64)>(conn)?
        .into_iter()
        .map(|(sid, link, failed)| (sid, (link, failed)))
        .collect();
    Ok(rows
        .into_iter()
        .filter_map(|(sid, medium, address, client_secret, validated, mtime)| {
            let (token, send_attempt) = token_of.remove(&sid)?;
            let (next_link, failed_attempts) = extra_of.remove(&sid).unwrap_or((None, 0));
            Some(SessionRow {
                sid,
                medium,
                address,
                client_secret,
                validated: validated.unwrap_or(0) != 0,
                mtime,
                token,
                send_attempt,
                next_link,
                failed_attempts,
            })
        })
        .collect())
}

/// Commits one session write; answers how many sessions it touched.
pub fn apply(conn: &mut SqliteConnection, write: &SessionWrite) -> QueryResult<usize> {
    match write {
        SessionWrite::Save(row) => save(conn, row).map(|()| 1),
        SessionWrite::Validated { sid, mtime } => {
            diesel::update(sessions::table.filter(sessions::id.eq(sid)))
                .set((sessions::validated.eq(Some(1)), sessions::mtime.eq(mtime)))
                .execute(conn)
        }
        SessionWrite::Delete(sids) => delete(conn, sids),
        SessionWrite::DeleteOlderThan(cutoff) => {
            let old: Vec<i64> = sessions::table
                .filter(sessions::mtime.lt(cutoff))
                .select(sessions::id)
                .load(conn)?;
            delete(conn, &old)
        }
    }
}

fn save(conn: &mut SqliteConnection, row: &SessionRow) -> QueryResult<()> {
    diesel::insert_into(sessions::table)
        .values((
            sessions::id.eq(row.sid),
            sessions::medium.eq(&row.medium),
            sessions::address.eq(&row.address),
            sessions::client_secret.eq(&row.client_secret),
            sessions::validated.eq(Some(i64::from(row.validated))),
            sessions::mtime.eq(row.mtime),
        ))
        .on_conflict(sessions::id)
        .do_update()
        .set((
            sessions::validated.eq(Some(i64::from(row.validated))),
            sessions::mtime.eq(row.mtime),
        ))
        .execute(conn)?;
    let updated = diesel::update(tokens::table.filter(tokens::validation_session.eq(row.sid)))
        .set((
            tokens::token.eq(&row.token),
            tokens::send_attempt_number.eq(row.send_attempt),
        ))
        .execute(conn)?;
    if updated == 0 {
        diesel::insert_into(tokens::table)
            .values((
                tokens::validation_session.eq(row.sid),
                tokens::token.eq(&row.token),
                tokens::send_attempt_number.eq(row.send_attempt),
            ))
            .execute(conn)?;
    }
    if row.next_link.is_some() || row.failed_attempts > 0 {
        diesel::insert_into(extras::table)
            .values((
                extras::session_id.eq(row.sid),
                extras::next_link.eq(&row.next_link),
                extras::failed_attempts.eq(row.failed_attempts),
            ))
            .on_conflict(extras::session_id)
            .do_update()
            .set((
                extras::next_link.eq(&row.next_link),
                extras::failed_attempts.eq(row.failed_attempts),
            ))
            .execute(conn)?;
    }
    Ok(())
}

fn delete(conn: &mut SqliteConnection, sids: &[i64]) -> QueryResult<usize> {
    let mut n = 0;
    for chunk in sids.chunks(500) {
        n += diesel::delete(sessions::table.filter(sessions::id.eq_any(chunk))).execute(conn)?;
        diesel::delete(tokens::table.filter(tokens::validation_session.eq_any(chunk)))
            .execute(conn)?;
        diesel::delete(extras::table.filter(extras::session_id.eq_any(chunk))).execute(conn)?;
    }
    Ok(n)
}
