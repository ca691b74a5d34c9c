//! `svcproxy diff`: the kernel's iptables rules against what svcproxy renders from the intent, per service
//! port — chains missing, chains left over, rules missing or added, and missing jumps from the built-in
//! chains. Rules are compared in a spelling-independent form, since `iptables-save` respells what was written.
//!
//! In nftables mode the kernel's side is our table (`nft list table ip svcproxy`); chains are compared rule
//! by rule and maps and sets element by element (nft prints both the way svcproxy writes them), and the
//! report carries the transaction that repairs the table, as the daemon's read-back would compute it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use svcproxy_iptables::canonical::canonical_rule;
use svcproxy_iptables::config::RenderConfig;
use svcproxy_iptables::is_owned_service_chain;
use svcproxy_iptables::jumps::missing_jumps;
use svcproxy_iptables::ruleset::{Ruleset, TableName};
use svcproxy_iptables::save_parser::{SavedRule, SavedRuleset, tokenize};
use svcproxy_model::IpFamily;
use svcproxy_nftables::names::owner_of_object;
use svcproxy_nftables::{
    Chain as NftChain, Element, Ruleset as NftRuleset, Set as NftSet, full_transaction, partial_transaction,
};

use crate::cli::DiffArgs;
use crate::explain::{KernelRead, LoadError, Rendering, load_expected};
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
    let backend = crate::backends::for_args(&args.run, &crate::exec::runner::SystemRunner);
    let kernel = KernelRead::read(args.run.proxy_mode, backend, &["filter", "nat"], IpFamily::V4)?;
    let mut expected = load_expected(&args.run, &SystemAddresses.addresses(), IpFamily::V4).await?;
    expected.align_with(&kernel);
    Ok(compare(
        &kernel,
        &expected.rendering,
        &expected.config,
        expected.intent.service_ports.len(),
    ))
}

/// The kernel against the rendering, for whichever backend both belong to.
pub fn compare(
    kernel: &KernelRead,
    rendering: &Rendering,
    cfg: &RenderConfig,
    intent_service_ports: usize,
) -> DiffReport {
    match (kernel, rendering) {
        (KernelRead::Iptables(saved), Rendering::Iptables(ours)) => {
            diff(saved, ours, cfg, intent_service_ports)
        }
        (KernelRead::Nftables(table), Rendering::Nftables(ours)) => {
            nft_diff(table.as_ref(), ours, intent_service_ports)
        }
        // The commands read the backend they render for; a mix would compare unrelated things.
        _ => DiffReport {
            equal: false,
            service_ports_checked: intent_service_ports,
            chains_checked: 0,
            service_ports: Vec::new(),
            shared: Vec::new(),
            missing_jumps: Vec::new(),
            nft_table: None,
            services: Vec::new(),
            repair: Vec::new(),
            note: Some("the kernel was read for another backend than the intent was rendered for".into()),
        },
    }
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
        // nftables maps and sets (`@name`) hold elements where chains hold rules.
        let item = if self.chain.starts_with('@') {
            "element"
        } else {
            "rule"
        };
        match self.status {
            ChainStatus::Missing => format!(
                "missing from the kernel ({})",
                count(self.missing_rules.len(), item)
            ),
            ChainStatus::Extra => format!(
                "not in the intent: a leftover ({})",
                count(self.extra_rules.len(), item)
            ),
            ChainStatus::Different => {
                let mut parts = Vec::new();
                if !self.missing_rules.is_empty() {
                    parts.push(format!("{} missing", count(self.missing_rules.len(), item)));
                }
                if !self.extra_rules.is_empty() {
                    parts.push(format!(
                        "{} not in the intent",
                        count(self.extra_rules.len(), item)
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
    /// `namespace/name:port`, as rule comments spell it (in nftables mode, `namespace/name` for an element
    /// shared by the Service's ports, as its comment spells it).
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
    /// nftables mode: the table compared (`ip svcproxy`); absent in iptables mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nft_table: Option<String>,
    /// nftables mode: the Services (`namespace/name`) whose objects the repair touches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<String>,
    /// nftables mode: the `nft -f` transaction that makes the table match the intent again, a command a line.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub repair: Vec<String>,
    /// nftables mode: why the table cannot be repaired in place, when it cannot (the repair then rebuilds it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
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
fn compare_rules<'a>(
    expected: impl Iterator<Item = &'a str>,
    found: &[&SavedRule],
) -> (Vec<String>, Vec<String>, bool) {
    let wanted: Vec<(Vec<String>, &str)> = expected.map(|l| (canonical_rule(&line_args(l)), l)).collect();
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
            _ => missing.push(line.to_string()),
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
                    missing_rules: chain.lines_in(name).collect::<Vec<_>>(),
                    extra_rules: Vec::new(),
                    reordered: false,
                });
                continue;
            }
            let found = by_chain.get(&**name).map(Vec::as_slice).unwrap_or_default();
            let expected: Vec<String> = chain.lines_in(name).collect();
            let (missing_rules, extra_rules, reordered) =
                compare_rules(expected.iter().map(String::as_str), found);
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
        nft_table: None,
        services: Vec::new(),
        repair: Vec::new(),
        note: None,
    }
}

/// What `expected` has that `found` lacks and the reverse, as multisets of lines, plus whether the lines they
/// share come in another order.
fn compare_lines(expected: &[String], found: &[String]) -> (Vec<String>, Vec<String>, bool) {
    let mut available: HashMap<&str, usize> = HashMap::new();
    for l in found {
        *available.entry(l).or_default() += 1;
    }
    let mut missing = Vec::new();
    let mut common_wanted = Vec::new();
    for l in expected {
        match available.get_mut(l.as_str()) {
            Some(n) if *n > 0 => {
                *n -= 1;
                common_wanted.push(l.as_str());
            }
            _ => missing.push(l.clone()),
        }
    }
    let mut needed: HashMap<&str, usize> = HashMap::new();
    for l in &common_wanted {
        *needed.entry(l).or_default() += 1;
    }
    let mut extra = Vec::new();
    let mut common_found = Vec::new();
    for l in found {
        match needed.get_mut(l.as_str()) {
            Some(n) if *n > 0 => {
                *n -= 1;
                common_found.push(l.as_str());
            }
            _ => extra.push(l.clone()),
        }
    }
    (missing, extra, common_wanted != common_found)
}

/// An element as `nft` takes it in `add element`: key, comment, then the mapped value.
fn element_line(key: &str, e: &Element) -> String {
    let mut line = key.to_string();
    if let Some(c) = &e.comment {
        line.push_str(&format!(" comment \"{c}\""));
    }
    if let Some(v) = &e.value {
        line.push_str(&format!(" : {v}"));
    }
    line
}

fn chain_definition(c: &NftChain) -> String {
    let mut parts = Vec::new();
    if let Some(b) = &c.base {
        parts.push(format!(
            "type {} hook {} priority {} policy {:?}",
            b.chain_type.keyword(),
            b.hook.keyword(),
            b.priority,
            b.policy
        ));
    }
    if let Some(comment) = &c.comment {
        parts.push(format!("comment \"{comment}\""));
    }
    format!("definition: {}", parts.join(" "))
}

fn set_definition(s: &NftSet) -> String {
    let mut text = format!("definition: {} {}", s.kind.keyword(), s.key_type);
    if let Some(d) = &s.data_type {
        text.push_str(&format!(" : {d}"));
    }
    if !s.flags.is_empty() {
        let flags: Vec<&str> = s.flags.iter().map(String::as_str).collect();
        text.push_str(&format!(" flags {}", flags.join(",")));
    }
    if let Some(t) = s.timeout {
        text.push_str(&format!(" timeout {t}s"));
    }
    if let Some(n) = s.size {
        text.push_str(&format!(" size {n}"));
    }
    if let Some(c) = &s.comment {
        text.push_str(&format!(" comment \"{c}\""));
    }
    text
}

fn elements_of(set: &NftSet) -> Vec<String> {
    set.elements.iter().map(|(k, e)| element_line(k, e)).collect()
}

/// Every difference between our nftables table in the kernel (`None`: it does not exist) and `expected`,
/// limited to the objects in `only` (chain names, and `@name` for maps and sets) when given. Everything in
/// the table is ours, so any object the intent lacks is a leftover. Elements of dynamic sets are written by
/// traffic and not compared.
pub fn nft_object_diffs(
    kernel: Option<&NftRuleset>,
    expected: &NftRuleset,
    only: Option<&BTreeSet<String>>,
) -> Vec<ChainDiff> {
    let table = expected.qualified_name();
    let selected = |name: &str| only.is_none_or(|o| o.contains(name));
    let entry = |chain: String, status, missing_rules, extra_rules, reordered| ChainDiff {
        table: table.clone(),
        chain,
        status,
        missing_rules,
        extra_rules,
        reordered,
    };
    let empty = NftRuleset::new(expected.family, expected.name.clone());
    let kernel = kernel.unwrap_or(&empty);
    let mut out = Vec::new();
    for (name, chain) in &expected.chains {
        if !selected(name) {
            continue;
        }
        let Some(found) = kernel.chains.get(name) else {
            out.push(entry(
                name.clone(),
                ChainStatus::Missing,
                chain.rules.clone(),
                Vec::new(),
                false,
            ));
            continue;
        };
        let (mut missing, mut extra, reordered) = compare_lines(&chain.rules, &found.rules);
        if found.base != chain.base || found.comment != chain.comment {
            missing.insert(0, chain_definition(chain));
            extra.insert(0, chain_definition(found));
        }
        if !missing.is_empty() || !extra.is_empty() || reordered {
            out.push(entry(
                name.clone(),
                ChainStatus::Different,
                missing,
                extra,
                reordered,
            ));
        }
    }
    for (name, chain) in &kernel.chains {
        if !expected.chains.contains_key(name) && selected(name) {
            out.push(entry(
                name.clone(),
                ChainStatus::Extra,
                Vec::new(),
                chain.rules.clone(),
                false,
            ));
        }
    }
    for (name, set) in &expected.sets {
        let label = format!("@{name}");
        if !selected(&label) {
            continue;
        }
        let Some(found) = kernel.sets.get(name) else {
            out.push(entry(
                label,
                ChainStatus::Missing,
                elements_of(set),
                Vec::new(),
                false,
            ));
            continue;
        };
        let (mut missing, mut extra) = (Vec::new(), Vec::new());
        if !found.same_definition(set) {
            missing.push(set_definition(set));
            extra.push(set_definition(found));
        }
        if !set.is_dynamic() {
            for (k, e) in &set.elements {
                if found.elements.get(k) != Some(e) {
                    missing.push(element_line(k, e));
                }
            }
            for (k, e) in &found.elements {
                if set.elements.get(k) != Some(e) {
                    extra.push(element_line(k, e));
                }
            }
        }
        if !missing.is_empty() || !extra.is_empty() {
            out.push(entry(label, ChainStatus::Different, missing, extra, false));
        }
    }
    for (name, set) in &kernel.sets {
        let label = format!("@{name}");
        if !expected.sets.contains_key(name) && selected(&label) {
            out.push(entry(
                label,
                ChainStatus::Extra,
                Vec::new(),
                elements_of(set),
                false,
            ));
        }
    }
    out
}

/// The service port (`namespace/name:port`) a per-service object of our nftables table belongs to, from its
/// name (`service-ns/name/tcp/port`, `endpoint-ns/name/tcp/port__10.0.0.1/80`, …).
fn nft_object_service_port(name: &str) -> Option<String> {
    owner_of_object(name)?;
    let (_, rest) = name.split_once('-')?;
    let mut parts = rest.splitn(4, '/');
    let (ns, svc, _proto, tail) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let port = tail.split("__").next().unwrap_or_default();
    Some(if port.is_empty() {
        format!("{ns}/{svc}")
    } else {
        format!("{ns}/{svc}:{port}")
    })
}

/// The service port an element line belongs to, from its comment.
fn element_service_port(line: &str) -> Option<String> {
    let (_, rest) = line.split_once(" comment \"")?;
    rest.split_once('"').map(|(c, _)| c.to_string())
}

/// Splits an nftables object's difference by service port: a per-service chain as a whole, a map's or set's
/// element by element.
fn nft_by_service(diff: ChainDiff) -> Vec<(Option<String>, ChainDiff)> {
    if !diff.chain.starts_with('@') {
        return vec![(nft_object_service_port(&diff.chain), diff)];
    }
    let mut parts: BTreeMap<Option<String>, ChainDiff> = BTreeMap::new();
    let empty = |d: &ChainDiff| ChainDiff {
        missing_rules: Vec::new(),
        extra_rules: Vec::new(),
        ..d.clone()
    };
    for line in &diff.missing_rules {
        parts
            .entry(element_service_port(line))
            .or_insert_with(|| empty(&diff))
            .missing_rules
            .push(line.clone());
    }
    for line in &diff.extra_rules {
        parts
            .entry(element_service_port(line))
            .or_insert_with(|| empty(&diff))
            .extra_rules
            .push(line.clone());
    }
    if parts.is_empty() {
        // A whole map or set missing or left over without elements.
        return vec![(None, diff)];
    }
    parts.into_iter().collect()
}

/// The whole comparison in nftables mode: our table as the kernel holds it (`None`: it does not exist) against
/// the rendering. Equal exactly when the repair the daemon would compute is empty.
pub fn nft_diff(
    kernel: Option<&NftRuleset>,
    expected: &NftRuleset,
    intent_service_ports: usize,
) -> DiffReport {
    let table = expected.qualified_name();
    let rebuild = |why: String| {
        let t = full_transaction(expected);
        (t.text, t.services, Some(why))
    };
    let (text, services, note) = match kernel {
        None => rebuild(format!("table {table} does not exist")),
        Some(found) => match partial_transaction(&found.without_dynamic_elements(), expected) {
            Ok(t) => (t.text, t.services, None),
            Err(e) => rebuild(format!("{e}; only a rebuild of the table repairs it")),
        },
    };
    let mut per_service: BTreeMap<String, Vec<ChainDiff>> = BTreeMap::new();
    let mut shared = Vec::new();
    for d in nft_object_diffs(kernel, expected, None) {
        for (owner, part) in nft_by_service(d) {
            match owner {
                Some(name) => per_service.entry(name).or_default().push(part),
                None => shared.push(part),
            }
        }
    }
    DiffReport {
        equal: text.is_empty(),
        service_ports_checked: intent_service_ports,
        chains_checked: expected.chains.len() + expected.sets.len(),
        service_ports: per_service
            .into_iter()
            .map(|(name, chains)| ServicePortDiff { name, chains })
            .collect(),
        shared,
        missing_jumps: Vec::new(),
        nft_table: Some(table),
        services: services.into_iter().collect(),
        repair: text.lines().map(str::to_string).collect(),
        note,
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
    if let Some(table) = &report.nft_table {
        render_nft_summary(&mut out, report, table, n);
        return out;
    }
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

/// The end of the nftables report: why a rebuild is needed (if it is), the repair, and one summary line.
fn render_nft_summary(out: &mut String, report: &DiffReport, table: &str, n: impl Fn(usize, &str) -> String) {
    let objects = |count: usize| match count {
        1 => "1 chain or map".to_string(),
        _ => format!("{count} chains and maps"),
    };
    let checked = format!(
        "{}, {}",
        n(report.service_ports_checked, "service port"),
        objects(report.chains_checked)
    );
    if report.equal {
        let _ = writeln!(out, "Table {table} matches the intent ({checked}).");
        return;
    }
    if let Some(note) = &report.note {
        let _ = writeln!(out, "{note}");
    }
    let _ = writeln!(out, "repair (nft -f -)");
    for line in &report.repair {
        let _ = writeln!(out, "    {line}");
    }
    let differing: usize =
        report.service_ports.iter().map(|s| s.chains.len()).sum::<usize>() + report.shared.len();
    let services = if report.services.is_empty() {
        String::new()
    } else {
        format!("; Services affected: {}", report.services.join(", "))
    };
    let _ = writeln!(
        out,
        "Table {table} differs from the intent ({checked} checked): {differing} {}{services}.",
        if differing == 1 { "differs" } else { "differ" },
    );
    let _ = writeln!(
        out,
        "svcproxy sends this repair at its next full sync (within --verify-period when it runs); `svcproxy explain` shows what a packet meets."
    );
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
            svcproxy_iptables::Chain::new(
                "KUBE-SERVICES",
                vec![
                r#"-A KUBE-SERVICES -m comment --comment "demo/web:http cluster IP" -d 10.96.0.100 -j KUBE-SVC-XRY76EGRC3BSCIIJ"#,
                ],
            ),
        );
        r.nat.chains.insert(
            "KUBE-SVC-XRY76EGRC3BSCIIJ".into(),
            svcproxy_iptables::Chain::new(
                "KUBE-SVC-XRY76EGRC3BSCIIJ",
                vec![
                r#"-A KUBE-SVC-XRY76EGRC3BSCIIJ -m comment --comment "demo/web:http -> 10.244.0.11:8080" -j KUBE-SEP-NW5VICAF3Z2QABHQ"#,
                ],
            ),
        );
        r.nat.chains.insert(
            "KUBE-SEP-NW5VICAF3Z2QABHQ".into(),
            svcproxy_iptables::Chain::new(
                "KUBE-SEP-NW5VICAF3Z2QABHQ",
                vec![
                r#"-A KUBE-SEP-NW5VICAF3Z2QABHQ -p tcp -m comment --comment "demo/web:http" -j DNAT --to-destination 10.244.0.11:8080"#,
                ],
            ),
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

    /// demo/web (10.96.0.100:80, no endpoints) rendered into our table as the daemon renders it.
    fn nft_table() -> NftRuleset {
        use svcproxy_model::{ObjectName, Protocol, Service, ServicePort};
        let mut state = svcproxy_model::ClusterState::default();
        let svc = Service::cluster_ip(
            ObjectName::new("demo", "web"),
            "10.96.0.100".parse().unwrap(),
            vec![ServicePort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 80,
                node_port: None,
            }],
        );
        state.services.insert(svc.name.clone(), svc);
        let intent = svcproxy_model::intent::build_intent(
            &state,
            &svcproxy_model::IntentConfig {
                family: svcproxy_model::IpFamily::V4,
                node_name: "node-a".into(),
            },
        );
        svcproxy_nftables::render(
            &intent,
            &crate::sync::nft_proxier::nft_config(&RenderConfig::default()),
        )
    }

    #[test]
    fn nft_tables_compare_object_by_object_and_carry_the_repair() {
        let expected = nft_table();
        let report = nft_diff(Some(&expected), &expected, 1);
        assert!(report.equal && report.repair.is_empty(), "{report:#?}");
        assert!(render_text(&report).contains("Table ip svcproxy matches the intent (1 service port, "));

        // An element of ours gone, a rule of ours gone, a chain of someone else's added.
        let mut kernel = expected.clone();
        let (set, key) = kernel
            .sets
            .iter()
            .find_map(|(name, set)| {
                let key = set.elements.keys().next()?;
                Some((name.clone(), key.clone()))
            })
            .expect("the rendering has an element");
        kernel.sets.get_mut(&set).unwrap().elements.remove(&key);
        kernel.chains.get_mut("services").unwrap().rules.clear();
        kernel.chains.insert("stray".into(), NftChain::default());
        let report = nft_diff(Some(&kernel), &expected, 1);
        assert!(!report.equal);
        assert_eq!(report.nft_table.as_deref(), Some("ip svcproxy"));
        assert_eq!(report.service_ports.len(), 1, "{report:#?}");
        let comment = expected.sets[&set].elements[&key].comment.clone();
        assert_eq!(
            Some(report.service_ports[0].name.as_str()),
            comment.as_deref(),
            "named by the element's comment"
        );
        assert!(report.service_ports[0].name.starts_with("demo/web"));
        assert_eq!(report.service_ports[0].chains[0].chain, format!("@{set}"));
        assert!(report.service_ports[0].chains[0].missing_rules[0].starts_with(key.as_str()));
        let shared: Vec<(&str, ChainStatus)> = report
            .shared
            .iter()
            .map(|d| (d.chain.as_str(), d.status))
            .collect();
        assert_eq!(
            shared,
            [
                ("services", ChainStatus::Different),
                ("stray", ChainStatus::Extra)
            ]
        );
        assert_eq!(report.services, ["demo/web"]);
        assert!(
            report
                .repair
                .contains(&"delete chain ip svcproxy stray".to_string()),
            "{:?}",
            report.repair
        );
        assert!(
            report
                .repair
                .iter()
                .any(|l| l.starts_with(&format!("add element ip svcproxy {set} {{ {key}"))),
            "{:?}",
            report.repair
        );

        // No table at all: every object is missing and the repair writes the whole table.
        let report = nft_diff(None, &expected, 1);
        assert!(!report.equal);
        assert_eq!(report.note.as_deref(), Some("table ip svcproxy does not exist"));
        assert_eq!(report.repair[0], "table ip svcproxy {}");
    }

    #[test]
    fn nft_object_names_give_their_service_port() {
        assert_eq!(
            nft_object_service_port("service-demo/web/tcp/http").as_deref(),
            Some("demo/web:http")
        );
        assert_eq!(
            nft_object_service_port("endpoint-my-ns/web/udp/dns__10.0.0.1/53").as_deref(),
            Some("my-ns/web:dns")
        );
        assert_eq!(
            nft_object_service_port("service-demo/single/tcp/").as_deref(),
            Some("demo/single")
        );
        assert_eq!(nft_object_service_port("service-endpoints-check"), None);
        assert_eq!(
            element_service_port(r#"10.96.0.1 . tcp . 80 comment "demo/web:http" : goto x"#).as_deref(),
            Some("demo/web:http")
        );
    }
}
