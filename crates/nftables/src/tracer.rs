//! Walks a table the way netfilter would walk the first packet of a new connection, and reports where it can
//! end up.
//!
//! Base chains run hook by hook in priority order: from a pod or from outside, prerouting, then input (for a
//! local destination) or forward and postrouting; from the host, output and postrouting, then (for a local
//! destination, over loopback) the filter chains of prerouting and input. NAT chains run once per direction,
//! as the kernel consults them only for a connection's first packet. `dnat` and `masquerade` end their base
//! chain with an accept, as in the kernel, and a `dnat` that changed the destination sets the connection's
//! `ct status dnat` for the chains after it.
//!
//! Random choices (`numgen`) are not drawn: every candidate is followed, so the trace lists every endpoint the
//! connection may reach. Dynamic sets (affinity) are empty, as they are for a client's first connection. When
//! candidates disagree, `masquerade` is true if any candidate masquerades and the verdict is `Accept` if any
//! candidate is accepted.

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;
use svcproxy_model::Protocol;
use svcproxy_model::trace::{Origin, Packet, Trace, TraceStep, Verdict};
use thiserror::Error;

use crate::rule_syntax::{Item, MapRef, MarkOp, Operand, RuleSyntaxError, Selector, Verdict as RuleVerdict};
use crate::ruleset::{ChainType, Hook, Policy, Ruleset};

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TraceError {
    #[error("chain {chain}, rule {rule:?}: {source}")]
    Syntax {
        chain: String,
        rule: String,
        source: RuleSyntaxError,
    },
    #[error("chain {chain} refers to missing chain {target}")]
    MissingChain { chain: String, target: String },
    #[error("chain {chain} refers to missing set {set}")]
    MissingSet { chain: String, set: String },
    #[error("chain {chain}: cannot compare {value:?} with the packet's {what}")]
    Value {
        chain: String,
        value: String,
        what: &'static str,
    },
    #[error("jumps nest deeper than {0}; the ruleset loops")]
    TooDeep(usize),
}

/// The kernel refuses jump stacks deeper than 16; a read-back that needs more is broken.
const MAX_DEPTH: usize = 16;

/// Packet state along one candidate path.
#[derive(Debug, Clone)]
struct State {
    saddr: IpAddr,
    daddr: IpAddr,
    dport: u16,
    proto: Protocol,
    mark: u32,
    /// A DNAT rewrote the destination: the kernel's `IPS_DST_NAT`, shown as `ct status dnat`.
    dnat: bool,
    endpoint: Option<String>,
    masquerade: bool,
    steps: Vec<TraceStep>,
}

/// How a chain (or one rule) ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Flow {
    /// Fell off the end or hit `return`: back to the caller.
    Return,
    Accept,
    Drop,
    Reject,
}

/// A value of the packet as one selector sees it.
enum Seen {
    Addr(IpAddr),
    Text(&'static str),
    Num(u32),
    /// `ct status`: of the bits a new connection can carry, only `dnat` may be set.
    Status {
        dnat: bool,
    },
    /// numgen: any value in the range.
    Random {
        from: u32,
        to: u32,
    },
    /// The selector's protocol does not match (`tcp dport` on a UDP packet): the match fails.
    Absent,
}

struct Tracer<'a> {
    rs: &'a Ruleset,
    origin: Origin,
    node_ips: &'a [IpAddr],
}

fn proto_name(p: Protocol) -> &'static str {
    p.lower()
}

fn proto_matches(text: &str, p: Protocol) -> bool {
    match text {
        "tcp" | "6" => p == Protocol::Tcp,
        "udp" | "17" => p == Protocol::Udp,
        "sctp" | "132" => p == Protocol::Sctp,
        _ => false,
    }
}

/// `10.0.0.1`, `10.0.0.0/8`, `10.0.0.1-10.0.0.9` against an address.
fn addr_matches(text: &str, addr: IpAddr) -> Option<bool> {
    if let Some((a, b)) = text.split_once('-') {
        let (a, b): (IpAddr, IpAddr) = (a.parse().ok()?, b.parse().ok()?);
        return Some(a <= addr && addr <= b);
    }
    if text.contains('/') {
        let net: IpNet = text.parse().ok()?;
        return Some(net.contains(&addr));
    }
    Some(text.parse::<IpAddr>().ok()? == addr)
}

fn num_matches(text: &str, value: u32) -> Option<bool> {
    if let Some((a, b)) = text.split_once('-') {
        let a = crate::rule_syntax::parse_number(a).ok()?;
        let b = crate::rule_syntax::parse_number(b).ok()?;
        return Some(a <= value && value <= b);
    }
    Some(crate::rule_syntax::parse_number(text).ok()? == value)
}

impl Tracer<'_> {
    fn is_local(&self, addr: IpAddr) -> bool {
        addr.is_loopback() || self.node_ips.contains(&addr)
    }

    fn see(&self, sel: Selector, st: &State) -> Seen {
        match sel {
            Selector::Saddr => Seen::Addr(st.saddr),
            Selector::Daddr => Seen::Addr(st.daddr),
            Selector::L4proto => Seen::Text(proto_name(st.proto)),
            Selector::Dport(Some(p)) if p != proto_name(st.proto) => Seen::Absent,
            Selector::Dport(_) => Seen::Num(u32::from(st.dport)),
            Selector::Mark => Seen::Num(st.mark),
            Selector::FibSaddrType => Seen::Text(if self.is_local(st.saddr) {
                "local"
            } else {
                "unicast"
            }),
            Selector::FibDaddrType => Seen::Text(if self.is_local(st.daddr) {
                "local"
            } else {
                "unicast"
            }),
            Selector::CtState => Seen::Text("new"),
            Selector::CtStatus => Seen::Status { dnat: st.dnat },
            // Interface names are not part of a traced packet; a detector by interface names pod interfaces.
            Selector::Iifname => Seen::Text(if self.origin == Origin::Pod {
                "pod"
            } else {
                "other"
            }),
            Selector::Numgen { modulus, offset } => Seen::Random {
                from: offset,
                to: offset + modulus.saturating_sub(1),
            },
        }
    }

    /// Does one printed value (one key component) cover what the packet shows? `Random` gives every value
    /// of the range a chance, so it matches when the value falls inside it.
    fn component_matches(
        &self,
        chain: &str,
        seen: &Seen,
        text: &str,
        mask: Option<u32>,
    ) -> Result<bool, TraceError> {
        let bad = |what| TraceError::Value {
            chain: chain.to_string(),
            value: text.to_string(),
            what,
        };
        Ok(match seen {
            Seen::Absent => false,
            Seen::Addr(a) => addr_matches(text, *a).ok_or_else(|| bad("address"))?,
            Seen::Text("new") => text.split(',').any(|s| s.trim() == "new"),
            Seen::Text(t @ ("tcp" | "udp" | "sctp")) => {
                let p = match *t {
                    "tcp" => Protocol::Tcp,
                    "udp" => Protocol::Udp,
                    _ => Protocol::Sctp,
                };
                proto_matches(text, p)
            }
            Seen::Text("pod") => true,
            Seen::Text("other") => false,
            Seen::Text(t) => text == *t,
            Seen::Num(n) => num_matches(text, n & mask.unwrap_or(u32::MAX)).ok_or_else(|| bad("number"))?,
            // A list of flags matches when any of them is set. Before its first packet leaves postrouting a
            // connection is not confirmed, has seen no reply and has no source NAT yet.
            Seen::Status { dnat } => {
                let mut any = false;
                for flag in text.split(',').map(str::trim) {
                    any |= match flag {
                        "dnat" => *dnat,
                        "expected" | "seen-reply" | "assured" | "confirmed" | "snat" | "dying" => false,
                        _ => return Err(bad("conntrack status")),
                    };
                }
                any
            }
            Seen::Random { from, to } => {
                let v = crate::rule_syntax::parse_number(text).map_err(|_| bad("number"))?;
                *from <= v && v <= *to
            }
        })
    }

    /// Whether a concatenated key (`a . b . c`) matches the selectors.
    fn key_matches(&self, chain: &str, sels: &[Selector], st: &State, key: &str) -> Result<bool, TraceError> {
        let parts: Vec<&str> = key.split(" . ").map(str::trim).collect();
        if parts.len() != sels.len() {
            return Ok(false);
        }
        for (sel, part) in sels.iter().zip(parts) {
            if !self.component_matches(chain, &self.see(*sel, st), part, None)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn named_set(&self, chain: &str, name: &str) -> Result<&crate::ruleset::Set, TraceError> {
        self.rs.sets.get(name).ok_or_else(|| TraceError::MissingSet {
            chain: chain.to_string(),
            set: name.to_string(),
        })
    }

    /// Outcomes of a match: `(matched, how many alternatives)`. A numgen comparison can go either way.
    fn eval_match(
        &self,
        chain: &str,
        sels: &[Selector],
        mask: Option<u32>,
        negate: bool,
        operand: &Operand,
        st: &State,
    ) -> Result<Vec<bool>, TraceError> {
        if let [Selector::Numgen { modulus, offset }] = sels
            && let Operand::Value(v) = operand
            && *modulus > 1
        {
            let v = crate::rule_syntax::parse_number(v).map_err(|_| TraceError::Value {
                chain: chain.to_string(),
                value: v.clone(),
                what: "number",
            })?;
            let inside = *offset <= v && v < offset + modulus;
            // Inside the range, some draws match and some do not.
            return Ok(if inside { vec![true, false] } else { vec![negate] });
        }
        if sels.iter().any(|s| matches!(self.see(*s, st), Seen::Absent)) {
            return Ok(vec![false]);
        }
        let found = match operand {
            Operand::Value(v) => {
                if sels.len() == 1 {
                    self.component_matches(chain, &self.see(sels[0], st), v, mask)?
                } else {
                    self.key_matches(chain, sels, st, v)?
                }
            }
            Operand::AnonSet(items) => {
                let mut any = false;
                for item in items {
                    if self.key_matches(chain, sels, st, item)? {
                        any = true;
                        break;
                    }
                }
                any
            }
            Operand::Named(name) => {
                let set = self.named_set(chain, name)?;
                // Dynamic sets are filled by traffic; a first packet finds them empty.
                let mut any = false;
                if !set.is_dynamic() {
                    for key in set.elements.keys() {
                        if self.key_matches(chain, sels, st, key)? {
                            any = true;
                            break;
                        }
                    }
                }
                any
            }
        };
        Ok(vec![found != negate])
    }

    /// Verdicts a vmap lookup can yield (none when the key is missing).
    fn eval_vmap(
        &self,
        chain: &str,
        sels: &[Selector],
        map: &MapRef,
        st: &State,
    ) -> Result<Vec<String>, TraceError> {
        if sels.iter().any(|s| matches!(self.see(*s, st), Seen::Absent)) {
            return Ok(Vec::new());
        }
        let random = matches!(sels, [Selector::Numgen { .. }]);
        let mut out = Vec::new();
        let mut consider = |key: &str, verdict: &str| -> Result<bool, TraceError> {
            if self.key_matches(chain, sels, st, key)? {
                out.push(verdict.to_string());
                // A deterministic key finds one element; a random one may reach any in its range.
                return Ok(!random);
            }
            Ok(false)
        };
        match map {
            MapRef::Anon(entries) => {
                for (k, v) in entries {
                    if consider(k, v)? {
                        break;
                    }
                }
            }
            MapRef::Named(name) => {
                let set = self.named_set(chain, name)?;
                for (k, e) in &set.elements {
                    if let Some(v) = &e.value
                        && consider(k, v)?
                    {
                        break;
                    }
                }
            }
        }
        Ok(out)
    }

    fn verdict_of(&self, chain: &str, text: &str) -> Result<RuleVerdict, TraceError> {
        let rule = crate::rule_syntax::parse_rule(text).map_err(|source| TraceError::Syntax {
            chain: chain.to_string(),
            rule: text.to_string(),
            source,
        })?;
        match rule.items.as_slice() {
            [Item::Verdict(v)] => Ok(v.clone()),
            _ => Err(TraceError::Value {
                chain: chain.to_string(),
                value: text.to_string(),
                what: "verdict",
            }),
        }
    }

    /// Runs `chain` from rule `from`; returns every way it can end.
    fn run(
        &self,
        st: State,
        chain: &str,
        from: usize,
        depth: usize,
    ) -> Result<Vec<(State, Flow)>, TraceError> {
        if depth > MAX_DEPTH {
            return Err(TraceError::TooDeep(MAX_DEPTH));
        }
        let c = self
            .rs
            .chains
            .get(chain)
            .ok_or_else(|| TraceError::MissingChain {
                chain: String::from("(caller)"),
                target: chain.to_string(),
            })?;
        let mut st = st;
        for idx in from..c.rules.len() {
            let text = &c.rules[idx];
            let rule = crate::rule_syntax::parse_rule(text).map_err(|source| TraceError::Syntax {
                chain: chain.to_string(),
                rule: text.clone(),
                source,
            })?;
            let outcomes = self.eval_rule(chain, text, &rule.items, st.clone())?;
            // The common case: one outcome that does not leave the chain.
            let mut results = Vec::new();
            let mut continue_with = None;
            for (s, v) in outcomes {
                match v {
                    None if continue_with.is_none() => continue_with = Some(s),
                    None => results.extend(self.run(s, chain, idx + 1, depth)?),
                    Some(RuleVerdict::Jump(target)) => {
                        for (s2, flow) in self.call(s, chain, &target, depth)? {
                            if flow == Flow::Return {
                                results.extend(self.run(s2, chain, idx + 1, depth)?);
                            } else {
                                results.push((s2, flow));
                            }
                        }
                    }
                    Some(RuleVerdict::Goto(target)) => results.extend(self.call(s, chain, &target, depth)?),
                    Some(RuleVerdict::Return) => results.push((s, Flow::Return)),
                    Some(RuleVerdict::Continue) => results.extend(self.run(s, chain, idx + 1, depth)?),
                    Some(RuleVerdict::Accept) => results.push((s, Flow::Accept)),
                    Some(RuleVerdict::Drop) => results.push((s, Flow::Drop)),
                    Some(RuleVerdict::Reject) => results.push((s, Flow::Reject)),
                }
            }
            match continue_with {
                Some(s) if results.is_empty() => st = s,
                Some(s) => {
                    results.extend(self.run(s, chain, idx + 1, depth)?);
                    return Ok(results);
                }
                None => return Ok(results),
            }
        }
        Ok(vec![(st, Flow::Return)])
    }

    fn call(
        &self,
        st: State,
        from: &str,
        target: &str,
        depth: usize,
    ) -> Result<Vec<(State, Flow)>, TraceError> {
        if !self.rs.chains.contains_key(target) {
            return Err(TraceError::MissingChain {
                chain: from.to_string(),
                target: target.to_string(),
            });
        }
        self.run(st, target, 0, depth + 1)
    }

    /// Evaluates one rule's items in order. Each outcome is the state after the rule and the verdict it
    /// issued (`None`: the rule did not match, or matched without a verdict; go on with the next rule).
    fn eval_rule(
        &self,
        chain: &str,
        text: &str,
        items: &[Item],
        st: State,
    ) -> Result<Vec<(State, Option<RuleVerdict>)>, TraceError> {
        let Some((item, rest)) = items.split_first() else {
            return Ok(vec![(st, None)]);
        };
        let label = format!("{} {}/{chain}", self.rs.family, self.rs.name);
        // A rule with several effects is recorded once.
        let step = |mut s: State| {
            if s.steps.last().is_none_or(|l| l.rule != text || l.chain != label) {
                s.steps.push(TraceStep {
                    chain: label.clone(),
                    rule: text.to_string(),
                });
            }
            s
        };
        match item {
            Item::Match {
                selectors,
                mask,
                negate,
                operand,
            } => {
                let mut out = Vec::new();
                for matched in self.eval_match(chain, selectors, *mask, *negate, operand, &st)? {
                    if matched {
                        out.extend(self.eval_rule(chain, text, rest, st.clone())?);
                    } else {
                        out.push((st.clone(), None));
                    }
                }
                Ok(out)
            }
            Item::Vmap { selectors, map } => {
                let verdicts = self.eval_vmap(chain, selectors, map, &st)?;
                if verdicts.is_empty() {
                    return Ok(vec![(st, None)]);
                }
                let mut out = Vec::new();
                for v in verdicts {
                    out.push((step(st.clone()), Some(self.verdict_of(chain, &v)?)));
                }
                Ok(out)
            }
            Item::Verdict(v) => Ok(vec![(step(st), Some(v.clone()))]),
            Item::Dnat { addr, port } => {
                let s = self.dnat(chain, step(st), addr, *port)?;
                Ok(vec![(s, Some(RuleVerdict::Accept))])
            }
            Item::DnatMap { selectors, map } => {
                // Every element the key can find is a destination. A key without an element ends the rule,
                // as a failed match does, and the chain goes on: with a random key, whenever the range has
                // a hole.
                let range = match selectors.as_slice() {
                    [Selector::Numgen { modulus, .. }] => Some(*modulus as usize),
                    _ => None,
                };
                let mut out = Vec::new();
                if !selectors
                    .iter()
                    .any(|s| matches!(self.see(*s, &st), Seen::Absent))
                {
                    let set = self.named_set(chain, map)?;
                    for (key, element) in &set.elements {
                        if let Some(value) = &element.value
                            && self.key_matches(chain, selectors, &st, key)?
                        {
                            let (addr, port) = value.split_once(" . ").ok_or_else(|| TraceError::Value {
                                chain: chain.to_string(),
                                value: value.to_string(),
                                what: "address . port",
                            })?;
                            let port = port.trim().parse().map_err(|_| TraceError::Value {
                                chain: chain.to_string(),
                                value: value.to_string(),
                                what: "port",
                            })?;
                            let s = self.dnat(chain, step(st.clone()), addr.trim(), Some(port))?;
                            out.push((s, Some(RuleVerdict::Accept)));
                        }
                    }
                }
                if out.is_empty() || range.is_some_and(|n| out.len() < n) {
                    out.push((st, None));
                }
                Ok(out)
            }
            Item::Masquerade => {
                let mut s = step(st);
                s.masquerade = true;
                Ok(vec![(s, Some(RuleVerdict::Accept))])
            }
            Item::SetMark(op) => {
                let mut s = st;
                s.mark = match *op {
                    MarkOp::Set(v) => v,
                    MarkOp::Or(v) => s.mark | v,
                    MarkOp::Xor(v) => s.mark ^ v,
                    MarkOp::And(v) => s.mark & v,
                };
                let out = self.eval_rule(chain, text, rest, s)?;
                Ok(out.into_iter().map(|(s, v)| (step(s), v)).collect())
            }
            Item::UpdateSet(_) | Item::Annotation => {
                let out = self.eval_rule(chain, text, rest, st)?;
                Ok(out.into_iter().map(|(s, v)| (step(s), v)).collect())
            }
        }
    }

    fn dnat(&self, chain: &str, mut s: State, addr: &str, port: Option<u16>) -> Result<State, TraceError> {
        let ip: IpAddr = addr.parse().map_err(|_| TraceError::Value {
            chain: chain.to_string(),
            value: addr.to_string(),
            what: "address",
        })?;
        // The kernel sets the status bit only when the rewrite changes the tuple.
        s.dnat |= ip != s.daddr || port.is_some_and(|p| p != s.dport);
        s.daddr = ip;
        if let Some(p) = port {
            s.dport = p;
        }
        s.endpoint = Some(crate::addr_text::socket_text(ip, s.dport));
        Ok(s)
    }

    /// Runs every base chain of `hook` on every live path.
    fn hook(
        &self,
        paths: Vec<(State, Option<Verdict>)>,
        hook: Hook,
        nat: bool,
    ) -> Result<Vec<(State, Option<Verdict>)>, TraceError> {
        let mut paths = paths;
        for (name, _, base) in self.rs.base_chains(hook) {
            if base.chain_type == ChainType::Nat && !nat {
                continue;
            }
            let mut next = Vec::new();
            for (st, ended) in paths {
                if ended.is_some() {
                    next.push((st, ended));
                    continue;
                }
                for (s, flow) in self.run(st, name, 0, 0)? {
                    let ended = match flow {
                        Flow::Accept => None,
                        Flow::Return if base.policy == Policy::Accept => None,
                        Flow::Return | Flow::Drop => Some(Verdict::Drop),
                        Flow::Reject => Some(Verdict::Reject),
                    };
                    next.push((s, ended));
                }
            }
            paths = next;
        }
        Ok(paths)
    }
}

/// Traces `packet` through `ruleset`. `node_ips` are the node's own addresses: they decide `fib … type
/// local` and whether a destination is delivered locally.
pub fn trace(ruleset: &Ruleset, packet: &Packet, node_ips: &[IpAddr]) -> Result<Trace, TraceError> {
    let tracer = Tracer {
        rs: ruleset,
        origin: packet.origin,
        node_ips,
    };
    let start = State {
        saddr: packet.source,
        daddr: packet.destination,
        dport: packet.port,
        proto: packet.protocol,
        mark: 0,
        dnat: false,
        endpoint: None,
        masquerade: false,
        steps: Vec::new(),
    };
    let mut paths = vec![(start, None)];
    match packet.origin {
        Origin::Pod | Origin::External => {
            paths = tracer.hook(paths, Hook::Prerouting, true)?;
            let mut done = Vec::new();
            for (st, ended) in paths {
                if ended.is_some() {
                    done.push((st, ended));
                } else if tracer.is_local(st.daddr) {
                    done.extend(tracer.hook(vec![(st, None)], Hook::Input, true)?);
                } else {
                    let fwd = tracer.hook(vec![(st, None)], Hook::Forward, true)?;
                    done.extend(tracer.hook(fwd, Hook::Postrouting, true)?);
                }
            }
            paths = done;
        }
        Origin::Host => {
            paths = tracer.hook(paths, Hook::Output, true)?;
            paths = tracer.hook(paths, Hook::Postrouting, true)?;
            let mut done = Vec::new();
            for (st, ended) in paths {
                if ended.is_none() && tracer.is_local(st.daddr) {
                    // Looped back: the connection's NAT is already decided, only filter chains run.
                    let pre = tracer.hook(vec![(st, None)], Hook::Prerouting, false)?;
                    done.extend(tracer.hook(pre, Hook::Input, false)?);
                } else {
                    done.push((st, ended));
                }
            }
            paths = done;
        }
    }

    let mut steps: Vec<TraceStep> = Vec::new();
    let mut endpoints = BTreeSet::new();
    let mut masquerade = false;
    let mut verdicts = BTreeSet::new();
    for (st, ended) in &paths {
        for s in &st.steps {
            if !steps.contains(s) {
                steps.push(s.clone());
            }
        }
        let verdict = ended.unwrap_or(Verdict::Accept);
        if verdict == Verdict::Accept {
            endpoints.extend(st.endpoint.clone());
            masquerade |= st.masquerade;
        }
        verdicts.insert(format!("{verdict:?}"));
    }
    let verdict = if verdicts.contains("Accept") || paths.is_empty() {
        Verdict::Accept
    } else if verdicts.contains("Reject") {
        Verdict::Reject
    } else {
        Verdict::Drop
    };
    Ok(Trace {
        steps,
        endpoints: endpoints.into_iter().collect(),
        masquerade,
        verdict,
    })
}
