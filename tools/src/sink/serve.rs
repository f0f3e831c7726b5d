//! Serving a router on a bound listener, over plain HTTP or TLS from a given
//! `rustls::ServerConfig` (the sink, and the test harness's token endpoint and peers).
//!
//! TLS handshakes run in tasks of their own, so a slow or failing client never holds up other
//! connections; a failed handshake is logged and dropped, and never reaches the router (so a
//! client that refuses the certificate leaves no request behind).
//!
//! A handshake delay (the in-process sink's `handshake_delay`) holds every new TLS connection
//! that long before its handshake: a sink across a WAN, whose TCP and TLS handshakes cost
//! network round trips that the client waits out before it can send a request, and that a
//! connection's later requests do not pay. (Over plain HTTP there is no such wait to model on
//! loopback: the kernel completes TCP's handshake before the server accepts.)

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Handshaken connections waiting for the server to take them.
const HANDSHAKEN_QUEUE: usize = 64;

/// Serves `router` on `tcp` (over TLS when `tls` is given) until `stop` is cancelled; then
/// stops accepting, closes idle keep-alive connections and lets running requests finish.
pub fn spawn_server(
    tcp: TcpListener,
    router: axum::Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    stop: CancellationToken,
) -> JoinHandle<io::Result<()>> {
    spawn_server_with_delay(tcp, router, tls, Duration::ZERO, stop)
}

/// [`spawn_server`] whose TLS connections are each held `handshake_delay` before their
/// handshake (see the module docs); ignored without TLS.
pub fn spawn_server_with_delay(
    tcp: TcpListener,
    router: axum::Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    handshake_delay: Duration,
    stop: CancellationToken,
) -> JoinHandle<io::Result<()>> {
    let stopped = stop.cancelled_owned();
    match tls {
        None => tokio::spawn(async move {
            axum::serve(tcp, router)
                .with_graceful_shutdown(stopped)
                .await
        }),
        Some(config) => tokio::spawn(async move {
            let listener = TlsListener::delayed(tcp, config, handshake_delay)?;
            axum::serve(listener, router)
                .with_graceful_shutdown(stopped)
                .await
        }),
    }
}

/// An axum listener that terminates TLS.
pub struct TlsListener {
    handshaken: mpsc::Receiver<(tokio_rustls::server::TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    accept_task: JoinHandle<()>,
}

impl TlsListener {
    /// Starts accepting on `tcp` (the handshakes begin before the server asks for a connection).
    pub fn new(tcp: TcpListener, config: Arc<rustls::ServerConfig>) -> io::Result<TlsListener> {
        TlsListener::delayed(tcp, config, Duration::ZERO)
    }

    /// [`TlsListener::new`] that holds each connection `delay` before its handshake.
    pub fn delayed(
        tcp: TcpListener,
        config: Arc<rustls::ServerConfig>,
        delay: Duration,
    ) -> io::Result<TlsListener> {
        let local = tcp.local_addr()?;
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let (sender, handshaken) = mpsc::channel(HANDSHAKEN_QUEUE);
        let accept_task = tokio::spawn(async move {
            loop {
                let (stream, peer) = match tcp.accept().await {
                    Ok(connection) => connection,
                    Err(error) => {
                        tracing::warn!(%local, %error, "TLS server: accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let acceptor = acceptor.clone();
                let sender = sender.clone();
                tokio::spawn(async move {
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    match acceptor.accept(stream).await {
                        Ok(tls) => {
                            let _ = sender.send((tls, peer)).await;
                        }
                        Err(error) => {
                            tracing::info!(%local, %peer, %error, "TLS server: handshake failed");
                        }
                    }
                });
            }
        });
        Ok(TlsListener {
            handshaken,
            local,
            accept_task,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.handshaken.recv().await {
            Some(connection) => connection,
            // The accept task only ends when this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}
