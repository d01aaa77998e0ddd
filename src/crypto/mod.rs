//! Pure cryptography, no I/O: canonical JSON, unpadded base64, the node's ed25519 signing key
//! in Sydent's format (and the hex form of older keys), signing and verifying JSON objects one
//! at a time or as a batch, and lookup hashes.
//!
//! Everything here must be byte-identical to the Python libraries Sydent uses
//! (signedjson, canonicaljson, unpaddedbase64); `tests/it/vectors.rs` walks
//! `shared/vectors/matrix-signing.json` to prove it.

mod b64;
mod canonical;
mod hash;
mod keys;
mod random;
mod sign;

pub use b64::{decode_base64, decode_base64_32, encode_base64, encode_base64_urlsafe};
pub use canonical::{canonical_json, safe_integer, CanonicalJsonError};
pub use hash::{lookup_hash, lookup_hash_bytes};
pub use keys::{KeyError, NodeSigningKey, VerifyKey};
pub use random::{random_below, random_string, secrets_equal, ALPHANUMERIC, DIGITS};
pub use sign::{sign_json, verify_json, verify_json_batch, SignError};
