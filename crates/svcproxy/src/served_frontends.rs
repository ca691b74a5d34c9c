//! Which Service frontends (cluster IP, protocol, port) another proxy's rules on the node serve. svcproxy in
//! nftables mode hands the node back on the way out by deleting its table where another proxy's rules are in
//! place; rules that are there are not necessarily rules that are kept up (leftovers of a kube-proxy that
//! stopped long ago, or one that has not synced since it came back), and handing a Service over to rules that
//! do not know it leaves it with nothing. So the hand-back first checks that every Service svcproxy serves is
//! served there too.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use svcproxy_iptables::save_parser::parse_save;
use svcproxy_model::{Intent, IpFamily, Protocol};
use svcproxy_nftables::{Family, parse_listing};

use crate::exec::runner::Runner;

/// Where a Service is addressed inside the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    pub ip: IpAddr,
    pub protocol: Protocol,
    pub port: u16,
}

impl std::fmt::Display for Frontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let addr = std::net::SocketAddr::new(self.ip, self.port);
        write!(f, "{addr}/{}", self.protocol.lower())
    }
}

/// The cluster-IP frontends of `intent`, each with its service port's name (`ns/svc:port`).
pub fn cluster_frontends(intent: &Intent) -> BTreeMap<Frontend, String> {
    intent
        .service_ports
        .values()
        .map(|spi| {
            let frontend = Frontend {
                ip: spi.cluster_ip,
                protocol: spi.name.protocol,
                port: spi.port,
            };
            (frontend, spi.name.to_string())
        })
        .collect()
}

/// Upstream's nftables table, and its two maps that every cluster IP is in: one for Services with endpoints,
/// one (reject or drop) for those without.
const UPSTREAM_TABLE: &str = "kube-proxy";
const UPSTREAM_MAPS: [&str; 2] = ["service-ips", "no-endpoint-services"];
/// The chain every kube-proxy version's iptables mode matches cluster IPs in: in nat for Services with
/// endpoints, in filter (reject) for those without.
const KUBE_SERVICES: &str = "KUBE-SERVICES";

/// The frontends other proxies' rules in `family` serve: the elements of upstream's nftables maps, and the
/// destinations matched in nat and filter `KUBE-SERVICES` of either iptables backend. A program that is not
/// there, or a table that is not, adds nothing.
pub fn served_by_others(runner: &dyn Runner, family: IpFamily) -> BTreeSet<Frontend> {
    let (nft_family, iptables) = match family {
        IpFamily::V4 => (Family::Ip, "iptables"),
        IpFamily::V6 => (Family::Ip6, "ip6tables"),
    };
    let mut served = BTreeSet::new();
    if let Ok(text) = runner.run(
        "nft",
        &["list", "table", nft_family.keyword(), UPSTREAM_TABLE],
        None,
    ) && let Ok(listing) = parse_listing(&text)
        && let Some(table) = listing.table(nft_family, UPSTREAM_TABLE)
    {
        for map in UPSTREAM_MAPS.iter().filter_map(|name| table.sets.get(*name)) {
            served.extend(map.elements.keys().filter_map(|key| frontend_of_element(key)));
        }
    }
    // A plain dump lists only the tables already in the kernel: naming nat would load the legacy nat module
    // on a node that never used it.
    for backend in ["nft", "legacy"] {
        let Ok(dump) = runner.run(&format!("{iptables}-{backend}-save"), &[], None) else {
            continue;
        };
        let Ok(saved) = parse_save(&dump) else {
            continue;
        };
        for table in ["nat", "filter"] {
            if let Some(t) = saved.table(table) {
                served.extend(
                    t.rules_of(KUBE_SERVICES)
                        .filter_map(|r| frontend_of_rule(&r.args)),
                );
            }
        }
    }
    served
}

/// `10.96.0.10 . udp . 53`, as `nft` lists a key of upstream's maps.
fn frontend_of_element(key: &str) -> Option<Frontend> {
    let mut parts = key.split(" . ").map(str::trim);
    let ip = parts.next()?.parse().ok()?;
    let protocol = protocol(parts.next()?)?;
    let port = parts.next()?.parse().ok()?;
    parts.next().is_none().then_some(Frontend { ip, protocol, port })
}

/// The destination a `KUBE-SERVICES` rule matches: `-d IP/32 -p udp … --dport 53`, none negated.
fn frontend_of_rule(args: &[String]) -> Option<Frontend> {
    let (mut ip, mut proto, mut port) = (None, None, None);
    for (at, pair) in args.windows(2).enumerate() {
        let negated = at > 0 && args[at - 1] == "!";
        match (pair[0].as_str(), negated) {
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
        ip: ip?,
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

    /// What upstream v1.31.14 wrote for the same scenario in each of its modes.
    const UPSTREAM_IPTABLES: &str =
        include_str!("../../iptables/tests/data/upstream-v1.31.14-iptables/clusterip-basic.txt");
    const UPSTREAM_NFTABLES: &str =
        include_str!("../tests/data/kube-proxy-v1.31.14-nftables-clusterip-basic.nft");

    fn frontend(text: &str) -> Frontend {
        let (addr, protocol) = text.split_once('/').unwrap();
        let addr: std::net::SocketAddr = addr.parse().unwrap();
        Frontend {
            ip: addr.ip(),
            protocol: super::protocol(protocol).unwrap(),
            port: addr.port(),
        }
    }

    fn runner_without_anything() -> RecordingRunner {
        let r = RecordingRunner::default();
        r.answer("nft list table", Err(RecordingRunner::absent()));
        r.answer("iptables-nft-save", Err(RecordingRunner::absent()));
        r.answer("iptables-legacy-save", Err(RecordingRunner::absent()));
        r
    }

    #[test]
    fn upstreams_two_modes_serve_the_same_frontends_of_one_scenario() {
        let iptables = RecordingRunner::default();
        iptables.answer("nft list table", Err(RecordingRunner::absent()));
        iptables.answer("iptables-nft-save", Ok(UPSTREAM_IPTABLES.into()));
        iptables.answer("iptables-legacy-save", Ok(String::new()));
        let nftables = RecordingRunner::default();
        nftables.answer("nft list table ip kube-proxy", Ok(UPSTREAM_NFTABLES.into()));
        nftables.answer("iptables-", Err(RecordingRunner::absent()));
        let by_iptables = served_by_others(&iptables, IpFamily::V4);
        let by_nftables = served_by_others(&nftables, IpFamily::V4);
        assert_eq!(by_iptables, by_nftables);
        for f in [
            "10.96.0.1:443/tcp",
            "10.96.1.10:53/udp",
            "10.96.1.10:53/sctp",
            "10.96.1.20:443/tcp",
        ] {
            assert!(by_iptables.contains(&frontend(f)), "{f} in {by_iptables:?}");
        }
        // Nothing of another family, and nothing where nothing is.
        assert!(served_by_others(&nftables, IpFamily::V6).is_empty());
        assert!(served_by_others(&runner_without_anything(), IpFamily::V4).is_empty());
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
        assert_eq!(frontend_of_element("tcp . 30080"), None);
    }
}
