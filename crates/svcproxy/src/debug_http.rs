//! Debug endpoints, served next to `/metrics`: what the daemon has programmed and how the kernel compares.
//!
//! * `/debug/status`: per service port, its addresses, endpoint counts, when it was last programmed and
//!   whether read-back found it as written; the sync state ([`crate::status::StatusReport`]).
//! * `/debug/intent`: the intent of the last successful sync, as JSON.
//! * `/debug/diff`: the kernel against that intent's rendering ([`crate::diff::DiffReport`]).
//! * `/debug/explain?from=IP&to=…&port=…&proto=…&origin=…`: a packet traced through both
//!   ([`crate::explain::ExplainReport`]); `to` is an address (with `port` and `proto`) or
//!   `namespace/service` (with `port` a port name or number, optional for single-port Services).
//!
//! Diff and explain read the backend the daemon runs: every iptables table, or in nftables mode our table
//! `ip svcproxy`.
//!
//! The engine publishes the applied intent but not the Node object or the rendering configuration it synced
//! with, so the rendering here is resolved without the Node: on nodes using `--detect-local-mode=NodeCIDR` or
//! `--nodeport-addresses=primary` it can differ from what the daemon wrote.

use crate::packet_counters::CountingSwitch;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use clap::ValueEnum;
use imbl::ordmap::DiffItem;
use serde::Deserialize;
use svcproxy_model::frontend_claims::contests;
use svcproxy_model::intent::build_intent;
use svcproxy_model::{Intent, IntentConfig, IpFamily};
use tokio::sync::watch;

use crate::backends::Backend;
use crate::cli::{ProxyMode, RunArgs, TraceOrigin};
use crate::diagnosis::{DaemonView, node_hazards};
use crate::diff;
use crate::exec::runner::SystemRunner;
use crate::explain::{self, Expected, ExplainInput, KernelRead, ToSpec};
use crate::node_addresses::{LocalAddresses, SystemAddresses};
use crate::status::{ContestedFrontend, EndpointCounts, ServicePortStatus, StatusReport};
use crate::sync::engine::EngineStatus;
use crate::sync::iptables_proxier::{OptionsError, ProxierOptions};

/// What the engine's status notifications tell over time, which no single status says: when each service
/// port was last written, when the last sync and the last read-back happened.
#[derive(Debug, Default)]
struct Tracking {
    syncs: u64,
    /// Service port → (content hash, when a sync last wrote that content).
    programmed: HashMap<String, (u64, String)>,
    /// The intent those times were taken from: the next one is compared with it by shared structure, so
    /// following a sync costs what it changed.
    seen: Option<Arc<Intent>>,
    last_sync: Option<String>,
    last_check: Option<String>,
}

impl Tracking {
    /// Every notification is a sync (the count moved) or a read-back (the engine publishes its findings,
    /// even none, after each check).
    fn observe(&mut self, s: &EngineStatus, now: &str) {
        if s.syncs == self.syncs {
            self.last_check = Some(now.to_string());
            return;
        }
        self.syncs = s.syncs;
        if s.last_error.is_some() {
            return;
        }
        self.last_sync = Some(now.to_string());
        if let Some(applied) = &s.applied {
            let none = Intent::default();
            let seen = self.seen.as_deref().unwrap_or(&none);
            for item in seen.service_ports.diff(&applied.service_ports) {
                match item {
                    DiffItem::Remove(name, _) => {
                        self.programmed.remove(&name.to_string());
                    }
                    DiffItem::Add(name, spi) | DiffItem::Update { new: (name, spi), .. } => {
                        let name = name.to_string();
                        if self.programmed.get(&name).map(|p| p.0) != Some(spi.content_hash) {
                            self.programmed.insert(name, (spi.content_hash, now.to_string()));
                        }
                    }
                }
            }
            self.seen = Some(applied.clone());
        }
    }
}

struct Inner {
    node: String,
    /// The backend the daemon writes, which diff and explain read.
    proxy_mode: ProxyMode,
    backend: Backend,
    options: ProxierOptions,
    counting: CountingSwitch,
    status: OnceLock<watch::Receiver<EngineStatus>>,
    tracking: Mutex<Tracking>,
    /// One kernel read at a time: `diff` and `explain` each read the whole ruleset (seconds of CPU at
    /// thousands of Services), and the metrics address they are served on is often reachable from pods.
    kernel_reads: tokio::sync::Semaphore,
}

/// The state behind the debug endpoints. Created before the engine (the metrics server starts first) and
/// attached to the engine's status once it exists.
#[derive(Clone)]
pub struct DebugState(Arc<Inner>);

fn now() -> String {
    let t = jiff::Timestamp::now();
    jiff::Timestamp::from_second(t.as_second())
        .unwrap_or(t)
        .to_string()
}

impl DebugState {
    /// `backend`: the iptables backend the daemon writes (ignored in nftables mode); `counting`: whether
    /// the IPv4 engine's rules count into kube-proxy's nfacct objects, now.
    pub fn new(
        args: &RunArgs,
        node: &str,
        backend: Backend,
        counting: CountingSwitch,
    ) -> Result<Self, OptionsError> {
        let options = ProxierOptions::from_args(args, svcproxy_model::IpFamily::V4)?;
        Ok(DebugState(Arc::new(Inner {
            counting,
            node: node.to_string(),
            proxy_mode: args.proxy_mode,
            backend,
            options,
            status: OnceLock::new(),
            tracking: Mutex::new(Tracking::default()),
            kernel_reads: tokio::sync::Semaphore::new(1),
        })))
    }

    /// Follows the engine's status from now on. Needs a Tokio runtime.
    pub fn attach(&self, status: watch::Receiver<EngineStatus>) {
        if self.0.status.set(status.clone()).is_err() {
            return;
        }
        let inner = self.0.clone();
        let mut rx = status;
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let s = rx.borrow_and_update().clone();
                if let Ok(mut t) = inner.tracking.lock() {
                    t.observe(&s, &now());
                }
            }
        });
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route("/debug/status", get(status))
            .route("/debug/intent", get(intent))
            .route("/debug/diff", get(diff_handler))
            .route("/debug/explain", get(explain_handler))
            .with_state(self.clone())
    }

    fn current(&self) -> EngineStatus {
        self.0
            .status
            .get()
            .map(|rx| rx.borrow().clone())
            .unwrap_or_default()
    }

    fn applied(&self) -> Result<Arc<Intent>, Failure> {
        self.current().applied.ok_or_else(|| {
            Failure(
                StatusCode::SERVICE_UNAVAILABLE,
                "svcproxy has not completed a sync yet".into(),
            )
        })
    }

    /// The daemon's options as its IPv4 engine renders with them now.
    fn options(&self) -> ProxierOptions {
        let mut options = self.0.options.clone();
        options.base.packet_counters = self.0.counting.is_on();
        options
    }

    fn expected(&self, intent: Arc<Intent>) -> Expected {
        let config = self.options().resolve(None, &SystemAddresses.addresses());
        Expected::new(
            intent,
            config,
            self.current().service_cidrs,
            "the intent svcproxy last applied".to_string(),
            self.0.proxy_mode,
        )
    }

    /// What explain compares the kernel with: while syncs fail, the state the failing syncs try to program
    /// (the kernel lacks it, and that is the answer); otherwise the intent of the last successful sync.
    fn explained_intent(&self) -> Result<Expected, String> {
        let s = self.current();
        if let (Some(wanted), true) = (&s.wanted, s.consecutive_failures > 0) {
            let intent = build_intent(
                wanted,
                &IntentConfig {
                    family: IpFamily::V4,
                    node_name: self.0.node.clone(),
                },
            );
            let config = self
                .options()
                .resolve(wanted.node.as_ref(), &SystemAddresses.addresses());
            return Ok(Expected::new(
                Arc::new(intent),
                config,
                wanted.service_cidrs_of(IpFamily::V4),
                format!(
                    "the cluster state svcproxy is trying to program (its last {} syncs failed)",
                    s.consecutive_failures
                ),
                self.0.proxy_mode,
            ));
        }
        self.applied()
            .map(|i| self.expected(i))
            .map_err(|_| "svcproxy has not completed a sync yet".to_string())
    }

    /// The status report: the engine's state with the tracked times.
    pub fn report(&self) -> StatusReport {
        let s = self.current();
        let t = self
            .0
            .tracking
            .lock()
            .map(|t| (t.programmed.clone(), t.last_sync.clone(), t.last_check.clone()));
        let (programmed, last_sync, last_check) = t.unwrap_or_default();
        let service_ports = s
            .applied
            .iter()
            .flat_map(|i| i.service_ports.values())
            .map(|spi| {
                let used = spi.endpoints.all_reachable();
                let count =
                    |f: fn(&svcproxy_model::EndpointInfo) -> bool| used.iter().filter(|e| f(e)).count();
                let name = spi.name.to_string();
                ServicePortStatus {
                    protocol: spi.name.protocol.api_name().to_string(),
                    service_type: format!("{:?}", spi.service_type),
                    cluster_ip: spi.cluster_ip,
                    port: spi.port,
                    node_port: spi.node_port,
                    external_ips: spi.external_ips.clone(),
                    load_balancer_ips: spi.load_balancer_ips.clone(),
                    endpoints: EndpointCounts {
                        total: spi.total_endpoints,
                        in_use: used.len(),
                        ready: count(|e| e.ready),
                        serving: count(|e| e.serving),
                        terminating: count(|e| e.terminating),
                        local: count(|e| e.is_local),
                    },
                    programmed_at: programmed.get(&name).map(|p| p.1.clone()),
                    verified: !s.unverified.contains(&name),
                    name,
                }
            })
            .collect();
        StatusReport {
            node: self.0.node.clone(),
            syncs: s.syncs,
            last_sync,
            last_check,
            last_error: s.last_error.clone(),
            consecutive_failures: s.consecutive_failures,
            problem: s.problem.clone(),
            source_problem: s.source_problem.clone(),
            divergences: s.divergences,
            service_cidrs: match self.0.proxy_mode {
                ProxyMode::Nftables => s.service_cidrs.iter().map(ToString::to_string).collect(),
                ProxyMode::Iptables => Vec::new(),
            },
            service_ports,
            contested: s
                .applied
                .iter()
                .flat_map(|i| contests(i))
                .map(|c| ContestedFrontend {
                    frontend: c.frontend.to_string(),
                    winner: c.winner.to_string(),
                    others: c.others.iter().map(ToString::to_string).collect(),
                })
                .collect(),
        }
    }
}

fn json_body(status: StatusCode, body: String) -> Response {
    let mut r = (status, body).into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn json<T: serde::Serialize>(value: &T) -> Response {
    match serde_json::to_string_pretty(value) {
        Ok(body) => json_body(StatusCode::OK, body),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

fn error(status: StatusCode, message: String) -> Response {
    json_body(status, serde_json::json!({ "error": message }).to_string())
}

/// A request that cannot be answered, and why; answered as `{"error": …}`.
struct Failure(StatusCode, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        error(self.0, self.1)
    }
}

async fn status(State(d): State<DebugState>) -> Response {
    json(&d.report())
}

/// The intent keyed by service port name (`namespace/name:port`): JSON object keys must be strings.
async fn intent(State(d): State<DebugState>) -> Response {
    let intent = match d.applied() {
        Ok(i) => i,
        Err(f) => return f.into_response(),
    };
    let ports: Result<serde_json::Map<String, serde_json::Value>, _> = intent
        .service_ports
        .values()
        .map(|spi| serde_json::to_value(spi).map(|v| (spi.name.to_string(), v)))
        .collect();
    match ports {
        Ok(ports) => json(&serde_json::json!({ "service_ports": ports })),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Reads the kernel (a blocking `iptables-save`) off the async workers.
impl DebugState {
    /// Runs `f`, a kernel read, off the async threads; a request that comes while another one's read is
    /// under way is turned away (429) rather than queued, so a client in a loop cannot pile them up.
    async fn read_kernel<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T, String> + Send + 'static,
    ) -> Result<T, Failure> {
        let Ok(_one_at_a_time) = self.0.kernel_reads.try_acquire() else {
            return Err(Failure(
                StatusCode::TOO_MANY_REQUESTS,
                "another request's kernel read is under way; try again when it is done".into(),
            ));
        };
        blocking(f).await
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, Failure> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r)
        .map_err(|e| Failure(StatusCode::INTERNAL_SERVER_ERROR, e))
}

async fn diff_handler(State(d): State<DebugState>) -> Response {
    let applied = match d.applied() {
        Ok(i) => i,
        Err(f) => return f.into_response(),
    };
    let mut expected = d.expected(applied);
    let (mode, backend) = (d.0.proxy_mode, d.0.backend);
    let result = d
        .read_kernel(move || {
            let kernel = KernelRead::read(mode, backend, &["filter", "nat"], IpFamily::V4)
                .map_err(|e| e.to_string())?;
            expected.align_with(&kernel);
            Ok(diff::compare(
                &kernel,
                &expected.rendering,
                &expected.config,
                expected.intent.service_ports.len(),
            ))
        })
        .await;
    match result {
        Ok(report) => json(&report),
        Err(f) => f.into_response(),
    }
}

#[derive(Debug, Deserialize)]
pub struct ExplainQuery {
    pub from: String,
    pub to: String,
    pub port: Option<String>,
    pub proto: Option<String>,
    pub origin: Option<String>,
    pub in_interface: Option<String>,
}

async fn explain_handler(State(d): State<DebugState>, Query(q): Query<ExplainQuery>) -> Response {
    let bad = |m: String| error(StatusCode::BAD_REQUEST, m);
    let Ok(from) = q.from.parse() else {
        return bad(format!(
            "from={:?}: the daemon takes the client's IP address (it knows no pods)",
            q.from
        ));
    };
    let to = match ToSpec::from_query(&q.to, q.port.as_deref(), q.proto.as_deref()) {
        Ok(t) => t,
        Err(e) => return bad(e.to_string()),
    };
    let origin = match q.origin.as_deref().map(|o| TraceOrigin::from_str(o, true)) {
        None => None,
        Some(Ok(o)) => Some(o),
        Some(Err(_)) => return bad(format!("origin={:?}: expected pod, host or external", q.origin)),
    };
    let expected = d.explained_intent();
    let from_label = q.from.clone();
    let in_interface = q.in_interface.clone();
    let (mode, backend) = (d.0.proxy_mode, d.0.backend);
    let daemon = DaemonView::of("the daemon itself", &d.report());
    let result = d
        .read_kernel(move || {
            let kernel = KernelRead::read(mode, backend, &[], IpFamily::V4).map_err(|e| e.to_string())?;
            let local_ips = SystemAddresses.addresses();
            let mut report = explain::explain(ExplainInput {
                kernel: kernel.rules(),
                expected: expected.as_ref().map_err(Clone::clone),
                from,
                from_label,
                from_pod: false,
                to: &to,
                origin,
                local_ips: &local_ips,
                in_interface,
            })
            .map_err(|e| e.to_string())?;
            report.complete(Some(daemon), node_hazards(&SystemRunner));
            Ok(report)
        })
        .await;
    match result {
        Ok(report) => json(&report),
        Err(f) => f.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use svcproxy_model::{Intent, ObjectName, Protocol, Service, ServicePort};

    fn intent(endpoint_port: u16) -> Arc<Intent> {
        let mut state = svcproxy_model::ClusterState::default();
        let svc = Service::cluster_ip(
            ObjectName::new("demo", "web"),
            "10.96.0.100".parse().unwrap(),
            vec![ServicePort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: endpoint_port,
                node_port: None,
            }],
        );
        state.services.insert(svc.name.clone(), svc);
        Arc::new(svcproxy_model::intent::build_intent(
            &state,
            &svcproxy_model::IntentConfig {
                family: svcproxy_model::IpFamily::V4,
                node_name: "node-a".into(),
            },
        ))
    }

    /// The debug endpoints render as the IPv4 engine writes: with packet counters until it turns them off.
    #[test]
    fn renderings_follow_the_engines_packet_counters() {
        use clap::{CommandFactory, FromArgMatches};
        let matches = crate::cli::Cli::command()
            .try_get_matches_from(["svcproxy", "run", "--manifests", "/nonexistent"])
            .unwrap();
        let run = matches.subcommand_matches("run").unwrap();
        let counting = CountingSwitch::new(true);
        let d = DebugState::new(
            &RunArgs::from_arg_matches(run).unwrap(),
            "node-a",
            Backend::Nft,
            counting.clone(),
        )
        .unwrap();
        assert!(d.options().base.packet_counters);
        counting.turn_off();
        assert!(!d.options().base.packet_counters);
    }

    #[tokio::test]
    async fn kernel_reads_run_one_at_a_time() {
        use clap::{CommandFactory, FromArgMatches};
        let matches = crate::cli::Cli::command()
            .try_get_matches_from(["svcproxy", "run", "--manifests", "/nonexistent"])
            .unwrap();
        let run = matches.subcommand_matches("run").unwrap();
        let d = DebugState::new(
            &RunArgs::from_arg_matches(run).unwrap(),
            "node-a",
            Backend::Nft,
            CountingSwitch::default(),
        )
        .unwrap();
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let first = tokio::spawn({
            let d = d.clone();
            async move {
                d.read_kernel(move || {
                    started_tx.send(()).unwrap();
                    release_rx.recv().unwrap();
                    Ok(1)
                })
                .await
            }
        });
        tokio::task::spawn_blocking(move || started_rx.recv().unwrap())
            .await
            .unwrap();
        let second = d.read_kernel(|| Ok(2)).await;
        assert!(matches!(second, Err(Failure(StatusCode::TOO_MANY_REQUESTS, _))));
        release_tx.send(()).unwrap();
        assert!(matches!(first.await.unwrap(), Ok(1)));
        assert!(
            matches!(d.read_kernel(|| Ok(3)).await, Ok(3)),
            "free again once the first is done"
        );
    }

    #[test]
    fn syncs_and_checks_are_told_apart() {
        let mut t = Tracking::default();
        let mut s = EngineStatus {
            syncs: 1,
            applied: Some(intent(80)),
            ..Default::default()
        };
        t.observe(&s, "t1");
        assert_eq!(t.last_sync.as_deref(), Some("t1"));
        assert_eq!(t.programmed["demo/web:http"].1, "t1");
        t.observe(&s, "t2");
        assert_eq!(t.last_check.as_deref(), Some("t2"));
        // A sync that wrote nothing new for the port keeps its time; a change moves it.
        s.syncs = 2;
        t.observe(&s, "t3");
        assert_eq!(t.programmed["demo/web:http"].1, "t1");
        s.syncs = 3;
        s.applied = Some(intent(81));
        t.observe(&s, "t4");
        assert_eq!(t.programmed["demo/web:http"].1, "t4");
        // A failed sync is no sync.
        s.syncs = 4;
        s.last_error = Some("refused".into());
        t.observe(&s, "t5");
        assert_eq!(t.last_sync.as_deref(), Some("t4"));
    }

    #[test]
    fn removed_ports_are_forgotten_and_untouched_ones_keep_their_time() {
        let two = |web_port: u16, with_api: bool| {
            let mut ports = intent(web_port).service_ports.clone();
            if with_api {
                let mut api = (*intent(90).service_ports.values().next().unwrap())
                    .as_ref()
                    .clone();
                api.name = svcproxy_model::ServicePortName::new(
                    ObjectName::new("demo", "api"),
                    "http",
                    Protocol::Tcp,
                );
                ports.insert(api.name.clone(), Arc::new(api));
            }
            Arc::new(Intent { service_ports: ports })
        };
        let mut t = Tracking::default();
        let mut s = EngineStatus {
            syncs: 1,
            applied: Some(two(80, true)),
            ..Default::default()
        };
        t.observe(&s, "t1");
        assert_eq!(t.programmed.len(), 2);
        s.syncs = 2;
        s.applied = Some(two(81, false));
        t.observe(&s, "t2");
        assert_eq!(t.programmed.len(), 1, "{:?}", t.programmed);
        assert_eq!(t.programmed["demo/web:http"].1, "t2");
        s.syncs = 3;
        s.applied = Some(two(81, true));
        t.observe(&s, "t3");
        assert_eq!(t.programmed["demo/web:http"].1, "t2");
        assert_eq!(t.programmed["demo/api:http"].1, "t3");
    }
}
