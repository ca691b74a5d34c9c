//! Which service ports claim each address, protocol and port. Cluster IPs are allocated one per Service, but
//! external IPs are whatever a Service's author writes, and a load balancer may hand one ingress IP to several
//! Services: two service ports can claim the same address, protocol and port. Both renderers then send its
//! traffic to the first of them in service-port order (in upstream's iptables mode, to the one whose rule
//! happens to come first) and the others get nothing there, silently. Being able to name such contests lets
//! the proxy say so; an external IP taken this way is how one namespace captures another's traffic. Node ports
//! are allocated one per Service too, but Services read from hand-written manifests can share one.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use imbl::ordmap::DiffItem;

use crate::{Intent, Protocol, ServicePortIntent, ServicePortName};

/// Where a service port is reached: one of its addresses (cluster IP, external IP, load-balancer IP) as `ip`,
/// or with no address its node port, on every node address; with its protocol and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    pub ip: Option<IpAddr>,
    pub protocol: Protocol,
    pub port: u16,
}

impl std::fmt::Display for Frontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.ip {
            Some(ip) => write!(f, "{}", std::net::SocketAddr::new(ip, self.port))?,
            None => write!(f, "node port {}", self.port)?,
        }
        write!(f, "/{}", self.protocol.lower())
    }
}

/// A frontend more than one service port claims: `winner` gets its traffic, `others` none of it there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contest {
    pub frontend: Frontend,
    pub winner: ServicePortName,
    pub others: Vec<ServicePortName>,
}

/// The sentence the log and `explain` say it with.
impl std::fmt::Display for Contest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} claimed by more than one service port: {} gets its traffic, ",
            self.frontend, self.winner
        )?;
        for (i, other) in self.others.iter().enumerate() {
            write!(f, "{}{other}", if i == 0 { "" } else { ", " })?;
        }
        f.write_str(" none of it there")
    }
}

/// The contest over `frontend` in `intent`, if more than one service port claims it. Reads every service
/// port: for a contest known to have appeared or changed, or a one-off question.
pub fn contest_in(intent: &Intent, frontend: &Frontend) -> Option<Contest> {
    // The intent's order is name order: the first claimant found is the one that gets the traffic.
    let mut names = intent
        .service_ports
        .iter()
        .filter(|(_, spi)| frontends_of(spi).contains(frontend))
        .map(|(name, _)| name.clone());
    let winner = names.next()?;
    let others: Vec<ServicePortName> = names.collect();
    (!others.is_empty()).then_some(Contest {
        frontend: *frontend,
        winner,
        others,
    })
}

/// The frontends of one service port: its cluster IP, external IPs and load-balancer IPs (those of ipMode
/// Proxy are not in the intent), each once, and its node port.
pub fn frontends_of(spi: &ServicePortIntent) -> BTreeSet<Frontend> {
    let protocol = spi.name.protocol;
    std::iter::once(spi.cluster_ip)
        .chain(spi.external_ips.iter().copied())
        .chain(spi.load_balancer_ips.iter().copied())
        .map(|ip| Frontend {
            ip: Some(ip),
            protocol,
            port: spi.port,
        })
        .chain(spi.node_port.map(|port| Frontend {
            ip: None,
            protocol,
            port,
        }))
        .collect()
}

/// How many service ports claim each frontend, kept up to date intent by intent at the cost of what changed.
/// Only counts are kept (a few bytes a frontend at any scale); the names behind a contest are looked up in the
/// intent when one is asked for, which happens only when a contest appears or changes.
#[derive(Debug, Default)]
pub struct FrontendClaims {
    claimants: HashMap<Frontend, u32>,
    contested: usize,
}

impl FrontendClaims {
    /// Moves from the claims of `before` (what the last call was given; `None` at first) to those of `after`,
    /// and gives back the frontends whose claimants changed, in order. The intents' diff skips the service
    /// ports they share; one that changed (its endpoints, say) costs a comparison of its few frontends.
    pub fn follow(&mut self, before: Option<&Intent>, after: &Intent) -> BTreeSet<Frontend> {
        let mut touched = BTreeSet::new();
        let mut change = |old: BTreeSet<Frontend>, new: BTreeSet<Frontend>| {
            for gone in old.difference(&new) {
                if let Some(count) = self.claimants.get_mut(gone) {
                    *count -= 1;
                    match *count {
                        0 => {
                            self.claimants.remove(gone);
                        }
                        1 => self.contested -= 1,
                        _ => {}
                    }
                }
                touched.insert(*gone);
            }
            for came in new.difference(&old) {
                let count = self.claimants.entry(*came).or_default();
                *count += 1;
                if *count == 2 {
                    self.contested += 1;
                }
                touched.insert(*came);
            }
        };
        match before {
            None => {
                for spi in after.service_ports.values() {
                    change(BTreeSet::new(), frontends_of(spi));
                }
            }
            Some(before) => {
                for item in before.service_ports.diff(&after.service_ports) {
                    match item {
                        DiffItem::Add(_, spi) => change(BTreeSet::new(), frontends_of(spi)),
                        DiffItem::Update { old, new } => change(frontends_of(old.1), frontends_of(new.1)),
                        DiffItem::Remove(_, spi) => change(frontends_of(spi), BTreeSet::new()),
                    }
                }
            }
        }
        touched
    }

    /// The contest over `frontend` in `intent` (the one last followed), if more than one service port claims
    /// it; only a frontend the counts say is contested is looked up.
    pub fn contest(&self, frontend: &Frontend, intent: &Intent) -> Option<Contest> {
        if self.claimants.get(frontend).is_none_or(|count| *count < 2) {
            return None;
        }
        contest_in(intent, frontend)
    }

    /// How many frontends more than one service port claims.
    pub fn contested(&self) -> usize {
        self.contested
    }
}

/// Every contest of `intent`, in frontend order, worked out from scratch.
pub fn contests(intent: &Intent) -> Vec<Contest> {
    let mut claimants: BTreeMap<Frontend, Vec<&ServicePortName>> = BTreeMap::new();
    for (name, spi) in &intent.service_ports {
        for frontend in frontends_of(spi) {
            claimants.entry(frontend).or_default().push(name);
        }
    }
    claimants
        .into_iter()
        .filter(|(_, names)| names.len() > 1)
        .map(|(frontend, names)| Contest {
            frontend,
            winner: names[0].clone(),
            others: names[1..].iter().map(|n| (*n).clone()).collect(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intent::build_intent;
    use crate::{ClusterState, IntentConfig, IpFamily, ObjectName, Service, ServicePort};

    fn port(name: &str, protocol: Protocol, port: u16) -> ServicePort {
        ServicePort {
            name: name.into(),
            protocol,
            port,
            node_port: None,
        }
    }

    fn service(name: &str, cluster_ip: &str, external: &[&str], ports: Vec<ServicePort>) -> Service {
        let mut svc = Service::cluster_ip(ObjectName::new("ns", name), cluster_ip.parse().unwrap(), ports);
        svc.external_ips = external.iter().map(|ip| ip.parse().unwrap()).collect();
        svc
    }

    fn intent(services: &[Service]) -> Intent {
        let mut state = ClusterState::default();
        for svc in services {
            state.services.insert(svc.name.clone(), svc.clone());
        }
        build_intent(
            &state,
            &IntentConfig {
                family: IpFamily::V4,
                node_name: "node-a".into(),
            },
        )
    }

    fn spn(name: &str, port: &str, protocol: Protocol) -> ServicePortName {
        ServicePortName::new(ObjectName::new("ns", name), port, protocol)
    }

    fn frontend(text: &str, protocol: Protocol) -> Frontend {
        let addr: std::net::SocketAddr = text.parse().unwrap();
        Frontend {
            ip: Some(addr.ip()),
            protocol,
            port: addr.port(),
        }
    }

    /// Only the same address, protocol and port is a contest; the first service port in order wins it.
    #[test]
    fn two_services_claiming_one_external_ip_and_port_contest_it() {
        let tcp = Protocol::Tcp;
        let services = [
            service("b", "10.96.0.2", &["192.0.2.1"], vec![port("http", tcp, 80)]),
            service("a", "10.96.0.1", &["192.0.2.1"], vec![port("http", tcp, 80)]),
            // The same address on another port, or another protocol: no contest.
            service("c", "10.96.0.3", &["192.0.2.1"], vec![port("alt", tcp, 8080)]),
            service(
                "d",
                "10.96.0.4",
                &["192.0.2.1"],
                vec![port("dns", Protocol::Udp, 80)],
            ),
            // One Service naming an external IP twice claims it once.
            service(
                "e",
                "10.96.0.5",
                &["192.0.2.5", "192.0.2.5"],
                vec![port("http", tcp, 80)],
            ),
        ];
        assert_eq!(
            contests(&intent(&services)),
            vec![Contest {
                frontend: frontend("192.0.2.1:80", tcp),
                winner: spn("a", "http", tcp),
                others: vec![spn("b", "http", tcp)],
            }]
        );
        assert_eq!(frontend("192.0.2.1:80", tcp).to_string(), "192.0.2.1:80/tcp");
        assert_eq!(
            contests(&intent(&services))[0].to_string(),
            "192.0.2.1:80/tcp claimed by more than one service port: ns/a:http gets its traffic, ns/b:http none \
             of it there"
        );
    }

    /// Two Services of hand-written manifests naming one node port contest it on every node address; the same
    /// number as another Service's port, or under another protocol, is no contest.
    #[test]
    fn two_services_naming_one_node_port_contest_it() {
        let tcp = Protocol::Tcp;
        let node_port = |name: &str, protocol, number| ServicePort {
            node_port: Some(number),
            ..port(name, protocol, 80)
        };
        let node_port_service = |name: &str, ip: &str, port: ServicePort| Service {
            service_type: crate::ServiceType::NodePort,
            ..service(name, ip, &[], vec![port])
        };
        let services = [
            node_port_service("b", "10.96.0.2", node_port("http", tcp, 30080)),
            node_port_service("a", "10.96.0.1", node_port("http", tcp, 30080)),
            node_port_service("c", "10.96.0.3", node_port("dns", Protocol::Udp, 30080)),
            service("d", "10.96.0.4", &[], vec![port("alt", tcp, 30080)]),
        ];
        let contested = Frontend {
            ip: None,
            protocol: tcp,
            port: 30080,
        };
        assert_eq!(
            contests(&intent(&services)),
            vec![Contest {
                frontend: contested,
                winner: spn("a", "http", tcp),
                others: vec![spn("b", "http", tcp)],
            }]
        );
        assert_eq!(
            contests(&intent(&services))[0].to_string(),
            "node port 30080/tcp claimed by more than one service port: ns/a:http gets its traffic, ns/b:http \
             none of it there"
        );
        let mut claims = FrontendClaims::default();
        claims.follow(None, &intent(&services));
        assert_eq!(claims.contested(), 1);
    }

    /// Followed change by change, the claims end where working them out from scratch does, and what changed
    /// names exactly the frontends whose claimants changed.
    #[test]
    fn following_changes_matches_working_them_out_again() {
        let tcp = Protocol::Tcp;
        let a = service("a", "10.96.0.1", &["192.0.2.1"], vec![port("http", tcp, 80)]);
        let b = service("b", "10.96.0.2", &[], vec![port("http", tcp, 80)]);
        let mut claims = FrontendClaims::default();
        let first = intent(&[a.clone(), b.clone()]);
        claims.follow(None, &first);
        assert_eq!(claims.contested(), 0);

        // b takes a's external IP: one contest, a wins.
        let b_takes = service("b", "10.96.0.2", &["192.0.2.1"], vec![port("http", tcp, 80)]);
        let second = intent(&[a.clone(), b_takes.clone()]);
        let touched = claims.follow(Some(&first), &second);
        let contested = frontend("192.0.2.1:80", tcp);
        assert_eq!(touched, BTreeSet::from([contested]));
        assert_eq!(claims.contest(&contested, &second), contests(&second).pop());
        assert_eq!(claims.contested(), 1);

        // An unchanged intent touches nothing; a gone, its claim goes and the contest with it.
        assert!(claims.follow(Some(&second), &second).is_empty());
        let third = intent(&[b_takes]);
        let touched = claims.follow(Some(&second), &third);
        assert!(touched.contains(&contested), "{touched:?}");
        assert_eq!(claims.contest(&contested, &third), None);
        assert_eq!(claims.contested(), 0);
        assert!(contests(&third).is_empty());
    }

    /// A contest of three stays one when a claimant leaves, and its winner moves on when the first does.
    #[test]
    fn a_contest_outlives_claimants_until_one_is_left() {
        let tcp = Protocol::Tcp;
        let claim = |name: &str, ip: &str| service(name, ip, &["192.0.2.9"], vec![port("http", tcp, 80)]);
        let (a, b, c) = (
            claim("a", "10.96.0.1"),
            claim("b", "10.96.0.2"),
            claim("c", "10.96.0.3"),
        );
        let contested = frontend("192.0.2.9:80", tcp);
        let mut claims = FrontendClaims::default();
        let all = intent(&[a.clone(), b.clone(), c.clone()]);
        claims.follow(None, &all);
        assert_eq!(claims.contested(), 1);
        let without_a = intent(&[b, c.clone()]);
        assert!(claims.follow(Some(&all), &without_a).contains(&contested));
        assert_eq!(claims.contested(), 1);
        let contest = claims.contest(&contested, &without_a).unwrap();
        assert_eq!(
            (contest.winner, contest.others),
            (spn("b", "http", tcp), vec![spn("c", "http", tcp)])
        );
        let only_c = intent(&[c]);
        claims.follow(Some(&without_a), &only_c);
        assert_eq!(claims.contested(), 0);
        assert_eq!(claims.contest(&contested, &only_c), None);
    }
}
