//! TLS for the REST API and the worker gRPC service (`BATON_TLS_CERT`, `BATON_TLS_KEY`,
//! rustls with the aws-lc provider): both listeners serve TLS with the same certificate.
//!
//! The REST side accepts TCP connections in a task of its own and hands each to axum once its
//! handshake is done (at most [`HANDSHAKE_TIMEOUT`]), so a slow or broken client never holds
//! up the others. A failed handshake is logged at debug level and dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// How long a client has to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The certificate chain and key files, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What the two servers need, read once from the files.
#[derive(Clone)]
pub struct TlsSettings {
    /// For the REST API.
    pub rest: Arc<rustls::ServerConfig>,
    /// For tonic (PEM as read).
    pub grpc: tonic::transport::ServerTlsConfig,
}

impl std::fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSettings").finish_non_exhaustive()
    }
}

/// Both files or neither: a certificate without its key (or the reverse) is an error naming
/// the missing variable.
pub fn files(cert: Option<&Path>, key: Option<&Path>) -> anyhow::Result<Option<TlsFiles>> {
    match (cert, key) {
        (None, None) => Ok(None),
        (Some(cert), Some(key)) => Ok(Some(TlsFiles {
            cert: cert.to_owned(),
            key: key.to_owned(),
        })),
        (Some(_), None) => {
            anyhow::bail!("BATON_TLS_CERT is set but BATON_TLS_KEY is not: TLS needs both")
        }
        (None, Some(_)) => {
            anyhow::bail!("BATON_TLS_KEY is set but BATON_TLS_CERT is not: TLS needs both")
        }
    }
}

/// Reads and checks the certificate chain and key.
pub fn load(files: &TlsFiles) -> anyhow::Result<TlsSettings> {
    let cert_pem = std::fs::read(&files.cert)
        .with_context(|| format!("BATON_TLS_CERT: cannot read {}", files.cert.display()))?;
    let key_pem = std::fs::read(&files.key)
        .with_context(|| format!("BATON_TLS_KEY: cannot read {}", files.key.display()))?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            anyhow::anyhow!(
                "BATON_TLS_CERT: {} is not PEM certificates: {e}",
                files.cert.display()
            )
        })?;
    if chain.is_empty() {
        anyhow::bail!(
            "BATON_TLS_CERT: {} holds no certificate",
            files.cert.display()
        );
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        anyhow::anyhow!(
            "BATON_TLS_KEY: {} holds no usable private key: {e}",
            files.key.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut rest = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("BATON_TLS_CERT / BATON_TLS_KEY: the key does not match the certificate")?;
    rest.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let grpc = tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(cert_pem, key_pem));
    Ok(TlsSettings {
        rest: Arc::new(rest),
        grpc,
    })
}

/// A listener for axum whose connections have completed a TLS handshake.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Accepts on `tcp` in the background until this listener is dropped.
    pub fn new(tcp: TcpListener, config: Arc<rustls::ServerConfig>) -> std::io::Result<Self> {
        let local = tcp.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        let acceptor = TlsAcceptor::from(config);
        tokio::spawn(async move {
            loop {
                let (stream, peer) = tokio::select! {
                    _ = tx.closed() => return,
                    accepted = tcp.accept() => match accepted {
                        Ok(pair) => pair,
                        Err(e) => {
                            // Out of file descriptors and the like: pause rather than spin.
                            tracing::warn!(error = %e, "cannot accept an HTTPS connection");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                let _ = stream.set_nodelay(true);
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self { ready, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(connection) => connection,
            // The acceptor task only ends once this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports a failure
mod tests {
    use super::*;

    #[test]
    fn a_certificate_needs_its_key() {
        let e = files(Some(Path::new("/c.pem")), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("BATON_TLS_KEY"), "{e}");
        let e = files(None, Some(Path::new("/k.pem")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("BATON_TLS_CERT"), "{e}");
        assert_eq!(files(None, None).unwrap(), None);
    }

    #[test]
    fn unreadable_files_are_named() {
        let e = load(&TlsFiles {
            cert: "/nonexistent/cert.pem".into(),
            key: "/nonexistent/key.pem".into(),
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("BATON_TLS_CERT") && e.contains("/nonexistent/cert.pem"),
            "{e}"
        );
    }
}
