//! Health-check node ports: for each LoadBalancer Service with externalTrafficPolicy Local, an HTTP server on
//! its `healthCheckNodePort` that tells the cloud load balancer whether this node has a ready endpoint of it.
//! Listeners follow the applied intent: they open when a Service gains a port and close when it goes. They
//! listen where NodePorts answer, as upstream's do: on every address, or with `--nodeport-addresses` (and
//! nftables mode's `primary` default) on those addresses alone.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use svcproxy_model::intent::HealthCheck;
use svcproxy_model::{IpFamily, ObjectName};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::events::{EventSink, NoEvents, ProxyEvent};
use crate::health::ProxyHealth;
use crate::metrics::Metrics;
use crate::sync::engine::EngineStatus;

#[derive(Clone)]
struct ListenerState {
    service: ObjectName,
    local_endpoints: Arc<AtomicUsize>,
    health: Arc<ProxyHealth>,
}

struct Listener {
    port: u16,
    /// The addresses it listens on.
    addresses: Vec<IpAddr>,
    local_endpoints: Arc<AtomicUsize>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn answer(State(s): State<ListenerState>) -> Response {
    let count = s.local_endpoints.load(Ordering::Relaxed);
    let healthy = s.health.status().healthy;
    let status = if count > 0 && healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    // Upstream's body, tab-indented, so tooling that parses it keeps working.
    let body = format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {:?},\n\t\t\"name\": {:?}\n\t}},\n\t\"localEndpoints\": {count},\n\t\"serviceProxyHealthy\": {healthy}\n}}",
        s.service.namespace, s.service.name
    );
    let mut r = (status, body).into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut()
        .insert("X-Content-Type-Options", HeaderValue::from_static("nosniff"));
    // Newer kube-proxy releases send the count as a weight too: load balancers that weigh nodes by their
    // health checks (Google Cloud's weighted Maglev) then give each node traffic in proportion to its local
    // endpoints instead of equally.
    r.headers_mut()
        .insert("X-Load-Balancing-Endpoint-Weight", HeaderValue::from(count));
    r
}

/// A listener on `addr`; an IPv6 one takes IPv6 only, leaving the IPv4 side of the port to the IPv4 listener.
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(128)?;
    TcpListener::from_std(socket.into())
}

/// Owns the listeners of one IP family. With dual-stack each family's engine has its own, as upstream's
/// proxiers do: the IPv4 listener answers from the IPv4 intent's local endpoints, the IPv6 one (bound IPv6-only,
/// so both can hold the same port) from the IPv6 intent's.
pub struct ServiceHealthServers {
    family: IpFamily,
    /// The family's unspecified address: every address, when NodePorts answer on every address.
    bind_ip: IpAddr,
    health: Arc<ProxyHealth>,
    metrics: Arc<Metrics>,
    listeners: BTreeMap<ObjectName, Listener>,
    events: Arc<dyn EventSink>,
    node: String,
    /// Services whose port could not be opened, reported once until it opens.
    failing: BTreeSet<ObjectName>,
}

impl ServiceHealthServers {
    pub fn new(health: Arc<ProxyHealth>, metrics: Arc<Metrics>) -> Self {
        Self::for_family(IpFamily::V4, health, metrics)
    }

    pub fn for_family(family: IpFamily, health: Arc<ProxyHealth>, metrics: Arc<Metrics>) -> Self {
        ServiceHealthServers {
            family,
            bind_ip: match family {
                IpFamily::V4 => Ipv4Addr::UNSPECIFIED.into(),
                IpFamily::V6 => Ipv6Addr::UNSPECIFIED.into(),
            },
            health,
            metrics,
            listeners: BTreeMap::new(),
            events: Arc::new(NoEvents),
            node: String::new(),
            failing: BTreeSet::new(),
        }
    }

    /// Records a Warning Event, from `node`, on each Service whose port cannot be opened.
    pub fn with_events(mut self, events: Arc<dyn EventSink>, node: &str) -> Self {
        self.events = events;
        self.node = node.to_string();
        self
    }

    /// Brings the listeners in line with `desired`, each listening on `node_port_ips` (`None`: every address;
    /// only those of this family count). A port that cannot be bound is reported and retried on the next
    /// update; it never affects the other listeners.
    pub async fn update(
        &mut self,
        desired: &BTreeMap<ObjectName, HealthCheck>,
        node_port_ips: Option<&[IpAddr]>,
    ) {
        let addresses: Vec<IpAddr> = match node_port_ips {
            None => vec![self.bind_ip],
            Some(ips) => ips
                .iter()
                .copied()
                .filter(|ip| self.family.contains(ip))
                .collect(),
        };
        self.listeners.retain(|name, l| {
            desired.get(name).is_some_and(|hc| hc.node_port == l.port) && l.addresses == addresses
        });
        for (name, hc) in desired {
            if let Some(l) = self.listeners.get(name) {
                l.local_endpoints
                    .store(hc.local_ready_endpoints, Ordering::Relaxed);
                continue;
            }
            let bound: Result<Vec<TcpListener>, (IpAddr, std::io::Error)> = addresses
                .iter()
                .map(|ip| bind(SocketAddr::new(*ip, hc.node_port)).map_err(|e| (*ip, e)))
                .collect();
            match bound {
                Ok(listeners) => {
                    let local_endpoints = Arc::new(AtomicUsize::new(hc.local_ready_endpoints));
                    let state = ListenerState {
                        service: name.clone(),
                        local_endpoints: local_endpoints.clone(),
                        health: self.health.clone(),
                    };
                    let router = Router::new().fallback(answer).with_state(state);
                    let tasks = listeners
                        .into_iter()
                        .map(|listener| {
                            let router = router.clone();
                            tokio::spawn(async move {
                                let _ = axum::serve(listener, router).await;
                            })
                        })
                        .collect();
                    tracing::info!(service = %name, port = hc.node_port, ?addresses, "health-check node port open");
                    self.failing.remove(name);
                    self.listeners.insert(
                        name.clone(),
                        Listener {
                            port: hc.node_port,
                            addresses: addresses.clone(),
                            local_endpoints,
                            tasks,
                        },
                    );
                }
                Err((ip, e)) => {
                    self.metrics.health_check_bind_failures.inc();
                    // Retried after every sync: one Event per failing streak, not one per sync.
                    if self.failing.insert(name.clone()) {
                        self.events.publish(ProxyEvent::HealthCheckFailed {
                            node: self.node.clone(),
                            service: name.clone(),
                            port: hc.node_port,
                            error: e.to_string(),
                        });
                    }
                    tracing::error!(
                        service = %name,
                        port = hc.node_port,
                        "cannot open the health-check node port on {ip}: {e}; retrying after the next sync"
                    );
                }
            }
        }
    }

    /// Follows the engine: every applied intent updates the listeners.
    pub async fn run(mut self, mut status: watch::Receiver<EngineStatus>) {
        loop {
            let (applied, node_port_ips) = {
                let s = status.borrow_and_update();
                (s.applied.clone(), s.node_port_ips.clone())
            };
            if let Some(intent) = applied {
                self.update(&intent.health_checks(), node_port_ips.as_deref())
                    .await;
            }
            if status.changed().await.is_err() {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::RecordingEvents;
    use std::time::Duration;

    #[tokio::test]
    async fn a_port_that_cannot_be_opened_is_one_event_until_it_opens() {
        // Taken by someone else: the listener cannot bind it.
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let events = RecordingEvents::default();
        let mut servers = ServiceHealthServers::new(
            Arc::new(ProxyHealth::new(Duration::from_secs(60))),
            Arc::new(Metrics::new()),
        )
        .with_events(Arc::new(events.clone()), "node-a");
        let desired = BTreeMap::from([(
            ObjectName::new("demo", "web"),
            HealthCheck {
                node_port: port,
                local_ready_endpoints: 1,
            },
        )]);
        let loopback = [IpAddr::from(Ipv4Addr::LOCALHOST)];
        servers.update(&desired, Some(&loopback)).await;
        servers.update(&desired, Some(&loopback)).await;
        let recorded = events.0.lock().unwrap().clone();
        assert_eq!(recorded.len(), 1, "{recorded:?}");
        let ProxyEvent::HealthCheckFailed {
            node,
            service,
            port: p,
            ..
        } = &recorded[0]
        else {
            panic!("{recorded:?}");
        };
        assert_eq!(
            (node.as_str(), service.to_string(), *p),
            ("node-a", "demo/web".to_string(), port)
        );

        // Freed and opened: a later failure is a new streak, reported again.
        drop(taken);
        servers.update(&desired, Some(&loopback)).await;
        assert_eq!(events.0.lock().unwrap().len(), 1);
        assert!(servers.failing.is_empty());
    }

    /// What a load balancer's probe reads: the status line and the headers.
    async fn probe(port: u16) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))
            .await
            .unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.0\r\nHost: lb\r\n\r\n")
            .await
            .unwrap();
        let mut raw = String::new();
        stream.read_to_string(&mut raw).await.unwrap();
        raw.split("\r\n\r\n").next().unwrap().to_ascii_lowercase()
    }

    #[tokio::test]
    async fn the_probe_answer_weighs_the_node_by_its_local_endpoints() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut servers = ServiceHealthServers::new(
            Arc::new(ProxyHealth::new(Duration::from_secs(60))),
            Arc::new(Metrics::new()),
        );
        let loopback = [IpAddr::from(Ipv4Addr::LOCALHOST)];
        let with = |local_ready_endpoints| {
            BTreeMap::from([(
                ObjectName::new("demo", "web"),
                HealthCheck {
                    node_port: port,
                    local_ready_endpoints,
                },
            )])
        };
        servers.update(&with(3), Some(&loopback)).await;
        let head = probe(port).await;
        assert!(head.starts_with("http/1.0 200"), "{head}");
        assert!(
            head.contains("\r\nx-load-balancing-endpoint-weight: 3\r\n"),
            "{head}"
        );

        servers.update(&with(0), Some(&loopback)).await;
        let head = probe(port).await;
        assert!(head.starts_with("http/1.0 503"), "{head}");
        assert!(
            head.contains("\r\nx-load-balancing-endpoint-weight: 0\r\n"),
            "{head}"
        );
    }
}
