//! The in-memory lookup index: every valid binding of the global table, keyed by 3PID, so
//! lookups are answered from memory without touching SQLite (reference/rust-stack.md §9: a
//! SQLite read per request caps lookups near 30 k/s on two cores).
//!
//! SQLite stays the source of truth. The association store is the only writer: it applies a
//! change here right after the transaction that made it commits, and before it answers the
//! request, so a client reads its own writes and never sees an uncommitted one.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use serde_json::{Map, Value};

use crate::db::GlobalRow;
use crate::types::{Medium, Threepid};

/// One origin's binding of a 3PID.
#[derive(Debug, Clone)]
pub struct IndexedBinding {
    /// Interned: one allocation per origin server, not per binding.
    pub origin_server: Arc<str>,
    pub origin_id: i64,
    /// The address as stored (normalised), which bulk_lookup answers with.
    pub address: Box<str>,
    pub mxid: Box<str>,
    pub ts: i64,
    pub not_before: i64,
    pub not_after: i64,
    signed: Signed,
}

/// The signed association. Almost always it is exactly the row's fields plus `signatures`,
/// so only the signatures are kept (a third of the size); anything else is kept whole.
#[derive(Debug, Clone)]
enum Signed {
    /// The `signatures` object, as JSON text.
    Signatures(Box<str>),
    /// The whole association as stored (extra fields, an unnormalised address…).
    Whole(Box<str>),
}

impl Signed {
    fn from_row(row: &GlobalRow) -> Self {
        let whole = || Self::Whole(row.sg_assoc.as_str().into());
        let Ok(object) = serde_json::from_str::<Map<String, Value>>(&row.sg_assoc) else {
            return whole();
        };
        let matches = object.len() == 7
            && object.get("medium").and_then(Value::as_str) == Some(row.medium.as_str())
            && object.get("address").and_then(Value::as_str) == Some(row.address.as_str())
            && object.get("mxid").and_then(Value::as_str) == Some(row.mxid.as_str())
            && object.get("ts").and_then(Value::as_i64) == Some(row.ts)
            && object.get("not_before").and_then(Value::as_i64) == Some(row.not_before)
            && object.get("not_after").and_then(Value::as_i64) == Some(row.not_after);
        match object.get("signatures") {
            Some(signatures @ Value::Object(_)) if matches => {
                Self::Signatures(signatures.to_string().into())
            }
            _ => whole(),
        }
    }
}

impl IndexedBinding {
    fn from_row(row: GlobalRow, origin: Arc<str>, signatures: Option<Box<str>>) -> Self {
        let signed = match signatures {
            Some(signatures) => Signed::Signatures(signatures),
            None => Signed::from_row(&row),
        };
        Self {
            origin_server: origin,
            origin_id: row.origin_id,
            address: row.address.into(),
            mxid: row.mxid.into(),
            ts: row.ts,
            not_before: row.not_before,
            not_after: row.not_after,
            signed,
        }
    }

    fn is_valid_at(&self, now_ms: i64) -> bool {
        // Inclusive start: a lookup in the same millisecond as the bind must see it.
        self.not_before <= now_ms && now_ms < self.not_after
    }

    /// The signed association as JSON text (keys sorted, as serde_json writes a map).
    pub fn signed_json(&self, medium: Medium) -> String {
        match &self.signed {
            Signed::Whole(text) => text.to_string(),
            Signed::Signatures(signatures) => {
                let quote = |s: &str| Value::String(s.to_owned()).to_string();
                format!(
                    "{{\"address\":{},\"medium\":{},\"mxid\":{},\"not_after\":{},\"not_before\":{},\"signatures\":{signatures},\"ts\":{}}}",
                    quote(&self.address),
                    quote(medium.as_str()),
                    quote(&self.mxid),
                    self.not_after,
                    self.not_before,
                    self.ts
                )
            }
        }
    }
}

/// Every binding by 3PID (medium + lookup key), one entry per origin.
#[derive(Debug, Default)]
pub struct LookupIndex {
    by_threepid: HashMap<(Medium, String), Vec<IndexedBinding>>,
    origins: HashSet<Arc<str>>,
}

impl LookupIndex {
    pub fn from_rows(rows: impl IntoIterator<Item = GlobalRow>) -> Self {
        let mut index = Self::default();
        for row in rows {
            index.insert(row);
        }
        index
    }

    fn intern(&mut self, origin: &str) -> Arc<str> {
        if let Some(known) = self.origins.get(origin) {
            return Arc::clone(known);
        }
        let origin: Arc<str> = origin.into();
        self.origins.insert(Arc::clone(&origin));
        origin
    }

    /// Adds a committed row; it replaces the same origin's older binding of that 3PID. A row
    /// older than the origin's current one is ignored.
    pub fn insert(&mut self, row: GlobalRow) {
        self.insert_with(row, None);
    }

    /// [`insert`](Self::insert) for a row whose `sg_assoc` is known to be its fields plus
    /// `signatures` (JSON text): a bind this node just signed. Skips re-parsing it.
    pub fn insert_signed(&mut self, row: GlobalRow, signatures: Box<str>) {
        self.insert_with(row, Some(signatures));
    }

    fn insert_with(&mut self, row: GlobalRow, signatures: Option<Box<str>>) {
        let Some(medium) = Medium::parse(&row.medium) else {
            return; // a medium this node does not serve; kept in SQLite only
        };
        let key = (medium, Threepid::lookup_key(medium, &row.address));
        let origin = self.intern(&row.origin_server);
        let binding = IndexedBinding::from_row(row, origin, signatures);
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
        entries.shrink_to_fit();
    }

    /// Removes `origin`'s bindings of a 3PID older than `before_origin_id` (its tombstone).
    pub fn remove(&mut self, origin: &str, medium: Medium, address: &str, before_origin_id: i64) {
        let key = (medium, Threepid::lookup_key(medium, address));
        if let Some(entries) = self.by_threepid.get_mut(&key) {
            entries.retain(|b| &*b.origin_server != origin || b.origin_id >= before_origin_id);
            if entries.is_empty() {
                self.by_threepid.remove(&key);
            }
        }
    }

    /// The binding lookups answer: the valid one with the newest `ts`.
    pub fn get(&self, medium: Medium, address: &str, now_ms: i64) -> Option<&IndexedBinding> {
        self.by_threepid
            .get(&(medium, Threepid::lookup_key(medium, address)))?
            .iter()
            .filter(|b| b.is_valid_at(now_ms))
            .max_by(|a, b| {
                (a.ts, a.origin_id, &a.origin_server).cmp(&(b.ts, b.origin_id, &b.origin_server))
            })
    }

    /// The newest `ts` among every origin's binding of a 3PID, valid or not.
    pub fn newest_ts(&self, medium: Medium, address: &str) -> Option<i64> {
        self.by_threepid
            .get(&(medium, Threepid::lookup_key(medium, address)))?
            .iter()
            .map(|b| b.ts)
            .max()
    }

    /// How many 3PIDs have at least one binding.
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
    fn signed_json_is_kept_compact_and_served_as_stored() {
        use crate::association::ThreepidAssociation;
        use crate::crypto::NodeSigningKey;
        let key = NodeSigningKey::generate();
        let assoc = ThreepidAssociation::binding("email", "a\"b@x.org", "@u:x.org", 1_000);
        let signed = Value::Object(assoc.signed("x.org", &key).unwrap());
        let mut r = row("x.org", 1, "a\"b@x.org", "@u:x.org", 1_000);
        r.not_after = assoc.not_after.unwrap();
        r.sg_assoc = signed.to_string();
        let mut index = LookupIndex::default();
        index.insert(r.clone());
        let binding = index.get(Medium::Email, "a\"b@x.org", 1_001).unwrap();
        assert!(matches!(binding.signed, Signed::Signatures(_)));
        assert_eq!(binding.signed_json(Medium::Email), signed.to_string());

        // Anything beyond the row's fields (Sydent leaked "invites" into some) is kept whole.
        let mut extra = signed.clone();
        extra["extra"] = serde_json::json!({"invites": []});
        r.origin_id = 2;
        r.sg_assoc = serde_json::to_string_pretty(&extra).unwrap();
        index.insert(r);
        let binding = index.get(Medium::Email, "a\"b@x.org", 1_001).unwrap();
        assert!(matches!(binding.signed, Signed::Whole(_)));
        assert_eq!(
            binding.signed_json(Medium::Email),
            serde_json::to_string_pretty(&extra).unwrap()
        );
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
