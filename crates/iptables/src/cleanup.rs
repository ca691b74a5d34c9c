//! `svcproxy cleanup`: what to remove so that nothing any kube-proxy version or svcproxy wrote stays behind.

use std::collections::BTreeSet;

use crate::save_parser::{SavedRule, SavedRuleset, quote_arg};
use crate::seal::SEAL_CHAIN;

/// Chains with the KUBE- prefix that other components own and keep using: kubelet's canary and backend hint,
/// and the anti-martian chain kubelet still writes. Removing them would break kubelet, not clean up after us.
const NOT_OURS: [&str; 3] = ["KUBE-KUBELET-CANARY", "KUBE-IPTABLES-HINT", "KUBE-FIREWALL"];

/// What one table loses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableCleanup {
    pub table: String,
    /// Chains flushed and deleted.
    pub chains: Vec<String>,
    /// Rules of chains that stay (built-in chains, kubelet's) that jump to a deleted chain.
    pub rules: Vec<SavedRule>,
}

impl TableCleanup {
    pub fn is_empty(&self) -> bool {
        self.chains.is_empty() && self.rules.is_empty()
    }
}

/// Every KUBE-* chain in every table except the ones listed as kubelet's, and our seal chain, whatever version wrote it (current
/// chains, `KUBE-XLB-…`, `KUBE-MARK-DROP`, canaries, IPVS mode's `KUBE-NODE-PORT` and friends), plus the rules
/// elsewhere that jump to them.
pub fn plan_cleanup(saved: &SavedRuleset) -> Vec<TableCleanup> {
    saved
        .tables
        .iter()
        .map(|(name, table)| {
            let chains: BTreeSet<&str> = table
                .chains
                .iter()
                .filter(|(c, policy)| {
                    policy.is_none()
                        && (c.starts_with("KUBE-") && !NOT_OURS.contains(&c.as_str()) || *c == SEAL_CHAIN)
                })
                .map(|(c, _)| c.as_str())
                .collect();
            let rules = table
                .rules
                .iter()
                .filter(|r| !chains.contains(r.chain.as_str()))
                .filter(|r| r.jump.as_deref().is_some_and(|j| chains.contains(j)))
                .cloned()
                .collect();
            TableCleanup {
                table: name.clone(),
                chains: chains.into_iter().map(str::to_string).collect(),
                rules,
            }
        })
        .filter(|t| !t.is_empty())
        .collect()
}

/// One `iptables-restore --noflush` input carrying out the plan: references first, then flushes, then
/// deletions, per table.
pub fn cleanup_payload(plan: &[TableCleanup]) -> String {
    let mut out = String::new();
    for t in plan {
        out.push_str(&format!("*{}\n", t.table));
        for c in &t.chains {
            out.push_str(&format!(":{c} - [0:0]\n"));
        }
        for r in &t.rules {
            let args: Vec<String> = r.args.iter().map(|a| quote_arg(a)).collect();
            out.push_str(&format!("-D {} {}\n", r.chain, args.join(" ")));
        }
        for c in &t.chains {
            out.push_str(&format!("-X {c}\n"));
        }
        out.push_str("COMMIT\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::save_parser::parse_save;

    const DUMP: &str = "*nat
:PREROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-XLB-AAAAAAAAAAAAAAAA - [0:0]
:KUBE-SEP-BBBBBBBBBBBBBBBB - [0:0]
:KUBE-MARK-DROP - [0:0]
:OTHER - [0:0]
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A PREROUTING -j OTHER
-A KUBE-XLB-AAAAAAAAAAAAAAAA -j KUBE-SEP-BBBBBBBBBBBBBBBB
-A OTHER -j KUBE-MARK-DROP
COMMIT
*filter
:INPUT ACCEPT [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
-A INPUT -j KUBE-FIREWALL
COMMIT
";

    #[test]
    fn removes_every_kube_chain_but_kubelets_and_the_references_to_them() {
        let plan = plan_cleanup(&parse_save(DUMP).unwrap());
        assert_eq!(plan.len(), 1, "filter holds only kubelet's chains: {plan:?}");
        let nat = &plan[0];
        assert_eq!(
            nat.chains,
            [
                "KUBE-MARK-DROP",
                "KUBE-SEP-BBBBBBBBBBBBBBBB",
                "KUBE-SERVICES",
                "KUBE-XLB-AAAAAAAAAAAAAAAA"
            ]
        );
        let deleted: Vec<&str> = nat.rules.iter().map(|r| r.chain.as_str()).collect();
        assert_eq!(deleted, ["PREROUTING", "OTHER"]);
        let payload = cleanup_payload(&plan);
        assert!(
            payload.contains(
                "-D PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
            )
        );
        assert!(payload.find("-D OTHER").unwrap() < payload.find("-X KUBE-MARK-DROP").unwrap());
    }

    #[test]
    fn removes_our_seal_chain_too() {
        let dump = format!(
            "*filter\n:INPUT ACCEPT [0:0]\n:{SEAL_CHAIN} - [0:0]\n:OTHER-SEAL - [0:0]\n-A {SEAL_CHAIN} -m comment --comment \"svcproxy seal generation=1 unsealed\"\nCOMMIT\n"
        );
        let plan = plan_cleanup(&parse_save(&dump).unwrap());
        assert_eq!(plan.len(), 1);
        assert_eq!(plan[0].chains, [SEAL_CHAIN]);
        assert!(cleanup_payload(&plan).contains(&format!("-X {SEAL_CHAIN}")));
    }

    #[test]
    fn nothing_to_do_on_a_clean_host() {
        let clean = "*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n";
        assert!(plan_cleanup(&parse_save(clean).unwrap()).is_empty());
    }
}
