use serde_json::Value;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SelectorError {
    #[error("unable to parse requirement {0:?}")]
    BadRequirement(String),
    #[error("field label not supported: {0}")]
    UnsupportedField(String),
}

/// One term of a label selector, with the apiserver's semantics: the
/// negative forms also match objects that lack the label.
#[derive(Debug, PartialEq, Eq)]
enum Requirement {
    Exists(String),
    NotExists(String),
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

/// A parsed `labelSelector`; all terms must hold.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<Requirement>);

impl LabelSelector {
    pub fn parse(text: &str) -> Result<LabelSelector, SelectorError> {
        split_terms(text)
            .into_iter()
            .map(parse_requirement)
            .collect::<Result<_, _>>()
            .map(LabelSelector)
    }

    pub fn matches(&self, object: &Value) -> bool {
        let labels = object.pointer("/metadata/labels");
        let label = |key: &str| labels.and_then(|labels| labels.get(key)).and_then(Value::as_str);
        self.0.iter().all(|requirement| match requirement {
            Requirement::Exists(key) => label(key).is_some(),
            Requirement::NotExists(key) => label(key).is_none(),
            Requirement::Equals(key, value) => label(key) == Some(value),
            Requirement::NotEquals(key, value) => label(key) != Some(value),
            Requirement::In(key, values) => label(key).is_some_and(|v| values.iter().any(|x| x == v)),
            Requirement::NotIn(key, values) => !label(key).is_some_and(|v| values.iter().any(|x| x == v)),
        })
    }
}

/// Splits on the commas that separate terms, not those inside `in (a,b)`.
fn split_terms(text: &str) -> Vec<&str> {
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0usize, 0);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                terms.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&text[start..]);
    terms
        .into_iter()
        .map(str::trim)
        .filter(|term| !term.is_empty())
        .collect()
}

fn parse_requirement(term: &str) -> Result<Requirement, SelectorError> {
    let bad = || SelectorError::BadRequirement(term.to_owned());
    let key = |key: &str| {
        let key = key.trim();
        let valid = !key.is_empty()
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
        if valid { Ok(key.to_owned()) } else { Err(bad()) }
    };
    if let Some(rest) = term.strip_prefix('!') {
        return Ok(Requirement::NotExists(key(rest)?));
    }
    if let Some((lhs, values)) = term.split_once('(') {
        let values = values.strip_suffix(')').ok_or_else(bad)?;
        let values = values.split(',').map(|v| v.trim().to_owned()).collect();
        let mut words = lhs.split_whitespace();
        let (name, operator) = (words.next().ok_or_else(bad)?, words.next().ok_or_else(bad)?);
        if words.next().is_some() {
            return Err(bad());
        }
        return match operator {
            "in" => Ok(Requirement::In(key(name)?, values)),
            "notin" => Ok(Requirement::NotIn(key(name)?, values)),
            _ => Err(bad()),
        };
    }
    if let Some((name, value)) = term.split_once("!=") {
        return Ok(Requirement::NotEquals(key(name)?, value.trim().to_owned()));
    }
    if let Some((name, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
        return Ok(Requirement::Equals(key(name)?, value.trim().to_owned()));
    }
    Ok(Requirement::Exists(key(term)?))
}

#[derive(Debug, PartialEq, Eq)]
enum Field {
    Name,
    Namespace,
}

/// A parsed `fieldSelector`, limited to the fields every resource supports.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<(Field, bool, String)>);

impl FieldSelector {
    pub fn parse(text: &str) -> Result<FieldSelector, SelectorError> {
        split_terms(text)
            .into_iter()
            .map(|term| {
                let (name, equal, value) = if let Some((name, value)) = term.split_once("!=") {
                    (name, false, value)
                } else if let Some((name, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
                    (name, true, value)
                } else {
                    return Err(SelectorError::BadRequirement(term.to_owned()));
                };
                let field = match name.trim() {
                    "metadata.name" => Field::Name,
                    "metadata.namespace" => Field::Namespace,
                    other => return Err(SelectorError::UnsupportedField(other.to_owned())),
                };
                Ok((field, equal, value.trim().to_owned()))
            })
            .collect::<Result<_, _>>()
            .map(FieldSelector)
    }

    pub fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|(field, equal, value)| {
            let pointer = match field {
                Field::Name => "/metadata/name",
                Field::Namespace => "/metadata/namespace",
            };
            let actual = object.pointer(pointer).and_then(Value::as_str).unwrap_or("");
            (actual == value) == *equal
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{FieldSelector, LabelSelector, SelectorError};

    fn labelled(labels: serde_json::Value) -> serde_json::Value {
        json!({"metadata": {"name": "web", "namespace": "prod", "labels": labels}})
    }

    #[test]
    fn label_selector_forms() {
        let object = labelled(json!({"app": "web", "tier": "front"}));
        let matches = |selector: &str| LabelSelector::parse(selector).unwrap().matches(&object);
        assert!(matches(""));
        assert!(matches("app"));
        assert!(!matches("!app"));
        assert!(matches("!missing"));
        assert!(matches("app=web"));
        assert!(matches("app==web"));
        assert!(!matches("app=db"));
        assert!(matches("app!=db"));
        assert!(matches("missing!=x"));
        assert!(matches("app in (db, web)"));
        assert!(!matches("app notin (db,web)"));
        assert!(matches("missing notin (x)"));
        assert!(matches("app=web, tier in (front,back),!missing"));
        assert!(!matches("app=web,tier=back"));
    }

    #[test]
    fn proxy_style_selector_on_unlabelled_object() {
        let selector =
            LabelSelector::parse("!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name")
                .unwrap();
        assert!(selector.matches(&json!({"metadata": {"name": "x"}})));
        assert!(!selector.matches(&labelled(json!({"service.kubernetes.io/headless": ""}))));
    }

    #[test]
    fn bad_label_selectors_are_rejected() {
        assert!(LabelSelector::parse("app in db").is_err());
        assert!(LabelSelector::parse("a b").is_err());
        assert!(LabelSelector::parse("=x").is_err());
    }

    #[test]
    fn field_selectors() {
        let object = labelled(json!({}));
        let matches = |selector: &str| FieldSelector::parse(selector).unwrap().matches(&object);
        assert!(matches("metadata.name=web"));
        assert!(matches("metadata.name==web,metadata.namespace=prod"));
        assert!(!matches("metadata.namespace!=prod"));
        assert_eq!(
            FieldSelector::parse("spec.nodeName=x"),
            Err(SelectorError::UnsupportedField("spec.nodeName".to_owned()))
        );
    }
}
