//! PostgreSQL for the demo, the benchmark and the integration tests: the local server when it
//! answers ([`LocalServer::find`]), else a throwaway [`Cluster`] started from the installed
//! server binaries (`initdb`, `pg_ctl`) in a temporary directory.
//!
//! A [`Cluster`] is the one implementation of a private server: a random 127.0.0.1 port, trust
//! on the unix socket in its directory, plain TCP with trust or (with [`ServerTls`]) only
//! `hostssl … cert`; it stops, starts again and restarts after an outage, and `Drop` stops it
//! (immediate mode) and removes the directory. The test harness (`tests/support/cluster.rs`)
//! wraps it.
//!
//! initdb refuses to run as root, so as root every server command runs as the `postgres` OS
//! user through `runuser`, and the cluster's files are owned by it. The `pg_ctl` calls block.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio_postgres::{Client, NoTls};

use event_exporter::datastore::postgres::{Connector, PgSettings, SslMode};
use event_exporter::datastore::DatastoreError;

const INSTALL_HINT: &str = "no PostgreSQL found: start a server on 127.0.0.1:5432 (trust auth for \
     user postgres) or install Debian's PostgreSQL server package (apt-get install postgresql)";

/// Why a local server could not be found, started or used. Each names what was being done.
#[derive(Debug, thiserror::Error)]
pub enum LocalPostgresError {
    /// No server answers and the server binaries are not installed.
    #[error("{INSTALL_HINT}")]
    NotInstalled,
    /// A file or process operation (`what`: the path or the program).
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A server program ran and failed: its stderr and the server log's tail.
    #[error("{what} failed: {output}")]
    Command { what: String, output: String },
    /// A statement or connection of the harness (`what`: the statement or database).
    #[error("{what}: {source}")]
    Sql {
        what: String,
        #[source]
        source: tokio_postgres::Error,
    },
    /// The exporter's own connector or schema set-up.
    #[error("{what}: {source}")]
    Datastore {
        what: String,
        #[source]
        source: DatastoreError,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LocalPostgresError {
    let what = what.into();
    move |source| LocalPostgresError::Io { what, source }
}

fn sql(what: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> LocalPostgresError {
    let what = what.into();
    move |source| LocalPostgresError::Sql { what, source }
}

fn datastore(what: impl Into<String>) -> impl FnOnce(DatastoreError) -> LocalPostgresError {
    let what = what.into();
    move |source| LocalPostgresError::Datastore { what, source }
}

/// The server the demo and the benchmark use.
pub enum LocalServer {
    /// A server that was already running.
    Existing {
        host: String,
        port: u16,
        user: String,
    },
    /// A cluster started for this run (plain TCP, trust).
    Throwaway(Cluster),
}

impl LocalServer {
    /// The server at `PGHOST`:`PGPORT` (default 127.0.0.1:5432, user `PGUSER` or postgres)
    /// when it answers, else a throwaway cluster. Errors: [`LocalPostgresError::NotInstalled`]
    /// when neither is possible, or why the cluster did not start.
    pub async fn find() -> Result<LocalServer, LocalPostgresError> {
        let host = std::env::var("PGHOST").unwrap_or_else(|_| "127.0.0.1".into());
        let port = std::env::var("PGPORT")
            .ok()
            .and_then(|p| p.parse().ok())
            .unwrap_or(5432);
        let user = std::env::var("PGUSER").unwrap_or_else(|_| "postgres".into());
        let existing = LocalServer::Existing { host, port, user };
        if existing.admin().await.is_ok() {
            return Ok(existing);
        }
        Cluster::start(ClusterOptions::default()).map(LocalServer::Throwaway)
    }

    pub fn host(&self) -> String {
        match self {
            LocalServer::Existing { host, .. } => host.clone(),
            LocalServer::Throwaway(_) => "127.0.0.1".into(),
        }
    }

    pub fn port(&self) -> u16 {
        match self {
            LocalServer::Existing { port, .. } => *port,
            LocalServer::Throwaway(cluster) => cluster.port(),
        }
    }

    pub fn user(&self) -> String {
        match self {
            LocalServer::Existing { user, .. } => user.clone(),
            LocalServer::Throwaway(_) => "postgres".into(),
        }
    }

    /// Plain-TCP settings for `database` on this server.
    pub fn settings(&self, database: &str) -> PgSettings {
        PgSettings {
            host: self.host(),
            port: self.port(),
            database: database.to_string(),
            user: self.user(),
            password: None,
            sslmode: SslMode::Disable,
            sslcert: None,
            sslkey: None,
            sslrootcert: None,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            LocalServer::Existing { host, port, .. } => {
                format!("the local server at {host}:{port}")
            }
            LocalServer::Throwaway(cluster) => {
                format!(
                    "a throwaway cluster on 127.0.0.1:{} (removed)",
                    cluster.port()
                )
            }
        }
    }

    async fn admin(&self) -> Result<Client, LocalPostgresError> {
        let mut config = tokio_postgres::Config::new();
        config
            .host(self.host())
            .port(self.port())
            .user(self.user())
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(2));
        let (client, connection) = config
            .connect(NoTls)
            .await
            .map_err(sql(format!("connecting to {}", self.describe())))?;
        tokio::spawn(connection);
        Ok(client)
    }

    pub async fn create_database(&self, name: &str) -> Result<(), LocalPostgresError> {
        self.admin()
            .await?
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .map_err(sql(format!("CREATE DATABASE {name}")))
    }

    /// A client of the (already created) scratch `database`, with NVSentinel's schema applied.
    pub async fn schema_client(&self, database: &str) -> Result<Client, LocalPostgresError> {
        let what = || format!("database {database}");
        let connector = Connector::new(self.settings(database)).map_err(datastore(what()))?;
        let client = connector.connect().await.map_err(datastore(what()))?;
        crate::generate::init_schema(&client)
            .await
            .map_err(datastore(format!("NVSentinel's schema in {database}")))?;
        Ok(client)
    }

    pub async fn drop_database(&self, name: &str) -> Result<(), LocalPostgresError> {
        self.admin()
            .await?
            .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .await
            .map_err(sql(format!("DROP DATABASE {name}")))
    }

    /// Stops a throwaway cluster (its directory goes when `self` drops); leaves an existing
    /// server alone.
    pub fn stop(&self) {
        if let LocalServer::Throwaway(cluster) = self {
            let _ = cluster.stop();
        }
    }
}

/// The server certificate, key and CA of a cluster that takes TLS with client certificates
/// only (readable by the server's OS user; the key mode 0600).
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// How a [`Cluster`] is set up.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// `Some`: `ssl=on` and TCP allows only `hostssl … cert` (the certificate's CN is the
    /// user); `None`: trust on 127.0.0.1.
    pub tls: Option<ServerTls>,
}

/// A private PostgreSQL cluster on a random 127.0.0.1 port in a temporary directory.
/// `Drop` stops it (immediate mode) and removes the directory.
pub struct Cluster {
    dir: tempfile::TempDir,
    bindir: PathBuf,
    port: u16,
    as_postgres: bool,
    tls: Option<ServerTls>,
    /// Pending background start from [`Cluster::restart_after`]; joined on drop so a late
    /// start can never outlive the cluster's directory.
    restart: Mutex<Option<JoinHandle<()>>>,
}

/// A port the kernel just handed out on 127.0.0.1. Another process could take it before
/// PostgreSQL binds it; [`Cluster::start`] retries on failure.
fn free_port() -> Result<u16, LocalPostgresError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(io("binding 127.0.0.1:0 to find a free port"))
}

/// Marks the harness's block in `postgresql.conf`.
const SETTINGS_MARK: &str = "# --- event-exporter local_postgres ---";

impl Cluster {
    /// initdb, then start on a free port (three tries: the port is only reserved once the
    /// server binds it). The unix socket in the cluster directory always allows trust, which
    /// [`Cluster::admin_client`] uses. Errors: [`LocalPostgresError`] naming the failed step.
    pub fn start(options: ClusterOptions) -> Result<Cluster, LocalPostgresError> {
        let bindir = server_bindir().ok_or(LocalPostgresError::NotInstalled)?;
        let dir = tempfile::Builder::new()
            .prefix("ee-pgcluster-")
            .tempdir()
            .map_err(io("a temporary directory for a PostgreSQL cluster"))?;
        let owner = postgres_owner();
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .map_err(io(format!("chown {} to postgres", dir.path().display())))?;
        }
        let mut cluster = Cluster {
            dir,
            bindir,
            port: 0,
            as_postgres: owner.is_some(),
            tls: options.tls,
            restart: Mutex::new(None),
        };
        cluster.initdb()?;
        cluster.write_pg_hba()?;
        cluster.start_on_free_port()?;
        Ok(cluster)
    }

    fn start_on_free_port(&mut self) -> Result<(), LocalPostgresError> {
        let mut last_error = None;
        for _ in 0..3 {
            self.port = free_port()?;
            self.write_settings()?;
            match self.start_again() {
                Ok(()) => return Ok(()),
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.unwrap_or(LocalPostgresError::NotInstalled))
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

    /// The server's TLS files, when it takes TLS.
    pub fn tls(&self) -> Option<&ServerTls> {
        self.tls.as_ref()
    }

    /// Stops the server (fast mode: disconnects clients, clean shutdown).
    pub fn stop(&self) -> Result<(), LocalPostgresError> {
        self.checked(
            self.pg_ctl(&["-m", "fast", "-w", "-t", "30", "stop"])?,
            "pg_ctl stop",
        )
    }

    /// Starts the server (again) with the same data directory, port and settings.
    pub fn start_again(&self) -> Result<(), LocalPostgresError> {
        let output = self
            .start_command()
            .output()
            .map_err(io("running pg_ctl"))?;
        self.checked(output, &format!("pg_ctl start on port {}", self.port))
    }

    /// Stops the server now and starts it again after `down_for` in a background thread, so a
    /// caller can watch the outage while it lasts. [`Cluster::wait_restarted`] waits for the
    /// start to finish; a failed start is printed to stderr.
    pub fn restart_after(&self, down_for: Duration) -> Result<(), LocalPostgresError> {
        self.wait_restarted();
        self.stop()?;
        let mut command = self.start_command();
        let handle = std::thread::spawn(move || {
            std::thread::sleep(down_for);
            match command.output() {
                Ok(out) if out.status.success() => {}
                Ok(out) => eprintln!(
                    "background restart of PostgreSQL cluster failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                ),
                Err(error) => eprintln!("background restart: running pg_ctl: {error}"),
            }
        });
        if let Ok(mut pending) = self.restart.lock() {
            *pending = Some(handle);
        }
        Ok(())
    }

    /// Blocks until a pending [`Cluster::restart_after`] start has run.
    pub fn wait_restarted(&self) {
        let pending = self.restart.lock().ok().and_then(|mut p| p.take());
        if let Some(handle) = pending {
            let _ = handle.join();
        }
    }

    /// A client over the unix socket as `postgres` (trust), which works even when TCP only
    /// accepts client certificates.
    pub async fn admin_client(&self, dbname: &str) -> Result<Client, LocalPostgresError> {
        let (client, connection) = tokio_postgres::Config::new()
            .host_path(self.socket_dir())
            .port(self.port)
            .user("postgres")
            .dbname(dbname)
            .connect(NoTls)
            .await
            .map_err(sql(format!(
                "connecting to the cluster's socket, database {dbname}"
            )))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                eprintln!("cluster admin connection ended: {e}");
            }
        });
        Ok(client)
    }

    /// Last 20 lines of the server log, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let start = lines.len().saturating_sub(20);
        format!(
            "\n--- PostgreSQL log tail ---\n{}",
            lines.get(start..).unwrap_or_default().join("\n")
        )
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("log")
    }

    fn initdb(&self) -> Result<(), LocalPostgresError> {
        let output = pg_command(self.as_postgres, &self.bindir.join("initdb"))
            .arg("-D")
            .arg(self.data_dir())
            .args(["-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"])
            .args(["--locale=C", "--no-instructions"])
            .current_dir(self.dir.path())
            .output()
            .map_err(io("running initdb"))?;
        self.checked(output, "initdb")
    }

    fn write_pg_hba(&self) -> Result<(), LocalPostgresError> {
        let tcp_rule = if self.tls.is_some() {
            // Only TLS with a client certificate; plain TCP has no matching line.
            "hostssl all all 127.0.0.1/32 cert"
        } else {
            "host all all 127.0.0.1/32 trust"
        };
        let hba = format!("# written by event-exporter-dev\nlocal all all trust\n{tcp_rule}\n");
        self.write_owned(&self.data_dir().join("pg_hba.conf"), &hba)
    }

    /// Settings go into postgresql.conf so that [`Cluster::start_again`] needs no options.
    fn write_settings(&self) -> Result<(), LocalPostgresError> {
        let conf = self.data_dir().join("postgresql.conf");
        let base = std::fs::read_to_string(&conf).map_err(io(conf.display().to_string()))?;
        // Drop a block from an earlier attempt (port retry) before appending.
        let base = base.split(SETTINGS_MARK).next().unwrap_or_default();
        let mut extra = format!(
            "{SETTINGS_MARK}\nlisten_addresses = '127.0.0.1'\nport = {}\n\
             unix_socket_directories = '{}'\nfsync = off\n",
            self.port,
            self.dir.path().display()
        );
        if let Some(tls) = &self.tls {
            extra.push_str(&format!(
                "ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\nssl_ca_file = '{}'\n",
                tls.cert.display(),
                tls.key.display(),
                tls.ca.display()
            ));
        }
        self.write_owned(&conf, &format!("{base}{extra}"))
    }

    fn write_owned(&self, path: &Path, contents: &str) -> Result<(), LocalPostgresError> {
        std::fs::write(path, contents).map_err(io(path.display().to_string()))?;
        if let Some((uid, gid)) = postgres_owner() {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .map_err(io(format!("chown {}", path.display())))?;
        }
        Ok(())
    }

    fn pg_ctl_command(&self, args: &[&str]) -> Command {
        let mut command = pg_command(self.as_postgres, &self.bindir.join("pg_ctl"));
        command
            .arg("-D")
            .arg(self.data_dir())
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null());
        command
    }

    /// `pg_ctl start`, waiting up to 30 s, logging to the cluster's `log`.
    fn start_command(&self) -> Command {
        let log = self.log_path().to_string_lossy().into_owned();
        self.pg_ctl_command(&["-l", &log, "-w", "-t", "30", "start"])
    }

    fn pg_ctl(&self, args: &[&str]) -> Result<Output, LocalPostgresError> {
        self.pg_ctl_command(args)
            .output()
            .map_err(io("running pg_ctl"))
    }

    /// `Ok` when `output` succeeded, else its stderr and the log's tail.
    fn checked(&self, output: Output, what: &str) -> Result<(), LocalPostgresError> {
        if output.status.success() {
            return Ok(());
        }
        Err(LocalPostgresError::Command {
            what: what.to_string(),
            output: format!(
                "{} ({}){}",
                String::from_utf8_lossy(&output.stderr).trim(),
                output.status,
                self.log_tail()
            ),
        })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // A background start must finish before the stop, or it could bring the server back
        // after the directory is gone.
        self.wait_restarted();
        let _ = self
            .pg_ctl_command(&["-m", "immediate", "-w", "-t", "30", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        // TempDir removes the directory when `self.dir` drops.
    }
}

/// The directory holding `initdb` and `pg_ctl`: `$PG_BINDIR`, `pg_config --bindir`, the
/// newest Debian install under `/usr/lib/postgresql/*/bin`, or a directory on `PATH`; `None`
/// when the server binaries are not installed.
pub fn server_bindir() -> Option<PathBuf> {
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(dir) = std::env::var_os("PG_BINDIR") {
        candidates.push(dir.into());
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        if out.status.success() {
            candidates.push(String::from_utf8_lossy(&out.stdout).trim().into());
        }
    }
    let mut debian: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|dir| {
            dir.filter_map(|e| e.ok().map(|e| e.path().join("bin")))
                .collect()
        })
        .unwrap_or_default();
    debian.sort();
    candidates.extend(debian.into_iter().rev());
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path));
    }
    candidates.into_iter().find(|dir| has_server(dir))
}

/// uid and gid of the `postgres` OS user when this process runs as root (initdb refuses to
/// run as root, so the cluster's files are handed to that user); `None` otherwise, or when
/// `/etc/passwd` has no such user.
pub fn postgres_owner() -> Option<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the effective uid of the reading process.
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    if !root {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        match fields.as_slice() {
            ["postgres", _, uid, gid, ..] => Some((uid.parse().ok()?, gid.parse().ok()?)),
            _ => None,
        }
    })
}

/// A command running the server binary `program` as the `postgres` OS user (through
/// `runuser`) when `as_postgres`, else as this process's user.
pub fn pg_command(as_postgres: bool, program: &Path) -> Command {
    if as_postgres {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}
