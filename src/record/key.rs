//! What a record is keyed by, and the digests derived from it.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::clock::Stamp;

/// A key's full identity: clients never share a lookup key across namespaces or principals.
///
/// Immutable once built: the 16-byte digest the store's index is keyed by is computed once, when
/// the key is made (or decoded), and every operation on the key reuses it.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(from = "KeyParts", into = "KeyParts")]
pub struct RecordKey {
    namespace: String,
    principal: String,
    key: String,
    /// Derived from the three parts (so it may sit in the derived comparisons).
    digest: KeyDigest,
}

/// How a [`RecordKey`] is encoded: its three parts, in this order.
#[derive(Serialize, Deserialize)]
struct KeyParts {
    namespace: String,
    principal: String,
    key: String,
}

impl From<KeyParts> for RecordKey {
    fn from(p: KeyParts) -> Self {
        RecordKey::new(p.namespace, p.principal, p.key)
    }
}

impl From<RecordKey> for KeyParts {
    fn from(k: RecordKey) -> Self {
        KeyParts {
            namespace: k.namespace,
            principal: k.principal,
            key: k.key,
        }
    }
}

/// The BLAKE3 key of the key-digest function: `blake3::derive_key("idem record key digest v2",
/// b"")`, fixed here so the digest needs no context hashing (a test recomputes it). Keyed
/// hashing with no domain tag in the input lets typical keys (namespace, principal and key up
/// to about 60 bytes in all) fit BLAKE3's one 64-byte block.
#[cfg(test)]
const DIGEST_KEY_CONTEXT: &str = "idem record key digest v2";
const DIGEST_KEY: [u8; 32] = [
    0x12, 0xe9, 0x3c, 0xae, 0x09, 0x42, 0x26, 0x6c, 0xd4, 0x1d, 0xd9, 0x19, 0x0f, 0x58, 0x0b, 0xf2,
    0x95, 0x8b, 0x1c, 0x23, 0xe9, 0x3b, 0xe9, 0xa9, 0x41, 0xf9, 0xcc, 0x25, 0x86, 0x08, 0x50, 0xb8,
];

/// Appends `n` as LEB128 (7 bits per byte, low first): one byte below 128, and unambiguous for
/// any length, so parts stay separated whatever their lengths.
fn put_len(buf: &mut Vec<u8>, mut n: usize) {
    while n >= 0x80 {
        buf.push((n as u8) | 0x80);
        n >>= 7;
    }
    buf.push(n as u8);
}

impl RecordKey {
    /// Builds a key from its three parts, and computes its digest.
    pub fn new(
        namespace: impl Into<String>,
        principal: impl Into<String>,
        key: impl Into<String>,
    ) -> Self {
        let (namespace, principal, key) = (namespace.into(), principal.into(), key.into());
        let digest = digest_of(&namespace, &principal, &key);
        Self {
            namespace,
            principal,
            key,
            digest,
        }
    }

    /// Tenant or API surface whose policy applies.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Who sent the request (an account, an API key id); scopes the key.
    pub fn principal(&self) -> &str {
        &self.principal
    }

    /// The client's idempotency key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The 16-byte digest the in-memory index is keyed by: keyed BLAKE3 of the three parts,
    /// each prefixed by its LEB128 length (so `("ab","c")` and `("a","bc")` differ). Computed
    /// when the key was made.
    pub fn digest(&self) -> KeyDigest {
        self.digest
    }
}

/// See [`RecordKey::digest`].
fn digest_of(namespace: &str, principal: &str, key: &str) -> KeyDigest {
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let hash = |buf: &mut Vec<u8>| {
        buf.clear();
        for part in [namespace, principal, key] {
            put_len(buf, part.len());
            buf.extend_from_slice(part.as_bytes());
        }
        let mut out = [0u8; 16];
        out.copy_from_slice(&blake3::keyed_hash(&DIGEST_KEY, buf).as_bytes()[..16]);
        let keep = buf.capacity() <= 4096;
        (KeyDigest(out), keep)
    };
    BUF.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            let (d, keep) = hash(&mut buf);
            if !keep {
                *buf = Vec::new();
            }
            d
        }
        Err(_) => hash(&mut Vec::new()).0,
    })
}

impl fmt::Debug for RecordKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.namespace, self.principal, self.key)
    }
}

/// 128-bit digest of a [`RecordKey`]; the in-memory index key. The full key is kept in the log
/// and compared on every read back, so a digest collision is detected, never served.
///
/// Its `Hash` impl (in the store's index module) feeds the digest to the index's hasher as
/// two big-endian words.
#[derive(Clone, Copy, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct KeyDigest(pub [u8; 16]);

/// One 128-bit comparison (the derived one called `memcmp`, on every index probe).
impl PartialEq for KeyDigest {
    #[inline]
    fn eq(&self, other: &Self) -> bool {
        u128::from_ne_bytes(self.0) == u128::from_ne_bytes(other.0)
    }
}

impl KeyDigest {
    /// The first eight bytes as a big-endian integer: the digest's order-preserving prefix.
    pub fn prefix_u64(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[..8]);
        u64::from_be_bytes(b)
    }
}

impl fmt::Debug for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// 32-byte digest of a request (method, route, query, canonical body). Two requests with the
/// same key and different fingerprints are a mismatch.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// BLAKE3 of arbitrary bytes: a convenience for callers that have already canonicalised
    /// their request.
    pub fn of(bytes: &[u8]) -> Self {
        Self(*blake3::hash(bytes).as_bytes())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..6] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// A token the caller picks per attempt and re-sends only when it never received an answer, so
/// that a crash between fsync and reply does not block the key for a whole lease.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AttemptToken(pub u128);

impl fmt::Debug for AttemptToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// A compensation item's id: digest of (namespace, principal, key, claim stamp). It does not
/// depend on generation numbering, so every region names the same item the same way.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ItemId(pub [u8; 16]);

impl ItemId {
    /// The id of the item about claim `stamp` of `key`.
    pub fn of(key: &RecordKey, stamp: &Stamp) -> Self {
        let mut h = blake3::Hasher::new();
        h.update(b"idem.item.v1");
        for part in [&key.namespace, &key.principal, &key.key] {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        h.update(&stamp.hlc.to_le_bytes());
        h.update(&[stamp.region.as_bytes().len() as u8]);
        h.update(stamp.region.as_bytes());
        let mut out = [0u8; 16];
        out.copy_from_slice(&h.finalize().as_bytes()[..16]);
        Self(out)
    }
}

impl fmt::Debug for ItemId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Display for ItemId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_parts_are_length_prefixed() {
        let a = RecordKey::new("ab", "c", "k").digest();
        let b = RecordKey::new("a", "bc", "k").digest();
        assert_ne!(a, b);
    }

    #[test]
    fn the_digest_is_keyed_blake3_of_length_prefixed_parts() {
        assert_eq!(
            DIGEST_KEY,
            blake3::derive_key(DIGEST_KEY_CONTEXT, b""),
            "the fixed key is the derived one"
        );
        let k = RecordKey::new("pay", "alice", "k1");
        let mut h = blake3::Hasher::new_keyed(&DIGEST_KEY);
        for part in ["pay", "alice", "k1"] {
            h.update(&[part.len() as u8]);
            h.update(part.as_bytes());
        }
        assert_eq!(k.digest().0, h.finalize().as_bytes()[..16]);
        // Long parts take multi-byte length prefixes: still distinct, still stable.
        let long = RecordKey::new("pay", "alice", "x".repeat(300));
        assert_ne!(long.digest(), k.digest());
        assert_eq!(
            long.digest(),
            RecordKey::new("pay", "alice", "x".repeat(300)).digest()
        );
        let mut buf = Vec::new();
        put_len(&mut buf, 300);
        assert_eq!(buf, [0xac, 0x02]);
    }

    #[test]
    fn decoding_a_key_recomputes_its_digest() {
        let k = RecordKey::new("pay", "alice", "k1");
        let cfg = bincode::config::standard();
        let bytes = bincode::serde::encode_to_vec(&k, cfg).unwrap();
        // Encoded as the three strings only.
        let parts = ("pay".to_string(), "alice".to_string(), "k1".to_string());
        assert_eq!(bytes, bincode::serde::encode_to_vec(&parts, cfg).unwrap());
        let (back, _): (RecordKey, usize) = bincode::serde::decode_from_slice(&bytes, cfg).unwrap();
        assert_eq!(back, k);
        assert_eq!(back.digest(), k.digest());
    }

    #[test]
    fn scope_matters() {
        let a = RecordKey::new("pay", "alice", "k1").digest();
        let b = RecordKey::new("pay", "bob", "k1").digest();
        assert_ne!(a, b);
        assert_eq!(a, RecordKey::new("pay", "alice", "k1").digest());
    }
}
