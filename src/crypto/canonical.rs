//! Matrix canonical JSON (spec appendix "Canonical JSON", python-canonicaljson):
//! object keys sorted by code point at every depth, no insignificant whitespace, UTF-8 written
//! raw, integers only and within ±(2^53−1).
//!
//! The bytes are written by serde_json's compact writer (its string escaping matches Python's
//! `json.dumps(ensure_ascii=False)`); this module only sorts keys itself, so the result does not
//! depend on whether some crate in the build enables `serde_json/preserve_order`, and refuses
//! values the Matrix rules forbid.

use serde::ser::{Error as _, Serialize, SerializeMap, SerializeSeq, Serializer};
use serde_json::Value;

/// The largest integer canonical JSON allows (2^53 − 1).
const MAX_SAFE_INTEGER: i64 = (1 << 53) - 1;

#[derive(Debug, thiserror::Error)]
#[error("value cannot be encoded as canonical JSON: {0}")]
pub struct CanonicalJsonError(String);

/// Encodes `value` as canonical JSON bytes.
pub fn canonical_json(value: &Value) -> Result<Vec<u8>, CanonicalJsonError> {
    serde_json::to_vec(&Canonical(value)).map_err(|e| CanonicalJsonError(e.to_string()))
}

/// `n` if canonical JSON may hold it (within ±(2^53−1)).
pub fn safe_integer(n: i64) -> Result<i64, CanonicalJsonError> {
    if (-MAX_SAFE_INTEGER..=MAX_SAFE_INTEGER).contains(&n) {
        Ok(n)
    } else {
        Err(CanonicalJsonError(format!(
            "{n} is not an integer within ±(2^53−1)"
        )))
    }
}

struct Canonical<'a>(&'a Value);

impl Serialize for Canonical<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Value::Null => serializer.serialize_unit(),
            Value::Bool(b) => serializer.serialize_bool(*b),
            Value::Number(n) => match n.as_i64().map(safe_integer) {
                Some(Ok(i)) => serializer.serialize_i64(i),
                _ => Err(S::Error::custom(format!(
                    "{n} is not an integer within ±(2^53−1)"
                ))),
            },
            Value::String(s) => serializer.serialize_str(s),
            Value::Array(items) => {
                let mut seq = serializer.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(&Canonical(item))?;
                }
                seq.end()
            }
            Value::Object(map) => {
                // Rust orders `str` by its UTF-8 bytes, which is code-point order.
                let mut entries: Vec<(&String, &Value)> = map.iter().collect();
                entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
                let mut out = serializer.serialize_map(Some(entries.len()))?;
                for (key, item) in entries {
                    out.serialize_entry(key, &Canonical(item))?;
                }
                out.end()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sorts_nested_keys_and_writes_utf8_raw() {
        let v = json!({"b": 1, "a": {"é": 1, "e": 2, "Z": [3, {"y": null, "x": true}]}, "s": "a/b ☃\u{1}"});
        assert_eq!(
            String::from_utf8(canonical_json(&v).unwrap()).unwrap(),
            "{\"a\":{\"Z\":[3,{\"x\":true,\"y\":null}],\"e\":2,\"é\":1},\"b\":1,\"s\":\"a/b ☃\\u0001\"}"
        );
    }

    #[test]
    fn refuses_floats_and_unsafe_integers() {
        assert!(canonical_json(&json!({"f": 1.5})).is_err());
        assert!(canonical_json(&json!(9_007_199_254_740_992_i64)).is_err());
        assert!(canonical_json(&json!(u64::MAX)).is_err());
        assert!(canonical_json(&json!(-9_007_199_254_740_991_i64)).is_ok());
    }
}
