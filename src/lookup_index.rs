//! The in-memory lookup index: every valid binding of the global table, keyed by 3PID, so
//! lookups are answered from memory without touching SQLite (reference/rust-stack.md §9: a
//! SQLite read per request caps lookups near 30 k/s on two cores).
//!
//! SQLite stays the source of truth. The association store is the only writer: it applies a
//! change here right after the transaction that made it commits, and before it answers the
//! request, so a client reads its own writes and never sees an uncommitted one.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::db::GlobalRow;
use crate::types::{Medium, Threepid};

/// One origin's binding of a 3PID.
#[derive(Debug, Clone)]
pub struct IndexedBinding {
    pub origin_server: Arc<str>,
    pub origin_id: i64,
    /// The address as stored (normalised), which bulk_lookup answers with.
    pub address: Box<str>,
    pub mxid: Box<str>,
    pub ts: i64,
    pub not_before: i64,
    pub not_after: i64,
    /// The signed association as the origin signed it (`sgAssoc`).
    pub signed_json: Box<str>,
}

impl IndexedBinding {
    fn from_row(row: GlobalRow) -> Self {
        Self {
            origin_server: row.origin_server.into(),
            origin_id: row.origin_id,
            address: row.address.into(),
            mxid: row.mxid.into(),
            ts: row.ts,
            not_before: row.not_before,
            not_after: row.not_after,
            signed_json: row.sg_assoc.into(),
        }
    }

    fn is_valid_at(&self, now_ms: i64) -> bool {
        self.not_before < now_ms && now_ms < self.not_after
    }
}

/// The index proper; see [`SharedIndex`] for how it is shared.
#[derive(Debug, Default)]
pub struct LookupIndex {
    by_threepid: HashMap<(Medium, String), Vec<IndexedBinding>>,
}

impl LookupIndex {
    /// Builds the index from every global row.
    pub fn from_rows(rows: Vec<GlobalRow>) -> Self {
        let mut index = Self::default();
        for row in rows {
            index.insert(row);
        }
        index
    }

    /// Adds a committed global row, replacing what the same origin said before about that 3PID.
    pub fn insert(&mut self, row: GlobalRow) {
        let Some(medium) = Medium::parse(&row.medium) else {
            return; // a medium this node does not serve; kept in SQLite only
        };
        let key = (medium, Threepid::lookup_key(medium, &row.address));
        let binding = IndexedBinding::from_row(row);
        let entries = self.by_threepid.entry(key).or_default();
        entries.retain(|b| {
            b.origin_server != binding.origin_server || b.origin_id > binding.origin_id
        });
        if !entries
            .iter()
            .any(|b| b.origin_server == binding.origin_server)
        {
            entries.push(binding);
        }
    }

    /// Removes `origin`'s bindings of a 3PID older than `before_origin_id` (committed tombstone).
    pub fn remove(&mut self, origin: &str, medium: Medium, address: &str, before_origin_id: i64) {
        let key = (medium, Threepid::lookup_key(medium, address));
        if let Some(entries) = self.by_threepid.get_mut(&key) {
            entries.retain(|b| &*b.origin_server != origin || b.origin_id >= before_origin_id);
            if entries.is_empty() {
                self.by_threepid.remove(&key);
            }
        }
    }

    /// The binding a lookup answers with: among the valid ones, the newest `ts` (ties: the
    /// highest origin id, then the origin name, so every node picks the same one).
    pub fn get(&self, medium: Medium, address: &str, now_ms: i64) -> Option<&IndexedBinding> {
        self.by_threepid
            .get(&(medium, Threepid::lookup_key(medium, address)))?
            .iter()
            .filter(|b| b.is_valid_at(now_ms))
            .max_by(|a, b| {
                (a.ts, a.origin_id, &a.origin_server).cmp(&(b.ts, b.origin_id, &b.origin_server))
            })
    }

    /// How many 3PIDs have at least one binding (valid or not).
    pub fn len(&self) -> usize {
        self.by_threepid.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_threepid.is_empty()
    }
}

/// The index shared between the store (the one writer) and the HTTP workers (readers).
///
/// A lock rather than an actor: lookups are the hot path and must not pay a message round
/// trip; writes hold the lock only for the in-memory update of an already committed batch.
#[derive(Debug, Clone, Default)]
pub struct SharedIndex(Arc<RwLock<LookupIndex>>);

impl SharedIndex {
    pub fn new(index: LookupIndex) -> Self {
        Self(Arc::new(RwLock::new(index)))
    }

    /// Runs `f` with read access.
    pub fn read<T>(&self, f: impl FnOnce(&LookupIndex) -> T) -> T {
        // A poisoned lock means a writer panicked mid-update; the data is still a valid map.
        let guard = self.0.read().unwrap_or_else(|e| e.into_inner());
        f(&guard)
    }

    /// Runs `f` with write access (the store only).
    pub(crate) fn write<T>(&self, f: impl FnOnce(&mut LookupIndex) -> T) -> T {
        let mut guard = self.0.write().unwrap_or_else(|e| e.into_inner());
        f(&mut guard)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(origin: &str, id: i64, address: &str, mxid: &str, ts: i64) -> GlobalRow {
        GlobalRow {
            medium: "email".into(),
            address: address.into(),
            mxid: mxid.into(),
            ts,
            not_before: ts,
            not_after: ts + 1000,
            origin_server: origin.into(),
            origin_id: id,
            sg_assoc: "{}".into(),
            lookup_hash: None,
        }
    }

    #[test]
    fn newest_wins_across_origins_and_rebinds_replace() {
        let mut index = LookupIndex::default();
        index.insert(row("a", 1, "x@y.z", "@old:a", 100));
        index.insert(row("b", 7, "x@y.z", "@b:b", 200));
        assert_eq!(
            &*index.get(Medium::Email, "X@Y.Z", 250).unwrap().mxid,
            "@b:b"
        );
        index.insert(row("a", 2, "x@y.z", "@new:a", 300));
        assert_eq!(
            &*index.get(Medium::Email, "x@y.z", 350).unwrap().mxid,
            "@new:a"
        );
        // a's old binding is gone, not just hidden
        index.remove("a", Medium::Email, "x@y.z", 3);
        assert_eq!(
            &*index.get(Medium::Email, "x@y.z", 350).unwrap().mxid,
            "@b:b"
        );
        // outside its validity window a binding is not served
        assert!(index.get(Medium::Email, "x@y.z", 5000).is_none());
    }
}
