//! A TCP proxy on loopback that can go down like a stopped server: every
//! connection cut, the port closed (connections refused) until it comes
//! back on the same port. A database outage without stopping the server
//! other tests share.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use tokio::{net::TcpListener, sync::watch, task::JoinSet};

pub struct TcpProxy {
    pub addr: SocketAddr,
    down: watch::Sender<bool>,
    connections: Arc<Mutex<JoinSet<()>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.connections.lock().unwrap().abort_all();
    }
}

impl TcpProxy {
    /// Forwards 127.0.0.1:<port> to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (down, mut watch_down) = watch::channel(false);
        let connections = Arc::new(Mutex::new(JoinSet::new()));
        let task = tokio::spawn({
            let connections = connections.clone();
            async move {
                let mut listener = Some(listener);
                loop {
                    match listener.take() {
                        Some(open) => {
                            tokio::select! {
                                accepted = open.accept() => {
                                    if let Ok((mut client, _)) = accepted {
                                        connections.lock().unwrap().spawn(async move {
                                            if let Ok(mut server) = tokio::net::TcpStream::connect(target).await {
                                                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                                            }
                                        });
                                    }
                                    listener = Some(open);
                                }
                                changed = watch_down.changed() => {
                                    if changed.is_err() {
                                        return;
                                    }
                                    // Going down closes the port by dropping `open`.
                                    if !*watch_down.borrow() {
                                        listener = Some(open);
                                    }
                                }
                            }
                        }
                        None => {
                            if watch_down.changed().await.is_err() {
                                return;
                            }
                            if !*watch_down.borrow() {
                                listener = Some(TcpListener::bind(addr).await.expect("the proxy's port again"));
                            }
                        }
                    }
                }
            }
        });
        Self {
            addr,
            down,
            connections,
            task,
        }
    }

    /// Cuts every open connection and refuses new ones until `set_down(false)`.
    pub fn set_down(&self, down: bool) {
        self.down.send_replace(down);
        if down {
            self.connections.lock().unwrap().abort_all();
        }
    }
}
