//! What the directory says right now, as every lookup path reads it: 3PID → Matrix ID for each
//! address the mirror holds, keyed by the 3PID's v2 lookup hash so that v1 lookups (which hash
//! the 3PID) and hashed v2 lookups (which bring the hash) read the same table.
//!
//! The mirror binds directory people as this node's bindings, but a binding made since (here
//! or on a peer) is newer and would win a lookup until the next sync binds the directory's
//! answer again. Lookups read this view first, so on this node the directory wins between
//! syncs too, whatever the ages of the bindings.
//!
//! A lock, not an actor: every lookup reads it, and a message round trip would cost more than
//! the lookup itself; the directory actor is its only writer and holds the write lock only to
//! swap in a table built beforehand, or to add a live look-through's hits.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::crypto::lookup_hash_bytes;
use crate::types::Medium;

#[derive(Clone)]
pub struct DirectoryView {
    pepper: Arc<str>,
    answers: Arc<RwLock<HashMap<[u8; 32], Arc<str>>>>,
}

impl std::fmt::Debug for DirectoryView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DirectoryView({} 3PIDs)", self.read().len())
    }
}

/// A read of the view: one lock for a whole request.
pub struct ViewRead<'a>(std::sync::RwLockReadGuard<'a, HashMap<[u8; 32], Arc<str>>>);

impl ViewRead<'_> {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The directory's Matrix ID for the 3PID whose lookup hash is `digest`.
    pub fn get_hashed(&self, digest: &[u8; 32]) -> Option<&Arc<str>> {
        self.0.get(digest)
    }
}

impl DirectoryView {
    /// An empty view for a node whose lookup pepper is `pepper`.
    pub fn new(pepper: &str) -> Self {
        Self {
            pepper: pepper.into(),
            answers: Arc::default(),
        }
    }

    /// The lookup hash of a normalised 3PID (its lookup key).
    pub fn digest(&self, medium: Medium, key: &str) -> [u8; 32] {
        lookup_hash_bytes(key, medium.as_str(), &self.pepper)
    }

    pub fn read(&self) -> ViewRead<'_> {
        // A poisoned lock means a writer panicked mid-swap; the map itself is whole.
        ViewRead(self.answers.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// The directory's Matrix ID for a normalised 3PID.
    pub fn get(&self, medium: Medium, key: &str) -> Option<Arc<str>> {
        self.read().get_hashed(&self.digest(medium, key)).cloned()
    }

    /// The directory's answers after a sync: (medium, lookup key) → Matrix ID.
    pub fn replace(&self, mirror: &HashMap<(Medium, String), String>) {
        let table: HashMap<[u8; 32], Arc<str>> = mirror
            .iter()
            .map(|((medium, key), mxid)| (self.digest(*medium, key), Arc::from(mxid.as_str())))
            .collect();
        *self.answers.write().unwrap_or_else(|e| e.into_inner()) = table;
    }

    /// Adds what a live look-through found.
    pub fn insert(&self, found: &[(Medium, String, String)]) {
        let entries: Vec<([u8; 32], Arc<str>)> = found
            .iter()
            .map(|(medium, key, mxid)| (self.digest(*medium, key), Arc::from(mxid.as_str())))
            .collect();
        self.answers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .extend(entries);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_and_v2_read_the_same_answer() {
        let view = DirectoryView::new("pepper");
        let mirror = HashMap::from([(
            (Medium::Email, "ann@example.org".to_string()),
            "@ann:example.org".to_string(),
        )]);
        view.replace(&mirror);
        assert_eq!(
            view.get(Medium::Email, "ann@example.org").as_deref(),
            Some("@ann:example.org")
        );
        assert_eq!(view.get(Medium::Msisdn, "ann@example.org"), None);
        let digest = lookup_hash_bytes("ann@example.org", "email", "pepper");
        assert_eq!(
            view.read().get_hashed(&digest).map(|m| &**m),
            Some("@ann:example.org")
        );
        // A sync's table replaces the previous one; a live hit adds to it.
        view.replace(&HashMap::new());
        assert!(view.read().is_empty());
        view.insert(&[(
            Medium::Msisdn,
            "15551234567".into(),
            "@bo:example.org".into(),
        )]);
        assert_eq!(
            view.get(Medium::Msisdn, "15551234567").as_deref(),
            Some("@bo:example.org")
        );
    }
}
