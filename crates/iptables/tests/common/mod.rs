//! Shared test helpers: compact builders for model objects, and a simulated `iptables-restore --noflush`
//! that applies payloads to an in-memory kernel with the kernel's refusal rules.
#![allow(dead_code)]

pub mod scenario;

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use svcproxy_iptables::ruleset::{is_builtin_target, jump_target};
use svcproxy_iptables::{Ruleset, SavedRuleset, parse_save};
use svcproxy_model::intent::build_intent;
use svcproxy_model::{
    ClusterState, Endpoint, EndpointPort, EndpointSlice, Intent, IntentConfig, IpFamily, LoadBalancerIngress,
    Node, ObjectName, Protocol, Service, ServicePort, ServiceType, SessionAffinity, TrafficPolicy,
};

pub const NODE: &str = "node-a";

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

pub fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

pub fn port(name: &str, protocol: Protocol, port: u16, node_port: Option<u16>) -> ServicePort {
    ServicePort {
        name: name.into(),
        protocol,
        port,
        node_port,
    }
}

pub fn service(ns: &str, name: &str, ty: ServiceType, cluster_ip: &str, ports: Vec<ServicePort>) -> Service {
    let mut s = Service::cluster_ip(ObjectName::new(ns, name), ip(cluster_ip), ports);
    s.service_type = ty;
    s
}

pub fn with_lb(mut s: Service, ips: &[&str]) -> Service {
    s.load_balancer_ingress = ips
        .iter()
        .map(|i| LoadBalancerIngress {
            ip: ip(i),
            ip_mode_proxy: false,
        })
        .collect();
    s
}

pub fn local_policies(mut s: Service, external: bool, internal: bool) -> Service {
    if external {
        s.external_traffic_policy = TrafficPolicy::Local;
    }
    if internal {
        s.internal_traffic_policy = TrafficPolicy::Local;
    }
    s
}

pub fn sticky(mut s: Service, timeout_seconds: u32) -> Service {
    s.session_affinity = SessionAffinity::ClientIP { timeout_seconds };
    s
}

/// A ready endpoint on `node`.
pub fn ep(addr: &str, node: &str) -> Endpoint {
    Endpoint::ready(ip(addr), Some(node))
}

pub fn slice(
    ns: &str,
    name: &str,
    service: &str,
    ports: &[(&str, Protocol, u16)],
    endpoints: Vec<Endpoint>,
) -> EndpointSlice {
    EndpointSlice {
        name: ObjectName::new(ns, name),
        service_name: service.into(),
        address_family: Some(IpFamily::V4),
        ports: ports
            .iter()
            .map(|(name, protocol, port)| EndpointPort {
                name: (*name).into(),
                protocol: *protocol,
                port: *port,
            })
            .collect(),
        endpoints,
        last_change_trigger_time: None,
    }
}

pub fn state(services: Vec<Service>, slices: Vec<EndpointSlice>) -> ClusterState {
    ClusterState {
        services: services.into_iter().map(|s| (s.name.clone(), s)).collect(),
        endpoint_slices: slices.into_iter().map(|s| (s.name.clone(), s)).collect(),
        node: Some(Node {
            name: NODE.into(),
            labels: [("topology.kubernetes.io/zone".to_string(), "zone-a".to_string())].into(),
            pod_cidrs: vec![net("10.244.0.0/24")],
            addresses: vec![ip("10.0.0.10")],
            being_deleted: false,
        }),
    }
}

pub fn intent_of(state: &ClusterState) -> Intent {
    build_intent(
        state,
        &IntentConfig {
            family: IpFamily::V4,
            node_name: NODE.into(),
        },
    )
}

/// The apiserver's own service, present in every reference dump.
pub fn kubernetes_service() -> (Service, EndpointSlice) {
    (
        service(
            "default",
            "kubernetes",
            ServiceType::ClusterIP,
            "10.96.0.1",
            vec![port("https", Protocol::Tcp, 443, None)],
        ),
        slice(
            "default",
            "kubernetes",
            "kubernetes",
            &[("https", Protocol::Tcp, 6443)],
            vec![Endpoint::ready(ip("10.0.0.10"), None)],
        ),
    )
}

const BUILTIN: [(&str, &[&str]); 2] = [
    ("filter", &["INPUT", "FORWARD", "OUTPUT"]),
    ("nat", &["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"]),
];

fn is_builtin_chain(table: &str, chain: &str) -> bool {
    BUILTIN
        .iter()
        .any(|(t, chains)| *t == table && chains.contains(&chain))
}

/// Table → chain → rule lines (each as `-A CHAIN …`). Built-in chains are always present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    pub tables: BTreeMap<String, BTreeMap<String, Vec<String>>>,
}

impl Default for Kernel {
    fn default() -> Self {
        let tables = BUILTIN
            .iter()
            .map(|(t, chains)| {
                (
                    t.to_string(),
                    chains.iter().map(|c| (c.to_string(), Vec::new())).collect(),
                )
            })
            .collect();
        Kernel { tables }
    }
}

impl Kernel {
    /// A kernel holding exactly `ruleset` (as if a previous sync had succeeded), with empty built-ins.
    pub fn holding(ruleset: &Ruleset) -> Self {
        let mut k = Kernel::default();
        for table in [&ruleset.filter, &ruleset.nat] {
            let t = k.tables.get_mut(table.name.as_str()).unwrap();
            for (name, chain) in &table.chains {
                t.insert(name.to_string(), chain.lines().to_vec());
            }
        }
        k
    }

    /// The user chains of each table, to compare with a ruleset.
    pub fn user_chains(&self, table: &str) -> BTreeMap<String, Vec<String>> {
        self.tables[table]
            .iter()
            .filter(|(c, _)| !is_builtin_chain(table, c))
            .map(|(c, r)| (c.clone(), r.clone()))
            .collect()
    }

    pub fn matches(&self, ruleset: &Ruleset) -> bool {
        [&ruleset.filter, &ruleset.nat].iter().all(|t| {
            let want: BTreeMap<String, Vec<String>> = t
                .chains
                .iter()
                .map(|(n, c)| (n.to_string(), c.lines().to_vec()))
                .collect();
            self.user_chains(t.name.as_str()) == want
        })
    }

    /// As `iptables-save` would print it (without its normalisation of matches).
    pub fn save(&self) -> String {
        let mut out = String::from("# Generated by test\n");
        for (table, chains) in &self.tables {
            out.push_str(&format!("*{table}\n"));
            for chain in chains.keys() {
                let policy = if is_builtin_chain(table, chain) {
                    "ACCEPT"
                } else {
                    "-"
                };
                out.push_str(&format!(":{chain} {policy} [0:0]\n"));
            }
            for rules in chains.values() {
                for r in rules {
                    out.push_str(r);
                    out.push('\n');
                }
            }
            out.push_str("COMMIT\n");
        }
        out
    }

    pub fn saved(&self) -> SavedRuleset {
        parse_save(&self.save()).expect("simulated dump parses")
    }

    /// Applies a `--noflush` restore payload. Each table commits atomically; the first refused line aborts
    /// with its 1-based number and the reason, as the kernel would refuse it.
    pub fn apply(&mut self, payload: &str) -> Result<(), String> {
        let mut txn: Option<(String, BTreeMap<String, Vec<String>>)> = None;
        for (i, line) in payload.lines().enumerate() {
            let n = i + 1;
            let fail = |why: String| Err(format!("line {n}: {why}: {line}"));
            if let Some(name) = line.strip_prefix('*') {
                let table = self.tables.get(name).cloned().unwrap_or_default();
                txn = Some((name.to_string(), table));
                continue;
            }
            let Some((tname, table)) = txn.as_mut() else {
                return fail("outside a table".into());
            };
            if line == "COMMIT" {
                let (tname, table) = txn.take().unwrap();
                self.tables.insert(tname, table);
                continue;
            }
            if let Some(decl) = line.strip_prefix(':') {
                let name = decl.split(' ').next().unwrap();
                if is_builtin_chain(tname, name) {
                    return fail("declares a built-in chain".into());
                }
                table.insert(name.to_string(), Vec::new());
                continue;
            }
            if let Some(name) = line.strip_prefix("-X ") {
                if !table.contains_key(name) || is_builtin_chain(tname, name) {
                    return fail("deleting a missing or built-in chain".into());
                }
                if !table[name].is_empty() {
                    return fail("deleting a non-empty chain".into());
                }
                if table.values().flatten().any(|r| jump_target(r) == Some(name)) {
                    return fail("deleting a referenced chain".into());
                }
                table.remove(name);
                continue;
            }
            let mut words = line.splitn(3, ' ');
            let (op, chain) = (words.next().unwrap(), words.next().unwrap_or(""));
            if !table.contains_key(chain) {
                return fail("rule for a missing chain".into());
            }
            if let Some(target) = jump_target(line)
                && !is_builtin_target(target)
                && !table.contains_key(target)
            {
                return fail(format!("missing target {target}"));
            }
            match op {
                "-A" => table.get_mut(chain).unwrap().push(line.to_string()),
                "-I" => {
                    let rest = line.splitn(4, ' ').nth(3).unwrap();
                    if !line.starts_with(&format!("-I {chain} 1 ")) {
                        return fail("only inserts at position 1 are simulated".into());
                    }
                    table
                        .get_mut(chain)
                        .unwrap()
                        .insert(0, format!("-A {chain} {rest}"));
                }
                _ => return fail("unknown operation".into()),
            }
        }
        if txn.is_some() {
            return Err("payload ends inside a table".into());
        }
        Ok(())
    }
}
