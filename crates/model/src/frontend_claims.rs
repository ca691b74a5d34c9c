//! Which service ports claim each address, protocol and port. Cluster IPs are allocated one per Service, but
//! external IPs are whatever a Service's author writes, and a load balancer may hand one ingress IP to several
//! Services: two service ports can claim the same address, protocol and port. Both renderers then send its
//! traffic to the first of them in service-port order (in upstream's iptables mode, to the one whose rule
//! happens to come first) and the others get nothing there, silently. Being able to name such contests lets
//! the proxy say so; an external IP taken this way is how one namespace captures another's traffic.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

use imbl::ordmap::DiffItem;

use crate::{Intent, Protocol, ServicePortIntent, ServicePortName};

/// An address a service port is reached at, with its protocol and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    pub ip: IpAddr,
    pub protocol: Protocol,
    pub port: u16,
}

impl std::fmt::Display for Frontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{}",
            std::net::SocketAddr::new(self.ip, self.port),
            self.protocol.lower()
        )
    }
}

/// A frontend more than one service port claims: `winner` gets its traffic, `others` none of it there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contest {
    pub frontend: Frontend,
    pub winner: ServicePortName,
    pub others: Vec<ServicePortName>,
}

/// The frontends of one service port: its cluster IP, external IPs and load-balancer IPs (those of ipMode
/// Proxy are not in the intent), each once.
pub fn frontends_of(spi: &ServicePortIntent) -> BTreeSet<Frontend> {
    std::iter::once(spi.cluster_ip)
        .chain(spi.external_ips.iter().copied())
        .chain(spi.load_balancer_ips.iter().copied())
        .map(|ip| Frontend {
            ip,
            protocol: spi.name.protocol,
            port: spi.port,
        })
        .collect()
}

/// Every frontend's claimants, kept up to date intent by intent at the cost of what changed.
#[derive(Debug, Default)]
pub struct FrontendClaims {
    claimants: HashMap<Frontend, BTreeSet<ServicePortName>>,
}

impl FrontendClaims {
    /// Moves from the claims of `before` (what the last call was given; `None` at first) to those of `after`,
    /// and gives back the frontends whose claimants changed, in order. The intents' diff skips the service
    /// ports they share; one that changed (its endpoints, say) costs a comparison of its few frontends.
    pub fn follow(&mut self, before: Option<&Intent>, after: &Intent) -> BTreeSet<Frontend> {
        let mut touched = BTreeSet::new();
        let mut change = |name: &ServicePortName, old: BTreeSet<Frontend>, new: BTreeSet<Frontend>| {
            for gone in old.difference(&new) {
                if let Some(set) = self.claimants.get_mut(gone) {
                    set.remove(name);
                    if set.is_empty() {
                        self.claimants.remove(gone);
                    }
                }
                touched.insert(*gone);
            }
            for came in new.difference(&old) {
                self.claimants.entry(*came).or_default().insert(name.clone());
                touched.insert(*came);
            }
        };
        match before {
            None => {
                for (name, spi) in &after.service_ports {
                    change(name, BTreeSet::new(), frontends_of(spi));
                }
            }
            Some(before) => {
                for item in before.service_ports.diff(&after.service_ports) {
                    match item {
                        DiffItem::Add(name, spi) => change(name, BTreeSet::new(), frontends_of(spi)),
                        DiffItem::Update { old, new } => {
                            change(new.0, frontends_of(old.1), frontends_of(new.1))
                        }
                        DiffItem::Remove(name, spi) => change(name, frontends_of(spi), BTreeSet::new()),
                    }
                }
            }
        }
        touched
    }

    /// The contest over `frontend`, if more than one service port claims it.
    pub fn contest(&self, frontend: &Frontend) -> Option<Contest> {
        let claimants = self.claimants.get(frontend)?;
        let mut names = claimants.iter().cloned();
        let winner = names.next()?;
        let others: Vec<ServicePortName> = names.collect();
        (!others.is_empty()).then_some(Contest {
            frontend: *frontend,
            winner,
            others,
        })
    }

    /// How many frontends more than one service port claims.
    pub fn contested(&self) -> usize {
        self.claimants.values().filter(|c| c.len() > 1).count()
    }
}

/// Every contest of `intent`, in frontend order: what [`FrontendClaims`] tracks, worked out from scratch.
pub fn contests(intent: &Intent) -> Vec<Contest> {
    let mut claims = FrontendClaims::default();
    let frontends = claims.follow(None, intent);
    frontends.iter().filter_map(|f| claims.contest(f)).collect()
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
            ip: addr.ip(),
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
        assert_eq!(claims.contest(&contested), contests(&second).pop());
        assert_eq!(claims.contested(), 1);

        // An unchanged intent touches nothing; a gone, its claim goes and the contest with it.
        assert!(claims.follow(Some(&second), &second).is_empty());
        let third = intent(&[b_takes]);
        let touched = claims.follow(Some(&second), &third);
        assert!(touched.contains(&contested), "{touched:?}");
        assert_eq!(claims.contest(&contested), None);
        assert_eq!(claims.contested(), 0);
        assert!(contests(&third).is_empty());
    }
}
