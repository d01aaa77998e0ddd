//! Canonical JSON, signatures and lookup hashes are byte-identical to what Sydent's Python
//! libraries (signedjson, canonicaljson) produce: every vector in tests/vectors is walked.

use serde_json::Value;
use sydent_rs::crypto::{
    canonical_json, decode_base64, lookup_hash, sign_json, verify_json, NodeSigningKey, VerifyKey,
};

use crate::harness::vectors;

fn key_of(v: &Value, origin: &str) -> (NodeSigningKey, VerifyKey) {
    let k = &v["keys"][origin];
    let seed: [u8; 32] = decode_base64(k["seed"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let key = NodeSigningKey::from_seed("0", seed);
    let verify = VerifyKey::from_base64(k["verify_key"].as_str().unwrap()).unwrap();
    assert_eq!(
        key.verify_key(),
        verify,
        "seed and verify key of {origin} agree"
    );
    assert_eq!(key.key_id(), k["key_id"].as_str().unwrap());
    // Sydent's config format round-trips.
    let text = format!("ed25519 0 {}", k["seed"].as_str().unwrap());
    assert_eq!(
        NodeSigningKey::from_sydent_str(&text)
            .unwrap()
            .to_sydent_string(),
        text
    );
    (key, verify)
}

#[test]
fn canonical_json_matches_python() {
    let v = vectors();
    let cases = v["canonical_json"].as_array().unwrap();
    assert!(cases.len() >= 4);
    for case in cases {
        let bytes = canonical_json(&case["input"]).unwrap();
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            case["canonical"].as_str().unwrap()
        );
    }
}

#[test]
fn signed_associations_match_signedjson_and_tampering_fails() {
    let v = vectors();
    let cases = v["signed_associations"].as_array().unwrap();
    assert_eq!(cases.len(), 3);
    for case in cases {
        let origin = case["origin"].as_str().unwrap();
        let (key, verify) = key_of(&v, origin);
        let unsigned = case["unsigned"].as_object().unwrap().clone();
        assert_eq!(
            String::from_utf8(canonical_json(&Value::Object(unsigned.clone())).unwrap()).unwrap(),
            case["canonical_signed_bytes"].as_str().unwrap()
        );
        let mut signed = unsigned;
        sign_json(&mut signed, origin, &key).unwrap();
        assert_eq!(
            Value::Object(signed.clone()),
            case["signed"],
            "signature of {origin}"
        );
        verify_json(
            case["signed"].as_object().unwrap(),
            origin,
            "ed25519:0",
            &verify,
        )
        .unwrap();
        assert!(
            verify_json(
                case["tampered_must_fail"].as_object().unwrap(),
                origin,
                "ed25519:0",
                &verify
            )
            .is_err(),
            "tampered association of {origin} must not verify"
        );
        // Another node's key does not verify it either.
        let other = if origin == "node1.test" {
            "node2.test"
        } else {
            "node1.test"
        };
        let (_, other_key) = key_of(&v, other);
        assert!(verify_json(
            case["signed"].as_object().unwrap(),
            origin,
            "ed25519:0",
            &other_key
        )
        .is_err());
    }
}

#[test]
fn lookup_hashes_match_sydent() {
    let v = vectors();
    let cases = v["hashed_lookup"].as_array().unwrap();
    assert_eq!(cases.len(), 4);
    for case in cases {
        assert_eq!(
            lookup_hash(
                case["address"].as_str().unwrap(),
                case["medium"].as_str().unwrap(),
                case["pepper"].as_str().unwrap()
            ),
            case["sha256_urlsafe_unpadded_b64"].as_str().unwrap()
        );
    }
}
