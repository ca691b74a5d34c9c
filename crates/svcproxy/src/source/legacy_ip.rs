//! Addresses as the API server has long accepted them, not only as `std` parses them.
//!
//! Kubernetes validated addresses with Go's pre-1.17 parser until strict validation arrived (v1.33, off by
//! default), so objects in real clusters may hold IPv4 octets with leading zeros (`10.001.0.5`, read as
//! decimal) or IPv4 spelled as an IPv4-mapped IPv6 address (`::ffff:10.0.0.5`, which Go treats as IPv4).
//! kube-proxy reads both that way. Rejecting them would drop a whole Service or EndpointSlice that the API
//! accepted and kube-proxy programs, so they are read the same way here and then spelled canonically.

use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;

use ipnet::IpNet;

/// An address, with leading-zero octets read as decimal and IPv4-mapped IPv6 read as IPv4.
pub fn parse_ip(s: &str) -> Option<IpAddr> {
    let ip = IpAddr::from_str(s)
        .ok()
        .or_else(|| parse_v4_with_leading_zeros(s).map(IpAddr::V4))?;
    Some(match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    })
}

/// A CIDR, its address read as [`parse_ip`] reads one (host bits are kept, as `IpNet::from_str` keeps them).
pub fn parse_cidr(s: &str) -> Option<IpNet> {
    if let Ok(net) = IpNet::from_str(s) {
        return Some(net);
    }
    let (addr, prefix) = s.split_once('/')?;
    let prefix: u8 = decimal(prefix)?;
    // A mapped address keeps its IPv6 prefix length only if it stays IPv6; the API has no such CIDRs.
    let addr = IpAddr::from_str(addr)
        .ok()
        .or_else(|| parse_v4_with_leading_zeros(addr).map(IpAddr::V4))?;
    IpNet::new(addr, prefix).ok()
}

/// Four dot-separated decimal octets, leading zeros allowed, each at most 255.
fn parse_v4_with_leading_zeros(s: &str) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut parts = s.split('.');
    for octet in &mut octets {
        *octet = decimal(parts.next()?)?;
    }
    parts.next().is_none().then_some(Ipv4Addr::from(octets))
}

/// Decimal digits only: `str::parse` would also take a sign.
fn decimal(s: &str) -> Option<u8> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn legacy_spellings_read_as_kube_proxy_reads_them() {
        assert_eq!(parse_ip("10.0.0.5"), Some(ip("10.0.0.5")));
        assert_eq!(parse_ip("10.001.0.05"), Some(ip("10.1.0.5")));
        assert_eq!(parse_ip("010.000.000.010"), Some(ip("10.0.0.10")));
        assert_eq!(parse_ip("10.0.0.0000255"), Some(ip("10.0.0.255")));
        assert_eq!(parse_ip("::ffff:10.0.0.5"), Some(ip("10.0.0.5")));
        assert_eq!(parse_ip("fd00::5"), Some(ip("fd00::5")));
        assert_eq!(parse_ip("::1"), Some(ip("::1")));
        assert_eq!(parse_cidr("10.000.0.0/016"), Some("10.0.0.0/16".parse().unwrap()));
        assert_eq!(parse_cidr("10.0.0.7/24"), Some("10.0.0.7/24".parse().unwrap()));
    }

    #[test]
    fn anything_else_stays_rejected() {
        for bad in [
            "",
            "10.0.0",
            "10.0.0.0.1",
            "10.0.0.256",
            "10.0.0.0256",
            "10..0.1",
            "10.0.0.-1",
            "10.0.0.1 ",
            "0x0a.0.0.1",
            "1e1.0.0.1",
            "10.0.0.+1",
            "host",
            "::g",
        ] {
            assert_eq!(parse_ip(bad), None, "{bad:?}");
        }
        for bad in [
            "10.0.0.0",
            "10.0.0.0/33",
            "10.0.0.0/",
            "/8",
            "10.0.0.0/8/8",
            "10.0.0.0/+8",
        ] {
            assert_eq!(parse_cidr(bad), None, "{bad:?}");
        }
    }
}
