#![forbid(unsafe_code)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches};
use svcproxy::backends;
use svcproxy::cli::{Cli, Command, LogFormat, OutputFormat, ProxyMode, RunArgs};
use svcproxy::config_file;
use svcproxy::debug_http::DebugState;
use svcproxy::events::{EventSink, KubeEvents, NoEvents, ProxyEvent};
use svcproxy::exec::generation::NfTablesGeneration;
use svcproxy::exec::kernel_release::SystemKernelRelease;
use svcproxy::exec::nfacct::{NetlinkPacketCounters, PacketCounters};
use svcproxy::exec::nft::SystemNft;
use svcproxy::exec::nft_netlink::NetlinkElementSocket;
use svcproxy::exec::runner::SystemRunner;
use svcproxy::families;
use svcproxy::hand_back::{Served, StepAside, step_aside_once_served};
use svcproxy::health::ProxyHealth;
use svcproxy::http_server::{self, AppState};
use svcproxy::metrics::Metrics;
use svcproxy::node_addresses::{NodePortSpec, SystemAddresses};
use svcproxy::oom_score::{OWN_OOM_SCORE_ADJ, OomScoreApplied, set_oom_score_adj};
use svcproxy::packet_counters::CountingSwitch;
use svcproxy::removal_order::RemovalOrder;
use svcproxy::served_frontends::service_frontends;
use svcproxy::service_health::ServiceHealthServers;
use svcproxy::source::{self, family_split, manifest_dir::ManifestDir};
use svcproxy::sync::commit_ledger::CommitLedger;
use svcproxy::sync::engine::{Engine, EngineConfig, EngineStatus};
use svcproxy::sync::iptables_proxier::{IptablesProxier, ProxierOptions};
use svcproxy::sync::nft_proxier::NftProxier;
use svcproxy::sync::other_proxies::OtherProxies;
use svcproxy_conntrack::NetlinkConntrack;
use svcproxy_conntrack::sysctls::{
    ConntrackSysctlConfig, ROUTE_LOCALNET, SysctlSetting, WriteMode, apply_sysctls, online_cpus, plan_sysctls,
};
use svcproxy_model::{IntentConfig, IpFamily};
use tokio::sync::{mpsc, watch};
use tracing_subscriber::EnvFilter;

/// Logs to stderr at RUST_LOG's levels, or else at `level`.
fn init_logging(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn node_name(args: &RunArgs) -> anyhow::Result<String> {
    if let Some(n) = args.hostname_override.as_ref().filter(|n| !n.trim().is_empty()) {
        return Ok(n.trim().to_lowercase());
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").context("cannot read the hostname")?;
    Ok(host.trim().to_lowercase())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {},
    }
}

/// KUBE-* state in the iptables backend we do not write keeps acting on packets where we can neither see nor
/// repair it: refuse to start, naming both sides and the fix.
fn refuse_mixed_backends(ours: backends::Backend) -> anyhow::Result<()> {
    let (Some(ours_cmds), Some(theirs_cmds)) = (ours.commands(), ours.other().commands()) else {
        return Ok(());
    };
    // The other backend first: it is almost always empty, and then ours (a full dump of every rule, seconds at
    // 5,000 Services) need not be read at all.
    let theirs_chains = backends::kube_chains(&theirs_cmds).unwrap_or_default();
    if theirs_chains.is_empty() {
        return Ok(());
    }
    let ours_chains = backends::kube_chains(&ours_cmds)?;
    backends::check_mixed(ours, &ours_chains, &theirs_chains)?;
    if !theirs_chains.is_empty() {
        tracing::warn!(
            "the {} iptables backend holds {} KUBE-* chains; svcproxy writes {}. Remove them with `svcproxy cleanup`",
            ours.other().name(),
            theirs_chains.len(),
            ours.name()
        );
    }
    Ok(())
}

/// Once our first sync has put our rules in place, removes the other proxy mode's rules (see
/// [`svcproxy::cleanup::retire_other_mode`]). Failures are logged: our rules work either way, and `svcproxy audit`
/// names what is left.
async fn retire_other_mode(
    mode: ProxyMode,
    families: Vec<IpFamily>,
    mut status: watch::Receiver<EngineStatus>,
    order: RemovalOrder,
) {
    if status.wait_for(|s| s.applied.is_some()).await.is_err() {
        return;
    }
    let Some(retired) = order
        .retire(move || svcproxy::cleanup::retire_other_mode(&SystemRunner, mode, &families))
        .await
    else {
        tracing::info!("stopping: the other proxy mode's rules stay");
        return;
    };
    match retired {
        Ok(Ok(removed)) => {
            for item in &removed {
                tracing::debug!("removed the other proxy mode's {item}");
            }
            for line in svcproxy::cleanup::summarize_removed(&removed) {
                tracing::info!("removed the other proxy mode's {line}");
            }
        }
        Ok(Err(e)) => tracing::warn!("the other proxy mode's rules could not all be removed: {e}"),
        Err(e) => tracing::warn!("removing the other proxy mode's rules stopped: {e}"),
    }
}

fn sysctl_config(args: &RunArgs) -> ConntrackSysctlConfig {
    ConntrackSysctlConfig {
        max_per_core: u64::from(args.conntrack_max_per_core),
        min: u64::from(args.conntrack_min),
        tcp_established_timeout_secs: args.conntrack_tcp_timeout_established.as_secs(),
        tcp_close_wait_timeout_secs: args.conntrack_tcp_timeout_close_wait.as_secs(),
        tcp_be_liberal: args.conntrack_tcp_be_liberal,
        udp_timeout_secs: args.conntrack_udp_timeout.as_secs(),
        udp_stream_timeout_secs: args.conntrack_udp_timeout_stream.as_secs(),
    }
}

/// Sets kube-proxy's conntrack sysctls once the first sync has loaded conntrack (its files appear only
/// then). `nf_conntrack_max` can only be written from the host's network namespace: elsewhere that is a
/// warning, not a reason to stop, unlike upstream which exits and so fails exactly where people try it first.
async fn apply_conntrack_sysctls(config: ConntrackSysctlConfig, mut status: watch::Receiver<EngineStatus>) {
    if status.wait_for(|s| s.applied.is_some()).await.is_err() {
        return;
    }
    let cpus = node_cpus();
    let settings = plan_sysctls(&config, cpus);
    for outcome in tokio::task::spawn_blocking(move || apply_sysctls(&settings))
        .await
        .unwrap_or_default()
    {
        match &outcome.result {
            Ok(_) => tracing::debug!(
                path = outcome.setting.path,
                value = outcome.setting.value,
                "conntrack sysctl set"
            ),
            Err(e) if outcome.is_warning() => {
                tracing::warn!("{e} (expected outside the host network namespace)")
            }
            Err(e) => tracing::error!("{e}"),
        }
    }
}

/// The CPUs the conntrack table is sized for: the machine's, or what this process may use when `/sys` does
/// not say.
fn node_cpus() -> usize {
    online_cpus()
        .or_else(|| std::thread::available_parallelism().map(usize::from).ok())
        .unwrap_or(1)
}

/// Whether IPv4 NodePorts may answer on 127.0.0.1: iptables mode with `--iptables-localhost-nodeports`, and
/// NodePort addresses that can include the loopback network.
fn wants_route_localnet(args: &RunArgs) -> bool {
    args.proxy_mode == ProxyMode::Iptables
        && args.iptables_localhost_nodeports
        && NodePortSpec::parse(&args.nodeport_addresses).is_ok_and(|s| s.may_accept_ipv4_loopback())
}

/// Localhost NodePorts need `route_localnet`: without it the kernel will not route a packet from 127.0.0.1
/// off the loopback device after DNAT, and the rules alone do nothing on a node that never ran kube-proxy.
/// Set once, as upstream sets it; the KUBE-FIREWALL guard rule drops the martians it would let in.
fn enable_route_localnet() {
    let setting = SysctlSetting {
        path: ROUTE_LOCALNET,
        value: 1,
        mode: WriteMode::Set,
        failure_is_warning: false,
    };
    for outcome in apply_sysctls(&[setting]) {
        match outcome.result {
            Ok(_) => tracing::info!("route_localnet=1 for localhost NodePorts"),
            Err(e) => tracing::error!("{e}: NodePorts will not answer on 127.0.0.1"),
        }
    }
}

/// `--init-only`: the start-up settings that need privileges, applied now (an init container's job), then
/// exit. The conntrack files exist only once the module is loaded; a missing one is reported, not fatal, and
/// the daemon applies the settings again after its first sync.
fn init_only(args: &RunArgs) {
    let cpus = node_cpus();
    for outcome in apply_sysctls(&plan_sysctls(&sysctl_config(args), cpus)) {
        match &outcome.result {
            Ok(_) => tracing::info!(
                path = outcome.setting.path,
                value = outcome.setting.value,
                "sysctl set"
            ),
            Err(e) => tracing::warn!("{e}"),
        }
    }
    if wants_route_localnet(args) {
        enable_route_localnet();
    }
}

/// kube-proxy's nfacct packet counters, created for the rules to count into; `None` (and rules that count
/// nothing) when this kernel has no nfacct, as upstream does.
fn packet_counters() -> Option<Arc<dyn PacketCounters>> {
    let prepared = NetlinkPacketCounters::new()
        .and_then(|counters| svcproxy::packet_counters::prepare(Arc::new(counters)));
    match prepared {
        Ok(counters) => Some(counters),
        Err(e) => {
            tracing::info!("no packet counters (kubeproxy_iptables_*_packets_total): {e}");
            None
        }
    }
}

/// Gives the process the OOM score adjustment kube-proxy gives itself; a failure is a warning, as there.
fn set_own_oom_score_adj(value: i32) {
    match set_oom_score_adj(Path::new(OWN_OOM_SCORE_ADJ), value) {
        Ok(OomScoreApplied::Unchanged) => {}
        Ok(OomScoreApplied::Changed { from }) => {
            tracing::info!(from, to = value, "OOM score adjustment set")
        }
        Err(e) => tracing::warn!("{e}"),
    }
}

/// The `run` arguments as given on the command line, before `--config` was applied, and their matches: what
/// re-resolving the configuration file takes.
type CommandLine = (RunArgs, clap::ArgMatches);

async fn run(args: RunArgs, config_command_line: Option<CommandLine>) -> anyhow::Result<()> {
    let mode_name = match args.proxy_mode {
        ProxyMode::Iptables => "iptables",
        ProxyMode::Nftables => "nftables",
    };
    let node = node_name(&args)?;
    tracing::info!(node = %node, mode = mode_name, "starting svcproxy {}", env!("CARGO_PKG_VERSION"));
    set_own_oom_score_adj(args.oom_score_adj());

    let health = Arc::new(ProxyHealth::new(args.sync_period * 2));
    let packet_counters = match args.proxy_mode {
        ProxyMode::Iptables => packet_counters(),
        ProxyMode::Nftables => None,
    };
    let metrics = Arc::new(match &packet_counters {
        Some(counters) => Metrics::new().with_packet_counters(counters.clone()),
        None => Metrics::new(),
    });
    let app = AppState {
        health: health.clone(),
        metrics: metrics.clone(),
        proxy_mode: mode_name,
        configz: svcproxy::config_file::configz_json(&args).into(),
    };
    let hard_fail = args.upstream.bind_address_hard_fail == Some(true);
    let _health_server = http_server::serve(
        "health",
        args.healthz_bind_address,
        http_server::health_router(app.clone()),
        hard_fail,
    )
    .await?;
    // In iptables mode, the backend kubelet writes (or the one --iptables-backend names): chosen once, so the
    // daemon, its checks and its debug reads all agree on it.
    let backend = match args.proxy_mode {
        ProxyMode::Iptables => {
            let choice = backends::choose(args.iptables_backend, &SystemRunner);
            backends::require_installed(choice.backend, &SystemRunner).map_err(anyhow::Error::msg)?;
            tracing::info!(
                backend = choice.backend.name(),
                "writing the {} iptables backend: {}",
                choice.backend.name(),
                choice.reason
            );
            choice.backend
        }
        ProxyMode::Nftables => backends::Backend::Nft,
    };
    let served = families::served(
        families::primary(&args),
        &families::SystemFamilySupport {
            mode: args.proxy_mode,
            backend,
            runner: &SystemRunner,
        },
    );
    match &served.unserved {
        None => tracing::info!(primary = served.families[0].label(), "serving IPv4 and IPv6"),
        Some(u) => tracing::warn!("serving {} only: {}", served.families[0].label(), u.reason),
    }
    let families = served.families.clone();
    let counting = CountingSwitch::new(packet_counters.is_some());
    let debug = DebugState::new(&args, &node, backend, counting.clone())?;
    let _metrics_server = http_server::serve(
        "metrics",
        args.metrics_bind_address,
        http_server::metrics_router(app).merge(debug.router()),
        hard_fail,
    )
    .await?;

    let (tx, rx) = mpsc::channel(1024);
    let mut events: Arc<dyn EventSink> = Arc::new(NoEvents);
    let source_task = match &args.manifests {
        Some(dir) => {
            let dir = ManifestDir::new(dir, node.clone());
            let rejected = metrics.rejected_objects.clone();
            tokio::spawn(async move {
                if let Err(e) = source::manifest_watch::run(dir, tx, rejected).await {
                    tracing::error!("manifest source stopped: {e}");
                }
            })
        }
        None => {
            let client = source::kube_api::client(
                args.kubeconfig.as_ref(),
                args.master.as_deref(),
                Some(metrics.api_requests.clone()),
            )
            .await?;
            events = Arc::new(KubeEvents::new(client.clone(), &node));
            events.publish(ProxyEvent::Starting { node: node.clone() });
            let node = node.clone();
            tokio::spawn(source::kube_api::run(
                client,
                node,
                tx,
                metrics.rejected_objects.clone(),
            ))
        }
    };

    let conntrack = || match NetlinkConntrack::new() {
        Ok(ct) => Some(Box::new(ct) as Box<dyn svcproxy_conntrack::Conntrack>),
        Err(e) => {
            tracing::warn!("stale UDP flows will not be cleaned: cannot open conntrack netlink: {e}");
            None
        }
    };
    let intent_config = |family| IntentConfig {
        family,
        node_name: node.clone(),
    };
    let config_changed = match (&args.config, config_command_line) {
        (Some(path), Some((command_line, matches))) => Some(tokio::spawn(svcproxy::config_watch::watch(
            path.clone(),
            command_line,
            matches,
            args.clone(),
            metrics.config_file_unusable.clone(),
        ))),
        _ => None,
    };
    let shared = Shared {
        args: &args,
        config_changed,
        debug,
        health,
        metrics,
        source_task,
        events: rx,
        unserved: served.unserved,
        node: node.clone(),
        proxy_events: events,
    };
    match args.proxy_mode {
        ProxyMode::Iptables => {
            refuse_mixed_backends(backend)?;
            if wants_route_localnet(&args) && families.contains(&IpFamily::V4) {
                enable_route_localnet();
            }
            let mut proxiers = Vec::new();
            // Both families' restores move the one nf_tables generation: each records its own here, so
            // neither takes the other's for a foreign program's.
            let ledger = CommitLedger::default();
            for &family in &families {
                let mut options = ProxierOptions::from_args(&args, family)?;
                options.base.packet_counters = packet_counters.is_some();
                let mut proxier = IptablesProxier::new(
                    Box::new(backend.family_commands(family)),
                    Box::new(SystemAddresses),
                    intent_config(family),
                    options,
                );
                if let Some(ct) = conntrack() {
                    proxier = proxier.with_conntrack(ct);
                }
                // The debug endpoints follow the IPv4 engine.
                if family == IpFamily::V4 {
                    proxier = proxier.with_counting_switch(counting.clone());
                }
                proxier = proxier.with_other_proxies(OtherProxies::new(
                    Box::new(SystemRunner),
                    family,
                    ProxyMode::Iptables,
                ));
                // Only iptables-nft writes move the nf_tables generation the seal relies on.
                if backend == backends::Backend::Nft {
                    match NfTablesGeneration::open() {
                        Ok(generation) => {
                            proxier = proxier
                                .with_generation(Box::new(generation))
                                .with_commit_ledger(ledger.clone());
                            if let Some(&other) = families.iter().find(|f| **f != family) {
                                proxier =
                                    proxier.with_sibling_seals(Box::new(backend.family_commands(other)));
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "no nf_tables netlink socket; every restart reads the kernel whole")
                        }
                    }
                }
                if backend == backends::Backend::Legacy {
                    proxier = proxier.with_max_chains(svcproxy_iptables::staging::LEGACY_MAX_CHAINS);
                }
                if family == IpFamily::V4
                    && let Some(theirs) = backend.other().commands()
                {
                    proxier = proxier.with_other_backend(backend, Box::new(theirs));
                }
                proxiers.push(proxier);
            }
            drive(proxiers, shared).await
        }
        ProxyMode::Nftables => {
            let mut proxiers = Vec::new();
            for &family in &families {
                let mut proxier = NftProxier::new(
                    Box::new(SystemNft),
                    Box::new(SystemAddresses),
                    intent_config(family),
                    ProxierOptions::from_args(&args, family)?,
                )
                .with_kernel_release(&SystemKernelRelease);
                if let Some(ct) = conntrack() {
                    proxier = proxier.with_conntrack(ct);
                }
                match NetlinkElementSocket::new() {
                    Ok(w) => proxier = proxier.with_element_socket(Box::new(w)),
                    Err(e) => {
                        tracing::warn!(error = %e, "no nf_tables netlink socket; every update goes to nft")
                    }
                }
                match NfTablesGeneration::open() {
                    Ok(generation) => proxier = proxier.with_generation(Box::new(generation)),
                    Err(e) => {
                        tracing::warn!(error = %e, "no nf_tables generation; every periodic read-back lists the table")
                    }
                }
                proxier = proxier.with_other_proxies(OtherProxies::new(
                    Box::new(SystemRunner),
                    family,
                    ProxyMode::Nftables,
                ));
                proxiers.push(proxier);
            }
            drive(proxiers, shared).await
        }
    }
}

type ConfigWatchTask = tokio::task::JoinHandle<Result<String, svcproxy::config_watch::ConfigWatchError>>;

/// The reason to stop once the configuration file's watch finds other settings; never, without a watch or
/// when the file's directory cannot be watched (said once: the settings then change only with a restart).
async fn config_change(task: Option<ConfigWatchTask>) -> String {
    if let Some(task) = task {
        match task.await {
            Ok(Ok(reason)) => return reason,
            Ok(Err(e)) => {
                tracing::warn!("{e}; a change to the configuration file takes effect only on a restart")
            }
            Err(e) => tracing::warn!("the configuration file's watch stopped: {e}"),
        }
    }
    std::future::pending().await
}

/// What `run` hands to the engine, whichever backend it chose.
struct Shared<'a> {
    args: &'a RunArgs,
    /// Ends with the reason to stop when the `--config` file comes to mean other settings.
    config_changed: Option<ConfigWatchTask>,
    debug: DebugState,
    health: Arc<ProxyHealth>,
    metrics: Arc<Metrics>,
    source_task: tokio::task::JoinHandle<()>,
    events: mpsc::Receiver<svcproxy::source::SourceEvent>,
    unserved: Option<families::Unserved>,
    node: String,
    proxy_events: Arc<dyn EventSink>,
}

/// Runs one engine per proxier (one per IP family), fed from the one source, each with the health-check node
/// ports of its family. The first proxier's family is the primary: its engine serves the debug endpoints and
/// triggers the one-time steps after the first sync.
async fn drive<P: svcproxy::sync::proxier::Proxier + 'static>(
    proxiers: Vec<P>,
    shared: Shared<'_>,
) -> anyhow::Result<()> {
    let Shared {
        args,
        config_changed,
        debug,
        health,
        metrics,
        source_task,
        events,
        unserved,
        node,
        proxy_events,
    } = shared;
    let config = EngineConfig {
        min_sync_period: args.min_sync_period,
        sync_period: args.sync_period,
        unhealthy_after: args.unhealthy_after,
        verify_period: (!args.verify_period.is_zero()).then_some(args.verify_period),
        unserved,
        ..Default::default()
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut feeds = Vec::new();
    let mut inputs = Vec::new();
    for proxier in &proxiers {
        let (tx, rx) = mpsc::channel(1024);
        feeds.push((proxier.family(), tx));
        inputs.push(rx);
    }
    let fan_out = match (proxiers.len(), events) {
        (1, events) => {
            // One family: the engine reads the source directly.
            inputs = vec![events];
            None
        }
        (_, events) => Some(tokio::spawn(family_split::fan_out(events, feeds))),
    };
    let families: Vec<IpFamily> = proxiers.iter().map(|p| p.family()).collect();
    let removal_order = RemovalOrder::default();
    let mut engines = Vec::new();
    let mut statuses = Vec::new();
    for (i, (proxier, input)) in proxiers.into_iter().zip(inputs).enumerate() {
        let engine = Engine::new(proxier, config.clone(), health.clone(), metrics.clone());
        statuses.push((families[i], engine.status()));
        // The debug endpoints read and render IPv4 rules, whichever family is primary.
        if families[i] == IpFamily::V4 {
            debug.attach(engine.status());
        }
        if i == 0 {
            tokio::spawn(retire_other_mode(
                args.proxy_mode,
                families.clone(),
                engine.status(),
                removal_order.clone(),
            ));
            tokio::spawn(apply_conntrack_sysctls(sysctl_config(args), engine.status()));
        }
        let health_checks = ServiceHealthServers::for_family(families[i], health.clone(), metrics.clone())
            .with_events(proxy_events.clone(), &node);
        tokio::spawn(health_checks.run(engine.status()));
        let stop = stop_rx.clone();
        engines.push(tokio::spawn(async move {
            engine.run(input, stop).await;
        }));
    }
    let stopper = tokio::spawn(async move {
        let reason = tokio::select! {
            () = shutdown_signal() => {
                tracing::info!("shutting down; programmed rules stay in place");
                None
            }
            reason = config_change(config_changed) => {
                tracing::warn!("{reason}");
                Some(reason)
            }
        };
        let _ = stop_tx.send(true);
        reason
    });
    for engine in engines {
        engine.await.context("a sync engine stopped abnormally")?;
    }
    if let Some(f) = fan_out {
        f.abort();
    }
    source_task.abort();
    // `Some(None)`: stopped by a signal; `Some(Some(reason))`: by a configuration change.
    let stopped = if stopper.is_finished() {
        stopper.await.ok()
    } else {
        None
    };
    match stopped {
        Some(Some(reason)) => {
            // A non-zero status, as kube-proxy's: a service manager that restarts only on failure restarts
            // it. The rules stay: the restart takes them over.
            anyhow::bail!(reason);
        }
        Some(None) if args.proxy_mode == ProxyMode::Nftables => {
            removal_order.stop().await;
            // What each engine last programmed: the Services the other proxy must serve before our table goes.
            let served = statuses
                .iter()
                .map(|(family, status)| {
                    let ours = status
                        .borrow()
                        .applied
                        .as_deref()
                        .map(service_frontends)
                        .unwrap_or_default();
                    (*family, ours)
                })
                .collect();
            hand_back_table(served).await;
        }
        _ => {}
    }
    Ok(())
}

/// How long a hand-back waits for another proxy's rules to serve every Service ours did: a kube-proxy put
/// back moments before may still be writing its first sync. Well inside a pod's default 30 s grace period.
const HAND_BACK_PATIENCE: Duration = Duration::from_secs(10);

/// On the way out in nftables mode, our table goes where another proxy already serves the node, and stays
/// everywhere else (see [`svcproxy::hand_back`]).
async fn hand_back_table(families: Vec<Served>) {
    let outcomes = tokio::task::spawn_blocking(move || {
        step_aside_once_served(
            &SystemRunner,
            &families,
            svcproxy_nftables::config::TABLE_NAME,
            HAND_BACK_PATIENCE,
            Duration::from_secs(1),
        )
    })
    .await
    .unwrap_or_default();
    for outcome in outcomes {
        match outcome {
            StepAside::Kept => {}
            StepAside::Removed { table, found } => tracing::info!(
                "handed the node back: removed our table {table}, because another proxy's rules are in place \
                 and decide Service traffic ({found})"
            ),
            StepAside::Unserved {
                table,
                found,
                unserved,
                count,
            } => tracing::warn!(
                "kept our table {table}, so our Services keep working: another proxy's rules are in place \
                 ({found}) but after {}s they still do not serve {count} of them, e.g. {} (leftovers nobody \
                 keeps up, or a proxy that has not synced); once the other proxy serves every Service, \
                 `nft delete table {table}`",
                HAND_BACK_PATIENCE.as_secs(),
                unserved.join(", ")
            ),
            StepAside::Failed { table, error } => tracing::warn!(
                "another proxy's rules are in place, but our table {table} could not be removed: {error}"
            ),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let matches =
        Cli::command().get_matches_from(svcproxy::implied_run::with_run_implied(std::env::args_os()));
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    match cli.command {
        Command::Run(args) => {
            let run_matches = matches.subcommand_matches("run").expect("clap matched `run`");
            let command_line = (*args).clone();
            let resolved = config_file::resolve(*args, run_matches)?;
            resolved.args.check().map_err(anyhow::Error::msg)?;
            let flag_warnings = resolved.args.upstream.check();
            init_logging(resolved.args.log_format, resolved.args.upstream.log_level());
            for warning in &resolved.warnings {
                tracing::warn!("configuration: {warning}");
            }
            for warning in &flag_warnings {
                tracing::warn!("flags: {warning}");
            }
            if resolved.args.upstream.cleanup {
                return cleanup(false);
            }
            if resolved.args.upstream.init_only {
                init_only(&resolved.args);
                return Ok(());
            }
            if let Some(path) = &resolved.args.write_config_to {
                config_file::write_effective_config(&resolved.args, path)?;
                return Ok(());
            }
            let watch = resolved
                .args
                .config
                .is_some()
                .then(|| (command_line, run_matches.clone()));
            run(resolved.args, watch).await
        }
        Command::Cleanup(args) => {
            init_logging(LogFormat::Text, "info");
            cleanup(args.dry_run)
        }
        Command::Explain(args) => {
            init_logging(LogFormat::Text, "info");
            let mut args = *args;
            args.run = daemon_settings(args.run, &matches, "explain")?;
            let report = svcproxy::explain::command(&args).await;
            let disagree = report.as_ref().is_ok_and(|r| r.agree == Some(false));
            finish(report, args.output, svcproxy::explain::render_text, disagree)
        }
        Command::Diff(args) => {
            init_logging(LogFormat::Text, "info");
            let mut args = *args;
            args.run = daemon_settings(args.run, &matches, "diff")?;
            let report = svcproxy::diff::command(&args).await;
            let differ = report.as_ref().is_ok_and(|r| !r.equal);
            finish(report, args.output, svcproxy::diff::render_text, differ)
        }
        Command::Status(args) => {
            let report = svcproxy::status::command(&args.daemon);
            let failing = report.as_ref().is_ok_and(|r| r.last_error.is_some());
            finish(report, args.output, svcproxy::status::render_text, failing)
        }
        Command::Audit(args) => {
            let report = svcproxy::audit::command(&SystemRunner, &args.file);
            let hazards = report.as_ref().is_ok_and(|r| !r.clean);
            finish(report, args.output, svcproxy::audit::render_text, hazards)
        }
    }
}

/// `svcproxy cleanup` (and `run --cleanup`): removes, or with `dry_run` lists, every proxy's leftovers.
fn cleanup(dry_run: bool) -> anyhow::Result<()> {
    let removed = svcproxy::cleanup::cleanup(&SystemRunner, dry_run)?;
    let verb = if dry_run { "would remove" } else { "removed" };
    if removed.is_empty() {
        println!("nothing to remove");
    }
    for item in removed {
        println!("{verb} {item}");
    }
    Ok(())
}

/// The daemon's settings for the commands that render its intent: the flags given, with its `--config` file
/// applied the way `run` applies it.
/// A configuration that cannot be read means the command could not look: exit status 2, like [`finish`].
fn daemon_settings(args: RunArgs, matches: &clap::ArgMatches, subcommand: &str) -> anyhow::Result<RunArgs> {
    let sub = matches
        .subcommand_matches(subcommand)
        .context("clap matched the subcommand")?;
    let resolved = config_file::resolve(args, sub).unwrap_or_else(|e| {
        eprintln!("error: {e}");
        std::process::exit(2)
    });
    for warning in &resolved.warnings {
        tracing::warn!("configuration: {warning}");
    }
    let flag_warnings = resolved.args.upstream.check();
    for warning in &flag_warnings {
        tracing::warn!("flags: {warning}");
    }
    Ok(resolved.args)
}

/// Prints a report and exits: 0, or 1 when `flagged` (a difference, a hazard); 2 when the command could not
/// do its job, so scripts can tell "found something" from "could not look".
fn finish<R: serde::Serialize, E: std::fmt::Display>(
    result: Result<R, E>,
    output: OutputFormat,
    text: fn(&R) -> String,
    flagged: bool,
) -> anyhow::Result<()> {
    match result {
        Ok(report) => {
            match output {
                OutputFormat::Text => print!("{}", text(&report)),
                OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
            }
            std::process::exit(i32::from(flagged))
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2)
        }
    }
}
