//! What is stored, per route: rules that decide by status whether a route's response is
//! stored, stored as indeterminate, or not stored (the key released so a corrected retry
//! runs), overriding the namespace's status table for the requests they cover.

use axum::http::Method;

use crate::http::api::StoreAs;
use crate::store::policy::StatusRange;

/// A route's storage rule: for requests on `prefix` (whole path segments) and, if given,
/// `method`, a status in `indeterminate` is stored as indeterminate, one in `stored` is
/// stored, and any other releases the key. 401 and 429 are never stored, whatever a rule says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutePolicy {
    /// Only requests with this method; any guarded method when `None`.
    pub method: Option<Method>,
    /// The path prefix the rule covers (`/charges` covers `/charges/1`, not `/chargesx`).
    pub prefix: String,
    /// Statuses stored and replayed.
    pub stored: Vec<StatusRange>,
    /// Statuses stored as indeterminate (checked before `stored`).
    pub indeterminate: Vec<StatusRange>,
}

/// Why a route rule does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("route rule {rule:?}: {reason}")]
pub struct RouteRuleError {
    /// The rule as written.
    pub rule: String,
    /// What is wrong with it.
    pub reason: String,
}

impl RoutePolicy {
    /// A rule for every guarded method on `prefix` that stores nothing (add ranges with
    /// [`store`](Self::store) and [`indeterminate`](Self::indeterminate)).
    pub fn under(prefix: impl Into<String>) -> Self {
        Self {
            method: None,
            prefix: prefix.into(),
            stored: Vec::new(),
            indeterminate: Vec::new(),
        }
    }

    /// Only for `method`.
    pub fn method(mut self, method: Method) -> Self {
        self.method = Some(method);
        self
    }

    /// Stores statuses `from..=to`.
    pub fn store(mut self, from: u16, to: u16) -> Self {
        self.stored.push(StatusRange::new(from, to));
        self
    }

    /// Stores statuses `from..=to` as indeterminate.
    pub fn indeterminate(mut self, from: u16, to: u16) -> Self {
        self.indeterminate.push(StatusRange::new(from, to));
        self
    }

    /// Parses `[METHOD ]PREFIX store=RANGES [indeterminate=RANGES]`, ranges being
    /// comma-separated statuses or `from-to` spans: `POST /charges store=200-299,402
    /// indeterminate=500-599`. A rule with neither list stores nothing on its route.
    pub fn parse(rule: &str) -> Result<Self, RouteRuleError> {
        let err = |reason: String| RouteRuleError {
            rule: rule.to_owned(),
            reason,
        };
        let mut words = rule.split_whitespace().peekable();
        let method = match words.peek() {
            Some(w) if !w.starts_with('/') => {
                let m = Method::from_bytes(w.to_ascii_uppercase().as_bytes())
                    .map_err(|_| err(format!("{w:?} is not a method")))?;
                words.next();
                Some(m)
            }
            _ => None,
        };
        let prefix = words
            .next()
            .filter(|p| p.starts_with('/'))
            .ok_or_else(|| err("no path prefix (it starts with '/')".into()))?;
        let mut policy = Self {
            method,
            ..Self::under(prefix)
        };
        for word in words {
            let (name, ranges) = word
                .split_once('=')
                .ok_or_else(|| err(format!("{word:?} is not store=... or indeterminate=...")))?;
            let ranges = parse_ranges(ranges).map_err(err)?;
            match name {
                "store" => policy.stored.extend(ranges),
                "indeterminate" => policy.indeterminate.extend(ranges),
                other => return Err(err(format!("unknown list {other:?}"))),
            }
        }
        Ok(policy)
    }

    /// What a response with `status` becomes under this rule: `None` releases the key.
    pub fn store_as(&self, status: u16) -> Option<StoreAs> {
        if self.indeterminate.iter().any(|r| r.contains(status)) {
            Some(StoreAs::Indeterminate)
        } else if self.stored.iter().any(|r| r.contains(status)) {
            Some(StoreAs::Completed)
        } else {
            None
        }
    }

    fn covers(&self, method: &Method, path: &str) -> bool {
        self.method.as_ref().is_none_or(|m| m == method) && under(path, &self.prefix)
    }
}

/// `100-599`, `402`, or a comma-separated list of them.
fn parse_ranges(s: &str) -> Result<Vec<StatusRange>, String> {
    let status = |t: &str| {
        t.parse::<u16>()
            .ok()
            .filter(|s| (100..=999).contains(s))
            .ok_or_else(|| format!("{t:?} is not a status (100 to 999)"))
    };
    s.split(',')
        .map(|part| {
            let (from, to) = match part.split_once('-') {
                Some((a, b)) => (status(a)?, status(b)?),
                None => (status(part)?, status(part)?),
            };
            if from > to {
                return Err(format!("{part:?} runs backwards"));
            }
            Ok(StatusRange::new(from, to))
        })
        .collect()
}

/// The rule for a request: the one with the longest prefix covering its path, a rule naming
/// the method before one that does not at equal length; `None` when no rule covers it (the
/// namespace's table decides).
pub fn rule_for<'a>(
    rules: &'a [RoutePolicy],
    method: &Method,
    path: &str,
) -> Option<&'a RoutePolicy> {
    rules
        .iter()
        .filter(|r| r.covers(method, path))
        .max_by_key(|r| (r.prefix.len(), r.method.is_some()))
}

/// Whether `path` is `prefix` or below it (`/charges` covers `/charges/1`, not `/chargesx`).
pub(crate) fn under(path: &str, prefix: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/') || prefix.ends_with('/'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_and_refuse_with_reasons() {
        let r =
            RoutePolicy::parse("POST /charges store=200-299,402 indeterminate=500-599").unwrap();
        assert_eq!(r.method, Some(Method::POST));
        assert_eq!(r.prefix, "/charges");
        assert_eq!(
            r.stored,
            vec![StatusRange::new(200, 299), StatusRange::new(402, 402)]
        );
        assert_eq!(r.indeterminate, vec![StatusRange::new(500, 599)]);
        assert_eq!(RoutePolicy::parse("/x").unwrap(), RoutePolicy::under("/x"));
        assert_eq!(
            RoutePolicy::parse("patch /x").unwrap().method,
            Some(Method::PATCH),
            "methods are matched as written in upper case"
        );
        for (bad, why) in [
            ("", "no path prefix"),
            ("POST", "no path prefix"),
            ("POST charges store=200", "no path prefix"),
            ("/x store=2000", "not a status"),
            ("/x store=299-200", "backwards"),
            ("/x store=", "not a status"),
            ("/x keep=200", "unknown list"),
            ("/x 200", "is not store="),
            ("P{ST /x", "not a method"),
        ] {
            let e = RoutePolicy::parse(bad).unwrap_err();
            assert!(e.to_string().contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn the_most_specific_rule_decides() {
        let rules = vec![
            RoutePolicy::under("/").store(200, 299),
            RoutePolicy::under("/charges")
                .store(200, 299)
                .store(402, 402),
            RoutePolicy::under("/charges")
                .method(Method::PATCH)
                .store(200, 200),
            RoutePolicy::under("/charges/refunds").indeterminate(500, 599),
        ];
        let pick = |m: Method, p: &str| rule_for(&rules, &m, p).map(|r| r.store_as(402));
        assert_eq!(
            pick(Method::POST, "/charges/1"),
            Some(Some(StoreAs::Completed))
        );
        assert_eq!(pick(Method::PATCH, "/charges/1"), Some(None));
        assert_eq!(pick(Method::POST, "/chargesx"), Some(None));
        let refunds = rule_for(&rules, &Method::POST, "/charges/refunds/9").unwrap();
        assert_eq!(refunds.store_as(503), Some(StoreAs::Indeterminate));
        assert_eq!(refunds.store_as(200), None);
        assert!(rule_for(&rules[1..], &Method::POST, "/users").is_none());
    }

    #[test]
    fn prefixes_match_whole_segments() {
        assert!(under("/charges", "/charges"));
        assert!(under("/charges/1", "/charges"));
        assert!(!under("/chargesx", "/charges"));
        assert!(under("/anything", "/"));
        assert!(under("/v1/x", "/v1/"));
    }
}
