//! Throwaway PostgreSQL clusters for tests that must stop, restart or reconfigure the server
//! (TLS with client certificates, outages), which the shared server at 127.0.0.1:5432 cannot
//! offer: the development tools' [`local_postgres::Cluster`] (one implementation), plus what
//! only tests need (the test PKI, NVSentinel's schema, the exporter's environment) and panics
//! instead of errors.
//!
//! The pg_ctl calls are blocking; prefer `#[tokio::test(flavor = "multi_thread")]` in tests
//! that stop or restart a cluster while the exporter runs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use event_exporter_dev::local_postgres::{self, ClusterOptions, ServerTls};
use tokio_postgres::Client;

use super::pg::{quote_ident, unique_name, SCHEMA_SQL};
use super::tls::{PkiPaths, TestPki};

/// A private PostgreSQL cluster on a random 127.0.0.1 port in a temp dir.
/// `Drop` stops it (immediate mode) and removes the directory.
pub struct Cluster {
    // Dropped first: the server stops before its TLS files go.
    inner: local_postgres::Cluster,
    tls: Option<PkiPaths>,
    _tls_dir: Option<tempfile::TempDir>,
}

/// True when the PostgreSQL server binaries (initdb, pg_ctl) are installed.
pub fn available() -> bool {
    pg_bindir().is_some()
}

/// Fails the calling test when the PostgreSQL server binaries are missing: a check that cannot
/// run is never reported as passed.
pub fn require() {
    assert!(
        available(),
        "this test needs PostgreSQL's server binaries (initdb, pg_ctl): install the \
         postgresql package or set PG_BINDIR"
    );
}

/// Directory holding initdb and pg_ctl; uid/gid of the `postgres` OS user when running as
/// root (`tools/src/local_postgres.rs`).
pub use event_exporter_dev::local_postgres::{postgres_owner, server_bindir as pg_bindir};

impl Cluster {
    /// initdb + start. With `tls`: `ssl=on` with the PKI's server cert, key and CA, and TCP
    /// allows only `hostssl … cert` (client certificate whose CN is the user). Without: trust
    /// on 127.0.0.1. Both allow trust on the unix socket in the cluster dir, which the harness
    /// uses to administer.
    pub fn start(tls: Option<&TestPki>) -> Cluster {
        let tls_dir = tls.map(|_| {
            tempfile::Builder::new()
                .prefix("ee-pgcluster-tls-")
                .tempdir()
                .expect("create temp dir for a cluster's TLS files")
        });
        let paths = tls.zip(tls_dir.as_ref()).map(|(pki, dir)| {
            if let Some((uid, gid)) = postgres_owner() {
                std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                    .expect("chown TLS temp dir to postgres");
            }
            pki.write_to(&dir.path().join("tls"))
        });
        if let (Some(paths), Some((uid, gid))) = (&paths, postgres_owner()) {
            std::os::unix::fs::chown(&paths.dir, Some(uid), Some(gid))
                .expect("chown TLS dir to postgres");
        }
        let options = ClusterOptions {
            tls: paths.as_ref().map(|p| ServerTls {
                cert: p.server_cert.clone(),
                key: p.server_key.clone(),
                ca: p.ca_cert.clone(),
            }),
        };
        let inner = local_postgres::Cluster::start(options)
            .unwrap_or_else(|e| panic!("could not start throwaway PostgreSQL cluster: {e}"));
        Cluster {
            inner,
            tls: paths,
            _tls_dir: tls_dir,
        }
    }

    pub fn port(&self) -> u16 {
        self.inner.port()
    }

    /// Directory of the unix socket (usable as a `host` by libpq/tokio-postgres).
    pub fn socket_dir(&self) -> &Path {
        self.inner.socket_dir()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.inner.data_dir()
    }

    /// Paths of the PKI files when the cluster uses TLS.
    pub fn tls_paths(&self) -> Option<&PkiPaths> {
        self.tls.as_ref()
    }

    /// Stops the server (fast mode: disconnects clients, clean shutdown).
    pub fn stop(&self) {
        self.inner.stop().unwrap_or_else(|e| panic!("{e}"));
    }

    /// Starts the server again with the same data directory, port and settings.
    pub fn start_again(&self) {
        self.inner
            .start_again()
            .unwrap_or_else(|e| panic!("restart of throwaway PostgreSQL cluster failed: {e}"));
    }

    /// Stops the server now and starts it again after `down_for` in a background thread, so
    /// the test can watch the outage while it lasts. [`Cluster::wait_restarted`] waits for the
    /// start to finish.
    pub fn restart_after(&self, down_for: Duration) {
        self.inner
            .restart_after(down_for)
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Blocks until a pending [`Cluster::restart_after`] start has run.
    pub fn wait_restarted(&self) {
        self.inner.wait_restarted();
    }

    /// A client over the unix socket as `postgres` (trust), which works even when TCP only
    /// accepts client certificates.
    pub async fn admin_client(&self, dbname: &str) -> Client {
        self.inner
            .admin_client(dbname)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Last lines of the server log, for failure messages.
    pub fn log_tail(&self) -> String {
        self.inner.log_tail()
    }

    /// Creates database `name` with NVSentinel's schema (over the unix socket)
    /// and returns the name. Pass "" to get a unique `ee_test_…` name.
    pub async fn apply_schema_db(&self, name: &str) -> String {
        let name = if name.is_empty() {
            unique_name("ee_test")
        } else {
            name.to_string()
        };
        self.admin_client("postgres")
            .await
            .batch_execute(&format!("CREATE DATABASE {}", quote_ident(&name)))
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name} on cluster: {e}"));
        self.admin_client(&name)
            .await
            .batch_execute(SCHEMA_SQL)
            .await
            .unwrap_or_else(|e| panic!("apply NVSentinel schema to cluster db {name}: {e}"));
        name
    }

    /// Exporter environment for database `db` on this cluster. With TLS it
    /// points at the client files (`tls.crt`, `tls.key`, `ca.crt`) with
    /// `verify-full` (the server cert names 127.0.0.1); without, `disable`.
    pub fn env(&self, db: &str) -> Vec<(String, String)> {
        let mut env = vec![
            ("DATASTORE_PROVIDER".to_string(), "postgresql".to_string()),
            ("DATASTORE_HOST".to_string(), "127.0.0.1".to_string()),
            ("DATASTORE_PORT".to_string(), self.port().to_string()),
            ("DATASTORE_DATABASE".to_string(), db.to_string()),
            ("DATASTORE_USERNAME".to_string(), "postgres".to_string()),
        ];
        match &self.tls {
            None => env.push(("DATASTORE_SSLMODE".into(), "disable".into())),
            Some(paths) => {
                let path = |p: &Path| p.display().to_string();
                env.push(("DATASTORE_SSLMODE".into(), "verify-full".into()));
                env.push(("DATASTORE_SSLCERT".into(), path(&paths.client_cert)));
                env.push(("DATASTORE_SSLKEY".into(), path(&paths.client_key)));
                env.push(("DATASTORE_SSLROOTCERT".into(), path(&paths.ca_cert)));
                env.push(("POSTGRESQL_CLIENT_CERT_MOUNT_PATH".into(), path(&paths.dir)));
            }
        }
        env
    }
}
