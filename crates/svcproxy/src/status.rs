//! `svcproxy status`: what a running svcproxy has programmed, per service port, read from its debug endpoint
//! (`/debug/status` on the metrics address). Also the small HTTP client the other commands use with
//! `--daemon`.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The daemon's metrics address, where the debug endpoints live (`--metrics-bind-address`'s default).
pub const DEFAULT_DAEMON: &str = "http://127.0.0.1:10249";

const TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{0:?}: expected http://HOST:PORT")]
    BadUrl(String),
    #[error("cannot reach svcproxy at {url}: {source} (is it running, with --metrics-bind-address there?)")]
    Connect { url: String, source: std::io::Error },
    #[error("svcproxy at {url} answered {status}: {body}")]
    Status { url: String, status: u16, body: String },
    #[error("svcproxy at {url} sent a malformed answer: {reason}")]
    Malformed { url: String, reason: String },
}

/// `GET base+path` with HTTP/1.0, so the answer is never chunked and ends with the connection. Enough for a
/// daemon on this node; anything else (TLS, proxies) is out of scope on purpose.
pub fn daemon_get(base: &str, path: &str) -> Result<String, DaemonError> {
    daemon_get_within(base, path, TIMEOUT)
}

/// [`daemon_get`] giving up after `timeout` to connect and again to read.
pub fn daemon_get_within(base: &str, path: &str, timeout: Duration) -> Result<String, DaemonError> {
    let host = base
        .strip_prefix("http://")
        .map(|h| h.trim_end_matches('/'))
        .filter(|h| !h.is_empty() && !h.contains('/'))
        .ok_or_else(|| DaemonError::BadUrl(base.to_string()))?;
    let url = format!("http://{host}{path}");
    let connect_err = |source| DaemonError::Connect {
        url: url.clone(),
        source,
    };
    let addr: SocketAddr = host
        .to_socket_addrs()
        .map_err(connect_err)?
        .next()
        .ok_or_else(|| DaemonError::BadUrl(base.to_string()))?;
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(connect_err)?;
    stream.set_read_timeout(Some(timeout)).map_err(connect_err)?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {host}\r\nAccept: application/json\r\n\r\n"
    )
    .map_err(connect_err)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(connect_err)?;
    let text = String::from_utf8_lossy(&raw);
    let malformed = |reason: &str| DaemonError::Malformed {
        url: url.clone(),
        reason: reason.to_string(),
    };
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| malformed("no header end"))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| malformed("no status code"))?;
    if status != 200 {
        // The debug endpoints answer errors as {"error": "..."}; show the sentence, not the JSON.
        let body = serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or_else(|| body.trim().to_string());
        return Err(DaemonError::Status { url, status, body });
    }
    Ok(body.to_string())
}

/// Percent-encodes a query value.
pub fn query_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/:".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Endpoint counts of one service port.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointCounts {
    /// Every endpoint the Service's slices list for this port, in any state.
    pub total: usize,
    /// The endpoints the rules send traffic to (after readiness, topology and traffic policy), by state.
    pub in_use: usize,
    pub ready: usize,
    pub serving: usize,
    pub terminating: usize,
    pub local: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePortStatus {
    pub name: String,
    pub protocol: String,
    pub service_type: String,
    pub cluster_ip: IpAddr,
    pub port: u16,
    pub node_port: Option<u16>,
    pub external_ips: Vec<IpAddr>,
    pub load_balancer_ips: Vec<IpAddr>,
    pub endpoints: EndpointCounts,
    /// When a sync last wrote a change of this service port (RFC 3339), since the daemon started.
    pub programmed_at: Option<String>,
    /// Read-back found the kernel's rules for it as written (false from a divergence until its repair is
    /// verified).
    pub verified: bool,
}

/// The cluster cannot be read (the API server unreachable): since when (RFC 3339) and the latest error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceProblem {
    pub since: String,
    pub error: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    pub node: String,
    pub syncs: u64,
    /// When the last sync succeeded (RFC 3339).
    pub last_sync: Option<String>,
    /// When the kernel was last read back and compared (RFC 3339).
    pub last_check: Option<String>,
    pub last_error: Option<String>,
    pub consecutive_failures: u32,
    /// Why `/healthz` fails, when it does.
    #[serde(default)]
    pub problem: Option<String>,
    /// While the API server (or the manifest source) cannot be read: since when, and the latest error.
    #[serde(default)]
    pub source_problem: Option<SourceProblem>,
    /// Divergences read-back has found since start.
    pub divergences: u64,
    /// In nftables mode, the ServiceCIDR ranges whose unallocated addresses the last sync dropped.
    #[serde(default)]
    pub service_cidrs: Vec<String>,
    pub service_ports: Vec<ServicePortStatus>,
    /// Addresses (with protocol and port) more than one service port claims.
    #[serde(default)]
    pub contested: Vec<ContestedFrontend>,
}

/// An address, protocol and port more than one service port claims: `winner` (the first in name order) gets
/// its traffic, `others` none of it there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContestedFrontend {
    pub frontend: String,
    pub winner: String,
    pub others: Vec<String>,
}

fn vips(s: &ServicePortStatus) -> String {
    let mut v = vec![SocketAddr::new(s.cluster_ip, s.port).to_string()];
    v.extend(
        s.external_ips
            .iter()
            .map(|ip| SocketAddr::new(*ip, s.port).to_string()),
    );
    v.extend(
        s.load_balancer_ips
            .iter()
            .map(|ip| SocketAddr::new(*ip, s.port).to_string()),
    );
    if let Some(np) = s.node_port {
        v.push(format!("node:{np}"));
    }
    v.join(" ")
}

/// The table: one row per service port, then the daemon's sync state.
pub fn render_text(r: &StatusReport) -> String {
    let rows: Vec<[String; 6]> = r
        .service_ports
        .iter()
        .map(|s| {
            let e = s.endpoints;
            [
                s.name.clone(),
                s.protocol.clone(),
                vips(s),
                format!(
                    "{}/{}/{}/{} of {}",
                    e.ready, e.serving, e.terminating, e.local, e.total
                ),
                s.programmed_at.clone().unwrap_or_else(|| "-".into()),
                if s.verified { "ok" } else { "DIVERGED" }.to_string(),
            ]
        })
        .collect();
    let header = [
        "SERVICE PORT",
        "PROTO",
        "ADDRESSES",
        "ENDPOINTS rdy/srv/term/local",
        "PROGRAMMED",
        "VERIFIED",
    ];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                let _ = write!(l, "{cell:<w$}  ");
            }
        }
        let _ = writeln!(out, "{}", l.trim_end());
    };
    line(header.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
    let _ = writeln!(
        out,
        "\nnode {}: {} syncs, last successful {}; last read-back {}; {} divergences found since start",
        r.node,
        r.syncs,
        r.last_sync.as_deref().unwrap_or("never"),
        r.last_check.as_deref().unwrap_or("never"),
        r.divergences
    );
    if let Some(e) = &r.last_error {
        let _ = writeln!(out, "last sync FAILED ({} in a row): {e}", r.consecutive_failures);
    }
    if let Some(p) = &r.problem {
        let _ = writeln!(out, "UNHEALTHY: {p}");
    }
    if !r.service_cidrs.is_empty() {
        let _ = writeln!(
            out,
            "new connections to unallocated addresses of {} are dropped",
            r.service_cidrs.join(", ")
        );
    }
    if let Some(p) = &r.source_problem {
        let _ = writeln!(out, "CANNOT READ THE CLUSTER since {}: {}", p.since, p.error);
    }
    for c in &r.contested {
        let _ = writeln!(
            out,
            "CONTESTED {}: {} gets its traffic, {} none of it there",
            c.frontend,
            c.winner,
            c.others.join(", ")
        );
    }
    out
}

/// `svcproxy status`.
pub fn command(daemon: &str) -> Result<StatusReport, DaemonError> {
    fetch(daemon, TIMEOUT)
}

/// The daemon's status report, giving up after `timeout`.
pub fn fetch(daemon: &str, timeout: Duration) -> Result<StatusReport, DaemonError> {
    let body = daemon_get_within(daemon, "/debug/status", timeout)?;
    serde_json::from_str(&body).map_err(|e| DaemonError::Malformed {
        url: format!("{daemon}/debug/status"),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_lines_up() {
        let r = StatusReport {
            node: "node-a".into(),
            syncs: 3,
            last_sync: Some("2026-01-01T00:00:00Z".into()),
            last_check: None,
            last_error: None,
            consecutive_failures: 0,
            problem: None,
            source_problem: None,
            divergences: 0,
            service_cidrs: vec!["10.96.0.0/16".into()],
            service_ports: vec![ServicePortStatus {
                name: "demo/web:http".into(),
                protocol: "TCP".into(),
                service_type: "ClusterIP".into(),
                cluster_ip: "10.96.0.100".parse().unwrap(),
                port: 80,
                node_port: Some(30080),
                external_ips: vec![],
                load_balancer_ips: vec![],
                endpoints: EndpointCounts {
                    total: 3,
                    in_use: 2,
                    ready: 2,
                    serving: 2,
                    terminating: 0,
                    local: 1,
                },
                programmed_at: None,
                verified: true,
            }],
            contested: vec![ContestedFrontend {
                frontend: "192.0.2.1:80/tcp".into(),
                winner: "demo/web:http".into(),
                others: vec!["other/web:http".into()],
            }],
        };
        let text = render_text(&r);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[1],
            "demo/web:http  TCP    10.96.0.100:80 node:30080  2/2/0/1 of 3                  -           ok"
        );
        assert!(text.contains("3 syncs, last successful 2026-01-01T00:00:00Z; last read-back never"));
        assert!(
            text.contains("unallocated addresses of 10.96.0.0/16 are dropped"),
            "{text}"
        );
        assert!(
            text.contains(
                "CONTESTED 192.0.2.1:80/tcp: demo/web:http gets its traffic, other/web:http none of it there"
            ),
            "{text}"
        );
    }

    #[test]
    fn encodes_query_values() {
        assert_eq!(query_value("demo/web"), "demo/web");
        assert_eq!(query_value("a b&c=d"), "a%20b%26c%3Dd");
    }

    #[test]
    fn refuses_other_urls() {
        assert!(matches!(
            daemon_get("https://x:1", "/"),
            Err(DaemonError::BadUrl(_))
        ));
        assert!(matches!(daemon_get("http://", "/"), Err(DaemonError::BadUrl(_))));
    }
}
