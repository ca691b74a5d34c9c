//! The rules of one service port, computed on their own so a sync can reuse the result for every service port
//! whose intent did not change.
//!
//! Rule shapes, texts and order follow upstream's generator (research notes §3) so that chains written by
//! either proxy look the same; the statements below say which upstream behaviour each part matches.

use svcproxy_model::{EndpointInfo, ServicePortIntent, SessionAffinity};

use crate::chain_name::{
    KUBE_EXTERNAL_SERVICES, KUBE_MARK_MASQ, KUBE_NODEPORTS, KUBE_PROXY_FIREWALL, KUBE_SERVICES,
    ServiceChains, sep_chain,
};
use crate::config::RenderConfig;
use crate::rule_text::{Line, probability};
use crate::ruleset::{Chain, ChainName, TableName};

/// One line a service port adds to a chain shared by all service ports (`KUBE-SERVICES`, …).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedRule {
    pub table: TableName,
    pub chain: &'static str,
    pub line: String,
}

/// Everything one service port contributes to the ruleset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePortRules {
    /// The nat chains this service port owns (EXT, FW, SVC, SVL, then SEP), in upstream's writing order.
    pub chains: Vec<(ChainName, Chain)>,
    /// Its lines in the shared chains, in upstream's writing order; they are concatenated across service
    /// ports in service-port order.
    pub shared: Vec<SharedRule>,
}

/// Renders one service port. `large_cluster` drops the per-endpoint comments as upstream does above 1000
/// endpoints in total (see [`crate::render::is_large_cluster`]).
pub fn render_service_port(
    spi: &ServicePortIntent,
    cfg: &RenderConfig,
    large_cluster: bool,
) -> ServicePortRules {
    ServiceRenderer::new(spi, cfg, large_cluster).render()
}

struct ServiceRenderer<'a> {
    spi: &'a ServicePortIntent,
    cfg: &'a RenderConfig,
    large_cluster: bool,
    spn: String,
    chains: ServiceChains,
    shared: Vec<SharedRule>,
}

/// A per-service chain under construction.
struct Pending {
    name: String,
    lines: Vec<String>,
}

impl<'a> ServiceRenderer<'a> {
    fn new(spi: &'a ServicePortIntent, cfg: &'a RenderConfig, large_cluster: bool) -> Self {
        ServiceRenderer {
            spi,
            cfg,
            large_cluster,
            spn: spi.name.to_string(),
            chains: ServiceChains::new(&spi.name),
            shared: Vec::new(),
        }
    }

    fn share(&mut self, table: TableName, chain: &'static str, line: String) {
        self.shared.push(SharedRule { table, chain, line });
    }

    /// `-A <chain> -m comment --comment <c> -m <p> -p <p> -d <ip> --dport <port>`: the common head of every
    /// rule matching a service address.
    fn dest_match(&self, chain: &str, comment: &str, ip: impl std::fmt::Display, port: u16) -> Line {
        Line::append(chain)
            .comment(comment)
            .protocol(self.spi.name.protocol)
            .arg_value("-d", ip)
            .arg_value("--dport", port)
    }

    fn render(mut self) -> ServicePortRules {
        let spi = self.spi;
        let spn = self.spn.clone();
        let has_endpoints = spi.has_endpoints();
        let has_internal = spi.has_internal_endpoints();
        let has_external = spi.has_external_endpoints();
        let uses_fw = spi.uses_firewall_chain();
        let internal_chain = if spi.internal_policy_local {
            &self.chains.svl
        } else {
            &self.chains.svc
        }
        .clone();
        let external_policy_chain = if spi.external_policy_local {
            &self.chains.svl
        } else {
            &self.chains.svc
        }
        .clone();
        let ext = self.chains.ext.clone();
        let lb_chain = if uses_fw {
            self.chains.fw.clone()
        } else {
            ext.clone()
        };

        // Without any endpoint upstream rejects (the client learns at once); with endpoints elsewhere but none
        // allowed by a Local policy it drops, as the traffic would be answered by nobody on this node.
        let (filter_comment, filter_target) = if has_endpoints {
            (format!("{spn} has no local endpoints"), "DROP")
        } else {
            (format!("{spn} has no endpoints"), "REJECT")
        };

        // Shared chains first, as upstream writes them for every service port on every sync.
        let cluster_ip_comment = format!("{spn} cluster IP");
        if has_internal {
            let line = self
                .dest_match(KUBE_SERVICES, &cluster_ip_comment, spi.cluster_ip, spi.port)
                .jump(&internal_chain);
            self.share(TableName::Nat, KUBE_SERVICES, line);
        } else {
            let line = self
                .dest_match(KUBE_SERVICES, &filter_comment, spi.cluster_ip, spi.port)
                .jump(filter_target);
            self.share(TableName::Filter, KUBE_SERVICES, line);
        }

        let external_ip_comment = format!("{spn} external IP");
        for ip in &spi.external_ips {
            if has_endpoints {
                let line = self
                    .dest_match(KUBE_SERVICES, &external_ip_comment, ip, spi.port)
                    .jump(&ext);
                self.share(TableName::Nat, KUBE_SERVICES, line);
            }
            if !has_external {
                let line = self
                    .dest_match(KUBE_EXTERNAL_SERVICES, &filter_comment, ip, spi.port)
                    .jump(filter_target);
                self.share(TableName::Filter, KUBE_EXTERNAL_SERVICES, line);
            }
        }

        let lb_comment = format!("{spn} loadbalancer IP");
        let fw_drop_comment = format!("{spn} traffic not accepted by {}", self.chains.fw);
        for ip in &spi.load_balancer_ips {
            if has_endpoints {
                let line = self
                    .dest_match(KUBE_SERVICES, &lb_comment, ip, spi.port)
                    .jump(&lb_chain);
                self.share(TableName::Nat, KUBE_SERVICES, line);
            }
            // Allowed sources are DNAT-ed in KUBE-FW before filter sees them, so whatever still has the LB
            // address as destination here came from outside the source ranges.
            if uses_fw {
                let line = self
                    .dest_match(KUBE_PROXY_FIREWALL, &fw_drop_comment, ip, spi.port)
                    .jump("DROP");
                self.share(TableName::Filter, KUBE_PROXY_FIREWALL, line);
            }
        }
        if !has_external {
            for ip in &spi.load_balancer_ips {
                let line = self
                    .dest_match(KUBE_EXTERNAL_SERVICES, &filter_comment, ip, spi.port)
                    .jump(filter_target);
                self.share(TableName::Filter, KUBE_EXTERNAL_SERVICES, line);
            }
        }

        if let Some(node_port) = spi.node_port {
            // NodePorts are not subject to loadBalancerSourceRanges: upstream decided so long ago and clients
            // depend on it.
            if has_endpoints {
                let line = Line::append(KUBE_NODEPORTS)
                    .comment(&spn)
                    .protocol(spi.name.protocol)
                    .arg_value("--dport", node_port)
                    .jump(&ext);
                self.share(TableName::Nat, KUBE_NODEPORTS, line);
            }
            if !has_external {
                let line = Line::append(KUBE_EXTERNAL_SERVICES)
                    .comment(&filter_comment)
                    .args("-m addrtype --dst-type LOCAL")
                    .protocol(spi.name.protocol)
                    .arg_value("--dport", node_port)
                    .jump(filter_target);
                self.share(TableName::Filter, KUBE_EXTERNAL_SERVICES, line);
            }
        }

        // Opened whatever the endpoints, so the load balancer can learn that this node has none.
        if let Some(hc_port) = spi.health_check_node_port {
            let line = Line::append(KUBE_NODEPORTS)
                .comment(&format!("{spn} health check node port"))
                .args("-m tcp -p tcp")
                .arg_value("--dport", hc_port)
                .jump("ACCEPT");
            self.share(TableName::Filter, KUBE_NODEPORTS, line);
        }

        // Per-service chains.
        let mut svc = Pending {
            name: self.chains.svc.clone(),
            lines: Vec::new(),
        };
        let mut svl = Pending {
            name: self.chains.svl.clone(),
            lines: Vec::new(),
        };

        if has_internal {
            // Off-cluster clients routing the service CIDR through this node must be SNAT-ed so replies come
            // back through it; pods need not be.
            let head = self.dest_match(&internal_chain, &cluster_ip_comment, spi.cluster_ip, spi.port);
            let line = if self.cfg.masquerade_all {
                Some(head.jump(KUBE_MARK_MASQ))
            } else {
                self.cfg
                    .local_detector
                    .if_not_local(self.cfg.family)
                    .map(|not_local| head.args(&not_local).jump(KUBE_MARK_MASQ))
            };
            if let Some(line) = line {
                if spi.internal_policy_local {
                    &mut svl
                } else {
                    &mut svc
                }
                .lines
                .push(line);
            }
        }

        let mut ext_chain = None;
        if spi.uses_external_chain() {
            let mut lines = Vec::new();
            if !spi.external_policy_local {
                // Endpoints may be on other nodes: replies must come back through us.
                lines.push(
                    Line::append(&ext)
                        .comment(&format!("masquerade traffic for {spn} external destinations"))
                        .jump(KUBE_MARK_MASQ),
                );
            } else {
                // Pods and the node itself reaching the external address are sent to all endpoints, as if
                // they had hairpinned through the load balancer; only truly external clients are kept local
                // (and keep their source address).
                if let Some(local) = self.cfg.local_detector.if_local(self.cfg.family) {
                    lines.push(
                        Line::append(&ext)
                            .comment(&format!("pod traffic for {spn} external destinations"))
                            .args(&local)
                            .jump(&self.chains.svc),
                    );
                }
                // The node's own source address would be the VIP itself, which the endpoint cannot answer.
                lines.push(
                    Line::append(&ext)
                        .comment(&format!(
                            "masquerade LOCAL traffic for {spn} external destinations"
                        ))
                        .args("-m addrtype --src-type LOCAL")
                        .jump(KUBE_MARK_MASQ),
                );
                lines.push(
                    Line::append(&ext)
                        .comment(&format!("route LOCAL traffic for {spn} external destinations"))
                        .args("-m addrtype --src-type LOCAL")
                        .jump(&self.chains.svc),
                );
            }
            // With no local endpoint the chain ends without a jump: the packet stays un-DNAT-ed and the filter
            // DROP above catches it.
            if has_external {
                lines.push(Line::append(&ext).jump(&external_policy_chain));
            }
            ext_chain = Some((ChainName::from(ext.as_str()), Chain::new(lines)));
        }

        let mut fw_chain = None;
        if uses_fw {
            let fw = &self.chains.fw;
            let mut lines = Vec::new();
            let mut allow_from_node = false;
            for cidr in &spi.source_ranges {
                let cidr = cidr.trunc();
                lines.push(
                    Line::append(fw)
                        .comment(&lb_comment)
                        .arg_value("-s", cidr)
                        .jump(&ext),
                );
                if self.cfg.node_ip.is_some_and(|ip| cidr.contains(&ip)) {
                    allow_from_node = true;
                }
            }
            if allow_from_node {
                for ip in &spi.load_balancer_ips {
                    lines.push(
                        Line::append(fw)
                            .comment(&lb_comment)
                            .arg_value("-s", ip)
                            .jump(&ext),
                    );
                }
            }
            // A counter-only rule naming where the rest goes, for people reading the chain.
            lines.push(
                Line::append(fw)
                    .comment(&format!(
                        "other traffic to {spn} will be dropped by {KUBE_PROXY_FIREWALL}"
                    ))
                    .finish(),
            );
            fw_chain = Some((ChainName::from(fw.as_str()), Chain::new(lines)));
        }

        let uses_svc = spi.uses_cluster_chain();
        let uses_svl = spi.uses_local_chain();
        if uses_svc {
            self.dispatch(&mut svc, &spi.endpoints.cluster);
        }
        if uses_svl {
            self.dispatch(&mut svl, &spi.endpoints.local);
        }

        let mut chains = Vec::with_capacity(4 + spi.endpoints.all_reachable.len());
        chains.extend(ext_chain);
        chains.extend(fw_chain);
        // Only chains with endpoints are declared. The masquerade rule above cannot be orphaned: the intent's
        // derived booleans make "has internal endpoints" imply that the internal chain is in use.
        if uses_svc {
            chains.push((svc.name.into(), Chain::new(svc.lines)));
        }
        if uses_svl {
            chains.push((svl.name.into(), Chain::new(svl.lines)));
        }
        for ep in &spi.endpoints.all_reachable {
            let name = sep_chain(&spi.name, ep);
            let lines = self.endpoint_chain(&name, ep);
            chains.push((name.into(), Chain::new(lines)));
        }

        ServicePortRules {
            chains,
            shared: self.shared,
        }
    }

    /// Spreads new connections evenly: rule i of n matches with probability 1/(n−i), the last one always.
    /// ClientIP affinity rules come first so a returning client goes back to its endpoint.
    fn dispatch(&self, chain: &mut Pending, endpoints: &[EndpointInfo]) {
        let comments: Vec<Option<String>> = endpoints
            .iter()
            .map(|ep| (!self.large_cluster).then(|| format!("{} -> {ep}", self.spn)))
            .collect();
        let seps: Vec<String> = endpoints.iter().map(|ep| sep_chain(&self.spi.name, ep)).collect();
        if let SessionAffinity::ClientIP { timeout_seconds } = self.spi.session_affinity {
            for (sep, comment) in seps.iter().zip(&comments) {
                let line = self
                    .with_comment(Line::append(&chain.name), comment.as_deref())
                    .arg_value("-m recent --name", sep)
                    .arg_value("--rcheck --seconds", timeout_seconds)
                    .args("--reap")
                    .jump(sep);
                chain.lines.push(line);
            }
        }
        let n = endpoints.len();
        for (i, (sep, comment)) in seps.iter().zip(&comments).enumerate() {
            let mut line = self.with_comment(Line::append(&chain.name), comment.as_deref());
            if i + 1 < n {
                line = line.arg_value("-m statistic --mode random --probability", probability(n - i));
            }
            chain.lines.push(line.jump(sep));
        }
    }

    fn with_comment(&self, line: Line, comment: Option<&str>) -> Line {
        match comment {
            Some(c) => line.comment(c),
            None => line,
        }
    }

    /// Hairpin masquerade (a pod reaching its own service must not see its own address as source, or its
    /// reply would bypass conntrack), then the DNAT, recording the client for affinity when enabled.
    fn endpoint_chain(&self, name: &str, ep: &EndpointInfo) -> Vec<String> {
        let comment = (!self.large_cluster).then_some(self.spn.as_str());
        let masq = self
            .with_comment(Line::append(name), comment)
            .arg_value("-s", ep.ip)
            .jump(KUBE_MARK_MASQ);
        let mut dnat = self.with_comment(Line::append(name), comment);
        if matches!(self.spi.session_affinity, SessionAffinity::ClientIP { .. }) {
            dnat = dnat.arg_value("-m recent --name", name).args("--set");
        }
        let dnat = dnat
            .protocol(self.spi.name.protocol)
            .args("-j DNAT")
            .arg_value("--to-destination", ep)
            .finish();
        vec![masq, dnat]
    }
}
