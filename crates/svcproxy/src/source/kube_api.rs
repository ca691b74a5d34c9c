//! The Kubernetes API source: list + watch of Services, EndpointSlices, ServiceCIDRs and our own Node through
//! kube-rs.
//!
//! The watches use upstream kube-proxy's server-side filter, so Services handed to another proxy
//! (`service.kubernetes.io/service-proxy-name`) and headless ones never reach us. A relist (after a 410 Gone or
//! a reconnect) is delivered as one `Replace`, so programmed state is swapped in one step and never dropped
//! while the list is in flight.

use std::path::PathBuf;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as networking;
use kube::api::ListParams;
use kube::client::ClientBuilder;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Config};
use prometheus_client::metrics::counter::Counter;
use svcproxy_model::ObjectName;
use tokio::sync::mpsc;

use super::api_request_metrics::{ApiRequestMetrics, RecordRequests};
use super::convert::{self, ConvertError};
use super::watch_backoff::WatchBackoff;
use super::wire::{Boxed, WireEndpointSlice};
use super::{Delta, IGNORE_LABELS, SourceEvent};

/// Upstream's server-side selector: `!label` for each of [`IGNORE_LABELS`].
pub fn proxy_label_selector() -> String {
    IGNORE_LABELS
        .iter()
        .map(|l| format!("!{l}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    #[error("cannot read kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error("cannot configure the API client: {0}")]
    Config(String),
    #[error("cannot create the API client: {0}")]
    Client(#[from] kube::Error),
}

/// Builds a client from `--kubeconfig`, or from the in-cluster service account (or `KUBECONFIG`) when absent;
/// `master` (`--master`) replaces the server URL either gives, as kube-proxy's flag does.
pub async fn client(
    kubeconfig: Option<&PathBuf>,
    master: Option<&str>,
    metrics: Option<Arc<ApiRequestMetrics>>,
) -> Result<Client, KubeSourceError> {
    let master = master.map(str::trim).filter(|u| !u.is_empty());
    let mut config = match kubeconfig {
        Some(path) => {
            let mut kc = Kubeconfig::read_from(path).map_err(|source| KubeSourceError::Kubeconfig {
                path: path.clone(),
                source,
            })?;
            // `--master` is the server of every cluster the file names, before the file is taken apart: a
            // kubeconfig may carry credentials and a CA but no server, leaving it to `--master` (GCE writes
            // kube-proxy's that way), which the client would otherwise refuse.
            if let Some(url) = master {
                for named in &mut kc.clusters {
                    named.cluster.get_or_insert_with(Default::default).server = Some(url.to_string());
                }
            }
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|e| KubeSourceError::Config(e.to_string()))?
        }
        None => Config::infer()
            .await
            .map_err(|e| KubeSourceError::Config(e.to_string()))?,
    };
    if let Some(url) = master {
        config.cluster_url = url
            .parse()
            .map_err(|e| KubeSourceError::Config(format!("--master {url:?} is not a URL: {e}")))?;
    }
    let host = config
        .cluster_url
        .authority()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let builder = ClientBuilder::try_from(config)?;
    Ok(match metrics {
        Some(metrics) => builder
            .with_layer(&RecordRequests {
                metrics,
                host: host.into(),
            })
            .build(),
        None => builder.build(),
    })
}

/// Which initial lists have completed.
#[derive(Default)]
struct Readiness {
    services: bool,
    slices: bool,
    node: bool,
    /// Listed, or known not to be listable (the API server does not serve ServiceCIDRs, or we may not list
    /// them): then there are none to wait for.
    service_cidrs: bool,
    announced: bool,
}

/// One event from any of the four watches. Boxed: the Node variant is several times larger than the others
/// and the stream moves every item.
enum Item {
    Service(Box<Result<Event<Boxed<core::Service>>, watcher::Error>>),
    Slice(Box<Result<Event<WireEndpointSlice>, watcher::Error>>),
    Node(Box<Result<Event<core::Node>, watcher::Error>>),
    ServiceCidr(Box<Result<Event<networking::ServiceCIDR>, watcher::Error>>),
}

/// How often an unreachable API server is asked whether it answers again.
const UNREACHABLE_PROBE: std::time::Duration = std::time::Duration::from_secs(2);

/// How long the first sync waits for our Node (and the ServiceCIDRs) once Services and EndpointSlices are
/// listed. kube-proxy does not wait for its Node to sync (it waits up to 30 s at start for the Node's
/// addresses, then carries on without), so a ServiceAccount that may not list Nodes, or an API server that
/// fails only that list, must not leave the node without Service rules. The Node, when it comes, is applied
/// like any change. ServiceCIDRs are waited for so that a first sync in nftables mode does not have to be
/// followed at once by a second full one to add their drop rule.
const NODE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Watches until the receiver goes away. Watch errors are retried with [`WatchBackoff`]. Every object version
/// rejected by validation counts in `rejected`.
pub async fn run(client: Client, node_name: String, tx: mpsc::Sender<SourceEvent>, rejected: Counter) {
    let cfg = watcher::Config::default().labels(&proxy_label_selector());
    let services = watcher::watcher(Api::<Boxed<core::Service>>::all(client.clone()), cfg.clone())
        .backoff(WatchBackoff::default())
        .map(|e| Item::Service(Box::new(e)));
    let slices = watcher::watcher(Api::<WireEndpointSlice>::all(client.clone()), cfg)
        .backoff(WatchBackoff::default())
        .map(|e| Item::Slice(Box::new(e)));
    let node_cfg = watcher::Config::default().fields(&format!("metadata.name={node_name}"));
    let probe_api = Api::<core::Node>::all(client.clone());
    let probe_params = ListParams::default()
        .fields(&format!("metadata.name={node_name}"))
        .limit(1);
    let nodes = watcher::watcher(Api::<core::Node>::all(client.clone()), node_cfg)
        .backoff(WatchBackoff::default())
        .map(|e| Item::Node(Box::new(e)));
    let service_cidrs = watcher::watcher(
        Api::<networking::ServiceCIDR>::all(client),
        watcher::Config::default(),
    )
    .backoff(WatchBackoff::default())
    .map(|e| Item::ServiceCidr(Box::new(e)));
    let mut items = futures::stream::select(
        futures::stream::select(services, slices),
        futures::stream::select(nodes, service_cidrs),
    )
    .boxed();

    let mut ready = Readiness::default();
    let mut svc_buf = Vec::new();
    let mut svc_rejected = Vec::new();
    let mut slice_buf = Vec::new();
    let mut slice_rejected = Vec::new();
    let mut node_buf = None;
    let mut node_error = None;
    let mut cidr_buf = Vec::new();
    let mut cidr_rejected = Vec::new();
    let mut cidr_error = None;
    let mut node_deadline = None;
    let mut unreachable = false;
    let mut probe = tokio::time::interval(UNREACHABLE_PROBE);
    loop {
        // A watch that starts again after an outage says nothing until the next change, so while the API server
        // is unreachable it is asked now and then for what the Node watch lists: an answer ends the report.
        let item = tokio::select! {
            item = items.next() => match item {
                Some(item) => item,
                None => return,
            },
            _ = probe.tick(), if unreachable => {
                if probe_api.list(&probe_params).await.is_ok() {
                    unreachable = false;
                    if tx.send(SourceEvent::Unreachable(None)).await.is_err() {
                        return;
                    }
                }
                continue;
            }
            () = sleep_until_some(node_deadline), if !ready.announced => {
                ready.announced = true;
                if !ready.node {
                    tracing::warn!(
                        "Node {node_name} not listed after {}s ({}); programming without it (no topology zone, \
                         Node addresses or pod CIDRs) until it is",
                        NODE_WAIT.as_secs(),
                        node_error.as_deref().unwrap_or("no answer"),
                    );
                }
                if !ready.service_cidrs {
                    tracing::warn!(
                        "ServiceCIDRs not listed after {}s; programming without them (in nftables mode, traffic \
                         to unallocated cluster IPs is not dropped) until they are",
                        NODE_WAIT.as_secs(),
                    );
                }
                if tx.send(SourceEvent::Synced).await.is_err() {
                    return;
                }
                continue;
            }
        };
        // A watch error means the API server cannot be read right now; any event after it means it can again.
        let failed = match &item {
            Item::Service(ev) => outage(ev.as_ref().as_ref().err()),
            Item::Slice(ev) => outage(ev.as_ref().as_ref().err()),
            // A Node list refused for want of RBAC comes from a server that answers: not an outage.
            Item::Node(ev) => outage(ev.as_ref().as_ref().err().filter(|e| !refused(e))),
            // Nor is a server that does not serve ServiceCIDRs (before Kubernetes 1.33 they may be off).
            Item::ServiceCidr(ev) => outage(
                ev.as_ref()
                    .as_ref()
                    .err()
                    .filter(|e| !refused(e) && !not_served(e)),
            ),
        };
        if failed.is_some() || unreachable {
            unreachable = failed.is_some();
            if tx.send(SourceEvent::Unreachable(failed)).await.is_err() {
                return;
            }
        }
        let event = match item {
            Item::Service(ev) => on_event(
                *ev,
                "Service",
                |o| convert::service(&o.0, "default"),
                &mut svc_buf,
                &mut svc_rejected,
                &mut ready.services,
                &rejected,
            )
            .map(SourceEvent::Services),
            Item::Slice(ev) => on_event(
                *ev,
                "EndpointSlice",
                |o| o.convert("default"),
                &mut slice_buf,
                &mut slice_rejected,
                &mut ready.slices,
                &rejected,
            )
            .map(SourceEvent::EndpointSlices),
            Item::Node(ev) => match *ev {
                Ok(Event::Init) => {
                    node_buf = None;
                    None
                }
                Ok(Event::InitApply(n)) => {
                    node_buf = convert_node(&n, &rejected);
                    None
                }
                Ok(Event::InitDone) => {
                    if ready.announced && !ready.node {
                        tracing::info!(
                            "Node {node_name} listed at last; its labels, addresses and pod CIDRs apply"
                        );
                    }
                    ready.node = true;
                    node_error = None;
                    Some(SourceEvent::Node(node_buf.take()))
                }
                Ok(Event::Apply(n)) => convert_node(&n, &rejected).map(|n| SourceEvent::Node(Some(n))),
                Ok(Event::Delete(_)) => Some(SourceEvent::Node(None)),
                Err(e) => {
                    // Said once per error, not at every retry of the back-off: a Node refused for want of RBAC
                    // stays refused.
                    let error = e.to_string();
                    if node_error.as_ref() != Some(&error) {
                        tracing::warn!("watch of Node {node_name} failed, retrying: {error}");
                    } else {
                        tracing::debug!("watch of Node {node_name} failed again, retrying: {error}");
                    }
                    node_error = Some(error);
                    None
                }
            },
            Item::ServiceCidr(ev) => match *ev {
                Err(e) if refused(&e) || not_served(&e) => {
                    // Nothing to wait for: without ServiceCIDRs, traffic to unallocated cluster IPs is not
                    // dropped, as on a cluster that has none. Still retried, so a grant later takes effect.
                    let error = e.to_string();
                    if cidr_error.as_ref() != Some(&error) {
                        tracing::warn!(
                            "ServiceCIDRs cannot be listed ({error}); in nftables mode, traffic to unallocated \
                             cluster IPs is not dropped until they can"
                        );
                    }
                    cidr_error = Some(error);
                    ready.service_cidrs = true;
                    None
                }
                ev => {
                    if matches!(ev, Ok(Event::InitDone)) && cidr_error.take().is_some() {
                        tracing::info!("ServiceCIDRs listed at last");
                    }
                    on_event(
                        ev,
                        "ServiceCIDR",
                        convert::service_cidr,
                        &mut cidr_buf,
                        &mut cidr_rejected,
                        &mut ready.service_cidrs,
                        &rejected,
                    )
                    .map(SourceEvent::ServiceCidrs)
                }
            },
        };
        if let Some(event) = event
            && tx.send(event).await.is_err()
        {
            return;
        }
        if ready.services && ready.slices && !ready.announced {
            if ready.node && ready.service_cidrs {
                ready.announced = true;
                tracing::info!("initial lists of Services, EndpointSlices, ServiceCIDRs and Node complete");
                if tx.send(SourceEvent::Synced).await.is_err() {
                    return;
                }
            } else if node_deadline.is_none() {
                node_deadline = Some(tokio::time::Instant::now() + NODE_WAIT);
            }
        }
    }
}

/// Waits until `deadline`; forever without one.
async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Whether the server refused the request as unauthorised or forbidden.
fn refused(e: &watcher::Error) -> bool {
    let code = match e {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status)) => status.code,
        watcher::Error::WatchError(status) => status.code,
        _ => return false,
    };
    matches!(code, 401 | 403)
}

/// Whether the server does not serve the resource at all (404: an API group or version it lacks).
fn not_served(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status)) => status.code == 404,
        watcher::Error::WatchError(status) => status.code == 404,
        _ => false,
    }
}

/// The error as an outage to report, if it is one. 410 Gone (the resourceVersion is too old) is the server
/// asking for a relist, which the watcher does at once: not an outage.
fn outage(e: Option<&watcher::Error>) -> Option<String> {
    match e? {
        watcher::Error::WatchError(status) if status.code == 410 => None,
        e => Some(e.to_string()),
    }
}

fn convert_node(n: &core::Node, rejected: &Counter) -> Option<svcproxy_model::Node> {
    convert::node(n)
        .map_err(|e| {
            rejected.inc();
            tracing::error!("rejected: {e}");
        })
        .ok()
}

fn name_of(meta: &kube::api::ObjectMeta) -> ObjectName {
    ObjectName::new(
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// Turns one watch event into a delta. A rejected object is logged and left out: on `Apply` the engine keeps
/// the previous good version; on a relist its name is carried in `rejected` so the engine keeps it too.
fn on_event<K, T>(
    event: Result<Event<K>, watcher::Error>,
    kind: &str,
    convert: impl Fn(&K) -> Result<T, ConvertError>,
    buf: &mut Vec<T>,
    rejected: &mut Vec<ObjectName>,
    ready: &mut bool,
    rejections: &Counter,
) -> Option<Delta<T>>
where
    K: kube::Resource,
{
    match event {
        Ok(Event::Init) => {
            buf.clear();
            rejected.clear();
            None
        }
        Ok(Event::InitApply(o)) => {
            match convert(&o) {
                Ok(t) => buf.push(t),
                Err(e) => {
                    rejections.inc();
                    tracing::error!("rejected: {e}; the last good version of the object stays programmed");
                    rejected.push(name_of(o.meta()));
                }
            }
            None
        }
        Ok(Event::InitDone) => {
            *ready = true;
            Some(Delta::Replace {
                objects: std::mem::take(buf),
                rejected: std::mem::take(rejected),
            })
        }
        Ok(Event::Apply(o)) => match convert(&o) {
            Ok(t) => Some(Delta::Apply(t)),
            Err(e) => {
                rejections.inc();
                tracing::error!("rejected: {e}; the last good version of the object stays programmed");
                None
            }
        },
        Ok(Event::Delete(o)) => Some(Delta::Delete(name_of(o.meta()))),
        Err(e) => {
            tracing::warn!("watch of {kind}s failed, retrying: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kubeconfig with credentials and a CA but no server, as GCE writes kube-proxy's: `--master` supplies it.
    #[tokio::test]
    async fn master_supplies_a_server_the_kubeconfig_leaves_out() {
        let path = std::env::temp_dir().join(format!("svcproxy-kubeconfig-{}", std::process::id()));
        std::fs::write(
            &path,
            "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster: {}\nusers:\n- name: kube-proxy\n  \
             user: {token: abc}\ncontexts:\n- name: service-account-context\n  context: {cluster: local, user: \
             kube-proxy}\ncurrent-context: service-account-context\n",
        )
        .unwrap();
        let without = client(Some(&path), None, None).await;
        let with = client(Some(&path), Some("http://127.0.0.1:6443"), None).await;
        std::fs::remove_file(&path).unwrap();
        assert!(without.is_err(), "no server anywhere");
        assert_eq!(with.unwrap().default_namespace(), "default");
    }
}
