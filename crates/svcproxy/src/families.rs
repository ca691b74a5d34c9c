//! Which IP families this node serves, and which of them is primary.
//!
//! Upstream runs a dual-stack proxier whenever both families' tools work, whatever the configuration lists:
//! an IPv6-only or dual-stack cluster that names no IPv6 CIDR (NodeCIDR or interface-based local-traffic
//! detection need none) still gets its IPv6 Services programmed. svcproxy does the same; a family the node
//! cannot program is left out with the reason, which the engine repeats when Services of it appear.

use std::net::IpAddr;

use svcproxy_model::IpFamily;

use crate::backends::Backend;
use crate::cli::{ProxyMode, RunArgs};
use crate::exec::runner::Runner;

/// A family no engine serves, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unserved {
    pub family: IpFamily,
    pub reason: String,
}

/// The families to run an engine for, the primary first, and the one left out, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    pub families: Vec<IpFamily>,
    pub unserved: Option<Unserved>,
}

/// Whether the node can program a family's rules.
pub trait FamilySupport {
    /// Why `family`'s rules cannot be programmed here, when they cannot.
    fn missing(&self, family: IpFamily) -> Option<String>;
}

/// The primary family, as upstream picks it: that of a specific `--bind-address`, else of the first
/// `--cluster-cidr` (upstream reads the Node's first address, which svcproxy only learns after start; the
/// cluster's first CIDR is of the same family in any cluster upstream accepts), else IPv4.
pub fn primary(args: &RunArgs) -> IpFamily {
    let bound = args.upstream.bind_address.iter().find(|ip| !ip.is_unspecified());
    bound
        .copied()
        .or_else(|| args.cluster_cidr.first().map(|c| c.addr()))
        .map(|ip: IpAddr| IpFamily::of(&ip))
        .unwrap_or(IpFamily::V4)
}

/// Both families, the primary first, less one the node cannot program. The primary itself is never left out:
/// when it cannot be programmed every sync fails loudly, which is the right answer for a node that cannot
/// serve its own cluster.
pub fn served(primary: IpFamily, support: &dyn FamilySupport) -> Served {
    let secondary = match primary {
        IpFamily::V4 => IpFamily::V6,
        IpFamily::V6 => IpFamily::V4,
    };
    match support.missing(secondary) {
        None => Served {
            families: vec![primary, secondary],
            unserved: None,
        },
        Some(reason) => Served {
            families: vec![primary],
            unserved: Some(Unserved {
                family: secondary,
                reason,
            }),
        },
    }
}

/// The node's own answer: the kernel's per-family settings directory; in iptables mode whether the chosen
/// backend's command can list that family's nat POSTROUTING chain (upstream's "is iptables present" probe;
/// asking for one chain, as a save would fetch the family's whole ruleset); in nftables mode whether nft can
/// declare a NAT chain of that family, checked by the kernel and not committed.
pub struct SystemFamilySupport<'a> {
    pub mode: ProxyMode,
    pub backend: Backend,
    pub runner: &'a dyn Runner,
}

impl FamilySupport for SystemFamilySupport<'_> {
    fn missing(&self, family: IpFamily) -> Option<String> {
        let stack = match family {
            IpFamily::V4 => "/proc/sys/net/ipv4",
            IpFamily::V6 => "/proc/sys/net/ipv6",
        };
        if !std::path::Path::new(stack).exists() {
            return Some(format!("the kernel has no {} stack", family.label()));
        }
        match self.mode {
            ProxyMode::Iptables => {
                let program = self.backend.binary(family);
                if let Err(e) = self
                    .runner
                    .run(&program, &["-t", "nat", "-S", "POSTROUTING"], None)
                {
                    return Some(format!("`{program} -t nat -S POSTROUTING` does not work: {e}"));
                }
            }
            ProxyMode::Nftables => {
                let nft_family = match family {
                    IpFamily::V4 => "ip",
                    IpFamily::V6 => "ip6",
                };
                let probe = format!(
                    "add table {nft_family} svcproxy-family-probe\n\
                     add chain {nft_family} svcproxy-family-probe nat {{ type nat hook prerouting priority -100; }}\n"
                );
                if let Err(e) = self.runner.run("nft", &["-c", "-f", "-"], Some(&probe)) {
                    return Some(format!("nft cannot declare an {nft_family} NAT chain: {e}"));
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Cli;
    use crate::exec::iptables::ExecError;
    use crate::exec::runner::RecordingRunner;
    use clap::Parser;

    fn run_args(extra: &[&str]) -> RunArgs {
        let cli = Cli::parse_from(["svcproxy", "run"].iter().chain(extra));
        match cli.command {
            crate::cli::Command::Run(args) => *args,
            _ => unreachable!(),
        }
    }

    struct Lacking(Option<IpFamily>);

    impl FamilySupport for Lacking {
        fn missing(&self, family: IpFamily) -> Option<String> {
            (self.0 == Some(family)).then(|| "absent".to_string())
        }
    }

    #[test]
    fn the_primary_family_follows_the_bind_address_then_the_first_cluster_cidr() {
        assert_eq!(primary(&run_args(&[])), IpFamily::V4);
        assert_eq!(
            primary(&run_args(&["--cluster-cidr", "fd00:10:244::/64"])),
            IpFamily::V6
        );
        assert_eq!(
            primary(&run_args(&["--cluster-cidr", "10.244.0.0/16,fd00:10:244::/64"])),
            IpFamily::V4
        );
        assert_eq!(
            primary(&run_args(&[
                "--bind-address",
                "fd00::10",
                "--cluster-cidr",
                "10.244.0.0/16"
            ])),
            IpFamily::V6
        );
        // An unspecified bind address says nothing about the family.
        assert_eq!(
            primary(&run_args(&[
                "--bind-address",
                "::",
                "--cluster-cidr",
                "10.244.0.0/16"
            ])),
            IpFamily::V4
        );
    }

    #[test]
    fn both_families_are_served_without_an_ipv6_cluster_cidr() {
        assert_eq!(
            served(IpFamily::V4, &Lacking(None)),
            Served {
                families: vec![IpFamily::V4, IpFamily::V6],
                unserved: None
            }
        );
        assert_eq!(
            served(IpFamily::V6, &Lacking(None)).families,
            vec![IpFamily::V6, IpFamily::V4]
        );
    }

    #[test]
    fn a_family_the_node_cannot_program_is_left_out_with_its_reason() {
        let s = served(IpFamily::V4, &Lacking(Some(IpFamily::V6)));
        assert_eq!(s.families, vec![IpFamily::V4]);
        assert_eq!(
            s.unserved,
            Some(Unserved {
                family: IpFamily::V6,
                reason: "absent".into()
            })
        );
        // The primary is not even asked about: kept, so its failures show.
        assert_eq!(
            served(IpFamily::V6, &Lacking(Some(IpFamily::V6))).families,
            vec![IpFamily::V6, IpFamily::V4]
        );
    }

    #[test]
    fn iptables_mode_probes_the_chosen_backends_nat_table() {
        let runner = RecordingRunner::default();
        runner.answer(
            "ip6tables-legacy",
            Err(ExecError::Spawn {
                program: "ip6tables-legacy".into(),
                reason: "not installed".into(),
            }),
        );
        runner.answer(
            "ip6tables-nft -t nat -S POSTROUTING",
            Ok("-P POSTROUTING ACCEPT\n".into()),
        );
        let support = |mode, backend| SystemFamilySupport {
            mode,
            backend,
            runner: &runner,
        };
        let why = support(ProxyMode::Iptables, Backend::Legacy)
            .missing(IpFamily::V6)
            .unwrap();
        assert!(why.contains("ip6tables-legacy -t nat -S POSTROUTING"), "{why}");
        assert_eq!(
            support(ProxyMode::Iptables, Backend::Nft).missing(IpFamily::V6),
            None
        );
    }

    #[test]
    fn nftables_mode_asks_nft_to_check_a_nat_chain_of_the_family() {
        let runner = RecordingRunner::default();
        let support = SystemFamilySupport {
            mode: ProxyMode::Nftables,
            backend: Backend::Nft,
            runner: &runner,
        };
        // Unanswered: nft refuses (or is missing).
        let why = support.missing(IpFamily::V6).unwrap();
        assert!(why.contains("ip6 NAT chain"), "{why}");
        let calls = runner.calls.lock().unwrap().clone();
        assert_eq!(calls.len(), 1);
        assert!(
            calls[0].starts_with("nft -c -f - <<add table ip6 ")
                && calls[0].contains("type nat hook prerouting"),
            "{calls:?}"
        );
        runner.answer("nft -c -f -", Ok(String::new()));
        assert_eq!(support.missing(IpFamily::V6), None);
    }
}
