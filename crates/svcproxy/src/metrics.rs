//! Prometheus metrics: upstream's `kubeproxy_*` names, types, labels and buckets where they apply, and ours
//! under `svcproxy_*`.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use crate::build_info::{BuildLabels, this_build};
use crate::exec::nfacct::PacketCounters;
use crate::packet_counters::PacketCounterCollector;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::process_metrics::ProcessCollector;
use crate::source::api_request_metrics::ApiRequestMetrics;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FamilyLabels {
    pub ip_family: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SyncLabels {
    pub ip_family: String,
    /// `full` or `partial`.
    pub kind: String,
    /// `success` or `failure`.
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabels {
    pub ip_family: String,
    /// What kind of failure or divergence.
    pub class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    pub ip_family: String,
    /// `internal` or `external`.
    pub traffic_policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabels {
    pub ip_family: String,
    /// `filter` or `nat`.
    pub table: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    pub code: String,
}

type SecondsGauge = Gauge<f64, AtomicU64>;

/// Upstream's buckets for network programming latency: 0.25 s, 0.5 s, then 1..59 s by 1, 60..115 s by 5,
/// 120..300 s by 30.
fn programming_histogram() -> Histogram {
    let mut buckets = vec![0.25, 0.5];
    buckets.extend((1..60).map(f64::from));
    buckets.extend((60..120).step_by(5).map(f64::from));
    buckets.extend((120..=300).step_by(30).map(f64::from));
    Histogram::new(buckets)
}

fn sync_histogram() -> Histogram {
    // Upstream: 1 ms doubling over 15 buckets, up to ~16 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

pub struct Metrics {
    pub registry: Registry,
    pub sync_duration: Family<FamilyLabels, Histogram, fn() -> Histogram>,
    pub sync_full_duration: Family<FamilyLabels, Histogram, fn() -> Histogram>,
    pub sync_partial_duration: Family<FamilyLabels, Histogram, fn() -> Histogram>,
    pub last_sync_timestamp: Family<FamilyLabels, SecondsGauge>,
    pub last_queued_timestamp: Family<FamilyLabels, SecondsGauge>,
    pub restore_failures: Family<FamilyLabels, Counter>,
    pub partial_restore_failures: Family<FamilyLabels, Counter>,
    pub nftables_sync_failures: Family<FamilyLabels, Counter>,
    pub nftables_cleanup_failures: Family<FamilyLabels, Counter>,
    pub iptables_rules_total: Family<TableLabels, Gauge>,
    pub iptables_rules_last: Family<TableLabels, Gauge>,
    pub service_changes: Counter,
    pub endpoint_changes: Counter,
    pub healthz: Family<CodeLabels, Counter>,
    pub livez: Family<CodeLabels, Counter>,
    pub syncs: Family<SyncLabels, Counter>,
    pub rejected_objects: Counter,
    /// 1 while the `--config` file on disk cannot be used (svcproxy runs on the settings it started with).
    pub config_file_unusable: Gauge,
    pub programmed_service_ports: Family<FamilyLabels, Gauge>,
    /// Addresses with protocol and port that more than one service port claims (only the first gets them).
    pub contested_frontends: Family<FamilyLabels, Gauge>,
    pub payload_lines: Family<FamilyLabels, Gauge>,
    pub health_check_bind_failures: Counter,
    pub sync_failures: Family<ClassLabels, Counter>,
    pub verifications: Family<FamilyLabels, Counter>,
    pub read_backs_given_up: Family<FamilyLabels, Counter>,
    pub divergences: Family<ClassLabels, Counter>,
    pub repairs: Family<FamilyLabels, Counter>,
    pub conntrack_duration: Family<FamilyLabels, Histogram, fn() -> Histogram>,
    pub conntrack_deleted: Family<FamilyLabels, Counter>,
    pub network_programming_duration: Family<FamilyLabels, Histogram, fn() -> Histogram>,
    pub service_changes_pending: Gauge,
    pub endpoint_changes_pending: Gauge,
    pub no_local_endpoints: Family<PolicyLabels, Gauge>,
    /// client-go's `rest_client_*` series, recorded by the API client.
    pub api_requests: Arc<ApiRequestMetrics>,
}

impl Metrics {
    /// Adds upstream's packet-counter metrics, read from `counters` at each scrape (iptables mode, when the
    /// nfacct objects exist).
    pub fn with_packet_counters(mut self, counters: std::sync::Arc<dyn PacketCounters>) -> Self {
        self.registry
            .sub_registry_with_prefix("kubeproxy")
            .register_collector(Box::new(PacketCounterCollector(counters)));
        self
    }

    pub fn new() -> Self {
        let mut registry = Registry::default();
        let api_requests = ApiRequestMetrics::register(&mut registry);
        let m = Metrics {
            sync_duration: Family::new_with_constructor(sync_histogram as fn() -> Histogram),
            sync_full_duration: Family::new_with_constructor(sync_histogram as fn() -> Histogram),
            sync_partial_duration: Family::new_with_constructor(sync_histogram as fn() -> Histogram),
            last_sync_timestamp: Family::default(),
            last_queued_timestamp: Family::default(),
            restore_failures: Family::default(),
            partial_restore_failures: Family::default(),
            nftables_sync_failures: Family::default(),
            nftables_cleanup_failures: Family::default(),
            iptables_rules_total: Family::default(),
            iptables_rules_last: Family::default(),
            service_changes: Counter::default(),
            endpoint_changes: Counter::default(),
            healthz: Family::default(),
            livez: Family::default(),
            syncs: Family::default(),
            rejected_objects: Counter::default(),
            config_file_unusable: Gauge::default(),
            programmed_service_ports: Family::default(),
            contested_frontends: Family::default(),
            payload_lines: Family::default(),
            health_check_bind_failures: Counter::default(),
            sync_failures: Family::default(),
            verifications: Family::default(),
            read_backs_given_up: Family::default(),
            divergences: Family::default(),
            repairs: Family::default(),
            conntrack_duration: Family::new_with_constructor(sync_histogram as fn() -> Histogram),
            conntrack_deleted: Family::default(),
            network_programming_duration: Family::new_with_constructor(
                programming_histogram as fn() -> Histogram,
            ),
            service_changes_pending: Gauge::default(),
            endpoint_changes_pending: Gauge::default(),
            no_local_endpoints: Family::default(),
            registry: Registry::default(),
            api_requests,
        };
        registry.register_collector(Box::new(ProcessCollector::default()));
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info.get_or_create(&this_build()).set(1);
        registry.register(
            "kubernetes_build_info",
            "Always 1: its labels say which build runs (version, compiler, platform), as every Kubernetes component's do",
            build_info,
        );
        {
            let kp = registry.sub_registry_with_prefix("kubeproxy");
            kp.register(
                "sync_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds",
                m.sync_duration.clone(),
            );
            kp.register(
                "sync_full_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds for full resyncs",
                m.sync_full_duration.clone(),
            );
            kp.register(
                "sync_partial_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds for partial resyncs",
                m.sync_partial_duration.clone(),
            );
            kp.register(
                "sync_proxy_rules_last_timestamp_seconds",
                "The last time proxy rules were successfully synced",
                m.last_sync_timestamp.clone(),
            );
            kp.register(
                "sync_proxy_rules_last_queued_timestamp_seconds",
                "The last time a sync of proxy rules was queued",
                m.last_queued_timestamp.clone(),
            );
            kp.register(
                "sync_proxy_rules_iptables_restore_failures",
                "Cumulative proxy iptables restore failures",
                m.restore_failures.clone(),
            );
            kp.register(
                "sync_proxy_rules_iptables_partial_restore_failures",
                "Cumulative proxy iptables partial restore failures",
                m.partial_restore_failures.clone(),
            );
            kp.register(
                "sync_proxy_rules_nftables_sync_failures",
                "Cumulative proxy nftables sync failures",
                m.nftables_sync_failures.clone(),
            );
            kp.register(
                "sync_proxy_rules_nftables_cleanup_failures",
                "Cumulative proxy nftables cleanup failures",
                m.nftables_cleanup_failures.clone(),
            );
            kp.register(
                "sync_proxy_rules_iptables_total",
                "Total number of iptables rules owned by the proxy",
                m.iptables_rules_total.clone(),
            );
            kp.register(
                "sync_proxy_rules_iptables_last",
                "Number of iptables rules written by the proxy in the last sync",
                m.iptables_rules_last.clone(),
            );
            kp.register(
                "sync_proxy_rules_service_changes",
                "Cumulative proxy rules Service changes",
                m.service_changes.clone(),
            );
            kp.register(
                "sync_proxy_rules_endpoint_changes",
                "Cumulative proxy rules Endpoint changes",
                m.endpoint_changes.clone(),
            );
            kp.register(
                "network_programming_duration_seconds",
                "In Cluster Network Programming Latency in seconds",
                m.network_programming_duration.clone(),
            );
            kp.register(
                "sync_proxy_rules_service_changes_pending",
                "Pending proxy rules Service changes",
                m.service_changes_pending.clone(),
            );
            kp.register(
                "sync_proxy_rules_endpoint_changes_pending",
                "Pending proxy rules Endpoint changes",
                m.endpoint_changes_pending.clone(),
            );
            kp.register(
                "sync_proxy_rules_no_local_endpoints_total",
                "Number of services with a Local traffic policy and no endpoints",
                m.no_local_endpoints.clone(),
            );
            kp.register(
                "conntrack_reconciler_sync_duration_seconds",
                "Duration of one conntrack reconciliation in seconds",
                m.conntrack_duration.clone(),
            );
            kp.register(
                "conntrack_reconciler_deleted_entries",
                "Cumulative conntrack entries deleted by the reconciler",
                m.conntrack_deleted.clone(),
            );
            kp.register(
                "proxy_healthz",
                "Cumulative proxy healthz HTTP status",
                m.healthz.clone(),
            );
            kp.register(
                "proxy_livez",
                "Cumulative proxy livez HTTP status",
                m.livez.clone(),
            );
        }
        {
            let own = registry.sub_registry_with_prefix("svcproxy");
            own.register("syncs", "Syncs by kind and result", m.syncs.clone());
            own.register(
                "rejected_objects",
                "API objects or manifest documents rejected by validation",
                m.rejected_objects.clone(),
            );
            own.register(
                "config_file_unusable",
                "1 while the configuration file on disk cannot be used; svcproxy keeps the settings it started with, where a restart would fail",
                m.config_file_unusable.clone(),
            );
            own.register(
                "programmed_service_ports",
                "Service ports in the last successfully applied intent",
                m.programmed_service_ports.clone(),
            );
            own.register(
                "contested_frontends",
                "Service addresses (with protocol and port) that more than one service port claims: the first in name order gets their traffic, the others none of it there",
                m.contested_frontends.clone(),
            );
            own.register(
                "payload_lines",
                "Lines in the last transaction sent to the kernel",
                m.payload_lines.clone(),
            );
            own.register(
                "sync_failures",
                "Failed syncs by classified cause",
                m.sync_failures.clone(),
            );
            own.register(
                "verifications",
                "Checks of the kernel against what was written: read-backs, and periodic ones the unmoved nf_tables generation showed nothing could have changed for",
                m.verifications.clone(),
            );
            own.register(
                "read_backs_given_up",
                "Read-backs stopped for a change waiting to be synced; each is done again once changes pause",
                m.read_backs_given_up.clone(),
            );
            own.register(
                "divergences",
                "Differences found by read-back, by kind",
                m.divergences.clone(),
            );
            own.register("repairs", "Divergences repaired and verified", m.repairs.clone());
            own.register(
                "health_check_node_port_bind_failures",
                "Health-check node ports that could not be opened",
                m.health_check_bind_failures.clone(),
            );
        }
        Metrics { registry, ..m }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, name: &str) -> f64 {
        let line = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no {name} in\n{text}"));
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    #[test]
    fn the_process_metrics_describe_this_process() {
        let text = Metrics::new().encode();
        assert!(value(&text, "process_resident_memory_bytes") > 1024.0 * 1024.0);
        assert!(value(&text, "process_cpu_seconds_total") >= 0.0);
        assert!(value(&text, "process_open_fds") >= 3.0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let started = value(&text, "process_start_time_seconds");
        assert!(
            started <= now + 1.0 && started > now - 3600.0,
            "{started} vs {now}"
        );
        assert!(text.contains("# TYPE process_cpu_seconds counter"), "{text}");
    }

    /// As every Kubernetes component serves it: a gauge at 1, its labels saying which build runs.
    #[test]
    fn the_build_is_described_as_kubernetes_components_describe_theirs() {
        let text = Metrics::new().encode();
        let line = text
            .lines()
            .find(|l| l.starts_with("kubernetes_build_info{"))
            .unwrap_or_else(|| panic!("no kubernetes_build_info in\n{text}"));
        assert!(line.ends_with("} 1"), "{line}");
        let version = format!("git_version=\"v{}\"", env!("CARGO_PKG_VERSION"));
        assert!(line.contains(&version), "{line}");
        assert!(line.contains("compiler=\"rustc\""), "{line}");
        assert!(text.contains("# TYPE kubernetes_build_info gauge"), "{text}");
    }
}
