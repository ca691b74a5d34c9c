//! Everything one service port adds to the table: map elements that steer its addresses to its chains (or to
//! drop/reject when it has nowhere to send them), its policy, external and firewall chains, per endpoint
//! either a chain or (in the direct layout) a hairpin address pair, and with ClientIP affinity one timeout
//! set per endpoint.
//!
//! The behaviour is upstream's, decided by the intent's derived booleans: traffic to the cluster IP uses the
//! internal policy chain; NodePort, external and load-balancer traffic enters through the external chain,
//! which masquerades under the Cluster policy and, under the Local policy, short-circuits pods and the node
//! itself to cluster-wide endpoints while true external clients keep their source address and reach only
//! local endpoints.

use std::net::IpAddr;

use ipnet::IpNet;
use svcproxy_model::{EndpointInfo, ServicePortIntent, SessionAffinity};

use crate::addr_text::{prefix_set_text, socket_text};
use crate::config::{DispatchLayout, RenderConfig};
use crate::dispatch::{DEFAULT_CASCADE_LIMIT, Target, dispatch_rules, uses_endpoint_chains};
use crate::names::*;
use crate::ruleset::{Chain, Element, Ruleset, Set, SetKind};
use crate::slots::{self, SlotAllocator};
use compact_str::{CompactString, ToCompactString, format_compact};

/// Affinity sets hold at most this many client addresses per endpoint.
pub const AFFINITY_SET_SIZE: u32 = 65535;

struct Ctx<'a> {
    spi: &'a ServicePortIntent,
    cfg: &'a RenderConfig,
    proto: &'static str,
    /// Element comment: the service port, which also names the owning Service.
    comment: CompactString,
}

impl Ctx<'_> {
    fn key(&self, ip: IpAddr, port: u16) -> CompactString {
        format_compact!("{ip} . {} . {port}", self.proto)
    }

    fn element(&self, value: impl Into<CompactString>) -> Element {
        Element {
            value: Some(value.into()),
            comment: Some(self.comment.clone()),
        }
    }

    fn affinity(&self) -> Option<u32> {
        match self.spi.session_affinity {
            SessionAffinity::ClientIP { timeout_seconds } => Some(timeout_seconds),
            SessionAffinity::None => None,
        }
    }

    /// The layout this service port's policy chains use: a mapped chain cannot remember which endpoint a
    /// client took, so affinity keeps the per-endpoint cascade.
    fn layout(&self) -> DispatchLayout {
        match self.cfg.dispatch {
            DispatchLayout::Mapped if self.affinity().is_some() => DispatchLayout::Direct {
                max_endpoints: DEFAULT_CASCADE_LIMIT,
            },
            layout => layout,
        }
    }

    /// Whether a policy chain over `n` endpoints picks through an endpoint map.
    fn mapped(&self, n: usize) -> bool {
        self.layout() == DispatchLayout::Mapped && n > 0 && !uses_endpoint_chains(self.layout(), n)
    }

    /// Masquerade off-cluster clients of the cluster IP so replies come back through this node. Tied to the
    /// cluster IP and port because external traffic reaches the same chain and has its own masquerade rule.
    fn cluster_ip_masquerade(&self) -> Option<String> {
        let spi = self.spi;
        let addr = self.cfg.addr();
        let dest = format!(
            "{addr} daddr {} {} dport {}",
            spi.cluster_ip, self.proto, spi.port
        );
        if self.cfg.masquerade_all {
            Some(format!("{dest} jump {MARK_FOR_MASQUERADE}"))
        } else {
            self.cfg
                .if_not_local()
                .map(|m| format!("{dest} {m} jump {MARK_FOR_MASQUERADE}"))
        }
    }

    /// A policy chain: optional masquerade, affinity lookups, then the random pick. A mapped chain's endpoints
    /// go into its slot of the endpoint maps, in `rs`.
    fn policy_chain(
        &self,
        rs: &mut Ruleset,
        name: &str,
        endpoints: &[EndpointInfo],
        masquerade: bool,
        slots: &mut SlotAllocator<'_>,
    ) -> (Chain, bool) {
        let spn = &self.spi.name;
        let mut rules = Vec::new();
        if masquerade {
            rules.extend(self.cluster_ip_masquerade());
        }
        if self.mapped(endpoints.len())
            && let Some(proto) = slots::protocol_index(self.proto)
            && let Some(slot) = slots.slot(name, proto)
        {
            let (map, base) = slots::placement(slot);
            let offset = if base == 0 {
                String::new()
            } else {
                format!(" offset {base}")
            };
            rules.push(format!(
                "meta l4proto {} dnat {} to numgen random mod {}{offset} map @{map}",
                self.proto,
                self.cfg.addr(),
                endpoints.len()
            ));
            for (i, ep) in endpoints.iter().enumerate() {
                add_element(
                    rs,
                    &map,
                    (base + i as u32).to_compact_string(),
                    self.element(format_compact!("{} . {}", ep.ip, ep.port)),
                );
            }
            let chain = Chain {
                rules,
                ..Default::default()
            };
            return (chain, false);
        }
        let layout = match self.layout() {
            // No endpoints (no rules), or every slot taken (four million policy chains): the cascade.
            DispatchLayout::Mapped => DispatchLayout::Direct {
                max_endpoints: DEFAULT_CASCADE_LIMIT,
            },
            layout => layout,
        };
        let direct = !uses_endpoint_chains(layout, endpoints.len());
        if self.affinity().is_some() {
            for ep in endpoints {
                let then = if direct {
                    self.endpoint_action(ep)
                } else {
                    format!("goto {}", endpoint_chain(spn, ep))
                };
                rules.push(format!(
                    "{} saddr @{} {then}",
                    self.cfg.addr(),
                    affinity_set(spn, ep)
                ));
            }
        }
        let targets: Vec<Target> = endpoints
            .iter()
            .map(|ep| Target {
                chain: endpoint_chain(spn, ep),
                action: self.endpoint_action(ep),
            })
            .collect();
        rules.extend(dispatch_rules(layout, &targets));
        let chain = Chain {
            rules,
            ..Default::default()
        };
        (chain, !direct)
    }

    fn dnat(&self, ep: &EndpointInfo) -> String {
        format!(
            "meta l4proto {} dnat to {}",
            self.proto,
            socket_text(ep.ip, ep.port)
        )
    }

    /// What sending to `ep` does: remember the client for affinity, then DNAT.
    fn endpoint_action(&self, ep: &EndpointInfo) -> String {
        let dnat = self.dnat(ep);
        match self.affinity() {
            Some(_) => format!(
                "update @{} {{ {} saddr }} {dnat}",
                affinity_set(&self.spi.name, ep),
                self.cfg.addr()
            ),
            None => dnat,
        }
    }

    fn endpoint_chain(&self, ep: &EndpointInfo) -> Chain {
        let addr = self.cfg.addr();
        // Hairpin: a pod reaching itself through the service must be SNATed, or it would answer itself
        // directly and the client would drop the reply.
        let mut rules = vec![format!("{addr} saddr {} jump {MARK_FOR_MASQUERADE}", ep.ip)];
        if self.affinity().is_some() {
            rules.push(format!(
                "update @{} {{ {addr} saddr }}",
                affinity_set(&self.spi.name, ep)
            ));
        }
        rules.push(self.dnat(ep));
        Chain {
            rules,
            ..Default::default()
        }
    }

    fn external_chain(&self, cluster: Option<&str>, local: Option<&str>) -> Chain {
        let mut rules = Vec::new();
        if !self.spi.external_policy_local {
            rules.push(format!("jump {MARK_FOR_MASQUERADE}"));
            rules.extend(cluster.map(|c| format!("goto {c}")));
        } else {
            if let (Some(c), Some(m)) = (cluster, self.cfg.if_local()) {
                rules.push(format!("{m} goto {c} comment \"short-circuit pod traffic\""));
            }
            rules.push(format!(
                "fib saddr type local jump {MARK_FOR_MASQUERADE} comment \"masquerade local traffic\""
            ));
            if let Some(c) = cluster {
                rules.push(format!(
                    "fib saddr type local goto {c} comment \"short-circuit local traffic\""
                ));
            }
            rules.extend(local.map(|l| format!("goto {l}")));
        }
        Chain {
            rules,
            ..Default::default()
        }
    }

    /// Drops sources outside the ranges; allowed packets return to the check and go on to DNAT.
    fn firewall_chain(&self) -> Chain {
        let spi = self.spi;
        let mut allowed: Vec<IpNet> = spi.source_ranges.clone();
        let node_inside = self
            .cfg
            .node_ip
            .is_some_and(|n| spi.source_ranges.iter().any(|r| r.contains(&n)));
        if node_inside {
            allowed.extend(spi.load_balancer_ips.iter().map(|ip| IpNet::from(*ip)));
        }
        Chain {
            rules: vec![format!(
                "{} saddr != {} drop",
                self.cfg.addr(),
                prefix_set_text(&allowed)
            )],
            ..Default::default()
        }
    }
}

fn add_element(rs: &mut Ruleset, set: &str, key: impl Into<CompactString>, element: Element) {
    if let Some(s) = rs.sets.get_mut(set) {
        let key = key.into();
        // Two services claiming the same address and port (possible with externalIPs) cannot both win; the
        // first in service order does, so the outcome does not depend on event order.
        s.elements.entry(key).or_insert(element);
    }
}

/// Whether the load-balancer IPs are guarded by a firewall chain: whenever there are source ranges, endpoints
/// or not, as in upstream's nftables mode. Without endpoints, a source outside the ranges is dropped before the
/// no-endpoints check could reject it, so it learns nothing about the Service, which is what the ranges are
/// for. Upstream's iptables mode (and [`ServicePortIntent::uses_firewall_chain`], which the iptables backend
/// follows) installs the firewall only when there are endpoints and rejects every source otherwise.
fn uses_firewall(spi: &ServicePortIntent) -> bool {
    !spi.load_balancer_ips.is_empty() && !spi.source_ranges.is_empty()
}

/// Adds one service port's objects to a ruleset that already holds the fixed objects.
pub fn add_service_port(
    rs: &mut Ruleset,
    spi: &ServicePortIntent,
    cfg: &RenderConfig,
    slots: &mut SlotAllocator<'_>,
) {
    let cx = Ctx {
        spi,
        cfg,
        proto: spi.name.protocol.lower(),
        comment: spi.name.to_compact_string(),
    };
    let spn = &spi.name;
    add_element(
        rs,
        CLUSTER_IPS,
        spi.cluster_ip.to_string(),
        Element {
            value: None,
            comment: Some(spn.service.to_compact_string()),
        },
    );

    let cluster = spi.uses_cluster_chain().then(|| cluster_chain(spn));
    let local = spi.uses_local_chain().then(|| local_chain(spn));
    let internal = if spi.internal_policy_local {
        &local
    } else {
        &cluster
    };
    // No endpoints anywhere: reject, so clients fail at once. Endpoints exist but none fits the Local policy
    // here: drop, as upstream does, so clients retry and the load balancer's health check moves them on.
    let unreachable = if spi.has_endpoints() {
        "drop".to_string()
    } else {
        format!("goto {REJECT_CHAIN}")
    };

    let cip_key = cx.key(spi.cluster_ip, spi.port);
    match internal {
        Some(chain) if spi.has_internal_endpoints() => {
            add_element(rs, SERVICE_IPS, cip_key, cx.element(format!("goto {chain}")));
        }
        _ => add_element(rs, NO_ENDPOINT_SERVICES, cip_key, cx.element(unreachable.clone())),
    }

    let external = spi.uses_external_chain().then(|| external_chain(spn));
    let firewall = uses_firewall(spi).then(|| firewall_chain(spn));
    let mut external_ips: Vec<IpAddr> = spi.external_ips.clone();
    external_ips.extend(spi.load_balancer_ips.iter().copied());
    for ip in &external_ips {
        let key = cx.key(*ip, spi.port);
        if let Some(ext) = &external {
            add_element(rs, SERVICE_IPS, key.clone(), cx.element(format!("goto {ext}")));
        }
        if !spi.has_external_endpoints() {
            add_element(rs, NO_ENDPOINT_SERVICES, key, cx.element(unreachable.clone()));
        }
    }
    if let Some(fw) = &firewall {
        for ip in &spi.load_balancer_ips {
            add_element(
                rs,
                FIREWALL_IPS,
                cx.key(*ip, spi.port),
                cx.element(format!("goto {fw}")),
            );
        }
    }
    if let Some(np) = spi.node_port {
        let key = format_compact!("{} . {np}", cx.proto);
        if let Some(ext) = &external {
            add_element(
                rs,
                SERVICE_NODEPORTS,
                key.clone(),
                cx.element(format!("goto {ext}")),
            );
        }
        if !spi.has_external_endpoints() {
            add_element(rs, NO_ENDPOINT_NODEPORTS, key, cx.element(unreachable.clone()));
        }
    }

    // Whether each policy chain reaches its endpoints through endpoint chains.
    let mut via_chains = [false, false];
    if let Some(name) = &cluster {
        let (chain, chained) = cx.policy_chain(
            rs,
            name,
            &spi.endpoints.cluster,
            !spi.internal_policy_local,
            slots,
        );
        rs.chains.insert(name.clone(), chain);
        via_chains[0] = chained;
    }
    if let Some(name) = &local {
        let (chain, chained) =
            cx.policy_chain(rs, name, &spi.endpoints.local, spi.internal_policy_local, slots);
        rs.chains.insert(name.clone(), chain);
        via_chains[1] = chained;
    }
    if let Some(name) = &external {
        let chain = cx.external_chain(cluster.as_deref(), local.as_deref());
        rs.chains.insert(name.clone(), chain);
    }
    if let Some(name) = &firewall {
        rs.chains.insert(name.clone(), cx.firewall_chain());
    }
    // Each policy chain reaches its endpoints either through endpoint chains or by DNATing directly; an
    // endpoint in both policy chains may be reached both ways. Directly reached endpoints get their hairpin
    // masquerade in postrouting, from their address pair.
    let lists = [
        (cluster.is_some(), via_chains[0], &spi.endpoints.cluster),
        (local.is_some(), via_chains[1], &spi.endpoints.local),
    ];
    for ep in spi.endpoints.all_reachable() {
        let mut via_chain = false;
        let mut direct = false;
        for (in_use, chained, list) in lists {
            if in_use && list.iter().any(|e| e.ip == ep.ip && e.port == ep.port) {
                if chained {
                    via_chain = true;
                } else {
                    direct = true;
                }
            }
        }
        if !via_chain && !direct {
            continue;
        }
        if via_chain {
            rs.chains.insert(endpoint_chain(spn, ep), cx.endpoint_chain(ep));
        }
        if direct {
            add_element(
                rs,
                HAIRPIN,
                format_compact!("{} . {}", ep.ip, ep.ip),
                Element::default(),
            );
        }
        if let Some(timeout) = cx.affinity() {
            let mut set = Set::new(SetKind::Set, format!("type {}", cfg.addr_type()), None);
            set.flags = ["dynamic".to_string(), "timeout".to_string()].into();
            set.timeout = Some(u64::from(timeout));
            set.size = Some(AFFINITY_SET_SIZE);
            rs.sets.insert(affinity_set(spn, ep), set);
        }
    }
}
