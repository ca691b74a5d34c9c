//! Upstream's packet-counter metrics in iptables mode: the forwarded packets dropped as conntrack state
//! INVALID, and the packets accepted to localhost NodePorts, counted by the kernel in kube-proxy's nfacct
//! objects (the rules carry the `nfacct` matches, see `svcproxy_iptables::RenderConfig::packet_counters`) and
//! read at each scrape. Same names, same objects: a node switching between kube-proxy and svcproxy keeps one
//! count.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use svcproxy_iptables::config::{CT_STATE_INVALID_COUNTER, LOCALHOST_NODEPORTS_COUNTER};

use crate::exec::nfacct::{NetlinkPacketCounters, NfacctError, PacketCounters};

/// Each nfacct object with the metric (under `kubeproxy_`, `_total` added) that reports it, and its help.
pub const COUNTED: [(&str, &str, &str); 2] = [
    (
        CT_STATE_INVALID_COUNTER,
        "iptables_ct_state_invalid_dropped_packets",
        "packets dropped by iptables to work around conntrack problems",
    ),
    (
        LOCALHOST_NODEPORTS_COUNTER,
        "iptables_localhost_nodeports_accepted_packets",
        "Number of packets accepted on nodeports of loopback interface",
    ),
];

/// Whether the daemon's rules count packets now: on from the start when the objects exist, turned off for good
/// by the proxier that finds the iptables `nfacct` match missing (kubernetes#142068), and read by the debug
/// endpoints, whose renderings must match what is written or they report the counting rules as drift.
#[derive(Debug, Clone, Default)]
pub struct CountingSwitch(Arc<AtomicBool>);

impl CountingSwitch {
    pub fn new(on: bool) -> Self {
        CountingSwitch(Arc::new(AtomicBool::new(on)))
    }

    pub fn is_on(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    pub fn turn_off(&self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

/// Creates the objects the rules will count into; without all of them the rules must not name any (a rule
/// naming a missing object fails the whole restore).
pub fn prepare(counters: Arc<dyn PacketCounters>) -> Result<Arc<dyn PacketCounters>, NfacctError> {
    for (object, _, _) in COUNTED {
        counters.ensure(object)?;
    }
    Ok(counters)
}

/// Whether this node's rules count packets as the daemon writes them: both of kube-proxy's nfacct objects
/// exist. For the commands that render what the daemon would (`diff`, `explain`), without creating anything.
pub fn counting_here() -> bool {
    NetlinkPacketCounters::new().is_ok_and(|counters| {
        COUNTED
            .iter()
            .all(|(object, _, _)| counters.packets(object).is_ok())
    })
}

/// Reports the objects' counts at each scrape; an object that cannot be read is left out of that scrape.
#[derive(Clone)]
pub struct PacketCounterCollector(pub Arc<dyn PacketCounters>);

impl std::fmt::Debug for PacketCounterCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PacketCounterCollector")
    }
}

impl Collector for PacketCounterCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        for (object, name, help) in COUNTED {
            let Ok(packets) = self.0.packets(object) else {
                continue;
            };
            let metric = ConstCounter::new(packets);
            metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::nfacct::RecordingPacketCounters;
    use prometheus_client::registry::Registry;

    #[test]
    fn both_objects_are_created_and_reported_under_upstreams_names() {
        let fake = Arc::new(RecordingPacketCounters::default());
        let counters = prepare(fake.clone()).unwrap();
        fake.objects
            .lock()
            .unwrap()
            .insert(CT_STATE_INVALID_COUNTER.into(), 42);
        let mut registry = Registry::default();
        registry
            .sub_registry_with_prefix("kubeproxy")
            .register_collector(Box::new(PacketCounterCollector(counters)));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("kubeproxy_iptables_ct_state_invalid_dropped_packets_total 42"),
            "{text}"
        );
        assert!(
            text.contains("kubeproxy_iptables_localhost_nodeports_accepted_packets_total 0"),
            "{text}"
        );
    }

    #[test]
    fn without_nfacct_there_is_nothing_to_count_with() {
        let refusing = Arc::new(RecordingPacketCounters {
            refuse: true,
            ..Default::default()
        });
        assert!(prepare(refusing).is_err());
    }
}
