use std::fmt;

use serde::Serialize;

use crate::{ObjectName, Protocol};

/// One port of one Service: the unit svcproxy programs.
///
/// Displayed as upstream prints it: `namespace/name:port`, or `namespace/name` for an unnamed port (no trailing
/// colon). That string is both the rule comment and the start of the chain-name hash input, so its exact form
/// matters for compatibility.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ServicePortName {
    pub service: ObjectName,
    pub port: String,
    pub protocol: Protocol,
}

impl ServicePortName {
    pub fn new(service: ObjectName, port: impl Into<String>, protocol: Protocol) -> Self {
        ServicePortName {
            service,
            port: port.into(),
            protocol,
        }
    }
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.port.is_empty() {
            write!(f, "{}", self.service)
        } else {
            write!(f, "{}:{}", self.service, self.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unnamed_port_has_no_trailing_colon() {
        let n = ServicePortName::new(ObjectName::new("ns", "svc"), "", Protocol::Tcp);
        assert_eq!(n.to_string(), "ns/svc");
        let n = ServicePortName::new(ObjectName::new("ns", "svc"), "http", Protocol::Tcp);
        assert_eq!(n.to_string(), "ns/svc:http");
    }
}
