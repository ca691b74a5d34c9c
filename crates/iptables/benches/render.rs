//! Rendering cost at scale: N ClusterIP services with 10 remote endpoints each (the shape upstream's nftables
//! benchmarks use), as a full payload, and as the partial payload after one endpoint changed — both by
//! re-rendering everything and by re-rendering only the changed service port.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use criterion::{BatchSize, BenchmarkId, Criterion, criterion_group, criterion_main};
use ipnet::IpNet;
use svcproxy_iptables::gc::GcPlan;
use svcproxy_iptables::parallel::{MIN_ITEMS_PER_THREAD, map_in_order};
use svcproxy_iptables::staging::{Baseline, DEFAULT_MAX_CHAINS, Groups, stage, staged_payloads};
use svcproxy_iptables::{
    LocalDetector, RenderConfig, ServicePortRules, assemble, full_payload, is_large_cluster, partial_payload,
    reassemble, render, render_payload, render_service_port,
};
use svcproxy_model::intent::build_intent;
use svcproxy_model::{
    ClusterState, Endpoint, EndpointPort, EndpointSlice, Intent, IntentConfig, IpFamily, ObjectName,
    Protocol, Service, ServicePort, ServicePortIntent,
};

fn v4(n: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(n))
}

fn cluster(services: u32, moved: Option<u32>) -> Intent {
    let mut state = ClusterState::default();
    for i in 0..services {
        let name = ObjectName::new("bench", format!("svc-{i}"));
        let port = ServicePort {
            name: "p80".into(),
            protocol: Protocol::Tcp,
            port: 80,
            node_port: None,
        };
        let svc = Service::cluster_ip(name.clone(), v4(0x0a60_0000 + i), vec![port]);
        let endpoints = (0..10u32)
            .map(|j| {
                let addr = if moved == Some(i) && j == 0 {
                    0x0af0_0000 + i
                } else {
                    0x0af4_0000 + i * 16 + j
                };
                Endpoint::ready(v4(addr), Some("node-b"))
            })
            .collect();
        let slice = EndpointSlice {
            name: ObjectName::new("bench", format!("svc-{i}-1")),
            service_name: name.name.clone(),
            address_family: Some(IpFamily::V4),
            ports: vec![EndpointPort {
                name: "p80".into(),
                protocol: Protocol::Tcp,
                port: 8080,
            }],
            endpoints,
            last_change_trigger_time: None,
        };
        state.endpoint_slices.insert(slice.name.clone(), slice);
        state.services.insert(name, svc);
    }
    build_intent(
        &state,
        &IntentConfig {
            family: IpFamily::V4,
            node_name: "node-a".into(),
        },
    )
}

fn cfg() -> RenderConfig {
    let cidr: IpNet = "10.244.0.0/16".parse().unwrap();
    RenderConfig {
        local_detector: LocalDetector::Cidrs(vec![cidr]),
        ..RenderConfig::default()
    }
}

fn bench(c: &mut Criterion) {
    let cfg = cfg();
    let mut group = c.benchmark_group("render");
    group.sample_size(10);
    for n in [1_000u32, 10_000] {
        let prev_intent = cluster(n, None);
        let next_intent = cluster(n, Some(n / 2));
        let prev = render(&prev_intent, &cfg);
        let full = full_payload(&prev, &[], &[]);
        eprintln!(
            "{n} services: full payload {} lines, {} bytes",
            full.line_count,
            full.len()
        );

        group.bench_with_input(BenchmarkId::new("full", n), &prev_intent, |b, intent| {
            b.iter(|| full_payload(&render(black_box(intent), &cfg), &[], &[]))
        });

        // The same payload written straight from the service ports' parts, in their order.
        group.bench_with_input(BenchmarkId::new("payload", n), &prev_intent, |b, intent| {
            b.iter(|| render_payload(black_box(intent), &cfg))
        });

        // What a cold sync renders and writes, as the proxier does it: the service ports' parts (kept, shared),
        // the ruleset assembled from them, and the same chains handed to the kernel in bounded transactions of
        // whole service ports (each serialised when its turn comes and dropped once applied).
        group.bench_with_input(BenchmarkId::new("cold_sync", n), &prev_intent, |b, intent| {
            b.iter(|| {
                let large = is_large_cluster(intent);
                let ports: Vec<&ServicePortIntent> = intent.service_ports.values().map(|p| &**p).collect();
                let parts = map_in_order(&ports, MIN_ITEMS_PER_THREAD, |spi| {
                    Arc::new(render_service_port(spi, &cfg, large))
                });
                let ruleset = assemble(&cfg, parts.iter().map(|p| &**p));
                let mut bytes = 0;
                let Ok(()) = stage(
                    Baseline::None,
                    &ruleset,
                    Groups::Parts(&parts),
                    &GcPlan::default(),
                    &[],
                    DEFAULT_MAX_CHAINS,
                    |payload, _| {
                        bytes += payload.len();
                        Ok::<(), std::convert::Infallible>(())
                    },
                );
                bytes
            })
        });

        // The stages of `full`, each on its own; what they make is dropped outside the timing. The service
        // ports' rules as `render` makes them (on every core), and on one core.
        let large = is_large_cluster(&prev_intent);
        let ports: Vec<&ServicePortIntent> = prev_intent.service_ports.values().map(|p| &**p).collect();
        group.bench_with_input(BenchmarkId::new("stage_parts", n), &ports, |b, ports| {
            b.iter_with_large_drop(|| {
                map_in_order(ports, MIN_ITEMS_PER_THREAD, |spi| {
                    render_service_port(spi, &cfg, large)
                })
            })
        });
        group.bench_with_input(BenchmarkId::new("stage_parts_one_core", n), &ports, |b, ports| {
            b.iter_with_large_drop(|| {
                ports
                    .iter()
                    .map(|spi| render_service_port(spi, &cfg, large))
                    .collect::<Vec<_>>()
            })
        });
        let parts: Vec<ServicePortRules> = prev_intent
            .service_ports
            .values()
            .map(|spi| render_service_port(spi, &cfg, large))
            .collect();
        group.bench_with_input(BenchmarkId::new("stage_assemble", n), &parts, |b, parts| {
            b.iter_with_large_drop(|| assemble(&cfg, parts))
        });
        group.bench_with_input(BenchmarkId::new("stage_serialize", n), &prev, |b, ruleset| {
            b.iter_with_large_drop(|| full_payload(ruleset, &[], &[]))
        });
        drop(parts);

        group.bench_with_input(
            BenchmarkId::new("partial_rerender_all", n),
            &next_intent,
            |b, intent| b.iter(|| partial_payload(&prev, &render(black_box(intent), &cfg), &[])),
        );

        // What a sync engine caching per-service-port parts does: re-render the changed port only.
        let cache: BTreeMap<_, ServicePortRules> = prev_intent
            .service_ports
            .iter()
            .map(|(k, spi)| (k.clone(), render_service_port(spi, &cfg, large)))
            .collect();
        let prev_cached = assemble(&cfg, cache.values());
        let changed: Vec<_> = next_intent
            .service_ports
            .iter()
            .filter(|(k, spi)| prev_intent.service_ports[*k].content_hash != spi.content_hash)
            .collect();
        assert_eq!(changed.len(), 1);
        let once = {
            let mut parts = cache.clone();
            for (k, spi) in &changed {
                parts.insert((*k).clone(), render_service_port(spi, &cfg, large));
            }
            partial_payload(&prev_cached, &assemble(&cfg, parts.values()), &[])
        };
        eprintln!(
            "{n} services: partial payload {} lines, {} chains written",
            once.line_count, once.chains_written
        );
        group.bench_with_input(
            BenchmarkId::new("partial_incremental", n),
            &changed,
            |b, changed| {
                b.iter(|| {
                    let fresh: Vec<_> = changed
                        .iter()
                        .map(|(k, spi)| ((*k).clone(), render_service_port(spi, &cfg, large)))
                        .collect();
                    let parts = cache
                        .iter()
                        .map(|(k, v)| fresh.iter().find(|(fk, _)| fk == k).map_or(v, |(_, f)| f));
                    partial_payload(&prev_cached, &assemble(&cfg, parts), &[])
                })
            },
        );

        // What the iptables proxier does since it patches in place: re-render the changed port, swap its
        // chains into the applied ruleset, rebuild the shared chains if its lines in them changed, and stage
        // what the patch replaced. The
        // copy of the applied ruleset each iteration starts from is made outside the timing.
        group.bench_with_input(BenchmarkId::new("partial_patched", n), &changed, |b, changed| {
            b.iter_batched(
                || prev_cached.clone(),
                |mut ruleset| {
                    let fresh: Vec<_> = changed
                        .iter()
                        .map(|(k, spi)| ((*k).clone(), render_service_port(spi, &cfg, large)))
                        .collect();
                    let removed: Vec<&ServicePortRules> = changed.iter().map(|(k, _)| &cache[*k]).collect();
                    let added: Vec<&ServicePortRules> = fresh.iter().map(|(_, p)| p).collect();
                    let parts = cache
                        .iter()
                        .map(|(k, v)| fresh.iter().find(|(fk, _)| fk == k).map_or(v, |(_, f)| f));
                    let replaced = reassemble(&cfg, &mut ruleset, &removed, &added, parts);
                    let payloads = staged_payloads(
                        Baseline::Replaced(&replaced),
                        &ruleset,
                        &GcPlan::default(),
                        &[],
                        DEFAULT_MAX_CHAINS,
                    );
                    // The proxier keeps the patched ruleset: handed back, it is dropped outside the timing.
                    (ruleset, payloads)
                },
                BatchSize::LargeInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
