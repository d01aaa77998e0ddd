//! Signing and verifying JSON objects the way signedjson does: the signature covers the
//! canonical JSON of the object without `signatures` and `unsigned`, and is stored under
//! `signatures.<entity>.<key id>` next to any signatures already there.

use serde_json::{Map, Value};

use super::{
    canonical_json, decode_base64, encode_base64, CanonicalJsonError, NodeSigningKey, VerifyKey,
};

#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error(transparent)]
    Canonical(#[from] CanonicalJsonError),
    #[error("'signatures' is not an object of objects")]
    MalformedSignatures,
    #[error("no signature from {entity} with key {key_id}")]
    Missing { entity: String, key_id: String },
    #[error("the signature from {0} does not verify")]
    Invalid(String),
}

/// The bytes a signature covers.
fn signed_bytes(object: &Map<String, Value>) -> Result<Vec<u8>, CanonicalJsonError> {
    let mut content = object.clone();
    content.remove("signatures");
    content.remove("unsigned");
    canonical_json(&Value::Object(content))
}

/// Adds `entity`'s signature with `key` to `object`, keeping the signatures already there.
pub fn sign_json(
    object: &mut Map<String, Value>,
    entity: &str,
    key: &NodeSigningKey,
) -> Result<(), SignError> {
    let signature = encode_base64(key.sign(&signed_bytes(object)?));
    let signatures = object
        .entry("signatures")
        .or_insert_with(|| Value::Object(Map::new()))
        .as_object_mut()
        .ok_or(SignError::MalformedSignatures)?;
    let by_entity = signatures
        .entry(entity)
        .or_insert_with(|| Value::Object(Map::new()))
        .as_object_mut()
        .ok_or(SignError::MalformedSignatures)?;
    by_entity.insert(key.key_id(), Value::String(signature));
    Ok(())
}

/// Checks `entity`'s signature under `key_id` on `object` with `key`.
pub fn verify_json(
    object: &Map<String, Value>,
    entity: &str,
    key_id: &str,
    key: &VerifyKey,
) -> Result<(), SignError> {
    let missing = || SignError::Missing {
        entity: entity.into(),
        key_id: key_id.into(),
    };
    let signature = object
        .get("signatures")
        .and_then(|s| s.get(entity))
        .and_then(|s| s.get(key_id))
        .and_then(Value::as_str)
        .ok_or_else(missing)?;
    let signature: [u8; 64] = decode_base64(signature)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| SignError::Invalid(entity.into()))?;
    if key.verify(&signed_bytes(object)?, &signature) {
        Ok(())
    } else {
        Err(SignError::Invalid(entity.into()))
    }
}

/// Verifies `entity`'s signature on each object with `key`, under any `ed25519:*` key id,
/// as one batch when all are valid (the common case: a replication push). Returns, per
/// object, whether it verified.
pub fn verify_json_batch(
    objects: &[&Map<String, Value>],
    entity: &str,
    key: &VerifyKey,
) -> Vec<bool> {
    // Each object's candidate (signed bytes, signature) under its first ed25519 key id.
    let candidates: Vec<Option<(Vec<u8>, [u8; 64])>> = objects
        .iter()
        .map(|object| {
            let signature = object
                .get("signatures")?
                .get(entity)?
                .as_object()?
                .iter()
                .filter(|(key_id, _)| key_id.starts_with("ed25519:"))
                .find_map(|(_, sig)| decode_base64(sig.as_str()?)?.try_into().ok())?;
            Some((signed_bytes(object).ok()?, signature))
        })
        .collect();
    let present: Vec<&(Vec<u8>, [u8; 64])> = candidates.iter().flatten().collect();
    let messages: Vec<&[u8]> = present.iter().map(|(m, _)| m.as_slice()).collect();
    let signatures: Vec<[u8; 64]> = present.iter().map(|(_, s)| *s).collect();
    // One signature (a lone bind's push) is checked as such: a batch of one costs more.
    let all_verify = match (messages.as_slice(), signatures.as_slice()) {
        ([message], [signature]) => key.verify(message, signature),
        _ => key.verify_all(&messages, &signatures),
    };
    if present.len() == objects.len() && all_verify {
        return vec![true; objects.len()];
    }
    // Something is wrong: find what, one by one, with every ed25519 key id of the entity.
    objects
        .iter()
        .map(|object| {
            object
                .get("signatures")
                .and_then(|s| s.get(entity))
                .and_then(Value::as_object)
                .is_some_and(|sigs| {
                    sigs.keys()
                        .filter(|key_id| key_id.starts_with("ed25519:"))
                        .any(|key_id| verify_json(object, entity, key_id, key).is_ok())
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The spec's own vector (appendices, "Cryptographic Test Vectors"): `{}` signed by
    /// "domain" with key `ed25519:1`.
    #[test]
    fn spec_signing_vector() {
        let seed: [u8; 32] = decode_base64("YJDBA9Xnr2sVqXD9Vj7XVUnmFZcZrlw8Md7kMW+3XA1")
            .unwrap()
            .try_into()
            .unwrap();
        let key = NodeSigningKey::from_seed("1", seed);
        let mut object = Map::new();
        sign_json(&mut object, "domain", &key).unwrap();
        assert_eq!(
            Value::Object(object.clone()),
            json!({"signatures": {"domain": {"ed25519:1":
                "K8280/U9SSy9IVtjBuVeLr+HpOB4BQFWbg+UZaADMtTdGYI7Geitb76LTrr5QV/7Xg4ahLwYGYZzuHGZKM5ZAQ"}}})
        );
        verify_json(&object, "domain", "ed25519:1", &key.verify_key()).unwrap();
    }

    #[test]
    fn batch_verification_finds_the_bad_ones() {
        let key = NodeSigningKey::generate();
        let other = NodeSigningKey::generate();
        let make = |n: i64, with: &NodeSigningKey| {
            let mut object = serde_json::json!({"n": n}).as_object().unwrap().clone();
            sign_json(&mut object, "peer.example", with).unwrap();
            object
        };
        let good: Vec<Map<String, Value>> = (0..5).map(|n| make(n, &key)).collect();
        let refs: Vec<&Map<String, Value>> = good.iter().collect();
        assert_eq!(
            verify_json_batch(&refs, "peer.example", &key.verify_key()),
            vec![true; 5]
        );

        let forged = make(5, &other);
        let mut unsigned = make(6, &key);
        unsigned.remove("signatures");
        let mut tampered = make(7, &key);
        tampered.insert("n".into(), Value::from(8));
        // A bad signature under ed25519:0 next to a good one under ed25519:1 still verifies.
        let mut second_id = make(9, &key);
        let sigs = second_id["signatures"]["peer.example"]
            .as_object_mut()
            .unwrap();
        let good_sig = sigs["ed25519:0"].clone();
        sigs.insert("ed25519:1".into(), good_sig);
        sigs.insert("ed25519:0".into(), Value::from("AAAA"));
        let mut all = refs.clone();
        all.extend([&forged, &unsigned, &tampered, &second_id]);
        assert_eq!(
            verify_json_batch(&all, "peer.example", &key.verify_key()),
            [true, true, true, true, true, false, false, false, true]
        );
        assert_eq!(
            verify_json_batch(&[], "peer.example", &key.verify_key()),
            Vec::<bool>::new()
        );
    }

    #[test]
    fn keeps_other_signatures_and_ignores_unsigned() {
        let a = NodeSigningKey::generate();
        let b = NodeSigningKey::generate();
        let mut object = json!({"x": 1}).as_object().unwrap().clone();
        sign_json(&mut object, "a", &a).unwrap();
        sign_json(&mut object, "b", &b).unwrap();
        object.insert("unsigned".into(), json!({"age": 5}));
        verify_json(&object, "a", "ed25519:0", &a.verify_key()).unwrap();
        verify_json(&object, "b", "ed25519:0", &b.verify_key()).unwrap();
        assert!(matches!(
            verify_json(&object, "a", "ed25519:0", &b.verify_key()),
            Err(SignError::Invalid(_))
        ));
        object.insert("x".into(), json!(2));
        assert!(verify_json(&object, "a", "ed25519:0", &a.verify_key()).is_err());
        assert!(matches!(
            verify_json(&object, "c", "ed25519:0", &a.verify_key()),
            Err(SignError::Missing { .. })
        ));
    }
}
