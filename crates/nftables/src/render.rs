//! Intent → desired table. Deterministic: the intent is ordered (BTreeMap) and so is everything built from
//! it, so the same intent always renders the same [`Ruleset`] and, from it, byte-identical transactions.

use svcproxy_model::Intent;

use crate::config::RenderConfig;
use crate::incremental::render_table;
use crate::ruleset::Ruleset;

/// The complete table for `intent`. Service ports whose cluster IP is of the other family are skipped: each
/// family has its own table and intent.
pub fn render(intent: &Intent, cfg: &RenderConfig) -> Ruleset {
    // Rendered Service by Service, as an update re-renders them, so both build the same table.
    render_table(intent, cfg).ruleset
}
