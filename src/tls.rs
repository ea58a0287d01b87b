//! rustls configurations from PEM files: the proxy listener's acceptor (h2 and HTTP/1.1 by ALPN),
//! the client for an `https://` upstream, and the client for `rediss://`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio_rustls::TlsAcceptor;

use crate::config::{RedisTls, TlsFiles};

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
    #[error("{field}: certificate and key are not usable together")]
    Config {
        /// The configuration table that names the pair.
        field: &'static str,
        /// What rustls said.
        #[source]
        source: rustls::Error,
    },
}

/// Install the process-wide crypto provider (ring). Only one provider is compiled in, but rustls
/// still wants it installed once before any config is built; later calls are no-ops.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Build the acceptor from the configured PEM files.
pub fn acceptor(files: &TlsFiles) -> Result<TlsAcceptor, TlsError> {
    install_crypto_provider();
    let (certs, key) = load_pair(("server.tls", "server.tls"), files)?;
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|source| TlsError::Config { field: "server.tls", source })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The client side for an `https://` upstream: the public web roots (compiled in, so a
/// distroless image needs no CA bundle) plus the PEM certificates of `upstream.ca_file`.
pub fn upstream_client_config(field: &'static str, ca_file: Option<&Path>) -> Result<rustls::ClientConfig, TlsError> {
    install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        add_roots(&mut roots, field, path)?;
    }
    Ok(rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth())
}

/// A connector for `http://` and `https://` URLs over HTTP/1.1: TCP with `connect_timeout`,
/// no Nagle, keep-alive probes; TLS as [`upstream_client_config`] sets it.
pub fn https_connector(
    field: &'static str,
    ca_file: Option<&Path>,
    connect_timeout: std::time::Duration,
) -> Result<HttpsConnector<HttpConnector>, TlsError> {
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(connect_timeout));
    http.set_nodelay(true);
    http.set_keepalive(Some(std::time::Duration::from_secs(60)));
    http.enforce_http(false);
    Ok(HttpsConnectorBuilder::new()
        .with_tls_config(upstream_client_config(field, ca_file)?)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http))
}

/// The client side for `rediss://`: the system's trusted roots (the compiled-in web roots when the
/// system has none, as in a scratch image), or only the CAs of `ca_file` when set (a private CA);
/// a client certificate when configured (mTLS); or, with `insecure_skip_verify`, no verification
/// of the server's certificate at all (its handshake signature is still checked).
pub fn redis_client_config(tls: &RedisTls) -> Result<rustls::ClientConfig, TlsError> {
    install_crypto_provider();
    let builder = rustls::ClientConfig::builder();
    let builder = if tls.insecure_skip_verify {
        let provider = CryptoProvider::get_default()
            .cloned()
            .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
        builder.dangerous().with_custom_certificate_verifier(Arc::new(AnyServerCertificate(provider)))
    } else {
        let mut roots = rustls::RootCertStore::empty();
        match &tls.ca_file {
            Some(path) => add_roots(&mut roots, "redis.tls.ca_file", path)?,
            None => {
                roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
                if roots.is_empty() {
                    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
                }
            }
        }
        builder.with_root_certificates(roots)
    };
    match &tls.client_cert {
        Some(files) => {
            let (certs, key) = load_pair(("redis.tls.cert_file", "redis.tls.key_file"), files)?;
            builder.with_client_auth_cert(certs, key).map_err(|source| TlsError::Config { field: "redis.tls", source })
        }
        None => Ok(builder.with_no_client_auth()),
    }
}

/// A certificate chain and its key; `fields` name the certificate's and the key's settings.
fn load_pair(
    (cert_field, key_field): (&'static str, &'static str),
    files: &TlsFiles,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let certs = load_certs(cert_field, &files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| TlsError::Load {
        field: key_field,
        path: files.key.clone(),
        reason: e.to_string(),
    })?;
    Ok((certs, key))
}

/// Every CERTIFICATE block of a PEM file; at least one.
fn load_certs(field: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let load_err = |reason: String| TlsError::Load { field, path: path.to_path_buf(), reason };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| load_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| load_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(load_err("no CERTIFICATE block found".into()));
    }
    Ok(certs)
}

/// Add a PEM file's CA certificates to `roots`; at least one must be usable.
fn add_roots(roots: &mut rustls::RootCertStore, field: &'static str, path: &Path) -> Result<(), TlsError> {
    let (added, _) = roots.add_parsable_certificates(load_certs(field, path)?);
    if added == 0 {
        return Err(TlsError::Load { field, path: path.to_path_buf(), reason: "no usable CA certificate".into() });
    }
    Ok(())
}

/// `redis.tls.insecure_skip_verify`: any certificate is accepted for any name. The handshake
/// signatures are still verified, so the session is encrypted to whoever answered; only who
/// answered is unknown.
#[derive(Debug)]
struct AnyServerCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServerCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
