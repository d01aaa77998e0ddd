//! Emails stored before Sydent casefolded them (`Alice@Example.org` rows, from Sydent before
//! 2.4 on a database whose admin never ran Sydent's `casefold_db.py`): casefolded once, when the
//! database is opened, as that script does, so every path (lookup, unbind, rebind, replication,
//! the index and SQL alike) sees one address per 3PID.
//!
//! Per casefolded address the newest local row is kept (highest `ts`, then id) and the others
//! are deleted; per origin and casefolded address the global row with the highest `originId`
//! is kept (what a rebind would have left). Kept rows get the casefolded address and its lookup
//! hash; this node's own global rows are signed again with the new address (a peer's signature
//! cannot be redone: its `sgAssoc` stays as the peer signed it). Row ids do not change, so
//! nothing is replicated again. Recorded in `sydent_rs_upgrades` once done.

use std::collections::HashMap;

use diesel::prelude::*;
use serde_json::Value;

use super::schema::{
    global_threepid_associations as global, local_threepid_associations as local,
    sydent_rs_upgrades as upgrades,
};
use crate::association::ThreepidAssociation;
use crate::crypto::{lookup_hash, NodeSigningKey};
use crate::types::{Medium, Threepid};

const STEP: &str = "casefold_emails";

/// What the upgrade changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Casefolded {
    /// Rows whose address was casefolded in place.
    pub local_rewritten: usize,
    /// Rows dropped because a newer row holds the same casefolded address.
    pub local_merged: usize,
    pub global_rewritten: usize,
    pub global_merged: usize,
}

/// Casefolds the email rows of both association tables unless that was done before. Answers
/// what changed (`None`: done before).
pub fn casefold_emails(
    conn: &mut SqliteConnection,
    own_server: &str,
    key: &NodeSigningKey,
    pepper: &str,
) -> QueryResult<Option<Casefolded>> {
    conn.transaction(|c| {
        let done = upgrades::table
            .filter(upgrades::name.eq(STEP))
            .count()
            .get_result::<i64>(c)?;
        if done > 0 {
            return Ok(None);
        }
        let mut out = Casefolded::default();
        casefold_local(c, pepper, &mut out)?;
        casefold_global(c, own_server, key, pepper, &mut out)?;
        diesel::insert_into(upgrades::table)
            .values((
                upgrades::name.eq(STEP),
                upgrades::done_ts.eq(crate::now_ms()),
            ))
            .execute(c)?;
        Ok(Some(out))
    })
}

fn folded(address: &str) -> String {
    Threepid::lookup_key(Medium::Email, address).into_owned()
}

fn casefold_local(
    conn: &mut SqliteConnection,
    pepper: &str,
    out: &mut Casefolded,
) -> QueryResult<()> {
    type Row = (i64, String, Option<String>, Option<i64>);
    let rows: Vec<Row> = local::table
        .filter(local::medium.eq("email"))
        .select((local::id, local::address, local::mxid, local::ts))
        .load(conn)?;
    let mut groups: HashMap<String, Vec<Row>> = HashMap::new();
    for row in rows {
        groups.entry(folded(&row.1)).or_default().push(row);
    }
    for (address, mut group) in groups {
        if group.len() == 1 && group[0].1 == address {
            continue;
        }
        group.sort_by_key(|(id, _, _, ts)| (ts.unwrap_or(i64::MIN), *id));
        let Some((keep_id, keep_address, keep_mxid, _)) = group.pop() else {
            continue;
        };
        let older: Vec<i64> = group.iter().map(|(id, ..)| *id).collect();
        out.local_merged +=
            diesel::delete(local::table.filter(local::id.eq_any(&older))).execute(conn)?;
        if keep_address != address {
            let hash = keep_mxid.map(|_| lookup_hash(&address, "email", pepper));
            diesel::update(local::table.filter(local::id.eq(keep_id)))
                .set((local::address.eq(&address), local::lookup_hash.eq(hash)))
                .execute(conn)?;
            out.local_rewritten += 1;
        }
    }
    Ok(())
}

fn casefold_global(
    conn: &mut SqliteConnection,
    own_server: &str,
    key: &NodeSigningKey,
    pepper: &str,
    out: &mut Casefolded,
) -> QueryResult<()> {
    type Row = (i64, String, String, i64, String, i64, i64, i64);
    let rows: Vec<Row> = global::table
        .filter(global::medium.eq("email"))
        .select((
            global::id,
            global::address,
            global::origin_server,
            global::origin_id,
            global::mxid,
            global::ts,
            global::not_before,
            global::not_after,
        ))
        .load(conn)?;
    let mut groups: HashMap<(String, String), Vec<Row>> = HashMap::new();
    for row in rows {
        groups
            .entry((row.2.clone(), folded(&row.1)))
            .or_default()
            .push(row);
    }
    for ((origin, address), mut group) in groups {
        if group.len() == 1 && group[0].1 == address {
            continue;
        }
        group.sort_by_key(|row| row.3);
        let Some((id, old_address, _, _, mxid, ts, not_before, not_after)) = group.pop() else {
            continue;
        };
        let older: Vec<i64> = group.iter().map(|row| row.0).collect();
        out.global_merged +=
            diesel::delete(global::table.filter(global::id.eq_any(&older))).execute(conn)?;
        if old_address == address {
            continue;
        }
        let hash = lookup_hash(&address, "email", pepper);
        diesel::update(global::table.filter(global::id.eq(id)))
            .set((global::address.eq(&address), global::lookup_hash.eq(hash)))
            .execute(conn)?;
        if origin == own_server {
            let assoc = ThreepidAssociation {
                medium: "email".into(),
                address: address.clone(),
                mxid: Some(mxid),
                ts,
                not_before: Some(not_before),
                not_after: Some(not_after),
            };
            match assoc.signed(own_server, key) {
                Ok(signed) => {
                    diesel::update(global::table.filter(global::id.eq(id)))
                        .set(global::sg_assoc.eq(Value::Object(signed).to_string()))
                        .execute(conn)?;
                }
                // Not for an association of strings and integers; served as signed before.
                Err(e) => log::warn!("casefold: cannot sign global row {id} again: {e}"),
            }
        }
        out.global_rewritten += 1;
    }
    Ok(())
}
