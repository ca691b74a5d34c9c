//! The packet tracer: what the kernel would do with a new connection's first packet, given an
//! `iptables-save` dump (ours, upstream's, or read back from a live kernel).
//!
//! The walk follows netfilter's hooks in the kernel's order, with every table of each hook in priority order:
//!
//! * from a pod or from outside: PREROUTING (raw, mangle, nat), then the routing decision on the possibly
//!   DNAT-ed destination: a local address goes to INPUT (mangle, filter, security, nat), anything else to
//!   FORWARD (mangle, filter, security) and POSTROUTING (mangle, nat);
//! * from the node itself: OUTPUT (raw, mangle, nat, filter, security) and POSTROUTING (mangle, nat); when the
//!   destination is local the packet then loops back and traverses PREROUTING and INPUT again, but without
//!   their nat chains, because its NAT was decided on the way out (which is why a NodePort without endpoints
//!   is rejected in INPUT even for the node's own clients).
//!
//! Statistic (random) rules make the walk branch: every outcome is explored, and the trace lists every
//! endpoint a new connection can be DNAT-ed to. `-m recent --rcheck` never matches, since a first packet has no
//! recorded client yet; the endpoints it would pin are reached through the statistic rules that follow.
//!
//! Interfaces are not part of the packet: a pod's packet arrives on [`NodeContext::pod_interface`], an outside
//! one on [`NodeContext::uplink_interface`], a node's own packet on none (and on `lo` when it loops back). Which
//! interface a packet leaves by depends on routes the tracer does not know, so `-o` is an error wherever it
//! would have to be decided; so is `-i` when the relevant name is not given.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use svcproxy_model::trace::{Origin, Packet, Trace, TraceStep, Verdict};

use crate::save_parser::{SavedRule, SavedRuleset};
use crate::trace_rule::{
    AddrSide, CtStates, Match, ProtocolSpec, RecentMode, RuleError, Target, TraceRule, parse_rule,
};

/// Nested chain calls allowed before the walk gives up; the kernel refuses loops when rules are loaded, so
/// only a hand-made dump can get here.
const MAX_DEPTH: usize = 64;

/// Probabilistic outcomes explored before giving up. One service with n endpoints gives n.
pub const MAX_BRANCHES: usize = 4096;

/// What the tracer knows about the node besides the rules.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeContext {
    /// The node's own addresses: `-m addrtype LOCAL` and the routing decision use them (loopback addresses
    /// are always local).
    pub local_ips: Vec<IpAddr>,
    /// The interface pod packets arrive on, for rules matching `-i`; `None` makes such rules an error.
    pub pod_interface: Option<String>,
    /// The interface outside packets arrive on, for rules matching `-i`; `None` makes such rules an error.
    pub uplink_interface: Option<String>,
}

impl NodeContext {
    pub fn new(local_ips: Vec<IpAddr>) -> Self {
        NodeContext {
            local_ips,
            ..Default::default()
        }
    }

    fn is_local(&self, ip: IpAddr) -> bool {
        ip.is_loopback() || self.local_ips.contains(&ip)
    }
}

/// Why a packet could not be traced.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TraceError {
    #[error("{chain}: cannot read rule `{rule}`: {error}")]
    Rule {
        chain: String,
        rule: String,
        error: RuleError,
    },
    #[error("{chain}: rule `{rule}` jumps to {target:?}, which is not a user chain of the table")]
    UndefinedChain {
        chain: String,
        rule: String,
        target: String,
    },
    #[error("{chain}: rule `{rule}` uses target {target} where the kernel does not allow it")]
    MisplacedTarget {
        chain: String,
        rule: String,
        target: &'static str,
    },
    #[error("{chain}: rule `{rule}` matches on the {which} interface, which the tracer does not know here")]
    UnknownInterface {
        chain: String,
        rule: String,
        which: &'static str,
    },
    #[error("{chain}: policy {policy:?} is neither ACCEPT nor DROP")]
    BadPolicy { chain: String, policy: String },
    #[error("{chain}: chains nested more than {MAX_DEPTH} deep (a loop?)")]
    TooDeep { chain: String },
    #[error("more than {MAX_BRANCHES} probabilistic outcomes")]
    TooManyBranches,
    /// Some candidate endpoints would be accepted and others not, so no single verdict describes the packet.
    #[error("the possible outcomes disagree on the verdict: {outcomes:?}")]
    AmbiguousVerdict { outcomes: Vec<(String, Verdict)> },
    /// Some candidate endpoints would see the packet masqueraded and others not (e.g. a pod reaching a
    /// service that has it among several endpoints): the trace has one flag for all of them.
    #[error(
        "the possible outcomes disagree on masquerading: masqueraded via {masqueraded:?}, not via {kept:?}"
    )]
    AmbiguousMasquerade {
        masqueraded: Vec<String>,
        kept: Vec<String>,
    },
}

/// Traces `packet`, the first packet of a new connection, through `saved`.
pub fn trace(saved: &SavedRuleset, packet: &Packet, node: &NodeContext) -> Result<Trace, TraceError> {
    let index = Index::new(saved);
    let mut outcomes = Vec::new();
    // Depth-first over the random choices: replay the walk with a script of decisions, flipping the last
    // "matched" choice to "not matched" each time, until every choice has been taken both ways.
    let mut script = Vec::new();
    loop {
        let mut walk = Walk::new(&index, packet, node, script);
        walk.run()?;
        let decisions = std::mem::take(&mut walk.decisions);
        outcomes.push(walk.finish());
        if outcomes.len() > MAX_BRANCHES {
            return Err(TraceError::TooManyBranches);
        }
        let Some(last_taken) = decisions.iter().rposition(|&taken| taken) else {
            break;
        };
        script = decisions[..last_taken].to_vec();
        script.push(false);
    }
    merge(outcomes)
}

/// One way through the rules.
struct Outcome {
    steps: Vec<TraceStep>,
    endpoint: Option<String>,
    masquerade: bool,
    verdict: Verdict,
}

impl Outcome {
    fn label(&self) -> String {
        self.endpoint.clone().unwrap_or_else(|| "(not DNAT-ed)".into())
    }
}

fn merge(outcomes: Vec<Outcome>) -> Result<Trace, TraceError> {
    let verdict = outcomes[0].verdict;
    if outcomes.iter().any(|o| o.verdict != verdict) {
        return Err(TraceError::AmbiguousVerdict {
            outcomes: outcomes.iter().map(|o| (o.label(), o.verdict)).collect(),
        });
    }
    let masquerade = outcomes[0].masquerade;
    if outcomes.iter().any(|o| o.masquerade != masquerade) {
        let (masqueraded, kept): (Vec<&Outcome>, Vec<&Outcome>) = outcomes.iter().partition(|o| o.masquerade);
        return Err(TraceError::AmbiguousMasquerade {
            masqueraded: masqueraded.iter().map(|o| o.label()).collect(),
            kept: kept.iter().map(|o| o.label()).collect(),
        });
    }
    let mut endpoints: Vec<String> = outcomes.iter().filter_map(|o| o.endpoint.clone()).collect();
    endpoints.sort();
    endpoints.dedup();
    // Each outcome repeats the steps it shares with the one before; keep them once, so the steps read as a
    // depth-first walk of every branch.
    let mut steps: Vec<TraceStep> = Vec::new();
    let mut previous: &[TraceStep] = &[];
    for o in &outcomes {
        let shared = previous.iter().zip(&o.steps).take_while(|(a, b)| a == b).count();
        steps.extend_from_slice(&o.steps[shared..]);
        previous = &o.steps;
    }
    Ok(Trace {
        steps,
        endpoints,
        masquerade,
        verdict,
    })
}

/// Rules by table and chain, so a chain's rules are found without scanning the whole dump.
struct Index<'a> {
    tables: BTreeMap<&'a str, TableIndex<'a>>,
}

struct TableIndex<'a> {
    policies: &'a BTreeMap<String, Option<String>>,
    chains: BTreeMap<&'a str, Vec<&'a SavedRule>>,
}

impl<'a> Index<'a> {
    fn new(saved: &'a SavedRuleset) -> Self {
        let tables = saved
            .tables
            .iter()
            .map(|(name, table)| {
                let mut chains: BTreeMap<&str, Vec<&SavedRule>> = BTreeMap::new();
                for rule in &table.rules {
                    chains.entry(rule.chain.as_str()).or_default().push(rule);
                }
                let t = TableIndex {
                    policies: &table.chains,
                    chains,
                };
                (name.as_str(), t)
            })
            .collect();
        Index { tables }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hook {
    Prerouting,
    Input,
    Forward,
    Output,
    Postrouting,
}

impl Hook {
    fn chain(self) -> &'static str {
        match self {
            Hook::Prerouting => "PREROUTING",
            Hook::Input => "INPUT",
            Hook::Forward => "FORWARD",
            Hook::Output => "OUTPUT",
            Hook::Postrouting => "POSTROUTING",
        }
    }
}

/// The interface a rule's `-i` / `-o` would compare with.
#[derive(Debug, Clone, Copy)]
enum Iface<'a> {
    /// The packet has none here (no input interface for a locally generated packet, no output interface
    /// before routing): `-i x` / `-o x` do not match.
    Absent,
    Named(&'a str),
    /// There is one but the tracer does not know its name.
    Unknown,
}

/// How a chain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    /// Fell off the end or returned: the caller continues.
    Continue,
    /// This table is done with the packet (ACCEPT, or a NAT target).
    Accept,
    Drop,
    Reject,
}

/// Whether a rule's matches hold, when they may depend on a random draw.
enum Decision {
    Yes,
    No,
    Random,
}

struct Walk<'a> {
    index: &'a Index<'a>,
    node: &'a NodeContext,
    origin: Origin,
    source: IpAddr,
    destination: IpAddr,
    port: u16,
    protocol: &'static str,
    mark: u32,
    ct: CtStates,
    in_iface: Iface<'a>,
    out_iface: Iface<'a>,
    hook: Hook,
    steps: Vec<TraceStep>,
    endpoint: Option<String>,
    masquerade: bool,
    verdict: Verdict,
    script: Vec<bool>,
    decisions: Vec<bool>,
}

impl<'a> Walk<'a> {
    fn new(index: &'a Index<'a>, packet: &Packet, node: &'a NodeContext, script: Vec<bool>) -> Self {
        Walk {
            index,
            node,
            origin: packet.origin,
            source: packet.source,
            destination: packet.destination,
            port: packet.port,
            protocol: packet.protocol.lower(),
            mark: 0,
            ct: CtStates::NEW,
            in_iface: Iface::Absent,
            out_iface: Iface::Absent,
            hook: Hook::Prerouting,
            steps: Vec::new(),
            endpoint: None,
            masquerade: false,
            verdict: Verdict::Accept,
            script,
            decisions: Vec::new(),
        }
    }

    fn finish(self) -> Outcome {
        Outcome {
            steps: self.steps,
            endpoint: self.endpoint,
            masquerade: self.masquerade,
            verdict: self.verdict,
        }
    }

    /// Runs the hooks in the kernel's order; stops at the first DROP or REJECT.
    fn run(&mut self) -> Result<(), TraceError> {
        match self.origin {
            Origin::Pod | Origin::External => {
                let arrives_on = if self.origin == Origin::Pod {
                    &self.node.pod_interface
                } else {
                    &self.node.uplink_interface
                };
                self.in_iface = arrives_on.as_deref().map_or(Iface::Unknown, Iface::Named);
                if !self.hook_tables(Hook::Prerouting, &["raw", "mangle", "nat"])? {
                    return Ok(());
                }
                if self.node.is_local(self.destination) {
                    self.hook_tables(Hook::Input, &["mangle", "filter", "security", "nat"])?;
                } else {
                    self.out_iface = Iface::Unknown;
                    if self.hook_tables(Hook::Forward, &["mangle", "filter", "security"])? {
                        self.hook_tables(Hook::Postrouting, &["mangle", "nat"])?;
                    }
                }
            }
            Origin::Host => {
                self.in_iface = Iface::Absent;
                let local_before_nat = self.node.is_local(self.destination);
                self.out_iface = if local_before_nat {
                    Iface::Named("lo")
                } else {
                    Iface::Unknown
                };
                if !self.hook_tables(Hook::Output, &["raw", "mangle", "nat", "filter", "security"])? {
                    return Ok(());
                }
                // nat OUTPUT may have moved the destination; the kernel routes again.
                let local = self.node.is_local(self.destination);
                if local != local_before_nat {
                    self.out_iface = if local { Iface::Named("lo") } else { Iface::Unknown };
                }
                if !self.hook_tables(Hook::Postrouting, &["mangle", "nat"])? {
                    return Ok(());
                }
                if local {
                    self.in_iface = Iface::Named("lo");
                    self.out_iface = Iface::Absent;
                    if self.hook_tables(Hook::Prerouting, &["raw", "mangle"])? {
                        self.hook_tables(Hook::Input, &["mangle", "filter", "security"])?;
                    }
                }
            }
        }
        Ok(())
    }

    /// One hook: each table's built-in chain in turn. `false` when the packet was dropped or rejected.
    fn hook_tables(&mut self, hook: Hook, tables: &[&'static str]) -> Result<bool, TraceError> {
        self.hook = hook;
        if hook == Hook::Input {
            self.out_iface = Iface::Absent;
        }
        for &table in tables {
            let Some(t) = self.index.tables.get(table) else {
                continue;
            };
            let chain = hook.chain();
            let Some(policy) = t.policies.get(chain) else {
                continue;
            };
            let flow = self.run_chain(table, chain, 0)?;
            let flow = if flow == Flow::Continue {
                self.policy(table, chain, policy.as_deref())?
            } else {
                flow
            };
            match flow {
                Flow::Drop => {
                    self.verdict = Verdict::Drop;
                    return Ok(false);
                }
                Flow::Reject => {
                    self.verdict = Verdict::Reject;
                    return Ok(false);
                }
                Flow::Accept | Flow::Continue => {}
            }
        }
        Ok(true)
    }

    fn policy(&mut self, table: &str, chain: &str, policy: Option<&str>) -> Result<Flow, TraceError> {
        match policy.unwrap_or("ACCEPT") {
            "ACCEPT" => Ok(Flow::Accept),
            "DROP" => {
                // Not a rule, but the reason for the verdict: show it the way iptables would set it.
                self.steps.push(TraceStep {
                    chain: format!("{table}/{chain}"),
                    rule: format!("-P {chain} DROP"),
                });
                Ok(Flow::Drop)
            }
            other => Err(TraceError::BadPolicy {
                chain: format!("{table}/{chain}"),
                policy: other.to_string(),
            }),
        }
    }

    fn run_chain(&mut self, table: &str, chain: &str, depth: usize) -> Result<Flow, TraceError> {
        let label = || format!("{table}/{chain}");
        if depth > MAX_DEPTH {
            return Err(TraceError::TooDeep { chain: label() });
        }
        let index = self.index;
        let Some(t) = index.tables.get(table) else {
            return Ok(Flow::Continue);
        };
        let rules = t.chains.get(chain).map(Vec::as_slice).unwrap_or_default();
        for saved in rules {
            let rule = parse_rule(&saved.args).map_err(|error| TraceError::Rule {
                chain: label(),
                rule: saved.line.clone(),
                error,
            })?;
            if !self.rule_matches(&rule, &label(), saved)? {
                continue;
            }
            self.steps.push(TraceStep {
                chain: label(),
                rule: saved.line.clone(),
            });
            let flow = match &rule.target {
                Target::None | Target::Log => Flow::Continue,
                Target::Jump(next) | Target::Goto(next) => {
                    if t.policies.get(next.as_str()) != Some(&None) {
                        return Err(TraceError::UndefinedChain {
                            chain: label(),
                            rule: saved.line.clone(),
                            target: next.clone(),
                        });
                    }
                    let flow = self.run_chain(table, next, depth + 1)?;
                    if matches!(rule.target, Target::Goto(_)) {
                        // A goto does not come back here: the called chain's return is ours.
                        return Ok(flow);
                    }
                    flow
                }
                Target::Return => return Ok(Flow::Continue),
                Target::Accept => Flow::Accept,
                Target::Drop => Flow::Drop,
                Target::Reject => {
                    if !matches!(self.hook, Hook::Input | Hook::Forward | Hook::Output) {
                        return Err(self.misplaced(&label(), saved, "REJECT"));
                    }
                    Flow::Reject
                }
                Target::Mark { value, mask } => {
                    self.mark = (self.mark & !mask) ^ value;
                    Flow::Continue
                }
                Target::Dnat { address, port } => {
                    if table != "nat" || !matches!(self.hook, Hook::Prerouting | Hook::Output) {
                        return Err(self.misplaced(&label(), saved, "DNAT"));
                    }
                    self.destination = *address;
                    self.port = port.unwrap_or(self.port);
                    self.ct = self.ct.union(CtStates::DNAT);
                    self.endpoint = Some(SocketAddr::new(self.destination, self.port).to_string());
                    Flow::Accept
                }
                Target::Masquerade => {
                    if table != "nat" || self.hook != Hook::Postrouting {
                        return Err(self.misplaced(&label(), saved, "MASQUERADE"));
                    }
                    self.masquerade = true;
                    self.ct = self.ct.union(CtStates::SNAT);
                    Flow::Accept
                }
            };
            if flow != Flow::Continue {
                return Ok(flow);
            }
        }
        Ok(Flow::Continue)
    }

    fn misplaced(&self, chain: &str, saved: &SavedRule, target: &'static str) -> TraceError {
        TraceError::MisplacedTarget {
            chain: chain.to_string(),
            rule: saved.line.clone(),
            target,
        }
    }

    /// Whether every match holds; a random match is drawn (as scripted) only when all the others hold, so
    /// rules that cannot match do not multiply the outcomes.
    fn rule_matches(&mut self, rule: &TraceRule, chain: &str, saved: &SavedRule) -> Result<bool, TraceError> {
        let mut random = false;
        for m in &rule.matches {
            match self.evaluate(m, chain, saved)? {
                Decision::Yes => {}
                Decision::No => return Ok(false),
                Decision::Random => random = true,
            }
        }
        if !random {
            return Ok(true);
        }
        let taken = self.script.get(self.decisions.len()).copied().unwrap_or(true);
        self.decisions.push(taken);
        Ok(taken)
    }

    fn evaluate(&self, m: &Match, chain: &str, saved: &SavedRule) -> Result<Decision, TraceError> {
        let holds = |cond: bool, negated: bool| {
            if cond != negated {
                Decision::Yes
            } else {
                Decision::No
            }
        };
        let interface = |iface: Iface<'_>, name: &str, negated: bool, which: &'static str| match iface {
            Iface::Absent => Ok(holds(false, negated)),
            Iface::Named(actual) => Ok(holds(interface_matches(name, actual), negated)),
            Iface::Unknown => Err(TraceError::UnknownInterface {
                chain: chain.to_string(),
                rule: saved.line.clone(),
                which,
            }),
        };
        Ok(match m {
            Match::Source { net, negated } => holds(net.contains(&self.source), *negated),
            Match::Destination { net, negated } => holds(net.contains(&self.destination), *negated),
            Match::Protocol { protocol, negated } => {
                let cond = match protocol {
                    ProtocolSpec::Any => true,
                    ProtocolSpec::Named(name) => name == self.protocol,
                };
                holds(cond, *negated)
            }
            Match::ProtocolModule { protocol } => holds(protocol == self.protocol, false),
            Match::InInterface { name, negated } => interface(self.in_iface, name, *negated, "input")?,
            Match::OutInterface { name, negated } => interface(self.out_iface, name, *negated, "output")?,
            Match::DestinationPort { first, last, negated } => {
                holds((*first..=*last).contains(&self.port), *negated)
            }
            Match::AddrTypeLocal { side, negated } => {
                let ip = match side {
                    AddrSide::Source => self.source,
                    AddrSide::Destination => self.destination,
                };
                holds(self.node.is_local(ip), *negated)
            }
            Match::Mark { value, mask, negated } => holds(self.mark & mask == *value, *negated),
            Match::CtState { states, negated } => holds(self.ct.intersects(*states), *negated),
            Match::Random { probability, negated } => {
                let p = if *negated { 1.0 - probability } else { *probability };
                if p >= 1.0 {
                    Decision::Yes
                } else if p <= 0.0 {
                    Decision::No
                } else {
                    Decision::Random
                }
            }
            // A first packet's client is on no list yet; `--set` records it and matches.
            Match::Recent { mode, negated } => holds(*mode == RecentMode::Set, *negated),
        })
    }
}

/// iptables interface names: a trailing `+` matches any name with that prefix.
fn interface_matches(pattern: &str, actual: &str) -> bool {
    match pattern.strip_suffix('+') {
        Some(prefix) => actual.starts_with(prefix),
        None => pattern == actual,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::save_parser::parse_save;
    use svcproxy_model::Protocol;

    const NODE_IP: &str = "10.0.0.10";

    fn node() -> NodeContext {
        NodeContext::new(vec![NODE_IP.parse().unwrap()])
    }

    fn packet(origin: Origin, source: &str, destination: &str, port: u16, protocol: Protocol) -> Packet {
        Packet {
            origin,
            source: source.parse().unwrap(),
            destination: destination.parse().unwrap(),
            port,
            protocol,
        }
    }

    fn pod(destination: &str, port: u16) -> Packet {
        packet(Origin::Pod, "10.244.0.5", destination, port, Protocol::Tcp)
    }

    /// A dump from `(table, rules)` pairs: built-in chains with ACCEPT policy, every other chain named by a
    /// rule declared as a user chain.
    fn dump(tables: &[(&str, &str)]) -> SavedRuleset {
        let mut text = String::new();
        for (table, rules) in tables {
            let builtin: &[&str] = match *table {
                "nat" => &["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"],
                _ => &["INPUT", "FORWARD", "OUTPUT"],
            };
            text.push_str(&format!("*{table}\n"));
            for c in builtin {
                let policy = if rules.contains(&format!(":{c} DROP")) {
                    "DROP"
                } else {
                    "ACCEPT"
                };
                text.push_str(&format!(":{c} {policy} [0:0]\n"));
            }
            let mut user = std::collections::BTreeSet::new();
            for line in rules.lines().map(str::trim).filter(|l| l.starts_with("-A ")) {
                let words: Vec<&str> = line.split_whitespace().collect();
                user.insert(words[1]);
                if let Some(i) = words.iter().position(|w| *w == "-j" || *w == "-g") {
                    user.insert(words[i + 1]);
                }
            }
            for c in user {
                if !builtin.contains(&c) && !crate::trace_rule::is_kernel_target(c) {
                    text.push_str(&format!(":{c} - [0:0]\n"));
                }
            }
            for line in rules.lines().map(str::trim).filter(|l| l.starts_with("-A ")) {
                text.push_str(line);
                text.push('\n');
            }
            text.push_str("COMMIT\n");
        }
        parse_save(&text).unwrap()
    }

    fn run(tables: &[(&str, &str)], p: &Packet) -> Trace {
        trace(&dump(tables), p, &node()).unwrap()
    }

    fn rules(t: &Trace) -> Vec<&str> {
        t.steps.iter().map(|s| s.rule.as_str()).collect()
    }

    #[test]
    fn empty_tables_accept_everything() {
        let t = trace(&SavedRuleset::default(), &pod("10.96.0.1", 80), &node()).unwrap();
        assert_eq!(t.verdict, Verdict::Accept);
        assert!(t.steps.is_empty() && t.endpoints.is_empty() && !t.masquerade);
    }

    #[test]
    fn source_and_destination_with_negation_and_cidrs() {
        let nat = "-A PREROUTING -s 10.244.0.0/16 -j S
                   -A PREROUTING ! -s 10.244.0.0/16 -j NS
                   -A PREROUTING -d 10.96.0.1/32 -j D
                   -A PREROUTING -d 10.96.0.2 -j D2
                   -A PREROUTING ! -d 10.96.0.0/12 -j ND";
        let t = run(&[("nat", nat)], &pod("10.96.0.1", 80));
        assert_eq!(
            rules(&t),
            [
                "-A PREROUTING -s 10.244.0.0/16 -j S",
                "-A PREROUTING -d 10.96.0.1/32 -j D"
            ]
        );
    }

    #[test]
    fn protocol_and_destination_port() {
        let nat = "-A PREROUTING -p udp -m udp --dport 53 -j U
                   -A PREROUTING -p tcp -m tcp --dport 53 -j T
                   -A PREROUTING -p tcp -m tcp ! --dport 53 -j NT
                   -A PREROUTING -m sctp -p sctp -j S
                   -A PREROUTING -p tcp --dport 50:60 -j R
                   -A PREROUTING ! -p udp -j NU
                   -A PREROUTING -p all -j A";
        let t = run(&[("nat", nat)], &pod("10.96.0.1", 53));
        assert_eq!(
            rules(&t),
            [
                "-A PREROUTING -p tcp -m tcp --dport 53 -j T",
                "-A PREROUTING -p tcp --dport 50:60 -j R",
                "-A PREROUTING ! -p udp -j NU",
                "-A PREROUTING -p all -j A",
            ]
        );
        let sctp = packet(Origin::Pod, "10.244.0.5", "10.96.0.1", 53, Protocol::Sctp);
        assert_eq!(
            rules(&run(&[("nat", nat)], &sctp)),
            [
                "-A PREROUTING -m sctp -p sctp -j S",
                "-A PREROUTING ! -p udp -j NU",
                "-A PREROUTING -p all -j A"
            ]
        );
    }

    #[test]
    fn addrtype_local_on_either_side() {
        let nat = "-A PREROUTING -m addrtype --dst-type LOCAL -j DL
                   -A PREROUTING -m addrtype ! --dst-type LOCAL -j NDL
                   -A PREROUTING -m addrtype --src-type LOCAL -j SL
                   -A PREROUTING -m addrtype ! --src-type LOCAL -j NSL";
        let t = run(&[("nat", nat)], &pod(NODE_IP, 30080));
        assert_eq!(
            rules(&t),
            [
                "-A PREROUTING -m addrtype --dst-type LOCAL -j DL",
                "-A PREROUTING -m addrtype ! --src-type LOCAL -j NSL"
            ]
        );
        // Loopback addresses are local without being listed.
        let host = packet(Origin::Host, NODE_IP, "127.0.0.1", 30080, Protocol::Tcp);
        let out = nat.replace("PREROUTING", "OUTPUT");
        assert_eq!(
            rules(&run(&[("nat", &out)], &host)),
            [
                "-A OUTPUT -m addrtype --dst-type LOCAL -j DL",
                "-A OUTPUT -m addrtype --src-type LOCAL -j SL"
            ]
        );
    }

    #[test]
    fn comment_and_nfacct_do_not_constrain() {
        let nat = r#"-A PREROUTING -m comment --comment "a b" -m nfacct --nfacct-name  counter -j C"#;
        assert_eq!(rules(&run(&[("nat", nat)], &pod("10.96.0.1", 80))).len(), 1);
    }

    #[test]
    fn mark_targets_and_mark_match() {
        let nat = "-A PREROUTING -j MARK --or-mark 0x00004000
                   -A PREROUTING -m mark --mark 0x4000/0x4000 -j SET
                   -A PREROUTING -j MARK --set-xmark 0x4000/0x0
                   -A PREROUTING -m mark ! --mark 0x4000/0x4000 -j CLEARED
                   -A PREROUTING -j MARK --set-xmark 0x1/0xffffffff
                   -A PREROUTING -m mark --mark 0x1 -j ONE
                   -A PREROUTING -j MARK --and-mark 0x0
                   -A PREROUTING -m mark --mark 0x0 -j ZERO";
        let t = run(&[("nat", nat)], &pod("10.96.0.1", 80));
        assert_eq!(
            rules(&t).iter().filter(|r| !r.contains("-j MARK")).count(),
            4,
            "{t:#?}"
        );
    }

    #[test]
    fn conntrack_state_is_new_then_dnat() {
        let nat = "-A PREROUTING -m conntrack --ctstate NEW -j N
                   -A PREROUTING -m conntrack --ctstate DNAT -j BEFORE
                   -A PREROUTING -p tcp -j DNAT --to-destination 10.244.1.5:8080";
        let filter = "-A FORWARD -m conntrack --ctstate DNAT -j AFTER
                      -A FORWARD -m conntrack ! --ctstate RELATED,ESTABLISHED -j NOT_EST
                      -A FORWARD -m conntrack --ctstate INVALID -j DROP";
        let t = run(&[("nat", nat), ("filter", filter)], &pod("10.96.0.1", 80));
        assert_eq!(
            rules(&t),
            [
                "-A PREROUTING -m conntrack --ctstate NEW -j N",
                "-A PREROUTING -p tcp -j DNAT --to-destination 10.244.1.5:8080",
                "-A FORWARD -m conntrack --ctstate DNAT -j AFTER",
                "-A FORWARD -m conntrack ! --ctstate RELATED,ESTABLISHED -j NOT_EST",
            ]
        );
        assert_eq!(t.verdict, Verdict::Accept);
        assert_eq!(t.endpoints, ["10.244.1.5:8080"]);
    }

    #[test]
    fn statistic_branches_collect_every_candidate() {
        let nat = "-A PREROUTING -j SVC
                   -A SVC -m statistic --mode random --probability 0.33333333349 -j SEP1
                   -A SVC -m statistic --mode random --probability 0.50000000000 -j SEP2
                   -A SVC -j SEP3
                   -A SEP1 -p tcp -m tcp -j DNAT --to-destination 10.244.1.1:80
                   -A SEP2 -p tcp -m tcp -j DNAT --to-destination 10.244.1.2:80
                   -A SEP3 -p tcp -m tcp -j DNAT --to-destination 10.244.1.3:80";
        let t = run(&[("nat", nat)], &pod("10.96.0.1", 80));
        assert_eq!(t.endpoints, ["10.244.1.1:80", "10.244.1.2:80", "10.244.1.3:80"]);
        // Depth-first: the shared prefix once, then each branch's own steps.
        assert_eq!(t.steps.len(), 1 + 3 * 2);
        // Certain probabilities do not branch.
        let certain = "-A PREROUTING -m statistic --mode random --probability 1.0 -j A
                       -A PREROUTING -m statistic --mode random --probability 0.0 -j B
                       -A A -j DNAT --to-destination 10.244.1.1:80";
        assert_eq!(
            run(&[("nat", certain)], &pod("10.96.0.1", 80)).endpoints,
            ["10.244.1.1:80"]
        );
    }

    #[test]
    fn recent_rcheck_never_matches_a_first_packet_and_set_always_does() {
        let nat = "-A PREROUTING -j SVC
                   -A SVC -m recent --rcheck --seconds 600 --reap --name SEP2 --mask 255.255.255.255 --rsource -j SEP2
                   -A SVC -m statistic --mode random --probability 0.5 -j SEP1
                   -A SVC -j SEP2
                   -A SEP1 -p tcp -m recent --set --name SEP1 --mask 255.255.255.255 --rsource -m tcp -j DNAT --to-destination 10.244.1.1:80
                   -A SEP2 -p tcp -m recent --set --name SEP2 --mask 255.255.255.255 --rsource -m tcp -j DNAT --to-destination 10.244.1.2:80";
        let t = run(&[("nat", nat)], &pod("10.96.0.1", 80));
        assert_eq!(t.endpoints, ["10.244.1.1:80", "10.244.1.2:80"]);
        assert!(!rules(&t).iter().any(|r| r.contains("--rcheck")));
    }

    #[test]
    fn input_interface_follows_the_origin() {
        let nat = "-A PREROUTING -i cbr0 -j FROM_BRIDGE
                   -A PREROUTING ! -i veth+ -j NOT_VETH
                   -A OUTPUT -i cbr0 -j NEVER
                   -A OUTPUT ! -i cbr0 -j ALWAYS";
        let ctx = NodeContext {
            pod_interface: Some("cbr0".into()),
            uplink_interface: Some("eth0".into()),
            ..node()
        };
        let saved = dump(&[("nat", nat)]);
        let t = trace(&saved, &pod("10.96.0.1", 80), &ctx).unwrap();
        assert_eq!(
            rules(&t),
            [
                "-A PREROUTING -i cbr0 -j FROM_BRIDGE",
                "-A PREROUTING ! -i veth+ -j NOT_VETH"
            ]
        );
        let outside = packet(Origin::External, "203.0.113.5", "10.96.0.1", 80, Protocol::Tcp);
        assert_eq!(
            rules(&trace(&saved, &outside, &ctx).unwrap()),
            ["-A PREROUTING ! -i veth+ -j NOT_VETH"]
        );
        // A node's own packets have no input interface.
        let host = packet(Origin::Host, NODE_IP, "10.96.0.1", 80, Protocol::Tcp);
        assert_eq!(
            rules(&trace(&saved, &host, &ctx).unwrap()),
            ["-A OUTPUT ! -i cbr0 -j ALWAYS"]
        );
        // Without names, `-i` cannot be decided.
        let err = trace(&saved, &pod("10.96.0.1", 80), &node()).unwrap_err();
        assert!(
            matches!(&err, TraceError::UnknownInterface { which: "input", rule, .. } if rule.contains("cbr0")),
            "{err}"
        );
    }

    #[test]
    fn output_interface_is_known_only_when_delivered_locally() {
        let filter = "-A FORWARD -o eth0 -j ACCEPT";
        let err = trace(&dump(&[("filter", filter)]), &pod("10.244.1.5", 80), &node()).unwrap_err();
        assert!(matches!(
            err,
            TraceError::UnknownInterface { which: "output", .. }
        ));
        let filter = "-A INPUT -o eth0 -j DROP";
        assert_eq!(
            run(&[("filter", filter)], &pod(NODE_IP, 80)).verdict,
            Verdict::Accept
        );
    }

    #[test]
    fn jumps_return_and_gotos_do_not() {
        let nat = "-A PREROUTING -j A
                   -A PREROUTING -j AFTER_A
                   -A A -j B
                   -A A -j AFTER_B
                   -A B -j RETURN
                   -A B -j NEVER
                   -A AFTER_B -g C
                   -A AFTER_B -j NEVER
                   -A C -j MARK --or-mark 1";
        let t = run(&[("nat", nat)], &pod("10.96.0.1", 80));
        assert_eq!(
            rules(&t),
            [
                "-A PREROUTING -j A",
                "-A A -j B",
                "-A B -j RETURN",
                "-A A -j AFTER_B",
                "-A AFTER_B -g C",
                "-A C -j MARK --or-mark 1",
                "-A PREROUTING -j AFTER_A",
            ]
        );
    }

    #[test]
    fn counter_only_and_log_rules_are_recorded_and_fall_through() {
        let nat = r#"-A PREROUTING -m comment --comment "other traffic will be dropped"
                     -A PREROUTING -j LOG --log-prefix "seen: "
                     -A PREROUTING -j NEXT"#;
        assert_eq!(rules(&run(&[("nat", nat)], &pod("10.96.0.1", 80))).len(), 3);
    }

    #[test]
    fn accept_drop_reject_and_policies() {
        let p = pod("10.244.1.5", 80);
        assert_eq!(
            run(&[("filter", "-A FORWARD -j ACCEPT\n-A FORWARD -j DROP")], &p).verdict,
            Verdict::Accept
        );
        assert_eq!(
            run(&[("filter", "-A FORWARD -j DROP")], &p).verdict,
            Verdict::Drop
        );
        let t = run(
            &[(
                "filter",
                "-A FORWARD -j REJECT --reject-with icmp-port-unreachable",
            )],
            &p,
        );
        assert_eq!(t.verdict, Verdict::Reject);
        let t = run(&[("filter", ":FORWARD DROP")], &p);
        assert_eq!(t.verdict, Verdict::Drop);
        assert_eq!(rules(&t), ["-P FORWARD DROP"]);
        // Local delivery takes INPUT, not FORWARD.
        assert_eq!(
            run(&[("filter", ":FORWARD DROP")], &pod(NODE_IP, 22)).verdict,
            Verdict::Accept
        );
        // ACCEPT in nat ends that table only.
        let t = run(
            &[
                ("nat", "-A PREROUTING -j ACCEPT"),
                ("filter", "-A FORWARD -j DROP"),
            ],
            &p,
        );
        assert_eq!(t.verdict, Verdict::Drop);
    }

    #[test]
    fn dnat_rewrites_the_destination_for_later_hooks() {
        let nat = "-A PREROUTING -d 10.96.0.1/32 -j DNAT --to-destination 10.0.0.10:6443
                   -A PREROUTING -j NEVER";
        let filter = "-A INPUT -d 10.0.0.10/32 -p tcp -m tcp --dport 6443 -j ACCEPT
                      -A FORWARD -j DROP";
        let t = run(&[("nat", nat), ("filter", filter)], &pod("10.96.0.1", 443));
        assert_eq!(t.endpoints, ["10.0.0.10:6443"]);
        assert_eq!(t.verdict, Verdict::Accept);
        assert_eq!(t.steps.len(), 2);
        // Without a port the packet keeps its own.
        let nat = "-A PREROUTING -j DNAT --to-destination 10.244.1.5";
        assert_eq!(
            run(&[("nat", nat)], &pod("10.96.0.1", 443)).endpoints,
            ["10.244.1.5:443"]
        );
    }

    #[test]
    fn masquerade_needs_postrouting_to_run() {
        let nat = "-A PREROUTING -j MARK --or-mark 0x4000
                   -A PREROUTING -j DNAT --to-destination 10.244.1.5:80
                   -A POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
                   -A POSTROUTING -j MARK --xor-mark 0x4000
                   -A POSTROUTING -j MASQUERADE --random-fully";
        let t = run(&[("nat", nat)], &pod("10.96.0.1", 80));
        assert!(t.masquerade);
        // Delivered locally: POSTROUTING is not on the way.
        let local = nat.replace("10.244.1.5:80", "10.0.0.10:6443");
        assert!(!run(&[("nat", &local)], &pod("10.96.0.1", 80)).masquerade);
        // A node's own packet to itself goes out through POSTROUTING before looping back.
        let host = packet(Origin::Host, NODE_IP, "10.96.0.1", 80, Protocol::Tcp);
        let out = local.replace("PREROUTING", "OUTPUT");
        let t = run(&[("nat", &out)], &host);
        assert!(t.masquerade);
        assert_eq!(t.endpoints, ["10.0.0.10:6443"]);
    }

    #[test]
    fn host_traffic_to_itself_passes_filter_input_after_output() {
        let filter = "-A OUTPUT -j SEEN_OUTPUT
                      -A INPUT -p tcp -m tcp --dport 30080 -j REJECT";
        let nat = "-A PREROUTING -j NEVER_NAT_AGAIN";
        let host = packet(Origin::Host, NODE_IP, NODE_IP, 30080, Protocol::Tcp);
        let t = run(&[("filter", filter), ("nat", nat)], &host);
        assert_eq!(t.verdict, Verdict::Reject);
        assert_eq!(
            rules(&t),
            [
                "-A OUTPUT -j SEEN_OUTPUT",
                "-A INPUT -p tcp -m tcp --dport 30080 -j REJECT"
            ]
        );
    }

    #[test]
    fn disagreeing_branches_are_errors() {
        let nat = "-A PREROUTING -m statistic --mode random --probability 0.5 -j SEP1
                   -A PREROUTING -j SEP2
                   -A SEP1 -s 10.244.0.5/32 -j MARK --or-mark 0x4000
                   -A SEP1 -j DNAT --to-destination 10.244.0.5:80
                   -A SEP2 -j DNAT --to-destination 10.244.1.6:80
                   -A POSTROUTING -m mark --mark 0x4000/0x4000 -j MASQUERADE";
        let err = trace(&dump(&[("nat", nat)]), &pod("10.96.0.1", 80), &node()).unwrap_err();
        assert_eq!(
            err,
            TraceError::AmbiguousMasquerade {
                masqueraded: vec!["10.244.0.5:80".into()],
                kept: vec!["10.244.1.6:80".into()]
            }
        );
        let filter = "-A FORWARD -d 10.244.1.6/32 -j DROP";
        let nat = "-A PREROUTING -m statistic --mode random --probability 0.5 -j DNAT --to-destination 10.244.0.5:80
                   -A PREROUTING -j DNAT --to-destination 10.244.1.6:80";
        let err = trace(
            &dump(&[("nat", nat), ("filter", filter)]),
            &pod("10.96.0.1", 80),
            &node(),
        )
        .unwrap_err();
        assert!(matches!(err, TraceError::AmbiguousVerdict { .. }), "{err}");
    }

    #[test]
    fn errors_name_the_rule() {
        let p = pod("10.96.0.1", 80);
        let err = trace(
            &dump(&[("nat", "-A PREROUTING -m multiport --dports 80 -j X")]),
            &p,
            &node(),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "nat/PREROUTING: cannot read rule `-A PREROUTING -m multiport --dports 80 -j X`: match module \
             \"multiport\" is not understood"
        );
        // Jumps to a chain the table lacks.
        let mut saved = dump(&[("nat", "-A PREROUTING -j X")]);
        saved.tables.get_mut("nat").unwrap().chains.remove("X");
        assert!(matches!(
            trace(&saved, &p, &node()),
            Err(TraceError::UndefinedChain { .. })
        ));
        // NAT targets outside their hooks.
        let err = trace(
            &dump(&[("nat", "-A POSTROUTING -j DNAT --to-destination 10.1.1.1:1")]),
            &p,
            &node(),
        )
        .unwrap_err();
        assert!(matches!(err, TraceError::MisplacedTarget { target: "DNAT", .. }));
        // Loops.
        let err = trace(&dump(&[("nat", "-A PREROUTING -j A\n-A A -j A")]), &p, &node()).unwrap_err();
        assert!(matches!(err, TraceError::TooDeep { .. }));
    }

    #[test]
    fn unreached_rules_are_not_read() {
        let nat = "-A PREROUTING -d 10.99.0.0/16 -j ODD
                   -A ODD -m multiport --dports 80 -j X";
        assert!(trace(&dump(&[("nat", nat)]), &pod("10.96.0.1", 80), &node()).is_ok());
    }
}
