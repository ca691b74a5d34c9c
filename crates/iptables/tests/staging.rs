//! Staged transactions: applied one after the other to a simulated kernel (which refuses jumps to missing
//! chains and deletion of referenced ones, as the real one does), they always reach the target, and a kernel
//! that already holds the right rules gets no transaction at all.

mod common;

use std::sync::Arc;

use common::{Kernel, ep, intent_of, port, service, slice, state, with_lb};
use proptest::prelude::*;
use svcproxy_iptables::gc::{GcPlan, plan_gc};
use svcproxy_iptables::jumps::{jump_rules, missing_jumps};
use svcproxy_iptables::staging::{Baseline, Groups, stage, staged_payloads};
use svcproxy_iptables::{
    KernelView, RenderConfig, Ruleset, ServicePortRules, assemble, is_large_cluster, render,
    render_service_port,
};
use svcproxy_model::{Protocol, ServiceType};

/// `n` services, the i-th with `1 + (i + shift) % 4` endpoints; every third one a LoadBalancer.
fn ruleset(n: usize, shift: usize) -> Ruleset {
    rendered(n, shift).1
}

/// [`ruleset`], with the service ports' parts it is assembled from, in service-port order (as a sync holds
/// them).
fn rendered(n: usize, shift: usize) -> (Vec<Arc<ServicePortRules>>, Ruleset) {
    let mut services = Vec::new();
    let mut slices = Vec::new();
    for i in 0..n {
        let name = format!("s{i}");
        let ty = if i % 3 == 0 {
            ServiceType::LoadBalancer
        } else {
            ServiceType::ClusterIP
        };
        let mut svc = service(
            "ns",
            &name,
            ty,
            &format!("10.96.1.{}", i + 1),
            vec![port(
                "p",
                Protocol::Tcp,
                80,
                (ty == ServiceType::LoadBalancer).then_some(30000 + i as u16),
            )],
        );
        if ty == ServiceType::LoadBalancer {
            svc = with_lb(svc, &[&format!("192.0.2.{}", i + 1)]);
        }
        services.push(svc);
        let eps = (0..1 + (i + shift) % 4)
            .map(|e| ep(&format!("10.244.{i}.{}", e + shift + 1), "node-b"))
            .collect();
        slices.push(slice(
            "ns",
            &format!("{name}-1"),
            &name,
            &[("p", Protocol::Tcp, 8080)],
            eps,
        ));
    }
    let intent = intent_of(&state(services, slices));
    let cfg = RenderConfig::default();
    let large = is_large_cluster(&intent);
    let parts: Vec<Arc<ServicePortRules>> = intent
        .service_ports
        .values()
        .map(|spi| Arc::new(render_service_port(spi, &cfg, large)))
        .collect();
    let ruleset = assemble(&cfg, parts.iter().map(|p| &**p));
    assert_eq!(ruleset, render(&intent, &cfg));
    (parts, ruleset)
}

fn apply_all(kernel: &mut Kernel, payloads: &[svcproxy_iptables::Payload]) {
    for (i, p) in payloads.iter().enumerate() {
        kernel
            .apply(p.text())
            .unwrap_or_else(|e| panic!("transaction {i} refused: {e}\n{}", p.text()));
    }
}

/// The staged transactions, checking that the last one, and only it, is handed over as the last: the seal that
/// completes a sync rides on it.
fn staged<'a>(
    baseline: Baseline<'_>,
    next: &'a Ruleset,
    groups: Groups<'a>,
    plan: &GcPlan,
    jumps: &[svcproxy_iptables::JumpRule],
    max: usize,
) -> Vec<svcproxy_iptables::Payload> {
    let (mut out, mut flags) = (Vec::new(), Vec::new());
    let Ok(()) = stage(baseline, next, groups, plan, jumps, max, |p, last| {
        out.push(p);
        flags.push(last);
        Ok::<(), std::convert::Infallible>(())
    });
    let expected: Vec<bool> = (0..out.len()).map(|i| i + 1 == out.len()).collect();
    assert_eq!(flags, expected, "which transactions were flagged last");
    out
}

#[test]
fn a_kernel_that_is_already_right_gets_nothing() {
    let next = ruleset(20, 0);
    let mut kernel = Kernel::holding(&next);
    // The built-in jumps are in place too: a restart on a healthy node.
    let jumps = jump_rules(&RenderConfig::default());
    apply_all(
        &mut kernel,
        &staged_payloads(
            Baseline::None,
            &Ruleset::default(),
            &GcPlan::default(),
            &jumps,
            100,
        ),
    );
    let saved = kernel.saved();
    assert!(missing_jumps(&saved, &RenderConfig::default()).is_empty());
    let view = KernelView::from_saved(saved.clone(), &next);
    let payloads = staged_payloads(Baseline::Kernel(&view), &next, &plan_gc(&saved, &next), &[], 100);
    assert!(payloads.is_empty(), "{payloads:?}");
}

proptest! {
    #[test]
    fn staged_transactions_reach_the_target_without_dangling_jumps(
        before in 0usize..25, after in 0usize..25, shift in 0usize..3, max in 1usize..40, from_empty in any::<bool>()
    ) {
        let prev = ruleset(before, 0);
        let (parts, next) = rendered(after, shift);
        // Service ports found in the ruleset by name, and handed over as the parts it was assembled from.
        for groups in [Groups::ByName, Groups::Parts(&parts)] {
            let mut kernel = if from_empty { Kernel::default() } else { Kernel::holding(&prev) };
            let saved = kernel.saved();
            let cfg = RenderConfig::default();
            let jumps = missing_jumps(&saved, &cfg);
            // Read as a full sync reads the kernel: the rules of our chains compared and dropped as they
            // stream by.
            let view = KernelView::parse(&kernel.save(), &next).unwrap();
            let plan = plan_gc(&view.saved, &next);
            let payloads = staged(Baseline::Kernel(&view), &next, groups, &plan, &jumps, max);
            apply_all(&mut kernel, &payloads);
            prop_assert!(kernel.matches(&next));
        }

        // The same from the in-memory baseline (partial syncs), when the kernel held `prev`.
        if !from_empty {
            let mut kernel = Kernel::holding(&prev);
            let payloads = staged(Baseline::Applied(&prev), &next, Groups::ByName, &GcPlan::default(), &[], max);
            apply_all(&mut kernel, &payloads);
            prop_assert!(kernel.matches(&next));
        }
    }
}
