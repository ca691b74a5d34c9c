//! `svcproxy explain`: why can (or can't) this client reach this Service? Traces the first packet of a new
//! connection through the LIVE ruleset (`iptables-save`, or in nftables mode our table as `nft list table ip
//! svcproxy` shows it), then through what svcproxy renders from the intent, and says whether the two agree;
//! when they do not, it points at the first rule where their paths part and at the chains (and, in nftables
//! mode, the maps) on the path that differ from the rendering.
//!
//! The comparison is the point: the kernel's answer alone says what happens, the intent's alone says what
//! should; only both together tell a broken node from a misconfigured Service.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::api::networking::v1 as networking;
use kube::Api;
use kube::api::ListParams;
use serde::{Deserialize, Serialize};
use svcproxy_iptables::canonical::canonical_rule;
use svcproxy_iptables::config::{LocalDetector, RenderConfig};
use svcproxy_iptables::jumps::missing_jumps;
use svcproxy_iptables::ruleset::Ruleset;
use svcproxy_iptables::save_parser::{SaveParseError, SavedRuleset, parse_save, tokenize};
use svcproxy_iptables::tracer::{NodeContext, trace};
use svcproxy_iptables::{is_owned_service_chain, jump_rules, render, saved_view};
use svcproxy_model::ServicePortIntent;
use svcproxy_model::frontend_claims::{Frontend, contest_in};
use svcproxy_model::intent::build_intent;
use svcproxy_model::trace::{Origin, Packet, Trace, Verdict};
use svcproxy_model::{ClusterState, EndpointInfo, Intent, IntentConfig, IpFamily, ObjectName, Protocol};
use svcproxy_nftables::references::{chain_targets, set_references};
use svcproxy_nftables::{Family as NftFamily, ListingError, Ruleset as NftRuleset, parse_listing};

use crate::audit::HazardView;
use crate::backends::Backend;
use crate::cli::{ExplainArgs, ProxyMode, RunArgs, TraceOrigin};
use crate::diagnosis::{DaemonView, diagnose, node_hazards};
use crate::diff::{ChainDiff, chain_diffs, nft_object_diffs};
use crate::exec::iptables::{ExecError, IptablesCommands};
use crate::exec::nft::{NftCommands, SystemNft};
use crate::exec::nft_netlink::NetlinkElementSocket;
use crate::exec::nft_table_read::read_table;
use crate::exec::runner::SystemRunner;
use crate::node_addresses::{LocalAddresses, SystemAddresses};
use crate::source::convert;
use crate::source::kube_api::{self, KubeSourceError, proxy_label_selector};
use crate::source::manifest_dir::{ManifestDir, ManifestDirError};
use crate::status::{DaemonError, daemon_get, query_value};
use crate::sync::iptables_proxier::{OptionsError, ProxierOptions};
use crate::sync::nft_proxier::nft_config;

/// The table svcproxy writes in nftables mode (`ip svcproxy`, and `ip6 svcproxy` for IPv6).
pub const NFT_TABLE: &str = "svcproxy";

fn nft_family(family: IpFamily) -> NftFamily {
    match family {
        IpFamily::V4 => NftFamily::Ip,
        IpFamily::V6 => NftFamily::Ip6,
    }
}

/// Why the kernel's rules or the intent could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read the kernel's rules: {0}")]
    Save(#[from] ExecError),
    #[error("cannot parse iptables-save output: {0}")]
    Parse(#[from] SaveParseError),
    #[error("cannot tell this node's name: {0}")]
    NodeName(std::io::Error),
    #[error(transparent)]
    Manifests(#[from] ManifestDirError),
    #[error(transparent)]
    Client(#[from] KubeSourceError),
    #[error("cannot list {what} from the API server: {source}")]
    List { what: &'static str, source: kube::Error },
    #[error(transparent)]
    Options(#[from] OptionsError),
    #[error("cannot parse the listing of table ip {NFT_TABLE}: {0}")]
    NftListing(#[from] ListingError),
}

#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error("--from {0:?}: expected an IP address or namespace/pod")]
    BadFrom(String),
    #[error("--to {0:?}: expected namespace/service:port, namespace/service, ip:port or ip:port/protocol")]
    BadTo(String),
    #[error("{0} is not a Service svcproxy proxies (not in the intent)")]
    UnknownService(ObjectName),
    #[error("{service} has no port {port:?}; its ports: {known}")]
    UnknownPort {
        service: ObjectName,
        port: String,
        known: String,
    },
    #[error("{service} has several ports ({known}): name one, as {service}:PORT")]
    AmbiguousPort { service: ObjectName, known: String },
    #[error(
        "naming a Service needs the intent, which could not be read ({0}); give the destination as ip:port/protocol"
    )]
    NeedIntent(String),
    #[error("pod {pod} not found: {reason}; give its IP address instead")]
    PodNotFound { pod: ObjectName, reason: String },
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error("svcproxy's answer is not an explanation: {0}")]
    Answer(serde_json::Error),
    #[error("the daemon's debug endpoints explain IPv4 only; run explain for IPv6 without --daemon")]
    DaemonIpv4Only,
}

/// The client, as given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromSpec {
    Ip(IpAddr),
    Pod(ObjectName),
}

impl FromStr for FromSpec {
    type Err = ExplainError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(ip) = s.parse() {
            return Ok(FromSpec::Ip(ip));
        }
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(FromSpec::Pod(ObjectName::new(ns, name)))
            }
            _ => Err(ExplainError::BadFrom(s.to_string())),
        }
    }
}

/// The destination, as given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToSpec {
    Address {
        ip: IpAddr,
        port: u16,
        protocol: Protocol,
    },
    Service {
        service: ObjectName,
        /// A port name or number; `None` for a Service with one port.
        port: Option<String>,
    },
}

fn parse_protocol(s: &str) -> Option<Protocol> {
    s.to_ascii_uppercase().parse().ok()
}

impl FromStr for ToSpec {
    type Err = ExplainError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ExplainError::BadTo(s.to_string());
        let (addr, protocol) = match s.rsplit_once('/') {
            Some((a, p)) if a.parse::<SocketAddr>().is_ok() => (a, parse_protocol(p).ok_or_else(bad)?),
            _ => (s, Protocol::Tcp),
        };
        if let Ok(sa) = addr.parse::<SocketAddr>() {
            return Ok(ToSpec::Address {
                ip: sa.ip(),
                port: sa.port(),
                protocol,
            });
        }
        let (ns, rest) = s.split_once('/').ok_or_else(bad)?;
        let (name, port) = match rest.split_once(':') {
            Some((n, p)) if !p.is_empty() => (n, Some(p.to_string())),
            Some(_) => return Err(bad()),
            None => (rest, None),
        };
        if ns.is_empty() || name.is_empty() || name.contains('/') {
            return Err(bad());
        }
        Ok(ToSpec::Service {
            service: ObjectName::new(ns, name),
            port,
        })
    }
}

impl ToSpec {
    /// The query parameters of `/debug/explain` that say the same.
    pub fn query(&self) -> Vec<(&'static str, String)> {
        match self {
            ToSpec::Address { ip, port, protocol } => vec![
                ("to", ip.to_string()),
                ("port", port.to_string()),
                ("proto", protocol.lower().to_string()),
            ],
            ToSpec::Service { service, port } => {
                let mut q = vec![("to", service.to_string())];
                if let Some(p) = port {
                    q.push(("port", p.clone()));
                }
                q
            }
        }
    }

    /// Reads the `/debug/explain` query parameters back.
    pub fn from_query(to: &str, port: Option<&str>, proto: Option<&str>) -> Result<ToSpec, ExplainError> {
        let bad = || ExplainError::BadTo(to.to_string());
        if let Ok(ip) = to.parse::<IpAddr>() {
            let port = port.and_then(|p| p.parse().ok()).ok_or_else(bad)?;
            let protocol = match proto {
                Some(p) => parse_protocol(p).ok_or_else(bad)?,
                None => Protocol::Tcp,
            };
            return Ok(ToSpec::Address { ip, port, protocol });
        }
        let spec = match port {
            Some(p) => format!("{to}:{p}"),
            None => to.to_string(),
        };
        spec.parse()
    }
}

/// svcproxy's rendering of the intent for the backend the daemon runs.
#[derive(Debug, Clone)]
pub enum Rendering {
    Iptables(Ruleset),
    /// Our table; its configuration is the one the nftables backend derives from the same options.
    Nftables(NftRuleset),
}

/// What svcproxy wants in the kernel: the intent and its rendering.
#[derive(Debug, Clone)]
pub struct Expected {
    pub intent: std::sync::Arc<Intent>,
    /// The resolved options, as the iptables backend holds them (the nftables configuration derives from
    /// them).
    pub config: RenderConfig,
    /// The ServiceCIDR ranges, which the nftables rendering drops unallocated addresses of.
    pub service_cidrs: Vec<ipnet::IpNet>,
    pub rendering: Rendering,
    /// Where the intent came from, for the reader (`the manifests in ./m`, `the API server`, …).
    pub source: String,
    /// Objects that could not be used (they are left out, as the daemon leaves them out).
    pub warnings: Vec<String>,
}

impl Expected {
    pub fn new(
        intent: std::sync::Arc<Intent>,
        config: RenderConfig,
        service_cidrs: Vec<ipnet::IpNet>,
        source: String,
        mode: ProxyMode,
    ) -> Self {
        let rendering = match mode {
            ProxyMode::Iptables => Rendering::Iptables(render::render(&intent, &config)),
            ProxyMode::Nftables => Rendering::Nftables(svcproxy_nftables::render(
                &intent,
                &nft_render_config(&config, &service_cidrs),
            )),
        };
        Expected {
            intent,
            config,
            service_cidrs,
            rendering,
            source,
            warnings: Vec::new(),
        }
    }
}

impl Expected {
    /// Our nftables table as the kernel's copy `table` would hold it: each policy chain keeps the
    /// endpoint-map slot it has there (slots follow the table's history, not the intent alone, so a fresh
    /// render would number them differently). `None` in iptables mode.
    pub fn nft_rendering_like(&self, table: &NftRuleset) -> Option<NftRuleset> {
        match &self.rendering {
            Rendering::Nftables(_) => Some(svcproxy_nftables::render_after(
                &self.intent,
                &nft_render_config(&self.config, &self.service_cidrs),
                &svcproxy_nftables::Slots::of_ruleset(table),
            )),
            Rendering::Iptables(_) => None,
        }
    }

    /// Makes the rendering comparable with what `kernel` read (see [`Expected::nft_rendering_like`]).
    pub fn align_with(&mut self, kernel: &KernelRead) {
        if let KernelRead::Nftables(Some(table)) = kernel
            && let Some(ours) = self.nft_rendering_like(table)
        {
            self.rendering = Rendering::Nftables(ours);
        }
    }
}

/// The nftables configuration the daemon renders with: the one derived from the resolved options, and the
/// ServiceCIDR ranges.
fn nft_render_config(
    config: &RenderConfig,
    service_cidrs: &[ipnet::IpNet],
) -> svcproxy_nftables::RenderConfig {
    svcproxy_nftables::RenderConfig {
        service_cidrs: service_cidrs.to_vec(),
        ..nft_config(config)
    }
}

/// The node's name as `svcproxy run` takes it: `--hostname-override` (or `$NODE_NAME`), else the hostname.
pub fn node_name(args: &RunArgs) -> Result<String, LoadError> {
    if let Some(n) = args.hostname_override.as_ref().filter(|n| !n.trim().is_empty()) {
        return Ok(n.trim().to_lowercase());
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map_err(LoadError::NodeName)?;
    Ok(host.trim().to_lowercase())
}

/// Every table of the live ruleset of `family`: the tracer walks raw, mangle, filter, nat and security.
pub fn read_kernel(tables: &[&str], family: IpFamily, backend: Backend) -> Result<SavedRuleset, LoadError> {
    let text = backend.family_commands(family).save(tables)?;
    Ok(parse_save(&text)?)
}

/// Our nftables table as the kernel lists it, `None` when it does not exist. The contents of dynamic sets
/// (ClientIP affinity) are left out: traffic writes them, and neither the rendering nor the daemon's read-back
/// holds them.
pub fn read_nft_table(family: IpFamily) -> Result<Option<NftRuleset>, LoadError> {
    let nft_family = nft_family(family);
    // As the daemon reads it, over a netlink socket (a tenth of `nft list table`'s time at thousands of
    // Services); with `nft list table` when that fails.
    if let Ok(socket) = NetlinkElementSocket::new()
        && let Ok(table) = read_table(&SystemNft, &socket, nft_family, NFT_TABLE)
    {
        return Ok(table);
    }
    let Some(text) = SystemNft.list_table(&nft_family.to_string(), NFT_TABLE, &crate::exec::never)? else {
        return Ok(None);
    };
    Ok(parse_listing(&text)?
        .table(nft_family, NFT_TABLE)
        .map(NftRuleset::without_dynamic_elements))
}

/// What the kernel holds for the backend of `mode`: every iptables table, or our nftables table.
pub enum KernelRead {
    Iptables(SavedRuleset),
    Nftables(Option<NftRuleset>),
}

impl KernelRead {
    /// Reads the kernel's rules of `family`; `tables` limits the iptables tables read (all when empty), and in
    /// iptables mode `backend` says which iptables backend holds them.
    pub fn read(
        mode: ProxyMode,
        backend: Backend,
        tables: &[&str],
        family: IpFamily,
    ) -> Result<KernelRead, LoadError> {
        Ok(match mode {
            ProxyMode::Iptables => KernelRead::Iptables(read_kernel(tables, family, backend)?),
            ProxyMode::Nftables => KernelRead::Nftables(read_nft_table(family)?),
        })
    }

    pub fn rules(&self) -> KernelRules<'_> {
        match self {
            KernelRead::Iptables(saved) => KernelRules::Iptables(saved),
            KernelRead::Nftables(table) => KernelRules::Nftables(table.as_ref()),
        }
    }
}

/// One read of the cluster state, from the manifest directory or the API server, with the daemon's filters.
pub async fn read_cluster(
    args: &RunArgs,
    node: &str,
) -> Result<(ClusterState, String, Vec<String>), LoadError> {
    if let Some(dir) = &args.manifests {
        let read = ManifestDir::new(dir, node).read()?;
        let warnings = read.errors.iter().map(ToString::to_string).collect();
        return Ok((
            read.state,
            format!("the manifests in {}", dir.display()),
            warnings,
        ));
    }
    let client = kube_api::client(args.kubeconfig.as_ref(), args.master.as_deref(), None).await?;
    let lp = ListParams::default().labels(&proxy_label_selector());
    let list_err = |what| move |source| LoadError::List { what, source };
    let services = Api::<core::Service>::all(client.clone())
        .list(&lp)
        .await
        .map_err(list_err("Services"))?;
    let slices = Api::<discovery::EndpointSlice>::all(client.clone())
        .list(&lp)
        .await
        .map_err(list_err("EndpointSlices"))?;
    let client_for_cidrs = client.clone();
    let node_object = Api::<core::Node>::all(client)
        .get_opt(node)
        .await
        .map_err(list_err("the Node"))?;
    let mut state = ClusterState::default();
    let mut warnings = Vec::new();
    for s in &services.items {
        match convert::service(s, "default") {
            Ok(s) => {
                state.services.insert(s.name.clone(), s);
            }
            Err(e) => warnings.push(e.to_string()),
        }
    }
    for s in &slices.items {
        match convert::endpoint_slice(s, "default") {
            Ok(s) => {
                state.endpoint_slices.insert(s.name.clone(), s);
            }
            Err(e) => warnings.push(e.to_string()),
        }
    }
    match node_object.as_ref().map(convert::node) {
        Some(Ok(n)) => state.node = Some(n),
        Some(Err(e)) => warnings.push(e.to_string()),
        None => warnings.push(format!("Node {node} does not exist")),
    }
    // As the daemon, a cluster that does not serve ServiceCIDRs (or will not let us list them) has none.
    match Api::<networking::ServiceCIDR>::all(client_for_cidrs)
        .list(&ListParams::default())
        .await
    {
        Ok(list) => {
            for c in &list.items {
                match convert::service_cidr(c) {
                    Ok(c) => {
                        state.service_cidrs.insert(c.name.clone(), c);
                    }
                    Err(e) => warnings.push(e.to_string()),
                }
            }
        }
        // A cluster that does not serve them has none: nothing to warn about.
        Err(kube::Error::Api(status)) if status.code == 404 => {}
        Err(e) => warnings.push(format!("ServiceCIDRs cannot be listed: {e}")),
    }
    Ok((state, "the API server".to_string(), warnings))
}

/// The intent and its rendering, built exactly as the daemon builds them from the same flags.
pub async fn load_expected(
    args: &RunArgs,
    local_ips: &[IpAddr],
    family: IpFamily,
) -> Result<Expected, LoadError> {
    let node = node_name(args)?;
    let mut options = ProxierOptions::from_args(args, family)?;
    // The daemon's rules count packets whenever kube-proxy's nfacct objects exist (it creates them).
    options.base.packet_counters =
        args.proxy_mode == ProxyMode::Iptables && crate::packet_counters::counting_here();
    let (state, source, warnings) = read_cluster(args, &node).await?;
    let intent = build_intent(
        &state,
        &IntentConfig {
            family,
            node_name: node,
        },
    );
    let config = options.resolve(state.node.as_ref(), local_ips);
    let mut expected = Expected::new(
        std::sync::Arc::new(intent),
        config,
        state.service_cidrs_of(family),
        source,
        args.proxy_mode,
    );
    expected.warnings = warnings;
    Ok(expected)
}

/// A pod's IP, from the API server or from Pod documents in the manifest directory.
pub async fn resolve_pod(args: &RunArgs, pod: &ObjectName) -> Result<IpAddr, ExplainError> {
    let not_found = |reason: String| ExplainError::PodNotFound {
        pod: pod.clone(),
        reason,
    };
    if let Some(dir) = &args.manifests {
        return pod_ip_in_dir(dir, pod).ok_or_else(|| {
            not_found(format!(
                "no Pod document with a status.podIP in {}",
                dir.display()
            ))
        });
    }
    let client = kube_api::client(args.kubeconfig.as_ref(), args.master.as_deref(), None)
        .await
        .map_err(|e| not_found(e.to_string()))?;
    let found = Api::<core::Pod>::namespaced(client, &pod.namespace)
        .get_opt(&pod.name)
        .await
        .map_err(|e| not_found(e.to_string()))?
        .ok_or_else(|| not_found("the API server has no such Pod".into()))?;
    found
        .status
        .and_then(|s| s.pod_ip)
        .and_then(|ip| ip.parse().ok())
        .ok_or_else(|| not_found("it has no IP address yet".into()))
}

fn pod_ip_in_dir(dir: &Path, pod: &ObjectName) -> Option<IpAddr> {
    let files: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    for path in files {
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let docs: Vec<serde_json::Value> = match path.extension().and_then(|e| e.to_str()) {
            Some("json") => serde_json::from_str(&text).into_iter().collect(),
            Some("yaml" | "yml") => serde_saphyr::from_multiple(&text).unwrap_or_default(),
            _ => continue,
        };
        for doc in docs {
            let s = |p: &str| doc.pointer(p).and_then(serde_json::Value::as_str);
            if s("/kind") == Some("Pod")
                && s("/metadata/name") == Some(pod.name.as_str())
                && s("/metadata/namespace").unwrap_or("default") == pod.namespace
                && let Some(ip) = s("/status/podIP").and_then(|ip| ip.parse().ok())
            {
                return Some(ip);
            }
        }
    }
    None
}

/// The packet, for the reader and for tools.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PacketView {
    /// `pod`, `host` or `external`.
    pub origin: String,
    pub source: IpAddr,
    pub destination: IpAddr,
    pub port: u16,
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: String,
}

/// The service port the destination belongs to, per the intent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceView {
    pub name: String,
    pub service_type: String,
    /// Which of its addresses the packet is sent to: `cluster IP`, `external IP`, `load-balancer IP` or
    /// `node port`.
    pub address: String,
    pub cluster_ip: IpAddr,
    pub port: u16,
    pub node_port: Option<u16>,
    /// Every endpoint the Service's slices list for this port, in any state.
    pub total_endpoints: usize,
    pub internal_traffic_policy_local: bool,
    pub external_traffic_policy_local: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepView {
    /// `table/chain` (`ip svcproxy/chain` in nftables mode).
    pub chain: String,
    pub rule: String,
}

/// One path through the rules and where it ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathView {
    /// Every rule the packet matched, in order (all branches of a random choice, depth first).
    pub steps: Vec<StepView>,
    /// `ip:port` the packet may be DNAT-ed to.
    pub endpoints: Vec<String>,
    pub masquerade: bool,
    /// `accept`, `drop` or `reject`; empty when the trace failed.
    pub verdict: String,
    /// Why the rules could not be traced (then the fields above are empty).
    pub error: Option<String>,
    /// Where `steps` go on with another outcome of a random choice (see [`Alternative`]).
    #[serde(default)]
    pub alternatives: Vec<Alternative>,
}

/// The steps of a random choice's outcomes are listed one after the other, each without the steps it shares
/// with the one before: the outcome starting at step `at` is the walk that shares everything before step
/// `instead_of`, where the random match did not hit this time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alternative {
    pub at: usize,
    pub instead_of: usize,
}

const BUILTIN_CHAINS: [&str; 5] = ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];

/// Finds where each further outcome begins. The tracer explores outcomes depth first, flipping the last random
/// match it took; so a new outcome starts where the walk comes back to the chain of the current outcome's
/// last random step after having gone on to a built-in chain (which one walk never does: once nat is done
/// with a packet it does not return to a service chain). `random` tells a random match, `builtin` a step in
/// a chain the kernel calls from a hook, and `ends_chain` a random match that leaves its chain when it hits
/// (`dnat`, `goto`): a later step in that chain is another outcome even when the steps of the walk after it
/// were already listed (each step is listed once, so a second outcome's nat and filter steps are not).
fn alternatives(
    steps: &[StepView],
    random: impl Fn(&StepView) -> bool,
    builtin: impl Fn(&StepView) -> bool,
    ends_chain: impl Fn(&StepView) -> bool,
) -> Vec<Alternative> {
    let mut current: Vec<usize> = Vec::new();
    let mut out = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        if let Some(pos) = current.iter().rposition(|&k| random(&steps[k])) {
            let flipped = current[pos];
            let moved_on =
                ends_chain(&steps[flipped]) || current[pos + 1..].iter().any(|&k| builtin(&steps[k]));
            if moved_on && step.chain == steps[flipped].chain {
                out.push(Alternative {
                    at: i + 1,
                    instead_of: flipped + 1,
                });
                current.truncate(pos);
            }
        }
        current.push(i);
    }
    out
}

impl PathView {
    /// A trace through iptables rules.
    fn of(result: Result<Trace, String>) -> Self {
        Self::with_alternatives(result, |steps| {
            alternatives(
                steps,
                |s| s.rule.contains("--mode random"),
                |s| BUILTIN_CHAINS.contains(&split_chain(&s.chain).1),
                |_| false,
            )
        })
    }

    /// A trace through an nftables table: random matches are `numgen random`, and the base chains (the ones
    /// hooked into netfilter) play the built-in chains' part.
    fn of_nft(result: Result<Trace, String>, table: &NftRuleset) -> Self {
        Self::with_alternatives(result, |steps| {
            alternatives(
                steps,
                |s| s.rule.contains("numgen random"),
                |s| {
                    table
                        .chains
                        .get(split_chain(&s.chain).1)
                        .is_some_and(|c| c.base.is_some())
                },
                |s| {
                    [" dnat to ", " dnat ip to ", " dnat ip6 to ", " goto "]
                        .iter()
                        .any(|w| s.rule.contains(w))
                },
            )
        })
    }

    fn with_alternatives(
        result: Result<Trace, String>,
        find: impl Fn(&[StepView]) -> Vec<Alternative>,
    ) -> Self {
        match result {
            Ok(t) => {
                let steps: Vec<StepView> = t
                    .steps
                    .into_iter()
                    .map(|s| StepView {
                        chain: s.chain,
                        rule: s.rule,
                    })
                    .collect();
                PathView {
                    alternatives: find(&steps),
                    steps,
                    endpoints: t.endpoints,
                    masquerade: t.masquerade,
                    verdict: verdict_word(t.verdict).to_string(),
                    error: None,
                }
            }
            Err(e) => PathView {
                steps: Vec::new(),
                endpoints: Vec::new(),
                masquerade: false,
                verdict: String::new(),
                error: Some(e),
                alternatives: Vec::new(),
            },
        }
    }
}

fn verdict_word(v: Verdict) -> &'static str {
    match v {
        Verdict::Accept => "accept",
        Verdict::Drop => "drop",
        Verdict::Reject => "reject",
    }
}

/// An endpoint's state as the intent knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointState {
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub local: bool,
}

impl EndpointState {
    fn of(e: &EndpointInfo) -> Self {
        EndpointState {
            ready: e.ready,
            serving: e.serving,
            terminating: e.terminating,
            local: e.is_local,
        }
    }

    fn words(&self) -> String {
        let mut w = vec![if self.ready { "ready" } else { "not ready" }];
        if self.serving && !self.ready {
            w.push("serving");
        }
        if self.terminating {
            w.push("terminating");
        }
        w.push(if self.local {
            "on this node"
        } else {
            "on another node"
        });
        w.join(", ")
    }
}

/// A candidate endpoint: whether each side can send the packet there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointView {
    pub address: String,
    pub kernel: bool,
    pub intent: bool,
    /// `None` when the intent does not know the endpoint (a leftover, or a foreign rule's target).
    pub state: Option<EndpointState>,
}

/// Where the two paths part: the first of svcproxy's rules (or jumps into them) that the two paths do not
/// match alike. Rules of other programs' chains are skipped in the comparison.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepDifference {
    /// The kernel's step there (1-based, as in `kernel.steps`); `None` when its path had no further rule of ours.
    pub kernel_step: Option<usize>,
    pub kernel: Option<StepView>,
    /// The intent's step there (1-based, as in `intent.steps`).
    pub intent_step: Option<usize>,
    pub intent: Option<StepView>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExplainReport {
    pub packet: PacketView,
    /// The client as given (`demo/client`, or the address).
    pub from: String,
    pub service: Option<ServiceView>,
    pub kernel: PathView,
    /// `None` when the intent could not be read (`intent_unavailable` says why).
    pub intent: Option<PathView>,
    pub intent_source: Option<String>,
    pub intent_unavailable: Option<String>,
    pub endpoints: Vec<EndpointView>,
    /// `None` without an intent to compare with.
    pub agree: Option<bool>,
    /// How the outcomes differ, one sentence each.
    pub differences: Vec<String>,
    pub first_difference: Option<StepDifference>,
    /// Chains on either path whose rules differ from svcproxy's rendering; in nftables mode also the maps
    /// and sets the path's rules look up (named `@map`, one element per line).
    pub differing_chains: Vec<ChainDiff>,
    /// Jumps from built-in chains on the intent's path that the kernel lacks (`table/chain -> target`).
    pub missing_jumps: Vec<String>,
    pub notes: Vec<String>,
    /// In nftables mode, the table traced (`ip svcproxy`); absent in iptables mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nft_table: Option<String>,
    /// What the running daemon says of its syncs and health; `None` when it was not asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daemon: Option<DaemonView>,
    /// What `svcproxy audit` finds on this node.
    #[serde(default)]
    pub hazards: Vec<HazardView>,
    /// Why the node could not be audited, when it could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hazards_unavailable: Option<String>,
    /// The trace, the daemon's account and the hazards put together ([`crate::diagnosis::diagnose`]).
    #[serde(default)]
    pub diagnosis: Vec<String>,
}

impl ExplainReport {
    /// Adds what lies beyond the rules: the daemon's account (when it was asked) and the node's hazards, then
    /// the diagnosis.
    pub fn complete(&mut self, daemon: Option<DaemonView>, hazards: Result<Vec<HazardView>, String>) {
        self.daemon = daemon;
        match hazards {
            Ok(h) => self.hazards = h,
            Err(e) => self.hazards_unavailable = Some(e),
        }
        self.diagnosis = diagnose(self);
    }
}

/// The kernel's rules as [`explain`] reads them.
#[derive(Debug, Clone, Copy)]
pub enum KernelRules<'a> {
    /// Every table of `iptables-save`.
    Iptables(&'a SavedRuleset),
    /// Our table in nftables mode; `None` when it does not exist.
    Nftables(Option<&'a NftRuleset>),
}

/// Everything [`explain`] reads.
pub struct ExplainInput<'a> {
    pub kernel: KernelRules<'a>,
    /// The intent, or why it could not be read.
    pub expected: Result<&'a Expected, String>,
    pub from: IpAddr,
    pub from_label: String,
    pub from_pod: bool,
    pub to: &'a ToSpec,
    pub origin: Option<TraceOrigin>,
    pub local_ips: &'a [IpAddr],
    /// The interface the packet arrives on, for rules matching `-i`.
    pub in_interface: Option<String>,
}

fn origin_word(o: Origin) -> &'static str {
    match o {
        Origin::Pod => "pod",
        Origin::Host => "host",
        Origin::External => "external",
    }
}

fn is_local(ip: IpAddr, local_ips: &[IpAddr]) -> bool {
    ip.is_loopback() || local_ips.contains(&ip)
}

/// The service port an address belongs to, and which of its addresses it is.
fn service_at<'a>(
    intent: &'a Intent,
    ip: IpAddr,
    port: u16,
    protocol: Protocol,
    local_ips: &[IpAddr],
) -> Option<(&'a ServicePortIntent, &'static str)> {
    intent.service_ports.values().find_map(|spi| {
        let spi: &ServicePortIntent = spi;
        if spi.name.protocol != protocol {
            return None;
        }
        if spi.port == port {
            if spi.cluster_ip == ip {
                return Some((spi, "cluster IP"));
            }
            if spi.external_ips.contains(&ip) {
                return Some((spi, "external IP"));
            }
            if spi.load_balancer_ips.contains(&ip) {
                return Some((spi, "load-balancer IP"));
            }
        }
        (spi.node_port == Some(port) && is_local(ip, local_ips)).then_some((spi, "node port"))
    })
}

fn port_list(ports: &[&ServicePortIntent]) -> String {
    ports
        .iter()
        .map(|s| {
            if s.name.port.is_empty() {
                format!("{}/{}", s.port, s.name.protocol)
            } else {
                format!("{} ({}/{})", s.name.port, s.port, s.name.protocol)
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// What the packet is sent to.
struct Destination<'a> {
    ip: IpAddr,
    port: u16,
    protocol: Protocol,
    /// The service port, and which of its addresses this is, when the intent knows it.
    service: Option<(&'a ServicePortIntent, &'static str)>,
}

/// Resolves the destination: the address, port and protocol to trace, and the service port when known.
fn destination<'a>(
    to: &ToSpec,
    intent: Option<&'a Intent>,
    local_ips: &[IpAddr],
) -> Result<Destination<'a>, ExplainError> {
    match to {
        ToSpec::Address { ip, port, protocol } => Ok(Destination {
            ip: *ip,
            port: *port,
            protocol: *protocol,
            service: intent.and_then(|i| service_at(i, *ip, *port, *protocol, local_ips)),
        }),
        ToSpec::Service { service, port } => {
            let intent = intent.ok_or_else(|| ExplainError::NeedIntent(String::new()))?;
            let ports: Vec<&ServicePortIntent> = intent
                .service_ports
                .values()
                .filter(|s| &s.name.service == service)
                .map(|s| &**s)
                .collect();
            if ports.is_empty() {
                return Err(ExplainError::UnknownService(service.clone()));
            }
            let chosen = match port {
                None if ports.len() == 1 => ports[0],
                None => {
                    return Err(ExplainError::AmbiguousPort {
                        service: service.clone(),
                        known: port_list(&ports),
                    });
                }
                Some(p) => ports
                    .iter()
                    .copied()
                    .find(|s| &s.name.port == p)
                    .or_else(|| {
                        let n: u16 = p.parse().ok()?;
                        ports.iter().copied().find(|s| s.port == n)
                    })
                    .ok_or_else(|| ExplainError::UnknownPort {
                        service: service.clone(),
                        port: p.clone(),
                        known: port_list(&ports),
                    })?,
            };
            Ok(Destination {
                ip: chosen.cluster_ip,
                port: chosen.port,
                protocol: chosen.name.protocol,
                service: Some((chosen, "cluster IP")),
            })
        }
    }
}

/// The `-j`/`-g` target of a saved rule line.
fn jump_of(rule: &str) -> Option<String> {
    let words = tokenize(rule)?;
    words
        .windows(2)
        .find(|w| matches!(w[0].as_str(), "-j" | "-g" | "--jump" | "--goto"))
        .map(|w| w[1].clone())
}

fn split_chain(label: &str) -> (&str, &str) {
    label.split_once('/').unwrap_or(("", label))
}

/// Whether a step belongs to our rules: in one of our chains, or a built-in chain's jump into one of them.
/// Steps through other programs' chains are left out of the comparison: they are no part of the rendering.
fn is_ours(step: &StepView, ours: &Ruleset) -> bool {
    let (table, chain) = split_chain(&step.chain);
    let owns = |name: &str| {
        let t = match table {
            "nat" => &ours.nat,
            "filter" => &ours.filter,
            _ => return false,
        };
        t.chains.contains_key(name) || is_owned_service_chain(name)
    };
    owns(chain) || jump_of(&step.rule).is_some_and(|j| owns(&j))
}

fn step_key(step: &StepView) -> (String, Vec<String>) {
    let args = tokenize(&step.rule)
        .map(|mut w| w.split_off(2.min(w.len())))
        .unwrap_or_default();
    (step.chain.clone(), canonical_rule(&args))
}

/// The first of our rules (`is_ours`) where the two paths differ, comparing steps by `key`.
fn first_difference<K: PartialEq>(
    kernel: &PathView,
    intent: &PathView,
    is_ours: impl Fn(&StepView) -> bool,
    key: impl Fn(&StepView) -> K,
) -> Option<StepDifference> {
    let ours_only = |p: &PathView| -> Vec<(usize, StepView)> {
        p.steps
            .iter()
            .enumerate()
            .filter(|(_, s)| is_ours(s))
            .map(|(n, s)| (n + 1, s.clone()))
            .collect()
    };
    let (k, i) = (ours_only(kernel), ours_only(intent));
    let n = k.len().max(i.len());
    (0..n).find_map(|idx| {
        let (a, b) = (k.get(idx), i.get(idx));
        let same = match (a, b) {
            (Some(a), Some(b)) => key(&a.1) == key(&b.1),
            _ => false,
        };
        (!same).then(|| StepDifference {
            kernel_step: a.map(|s| s.0),
            kernel: a.map(|s| s.1.clone()),
            intent_step: b.map(|s| s.0),
            intent: b.map(|s| s.1.clone()),
        })
    })
}

/// The chains either path entered or matched a rule in, as (table, chain).
fn path_chains(paths: &[&PathView]) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for p in paths {
        for s in &p.steps {
            let (table, chain) = split_chain(&s.chain);
            out.insert((table.to_string(), chain.to_string()));
            if let Some(j) = jump_of(&s.rule) {
                out.insert((table.to_string(), j));
            }
        }
    }
    out
}

/// The objects of our nftables table either path entered or looked up: chains (by name) and the sets and
/// maps their rules use (as `@name`).
fn nft_path_objects(paths: &[&PathView]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for p in paths {
        for s in &p.steps {
            out.insert(split_chain(&s.chain).1.to_string());
            out.extend(chain_targets(&s.rule).into_iter().map(str::to_string));
            out.extend(set_references(&s.rule).into_iter().map(|n| format!("@{n}")));
        }
    }
    out
}

fn endpoint_list(eps: &[String]) -> String {
    match eps {
        [] => "no endpoint".to_string(),
        [one] => one.clone(),
        many => format!(
            "{} or {}",
            many[..many.len() - 1].join(", "),
            many[many.len() - 1]
        ),
    }
}

/// How two outcomes differ, one sentence each.
fn outcome_differences(kernel: &PathView, intent: &PathView) -> Vec<String> {
    let mut out = Vec::new();
    match (&kernel.error, &intent.error) {
        (Some(k), Some(i)) if k == i => return out,
        (Some(k), _) => {
            out.push(format!("the kernel's rules cannot be traced: {k}"));
            return out;
        }
        (None, Some(i)) => {
            out.push(format!("the intent's rules cannot be traced: {i}"));
            return out;
        }
        (None, None) => {}
    }
    if kernel.verdict != intent.verdict {
        out.push(format!(
            "verdict: the kernel would {} the packet, the intent {}s it",
            kernel.verdict, intent.verdict
        ));
    }
    if kernel.endpoints != intent.endpoints {
        out.push(format!(
            "endpoints: the kernel sends new connections to {}, the intent to {}",
            endpoint_list(&kernel.endpoints),
            endpoint_list(&intent.endpoints)
        ));
    }
    if kernel.masquerade != intent.masquerade {
        let word = |m: bool| if m { "masqueraded" } else { "kept" };
        out.push(format!(
            "source address: {} in the kernel, {} in the intent",
            word(kernel.masquerade),
            word(intent.masquerade)
        ));
    }
    out
}

/// Traces the packet through the kernel and through the intent, and compares.
pub fn explain(input: ExplainInput<'_>) -> Result<ExplainReport, ExplainError> {
    let intent = input.expected.as_ref().ok().map(|e| &*e.intent);
    let Destination {
        ip,
        port,
        protocol,
        service,
    } = destination(input.to, intent, input.local_ips).map_err(|e| match e {
        ExplainError::NeedIntent(_) => {
            ExplainError::NeedIntent(input.expected.as_ref().err().cloned().unwrap_or_default())
        }
        e => e,
    })?;
    let detector = input.expected.as_ref().ok().map(|e| &e.config.local_detector);
    let origin = match input.origin {
        Some(TraceOrigin::Pod) => Origin::Pod,
        Some(TraceOrigin::Host) => Origin::Host,
        Some(TraceOrigin::External) => Origin::External,
        None if input.from_pod => Origin::Pod,
        None if is_local(input.from, input.local_ips) => Origin::Host,
        None if matches!(detector, Some(LocalDetector::Cidrs(c)) if c.iter().any(|n| n.contains(&input.from))) => {
            Origin::Pod
        }
        None => Origin::External,
    };
    let packet = Packet {
        origin,
        source: input.from,
        destination: ip,
        port,
        protocol,
    };
    let node = NodeContext {
        local_ips: input.local_ips.to_vec(),
        pod_interface: input.in_interface.clone().filter(|_| origin == Origin::Pod),
        uplink_interface: input.in_interface.clone().filter(|_| origin == Origin::External),
    };
    // Without our table, the packet meets none of our rules: trace an empty one.
    let family = if ip.is_ipv4() { IpFamily::V4 } else { IpFamily::V6 };
    let no_table = NftRuleset::new(nft_family(family), NFT_TABLE);
    let kernel = match input.kernel {
        KernelRules::Iptables(saved) => PathView::of(trace(saved, &packet, &node).map_err(|e| e.to_string())),
        KernelRules::Nftables(table) => {
            let table = table.unwrap_or(&no_table);
            PathView::of_nft(
                svcproxy_nftables::trace(table, &packet, input.local_ips).map_err(|e| e.to_string()),
                table,
            )
        }
    };

    let mut report = ExplainReport {
        packet: PacketView {
            origin: origin_word(origin).to_string(),
            source: input.from,
            destination: ip,
            port,
            protocol: protocol.api_name().to_string(),
        },
        from: input.from_label,
        service: service.map(|(spi, address)| ServiceView {
            name: spi.name.to_string(),
            service_type: format!("{:?}", spi.service_type),
            address: address.to_string(),
            cluster_ip: spi.cluster_ip,
            port: spi.port,
            node_port: spi.node_port,
            total_endpoints: spi.total_endpoints,
            internal_traffic_policy_local: spi.internal_policy_local,
            external_traffic_policy_local: spi.external_policy_local,
        }),
        kernel,
        intent: None,
        intent_source: None,
        intent_unavailable: input.expected.as_ref().err().cloned(),
        endpoints: Vec::new(),
        agree: None,
        differences: Vec::new(),
        first_difference: None,
        differing_chains: Vec::new(),
        missing_jumps: Vec::new(),
        notes: Vec::new(),
        nft_table: None,
        daemon: None,
        hazards: Vec::new(),
        hazards_unavailable: None,
        diagnosis: Vec::new(),
    };
    // The traced path is the claimant's that gets the address, whichever Service was asked about. On a node
    // address, what is contested may be a node port.
    let contest = intent.and_then(|i| {
        let at = |ip| contest_in(i, &Frontend { ip, protocol, port });
        at(Some(ip)).or_else(|| is_local(ip, input.local_ips).then(|| at(None)).flatten())
    });
    if let Some(contest) = contest {
        report.notes.push(contest.to_string());
    }
    if let KernelRules::Nftables(table) = input.kernel {
        let table_name = format!("{} {NFT_TABLE}", nft_family(family));
        if table.is_none() {
            report.notes.push(format!(
                "table {table_name} does not exist: none of svcproxy's rules is in the kernel"
            ));
        }
        report.nft_table = Some(table_name);
        if input.in_interface.is_some() {
            report.notes.push(
                "--in-interface is not used in nftables mode: the table's interface matches follow the packet's \
                 origin (a pod's interface for --origin pod)"
                    .into(),
            );
        }
    }

    let known: Vec<&EndpointInfo> = service
        .map(|(spi, _)| spi.endpoints.all_reachable().iter().collect())
        .unwrap_or_default();
    let expected = match input.expected {
        Ok(e) => e,
        Err(_) => {
            report.endpoints = endpoint_views(&report.kernel, None, &known);
            return Ok(report);
        }
    };
    report.intent_source = Some(expected.source.clone());
    report.notes.extend(
        expected
            .warnings
            .iter()
            .map(|w| format!("left out of the intent: {w}")),
    );
    let intended = match (input.kernel, &expected.rendering) {
        (KernelRules::Iptables(saved), Rendering::Iptables(ours)) => {
            let view = saved_view(ours, &jump_rules(&expected.config))
                .map_err(|e| e.to_string())
                .and_then(|v| trace(&v, &packet, &node).map_err(|e| e.to_string()));
            let intended = PathView::of(view);
            report.differences = outcome_differences(&report.kernel, &intended);
            if !report.differences.is_empty() {
                report.first_difference =
                    first_difference(&report.kernel, &intended, |s| is_ours(s, ours), step_key);
            }
            let on_path = path_chains(&[&report.kernel, &intended]);
            report.differing_chains = chain_diffs(saved, ours, Some(&on_path));
            report.missing_jumps = missing_jumps(saved, &expected.config)
                .into_iter()
                .filter(|j| {
                    intended.steps.iter().any(|s| {
                        s.chain == format!("{}/{}", j.table, j.chain)
                            && jump_of(&s.rule).as_deref() == Some(j.target)
                    })
                })
                .map(|j| format!("{}/{} -> {}", j.table, j.chain, j.target))
                .collect();
            intended
        }
        (KernelRules::Nftables(table), Rendering::Nftables(ours)) => {
            let aligned = table.and_then(|t| expected.nft_rendering_like(t));
            let ours = aligned.as_ref().unwrap_or(ours);
            let intended = PathView::of_nft(
                svcproxy_nftables::trace(ours, &packet, input.local_ips).map_err(|e| e.to_string()),
                ours,
            );
            report.differences = outcome_differences(&report.kernel, &intended);
            if !report.differences.is_empty() {
                // Every step is in our table, and both sides print rules as nft lists them: compare as text.
                report.first_difference = first_difference(
                    &report.kernel,
                    &intended,
                    |_| true,
                    |s| (s.chain.clone(), s.rule.clone()),
                );
            }
            let on_path = nft_path_objects(&[&report.kernel, &intended]);
            report.differing_chains = nft_object_diffs(table, ours, Some(&on_path));
            intended
        }
        _ => {
            // The daemon renders for one backend and reads the same one; a mix is a caller's mistake.
            report.intent_unavailable = Some("the intent was rendered for the other backend".into());
            report.endpoints = endpoint_views(&report.kernel, None, &known);
            return Ok(report);
        }
    };
    report.endpoints = endpoint_views(&report.kernel, Some(&intended), &known);
    report.agree = Some(report.differences.is_empty());
    if service.is_none() {
        report.notes.push(format!(
            "{ip}:{port}/{protocol} is no address of a Service in the intent"
        ));
    }
    report.intent = Some(intended);
    Ok(report)
}

fn endpoint_views(
    kernel: &PathView,
    intent: Option<&PathView>,
    known: &[&EndpointInfo],
) -> Vec<EndpointView> {
    let mut addresses: BTreeSet<String> = kernel.endpoints.iter().cloned().collect();
    if let Some(i) = intent {
        addresses.extend(i.endpoints.iter().cloned());
    }
    addresses.extend(known.iter().map(|e| e.to_string()));
    addresses
        .into_iter()
        .map(|address| EndpointView {
            kernel: kernel.endpoints.contains(&address),
            intent: intent.is_some_and(|i| i.endpoints.contains(&address)),
            state: known
                .iter()
                .find(|e| e.to_string() == address)
                .map(|e| EndpointState::of(e)),
            address,
        })
        .collect()
}

fn outcome_sentence(p: &PathView) -> String {
    if let Some(e) = &p.error {
        return format!("cannot be traced: {e}");
    }
    let source = if p.masquerade {
        "source rewritten to the node's address (masqueraded)"
    } else {
        "source address kept"
    };
    match p.verdict.as_str() {
        "drop" => "DROPPED: the client waits until it times out".to_string(),
        "reject" => "REJECTED: the client is refused at once".to_string(),
        _ if p.endpoints.is_empty() => {
            format!(
                "ACCEPTED, but not translated to any endpoint: it goes on to the address it was sent to; {source}"
            )
        }
        _ => format!("DELIVERED to {}; {source}", endpoint_list(&p.endpoints)),
    }
}

fn write_steps(out: &mut String, path: &PathView) {
    let width = path.steps.iter().map(|s| s.chain.len()).max().unwrap_or(0);
    for (n, s) in path.steps.iter().enumerate() {
        if let Some(a) = path.alternatives.iter().find(|a| a.at == n + 1) {
            let shared = match a.instead_of {
                0..=1 => String::new(),
                2 => " (step 1 as above)".to_string(),
                n => format!(" (steps 1-{} as above)", n - 1),
            };
            let _ = writeln!(
                out,
                "       -- or, when the random match of step {} misses{shared}:",
                a.instead_of
            );
        }
        let _ = writeln!(out, "  {:>3}  {:<width$}  {}", n + 1, s.chain, s.rule);
    }
}

/// The human form, for someone who has never read the rules.
pub fn render_text(r: &ExplainReport) -> String {
    let mut out = String::new();
    let how = match r.packet.origin.as_str() {
        "pod" => "from a pod",
        "host" => "from the node itself",
        _ => "from outside the node",
    };
    let from = if r.from == r.packet.source.to_string() {
        r.from.clone()
    } else {
        format!("{} ({})", r.from, r.packet.source)
    };
    let _ = writeln!(
        out,
        "Packet:   new {} connection {how}: {from} -> {}",
        r.packet.protocol,
        SocketAddr::new(r.packet.destination, r.packet.port)
    );
    match &r.service {
        Some(s) => {
            let policies = match (s.internal_traffic_policy_local, s.external_traffic_policy_local) {
                (false, false) => String::new(),
                (true, false) => ", internalTrafficPolicy Local".into(),
                (false, true) => ", externalTrafficPolicy Local".into(),
                (true, true) => ", internal and externalTrafficPolicy Local".into(),
            };
            let _ = writeln!(
                out,
                "Service:  {} ({}, its {}{policies}); {} endpoint{} listed",
                s.name,
                s.service_type,
                s.address,
                s.total_endpoints,
                if s.total_endpoints == 1 { "" } else { "s" }
            );
        }
        None if r.intent.is_some() => {
            let _ = writeln!(out, "Service:  none in the intent has this address");
        }
        None => {}
    }

    match &r.nft_table {
        Some(table) => {
            let _ = writeln!(
                out,
                "\nIn the kernel (the live table {table}), the packet matches:"
            );
        }
        None => {
            let _ = writeln!(out, "\nIn the kernel (the live rules), the packet matches:");
        }
    }
    if r.kernel.steps.is_empty() && r.kernel.error.is_none() {
        let _ = writeln!(out, "  no rule");
    }
    write_steps(&mut out, &r.kernel);
    let _ = writeln!(out, "  => {}", outcome_sentence(&r.kernel));

    match (&r.intent, &r.intent_unavailable) {
        (Some(intent), _) => {
            let source = r.intent_source.as_deref().unwrap_or("the intent");
            let _ = writeln!(out, "\nWhat svcproxy renders from {source} would do:");
            if r.agree == Some(false) {
                write_steps(&mut out, intent);
            }
            let _ = writeln!(out, "  => {}", outcome_sentence(intent));
        }
        (None, Some(why)) => {
            let _ = writeln!(
                out,
                "\nThe intent could not be read, so nothing to compare with: {why}"
            );
        }
        (None, None) => {}
    }

    if !r.endpoints.is_empty() {
        let width = r
            .endpoints
            .iter()
            .map(|e| e.address.len())
            .max()
            .unwrap_or(0)
            .max(8);
        let _ = writeln!(out, "\nEndpoints:");
        let _ = writeln!(out, "  {:<width$}  kernel  intent  state", "address");
        for e in &r.endpoints {
            let yes = |b: bool| if b { "yes" } else { "-" };
            let state = e
                .state
                .map(|s| s.words())
                .unwrap_or_else(|| "unknown to the intent".into());
            let intent = if r.intent.is_some() { yes(e.intent) } else { "?" };
            let _ = writeln!(
                out,
                "  {:<width$}  {:<6}  {:<6}  {state}",
                e.address,
                yes(e.kernel),
                intent
            );
        }
    }

    match r.agree {
        Some(true) => {
            let _ = writeln!(out, "\nKernel and intent AGREE.");
        }
        Some(false) => {
            let _ = writeln!(out, "\nKernel and intent DISAGREE:");
            for d in &r.differences {
                let _ = writeln!(out, "  - {d}");
            }
        }
        None => {}
    }
    if let Some(d) = &r.first_difference {
        let _ = writeln!(
            out,
            "\nThe paths part here (everything of svcproxy's before is alike):"
        );
        let side = |n: Option<usize>, v: &Option<StepView>| match (n, v) {
            (Some(n), Some(s)) => format!("step {n}: {}  {}", s.chain, s.rule),
            _ => "no further rule of svcproxy's".to_string(),
        };
        let _ = writeln!(out, "  kernel {}", side(d.kernel_step, &d.kernel));
        let _ = writeln!(out, "  intent {}", side(d.intent_step, &d.intent));
    }
    if !r.differing_chains.is_empty() {
        let what = if r.nft_table.is_some() {
            "Chains and maps"
        } else {
            "Chains"
        };
        let _ = writeln!(
            out,
            "\n{what} on the path that differ from what svcproxy renders:"
        );
        for c in &r.differing_chains {
            let _ = writeln!(out, "  {}: {}", c.label(), c.summary());
            for rule in &c.missing_rules {
                let _ = writeln!(out, "    missing: {rule}");
            }
            for rule in &c.extra_rules {
                let _ = writeln!(out, "    extra:   {rule}");
            }
        }
    }
    for j in &r.missing_jumps {
        let _ = writeln!(out, "  missing jump: {j}");
    }
    for n in &r.notes {
        let _ = writeln!(out, "Note: {n}");
    }
    if let Some(d) = &r.daemon {
        match &d.unreachable {
            Some(_) => {}
            None if d.consecutive_failures == 0 && d.problem.is_none() => {
                let _ = writeln!(
                    out,
                    "\nsvcproxy ({}): healthy, last successful sync {}.",
                    d.at,
                    d.last_sync.as_deref().unwrap_or("never")
                );
            }
            None => {
                let _ = writeln!(out, "\nsvcproxy ({}): UNHEALTHY.", d.at);
            }
        }
    }
    if let Some(e) = &r.hazards_unavailable {
        let _ = writeln!(out, "Note: the node could not be audited for hazards: {e}");
    }
    if !r.diagnosis.is_empty() {
        let _ = writeln!(out, "\nDiagnosis:");
        for d in &r.diagnosis {
            let _ = writeln!(out, "  * {d}");
        }
    }
    out
}

/// `svcproxy explain`: reads the live rules and the intent here, or asks the daemon with `--daemon`.
/// `args.run` must already carry the daemon's settings (its `--config` applied).
pub async fn command(args: &ExplainArgs) -> Result<ExplainReport, ExplainError> {
    let from: FromSpec = args.from.parse()?;
    let to: ToSpec = args.to.parse()?;
    let (from_ip, from_pod) = match &from {
        FromSpec::Ip(ip) => (*ip, false),
        FromSpec::Pod(pod) => (resolve_pod(&args.run, pod).await?, true),
    };
    // The destination's family, or the client's when the destination is a Service by name.
    let family = match &to {
        ToSpec::Address { ip, .. } if ip.is_ipv6() => IpFamily::V6,
        ToSpec::Address { .. } => IpFamily::V4,
        ToSpec::Service { .. } if from_ip.is_ipv6() => IpFamily::V6,
        ToSpec::Service { .. } => IpFamily::V4,
    };
    if let Some(url) = &args.daemon {
        if family == IpFamily::V6 {
            return Err(ExplainError::DaemonIpv4Only);
        }
        let mut query = vec![("from", from_ip.to_string())];
        query.extend(to.query());
        if let Some(o) = args.origin.or(from_pod.then_some(TraceOrigin::Pod)) {
            query.push(("origin", format!("{o:?}").to_lowercase()));
        }
        if let Some(i) = &args.in_interface {
            query.push(("in_interface", i.clone()));
        }
        let q: Vec<String> = query
            .iter()
            .map(|(k, v)| format!("{k}={}", query_value(v)))
            .collect();
        let body = daemon_get(url, &format!("/debug/explain?{}", q.join("&")))?;
        let mut report: ExplainReport = serde_json::from_str(&body).map_err(ExplainError::Answer)?;
        report.from = args.from.clone();
        return Ok(report);
    }
    let local_ips = SystemAddresses.addresses();
    let backend = crate::backends::for_args(&args.run, &SystemRunner);
    let kernel = KernelRead::read(args.run.proxy_mode, backend, &[], family)?;
    let expected = load_expected(&args.run, &local_ips, family)
        .await
        .map_err(|e| e.to_string());
    let mut report = explain(ExplainInput {
        kernel: kernel.rules(),
        expected: expected.as_ref().map_err(Clone::clone),
        from: from_ip,
        from_label: args.from.clone(),
        from_pod,
        to: &to,
        origin: args.origin,
        local_ips: &local_ips,
        in_interface: args.in_interface.clone(),
    })?;
    let daemon = DaemonView::ask(args.run.metrics_bind_address);
    report.complete(Some(daemon), node_hazards(&SystemRunner));
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_destinations() {
        assert_eq!(
            "demo/web:http".parse::<ToSpec>().unwrap(),
            ToSpec::Service {
                service: ObjectName::new("demo", "web"),
                port: Some("http".into())
            }
        );
        assert_eq!(
            "demo/web".parse::<ToSpec>().unwrap(),
            ToSpec::Service {
                service: ObjectName::new("demo", "web"),
                port: None
            }
        );
        assert_eq!(
            "10.96.0.10:53/udp".parse::<ToSpec>().unwrap(),
            ToSpec::Address {
                ip: "10.96.0.10".parse().unwrap(),
                port: 53,
                protocol: Protocol::Udp
            }
        );
        assert_eq!(
            "[fd00::1]:80".parse::<ToSpec>().unwrap(),
            ToSpec::Address {
                ip: "fd00::1".parse().unwrap(),
                port: 80,
                protocol: Protocol::Tcp
            }
        );
        for bad in ["web", "demo/", "/web", "demo/web:", "10.0.0.1:80/icmp", "a/b/c"] {
            assert!(bad.parse::<ToSpec>().is_err(), "{bad}");
        }
        for spec in ["demo/web:http", "demo/web", "10.96.0.10:53/udp"] {
            let to: ToSpec = spec.parse().unwrap();
            let q = to.query();
            let get = |k: &str| q.iter().find(|(n, _)| *n == k).map(|(_, v)| v.as_str());
            assert_eq!(
                ToSpec::from_query(get("to").unwrap(), get("port"), get("proto")).unwrap(),
                to
            );
        }
    }

    #[test]
    fn parses_clients() {
        assert_eq!(
            "10.244.0.5".parse::<FromSpec>().unwrap(),
            FromSpec::Ip("10.244.0.5".parse().unwrap())
        );
        assert_eq!(
            "demo/client".parse::<FromSpec>().unwrap(),
            FromSpec::Pod(ObjectName::new("demo", "client"))
        );
        assert!("client".parse::<FromSpec>().is_err());
    }
}
