//! The jumps from the built-in chains into ours.
//!
//! They live in chains we share with everyone else, so we never rewrite those chains: we look for our jumps in
//! `iptables-save` output and insert only the missing ones. They are identified by (table, chain, target,
//! comment) rather than by their text because iptables-save reorders and respells matches.

use crate::chain_name::{
    KUBE_EXTERNAL_SERVICES, KUBE_FIREWALL, KUBE_FORWARD, KUBE_NODEPORTS, KUBE_POSTROUTING,
    KUBE_PROXY_FIREWALL, KUBE_SERVICES,
};
use crate::config::RenderConfig;
use crate::rule_text::Line;
use crate::ruleset::TableName;
use crate::save_parser::SavedRuleset;

/// One jump from a built-in chain into one of ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct JumpRule {
    pub table: TableName,
    /// The built-in chain.
    pub chain: &'static str,
    /// Matches before the comment, space-separated (may be empty).
    pub match_args: &'static str,
    pub comment: Option<&'static str>,
    pub target: &'static str,
}

const NEW: &str = "-m conntrack --ctstate NEW";

const fn jump(
    table: TableName,
    chain: &'static str,
    match_args: &'static str,
    comment: Option<&'static str>,
    target: &'static str,
) -> JumpRule {
    JumpRule {
        table,
        chain,
        match_args,
        comment,
        target,
    }
}

/// Upstream's list, in upstream's order; the order matters because each jump is inserted at the top of its
/// chain, so the last one listed ends up first.
const JUMPS: [JumpRule; 12] = {
    use TableName::{Filter, Nat};
    const EXTERNAL: Option<&str> = Some("kubernetes externally-visible service portals");
    const PORTALS: Option<&str> = Some("kubernetes service portals");
    const LB_FIREWALL: Option<&str> = Some("kubernetes load balancer firewall");
    [
        jump(Filter, "INPUT", NEW, EXTERNAL, KUBE_EXTERNAL_SERVICES),
        jump(Filter, "FORWARD", NEW, EXTERNAL, KUBE_EXTERNAL_SERVICES),
        jump(
            Filter,
            "INPUT",
            "",
            Some("kubernetes health check service ports"),
            KUBE_NODEPORTS,
        ),
        jump(Filter, "FORWARD", NEW, PORTALS, KUBE_SERVICES),
        jump(Filter, "OUTPUT", NEW, PORTALS, KUBE_SERVICES),
        jump(
            Filter,
            "FORWARD",
            "",
            Some("kubernetes forwarding rules"),
            KUBE_FORWARD,
        ),
        jump(Filter, "INPUT", NEW, LB_FIREWALL, KUBE_PROXY_FIREWALL),
        jump(Filter, "OUTPUT", NEW, LB_FIREWALL, KUBE_PROXY_FIREWALL),
        jump(Filter, "FORWARD", NEW, LB_FIREWALL, KUBE_PROXY_FIREWALL),
        jump(Nat, "OUTPUT", "", PORTALS, KUBE_SERVICES),
        jump(Nat, "PREROUTING", "", PORTALS, KUBE_SERVICES),
        jump(
            Nat,
            "POSTROUTING",
            "",
            Some("kubernetes postrouting rules"),
            KUBE_POSTROUTING,
        ),
    ]
};

/// Only needed with localhost NodePorts, whose anti-martian rule lives in `KUBE-FIREWALL`.
const FIREWALL_JUMPS: [JumpRule; 2] = [
    jump(TableName::Filter, "INPUT", "", None, KUBE_FIREWALL),
    jump(TableName::Filter, "OUTPUT", "", None, KUBE_FIREWALL),
];

/// Every jump the configuration needs, in upstream's declaration order.
pub fn jump_rules(cfg: &RenderConfig) -> Vec<JumpRule> {
    let mut out = JUMPS.to_vec();
    if cfg.localhost_node_ports_active() {
        out.extend(FIREWALL_JUMPS);
    }
    out
}

/// The jumps of [`jump_rules`] that `saved` lacks, in declaration order.
pub fn missing_jumps(saved: &SavedRuleset, cfg: &RenderConfig) -> Vec<JumpRule> {
    jump_rules(cfg)
        .into_iter()
        .filter(|j| !j.present_in(saved))
        .collect()
}

impl JumpRule {
    pub fn present_in(&self, saved: &SavedRuleset) -> bool {
        saved.tables.get(self.table.as_str()).is_some_and(|table| {
            table.rules.iter().any(|r| {
                r.chain == self.chain
                    && r.jump.as_deref() == Some(self.target)
                    && r.comment.as_deref() == self.comment
            })
        })
    }

    /// The payload line inserting this jump at the top of its chain. Emitting the missing jumps in
    /// declaration order therefore reproduces upstream's order on a clean host, where each was inserted at the
    /// top in turn.
    pub fn insert_line(&self) -> String {
        self.line(Line::insert_first(self.chain))
    }

    /// The same rule as `iptables-save` lists it once inserted: `-A CHAIN …`.
    pub fn append_line(&self) -> String {
        self.line(Line::append(self.chain))
    }

    fn line(&self, mut line: Line) -> String {
        if !self.match_args.is_empty() {
            line = line.args(self.match_args);
        }
        if let Some(comment) = self.comment {
            line = line.comment(comment);
        }
        line.jump(self.target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_line_shape() {
        assert_eq!(
            JUMPS[0].insert_line(),
            r#"-I INPUT 1 -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES"#
        );
        assert_eq!(
            JUMPS[11].insert_line(),
            r#"-I POSTROUTING 1 -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING"#
        );
        assert_eq!(FIREWALL_JUMPS[0].insert_line(), "-I INPUT 1 -j KUBE-FIREWALL");
    }

    #[test]
    fn firewall_jumps_only_with_localhost_node_ports() {
        let mut cfg = RenderConfig::default();
        assert_eq!(jump_rules(&cfg).len(), 12);
        cfg.localhost_node_ports = true;
        assert_eq!(jump_rules(&cfg).len(), 14);
    }
}
