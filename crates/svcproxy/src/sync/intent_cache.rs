//! The intent of the last sync, kept so the next one rebuilds only the Services that changed.

use std::sync::Arc;

use svcproxy_model::intent::build_intent;
use svcproxy_model::{ClusterState, Intent, IntentChanges, IntentConfig, SliceIndex, update_intent};

pub struct IntentCache {
    config: IntentConfig,
    last: Option<Arc<Intent>>,
    /// Follows the slices of the state `last` was built from.
    slices: SliceIndex,
}

impl IntentCache {
    pub fn new(config: IntentConfig) -> Self {
        IntentCache {
            config,
            last: None,
            slices: SliceIndex::default(),
        }
    }

    /// The intent for `state`; `changes` must name everything that changed since the previous call.
    pub fn next(&mut self, state: &ClusterState, changes: &IntentChanges) -> Arc<Intent> {
        let intent = match &self.last {
            Some(prev) => update_intent(prev, state, &mut self.slices, &self.config, changes),
            None => {
                self.slices = SliceIndex::of_state(state);
                build_intent(state, &self.config)
            }
        };
        let intent = Arc::new(intent);
        self.last = Some(intent.clone());
        intent
    }
}
