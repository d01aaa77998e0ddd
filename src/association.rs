//! A 3PID → Matrix ID association and its signed JSON form, the object Sydent signs, serves on
//! v1 lookup, returns from bind and pushes to replication peers:
//! `{medium, address, mxid, ts, not_before, not_after, signatures}` (a tombstone has `mxid`,
//! `not_before` and `not_after` null).

use serde_json::{json, Map, Value};

use crate::crypto::{sign_json, NodeSigningKey, SignError};

/// How long a new binding is valid: Sydent's 100 years of 365 days, in milliseconds.
pub const BINDING_LIFETIME_MS: i64 = 100 * 365 * 24 * 60 * 60 * 1000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreepidAssociation {
    pub medium: String,
    pub address: String,
    /// `None` for a tombstone: the binding was removed.
    pub mxid: Option<String>,
    pub ts: i64,
    pub not_before: Option<i64>,
    pub not_after: Option<i64>,
}

impl ThreepidAssociation {
    /// A new binding made at `now_ms`.
    pub fn binding(medium: &str, address: &str, mxid: &str, now_ms: i64) -> Self {
        Self {
            medium: medium.into(),
            address: address.into(),
            mxid: Some(mxid.into()),
            ts: now_ms,
            not_before: Some(now_ms),
            not_after: Some(now_ms + BINDING_LIFETIME_MS),
        }
    }

    /// The tombstone that records the removal of a binding at `now_ms`.
    pub fn tombstone(medium: &str, address: &str, now_ms: i64) -> Self {
        Self {
            medium: medium.into(),
            address: address.into(),
            mxid: None,
            ts: now_ms,
            not_before: None,
            not_after: None,
        }
    }

    /// The unsigned JSON object.
    pub fn to_json(&self) -> Map<String, Value> {
        let Value::Object(map) = json!({
            "medium": self.medium,
            "address": self.address,
            "mxid": self.mxid,
            "ts": self.ts,
            "not_before": self.not_before,
            "not_after": self.not_after,
        }) else {
            unreachable!("json! of an object literal is an object")
        };
        map
    }

    /// The JSON object signed by `server_name`.
    pub fn signed(
        &self,
        server_name: &str,
        key: &NodeSigningKey,
    ) -> Result<Map<String, Value>, SignError> {
        let mut object = self.to_json();
        sign_json(&mut object, server_name, key)?;
        Ok(object)
    }
}
