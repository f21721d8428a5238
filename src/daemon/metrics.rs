//! Prometheus metrics, served as text at `GET /metrics`. Counters are bumped by the HTTP
//! handlers; gauges that describe the store (keys, bytes) are read when scraped.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels of a claim answer.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// `execute`, `replay`, `in_flight`, `mismatch` or `unavailable`.
    pub decision: &'static str,
}

/// Labels of a finished claim.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TerminalLabels {
    /// `completed`, `indeterminate` or `released`.
    pub terminal: &'static str,
}

/// Labels of a failover lookup.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LookupLabels {
    /// The prior region named: the first [`PRIOR_LABELS_MAX`] distinct ids seen, then
    /// `other` (the header comes from callers: the label set must stay bounded).
    pub prior: String,
    /// What came of it: `granted_unanswered` or `refused_unanswered`.
    pub result: &'static str,
}

/// How many distinct prior-region ids get their own label.
pub const PRIOR_LABELS_MAX: usize = 32;

/// Every metric the daemon exports.
pub struct Metrics {
    registry: Registry,
    prior_labels: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// Claims by decision (replays, mismatches and in-flight conflicts are decisions).
    pub claims: Family<DecisionLabels, Counter>,
    /// Claims that took over a claim whose lease had run out.
    pub takeovers: Counter,
    /// Claims that resumed the caller's own claim (same attempt token, answer lost).
    pub resumes: Counter,
    /// Completions and releases by how the claim ended.
    pub finished: Family<TerminalLabels, Counter>,
    /// Completions of claims that no longer win their key (flagged for compensation).
    pub superseded: Counter,
    /// Lease extensions granted.
    pub lease_extensions: Counter,
    /// Claims that named a prior region.
    pub failover_lookups: Family<LookupLabels, Counter>,
    /// Duration of each data sync (fdatasync) of the log.
    pub fsync_seconds: Histogram,
    /// From a claim's stamp to its completion.
    pub time_to_outcome_seconds: Histogram,
    /// Keys held in the index (read when scraped).
    pub keys: Gauge,
    /// Bytes of log segments on disk (read when scraped).
    pub log_bytes: Gauge,
    /// 1 when ready (read when scraped).
    pub ready: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh set, registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("idem");
        let m = Metrics {
            registry: Registry::default(),
            prior_labels: Default::default(),
            claims: Family::default(),
            takeovers: Counter::default(),
            resumes: Counter::default(),
            finished: Family::default(),
            superseded: Counter::default(),
            lease_extensions: Counter::default(),
            failover_lookups: Family::default(),
            // 50 µs to about 1.6 s.
            fsync_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            // 1 ms to about 9 min.
            time_to_outcome_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 20)),
            keys: Gauge::default(),
            log_bytes: Gauge::default(),
            ready: Gauge::default(),
        };
        registry.register("claims", "Claims by decision", m.claims.clone());
        registry.register(
            "takeovers",
            "Claims that took over a claim whose lease ran out",
            m.takeovers.clone(),
        );
        registry.register(
            "resumes",
            "Claims that resumed the caller's own claim (same attempt token)",
            m.resumes.clone(),
        );
        registry.register(
            "finished",
            "Completions and releases by how the claim ended",
            m.finished.clone(),
        );
        registry.register(
            "superseded",
            "Completions of claims that no longer win their key",
            m.superseded.clone(),
        );
        registry.register(
            "lease_extensions",
            "Lease extensions granted",
            m.lease_extensions.clone(),
        );
        registry.register(
            "failover_lookups",
            "Claims naming a prior region, by what came of the lookup",
            m.failover_lookups.clone(),
        );
        registry.register(
            "fsync_seconds",
            "Duration of each data sync of the log",
            m.fsync_seconds.clone(),
        );
        registry.register(
            "time_to_outcome_seconds",
            "From a claim's stamp to its completion",
            m.time_to_outcome_seconds.clone(),
        );
        registry.register("keys", "Keys held in the index", m.keys.clone());
        registry.register(
            "log_bytes",
            "Bytes of log segments on disk",
            m.log_bytes.clone(),
        );
        registry.register("ready", "1 when the store answers claims", m.ready.clone());
        Metrics { registry, ..m }
    }

    /// Counts a claim answer.
    pub fn claim(&self, decision: &'static str) {
        self.claims
            .get_or_create(&DecisionLabels { decision })
            .inc();
    }

    /// Labels for a failover lookup naming `prior`, with a bounded set of `prior` values.
    pub fn lookup_labels(
        &self,
        prior: crate::clock::RegionId,
        result: &'static str,
    ) -> LookupLabels {
        let mut seen = self
            .prior_labels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let name = prior.to_string();
        let prior = if seen.contains(&name) || seen.len() < PRIOR_LABELS_MAX {
            seen.insert(name.clone());
            name
        } else {
            "other".to_owned()
        };
        LookupLabels { prior, result }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_histograms_appear_in_the_text() {
        let m = Metrics::new();
        m.claim("execute");
        m.claim("execute");
        m.claim("replay");
        m.fsync_seconds.observe(0.0007);
        m.keys.set(42);
        let text = m.encode();
        assert!(
            text.contains("idem_claims_total{decision=\"execute\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("idem_claims_total{decision=\"replay\"} 1"),
            "{text}"
        );
        assert!(text.contains("idem_fsync_seconds_count 1"), "{text}");
        assert!(text.contains("idem_keys 42"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn prior_region_labels_stay_bounded() {
        let m = Metrics::new();
        for i in 0..PRIOR_LABELS_MAX + 10 {
            let region = crate::clock::RegionId::new(&format!("r{i}")).unwrap();
            let labels = m.lookup_labels(region, "granted_unanswered");
            m.failover_lookups.get_or_create(&labels).inc();
        }
        let text = m.encode();
        assert!(text.contains("prior=\"r0\""), "{text}");
        assert!(
            !text.contains(&format!("prior=\"r{PRIOR_LABELS_MAX}\"")),
            "{text}"
        );
        assert!(
            text.contains("prior=\"other\",result=\"granted_unanswered\"} 10"),
            "{text}"
        );
    }
}
