//! The spelling of rule lines: upstream's argument order and quoting, so our payloads read like kube-proxy's
//! and rules written by either are recognisable to the other.

use std::fmt::{Display, Write as _};
use std::net::IpAddr;

use svcproxy_model::{EndpointInfo, Protocol};

use crate::config::LocalMatch;

/// Builds one rule in place: either a whole `-A CHAIN …` line, or (continuing a chain's text, see
/// [`ChainRules`]) only the arguments after it. Rendering is the hot path of a full sync, so no intermediate
/// argument vectors and no buffer per rule.
pub(crate) struct Line {
    text: String,
    /// Nothing written yet for this rule, so its first argument takes no separating space.
    fresh: bool,
}

impl Line {
    pub(crate) fn append(chain: &str) -> Self {
        let mut text = String::with_capacity(160);
        text.push_str("-A ");
        text.push_str(chain);
        Line { text, fresh: false }
    }

    /// `-I CHAIN 1 …`: a rule inserted at the top of a chain we do not own.
    pub(crate) fn insert_first(chain: &str) -> Self {
        Line {
            text: format!("-I {chain} 1"),
            fresh: false,
        }
    }

    /// A rule's arguments alone, written after `text`.
    fn continuing(text: String) -> Self {
        Line { text, fresh: true }
    }

    fn space(&mut self) {
        if self.fresh {
            self.fresh = false;
        } else {
            self.text.push(' ');
        }
    }

    /// Raw arguments, already space-separated (`-m addrtype --dst-type LOCAL`).
    pub(crate) fn args(mut self, args: &str) -> Self {
        self.space();
        self.text.push_str(args);
        self
    }

    pub(crate) fn arg_value(mut self, flag: &str, value: impl Display) -> Self {
        self.space();
        let _ = write!(self.text, "{flag} {value}");
        self
    }

    // The spellings below skip the formatting machinery: a full render writes a few hundred thousand lines,
    // most of them an address, a port or a chain name after a flag.

    pub(crate) fn arg(mut self, flag: &str, value: &str) -> Self {
        self.space();
        self.text.push_str(flag);
        self.text.push(' ');
        self.text.push_str(value);
        self
    }

    /// The local-traffic match, or with `negated` its opposite.
    pub(crate) fn local(mut self, m: LocalMatch<'_>, negated: bool) -> Self {
        self.space();
        m.push(negated, &mut self.text);
        self
    }

    pub(crate) fn arg_ip(mut self, flag: &str, ip: IpAddr) -> Self {
        self.space();
        self.text.push_str(flag);
        self.text.push(' ');
        push_ip(&mut self.text, ip);
        self
    }

    pub(crate) fn arg_port(mut self, flag: &str, port: u16) -> Self {
        self.space();
        self.text.push_str(flag);
        self.text.push(' ');
        push_decimal(&mut self.text, u32::from(port));
        self
    }

    /// `ip:port`, `[ip]:port` for IPv6.
    pub(crate) fn arg_endpoint(mut self, flag: &str, endpoint: &EndpointInfo) -> Self {
        self.space();
        self.text.push_str(flag);
        self.text.push(' ');
        push_endpoint(&mut self.text, endpoint);
        self
    }

    /// `-m comment --comment <text>`, quoted only when the text has a space, as upstream writes it. The texts
    /// come from DNS-label names and fixed phrases, so they never need escaping.
    pub(crate) fn comment(self, text: &str) -> Self {
        self.comment_of(&[text])
    }

    /// [`Line::comment`] of the concatenation of `parts`, without making it first.
    pub(crate) fn comment_of(mut self, parts: &[&str]) -> Self {
        self.space();
        self.text.push_str("-m comment --comment ");
        let quoted = parts.iter().any(|p| p.contains(' '));
        if quoted {
            self.text.push('"');
        }
        for part in parts {
            self.text.push_str(part);
        }
        if quoted {
            self.text.push('"');
        }
        self
    }

    /// `-m comment --comment "<spn> -> <endpoint>"`: the comment upstream gives each endpoint's rules in a
    /// policy chain (quoted, as the arrow's spaces make every such comment).
    pub(crate) fn endpoint_comment(mut self, spn: &str, endpoint: &EndpointInfo) -> Self {
        self.space();
        self.text.push_str("-m comment --comment \"");
        self.text.push_str(spn);
        self.text.push_str(" -> ");
        push_endpoint(&mut self.text, endpoint);
        self.text.push('"');
        self
    }

    /// Upstream names the match module before the protocol: `-m tcp -p tcp`.
    pub(crate) fn protocol(self, protocol: Protocol) -> Self {
        let p = protocol.lower();
        self.arg("-m", p).arg("-p", p)
    }

    /// `-m statistic --mode random --probability 1/n`, 1/n spelled as [`push_probability`] spells it.
    pub(crate) fn probability(mut self, n: usize) -> Self {
        self.space();
        self.text.push_str("-m statistic --mode random --probability ");
        push_probability(&mut self.text, n);
        self
    }

    pub(crate) fn jump(self, target: &str) -> String {
        self.arg("-j", target).finish()
    }

    /// The text built: the line in its build buffer (lines kept long are shrunk by whoever keeps them), or,
    /// continuing a chain, the chain's text so far.
    pub(crate) fn finish(self) -> String {
        self.text
    }
}

/// Writes the rules of one chain straight into a text, each rule's arguments ended by a newline (the form
/// [`Chain`](crate::ruleset::Chain) keeps), after whatever the text holds: a service port's chains are written one after another
/// into one text they then share (see [`Chain::split`](crate::ruleset::Chain::split)), where building lines and joining them took an
/// allocation per rule and two more per chain.
pub(crate) struct ChainRules<'b> {
    text: &'b mut String,
}

impl<'b> ChainRules<'b> {
    /// Goes on writing rules after the ones `text` holds.
    pub(crate) fn extending(text: &'b mut String) -> Self {
        ChainRules { text }
    }

    /// Adds the rule `build` spells, given a [`Line`] that takes arguments only.
    pub(crate) fn add(&mut self, build: impl FnOnce(Line) -> String) {
        let line = Line::continuing(std::mem::take(self.text));
        *self.text = build(line);
        self.text.push('\n');
    }
}

/// An address as its `Display` spells it; IPv4 by hand.
pub(crate) fn push_ip(out: &mut String, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            // Spelled on the stack and copied once: a full render writes some 400,000 addresses.
            let mut text = [0u8; 15];
            let mut len = 0;
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    text[len] = b'.';
                    len += 1;
                }
                if octet >= 100 {
                    text[len] = b'0' + octet / 100;
                    len += 1;
                }
                if octet >= 10 {
                    text[len] = b'0' + octet / 10 % 10;
                    len += 1;
                }
                text[len] = b'0' + octet % 10;
                len += 1;
            }
            out.push_str(std::str::from_utf8(&text[..len]).expect("ASCII digits"));
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
    // One copy of the digits, not a push (and a capacity check) per digit.
    out.push_str(std::str::from_utf8(&digits[i..]).expect("ASCII digits"));
}

/// `1/n` with ten decimals, as Go's `%0.10f` prints it; both are correctly rounded conversions of the same
/// f64, so the strings agree.
fn push_probability(out: &mut String, n: usize) {
    // Ten decimals of 1/n by integer division. Away from a tie the f64 is close enough to 1/n (for n up to
    // 10^5) to round the same way; on an exact decimal tie (n = 2048, 10240, …) the result depends on which
    // side of 1/n the f64 fell, so only the float formatter can say. Both are checked against each other
    // below.
    let scale = 10_000_000_000u64;
    let (q, r) = (scale / n.max(1) as u64, scale % n.max(1) as u64);
    if n == 0 || n > 100_000 || 2 * r == n as u64 {
        let _ = write!(out, "{:.10}", 1.0_f64 / n as f64);
        return;
    }
    let q = if 2 * r > n as u64 { q + 1 } else { q };
    push_decimal(out, (q / scale) as u32);
    out.push('.');
    let fraction = q % scale;
    let mut digits = [b'0'; 10];
    let mut rest = fraction;
    for d in digits.iter_mut().rev() {
        *d = b'0' + (rest % 10) as u8;
        rest /= 10;
    }
    out.extend(digits.iter().map(|&d| char::from(d)));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ruleset::Chain;

    fn probability(n: usize) -> String {
        let mut out = String::new();
        push_probability(&mut out, n);
        out
    }

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
    fn chain_rules_hold_arguments_only() {
        let mut text = String::from("-j Z\n");
        let mut rules = ChainRules::extending(&mut text);
        rules.add(|l| l.comment("a b").arg_port("--dport", 80).jump("X"));
        rules.add(|l| l.jump("Y"));
        rules.add(Line::finish);
        let chain = Chain::from_rules(&text[5..]);
        assert_eq!(
            chain.text(),
            "-m comment --comment \"a b\" --dport 80 -j X\n-j Y\n\n"
        );
        assert_eq!(
            chain,
            Chain::new(
                "C",
                [
                    "-A C -m comment --comment \"a b\" --dport 80 -j X",
                    "-A C -j Y",
                    "-A C"
                ]
            )
        );
    }

    #[test]
    fn addresses_are_spelled_as_display_spells_them() {
        let mut samples: Vec<IpAddr> = [
            0u32,
            1,
            9,
            10,
            99,
            100,
            255,
            256,
            0x0a00_0001,
            0xc0a8_6464,
            u32::MAX,
        ]
        .into_iter()
        .map(|n| IpAddr::from(std::net::Ipv4Addr::from(n)))
        .collect();
        samples.extend((0..=255u8).map(|o| IpAddr::from([o, 255 - o, o / 3, o.wrapping_mul(7)])));
        samples.push("fd00::1:2".parse().unwrap());
        for ip in samples {
            let mut out = String::from("x");
            push_ip(&mut out, ip);
            assert_eq!(out, format!("x{ip}"));
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
