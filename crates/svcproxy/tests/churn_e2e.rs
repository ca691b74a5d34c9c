//! Random churn on a real kernel, in both modes. A seeded sequence of Service and EndpointSlice changes (types,
//! traffic policies, affinity, source ranges, externalIPs, endpoint conditions across two nodes, slices split
//! and merged, Services deleted and re-created, now and then an invalid object) reaches a running svcproxy
//! through its manifest directory, a few at a time, while it syncs, beside 1,100 background Services that now
//! and then change in bulk (so a sync spans several transactions, and a kill can land between them). After
//! each round:
//!
//! - the rules it reached by partial syncs must be exactly the rules a cold start writes for the same objects
//!   (every chain, rule, map and element; read with `iptables-save` / `nft list table`, only the seal's
//!   generation-stamped chain left out), checked by stopping it, removing everything (`svcproxy cleanup`) and
//!   starting afresh; every other round it restarts onto its own rules instead, which must leave them as they
//!   were;
//! - real connections reach only the endpoints the objects allow: the ClusterIP from a pod on the node and the
//!   NodePort from outside, each answered by a backend of the right set, or refused or dropped when the set is
//!   empty;
//! - no sync failed and no read-back found the kernel different from what was written, though now and then
//!   svcproxy is killed (SIGKILL) between two changes and started again.
//!
//! Endpoints carry topology hints (for zones, and for nodes) or not, and the Node moves between zones now and
//! then: a change that concerns every Service at once, with cluster-wide traffic kept to the endpoints hinted
//! for this node or its zone while every ready endpoint is hinted and one names them. Its InternalIP moves
//! between two addresses of the node too, which in nftables mode moves the NodePorts. Two slices of a Service
//! may list the same address with copies that disagree, and a deleted Service's addresses (ClusterIP,
//! NodePorts, load-balancer IP) may pass to another Service, in the same sync or later.
//!
//! Now and then a round ends with the node moved to the other mode and back, as an operator trying the other
//! backend would: each daemon starts over the other's rules, must program everything (traffic is checked in
//! between) and retire the other mode's rules, and the rules it reaches back home are again what a fresh
//! start writes.
//!
//! The objects reach it through a manifest directory, or through a fake API server over list/watch, whose
//! watches are now and then broken (svcproxy resumes) or compacted away (it must relist, and notice what was
//! deleted meanwhile).
//!
//! `CHURN_SEED=<n>` replays one sequence (the seed is printed on failure); `CHURN_ROUNDS=<n>` runs longer.

#[macro_use]
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::{Svcproxy, TempDir};
use proptest::prelude::Rng;
use proptest::test_runner::{RngAlgorithm, TestRng};
use serde_json::Value;
use svcproxy_nftables::slots::{placement, slot_of_rule};
use svcproxy_nftables::{Family, Ruleset, parse_listing};
use svcproxy_testkit::{
    Backend, ClientError, FakeApiServer, Lab, NetNs, Pod, http_get, tcp_request, wait_until,
};

const SERVICES: u8 = 8;
/// Address sets a Service can have (its ClusterIP, NodePorts, load-balancer IP and externalIP are picked by
/// one index): more than the Services, so a freed set is sometimes reused and sometimes not.
const ADDRESSES: u8 = 16;
/// Services in the background, beyond the ones traffic checks: enough that a cold sync, or a change to many of
/// them, spans several transactions in either mode (iptables: 1,000 chains each; nftables: 1,000 services).
const FILLER: u16 = 1100;
const STEPS_PER_ROUND: usize = 12;
const ROUNDS: usize = 4;
/// The endpoint pods, 10.244.0.N, each answering TCP 8080 and UDP 5353 with its name.
const POD_IPS: [u8; 4] = [11, 12, 13, 14];
const NODE: &str = "node-a";
const NODE_IP: &str = "10.0.0.10";
/// The node's two addresses on the external link; the Node object names one of them its InternalIP, which in
/// nftables mode is the only address NodePorts answer on (`--nodeport-addresses primary`, the default there),
/// while in iptables mode every local address answers.
const NODE_IPS: [&str; 2] = [NODE_IP, "10.0.0.11"];
const ZONES: [&str; 2] = ["zone-a", "zone-b"];
const WAIT: Duration = Duration::from_secs(30);
/// How long a request may take to count as answered; a dropped one fails after it.
const REQUEST: Duration = Duration::from_millis(1500);

/// Deterministic randomness for one run.
struct Dice(TestRng);

impl Dice {
    fn new(seed: u64) -> Dice {
        let mut bytes = [0u8; 32];
        bytes[..8].copy_from_slice(&seed.to_le_bytes());
        Dice(TestRng::from_seed(RngAlgorithm::ChaCha, &bytes))
    }
    fn below(&mut self, n: u32) -> u32 {
        self.0.next_u32() % n
    }
    fn chance(&mut self, percent: u32) -> bool {
        self.below(100) < percent
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    ClusterIp,
    NodePort,
    LoadBalancer,
}

#[derive(Clone, Debug)]
struct Ep {
    pod: u8,
    local: bool,
    ready: bool,
    serving: bool,
    terminating: bool,
    /// `hints.forZones`: the zone (of `ZONES`) it is hinted for.
    zone_hint: Option<u8>,
    /// `hints.forNodes`, naming the endpoint's own node.
    node_hint: bool,
}

impl Ep {
    fn node(&self) -> &'static str {
        if self.local { NODE } else { "node-b" }
    }
}

#[derive(Clone, Debug)]
struct Svc {
    /// Which address set it has: `10.96.1.(10+addr)`, NodePorts `30000 + 10*addr + p`, and so on. Kept by
    /// updates; a Service deleted and another created in its place may get the same set.
    addr: u8,
    kind: Kind,
    udp: bool,
    etp_local: bool,
    itp_local: bool,
    affinity: bool,
    source_ranges: bool,
    external_ip: bool,
    /// A second TCP port, `admin` 81 to the same target.
    admin_port: bool,
    /// `sessionAffinityConfig.clientIP.timeoutSeconds`, when not the default.
    affinity_timeout: Option<u32>,
    /// The load-balancer ingress is `ipMode: Proxy`: left to the load balancer.
    ip_mode_proxy: bool,
    /// Labelled for another proxy (`service.kubernetes.io/service-proxy-name`): not ours to program.
    other_proxy: bool,
    /// `clusterIP: None`.
    headless: bool,
    /// Each inner list is one EndpointSlice.
    slices: Vec<Vec<Ep>>,
    /// Written with an invalid field: what becomes of it is the daemon's call, so traffic is not checked.
    broken: bool,
}

fn random_endpoints(d: &mut Dice) -> Vec<Vec<Ep>> {
    let pods: Vec<u8> = POD_IPS.iter().copied().filter(|_| d.chance(55)).collect();
    // As the EndpointSlice controller writes them: no hints, zone hints, or zone and node hints; now and then
    // one endpoint lacks them (mid-update), which voids them all.
    let (zones, nodes) = match d.below(3) {
        0 => (false, false),
        1 => (true, false),
        _ => (true, true),
    };
    let mut eps: Vec<Ep> = pods
        .into_iter()
        .map(|pod| {
            // Mostly ready; otherwise terminating but still serving (the fallback), or neither.
            let (ready, serving, terminating) = match d.below(10) {
                0..=5 => (true, true, false),
                6 | 7 => (false, true, true),
                8 => (false, false, false),
                _ => (false, false, true),
            };
            let hinted = d.chance(90);
            Ep {
                pod,
                local: d.chance(50),
                ready,
                serving,
                terminating,
                zone_hint: (zones && hinted).then(|| d.below(2) as u8),
                node_hint: nodes && hinted,
            }
        })
        .collect();
    match d.below(4) {
        0 => Vec::new(),
        1 if eps.len() > 1 => {
            let mut second = eps.split_off(eps.len() / 2);
            // The same address in both slices, as while the controller moves an endpoint between slices or a
            // new pod has the address of one still terminating: its copies may disagree.
            if d.chance(40) {
                let mut copy = eps[d.below(eps.len() as u32) as usize].clone();
                copy.local = d.chance(50);
                (copy.ready, copy.serving, copy.terminating) = match d.below(3) {
                    0 => (true, true, false),
                    1 => (false, true, true),
                    _ => (false, false, true),
                };
                second.push(copy);
            }
            vec![eps, second]
        }
        _ => vec![eps],
    }
}

fn random_service(d: &mut Dice, addr: u8) -> Svc {
    let kind = match d.below(3) {
        0 => Kind::ClusterIp,
        1 => Kind::NodePort,
        _ => Kind::LoadBalancer,
    };
    Svc {
        addr,
        kind,
        udp: d.chance(40),
        etp_local: d.chance(35),
        itp_local: d.chance(25),
        affinity: d.chance(25),
        source_ranges: d.chance(40),
        external_ip: d.chance(30),
        admin_port: d.chance(25),
        affinity_timeout: d.chance(30).then(|| 60 + d.below(1000)),
        ip_mode_proxy: d.chance(15),
        other_proxy: d.chance(8),
        headless: kind == Kind::ClusterIp && d.chance(15),
        slices: random_endpoints(d),
        broken: false,
    }
}

fn manifest(i: u8, s: &Svc) -> String {
    let external = s.kind != Kind::ClusterIp;
    let a = s.addr;
    let mut text = String::new();
    let cluster_ip = if s.broken {
        format!("10.96.1.{}", 300 + u32::from(a))
    } else if s.headless {
        "None".to_string()
    } else {
        format!("10.96.1.{}", 10 + a)
    };
    let node_port = |p: u16| {
        if external {
            format!(", nodePort: {}", 30000 + u16::from(a) * 10 + p)
        } else {
            String::new()
        }
    };
    let kind = match s.kind {
        Kind::ClusterIp => "ClusterIP",
        Kind::NodePort => "NodePort",
        Kind::LoadBalancer => "LoadBalancer",
    };
    let labels = if s.other_proxy {
        ", labels: {service.kubernetes.io/service-proxy-name: someone-else}"
    } else {
        ""
    };
    writeln!(
        text,
        "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: churn{labels}}}\nspec:\n  \
         type: {kind}\n  clusterIP: {cluster_ip}\n  ports:\n  \
         - {{name: http, protocol: TCP, port: 80, targetPort: 8080{}}}",
        node_port(0)
    )
    .unwrap();
    if s.admin_port {
        writeln!(
            text,
            "  - {{name: admin, protocol: TCP, port: 81, targetPort: 8080{}}}",
            node_port(1)
        )
        .unwrap();
    }
    if s.udp {
        writeln!(
            text,
            "  - {{name: dns, protocol: UDP, port: 53, targetPort: 5353{}}}",
            node_port(3)
        )
        .unwrap();
    }
    if external && s.etp_local {
        text.push_str("  externalTrafficPolicy: Local\n");
        if s.kind == Kind::LoadBalancer {
            writeln!(text, "  healthCheckNodePort: {}", 32100 + u16::from(a)).unwrap();
        }
    }
    if s.itp_local {
        text.push_str("  internalTrafficPolicy: Local\n");
    }
    if s.affinity {
        text.push_str("  sessionAffinity: ClientIP\n");
        if let Some(t) = s.affinity_timeout {
            writeln!(
                text,
                "  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {t}}}}}"
            )
            .unwrap();
        }
    }
    if s.external_ip && !s.headless {
        writeln!(text, "  externalIPs: [192.0.2.{}]", 10 + a).unwrap();
    }
    if s.kind == Kind::LoadBalancer {
        if s.source_ranges {
            text.push_str("  loadBalancerSourceRanges: [10.0.0.0/24, 203.0.113.0/24]\n");
        }
        writeln!(
            text,
            "status:\n  loadBalancer:\n    ingress:\n    - ip: 198.51.100.{}",
            10 + a
        )
        .unwrap();
        if s.ip_mode_proxy {
            text.push_str("      ipMode: Proxy\n");
        }
    }
    for (k, slice) in s.slices.iter().enumerate() {
        writeln!(
            text,
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: s{i}-{k}\n  \
             namespace: churn\n  labels: {{kubernetes.io/service-name: s{i}}}\naddressType: IPv4\nports:\n\
             - {{name: http, protocol: TCP, port: 8080}}\n- {{name: admin, protocol: TCP, port: 8080}}\n\
             - {{name: dns, protocol: UDP, port: 5353}}\nendpoints:"
        )
        .unwrap();
        if slice.is_empty() {
            text.truncate(text.len() - 1);
            text.push_str(" []\n");
        }
        for ep in slice {
            writeln!(
                text,
                "- addresses: [10.244.0.{}]\n  conditions: {{ready: {}, serving: {}, terminating: {}}}\n  \
                 nodeName: {}",
                ep.pod,
                ep.ready,
                ep.serving,
                ep.terminating,
                ep.node()
            )
            .unwrap();
            if let Some(zone) = ep.zone_hint {
                let zone = ZONES[usize::from(zone)];
                write!(text, "  zone: {zone}\n  hints: {{forZones: [{{name: {zone}}}]").unwrap();
                if ep.node_hint {
                    write!(text, ", forNodes: [{{name: {}}}]", ep.node()).unwrap();
                }
                text.push_str("}\n");
            }
        }
    }
    text
}

/// The endpoints cluster-wide traffic may go to, by the hints: while every ready endpoint carries them, only
/// those hinted for this node when one is (node hints first), else those hinted for this node's zone when one
/// is; with no ready endpoint, hints do not matter (the fallback to terminating ones ignores them).
fn by_topology(eps: Vec<&Ep>, node_zone: Option<u8>) -> Vec<&Ep> {
    let ready: Vec<&Ep> = eps.iter().copied().filter(|e| e.ready).collect();
    if ready.is_empty() {
        return eps;
    }
    if ready.iter().all(|e| e.node_hint) && ready.iter().any(|e| e.local) {
        return ready.into_iter().filter(|e| e.local).collect();
    }
    if let Some(zone) = node_zone
        && ready.iter().all(|e| e.zone_hint.is_some())
        && ready.iter().any(|e| e.zone_hint == Some(zone))
    {
        return ready.into_iter().filter(|e| e.zone_hint == Some(zone)).collect();
    }
    eps
}

/// The pods a new connection may reach: the ready endpoints of the pool, or when none is ready its serving
/// terminating ones (upstream's fallback).
fn reachable(pool: Vec<&Ep>) -> BTreeSet<String> {
    let ready: BTreeSet<String> = pool.iter().filter(|e| e.ready).map(|e| pod_name(e.pod)).collect();
    if !ready.is_empty() {
        return ready;
    }
    pool.iter()
        .filter(|e| e.serving && e.terminating)
        .map(|e| pod_name(e.pod))
        .collect()
}

fn pod_name(pod: u8) -> String {
    format!("pod{pod}")
}

impl Svc {
    /// Its endpoints, one per address: of two copies in different slices the one not terminating wins, then a
    /// local one, then the one in the slice whose name sorts first.
    fn endpoints(&self) -> Vec<&Ep> {
        let rank = |e: &Ep| (!e.terminating, e.local);
        let mut by_pod: BTreeMap<u8, &Ep> = BTreeMap::new();
        for ep in self.slices.iter().flatten() {
            match by_pod.get(&ep.pod) {
                Some(kept) if rank(kept) >= rank(ep) => {}
                _ => {
                    by_pod.insert(ep.pod, ep);
                }
            }
        }
        by_pod.into_values().collect()
    }

    /// Whether svcproxy programs it at all.
    fn programmed(&self) -> bool {
        !self.other_proxy && !self.headless
    }

    /// The endpoints a policy sends to: the local ones (hints never narrow them), or the cluster's, as the
    /// hints allow.
    fn pool(&self, local: bool, node_zone: Option<u8>) -> BTreeSet<String> {
        if !self.programmed() {
            return BTreeSet::new();
        }
        if local {
            reachable(self.endpoints().into_iter().filter(|e| e.local).collect())
        } else {
            reachable(by_topology(self.endpoints(), node_zone))
        }
    }

    /// From a pod on this node to the ClusterIP.
    fn internal_targets(&self, node_zone: Option<u8>) -> BTreeSet<String> {
        self.pool(self.itp_local, node_zone)
    }

    /// From outside to the NodePort, load-balancer IP or externalIP. The policy is written only for the
    /// types that have a NodePort.
    fn external_targets(&self, node_zone: Option<u8>) -> BTreeSet<String> {
        self.pool(self.etp_local && self.kind != Kind::ClusterIp, node_zone)
    }

    fn mutate(&mut self, d: &mut Dice) {
        match d.below(11) {
            7 => self.admin_port = !self.admin_port,
            8 => self.ip_mode_proxy = !self.ip_mode_proxy,
            9 => self.other_proxy = !self.other_proxy,
            10 => self.headless = !self.headless && self.kind == Kind::ClusterIp,
            0 => self.etp_local = !self.etp_local,
            1 => self.itp_local = !self.itp_local,
            2 => self.affinity = !self.affinity,
            3 => self.udp = !self.udp,
            4 => self.source_ranges = !self.source_ranges,
            5 => self.external_ip = !self.external_ip,
            _ => {
                self.headless = false;
                self.kind = match self.kind {
                    Kind::ClusterIp => Kind::NodePort,
                    Kind::NodePort => Kind::LoadBalancer,
                    Kind::LoadBalancer => Kind::ClusterIp,
                }
            }
        }
    }
}

/// What the kernel holds of ours, in a form two readings compare by.
#[derive(Debug, PartialEq)]
enum Rules {
    /// Per table and chain, the rule lines in order (the built-in chains included: our jumps live there).
    Iptables(BTreeMap<(String, String), Vec<String>>),
    Nftables(Option<Ruleset>),
}

fn read_rules(mode: &str, ns: &NetNs) -> Rules {
    if mode == "nftables" {
        let Ok(text) = ns.exec_stdout(&["nft", "list", "table", "ip", "svcproxy"]) else {
            return Rules::Nftables(None);
        };
        let listing =
            parse_listing(&text).unwrap_or_else(|e| panic!("our table does not parse: {e}\n{text}"));
        return Rules::Nftables(
            listing
                .table(Family::Ip, "svcproxy")
                .map(Ruleset::without_dynamic_elements)
                .map(by_owner),
        );
    }
    let mut chains = BTreeMap::new();
    for table in ["filter", "nat"] {
        let text = ns.exec_stdout(&["iptables-save", "-t", table]).unwrap();
        for line in text.lines() {
            if let Some(declared) = line.strip_prefix(':') {
                let name = declared.split(' ').next().unwrap_or_default().to_string();
                chains.entry((table.to_string(), name)).or_insert_with(Vec::new);
            } else if let Some(rule) = line.strip_prefix("-A ") {
                let (chain, _) = rule.split_once(' ').unwrap_or((rule, ""));
                chains
                    .entry((table.to_string(), chain.to_string()))
                    .or_insert_with(Vec::new)
                    .push(line.to_string());
            }
        }
    }
    // The seal names the ruleset generation it was written at: it differs between any two runs by design.
    chains.retain(|(_, chain), _| chain != "SVCPROXY-SEAL");
    Rules::Iptables(chains)
}

/// `rs` with each chain's endpoints moved out of the shared endpoint maps into a map of the chain's own.
///
/// Which map and base a chain picks its endpoints from (its slot) is kept from sync to sync and handed to
/// new chains lowest-free-first, so it depends on history: a cold start numbers the same chains differently.
/// What must agree is each chain's endpoints, and that nothing else is left in the shared maps.
fn by_owner(mut rs: Ruleset) -> Ruleset {
    let mut own = BTreeMap::new();
    for (name, chain) in rs.chains.iter_mut() {
        for rule in chain.rules.iter_mut() {
            let Some(slot) = slot_of_rule(rule) else { continue };
            let (map, base) = placement(slot);
            let (head, tail) = rule.split_once(" numgen random mod ").unwrap();
            let count: u32 = tail.split(' ').next().unwrap().parse().unwrap();
            let shared = rs
                .sets
                .get_mut(&map)
                .unwrap_or_else(|| panic!("{name} picks from missing {map}"));
            let mut mine = shared.clone();
            mine.elements.clear();
            for i in 0..count {
                let key = (base + i).to_string();
                if let Some(element) = shared.elements.remove(key.as_str()) {
                    mine.elements.insert(i.to_string().into(), element);
                }
            }
            let own_map = format!("endpoints of {name}");
            *rule = format!("{head} numgen random mod {count} map @{own_map}");
            own.insert(own_map, mine);
        }
    }
    rs.sets
        .retain(|name, set| !(name.starts_with("endpoints-") && set.elements.is_empty()));
    rs.sets.extend(own);
    rs
}

/// A readable account of how `got` differs from `want`.
fn rules_diff(want: &Rules, got: &Rules) -> String {
    let mut out = String::new();
    match (want, got) {
        (Rules::Iptables(want), Rules::Iptables(got)) => {
            for key in want.keys().chain(got.keys()).collect::<BTreeSet<_>>() {
                let (w, g) = (want.get(key), got.get(key));
                if w != g {
                    writeln!(out, "{}/{}:\n  cold: {w:#?}\n  churned: {g:#?}", key.0, key.1).unwrap();
                }
            }
        }
        (Rules::Nftables(Some(want)), Rules::Nftables(Some(got))) => {
            for name in want
                .chains
                .keys()
                .chain(got.chains.keys())
                .collect::<BTreeSet<_>>()
            {
                let (w, g) = (want.chains.get(name), got.chains.get(name));
                if w != g {
                    writeln!(out, "chain {name}:\n  cold: {w:?}\n  churned: {g:?}").unwrap();
                }
            }
            for name in want.sets.keys().chain(got.sets.keys()).collect::<BTreeSet<_>>() {
                let (w, g) = (want.sets.get(name), got.sets.get(name));
                if w != g {
                    writeln!(out, "set/map {name}:\n  cold: {w:?}\n  churned: {g:?}").unwrap();
                }
            }
            if out.is_empty() {
                writeln!(out, "cold: {want:?}\nchurned: {got:?}").unwrap();
            }
        }
        _ => writeln!(out, "cold: {want:?}\nchurned: {got:?}").unwrap(),
    }
    out
}

/// Where svcproxy reads the objects from.
enum Source {
    /// A manifest directory: one file per Service holding it and its slices.
    Dir(TempDir),
    /// A fake API server, with the kubeconfig svcproxy reaches it by; the slices written per Service, to
    /// delete the ones a rewrite no longer has.
    Api(FakeApiServer, TempDir, BTreeMap<u8, usize>),
}

impl Source {
    fn args(&self) -> Vec<String> {
        match self {
            Source::Dir(dir) => vec!["--manifests".into(), dir.path().to_str().unwrap().into()],
            Source::Api(_, dir, _) => vec![
                "--kubeconfig".into(),
                dir.path().join("kubeconfig").to_str().unwrap().into(),
            ],
        }
    }

    /// Publishes `text` (a Service and its slices) as object `name`'s whole state; `None` deletes it all.
    fn publish(&mut self, i: u8, text: Option<&str>) {
        let file = format!("s{i}.yaml");
        match (self, text) {
            (Source::Dir(dir), Some(text)) => dir.write(&file, text),
            (Source::Dir(dir), None) => dir.remove(&file),
            (Source::Api(api, _, written), text) => {
                let docs: Vec<Value> = text.map_or_else(Vec::new, |t| {
                    serde_saphyr::from_multiple(t).unwrap_or_else(|e| panic!("{e}\n{t}"))
                });
                let slices = docs.len().saturating_sub(1);
                for doc in docs {
                    api.store().apply(doc).unwrap();
                }
                let before = written.insert(i, slices).unwrap_or(0);
                for k in slices..before {
                    api.store()
                        .delete("EndpointSlice", Some("churn"), &format!("s{i}-{k}"));
                }
                if text.is_none() {
                    api.store().delete("Service", Some("churn"), &format!("s{i}"));
                    written.remove(&i);
                }
            }
        }
    }

    /// Publishes the background Services: `after` by index, each a Service and a slice of two endpoints at
    /// `10.245.A.B` and `.B+1`, where `before` is what was published last.
    fn publish_filler(&mut self, before: &BTreeMap<u16, (u8, u8)>, after: &BTreeMap<u16, (u8, u8)>) {
        match self {
            Source::Dir(dir) => {
                let text: String = after.iter().map(|(n, ep)| filler_manifest(*n, *ep)).collect();
                dir.write("filler.yaml", &text);
            }
            Source::Api(api, _, _) => {
                for (n, ep) in after {
                    if before.get(n) != Some(ep) {
                        let docs: Vec<Value> =
                            serde_saphyr::from_multiple(&filler_manifest(*n, *ep)).unwrap();
                        for doc in docs {
                            api.store().apply(doc).unwrap();
                        }
                    }
                }
                for n in before.keys().filter(|n| !after.contains_key(n)) {
                    api.store().delete("Service", Some("filler"), &format!("f{n}"));
                    api.store()
                        .delete("EndpointSlice", Some("filler"), &format!("f{n}-0"));
                }
            }
        }
    }

    /// Publishes `text`, other objects than the Services' (the marker, the Node), as the contents of `file`.
    fn publish_other(&mut self, file: &str, text: &str) {
        match self {
            Source::Dir(dir) => dir.write(file, text),
            Source::Api(api, _, _) => {
                let docs: Vec<Value> = serde_saphyr::from_multiple(text).unwrap();
                for doc in docs {
                    api.store().apply(doc).unwrap();
                }
            }
        }
    }
}

/// Background Service `n`, with its slice.
fn filler_manifest(n: u16, (a, b): (u8, u8)) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: f{n}, namespace: filler}}\nspec:\n  \
         clusterIP: 10.97.{}.{}\n  ports:\n  - {{name: http, protocol: TCP, port: 80, targetPort: 8080}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: f{n}-0\n  namespace: filler\n  \
         labels: {{kubernetes.io/service-name: f{n}}}\naddressType: IPv4\nports:\n\
         - {{name: http, protocol: TCP, port: 8080}}\nendpoints:\n- addresses: [10.245.{a}.{b}]\n  \
         conditions: {{ready: true}}\n- addresses: [10.245.{a}.{}]\n  conditions: {{ready: true}}\n",
        n / 250,
        n % 250 + 1,
        u16::from(b) + 1
    )
}

struct Churn {
    mode: &'static str,
    seed: u64,
    dice: Dice,
    services: BTreeMap<u8, Svc>,
    /// The background Services by index: their endpoints' third and fourth octets.
    filler: BTreeMap<u16, (u8, u8)>,
    /// The zone (of `ZONES`) the Node is labelled with.
    node_zone: Option<u8>,
    /// Which of `NODE_IPS` the Node names its InternalIP.
    primary: usize,
    source: Source,
    lab: Lab,
    client: Pod,
    _pods: Vec<(Pod, Backend)>,
    proxy: Option<Svcproxy>,
    /// The log of the process the round's restart stopped, for the failure message.
    stopped_log: String,
    /// Its `/debug/intent`.
    stopped_intent: String,
    /// What each step did, for the failure message.
    story: Vec<String>,
}

impl Churn {
    fn new(mode: &'static str, api: bool, seed: u64) -> Churn {
        let lab = Lab::new();
        let pods = POD_IPS
            .iter()
            .map(|&i| {
                let pod = lab.add_pod(&pod_name(i), Ipv4Addr::new(10, 244, 0, i));
                let backend = Backend::start(pod.ns(), pod.name(), &[8080], &[5353]);
                (pod, backend)
            })
            .collect();
        let client = lab.add_pod("client", Ipv4Addr::new(10, 244, 0, 50));
        let second = format!("{}/24", NODE_IPS[1]);
        lab.node()
            .exec(&["ip", "addr", "add", &second, "dev", "eth0"])
            .unwrap();
        for net in ["192.0.2.0/24", "198.51.100.0/24"] {
            lab.external()
                .exec(&["ip", "route", "add", net, "via", NODE_IP])
                .unwrap();
        }
        let source = if api {
            let server = FakeApiServer::start_in(lab.node(), "127.0.0.1:0".parse().unwrap());
            let dir = TempDir::new("churn-kubeconfig");
            server.write_kubeconfig(dir.path().join("kubeconfig")).unwrap();
            Source::Api(server, dir, BTreeMap::new())
        } else {
            Source::Dir(TempDir::new("churn"))
        };
        let mut churn = Churn {
            mode,
            seed,
            dice: Dice::new(seed),
            services: BTreeMap::new(),
            filler: BTreeMap::new(),
            node_zone: None,
            primary: 0,
            source,
            lab,
            client,
            _pods: pods,
            proxy: None,
            stopped_log: String::new(),
            stopped_intent: String::new(),
            story: Vec::new(),
        };
        for i in 0..SERVICES {
            if churn.dice.chance(60) {
                let addr = churn.free_addr();
                let svc = random_service(&mut churn.dice, addr);
                churn.write(i, svc, "start with");
            }
        }
        churn.move_node();
        churn.reshuffle_filler(100);
        churn.start();
        churn
    }

    /// Labels the Node with a zone, mostly; now and then with none. Now and then its InternalIP changes too.
    fn move_node(&mut self) {
        let zone = match self.dice.below(5) {
            0 => None,
            z => Some(((z - 1) / 2) as u8),
        };
        if self.dice.chance(30) {
            self.primary = 1 - self.primary;
        }
        let address = NODE_IPS[self.primary];
        let labels = zone.map_or(String::new(), |z| {
            format!(
                ", labels: {{topology.kubernetes.io/zone: {}}}",
                ZONES[usize::from(z)]
            )
        });
        let node = format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: {NODE}{labels}}}\nspec: {{podCIDR: 10.244.0.0/24}}\n\
             status: {{addresses: [{{type: InternalIP, address: {address}}}]}}\n"
        );
        self.source.publish_other("node.yaml", &node);
        self.node_zone = zone;
        self.story.push(format!(
            "node at {address} in zone {}",
            zone.map_or("(none)", |z| ZONES[usize::from(z)])
        ));
    }

    fn start(&mut self) {
        let mut args = self.source.args();
        args.extend(["--proxy-mode".to_string(), self.mode.to_string()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.proxy = Some(Svcproxy::start(self.lab.node(), &args));
    }

    fn proxy(&mut self) -> &mut Svcproxy {
        self.proxy.as_mut().expect("svcproxy runs")
    }

    fn write(&mut self, i: u8, svc: Svc, what: &str) {
        self.source.publish(i, Some(&manifest(i, &svc)));
        self.story.push(format!("{what} s{i}: {svc:?}"));
        self.services.insert(i, svc);
    }

    fn step(&mut self) {
        let i = self.dice.below(u32::from(SERVICES)) as u8;
        let roll = self.dice.below(100);
        match self.services.get(&i).cloned() {
            None => {
                let addr = self.free_addr();
                let svc = random_service(&mut self.dice, addr);
                self.write(i, svc, "create");
            }
            Some(mut svc) => match roll {
                0..35 => {
                    svc.slices = random_endpoints(&mut self.dice);
                    svc.broken = false;
                    self.write(i, svc, "new endpoints for");
                }
                35..55 => {
                    let svc = random_service(&mut self.dice, svc.addr);
                    self.write(i, svc, "replace");
                }
                55..72 => {
                    svc.mutate(&mut self.dice);
                    svc.broken = false;
                    self.write(i, svc, "change");
                }
                72..80 => {
                    self.delete(i);
                }
                // Deleted, and another Service created with its addresses at once (as a re-install with
                // fixed addresses does): its ClusterIP, NodePorts and load-balancer IP pass to other chains,
                // perhaps in the same sync.
                80..85 => {
                    let absent = (0..SERVICES).find(|j| !self.services.contains_key(j));
                    self.delete(i);
                    if let Some(j) = absent {
                        let mut heir = random_service(&mut self.dice, svc.addr);
                        heir.kind = svc.kind;
                        self.write(j, heir, "its addresses to");
                    }
                }
                85..91 => {
                    svc.broken = true;
                    self.write(i, svc, "break");
                }
                _ => {
                    svc.slices.clear();
                    svc.broken = false;
                    self.write(i, svc, "no endpoints for");
                }
            },
        }
        if let Source::Api(api, _, _) = &self.source {
            match self.dice.below(100) {
                // The watches end, as when the API server restarts: svcproxy resumes where it was.
                0..6 => {
                    api.store().break_watches();
                    self.story.push("watches broken".into());
                }
                // An outage: watches end and fail for a while, so the next changes are missed, and history
                // is compacted away meanwhile. Resuming fails with 410 Gone: svcproxy must list again and
                // find out what changed, deletions included.
                6..10 => {
                    api.store().set_fail_watches(4);
                    api.store().compact();
                    api.store().break_watches();
                    self.story
                        .push("watches broken and failing, history compacted".into());
                }
                _ => {}
            }
        }
        if self.dice.chance(8) {
            let percent = 10 + self.dice.below(60);
            self.reshuffle_filler(percent);
        }
        // The Node moves to another zone (or loses its label): every Service's endpoints are chosen again.
        if self.dice.chance(12) {
            self.move_node();
        }
        // Killed mid-stream, perhaps mid-sync, as the OOM killer would: the next start picks up whatever is
        // in the kernel.
        if self.dice.chance(4) {
            self.proxy().kill9();
            self.start();
            self.story.push("killed, started again".into());
        }
        // Some steps land in the same sync, some in a sync of their own.
        std::thread::sleep(Duration::from_millis(u64::from(self.dice.below(200))));
    }

    /// Gives `percent` of the background Services new endpoints (and deletes or re-creates a few).
    fn reshuffle_filler(&mut self, percent: u32) {
        let before = self.filler.clone();
        for n in 0..FILLER {
            if self.dice.chance(percent) {
                let ep = (self.dice.below(250) as u8, self.dice.below(250) as u8);
                if self.filler.contains_key(&n) && self.dice.chance(5) {
                    self.filler.remove(&n);
                } else {
                    self.filler.insert(n, ep);
                }
            }
        }
        let after = self.filler.clone();
        self.source.publish_filler(&before, &after);
        self.story
            .push(format!("{percent}% of the background Services changed"));
    }

    /// A random address set no Service has (one a deleted Service had among them).
    fn free_addr(&mut self) -> u8 {
        let free: Vec<u8> = (0..ADDRESSES)
            .filter(|a| self.services.values().all(|s| s.addr != *a))
            .collect();
        free[self.dice.below(free.len() as u32) as usize]
    }

    fn delete(&mut self, i: u8) {
        self.source.publish(i, None);
        self.services.remove(&i);
        self.story.push(format!("delete s{i}"));
    }

    /// Waits until the kernel holds the round's marker (a Service and its slice, each written after every other
    /// change of its kind, so a sync that wrote both saw them all) for the Node's zone, and reads stay the same
    /// for a moment (a cold sync may span transactions).
    fn settled_rules(&mut self, round: usize) -> Rules {
        // A Service and a slice: from an API server each kind has a watch of its own, which may resume or
        // list again at its own time. The slice's port shows in the rules only once both are programmed: the
        // port is named after the round, so neither joins the other's last-round version. The Node has a
        // watch of its own too: the slice's two endpoints are hinted for one zone each, so which of them are
        // programmed tells which zone the rules were written for.
        let (port, target) = (47100 + round, 48100 + round);
        let marker = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: marker, namespace: churn}}\nspec:\n  \
             clusterIP: 10.96.1.250\n  ports:\n  - {{name: m{round}, protocol: TCP, port: {port}}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: marker-0\n  \
             namespace: churn\n  labels: {{kubernetes.io/service-name: marker}}\naddressType: IPv4\nports:\n\
             - {{name: m{round}, protocol: TCP, port: {target}}}\nendpoints:\n\
             - addresses: [10.244.0.250]\n  conditions: {{ready: true}}\n  hints: {{forZones: [{{name: {}}}]}}\n\
             - addresses: [10.244.0.251]\n  conditions: {{ready: true}}\n  hints: {{forZones: [{{name: {}}}]}}\n",
            ZONES[0], ZONES[1]
        );
        self.source.publish_other("marker.yaml", &marker);
        let marker_endpoints: Vec<(&str, bool)> = ["10.244.0.250", "10.244.0.251"]
            .into_iter()
            .enumerate()
            .map(|(z, ip)| (ip, self.node_zone.is_none_or(|nz| usize::from(nz) == z)))
            .collect();
        // In nftables mode the NodePort address set holds the Node's InternalIP, and only it.
        let node_ips: Vec<(&str, bool)> = if self.mode == "nftables" {
            NODE_IPS
                .iter()
                .enumerate()
                .map(|(i, ip)| (*ip, i == self.primary))
                .collect()
        } else {
            Vec::new()
        };
        let (mode, needle) = (self.mode, target.to_string());
        let ns = self.lab.node();
        let proxy = self.proxy.as_mut().expect("svcproxy runs");
        wait_until(
            WAIT,
            Duration::from_millis(50),
            "the round's marker is programmed (for the Node's zone, and in nftables mode its address)",
            || {
                proxy.assert_running();
                let text = if mode == "nftables" {
                    ns.exec_stdout(&["nft", "list", "table", "ip", "svcproxy"])
                        .unwrap_or_default()
                } else {
                    ns.exec_stdout(&["iptables-save"]).unwrap_or_default()
                };
                let for_the_zone = marker_endpoints
                    .iter()
                    .chain(&node_ips)
                    .all(|(ip, programmed)| text.contains(ip) == *programmed);
                (text.contains(&needle) && for_the_zone).then_some(())
            },
        );
        let mut last = read_rules(mode, ns);
        loop {
            std::thread::sleep(Duration::from_millis(300));
            let now = read_rules(mode, ns);
            if now == last {
                return now;
            }
            last = now;
        }
    }

    fn check_traffic(&self) {
        for svc in self.services.values() {
            if svc.broken {
                continue;
            }
            let a = svc.addr;
            let vip = format!("10.96.1.{}:80", 10 + a);
            self.expect(
                self.client.ns(),
                &vip,
                "ClusterIP from a pod",
                svc.internal_targets(self.node_zone),
            );
            let external = svc.external_targets(self.node_zone);
            if svc.kind != Kind::ClusterIp {
                for (i, ip) in NODE_IPS.iter().enumerate() {
                    let node_port = format!("{ip}:{}", 30000 + u16::from(a) * 10);
                    let (what, want) = if i == self.primary {
                        ("NodePort from outside", external.clone())
                    } else if self.mode == "nftables" {
                        ("NodePort on the other address from outside", BTreeSet::new())
                    } else {
                        ("NodePort on the other address from outside", external.clone())
                    };
                    self.expect(self.lab.external(), &node_port, what, want);
                }
            }
            if svc.kind == Kind::LoadBalancer {
                // The outside host is inside the source ranges when there are any; an address in Proxy mode
                // is the load balancer's to handle, not ours.
                let ingress = format!("198.51.100.{}:80", 10 + a);
                let want = if svc.ip_mode_proxy {
                    BTreeSet::new()
                } else {
                    external.clone()
                };
                self.expect(
                    self.lab.external(),
                    &ingress,
                    "load-balancer IP from outside",
                    want,
                );
            }
            if svc.admin_port && !svc.headless {
                let admin = format!("10.96.1.{}:81", 10 + a);
                self.expect(
                    self.client.ns(),
                    &admin,
                    "second port from a pod",
                    svc.internal_targets(self.node_zone),
                );
            }
            if svc.external_ip && !svc.headless {
                let ip = format!("192.0.2.{}:80", 10 + a);
                self.expect(self.lab.external(), &ip, "externalIP from outside", external);
            }
        }
    }

    /// One new connection from `from` to `to` is answered by one of `want`, or fails when `want` is empty.
    fn expect(&self, from: &NetNs, to: &str, what: &str, want: BTreeSet<String>) {
        let addr: SocketAddr = to.parse().unwrap();
        let mut got = tcp_request(from, addr, REQUEST);
        // A lost SYN is retransmitted after a second, so on a loaded machine an answer can miss the deadline;
        // asked again, a settled ruleset answers. A wrong answer is never retried.
        for _ in 0..2 {
            if !matches!(got, Err(ClientError::Timeout)) || want.is_empty() {
                break;
            }
            eprintln!("{}: {to} ({what}) timed out; asking again", self.mode);
            got = tcp_request(from, addr, REQUEST);
        }
        match (&got, want.is_empty()) {
            (Ok(reply), false) if want.contains(&reply.identity) => {}
            (Err(_), true) => {}
            _ => panic!(
                "{}: {to} ({what}): got {got:?}, want one of {want:?}\n{}",
                self.mode,
                self.context()
            ),
        }
    }

    /// What was last published of the background Services `text` names: they are not in the story.
    fn filler_published(&self, text: &str, intent: &str) -> String {
        let named: BTreeSet<u16> = text
            .split("filler/f")
            .skip(1)
            .filter_map(|rest| rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
            .collect();
        named
            .into_iter()
            .map(|n| {
                let published = match self.filler.get(&n) {
                    Some((a, b)) => format!("endpoints 10.245.{a}.{b} and .{}", u16::from(*b) + 1),
                    None => "deleted".to_string(),
                };
                // The stopped daemon's intent for it, as /debug/intent printed it.
                let key = format!("\"filler/f{n}:http\":");
                let held = intent
                    .split(&key)
                    .nth(1)
                    .map_or("none", |rest| &rest[..rest.len().min(600)]);
                format!("published f{n}: {published}; the stopped daemon's intent: {held}\n")
            })
            .collect()
    }

    fn context(&self) -> String {
        let log = self.proxy.as_ref().map(Svcproxy::log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        format!(
            "seed {} (CHURN_SEED={} replays it); steps:\n  {}\nsvcproxy log (last lines):\n{}",
            self.seed,
            self.seed,
            self.story.join("\n  "),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    }

    /// No sync failed and no read-back found anything but what was written: nobody else touches this node.
    fn check_log(&mut self) {
        let log = self.proxy().log();
        let bad: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("sync failed") || l.contains("diverges"))
            .collect();
        if !bad.is_empty() {
            let lines = bad.join("\n");
            panic!("{}: {lines}\n{}", self.mode, self.context());
        }
    }

    fn round(&mut self, round: usize) {
        self.story.push(format!("-- round {round}"));
        for _ in 0..STEPS_PER_ROUND {
            self.step();
        }
        // An invalid update leaves the last good version programmed, which a fresh start cannot know of: each
        // round ends with every object valid again, mended or deleted.
        let broken: Vec<u8> = self
            .services
            .iter()
            .filter(|(_, s)| s.broken)
            .map(|(i, _)| *i)
            .collect();
        for i in broken {
            let mut svc = self.services[&i].clone();
            if self.dice.chance(50) {
                svc.broken = false;
                self.write(i, svc, "mend");
            } else {
                self.delete(i);
            }
        }
        let churned = self.settled_rules(round);
        self.check_traffic();
        self.check_log();
        let cold = round.is_multiple_of(2);
        // What the daemon believes it programmed, to tell a stale view from rules written wrong.
        self.stopped_intent = http_get(
            self.lab.node(),
            common::METRICS.parse().unwrap(),
            "/debug/intent",
            REQUEST,
        )
        .map(|(_, body)| body)
        .unwrap_or_else(|e| e.to_string());
        assert!(self.proxy().terminate(), "svcproxy exits cleanly on SIGTERM");
        self.stopped_log = self.proxy().log();
        // Now and then the node is moved to the other mode and back, as an operator trying it would: each
        // daemon must take over the other's rules with traffic flowing, and retire them.
        let switched = self.dice.chance(35);
        if switched {
            self.visit_other_mode(round);
        }
        if cold {
            let out = self
                .lab
                .node()
                .exec(&[env!("CARGO_BIN_EXE_svcproxy"), "cleanup"])
                .unwrap();
            assert!(out.status.success(), "cleanup: {out:?}");
        }
        self.start();
        let again = self.settled_rules(round);
        if again != churned {
            let diff = rules_diff(&again, &churned);
            panic!(
                "{}: after round {round} the rules differ from what {} writes:\n{diff}\n{}\n{}\n\
                 the stopped svcproxy's log:\n{}",
                self.mode,
                if cold {
                    "a cold start"
                } else {
                    "a restart onto them"
                },
                self.filler_published(&diff, &self.stopped_intent),
                self.context(),
                self.stopped_log
            );
        }
        self.check_log();
        if switched && !cold {
            self.wait_retired(other_mode(self.mode));
        }
    }

    /// Runs svcproxy in the other mode over this mode's rules until it has programmed everything, checks
    /// traffic and that it retired this mode's rules, and stops it.
    fn visit_other_mode(&mut self, round: usize) {
        let home = self.mode;
        self.mode = other_mode(home);
        self.story.push(format!("switched to {}", self.mode));
        self.start();
        self.settled_rules(round);
        self.check_traffic();
        self.wait_retired(home);
        self.check_log();
        assert!(self.proxy().terminate(), "svcproxy exits cleanly on SIGTERM");
        self.mode = home;
        self.story.push(format!("back to {home}"));
    }

    /// Nothing of what svcproxy writes in `mode` is left in the kernel, in either family (the running daemon,
    /// in the other mode, retires it after its first sync; kubelet's chains stay).
    fn wait_retired(&self, mode: &str) {
        let ns = self.lab.node();
        let what = format!("{mode} rules are retired");
        // What is left is printed when it changes, not on every poll: a timeout then ends with a short list.
        let mut reported = Vec::new();
        wait_until(WAIT, Duration::from_millis(100), &what, || {
            let left: Vec<String> = if mode == "nftables" {
                ["ip", "ip6"]
                    .into_iter()
                    .filter(|family| {
                        ns.exec_stdout(&["nft", "list", "table", family, "svcproxy"])
                            .is_ok()
                    })
                    .map(|family| format!("nft table {family} svcproxy"))
                    .collect()
            } else {
                ["iptables-save", "ip6tables-save"]
                    .into_iter()
                    .flat_map(|save| {
                        let text = ns.exec_stdout(&[save]).unwrap_or_default();
                        text.lines()
                            .filter(|l| {
                                [
                                    "KUBE-SERVICES",
                                    "KUBE-SVC-",
                                    "KUBE-SEP-",
                                    "KUBE-NODEPORTS",
                                    "SVCPROXY",
                                ]
                                .iter()
                                .any(|n| l.contains(n))
                            })
                            .map(|l| format!("{save}: {l}"))
                            .collect::<Vec<_>>()
                    })
                    .collect()
            };
            if !left.is_empty() && left != reported {
                eprintln!("{mode} left: {}", left.join("\n"));
                reported = left.clone();
            }
            left.is_empty().then_some(())
        });
    }
}

fn other_mode(mode: &str) -> &'static str {
    if mode == "iptables" {
        "nftables"
    } else {
        "iptables"
    }
}

fn churn(mode: &'static str, api: bool, default_seeds: &[u64]) {
    let seeds: Vec<u64> = match std::env::var("CHURN_SEED") {
        Ok(s) => vec![s.parse().expect("CHURN_SEED is a number")],
        Err(_) => default_seeds.to_vec(),
    };
    let rounds =
        std::env::var("CHURN_ROUNDS").map_or(ROUNDS, |r| r.parse().expect("CHURN_ROUNDS is a number"));
    for seed in seeds {
        let mut churn = Churn::new(mode, api, seed);
        for round in 0..rounds {
            churn.round(round);
        }
    }
}

#[test]
fn iptables_from_a_manifest_directory() {
    churn("iptables", false, &[1]);
}

#[test]
fn nftables_from_a_manifest_directory() {
    churn("nftables", false, &[1]);
}

#[test]
fn iptables_from_the_api() {
    churn("iptables", true, &[2]);
}

#[test]
fn nftables_from_the_api() {
    churn("nftables", true, &[2]);
}
