//! The HTTP face: exact `Idempotency-Key` semantics (the IETF idempotency-key draft, as
//! Stripe-style clients expect) for any HTTP API, as a tower layer ([`layer`]) or as the
//! `idem proxy` sidecar in front of an API in any language.
//!
//! * [`key`]: the `Idempotency-Key` header, quoted or bare.
//! * [`fingerprint`]: what makes two requests with one key the same request.
//! * [`layer`]: [`IdempotencyLayer`], the tower layer.
//! * [`route`]: what is stored, by route and status.
//! * [`encoding`]: gzip for clients that ask (outcomes are stored in identity encoding).
//! * [`backend`]: where keys live: [`EmbeddedStore`] in this process, or a region daemon.
//! * [`proxy`]: `idem proxy`, the layer as a sidecar reverse proxy.
//! * [`upgrade`]: protocol upgrades (websockets) through the proxy.
//! * [`listener`]: serving it: plain, TLS or mutual TLS (the client certificate's identity as
//!   the principal), with protocol upgrades.

pub mod backend;
pub mod encoding;
pub mod fingerprint;
pub mod key;
pub mod layer;
pub mod listener;
pub mod proxy;
pub mod route;
pub mod upgrade;

pub use backend::{Backend, EmbeddedStore, NamespaceLimits, RemoteStore};
pub use layer::{
    AnswerTemplate, IdempotencyLayer, IdempotencyService, LayerConfig, LayerStats, PeerIdentity,
    PrincipalFrom, Verdict,
};
pub use route::RoutePolicy;
