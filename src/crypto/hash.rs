//! The v2 lookup hash: SHA-256 of `"<address> <medium> <pepper>"`, URL-safe unpadded base64.

use sha2::{Digest, Sha256};

use super::encode_base64_urlsafe;

/// The `lookup_hash` column and the v2 `sha256` lookup key for one 3PID.
pub fn lookup_hash(address: &str, medium: &str, pepper: &str) -> String {
    encode_base64_urlsafe(lookup_hash_bytes(address, medium, pepper))
}

/// [`lookup_hash`] before its base64 encoding.
pub fn lookup_hash_bytes(address: &str, medium: &str, pepper: &str) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(address.as_bytes());
    hasher.update(b" ");
    hasher.update(medium.as_bytes());
    hasher.update(b" ");
    hasher.update(pepper.as_bytes());
    hasher.finalize().into()
}

#[cfg(test)]
mod tests {
    #[test]
    fn spec_vector() {
        assert_eq!(
            super::lookup_hash("alice@example.com", "email", "matrixrocks"),
            "4kenr7N9drpCJ4AfalmlGQVsOn3o2RHjkADUpXJWZUc"
        );
    }
}
