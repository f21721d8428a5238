//! idem
pub mod clock;
pub mod record;
pub mod store;
