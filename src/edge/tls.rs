//! TLS termination with rustls: PEM certificate chains and keys (RSA, ECDSA, PKCS#8),
//! TLS 1.2 and 1.3 only, ALPN `h2` and `http/1.1`, a self-signed certificate for local
//! development, and certificate reload (on SIGHUP) without dropping connections.
//!
//! It owns certificates and the rustls server configuration; the listener hands it
//! accepted sockets and gets TLS streams back.

use rustls::server::{ClientHello, ResolvesServerCert};
pub use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// Why a certificate could not be loaded or made. Each message names the file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The certificate file cannot be read, or is not PEM.
    #[error("{path}: {what}: {detail}")]
    Certificate {
        /// The certificate file.
        path: PathBuf,
        /// What went wrong, in words.
        what: &'static str,
        /// The parser's or the system's message.
        detail: String,
    },
    /// The certificate file holds no certificate.
    #[error("{0}: no certificate found in the file")]
    NoCertificate(PathBuf),
    /// The key file holds no key rustls can use.
    #[error("{path}: {what}: {detail}")]
    Key {
        /// The key file.
        path: PathBuf,
        /// What went wrong, in words.
        what: &'static str,
        /// The parser's message.
        detail: String,
    },
    /// The key is not the certificate's.
    #[error("{key} and {cert}: key does not match the certificate: {detail}")]
    Mismatch {
        /// The key file.
        key: PathBuf,
        /// The certificate file.
        cert: PathBuf,
        /// rustls's message.
        detail: String,
    },
    /// A self-signed certificate could not be made.
    #[error("cannot generate a self-signed certificate: {0}")]
    SelfSigned(String),
    /// rustls refused the configuration.
    #[error("TLS setup: {0}")]
    Setup(#[from] rustls::Error),
}

/// Where a listener's certificate comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// PEM files, read again on reload.
    Files {
        /// The certificate chain.
        cert: PathBuf,
        /// The private key.
        key: PathBuf,
    },
    /// Made at start, for local development.
    SelfSigned,
}

/// The current certificate, swappable while connections use the old one.
#[derive(Debug)]
pub struct Certs {
    source: Source,
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Certs {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

impl Certs {
    /// Loads (or, for self-signed, generates) the certificate. `label` names the
    /// listener in messages.
    pub fn new(source: Source, label: &str) -> Result<Arc<Certs>, Error> {
        let key = match &source {
            Source::Files { cert, key } => load(cert, key)?,
            Source::SelfSigned => self_signed(label)?,
        };
        Ok(Arc::new(Certs {
            source,
            current: RwLock::new(Arc::new(key)),
        }))
    }

    /// Reads the files again; on error the old certificate stays in use.
    pub fn reload(&self) -> Result<(), Error> {
        if let Some(fresh) = self.read_again()? {
            self.install(fresh);
        }
        Ok(())
    }

    /// The certificate as its files hold it now (None for a self-signed one),
    /// not yet in use.
    pub fn read_again(&self) -> Result<Option<CertifiedKey>, Error> {
        match &self.source {
            Source::Files { cert, key } => load(cert, key).map(Some),
            Source::SelfSigned => Ok(None),
        }
    }

    /// Puts `fresh` in use for new handshakes.
    pub fn install(&self, fresh: CertifiedKey) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(fresh);
        if let Source::Files { cert, .. } = &self.source {
            tracing::info!(cert = %cert.display(), "TLS certificate reloaded");
        }
    }

    /// The rustls configuration of a listener using these certificates.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        // The server's cipher order, strongest first, as nginx's ssl_prefer_server_ciphers.
        cfg.ignore_client_order = true;
        Ok(Arc::new(cfg))
    }
}

/// Reads a PEM chain and key; errors name the file and the problem.
pub fn load(cert: &Path, key: &Path) -> Result<CertifiedKey, Error> {
    let cert_error = |what, detail: String| Error::Certificate {
        path: cert.to_path_buf(),
        what,
        detail,
    };
    let key_error = |what, detail: String| Error::Key {
        path: key.to_path_buf(),
        what,
        detail,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| cert_error("cannot read certificate", e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| cert_error("bad certificate PEM", e.to_string()))?;
    if chain.is_empty() {
        return Err(Error::NoCertificate(cert.to_path_buf()));
    }
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        key_error(
            "no usable private key (RSA, EC or PKCS#8 PEM)",
            e.to_string(),
        )
    })?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&der)
        .map_err(|e| key_error("unsupported private key", e.to_string()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| Error::Mismatch {
        key: key.to_path_buf(),
        cert: cert.to_path_buf(),
        detail: e.to_string(),
    })?;
    Ok(certified)
}

/// A certificate for localhost and 127.0.0.1, made now; its fingerprint is logged
/// and its PEM written next to the temporary files so clients can trust it.
fn self_signed(label: &str) -> Result<CertifiedKey, Error> {
    let generated = rcgen::generate_simple_self_signed(vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ])
    .map_err(|e| Error::SelfSigned(e.to_string()))?;
    let der = generated.cert.der().clone();
    let fingerprint = fingerprint(&der);
    let pem_path = std::env::temp_dir().join(format!("corral-{label}-self-signed.pem"));
    if let Err(e) = std::fs::write(&pem_path, generated.cert.pem()) {
        tracing::warn!(path = %pem_path.display(), "cannot write the self-signed certificate: {e}");
    }
    tracing::warn!(
        listener = label,
        sha256 = %fingerprint,
        pem = %pem_path.display(),
        "self-signed TLS certificate (for development only)"
    );
    let key = PrivateKeyDer::Pkcs8(generated.signing_key.serialize_der().into());
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| Error::SelfSigned(format!("key: {e}")))?;
    Ok(CertifiedKey::new(vec![der], signing))
}

/// SHA-256 of a DER certificate as `AB:CD:...`, as `openssl x509 -fingerprint` prints.
pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}
