//! HTTPS for the API and for `idem proxy`: rustls on the ring provider only (passed
//! explicitly, so no process-wide provider is needed and aws-lc-rs is never linked).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::config::TlsConfig;

/// A TLS acceptor from the configured PEM files.
pub fn acceptor(tls: &TlsConfig) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let config = server_config(&tls.cert, &tls.key, None, "http.tls")?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// A server config from PEM files: the certificate chain (leaf first) and its private key; and,
/// with `client_ca`, mutual TLS: every client must present a certificate chaining to one of
/// its CAs. `what` names the setting in errors (`http.tls`, `--tls`).
pub(crate) fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
    what: &str,
) -> anyhow::Result<rustls::ServerConfig> {
    let certs = pem_certs(cert, &format!("{what}.cert"))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("{what}.key: reading a private key from {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in pem_certs(ca, &format!("{what}.client_ca"))? {
                roots.add(c).with_context(|| {
                    format!(
                        "{what}.client_ca: a certificate in {} is not a CA",
                        ca.display()
                    )
                })?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .with_context(|| format!("{what}.client_ca: {}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .with_context(|| format!("{what}: certificate and key do not fit together"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Every certificate in a PEM file (at least one).
fn pem_certs(path: &Path, what: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("{what}: reading {}", path.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("{what}: parsing {}", path.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{what}: no certificate in {}", path.display());
    }
    Ok(certs)
}

/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The server side of a TLS handshake on an accepted connection, within a time limit; `None`
/// (logged) when it fails or takes too long.
pub(crate) async fn handshake(
    acceptor: &tokio_rustls::TlsAcceptor,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
) -> Option<tokio_rustls::server::TlsStream<tokio::net::TcpStream>> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(s)) => Some(s),
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            None
        }
    }
}

/// The next connection: errors (out of file descriptors and the like) are logged and waited
/// out briefly, so the listener keeps serving the rest.
pub(crate) async fn accept(
    listener: &tokio::net::TcpListener,
) -> (tokio::net::TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(c) => return c,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
