//! rustls client configurations shared by the sink, the token endpoint and PostgreSQL. The
//! whole process uses one crypto provider (ring), so no configuration depends on a process-wide
//! default being installed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

/// Why a TLS configuration could not be built; names the file at fault and keeps the cause.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: cannot read PEM certificates: {source}", path.display())]
    ReadCertificates {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{}: no PEM certificate found", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: unusable CA certificate: {source}", path.display())]
    UnusableCa {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("{}: cannot read PEM private key: {source}", path.display())]
    ReadKey {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("client certificate: {0}")]
    ClientCertificate(#[source] rustls::Error),
    #[error("cannot build certificate verifier: {0}")]
    Verifier(#[source] rustls::client::VerifierBuilderError),
    #[error("{0}")]
    Protocol(#[source] rustls::Error),
}

/// The crypto provider used everywhere in this process.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// How the server's certificate is checked.
pub enum Verification {
    /// Chain and host name against these roots (the normal case).
    Full(RootCertStore),
    /// Chain against these roots, any host name (PostgreSQL `verify-ca`).
    ChainOnly(RootCertStore),
    /// Nothing is checked: encryption without authentication (`insecure_skip_verify`,
    /// PostgreSQL `require`/`prefer` without a CA file).
    None,
}

/// A client certificate chain and its key.
pub struct ClientIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

pub fn client_config(
    verification: Verification,
    identity: Option<ClientIdentity>,
) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Protocol)?;
    let verifier: Arc<dyn ServerCertVerifier> = match verification {
        Verification::Full(roots) => full_verifier(roots, &provider)?,
        Verification::ChainOnly(roots) => Arc::new(ChainOnly {
            inner: full_verifier(roots, &provider)?,
        }),
        Verification::None => Arc::new(AcceptAnyCertificate { provider }),
    };
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    match identity {
        Some(identity) => builder
            .with_client_auth_cert(identity.chain, identity.key)
            .map_err(TlsError::ClientCertificate),
        None => Ok(builder.with_no_client_auth()),
    }
}

fn full_verifier(
    roots: RootCertStore,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<WebPkiServerVerifier>, TlsError> {
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(TlsError::Verifier)
}

/// The operating system's trusted roots, plus the PEM bundle at `extra` when given.
pub fn system_roots_plus(extra: Option<&Path>) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    // Unreadable individual system certificates are not fatal; an empty store is caught
    // later as an unknown-issuer error that names the endpoint.
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = extra {
        add_pem_bundle(&mut roots, path)?;
    }
    Ok(roots)
}

/// Only the certificates in the PEM bundle at `path`.
pub fn roots_from_file(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    add_pem_bundle(&mut roots, path)?;
    Ok(roots)
}

fn add_pem_bundle(roots: &mut RootCertStore, path: &Path) -> Result<(), TlsError> {
    let certs = load_certs(path)?;
    for cert in certs {
        roots.add(cert).map_err(|source| TlsError::UnusableCa {
            path: path.to_path_buf(),
            source,
        })?;
    }
    Ok(())
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::ReadCertificates {
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

pub fn load_identity(cert: &Path, key: &Path) -> Result<ClientIdentity, TlsError> {
    let chain = load_certs(cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::ReadKey {
        path: key.to_path_buf(),
        source,
    })?;
    Ok(ClientIdentity { chain, key })
}

/// Verifies the chain but accepts any host name, as libpq's `verify-ca` does.
#[derive(Debug)]
struct ChainOnly {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Accepts any certificate (the handshake signatures are still checked, so the session key
/// belongs to whoever holds the presented certificate).
#[derive(Debug)]
struct AcceptAnyCertificate {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AcceptAnyCertificate {
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
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
