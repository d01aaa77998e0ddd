//! v2 accounts: `accounts`, `tokens` (each token stored as `sha256:<hex>`, never as it is) and
//! `accepted_terms_urls`, in Sydent's tables. Written only by the association store's commit
//! thread (the single writer); read whole once at start into `crate::accounts::Accounts`.

use diesel::prelude::*;

use crate::accounts::stored_token;

use super::schema::{accepted_terms_urls as accepted, accounts, tokens};

/// Replaces every token stored as it is (by Sydent, which may also have run on this database
/// since) with its stored form. Runs at every start: the table is small and this is one query
/// when there is nothing to do. Answers how many were converted.
pub fn hash_stored_tokens(conn: &mut SqliteConnection) -> QueryResult<usize> {
    conn.transaction(|c| {
        let plain: Vec<(String, String)> = tokens::table
            .filter(tokens::token.not_like("sha256:%"))
            .select((tokens::token, tokens::user_id))
            .load(c)?;
        for (token, user_id) in &plain {
            diesel::delete(tokens::table.filter(tokens::token.eq(token))).execute(c)?;
            diesel::insert_into(tokens::table)
                .values((
                    tokens::token.eq(stored_token(token)),
                    tokens::user_id.eq(user_id),
                ))
                .on_conflict_do_nothing()
                .execute(c)?;
        }
        Ok(plain.len())
    })
}

/// Everything the in-memory account cache starts from.
pub struct AccountRows {
    /// (user_id, consent_version)
    pub accounts: Vec<(String, Option<String>)>,
    /// (stored token, user_id)
    pub tokens: Vec<(String, String)>,
    /// (user_id, url)
    pub accepted: Vec<(String, String)>,
}

pub fn load_all(conn: &mut SqliteConnection) -> QueryResult<AccountRows> {
    Ok(AccountRows {
        accounts: accounts::table
            .select((accounts::user_id, accounts::consent_version))
            .load(conn)?,
        tokens: tokens::table
            .select((tokens::token, tokens::user_id))
            .load(conn)?,
        accepted: accepted::table
            .select((accepted::user_id, accepted::url))
            .load(conn)?,
    })
}

/// Creates the account if it does not exist and adds a token to it.
pub fn register(
    conn: &mut SqliteConnection,
    user_id: &str,
    stored_token: &str,
    now_ms: i64,
) -> QueryResult<()> {
    diesel::insert_into(accounts::table)
        .values((
            accounts::user_id.eq(user_id),
            accounts::created_ts.eq(now_ms),
            accounts::consent_version.eq(None::<String>),
        ))
        .on_conflict_do_nothing()
        .execute(conn)?;
    diesel::insert_into(tokens::table)
        .values((tokens::token.eq(stored_token), tokens::user_id.eq(user_id)))
        .execute(conn)?;
    Ok(())
}

/// Deletes one token; answers whether it existed.
pub fn logout(conn: &mut SqliteConnection, stored_token: &str) -> QueryResult<bool> {
    Ok(diesel::delete(tokens::table.filter(tokens::token.eq(stored_token))).execute(conn)? > 0)
}

/// Records the URLs a user accepted and, when given, the terms version they now consent to.
pub fn accept_terms(
    conn: &mut SqliteConnection,
    user_id: &str,
    urls: &[String],
    consent_version: Option<&str>,
) -> QueryResult<()> {
    for url in urls {
        diesel::insert_into(accepted::table)
            .values((accepted::user_id.eq(user_id), accepted::url.eq(url)))
            .on_conflict_do_nothing()
            .execute(conn)?;
    }
    if let Some(version) = consent_version {
        diesel::update(accounts::table.filter(accounts::user_id.eq(user_id)))
            .set(accounts::consent_version.eq(version))
            .execute(conn)?;
    }
    Ok(())
}
