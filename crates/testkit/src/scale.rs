//! Synthetic clusters for scale measurements: N ClusterIP services with one TCP port (80 → 8080) and M
//! ready endpoints each on other nodes, the same shape as the upstream timing runs.

use std::net::{IpAddr, Ipv4Addr};

use svcproxy_model::{
    ClusterState, Endpoint, EndpointPort, EndpointSlice, IpFamily, ObjectName, Protocol, Service, ServicePort,
};

/// The k-th address of a pool starting at `first.0.0.0`: `first+(k>>16) . (k>>8) . k . 1`, unique for k < 2^24
/// and never a network or broadcast address.
pub fn pool(first: u8, k: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(first + (k >> 16) as u8, (k >> 8) as u8, k as u8, 1))
}

pub fn service_name(i: usize) -> ObjectName {
    ObjectName::new("scale", format!("svc-{i:05}"))
}

pub fn scale_state(services: usize, endpoints: usize) -> ClusterState {
    let mut state = ClusterState::default();
    for i in 0..services {
        let name = service_name(i);
        let svc = Service::cluster_ip(
            name.clone(),
            IpAddr::V4(Ipv4Addr::new(10, 96 + (i >> 16) as u8, (i >> 8) as u8, i as u8)),
            vec![ServicePort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 80,
                node_port: None,
            }],
        );
        let eps = (0..endpoints)
            .map(|j| Endpoint::ready(pool(100, i * endpoints + j), Some("node-b")))
            .collect();
        let slice = EndpointSlice {
            name: ObjectName::new("scale", format!("svc-{i:05}-1")),
            service_name: name.name.clone(),
            address_family: Some(IpFamily::V4),
            ports: vec![EndpointPort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 8080,
            }],
            endpoints: eps,
            last_change_trigger_time: None,
        };
        state.services.insert(name, svc);
        state.endpoint_slices.insert(slice.name.clone(), slice);
    }
    state
}

/// Moves the first endpoint of service `i` to another address (and back, when called again).
pub fn toggle_first_endpoint(state: &mut ClusterState, i: usize) {
    let slice = state
        .endpoint_slices
        .get_mut(&ObjectName::new("scale", format!("svc-{i:05}-1")))
        .unwrap();
    let moved: IpAddr = "10.250.0.1".parse().unwrap();
    let original = pool(100, i * slice.endpoints.len());
    let first = &mut slice.endpoints[0].address;
    *first = if *first == moved { original } else { moved };
}
