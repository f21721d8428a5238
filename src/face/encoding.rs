//! Content coding of keyed answers. Outcomes are stored in identity encoding (the layer asks
//! the inner service for no other), so that any client can read a replay; for a client whose
//! `Accept-Encoding` takes gzip, the layer compresses the answer again, first executions and
//! replays alike, so the two never differ but for the coding.

use std::io::Write as _;

use axum::body::Bytes;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};

/// Bodies shorter than this are sent as they are (gzip's framing outweighs the gain).
pub const COMPRESS_BYTES_MIN: usize = 1024;

/// Whether an `Accept-Encoding` header takes gzip: `gzip` (or `x-gzip`) with a q-value above
/// zero, or `*` above zero when gzip is not named. No header: identity only.
pub fn accepts_gzip(headers: &HeaderMap) -> bool {
    let mut star = None;
    for value in headers.get_all(header::ACCEPT_ENCODING) {
        let Ok(value) = value.to_str() else {
            continue;
        };
        for item in value.split(',') {
            let mut parts = item.split(';');
            let coding = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.trim().strip_prefix("q=").or(p.trim().strip_prefix("Q=")))
                .filter_map(|q| q.trim().parse::<f32>().ok())
                .next_back()
                .unwrap_or(1.0);
            match coding.as_str() {
                "gzip" | "x-gzip" => return q > 0.0,
                "*" => star = Some(q > 0.0),
                _ => {}
            }
        }
    }
    star.unwrap_or(false)
}

/// Whether a response with these headers and this body is worth compressing: a textual media
/// type, no coding of its own, a body of at least [`COMPRESS_BYTES_MIN`], and a status that
/// carries a whole representation.
pub fn compressible(status: StatusCode, headers: &HeaderMap, len: usize) -> bool {
    let no_transform = headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|d| d.trim().eq_ignore_ascii_case("no-transform"));
    if len < COMPRESS_BYTES_MIN
        || no_transform
        || matches!(
            status,
            StatusCode::NO_CONTENT | StatusCode::PARTIAL_CONTENT | StatusCode::NOT_MODIFIED
        )
        || headers.contains_key(header::CONTENT_ENCODING)
        || headers.contains_key(header::CONTENT_RANGE)
    {
        return false;
    }
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let media = ct.split(';').next().unwrap_or("").trim();
    media.starts_with("text/")
        || media.ends_with("+json")
        || media.ends_with("+xml")
        || matches!(
            media,
            "application/json"
                | "application/xml"
                | "application/javascript"
                | "application/x-www-form-urlencoded"
                | "application/graphql-response+json"
        )
}

/// Compresses `body` for the client when it asks for gzip and the response is
/// [`compressible`] (not marked `Cache-Control: no-transform`): sets `Content-Encoding: gzip`,
/// drops `Content-Length` (the server sets it anew) and digests of the identity bytes
/// (`Content-Digest`, `Repr-Digest`, `Content-MD5`), and weakens a strong `ETag` (the two
/// codings are not byte-equal). Always adds `Vary: Accept-Encoding` to a compressible
/// response, so caches keep the two codings apart. Blocking: call it off the async threads
/// for large bodies.
pub fn encode_for_client(
    status: StatusCode,
    headers: &mut HeaderMap,
    body: Bytes,
    accepts_gzip: bool,
) -> Bytes {
    if !compressible(status, headers, body.len()) {
        return body;
    }
    let vary_names_it = headers.get_all(header::VARY).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("accept-encoding") || t.trim() == "*")
        })
    });
    if !vary_names_it {
        headers.append(header::VARY, HeaderValue::from_static("accept-encoding"));
    }
    if !accepts_gzip {
        return body;
    }
    let mut gz = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 3),
        flate2::Compression::fast(),
    );
    if gz.write_all(&body).is_err() {
        return body;
    }
    match gz.finish() {
        Ok(zipped) => {
            headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            headers.remove(header::CONTENT_LENGTH);
            for digest in ["content-digest", "repr-digest", "content-md5"] {
                headers.remove(digest);
            }
            let weak = headers
                .get(header::ETAG)
                .and_then(|v| v.to_str().ok())
                .filter(|e| !e.starts_with("W/"))
                .and_then(|e| HeaderValue::from_str(&format!("W/{e}")).ok());
            if let Some(weak) = weak {
                headers.insert(header::ETAG, weak);
            }
            Bytes::from(zipped)
        }
        Err(_) => body,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read as _;

    fn accept(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT_ENCODING, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn accept_encoding_is_read_with_its_q_values() {
        assert!(accepts_gzip(&accept("gzip")));
        assert!(accepts_gzip(&accept("br, gzip;q=0.5")));
        assert!(accepts_gzip(&accept("deflate, *")));
        assert!(accepts_gzip(&accept("X-GZIP")));
        assert!(!accepts_gzip(&accept("gzip;q=0")));
        assert!(!accepts_gzip(&accept("*;q=1, gzip;q=0")));
        assert!(!accepts_gzip(&accept("br, deflate")));
        assert!(!accepts_gzip(&accept("identity")));
        assert!(!accepts_gzip(&HeaderMap::new()));
    }

    fn json_headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        h
    }

    #[test]
    fn a_textual_body_is_gzipped_when_asked_and_decodes_to_the_same_bytes() {
        let body = Bytes::from(format!(
            "{{\"id\":\"ch_1\",\"pad\":\"{}\"}}",
            "x".repeat(4000)
        ));
        let mut h = json_headers();
        let zipped = encode_for_client(StatusCode::OK, &mut h, body.clone(), true);
        assert_eq!(h[header::CONTENT_ENCODING], "gzip");
        assert_eq!(h[header::VARY], "accept-encoding");
        assert!(zipped.len() < body.len() / 10);
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&zipped[..])
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, body);

        let mut h = json_headers();
        let plain = encode_for_client(StatusCode::OK, &mut h, body.clone(), false);
        assert_eq!(plain, body);
        assert!(!h.contains_key(header::CONTENT_ENCODING));
        assert_eq!(
            h[header::VARY],
            "accept-encoding",
            "caches must tell the codings apart"
        );
    }

    #[test]
    fn small_binary_coded_and_partial_bodies_are_left_alone() {
        let big = Bytes::from(vec![b'a'; 4096]);
        let mut h = json_headers();
        assert_eq!(
            encode_for_client(StatusCode::OK, &mut h, Bytes::from_static(b"{}"), true),
            "{}"
        );
        assert!(h.get(header::VARY).is_none());

        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("image/png"));
        assert_eq!(
            encode_for_client(StatusCode::OK, &mut h, big.clone(), true),
            big
        );

        let mut h = json_headers();
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("br"));
        assert_eq!(
            encode_for_client(StatusCode::OK, &mut h, big.clone(), true),
            big
        );
        assert_eq!(h[header::CONTENT_ENCODING], "br");

        let mut h = json_headers();
        assert_eq!(
            encode_for_client(StatusCode::PARTIAL_CONTENT, &mut h, big.clone(), true),
            big
        );

        let mut h = json_headers();
        h.insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
        encode_for_client(StatusCode::OK, &mut h, big.clone(), true);
        assert_eq!(h.get_all(header::VARY).iter().count(), 1);

        let mut h = json_headers();
        h.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("max-age=60, No-Transform"),
        );
        assert_eq!(
            encode_for_client(StatusCode::OK, &mut h, big.clone(), true),
            big
        );
        assert!(!h.contains_key(header::CONTENT_ENCODING));
    }

    #[test]
    fn validators_of_the_identity_bytes_do_not_go_out_with_the_gzipped_ones() {
        let big = Bytes::from(vec![b'a'; 4096]);
        let mut h = json_headers();
        h.insert(header::ETAG, HeaderValue::from_static("\"v1\""));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("4096"));
        h.insert("content-digest", HeaderValue::from_static("sha-256=:abc=:"));
        encode_for_client(StatusCode::OK, &mut h, big.clone(), true);
        assert_eq!(h[header::ETAG], "W/\"v1\"");
        assert!(!h.contains_key(header::CONTENT_LENGTH));
        assert!(!h.contains_key("content-digest"));
        // Already weak: unchanged. Identity: untouched.
        let mut h = json_headers();
        h.insert(header::ETAG, HeaderValue::from_static("W/\"v2\""));
        encode_for_client(StatusCode::OK, &mut h, big.clone(), true);
        assert_eq!(h[header::ETAG], "W/\"v2\"");
        let mut h = json_headers();
        h.insert(header::ETAG, HeaderValue::from_static("\"v3\""));
        encode_for_client(StatusCode::OK, &mut h, big, false);
        assert_eq!(h[header::ETAG], "\"v3\"");
    }
}
