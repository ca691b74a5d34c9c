use std::io::{ErrorKind, Write};
use std::net::{Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::netns::NetNs;

/// How long a server thread may sleep before noticing it should stop; bounds
/// how long dropping a [`Backend`] takes.
const STOP_POLL: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("binding {protocol} port {port} in namespace {namespace}: {source}")]
    Bind {
        protocol: &'static str,
        port: u16,
        namespace: String,
        #[source]
        source: std::io::Error,
    },
}

/// Servers standing in for a Service's endpoints.
///
/// Every answer is one line, `"<identity> <peer_ip>:<peer_port>\n"`, so a
/// test learns both which endpoint it reached and what source address the
/// endpoint saw (to tell SNAT from source preservation). TCP answers once per
/// connection and closes; UDP answers each datagram.
#[derive(Debug)]
pub struct Backend {
    identity: String,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Backend {
    /// Starts the servers on `[::]` inside `ns` (dual-stack: IPv4 clients
    /// arrive as v4-mapped addresses and are answered in their IPv4 form),
    /// panicking if a port cannot be bound. The ports accept traffic once this
    /// returns.
    pub fn start(ns: &NetNs, identity: &str, tcp_ports: &[u16], udp_ports: &[u16]) -> Backend {
        Backend::try_start(ns, identity, tcp_ports, udp_ports)
            .unwrap_or_else(|err| panic!("starting backend {identity}: {err}"))
    }

    pub fn try_start(
        ns: &NetNs,
        identity: &str,
        tcp_ports: &[u16],
        udp_ports: &[u16],
    ) -> Result<Backend, BackendError> {
        assert!(
            !identity.is_empty() && !identity.contains(char::is_whitespace),
            "backend identity must be one non-empty word, got {identity:?}"
        );
        let bind_error = |protocol, port| {
            move |source| BackendError::Bind {
                protocol,
                port,
                namespace: ns.name().to_owned(),
                source,
            }
        };
        // Binding before returning (rather than in the server threads) means
        // callers never race a server that is not listening yet.
        let (listeners, sockets) = ns.run(|| {
            let listeners = tcp_ports
                .iter()
                .map(|&port| {
                    let listener =
                        TcpListener::bind((Ipv6Addr::UNSPECIFIED, port)).map_err(bind_error("tcp", port))?;
                    listener.set_nonblocking(true).map_err(bind_error("tcp", port))?;
                    Ok(listener)
                })
                .collect::<Result<Vec<_>, BackendError>>()?;
            let sockets = udp_ports
                .iter()
                .map(|&port| {
                    let socket =
                        UdpSocket::bind((Ipv6Addr::UNSPECIFIED, port)).map_err(bind_error("udp", port))?;
                    socket
                        .set_read_timeout(Some(STOP_POLL))
                        .map_err(bind_error("udp", port))?;
                    Ok(socket)
                })
                .collect::<Result<Vec<_>, BackendError>>()?;
            Ok::<_, BackendError>((listeners, sockets))
        })?;

        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for listener in listeners {
            let (identity, stop) = (identity.to_owned(), Arc::clone(&stop));
            threads.push(ns.spawn_thread(move || serve_tcp(&listener, &identity, &stop)));
        }
        for socket in sockets {
            let (identity, stop) = (identity.to_owned(), Arc::clone(&stop));
            threads.push(ns.spawn_thread(move || serve_udp(&socket, &identity, &stop)));
        }
        Ok(Backend {
            identity: identity.to_owned(),
            stop,
            threads,
        })
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            // A panicked server thread already printed its message.
            let _ = thread.join();
        }
    }
}

fn answer(identity: &str, peer: SocketAddr) -> String {
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    format!("{identity} {peer}\n")
}

fn serve_tcp(listener: &TcpListener, identity: &str, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((mut stream, peer)) => {
                // Failures are the client's business (it may have given up).
                let _ = stream
                    .set_nonblocking(false)
                    .and_then(|()| stream.write_all(answer(identity, peer).as_bytes()));
            }
            Err(err) if err.kind() == ErrorKind::WouldBlock => std::thread::sleep(STOP_POLL),
            Err(err) => {
                tracing::warn!("backend {identity}: accept failed: {err}");
                std::thread::sleep(STOP_POLL);
            }
        }
    }
}

fn serve_udp(socket: &UdpSocket, identity: &str, stop: &AtomicBool) {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        match socket.recv_from(&mut buf) {
            Ok((_, peer)) => {
                if let Err(err) = socket.send_to(answer(identity, peer).as_bytes(), peer) {
                    tracing::warn!("backend {identity}: reply to {peer} failed: {err}");
                }
            }
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(err) => {
                tracing::warn!("backend {identity}: receive failed: {err}");
                std::thread::sleep(STOP_POLL);
            }
        }
    }
}
