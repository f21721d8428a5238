//! A request's fingerprint: what makes two requests with one key "the same request". Method,
//! route, query (parameters sorted by name) and body, canonicalised by media type so that
//! retries that differ only in encoding details are the same request:
//!
//! * JSON (`application/json`, `*/*+json`): RFC 8785 (JCS), so key order and whitespace do not
//!   count; a body that does not parse as JSON counts as raw bytes.
//! * Forms (`application/x-www-form-urlencoded`): fields decoded and sorted by name (values of
//!   one name keep their order).
//! * Multipart (`multipart/*`): by parts (each part's headers and bytes), not by the boundary
//!   a client picked; a body that does not parse counts as raw bytes.
//! * Anything else: the raw bytes.
//!
//! The digest is BLAKE3 over length-prefixed fields under a fixed context string.

use axum::http::Method;

use crate::record::Fingerprint;

/// How a body was canonicalised (part of the digest: the same bytes read two ways differ).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyForm {
    /// RFC 8785 JSON.
    Json,
    /// Sorted form fields.
    Form,
    /// Multipart, by parts.
    Multipart,
    /// The raw bytes.
    Raw,
}

/// The fingerprint of a request, and how its body was read.
pub fn fingerprint(
    method: &Method,
    route: &str,
    query: Option<&str>,
    content_type: Option<&str>,
    body: &[u8],
) -> (Fingerprint, BodyForm) {
    let mut h = blake3::Hasher::new_derive_key("idem request fingerprint v1");
    field(&mut h, method.as_str().as_bytes());
    field(&mut h, route.as_bytes());
    field(
        &mut h,
        &pairs(&sorted_pairs(query.unwrap_or("").as_bytes())),
    );
    let (form, canonical) = canonical_body(content_type, body);
    field(&mut h, &[form as u8]);
    field(&mut h, &canonical);
    (Fingerprint(*h.finalize().as_bytes()), form)
}

fn field(h: &mut blake3::Hasher, bytes: &[u8]) {
    h.update(&(bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

/// Length-prefixed name/value pairs.
fn pairs(p: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in p {
        out.extend_from_slice(&(k.len() as u64).to_le_bytes());
        out.extend_from_slice(k);
        out.extend_from_slice(&(v.len() as u64).to_le_bytes());
        out.extend_from_slice(v);
    }
    out
}

/// `a=1&b=2` decoded (`+` and percent escapes, to bytes: nothing is lost to a charset) and
/// stably sorted by name.
fn sorted_pairs(encoded: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut p: Vec<(Vec<u8>, Vec<u8>)> = encoded
        .split(|&b| b == b'&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = match pair.iter().position(|&b| b == b'=') {
                Some(i) => (&pair[..i], &pair[i + 1..]),
                None => (pair, &b""[..]),
            };
            (form_decode(k), form_decode(v))
        })
        .collect();
    p.sort_by(|a, b| a.0.cmp(&b.0));
    p
}

/// One `application/x-www-form-urlencoded` name or value: `+` is a space, `%XY` a byte; a `%`
/// not followed by two hex digits stays as it is.
fn form_decode(s: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'+' => out.push(b' '),
            b'%' => {
                if let (Some(h), Some(l)) = (
                    s.get(i + 1).copied().and_then(hex),
                    s.get(i + 2).copied().and_then(hex),
                ) {
                    out.push(h << 4 | l);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            b => out.push(b),
        }
        i += 1;
    }
    out
}

/// Whether every number in `v` survives RFC 8785 unchanged: JCS reads numbers as IEEE
/// doubles, so integers beyond 2^53 (often ids) would collapse into their neighbours.
fn numbers_exact(v: &serde_json::Value) -> bool {
    const EXACT: u64 = 1 << 53;
    match v {
        serde_json::Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                u <= EXACT
            } else if let Some(i) = n.as_i64() {
                i.unsigned_abs() <= EXACT
            } else {
                true
            }
        }
        serde_json::Value::Array(a) => a.iter().all(numbers_exact),
        serde_json::Value::Object(o) => o.values().all(numbers_exact),
        _ => true,
    }
}

/// The media type's essence (`type/subtype`, lowercase) and its parameters.
fn media_type(content_type: &str) -> (String, Vec<(String, String)>) {
    let mut parts = content_type.split(';');
    let essence = parts.next().unwrap_or("").trim().to_ascii_lowercase();
    let params = parts
        .filter_map(|p| {
            let (k, v) = p.split_once('=')?;
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(v);
            Some((k.trim().to_ascii_lowercase(), v.to_owned()))
        })
        .collect();
    (essence, params)
}

fn canonical_body(content_type: Option<&str>, body: &[u8]) -> (BodyForm, Vec<u8>) {
    let (essence, params) = media_type(content_type.unwrap_or(""));
    let raw = || (BodyForm::Raw, body.to_vec());
    if essence == "application/json" || essence.ends_with("+json") {
        return serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .filter(numbers_exact)
            .and_then(|v| serde_json_canonicalizer::to_vec(&v).ok())
            .map_or_else(raw, |c| (BodyForm::Json, c));
    }
    if essence == "application/x-www-form-urlencoded" {
        return (BodyForm::Form, pairs(&sorted_pairs(body)));
    }
    if essence.starts_with("multipart/") {
        let boundary = params.iter().find(|(k, _)| k == "boundary").map(|(_, v)| v);
        return boundary
            .and_then(|b| multipart_parts(body, b.as_bytes()))
            .map_or_else(raw, |c| (BodyForm::Multipart, c));
    }
    raw()
}

/// The parts of a multipart body (RFC 2046 §5.1.1), each as its headers (names lowercased,
/// sorted, values trimmed) and its bytes, length-prefixed; `None` when the body is not well
/// formed for `boundary`.
fn multipart_parts(body: &[u8], boundary: &[u8]) -> Option<Vec<u8>> {
    if boundary.is_empty() || boundary.len() > 70 {
        return None;
    }
    let mut delimiter = b"\r\n--".to_vec();
    delimiter.extend_from_slice(boundary);
    // The first delimiter may start the body (no CRLF before it); anything before it is the
    // preamble, which carries no meaning.
    let mut at = if body.starts_with(&delimiter[2..]) {
        delimiter.len() - 2
    } else {
        find(body, &delimiter)? + delimiter.len()
    };
    let mut out = Vec::new();
    loop {
        let rest = &body[at..];
        if rest.starts_with(b"--") {
            // The close delimiter; the epilogue after it carries no meaning.
            return Some(out);
        }
        // Transport padding, then the line break that ends the delimiter line.
        let pad = rest
            .iter()
            .take_while(|b| matches!(b, b' ' | b'\t'))
            .count();
        let rest = rest[pad..].strip_prefix(b"\r\n")?;
        let end = find(rest, &delimiter)?;
        let part = &rest[..end];
        let (headers, content) = if let Some(content) = part.strip_prefix(b"\r\n") {
            (Vec::new(), content)
        } else {
            let mut buf = [httparse::EMPTY_HEADER; 32];
            match httparse::parse_headers(part, &mut buf).ok()? {
                httparse::Status::Complete((n, parsed)) => {
                    let mut h: Vec<(Vec<u8>, Vec<u8>)> = parsed
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_ascii_lowercase().into_bytes(),
                                h.value.trim_ascii().to_vec(),
                            )
                        })
                        .collect();
                    h.sort();
                    (h, &part[n..])
                }
                httparse::Status::Partial => return None,
            }
        };
        let headers = pairs(&headers);
        for piece in [&headers[..], content] {
            out.extend_from_slice(&(piece.len() as u64).to_le_bytes());
            out.extend_from_slice(piece);
        }
        at = body.len() - rest.len() + end + delimiter.len();
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(
        method: &str,
        route: &str,
        query: Option<&str>,
        ct: Option<&str>,
        body: &str,
    ) -> (Fingerprint, BodyForm) {
        fingerprint(&method.parse().unwrap(), route, query, ct, body.as_bytes())
    }

    const JSON: Option<&str> = Some("application/json");

    #[test]
    fn json_key_order_whitespace_and_number_spelling_do_not_count() {
        let a = fp(
            "POST",
            "/charges",
            None,
            JSON,
            r#"{"amount":10,"currency":"eur","meta":{"b":1,"a":[1,2]}}"#,
        );
        let b = fp(
            "POST",
            "/charges",
            None,
            Some("application/json; charset=utf-8"),
            "{ \"currency\" : \"eur\",\n \"meta\": {\"a\": [1, 2], \"b\": 1.0}, \"amount\": 1e1 }",
        );
        assert_eq!(a, b);
        assert_eq!(a.1, BodyForm::Json);
        // Another value, another array order, another key: different requests.
        for other in [
            r#"{"amount":11,"currency":"eur","meta":{"b":1,"a":[1,2]}}"#,
            r#"{"amount":10,"currency":"eur","meta":{"b":1,"a":[2,1]}}"#,
            r#"{"amount":10,"currency":"eur","meta":{"b":1,"a":[1,2]},"x":null}"#,
        ] {
            assert_ne!(a.0, fp("POST", "/charges", None, JSON, other).0, "{other}");
        }
        // +json media types are JSON too.
        assert_eq!(
            a,
            fp(
                "POST",
                "/charges",
                None,
                Some("application/vnd.api+json"),
                r#"{"meta":{"a":[1,2],"b":1},"currency":"eur","amount":10}"#
            )
        );
    }

    #[test]
    fn method_route_and_query_count_and_query_order_does_not() {
        let base = fp("POST", "/charges", Some("a=1&b=2"), JSON, "{}");
        assert_eq!(base, fp("POST", "/charges", Some("b=2&a=1"), JSON, "{}"));
        assert_eq!(base, fp("POST", "/charges", Some("a=%31&b=2"), JSON, "{}"));
        assert_ne!(base.0, fp("PUT", "/charges", Some("a=1&b=2"), JSON, "{}").0);
        assert_ne!(
            base.0,
            fp("POST", "/refunds", Some("a=1&b=2"), JSON, "{}").0
        );
        assert_ne!(
            base.0,
            fp("POST", "/charges", Some("a=1&b=3"), JSON, "{}").0
        );
        // Repeated names keep their order: a list is not a set.
        assert_ne!(
            fp("POST", "/x", Some("a=1&a=2"), None, "").0,
            fp("POST", "/x", Some("a=2&a=1"), None, "").0
        );
    }

    #[test]
    fn bytes_that_are_not_utf_8_and_large_integers_are_not_lost() {
        let form = Some("application/x-www-form-urlencoded");
        assert_ne!(
            fp("POST", "/x", Some("x=%FF"), None, "").0,
            fp("POST", "/x", Some("x=%FE"), None, "").0
        );
        assert_ne!(
            fp("POST", "/x", None, form, "name=Jos%E9").0,
            fp("POST", "/x", None, form, "name=Jos%E8").0
        );
        // 2^53 + 1 and 2^53 are one double: such bodies are compared as raw bytes.
        let a = fp("POST", "/x", None, JSON, r#"{"id":9007199254740993}"#);
        let b = fp("POST", "/x", None, JSON, r#"{"id":9007199254740992}"#);
        assert_ne!(a.0, b.0);
        assert_eq!(a.1, BodyForm::Raw);
        assert_eq!(
            fp("POST", "/x", None, JSON, r#"{"id":9007199254740992}"#).1,
            BodyForm::Json
        );
    }

    #[test]
    fn forms_are_compared_by_sorted_fields() {
        let form = Some("application/x-www-form-urlencoded");
        let a = fp("POST", "/x", None, form, "amount=10&currency=eur&note=a+b");
        assert_eq!(
            a,
            fp(
                "POST",
                "/x",
                None,
                form,
                "note=a%20b&currency=eur&amount=10"
            )
        );
        assert_eq!(a.1, BodyForm::Form);
        assert_ne!(
            a.0,
            fp("POST", "/x", None, form, "amount=11&currency=eur&note=a+b").0
        );
    }

    #[test]
    fn multipart_bodies_are_compared_by_parts_not_boundary() {
        let body = |b: &str, v: &str| {
            format!("preamble\r\n--{b}\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n{v}\r\n--{b}\r\ncontent-disposition:  form-data; name=\"f\"; filename=\"x.txt\"\r\nContent-Type: text/plain\r\n\r\nline1\r\nline2\r\n--{b}--\r\nepilogue")
        };
        let ct = |b: &str| format!("multipart/form-data; boundary=\"{b}\"");
        let a = fp("POST", "/u", None, Some(&ct("XyZ")), &body("XyZ", "1"));
        assert_eq!(a.1, BodyForm::Multipart);
        assert_eq!(
            a,
            fp(
                "POST",
                "/u",
                None,
                Some(&ct("other-boundary-42")),
                &body("other-boundary-42", "1")
            )
        );
        assert_ne!(
            a.0,
            fp("POST", "/u", None, Some(&ct("XyZ")), &body("XyZ", "2")).0
        );
        // Not well formed for its boundary: raw bytes.
        let broken = fp("POST", "/u", None, Some(&ct("nope")), &body("XyZ", "1"));
        assert_eq!(broken.1, BodyForm::Raw);
    }

    proptest::proptest! {
        /// Untrusted bodies, queries and media types never panic, near-multipart bodies
        /// included (pieces of a real one glued at random).
        #[test]
        fn any_request_gets_a_fingerprint(
            pieces in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::strategy::Just(b"--b".to_vec()),
                    proptest::strategy::Just(b"\r\n".to_vec()),
                    proptest::strategy::Just(b"--".to_vec()),
                    proptest::strategy::Just(b"Content-Type: x\r\n".to_vec()),
                    proptest::strategy::Just(b"%ZZ&=+%4".to_vec()),
                    proptest::collection::vec(proptest::prelude::any::<u8>(), 0..8),
                ],
                0..24,
            ),
            ct in "(multipart/form-data; boundary=\"?b\"?|application/json|application/x-www-form-urlencoded|text/plain|)",
            q in "[a-z=&%+0-9]{0,20}",
        ) {
            let body = pieces.concat();
            let (a, _) = fingerprint(&Method::POST, "/x", Some(&q), Some(&ct), &body);
            let (b, _) = fingerprint(&Method::POST, "/x", Some(&q), Some(&ct), &body);
            proptest::prop_assert_eq!(a, b);
        }
    }

    #[test]
    fn other_bodies_and_broken_json_count_as_raw_bytes() {
        let a = fp("POST", "/x", None, Some("text/plain"), "hello");
        assert_eq!(a.1, BodyForm::Raw);
        assert_ne!(a.0, fp("POST", "/x", None, Some("text/plain"), "hello ").0);
        let broken = fp("POST", "/x", None, JSON, "{\"a\":");
        assert_eq!(broken.1, BodyForm::Raw);
        // The same bytes read as JSON and as raw are different requests.
        assert_ne!(
            fp("POST", "/x", None, JSON, "{}").0,
            fp("POST", "/x", None, Some("text/plain"), "{}").0
        );
    }
}
