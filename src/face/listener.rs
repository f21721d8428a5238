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
/// id such as `spiffe://example.org/billing`) as `uri:<name>`, else its first DNS name that is
/// not a wildcard as `dns:<name>` (the prefixes keep a URI and a DNS name that read alike
/// apart); `None` when it has neither (or does not parse).
pub fn identity_of(cert: &CertificateDer<'_>) -> Option<PeerIdentity> {
    let cert = webpki::EndEntityCert::try_from(cert).ok()?;
    let uri = cert.valid_uri_names().next().map(|u| format!("uri:{u}"));
    uri.or_else(|| {
        cert.valid_dns_names()
            .find(|d| !d.starts_with('*'))
            .map(|d| format!("dns:{d}"))
    })
    .map(PeerIdentity)
}

/// Serves `app` on `listener` (through `tls` if given), at most `connections_max` connections
/// at once (more wait in the kernel's backlog), until `shutdown` resolves, then waits
/// for open connections to finish for at most `drain` (a connection that switched protocols
/// is no longer the server's: whoever spliced it closes it).
pub async fn serve(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    drain: Duration,
    connections_max: usize,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let open = Arc::new(tokio::sync::Semaphore::new(connections_max.max(1)));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = open.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = crate::daemon::tls::accept(&listener) => accepted,
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let (app, tls, watcher) = (app.clone(), tls.clone(), graceful.watcher());
        tokio::spawn(async move {
            let _permit = permit;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(sans: Vec<rcgen::SanType>) -> CertificateDer<'static> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = sans;
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    fn id(sans: Vec<rcgen::SanType>) -> Option<String> {
        identity_of(&cert(sans)).map(|p| p.0)
    }

    #[test]
    fn identities_are_a_uri_else_a_dns_name_and_say_which() {
        use rcgen::SanType::{DnsName, URI};
        let uri = |s: &str| URI(s.try_into().unwrap());
        let dns = |s: &str| DnsName(s.try_into().unwrap());
        assert_eq!(
            id(vec![
                dns("billing.internal"),
                uri("spiffe://example.org/billing")
            ])
            .as_deref(),
            Some("uri:spiffe://example.org/billing")
        );
        assert_eq!(
            id(vec![dns("*.example.org"), dns("orders.internal")]).as_deref(),
            Some("dns:orders.internal")
        );
        assert_ne!(id(vec![dns("billing")]), id(vec![uri("billing")]));
        assert_eq!(
            id(vec![dns("*.example.org")]),
            None,
            "a wildcard names no one"
        );
        assert_eq!(id(vec![]), None);
        assert_eq!(identity_of(&CertificateDer::from(vec![1u8, 2, 3])), None);
    }
}
