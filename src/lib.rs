//! idem
pub mod clock;
pub mod record;
