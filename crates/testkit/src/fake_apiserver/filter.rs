use serde_json::Value;

use super::resource::{Resource, Target};
use super::selector::{FieldSelector, LabelSelector, SelectorError};

/// Which objects a list or watch request covers: one resource type,
/// optionally one namespace, and the request's selectors.
#[derive(Debug)]
pub(crate) struct Filter {
    pub resource: &'static Resource,
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Filter {
    pub fn new(
        target: &Target,
        label_selector: Option<&str>,
        field_selector: Option<&str>,
    ) -> Result<Filter, SelectorError> {
        Ok(Filter {
            resource: target.resource,
            namespace: target.namespace.clone(),
            labels: LabelSelector::parse(label_selector.unwrap_or(""))?,
            fields: FieldSelector::parse(field_selector.unwrap_or(""))?,
        })
    }

    /// Whether an object of this filter's resource type is selected.
    pub fn matches(&self, object: &Value) -> bool {
        let in_namespace = self.namespace.as_deref().is_none_or(|namespace| {
            object.pointer("/metadata/namespace").and_then(Value::as_str) == Some(namespace)
        });
        in_namespace && self.labels.matches(object) && self.fields.matches(object)
    }
}
