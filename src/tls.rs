//! HTTPS: the certificate (from PEM files, reloaded on SIGHUP, or generated
//! for development) and a TLS listener that `axum::serve` runs the same
//! router on. ALPN offers `h2` and `http/1.1`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// A TLS client that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What went wrong loading a certificate, with the config key it concerns.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct TlsError {
    /// `server.tls_cert` or `server.tls_key`.
    pub key: &'static str,
    pub message: String,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads a PEM certificate chain and its PEM private key, checking that they
/// belong together.
pub fn load_pem(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let cert_err = |message: String| TlsError {
        key: "server.tls_cert",
        message,
    };
    let key_err = |message: String| TlsError {
        key: "server.tls_key",
        message,
    };
    let cert_pem = std::fs::read(cert)
        .map_err(|e| cert_err(format!("cannot read {}: {e}", cert.display())))?;
    let key_pem =
        std::fs::read(key).map_err(|e| key_err(format!("cannot read {}: {e}", key.display())))?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_err(format!("{}: bad PEM: {e}", cert.display())))?;
    if chain.is_empty() {
        return Err(cert_err(format!(
            "{}: no CERTIFICATE in the PEM file",
            cert.display()
        )));
    }
    let private = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| key_err(format!("{}: no usable private key: {e}", key.display())))?;
    CertifiedKey::from_der(chain, private, &provider())
        .map(Arc::new)
        .map_err(|e| key_err(format!("{} with {}: {e}", key.display(), cert.display())))
}

/// A self-signed certificate for `names` (host names or IP addresses).
pub fn self_signed(names: &[String]) -> anyhow::Result<Arc<CertifiedKey>> {
    let generated = rcgen::generate_simple_self_signed(names.to_vec())?;
    let key = PrivateKeyDer::try_from(generated.signing_key.serialize_der())
        .map_err(|e| anyhow::anyhow!("generated key: {e}"))?;
    let cert = CertifiedKey::from_der(vec![generated.cert.der().clone()], key, &provider())?;
    Ok(Arc::new(cert))
}

/// SHA-256 of a DER certificate as colon-separated upper-case hex, the way
/// browsers and `openssl x509 -fingerprint -sha256` show it.
pub fn fingerprint(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    digest
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn leaf_fingerprint(key: &CertifiedKey) -> String {
    key.end_entity_cert()
        .map(|c| fingerprint(c))
        .unwrap_or_default()
}

/// Where the certificate comes from.
#[derive(Debug, Clone)]
pub enum Source {
    Files { cert: PathBuf, key: PathBuf },
    SelfSigned { names: Vec<String> },
}

/// Hands rustls the current certificate; [`CertStore::reload`] swaps it
/// without touching the listener or open connections.
#[derive(Debug)]
pub struct CertStore {
    source: Source,
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertStore {
    pub fn new(source: Source) -> anyhow::Result<Arc<Self>> {
        let key = match &source {
            Source::Files { cert, key } => {
                load_pem(cert, key).map_err(|e| anyhow::anyhow!("`{}`: {e}", e.key))?
            }
            Source::SelfSigned { names } => self_signed(names)?,
        };
        match &source {
            Source::Files { cert, .. } => tracing::info!(
                cert = %cert.display(),
                sha256 = %leaf_fingerprint(&key),
                "TLS certificate loaded"
            ),
            Source::SelfSigned { names } => tracing::warn!(
                ?names,
                sha256 = %leaf_fingerprint(&key),
                "serving HTTPS with a self-signed development certificate"
            ),
        }
        Ok(Arc::new(Self {
            source,
            current: RwLock::new(key),
        }))
    }

    /// Reads the certificate files again; on any error the old certificate
    /// stays in use. A self-signed certificate is kept as it is.
    pub fn reload(&self) -> Result<(), TlsError> {
        let Source::Files { cert, key } = &self.source else {
            tracing::info!("SIGHUP: the self-signed certificate is kept");
            return Ok(());
        };
        let new = load_pem(cert, key)?;
        tracing::info!(
            cert = %cert.display(),
            sha256 = %leaf_fingerprint(&new),
            "TLS certificate reloaded"
        );
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = new;
        Ok(())
    }

    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A rustls server config that asks this store for every handshake.
    pub fn server_config(self: &Arc<Self>) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// Reloads on every SIGHUP for as long as the process runs.
    #[cfg(unix)]
    pub fn reload_on_sighup(self: &Arc<Self>) -> anyhow::Result<()> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = signal(SignalKind::hangup())?;
        let store = self.clone();
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                if let Err(e) = store.reload() {
                    tracing::error!(
                        key = e.key,
                        error = %e,
                        "TLS certificate reload failed; keeping the previous certificate"
                    );
                }
            }
        });
        Ok(())
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// Accepts TCP connections and completes TLS handshakes on their own tasks,
/// so a slow client never holds up the others; `axum::serve` gets finished
/// TLS streams.
pub struct TlsListener {
    local_addr: SocketAddr,
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
}

impl TlsListener {
    pub fn new(listener: TcpListener, config: Arc<rustls::ServerConfig>) -> std::io::Result<Self> {
        let local_addr = listener.local_addr()?;
        let acceptor = TlsAcceptor::from(config);
        let (tx, ready) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = tx.closed() => return,
                    a = listener.accept() => a,
                };
                let (tcp, peer) = match accepted {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::debug!(error = %e, "HTTPS accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self { local_addr, ready })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accept task only ends once this listener is gone.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local_addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_loads_and_has_a_fingerprint() {
        let k = self_signed(&["localhost".into(), "127.0.0.1".into()]).unwrap();
        let f = leaf_fingerprint(&k);
        assert_eq!(f.len(), 32 * 3 - 1, "{f}");
    }

    #[test]
    fn errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let e = load_pem(&missing, &missing).unwrap_err();
        assert_eq!(e.key, "server.tls_cert");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a pem").unwrap();
        let e = load_pem(&junk, &junk).unwrap_err();
        assert_eq!(e.key, "server.tls_cert", "{e}");
        let g = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let cert = dir.path().join("cert.pem");
        std::fs::write(&cert, g.cert.pem()).unwrap();
        let e = load_pem(&cert, &junk).unwrap_err();
        assert_eq!(e.key, "server.tls_key", "{e}");
        let other = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let key = dir.path().join("key.pem");
        std::fs::write(&key, other.signing_key.serialize_pem()).unwrap();
        let e = load_pem(&cert, &key).unwrap_err();
        assert_eq!(e.key, "server.tls_key", "{e}");
        std::fs::write(&key, g.signing_key.serialize_pem()).unwrap();
        load_pem(&cert, &key).unwrap();
    }
}
