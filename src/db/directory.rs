//! The directory mirror's own table (`directory_mirror`): which 3PIDs this node bound because
//! the directory said so. The bindings themselves are ordinary local bindings.

use diesel::prelude::*;
use diesel::SqliteConnection;

use super::schema::directory_mirror;

/// A 3PID the mirror holds and the Matrix ID the directory gave it.
#[derive(Debug, Clone, PartialEq, Eq, Queryable)]
pub struct MirrorRow {
    pub medium: String,
    pub address: String,
    pub mxid: String,
}

/// A change to the mirror table, committed by the association store after the bindings.
#[derive(Debug, Clone)]
pub enum MirrorWrite {
    /// These 3PIDs are bound from the directory now (inserted or updated).
    Upsert { rows: Vec<MirrorRow>, now_ms: i64 },
    /// These left the directory (their bindings were unbound).
    Remove(Vec<(String, String)>),
}

pub fn apply(conn: &mut SqliteConnection, write: &MirrorWrite) -> QueryResult<()> {
    match write {
        MirrorWrite::Upsert { rows, now_ms } => {
            for row in rows {
                diesel::replace_into(directory_mirror::table)
                    .values((
                        directory_mirror::medium.eq(&row.medium),
                        directory_mirror::address.eq(&row.address),
                        directory_mirror::mxid.eq(&row.mxid),
                        directory_mirror::synced_ts.eq(now_ms),
                    ))
                    .execute(conn)?;
            }
        }
        MirrorWrite::Remove(threepids) => {
            for (medium, address) in threepids {
                diesel::delete(directory_mirror::table.find((medium, address))).execute(conn)?;
            }
        }
    }
    Ok(())
}

pub fn load(conn: &mut SqliteConnection) -> QueryResult<Vec<MirrorRow>> {
    directory_mirror::table
        .select((
            directory_mirror::medium,
            directory_mirror::address,
            directory_mirror::mxid,
        ))
        .load(conn)
}
