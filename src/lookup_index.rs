//! The in-memory lookup index: every binding of the global table, keyed by 3PID, so lookups
//! are answered from memory without touching SQLite (reference/rust-stack.md §9: a SQLite read
//! per request caps lookups near 30 k/s on two cores).
//!
//! SQLite stays the source of truth. The association store is the only writer: it applies a
//! change here right after the transaction that made it commits, and before it answers the
//! request, so a client reads its own writes and never sees an uncommitted one. After a start
//! the index is loaded in the background ([`SharedIndex::warming`]): the node serves at once,
//! its lookups reading SQLite until the index is ready.
//!
//! The layout is compact (about 150 bytes a binding; a million fit in ~150 MB): a binding is a
//! fixed-size [`Record`] in one vector, its 3PID key and Matrix ID are bytes in one text arena
//! (no allocation per string), a hash table of `u32` points at the first record of each 3PID,
//! and the records of one 3PID (one per origin server) form a chain. The signed association is
//! not kept as JSON: nearly every one is exactly the row's fields plus the origin's `ed25519:0`
//! signature (and, for a peer's binding, this node's countersignature, added when it was
//! received), so only those 64-byte signatures are kept and the JSON is written again on
//! lookup, byte for byte what was signed. Anything else is kept whole.
//!
//! The table is keyed by each 3PID's v2 lookup hash, `sha256("<address> <medium> <pepper>")`
//! (the pepper never changes for a database), so one table serves v1 lookups (which hash the
//! 3PID: ~0.1 µs with the CPU's SHA instructions) and v2 ones (which bring the hash). A v1
//! candidate is confirmed by comparing its 3PID, a v2 one by hashing its 3PID, about once per
//! lookup; growing the table hashes every 3PID again (~0.1 s at a million, once per doubling).
//! The table hash is the lookup hash through a per-process keyed hasher: the pepper is public,
//! and nobody should be able to pick 3PIDs that collide in the table.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, RwLock};

use hashbrown::HashTable;
use serde::Deserialize;

use crate::association::BINDING_LIFETIME_MS;
use crate::crypto::{decode_base64, encode_base64, lookup_hash_bytes};
use crate::db::GlobalRow;
use crate::types::{Medium, Threepid};

/// The end of a chain.
const NONE: u32 = u32::MAX;
/// The only key id kept compactly (Sydent's and ours).
const KEY_ID: &str = "ed25519:0";
/// The text arena is compacted when this much of it (and at least half) is dead.
const COMPACT_AFTER_BYTES: usize = 1 << 20;

/// One origin's binding of a 3PID.
#[derive(Debug)]
struct Record {
    origin_id: i64,
    ts: i64,
    /// The origin's `ed25519:0` signature (unused when [`Extra::whole`] is set).
    signature: [u8; 64],
    /// What few bindings have: a validity not derived from `ts`, a countersignature, JSON that
    /// is more than the row's fields.
    extra: Option<Box<Extra>>,
    /// Offset in the text arena of the 3PID key, followed by the Matrix ID.
    text: u32,
    /// The next record of the same 3PID, or [`NONE`]; in the free list, the next free record.
    next: u32,
    key_len: u16,
    mxid_len: u16,
    origin: u16,
    medium: Medium,
}

#[derive(Debug, Default)]
struct Extra {
    /// `Some` when not `ts`.
    not_before: Option<i64>,
    /// `Some` when not `ts` + 100 years.
    not_after: Option<i64>,
    /// This node's `ed25519:0` signature over a peer's association.
    countersignature: Option<[u8; 64]>,
    /// The association as stored, when it is not the row's fields plus the signatures above.
    whole: Option<Box<str>>,
}

/// How a binding entering the index is signed.
pub enum Signatures {
    /// Parse them from the row's `sgAssoc`.
    FromRow,
    /// A bind just made here: our own `ed25519:0` signature.
    Own([u8; 64]),
}

/// The signed association as stored, with the fields checked against the row.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredAssociation<'a> {
    #[serde(borrow)]
    medium: Cow<'a, str>,
    #[serde(borrow)]
    address: Cow<'a, str>,
    #[serde(borrow)]
    mxid: Cow<'a, str>,
    ts: i64,
    not_before: i64,
    not_after: i64,
    #[serde(borrow)]
    signatures: BTreeMap<Cow<'a, str>, BTreeMap<Cow<'a, str>, Cow<'a, str>>>,
}

/// Every binding by 3PID (medium + lookup key), one per origin.
#[derive(Debug)]
pub struct LookupIndex {
    /// This node's server name: its signature on a peer's association is a countersignature.
    own_name: Arc<str>,
    /// Each 3PID's first record, by the 3PID's lookup hash.
    heads: HashTable<u32>,
    /// The node's lookup pepper (fixed for the life of its database).
    pepper: Arc<str>,
    records: Vec<Record>,
    free: u32,
    text: Vec<u8>,
    dead_text: usize,
    origins: Vec<Arc<str>>,
    origin_numbers: HashMap<Arc<str>, u16>,
    /// Keys the table hash: the pepper is public, so anyone who can bind 3PIDs could
    /// otherwise choose ones whose hashes collide in the table.
    hasher: RandomState,
    threepids: usize,
    /// Bindings held, and how many of them this node made (the metrics' gauges).
    bindings: usize,
    local_bindings: usize,
}

impl LookupIndex {
    /// An empty index for a node named `own_name` with lookup pepper `pepper`, with room for
    /// `capacity` bindings.
    pub fn new(own_name: &str, pepper: &str, capacity: usize) -> Self {
        Self {
            own_name: own_name.into(),
            heads: HashTable::with_capacity(capacity),
            pepper: pepper.into(),
            records: Vec::with_capacity(capacity),
            free: NONE,
            text: Vec::with_capacity(capacity * 48),
            dead_text: 0,
            origins: Vec::new(),
            origin_numbers: HashMap::new(),
            hasher: RandomState::new(),
            threepids: 0,
            bindings: 0,
            local_bindings: 0,
        }
    }

    /// Every binding of the global table, read through `conn`.
    pub fn load(
        conn: &mut diesel::SqliteConnection,
        own_name: &str,
        pepper: &str,
    ) -> diesel::QueryResult<Self> {
        let expected = crate::db::queries::count_global(conn)?;
        let mut index = Self::new(own_name, pepper, expected);
        crate::db::queries::for_each_global(conn, |row| index.insert(row, Signatures::FromRow))?;
        index.shrink_to_fit();
        Ok(index)
    }

    /// Gives back what loading reserved but did not use.
    pub fn shrink_to_fit(&mut self) {
        self.records.shrink_to_fit();
        self.text.shrink_to_fit();
        let (records, text, pepper, hasher) =
            (&self.records, &self.text, &self.pepper, &self.hasher);
        self.heads
            .shrink_to_fit(|&i| record_hash(hasher, pepper, &records[i as usize], text));
    }

    /// The lookup hash of a 3PID (medium and lookup key).
    fn digest(&self, medium: Medium, key: &str) -> [u8; 32] {
        lookup_hash_bytes(key, medium.as_str(), &self.pepper)
    }

    /// The first record of the 3PID whose lookup hash is `digest`.
    fn hashed_head(&self, digest: &[u8; 32]) -> Option<u32> {
        self.heads
            .find(table_hash(&self.hasher, digest), |&i| {
                let record = &self.records[i as usize];
                self.digest(record.medium, self.key_of(record)) == *digest
            })
            .copied()
    }

    fn origin_number(&mut self, origin: &str) -> u16 {
        if let Some(n) = self.origin_numbers.get(origin) {
            return *n;
        }
        // 65,535 origin servers: far beyond any mesh; the last number is shared past that.
        let n = u16::try_from(self.origins.len()).unwrap_or(u16::MAX);
        let name: Arc<str> = origin.into();
        if n < u16::MAX {
            self.origins.push(Arc::clone(&name));
        }
        self.origin_numbers.insert(name, n);
        n
    }

    fn key_of(&self, record: &Record) -> &str {
        let start = record.text as usize;
        text_str(&self.text[start..start + record.key_len as usize])
    }

    fn mxid_of(&self, record: &Record) -> &str {
        let start = record.text as usize + record.key_len as usize;
        text_str(&self.text[start..start + record.mxid_len as usize])
    }

    fn head(&self, medium: Medium, key: &str) -> Option<u32> {
        self.head_by(medium, key, &self.digest(medium, key))
    }

    /// [`Self::head`] when the 3PID's lookup hash is known already.
    fn head_by(&self, medium: Medium, key: &str, digest: &[u8; 32]) -> Option<u32> {
        self.heads
            .find(table_hash(&self.hasher, digest), |&i| {
                let record = &self.records[i as usize];
                record.medium == medium && self.key_of(record) == key
            })
            .copied()
    }

    /// The records of a 3PID, first to last.
    fn chain(&self, first: Option<u32>) -> impl Iterator<Item = &Record> {
        let mut at = first.unwrap_or(NONE);
        std::iter::from_fn(move || {
            let record = self.records.get(at as usize)?;
            at = record.next;
            Some(record)
        })
    }

    /// Adds a committed row (see [`Signatures`]); it replaces the same origin's older binding
    /// of that 3PID. A row older than the origin's current one is ignored.
    pub fn insert(&mut self, row: GlobalRow, signatures: Signatures) {
        let Some(medium) = Medium::parse(&row.medium) else {
            return; // a medium this node does not serve; kept in SQLite only
        };
        let key = Threepid::lookup_key(medium, &row.address);
        let origin = self.origin_number(&row.origin_server);
        let digest = self.digest(medium, &key);
        let head = self.head_by(medium, &key, &digest);
        // The origin's current binding of this 3PID, if any.
        let mut previous = NONE;
        let mut at = head.unwrap_or(NONE);
        while let Some(record) = self.records.get(at as usize) {
            if record.origin == origin {
                if record.origin_id > row.origin_id {
                    return;
                }
                break;
            }
            previous = at;
            at = record.next;
        }
        let (signature, extra) = self.signed_parts(&row, &key, signatures);
        let text = self.push_text(&key, &row.mxid);
        let record = Record {
            origin_id: row.origin_id,
            ts: row.ts,
            signature,
            extra,
            text,
            next: NONE,
            key_len: key.len().min(u16::MAX as usize) as u16,
            mxid_len: row.mxid.len().min(u16::MAX as usize) as u16,
            origin,
            medium,
        };
        if let Some(old) = self.records.get_mut(at as usize) {
            // Replace the origin's older binding in place, keeping its place in the chain.
            let next = old.next;
            let dead = old.key_len as usize + old.mxid_len as usize;
            *old = Record { next, ..record };
            self.dead_text += dead;
            self.maybe_compact();
            return;
        }
        let index = self.alloc(record);
        match (head, previous) {
            (None, _) => {
                let (records, text, pepper, hasher) =
                    (&self.records, &self.text, &self.pepper, &self.hasher);
                self.heads
                    .insert_unique(table_hash(hasher, &digest), index, |&i| {
                        record_hash(hasher, pepper, &records[i as usize], text)
                    });
                self.threepids += 1;
            }
            (Some(_), previous) => self.records[previous as usize].next = index,
        }
    }

    /// Applies `origin`'s tombstone of a 3PID (its id `before_origin_id`, its `ts`
    /// `before_ts`): removes `origin`'s bindings of the 3PID older than the tombstone and
    /// every other origin's binding of it with an older `ts`, as the store removes them from
    /// the global table (`queries::delete_global_before_tombstone`).
    pub fn remove(
        &mut self,
        origin: &str,
        medium: Medium,
        address: &str,
        before_origin_id: i64,
        before_ts: i64,
    ) {
        let origin = self.origin_numbers.get(origin).copied();
        let key = Threepid::lookup_key(medium, address);
        let Some(head) = self.head(medium, &key) else {
            return;
        };
        let mut previous = NONE;
        let mut at = head;
        while let Some(record) = self.records.get(at as usize) {
            let next = record.next;
            let superseded = if Some(record.origin) == origin {
                record.origin_id < before_origin_id
            } else {
                record.ts < before_ts
            };
            if superseded {
                if previous == NONE {
                    self.replace_head(medium, &key, at, next);
                } else {
                    self.records[previous as usize].next = next;
                }
                self.release(at);
            } else {
                previous = at;
            }
            at = next;
        }
        self.maybe_compact();
    }

    /// Points the 3PID's table entry at `next` (its chain lost its first record `first`), or
    /// drops the entry when the chain is now empty.
    fn replace_head(&mut self, medium: Medium, key: &str, first: u32, next: u32) {
        let hash = table_hash(&self.hasher, &self.digest(medium, key));
        if let Ok(entry) = self.heads.find_entry(hash, |&i| i == first) {
            if next == NONE {
                entry.remove();
                self.threepids -= 1;
            } else {
                *entry.into_mut() = next;
            }
        }
    }

    fn is_own(&self, origin: u16) -> bool {
        self.origins
            .get(origin as usize)
            .is_some_and(|name| **name == *self.own_name)
    }

    fn alloc(&mut self, record: Record) -> u32 {
        self.bindings += 1;
        self.local_bindings += usize::from(self.is_own(record.origin));
        if let Some(slot) = self.records.get_mut(self.free as usize) {
            let index = self.free;
            self.free = slot.next;
            *slot = record;
            return index;
        }
        self.records.push(record);
        u32::try_from(self.records.len() - 1).expect("fewer than 4 billion bindings")
    }

    fn release(&mut self, index: u32) {
        self.bindings -= 1;
        self.local_bindings -= usize::from(self.is_own(self.records[index as usize].origin));
        let free = self.free;
        let record = &mut self.records[index as usize];
        self.dead_text += record.key_len as usize + record.mxid_len as usize;
        record.extra = None;
        record.next = free;
        record.key_len = 0;
        record.mxid_len = 0;
        self.free = index;
    }

    fn push_text(&mut self, key: &str, mxid: &str) -> u32 {
        let at = u32::try_from(self.text.len()).expect("text arena under 4 GiB");
        self.text
            .extend_from_slice(&key.as_bytes()[..key.len().min(u16::MAX as usize)]);
        self.text
            .extend_from_slice(&mxid.as_bytes()[..mxid.len().min(u16::MAX as usize)]);
        at
    }

    /// Rewrites the text arena with only the live records' text once most of it is dead
    /// (rebinds and unbinds leave their old text behind).
    fn maybe_compact(&mut self) {
        if self.dead_text < COMPACT_AFTER_BYTES || self.dead_text * 2 < self.text.len() {
            return;
        }
        let mut text = Vec::with_capacity(self.text.len() - self.dead_text);
        // Free records hold no text (their lengths are 0).
        for record in &mut self.records {
            let start = record.text as usize;
            let len = record.key_len as usize + record.mxid_len as usize;
            record.text = u32::try_from(text.len()).expect("text arena under 4 GiB");
            text.extend_from_slice(&self.text[start..start + len]);
        }
        self.text = text;
        self.dead_text = 0;
    }

    /// The signature and extras of a row entering the index.
    fn signed_parts(
        &self,
        row: &GlobalRow,
        key: &str,
        signatures: Signatures,
    ) -> ([u8; 64], Option<Box<Extra>>) {
        let mut extra = Extra {
            not_before: (row.not_before != row.ts).then_some(row.not_before),
            not_after: (row.not_after != row.ts.saturating_add(BINDING_LIFETIME_MS))
                .then_some(row.not_after),
            ..Extra::default()
        };
        let signature = match signatures {
            Signatures::Own(signature) => Some(signature),
            Signatures::FromRow => self.parse_signatures(row, key, &mut extra),
        };
        let signature = signature.unwrap_or_else(|| {
            extra.whole = Some(row.sg_assoc.as_str().into());
            [0; 64]
        });
        let any = extra.not_before.is_some()
            || extra.not_after.is_some()
            || extra.countersignature.is_some()
            || extra.whole.is_some();
        (signature, any.then(|| Box::new(extra)))
    }

    /// The origin's signature when the stored association is exactly the row's fields plus
    /// `ed25519:0` signatures by the origin (and by this node); `None` to keep it whole.
    fn parse_signatures(&self, row: &GlobalRow, key: &str, extra: &mut Extra) -> Option<[u8; 64]> {
        let stored: StoredAssociation = serde_json::from_str(&row.sg_assoc).ok()?;
        let exact = stored.medium == row.medium
            && stored.address == key
            && stored.mxid == row.mxid
            && stored.ts == row.ts
            && stored.not_before == row.not_before
            && stored.not_after == row.not_after;
        if !exact {
            return None;
        }
        let one = |server: &str| -> Option<Option<[u8; 64]>> {
            let Some(keys) = stored.signatures.get(server) else {
                return Some(None);
            };
            let [(key_id, signature)] = keys.iter().collect::<Vec<_>>()[..] else {
                return None;
            };
            if key_id != KEY_ID {
                return None;
            }
            let bytes: [u8; 64] = decode_base64(signature)?.try_into().ok()?;
            // Written again on lookup: only what encodes back to the same text.
            (encode_base64(bytes) == *signature).then_some(Some(bytes))
        };
        let origin = one(&row.origin_server)??;
        if row.origin_server != *self.own_name {
            extra.countersignature = one(&self.own_name)?;
        }
        let expected = 1 + usize::from(extra.countersignature.is_some());
        (stored.signatures.len() == expected).then_some(origin)
    }

    /// The binding lookups answer: the valid one with the newest `ts`.
    pub fn get(&self, medium: Medium, address: &str, now_ms: i64) -> Option<Found<'_>> {
        let key = Threepid::lookup_key(medium, address);
        self.best(self.head(medium, &key), now_ms)
    }

    /// [`Self::get`] by the 3PID's lookup hash (a v2 `sha256` lookup).
    pub fn get_hashed(&self, digest: &[u8; 32], now_ms: i64) -> Option<Found<'_>> {
        self.best(self.hashed_head(digest), now_ms)
    }

    /// The valid binding with the newest `ts` in the chain starting at `head` (then the
    /// highest origin id and origin name, so every node picks the same one).
    fn best(&self, head: Option<u32>, now_ms: i64) -> Option<Found<'_>> {
        self.chain(head)
            .filter(|r| {
                // Inclusive start: a lookup in the same millisecond as the bind must see it.
                let extra = r.extra.as_deref();
                let not_before = extra.and_then(|e| e.not_before).unwrap_or(r.ts);
                let not_after = extra
                    .and_then(|e| e.not_after)
                    .unwrap_or(r.ts.saturating_add(BINDING_LIFETIME_MS));
                not_before <= now_ms && now_ms < not_after
            })
            .max_by(|a, b| {
                (a.ts, a.origin_id, &self.origins[a.origin as usize]).cmp(&(
                    b.ts,
                    b.origin_id,
                    &self.origins[b.origin as usize],
                ))
            })
            .map(|record| Found {
                index: self,
                record,
            })
    }

    /// The newest `ts` among every origin's binding of a 3PID, valid or not.
    pub fn newest_ts(&self, medium: Medium, address: &str) -> Option<i64> {
        let key = Threepid::lookup_key(medium, address);
        self.chain(self.head(medium, &key)).map(|r| r.ts).max()
    }

    /// The bindings held: (made by this node, received from peers).
    pub fn binding_counts(&self) -> (usize, usize) {
        (self.local_bindings, self.bindings - self.local_bindings)
    }

    /// How many 3PIDs have at least one binding.
    pub fn len(&self) -> usize {
        self.threepids
    }

    pub fn is_empty(&self) -> bool {
        self.threepids == 0
    }
}

/// The table hash of a 3PID: 16 bytes of its lookup hash, through the index's keyed hasher.
fn table_hash(hasher: &RandomState, digest: &[u8; 32]) -> u64 {
    hasher.hash_one(&digest[..16])
}

/// The table hash of a record's 3PID (growing the table).
fn record_hash(hasher: &RandomState, pepper: &str, record: &Record, text: &[u8]) -> u64 {
    let start = record.text as usize;
    let key = text_str(&text[start..start + record.key_len as usize]);
    table_hash(
        hasher,
        &lookup_hash_bytes(key, record.medium.as_str(), pepper),
    )
}

/// Text the arena holds: always whole strings, cut only at `u16::MAX` bytes.
fn text_str(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).unwrap_or_else(|e| {
        // A string cut at 65,535 bytes mid-character: keep the valid part.
        std::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or_default()
    })
}

/// A binding found by a lookup.
pub struct Found<'a> {
    index: &'a LookupIndex,
    record: &'a Record,
}

impl Found<'_> {
    pub fn origin_server(&self) -> &str {
        &self.index.origins[self.record.origin as usize]
    }

    /// The 3PID as this node normalises it (bulk_lookup answers with it).
    pub fn address(&self) -> &str {
        self.index.key_of(self.record)
    }

    pub fn mxid(&self) -> &str {
        self.index.mxid_of(self.record)
    }

    /// Whether the association lacks this node's signature (a peer's binding received before
    /// receivers countersigned, e.g. from a Sydent database): the caller adds it.
    pub fn needs_countersignature(&self) -> bool {
        let extra = self.record.extra.as_deref();
        self.origin_server() != &*self.index.own_name
            && extra.is_none_or(|e| e.countersignature.is_none())
    }

    /// The signed association as JSON text (keys sorted, as the origin's signature covers
    /// them; the whole stored text when it is kept whole).
    pub fn signed_json(&self) -> String {
        let record = self.record;
        let extra = record.extra.as_deref();
        if let Some(whole) = extra.and_then(|e| e.whole.as_deref()) {
            return whole.to_owned();
        }
        let quote = |s: &str| serde_json::to_string(s).unwrap_or_default();
        let origin = self.origin_server();
        let mut signatures = vec![(origin, &record.signature)];
        if let Some(counter) = extra.and_then(|e| e.countersignature.as_ref()) {
            signatures.push((&self.index.own_name, counter));
        }
        signatures.sort_by_key(|(server, _)| *server);
        let signatures: Vec<String> = signatures
            .into_iter()
            .map(|(server, signature)| {
                format!(
                    "{}:{{\"{KEY_ID}\":\"{}\"}}",
                    quote(server),
                    encode_base64(signature)
                )
            })
            .collect();
        let not_before = extra.and_then(|e| e.not_before).unwrap_or(record.ts);
        let not_after = extra
            .and_then(|e| e.not_after)
            .unwrap_or(record.ts.saturating_add(BINDING_LIFETIME_MS));
        format!(
            "{{\"address\":{},\"medium\":{},\"mxid\":{},\"not_after\":{not_after},\"not_before\":{not_before},\"signatures\":{{{}}},\"ts\":{}}}",
            quote(self.address()),
            quote(record.medium.as_str()),
            quote(self.mxid()),
            signatures.join(","),
            record.ts
        )
    }
}

/// A committed change, as the store hands it to the index.
pub enum Change {
    Insert(GlobalRow, Signatures),
    /// A tombstone: `origin`'s bindings of the 3PID older than `before_origin_id` go, and
    /// every other origin's with a `ts` older than `before_ts` (see [`LookupIndex::remove`]).
    Remove {
        origin: String,
        medium: Medium,
        address: String,
        before_origin_id: i64,
        before_ts: i64,
    },
}

impl LookupIndex {
    fn apply(&mut self, change: Change) {
        match change {
            Change::Insert(row, signatures) => self.insert(row, signatures),
            Change::Remove {
                origin,
                medium,
                address,
                before_origin_id,
                before_ts,
            } => self.remove(&origin, medium, &address, before_origin_id, before_ts),
        }
    }
}

// One per node, read on every lookup: not boxed, which would add a pointer chase to each.
#[allow(clippy::large_enum_variant)]
enum State {
    /// Being loaded from a snapshot taken before the store's first write; what the store
    /// commits meanwhile waits here and is applied on top of the snapshot.
    Warming {
        pending: Vec<Change>,
        source: Arc<WarmUpReads>,
    },
    Ready(LookupIndex),
}

/// Why a lookup could not be answered while the index warms up.
#[derive(Debug, thiserror::Error)]
pub enum WarmUpError {
    #[error(transparent)]
    Db(crate::db::OpenError),
    #[error("warm-up read thread: {0}")]
    Thread(String),
}

/// How lookups are answered while the index warms up: from SQLite, through a few read
/// connections of their own (WAL: they never wait for the store).
pub struct WarmUpReads {
    db_file: String,
    own_name: Arc<str>,
    pepper: Arc<str>,
    /// Idle connections. A mutex, not an actor: it is held only to take or put back one
    /// connection, never across a query, and only during the seconds of a warm-up.
    idle: std::sync::Mutex<Vec<diesel::SqliteConnection>>,
}

impl WarmUpReads {
    /// An index of just these 3PIDs' rows, read from the database now.
    fn read(&self, threepids: &[(Medium, String)]) -> Result<LookupIndex, crate::db::OpenError> {
        self.index_of(|conn| {
            let mut rows = Vec::new();
            for (medium, address) in threepids {
                let key = Threepid::lookup_key(*medium, address);
                rows.extend(crate::db::queries::global_for(conn, medium.as_str(), &key)?);
            }
            Ok(rows)
        })
    }

    /// An index of the rows whose stored `lookup_hash` is one of `digests`.
    fn read_hashed(&self, digests: &[[u8; 32]]) -> Result<LookupIndex, crate::db::OpenError> {
        let hashes: Vec<String> = digests
            .iter()
            .map(crate::crypto::encode_base64_urlsafe)
            .collect();
        self.index_of(|conn| crate::db::queries::global_by_lookup_hash(conn, &hashes))
    }

    /// An index of the rows `query` reads, on one of the idle connections (or a new one).
    fn index_of(
        &self,
        query: impl FnOnce(&mut diesel::SqliteConnection) -> diesel::QueryResult<Vec<GlobalRow>>,
    ) -> Result<LookupIndex, crate::db::OpenError> {
        let taken = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut conn = crate::db::kept_or_connect(taken, &self.db_file)?;
        let rows = query(&mut conn).map_err(|source| crate::db::OpenError::Query {
            path: self.db_file.clone(),
            source,
        })?;
        let mut index = LookupIndex::new(&self.own_name, &self.pepper, rows.len());
        for row in rows {
            index.insert(row, Signatures::FromRow);
        }
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(conn);
        Ok(index)
    }
}

/// The index shared between the store (the one writer) and the HTTP workers (readers).
///
/// A lock rather than an actor: lookups are the hot path and must not pay a message round
/// trip; writes hold the lock only for the in-memory update of an already committed batch.
/// While the index warms up after a start, readers are told it is not there ([`Self::read`]
/// answers `None`) and read SQLite instead.
#[derive(Clone)]
pub struct SharedIndex(Arc<RwLock<State>>);

impl std::fmt::Debug for SharedIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_ready() {
            "SharedIndex(ready)"
        } else {
            "SharedIndex(warming)"
        })
    }
}

impl SharedIndex {
    /// An index that is ready to serve.
    pub fn new(index: LookupIndex) -> Self {
        Self(Arc::new(RwLock::new(State::Ready(index))))
    }

    /// An index whose loader has taken its snapshot of `db_file` and is still reading it.
    pub fn warming(db_file: &str, own_name: &str, pepper: &str) -> Self {
        let source = Arc::new(WarmUpReads {
            db_file: db_file.into(),
            own_name: own_name.into(),
            pepper: pepper.into(),
            idle: std::sync::Mutex::new(Vec::new()),
        });
        Self(Arc::new(RwLock::new(State::Warming {
            pending: Vec::new(),
            source,
        })))
    }

    /// Loads the index from `snapshot` on a thread of its own, then serves from it; `delay`
    /// holds the finished index back (a test-only hook, to observe the warm-up).
    pub fn load_in_background(
        &self,
        mut snapshot: crate::db::Snapshot,
        delay: std::time::Duration,
    ) -> std::io::Result<()> {
        let shared = self.clone();
        let (own_name, pepper) = match &*self.0.read().unwrap_or_else(|e| e.into_inner()) {
            State::Warming { source, .. } => {
                (Arc::clone(&source.own_name), Arc::clone(&source.pepper))
            }
            State::Ready(_) => return Ok(()),
        };
        std::thread::Builder::new()
            .name("index-load".into())
            .spawn(move || {
                let started = std::time::Instant::now();
                match LookupIndex::load(snapshot.conn(), &own_name, &pepper) {
                    Ok(index) => {
                        drop(snapshot);
                        std::thread::sleep(delay);
                        let count = index.len();
                        shared.finish_warming(index);
                        log::info!(
                            "lookup index ready: {count} 3PIDs loaded in {} ms",
                            started.elapsed().as_millis()
                        );
                    }
                    // Lookups keep reading SQLite: slower, still right.
                    Err(e) => {
                        log::error!("cannot load the lookup index: {e}; lookups read the database")
                    }
                }
            })
            .map(|_| ())
    }

    /// The loaded snapshot: the changes committed since it was taken are applied to it, and
    /// the index serves from now on.
    pub fn finish_warming(&self, mut loaded: LookupIndex) {
        let mut guard = self.0.write().unwrap_or_else(|e| e.into_inner());
        if let State::Warming { pending, .. } = &mut *guard {
            for change in pending.drain(..) {
                loaded.apply(change);
            }
            loaded.shrink_to_fit();
            *guard = State::Ready(loaded);
        }
    }

    pub fn is_ready(&self) -> bool {
        matches!(
            *self.0.read().unwrap_or_else(|e| e.into_inner()),
            State::Ready(_)
        )
    }

    /// Runs `f` with read access; `None` while the index warms up.
    pub fn read<T>(&self, f: impl FnOnce(&LookupIndex) -> T) -> Option<T> {
        // A poisoned lock means a writer panicked mid-update; the data is still a valid map.
        match &*self.0.read().unwrap_or_else(|e| e.into_inner()) {
            State::Ready(index) => Some(f(index)),
            State::Warming { .. } => None,
        }
    }

    /// Runs `f` on the index and `threepids`; while the index warms up, on an index of just the
    /// rows of `threepids`, read from SQLite on a blocking thread (the answers are the same:
    /// SQLite is the truth).
    pub async fn lookup<T: Send + 'static>(
        &self,
        threepids: Vec<(Medium, String)>,
        f: impl Fn(&LookupIndex, &[(Medium, String)]) -> T + Send + 'static,
    ) -> Result<T, WarmUpError> {
        let source = match &*self.0.read().unwrap_or_else(|e| e.into_inner()) {
            State::Ready(index) => return Ok(f(index, &threepids)),
            State::Warming { source, .. } => Arc::clone(source),
        };
        actix_web::rt::task::spawn_blocking(move || {
            source.read(&threepids).map(|i| f(&i, &threepids))
        })
        .await
        .map_err(|e| WarmUpError::Thread(e.to_string()))?
        .map_err(WarmUpError::Db)
    }

    /// [`Self::lookup`] by lookup hashes (v2 `sha256` lookups); while the index warms up, on
    /// an index of the rows whose stored `lookup_hash` matches.
    pub async fn lookup_hashed<T: Send + 'static>(
        &self,
        digests: Vec<[u8; 32]>,
        f: impl Fn(&LookupIndex, &[[u8; 32]]) -> T + Send + 'static,
    ) -> Result<T, WarmUpError> {
        let source = match &*self.0.read().unwrap_or_else(|e| e.into_inner()) {
            State::Ready(index) => return Ok(f(index, &digests)),
            State::Warming { source, .. } => Arc::clone(source),
        };
        actix_web::rt::task::spawn_blocking(move || {
            source.read_hashed(&digests).map(|i| f(&i, &digests))
        })
        .await
        .map_err(|e| WarmUpError::Thread(e.to_string()))?
        .map_err(WarmUpError::Db)
    }

    /// Applies committed changes (the store only).
    pub(crate) fn apply(&self, changes: Vec<Change>) {
        if changes.is_empty() {
            return;
        }
        match &mut *self.0.write().unwrap_or_else(|e| e.into_inner()) {
            State::Ready(index) => changes.into_iter().for_each(|c| index.apply(c)),
            State::Warming { pending, .. } => pending.extend(changes),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;
    use crate::association::ThreepidAssociation;
    use crate::crypto::{sign_json, NodeSigningKey};

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

    fn signed_row(origin: &str, key: &NodeSigningKey, id: i64, address: &str) -> GlobalRow {
        let assoc = ThreepidAssociation::binding("email", address, "@u:x.org", 1_000);
        let signed = Value::Object(assoc.signed(origin, key).unwrap());
        GlobalRow {
            not_after: assoc.not_after.unwrap(),
            sg_assoc: signed.to_string(),
            ..row(origin, id, address, "@u:x.org", 1_000)
        }
    }

    #[test]
    fn bindings_are_counted_by_origin() {
        let mut index = LookupIndex::new("me.test", "pepper", 4);
        index.insert(
            row("me.test", 1, "a@x.org", "@a:x.org", 10),
            Signatures::FromRow,
        );
        index.insert(
            row("peer.test", 1, "a@x.org", "@b:x.org", 11),
            Signatures::FromRow,
        );
        index.insert(
            row("peer.test", 2, "c@x.org", "@c:x.org", 12),
            Signatures::FromRow,
        );
        assert_eq!(index.binding_counts(), (1, 2));
        // A newer binding of the same origin replaces its older one: no new binding.
        index.insert(
            row("me.test", 3, "a@x.org", "@d:x.org", 13),
            Signatures::FromRow,
        );
        assert_eq!(index.binding_counts(), (1, 2));
        // A tombstone newer than every binding of a@x.org removes both.
        index.remove("me.test", Medium::Email, "a@x.org", 4, 14);
        assert_eq!(index.binding_counts(), (0, 1));
    }

    #[test]
    fn a_record_stays_small() {
        assert!(
            std::mem::size_of::<Record>() <= 104,
            "{}",
            std::mem::size_of::<Record>()
        );
    }

    #[test]
    fn signed_json_is_kept_compact_and_served_as_signed() {
        let key = NodeSigningKey::generate();
        let r = signed_row("x.org", &key, 1, "a\"b@x.org");
        let mut index = LookupIndex::new("x.org", "pepper", 0);
        index.insert(r.clone(), Signatures::FromRow);
        let found = index.get(Medium::Email, "a\"b@x.org", 1_001).unwrap();
        assert!(found.record.extra.is_none(), "{:?}", found.record.extra);
        assert_eq!(found.signed_json(), r.sg_assoc);
        assert!(!found.needs_countersignature());

        // Anything beyond the row's fields (Sydent leaked "invites" into some) is kept whole,
        // and so is JSON written with other spacing.
        let mut extra: Value = serde_json::from_str(&r.sg_assoc).unwrap();
        extra["extra"] = serde_json::json!({"invites": []});
        let pretty = serde_json::to_string_pretty(&extra).unwrap();
        index.insert(
            GlobalRow {
                origin_id: 2,
                sg_assoc: pretty.clone(),
                ..r
            },
            Signatures::FromRow,
        );
        let found = index.get(Medium::Email, "a\"b@x.org", 1_001).unwrap();
        assert_eq!(found.signed_json(), pretty);
    }

    #[test]
    fn a_peers_binding_keeps_both_signatures() {
        let (peer, ours) = (NodeSigningKey::generate(), NodeSigningKey::generate());
        let mut r = signed_row("a.peer", &peer, 7, "p@x.org");
        let mut index = LookupIndex::new("z.node", "pepper", 0);
        // Before receivers countersigned: the lookup adds ours.
        index.insert(r.clone(), Signatures::FromRow);
        let found = index.get(Medium::Email, "p@x.org", 1_001).unwrap();
        assert!(found.needs_countersignature());
        assert_eq!(found.signed_json(), r.sg_assoc);
        // Countersigned when received: both kept, served in key order.
        let mut object: serde_json::Map<String, Value> = serde_json::from_str(&r.sg_assoc).unwrap();
        sign_json(&mut object, "z.node", &ours).unwrap();
        r.sg_assoc = Value::Object(object).to_string();
        r.origin_id = 8;
        index.insert(r.clone(), Signatures::FromRow);
        let found = index.get(Medium::Email, "p@x.org", 1_001).unwrap();
        assert!(!found.needs_countersignature());
        assert_eq!(found.signed_json(), r.sg_assoc);
        assert_eq!(found.origin_server(), "a.peer");
    }

    #[test]
    fn hashed_lookups_follow_inserts_head_changes_and_removals() {
        let digest = |address: &str| crate::crypto::lookup_hash_bytes(address, "email", "pepper");
        let mut index = LookupIndex::new("me", "pepper", 0);
        index.insert(row("a", 1, "x@y.z", "@a:a", 100), Signatures::FromRow);
        index.insert(row("b", 1, "x@y.z", "@b:b", 200), Signatures::FromRow);
        index.insert(row("a", 2, "other@y.z", "@o:a", 100), Signatures::FromRow);
        // The newest binding wins, as for v1.
        assert_eq!(
            index.get_hashed(&digest("x@y.z"), 300).unwrap().mxid(),
            "@b:b"
        );
        assert_eq!(
            index.get_hashed(&digest("other@y.z"), 300).unwrap().mxid(),
            "@o:a"
        );
        assert!(index.get_hashed(&digest("nobody@y.z"), 300).is_none());
        // Another pepper, another hash.
        let foreign = crate::crypto::lookup_hash_bytes("x@y.z", "email", "other pepper");
        assert!(index.get_hashed(&foreign, 300).is_none());
        // The chain's first record goes (a's tombstone, older than b's binding): the hash now
        // leads to b's.
        index.remove("a", Medium::Email, "x@y.z", 5, 150);
        assert_eq!(
            index.get_hashed(&digest("x@y.z"), 300).unwrap().mxid(),
            "@b:b"
        );
        index.remove("b", Medium::Email, "x@y.z", 5, 250);
        assert!(index.get_hashed(&digest("x@y.z"), 300).is_none());
        // Through a growth of the table (no hash is computed again for it).
        for i in 0..2_000 {
            index.insert(
                row("a", 10 + i, &format!("n{i}@y.z"), "@n:a", 100),
                Signatures::FromRow,
            );
        }
        index.shrink_to_fit();
        assert_eq!(
            index.get_hashed(&digest("n1999@y.z"), 300).unwrap().mxid(),
            "@n:a"
        );
        assert_eq!(
            index.get_hashed(&digest("other@y.z"), 300).unwrap().mxid(),
            "@o:a"
        );
    }

    #[test]
    fn newest_wins_across_origins_and_rebinds_replace() {
        let mut index = LookupIndex::new("me", "pepper", 0);
        index.insert(row("a", 1, "x@y.z", "@old:a", 100), Signatures::FromRow);
        index.insert(row("b", 7, "x@y.z", "@b:b", 200), Signatures::FromRow);
        assert_eq!(
            index.get(Medium::Email, "X@Y.Z", 250).unwrap().mxid(),
            "@b:b"
        );
        index.insert(row("a", 2, "x@y.z", "@new:a", 300), Signatures::FromRow);
        assert_eq!(
            index.get(Medium::Email, "x@y.z", 350).unwrap().mxid(),
            "@new:a"
        );
        // An older row of an origin does not replace its newer one.
        index.insert(row("a", 1, "x@y.z", "@old:a", 100), Signatures::FromRow);
        assert_eq!(
            index.get(Medium::Email, "x@y.z", 350).unwrap().mxid(),
            "@new:a"
        );
        assert_eq!(index.newest_ts(Medium::Email, "x@y.z"), Some(300));
        // a's binding is gone, not just hidden (a tombstone whose ts, from a's clock, is
        // older than b's binding: b's stays)
        index.remove("a", Medium::Email, "x@y.z", 3, 150);
        assert_eq!(
            index.get(Medium::Email, "x@y.z", 350).unwrap().mxid(),
            "@b:b"
        );
        // outside its validity window a binding is not served
        assert!(index.get(Medium::Email, "x@y.z", 5000).is_none());
        index.remove("b", Medium::Email, "x@y.z", 8, 250);
        assert!(index.is_empty());
        assert!(index.get(Medium::Email, "x@y.z", 250).is_none());
    }

    /// The last write wins across origins: a tombstone removes its origin's older bindings
    /// and other origins' bindings older than it, not a newer one, also from an origin the
    /// index has never seen.
    #[test]
    fn a_tombstone_removes_older_bindings_of_every_origin() {
        let digest = crate::crypto::lookup_hash_bytes("x@y.z", "email", "pepper");
        let mut index = LookupIndex::new("me", "pepper", 0);
        index.insert(row("a", 1, "x@y.z", "@a:a", 100), Signatures::FromRow);
        index.insert(row("b", 7, "x@y.z", "@b:b", 150), Signatures::FromRow);
        index.insert(row("c", 3, "x@y.z", "@c:c", 300), Signatures::FromRow);
        index.insert(row("b", 8, "other@y.z", "@o:b", 10), Signatures::FromRow);
        // a's tombstone at ts 200: a's and b's bindings go, c's newer one stays.
        index.remove("a", Medium::Email, "x@y.z", 2, 200);
        let left: Vec<&str> = index
            .chain(index.head(Medium::Email, "x@y.z"))
            .map(|r| index.mxid_of(r))
            .collect();
        assert_eq!(left, ["@c:c"]);
        assert_eq!(index.get_hashed(&digest, 350).unwrap().mxid(), "@c:c");
        assert_eq!(
            index.get(Medium::Email, "other@y.z", 20).unwrap().mxid(),
            "@o:b"
        );
        // A tombstone from an origin with no binding here, newer than c's.
        index.remove("never.seen", Medium::Email, "x@y.z", 1, 301);
        assert!(index.get(Medium::Email, "x@y.z", 350).is_none());
        assert!(index.get_hashed(&digest, 350).is_none());
        assert_eq!(index.len(), 1);
    }

    #[test]
    fn churn_reuses_records_and_compacts_text() {
        let mut index = LookupIndex::new("me", "pepper", 0);
        for round in 0..40_000i64 {
            let address = format!("user{}@example.org", round % 1000);
            index.insert(
                row("me", round + 1, &address, &format!("@u{round}:x"), round),
                Signatures::FromRow,
            );
            if round % 3 == 0 {
                index.remove("me", Medium::Email, &address, round + 2, round + 1);
            }
        }
        assert!(index.len() <= 1000);
        assert!(index.records.len() <= 1000, "{}", index.records.len());
        assert!(
            index.text.len() < 2 * COMPACT_AFTER_BYTES + 100_000,
            "{}",
            index.text.len()
        );
        // What is left is right: the last round's binding of each 3PID not unbound after it.
        for n in 0..1000i64 {
            let last = 39_000 + n;
            let found = index.get(Medium::Email, &format!("user{n}@example.org"), last);
            let expected = (last % 3 != 0).then(|| format!("@u{last}:x"));
            assert_eq!(found.map(|f| f.mxid().to_string()), expected, "{n}");
        }
    }
}
