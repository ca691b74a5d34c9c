//! A Kubernetes API server double that speaks the list and watch protocol
//! from an in-memory [`Store`], over real HTTP so the proxy binary can be
//! pointed at it with an ordinary kubeconfig.

mod filter;
mod handler;
mod kubeconfig;
mod request_log;
mod resource;
mod selector;
mod store;
mod timestamp;
mod watch;

use std::net::SocketAddr;
use std::ops::Deref;
use std::path::Path;
use std::thread::JoinHandle;

use axum::Router;
use tokio::sync::oneshot;

use crate::netns::NetNs;

pub use request_log::LoggedRequest;
pub use resource::{RESOURCES, Resource};
pub use selector::SelectorError;
pub use store::{Store, StoreError};
pub use watch::BOOKMARK_INTERVAL;

#[derive(Debug, thiserror::Error)]
pub enum FakeApiServerError {
    #[error("binding {bind}: {source}")]
    Bind {
        bind: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the server's runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("the server thread died before it was ready")]
    Died,
}

/// A running fake API server. It dereferences to its [`Store`], so tests
/// change the cluster with `server.apply(..)`, `server.delete(..)` and so on
/// while clients are connected. Stops on drop.
#[derive(Debug)]
pub struct FakeApiServer {
    addr: SocketAddr,
    store: Store,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl FakeApiServer {
    /// Serves on `bind` (port 0 picks a free port) in the caller's network
    /// namespace, panicking if it cannot.
    pub fn start(bind: SocketAddr) -> FakeApiServer {
        FakeApiServer::launch(bind, std::thread::spawn)
            .unwrap_or_else(|err| panic!("starting fake apiserver on {bind}: {err}"))
    }

    /// Serves on `bind` inside `ns`, where a proxy under test can reach it.
    pub fn start_in(ns: &NetNs, bind: SocketAddr) -> FakeApiServer {
        FakeApiServer::launch(bind, |serve| ns.spawn_thread(serve))
            .unwrap_or_else(|err| panic!("starting fake apiserver on {bind} in {}: {err}", ns.name()))
    }

    /// Runs the server on a thread of its own: a current-thread runtime keeps
    /// every socket the server opens on the thread that chose the namespace.
    fn launch(
        bind: SocketAddr,
        spawn: impl FnOnce(Box<dyn FnOnce() + Send>) -> JoinHandle<()>,
    ) -> Result<FakeApiServer, FakeApiServerError> {
        let store = Store::new();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let app = Router::new().fallback(handler::handle).with_state(store.clone());
        let thread = spawn(Box::new(move || {
            let started = serve(bind, app, shutdown_rx, &ready_tx);
            if let Err(err) = started {
                let _ = ready_tx.send(Err(err));
            }
        }));
        let addr = ready_rx.recv().map_err(|_| FakeApiServerError::Died)??;
        Ok(FakeApiServer {
            addr,
            store,
            shutdown: Some(shutdown_tx),
            thread: Some(thread),
        })
    }

    /// Where the server listens (with the real port if 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// A kubeconfig pointing at this server over plain HTTP, without
    /// credentials.
    pub fn kubeconfig_yaml(&self) -> String {
        kubeconfig::kubeconfig_yaml(self.addr)
    }

    pub fn write_kubeconfig(&self, path: impl AsRef<Path>) -> std::io::Result<()> {
        std::fs::write(path, self.kubeconfig_yaml())
    }
}

type Ready = std::sync::mpsc::Sender<Result<SocketAddr, FakeApiServerError>>;

fn serve(
    bind: SocketAddr,
    app: Router,
    shutdown: oneshot::Receiver<()>,
    ready: &Ready,
) -> Result<(), FakeApiServerError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(FakeApiServerError::Runtime)?;
    let bind_error = |source| FakeApiServerError::Bind { bind, source };
    let listener = std::net::TcpListener::bind(bind).map_err(bind_error)?;
    listener.set_nonblocking(true).map_err(bind_error)?;
    let addr = listener.local_addr().map_err(bind_error)?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener).map_err(bind_error)?;
        let _ = ready.send(Ok(addr));
        tokio::select! {
            served = axum::serve(listener, app).into_future() => {
                if let Err(err) = served {
                    tracing::error!("fake apiserver stopped: {err}");
                }
            }
            _ = shutdown => {}
        }
        Ok(())
    })
    // Dropping the runtime here cancels open connections, watch streams
    // included, which a graceful shutdown would wait for forever.
}

impl Deref for FakeApiServer {
    type Target = Store;

    fn deref(&self) -> &Store {
        &self.store
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
