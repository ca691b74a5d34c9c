//! A one-endpoint change costs the same at any cluster size: the transaction holds the changed service port's
//! chains and nothing else. (Upstream rewrites KUBE-SERVICES and the other shared chains on every sync, so its
//! transaction grows with the number of services.)

mod common;

use common::{ep, intent_of, port, service, slice, state};
use svcproxy_iptables::gc::GcPlan;
use svcproxy_iptables::staging::{Baseline, DEFAULT_MAX_CHAINS, staged_payloads};
use svcproxy_iptables::{RenderConfig, render};
use svcproxy_model::{Protocol, ServiceType};

/// `n` ClusterIP services × 10 endpoints, with fixed-width names so every size renders the changed service
/// identically; `moved` shifts the last endpoint of service 0.
fn cluster(n: u32, moved: bool) -> svcproxy_model::ClusterState {
    let mut services = Vec::new();
    let mut slices = Vec::new();
    for i in 0..n {
        let name = format!("s{i:05}");
        let ip = format!("10.96.{}.{}", 100 + i / 250, 1 + i % 250);
        services.push(service(
            "ns",
            &name,
            ServiceType::ClusterIP,
            &ip,
            vec![port("p", Protocol::Tcp, 80, None)],
        ));
        let eps = (0..10)
            .map(|e| {
                let last = if moved && i == 0 && e == 9 { 200 } else { e };
                ep(
                    &format!("10.{}.{}.{}", 200 + i / 65_000, (i / 250) % 256, last + 1),
                    "node-b",
                )
            })
            .collect();
        slices.push(slice(
            "ns",
            &format!("{name}-1"),
            &name,
            &[("p", Protocol::Tcp, 8080)],
            eps,
        ));
    }
    state(services, slices)
}

fn one_change_payload(n: u32) -> (usize, usize) {
    let cfg = RenderConfig::default();
    let before = render(&intent_of(&cluster(n, false)), &cfg);
    let after = render(&intent_of(&cluster(n, true)), &cfg);
    let payloads = staged_payloads(
        Baseline::Applied(&before),
        &after,
        &GcPlan::default(),
        &[],
        DEFAULT_MAX_CHAINS,
    );
    assert_eq!(payloads.len(), 1, "a one-endpoint change is one transaction");
    (payloads[0].line_count, payloads[0].len())
}

#[test]
fn one_endpoint_change_is_the_same_size_at_1000_and_10000_services() {
    let small = one_change_payload(1_000);
    let large = one_change_payload(10_000);
    assert_eq!(small, large, "(lines, bytes) at 1k vs 10k");
    // The changed service's dispatch chain, the old endpoint chain's deletion and the new one: a handful.
    assert!(small.0 < 30, "{small:?}");
}
