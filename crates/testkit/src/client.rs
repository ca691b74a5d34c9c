use std::collections::BTreeMap;
use std::io::{ErrorKind, Read};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use crate::netns::NetNs;

/// Per-request timeout [`spread`] uses: long enough not to flake on a busy
/// machine, short enough that a blackholed service fails a test quickly.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Actively refused: a TCP RST, or for UDP an ICMP port unreachable
    /// (what an iptables REJECT produces for either).
    #[error("connection refused")]
    Refused,
    /// Nothing came back in time, as when packets are dropped.
    #[error("timed out")]
    Timeout,
    #[error("reply {0:?} is not \"<identity> <ip>:<port>\"")]
    BadReply(String),
    #[error(transparent)]
    Other(std::io::Error),
}

impl From<std::io::Error> for ClientError {
    fn from(err: std::io::Error) -> ClientError {
        match err.kind() {
            ErrorKind::ConnectionRefused => ClientError::Refused,
            ErrorKind::TimedOut | ErrorKind::WouldBlock => ClientError::Timeout,
            _ => ClientError::Other(err),
        }
    }
}

/// A [`crate::Backend`]'s answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub identity: String,
    /// The client address as the backend saw it, after any NAT.
    pub seen_source: SocketAddr,
}

impl Reply {
    fn parse(text: &str) -> Result<Reply, ClientError> {
        let bad = || ClientError::BadReply(text.to_owned());
        let (identity, source) = text.trim_end().split_once(' ').ok_or_else(bad)?;
        Ok(Reply {
            identity: identity.to_owned(),
            seen_source: source.parse().map_err(|_| bad())?,
        })
    }
}

/// Connects over TCP from inside `ns` and reads the backend's line.
pub fn tcp_request(ns: &NetNs, addr: SocketAddr, timeout: Duration) -> Result<Reply, ClientError> {
    ns.run(|| tcp_request_here(addr, timeout))
}

/// Sends one UDP datagram from inside `ns` and reads the backend's reply.
pub fn udp_request(ns: &NetNs, addr: SocketAddr, timeout: Duration) -> Result<Reply, ClientError> {
    ns.run(|| udp_request_here(addr, timeout))
}

/// Makes `n` TCP requests and counts the answering identities, so tests can
/// check load spreading and which endpoints are reachable at all. Failures
/// are counted under `"<refused>"`, `"<timeout>"` or `"<error>"`.
pub fn spread(ns: &NetNs, addr: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    ns.run(|| {
        let mut counts = BTreeMap::new();
        for _ in 0..n {
            let key = match tcp_request_here(addr, DEFAULT_TIMEOUT) {
                Ok(reply) => reply.identity,
                Err(ClientError::Refused) => "<refused>".to_owned(),
                Err(ClientError::Timeout) => "<timeout>".to_owned(),
                Err(_) => "<error>".to_owned(),
            };
            *counts.entry(key).or_insert(0) += 1;
        }
        counts
    })
}

fn tcp_request_here(addr: SocketAddr, timeout: Duration) -> Result<Reply, ClientError> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Reply::parse(&text)
}

fn udp_request_here(addr: SocketAddr, timeout: Duration) -> Result<Reply, ClientError> {
    let any: IpAddr = if addr.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    };
    let socket = UdpSocket::bind((any, 0))?;
    // Only a connected UDP socket is told about ICMP errors, which is how a
    // REJECT becomes visible as `Refused`.
    socket.connect(addr)?;
    socket.set_read_timeout(Some(timeout))?;
    socket.send(b"hello\n")?;
    let mut buf = [0u8; 2048];
    let len = socket.recv(&mut buf)?;
    Reply::parse(&String::from_utf8_lossy(&buf[..len]))
}
