//! Which Service frontends (an address or a node port, with protocol and port) another proxy's rules on the
//! node serve. svcproxy in nftables mode hands the node back on the way out by deleting its table where
//! another proxy's rules are in place; rules that are there are not necessarily rules that are kept up
//! (leftovers of a kube-proxy that stopped long ago, or one that has not synced since it came back), and
//! handing a Service over to rules that do not know it leaves it with nothing. So the hand-back first checks
//! that every Service svcproxy serves is served there too.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use svcproxy_iptables::save_parser::tokenize;
use svcproxy_model::frontend_claims::frontends_of;
use svcproxy_model::{Intent, IpFamily, Protocol};
use svcproxy_nftables::{Family, parse_listing};

use crate::exec::runner::Runner;

/// Where a Service is addressed: the model's frontends, which the other proxy's rules are read into as well.
pub use svcproxy_model::frontend_claims::Frontend;

/// Every frontend of `intent`, each with its service port's name (`ns/svc:port`): cluster IPs, node ports,
/// external IPs and load-balancer IPs (those of ipMode Proxy are not in the intent: no proxy captures them).
pub fn service_frontends(intent: &Intent) -> BTreeMap<Frontend, String> {
    let mut frontends = BTreeMap::new();
    for spi in intent.service_ports.values() {
        let name = spi.name.to_string();
        for frontend in frontends_of(spi) {
            frontends.insert(frontend, name.clone());
        }
    }
    frontends
}

/// Upstream's nftables table, and its maps that every Service address and node port is in: one for Services
/// with endpoints, one (reject or drop) for those without.
const UPSTREAM_TABLE: &str = "kube-proxy";
const UPSTREAM_MAPS: [&str; 4] = [
    "service-ips",
    "no-endpoint-services",
    "service-nodeports",
    "no-endpoint-nodeports",
];
/// The chains every kube-proxy version's iptables mode matches Services in: every address in nat
/// `KUBE-SERVICES` with endpoints; without, cluster IPs in filter `KUBE-SERVICES` (reject), external and
/// load-balancer IPs and node ports in filter `KUBE-EXTERNAL-SERVICES`; node ports with endpoints in nat
/// `KUBE-NODEPORTS`.
const SERVICE_CHAINS: [(&str, &str); 4] = [
    ("nat", "KUBE-SERVICES"),
    ("filter", "KUBE-SERVICES"),
    ("nat", "KUBE-NODEPORTS"),
    ("filter", "KUBE-EXTERNAL-SERVICES"),
];

/// The frontends other proxies' rules in `family` serve: the elements of upstream's nftables maps, and the
/// destinations matched in nat and filter `KUBE-SERVICES` of either iptables backend. A program that is not
/// there, or a table that is not, adds nothing.
pub fn served_by_others(runner: &dyn Runner, family: IpFamily) -> BTreeSet<Frontend> {
    let (nft_family, iptables) = match family {
        IpFamily::V4 => (Family::Ip, "iptables"),
        IpFamily::V6 => (Family::Ip6, "ip6tables"),
    };
    let mut served = BTreeSet::new();
    // Map by map: listing the whole table would fetch and decode every endpoint map too (a second at 5,000
    // Services).
    for map in UPSTREAM_MAPS {
        let args = ["list", "map", nft_family.keyword(), UPSTREAM_TABLE, map];
        if let Ok(text) = runner.run("nft", &args, None)
            && let Ok(listing) = parse_listing(&text)
            && let Some(map) = listing
                .table(nft_family, UPSTREAM_TABLE)
                .and_then(|t| t.sets.get(map))
        {
            served.extend(map.elements.keys().filter_map(|key| frontend_of_element(key)));
        }
    }
    // A plain dump lists only the tables already in the kernel: naming nat would load the legacy nat module
    // on a node that never used it. Only the lines of the few chains that match Services are split into
    // arguments: the dump is 17 MB at 5,000 Services, parsed whole a hundred-odd MB, on the way out.
    for backend in ["nft", "legacy"] {
        let Ok(dump) = runner.run(&format!("{iptables}-{backend}-save"), &[], None) else {
            continue;
        };
        let mut table = "";
        for line in dump.lines() {
            if let Some(name) = line.strip_prefix('*') {
                table = name.trim();
                continue;
            }
            let Some((chain, _)) = line.strip_prefix("-A ").and_then(|rest| rest.split_once(' ')) else {
                continue;
            };
            if SERVICE_CHAINS.contains(&(table, chain))
                && let Some(args) = tokenize(line)
            {
                served.extend(frontend_of_rule(&args[2..]));
            }
        }
    }
    served
}

/// `10.96.0.10 . udp . 53` or `tcp . 30080`, as `nft` lists a key of upstream's maps.
fn frontend_of_element(key: &str) -> Option<Frontend> {
    let parts: Vec<&str> = key.split(" . ").map(str::trim).collect();
    let (ip, protocol_text, port) = match parts[..] {
        [ip, protocol, port] => (Some(ip.parse().ok()?), protocol, port),
        [protocol, port] => (None, protocol, port),
        _ => return None,
    };
    Some(Frontend {
        ip,
        protocol: protocol(protocol_text)?,
        port: port.parse().ok()?,
    })
}

/// The destination a Service rule matches: `-d IP/32 -p udp … --dport 53`, or without `-d` a node port;
/// none negated.
fn frontend_of_rule(args: &[String]) -> Option<Frontend> {
    let (mut ip, mut proto, mut port) = (None, None, None);
    for (at, pair) in args.windows(2).enumerate() {
        let negated = at > 0 && args[at - 1] == "!";
        match (pair[0].as_str(), negated) {
            // Matching everything but one destination or port is no Service's frontend.
            ("-d" | "-p" | "--dport", true) => return None,
            ("-d", false) => {
                let (addr, prefix) = pair[1].split_once('/').unwrap_or((&pair[1], ""));
                let addr: IpAddr = addr.parse().ok()?;
                let whole = if addr.is_ipv4() { "32" } else { "128" };
                // A range is not one Service's address.
                if !prefix.is_empty() && prefix != whole {
                    return None;
                }
                ip = Some(addr);
            }
            ("-p", false) => proto = protocol(&pair[1]),
            ("--dport", false) => port = pair[1].parse().ok(),
            _ => {}
        }
    }
    Some(Frontend {
        ip,
        protocol: proto?,
        port: port?,
    })
}

fn protocol(text: &str) -> Option<Protocol> {
    match text {
        "tcp" => Some(Protocol::Tcp),
        "udp" => Some(Protocol::Udp),
        "sctp" => Some(Protocol::Sctp),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::runner::RecordingRunner;
    use svcproxy_testkit::fixtures::intent_of;
    use svcproxy_testkit::fixtures::scenario::scenario_state;

    /// A scenario with every kind of Service, and what upstream v1.31.14 wrote for it in each of its modes.
    const SCENARIO: &str = include_str!("../../iptables/tests/data/scenarios/all-in-one.yaml");
    const UPSTREAM_IPTABLES: &str =
        include_str!("../../iptables/tests/data/upstream-v1.31.14-iptables/all-in-one.txt");
    const UPSTREAM_NFTABLES: &str =
        include_str!("../../nftables/tests/data/upstream-v1.31.14-nftables/all-in-one.txt");

    fn frontend(text: &str) -> Frontend {
        let (addr, protocol) = text.split_once('/').unwrap();
        let protocol = super::protocol(protocol).unwrap();
        match addr.strip_prefix("node port ") {
            Some(port) => Frontend {
                ip: None,
                protocol,
                port: port.parse().unwrap(),
            },
            None => {
                let addr: std::net::SocketAddr = addr.parse().unwrap();
                Frontend {
                    ip: Some(addr.ip()),
                    protocol,
                    port: addr.port(),
                }
            }
        }
    }

    fn upstream_iptables() -> RecordingRunner {
        let r = RecordingRunner::default();
        r.answer("nft list", Err(RecordingRunner::absent()));
        r.answer("iptables-nft-save", Ok(UPSTREAM_IPTABLES.into()));
        r.answer("iptables-legacy-save", Ok(String::new()));
        r
    }

    fn upstream_nftables() -> RecordingRunner {
        let r = RecordingRunner::default();
        r.answer("nft list map ip kube-proxy", Ok(UPSTREAM_NFTABLES.into()));
        r.answer("iptables-", Err(RecordingRunner::absent()));
        r
    }

    /// Upstream synced on the same objects serves every Service svcproxy would ask it to, in either mode, so a
    /// hand-back to it is never held up by a difference of spelling.
    #[test]
    fn upstream_serves_every_frontend_of_the_same_scenario_in_both_modes() {
        let ours = service_frontends(&intent_of(&scenario_state(SCENARIO)));
        assert!(
            ours.keys().any(|f| f.ip.is_none()),
            "the scenario has node ports: {ours:?}"
        );
        for (mode, runner) in [
            ("iptables", upstream_iptables()),
            ("nftables", upstream_nftables()),
        ] {
            let served = served_by_others(&runner, IpFamily::V4);
            let unserved: Vec<_> = ours.iter().filter(|(f, _)| !served.contains(f)).collect();
            assert!(unserved.is_empty(), "{mode}: unserved {unserved:?} of {served:?}");
        }
        for f in [
            "10.96.0.1:443/tcp",
            "10.96.1.10:53/udp",
            "10.96.1.10:53/sctp",
            "node port 30210/tcp",
            // External IPs, with endpoints and without.
            "198.51.100.51:80/tcp",
            "198.51.100.54:80/tcp",
            // Load-balancer IPs, plain and behind source ranges.
            "192.0.2.41:80/tcp",
            "192.0.2.42:80/tcp",
        ] {
            assert!(ours.contains_key(&frontend(f)), "{f} in {ours:?}");
        }
        // An ingress IP of ipMode Proxy is the load balancer's to forward: no proxy on the node serves it.
        assert!(!ours.contains_key(&frontend("192.0.2.45:80/tcp")), "{ours:?}");
    }

    #[test]
    fn nothing_is_served_where_nothing_is() {
        assert!(served_by_others(&upstream_nftables(), IpFamily::V6).is_empty());
        let r = RecordingRunner::default();
        r.answer("nft list", Err(RecordingRunner::absent()));
        r.answer("iptables-", Err(RecordingRunner::absent()));
        assert!(served_by_others(&r, IpFamily::V4).is_empty());
    }

    #[test]
    fn only_a_rule_matching_one_destination_serves_it() {
        let rule = |line: &str| {
            let args = svcproxy_iptables::save_parser::tokenize(line).unwrap();
            frontend_of_rule(&args)
        };
        assert_eq!(
            rule(
                "-d 10.96.0.10/32 -p udp -m comment --comment \"kube-system/kube-dns:dns cluster IP\" -m udp --dport 53 -j KUBE-SVC-X"
            ),
            Some(frontend("10.96.0.10:53/udp"))
        );
        assert_eq!(
            rule("-d fd00::a/128 -p tcp -m tcp --dport 80 -j KUBE-SVC-X"),
            Some(frontend("[fd00::a]:80/tcp"))
        );
        assert_eq!(
            rule("-p tcp -m comment --comment ns/np:http -m tcp --dport 30080 -j KUBE-EXT-X"),
            Some(frontend("node port 30080/tcp"))
        );
        // The NodePort gate, a negated destination, a range: none is one Service's address.
        assert_eq!(
            rule("-m addrtype --dst-type LOCAL ! -d 127.0.0.0/8 -j KUBE-NODEPORTS"),
            None
        );
        assert_eq!(rule("! -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j X"), None);
        assert_eq!(rule("-d 10.96.0.0/16 -p tcp -m tcp --dport 80 -j X"), None);
        assert_eq!(
            frontend_of_element("10.96.0.10 . udp . 53"),
            Some(frontend("10.96.0.10:53/udp"))
        );
        assert_eq!(
            frontend_of_element("tcp . 30080"),
            Some(frontend("node port 30080/tcp"))
        );
        assert_eq!(frontend_of_element("10.96.0.10 . tcp"), None);
    }
}
