//! Rendering and planning cost at scale: the full transaction for N services × 10 endpoints, and the
//! partial transaction after one endpoint moved (render of the new intent plus the diff), at 1k and 10k, and
//! the plan of a sync in which half the Services changed at once.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use svcproxy_model::intent::build_intent;
use svcproxy_model::{IntentConfig, IpFamily};
use svcproxy_nftables::{RenderConfig, full_transaction, partial_transaction, render, render_table};

use svcproxy_testkit::scale;

fn intent_config() -> IntentConfig {
    IntentConfig {
        family: IpFamily::V4,
        node_name: "node-a".into(),
    }
}

fn bench(c: &mut Criterion) {
    let cfg = RenderConfig::default();
    let mut group = c.benchmark_group("nftables");
    group.sample_size(10);
    for services in [1_000, 10_000] {
        let mut state = scale::scale_state(services, 10);
        let before = build_intent(&state, &intent_config());
        scale::toggle_first_endpoint(&mut state, 7);
        let after = build_intent(&state, &intent_config());
        let prev = render(&before, &cfg);

        group.bench_with_input(
            BenchmarkId::new("full_transaction", services),
            &before,
            |b, intent| b.iter(|| full_transaction(&render(intent, &cfg)).text.len()),
        );
        group.bench_with_input(
            BenchmarkId::new("one_endpoint_partial", services),
            &after,
            |b, intent| {
                b.iter(|| {
                    partial_transaction(&prev, &render(intent, &cfg))
                        .unwrap()
                        .text
                        .len()
                })
            },
        );
        let table = render_table(&before, &cfg);
        let mut half_moved = state.clone();
        for i in (0..services).step_by(2) {
            scale::toggle_first_endpoint(&mut half_moved, i);
        }
        let half_moved = build_intent(&half_moved, &intent_config());
        group.bench_with_input(
            BenchmarkId::new("plan_half_changed", services),
            &half_moved,
            |b, intent| b.iter(|| table.plan(&before, intent, &cfg).map(|u| u.after.chains.len())),
        );
        let next = render(&after, &cfg);
        group.bench_with_input(BenchmarkId::new("diff_only", services), &next, |b, next| {
            b.iter(|| partial_transaction(&prev, next).unwrap().text.len())
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
