//! The API key format: `mgk_<id><secret>_<check>`.
//!
//! - `id`: 8 base62 characters, public; it names the key in listings, logs and the audit trail.
//! - `secret`: 32 base62 characters (about 190 bits) from the operating system's CSPRNG.
//! - `check`: CRC-32 of everything before the last `_`, as 6 base62 characters, so a mistyped or
//!   truncated key is refused without a lookup, and secret scanners can recognise a real one.
//!
//! The store keeps only the id and the SHA-256 of the whole key; a high-entropy key needs no
//! slow password hash.

use rand::Rng;
use sha2::{Digest, Sha256};

pub const PREFIX: &str = "mgk_";
pub const ID_LEN: usize = 8;
pub const SECRET_LEN: usize = 32;
const CHECK_LEN: usize = 6;
/// Length of every well-formed key.
pub const KEY_LEN: usize = PREFIX.len() + ID_LEN + SECRET_LEN + 1 + CHECK_LEN;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Why a string is not an API key. Deliberately says nothing about the string itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FormatError {
    Malformed,
    BadChecksum,
}

/// A well-formed key, borrowed from the request.
#[derive(Debug, Clone, Copy)]
pub struct ParsedKey<'a> {
    pub id: &'a str,
    pub full: &'a str,
}

/// A new key; returns (key, id).
pub fn generate() -> (String, String) {
    let mut rng = rand::rng();
    let mut key = String::with_capacity(KEY_LEN);
    key.push_str(PREFIX);
    for _ in 0..ID_LEN + SECRET_LEN {
        key.push(BASE62[rng.random_range(0..62)] as char);
    }
    let check = checksum(&key);
    key.push('_');
    key.extend(check.iter().map(|&b| b as char));
    let id = key[PREFIX.len()..PREFIX.len() + ID_LEN].to_owned();
    (key, id)
}

/// The CRC-32 of `body` as 6 base62 characters (ASCII).
fn checksum(body: &str) -> [u8; CHECK_LEN] {
    let mut n = crc32fast::hash(body.as_bytes());
    let mut out = [b'0'; CHECK_LEN];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    out
}

/// Checks shape and checksum; touches no store.
pub fn parse(s: &str) -> Result<ParsedKey<'_>, FormatError> {
    if s.len() != KEY_LEN || !s.is_ascii() || !s.starts_with(PREFIX) {
        return Err(FormatError::Malformed);
    }
    let (body, check) = s.split_at(KEY_LEN - CHECK_LEN - 1);
    let Some(check) = check.strip_prefix('_') else {
        return Err(FormatError::Malformed);
    };
    if !body[PREFIX.len()..]
        .bytes()
        .chain(check.bytes())
        .all(|b| b.is_ascii_alphanumeric())
    {
        return Err(FormatError::Malformed);
    }
    if checksum(body) != check.as_bytes() {
        return Err(FormatError::BadChecksum);
    }
    Ok(ParsedKey {
        id: &body[PREFIX.len()..PREFIX.len() + ID_LEN],
        full: s,
    })
}

/// SHA-256 of the whole key.
pub fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

pub fn digest_hex(key: &str) -> String {
    digest(key).iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses a hex digest as stored.
pub fn parse_digest_hex(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_and_any_single_change_is_caught() {
        for _ in 0..100 {
            let (key, id) = generate();
            assert_eq!(key.len(), KEY_LEN);
            let parsed = parse(&key).unwrap();
            assert_eq!(parsed.id, id);
            // Change each position of the body to another base62 letter.
            for pos in PREFIX.len()..KEY_LEN - CHECK_LEN - 1 {
                let mut bytes = key.clone().into_bytes();
                bytes[pos] = if bytes[pos] == b'a' { b'b' } else { b'a' };
                let changed = String::from_utf8(bytes).unwrap();
                assert_eq!(parse(&changed).unwrap_err(), FormatError::BadChecksum);
            }
        }
        let (key, _) = generate();
        assert_eq!(parse(&key[1..]).unwrap_err(), FormatError::Malformed);
        assert_eq!(
            parse(&format!("{key}x")).unwrap_err(),
            FormatError::Malformed
        );
        assert_eq!(
            parse(&key.replace("mgk_", "mgx_")).unwrap_err(),
            FormatError::Malformed
        );
        assert_eq!(parse("").unwrap_err(), FormatError::Malformed);
        // Multi-byte characters at the split point are refused, not a panic.
        let wide = format!(
            "mgk_{}é_{}",
            "a".repeat(ID_LEN + SECRET_LEN - 1),
            "a".repeat(5)
        );
        assert_eq!(wide.len(), KEY_LEN);
        assert_eq!(parse(&wide).unwrap_err(), FormatError::Malformed);
        let mut bad = key.into_bytes();
        bad[10] = b'-';
        assert_eq!(
            parse(std::str::from_utf8(&bad).unwrap()).unwrap_err(),
            FormatError::Malformed
        );
    }

    #[test]
    fn digests_round_trip_through_hex() {
        let (key, _) = generate();
        assert_eq!(parse_digest_hex(&digest_hex(&key)), Some(digest(&key)));
        assert_eq!(parse_digest_hex("zz"), None);
    }
}
