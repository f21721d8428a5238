//! `idem-reconcile`: divergence reports and the compensation workflow.
//!
//! Not built yet: this crate is reserved by the project layout for the reconciliation issue.
//! Until then, compensation items are derived by [`idem::record::Record::items`] and listed by
//! `idem inspect`.
