//! Periodic read-backs on a real kernel, in both modes: while nothing has committed since a read-back found
//! the rules right they read nothing, and any change made behind svcproxy's back (a commit) is still found
//! and repaired by the next one.

#[macro_use]
mod common;

use std::time::Duration;

use common::{Svcproxy, WebLab};
use svcproxy_testkit::{NetNs, tcp_request, wait_until};

const WAIT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(100);
const T: Duration = Duration::from_secs(2);
const SKIPPED: &str = "periodic read-back skipped";

/// Empties a chain of our only service, as another program could: one commit. The canary, which watches an
/// entry chain, does not see it; only a read-back does. (An endpoint chain in iptables mode; in nftables mode
/// the service's chain, whose DNAT picks from a map, there being no endpoint chains.)
fn flush_service_chain(node: &NetNs, mode: &str) {
    match mode {
        "iptables" => {
            let listing = node.exec_stdout(&["iptables", "-t", "nat", "-S"]).expect("list");
            let chain = listing
                .lines()
                .filter_map(|l| l.strip_prefix("-N "))
                .find(|c| c.starts_with("KUBE-SEP-"))
                .unwrap_or_else(|| panic!("no endpoint chain in\n{listing}"))
                .to_string();
            node.exec(&["iptables", "-t", "nat", "-F", &chain])
                .expect("flush");
        }
        _ => {
            let listing = node
                .exec_stdout(&["nft", "list", "table", "ip", "svcproxy"])
                .expect("list");
            let chain = listing
                .lines()
                .filter_map(|l| l.trim().strip_prefix("chain "))
                .map(|l| l.trim_end_matches(" {").trim())
                .find(|c| c.starts_with("service-") && c.contains('/'))
                .unwrap_or_else(|| panic!("no service chain in\n{listing}"))
                .to_string();
            node.exec(&["nft", "flush", "chain", "ip", "svcproxy", &chain])
                .expect("flush");
        }
    }
}

fn read_backs_skip_until_a_commit(mode: &str) {
    let web = WebLab::new();
    let (lab, client, vip) = (&web.lab, &web.client, web.vip());
    let mut proxy = Svcproxy::start_with_env(
        lab.node(),
        &[
            "--manifests",
            web.manifests(),
            "--proxy-mode",
            mode,
            "--verify-period",
            "1s",
        ],
        &[("RUST_LOG", "info,svcproxy::sync=debug")],
    );
    wait_until(WAIT, POLL, "the ClusterIP answers", || {
        proxy.assert_running();
        tcp_request(client.ns(), vip, T).ok()
    });
    // Nobody commits: the periodic read-backs find the generation where the read after the sync left it.
    wait_until(WAIT, POLL, "periodic read-backs skipped", || {
        proxy.assert_running();
        (proxy.log().matches(SKIPPED).count() >= 2).then_some(())
    });

    flush_service_chain(lab.node(), mode);
    let log = wait_until(WAIT, POLL, "the change found and repaired", || {
        proxy.assert_running();
        let log = proxy.log();
        log.contains("divergence repaired").then_some(log)
    });
    assert!(log.contains("diverges"), "{log}");
    wait_until(WAIT, POLL, "the ClusterIP answers again", || {
        tcp_request(client.ns(), vip, T).ok()
    });
    // Verified again by the read after the repair: skipping resumes.
    let skipped = log.matches(SKIPPED).count();
    wait_until(WAIT, POLL, "periodic read-backs skipped again", || {
        proxy.assert_running();
        (proxy.log().matches(SKIPPED).count() >= skipped + 2).then_some(())
    });
}

#[test]
fn iptables_read_backs_skip_the_dump_until_a_commit_and_still_catch_a_change() {
    read_backs_skip_until_a_commit("iptables");
}

#[test]
fn nftables_read_backs_skip_the_listing_until_a_commit_and_still_catch_a_change() {
    read_backs_skip_until_a_commit("nftables");
}
