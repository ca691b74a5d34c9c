//! `svcproxy diff`: the kernel's iptables rules against what svcproxy renders from the intent, per service
//! port — chains missing, chains left over, rules missing or added, and missing jumps from the built-in
//! chains. Rules are compared in a spelling-independent form, since `iptables-save` respells what was written.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use svcproxy_iptables::canonical::canonical_rule;
use svcproxy_iptables::config::RenderConfig;
use svcproxy_iptables::is_owned_service_chain;
use svcproxy_iptables::jumps::missing_jumps;
use svcproxy_iptables::ruleset::{Ruleset, TableName};
use svcproxy_iptables::save_parser::{SavedRule, SavedRuleset, tokenize};

use crate::cli::DiffArgs;
use crate::explain::{LoadError, load_expected, read_kernel};
use crate::node_addresses::{LocalAddresses, SystemAddresses};
use crate::status::{DaemonError, daemon_get};

#[derive(Debug, thiserror::Error)]
pub enum DiffError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error("svcproxy's answer is not a diff: {0}")]
    Answer(serde_json::Error),
}

/// `svcproxy diff`: the live rules against the intent read here, or the daemon's own comparison with
/// `--daemon`. `args.run` must already carry the daemon's settings.
pub async fn command(args: &DiffArgs) -> Result<DiffReport, DiffError> {
    if let Some(url) = &args.daemon {
        let body = daemon_get(url, "/debug/diff")?;
        return serde_json::from_str(&body).map_err(DiffError::Answer);
    }
    let kernel = read_kernel(&["filter", "nat"])?;
    let expected = load_expected(&args.run, &SystemAddresses.addresses()).await?;
    Ok(diff(
        &kernel,
        &expected.ruleset,
        &expected.config,
        expected.intent.service_ports.len(),
    ))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChainStatus {
    /// The intent has the chain; the kernel does not.
    Missing,
    /// A per-service chain in the kernel that the intent does not have (a leftover).
    Extra,
    /// Both have it, with different rules (or the same rules in another order).
    Different,
}

/// How one chain differs. For chains shared by every service (`KUBE-SERVICES`, …) one entry per service
/// port whose rules differ, holding only those rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainDiff {
    pub table: String,
    pub chain: String,
    pub status: ChainStatus,
    /// Rules the intent has and the kernel lacks, as svcproxy writes them.
    pub missing_rules: Vec<String>,
    /// Rules the kernel has and the intent does not, as `iptables-save` prints them.
    pub extra_rules: Vec<String>,
    /// The same rules, in another order (order decides which rule matches first).
    pub reordered: bool,
}

impl ChainDiff {
    pub fn label(&self) -> String {
        format!("{}/{}", self.table, self.chain)
    }

    /// One line: what is wrong with the chain.
    pub fn summary(&self) -> String {
        let count = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
        match self.status {
            ChainStatus::Missing => format!(
                "missing from the kernel ({})",
                count(self.missing_rules.len(), "rule")
            ),
            ChainStatus::Extra => format!(
                "not in the intent: a leftover ({})",
                count(self.extra_rules.len(), "rule")
            ),
            ChainStatus::Different => {
                let mut parts = Vec::new();
                if !self.missing_rules.is_empty() {
                    parts.push(format!("{} missing", count(self.missing_rules.len(), "rule")));
                }
                if !self.extra_rules.is_empty() {
                    parts.push(format!(
                        "{} not in the intent",
                        count(self.extra_rules.len(), "rule")
                    ));
                }
                if self.reordered {
                    parts.push("rules in another order".to_string());
                }
                parts.join(", ")
            }
        }
    }
}

/// A jump from a built-in chain into ours that the kernel lacks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MissingJump {
    pub table: String,
    pub chain: String,
    pub target: String,
    /// The rule as svcproxy writes it.
    pub rule: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePortDiff {
    /// `namespace/name:port`, as rule comments spell it.
    pub name: String,
    pub chains: Vec<ChainDiff>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffReport {
    pub equal: bool,
    /// Service ports in the intent.
    pub service_ports_checked: usize,
    /// Chains in the intent.
    pub chains_checked: usize,
    pub service_ports: Vec<ServicePortDiff>,
    /// Differences in rules that belong to no single service port.
    pub shared: Vec<ChainDiff>,
    pub missing_jumps: Vec<MissingJump>,
}

/// The service port a rule belongs to, from the first word of its comment (`ns/name:port …`).
fn rule_service(args: &[String]) -> Option<String> {
    let pos = args.iter().position(|a| a == "--comment")?;
    let first = args.get(pos + 1)?.split_whitespace().next()?;
    first.contains('/').then(|| first.to_string())
}

fn line_args(line: &str) -> Vec<String> {
    tokenize(line)
        .map(|mut words| words.split_off(2.min(words.len())))
        .unwrap_or_default()
}

/// Rule differences of one chain: what `expected` (rendered lines) has that `found` lacks and the reverse,
/// as multisets of spelling-independent rules, plus whether the common rules come in another order.
fn compare_rules(expected: &[String], found: &[&SavedRule]) -> (Vec<String>, Vec<String>, bool) {
    let wanted: Vec<(Vec<String>, &String)> = expected
        .iter()
        .map(|l| (canonical_rule(&line_args(l)), l))
        .collect();
    let got: Vec<(Vec<String>, &SavedRule)> = found.iter().map(|r| (canonical_rule(&r.args), *r)).collect();
    let mut available: HashMap<&[String], usize> = HashMap::new();
    for (c, _) in &got {
        *available.entry(c.as_slice()).or_default() += 1;
    }
    let mut missing = Vec::new();
    let mut common_wanted = Vec::new();
    for (c, line) in &wanted {
        match available.get_mut(c.as_slice()) {
            Some(n) if *n > 0 => {
                *n -= 1;
                common_wanted.push(c.clone());
            }
            _ => missing.push((*line).clone()),
        }
    }
    let mut needed: HashMap<&[String], usize> = HashMap::new();
    for c in &common_wanted {
        *needed.entry(c.as_slice()).or_default() += 1;
    }
    let mut extra = Vec::new();
    let mut common_got = Vec::new();
    for (c, rule) in &got {
        match needed.get_mut(c.as_slice()) {
            Some(n) if *n > 0 => {
                *n -= 1;
                common_got.push(c.clone());
            }
            _ => extra.push(rule.line.clone()),
        }
    }
    (missing, extra, common_wanted != common_got)
}

/// Every chain difference between the kernel and `expected`, limited to `only` (table, chain) when given.
pub fn chain_diffs(
    kernel: &SavedRuleset,
    expected: &Ruleset,
    only: Option<&BTreeSet<(String, String)>>,
) -> Vec<ChainDiff> {
    let selected =
        |table: &str, chain: &str| only.is_none_or(|o| o.contains(&(table.to_string(), chain.to_string())));
    let mut out = Vec::new();
    for table in TableName::ALL {
        let t = table.as_str();
        let ours = expected.table(table);
        let theirs = kernel.table(t);
        let by_chain = theirs.map(|x| x.rules_by_chain()).unwrap_or_default();
        for (name, chain) in &ours.chains {
            if !selected(t, name) {
                continue;
            }
            if !theirs.is_some_and(|x| x.chains.contains_key(&**name)) {
                out.push(ChainDiff {
                    table: t.to_string(),
                    chain: name.to_string(),
                    status: ChainStatus::Missing,
                    missing_rules: chain.lines().to_vec(),
                    extra_rules: Vec::new(),
                    reordered: false,
                });
                continue;
            }
            let found = by_chain.get(&**name).map(Vec::as_slice).unwrap_or_default();
            let (missing_rules, extra_rules, reordered) = compare_rules(chain.lines(), found);
            if !missing_rules.is_empty() || !extra_rules.is_empty() || reordered {
                out.push(ChainDiff {
                    table: t.to_string(),
                    chain: name.to_string(),
                    status: ChainStatus::Different,
                    missing_rules,
                    extra_rules,
                    reordered,
                });
            }
        }
        if let Some(theirs) = theirs {
            for name in theirs.chains.keys() {
                if is_owned_service_chain(name)
                    && !ours.chains.contains_key(name.as_str())
                    && selected(t, name)
                {
                    out.push(ChainDiff {
                        table: t.to_string(),
                        chain: name.clone(),
                        status: ChainStatus::Extra,
                        missing_rules: Vec::new(),
                        extra_rules: by_chain
                            .get(name.as_str())
                            .into_iter()
                            .flatten()
                            .map(|r| r.line.clone())
                            .collect(),
                        reordered: false,
                    });
                }
            }
        }
    }
    out
}

/// Splits a chain's difference by the service port each rule belongs to (`None`: no single one). A chain
/// missing or left over as a whole goes to the service its rules name.
fn by_service(diff: ChainDiff) -> Vec<(Option<String>, ChainDiff)> {
    let service_of = |line: &String| rule_service(&line_args(line));
    if diff.status != ChainStatus::Different {
        let owner = diff
            .missing_rules
            .iter()
            .chain(&diff.extra_rules)
            .find_map(service_of);
        return vec![(owner, diff)];
    }
    let mut parts: BTreeMap<Option<String>, ChainDiff> = BTreeMap::new();
    let empty = |d: &ChainDiff| ChainDiff {
        missing_rules: Vec::new(),
        extra_rules: Vec::new(),
        reordered: false,
        ..d.clone()
    };
    for line in &diff.missing_rules {
        parts
            .entry(service_of(line))
            .or_insert_with(|| empty(&diff))
            .missing_rules
            .push(line.clone());
    }
    for line in &diff.extra_rules {
        parts
            .entry(service_of(line))
            .or_insert_with(|| empty(&diff))
            .extra_rules
            .push(line.clone());
    }
    if diff.reordered {
        parts.entry(None).or_insert_with(|| empty(&diff)).reordered = true;
    }
    parts.into_iter().collect()
}

/// The whole comparison.
/// `intent_service_ports` is how many service ports the intent holds (for the summary line).
pub fn diff(
    kernel: &SavedRuleset,
    expected: &Ruleset,
    cfg: &RenderConfig,
    intent_service_ports: usize,
) -> DiffReport {
    let mut per_service: BTreeMap<String, Vec<ChainDiff>> = BTreeMap::new();
    let mut shared = Vec::new();
    for d in chain_diffs(kernel, expected, None) {
        for (owner, part) in by_service(d) {
            match owner {
                Some(name) => per_service.entry(name).or_default().push(part),
                None => shared.push(part),
            }
        }
    }
    let missing_jumps: Vec<MissingJump> = missing_jumps(kernel, cfg)
        .into_iter()
        .map(|j| MissingJump {
            table: j.table.as_str().to_string(),
            chain: j.chain.to_string(),
            target: j.target.to_string(),
            rule: j.append_line(),
        })
        .collect();
    let service_ports: Vec<ServicePortDiff> = per_service
        .into_iter()
        .map(|(name, chains)| ServicePortDiff { name, chains })
        .collect();
    DiffReport {
        equal: service_ports.is_empty() && shared.is_empty() && missing_jumps.is_empty(),
        service_ports_checked: intent_service_ports,
        chains_checked: expected.filter.chains.len() + expected.nat.chains.len(),
        service_ports,
        shared,
        missing_jumps,
    }
}

fn write_chain(out: &mut String, d: &ChainDiff) {
    let _ = writeln!(out, "  {}: {}", d.label(), d.summary());
    for rule in &d.missing_rules {
        let _ = writeln!(out, "    - {rule}");
    }
    for rule in &d.extra_rules {
        let _ = writeln!(out, "    + {rule}");
    }
}

/// The human form: one block per service port that differs, `-` for rules the kernel lacks, `+` for rules
/// it has that the intent does not.
pub fn render_text(report: &DiffReport) -> String {
    let mut out = String::new();
    for sp in &report.service_ports {
        let _ = writeln!(out, "{}", sp.name);
        for d in &sp.chains {
            write_chain(&mut out, d);
        }
    }
    if !report.shared.is_empty() {
        let _ = writeln!(out, "rules of no single service port");
        for d in &report.shared {
            write_chain(&mut out, d);
        }
    }
    if !report.missing_jumps.is_empty() {
        let _ = writeln!(out, "jumps from built-in chains");
        for j in &report.missing_jumps {
            let _ = writeln!(out, "  {}/{}: no jump to {}", j.table, j.chain, j.target);
            let _ = writeln!(out, "    - {}", j.rule);
        }
    }
    let n = |count: usize, what: &str| format!("{count} {what}{}", if count == 1 { "" } else { "s" });
    let checked = format!(
        "{}, {}",
        n(report.service_ports_checked, "service port"),
        n(report.chains_checked, "chain")
    );
    if report.equal {
        let _ = writeln!(out, "The kernel matches the intent ({checked}).");
    } else {
        let chains: usize =
            report.service_ports.iter().map(|s| s.chains.len()).sum::<usize>() + report.shared.len();
        let _ = writeln!(
            out,
            "The kernel differs from the intent ({checked} checked): {} {}, {} missing.",
            n(chains, "chain"),
            if chains == 1 { "differs" } else { "differ" },
            n(report.missing_jumps.len(), "jump")
        );
        let _ = writeln!(
            out,
            "svcproxy rewrites what differs at its next full sync (within --verify-period when it runs); `svcproxy explain` shows what a packet meets."
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use svcproxy_iptables::save_parser::parse_save;
    use svcproxy_iptables::{jump_rules, saved_view};

    fn ruleset() -> Ruleset {
        let mut r = Ruleset::default();
        r.nat.chains.insert(
            "KUBE-SERVICES".into(),
            svcproxy_iptables::Chain::new(vec![
                r#"-A KUBE-SERVICES -m comment --comment "demo/web:http cluster IP" -d 10.96.0.100 -j KUBE-SVC-XRY76EGRC3BSCIIJ"#.into(),
            ]),
        );
        r.nat.chains.insert(
            "KUBE-SVC-XRY76EGRC3BSCIIJ".into(),
            svcproxy_iptables::Chain::new(vec![
                r#"-A KUBE-SVC-XRY76EGRC3BSCIIJ -m comment --comment "demo/web:http -> 10.244.0.11:8080" -j KUBE-SEP-NW5VICAF3Z2QABHQ"#.into(),
            ]),
        );
        r.nat.chains.insert(
            "KUBE-SEP-NW5VICAF3Z2QABHQ".into(),
            svcproxy_iptables::Chain::new(vec![
                r#"-A KUBE-SEP-NW5VICAF3Z2QABHQ -p tcp -m comment --comment "demo/web:http" -j DNAT --to-destination 10.244.0.11:8080"#.into(),
            ]),
        );
        r
    }

    #[test]
    fn equal_when_the_kernel_holds_what_we_render() {
        let cfg = RenderConfig::default();
        let expected = ruleset();
        let kernel = saved_view(&expected, &jump_rules(&cfg)).unwrap();
        let report = diff(&kernel, &expected, &cfg, 1);
        assert!(report.equal, "{report:#?}");
        assert!(render_text(&report).contains("The kernel matches the intent (1 service port, 3 chains)."));
    }

    #[test]
    fn attributes_differences_to_service_ports() {
        let cfg = RenderConfig::default();
        let expected = ruleset();
        let mut text = String::from("*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n");
        text.push_str(":KUBE-SVC-XRY76EGRC3BSCIIJ - [0:0]\n:KUBE-SEP-NW5VICAF3Z2QABHQ - [0:0]\n:KUBE-SEP-AAAAAAAAAAAAAAAA - [0:0]\n");
        text.push_str("-A KUBE-SERVICES -d 10.96.0.100/32 -m comment --comment \"demo/web:http cluster IP\" -j KUBE-SVC-XRY76EGRC3BSCIIJ\n");
        text.push_str("-A KUBE-SERVICES -d 10.96.0.100/32 -j RETURN\n");
        text.push_str("-A KUBE-SVC-XRY76EGRC3BSCIIJ -m comment --comment \"demo/web:http -> 10.244.0.11:8080\" -j KUBE-SEP-NW5VICAF3Z2QABHQ\n");
        text.push_str("-A KUBE-SEP-AAAAAAAAAAAAAAAA -m comment --comment \"old/gone:http\" -j DNAT --to-destination 10.244.9.9:80\n");
        text.push_str("COMMIT\n");
        let kernel = parse_save(&text).unwrap();
        let report = diff(&kernel, &expected, &cfg, 1);
        assert!(!report.equal);
        let names: Vec<&str> = report.service_ports.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["demo/web:http", "old/gone:http"]);
        let web = &report.service_ports[0].chains;
        assert_eq!(web.len(), 1);
        assert_eq!(web[0].chain, "KUBE-SEP-NW5VICAF3Z2QABHQ");
        assert_eq!(web[0].missing_rules.len(), 1);
        assert_eq!(report.service_ports[1].chains[0].status, ChainStatus::Extra);
        assert_eq!(report.shared.len(), 1);
        assert_eq!(
            report.shared[0].extra_rules,
            ["-A KUBE-SERVICES -d 10.96.0.100/32 -j RETURN"]
        );
        // The filter table and every built-in jump are absent.
        assert!(
            report
                .missing_jumps
                .iter()
                .any(|j| j.chain == "PREROUTING" && j.target == "KUBE-SERVICES")
        );
    }
}
