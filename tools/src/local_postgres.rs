//! A PostgreSQL server for the demo and the benchmark: the local one when it answers, else a throwaway cluster
//! started from the installed server binaries (removed again by `stop`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio_postgres::NoTls;

use event_exporter::datastore::postgres::{Connector, PgSettings, SslMode};

pub enum LocalServer {
    /// A server that was already running.
    Existing {
        host: String,
        port: u16,
        user: String,
    },
    /// A cluster this demo created in `dir`.
    Throwaway {
        dir: PathBuf,
        bindir: PathBuf,
        port: u16,
        as_postgres: bool,
    },
}

const INSTALL_HINT: &str = "no PostgreSQL found: start a server on 127.0.0.1:5432 (trust auth for \
     user postgres) or install Debian's PostgreSQL server package (apt-get install postgresql)";

impl LocalServer {
    pub async fn find() -> Result<LocalServer, String> {
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
        let bindir = server_bindir().ok_or(INSTALL_HINT)?;
        start_cluster(bindir)
    }

    pub fn host(&self) -> String {
        match self {
            LocalServer::Existing { host, .. } => host.clone(),
            LocalServer::Throwaway { .. } => "127.0.0.1".into(),
        }
    }

    pub fn port(&self) -> u16 {
        match self {
            LocalServer::Existing { port, .. } | LocalServer::Throwaway { port, .. } => *port,
        }
    }

    pub fn user(&self) -> String {
        match self {
            LocalServer::Existing { user, .. } => user.clone(),
            LocalServer::Throwaway { .. } => "postgres".into(),
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
            LocalServer::Throwaway { port, .. } => {
                format!("a throwaway cluster on 127.0.0.1:{port} (removed)")
            }
        }
    }

    async fn admin(&self) -> Result<tokio_postgres::Client, String> {
        let mut config = tokio_postgres::Config::new();
        config
            .host(self.host())
            .port(self.port())
            .user(self.user())
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(2));
        let (client, connection) = config.connect(NoTls).await.map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        Ok(client)
    }

    pub async fn create_database(&self, name: &str) -> Result<(), String> {
        self.admin()
            .await?
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .map_err(|e| format!("CREATE DATABASE {name}: {e}"))
    }

    /// A client of the (already created) scratch `database`, with NVSentinel's schema applied.
    pub async fn schema_client(&self, database: &str) -> Result<tokio_postgres::Client, String> {
        let connector = Connector::new(self.settings(database)).map_err(|e| e.to_string())?;
        let client = connector.connect().await.map_err(|e| e.to_string())?;
        crate::generate::init_schema(&client)
            .await
            .map_err(|e| e.to_string())?;
        Ok(client)
    }

    pub async fn drop_database(&self, name: &str) -> Result<(), String> {
        self.admin()
            .await?
            .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .await
            .map_err(|e| e.to_string())
    }

    /// Stops and removes a throwaway cluster; leaves an existing server alone.
    pub fn stop(&self) {
        if let LocalServer::Throwaway {
            dir,
            bindir,
            as_postgres,
            ..
        } = self
        {
            let data = dir.join("data");
            let _ = pg_command(*as_postgres, &bindir.join("pg_ctl"))
                .args(["-D", &data.to_string_lossy(), "-m", "fast", "-w", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The directory holding `initdb` and `pg_ctl`: `$PG_BINDIR`, `pg_config --bindir`, the
/// newest Debian install under `/usr/lib/postgresql/*/bin`, or a directory on `PATH`; `None`
/// when the server binaries are not installed. (The test harness's throwaway clusters use it
/// too.)
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

fn start_cluster(bindir: PathBuf) -> Result<LocalServer, String> {
    let dir = std::env::temp_dir().join(format!("event-exporter-demo-pg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let owner = postgres_owner();
    let as_postgres = owner.is_some();
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).map_err(|e| e.to_string())?;
    }
    let data = dir.join("data");
    let run = |command: &mut Command, what: &str| -> Result<(), String> {
        let output = command.output().map_err(|e| format!("{what}: {e}"))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{what} failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ))
        }
    };
    run(
        pg_command(as_postgres, &bindir.join("initdb")).args([
            "-D",
            &data.to_string_lossy(),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
        ]),
        "initdb",
    )?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| e.to_string())?;
    let options = format!(
        "-c listen_addresses=127.0.0.1 -p {port} -k {} -c fsync=off",
        dir.display()
    );
    run(
        pg_command(as_postgres, &bindir.join("pg_ctl")).args([
            "-D",
            &data.to_string_lossy(),
            "-l",
            &dir.join("log").to_string_lossy(),
            "-w",
            "-o",
            &options,
            "start",
        ]),
        "pg_ctl start",
    )?;
    Ok(LocalServer::Throwaway {
        dir,
        bindir,
        port,
        as_postgres,
    })
}
