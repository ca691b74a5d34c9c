use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::netns::NetNs;

#[derive(Debug, thiserror::Error)]
pub enum HttpGetError {
    #[error("GET http://{addr}{path}: {source}")]
    Io {
        addr: SocketAddr,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("GET http://{addr}{path}: malformed response: {detail}")]
    Malformed {
        addr: SocketAddr,
        path: String,
        detail: String,
    },
}

/// Fetches `path` from an HTTP server reachable from inside `ns` (the
/// proxy's health and metrics endpoints), returning status and body.
///
/// HTTP/1.0 keeps this trivial: the server must close the connection after
/// the response and may not use chunked encoding.
pub fn http_get(
    ns: &NetNs,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String), HttpGetError> {
    let io_error = |source| HttpGetError::Io {
        addr,
        path: path.to_owned(),
        source,
    };
    let raw = ns
        .run(|| -> std::io::Result<Vec<u8>> {
            let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
            stream.set_read_timeout(Some(timeout))?;
            stream.set_write_timeout(Some(timeout))?;
            write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
            let mut raw = Vec::new();
            stream.read_to_end(&mut raw)?;
            Ok(raw)
        })
        .map_err(io_error)?;
    parse_response(&raw).map_err(|detail| HttpGetError::Malformed {
        addr,
        path: path.to_owned(),
        detail,
    })
}

fn parse_response(raw: &[u8]) -> Result<(u16, String), String> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no end of headers in {text:?}"))?;
    let status_line = head.lines().next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    Ok((status, body.to_owned()))
}
