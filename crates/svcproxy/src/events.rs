//! Kubernetes Events, as kube-proxy records them: `Starting` on the Node when the proxy starts, and
//! `FailedToStartServiceHealthcheck` on a Service whose health-check node port cannot be opened. Operators
//! look for both in `kubectl get events` / `kubectl describe`; the log says the same, but only on the node.

use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use svcproxy_model::ObjectName;

/// Something worth an Event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyEvent {
    /// The proxy started on `node`.
    Starting { node: String },
    /// A Service's health-check node port could not be opened.
    HealthCheckFailed {
        node: String,
        service: ObjectName,
        port: u16,
        error: String,
    },
}

impl ProxyEvent {
    /// The Event's type, reason, action and note, and the object it regards, with upstream's wording.
    fn render(&self) -> (Event, ObjectReference) {
        match self {
            ProxyEvent::Starting { node } => (
                Event {
                    type_: EventType::Normal,
                    reason: "Starting".into(),
                    note: None,
                    action: "StartKubeProxy".into(),
                    secondary: None,
                },
                // Upstream names the Node by its name in the UID field too: the proxy never reads the
                // Node's real UID before it announces itself.
                ObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Node".into()),
                    name: Some(node.clone()),
                    uid: Some(node.clone()),
                    ..Default::default()
                },
            ),
            ProxyEvent::HealthCheckFailed {
                node,
                service,
                port,
                error,
            } => (
                Event {
                    type_: EventType::Warning,
                    reason: "FailedToStartServiceHealthcheck".into(),
                    note: Some(format!(
                        "node {node} failed to start healthcheck \"{service}\" on port {port}: {error}"
                    )),
                    action: "Listen".into(),
                    secondary: None,
                },
                ObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Service".into()),
                    namespace: Some(service.namespace.to_string()),
                    name: Some(service.name.to_string()),
                    ..Default::default()
                },
            ),
        }
    }
}

/// Where Events go.
pub trait EventSink: Send + Sync {
    /// Records `event` without waiting for it: an Event is worth a try, never a stalled sync.
    fn publish(&self, event: ProxyEvent);
}

/// Events through the API server (events.k8s.io/v1), reported by `svcproxy` on this node.
pub struct KubeEvents {
    recorder: Recorder,
}

impl KubeEvents {
    pub fn new(client: Client, node: &str) -> Self {
        let reporter = Reporter {
            controller: "svcproxy".into(),
            instance: Some(node.to_string()),
        };
        KubeEvents {
            recorder: Recorder::new(client, reporter),
        }
    }
}

impl EventSink for KubeEvents {
    fn publish(&self, event: ProxyEvent) {
        let recorder = self.recorder.clone();
        tokio::spawn(async move {
            let (ev, regarding) = event.render();
            if let Err(e) = recorder.publish(&ev, &regarding).await {
                tracing::warn!(reason = %ev.reason, "cannot record an Event: {e}");
            }
        });
    }
}

/// No API server (manifest mode, or a test): nothing to record to.
pub struct NoEvents;

impl EventSink for NoEvents {
    fn publish(&self, _: ProxyEvent) {}
}

/// Keeps what it is given, for tests.
#[derive(Default, Clone)]
pub struct RecordingEvents(pub Arc<Mutex<Vec<ProxyEvent>>>);

impl EventSink for RecordingEvents {
    fn publish(&self, event: ProxyEvent) {
        self.0.lock().unwrap().push(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_carry_upstreams_reasons_and_regard_their_object() {
        let (ev, regarding) = ProxyEvent::Starting {
            node: "node-a".into(),
        }
        .render();
        assert_eq!(
            (ev.type_, ev.reason.as_str(), ev.action.as_str()),
            (EventType::Normal, "Starting", "StartKubeProxy")
        );
        assert_eq!(regarding.kind.as_deref(), Some("Node"));
        assert_eq!(regarding.name.as_deref(), Some("node-a"));

        let (ev, regarding) = ProxyEvent::HealthCheckFailed {
            node: "node-a".into(),
            service: ObjectName::new("demo", "web"),
            port: 30400,
            error: "Address in use".into(),
        }
        .render();
        assert_eq!(ev.type_, EventType::Warning);
        assert_eq!(ev.reason, "FailedToStartServiceHealthcheck");
        assert_eq!(
            ev.note.as_deref(),
            Some("node node-a failed to start healthcheck \"demo/web\" on port 30400: Address in use")
        );
        assert_eq!(
            (regarding.namespace.as_deref(), regarding.name.as_deref()),
            (Some("demo"), Some("web"))
        );
    }
}
