//! Third-party invites (spec: "Invitation storage"; Sydent's store-invite and bind): what a
//! pending invite is, how the address is redacted for `display_name`, the invite's signed
//! `{mxid, token}` blob, and the onbind body a homeserver receives when the invited address is
//! bound: the association with its `invites`, signed by this node.

use std::collections::HashSet;
use std::hash::BuildHasher;

use serde_json::{json, Map, Value};

use crate::crypto::{sign_json, NodeSigningKey, SignError};

/// An invite waiting for its address to be bound (a row of `invite_tokens`).
#[derive(Debug, Clone, PartialEq, Eq, diesel::Queryable)]
pub struct PendingInvite {
    pub id: i64,
    pub medium: String,
    pub address: String,
    pub room_id: String,
    pub sender: String,
    pub token: String,
}

/// An invite accepted by `store-invite`, with the ephemeral public key issued for it.
#[derive(Debug, Clone)]
pub struct NewInvite {
    pub medium: String,
    /// Casefolded, as the bind that delivers it.
    pub address: String,
    pub room_id: String,
    pub sender: String,
    pub token: String,
    /// URL-safe unpadded base64, as Sydent stores it.
    pub public_key: String,
    /// Seconds.
    pub received_ts: i64,
}

/// A write to the invite tables, committed by the association store.
#[derive(Debug, Clone)]
pub enum InviteWrite {
    /// `store-invite`: the token row and the ephemeral key.
    Store(NewInvite),
    /// The invite mail could not be sent: the invite is withdrawn (its key stays valid; it
    /// signs nothing without the token).
    Withdraw { token: String },
    /// The homeserver answered 200: the invites are delivered (marked `sent_ts`, or deleted
    /// with `delete_tokens_on_bind`) and the delivery leaves the queue.
    Delivered {
        delivery_id: i64,
        delete_tokens: bool,
        now_s: i64,
    },
    /// The node stopped trying: the delivery stays, marked, for the admin to see; its invites
    /// are released, so a later bind of the address delivers them again.
    GaveUp {
        delivery_id: i64,
        reason: String,
        now_ms: i64,
    },
}

/// Sydent's `redact_email_address`: the local part and the domain are each cut to their
/// number of characters (or less for short ones) and followed by `...`, so the inviter's
/// client shows who was invited without publishing the address.
pub fn redact_email(address: &str, local_chars: usize, domain_chars: usize) -> String {
    fn redact(part: &str, keep: usize) -> String {
        let chars: Vec<char> = part.chars().collect();
        let head = |n: usize| chars[..n].iter().collect::<String>();
        if chars.len() > keep {
            format!("{}...", head(keep))
        } else if chars.len() > 5 {
            format!("{}...", head(3))
        } else if chars.len() > 1 {
            format!("{}...", head(1))
        } else {
            "...".to_string()
        }
    }
    match address.split_once('@') {
        Some((local, domain)) => format!(
            "{}@{}",
            redact(local, local_chars),
            redact(domain, domain_chars)
        ),
        None => redact(address, local_chars),
    }
}

/// The `invites` entries of an onbind body for `mxid`, each with its `signed` blob
/// (`{mxid, token}` signed by this node's long-term key: the spec's
/// `signed_third_party_invite`, which the homeserver checks against the keys listed in the
/// room's invite event).
pub fn signed_invites(
    invites: &[PendingInvite],
    mxid: &str,
    server_name: &str,
    key: &NodeSigningKey,
) -> Result<Vec<Value>, SignError> {
    invites
        .iter()
        .map(|invite| {
            let mut signed = Map::new();
            signed.insert("mxid".into(), json!(mxid));
            signed.insert("token".into(), json!(invite.token));
            sign_json(&mut signed, server_name, key)?;
            Ok(json!({
                "medium": invite.medium,
                "address": invite.address,
                "room_id": invite.room_id,
                "sender": invite.sender,
                "token": invite.token,
                "mxid": mxid,
                "signed": signed,
            }))
        })
        .collect()
}

/// The body POSTed to `/_matrix/federation/v1/3pid/onbind`: `association` (its fields, with
/// any signatures it came with removed: they do not cover the invites) with `invites` added,
/// signed by this node. Built fresh for each binding (Sydent shares one dict between
/// associations and leaks one user's invites into the next ones).
pub fn onbind_body(
    mut association: Map<String, Value>,
    invites: &[PendingInvite],
    server_name: &str,
    key: &NodeSigningKey,
) -> Result<String, SignError> {
    association.remove("signatures");
    association.remove("unsigned");
    let mxid = association
        .get("mxid")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    association.insert(
        "invites".into(),
        Value::Array(signed_invites(invites, &mxid, server_name, key)?),
    );
    sign_json(&mut association, server_name, key)?;
    Ok(Value::Object(association).to_string())
}

/// The 3PIDs that may have pending invites, as hashes: a bind checks this before it asks the
/// database (binds are hot; invites are rare). A false positive costs one query; the set is
/// filled at start from `invite_tokens` and by each stored invite, and a 3PID leaves it when
/// its invites are queued for delivery.
#[derive(Debug, Default)]
pub struct PendingInviteKeys {
    keys: std::sync::Mutex<HashSet<u64>>,
    hasher: std::collections::hash_map::RandomState,
}

impl PendingInviteKeys {
    fn key(&self, medium: &str, address: &str) -> u64 {
        self.hasher.hash_one((medium, address))
    }

    pub fn insert(&self, medium: &str, address: &str) {
        let key = self.key(medium, address);
        self.lock().insert(key);
    }

    pub fn may_have(&self, medium: &str, address: &str) -> bool {
        let key = self.key(medium, address);
        self.lock().contains(&key)
    }

    pub fn remove(&self, medium: &str, address: &str) {
        let key = self.key(medium, address);
        self.lock().remove(&key);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<u64>> {
        self.keys.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::verify_json;

    #[test]
    fn redaction_follows_sydent() {
        // Sydent's own test cases (limits 6 and 8), and the defaults (3 and 3).
        assert_eq!(
            redact_email("1234567890@1234567890.com", 6, 8),
            "123456...@12345678..."
        );
        assert_eq!(redact_email("1@1.com", 6, 8), "...@1...");
        assert_eq!(redact_email("alice@example.org", 3, 3), "ali...@exa...");
        assert_eq!(redact_email("bob@ex.io", 3, 3), "b...@ex....");
        assert_eq!(redact_email("ab@cdefgh", 10, 10), "a...@cde...");
    }

    #[test]
    fn the_onbind_body_is_signed_whole_and_each_invite_alone() {
        let key = NodeSigningKey::from_seed("0", [9; 32]);
        let invite = PendingInvite {
            id: 1,
            medium: "email".into(),
            address: "carol@example.org".into(),
            room_id: "!r:hs2".into(),
            sender: "@dan:hs2".into(),
            token: "T".repeat(128),
        };
        let mut assoc = Map::new();
        assoc.insert("medium".into(), json!("email"));
        assoc.insert("address".into(), json!("carol@example.org"));
        assoc.insert("mxid".into(), json!("@carol:hs.org"));
        assoc.insert(
            "signatures".into(),
            json!({"other.example": {"ed25519:0": "x"}}),
        );
        let body = onbind_body(assoc, &[invite], "is.example", &key).unwrap();
        let body: Map<String, Value> = serde_json::from_str(&body).unwrap();
        let verify = key.verify_key();
        verify_json(&body, "is.example", "ed25519:0", &verify).unwrap();
        assert!(body["signatures"].get("other.example").is_none());
        let invites = body["invites"].as_array().unwrap();
        assert_eq!(invites.len(), 1);
        assert_eq!(invites[0]["mxid"], "@carol:hs.org");
        assert_eq!(invites[0]["sender"], "@dan:hs2");
        let signed = invites[0]["signed"].as_object().unwrap();
        assert_eq!(signed["mxid"], "@carol:hs.org");
        assert_eq!(signed["token"], "T".repeat(128));
        verify_json(signed, "is.example", "ed25519:0", &verify).unwrap();
    }

    #[test]
    fn pending_keys_are_per_3pid() {
        let keys = PendingInviteKeys::default();
        keys.insert("email", "a@example.org");
        assert!(keys.may_have("email", "a@example.org"));
        assert!(!keys.may_have("msisdn", "a@example.org"));
        keys.remove("email", "a@example.org");
        assert!(!keys.may_have("email", "a@example.org"));
    }
}
