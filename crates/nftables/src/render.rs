//! Intent → desired table. Deterministic: the intent is ordered (BTreeMap) and so is everything built from
//! it, so the same intent always renders the same [`Ruleset`] and, from it, byte-identical transactions.

use svcproxy_model::{Intent, IpFamily};

use crate::config::RenderConfig;
use crate::fixed::fixed_ruleset;
use crate::ruleset::Ruleset;
use crate::service_port::add_service_port;

/// The complete table for `intent`. Service ports whose cluster IP is of the other family are skipped: each
/// family has its own table and intent.
pub fn render(intent: &Intent, cfg: &RenderConfig) -> Ruleset {
    let mut rs = fixed_ruleset(cfg);
    for spi in intent.service_ports.values() {
        if IpFamily::of(&spi.cluster_ip) != cfg.family {
            continue;
        }
        add_service_port(&mut rs, spi, cfg);
    }
    rs
}
