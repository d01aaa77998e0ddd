//! A 3PID → Matrix ID association and its signed JSON form, the object Sydent signs, serves on
//! v1 lookup, returns from bind and pushes to replication peers:
//! `{medium, address, mxid, ts, not_before, not_after, signatures}` (a tombstone has `mxid`,
//! `not_before` and `not_after` null).

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::crypto::{encode_base64, safe_integer, sign_json, NodeSigningKey, SignError};

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

    /// The association signed by `server_name` as JSON text, the same text as
    /// [`Self::signed`] serializes to, and the signature itself. Written straight from the
    /// fields rather than through a `serde_json` object that is cloned, sorted and
    /// serialized twice, and whose signature is then decoded again: every bind does this.
    pub fn signed_text(
        &self,
        server_name: &str,
        key: &NodeSigningKey,
    ) -> Result<(String, [u8; 64]), SignError> {
        let mut wire = WireAssociation {
            address: &self.address,
            medium: &self.medium,
            mxid: self.mxid.as_deref(),
            not_after: self.not_after.map(safe_integer).transpose()?,
            not_before: self.not_before.map(safe_integer).transpose()?,
            signatures: None,
            ts: safe_integer(self.ts)?,
        };
        let signature = key.sign(&to_json(&wire));
        let signatures = BTreeMap::from([(
            server_name,
            BTreeMap::from([(key.key_id(), encode_base64(signature))]),
        )]);
        wire.signatures = Some(signatures);
        let text = String::from_utf8(to_json(&wire)).expect("serde_json writes UTF-8");
        Ok((text, signature))
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

/// An association's fields in the code-point order of their names, as canonical JSON and
/// `serde_json`'s sorted maps both write them (`signatures` falls between `not_before` and
/// `ts`).
#[derive(Serialize)]
struct WireAssociation<'a> {
    address: &'a str,
    medium: &'a str,
    mxid: Option<&'a str>,
    not_after: Option<i64>,
    not_before: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    signatures: Option<BTreeMap<&'a str, BTreeMap<String, String>>>,
    ts: i64,
}

fn to_json(wire: &WireAssociation<'_>) -> Vec<u8> {
    serde_json::to_vec(wire).expect("strings, integers and string maps always serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_text_is_the_signed_object_serialized() {
        let key = NodeSigningKey::from_seed("0", [7; 32]);
        let binding = ThreepidAssociation::binding(
            "email",
            "a\"b\\c\u{1}é☃@example.org",
            "@a:example.org",
            1_700_000_000_000,
        );
        let tombstone = ThreepidAssociation::tombstone("msisdn", "447700900000", 5);
        for assoc in [binding, tombstone] {
            let (text, signature) = assoc.signed_text("example.org", &key).unwrap();
            let object = assoc.signed("example.org", &key).unwrap();
            assert_eq!(text, Value::Object(object.clone()).to_string());
            assert_eq!(
                object["signatures"]["example.org"]["ed25519:0"],
                encode_base64(signature)
            );
        }
        let unsafe_ts = ThreepidAssociation {
            ts: 1 << 53,
            ..ThreepidAssociation::tombstone("email", "a@b", 0)
        };
        assert!(unsafe_ts.signed_text("example.org", &key).is_err());
        assert!(unsafe_ts.signed("example.org", &key).is_err());
    }
}
