//! RFC 9457 problem details: every error the HTTP API gives, with idem's extension members
//! (`decision`, `state`, `origin_region`, `lease_expires_at`, `retry_after_seconds`, `claim`,
//! `field`).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::store::{StoreError, Unavailable};

use super::api::PROBLEM_JSON;

/// The prefix of every problem type URI (`urn:idem:problem:in-flight`, ...).
pub const TYPE_PREFIX: &str = "urn:idem:problem:";

/// A problem details object, as sent and as [`crate::client`] reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// `urn:idem:problem:<kind>`; the kinds are listed in `docs/http-api.md`.
    #[serde(rename = "type")]
    pub type_uri: String,
    /// Short summary of the kind.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// What happened in this case.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// For claims: `in_flight`, `mismatch` or `unavailable`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<String>,
    /// The key's state (`in_flight`, `completed`, ...) or the store's (`recovering`, `fenced`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// The region running or holding the claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin_region: Option<String>,
    /// When the claim in flight's lease ends (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_expires_at: Option<String>,
    /// The same, Unix ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_expires_at_ms: Option<u64>,
    /// How long to wait before retrying (also in the `Retry-After` header).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<u64>,
    /// The claim concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<String>,
    /// The request field at fault.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl Problem {
    /// A problem of `kind` with `status`, `title` and `detail`.
    pub fn new(status: StatusCode, kind: &str, title: &str, detail: impl Into<String>) -> Self {
        Problem {
            type_uri: format!("{TYPE_PREFIX}{kind}"),
            title: title.to_owned(),
            status: status.as_u16(),
            detail: Some(detail.into()),
            decision: None,
            state: None,
            origin_region: None,
            lease_expires_at: None,
            lease_expires_at_ms: None,
            retry_after_seconds: None,
            claim: None,
            field: None,
        }
    }

    /// The kind: the type URI without its prefix.
    pub fn kind(&self) -> &str {
        self.type_uri
            .strip_prefix(TYPE_PREFIX)
            .unwrap_or(&self.type_uri)
    }

    /// 400 for a bad request field.
    pub fn bad_field(field: &str, detail: impl Into<String>) -> Self {
        Problem {
            field: Some(field.to_owned()),
            ..Problem::new(
                StatusCode::BAD_REQUEST,
                "invalid-request",
                "Invalid request",
                detail,
            )
        }
    }

    /// 401: missing, unknown or foreign token.
    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Problem::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Unauthorized",
            detail,
        )
    }

    /// 503 with `Retry-After`.
    pub fn unavailable(state: &str, detail: impl Into<String>, retry_after_ms: u64) -> Self {
        Problem {
            decision: Some("unavailable".into()),
            state: Some(state.to_owned()),
            retry_after_seconds: Some(retry_after_ms.div_ceil(1000).max(1)),
            ..Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "Store unavailable",
                detail,
            )
        }
    }

    /// 503 for an `Unavailable` reason of the store.
    pub fn from_unavailable(reason: Unavailable, retry_after_ms: u64) -> Self {
        Self::unavailable(
            unavailable_state(reason),
            reason.to_string(),
            retry_after_ms,
        )
    }

    /// The HTTP status.
    pub fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

/// The `state` member for an `Unavailable` reason.
pub fn unavailable_state(reason: Unavailable) -> &'static str {
    match reason {
        Unavailable::Fenced => "fenced",
        Unavailable::RestartFence => "restart_fence",
        Unavailable::ClockReservation => "clock_reservation",
        Unavailable::ClockExhausted => "clock_exhausted",
        Unavailable::DiskFull => "disk_full",
        Unavailable::LogFailed => "log_failed",
        Unavailable::ClockBehind => "clock_behind",
        Unavailable::Retired => "retired",
    }
}

impl From<StoreError> for Problem {
    fn from(e: StoreError) -> Self {
        let detail = e.to_string();
        let conflict =
            |kind: &str, title: &str| Problem::new(StatusCode::CONFLICT, kind, title, &detail);
        match e {
            StoreError::UnknownNamespace(_) => Problem::new(
                StatusCode::NOT_FOUND,
                "unknown-namespace",
                "Unknown namespace",
                detail,
            ),
            StoreError::BadKeyLength { .. } => Problem {
                field: Some("key".into()),
                ..Problem::new(StatusCode::BAD_REQUEST, "bad-key", "Bad key length", detail)
            },
            StoreError::PrincipalTooLong { .. } => Problem {
                field: Some("principal".into()),
                ..Problem::new(
                    StatusCode::BAD_REQUEST,
                    "principal-too-long",
                    "Principal too long",
                    detail,
                )
            },
            StoreError::OutcomeTooLarge { .. } => Problem {
                field: Some("outcome".into()),
                ..Problem::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "outcome-too-large",
                    "Outcome too large",
                    detail,
                )
            },
            StoreError::LeaseTooLong { .. } => Problem::bad_field("lease_ms", detail),
            StoreError::Invalid(_) | StoreError::Encode(_) => Problem::new(
                StatusCode::BAD_REQUEST,
                "invalid-request",
                "Invalid request",
                detail,
            ),
            StoreError::UnknownKey => {
                Problem::new(StatusCode::NOT_FOUND, "unknown-key", "Unknown key", detail)
            }
            StoreError::UnknownClaim(c) => Problem {
                claim: Some(c.to_string()),
                ..Problem::new(
                    StatusCode::NOT_FOUND,
                    "unknown-claim",
                    "Unknown claim",
                    detail,
                )
            },
            StoreError::UnknownItem => Problem::new(
                StatusCode::NOT_FOUND,
                "unknown-item",
                "Unknown item",
                detail,
            ),
            StoreError::NotOwner { claim, owner } => Problem {
                claim: Some(claim.to_string()),
                origin_region: Some(owner.to_string()),
                ..conflict("not-owner", "Claim belongs to another region")
            },
            StoreError::AlreadyFinished(c) => Problem {
                claim: Some(c.to_string()),
                ..conflict("already-finished", "Claim already finished")
            },
            StoreError::LeaseRanOut { claim, .. } => Problem {
                claim: Some(claim.to_string()),
                ..conflict("lease-ran-out", "Lease ran out")
            },
            StoreError::TakenOver { claim, .. } => Problem {
                claim: Some(claim.to_string()),
                ..conflict("taken-over", "Claim taken over")
            },
            StoreError::Unavailable(reason) => {
                Problem::from_unavailable(reason, reason.retry_after_ms())
            }
            StoreError::Log(_) => Problem::unavailable("log_failed", detail, 5_000),
            StoreError::Config(_)
            | StoreError::Policy(_)
            | StoreError::Region(_)
            | StoreError::Corrupt(_)
            | StoreError::InvalidMutation { .. }
            | StoreError::LogTruncated { .. }
            | StoreError::RetireSelf
            | StoreError::RetireNotAtMark { .. }
            | StoreError::RetireAgain { .. } => Problem::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal error",
                detail,
            ),
        }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = self.status_code();
        let retry = self.retry_after_seconds;
        let unauthorized = status == StatusCode::UNAUTHORIZED;
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut r = (status, body).into_response();
        let h = r.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if let Some(s) = retry {
            h.insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if unauthorized {
            h.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"idem\""),
            );
        }
        r
    }
}

/// A problem as a handler's error: boxed, so results stay small.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError(pub Box<Problem>);

impl From<Problem> for ApiError {
    fn from(p: Problem) -> Self {
        ApiError(Box::new(p))
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError(Box::new(Problem::from(e)))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (*self.0).into_response()
    }
}
