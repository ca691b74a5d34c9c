//! Our rendered ruleset as the kernel would hold it on a host where nothing else wrote rules, in the shape
//! `iptables-save` reports: so whatever reads dumps (the tracer above all) reads our rules the same way.
//!
//! The rule lines are ours verbatim; `iptables-save` would respell them, which is why consumers must not depend
//! on spelling. The jumps from the built-in chains land where `iptables-restore` puts them: each is inserted at
//! the top of its chain in turn, so a chain lists its jumps in reverse declaration order.

use std::fmt::Write as _;

use crate::jumps::JumpRule;
use crate::ruleset::{Ruleset, TableName};
use crate::save_parser::{SaveParseError, SavedRuleset, parse_save};

/// The built-in chains of the tables we write, in the order `iptables-save` lists them.
fn builtin_chains(table: TableName) -> &'static [&'static str] {
    match table {
        TableName::Filter => &["INPUT", "FORWARD", "OUTPUT"],
        TableName::Nat => &["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"],
    }
}

/// `ruleset` plus `jumps` (normally [`crate::jump_rules`] of the same configuration) as a dump would show
/// them, with every built-in chain's policy ACCEPT.
///
/// Fails only if a rendered line is not valid restore input, which would be a renderer bug.
pub fn saved_view(ruleset: &Ruleset, jumps: &[JumpRule]) -> Result<SavedRuleset, SaveParseError> {
    let mut text = String::new();
    for name in TableName::ALL {
        let table = ruleset.table(name);
        let _ = writeln!(text, "*{name}");
        for chain in builtin_chains(name) {
            let _ = writeln!(text, ":{chain} ACCEPT [0:0]");
        }
        for chain in table.chains.keys() {
            let _ = writeln!(text, ":{chain} - [0:0]");
        }
        for chain in builtin_chains(name) {
            for jump in jumps
                .iter()
                .rev()
                .filter(|j| j.table == name && j.chain == *chain)
            {
                let _ = writeln!(text, "{}", jump.append_line());
            }
        }
        for (chain, rules) in &table.chains {
            for line in rules.lines_in(chain) {
                let _ = writeln!(text, "{line}");
            }
        }
        text.push_str("COMMIT\n");
    }
    parse_save(&text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RenderConfig;
    use crate::jumps::jump_rules;
    use crate::ruleset::Chain;

    #[test]
    fn jumps_come_first_in_reverse_and_rules_verbatim() {
        let cfg = RenderConfig::default();
        let mut ruleset = Ruleset::default();
        ruleset.nat.chains.insert(
            "KUBE-SERVICES".into(),
            Chain::new(
                "KUBE-SERVICES",
                vec![r#"-A KUBE-SERVICES -m comment --comment "a b" -j KUBE-NODEPORTS"#],
            ),
        );
        ruleset
            .nat
            .chains
            .insert("KUBE-NODEPORTS".into(), Chain::default());
        let saved = saved_view(&ruleset, &jump_rules(&cfg)).unwrap();
        let nat = saved.table("nat").unwrap();
        assert_eq!(nat.chains.get("PREROUTING"), Some(&Some("ACCEPT".into())));
        assert_eq!(nat.chains.get("KUBE-NODEPORTS"), Some(&None));
        let jumps: Vec<&str> = nat.rules_of("PREROUTING").map(|r| r.line.as_str()).collect();
        assert_eq!(
            jumps,
            [r#"-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES"#]
        );
        let filter = saved.table("filter").unwrap();
        let forward: Vec<Option<&str>> = filter.rules_of("FORWARD").map(|r| r.jump.as_deref()).collect();
        // Declared order is EXTERNAL-SERVICES, SERVICES, FORWARD, PROXY-FIREWALL; each went in at the top.
        assert_eq!(
            forward,
            [
                Some("KUBE-PROXY-FIREWALL"),
                Some("KUBE-FORWARD"),
                Some("KUBE-SERVICES"),
                Some("KUBE-EXTERNAL-SERVICES")
            ]
        );
        assert_eq!(
            nat.rules_of("KUBE-SERVICES").next().unwrap().comment.as_deref(),
            Some("a b")
        );
    }
}
