//! Test PKI (rcgen) plus the rustls/reqwest/axum glue the other modules share.
//!
//! Everything uses the rustls **ring** provider explicitly (never the process
//! default), so no test depends on `CryptoProvider::install_default()` and
//! aws-lc-rs never enters the build.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A throwaway certificate authority with one server and one client certificate.
///
/// The server certificate is valid for `127.0.0.1` (IP SAN) and `localhost`
/// (DNS SAN); the client certificate has CN `postgres`, which is what
/// PostgreSQL's `cert` authentication maps to the database user.
pub struct TestPki {
    ca: Pair,
    server: Pair,
    client: Pair,
}

/// One certificate with its private key, kept both as PEM (for files) and DER
/// (for rustls).
struct Pair {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    key_pem: String,
    key_der: Vec<u8>,
}

impl Pair {
    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }
}

/// The test CA's parameters (the same every time, so a CA key can sign again later).
fn ca_params() -> CertificateParams {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params must build");
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "event-exporter test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params
}

/// Where [`TestPki::write_to`] put the files. Names follow NVSentinel's mounts:
/// the client secret `postgresql-client-cert` holds `tls.crt`, `tls.key`, `ca.crt`.
#[derive(Clone, Debug)]
pub struct PkiPaths {
    pub dir: PathBuf,
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl TestPki {
    /// CA + server cert (127.0.0.1, localhost) + client cert with CN `postgres`.
    pub fn generate() -> Self {
        Self::generate_with_client_cn("postgres")
    }

    /// Same as [`TestPki::generate`] with another client CN (e.g. to test that
    /// PostgreSQL rejects a certificate for the wrong user).
    pub fn generate_with_client_cn(client_cn: &str) -> Self {
        let ca_params = ca_params();
        let ca_key = KeyPair::generate().expect("generate CA key");
        let ca_key_pem = ca_key.serialize_pem();
        let ca_key_der = ca_key.serialize_der();
        let ca = CertifiedIssuer::self_signed(ca_params, ca_key).expect("self-sign CA");
        let ca_pair = Pair {
            cert_pem: ca.pem(),
            cert_der: ca.der().clone(),
            key_pem: ca_key_pem,
            key_der: ca_key_der,
        };

        let issue = |sans: Vec<String>, cn: &str, eku: ExtendedKeyUsagePurpose| -> Pair {
            let mut params = CertificateParams::new(sans).expect("leaf params must build");
            params.distinguished_name.push(DnType::CommonName, cn);
            params.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ];
            params.extended_key_usages = vec![eku];
            let key = KeyPair::generate().expect("generate leaf key");
            let cert = params.signed_by(&key, &ca).expect("sign leaf cert");
            Pair {
                cert_pem: cert.pem(),
                cert_der: cert.der().clone(),
                key_pem: key.serialize_pem(),
                key_der: key.serialize_der(),
            }
        };
        let server = issue(
            vec!["127.0.0.1".into(), "localhost".into()],
            "localhost",
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let client = issue(Vec::new(), client_cn, ExtendedKeyUsagePurpose::ClientAuth);
        TestPki {
            ca: ca_pair,
            server,
            client,
        }
    }

    /// A new client certificate (and key, PEM) with CN `cn`, signed by this CA: a rotated
    /// client certificate, as cert-manager issues it.
    pub fn issue_client(&self, cn: &str) -> (String, String) {
        let ca_key = KeyPair::from_pem(&self.ca.key_pem).expect("CA key");
        let issuer = rcgen::Issuer::new(ca_params(), ca_key);
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().expect("generate leaf key");
        let cert = params.signed_by(&key, &issuer).expect("sign leaf cert");
        (cert.pem(), key.serialize_pem())
    }

    pub fn ca_cert_pem(&self) -> &str {
        &self.ca.cert_pem
    }
    pub fn server_cert_pem(&self) -> &str {
        &self.server.cert_pem
    }
    pub fn server_key_pem(&self) -> &str {
        &self.server.key_pem
    }
    pub fn client_cert_pem(&self) -> &str {
        &self.client.cert_pem
    }
    pub fn client_key_pem(&self) -> &str {
        &self.client.key_pem
    }

    /// Writes `ca.crt`, `server.crt`, `server.key`, `tls.crt`, `tls.key` into `dir`
    /// (created if missing). Keys get mode 0600 because PostgreSQL and libpq
    /// refuse group/world-readable keys. When running as root, the server files
    /// and `ca.crt` are chowned to the `postgres` user so a cluster started as
    /// that user can read them; the client files stay with the caller, who
    /// runs the exporter.
    pub fn write_to(&self, dir: &Path) -> PkiPaths {
        std::fs::create_dir_all(dir)
            .unwrap_or_else(|e| panic!("create PKI dir {}: {e}", dir.display()));
        let paths = PkiPaths {
            dir: dir.to_path_buf(),
            ca_cert: dir.join("ca.crt"),
            server_cert: dir.join("server.crt"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("tls.crt"),
            client_key: dir.join("tls.key"),
        };
        write_file(&paths.ca_cert, &self.ca.cert_pem, 0o644);
        write_file(&paths.server_cert, &self.server.cert_pem, 0o644);
        write_file(&paths.server_key, &self.server.key_pem, 0o600);
        write_file(&paths.client_cert, &self.client.cert_pem, 0o644);
        write_file(&paths.client_key, &self.client.key_pem, 0o600);
        if let Some((uid, gid)) = super::cluster::postgres_owner() {
            for p in [&paths.ca_cert, &paths.server_cert, &paths.server_key] {
                // Best effort: as non-root the caller already is the server's user.
                let _ = std::os::unix::fs::chown(p, Some(uid), Some(gid));
            }
        }
        paths
    }

    /// Root store holding only the test CA.
    pub fn root_store(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(self.ca.cert_der.clone())
            .expect("test CA must be a valid trust anchor");
        roots
    }

    /// rustls client config (ring) trusting only the test CA; with
    /// `client_auth` it also presents the client certificate (`tls.crt`).
    pub fn client_config(&self, client_auth: bool) -> rustls::ClientConfig {
        let builder = rustls::ClientConfig::builder_with_provider(ring_provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default TLS versions")
            .with_root_certificates(self.root_store());
        if client_auth {
            builder
                .with_client_auth_cert(vec![self.client.cert_der.clone()], self.client.key())
                .expect("client cert and key must match")
        } else {
            builder.with_no_client_auth()
        }
    }

    /// rustls server config (ring) with the server certificate, no client auth.
    pub fn server_config(&self) -> rustls::ServerConfig {
        rustls::ServerConfig::builder_with_provider(ring_provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default TLS versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![self.server.cert_der.clone(), self.ca.cert_der.clone()],
                self.server.key(),
            )
            .expect("server cert and key must match")
    }

    /// reqwest client that trusts only the test CA (HTTPS to the test servers).
    pub fn reqwest_client(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .tls_backend_preconfigured(self.client_config(false))
            .build()
            .expect("build reqwest client with the test CA")
    }
}

/// The only crypto provider the harness uses.
pub fn ring_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// reqwest client for plain-HTTP test servers. reqwest is built with
/// `rustls-no-provider`, so even a plain client needs a preconfigured
/// (ring) TLS config; it trusts nothing.
pub fn plain_reqwest_client() -> reqwest::Client {
    let config = rustls::ClientConfig::builder_with_provider(ring_provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(config)
        .build()
        .expect("build plain reqwest client")
}

fn write_file(path: &Path, contents: &str, mode: u32) {
    std::fs::write(path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// A running axum server; dropping it shuts the server down gracefully
/// (stops accepting, closes idle keep-alive connections) so a dropped test
/// peer really disappears instead of lingering on pooled connections.
pub struct ServerHandle {
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl ServerHandle {
    /// Shuts down and waits (up to 5 s) until the server task ended.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), task).await;
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Serves `router` on a fresh 127.0.0.1 port, over TLS when `tls` is given (the reference
/// sink's server, one implementation).
pub async fn serve(router: axum::Router, tls: Option<Arc<rustls::ServerConfig>>) -> ServerHandle {
    let tcp = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0 for a test server");
    let addr = tcp.local_addr().expect("local_addr of a bound listener");
    let shutdown = CancellationToken::new();
    let server = event_exporter_dev::sink::spawn_server(tcp, router, tls, shutdown.clone());
    let task = tokio::spawn(async move {
        match server.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("test server {addr} failed: {e}"),
            Err(e) => eprintln!("test server {addr} panicked: {e}"),
        }
    });
    ServerHandle {
        addr,
        shutdown,
        task: Some(task),
    }
}
