//! A small TCP proxy on 127.0.0.1 that can misbehave on request: pass traffic, drop every new
//! connection at once (the peer sees a reset or an early EOF), or cut the connections it holds.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinHandle};

pub struct FaultProxy {
    pub addr: SocketAddr,
    dropping: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<AbortHandle>>>,
    accept: JoinHandle<()>,
}

impl FaultProxy {
    /// Forwards every connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let dropping = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(Mutex::new(Vec::<AbortHandle>::new()));
        let accept = tokio::spawn({
            let dropping = dropping.clone();
            let connections = connections.clone();
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if dropping.load(Ordering::SeqCst) {
                        drop(inbound);
                        continue;
                    }
                    let task = tokio::spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(upstream).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    connections
                        .lock()
                        .expect("proxy connections")
                        .push(task.abort_handle());
                }
            }
        });
        FaultProxy {
            addr,
            dropping,
            connections,
            accept,
        }
    }

    /// `true`: every new connection is closed at once; `false`: forwarded again.
    pub fn drop_new_connections(&self, dropping: bool) {
        self.dropping.store(dropping, Ordering::SeqCst);
    }

    /// Cuts every connection in progress (kept-alive ones included).
    pub fn cut_all(&self) {
        for connection in self
            .connections
            .lock()
            .expect("proxy connections")
            .drain(..)
        {
            connection.abort();
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut_all();
    }
}
