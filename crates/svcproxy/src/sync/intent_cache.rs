//! The intent of the last sync, kept so the next one rebuilds only the Services that changed.

use std::sync::Arc;

use svcproxy_model::intent::build_intent;
use svcproxy_model::{ClusterState, Intent, IntentChanges, IntentConfig, update_intent};

pub struct IntentCache {
    config: IntentConfig,
    last: Option<Arc<Intent>>,
}

impl IntentCache {
    pub fn new(config: IntentConfig) -> Self {
        IntentCache { config, last: None }
    }

    /// The intent for `state`; `changes` must name everything that changed since the previous call.
    pub fn next(&mut self, state: &ClusterState, changes: &IntentChanges) -> Arc<Intent> {
        let intent = match &self.last {
            Some(prev) => update_intent(prev, state, &self.config, changes),
            None => build_intent(state, &self.config),
        };
        let intent = Arc::new(intent);
        self.last = Some(intent.clone());
        intent
    }
}
