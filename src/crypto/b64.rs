//! Unpadded base64 as Matrix uses it: standard alphabet on output, and a decoder as lenient as
//! Python's `unpaddedbase64` (padding optional, either alphabet, trailing bits allowed).

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine;

const LENIENT: GeneralPurposeConfig = GeneralPurposeConfig::new()
    .with_encode_padding(false)
    .with_decode_padding_mode(DecodePaddingMode::Indifferent)
    .with_decode_allow_trailing_bits(true);
const STANDARD: GeneralPurpose = GeneralPurpose::new(&alphabet::STANDARD, LENIENT);
const URL_SAFE: GeneralPurpose = GeneralPurpose::new(&alphabet::URL_SAFE, LENIENT);

/// Standard alphabet, no padding: signatures and long-term public keys.
pub fn encode_base64(bytes: impl AsRef<[u8]>) -> String {
    STANDARD.encode(bytes)
}

/// URL-safe alphabet, no padding: lookup hashes and ephemeral invite keys.
pub fn encode_base64_urlsafe(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE.encode(bytes)
}

/// Decodes either alphabet, with or without padding.
pub fn decode_base64(text: &str) -> Option<Vec<u8>> {
    if text.contains(['-', '_']) {
        URL_SAFE.decode(text).ok()
    } else {
        STANDARD.decode(text).ok()
    }
}

/// [`decode_base64`] of exactly 32 bytes (a lookup hash), without allocating.
pub fn decode_base64_32(text: &str) -> Option<[u8; 32]> {
    // 43 characters unpadded, 44 padded; anything longer is not 32 bytes.
    if text.len() > 44 {
        return None;
    }
    let mut out = [0u8; 33];
    let engine = if text.contains(['-', '_']) {
        &URL_SAFE
    } else {
        &STANDARD
    };
    let n = engine.decode_slice(text, &mut out).ok()?;
    (n == 32).then(|| out[..32].try_into().expect("32 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thirty_two_bytes_decode_in_place() {
        let bytes = [0xfb_u8; 32];
        for text in [encode_base64(bytes), encode_base64_urlsafe(bytes)] {
            assert_eq!(decode_base64_32(&text), Some(bytes));
            assert_eq!(decode_base64_32(&format!("{text}=")), Some(bytes));
        }
        assert_eq!(decode_base64_32(&encode_base64([1u8; 31])), None);
        assert_eq!(decode_base64_32(&encode_base64([1u8; 33])), None);
        assert_eq!(decode_base64_32("not base64 at all!"), None);
    }

    #[test]
    fn decodes_both_alphabets_with_and_without_padding() {
        let bytes = [0xfb_u8, 0xff, 0x01];
        assert_eq!(encode_base64(bytes), "+/8B");
        assert_eq!(encode_base64_urlsafe(bytes), "-_8B");
        assert_eq!(decode_base64("+/8B").unwrap(), bytes);
        assert_eq!(decode_base64("-_8B").unwrap(), bytes);
        assert_eq!(decode_base64("AQ==").unwrap(), [1]);
        assert_eq!(decode_base64("AQ").unwrap(), [1]);
        assert!(decode_base64("not base64!").is_none());
    }
}
