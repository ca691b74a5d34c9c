//! The objects every table has whatever the services: base chains at upstream's hooks and priorities, the
//! dispatch chains that look packets up in the maps, and the empty maps themselves.
//!
//! One deliberate difference from upstream: the no-endpoint check for locally generated traffic runs after
//! DNAT (`filter-output-post-dnat`) rather than before it. Before DNAT, host traffic to a Local-policy
//! external address without local endpoints hits the "drop" element although its own external chain would
//! short-circuit it to cluster-wide endpoints; after DNAT only packets that were not rewritten are checked,
//! which is what the check is for. Forwarded and incoming traffic already reach their checks after DNAT.
//!
//! Another: the nat chains run one step after upstream's priorities (see [`NAT_PRIORITY_AFTER_OTHERS`]).

use crate::config::{DispatchLayout, NodePortAddresses, RenderConfig};
use crate::names::*;
use crate::ruleset::{
    BaseChain, Chain, ChainType, Hook, PRIORITY_DSTNAT, PRIORITY_SRCNAT, Policy, Ruleset, Set, SetKind,
};
use crate::slots;
use compact_str::ToCompactString;

pub const TABLE_COMMENT: &str = "rules for svcproxy";

/// How far after `dstnat` and `srcnat` our nat chains run. At one hook the kernel lets nat chains decide in
/// priority order until one has bound the connection, and of chains with equal priority it runs the one
/// registered last first. A node's iptables `nat` table (kubelet's and the CNI plugin's chains) is
/// registered long before our table, so at upstream's own priorities our table would decide every
/// connection ahead of iptables rules, including kube-proxy's after the node was handed back to it: a table
/// we left behind would keep sending Service traffic to the endpoints it last knew, silently, until someone
/// deleted it. One step later, any other proxy on the node (kube-proxy in either mode, or the one we are
/// taking over from) decides first, and our chains decide only what no other nat chain claimed; while we run
/// alone that is everything, and a Service address nobody else rewrites.
pub const NAT_PRIORITY_AFTER_OTHERS: i32 = 1;

fn base(chain_type: ChainType, hook: Hook, priority: i32, rules: &[String]) -> Chain {
    Chain {
        base: Some(BaseChain {
            chain_type,
            hook,
            priority,
            policy: Policy::Accept,
        }),
        comment: None,
        rules: rules.to_vec(),
    }
}

fn regular(rules: Vec<String>) -> Chain {
    Chain {
        base: None,
        comment: None,
        rules,
    }
}

fn ct_new_jump(chain: &str) -> String {
    format!("ct state new jump {chain}")
}

fn with_comment(mut set: Set, comment: &str) -> Set {
    set.comment = Some(comment.to_string());
    set
}

/// The table with its fixed chains and empty maps.
pub fn fixed_ruleset(cfg: &RenderConfig) -> Ruleset {
    let mut rs = Ruleset::new(cfg.nft_family(), cfg.table.clone());
    rs.comment = Some(TABLE_COMMENT.into());
    let addr = cfg.addr();
    let addr_type = cfg.addr_type();
    let mark = cfg.mark();

    // Source ranges are checked before DNAT rewrites the destination, hence dstnat - 10.
    let pre_dnat = PRIORITY_DSTNAT - 10;
    let post_dnat = PRIORITY_DSTNAT + 10;
    let chains = &mut rs.chains;
    chains.insert(
        FILTER_PREROUTING.into(),
        base(
            ChainType::Filter,
            Hook::Prerouting,
            pre_dnat,
            &[ct_new_jump(FIREWALL_CHECK)],
        ),
    );
    chains.insert(
        FILTER_INPUT.into(),
        base(
            ChainType::Filter,
            Hook::Input,
            pre_dnat,
            &[
                ct_new_jump(NODEPORT_ENDPOINTS_CHECK),
                ct_new_jump(SERVICE_ENDPOINTS_CHECK),
            ],
        ),
    );
    chains.insert(
        FILTER_FORWARD.into(),
        base(
            ChainType::Filter,
            Hook::Forward,
            pre_dnat,
            &[
                ct_new_jump(SERVICE_ENDPOINTS_CHECK),
                ct_new_jump(CLUSTER_IPS_CHECK),
            ],
        ),
    );
    chains.insert(
        FILTER_OUTPUT.into(),
        base(
            ChainType::Filter,
            Hook::Output,
            pre_dnat,
            &[ct_new_jump(FIREWALL_CHECK)],
        ),
    );
    chains.insert(
        FILTER_OUTPUT_POST_DNAT.into(),
        base(
            ChainType::Filter,
            Hook::Output,
            post_dnat,
            &[
                ct_new_jump(SERVICE_ENDPOINTS_CHECK),
                ct_new_jump(CLUSTER_IPS_CHECK),
            ],
        ),
    );
    for (name, hook) in [(NAT_PREROUTING, Hook::Prerouting), (NAT_OUTPUT, Hook::Output)] {
        chains.insert(
            name.into(),
            base(
                ChainType::Nat,
                hook,
                PRIORITY_DSTNAT + NAT_PRIORITY_AFTER_OTHERS,
                &[format!("jump {SERVICES}")],
            ),
        );
    }
    chains.insert(
        NAT_POSTROUTING.into(),
        base(
            ChainType::Nat,
            Hook::Postrouting,
            PRIORITY_SRCNAT + NAT_PRIORITY_AFTER_OTHERS,
            &[format!("jump {MASQUERADING}")],
        ),
    );

    // Which destinations are NodePort destinations.
    let node_port_dest = match &cfg.node_port_addresses {
        NodePortAddresses::All => format!("fib daddr type local {addr} daddr != {}", cfg.loopback()),
        NodePortAddresses::Ips(_) => format!("{addr} daddr @{NODEPORT_IPS}"),
    };
    let tuple = format!("{addr} daddr . meta l4proto . th dport");
    chains.insert(
        SERVICES.into(),
        regular(vec![
            format!("{tuple} vmap @{SERVICE_IPS}"),
            format!("{node_port_dest} meta l4proto . th dport vmap @{SERVICE_NODEPORTS}"),
        ]),
    );
    chains.insert(
        NODEPORT_ENDPOINTS_CHECK.into(),
        regular(vec![format!(
            "{node_port_dest} meta l4proto . th dport vmap @{NO_ENDPOINT_NODEPORTS}"
        )]),
    );
    chains.insert(
        SERVICE_ENDPOINTS_CHECK.into(),
        regular(vec![format!("{tuple} vmap @{NO_ENDPOINT_SERVICES}")]),
    );
    chains.insert(
        FIREWALL_CHECK.into(),
        regular(vec![format!("{tuple} vmap @{FIREWALL_IPS}")]),
    );
    let mut cluster_checks = vec![format!(
        "{addr} daddr @{CLUSTER_IPS} reject comment \"reject traffic to undefined ports of cluster IPs\""
    )];
    let service_cidrs: Vec<_> = cfg
        .service_cidrs
        .iter()
        .filter(|c| cfg.family.contains(&c.addr()))
        .copied()
        .collect();
    if !service_cidrs.is_empty() {
        cluster_checks.push(format!(
            "{addr} daddr {} drop comment \"drop traffic to unallocated cluster IPs\"",
            crate::addr_text::prefix_set_text(&service_cidrs)
        ));
    }
    chains.insert(CLUSTER_IPS_CHECK.into(), regular(cluster_checks));
    // Clear the bit before masquerading so a packet that traverses postrouting again is not SNATed twice.
    // Endpoints reached without an endpoint chain (the direct and mapped layouts) get their hairpin masquerade
    // here: after DNAT, a packet whose source is its own destination came from the endpoint itself. But only
    // if a DNAT sent it there: an endpoint address is often the node's own (the `kubernetes` Service on a
    // control-plane node, host-network pods), and every connection the host makes to its own address has
    // source equal to destination without going near a Service. The kernel sets `ct status dnat` only when a
    // DNAT changed the connection's tuple.
    //
    // The pair is not narrowed to the endpoint's protocol and port. Besides our own DNATs, `ct status dnat`
    // lets through only another component's DNAT of an endpoint back to itself (a CNI hostPort mapping used
    // by the pod behind it), which is a hairpin all the same and needs the same SNAT; and an
    // `address . address` key is stored inline, where `. tcp . 8080` would put every element of this set
    // (one per endpoint) on the heap.
    chains.insert(
        MASQUERADING.into(),
        regular(vec![
            format!("ct status dnat {addr} saddr . {addr} daddr @{HAIRPIN} jump {MARK_FOR_MASQUERADE}"),
            format!("meta mark & {mark} == 0x00000000 return"),
            format!("meta mark set meta mark ^ {mark}"),
            "masquerade fully-random".into(),
        ]),
    );
    chains.insert(
        MARK_FOR_MASQUERADE.into(),
        regular(vec![format!("meta mark set meta mark | {mark}")]),
    );
    // A vmap cannot hold `reject`, so map elements go to this chain instead.
    chains.insert(
        REJECT_CHAIN.into(),
        Chain {
            base: None,
            comment: Some("target of map elements that reject".into()),
            rules: vec!["reject".into()],
        },
    );

    let tuple_type = format!("type {addr_type} . inet_proto . inet_service");
    let port_type = "type inet_proto . inet_service";
    let sets = &mut rs.sets;
    sets.insert(
        CLUSTER_IPS.into(),
        with_comment(
            Set::new(SetKind::Set, format!("type {addr_type}"), None),
            "active cluster IPs",
        ),
    );
    sets.insert(
        HAIRPIN.into(),
        with_comment(
            Set::new(SetKind::Set, format!("type {addr_type} . {addr_type}"), None),
            "endpoint address pairs that mean hairpin traffic",
        ),
    );
    if let NodePortAddresses::Ips(ips) = &cfg.node_port_addresses {
        let mut set = with_comment(
            Set::new(SetKind::Set, format!("type {addr_type}"), None),
            "addresses that accept NodePort traffic",
        );
        for ip in ips.iter().filter(|ip| cfg.family.contains(ip)) {
            set.elements.insert(ip.to_compact_string(), Default::default());
        }
        sets.insert(NODEPORT_IPS.into(), set);
    }
    let maps = [
        (
            SERVICE_IPS,
            tuple_type.as_str(),
            "cluster IP, external IP and load-balancer IP traffic",
        ),
        (SERVICE_NODEPORTS, port_type, "NodePort traffic"),
        (
            NO_ENDPOINT_SERVICES,
            tuple_type.as_str(),
            "drop or reject traffic to services without endpoints",
        ),
        (
            NO_ENDPOINT_NODEPORTS,
            port_type,
            "drop or reject NodePort traffic to services without endpoints",
        ),
        (
            FIREWALL_IPS,
            tuple_type.as_str(),
            "load-balancer IPs with source ranges",
        ),
    ];
    for (name, key, comment) in maps {
        sets.insert(
            name.into(),
            with_comment(Set::new(SetKind::Map, key, Some("verdict")), comment),
        );
    }
    if cfg.dispatch == DispatchLayout::Mapped {
        for (proto, (name, maps)) in slots::PROTOCOLS.iter().enumerate() {
            let data = format!("{} daddr . {name} dport", cfg.addr());
            for map in 0..*maps {
                sets.insert(
                    slots::map_name(proto, map),
                    Set::new(SetKind::Map, "typeof numgen random mod 1", Some(&data)),
                );
            }
        }
    }
    rs
}
