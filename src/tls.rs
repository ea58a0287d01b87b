//! TLS for the proxy listener: PEM files → a rustls acceptor that offers h2 and HTTP/1.1 by ALPN.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsFiles;

/// Why the certificate or key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("server.tls: cannot load {path}: {reason}")]
    Load {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// rustls rejected the pair (for example a key that does not match the certificate).
    #[error("server.tls: certificate and key are not usable together")]
    Config(#[source] rustls::Error),
}

/// Install the process-wide crypto provider (ring). Only one provider is compiled in, but rustls
/// still wants it installed once before any config is built; later calls are no-ops.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Build the acceptor from the configured PEM files.
pub fn acceptor(files: &TlsFiles) -> Result<TlsAcceptor, TlsError> {
    install_crypto_provider();
    let load_err = |path: &PathBuf, reason: String| TlsError::Load { path: path.clone(), reason };
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| load_err(&files.cert, e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| load_err(&files.cert, e.to_string()))?;
    if certs.is_empty() {
        return Err(load_err(&files.cert, "no CERTIFICATE block found".into()));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| load_err(&files.key, e.to_string()))?;
    let mut config =
        rustls::ServerConfig::builder().with_no_client_auth().with_single_cert(certs, key).map_err(TlsError::Config)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
