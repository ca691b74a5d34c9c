//! A transaction that uses every kernel feature our table needs, in a throw-away table it creates and
//! deletes again, so applying it leaves nothing behind. Run once at start: if the kernel lacks a feature
//! (a missing `nft_numgen`, `nft_fib_ipv4`, `nft_reject_ipv4`, `nft_masq`, `nft_chain_nat` module, or no
//! concatenation or dynamic-set support), the kernel probe-refuses the transaction and `nft` names the line. Object names carry a prefix because some short words (`fwd`) are nft keywords, so
//! the binary can probe-refuse to start with a precise reason instead of failing on the first real sync.
//!
//! One behaviour no probe can show without racing the kernel, when a deleted map element releases the chain
//! it jumps to, is told by the kernel's version instead ([`KernelVersion`]).

use std::fmt::Write;

use svcproxy_model::IpFamily;

/// A kernel's version, from its release string as `uname -r` prints it (`6.1.0-18-amd64`,
/// `5.15.0-1051-azure`, `6.18.44-fc-v657`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct KernelVersion {
    pub major: u32,
    pub minor: u32,
}

impl KernelVersion {
    /// The first kernel that releases a chain the moment the transaction deleting the last verdict-map
    /// element (or rule) leading to it commits.
    pub const RELEASES_CHAINS_AT_COMMIT: KernelVersion = KernelVersion { major: 6, minor: 2 };

    /// `major.minor` from the front of a release string; `None` when it does not start that way.
    pub fn parse(release: &str) -> Option<KernelVersion> {
        let mut parts = release.trim().splitn(3, '.');
        let number = |part: Option<&str>| -> Option<u32> {
            let part = part?;
            let end = part.find(|c: char| !c.is_ascii_digit()).unwrap_or(part.len());
            part[..end].parse().ok()
        };
        Some(KernelVersion {
            major: number(parts.next())?,
            minor: number(parts.next())?,
        })
    }

    /// Whether a chain can be deleted in the same transaction that removes the last map element jumping to
    /// it. Before 6.2 the kernel drops that reference only some time after the commit, so the deletion is
    /// refused as busy: the chain has to be flushed now and deleted by a later transaction.
    pub fn deletes_chains_with_their_references(self) -> bool {
        self >= Self::RELEASES_CHAINS_AT_COMMIT
    }
}

/// The name of the throw-away table.
pub const PROBE_TABLE: &str = "svcproxy-probe";

/// The probe for one family. Each line exercises one feature, so `nft`'s error (which quotes the failing
/// line) identifies the missing one.
pub fn probe_transaction(family: IpFamily) -> String {
    let (fam, addr_type, a, b, cidr) = match family {
        IpFamily::V4 => ("ip", "ipv4_addr", "10.0.0.1", "10.0.0.1:80", "10.96.0.0/16"),
        IpFamily::V6 => ("ip6", "ipv6_addr", "fd00::1", "[fd00::1]:80", "fd00:96::/64"),
    };
    // The address payload keyword is spelled like the family for ip and ip6.
    let addr = fam;
    let t = format!("{fam} {PROBE_TABLE}");
    let lines = [
        format!("table {t} {{}}"),
        format!("delete table {t}"),
        format!("add table {t}"),
        format!("add map {t} probe-tuple {{ type {addr_type} . inet_proto . inet_service : verdict ; }}"),
        format!("add map {t} probe-ports {{ type inet_proto . inet_service : verdict ; }}"),
        format!("add set {t} probe-pairs {{ type {addr_type} . {addr_type} ; }}"),
        format!(
            "add set {t} probe-sticky {{ type {addr_type} ; flags dynamic,timeout ; timeout 10s ; size 16 ; }}"
        ),
        format!("add chain {t} probe-pre {{ type filter hook prerouting priority -110 ; policy accept ; }}"),
        format!("add chain {t} probe-fwd {{ type filter hook forward priority -110 ; policy accept ; }}"),
        format!("add chain {t} probe-out {{ type filter hook output priority -90 ; policy accept ; }}"),
        format!("add chain {t} probe-dnat {{ type nat hook prerouting priority -100 ; policy accept ; }}"),
        format!("add chain {t} probe-snat {{ type nat hook postrouting priority 100 ; policy accept ; }}"),
        format!("add chain {t} probe-pick"),
        format!("add chain {t} probe-endpoint"),
        format!("add chain {t} probe-refuse"),
        format!("add rule {t} probe-refuse reject"),
        format!(
            "add rule {t} probe-fwd ct state new {addr} daddr . meta l4proto . th dport vmap @probe-tuple"
        ),
        format!("add rule {t} probe-out {addr} daddr {cidr} drop comment \"probe\""),
        format!(
            "add rule {t} probe-pre {addr} saddr != {{ {a} }} {addr} daddr . meta l4proto . th dport vmap @probe-tuple"
        ),
        format!("add rule {t} probe-dnat fib daddr type local meta l4proto . th dport vmap @probe-ports"),
        format!("add rule {t} probe-dnat {addr} daddr {a} tcp dport 80 goto probe-pick"),
        format!("add rule {t} probe-pick {addr} saddr @probe-sticky goto probe-endpoint"),
        format!(
            "add rule {t} probe-pick numgen random mod 2 0 update @probe-sticky {{ {addr} saddr }} meta l4proto tcp dnat to {b}"
        ),
        format!(
            "add rule {t} probe-pick numgen random mod 2 vmap {{ 0 : goto probe-endpoint, 1 : goto probe-endpoint }}"
        ),
        format!("add rule {t} probe-endpoint fib saddr type local meta mark set meta mark | 0x00004000"),
        format!("add rule {t} probe-endpoint meta l4proto tcp dnat to {b}"),
        format!(
            "add rule {t} probe-snat ct status dnat {addr} saddr . {addr} daddr @probe-pairs meta mark set meta mark | 0x00004000"
        ),
        format!("add rule {t} probe-snat meta mark & 0x00004000 == 0x00000000 return"),
        format!("add rule {t} probe-snat meta mark set meta mark ^ 0x00004000"),
        format!("add rule {t} probe-snat masquerade fully-random"),
        format!("add element {t} probe-tuple {{ {a} . tcp . 80 comment \"probe\" : goto probe-refuse }}"),
        format!("add element {t} probe-ports {{ tcp . 30000 : drop }}"),
        format!("add element {t} probe-pairs {{ {a} . {a} }}"),
        format!("delete table {t}"),
    ];
    let mut out = String::new();
    for l in lines {
        let _ = writeln!(out, "{l}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_releases_parse_as_major_and_minor() {
        let v = |major, minor| Some(KernelVersion { major, minor });
        assert_eq!(KernelVersion::parse("6.18.44-fc-v657"), v(6, 18));
        assert_eq!(KernelVersion::parse("6.1.0-18-amd64"), v(6, 1));
        assert_eq!(KernelVersion::parse("5.15.0-1051-azure\n"), v(5, 15));
        assert_eq!(KernelVersion::parse("6.2"), v(6, 2));
        assert_eq!(KernelVersion::parse("6.2-rc1"), v(6, 2));
        assert_eq!(KernelVersion::parse("4.19.0+"), v(4, 19));
        assert_eq!(KernelVersion::parse("10.0.1"), v(10, 0));
        for bad in ["", "6", "linux-6.1", "6.", ".1", "six.one"] {
            assert_eq!(KernelVersion::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn chains_are_deleted_with_their_references_from_6_2() {
        let defers = |release: &str| {
            !KernelVersion::parse(release)
                .unwrap()
                .deletes_chains_with_their_references()
        };
        assert!(defers("5.15.0-91-generic"));
        assert!(defers("6.1.0-18-amd64"));
        assert!(defers("4.19.0"));
        assert!(!defers("6.2.0"));
        assert!(!defers("6.18.44-fc-v657"));
        assert!(!defers("7.0.0"));
    }
}
