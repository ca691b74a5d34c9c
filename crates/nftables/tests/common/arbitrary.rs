//! Random clusters drawn from a small universe of names and addresses, so two draws share services and
//! endpoints and their difference exercises every kind of partial update.

use proptest::prelude::*;
use svcproxy_model::{
    ClusterState, Endpoint, EndpointSlice, LoadBalancerIngress, Protocol, Service, ServiceType,
    SessionAffinity, TrafficPolicy,
};

use super::*;

#[derive(Debug, Clone)]
pub struct SvcSpec {
    pub index: usize,
    pub ty: u8,
    pub udp_port: bool,
    pub external_ip: bool,
    pub source_ranges: bool,
    pub etp_local: bool,
    pub itp_local: bool,
    pub affinity: Option<u32>,
    /// (endpoint index in the universe, ready, serving, terminating)
    pub endpoints: Vec<(usize, bool, bool, bool)>,
}

fn endpoint_ip(k: usize) -> String {
    // Node a holds 10.244.0.x; the others are remote.
    format!("10.244.{}.{}", k % 3, 10 + k / 3)
}

pub fn svc_spec() -> impl Strategy<Value = SvcSpec> {
    (
        0usize..6,
        0u8..3,
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        prop::option::of(prop::sample::select(vec![60u32, 600])),
        prop::collection::vec((0usize..9, any::<bool>(), any::<bool>(), any::<bool>()), 0..5),
    )
        .prop_map(
            |(index, ty, udp_port, external_ip, source_ranges, etp_local, itp_local, affinity, endpoints)| {
                SvcSpec {
                    index,
                    ty,
                    udp_port,
                    external_ip,
                    source_ranges,
                    etp_local,
                    itp_local,
                    affinity,
                    endpoints,
                }
            },
        )
}

pub fn cluster() -> impl Strategy<Value = Vec<SvcSpec>> {
    prop::collection::vec(svc_spec(), 0..6)
}

/// Builds the state; `shuffle` reverses every list whose order must not matter.
pub fn build(specs: &[SvcSpec], shuffle: bool) -> ClusterState {
    let mut services = Vec::new();
    let mut slices = Vec::new();
    // One spec per service and one entry per endpoint: conflicting duplicates are resolved by arrival order
    // in the model, which is not what these properties are about.
    let mut seen = std::collections::BTreeSet::new();
    for s in specs.iter().filter(|s| seen.insert(s.index)) {
        let mut seen_ep = std::collections::BTreeSet::new();
        let endpoints: Vec<_> = s.endpoints.iter().filter(|e| seen_ep.insert(e.0)).collect();
        let name = format!("svc-{}", s.index);
        let ty = match s.ty {
            0 => ServiceType::ClusterIP,
            1 => ServiceType::NodePort,
            _ => ServiceType::LoadBalancer,
        };
        let np = |j: u16| (s.ty > 0).then_some(30000 + s.index as u16 * 2 + j);
        let mut ports = vec![port("http", Protocol::Tcp, 80, np(0))];
        if s.udp_port {
            ports.push(port("dns", Protocol::Udp, 53, np(1)));
        }
        let mut svc: Service = service("prop", &name, ty, &format!("10.96.0.{}", s.index + 1), ports);
        if s.external_ip {
            svc.external_ips = vec![ip("192.0.2.1"), ip(&format!("192.0.2.{}", 100 + s.index))];
        }
        if ty == ServiceType::LoadBalancer {
            svc.load_balancer_ingress = [
                format!("198.51.100.{}", s.index),
                format!("198.51.100.{}", 50 + s.index),
            ]
            .iter()
            .map(|i| LoadBalancerIngress {
                ip: ip(i),
                ip_mode_proxy: false,
            })
            .collect();
        }
        if s.source_ranges {
            svc.load_balancer_source_ranges =
                vec![net("203.0.113.0/24"), net("10.0.0.0/16"), net("203.0.113.128/25")];
        }
        if s.etp_local {
            svc.external_traffic_policy = TrafficPolicy::Local;
        }
        if s.itp_local {
            svc.internal_traffic_policy = TrafficPolicy::Local;
        }
        if let Some(t) = s.affinity {
            svc.session_affinity = SessionAffinity::ClientIP { timeout_seconds: t };
        }
        let mut eps: Vec<Endpoint> = endpoints
            .into_iter()
            .map(|(k, ready, serving, terminating)| {
                let addr = endpoint_ip(*k);
                let node = if k % 3 == 0 { NODE } else { "node-b" };
                let mut e = ep(&addr, node);
                e.ready = *ready;
                e.serving = *serving || *ready;
                e.terminating = *terminating && !*ready;
                e
            })
            .collect();
        if shuffle {
            svc.external_ips.reverse();
            svc.load_balancer_ingress.reverse();
            svc.load_balancer_source_ranges.reverse();
            eps.reverse();
        }
        // Split the endpoints over two slices, as the controller does for large services.
        let half = eps.len() / 2;
        let second = eps.split_off(half);
        let slice_ports = [("http", Protocol::Tcp, 8080), ("dns", Protocol::Udp, 5353)];
        let a: EndpointSlice = slice("prop", &format!("{name}-a"), &name, &slice_ports, eps);
        let b: EndpointSlice = slice("prop", &format!("{name}-b"), &name, &slice_ports, second);
        services.push(svc);
        slices.push(a);
        slices.push(b);
    }
    if shuffle {
        services.reverse();
        slices.reverse();
    }
    state(services, slices)
}
