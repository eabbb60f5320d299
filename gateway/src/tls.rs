//! TLS from a certificate and key on disk (a mounted Secret), reloaded when
//! they change, so cert-manager's renewals take effect without a restart.
//! The kubelet updates a mounted Secret's files in place; the gateway reads
//! them again every [`RELOAD_EVERY`] and, when they parse, serves the new
//! pair from the next handshake on. A pair that does not parse is logged
//! and counted, and the previous one stays.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use prometheus::IntCounterVec;
use tokio_rustls::rustls::crypto::ring::sign::any_supported_type;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{self, ServerConfig};

/// How often the files are read again.
pub const RELOAD_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: String },
    #[error("{path} holds no PEM private key")]
    NoKey { path: String },
    #[error("the private key is of a kind TLS cannot use: {0}")]
    BadKey(String),
    #[error("the private key does not match the certificate: {0}")]
    Mismatch(String),
    #[error("no TLS configuration: {0}")]
    Config(String),
}

/// Where the pair lives.
#[derive(Clone, Debug)]
pub struct Files {
    pub certificate: PathBuf,
    pub key: PathBuf,
}

/// The pair served now; swapped whole when the files change.
#[derive(Debug)]
pub struct Reloading {
    files: Files,
    current: RwLock<(Vec<u8>, Arc<CertifiedKey>)>,
}

impl Reloading {
    /// Loads the pair once; the gateway does not start without one.
    pub fn load(files: Files) -> Result<Arc<Self>, TlsError> {
        let (bytes, key) = read_pair(&files)?;
        Ok(Arc::new(Self { files, current: RwLock::new((bytes, key)) }))
    }

    /// A server configuration that asks this resolver at every handshake.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut config = builder.with_no_client_auth().with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// Reads the files again; Ok(true) when a new pair is now served.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let (bytes, key) = read_pair(&self.files)?;
        let mut current = self.current.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        if current.0 == bytes {
            return Ok(false);
        }
        *current = (bytes, key);
        Ok(true)
    }

    /// Reloads every [`RELOAD_EVERY`] for as long as the gateway runs.
    pub async fn keep_reloading(self: Arc<Self>, outcomes: IntCounterVec) {
        let mut ticks = tokio::time::interval(RELOAD_EVERY);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            match self.reload() {
                Ok(false) => {}
                Ok(true) => {
                    tracing::info!(certificate = %self.files.certificate.display(), "serving a new certificate");
                    outcomes.with_label_values(&["reloaded"]).inc();
                }
                Err(e) => {
                    // Mid-update, the kubelet may show one file new and one old.
                    tracing::warn!(error = %e, "keeping the certificate served now");
                    outcomes.with_label_values(&["failed"]).inc();
                }
            }
        }
    }
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|current| current.1.clone())
    }
}

/// The pair as bytes (to tell a change) and as a key TLS can serve.
fn read_pair(files: &Files) -> Result<(Vec<u8>, Arc<CertifiedKey>), TlsError> {
    let read = |path: &PathBuf| {
        std::fs::read(path).map_err(|source| TlsError::Read { path: path.display().to_string(), source })
    };
    let (cert_pem, key_pem) = (read(&files.certificate)?, read(&files.key)?);
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&cert_pem).filter_map(Result::ok).collect();
    if chain.is_empty() {
        return Err(TlsError::NoCertificate { path: files.certificate.display().to_string() });
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|_| TlsError::NoKey { path: files.key.display().to_string() })?;
    let signing = any_supported_type(&key).map_err(|e| TlsError::BadKey(e.to_string()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| TlsError::Mismatch(e.to_string()))?;
    Ok(([cert_pem, key_pem].concat(), Arc::new(certified)))
}
