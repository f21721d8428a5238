//! Region ids and stamps: the total order that first-writer-wins decides by.

use std::cmp::Ordering;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest region id, in bytes. Region ids are short names from config (`eu-west`, `us1`).
pub const REGION_ID_LEN_MAX: usize = 15;

/// Number of low bits of an hlc value that hold hlc-gen's logical counter.
pub const HLC_LOGICAL_BITS: u32 = 22;

/// hlc-gen's epoch (2024-01-01T00:00:00Z) in Unix milliseconds: hlc values count from here.
pub const HLC_EPOCH_UNIX_MS: u64 = 1_704_067_200_000;

/// Why a string is not a valid region id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegionIdError {
    /// The id is empty.
    #[error("region id is empty")]
    Empty,
    /// The id is longer than [`REGION_ID_LEN_MAX`] bytes.
    #[error("region id {0:?} is longer than {REGION_ID_LEN_MAX} bytes")]
    TooLong(String),
    /// The id holds a byte other than `a-z`, `0-9`, `-` or `_`.
    #[error("region id {0:?} may hold only a-z, 0-9, '-' and '_'")]
    BadByte(String),
}

/// A region's id: 1 to 15 bytes of `a-z0-9-_`, stored inline so that stamps are `Copy`.
///
/// Ordered by its bytes: the byte order of region ids breaks ties between equal hlc values.
#[derive(Clone, Copy, Eq)]
pub struct RegionId {
    len: u8,
    bytes: [u8; REGION_ID_LEN_MAX],
}

/// Compares all 16 bytes at once (the derived comparison called `memcmp`; stamps are compared
/// on every claim lookup).
impl PartialEq for RegionId {
    #[inline]
    fn eq(&self, other: &Self) -> bool {
        self.packed() == other.packed()
    }
}

/// Hashes the same word equality compares, so the two agree.
impl std::hash::Hash for RegionId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.packed().hash(state);
    }
}

impl RegionId {
    /// The length and the bytes as one 128-bit word.
    #[inline]
    fn packed(&self) -> u128 {
        let mut b = [0u8; 16];
        b[0] = self.len;
        b[1..].copy_from_slice(&self.bytes);
        u128::from_le_bytes(b)
    }

    /// Parses and validates a region id.
    pub fn new(id: &str) -> Result<Self, RegionIdError> {
        if id.is_empty() {
            return Err(RegionIdError::Empty);
        }
        if id.len() > REGION_ID_LEN_MAX {
            return Err(RegionIdError::TooLong(id.to_owned()));
        }
        if !id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            return Err(RegionIdError::BadByte(id.to_owned()));
        }
        let mut bytes = [0u8; REGION_ID_LEN_MAX];
        bytes[..id.len()].copy_from_slice(id.as_bytes());
        Ok(Self {
            len: id.len() as u8,
            bytes,
        })
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        // Only validated ASCII is ever stored.
        std::str::from_utf8(&self.bytes[..self.len as usize]).unwrap_or("?")
    }

    /// The id's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

impl Ord for RegionId {
    fn cmp(&self, other: &Self) -> Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}

impl PartialOrd for RegionId {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Debug for RegionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.as_str())
    }
}

impl fmt::Display for RegionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for RegionId {
    type Err = RegionIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl Serialize for RegionId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for RegionId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Self::new(&s).map_err(serde::de::Error::custom)
    }
}

/// A claim's identity and its place in the total order: hlc value first, region id second.
///
/// The derived order compares `hlc` before `region`, which is the order first-writer-wins uses.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Stamp {
    /// hlc-gen's raw `HlcTimestamp` value: 42 bits of milliseconds since 2024, 22 bits of counter.
    pub hlc: u64,
    /// The region that issued the stamp.
    pub region: RegionId,
}

impl Stamp {
    /// Builds a stamp from its parts.
    pub fn new(hlc: u64, region: RegionId) -> Self {
        Self { hlc, region }
    }

    /// The physical part of the hlc value, in Unix milliseconds.
    pub fn physical_ms(&self) -> u64 {
        hlc_physical_ms(self.hlc)
    }

    /// The logical counter of the hlc value.
    pub fn logical(&self) -> u64 {
        self.hlc & ((1 << HLC_LOGICAL_BITS) - 1)
    }
}

/// The physical part of a raw hlc value, in Unix milliseconds.
pub fn hlc_physical_ms(hlc: u64) -> u64 {
    (hlc >> HLC_LOGICAL_BITS) + HLC_EPOCH_UNIX_MS
}

/// The smallest raw hlc value whose physical part is `unix_ms` (saturating below the epoch).
pub fn hlc_floor_of_ms(unix_ms: u64) -> u64 {
    unix_ms.saturating_sub(HLC_EPOCH_UNIX_MS) << HLC_LOGICAL_BITS
}

impl fmt::Debug for Stamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{}@{}",
            self.physical_ms(),
            self.logical(),
            self.region
        )
    }
}

impl fmt::Display for Stamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Why a stamp's text form (`<unix ms>.<logical>@<region>`, as [`Stamp`]'s `Display` writes it)
/// was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StampParseError {
    /// Not of the form `<unix ms>.<logical>@<region>`.
    #[error("a claim id looks like <unix ms>.<logical>@<region>, e.g. 1795000000123.0@eu1")]
    Shape,
    /// The time is before the hlc epoch or too large, or the counter exceeds 22 bits.
    #[error("claim id out of range")]
    Range,
    /// The region part is not a valid region id.
    #[error(transparent)]
    Region(#[from] RegionIdError),
}

impl std::str::FromStr for Stamp {
    type Err = StampParseError;

    /// Parses the `Display` form back: `Stamp::from_str(&s.to_string()) == Ok(s)`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (time, region) = s.split_once('@').ok_or(StampParseError::Shape)?;
        let (ms, logical) = time.split_once('.').ok_or(StampParseError::Shape)?;
        let digits =
            |t: &str| !t.is_empty() && t.len() <= 20 && t.bytes().all(|b| b.is_ascii_digit());
        if !digits(ms) || !digits(logical) {
            return Err(StampParseError::Shape);
        }
        let ms: u64 = ms.parse().map_err(|_| StampParseError::Range)?;
        let logical: u64 = logical.parse().map_err(|_| StampParseError::Range)?;
        let since_epoch = ms
            .checked_sub(HLC_EPOCH_UNIX_MS)
            .ok_or(StampParseError::Range)?;
        if logical >= 1 << HLC_LOGICAL_BITS || since_epoch >= 1 << (64 - HLC_LOGICAL_BITS) {
            return Err(StampParseError::Range);
        }
        Ok(Stamp::new(
            (since_epoch << HLC_LOGICAL_BITS) | logical,
            RegionId::new(region)?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_parse_back_from_their_text_form() {
        let r = RegionId::new("eu-1").unwrap();
        for hlc in [0, 1, (5 << HLC_LOGICAL_BITS) | 7, u64::MAX] {
            let s = Stamp::new(hlc, r);
            assert_eq!(s.to_string().parse::<Stamp>(), Ok(s));
        }
        for bad in [
            "",
            "1.0",
            "x.0@eu1",
            "1795000000000@eu1",
            "1.0@eu1",
            "1795000000000.4194304@eu1",
        ] {
            assert!(bad.parse::<Stamp>().is_err(), "{bad}");
        }
        assert!(matches!(
            "1795000000000.0@EU".parse::<Stamp>(),
            Err(StampParseError::Region(_))
        ));
    }

    #[test]
    fn region_ids_validate() {
        assert!(RegionId::new("eu-west_1").is_ok());
        assert_eq!(RegionId::new(""), Err(RegionIdError::Empty));
        assert!(matches!(
            RegionId::new("EU"),
            Err(RegionIdError::BadByte(_))
        ));
        assert!(matches!(
            RegionId::new("a-very-long-region-name"),
            Err(RegionIdError::TooLong(_))
        ));
    }

    #[test]
    fn region_ids_order_by_bytes_not_length() {
        let a = RegionId::new("b").unwrap();
        let b = RegionId::new("aa").unwrap();
        assert!(b < a, "\"aa\" sorts before \"b\"");
    }

    #[test]
    fn stamps_order_by_hlc_then_region() {
        let a = RegionId::new("a").unwrap();
        let b = RegionId::new("b").unwrap();
        assert!(Stamp::new(5, b) < Stamp::new(6, a));
        assert!(Stamp::new(5, a) < Stamp::new(5, b));
    }

    #[test]
    fn hlc_physical_round_trips() {
        let ms = HLC_EPOCH_UNIX_MS + 123_456;
        let hlc = hlc_floor_of_ms(ms) | 7;
        assert_eq!(hlc_physical_ms(hlc), ms);
        assert_eq!(Stamp::new(hlc, RegionId::new("a").unwrap()).logical(), 7);
    }

    #[test]
    fn region_id_serde_rejects_invalid() {
        let id = RegionId::new("us1").unwrap();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"us1\"");
        assert!(serde_json::from_str::<RegionId>("\"US 1\"").is_err());
    }
}
