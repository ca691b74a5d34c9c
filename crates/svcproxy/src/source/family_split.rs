//! One source, one engine per IP family. Each engine gets every Service (a Service's families are in its
//! spec, and build_intent picks its own) and the Node, but only the EndpointSlices of its family: a slice has
//! one address type, and the other family's engine would only hold it in memory. Deletions go to every engine,
//! since a name does not say the family of what it named.

use svcproxy_model::{ClusterState, EndpointSlice, IpFamily};
use tokio::sync::mpsc;

use super::{Delta, SourceEvent};

fn mine(slice: &EndpointSlice, family: IpFamily) -> bool {
    slice.address_family == Some(family)
}

/// `ev` as the engine of `family` sees it; `None` when nothing of it concerns that engine.
pub fn for_family(ev: &SourceEvent, family: IpFamily) -> Option<SourceEvent> {
    Some(match ev {
        SourceEvent::Snapshot(state) => SourceEvent::Snapshot(ClusterState {
            services: state.services.clone(),
            endpoint_slices: state
                .endpoint_slices
                .iter()
                .filter(|(_, s)| mine(s, family))
                .map(|(k, s)| (k.clone(), s.clone()))
                .collect(),
            node: state.node.clone(),
        }),
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
    fn services_deletions_and_snapshots_reach_every_family() {
        let svc = Service::cluster_ip(
            ObjectName::new("demo", "web"),
            "10.96.0.10".parse().unwrap(),
            vec![],
        );
        let ev = SourceEvent::Services(Delta::Apply(svc.clone()));
        assert_eq!(for_family(&ev, IpFamily::V6), Some(ev.clone()));
        let del = SourceEvent::EndpointSlices(Delta::Delete(ObjectName::new("demo", "web-4")));
        assert_eq!(for_family(&del, IpFamily::V6), Some(del.clone()));

        let mut state = ClusterState::default();
        state.services.insert(svc.name.clone(), svc);
        for s in [slice("web-4", IpFamily::V4), slice("web-6", IpFamily::V6)] {
            state.endpoint_slices.insert(s.name.clone(), s);
        }
        let Some(SourceEvent::Snapshot(v6)) = for_family(&SourceEvent::Snapshot(state), IpFamily::V6) else {
            panic!("a snapshot stays a snapshot");
        };
        assert_eq!(v6.services.len(), 1);
        assert_eq!(
            v6.endpoint_slices.keys().collect::<Vec<_>>(),
            [&ObjectName::new("demo", "web-6")]
        );
    }
}
