//! Properties over generated clusters: payloads take the simulated kernel from any previous state to exactly
//! the next one without a refused line, rendering does not depend on how the objects arrived, and the
//! rendered rules are self-consistent.

mod common;

use std::collections::BTreeSet;

use common::*;
use proptest::prelude::*;
use svcproxy_iptables::gc::GcPlan;
use svcproxy_iptables::ruleset::jump_target;
use svcproxy_iptables::save_parser::{quote_arg, tokenize};
use svcproxy_iptables::staging::{Baseline, staged_payloads};
use svcproxy_iptables::{
    LocalDetector, RenderConfig, Ruleset, ServicePortRules, assemble, full_payload, is_owned_service_chain,
    missing_jumps, partial_payload, reassemble, render, render_service_port, stale_owned_chains,
};
use svcproxy_model::{ClusterState, Endpoint, EndpointSlice, Protocol, Service, ServiceType};

#[derive(Debug, Clone)]
struct EpSpec {
    ip: u8,
    local: bool,
    /// 0 ready, 1 serving-terminating, 2 not serving, 3 terminating and not serving.
    state: u8,
}

#[derive(Debug, Clone)]
struct SvcSpec {
    ty: u8,
    ports: u8,
    etp_local: bool,
    itp_local: bool,
    sticky: bool,
    external_ip: bool,
    lb_ips: u8,
    ranges: u8,
    endpoints: Vec<EpSpec>,
}

fn ep_spec() -> impl Strategy<Value = EpSpec> {
    (0u8..8, any::<bool>(), 0u8..4).prop_map(|(ip, local, state)| EpSpec { ip, local, state })
}

fn svc_spec() -> impl Strategy<Value = SvcSpec> {
    (
        (0u8..3, 0u8..4, any::<bool>(), any::<bool>(), any::<bool>()),
        (
            any::<bool>(),
            0u8..3,
            0u8..4,
            prop::collection::vec(ep_spec(), 0..5),
        ),
    )
        .prop_map(
            |((ty, ports, etp_local, itp_local, sticky), (external_ip, lb_ips, ranges, endpoints))| SvcSpec {
                ty,
                ports,
                etp_local,
                itp_local,
                sticky,
                external_ip,
                lb_ips,
                ranges,
                endpoints,
            },
        )
}

fn cluster() -> impl Strategy<Value = Vec<Option<SvcSpec>>> {
    prop::collection::vec(prop::option::of(svc_spec()), 4)
}

const PORTS: [&[(&str, Protocol, u16)]; 4] = [
    &[("a", Protocol::Tcp, 80)],
    &[("b", Protocol::Udp, 53)],
    &[("", Protocol::Sctp, 9)],
    &[("a", Protocol::Tcp, 80), ("b", Protocol::Udp, 53)],
];

/// The objects for a generated cluster; `split` spreads each service's endpoints over two slices in reverse
/// order, which must not change anything.
fn objects(specs: &[Option<SvcSpec>], split: bool) -> ClusterState {
    let mut services = Vec::new();
    let mut slices = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let Some(spec) = spec else { continue };
        let name = format!("s{i}");
        let ty = [
            ServiceType::ClusterIP,
            ServiceType::NodePort,
            ServiceType::LoadBalancer,
        ][spec.ty as usize];
        let ports = PORTS[spec.ports as usize];
        let svc_ports = ports
            .iter()
            .enumerate()
            .map(|(j, (n, p, num))| port(n, *p, *num, Some(30000 + 10 * i as u16 + j as u16)))
            .collect();
        let mut s: Service = service("p", &name, ty, &format!("10.96.0.{}", i + 1), svc_ports);
        s = local_policies(s, spec.etp_local, spec.itp_local);
        if spec.sticky {
            s = sticky(s, 300);
        }
        if spec.external_ip {
            s.external_ips = vec![ip(&format!("198.51.100.{}", i + 1))];
        }
        let lbs: Vec<String> = (0..spec.lb_ips)
            .map(|k| format!("192.0.2.{}", 10 * i as u8 + k))
            .collect();
        s = with_lb(s, &lbs.iter().map(String::as_str).collect::<Vec<_>>());
        let ranges = ["203.0.113.0/24", "10.0.0.0/24", "0.0.0.0/0"];
        s.load_balancer_source_ranges = ranges[..spec.ranges as usize % 4]
            .iter()
            .map(|r| net(r))
            .collect();
        if ty == ServiceType::LoadBalancer && spec.etp_local {
            s.health_check_node_port = Some(32000 + i as u16);
        }
        services.push(s);

        // One entry per address: the same address listed twice with different conditions is resolved by
        // slice order, which splitting would change.
        let mut seen = BTreeSet::new();
        let mut eps: Vec<Endpoint> = spec
            .endpoints
            .iter()
            .filter(|e| seen.insert(e.ip))
            .map(|e| {
                let mut endpoint = ep(
                    &format!("10.244.{}.{}", e.ip % 3, e.ip),
                    if e.local { NODE } else { "node-b" },
                );
                (endpoint.ready, endpoint.serving, endpoint.terminating) = match e.state {
                    0 => (true, true, false),
                    1 => (false, true, true),
                    2 => (false, false, false),
                    _ => (false, false, true),
                };
                endpoint
            })
            .collect();
        let slice_ports: Vec<(&str, Protocol, u16)> =
            ports.iter().map(|(n, p, num)| (*n, *p, num + 8000)).collect();
        if split {
            eps.reverse();
            let rest = eps.split_off(eps.len() / 2);
            slices.push(slice("p", &format!("{name}-y"), &name, &slice_ports, rest));
            slices.push(slice("p", &format!("{name}-z"), &name, &slice_ports, eps));
        } else {
            slices.push(slice("p", &format!("{name}-a"), &name, &slice_ports, eps));
        }
    }
    state(services, slices)
}

fn cfg() -> RenderConfig {
    RenderConfig {
        local_detector: LocalDetector::Cidrs(vec![net("10.244.0.0/16")]),
        node_ip: Some(ip("10.0.0.10")),
        ..RenderConfig::default()
    }
}

fn rendered(specs: &[Option<SvcSpec>]) -> Ruleset {
    render(&intent_of(&objects(specs, false)), &cfg())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn partial_payload_takes_prev_to_next(prev in cluster(), next in cluster()) {
        let (prev, next) = (rendered(&prev), rendered(&next));
        let payload = partial_payload(&prev, &next, &[]);
        let mut kernel = Kernel::holding(&prev);
        kernel.apply(payload.text()).map_err(TestCaseError::fail)?;
        prop_assert!(kernel.matches(&next));
        // Nothing unchanged is rewritten.
        for (prev_t, next_t) in [(&prev.filter, &next.filter), (&prev.nat, &next.nat)] {
            let header = format!("*{}\n", next_t.name);
            let section = payload.text().split_once(&header).map(|(_, rest)| rest.split("COMMIT").next().unwrap());
            for (name, chain) in &next_t.chains {
                if prev_t.chains.get(name) == Some(chain) {
                    let declared = section.is_some_and(|s| s.lines().any(|l| l == format!(":{name} - [0:0]")));
                    prop_assert!(!declared, "{} {} rewritten", next_t.name, name);
                }
            }
        }
        prop_assert!(partial_payload(&next, &next, &[]).is_empty());
    }

    #[test]
    fn reassembling_equals_assembling(prev in cluster(), next in cluster()) {
        // As a sync's render cache does: a service port whose intent did not change keeps its part.
        let (prev, next) = (intent_of(&objects(&prev, false)), intent_of(&objects(&next, false)));
        let render_part = |spi| std::sync::Arc::new(render_service_port(spi, &cfg(), false));
        let before: Vec<_> = prev.service_ports.iter().map(|(n, spi)| (n.clone(), spi.content_hash, render_part(spi))).collect();
        let mut after = Vec::new();
        let (mut removed, mut added) = (Vec::new(), Vec::new());
        for (name, spi) in &next.service_ports {
            match before.iter().find(|(n, _, _)| n == name) {
                Some((_, hash, part)) if *hash == spi.content_hash => after.push(part.clone()),
                old => {
                    removed.extend(old.map(|(_, _, part)| part.clone()));
                    let part = render_part(spi);
                    added.push(part.clone());
                    after.push(part);
                }
            }
        }
        removed.extend(before.iter().filter(|(n, _, _)| !next.service_ports.contains_key(n)).map(|(_, _, p)| p.clone()));
        let whole_before = assemble(&cfg(), before.iter().map(|(_, _, p)| &**p));
        let removed: Vec<&ServicePortRules> = removed.iter().map(|p| &**p).collect();
        let added: Vec<&ServicePortRules> = added.iter().map(|p| &**p).collect();
        let mut patched = whole_before.clone();
        let replaced = reassemble(&cfg(), &mut patched, &removed, &added, after.iter().map(|p| &**p));
        prop_assert_eq!(&patched, &assemble(&cfg(), after.iter().map(|p| &**p)));
        // What the patch reports as replaced is what a partial sync writes: it takes a kernel holding the
        // previous ruleset to the new one.
        let mut kernel = Kernel::holding(&whole_before);
        for payload in staged_payloads(Baseline::Replaced(&replaced), &patched, &GcPlan::default(), &[], 7) {
            kernel.apply(payload.text()).map_err(TestCaseError::fail)?;
        }
        prop_assert!(kernel.matches(&patched));
    }

    #[test]
    fn partial_payload_restores_missing_jumps(prev in cluster(), next in cluster()) {
        let (prev, next) = (rendered(&prev), rendered(&next));
        let mut kernel = Kernel::holding(&prev);
        let jumps = missing_jumps(&kernel.saved(), &cfg());
        prop_assert_eq!(jumps.len(), 12);
        kernel.apply(partial_payload(&prev, &next, &jumps).text()).map_err(TestCaseError::fail)?;
        prop_assert!(kernel.matches(&next));
        prop_assert!(missing_jumps(&kernel.saved(), &cfg()).is_empty());
    }

    #[test]
    fn full_payload_with_gc_takes_any_state_to_next(prev in cluster(), next in cluster()) {
        let (prev, next) = (rendered(&prev), rendered(&next));
        let mut kernel = Kernel::holding(&prev);
        let saved = kernel.saved();
        let stale = stale_owned_chains(&saved, &next);
        let jumps = missing_jumps(&saved, &cfg());
        kernel.apply(full_payload(&next, &stale, &jumps).text()).map_err(TestCaseError::fail)?;
        prop_assert!(kernel.matches(&next));
        prop_assert!(missing_jumps(&kernel.saved(), &cfg()).is_empty());
        // A second full sync from the result is a no-op apart from rewriting.
        let again = full_payload(&next, &stale_owned_chains(&kernel.saved(), &next), &[]);
        prop_assert_eq!(again.chains_deleted, 0);
    }

    #[test]
    fn rendering_ignores_arrival_order(specs in cluster()) {
        let a = render(&intent_of(&objects(&specs, false)), &cfg());
        let b = render(&intent_of(&objects(&specs, true)), &cfg());
        prop_assert_eq!(full_payload(&a, &[], &[]), full_payload(&b, &[], &[]));
    }

    #[test]
    fn rendered_rules_are_self_consistent(specs in cluster()) {
        let r = rendered(&specs);
        prop_assert!(r.dangling_jumps().is_empty(), "{:?}", r.dangling_jumps());
        // Every per-service chain is reachable, and each one is owned-pattern so GC will find it later.
        let targets: BTreeSet<&str> = r.nat.chains.values().flat_map(|c| c.rules()).filter_map(jump_target).collect();
        for name in r.nat.chains.keys().filter(|n| n.starts_with("KUBE-") && n.len() > 20) {
            prop_assert!(is_owned_service_chain(name), "{}", name);
            prop_assert!(targets.contains(&**name), "{} unreferenced", name);
            prop_assert!(!r.nat.chains[name].is_empty(), "{} empty", name);
        }
        // Every rule has arguments, and none names a chain itself (a line filed under the wrong chain fails
        // its debug check when the chain is built).
        for t in [&r.filter, &r.nat] {
            for chain in t.chains.values() {
                for rule in chain.rules() {
                    prop_assert!(!rule.is_empty() && !rule.starts_with("-A "), "{}", rule);
                }
            }
        }
    }

    #[test]
    fn quoting_round_trips(arg in "[ -~]{0,24}") {
        let line = format!("-A X --comment {} -j Y", quote_arg(&arg));
        let words = tokenize(&line).unwrap();
        prop_assert_eq!(words.len(), 6);
        prop_assert_eq!(&words[3], &arg);
    }
}

#[test]
fn slices_used_by_the_generator_are_valid() {
    let specs = vec![Some(SvcSpec {
        ty: 2,
        ports: 3,
        etp_local: true,
        itp_local: false,
        sticky: true,
        external_ip: true,
        lb_ips: 2,
        ranges: 2,
        endpoints: vec![
            EpSpec {
                ip: 1,
                local: true,
                state: 0,
            },
            EpSpec {
                ip: 2,
                local: false,
                state: 1,
            },
        ],
    })];
    let state = objects(&specs, true);
    let slices: Vec<&EndpointSlice> = state.endpoint_slices.values().collect();
    assert_eq!(slices.len(), 2);
    let r = rendered(&specs);
    assert!(r.nat.chains.keys().any(|c| c.starts_with("KUBE-FW-")));
    assert!(r.nat.chains.keys().any(|c| c.starts_with("KUBE-SVL-")));
}
