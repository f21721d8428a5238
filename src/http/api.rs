//! The JSON bodies of the store API, shared by the daemon and [`crate::client`].
//! `docs/http-api.md` describes them for clients in other languages; `docs/openapi.json` is
//! the same in OpenAPI 3.1.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::record::{Body, Outcome};

/// The header carrying the id of the region a client tried before failing over.
pub const PRIOR_REGION_HEADER: &str = "idem-prior-region";
/// The header naming the region that answered (on every store API answer).
pub const REGION_HEADER: &str = "idem-region";
/// Media type of every error answer (RFC 9457).
pub const PROBLEM_JSON: &str = "application/problem+json";

/// `POST /v1/ns/{namespace}/claim`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimBody {
    /// Who the key belongs to (an account, a customer): keys of different principals never meet.
    pub principal: String,
    /// The idempotency key.
    pub key: String,
    /// 64 hex digits: the caller's 32-byte digest of the request (method, route, query,
    /// canonical body).
    pub fingerprint: String,
    /// Exactly 32 hex digits (128 random bits), fresh for every claim call and never shared
    /// between callers; re-sent only when no answer came back. Whoever presents a claim's token
    /// resumes that claim.
    pub attempt: String,
}

/// `POST /v1/ns/{namespace}/complete`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompleteBody {
    /// The key's principal.
    pub principal: String,
    /// The idempotency key.
    pub key: String,
    /// The claim id an Execute answer gave.
    pub claim: String,
    /// The response to store.
    pub outcome: OutcomeInput,
    /// What the outcome becomes, instead of what the namespace's status table says: for
    /// callers whose policy is finer (an HTTP layer storing by route). Absent: the namespace's
    /// table decides. To keep nothing, release the claim instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_as: Option<StoreAs>,
}

/// `GET /v1/ns/{namespace}/policy` as a client reads it: the fields a caller must agree on.
/// The daemon answers the whole policy; fields this struct does not know are ignored, so a
/// newer daemon still answers an older client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyAnswer {
    /// The namespace.
    pub name: String,
    /// How long a key is remembered after its first claim, ms.
    pub ttl_ms: u64,
    /// The in-flight lease a claim gets, ms.
    pub lease_ms: u64,
    /// Longest key, bytes.
    pub key_len_max: usize,
    /// Largest stored outcome (headers and body), bytes.
    pub outcome_bytes_max: usize,
    /// Response headers kept with an outcome (case-insensitive).
    pub headers_allowed: Vec<String>,
}

/// What a completion's outcome is stored as, when the caller decides (`CompleteBody::store_as`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreAs {
    /// Stored and replayed.
    Completed,
    /// Stored as indeterminate: replayed with a flag saying the request may or may not have
    /// taken effect.
    Indeterminate,
}

impl From<StoreAs> for crate::store::Disposition {
    fn from(s: StoreAs) -> Self {
        match s {
            StoreAs::Completed => Self::Store,
            StoreAs::Indeterminate => Self::Indeterminate,
        }
    }
}

/// `POST /v1/ns/{namespace}/release` (and the key part of other bodies).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseBody {
    /// The key's principal.
    pub principal: String,
    /// The idempotency key.
    pub key: String,
    /// The claim id an Execute answer gave.
    pub claim: String,
}

/// `POST /v1/ns/{namespace}/extend`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtendBody {
    /// The key's principal.
    pub principal: String,
    /// The idempotency key.
    pub key: String,
    /// The claim id an Execute answer gave.
    pub claim: String,
    /// The lease wanted from now, ms (at most the namespace's `lease_max_ms`).
    pub lease_ms: u64,
}

/// `POST /v1/ns/{namespace}/read`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadBody {
    /// The key's principal.
    pub principal: String,
    /// The idempotency key.
    pub key: String,
}

/// `POST /v1/ns/{namespace}/resolve` (operator).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolveBody {
    /// The key's principal.
    pub principal: String,
    /// The idempotency key.
    pub key: String,
    /// The item id (32 hex digits) a read listed.
    pub item: String,
    /// Who handled it.
    pub by: String,
    /// What was done.
    pub note: String,
    /// The compensation hook's result, if one ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook_result: Option<String>,
    /// The payment provider's reference for the refund, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_ref: Option<String>,
}

/// A response to store, as a caller sends it: the body as `body` (UTF-8 text) or
/// `body_base64`, not both. Unknown fields are refused (a misspelt `body` must not store an
/// empty response).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutcomeInput {
    /// The HTTP status (or an application's equivalent, 100 to 999).
    pub status: u16,
    /// Response headers as `[name, value]` pairs; the namespace keeps only its allow-list.
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// The body as UTF-8 text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// The body in standard base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_base64: Option<String>,
    /// Instead of a body: only its length and BLAKE3, for a response too large to keep (it
    /// replays as "not kept").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_digest: Option<BodyDigest>,
}

impl OutcomeInput {
    /// A response with a text body and no headers.
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            body: Some(body.into()),
            ..Self::default()
        }
    }

    /// The outcome a caller sent, checked.
    pub fn to_outcome(&self) -> Result<Outcome, String> {
        if !(100..=999).contains(&self.status) {
            return Err(format!("status {} is not 100 to 999", self.status));
        }
        let body = match (&self.body, &self.body_base64, &self.body_digest) {
            (Some(t), None, None) => Body::Full(t.clone().into_bytes()),
            (None, Some(b), None) => Body::Full(
                base64::engine::general_purpose::STANDARD
                    .decode(b)
                    .map_err(|e| format!("body_base64: {e}"))?,
            ),
            (None, None, Some(d)) => Body::Digest {
                len: d.len,
                blake3: unhex::<32>(&d.blake3).ok_or("body_digest.blake3: 64 hex digits")?,
            },
            (None, None, None) => Body::Full(Vec::new()),
            _ => return Err("send one of body, body_base64 and body_digest".into()),
        };
        Ok(Outcome {
            status: self.status,
            headers: self.headers.clone(),
            body,
        })
    }
}

impl OutcomeInput {
    /// The input form of an outcome: text when the body is UTF-8, base64 otherwise, the digest
    /// for a digest.
    pub fn from_outcome(o: &Outcome) -> Self {
        let mut i = OutcomeInput {
            status: o.status,
            headers: o.headers.clone(),
            ..Self::default()
        };
        match &o.body {
            Body::Full(b) | Body::Redacted(b) => match std::str::from_utf8(b) {
                Ok(t) => i.body = Some(t.to_owned()),
                Err(_) => i.body_base64 = Some(base64::engine::general_purpose::STANDARD.encode(b)),
            },
            Body::Digest { len, blake3 } => {
                i.body_digest = Some(BodyDigest {
                    len: *len,
                    blake3: hex(blake3),
                })
            }
        }
        i
    }
}

/// A stored response as answers carry it: `body_base64` always when a body is kept, `body` too
/// when the bytes are UTF-8, `body_digest` under a digest-only policy. Unknown fields are
/// ignored, so older clients read newer daemons' answers.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct OutcomeJson {
    /// The HTTP status (or an application's equivalent, 100 to 999).
    pub status: u16,
    /// Response headers as `[name, value]` pairs; the namespace keeps only its allow-list.
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// The body as UTF-8 text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// The body in standard base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_base64: Option<String>,
    /// Set instead of a body when the namespace keeps only digests: the body's length and
    /// BLAKE3 (hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_digest: Option<BodyDigest>,
    /// True when named JSON fields were replaced by `"[redacted]"` before storing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub redacted: bool,
}

/// What is kept of a body under a digest-only policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BodyDigest {
    /// Length in bytes.
    pub len: u64,
    /// BLAKE3, 64 hex digits.
    pub blake3: String,
}

impl OutcomeJson {
    /// The outcome this answer describes (`None` when it carries neither a body nor a
    /// digest where one was promised: a malformed answer).
    pub fn to_outcome(&self) -> Option<Outcome> {
        let body = match (&self.body_digest, self.body_bytes()) {
            (Some(d), _) => Body::Digest {
                len: d.len,
                blake3: unhex::<32>(&d.blake3)?,
            },
            (None, Some(b)) if self.redacted => Body::Redacted(b),
            (None, Some(b)) => Body::Full(b),
            (None, None) => Body::Full(Vec::new()),
        };
        Some(Outcome {
            status: self.status,
            headers: self.headers.clone(),
            body,
        })
    }

    /// The JSON form of a stored outcome.
    pub fn from_outcome(o: &Outcome) -> Self {
        let mut j = OutcomeJson {
            status: o.status,
            headers: o.headers.clone(),
            ..Default::default()
        };
        match &o.body {
            Body::Full(b) | Body::Redacted(b) => {
                j.body_base64 = Some(base64::engine::general_purpose::STANDARD.encode(b));
                j.body = std::str::from_utf8(b).ok().map(str::to_owned);
                j.redacted = matches!(o.body, Body::Redacted(_));
            }
            Body::Digest { len, blake3 } => {
                j.body_digest = Some(BodyDigest {
                    len: *len,
                    blake3: hex(blake3),
                });
            }
        }
        j
    }

    /// The body bytes, when the store kept them (full or redacted).
    pub fn body_bytes(&self) -> Option<Vec<u8>> {
        match (&self.body_base64, &self.body) {
            (Some(b), _) => base64::engine::general_purpose::STANDARD.decode(b).ok(),
            (None, Some(t)) => Some(t.clone().into_bytes()),
            (None, None) => None,
        }
    }
}

/// A claim's answer when it is Execute or Replay (HTTP 200). In flight (409), mismatch (422)
/// and unavailable (503) come as problem details with a `decision` member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum ClaimAnswer {
    /// You own the key: run the operation, then complete, release or extend the claim.
    Execute {
        /// The claim id to complete, release or extend.
        claim: String,
        /// When the lease ends unless extended, Unix ms.
        lease_until_ms: u64,
        /// When the key expires, Unix ms.
        expires_at_ms: u64,
        /// Claims whose leases ran out and which this one replaces.
        took_over: Vec<String>,
        /// True when this is the claim the same attempt token got before (an answer was lost).
        resumed: bool,
    },
    /// Already done: the stored response.
    Replay {
        /// The claim whose outcome this is.
        claim: String,
        /// The stored response.
        outcome: OutcomeJson,
        /// True when the outcome was stored as indeterminate (a side effect may have happened).
        indeterminate: bool,
        /// When the key expires, Unix ms.
        expires_at_ms: u64,
    },
}

/// The answer to complete and release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinishAnswer {
    /// How the claim ended: `completed`, `indeterminate` or `released` (a status the namespace
    /// does not store releases the claim, so a corrected retry runs).
    pub terminal: String,
    /// True when the claim no longer wins its key (taken over, or an earlier claim arrived
    /// from another region): the execution will be flagged for compensation.
    pub superseded: bool,
}

/// The answer to extend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtendAnswer {
    /// The lease's end now, Unix ms.
    pub lease_until_ms: u64,
}

/// The answer to read: the key's claims and compensation items.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadAnswer {
    /// Every claim this region holds for the key, oldest first.
    pub claims: Vec<ClaimView>,
    /// The current generation's winner, if it has one.
    pub winner: Option<String>,
    /// Compensation items derived from the record.
    pub items: Vec<ItemView>,
}

/// One claim of a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimView {
    /// Its id (stamp).
    pub claim: String,
    /// The region that made it.
    pub region: String,
    /// `in_flight`, `completed`, `indeterminate`, `released` or `placeholder`.
    pub status: String,
    /// Its request fingerprint (hex), unless a placeholder.
    pub fingerprint: Option<String>,
    /// Its lease end, Unix ms.
    pub lease_until_ms: u64,
    /// Its outcome, if it has one.
    pub outcome: Option<OutcomeJson>,
}

/// A compensation item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemView {
    /// Item id, 32 hex digits.
    pub id: String,
    /// `duplicate`, `key_reuse`, `verify`, `orphan` or `reversed`.
    pub kind: String,
    /// The claim the item is about.
    pub claim: String,
    /// Whether it may be acted on now (its winner completed and the key is stable here).
    pub actionable: bool,
    /// Whether it was resolved.
    pub resolved: bool,
}

/// The answer to resolve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolveAnswer {
    /// The resolution's stamp.
    pub at: String,
}

/// `GET /v1/status` (operator).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusAnswer {
    /// This region.
    pub region: String,
    /// Whether the store answers claims now (see `/readyz`).
    pub ready: bool,
    /// Why not, if not.
    pub reason: Option<String>,
    /// Keys held in the index.
    pub keys: u64,
    /// Bytes of log segments on disk.
    pub log_bytes: u64,
    /// Log segments on disk.
    pub log_segments: u64,
    /// The namespaces served.
    pub namespaces: Vec<String>,
}

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Bytes from hex of exactly `N` bytes, or `None`.
pub fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
        let text = std::str::from_utf8(chunk).ok()?;
        out[i] = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

/// An attempt token: exactly 32 hex digits (128 bits). Shorter tokens are refused: callers
/// that picked small numbers would share tokens, and a shared token resumes another caller's
/// claim.
pub fn parse_attempt(s: &str) -> Option<u128> {
    if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u128::from_str_radix(s, 16).ok()
}

/// An attempt token's text form (32 hex digits).
pub fn format_attempt(token: u128) -> String {
    format!("{token:032x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_round_trip_through_json() {
        let o = Outcome {
            status: 201,
            headers: vec![("content-type".into(), "application/json".into())],
            body: Body::Full(br#"{"id":"ch_1"}"#.to_vec()),
        };
        let j = OutcomeJson::from_outcome(&o);
        assert_eq!(j.body.as_deref(), Some(r#"{"id":"ch_1"}"#));
        let sent = OutcomeInput {
            status: j.status,
            headers: j.headers.clone(),
            body: None,
            body_base64: j.body_base64.clone(),
            body_digest: None,
        };
        assert_eq!(sent.to_outcome().unwrap(), o);
        // Both ways between stored outcomes and the JSON forms, digests and binary included.
        for body in [
            Body::Full(b"text".to_vec()),
            Body::Full(vec![0xff, 0, 1]),
            Body::digest_of(&Body::Full(vec![7; 100])),
        ] {
            let o = Outcome { body, ..o.clone() };
            assert_eq!(OutcomeInput::from_outcome(&o).to_outcome().unwrap(), o);
            assert_eq!(OutcomeJson::from_outcome(&o).to_outcome().unwrap(), o);
        }
        let two = OutcomeInput {
            body: Some("a".into()),
            body_digest: Some(BodyDigest {
                len: 1,
                blake3: "00".repeat(32),
            }),
            ..OutcomeInput::default()
        };
        assert!(two.to_outcome().is_err());
        // Answers tolerate fields a newer daemon may add; inputs refuse unknown ones.
        let newer = r#"{"status":200,"body":"a","since":"v2"}"#;
        assert!(serde_json::from_str::<OutcomeJson>(newer).is_ok());
        assert!(serde_json::from_str::<OutcomeInput>(newer).is_err());
        let binary = Outcome::new(200, vec![0xff, 0, 1]);
        let j = OutcomeJson::from_outcome(&binary);
        assert_eq!(j.body, None);
        assert_eq!(j.body_bytes(), Some(vec![0xff, 0, 1]));
    }

    #[test]
    fn bad_outcomes_are_refused() {
        let both = OutcomeInput {
            status: 200,
            body: Some("a".into()),
            body_base64: Some("YQ==".into()),
            ..Default::default()
        };
        assert!(both.to_outcome().is_err());
        let status = OutcomeInput {
            status: 42,
            ..Default::default()
        };
        assert!(status.to_outcome().is_err());
        let b64 = OutcomeInput {
            status: 200,
            body_base64: Some("!!".into()),
            ..Default::default()
        };
        assert!(b64.to_outcome().is_err());
    }

    #[test]
    fn hex_and_attempts_parse_strictly() {
        assert_eq!(unhex::<2>("0aff"), Some([0x0a, 0xff]));
        assert_eq!(unhex::<2>("0af"), None);
        assert_eq!(unhex::<2>("0afg"), None);
        assert_eq!(unhex::<1>("+f"), None);
        assert_eq!(hex(&[0x0a, 0xff]), "0aff");
        assert_eq!(parse_attempt(&format_attempt(255)), Some(255));
        assert_eq!(parse_attempt("ff"), None, "short tokens would be shared");
        assert_eq!(parse_attempt(""), None);
        assert_eq!(parse_attempt(&"f".repeat(33)), None);
        assert_eq!(parse_attempt(&format!("+{}", "1".repeat(31))), None);
    }
}
