//! Bearer tokens: each grants one namespace, or operator access. Tokens are compared by their
//! BLAKE3 digests, so a lookup's timing says nothing about a token's bytes.

use std::collections::HashMap;

use axum::http::{header, HeaderMap};

use super::problem::{ApiError, Problem};

/// What a token grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// One namespace: claim, complete, release, extend and read its keys.
    Namespace(String),
    /// Operator endpoints, and reads of any namespace.
    Operator,
}

/// The configured tokens.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    by_digest: HashMap<[u8; 32], Access>,
}

impl Tokens {
    /// Grants `access` to `token`.
    pub fn insert(&mut self, token: &str, access: Access) {
        self.by_digest
            .insert(*blake3::hash(token.as_bytes()).as_bytes(), access);
    }

    /// What the request's bearer token grants.
    pub fn access(&self, headers: &HeaderMap) -> Result<&Access, ApiError> {
        let value = headers.get(header::AUTHORIZATION).ok_or_else(|| {
            ApiError::from(Problem::unauthorized("send Authorization: Bearer <token>"))
        })?;
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                let (scheme, token) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .ok_or_else(|| {
                ApiError::from(Problem::unauthorized("send Authorization: Bearer <token>"))
            })?;
        self.by_digest
            .get(blake3::hash(token.as_bytes()).as_bytes())
            .ok_or_else(|| Problem::unauthorized("unknown token").into())
    }

    /// Requires a token for `namespace` (operators excluded: they do not write keys).
    pub fn namespace(&self, headers: &HeaderMap, namespace: &str) -> Result<(), ApiError> {
        match self.access(headers)? {
            Access::Namespace(n) if n == namespace => Ok(()),
            _ => Err(ApiError::from(Problem::unauthorized(
                "this token does not grant this namespace",
            ))),
        }
    }

    /// Requires a token for `namespace` or an operator token.
    pub fn reader(&self, headers: &HeaderMap, namespace: &str) -> Result<(), ApiError> {
        match self.access(headers)? {
            Access::Operator => Ok(()),
            Access::Namespace(n) if n == namespace => Ok(()),
            Access::Namespace(_) => Err(ApiError::from(Problem::unauthorized(
                "this token does not grant this namespace",
            ))),
        }
    }

    /// Requires an operator token.
    pub fn operator(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        match self.access(headers)? {
            Access::Operator => Ok(()),
            Access::Namespace(_) => Err(ApiError::from(Problem::unauthorized(
                "an operator token is needed",
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn bearer(t: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {t}")).unwrap(),
        );
        h
    }

    #[test]
    fn a_token_grants_its_namespace_only() {
        let mut t = Tokens::default();
        t.insert("pay-0123456789abcdef", Access::Namespace("payments".into()));
        t.insert("ops-0123456789abcdef", Access::Operator);
        let pay = bearer("pay-0123456789abcdef");
        assert!(t.namespace(&pay, "payments").is_ok());
        assert_eq!(t.namespace(&pay, "orders").unwrap_err().0.status, 401);
        assert_eq!(t.operator(&pay).unwrap_err().0.status, 401);
        let ops = bearer("ops-0123456789abcdef");
        assert!(t.reader(&ops, "orders").is_ok());
        assert_eq!(t.namespace(&ops, "orders").unwrap_err().0.status, 401);
        assert_eq!(
            t.reader(&bearer("nope"), "payments").unwrap_err().0.status,
            401
        );
        assert_eq!(
            t.reader(&HeaderMap::new(), "payments")
                .unwrap_err()
                .0
                .status,
            401
        );
        let mut basic = HeaderMap::new();
        basic.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic eDp5"),
        );
        assert_eq!(t.reader(&basic, "payments").unwrap_err().0.status, 401);
    }
}
