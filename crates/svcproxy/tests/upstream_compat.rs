//! Compatibility with upstream kube-proxy: for every reference scenario, loaded through the same manifest
//! source the binary uses, svcproxy renders exactly the per-service chains upstream v1.31 programmed (same
//! names, so same hashes), which is what lets either proxy take a node over from the other.

use std::collections::BTreeSet;
use std::path::PathBuf;

use svcproxy::source::manifest_dir::ManifestDir;
use svcproxy_iptables::chain_name::is_owned_service_chain;
use svcproxy_iptables::config::{LocalDetector, RenderConfig};
use svcproxy_iptables::render::render;
use svcproxy_iptables::ruleset::TableName;
use svcproxy_iptables::save_parser::parse_save;
use svcproxy_model::intent::build_intent;
use svcproxy_model::{
    Endpoint, EndpointPort, EndpointSlice, IntentConfig, IpFamily, Node, ObjectName, Protocol, Service,
    ServicePort,
};

fn data() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../iptables/tests/data")
}

/// What the reference runs had besides the scenario: the apiserver's own `default/kubernetes` Service and the
/// Node `node-a` in zone-a.
fn add_reference_environment(state: &mut svcproxy_model::ClusterState) {
    let kubernetes = Service::cluster_ip(
        ObjectName::new("default", "kubernetes"),
        "10.96.0.1".parse().unwrap(),
        vec![ServicePort {
            name: "https".into(),
            protocol: Protocol::Tcp,
            port: 443,
            node_port: None,
        }],
    );
    state.services.insert(kubernetes.name.clone(), kubernetes);
    let slice = EndpointSlice {
        name: ObjectName::new("default", "kubernetes"),
        service_name: "kubernetes".into(),
        address_family: Some(IpFamily::V4),
        ports: vec![EndpointPort {
            name: "https".into(),
            protocol: Protocol::Tcp,
            port: 6443,
        }],
        endpoints: vec![Endpoint::ready("10.0.0.10".parse().unwrap(), None)],
        last_change_trigger_time: None,
    };
    state.endpoint_slices.insert(slice.name.clone(), slice);
    let mut node = Node {
        name: "node-a".into(),
        ..Default::default()
    };
    node.labels.insert(Node::ZONE_LABEL.into(), "zone-a".into());
    state.node = Some(node);
}

#[test]
fn every_scenario_renders_upstreams_service_chains() {
    let mut scenarios: Vec<PathBuf> = std::fs::read_dir(data().join("scenarios"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    scenarios.sort();
    assert!(scenarios.len() >= 10, "reference scenarios present");
    let mut failures = Vec::new();
    for scenario in scenarios {
        let name = scenario.file_stem().unwrap().to_str().unwrap().to_string();
        // Each scenario is read alone, through the production manifest loader.
        let dir = std::env::temp_dir().join(format!("svcproxy-compat-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(&scenario, dir.join("scenario.yaml")).unwrap();
        let read = ManifestDir::new(&dir, "node-a").read().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(read.errors.is_empty(), "{name}: {:?}", read.errors);
        let mut state = read.state;
        add_reference_environment(&mut state);

        let intent = build_intent(
            &state,
            &IntentConfig {
                family: IpFamily::V4,
                node_name: "node-a".into(),
            },
        );
        let cfg = RenderConfig {
            local_detector: LocalDetector::Cidrs(vec!["10.244.0.0/16".parse().unwrap()]),
            ..RenderConfig::default()
        };
        let ours: BTreeSet<String> = render(&intent, &cfg)
            .table(TableName::Nat)
            .chains
            .keys()
            .filter(|c| is_owned_service_chain(c))
            .map(|c| c.to_string())
            .collect();

        let dump =
            std::fs::read_to_string(data().join(format!("upstream-v1.31.14-iptables/{name}.txt"))).unwrap();
        let saved = parse_save(&dump).unwrap();
        let theirs: BTreeSet<String> = saved
            .table("nat")
            .map(|t| {
                t.chains
                    .keys()
                    .filter(|c| is_owned_service_chain(c))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        if ours != theirs {
            failures.push(format!(
                "{name}: only ours {:?}, only upstream {:?}",
                ours.difference(&theirs).collect::<Vec<_>>(),
                theirs.difference(&ours).collect::<Vec<_>>()
            ));
        }
    }
    assert!(failures.is_empty(), "chain sets differ:\n{}", failures.join("\n"));
}
