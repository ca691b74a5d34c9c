//! Intent → desired table. Deterministic: the intent is ordered (BTreeMap) and so is everything built from
//! it, so the same intent always renders the same [`Ruleset`] and, from it, byte-identical transactions.

use svcproxy_model::Intent;

use crate::config::RenderConfig;
use crate::incremental::{render_table, render_table_after};
use crate::ruleset::Ruleset;
use crate::slots::Slots;

/// The complete table for `intent`. Service ports whose cluster IP is of the other family are skipped: each
/// family has its own table and intent.
pub fn render(intent: &Intent, cfg: &RenderConfig) -> Ruleset {
    // Rendered Service by Service, as an update re-renders them, so both build the same table.
    render_table(intent, cfg).ruleset
}

/// The complete table for `intent`, keeping the endpoint-map slots `prior` holds (see [`crate::slots`]): what
/// to compare with a table read back from the kernel, whose slots are `Slots::of_ruleset(&read_back)`.
pub fn render_after(intent: &Intent, cfg: &RenderConfig, prior: &Slots) -> Ruleset {
    render_table_after(intent, cfg, prior).ruleset
}
