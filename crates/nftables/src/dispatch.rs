//! The rules by which a policy chain picks one endpoint.
//!
//! The choice of layout is about the kernel and `nft`, not the packet path. Each anonymous
//! `numgen … vmap { … }` is a set of its own, and the kernel's cost of adding rules grows with the number of
//! sets in the table; and `nft` 1.0.x fetches the table's whole chain list before most commands, so every
//! per-endpoint chain is paid again by every later transaction. Measured with `nft -f` into a fresh network
//! namespace on a 2-vCPU VM shared with other jobs (Linux 6.18, nft 1.0.6), 5,000 ClusterIP services × 10
//! endpoints, ranges over three runs (`tests/scale.rs` prints these figures):
//!
//! | layout                                          | full load  | reload over it | one-endpoint change | cold sync, 500 services per chunk |
//! |-------------------------------------------------|------------|----------------|---------------------|-----------------------------------|
//! | `NumgenVmap`: endpoint chains + anonymous vmaps | 13.9–21 s  | 61–95 s        | 0.21–0.34 s         | 5.4–6.9 s, longest chunk 0.9 s    |
//! | `Cascade`: endpoint chains + `numgen … goto`    | 3.0–4.2 s  | 3.2–5.8 s      | 0.18–0.40 s         | 3.4–4.0 s, longest chunk 0.5 s    |
//! | `Direct`: `numgen … dnat`, no endpoint chains   | 1.4–1.7 s  | 1.5 s          | 0.04–0.06 s         | 1.5–1.7 s, longest chunk 0.25 s   |
//! | one shared named map, `numgen … offset <base>`  | 19.1 s     | —              | 12.6 s              | —                                 |
//! | `Mapped`: one `dnat … map` rule per chain, endpoints in 84 shared maps | 0.77 s | 0.79 s | 0.02–0.03 s (elements only) | 0.92 s, longest chunk 0.23 s |
//!
//! `Mapped` is the default. Its one-endpoint change adds and removes map elements and replaces no rule, so the
//! kernel does not re-validate the table (in the `Direct` layout that validation was about 60% of a change);
//! the `nft` figure above is almost all `nft` itself, and the daemon sends such changes over its own netlink
//! socket instead (`bench_sync`: 4 ms for the whole sync at 5,000 services). Maps were measured in four
//! arrangements on the same table: one map for all chains loads in 4.5 s (the kernel checks each element
//! added against every rule bound to its map, and each rule bound against every element), one per chain in
//! 1.8 s (named sets are found by a linear search), 64 or 256 shared maps in 0.74–0.76 s.
//! (Upstream's own 5,000 × 10 table took 14.0 s to load in the upstream timing runs on a VM of the same kind,
//! its full sync 12.9 s and a partial one 1.4–1.6 s.) The shared map, measured on a hand-built table of the same shape, was the slowest:
//! every change to a verdict map makes the kernel re-validate the jumps of every element reachable from every
//! rule that uses it, so one map referenced by 5,000 chains costs 5,000 × 50,000 checks per commit. Reloading
//! over an existing table is what a restart or a clean rebuild does; with anonymous vmaps it is quadratic.
//!
//! On the packet path a cascade costs one `numgen` and compare per endpoint passed over, for the first packet
//! of a connection only; beyond [`DEFAULT_CASCADE_LIMIT`] endpoints the vmap's constant-time lookup wins and
//! the per-map cost is paid only by those few large services. A mapped chain costs one `numgen` and one hash
//! lookup whatever its size. Chains with ClientIP affinity, which must remember each client's endpoint, keep
//! the `Direct` cascade in the mapped layout.

use crate::config::DispatchLayout;

/// Services with more endpoints than this use a vmap even in the cascade layouts.
pub const DEFAULT_CASCADE_LIMIT: usize = 32;

/// The layout measured fastest above.
pub const DEFAULT_LAYOUT: DispatchLayout = DispatchLayout::Mapped;

/// One endpoint as a dispatch target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Its endpoint chain, used when the layout jumps to chains.
    pub chain: String,
    /// What the endpoint chain would do after its hairpin rule, as statements for one rule:
    /// `update @affinity-… { ip saddr } meta l4proto tcp dnat to 10.0.0.1:80`.
    pub action: String,
}

/// Whether a policy chain with `n` endpoints reaches them through endpoint chains.
pub fn uses_endpoint_chains(layout: DispatchLayout, n: usize) -> bool {
    match layout {
        DispatchLayout::NumgenVmap | DispatchLayout::Cascade { .. } => true,
        DispatchLayout::Direct { max_endpoints } => n > max_endpoints,
        DispatchLayout::Mapped => n > crate::slots::SLOT_WIDTH as usize,
    }
}

/// Rules that send the packet to one of `targets` uniformly at random. `targets` must not be empty.
pub fn dispatch_rules(layout: DispatchLayout, targets: &[Target]) -> Vec<String> {
    let n = targets.len();
    let (cascade, direct) = match layout {
        // Mapped policy chains are rendered by the caller, which holds their slot; beyond a slot's width they
        // fall back to endpoint chains and a vmap.
        DispatchLayout::NumgenVmap | DispatchLayout::Mapped => (false, false),
        DispatchLayout::Cascade { max_endpoints } => (n <= max_endpoints, false),
        DispatchLayout::Direct { max_endpoints } => (n <= max_endpoints, n <= max_endpoints),
    };
    if !cascade {
        let entries: Vec<String> = targets
            .iter()
            .enumerate()
            .map(|(i, t)| format!("{i} : goto {}", t.chain))
            .collect();
        return vec![format!("numgen random mod {n} vmap {{ {} }}", entries.join(", "))];
    }
    // Rule i takes its endpoint with probability 1/(n-i) of the packets still undecided: each endpoint ends up
    // with 1/n overall, as with iptables' statistic cascade.
    targets
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let left = n - i;
            let then = if direct {
                t.action.clone()
            } else {
                format!("goto {}", t.chain)
            };
            if left == 1 {
                then
            } else {
                format!("numgen random mod {left} 0 {then}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets(names: &[&str]) -> Vec<Target> {
        names
            .iter()
            .map(|n| Target {
                chain: n.to_string(),
                action: format!("dnat to {n}"),
            })
            .collect()
    }

    #[test]
    fn layouts() {
        let t = targets(&["a", "b", "c"]);
        assert_eq!(
            dispatch_rules(DispatchLayout::NumgenVmap, &t[..1]),
            ["numgen random mod 1 vmap { 0 : goto a }"]
        );
        let cascade = DispatchLayout::Cascade { max_endpoints: 32 };
        assert_eq!(
            dispatch_rules(cascade, &t),
            [
                "numgen random mod 3 0 goto a",
                "numgen random mod 2 0 goto b",
                "goto c"
            ]
        );
        assert_eq!(dispatch_rules(cascade, &t[..1]), ["goto a"]);
        let direct = DispatchLayout::Direct { max_endpoints: 32 };
        assert_eq!(
            dispatch_rules(direct, &t),
            [
                "numgen random mod 3 0 dnat to a",
                "numgen random mod 2 0 dnat to b",
                "dnat to c"
            ]
        );
        assert_eq!(
            dispatch_rules(DispatchLayout::Direct { max_endpoints: 2 }, &t),
            ["numgen random mod 3 vmap { 0 : goto a, 1 : goto b, 2 : goto c }"]
        );
        assert!(!uses_endpoint_chains(direct, 32));
        assert!(uses_endpoint_chains(direct, 33));
        assert!(!uses_endpoint_chains(DEFAULT_LAYOUT, 65536));
        assert!(uses_endpoint_chains(DEFAULT_LAYOUT, 65537));
        assert!(uses_endpoint_chains(cascade, 1));
    }
}
