//! TLS for the proxy listener: PEM files → a rustls acceptor that offers h2 and HTTP/1.1 by ALPN.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsFiles;

/// Why the certificate or key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{field}: cannot load {path}: {reason}")]
    Load {
        /// The configuration field that names the file.
        field: &'static str,
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
    let load_err = |path: &PathBuf, reason: String| TlsError::Load { field: "server.tls", path: path.clone(), reason };
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

/// The client side for an `https://` upstream: the public web roots (compiled in, so a
/// distroless image needs no CA bundle) plus the PEM certificates of `upstream.ca_file`.
pub fn upstream_client_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, TlsError> {
    install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let load_err = |reason: String| TlsError::Load { field: "upstream.ca_file", path: path.to_path_buf(), reason };
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| load_err(e.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| load_err(e.to_string()))?;
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(load_err("no usable CERTIFICATE block found".into()));
        }
    }
    Ok(rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth())
}
