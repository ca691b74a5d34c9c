//! A transaction that uses every kernel feature our table needs, in a throw-away table it creates and
//! deletes again, so applying it leaves nothing behind. Run once at start: if the kernel lacks a feature
//! (a missing `nft_numgen`, `nft_fib_ipv4`, `nft_reject_ipv4`, `nft_masq`, `nft_chain_nat` module, or no
//! concatenation or dynamic-set support), the kernel probe-refuses the transaction and `nft` names the line. Object names carry a prefix because some short words (`fwd`) are nft keywords, so
//! the binary can probe-refuse to start with a precise reason instead of failing on the first real sync.

use std::fmt::Write;

use svcproxy_model::IpFamily;

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
