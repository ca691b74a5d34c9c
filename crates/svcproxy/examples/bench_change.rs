//! A proxier's own CPU for one endpoint change, with nothing behind it: N ClusterIP services × 10 endpoints
//! synced cold into the recording fakes, then one EndpointSlice changed and synced partially, 21 times;
//! prints the cold sync and the median change. What it measures is everything the proxier does on a change
//! except the kernel's part: in iptables mode intent update, render, patch, staging, digest and seal, without
//! running `iptables-restore`; in nftables mode intent update, planning and encoding the element batch,
//! without sending it.
//!
//! `cargo run --release -p svcproxy --example bench_change -- [services, default 10000] [iptables|nftables]`
//! (no root needed).

use std::time::Instant;

use svcproxy::exec::iptables::RecordingIptables;
use svcproxy::exec::nft::RecordingNft;
use svcproxy::exec::nft_netlink::RecordingElementSocket;
use svcproxy::node_addresses::{FixedAddresses, NodePortSpec};
use svcproxy::sync::iptables_proxier::{DetectLocal, IptablesProxier, ProxierOptions};
use svcproxy::sync::nft_proxier::NftProxier;
use svcproxy::sync::proxier::{Proxier, SyncMode};
use svcproxy_iptables::config::RenderConfig;
use svcproxy_model::{IntentChanges, IntentConfig, IpFamily};
use svcproxy_testkit::scale::{self, scale_state, toggle_first_endpoint};

fn main() {
    let services: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000);
    let mode = std::env::args().nth(2).unwrap_or_else(|| "iptables".into());
    let mut state = scale_state(services, 10);
    let addresses = || Box::new(FixedAddresses(vec!["10.0.0.10".parse().expect("literal")]));
    let intent_config = IntentConfig {
        family: IpFamily::V4,
        node_name: "node-a".into(),
    };
    let options = ProxierOptions {
        base: RenderConfig::default(),
        detect_local: DetectLocal::None,
        nodeport_addresses: NodePortSpec::All,
        bind_ip: None,
    };
    let mut proxier: Box<dyn Proxier> = match mode.as_str() {
        "iptables" => Box::new(IptablesProxier::new(
            Box::new(RecordingIptables::default()),
            addresses(),
            intent_config,
            options,
        )),
        "nftables" => Box::new(
            NftProxier::new(
                Box::new(RecordingNft::default()),
                addresses(),
                intent_config,
                options,
            )
            .with_element_socket(Box::new(RecordingElementSocket::default())),
        ),
        other => panic!("{other:?}: the modes are iptables and nftables"),
    };
    println!("{mode} mode");
    let start = Instant::now();
    proxier
        .sync(&state, &IntentChanges::everything(), SyncMode::Full)
        .expect("cold sync");
    println!(
        "{services} services × 10 endpoints: cold sync {:.1} ms",
        ms(start)
    );

    // The same service's first endpoint moves away and back.
    let moved = services / 2;
    let mut times = Vec::new();
    for _ in 0..21 {
        toggle_first_endpoint(&mut state, moved);
        let mut changes = IntentChanges::default();
        changes.service(&scale::service_name(moved));
        let start = Instant::now();
        proxier
            .sync(&state, &changes, SyncMode::Partial)
            .expect("partial sync");
        times.push(ms(start));
    }
    times.sort_by(f64::total_cmp);
    println!(
        "one endpoint change: median {:.3} ms (fastest {:.3}, slowest {:.3})",
        times[times.len() / 2],
        times[0],
        times[times.len() - 1]
    );
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}
