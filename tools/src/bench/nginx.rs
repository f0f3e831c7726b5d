//! The bench's plain HTTP sink: Debian's `nginx` answering 202 to every POST, started on
//! loopback from a configuration generated in a temporary directory (nothing is installed or
//! changed on the machine), and `wrk`, which measures how many POSTs per second that nginx
//! takes on this machine: the ceiling the exporter's drain is compared with.

use std::io::{Read, Seek, SeekFrom};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::error::{io, BenchError};

/// What the bench needs from the machine for the nginx scenarios.
pub const NEEDS: &str = "the nginx scenarios need Debian's nginx (`apt-get install nginx-light`) \
     and, for the ceiling, wrk (`apt-get install wrk`)";

/// Appended to the error when nginx cannot be started.
const NGINX_HINT: &str =
    "; the nginx scenarios need Debian's nginx (`apt-get install nginx-light`)";

/// An nginx child process answering `202 Accepted` on `127.0.0.1:<port>`.
pub struct Nginx {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
    /// How far `access.log` has been counted, in bytes and lines.
    counted: (u64, u64),
}

impl Nginx {
    /// Starts `binary` with a generated configuration in `dir` (created; removed by `stop`).
    /// Errors: [`BenchError::Spawn`] (with the install hint) when it cannot be started,
    /// [`BenchError::NginxExited`] or [`BenchError::NginxNotListening`] when it does not serve.
    pub fn start(binary: &Path, dir: &Path) -> Result<Nginx, BenchError> {
        let body = dir.join("body");
        std::fs::create_dir_all(&body).map_err(io(format!("creating {}", body.display())))?;
        let addr = free_port()?;
        let config = config(dir, addr);
        let path = dir.join("nginx.conf");
        std::fs::write(&path, config).map_err(io(format!("writing {}", path.display())))?;
        let child = Command::new(binary)
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| BenchError::Spawn {
                program: binary.display().to_string(),
                hint: NGINX_HINT,
                source,
            })?;
        let mut nginx = Nginx {
            child,
            addr,
            dir: dir.to_path_buf(),
            counted: (0, 0),
        };
        nginx.wait_until_listening()?;
        Ok(nginx)
    }

    fn wait_until_listening(&mut self) -> Result<(), BenchError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if TcpStream::connect(self.addr).is_ok() {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                let log = std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default();
                return Err(BenchError::NginxExited { status, log });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(BenchError::NginxNotListening { addr: self.addr })
    }

    /// The URL events are POSTed to.
    pub fn url(&self) -> String {
        format!("http://{}/events", self.addr)
    }

    /// Requests answered so far (lines in the access log, which nginx flushes every 100 ms).
    pub fn answered(&mut self) -> u64 {
        let Ok(mut file) = std::fs::File::open(self.dir.join("access.log")) else {
            return self.counted.1;
        };
        let mut tail = Vec::new();
        if file.seek(SeekFrom::Start(self.counted.0)).is_ok() && file.read_to_end(&mut tail).is_ok()
        {
            // Only whole lines count; a partial one is read again next time.
            let whole = tail.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
            let lines = tail[..whole].iter().filter(|b| **b == b'\n').count() as u64;
            self.counted = (self.counted.0 + whole as u64, self.counted.1 + lines);
        }
        self.counted.1
    }

    /// Stops nginx (SIGTERM: fast shutdown) and removes its directory.
    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A loopback address with a port free right now (the OS picks it; the listener is closed
/// again, so the program started next can bind it).
pub fn free_port() -> Result<SocketAddr, BenchError> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).map_err(io("binding a loopback port"))?;
    listener.local_addr().map_err(io("reading a loopback port"))
}

/// One worker (the machine has few cores and the exporter and PostgreSQL need them too);
/// bodies stay in memory; the access log is buffered so it costs little.
fn config(dir: &Path, addr: SocketAddr) -> String {
    let dir = dir.display();
    format!(
        "daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log {dir}/access.log combined buffer=64k flush=100ms;
    client_body_temp_path {dir}/body;
    client_body_buffer_size 64k;
    keepalive_requests 1000000;
    server {{
        listen {addr};
        location / {{ return 202; }}
    }}
}}
"
    )
}

/// `wrk`'s POSTs/s against `url` with `connections` connections for `duration`, sending
/// `body` as a CloudEvent; `Ok(None)` when `binary` is not installed. Errors: the script
/// could not be written, wrk could not run, or printed no `Requests/sec:`.
pub fn wrk_ceiling(
    binary: &Path,
    url: &str,
    body: &[u8],
    connections: usize,
    duration: Duration,
    dir: &Path,
) -> Result<Option<f64>, BenchError> {
    let script = dir.join("post.lua");
    let body = String::from_utf8_lossy(body);
    std::fs::write(
        &script,
        format!(
            "wrk.method = \"POST\"\nwrk.headers[\"Content-Type\"] = \"{}\"\nwrk.body = [==[{body}]==]\n",
            event_exporter::cloudevent::CONTENT_TYPE
        ),
    )
    .map_err(io(format!("writing {}", script.display())))?;
    let output = Command::new(binary)
        .args(["-t1", &format!("-c{connections}")])
        .arg(format!("-d{}s", duration.as_secs().max(1)))
        .arg("-s")
        .arg(&script)
        .arg(url)
        .output();
    let output = match output {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(BenchError::Spawn {
                program: binary.display().to_string(),
                hint: "",
                source,
            })
        }
    };
    let text = String::from_utf8_lossy(&output.stdout);
    requests_per_second(&text)
        .map(Some)
        .ok_or_else(|| BenchError::WrkOutput {
            output: text.into_owned(),
        })
}

/// The `Requests/sec:` figure of wrk's summary.
fn requests_per_second(text: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.trim().strip_prefix("Requests/sec:"))
        .and_then(|rest| rest.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrk_requests_per_second() {
        let text = "Running 5s test @ http://127.0.0.1:1/events\n  1 threads and 10 connections\n\
                    150000 requests in 5.00s, 20.00MB read\nRequests/sec:  30012.55\n\
                    Transfer/sec:      4.00MB\n";
        assert_eq!(requests_per_second(text), Some(30012.55));
        assert_eq!(requests_per_second("no summary"), None);
    }

    #[test]
    fn config_listens_on_loopback_and_answers_202() {
        let text = config(Path::new("/tmp/x"), "127.0.0.1:8080".parse().expect("addr"));
        assert!(text.contains("listen 127.0.0.1:8080;"), "{text}");
        assert!(text.contains("return 202;"), "{text}");
        assert!(text.contains("pid /tmp/x/nginx.pid;"), "{text}");
    }
}
