//! The node's long-term ed25519 key, stored as Sydent stores it in `[crypto] ed25519.signingkey`:
//! `ed25519 <version> <unpadded base64 32-byte seed>` (signedjson's `encode_signing_key_base64`),
//! or, as very old Sydent versions wrote it, the seed alone in hex.

use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};
use rand_core::OsRng;

use super::{decode_base64, encode_base64};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("expected 'ed25519 <version> <base64 seed>'")]
    Format,
    #[error("unsupported key algorithm '{0}' (only ed25519)")]
    Algorithm(String),
    #[error("the seed is not base64 of 32 bytes")]
    Seed,
    #[error("the public key is not base64 of a valid ed25519 point")]
    PublicKey,
}

/// The signing key plus its version: the key id is `ed25519:<version>`.
#[derive(Clone)]
pub struct NodeSigningKey {
    version: String,
    key: SigningKey,
}

impl std::fmt::Debug for NodeSigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the seed.
        write!(
            f,
            "NodeSigningKey({}, {})",
            self.key_id(),
            self.verify_key().to_base64()
        )
    }
}

impl NodeSigningKey {
    /// A new random key with version `0`, as Sydent generates on first start.
    pub fn generate() -> Self {
        Self {
            version: "0".into(),
            key: SigningKey::generate(&mut OsRng),
        }
    }

    /// Builds a key from a raw 32-byte seed (tests and vectors).
    pub fn from_seed(version: &str, seed: [u8; 32]) -> Self {
        Self {
            version: version.into(),
            key: SigningKey::from_bytes(&seed),
        }
    }

    /// Parses Sydent's config value; a lone hex seed (the pre-2019 format) is accepted too.
    pub fn from_sydent_str(text: &str) -> Result<Self, KeyError> {
        let parts: Vec<&str> = text.split_whitespace().collect();
        match parts.as_slice() {
            [alg, version, seed] => {
                if *alg != "ed25519" {
                    return Err(KeyError::Algorithm((*alg).into()));
                }
                let seed = decode_base64(seed).ok_or(KeyError::Seed)?;
                let seed: [u8; 32] = seed.try_into().map_err(|_| KeyError::Seed)?;
                Ok(Self::from_seed(version, seed))
            }
            [hex_seed] if hex_seed.len() == 64 => {
                let seed = decode_hex_32(hex_seed).ok_or(KeyError::Seed)?;
                Ok(Self::from_seed("0", seed))
            }
            _ => Err(KeyError::Format),
        }
    }

    /// The config value: `ed25519 <version> <seed>`.
    pub fn to_sydent_string(&self) -> String {
        format!(
            "ed25519 {} {}",
            self.version,
            encode_base64(self.key.to_bytes())
        )
    }

    /// `ed25519:<version>`, the key id under `signatures` and in `/pubkey/{keyId}`.
    pub fn key_id(&self) -> String {
        format!("ed25519:{}", self.version)
    }

    pub fn verify_key(&self) -> VerifyKey {
        VerifyKey(self.key.verifying_key())
    }

    /// The seed in URL-safe unpadded base64: how an invite's ephemeral private key travels in
    /// the invite mail's link (never for the node's own key).
    pub fn seed_base64_urlsafe(&self) -> String {
        super::encode_base64_urlsafe(self.key.to_bytes())
    }

    /// The raw ed25519 signature of `message` (JSON is signed with [`super::sign_json`]).
    pub(crate) fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.key.sign(message).to_bytes()
    }
}

/// A peer's (or our own) public key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct VerifyKey(VerifyingKey);

impl std::fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VerifyKey({})", self.to_base64())
    }
}

/// 64 hex digits as 32 bytes: Sydent's pre-2019 signing-key seed, and the verify keys some
/// `peer_pubkeys` rows hold.
fn decode_hex_32(text: &str) -> Option<[u8; 32]> {
    let digits = text.as_bytes();
    if digits.len() != 64 {
        return None;
    }
    let nibble = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        *byte = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

impl VerifyKey {
    /// Parses 64 hex digits (Sydent accepts them in `peer_pubkeys`, with a warning).
    pub fn from_hex(text: &str) -> Result<Self, KeyError> {
        let bytes = decode_hex_32(text.trim()).ok_or(KeyError::PublicKey)?;
        VerifyingKey::from_bytes(&bytes)
            .map(Self)
            .map_err(|_| KeyError::PublicKey)
    }

    /// Parses unpadded base64 (either alphabet), as in `peer_pubkeys.key` and peers.d files.
    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        let bytes = decode_base64(text.trim()).ok_or(KeyError::PublicKey)?;
        let bytes: [u8; 32] = bytes.try_into().map_err(|_| KeyError::PublicKey)?;
        VerifyingKey::from_bytes(&bytes)
            .map(Self)
            .map_err(|_| KeyError::PublicKey)
    }

    /// Standard unpadded base64, as `/pubkey/ed25519:0` serves it.
    /// URL-safe unpadded base64, the form Sydent gives ephemeral (invite) keys.
    pub fn to_base64_urlsafe(&self) -> String {
        super::encode_base64_urlsafe(self.0.as_bytes())
    }

    pub fn to_base64(&self) -> String {
        encode_base64(self.0.as_bytes())
    }

    /// Checks many signatures by this key at once (ed25519 batch verification, about twice
    /// as fast as one by one). True only if every one is valid.
    pub(super) fn verify_all(&self, messages: &[&[u8]], signatures: &[[u8; 64]]) -> bool {
        let signatures: Vec<ed25519_dalek::Signature> = signatures
            .iter()
            .map(ed25519_dalek::Signature::from_bytes)
            .collect();
        let keys = vec![self.0; messages.len()];
        ed25519_dalek::verify_batch(messages, &signatures, &keys).is_ok()
    }

    pub(super) fn verify(&self, message: &[u8], signature: &[u8; 64]) -> bool {
        self.0
            .verify(message, &ed25519_dalek::Signature::from_bytes(signature))
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_sydent_format() {
        let key = NodeSigningKey::generate();
        let text = key.to_sydent_string();
        assert!(text.starts_with("ed25519 0 "));
        let again = NodeSigningKey::from_sydent_str(&text).unwrap();
        assert_eq!(again.verify_key(), key.verify_key());
        assert_eq!(again.key_id(), "ed25519:0");
    }

    #[test]
    fn hex_is_64_digits_of_either_case() {
        let mut expected = [0xabu8; 32];
        expected[31] = 0x0f;
        let text = format!("{}0F", "aB".repeat(31));
        assert_eq!(decode_hex_32(&text), Some(expected));
        for bad in [
            "",
            &"0".repeat(63),
            &"0".repeat(65),
            &format!("{}g0", "00".repeat(31)),
        ] {
            assert_eq!(decode_hex_32(bad), None, "{bad}");
        }
        // 64 bytes but not 64 digits: refused, not a panic on a char boundary.
        assert_eq!(decode_hex_32(&format!("{}é", "0".repeat(62))), None);
        assert!(NodeSigningKey::from_sydent_str(&format!("{}é", "0".repeat(62))).is_err());
    }

    #[test]
    fn reads_the_legacy_hex_seed() {
        let hex = "01".repeat(32);
        let key = NodeSigningKey::from_sydent_str(&hex).unwrap();
        assert_eq!(
            key.verify_key().to_base64(),
            "iojj3XQJ8ZX9UtstPLpdcspnCb8dlBIb83SIAbQPb1w"
        );
    }

    #[test]
    fn rejects_malformed_values() {
        assert_eq!(
            NodeSigningKey::from_sydent_str("").unwrap_err(),
            KeyError::Format
        );
        assert_eq!(
            NodeSigningKey::from_sydent_str("rsa 0 AAAA").unwrap_err(),
            KeyError::Algorithm("rsa".into())
        );
        assert_eq!(
            NodeSigningKey::from_sydent_str("ed25519 0 AAAA").unwrap_err(),
            KeyError::Seed
        );
        assert!(VerifyKey::from_base64("short").is_err());
    }
}
