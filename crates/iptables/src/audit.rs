//! The upgrade audit: what in a node's netfilter state will break the next proxy sync or the next upgrade,
//! read from `iptables-save` dumps of both iptables backends and the list of nftables tables.
//!
//! Every finding names the chain or rule, says why it is dangerous and spells the exact fix. The hazards are
//! the ones behind real outages: a chain of another version that still jumps to a service or endpoint chain
//! (the next deletion of that chain fails, and with it every transaction after), KUBE-* state in both iptables
//! backends or in iptables and nftables at once (packets meet both, and only one is maintained), and rule
//! shapes no current proxy writes, so none rewrites or removes them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use svcproxy_model::IpFamily;

use crate::chain_name::{
    KUBE_EXTERNAL_SERVICES, KUBE_FORWARD, KUBE_NODEPORTS, KUBE_PROXY_FIREWALL, KUBE_SERVICES, XLB_PREFIX,
    is_owned_service_chain,
};
use crate::save_parser::{SavedRule, SavedRuleset, SavedTable};
use crate::seal::SEAL_CHAIN;

/// Chains kubelet writes and keeps using; they say nothing about which proxy mode or backend is in use.
const KUBELET_CHAINS: [&str; 3] = ["KUBE-KUBELET-CANARY", "KUBE-IPTABLES-HINT", "KUBE-FIREWALL"];

/// Chains only a Service proxy writes (besides the per-service ones): their presence means a proxy in
/// iptables mode programmed this backend.
const PROXY_CHAINS: [&str; 6] = [
    KUBE_SERVICES,
    KUBE_NODEPORTS,
    KUBE_EXTERNAL_SERVICES,
    KUBE_FORWARD,
    KUBE_PROXY_FIREWALL,
    "KUBE-PROXY-CANARY",
];

/// nftables tables a Service proxy writes: upstream's nftables mode and ours.
pub const PROXY_NFT_TABLES: [&str; 2] = ["kube-proxy", "svcproxy"];

/// The chain old releases marked packets to drop with; kubelet owned it.
const MARK_DROP: &str = "KUBE-MARK-DROP";

/// Which iptables backend a dump came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IptablesBackend {
    Legacy,
    Nft,
    /// A dump read from a file: the backend is not known.
    Unknown,
}

impl IptablesBackend {
    pub fn name(self) -> &'static str {
        match self {
            IptablesBackend::Legacy => "legacy",
            IptablesBackend::Nft => "nf_tables",
            IptablesBackend::Unknown => "iptables",
        }
    }
}

/// One `iptables-save` of one backend and family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IptablesDump {
    pub backend: IptablesBackend,
    pub family: IpFamily,
    /// The command that edits this backend and family (`iptables-nft`, `ip6tables-legacy`, or `iptables`
    /// for a dump of unknown origin): the fixes are spelled with it so they act where the hazard is.
    pub command: String,
    pub saved: SavedRuleset,
}

impl IptablesDump {
    fn label(&self) -> String {
        match self.backend {
            IptablesBackend::Unknown => self.family.label().to_string(),
            b => format!("{} {}", b.name(), self.family.label()),
        }
    }
}

/// An nftables table (`nft list tables`: `table <family> <name>`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct NftTable {
    pub family: String,
    pub name: String,
}

/// Everything the audit reads from a node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeNetfilter {
    pub iptables: Vec<IptablesDump>,
    pub nft_tables: Vec<NftTable>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HazardKind {
    /// A per-service chain nothing reaches that still jumps to service or endpoint chains.
    OrphanReference,
    /// A rule jumping to a chain the table does not have.
    DanglingJump,
    /// KUBE-* state in both iptables backends of one family.
    SplitBackends,
    /// KUBE-* iptables chains and a proxy's nftables table at once.
    TwoModes,
    /// A chain or rule shape no current proxy writes.
    ObsoleteRule,
}

impl HazardKind {
    /// A short stable label for tools.
    pub fn label(self) -> &'static str {
        match self {
            HazardKind::OrphanReference => "orphan_reference",
            HazardKind::DanglingJump => "dangling_jump",
            HazardKind::SplitBackends => "split_backends",
            HazardKind::TwoModes => "two_modes",
            HazardKind::ObsoleteRule => "obsolete_rule",
        }
    }
}

/// One hazard: where, why it matters, and what to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hazard {
    pub kind: HazardKind,
    /// Where the hazard is, e.g. `nf_tables IPv4 nat/KUBE-XLB-…`.
    pub location: String,
    /// The offending rule as saved, when the hazard is one rule.
    pub rule: Option<String>,
    pub why: String,
    /// What removes the hazard, in words and commands.
    pub fix: String,
    /// The fix as shell commands to run in order, when it is that exact; empty when the fix takes a decision
    /// only the operator can make.
    pub commands: Vec<String>,
}

impl fmt::Display for Hazard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}] {}", self.kind.label(), self.location)?;
        if let Some(rule) = &self.rule {
            write!(f, "\n  rule: {rule}")?;
        }
        write!(f, "\n  why:  {}\n  fix:  {}", self.why, self.fix)
    }
}

/// Audits a node. Findings are ordered by kind, then location, so the same state always reads the same.
pub fn audit(node: &NodeNetfilter) -> Vec<Hazard> {
    let mut out = Vec::new();
    for dump in &node.iptables {
        for (table_name, table) in &dump.saved.tables {
            audit_table(dump, table_name, table, &mut out);
        }
    }
    split_backends(node, &mut out);
    two_modes(node, &mut out);
    out.sort_by(|a, b| (a.kind, &a.location, &a.rule).cmp(&(b.kind, &b.location, &b.rule)));
    out
}

/// User chains reachable from the table's built-in chains by jumps and gotos.
fn reachable(table: &SavedTable) -> BTreeSet<&str> {
    let mut edges: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for rule in &table.rules {
        if let Some(target) = rule.jump.as_deref() {
            edges.entry(rule.chain.as_str()).or_default().push(target);
        }
    }
    let mut seen: BTreeSet<&str> = BTreeSet::new();
    let mut stack: Vec<&str> = table
        .chains
        .iter()
        .filter(|(_, policy)| policy.is_some())
        .map(|(name, _)| name.as_str())
        .collect();
    while let Some(chain) = stack.pop() {
        if !seen.insert(chain) {
            continue;
        }
        stack.extend(edges.get(chain).into_iter().flatten().copied());
    }
    seen
}

/// Whether a `-j` target names a chain rather than a kernel target. Extension targets are single upper-case
/// words (`MASQUERADE`, `NFQUEUE`, `TCPMSS`); chain names that look like them cannot be told apart, but
/// anything with a dash or a lower-case letter is a chain.
fn looks_like_chain(target: &str) -> bool {
    target.starts_with("KUBE-") || target.bytes().any(|b| b == b'-' || b.is_ascii_lowercase())
}

/// Quotes one argument for a POSIX shell, so a fix can be pasted as printed.
pub fn shell_word(arg: &str) -> String {
    let safe = !arg.is_empty()
        && arg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:=,!+@%".contains(&b));
    if safe {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// `iptables -t TABLE -D CHAIN args…`, the deletion of one saved rule.
pub fn delete_rule_command(command: &str, table: &str, rule: &SavedRule) -> String {
    let args: Vec<String> = rule.args.iter().map(|a| shell_word(a)).collect();
    format!("{command} -t {table} -D {} {}", rule.chain, args.join(" "))
}

fn audit_table(dump: &IptablesDump, table_name: &str, table: &SavedTable, out: &mut Vec<Hazard>) {
    let cmd = dump.command.as_str();
    let at = |chain: &str| format!("{} {table_name}/{chain}", dump.label());
    let live = reachable(table);
    let orphans: BTreeSet<&str> = table
        .chains
        .iter()
        .filter(|(name, policy)| {
            policy.is_none() && is_owned_service_chain(name) && !live.contains(name.as_str())
        })
        .map(|(name, _)| name.as_str())
        .collect();
    let by_chain = table.rules_by_chain();

    // Orphans that still jump into per-service chains: the outage in waiting.
    let mut reported: BTreeSet<&str> = BTreeSet::new();
    for &chain in &orphans {
        let targets: BTreeSet<&str> = by_chain
            .get(chain)
            .into_iter()
            .flatten()
            .filter_map(|r| r.jump.as_deref())
            .filter(|t| is_owned_service_chain(t) && table.chains.contains_key(*t))
            .collect();
        if targets.is_empty() {
            continue;
        }
        reported.insert(chain);
        let commands = remove_chain_commands(cmd, table_name, table, chain, &orphans);
        let first = targets.iter().next().copied().unwrap_or_default();
        let origin = if chain.starts_with(XLB_PREFIX) {
            "KUBE-XLB- chains were written by kube-proxy 1.23 and older; current kube-proxy neither uses nor deletes them. "
        } else {
            ""
        };
        out.push(Hazard {
            kind: HazardKind::OrphanReference,
            location: at(chain),
            rule: None,
            why: format!(
                "{origin}No built-in chain reaches {chain}, so it carries no traffic, but it still jumps to {}. \
                 When the proxy next deletes {first} (its Service or endpoint goes away), iptables-restore refuses \
                 the whole transaction (\"Device or resource busy\") and no later Service change reaches this node.",
                targets.iter().copied().collect::<Vec<_>>().join(", ")
            ),
            fix: chain_fix_words(&commands),
            commands,
        });
    }

    for (name, policy) in &table.chains {
        if policy.is_some() || !name.starts_with(XLB_PREFIX) || reported.contains(name.as_str()) {
            continue;
        }
        let why = if live.contains(name.as_str()) {
            format!(
                "{name} is a kube-proxy 1.23 (or older) chain that traffic still passes through. No current proxy \
                 rewrites it, so it keeps sending externalTrafficPolicy=Local traffic to the endpoints it was \
                 written with, and current kube-proxy never deletes it."
            )
        } else {
            format!(
                "{name} is a kube-proxy 1.23 (or older) chain nothing reaches any more. Current kube-proxy never \
                 deletes it, and whatever it jumps to cannot be deleted while it exists."
            )
        };
        let commands = remove_chain_commands(cmd, table_name, table, name, &orphans);
        out.push(Hazard {
            kind: HazardKind::ObsoleteRule,
            location: at(name),
            rule: None,
            why,
            fix: chain_fix_words(&commands),
            commands,
        });
    }

    for rule in &table.rules {
        if let Some(target) = rule.jump.as_deref()
            && !table.chains.contains_key(target)
            && looks_like_chain(target)
        {
            out.push(Hazard {
                kind: HazardKind::DanglingJump,
                location: at(&rule.chain),
                rule: Some(rule.line.clone()),
                why: format!(
                    "The rule jumps to {target}, which table {table_name} does not have. The kernel never holds \
                     such a rule, so this state cannot be restored: `iptables-restore` of a dump containing it \
                     (a reboot script, a backup, a migration) fails as a whole."
                ),
                fix: delete_rule_command(cmd, table_name, rule),
                commands: vec![delete_rule_command(cmd, table_name, rule)],
            });
        }
        if rule.chain.starts_with(XLB_PREFIX) {
            // Reported with its chain above.
            continue;
        }
        if rule.jump.as_deref() == Some(MARK_DROP) {
            out.push(Hazard {
                kind: HazardKind::ObsoleteRule,
                location: at(&rule.chain),
                rule: Some(rule.line.clone()),
                why: format!(
                    "Current kube-proxy no longer uses {MARK_DROP}, and current kubelet neither creates that chain \
                     nor the filter rule that drops packets so marked. Once that rule is gone, packets this rule \
                     means to drop are delivered (a loadBalancerSourceRanges firewall stops filtering), and a proxy \
                     that still expects the chain fails its sync when kubelet stops recreating it."
                ),
                fix: delete_rule_command(cmd, table_name, rule),
                commands: vec![delete_rule_command(cmd, table_name, rule)],
            });
        } else if rule.args.windows(2).any(|w| w[0] == "-m" && w[1] == "physdev")
            && (rule.chain.starts_with("KUBE-")
                || rule.jump.as_deref().is_some_and(|j| j.starts_with("KUBE-")))
        {
            out.push(Hazard {
                kind: HazardKind::ObsoleteRule,
                location: at(&rule.chain),
                rule: Some(rule.line.clone()),
                why: "A physdev match in a Service rule is a shape only very old proxies wrote: no current proxy \
                      rewrites or deletes it, and what it matches depends on whether br_netfilter is loaded, so its \
                      effect changes with a module load."
                    .to_string(),
                fix: delete_rule_command(cmd, table_name, rule),
                commands: vec![delete_rule_command(cmd, table_name, rule)],
            });
        }
    }
}

fn chain_fix_words(commands: &[String]) -> String {
    format!(
        "{} (or run `svcproxy cleanup`, which removes every KUBE-* leftover)",
        commands.join("; ")
    )
}

/// Commands that delete `chain`: references to it go first (flushing a referring orphan, deleting any other
/// referring rule), then the chain is flushed and deleted.
fn remove_chain_commands(
    cmd: &str,
    table_name: &str,
    table: &SavedTable,
    chain: &str,
    orphans: &BTreeSet<&str>,
) -> Vec<String> {
    let mut steps = Vec::new();
    let mut flushed = BTreeSet::new();
    for rule in table
        .rules
        .iter()
        .filter(|r| r.jump.as_deref() == Some(chain) && r.chain != chain)
    {
        if orphans.contains(rule.chain.as_str()) || rule.chain.starts_with(XLB_PREFIX) {
            if flushed.insert(rule.chain.as_str()) {
                steps.push(format!("{cmd} -t {table_name} -F {}", rule.chain));
            }
        } else {
            steps.push(delete_rule_command(cmd, table_name, rule));
        }
    }
    steps.push(format!("{cmd} -t {table_name} -F {chain}"));
    steps.push(format!("{cmd} -t {table_name} -X {chain}"));
    steps
}

/// KUBE-* chains a proxy (not kubelet) left in a dump, as `table/chain`.
pub fn proxy_state(saved: &SavedRuleset) -> Vec<String> {
    let mut out = Vec::new();
    for (table_name, table) in &saved.tables {
        for (name, policy) in &table.chains {
            if policy.is_none() && name.starts_with("KUBE-") && !KUBELET_CHAINS.contains(&name.as_str()) {
                out.push(format!("{table_name}/{name}"));
            }
        }
    }
    out
}

/// Whether a proxy in iptables mode programmed this dump (kubelet's chains and `KUBE-MARK-*` do not count:
/// old kubelets wrote those too).
fn iptables_mode_state(saved: &SavedRuleset) -> Vec<String> {
    let mut out = Vec::new();
    for (table_name, table) in &saved.tables {
        for name in table.chains.keys() {
            if PROXY_CHAINS.contains(&name.as_str()) || is_owned_service_chain(name) {
                out.push(format!("{table_name}/{name}"));
            }
        }
    }
    out
}

fn summary(items: &[String]) -> String {
    let shown: Vec<&str> = items.iter().take(3).map(String::as_str).collect();
    match items.len().saturating_sub(shown.len()) {
        0 => shown.join(", "),
        more => format!("{} and {more} more", shown.join(", ")),
    }
}

fn split_backends(node: &NodeNetfilter, out: &mut Vec<Hazard>) {
    for family in [IpFamily::V4, IpFamily::V6] {
        let state = |backend: IptablesBackend| -> Vec<String> {
            node.iptables
                .iter()
                .filter(|d| d.backend == backend && d.family == family)
                .flat_map(|d| proxy_state(&d.saved))
                .collect()
        };
        let (legacy, nft) = (state(IptablesBackend::Legacy), state(IptablesBackend::Nft));
        if legacy.is_empty() || nft.is_empty() {
            continue;
        }
        let writers = |backend: IptablesBackend, name: &str| -> Option<String> {
            let seen: Vec<&str> = node
                .iptables
                .iter()
                .filter(|d| d.backend == backend && d.family == family)
                .flat_map(|d| writers_seen(&d.saved))
                .collect();
            (!seen.is_empty()).then(|| format!(" {name}: {}.", seen.join(", ")))
        };
        let writers: String = [
            writers(IptablesBackend::Legacy, "legacy"),
            writers(IptablesBackend::Nft, "nf_tables"),
        ]
        .into_iter()
        .flatten()
        .collect();
        let writers = if writers.is_empty() {
            writers
        } else {
            format!(" Marks of who wrote each side:{writers}")
        };
        out.push(Hazard {
            kind: HazardKind::SplitBackends,
            location: format!("{} legacy and nf_tables", family.label()),
            rule: None,
            why: format!(
                "Both iptables backends hold KUBE-* chains (legacy: {}; nf_tables: {}). Packets pass through both, \
                 but a proxy maintains only the backend its iptables binary uses: the other side keeps redirecting \
                 traffic to endpoints that may be gone, where that proxy can neither see nor repair it.{writers}",
                summary(&legacy),
                summary(&nft)
            ),
            fix: "Make every component on the node (proxy, kubelet, CNI) use one backend, then run `svcproxy \
                  cleanup`: it removes KUBE-* state from both backends, and the running proxy writes its own rules \
                  again at its next sync."
                .to_string(),
            commands: Vec::new(),
        });
    }
}

/// The programs whose marks a dump carries: svcproxy's seal (it writes one only with iptables-nft), upstream
/// kube-proxy's canary (iptables mode writes one in mangle, nat and filter, and leaves it when it stops), and
/// kubelet's marker chains, which tell which backend kubelet (and a proxy that follows it) uses.
fn writers_seen(saved: &SavedRuleset) -> Vec<&'static str> {
    let has = |chain: &str| saved.tables.values().any(|t| t.chains.contains_key(chain));
    let mut seen = Vec::new();
    if has(SEAL_CHAIN) {
        seen.push("svcproxy (its SVCPROXY-SEAL chain)");
    }
    if has("KUBE-PROXY-CANARY") {
        seen.push("kube-proxy (its KUBE-PROXY-CANARY chain)");
    }
    if has("KUBE-IPTABLES-HINT") || has("KUBE-KUBELET-CANARY") {
        seen.push("kubelet (its marker chains)");
    }
    seen
}

fn two_modes(node: &NodeNetfilter, out: &mut Vec<Hazard>) {
    let chains: Vec<String> = node
        .iptables
        .iter()
        .flat_map(|d| {
            iptables_mode_state(&d.saved)
                .into_iter()
                .map(move |c| format!("{} {c}", d.label()))
        })
        .collect();
    if chains.is_empty() {
        return;
    }
    for table in node
        .nft_tables
        .iter()
        .filter(|t| PROXY_NFT_TABLES.contains(&t.name.as_str()))
    {
        out.push(Hazard {
            kind: HazardKind::TwoModes,
            location: format!("nftables table {} {}", table.family, table.name),
            rule: None,
            why: format!(
                "A proxy's nftables table and iptables-mode chains ({}) exist at once. Both rewrite Service traffic; \
                 whichever hook runs first wins, and the mode no longer running keeps sending connections to \
                 endpoints frozen at the time it stopped.",
                summary(&chains)
            ),
            fix: format!(
                "If the node runs the proxy in iptables mode: `nft delete table {} {}`. If it runs in nftables \
                 mode: stop the proxy, run `svcproxy cleanup`, and start the proxy again (it recreates its table).",
                table.family, table.name
            ),
            commands: Vec::new(),
        });
    }
}

/// Reads `nft list tables` output.
pub fn parse_nft_tables(listing: &str) -> Vec<NftTable> {
    listing
        .lines()
        .filter_map(
            |line| match line.split_whitespace().collect::<Vec<_>>().as_slice() {
                ["table", family, name] => Some(NftTable {
                    family: family.to_string(),
                    name: name.to_string(),
                }),
                _ => None,
            },
        )
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::save_parser::parse_save;

    fn dump(text: &str) -> NodeNetfilter {
        NodeNetfilter {
            iptables: vec![IptablesDump {
                backend: IptablesBackend::Nft,
                family: IpFamily::V4,
                command: "iptables".into(),
                saved: parse_save(text).unwrap(),
            }],
            nft_tables: Vec::new(),
        }
    }

    #[test]
    fn orphan_with_references_names_the_fix_in_order() {
        let node = dump(
            "*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-AAAAAAAAAAAAAAAA - [0:0]\n\
             :KUBE-SEP-BBBBBBBBBBBBBBBB - [0:0]\n:KUBE-EXT-CCCCCCCCCCCCCCCC - [0:0]\n:KUBE-FW-CCCCCCCCCCCCCCCC - [0:0]\n\
             -A PREROUTING -j KUBE-SERVICES\n-A KUBE-SERVICES -j KUBE-SVC-AAAAAAAAAAAAAAAA\n\
             -A KUBE-SVC-AAAAAAAAAAAAAAAA -j KUBE-SEP-BBBBBBBBBBBBBBBB\n\
             -A KUBE-FW-CCCCCCCCCCCCCCCC -j KUBE-EXT-CCCCCCCCCCCCCCCC\n\
             -A KUBE-EXT-CCCCCCCCCCCCCCCC -m comment --comment \"a b\" -j KUBE-SVC-AAAAAAAAAAAAAAAA\nCOMMIT\n",
        );
        let found = audit(&node);
        let kinds: Vec<(&str, &str)> = found
            .iter()
            .map(|h| (h.kind.label(), h.location.as_str()))
            .collect();
        assert_eq!(
            kinds,
            [
                ("orphan_reference", "nf_tables IPv4 nat/KUBE-EXT-CCCCCCCCCCCCCCCC"),
                ("orphan_reference", "nf_tables IPv4 nat/KUBE-FW-CCCCCCCCCCCCCCCC"),
            ]
        );
        assert!(
            found[0].fix.starts_with(
                "iptables -t nat -F KUBE-FW-CCCCCCCCCCCCCCCC; iptables -t nat -F KUBE-EXT-CCCCCCCCCCCCCCCC; \
                 iptables -t nat -X KUBE-EXT-CCCCCCCCCCCCCCCC"
            ),
            "{}",
            found[0].fix
        );
    }

    #[test]
    fn shell_words() {
        assert_eq!(shell_word("KUBE-SVC-X"), "KUBE-SVC-X");
        assert_eq!(shell_word("10.0.0.1/32"), "10.0.0.1/32");
        assert_eq!(shell_word("a b"), "'a b'");
        assert_eq!(shell_word("it's"), r"'it'\''s'");
        assert_eq!(shell_word(""), "''");
    }

    #[test]
    fn nft_tables_listing() {
        assert_eq!(
            parse_nft_tables("table ip filter\ntable ip6 kube-proxy\n\n"),
            [
                NftTable {
                    family: "ip".into(),
                    name: "filter".into()
                },
                NftTable {
                    family: "ip6".into(),
                    name: "kube-proxy".into()
                }
            ]
        );
    }
}
