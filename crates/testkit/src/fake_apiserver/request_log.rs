/// One request as the fake API server received it, for assertions about what
/// a client asked for (selectors, resource versions, relists).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggedRequest {
    pub method: String,
    pub path: String,
    /// The raw, still percent-encoded query string.
    pub query: String,
    /// The decoded query parameters, in order.
    pub params: Vec<(String, String)>,
}

impl LoggedRequest {
    /// The first value of a query parameter.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    pub fn is_watch(&self) -> bool {
        matches!(self.param("watch"), Some("true" | "1"))
    }

    /// A collection read that is not a watch: what a (re)list looks like.
    pub fn is_list_of(&self, path: &str) -> bool {
        self.method == "GET" && self.path == path && !self.is_watch()
    }
}
