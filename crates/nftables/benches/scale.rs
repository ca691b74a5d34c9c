//! Kernel-side cost of each dispatch layout at scale: loads the full table with `nft -f` into a fresh
//! network namespace, then applies one-endpoint changes, then a cold sync in chunks. Prints the figures
//! quoted in `src/dispatch.rs`. It takes about a minute and needs root, so it runs only as a benchmark:
//!
//! `cargo bench -p svcproxy-nftables --bench scale` (under `cargo test` it only checks that it builds)
//!
//! `SCALE_SERVICES` and `SCALE_ENDPOINTS` override the default 5,000 × 10; `SCALE_LAYOUT=0|1|2|3` measures one
//! layout only (mapped, cascade, upstream's vmap, direct), which keeps one layout's namespace teardown (the
//! kernel frees a large table in the background) from slowing the next one's figures. `SCALE_DUMP=dir` writes
//! the full table and the last one-endpoint change there, to replay by hand.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Duration;

use common::flow::LAYOUTS;
use common::netns::Netns;
use common::*;
use svcproxy_nftables::{
    DispatchLayout, RenderConfig, chunked_full, full_transaction, partial_transaction, render,
};
use svcproxy_testkit::scale::{scale_state, toggle_first_endpoint};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs bench binaries without it.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    measure_layouts();
}

fn measure_layouts() {
    let services = env("SCALE_SERVICES", 5000);
    let endpoints = env("SCALE_ENDPOINTS", 10);
    let mut state = scale_state(services, endpoints);
    println!("{services} services x {endpoints} endpoints");
    // SCALE_LAYOUT picks one (0 = mapped, 1 = cascade, 2 = upstream's vmap, 3 = direct).
    let picked: Vec<DispatchLayout> = match std::env::var("SCALE_LAYOUT")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        Some(i) => vec![LAYOUTS[i.min(3)]],
        None => LAYOUTS[..4].to_vec(),
    };
    for layout in &picked {
        let layout = *layout;
        let cfg = RenderConfig {
            dispatch: layout,
            ..RenderConfig::default()
        };
        let rs = render(&intent_of(&state), &cfg);
        let full = full_transaction(&rs);
        let ns = Netns::new();
        let load = ns.nft_f(&full.text).unwrap();
        let reload = ns.nft_f(&full.text).unwrap();
        // One-endpoint changes, alternating back and forth.
        let mut prev = rs.clone();
        let mut partial_times = Vec::new();
        let mut partial_bytes = 0;
        for _ in 0..4 {
            toggle_first_endpoint(&mut state, 97);
            let next = render(&intent_of(&state), &cfg);
            let tx = partial_transaction(&prev, &next).unwrap();
            partial_bytes = tx.text.len();
            if let Ok(dir) = std::env::var("SCALE_DUMP") {
                std::fs::write(format!("{dir}/full.nft"), &full.text).unwrap();
                std::fs::write(format!("{dir}/change.nft"), &tx.text).unwrap();
            }
            partial_times.push(ns.nft_f(&tx.text).unwrap());
            prev = next;
        }
        partial_times.sort();
        drop(ns);
        // Cold sync in chunks of 500 services.
        let ns = Netns::new();
        let chunks = chunked_full(&prev, 500).unwrap();
        let mut chunk_times = Vec::new();
        for c in &chunks {
            chunk_times.push(ns.nft_f(&c.text).unwrap());
        }
        let total: Duration = chunk_times.iter().sum();
        let longest = chunk_times.iter().max().copied().unwrap_or_default();
        println!(
            "{layout:?}: full load {} ({} lines, {} bytes); full reload onto the existing table {}; \
             one-endpoint change median {} ({partial_bytes} bytes); chunked cold sync {} chunks, total {}, longest {}",
            secs(load),
            full.text.lines().count(),
            full.text.len(),
            secs(reload),
            secs(partial_times[partial_times.len() / 2]),
            chunks.len(),
            secs(total),
            secs(longest),
        );
    }
}
