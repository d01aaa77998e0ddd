//! Secrets: random strings from the OS's generator (tokens, sids) and their comparison in
//! constant time.

use rand_core::{OsRng, RngCore};
use subtle::ConstantTimeEq;

pub const ALPHANUMERIC: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
pub const DIGITS: &[u8] = b"0123456789";

/// `len` characters drawn uniformly from `alphabet` (at most 256 characters long).
pub fn random_string(alphabet: &[u8], len: usize) -> String {
    assert!(!alphabet.is_empty() && alphabet.len() <= 256);
    // Rejection sampling: only bytes below the largest multiple of the alphabet's size map
    // evenly onto it.
    let n = alphabet.len();
    let limit = 256 - 256 % n;
    let mut out = String::with_capacity(len);
    while out.len() < len {
        let byte = (OsRng.next_u32() & 0xff) as usize;
        if byte < limit {
            out.push(alphabet[byte % n] as char);
        }
    }
    out
}

/// A random integer in `1..=max`.
pub fn random_below(max: u32) -> u32 {
    loop {
        let n = OsRng.next_u32() & 0x7fff_ffff;
        if (1..=max).contains(&n) {
            return n;
        }
    }
}

/// Whether two secrets are equal, in a time that does not depend on where they differ.
pub fn secrets_equal(a: &str, b: &str) -> bool {
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_use_only_the_alphabet() {
        let s = random_string(DIGITS, 6);
        assert_eq!(s.len(), 6);
        assert!(s.bytes().all(|b| b.is_ascii_digit()));
        let t = random_string(ALPHANUMERIC, 32);
        assert!(t.bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_ne!(t, random_string(ALPHANUMERIC, 32));
    }

    #[test]
    fn comparison() {
        assert!(secrets_equal("123456", "123456"));
        assert!(!secrets_equal("123456", "123457"));
        assert!(!secrets_equal("12345", "123456"));
    }
}
