//! Address lists spelled the way `nft` prints them back.
//!
//! `nft` stores an anonymous set of prefixes as intervals, merges overlapping and adjacent ones, and prints
//! each interval as a prefix when it is one and as `a-b` otherwise; a host prefix prints as a bare address.
//! Writing the merged form ourselves keeps rendered and read-back rules textually equal, and it avoids the
//! "conflicting intervals" error overlapping source ranges would otherwise cause.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Interval {
    v6: bool,
    start: u128,
    end: u128,
}

fn interval(net: &IpNet) -> Interval {
    match net {
        IpNet::V4(n) => Interval {
            v6: false,
            start: u128::from(u32::from(n.network())),
            end: u128::from(u32::from(n.broadcast())),
        },
        IpNet::V6(n) => Interval {
            v6: true,
            start: u128::from(n.network()),
            end: u128::from(n.broadcast()),
        },
    }
}

fn addr(v6: bool, value: u128) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::from(value))
    } else {
        // Values of a v4 interval come from a u32, so the truncation is exact.
        IpAddr::V4(Ipv4Addr::from(value as u32))
    }
}

fn interval_text(i: Interval) -> String {
    let bits: u32 = if i.v6 { 128 } else { 32 };
    let size = i.end - i.start;
    // A prefix: the size is 2^k - 1 and the start is aligned to 2^k.
    let is_prefix = size
        .checked_add(1)
        .is_none_or(|n| n.is_power_of_two() && i.start.is_multiple_of(n));
    if is_prefix {
        let host_bits = 128 - (size.leading_zeros());
        let len = bits - host_bits;
        if len == bits {
            addr(i.v6, i.start).to_string()
        } else {
            format!("{}/{len}", addr(i.v6, i.start))
        }
    } else {
        format!("{}-{}", addr(i.v6, i.start), addr(i.v6, i.end))
    }
}

/// The prefixes merged into disjoint intervals, in address order, each as `nft` prints it.
pub fn merged_intervals(nets: &[IpNet]) -> Vec<String> {
    let mut intervals: Vec<Interval> = nets.iter().map(interval).collect();
    intervals.sort();
    let mut merged: Vec<Interval> = Vec::new();
    for i in intervals {
        match merged.last_mut() {
            Some(last) if last.v6 == i.v6 && i.start <= last.end.saturating_add(1) => {
                last.end = last.end.max(i.end);
            }
            _ => merged.push(i),
        }
    }
    merged.into_iter().map(interval_text).collect()
}

/// A match operand for a list of prefixes: a bare prefix when they merge into one interval, an anonymous set
/// (`{ a, b }`) otherwise.
pub fn prefix_set_text(nets: &[IpNet]) -> String {
    let parts = merged_intervals(nets);
    if parts.len() == 1 {
        parts.into_iter().next().unwrap_or_default()
    } else {
        format!("{{ {} }}", parts.join(", "))
    }
}

/// An address as a DNAT target: IPv6 in brackets so the port separator is unambiguous.
pub fn socket_text(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn merges_and_prints_like_nft() {
        assert_eq!(prefix_set_text(&nets(&["10.244.1.7/16"])), "10.244.0.0/16");
        assert_eq!(
            prefix_set_text(&nets(&["203.0.113.0/24", "192.168.10.0/24"])),
            "{ 192.168.10.0/24, 203.0.113.0/24 }"
        );
        // Overlap collapses; adjacent halves become one prefix; a host is a bare address.
        assert_eq!(
            merged_intervals(&nets(&["10.0.0.0/8", "10.1.0.0/16", "192.0.2.5/32"])),
            ["10.0.0.0/8", "192.0.2.5"]
        );
        assert_eq!(
            merged_intervals(&nets(&["10.0.0.0/25", "10.0.0.128/25"])),
            ["10.0.0.0/24"]
        );
        assert_eq!(
            merged_intervals(&nets(&["10.1.0.0/16", "10.2.0.0/16"])),
            ["10.1.0.0-10.2.255.255"]
        );
        assert_eq!(merged_intervals(&nets(&["::/0"])), ["::/0"]);
        assert_eq!(merged_intervals(&nets(&["fd00::1/128"])), ["fd00::1"]);
        assert_eq!(socket_text("fd00::1".parse().unwrap(), 80), "[fd00::1]:80");
    }
}
