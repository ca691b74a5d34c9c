//! The rules of one service port, computed on their own so a sync can reuse the result for every service port
//! whose intent did not change.
//!
//! Rule shapes, texts and order follow upstream's generator, so chains written by either proxy look the
//! same; the comments below say which upstream behaviour each part reproduces.

use std::borrow::Cow;
use std::cell::OnceCell;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;

use svcproxy_model::{EndpointInfo, Protocol, ServicePortIntent, SessionAffinity};

use crate::chain_name::{
    KUBE_EXTERNAL_SERVICES, KUBE_MARK_MASQ, KUBE_NODEPORTS, KUBE_PROXY_FIREWALL, KUBE_SERVICES, SepNames,
    ServiceChains,
};
use crate::config::{LOCALHOST_NODEPORTS_COUNTER, RenderConfig};
use crate::rule_text::{ChainRules, Line};
use crate::ruleset::{Chain, ChainName, TableName};

/// One line a service port adds to a chain shared by all service ports (`KUBE-SERVICES`, …).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedRule {
    pub table: TableName,
    pub chain: &'static str,
    pub line: String,
}

impl SharedRule {
    /// The line's arguments after `-A CHAIN`.
    pub fn args(&self) -> &str {
        debug_assert!(
            self.line.starts_with("-A ")
                && self.line[3..].starts_with(self.chain)
                && self.line.as_bytes().get(3 + self.chain.len()) == Some(&b' '),
            "not an append to {}: {:?}",
            self.chain,
            self.line
        );
        self.line.get(self.chain.len() + 4..).unwrap_or("")
    }
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

/// Renders one service port. `large_cluster` drops the per-endpoint comments, as upstream does above 1000
/// endpoints in total (see [`crate::render::is_large_cluster`]).
pub fn render_service_port(
    spi: &ServicePortIntent,
    cfg: &RenderConfig,
    large_cluster: bool,
) -> ServicePortRules {
    SCRATCH.with_borrow_mut(|scratch| {
        let rules = render_with(spi, cfg, large_cluster, scratch);
        scratch.trim();
        rules
    })
}

/// The buffers a service port is rendered in, kept from one service port to the next on each thread: a cold
/// render at 10,000 services renders 10,000 of them, and each allocated all of these afresh (and grew its
/// text a few times).
struct Scratch {
    spn: String,
    sep_names: SepNames,
    sep_text: String,
    sep_ranges: Vec<Range<usize>>,
    names: Vec<(ChainName, Range<usize>)>,
    text: String,
}

impl Default for Scratch {
    fn default() -> Self {
        Scratch {
            spn: String::new(),
            sep_names: SepNames::spelled("", Protocol::Tcp),
            sep_text: String::new(),
            sep_ranges: Vec::new(),
            names: Vec::new(),
            text: String::new(),
        }
    }
}

impl Scratch {
    /// Beyond this, a buffer one large service port grew is let go rather than kept for the small ones.
    const KEPT_BYTES: usize = 1 << 20;

    fn trim(&mut self) {
        if self.text.capacity() > Self::KEPT_BYTES || self.sep_text.capacity() > Self::KEPT_BYTES {
            *self = Scratch::default();
        }
    }
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

fn render_with(
    spi: &ServicePortIntent,
    cfg: &RenderConfig,
    large_cluster: bool,
    scratch: &mut Scratch,
) -> ServicePortRules {
    let Scratch {
        spn,
        sep_names,
        sep_text,
        sep_ranges,
        names,
        text,
    } = scratch;
    spn.clear();
    sep_text.clear();
    sep_ranges.clear();
    names.clear();
    text.clear();
    // Each endpoint chain is named once, though the cluster and the local chain may both jump to it; the
    // names are kept as one text, which the rules are written from without checking each name again.
    let _ = write!(spn, "{}", spi.name);
    sep_names.reseed(spn, spi.name.protocol);
    let reachable = spi.endpoints.all_reachable();
    sep_ranges.extend(reachable.iter().map(|ep| {
        let start = sep_text.len();
        sep_text.push_str(sep_names.spell(ep));
        start..sep_text.len()
    }));
    let r = ServiceRenderer {
        spi,
        cfg,
        large_cluster,
        chains: ServiceChains::spelled(spn, spi.name.protocol),
        spn,
        reachable,
        sep_text,
        sep_ranges,
        by_address: OnceCell::new(),
    };

    // Every chain's rules go into one text, which the chains then share (copied out exactly: the parts of
    // every service port are held for as long as the proxy runs): one allocation for the part instead of
    // one per chain.
    let mut chain = |name: ChainName, build: &dyn Fn(&mut ChainRules<'_>)| {
        let start = text.len();
        build(&mut ChainRules::extending(text));
        names.push((name, start..text.len()));
    };
    if spi.uses_external_chain() {
        chain(r.chains.ext.clone(), &|rules| r.external_chain(rules));
    }
    if spi.uses_firewall_chain() {
        chain(r.chains.fw.clone(), &|rules| r.firewall_chain(rules));
    }
    // Only chains with endpoints are declared. The masquerade rule cannot be orphaned: the intent's derived
    // booleans make "has internal endpoints" imply that the internal chain is in use.
    if spi.uses_cluster_chain() {
        chain(r.chains.svc.clone(), &|rules| {
            if !spi.internal_policy_local {
                r.masquerade_rule(rules);
            }
            r.dispatch(&spi.endpoints.cluster, rules);
        });
    }
    if spi.uses_local_chain() {
        chain(r.chains.svl.clone(), &|rules| {
            if spi.internal_policy_local {
                r.masquerade_rule(rules);
            }
            r.dispatch(&spi.endpoints.local, rules);
        });
    }
    for (at, ep) in reachable.iter().enumerate() {
        let name = r.sep_at(at);
        chain(ChainName::from(name), &|rules| r.endpoint_chain(name, ep, rules));
    }
    let chains = Chain::split(text, names.iter().map(|(_, range)| range.clone()));
    let chains = names.iter().map(|(name, _)| name.clone()).zip(chains).collect();
    ServicePortRules {
        chains,
        shared: r.shared_rules(),
    }
}

struct ServiceRenderer<'a> {
    spi: &'a ServicePortIntent,
    cfg: &'a RenderConfig,
    large_cluster: bool,
    spn: &'a str,
    chains: ServiceChains,
    /// Every endpoint some rule sends to, and the names of their chains: in `sep_text`, at `sep_ranges` (in
    /// the same order).
    reachable: &'a [EndpointInfo],
    sep_text: &'a str,
    sep_ranges: &'a [Range<usize>],
    /// Positions in `reachable` by endpoint address, sorted; made only for a policy chain that picks from
    /// some of the endpoints (a Local policy's, next to a cluster chain).
    by_address: OnceCell<Vec<(SocketAddr, usize)>>,
}

impl ServiceRenderer<'_> {
    /// The endpoint chain's name. The reachable endpoints include every endpoint a policy chain picks from
    /// (the intent guarantees it); should one be missing, it is named on the spot rather than trusted.
    fn sep(&self, ep: &EndpointInfo) -> Cow<'_, str> {
        let by_address = self.by_address.get_or_init(|| {
            let mut sorted: Vec<(SocketAddr, usize)> = self
                .reachable
                .iter()
                .enumerate()
                .map(|(at, ep)| (ep.socket_addr(), at))
                .collect();
            sorted.sort_unstable_by_key(|(addr, _)| *addr);
            sorted
        });
        match by_address.binary_search_by_key(&ep.socket_addr(), |(a, _)| *a) {
            Ok(i) => Cow::Borrowed(self.sep_at(by_address[i].1)),
            Err(_) => Cow::Owned(SepNames::new(&self.spi.name).spell(ep).to_owned()),
        }
    }

    /// The chain name of the endpoint at `at` in `reachable`.
    fn sep_at(&self, at: usize) -> &str {
        &self.sep_text[self.sep_ranges[at].clone()]
    }

    fn internal_chain(&self) -> &str {
        if self.spi.internal_policy_local {
            &self.chains.svl
        } else {
            &self.chains.svc
        }
    }

    fn external_policy_chain(&self) -> &str {
        if self.spi.external_policy_local {
            &self.chains.svl
        } else {
            &self.chains.svc
        }
    }

    /// `-m comment --comment <c> -m <p> -p <p> -d <ip> --dport <port>`: the common head of every rule
    /// matching a service address.
    fn dest_match(&self, line: Line, comment: &[&str], ip: IpAddr, port: u16) -> Line {
        line.comment_of(comment)
            .protocol(self.spi.name.protocol)
            .arg_ip("-d", ip)
            .arg_port("--dport", port)
    }

    fn with_comment(line: Line, comment: Option<&str>) -> Line {
        match comment {
            Some(c) => line.comment(c),
            None => line,
        }
    }

    /// The lines in `KUBE-SERVICES`, `KUBE-NODEPORTS`, `KUBE-EXTERNAL-SERVICES` and `KUBE-PROXY-FIREWALL`.
    fn shared_rules(&self) -> Vec<SharedRule> {
        let spi = self.spi;
        let spn: &str = self.spn;
        let mut out = Vec::new();
        // Kept with the service port's cached rules, so without the slack of the build buffer.
        let mut share = |table, chain, mut line: String| {
            line.shrink_to_fit();
            out.push(SharedRule { table, chain, line })
        };
        let has_endpoints = spi.has_endpoints();
        let has_external = spi.has_external_endpoints();
        let ext = &self.chains.ext;

        // Without any endpoint upstream rejects, so clients learn at once; with endpoints elsewhere but none
        // a Local policy allows here, it drops, as nobody on this node would answer.
        let (verdict_comment, verdict) = if has_endpoints {
            ([spn, " has no local endpoints"], "DROP")
        } else {
            ([spn, " has no endpoints"], "REJECT")
        };

        if spi.has_internal_endpoints() {
            let line = self
                .dest_match(
                    Line::append(KUBE_SERVICES),
                    &[spn, " cluster IP"],
                    spi.cluster_ip,
                    spi.port,
                )
                .jump(self.internal_chain());
            share(TableName::Nat, KUBE_SERVICES, line);
        } else {
            let line = self
                .dest_match(
                    Line::append(KUBE_SERVICES),
                    &verdict_comment,
                    spi.cluster_ip,
                    spi.port,
                )
                .jump(verdict);
            share(TableName::Filter, KUBE_SERVICES, line);
        }

        let external_ip_comment = [spn, " external IP"];
        for ip in &spi.external_ips {
            if has_endpoints {
                let line = self
                    .dest_match(Line::append(KUBE_SERVICES), &external_ip_comment, *ip, spi.port)
                    .jump(ext);
                share(TableName::Nat, KUBE_SERVICES, line);
            }
            if !has_external {
                let line = self
                    .dest_match(
                        Line::append(KUBE_EXTERNAL_SERVICES),
                        &verdict_comment,
                        *ip,
                        spi.port,
                    )
                    .jump(verdict);
                share(TableName::Filter, KUBE_EXTERNAL_SERVICES, line);
            }
        }

        let uses_fw = spi.uses_firewall_chain();
        let lb_target = if uses_fw { &self.chains.fw } else { ext };
        let lb_comment = [spn, " loadbalancer IP"];
        let fw_drop_comment = [spn, " traffic not accepted by ", &self.chains.fw];
        for ip in &spi.load_balancer_ips {
            if has_endpoints {
                let line = self
                    .dest_match(Line::append(KUBE_SERVICES), &lb_comment, *ip, spi.port)
                    .jump(lb_target);
                share(TableName::Nat, KUBE_SERVICES, line);
            }
            // Allowed sources were DNAT-ed in KUBE-FW before filter sees them, so whatever still has the LB
            // address as destination here came from outside the source ranges.
            if uses_fw {
                let line = self
                    .dest_match(Line::append(KUBE_PROXY_FIREWALL), &fw_drop_comment, *ip, spi.port)
                    .jump("DROP");
                share(TableName::Filter, KUBE_PROXY_FIREWALL, line);
            }
        }
        if !has_external {
            for ip in &spi.load_balancer_ips {
                let line = self
                    .dest_match(
                        Line::append(KUBE_EXTERNAL_SERVICES),
                        &verdict_comment,
                        *ip,
                        spi.port,
                    )
                    .jump(verdict);
                share(TableName::Filter, KUBE_EXTERNAL_SERVICES, line);
            }
        }

        if let Some(node_port) = spi.node_port {
            // NodePorts are not subject to loadBalancerSourceRanges: upstream decided so long ago, and clients
            // depend on it.
            if has_endpoints {
                // Upstream counts localhost NodePort traffic with a rule of its own, ahead of the general one.
                if self.cfg.packet_counters && self.cfg.localhost_node_ports_active() {
                    let line = Line::append(KUBE_NODEPORTS)
                        .comment(spn)
                        .protocol(spi.name.protocol)
                        .arg_value("-d", self.cfg.loopback_net())
                        .arg_port("--dport", node_port)
                        .arg_value("-m nfacct --nfacct-name", LOCALHOST_NODEPORTS_COUNTER)
                        .jump(ext);
                    share(TableName::Nat, KUBE_NODEPORTS, line);
                }
                let line = Line::append(KUBE_NODEPORTS)
                    .comment(spn)
                    .protocol(spi.name.protocol)
                    .arg_port("--dport", node_port)
                    .jump(ext);
                share(TableName::Nat, KUBE_NODEPORTS, line);
            }
            if !has_external {
                let line = Line::append(KUBE_EXTERNAL_SERVICES)
                    .comment_of(&verdict_comment)
                    .args("-m addrtype --dst-type LOCAL")
                    .protocol(spi.name.protocol)
                    .arg_port("--dport", node_port)
                    .jump(verdict);
                share(TableName::Filter, KUBE_EXTERNAL_SERVICES, line);
            }
        }

        // Opened whatever the endpoints: the load balancer must be able to ask, and learn there are none.
        if let Some(hc_port) = spi.health_check_node_port {
            let line = Line::append(KUBE_NODEPORTS)
                .comment_of(&[spn, " health check node port"])
                .args("-m tcp -p tcp")
                .arg_port("--dport", hc_port)
                .jump("ACCEPT");
            share(TableName::Filter, KUBE_NODEPORTS, line);
        }
        out
    }

    /// First rule of the internal chain. Off-cluster clients that route the service range through this node
    /// must be SNAT-ed so replies come back through it; pods need not be.
    fn masquerade_rule(&self, rules: &mut ChainRules<'_>) {
        let spi = self.spi;
        if !spi.has_internal_endpoints() {
            return;
        }
        let not_local = if self.cfg.masquerade_all {
            None
        } else {
            match self.cfg.local_detector.local_match(self.cfg.family) {
                Some(local) => Some(local),
                None => return,
            }
        };
        rules.add(|l| {
            let head = self.dest_match(l, &[self.spn, " cluster IP"], spi.cluster_ip, spi.port);
            match not_local {
                Some(local) => head.local(local, true),
                None => head,
            }
            .jump(KUBE_MARK_MASQ)
        });
    }

    /// `KUBE-EXT-*`: what NodePort, external-IP and load-balancer traffic goes through.
    fn external_chain(&self, rules: &mut ChainRules<'_>) {
        let (spn, svc) = (&self.spn, &self.chains.svc);
        if !self.spi.external_policy_local {
            // Endpoints may be on other nodes: replies must come back through us.
            rules.add(|l| {
                l.comment_of(&["masquerade traffic for ", spn, " external destinations"])
                    .jump(KUBE_MARK_MASQ)
            });
        } else {
            // Pods and the node itself reaching the external address are sent to all endpoints, as if they had
            // hairpinned through the load balancer; only truly external clients are kept local (and keep their
            // source address).
            if let Some(local) = self.cfg.local_detector.local_match(self.cfg.family) {
                rules.add(|l| {
                    l.comment_of(&["pod traffic for ", spn, " external destinations"])
                        .local(local, false)
                        .jump(svc)
                });
            }
            // The node's own source address would be the external address itself, which an endpoint cannot
            // answer.
            rules.add(|l| {
                l.comment_of(&["masquerade LOCAL traffic for ", spn, " external destinations"])
                    .args("-m addrtype --src-type LOCAL")
                    .jump(KUBE_MARK_MASQ)
            });
            rules.add(|l| {
                l.comment(&format!("route LOCAL traffic for {spn} external destinations"))
                    .args("-m addrtype --src-type LOCAL")
                    .jump(svc)
            });
        }
        // With no local endpoint the chain ends without a jump: the packet stays un-DNAT-ed and the filter
        // DROP catches it.
        if self.spi.has_external_endpoints() {
            rules.add(|l| l.jump(self.external_policy_chain()));
        }
    }

    /// `KUBE-FW-*`: the load-balancer source ranges.
    fn firewall_chain(&self, rules: &mut ChainRules<'_>) {
        let ext = &self.chains.ext;
        let comment = format!("{} loadbalancer IP", self.spn);
        let mut allow_from_node = false;
        for cidr in &self.spi.source_ranges {
            let cidr = cidr.trunc();
            rules.add(|l| l.comment(&comment).arg_value("-s", cidr).jump(ext));
            allow_from_node |= self.cfg.node_ip.is_some_and(|ip| cidr.contains(&ip));
        }
        // On load balancers that put the VIP on the node, node-to-VIP traffic loops back with the VIP as its
        // source; admit it when the node itself is allowed.
        if allow_from_node {
            for ip in &self.spi.load_balancer_ips {
                rules.add(|l| l.comment(&comment).arg_value("-s", ip).jump(ext));
            }
        }
        // A counter-only rule naming where the rest goes, for people reading the chain.
        let other = format!(
            "other traffic to {} will be dropped by {KUBE_PROXY_FIREWALL}",
            self.spn
        );
        rules.add(|l| l.comment(&other).finish());
    }

    /// Spreads new connections evenly: rule i of n matches with probability 1/(n−i), the last one always.
    /// ClientIP affinity rules come first so a returning client goes back to its endpoint.
    fn dispatch(&self, endpoints: &[EndpointInfo], rules: &mut ChainRules<'_>) {
        // Mostly the policy chain picks from every reachable endpoint (the very same list): their names are
        // then where they are, and nothing is looked up.
        let every = std::ptr::eq(endpoints, self.reachable);
        let sep = |at: usize, ep: &EndpointInfo| {
            if every {
                Cow::Borrowed(self.sep_at(at))
            } else {
                self.sep(ep)
            }
        };
        // The per-endpoint comment, `"ns/svc:port -> ip:port"`, written in place.
        let commented = |line: Line, ep: &EndpointInfo| {
            if self.large_cluster {
                line
            } else {
                line.endpoint_comment(self.spn, ep)
            }
        };
        if let SessionAffinity::ClientIP { timeout_seconds } = self.spi.session_affinity {
            for (at, ep) in endpoints.iter().enumerate() {
                let sep = sep(at, ep);
                rules.add(|l| {
                    commented(l, ep)
                        .arg("-m recent --name", &sep)
                        .arg_value("--rcheck --seconds", timeout_seconds)
                        .args("--reap")
                        .jump(&sep)
                });
            }
        }
        let n = endpoints.len();
        for (i, ep) in endpoints.iter().enumerate() {
            let sep = sep(i, ep);
            rules.add(|l| {
                let mut line = commented(l, ep);
                if i + 1 < n {
                    line = line.probability(n - i);
                }
                line.jump(&sep)
            });
        }
    }

    /// Hairpin masquerade (a pod reaching its own service must not see its own address as the source, or
    /// its reply would bypass the reverse NAT), then the DNAT, recording the client when affinity is on.
    fn endpoint_chain(&self, name: &str, ep: &EndpointInfo, rules: &mut ChainRules<'_>) {
        let comment = (!self.large_cluster).then_some(self.spn);
        rules.add(|l| {
            Self::with_comment(l, comment)
                .arg_ip("-s", ep.ip)
                .jump(KUBE_MARK_MASQ)
        });
        rules.add(|l| {
            let mut dnat = Self::with_comment(l, comment);
            if matches!(self.spi.session_affinity, SessionAffinity::ClientIP { .. }) {
                dnat = dnat.arg("-m recent --name", name).args("--set");
            }
            dnat.protocol(self.spi.name.protocol)
                .args("-j DNAT")
                .arg_endpoint("--to-destination", ep)
                .finish()
        });
    }
}
