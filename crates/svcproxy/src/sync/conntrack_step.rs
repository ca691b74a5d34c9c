//! The conntrack reconciliation that follows a successful sync, the same for both backends.

use std::net::IpAddr;

use imbl::ordmap::DiffItem;
use svcproxy_conntrack::{Conntrack, clean_stale_flows};
use svcproxy_model::{Intent, IpFamily, Protocol, ServicePortName};

use super::proxier::ConntrackRun;

/// Deletes the conntrack entries that would keep datagrams going to endpoints that are gone (or keep them
/// un-NATed from while the service had none). Runs only when a UDP or SCTP service port changed, since it
/// lists the whole table. A failure is reported, not fatal: the rules are right either way.
/// `node_ips` are the addresses NodePorts answer on.
pub fn reconcile(
    conntrack: &dyn Conntrack,
    family: IpFamily,
    previous: Option<&Intent>,
    current: &Intent,
    node_ips: &[IpAddr],
) -> Option<ConntrackRun> {
    if let Some(previous) = previous
        && !datagram_ports_changed(previous, current)
    {
        return None;
    }
    let started = std::time::Instant::now();
    match clean_stale_flows(conntrack, family, previous, current, node_ips) {
        Ok(report) => {
            if report.deleted > 0 {
                tracing::info!(
                    listed = report.listed,
                    deleted = report.deleted,
                    "deleted stale conntrack entries"
                );
            }
            Some(ConntrackRun {
                seconds: started.elapsed().as_secs_f64(),
                deleted: report.deleted,
            })
        }
        Err(e) => {
            tracing::warn!("conntrack cleanup failed: {e}");
            None
        }
    }
}

/// Whether any UDP or SCTP service port differs between two intents (added, removed or changed).
fn datagram_ports_changed(previous: &Intent, current: &Intent) -> bool {
    // The intents share the tree of their unchanged ports, which the diff skips.
    previous.service_ports.diff(&current.service_ports).any(|item| {
        let name: &ServicePortName = match item {
            DiffItem::Add(k, _) | DiffItem::Remove(k, _) => k,
            DiffItem::Update { new: (k, _), .. } => k,
        };
        name.protocol != Protocol::Tcp
    })
}
