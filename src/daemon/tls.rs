//! HTTPS for the API: rustls on the ring provider only (passed explicitly, so no process-wide
//! provider is needed and aws-lc-rs is never linked).

use std::sync::Arc;

use anyhow::Context as _;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::config::TlsConfig;

/// A TLS acceptor from the configured PEM files.
pub fn acceptor(tls: &TlsConfig) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&tls.cert)
        .with_context(|| format!("http.tls.cert: reading {}", tls.cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("http.tls.cert: parsing {}", tls.cert.display()))?;
    if certs.is_empty() {
        anyhow::bail!("http.tls.cert: no certificate in {}", tls.cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(&tls.key).with_context(|| {
        format!(
            "http.tls.key: reading a private key from {}",
            tls.key.display()
        )
    })?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS protocol versions")?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .context("http.tls: certificate and key do not fit together")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}
