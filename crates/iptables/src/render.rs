//! From intent to ruleset: the fixed chains, plus every service port's part, concatenated in service-port
//! order so the same intent always gives the same bytes.

use svcproxy_model::{Intent, ServicePortIntent};

use crate::chain_name::{
    KUBE_EXTERNAL_SERVICES, KUBE_FIREWALL, KUBE_FORWARD, KUBE_MARK_MASQ, KUBE_NODEPORTS, KUBE_POSTROUTING,
    KUBE_PROXY_FIREWALL, KUBE_SERVICES,
};
use crate::config::{CT_STATE_INVALID_COUNTER, NodePortAddresses, RenderConfig};
use crate::parallel::{MIN_ITEMS_PER_THREAD, map_in_order};
use crate::payload::{Payload, Section, serialize};
use crate::rule_text::{ChainRules, Line};
use crate::ruleset::{Chain, ChainName, Ruleset, TableName};
use crate::service_rules::{ServicePortRules, render_service_port};

/// Above this many endpoints in total (any state, summed over service ports) upstream drops per-endpoint
/// comments, which shrinks payloads by 40% and more.
pub const LARGE_CLUSTER_ENDPOINTS: usize = 1000;

pub fn is_large_cluster(intent: &Intent) -> bool {
    intent.total_endpoints() > LARGE_CLUSTER_ENDPOINTS
}

/// The whole desired ruleset for one family.
pub fn render(intent: &Intent, cfg: &RenderConfig) -> Ruleset {
    assemble(cfg, &render_parts(intent, cfg))
}

/// Every service port's part, in service-port order, rendered on every core.
fn render_parts(intent: &Intent, cfg: &RenderConfig) -> Vec<ServicePortRules> {
    let large = is_large_cluster(intent);
    let ports: Vec<&ServicePortIntent> = intent.service_ports.values().map(|spi| &**spi).collect();
    map_in_order(&ports, MIN_ITEMS_PER_THREAD, |spi| {
        render_service_port(spi, cfg, large)
    })
}

/// The `iptables-restore` payload that writes the whole ruleset for `intent`, as [`full_payload`] of
/// [`render`] writes it but with the chains in service-port order, not name order: written straight from the
/// service ports' parts, without the map of chains by name (sorting 110,000 chains and counting each shared
/// text took a fifth of the time at 10,000 services) and reading the parts' texts in the order they were made
/// in.
///
/// [`full_payload`]: crate::payload::full_payload
pub fn render_payload(intent: &Intent, cfg: &RenderConfig) -> Payload {
    payload_of_parts(cfg, &render_parts(intent, cfg))
}

/// The payload that writes the ruleset of `parts` (all of them, in service-port order): the shared chains by
/// name, then each part's chains in its own order. A chain two parts both name (only a collision of 80-bit
/// hashes could make one) would be written twice, its rules appended from both, where the ruleset keeps the
/// later part's.
pub fn payload_of_parts(cfg: &RenderConfig, parts: &[ServicePortRules]) -> Payload {
    let shared = shared_chains(cfg, parts);
    let section = |table: TableName| {
        let mut write: Vec<(&[u8], &Chain)> = shared
            .iter()
            .filter(|(t, _, _)| *t == table)
            .filter_map(|(_, name, chain)| chain.as_ref().map(|chain| (name.as_bytes(), chain)))
            .collect();
        write.sort_unstable_by_key(|(name, _)| *name);
        if table == TableName::Nat {
            write.extend(
                parts
                    .iter()
                    .flat_map(|part| part.chains.iter().map(|(name, chain)| (name.as_bytes(), chain))),
            );
        }
        Section {
            table,
            write,
            delete: Vec::new(),
            jumps: Vec::new(),
            delete_rules: Vec::new(),
        }
    };
    serialize(&TableName::ALL.map(section))
}

/// Builds the ruleset from per-service-port parts, given in service-port order. A sync that caches the parts
/// of unchanged service ports calls this instead of [`render`].
pub fn assemble<'a, I>(cfg: &RenderConfig, parts: I) -> Ruleset
where
    I: IntoIterator<Item = &'a ServicePortRules>,
    I::IntoIter: Clone,
{
    let parts = parts.into_iter();
    // Sized once: grown by doubling, the list of 55,000 chains at 5,000 services held twice their size.
    let mut owned = Vec::with_capacity(parts.clone().map(|p| p.chains.len()).sum());
    for part in parts.clone() {
        owned.extend(
            part.chains
                .iter()
                .map(|chain| (name_key(chain.0.as_bytes()), chain)),
        );
    }
    // Sorted by the names' first sixteen bytes held inline: comparing shared names means reading each from
    // its own allocation, a cache miss apiece, a million times at 100,000 chains. The names that tie there
    // (every per-service chain shares a 9-byte prefix, so only a 7-character hash collision) are compared
    // whole. Stable, so of two equal names the later wins, as in a map built in order.
    owned.sort_by(|(ka, a), (kb, b)| ka.cmp(kb).then_with(|| a.0.cmp(&b.0)));
    // Collecting builds the map in one sorted pass instead of a tree descent per chain, which matters at a
    // hundred thousand chains (the collection's own sort finds the list already sorted).
    let mut ruleset = Ruleset::default();
    ruleset.nat.chains = owned.into_iter().map(|(_, chain)| chain.clone()).collect();
    set_shared_chains(cfg, parts, &mut ruleset);
    ruleset
}

/// The first sixteen bytes of a name, zero-padded, as a number that sorts as the names do (a chain name holds
/// no NUL, so a name shorter than another it starts is smaller both ways).
fn name_key(name: &[u8]) -> u128 {
    let mut bytes = [0u8; 16];
    let head = &name[..name.len().min(16)];
    bytes[..head.len()].copy_from_slice(head);
    u128::from_be_bytes(bytes)
}

/// What [`reassemble`] changed: every chain it touched, with the version it had before (`None`: it is new),
/// in table and name order.
pub type Replaced = std::collections::BTreeMap<(TableName, ChainName), Option<Chain>>;

/// Makes `ruleset`, assembled with `cfg` from some parts, the ruleset of `parts` (all of them, in service-port
/// order), in place: the chains of `removed` parts (gone, or replaced by a new rendering) go, those of `added`
/// ones come in, and the shared chains are built again. The result equals [`assemble`] of `parts`; a sync
/// that changed a few service ports so neither sorts every chain into a new map nor holds two maps, and
/// learns what changed without comparing them.
pub fn reassemble<'a>(
    cfg: &RenderConfig,
    ruleset: &mut Ruleset,
    removed: &[&ServicePortRules],
    added: &[&ServicePortRules],
    parts: impl IntoIterator<Item = &'a ServicePortRules>,
) -> Replaced {
    let mut replaced = Replaced::new();
    for part in removed {
        for (name, _) in &part.chains {
            if let Some(old) = ruleset.nat.chains.remove(name) {
                replaced
                    .entry((TableName::Nat, name.clone()))
                    .or_insert(Some(old));
            }
        }
    }
    for part in added {
        for (name, chain) in &part.chains {
            let old = ruleset.nat.chains.insert(name.clone(), chain.clone());
            replaced.entry((TableName::Nat, name.clone())).or_insert(old);
        }
    }
    if !same_shared_lines(removed, added) {
        put_shared_chains(cfg, parts, ruleset, |table, name, old| {
            replaced.entry((table, name.into())).or_insert(old);
        });
    }
    replaced
}

/// Whether the parts `added` bring exactly the lines in shared chains that the `removed` ones take away, so
/// those chains stay as they are: what an endpoint change does (the Service's `KUBE-SERVICES` line names its
/// chain, not its endpoints), and rebuilding them reads every part (2.6 ms at 10,000 services, the most of
/// such a sync). Each part's shared lines name its service port, so equal lines are the same service port,
/// in the same place in the service-port order. Matched pairwise, for the few parts a change touches.
fn same_shared_lines(removed: &[&ServicePortRules], added: &[&ServicePortRules]) -> bool {
    const MOST: usize = 64;
    if removed.len() != added.len() || added.len() > MOST {
        return false;
    }
    let mut unmatched: Vec<&ServicePortRules> = removed.to_vec();
    added.iter().all(|part| {
        let Some(at) = unmatched.iter().position(|old| old.shared == part.shared) else {
            return false;
        };
        unmatched.swap_remove(at);
        true
    })
}

/// Every chain of a ruleset that no single service port owns, in the order [`shared_chains`] builds them: the
/// chains every service port adds lines to, and the fixed ones (`KUBE-FIREWALL` only with localhost NodePorts).
/// Every other chain of a ruleset belongs to one service port's part.
pub const SHARED_CHAINS: [(TableName, &str); 10] = [
    (TableName::Nat, KUBE_SERVICES),
    (TableName::Nat, KUBE_NODEPORTS),
    (TableName::Nat, KUBE_POSTROUTING),
    (TableName::Nat, KUBE_MARK_MASQ),
    (TableName::Filter, KUBE_SERVICES),
    (TableName::Filter, KUBE_EXTERNAL_SERVICES),
    (TableName::Filter, KUBE_NODEPORTS),
    (TableName::Filter, KUBE_PROXY_FIREWALL),
    (TableName::Filter, KUBE_FORWARD),
    (TableName::Filter, KUBE_FIREWALL),
];

/// Puts the chains every service port adds lines to, and the fixed ones, into `ruleset`.
fn set_shared_chains<'a>(
    cfg: &RenderConfig,
    parts: impl IntoIterator<Item = &'a ServicePortRules>,
    ruleset: &mut Ruleset,
) {
    put_shared_chains(cfg, parts, ruleset, |_, _, _| {});
}

/// [`set_shared_chains`], handing each chain's previous version to `replaced`.
fn put_shared_chains<'a>(
    cfg: &RenderConfig,
    parts: impl IntoIterator<Item = &'a ServicePortRules>,
    ruleset: &mut Ruleset,
    mut replaced: impl FnMut(TableName, &'static str, Option<Chain>),
) {
    for (table, name, chain) in shared_chains(cfg, parts) {
        let chains = &mut ruleset.table_mut(table).chains;
        let old = match chain {
            Some(chain) => chains.insert(name.into(), chain),
            None => chains.remove(name),
        };
        replaced(table, name, old);
    }
}

/// The chains every service port adds lines to, and the fixed ones; `None` for one this configuration
/// does not have.
fn shared_chains<'a>(
    cfg: &RenderConfig,
    parts: impl IntoIterator<Item = &'a ServicePortRules>,
) -> Vec<(TableName, &'static str, Option<Chain>)> {
    // Each service port's lines go straight into their chain's text, without the `-A NAME ` they are kept
    // with: no copy of every line on the way.
    let mut shared = SharedChains::default();
    for part in parts {
        for rule in &part.shared {
            let text = shared.get(rule.table, rule.chain);
            text.push_str(rule.args());
            text.push('\n');
        }
    }
    let mark = cfg.masquerade_mark();
    nodeport_gate(cfg, &mut ChainRules::extending(&mut shared.nat_services));
    let masquerade = Line::append(KUBE_MARK_MASQ)
        .args("-j MARK")
        .arg_value("--or-mark", &mark)
        .finish();
    // route_localnet lets packets to 127/8 arrive from outside; drop any that were not DNAT-ed to a NodePort
    // backend (CVE-2020-8558).
    let localnet = cfg.localhost_node_ports_active().then(|| {
        let line = Line::append(KUBE_FIREWALL)
            .comment("block incoming localnet connections")
            .args("-d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT")
            .jump("DROP");
        Chain::new(KUBE_FIREWALL, vec![line])
    });
    let contents = [
        Some(Chain::from_rules(&shared.nat_services)),
        Some(Chain::from_rules(&shared.nat_nodeports)),
        Some(Chain::new(KUBE_POSTROUTING, postrouting(cfg, &mark))),
        Some(Chain::new(KUBE_MARK_MASQ, vec![masquerade])),
        Some(Chain::from_rules(&shared.filter_services)),
        Some(Chain::from_rules(&shared.filter_external_services)),
        Some(Chain::from_rules(&shared.filter_nodeports)),
        Some(Chain::from_rules(&shared.filter_proxy_firewall)),
        Some(Chain::new(KUBE_FORWARD, forward(cfg, &mark))),
        localnet,
    ];
    SHARED_CHAINS
        .into_iter()
        .zip(contents)
        .map(|((table, name), chain)| (table, name, chain))
        .collect()
}

/// The texts of the chains service ports add lines to.
#[derive(Default)]
struct SharedChains {
    nat_services: String,
    nat_nodeports: String,
    filter_services: String,
    filter_external_services: String,
    filter_nodeports: String,
    filter_proxy_firewall: String,
    other: String,
}

impl SharedChains {
    fn get(&mut self, table: TableName, chain: &str) -> &mut String {
        match (table, chain) {
            (TableName::Nat, KUBE_SERVICES) => &mut self.nat_services,
            (TableName::Nat, KUBE_NODEPORTS) => &mut self.nat_nodeports,
            (TableName::Filter, KUBE_SERVICES) => &mut self.filter_services,
            (TableName::Filter, KUBE_EXTERNAL_SERVICES) => &mut self.filter_external_services,
            (TableName::Filter, KUBE_NODEPORTS) => &mut self.filter_nodeports,
            (TableName::Filter, KUBE_PROXY_FIREWALL) => &mut self.filter_proxy_firewall,
            _ => {
                debug_assert!(false, "service rules never target {table} {chain}");
                &mut self.other
            }
        }
    }
}

/// The last rules of nat `KUBE-SERVICES`: whatever matched no service address and is addressed to the node
/// goes on to the NodePorts.
fn nodeport_gate(cfg: &RenderConfig, rules: &mut ChainRules<'_>) {
    const COMMENT: &str = "kubernetes service nodeports; NOTE: this must be the last rule in this chain";
    let localhost = cfg.localhost_node_ports_active();
    match &cfg.node_port_addresses {
        NodePortAddresses::All => rules.add(|l| {
            let line = l.comment(COMMENT).args("-m addrtype --dst-type LOCAL");
            // Localhost NodePorts never work for IPv6 and for IPv4 only with route_localnet.
            if localhost {
                line
            } else {
                line.arg_value("! -d", cfg.loopback_net())
            }
            .jump(KUBE_NODEPORTS)
        }),
        NodePortAddresses::Ips(ips) => {
            for ip in ips
                .iter()
                .filter(|ip| cfg.family.contains(ip))
                .filter(|ip| !ip.is_loopback() || localhost)
            {
                rules.add(|l| l.comment(COMMENT).arg_value("-d", ip).jump(KUBE_NODEPORTS));
            }
        }
    }
}

/// Masquerade marked packets, clearing the bit first so a packet that traverses POSTROUTING again is not
/// masqueraded twice.
fn postrouting(cfg: &RenderConfig, mark: &str) -> Vec<String> {
    let masquerade = Line::append(KUBE_POSTROUTING)
        .comment("kubernetes service traffic requiring SNAT")
        .args("-j MASQUERADE");
    vec![
        Line::append(KUBE_POSTROUTING)
            .arg_value("-m mark ! --mark", format_args!("{mark}/{mark}"))
            .jump("RETURN"),
        Line::append(KUBE_POSTROUTING)
            .args("-j MARK")
            .arg_value("--xor-mark", mark)
            .finish(),
        if cfg.random_fully {
            masquerade.args("--random-fully")
        } else {
            masquerade
        }
        .finish(),
    ]
}

/// Accept forwarded service traffic even when the host's FORWARD policy drops: marked (to-be-masqueraded)
/// packets and the rest of connections already accepted.
fn forward(cfg: &RenderConfig, mark: &str) -> Vec<String> {
    let mut lines = Vec::with_capacity(3);
    if cfg.drop_invalid {
        // A packet conntrack cannot place would escape the reverse NAT and reach the client with the pod's
        // address, which resets the connection (kubernetes#74839).
        let line = Line::append(KUBE_FORWARD).args("-m conntrack --ctstate INVALID");
        lines.push(
            if cfg.packet_counters {
                line.arg_value("-m nfacct --nfacct-name", CT_STATE_INVALID_COUNTER)
            } else {
                line
            }
            .jump("DROP"),
        );
    }
    lines.push(
        Line::append(KUBE_FORWARD)
            .comment("kubernetes forwarding rules")
            .arg_value("-m mark --mark", format_args!("{mark}/{mark}"))
            .jump("ACCEPT"),
    );
    lines.push(
        Line::append(KUBE_FORWARD)
            .comment("kubernetes forwarding conntrack rule")
            .args("-m conntrack --ctstate RELATED,ESTABLISHED")
            .jump("ACCEPT"),
    );
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_chain_outside_the_parts_is_a_listed_shared_one() {
        for localhost_node_ports in [false, true] {
            let cfg = RenderConfig {
                localhost_node_ports,
                ..RenderConfig::default()
            };
            let ruleset = assemble(&cfg, std::iter::empty());
            let all: Vec<(TableName, &str)> = TableName::ALL
                .into_iter()
                .flat_map(|t| ruleset.table(t).chains.keys().map(move |n| (t, &**n)))
                .collect();
            let listed: Vec<(TableName, &str)> = SHARED_CHAINS
                .into_iter()
                .filter(|(t, n)| localhost_node_ports || !(*t == TableName::Filter && *n == KUBE_FIREWALL))
                .collect();
            let mut sorted = listed.clone();
            sorted.sort();
            assert_eq!(all, sorted, "localhost NodePorts {localhost_node_ports}");
        }
    }
}
