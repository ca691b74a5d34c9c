//! One cleanup run: list the family's table, pick the stale flows, delete them.

use std::net::IpAddr;

use svcproxy_model::conntrack_plan::{stale_flows, stale_flows_since};
use svcproxy_model::{Intent, IpFamily};

use crate::{Conntrack, ConntrackError};

/// What one run found and did, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CleanupReport {
    /// Entries in the family's table.
    pub listed: usize,
    /// Entries the plan selected.
    pub stale: usize,
    /// Entries the kernel deleted; fewer than `stale` when some expired in between.
    pub deleted: usize,
}

/// Deletes every stale UDP/SCTP flow of `family` after `current` was applied. Pass the intent applied
/// before it as `previous` when known, so flows to service ports that disappeared are released too.
/// `node_ips` are the addresses NodePorts answer on, of this family.
pub fn clean_stale_flows(
    conntrack: &dyn Conntrack,
    family: IpFamily,
    previous: Option<&Intent>,
    current: &Intent,
    node_ips: &[IpAddr],
) -> Result<CleanupReport, ConntrackError> {
    let entries = conntrack.list(family)?;
    let stale = match previous {
        Some(previous) => stale_flows_since(&entries, previous, current, node_ips),
        None => stale_flows(&entries, current, node_ips),
    };
    let deleted = if stale.is_empty() {
        0
    } else {
        conntrack.delete(&stale)?
    };
    Ok(CleanupReport {
        listed: entries.len(),
        stale: stale.len(),
        deleted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RecordingConntrack;
    use svcproxy_model::conntrack_plan::{FlowEntry, FlowProtocol, FlowTuple};

    fn flow(dst: &str, target: &str) -> FlowEntry {
        let client = "10.0.0.1:40000".parse().unwrap();
        FlowEntry::new(
            FlowProtocol::Udp,
            FlowTuple::new(client, dst.parse().unwrap()),
            FlowTuple::new(target.parse().unwrap(), client),
        )
    }

    #[test]
    fn lists_plans_and_deletes() {
        // An empty intent has no frontends, so only the previous intent can make a flow stale; a non-service
        // flow is never touched.
        let unrelated = flow("8.8.8.8:53", "8.8.8.8:53");
        let ct = RecordingConntrack::new([unrelated]);
        let report = clean_stale_flows(&ct, IpFamily::V4, None, &Intent::default(), &[]).unwrap();
        assert_eq!(
            report,
            CleanupReport {
                listed: 1,
                stale: 0,
                deleted: 0
            }
        );
        assert!(ct.deleted().is_empty(), "nothing stale, no delete call");
        assert_eq!(ct.lists(), [IpFamily::V4]);
    }

    #[test]
    fn list_failure_is_reported() {
        let ct = RecordingConntrack::new([]);
        ct.set_failing(true);
        assert!(clean_stale_flows(&ct, IpFamily::V6, None, &Intent::default(), &[]).is_err());
    }
}
