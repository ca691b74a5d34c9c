//! One source, one engine per IP family. Each engine gets the Node, the Services with a cluster IP of its
//! family (the only ones it programs: a Service's family is its cluster IP's) and the EndpointSlices of its
//! family: the other engine would only hold the rest in memory, a copy of every Service of a single-stack
//! cluster in the IPv6 engine that every node now runs. Deletions go to every engine, since a name does not
//! say the family of what it named; so does a Service that no longer has a cluster IP of an engine's family,
//! as a deletion there.

use svcproxy_model::{ClusterState, EndpointSlice, IpFamily, Service};
use tokio::sync::mpsc;

use super::{Delta, SourceEvent};

fn mine(slice: &EndpointSlice, family: IpFamily) -> bool {
    slice.address_family == Some(family)
}

fn served_in(service: &Service, family: IpFamily) -> bool {
    service.cluster_ips.iter().any(|ip| family.contains(ip))
}

/// `ev` as the engine of `family` sees it; `None` when nothing of it concerns that engine.
pub fn for_family(ev: &SourceEvent, family: IpFamily) -> Option<SourceEvent> {
    Some(match ev {
        SourceEvent::Snapshot(state) => SourceEvent::Snapshot(ClusterState {
            services: state
                .services
                .iter()
                .filter(|(_, s)| served_in(s, family))
                .map(|(k, s)| (k.clone(), s.clone()))
                .collect(),
            endpoint_slices: state
                .endpoint_slices
                .iter()
                .filter(|(_, s)| mine(s, family))
                .map(|(k, s)| (k.clone(), s.clone()))
                .collect(),
            node: state.node.clone(),
            // Each engine's proxier takes the ranges of its family.
            service_cidrs: state.service_cidrs.clone(),
        }),
        SourceEvent::Services(Delta::Apply(service)) if !served_in(service, family) => {
            // It may have had one before (a dual-stack Service made single-stack): gone from this family.
            SourceEvent::Services(Delta::Delete(service.name.clone()))
        }
        SourceEvent::Services(Delta::Replace { objects, rejected }) => {
            SourceEvent::Services(Delta::Replace {
                objects: objects.iter().filter(|s| served_in(s, family)).cloned().collect(),
                rejected: rejected.clone(),
            })
        }
        SourceEvent::EndpointSlices(Delta::Apply(slice)) => {
            if !mine(slice, family) {
                return None;
            }
            SourceEvent::EndpointSlices(Delta::Apply(slice.clone()))
        }
        SourceEvent::EndpointSlices(Delta::Replace { objects, rejected }) => {
            SourceEvent::EndpointSlices(Delta::Replace {
                objects: objects.iter().filter(|s| mine(s, family)).cloned().collect(),
                rejected: rejected.clone(),
            })
        }
        other => other.clone(),
    })
}

/// Hands every event from `events` to the engine of each family, in order. Ends when the source ends or every
/// engine is gone.
pub async fn fan_out(
    mut events: mpsc::Receiver<SourceEvent>,
    engines: Vec<(IpFamily, mpsc::Sender<SourceEvent>)>,
) {
    while let Some(ev) = events.recv().await {
        let mut delivered = false;
        for (family, tx) in &engines {
            if let Some(mine) = for_family(&ev, *family) {
                delivered |= tx.send(mine).await.is_ok();
            } else {
                delivered |= !tx.is_closed();
            }
        }
        if !delivered {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use svcproxy_model::{ObjectName, Service};

    fn slice(name: &str, family: IpFamily) -> EndpointSlice {
        EndpointSlice {
            name: ObjectName::new("demo", name),
            service_name: "web".into(),
            address_family: Some(family),
            ports: Vec::new(),
            endpoints: Vec::new(),
            last_change_trigger_time: None,
        }
    }

    #[test]
    fn slices_go_to_their_family_only() {
        let v4 = SourceEvent::EndpointSlices(Delta::Apply(slice("web-4", IpFamily::V4)));
        assert_eq!(for_family(&v4, IpFamily::V4), Some(v4.clone()));
        assert_eq!(for_family(&v4, IpFamily::V6), None);

        let replace = SourceEvent::EndpointSlices(Delta::Replace {
            objects: vec![slice("web-4", IpFamily::V4), slice("web-6", IpFamily::V6)],
            rejected: vec![ObjectName::new("demo", "bad")],
        });
        let Some(SourceEvent::EndpointSlices(Delta::Replace { objects, rejected })) =
            for_family(&replace, IpFamily::V6)
        else {
            panic!("a replace stays a replace");
        };
        assert_eq!(objects, [slice("web-6", IpFamily::V6)]);
        assert_eq!(rejected, [ObjectName::new("demo", "bad")]);
    }

    #[test]
    fn services_go_to_the_families_of_their_cluster_ips_and_deletions_everywhere() {
        let svc = Service::cluster_ip(
            ObjectName::new("demo", "web"),
            "10.96.0.10".parse().unwrap(),
            vec![],
        );
        let ev = SourceEvent::Services(Delta::Apply(svc.clone()));
        assert_eq!(for_family(&ev, IpFamily::V4), Some(ev.clone()));
        // To the other family an IPv4-only Service is a deletion: it may have been dual-stack before.
        assert_eq!(
            for_family(&ev, IpFamily::V6),
            Some(SourceEvent::Services(Delta::Delete(svc.name.clone())))
        );
        let mut dual = svc.clone();
        dual.cluster_ips.push("fd00::10".parse().unwrap());
        let ev = SourceEvent::Services(Delta::Apply(dual.clone()));
        assert_eq!(for_family(&ev, IpFamily::V6), Some(ev.clone()));
        let replace = SourceEvent::Services(Delta::Replace {
            objects: vec![svc.clone(), {
                let mut other = dual.clone();
                other.name = ObjectName::new("demo", "dual");
                other
            }],
            rejected: vec![ObjectName::new("demo", "bad")],
        });
        let Some(SourceEvent::Services(Delta::Replace { objects, rejected })) =
            for_family(&replace, IpFamily::V6)
        else {
            panic!("a replace stays a replace");
        };
        assert_eq!(
            objects.iter().map(|s| s.name.to_string()).collect::<Vec<_>>(),
            ["demo/dual"]
        );
        assert_eq!(rejected, [ObjectName::new("demo", "bad")]);
        let del = SourceEvent::EndpointSlices(Delta::Delete(ObjectName::new("demo", "web-4")));
        assert_eq!(for_family(&del, IpFamily::V6), Some(del.clone()));

        let mut state = ClusterState::default();
        state.services.insert(svc.name.clone(), svc);
        for s in [slice("web-4", IpFamily::V4), slice("web-6", IpFamily::V6)] {
            state.endpoint_slices.insert(s.name.clone(), s);
        }
        let Some(SourceEvent::Snapshot(v6)) = for_family(&SourceEvent::Snapshot(state.clone()), IpFamily::V6)
        else {
            panic!("a snapshot stays a snapshot");
        };
        assert!(v6.services.is_empty(), "an IPv4-only Service");
        let Some(SourceEvent::Snapshot(v4)) = for_family(&SourceEvent::Snapshot(state), IpFamily::V4) else {
            panic!("a snapshot stays a snapshot");
        };
        assert_eq!(v4.services.len(), 1);
        assert_eq!(
            v6.endpoint_slices.keys().collect::<Vec<_>>(),
            [&ObjectName::new("demo", "web-6")]
        );
    }
}
