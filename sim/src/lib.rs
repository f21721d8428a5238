//! `idem-sim`: the deterministic simulator.
//!
//! Not built yet: this crate is reserved by the project layout for the replication issue, which
//! drives the real [`idem::store::Store`] over [`idem::store::storage::MemStorage`] in virtual
//! time. The store's own crash tests already use `MemStorage`'s crash model.
