//! A real HTTP proxy on 127.0.0.1, as an enterprise egress proxy: `CONNECT host:port` tunnels
//! (how clients reach `https://` URLs through a proxy) and absolute-form requests
//! (`POST http://host:port/path`, how clients send `http://` URLs through one). It records
//! every request head it gets, with its `Proxy-Authorization`, so a test can prove that
//! traffic went through it (or did not).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// One request head the proxy received on a client connection.
#[derive(Clone, Debug)]
pub struct ProxiedRequest {
    /// `CONNECT` or the forwarded method.
    pub method: String,
    /// `host:port` for CONNECT, the absolute URI otherwise.
    pub target: String,
    pub proxy_authorization: Option<String>,
}

pub struct HttpProxy {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<ProxiedRequest>>>,
    accept: JoinHandle<()>,
}

impl HttpProxy {
    pub async fn start() -> HttpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let accept = tokio::spawn({
            let seen = seen.clone();
            async move {
                while let Ok((inbound, _)) = listener.accept().await {
                    tokio::spawn(handle(inbound, seen.clone()));
                }
            }
        });
        HttpProxy { addr, seen, accept }
    }

    /// `http://127.0.0.1:PORT`, for `HTTPS_PROXY` / `HTTP_PROXY`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request head seen so far (the first of each client connection; requests later
    /// on a kept-alive forwarded connection are passed through unparsed).
    pub fn requests(&self) -> Vec<ProxiedRequest> {
        self.seen.lock().expect("proxy log").clone()
    }
}

impl Drop for HttpProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn handle(mut inbound: TcpStream, seen: Arc<Mutex<Vec<ProxiedRequest>>>) {
    // Read the request head.
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    let end = loop {
        let Ok(n) = inbound.read(&mut buf).await else {
            return;
        };
        if n == 0 {
            return;
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(at) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        if head.len() > 64 * 1024 {
            return;
        }
    };
    let text = String::from_utf8_lossy(&head[..end]).into_owned();
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let method = parts.next().unwrap_or_default().to_string();
    let target = parts.next().unwrap_or_default().to_string();
    let proxy_authorization = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("proxy-authorization"))
        .map(|(_, v)| v.trim().to_string());
    seen.lock().expect("proxy log").push(ProxiedRequest {
        method: method.clone(),
        target: target.clone(),
        proxy_authorization,
    });

    if method == "CONNECT" {
        let Ok(mut outbound) = TcpStream::connect(&target).await else {
            let _ = inbound
                .write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
                .await;
            return;
        };
        if inbound
            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .await
            .is_err()
        {
            return;
        }
        if end < head.len() && outbound.write_all(&head[end..]).await.is_err() {
            return;
        }
        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
        return;
    }
    // Absolute-form request: connect to its authority and pass the bytes on as they are
    // (HTTP/1.1 servers must accept absolute-form request targets).
    let authority = target
        .strip_prefix("http://")
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_default()
        .to_string();
    let Ok(mut outbound) = TcpStream::connect(&authority).await else {
        let _ = inbound
            .write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
            .await;
        return;
    };
    if outbound.write_all(&head).await.is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
}
