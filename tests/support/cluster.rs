//! Throwaway PostgreSQL clusters (initdb + pg_ctl) for tests that must stop,
//! restart or reconfigure the server (TLS with client certificates, outages),
//! which the shared server at 127.0.0.1:5432 cannot offer.
//!
//! initdb refuses to run as root, so as root every server command runs as the
//! `postgres` OS user via `runuser`, and the cluster's files are owned by it.
//! The pg_ctl calls are blocking; prefer `#[tokio::test(flavor = "multi_thread")]`
//! in tests that stop or restart a cluster while the exporter runs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio_postgres::{Client, NoTls};

use super::pg::{quote_ident, unique_name, SCHEMA_SQL};
use super::tls::{PkiPaths, TestPki};

/// A private PostgreSQL 15 cluster on a random 127.0.0.1 port in a temp dir.
/// `Drop` stops it (immediate mode) and removes the directory.
pub struct Cluster {
    dir: tempfile::TempDir,
    bindir: PathBuf,
    port: u16,
    tls: Option<PkiPaths>,
    /// Pending background start from [`Cluster::restart_after`]; joined on drop
    /// so a late start can never outlive the cluster's directory.
    restart: Mutex<Option<JoinHandle<()>>>,
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
/// root: the development tools' implementations (`tools/src/local_postgres.rs`), which the
/// demo's throwaway cluster uses too.
pub use event_exporter_dev::local_postgres::{postgres_owner, server_bindir as pg_bindir};

/// A port the kernel just handed out on 127.0.0.1. Another process could
/// take it before PostgreSQL binds it; `Cluster::start` retries on failure.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0 to find a free port")
        .port()
}

impl Cluster {
    /// initdb + start. With `tls`: `ssl=on` with the PKI's server cert, key
    /// and CA, and TCP allows only `hostssl … cert` (client certificate whose
    /// CN is the user). Without: trust on 127.0.0.1. Both allow trust on the
    /// unix socket in the cluster dir, which the harness uses to administer.
    pub fn start(tls: Option<&TestPki>) -> Cluster {
        let bindir = pg_bindir().expect(
            "PostgreSQL server binaries (initdb, pg_ctl) not found; check cluster::available() first",
        );
        let dir = tempfile::Builder::new()
            .prefix("ee-pgcluster-")
            .tempdir()
            .expect("create temp dir for a PostgreSQL cluster");
        let tls_paths = tls.map(|pki| pki.write_to(&dir.path().join("tls")));
        if let Some((uid, gid)) = postgres_owner() {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .expect("chown cluster dir to postgres");
            if let Some(paths) = &tls_paths {
                std::os::unix::fs::chown(&paths.dir, Some(uid), Some(gid))
                    .expect("chown TLS dir to postgres");
            }
        }
        let mut cluster = Cluster {
            dir,
            bindir,
            port: 0,
            tls: tls_paths,
            restart: Mutex::new(None),
        };
        cluster.initdb();
        cluster.write_pg_hba();

        // The port is only reserved once PostgreSQL binds it: retry on a race.
        let mut last_error = String::new();
        for _ in 0..3 {
            cluster.port = free_port();
            cluster.write_settings();
            match cluster.pg_ctl_start() {
                Ok(()) => return cluster,
                Err(e) => last_error = e,
            }
        }
        panic!("could not start throwaway PostgreSQL cluster: {last_error}");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Directory of the unix socket (usable as a `host` by libpq/tokio-postgres).
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Paths of the PKI files when the cluster uses TLS.
    pub fn tls_paths(&self) -> Option<&PkiPaths> {
        self.tls.as_ref()
    }

    /// Stops the server (fast mode: disconnects clients, clean shutdown).
    pub fn stop(&self) {
        let out = self.pg_ctl(&["-m", "fast", "-w", "-t", "30", "stop"]);
        assert!(
            out.status.success(),
            "pg_ctl stop failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
    }

    /// Starts the server again with the same data directory, port and settings.
    pub fn start_again(&self) {
        if let Err(e) = self.pg_ctl_start() {
            panic!("restart of throwaway PostgreSQL cluster failed: {e}");
        }
    }

    /// Stops the server now and starts it again after `down_for` in a
    /// background thread, so the test can watch the outage while it lasts.
    /// [`Cluster::wait_restarted`] waits for the start to finish.
    pub fn restart_after(&self, down_for: Duration) {
        self.wait_restarted();
        self.stop();
        let pg_ctl = self.bindir.join("pg_ctl");
        let data = self.data_dir();
        let log = self.dir.path().join("log");
        let handle = std::thread::spawn(move || {
            std::thread::sleep(down_for);
            let out = as_postgres(&pg_ctl)
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(&log)
                .args(["-w", "-t", "30", "start"])
                .output()
                .expect("run pg_ctl start");
            if !out.status.success() {
                eprintln!(
                    "background restart of PostgreSQL cluster failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        });
        *self.restart.lock().expect("restart mutex poisoned") = Some(handle);
    }

    /// Blocks until a pending [`Cluster::restart_after`] start has run.
    pub fn wait_restarted(&self) {
        let pending = self.restart.lock().expect("restart mutex poisoned").take();
        if let Some(handle) = pending {
            handle.join().expect("background restart thread panicked");
        }
    }

    /// A client over the unix socket as `postgres` (trust), which works even
    /// when TCP only accepts client certificates.
    pub async fn admin_client(&self, dbname: &str) -> Client {
        let (client, connection) = tokio_postgres::Config::new()
            .host_path(self.socket_dir())
            .port(self.port)
            .user("postgres")
            .dbname(dbname)
            .connect(NoTls)
            .await
            .unwrap_or_else(|e| panic!("connect to cluster socket db {dbname}: {e}"));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                eprintln!("cluster admin connection ended: {e}");
            }
        });
        client
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
            ("DATASTORE_PORT".to_string(), self.port.to_string()),
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

    /// Last lines of the server log, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let start = lines.len().saturating_sub(20);
        format!(
            "\n--- PostgreSQL log tail ---\n{}",
            lines[start..].join("\n")
        )
    }

    fn initdb(&self) {
        let out = as_postgres(&self.bindir.join("initdb"))
            .arg("-D")
            .arg(self.data_dir())
            .args(["-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"])
            .args(["--locale=C", "--no-instructions"])
            .current_dir(self.dir.path())
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn write_pg_hba(&self) {
        let tcp_rule = if self.tls.is_some() {
            // Only TLS with a client certificate; plain TCP has no matching line.
            "hostssl all all 127.0.0.1/32 cert"
        } else {
            "host all all 127.0.0.1/32 trust"
        };
        let hba = format!(
            "# written by the event-exporter test harness\nlocal all all trust\n{tcp_rule}\n"
        );
        self.write_owned(&self.data_dir().join("pg_hba.conf"), &hba);
    }

    /// Settings go into postgresql.conf so `start_again` needs no options.
    fn write_settings(&self) {
        let conf = self.data_dir().join("postgresql.conf");
        let base = std::fs::read_to_string(&conf).expect("read postgresql.conf");
        // Drop a block from an earlier attempt (port retry) before appending.
        let base = base
            .split("# --- event-exporter test harness ---")
            .next()
            .unwrap_or_default()
            .to_string();
        let mut extra = format!(
            "# --- event-exporter test harness ---\n\
             listen_addresses = '127.0.0.1'\n\
             port = {}\n\
             unix_socket_directories = '{}'\n\
             fsync = off\n",
            self.port,
            self.dir.path().display()
        );
        if let Some(paths) = &self.tls {
            extra.push_str(&format!(
                "ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\nssl_ca_file = '{}'\n",
                paths.server_cert.display(),
                paths.server_key.display(),
                paths.ca_cert.display()
            ));
        }
        self.write_owned(&conf, &(base + &extra));
    }

    fn write_owned(&self, path: &Path, contents: &str) {
        std::fs::write(path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        if let Some((uid, gid)) = postgres_owner() {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
        }
    }

    fn pg_ctl_command(&self, args: &[&str]) -> Command {
        let mut cmd = as_postgres(&self.bindir.join("pg_ctl"));
        cmd.arg("-D")
            .arg(self.data_dir())
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null());
        cmd
    }

    fn pg_ctl(&self, args: &[&str]) -> Output {
        self.pg_ctl_command(args).output().expect("run pg_ctl")
    }

    fn pg_ctl_start(&self) -> Result<(), String> {
        let log = self.dir.path().join("log");
        let log = log.to_str().expect("temp dir path is UTF-8");
        let out = self.pg_ctl(&["-l", log, "-w", "-t", "30", "start"]);
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "pg_ctl start on port {} failed: {}{}",
                self.port,
                String::from_utf8_lossy(&out.stderr),
                self.log_tail()
            ))
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // A background start must finish before the stop, or it could bring
        // the server back after the directory is gone.
        if let Ok(mut pending) = self.restart.lock() {
            if let Some(handle) = pending.take() {
                let _ = handle.join();
            }
        }
        // Never panic here: a panic during an unwinding test would abort.
        let _ = self
            .pg_ctl_command(&["-m", "immediate", "-w", "-t", "30", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        // TempDir removes the directory when `self.dir` drops.
    }
}

/// A command that runs `program` as the `postgres` OS user when we are root.
fn as_postgres(program: &Path) -> Command {
    event_exporter_dev::local_postgres::pg_command(postgres_owner().is_some(), program)
}
