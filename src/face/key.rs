//! The `Idempotency-Key` request header: a Structured Field string (`"8e03978e-40d5"`, RFC 8941
//! and the IETF idempotency-key draft) or, as many clients send it, a bare value (any printable
//! ASCII not starting with `"`: UUIDs, base64). Both forms of the same characters are the same
//! key.

use axum::http::{HeaderMap, HeaderName};

/// The header's name.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// Why a request's `Idempotency-Key` is refused (each a 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The route requires a key and the request has none.
    #[error("this route requires an Idempotency-Key header")]
    Missing,
    /// More than one `Idempotency-Key` header line.
    #[error("Idempotency-Key is repeated ({0} header lines); send exactly one")]
    Repeated(usize),
    /// Empty, or only whitespace, or an empty quoted string.
    #[error("Idempotency-Key is empty")]
    Empty,
    /// Longer than the namespace allows.
    #[error("Idempotency-Key is {len} characters; at most {max} are allowed")]
    TooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A byte outside printable ASCII (0x20 to 0x7e).
    #[error(
        "Idempotency-Key holds a character that is not printable ASCII (byte {byte:#04x} at {at})"
    )]
    NotPrintable {
        /// The byte.
        byte: u8,
        /// Its position in the header value.
        at: usize,
    },
    /// A value starting with `"` that is not a valid Structured Field string.
    #[error("Idempotency-Key starts with '\"' but is not a valid quoted string: {0}")]
    BadQuoted(&'static str),
}

/// The key a request carries, if any: `Ok(None)` when there is no `Idempotency-Key` header.
/// `max_len` bounds the key's characters (after unquoting).
pub fn request_key(headers: &HeaderMap, max_len: usize) -> Result<Option<String>, KeyError> {
    let mut values = headers.get_all(IDEMPOTENCY_KEY).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    let more = values.count();
    if more > 0 {
        return Err(KeyError::Repeated(more + 1));
    }
    parse(value.as_bytes(), max_len).map(Some)
}

/// Parses one header value (see the module's documentation).
pub fn parse(raw: &[u8], max_len: usize) -> Result<String, KeyError> {
    // Leading and trailing whitespace is not part of a field value (RFC 9110 §5.5).
    let start = raw
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t'))
        .unwrap_or(raw.len());
    let end = raw
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t'))
        .map_or(start, |i| i + 1);
    let v = &raw[start..end];
    if let Some((at, &byte)) = v
        .iter()
        .enumerate()
        .find(|(_, b)| !(0x20..=0x7e).contains(*b))
    {
        return Err(KeyError::NotPrintable {
            byte,
            at: at + start,
        });
    }
    let key = match v.first() {
        None => return Err(KeyError::Empty),
        Some(b'"') => unquote(v)?,
        // Two header lines folded into one by an intermediary read `k1, k2`: refuse rather
        // than take them for one key (keys are UUIDs or base64, which hold no comma).
        Some(_) if v.contains(&b',') => return Err(KeyError::Repeated(2)),
        // Printable ASCII only, checked above.
        Some(_) => String::from_utf8_lossy(v).into_owned(),
    };
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if key.len() > max_len {
        return Err(KeyError::TooLong {
            len: key.len(),
            max: max_len,
        });
    }
    Ok(key)
}

/// An RFC 8941 sf-string: `"` then printable ASCII where `"` and `\` appear only escaped by `\`,
/// then `"`. Parameters after it are not accepted.
fn unquote(v: &[u8]) -> Result<String, KeyError> {
    let mut out = String::with_capacity(v.len());
    let mut i = 1;
    while i < v.len() {
        match v[i] {
            b'"' => {
                return if i + 1 == v.len() {
                    Ok(out)
                } else {
                    Err(KeyError::BadQuoted(
                        "characters after the closing quote (parameters are not accepted)",
                    ))
                };
            }
            b'\\' => match v.get(i + 1) {
                Some(&c @ (b'"' | b'\\')) => {
                    out.push(char::from(c));
                    i += 2;
                }
                _ => {
                    return Err(KeyError::BadQuoted(
                        "a backslash may only escape '\"' or '\\'",
                    ))
                }
            },
            c => {
                out.push(char::from(c));
                i += 1;
            }
        }
    }
    Err(KeyError::BadQuoted("no closing quote"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn one(v: &str) -> Result<Option<String>, KeyError> {
        let mut h = HeaderMap::new();
        h.insert(IDEMPOTENCY_KEY, HeaderValue::from_str(v).unwrap());
        request_key(&h, 255)
    }

    #[test]
    fn quoted_and_bare_forms_of_a_key_are_the_same_key() {
        let uuid = "8e03978e-40d5-43e8-bc93-6894a57f9324";
        assert_eq!(one(uuid).unwrap().as_deref(), Some(uuid));
        assert_eq!(one(&format!("\"{uuid}\"")).unwrap().as_deref(), Some(uuid));
        assert_eq!(
            one(&format!("  \"{uuid}\"\t")).unwrap().as_deref(),
            Some(uuid)
        );
        // base64 (with '+', '/' and '=') works bare.
        assert_eq!(one("q+/Ab==").unwrap().as_deref(), Some("q+/Ab=="));
        // Escapes in the quoted form.
        assert_eq!(one(r#""a\"b\\c""#).unwrap().as_deref(), Some(r#"a"b\c"#));
        // Inner spaces are printable.
        assert_eq!(one("a b").unwrap().as_deref(), Some("a b"));
        // A comma inside quotes is part of the key.
        assert_eq!(one("\"a,b\"").unwrap().as_deref(), Some("a,b"));
    }

    #[test]
    fn missing_repeated_empty_long_and_unprintable_keys_are_refused() {
        assert_eq!(request_key(&HeaderMap::new(), 255), Ok(None));
        let mut h = HeaderMap::new();
        h.append(IDEMPOTENCY_KEY, HeaderValue::from_static("a"));
        h.append(IDEMPOTENCY_KEY, HeaderValue::from_static("a"));
        assert_eq!(request_key(&h, 255), Err(KeyError::Repeated(2)));
        // The same two, folded into one line by an intermediary.
        assert_eq!(one("k1, k2"), Err(KeyError::Repeated(2)));
        assert_eq!(one(""), Err(KeyError::Empty));
        assert_eq!(one("   "), Err(KeyError::Empty));
        assert_eq!(one("\"\""), Err(KeyError::Empty));
        assert_eq!(one(&"k".repeat(255)).unwrap().map(|k| k.len()), Some(255));
        assert_eq!(
            one(&"k".repeat(256)),
            Err(KeyError::TooLong { len: 256, max: 255 })
        );
        // The limit counts the key, not its quotes.
        assert!(one(&format!("\"{}\"", "k".repeat(255))).is_ok());
        let mut h = HeaderMap::new();
        h.insert(
            IDEMPOTENCY_KEY,
            HeaderValue::from_bytes(b"ab\xffc").unwrap(),
        );
        assert_eq!(
            request_key(&h, 255),
            Err(KeyError::NotPrintable { byte: 0xff, at: 2 })
        );
        assert!(matches!(one("a\tb"), Err(KeyError::NotPrintable { .. })));
        for bad in ["\"abc", "\"a\"b", r#""a\x""#, "\"a\";p=1"] {
            assert!(matches!(one(bad), Err(KeyError::BadQuoted(_))), "{bad}");
        }
    }
}
