//! The spelling of rule lines: upstream's argument order and quoting, so our payloads read like kube-proxy's
//! and rules written by either are recognisable to the other.

use std::fmt::{Display, Write as _};
use std::net::IpAddr;

use svcproxy_model::{EndpointInfo, Protocol};

/// Builds one `-A CHAIN …` line in place; rendering is the hot path of a full sync, so no intermediate
/// argument vectors.
pub(crate) struct Line(String);

impl Line {
    pub(crate) fn append(chain: &str) -> Self {
        let mut s = String::with_capacity(160);
        s.push_str("-A ");
        s.push_str(chain);
        Line(s)
    }

    /// `-I CHAIN 1 …`: a rule inserted at the top of a chain we do not own.
    pub(crate) fn insert_first(chain: &str) -> Self {
        Line(format!("-I {chain} 1"))
    }

    /// Raw arguments, already space-separated (`-m addrtype --dst-type LOCAL`).
    pub(crate) fn args(mut self, args: &str) -> Self {
        self.0.push(' ');
        self.0.push_str(args);
        self
    }

    pub(crate) fn arg_value(mut self, flag: &str, value: impl Display) -> Self {
        let _ = write!(self.0, " {flag} {value}");
        self
    }

    // The spellings below skip the formatting machinery: a full render writes a few hundred thousand lines,
    // most of them an address, a port or a chain name after a flag.

    pub(crate) fn arg(mut self, flag: &str, value: &str) -> Self {
        self.0.push(' ');
        self.0.push_str(flag);
        self.0.push(' ');
        self.0.push_str(value);
        self
    }

    pub(crate) fn arg_ip(mut self, flag: &str, ip: IpAddr) -> Self {
        self.0.push(' ');
        self.0.push_str(flag);
        self.0.push(' ');
        push_ip(&mut self.0, ip);
        self
    }

    pub(crate) fn arg_port(mut self, flag: &str, port: u16) -> Self {
        self.0.push(' ');
        self.0.push_str(flag);
        self.0.push(' ');
        push_decimal(&mut self.0, u32::from(port));
        self
    }

    /// `ip:port`, `[ip]:port` for IPv6.
    pub(crate) fn arg_endpoint(mut self, flag: &str, endpoint: &EndpointInfo) -> Self {
        self.0.push(' ');
        self.0.push_str(flag);
        self.0.push(' ');
        push_endpoint(&mut self.0, endpoint);
        self
    }

    /// `-m comment --comment <text>`, quoted only when the text has a space, as upstream writes it. The texts
    /// come from DNS-label names and fixed phrases, so they never need escaping.
    pub(crate) fn comment(mut self, text: &str) -> Self {
        self.0.push_str(" -m comment --comment ");
        if text.contains(' ') {
            self.0.push('"');
            self.0.push_str(text);
            self.0.push('"');
        } else {
            self.0.push_str(text);
        }
        self
    }

    /// Upstream names the match module before the protocol: `-m tcp -p tcp`.
    pub(crate) fn protocol(self, protocol: Protocol) -> Self {
        let p = protocol.lower();
        self.arg("-m", p).arg("-p", p)
    }

    pub(crate) fn jump(self, target: &str) -> String {
        self.arg("-j", target).finish()
    }

    /// The line in its build buffer. A chain's lines live only until they are copied into the chain's text
    /// (one buffer per chain), so the buffer is handed over as it is; lines kept longer are shrunk by whoever
    /// keeps them.
    pub(crate) fn finish(self) -> String {
        self.0
    }
}

/// An address as its `Display` spells it; IPv4 by hand.
pub(crate) fn push_ip(out: &mut String, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                push_decimal(out, u32::from(octet));
            }
        }
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

/// `ip:port` (`[ip]:port` for IPv6), as the endpoint's `Display` spells it.
pub(crate) fn push_endpoint(out: &mut String, endpoint: &EndpointInfo) {
    if endpoint.ip.is_ipv6() {
        out.push('[');
        push_ip(out, endpoint.ip);
        out.push(']');
    } else {
        push_ip(out, endpoint.ip);
    }
    out.push(':');
    push_decimal(out, u32::from(endpoint.port));
}

pub(crate) fn push_decimal(out: &mut String, mut n: u32) {
    let mut digits = [0u8; 10];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for &d in &digits[i..] {
        out.push(char::from(d));
    }
}

/// `1/n` with ten decimals, as Go's `%0.10f` prints it; both are correctly rounded conversions of the same
/// f64, so the strings agree.
pub(crate) fn probability(n: usize) -> String {
    // Ten decimals of 1/n by integer division. Away from a tie the f64 is close enough to 1/n (for n up to
    // 10^5) to round the same way; on an exact decimal tie (n = 2048, 10240, …) the result depends on which
    // side of 1/n the f64 fell, so only the float formatter can say. Both are checked against each other
    // below.
    let scale = 10_000_000_000u64;
    let (q, r) = (scale / n.max(1) as u64, scale % n.max(1) as u64);
    if n == 0 || n > 100_000 || 2 * r == n as u64 {
        return format!("{:.10}", 1.0_f64 / n as f64);
    }
    let q = if 2 * r > n as u64 { q + 1 } else { q };
    format!("{}.{:010}", q / scale, q % scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probability_vectors() {
        let cases = [
            (1, "1.0000000000"),
            (2, "0.5000000000"),
            (3, "0.3333333333"),
            (7, "0.1428571429"),
            (10, "0.1000000000"),
            (100, "0.0100000000"),
            (1000, "0.0010000000"),
            (10000, "0.0001000000"),
            (100000, "0.0000100000"),
            (100001, "0.0000099999"),
        ];
        for (n, want) in cases {
            assert_eq!(probability(n), want, "n={n}");
        }
    }

    #[test]
    fn probability_agrees_with_the_float_formatter() {
        for n in 1..=100_001usize {
            assert_eq!(probability(n), format!("{:.10}", 1.0_f64 / n as f64), "n={n}");
        }
    }

    #[test]
    fn comment_quoting() {
        let l = Line::append("X")
            .comment("ns/svc:p")
            .comment("ns/svc:p cluster IP")
            .jump("Y");
        assert_eq!(
            l,
            r#"-A X -m comment --comment ns/svc:p -m comment --comment "ns/svc:p cluster IP" -j Y"#
        );
    }
}
