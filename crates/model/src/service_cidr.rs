use ipnet::IpNet;
use serde::Serialize;

use crate::{IpFamily, ObjectName};

/// A ServiceCIDR (`networking.k8s.io/v1`): a range the API server allocates ClusterIPs from. Cluster-scoped,
/// so its name has an empty namespace.
///
/// nftables mode drops new connections to an address in these ranges that is no Service's ClusterIP, so a
/// client of a deleted Service fails at once instead of its packets leaving by the default route (where,
/// on some networks, something else owns that address).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceCidr {
    pub name: ObjectName,
    /// At most one per family, as the API allows; canonical (no host bits).
    pub cidrs: Vec<IpNet>,
}

impl ServiceCidr {
    /// The ranges of one family.
    pub fn cidrs_of(&self, family: IpFamily) -> impl Iterator<Item = IpNet> + '_ {
        self.cidrs
            .iter()
            .copied()
            .filter(move |c| family.contains(&c.addr()))
    }
}
