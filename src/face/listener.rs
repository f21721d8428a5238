//! Serving the HTTP face: accepts connections (plain, TLS, or mutual TLS), gives each request
//! its peer's address (`ConnectInfo`) and, under mutual TLS, the client certificate's verified
//! identity ([`PeerIdentity`]), serves HTTP/1.1 with protocol upgrades, and stops gracefully.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::Request;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use rustls_pki_types::CertificateDer;
use tokio::net::TcpListener;
use tower::ServiceExt as _;

use super::PeerIdentity;

/// How long a client may take to send a request's head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// TLS for a listener, from PEM files.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// Its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// Mutual TLS: clients must present a certificate from one of these CAs; its identity
    /// (see [`identity_of`]) is set on every request of the connection as [`PeerIdentity`].
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    /// The acceptor these files make; errors name the flag (`--tls-cert` and so on).
    pub fn acceptor(&self) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
        let config = crate::daemon::tls::server_config(
            &self.cert,
            &self.key,
            self.client_ca.as_deref(),
            "--tls",
        )?;
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }
}

/// A verified client certificate's identity: its first URI subject alternative name (a SPIFFE
/// id such as `spiffe://example.org/billing`), else its first DNS name; `None` when it has
/// neither (or does not parse).
pub fn identity_of(cert: &CertificateDer<'_>) -> Option<PeerIdentity> {
    let cert = webpki::EndEntityCert::try_from(cert).ok()?;
    let uri = cert.valid_uri_names().next().map(str::to_owned);
    uri.or_else(|| cert.valid_dns_names().next().map(str::to_owned))
        .map(PeerIdentity)
}

/// Serves `app` on `listener` (through `tls` if given) until `shutdown` resolves, then waits
/// for open connections to finish (upgraded ones included) for at most `drain`.
pub async fn serve(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    drain: Duration,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = crate::daemon::tls::accept(&listener) => accepted,
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let (app, tls, watcher) = (app.clone(), tls.clone(), graceful.watcher());
        tokio::spawn(async move {
            let served = match tls {
                None => {
                    let http = builder();
                    let conn = http
                        .serve_connection_with_upgrades(
                            TokioIo::new(stream),
                            service(app, peer, None),
                        )
                        .into_owned();
                    watcher.watch(conn).await
                }
                Some(acceptor) => {
                    let Some(stream) = crate::daemon::tls::handshake(&acceptor, stream, peer).await
                    else {
                        return;
                    };
                    let identity = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|certs| certs.first())
                        .and_then(identity_of);
                    let http = builder();
                    let conn = http
                        .serve_connection_with_upgrades(
                            TokioIo::new(stream),
                            service(app, peer, identity),
                        )
                        .into_owned();
                    watcher.watch(conn).await
                }
            };
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(drain) => {
            tracing::warn!("connections still open after the drain timeout; stopping anyway");
        }
    }
}

/// HTTP/1.1 with a header read timeout.
fn builder() -> hyper_util::server::conn::auto::Builder<TokioExecutor> {
    let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new()).http1_only();
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    b
}

/// `app` for one connection: each request gets the peer's address and identity.
fn service(
    app: Router,
    peer: SocketAddr,
    identity: Option<PeerIdentity>,
) -> TowerToHyperService<
    impl tower::Service<
            Request<hyper::body::Incoming>,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
            Future = impl Send,
        > + Clone,
> {
    TowerToHyperService::new(tower::service_fn(
        move |req: Request<hyper::body::Incoming>| {
            let mut req = req.map(Body::new);
            req.extensions_mut().insert(ConnectInfo(peer));
            if let Some(id) = &identity {
                req.extensions_mut().insert(id.clone());
            }
            app.clone().oneshot(req)
        },
    ))
}
