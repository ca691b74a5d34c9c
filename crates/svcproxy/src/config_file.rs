//! KubeProxyConfiguration files (`kubeproxy.config.k8s.io/v1alpha1`), so a node can switch between kube-proxy
//! and svcproxy with the same configuration.
//!
//! Reading follows upstream's rules: a field that is absent, `null` or zero takes kube-proxy's default
//! (kubeadm writes every field, most of them as zero values, and means "default" by it), and the file wins
//! over the flags for every setting it can express, except the node name and the logging flags. Whatever
//! kube-proxy starts with, svcproxy starts with, and nothing is dropped without a word:
//! - a flag the file overrides is ignored with a warning naming it (kube-proxy ignores it silently);
//! - an unknown field (a misspelling, or one of an older or newer version) is ignored with a warning naming
//!   it, as kube-proxy's lenient decoding ignores it after its strict decoding failed;
//! - a value out of range is an error naming the field;
//! - settings of what svcproxy does not run (the ipvs and Windows sections, `portRange`, profiling), and
//!   fields that only tune something svcproxy does not have (`configSyncPeriod`,
//!   `featureGates`, client throttling, klog settings), are accepted with a warning for the caller to log;
//! - only a mode svcproxy cannot run (`ipvs`, `kernelspace`) is refused.
//!
//! One deliberate difference from kube-proxy: an unset `iptables.localhostNodePorts` means off here, as the
//! `--iptables-localhost-nodeports` flag does (see the flag's help for why).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::ArgMatches;
use clap::ValueEnum;
use clap::parser::ValueSource;
use ipnet::IpNet;
use serde::Deserialize;
use serde_json::Value;

use crate::cli::{DetectLocalMode, LogFormat, ProxyMode, RunArgs, format_duration, parse_duration};
use crate::node_addresses::NodePortSpec;
use crate::oom_score::DEFAULT_OOM_SCORE_ADJ;

pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
/// The API group `/configz` files the configuration under.
const API_GROUP: &str = "kubeproxy.config.k8s.io";
pub const KIND: &str = "KubeProxyConfiguration";

// kube-proxy's defaults for settings that have no flag default to borrow (the rest come from the flags'
// defaults in cli.rs, which are the same numbers).
const DEFAULT_MASQUERADE_BIT: u8 = 14;
const DEFAULT_SYNC_PERIOD: Duration = Duration::from_secs(30);
const DEFAULT_MIN_SYNC_PERIOD: Duration = Duration::from_secs(1);
const DEFAULT_CONNTRACK_MAX_PER_CORE: u32 = 32 * 1024;
const DEFAULT_CONNTRACK_MIN: u32 = 128 * 1024;
const DEFAULT_TCP_ESTABLISHED_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
const DEFAULT_TCP_CLOSE_WAIT_TIMEOUT: Duration = Duration::from_secs(3600);
const HEALTHZ_PORT: u16 = 10256;
const METRICS_PORT: u16 = 10249;

// The underlying errors are part of each message rather than a `source`: each message is complete on its
// own, and a chain would print every cause twice.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("cannot read {}: {error}", path.display())]
    Read { path: PathBuf, error: std::io::Error },
    #[error("cannot write {}: {error}", path.display())]
    Write { path: PathBuf, error: std::io::Error },
    #[error("not valid YAML: {0}")]
    Yaml(String),
    #[error("the document is empty; expected a {KIND}")]
    Empty,
    #[error("{field}: unknown field (not part of {KIND} {API_VERSION})")]
    UnknownField { field: String },
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("{field}: {reason}")]
    Unsupported { field: String, reason: String },
    #[error("{}: {error}", path.display())]
    InFile {
        path: PathBuf,
        error: Box<ConfigFileError>,
    },
}

impl ConfigFileError {
    /// The field an error is about (`iptables.masqueradeBit`), if it is about one.
    pub fn field(&self) -> Option<&str> {
        match self {
            ConfigFileError::UnknownField { field }
            | ConfigFileError::Invalid { field, .. }
            | ConfigFileError::Unsupported { field, .. } => Some(field),
            ConfigFileError::InFile { error, .. } => error.field(),
            _ => None,
        }
    }

    fn invalid(field: &str, reason: impl Into<String>) -> Self {
        ConfigFileError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }

    fn unsupported(field: &str, reason: impl Into<String>) -> Self {
        ConfigFileError::Unsupported {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// What a configuration file says, with kube-proxy's defaulting applied: every setting has its final value,
/// so merging is "the file's, for everything it can express".
#[derive(Debug, Clone, PartialEq)]
pub struct FileConfig {
    pub mode: ProxyMode,
    pub kubeconfig: Option<PathBuf>,
    pub hostname_override: Option<String>,
    pub cluster_cidr: Vec<IpNet>,
    pub detect_local_mode: DetectLocalMode,
    pub pod_bridge_interface: Option<String>,
    pub pod_interface_name_prefix: Option<String>,
    pub nodeport_addresses: Vec<String>,
    pub healthz_bind_address: SocketAddr,
    pub metrics_bind_address: SocketAddr,
    /// `bindAddress`: the node's address(es), overriding the Node object's (see `--bind-address`).
    pub bind_address: Vec<IpAddr>,
    /// `bindAddressHardFail`: exit when the health or metrics address cannot be bound, instead of retrying.
    pub bind_address_hard_fail: bool,
    /// The `iptables` section; used when the mode is iptables.
    pub iptables: ModeSection,
    /// The `nftables` section; used when the mode is nftables.
    pub nftables: ModeSection,
    pub iptables_localhost_nodeports: bool,
    /// Top-level `syncPeriod` (the newer spelling); when set it wins over the mode section's.
    pub sync_period: Option<Duration>,
    /// Top-level `minSyncPeriod`; when set it wins over the mode section's.
    pub min_sync_period: Option<Duration>,
    pub conntrack_max_per_core: u32,
    pub conntrack_min: u32,
    pub conntrack_tcp_timeout_established: Duration,
    pub conntrack_tcp_timeout_close_wait: Duration,
    pub conntrack_tcp_be_liberal: bool,
    pub conntrack_udp_timeout: Duration,
    pub conntrack_udp_timeout_stream: Duration,
    /// `oomScoreAdj`; unset or `null` (what kubeadm writes) is kube-proxy's -999, and unlike most fields an
    /// explicit 0 is 0, as kube-proxy reads it.
    pub oom_score_adj: i32,
    pub log_format: LogFormat,
    /// Settings the file makes that svcproxy accepts but does not act on, one sentence each.
    pub warnings: Vec<String>,
}

/// The per-mode settings (`iptables.*`, `nftables.*`).
#[derive(Debug, Clone, PartialEq)]
pub struct ModeSection {
    pub masquerade_all: bool,
    pub masquerade_bit: u8,
    pub sync_period: Duration,
    pub min_sync_period: Duration,
}

/// The `run` arguments once the configuration file is applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    pub args: RunArgs,
    /// What the file sets that has no effect in svcproxy, and the flags the file overrides; log these.
    pub warnings: Vec<String>,
}

/// Applies `--config`, if given: reads the file and lets it supply every setting it can express (see
/// [`merge`]); the flags it overrides come back as warnings. `run_matches` are the `run` subcommand's
/// matches, the ones `args` was built from.
pub fn resolve(args: RunArgs, run_matches: &ArgMatches) -> Result<Resolved, ConfigFileError> {
    let Some(path) = args.config.clone() else {
        let (args, warnings) = with_port_flags(with_bind_address(args, run_matches), run_matches);
        return Ok(Resolved { args, warnings });
    };
    let text = std::fs::read_to_string(&path).map_err(|error| ConfigFileError::Read {
        path: path.clone(),
        error,
    })?;
    let file = parse(&text).map_err(|e| ConfigFileError::InFile {
        path: path.clone(),
        error: Box::new(e),
    })?;
    let mut warnings = file.warnings.clone();
    warnings.extend(ignored_flags(run_matches));
    Ok(Resolved {
        args: merge(args, run_matches, &file),
        warnings,
    })
}

/// `--bind-address` without a file, as kube-proxy takes it there: one IPv6 address moves the health and metrics
/// servers' defaults to IPv6, as the file's `bindAddress` does.
fn with_bind_address(mut args: RunArgs, run_matches: &ArgMatches) -> RunArgs {
    let explicit = |id: &str| run_matches.value_source(id) == Some(ValueSource::CommandLine);
    if let [IpAddr::V6(_)] = args.upstream.bind_address.as_slice() {
        if !explicit("healthz_bind_address") {
            args.healthz_bind_address = SocketAddr::new(IpAddr::from([0u16; 8]), HEALTHZ_PORT);
        }
        if !explicit("metrics_bind_address") {
            args.metrics_bind_address = SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), METRICS_PORT);
        }
    }
    args
}

/// kube-proxy's deprecated `--healthz-port` and `--metrics-port` without a file, as it takes them there: 0
/// turns the server off (a port of 0 in the address says so: no server listens on a port the kernel picks);
/// another port completes an address given as a bare IP, and does nothing next to one that names its port
/// (the default addresses do). As in kube-proxy, not with `--write-config-to`, whose file cannot say "off".
fn with_port_flags(mut args: RunArgs, run_matches: &ArgMatches) -> (RunArgs, Vec<String>) {
    let mut warnings = Vec::new();
    if args.write_config_to.is_some() {
        return (args, warnings);
    }
    let bare_ip = |id: &str| {
        run_matches.value_source(id) == Some(ValueSource::CommandLine)
            && run_matches
                .get_raw(id)
                .and_then(|mut v| v.next())
                .and_then(|v| v.to_str())
                .is_some_and(|v| v.trim().parse::<IpAddr>().is_ok())
    };
    let mut apply = |port: Option<u16>,
                     address: &mut SocketAddr,
                     id: &str,
                     flag: &str,
                     address_flag: &str| {
        match port {
            None => {}
            Some(0) => address.set_port(0),
            Some(port) if bare_ip(id) => address.set_port(port),
            Some(port) => warnings.push(format!(
                "{flag}={port}: no effect, because {address_flag} ({address}) names its port, as in kube-proxy"
            )),
        }
    };
    apply(
        args.upstream.healthz_port,
        &mut args.healthz_bind_address,
        "healthz_bind_address",
        "--healthz-port",
        "--healthz-bind-address",
    );
    apply(
        args.upstream.metrics_port,
        &mut args.metrics_bind_address,
        "metrics_bind_address",
        "--metrics-port",
        "--metrics-bind-address",
    );
    (args, warnings)
}

/// The flags a configuration file overrides, by clap id, with the file field that applies instead. As in
/// kube-proxy (whose help says of each "ignored if a config file is specified by --config"), once a file is
/// given these flags do nothing: a DaemonSet's leftover flags, which kube-proxy has been ignoring, must not
/// start to count when the node switches to svcproxy. Only `--hostname-override`, the logging flags and
/// svcproxy's own flags (which no file can express) apply next to a file.
const FILE_WINS: &[(&str, &str, &str)] = &[
    ("proxy_mode", "--proxy-mode", "mode"),
    ("kubeconfig", "--kubeconfig", "clientConnection.kubeconfig"),
    ("cluster_cidr", "--cluster-cidr", "clusterCIDR"),
    ("detect_local_mode", "--detect-local-mode", "detectLocalMode"),
    (
        "pod_bridge_interface",
        "--pod-bridge-interface",
        "detectLocal.bridgeInterface",
    ),
    (
        "pod_interface_name_prefix",
        "--pod-interface-name-prefix",
        "detectLocal.interfaceNamePrefix",
    ),
    ("nodeport_addresses", "--nodeport-addresses", "nodePortAddresses"),
    (
        "healthz_bind_address",
        "--healthz-bind-address",
        "healthzBindAddress",
    ),
    (
        "metrics_bind_address",
        "--metrics-bind-address",
        "metricsBindAddress",
    ),
    ("healthz_port", "--healthz-port", "healthzBindAddress"),
    ("metrics_port", "--metrics-port", "metricsBindAddress"),
    ("bind_address", "--bind-address", "bindAddress"),
    (
        "bind_address_hard_fail",
        "--bind-address-hard-fail",
        "bindAddressHardFail",
    ),
    (
        "iptables_localhost_nodeports",
        "--iptables-localhost-nodeports",
        "iptables.localhostNodePorts",
    ),
    ("masquerade_all", "--masquerade-all", "<mode>.masqueradeAll"),
    (
        "iptables_masquerade_bit",
        "--iptables-masquerade-bit",
        "<mode>.masqueradeBit",
    ),
    (
        "sync_period",
        "--sync-period/--iptables-sync-period",
        "syncPeriod",
    ),
    (
        "min_sync_period",
        "--min-sync-period/--iptables-min-sync-period",
        "minSyncPeriod",
    ),
    (
        "conntrack_max_per_core",
        "--conntrack-max-per-core",
        "conntrack.maxPerCore",
    ),
    ("conntrack_min", "--conntrack-min", "conntrack.min"),
    (
        "conntrack_tcp_timeout_established",
        "--conntrack-tcp-timeout-established",
        "conntrack.tcpEstablishedTimeout",
    ),
    (
        "conntrack_tcp_timeout_close_wait",
        "--conntrack-tcp-timeout-close-wait",
        "conntrack.tcpCloseWaitTimeout",
    ),
    (
        "conntrack_tcp_be_liberal",
        "--conntrack-tcp-be-liberal",
        "conntrack.tcpBeLiberal",
    ),
    (
        "conntrack_udp_timeout",
        "--conntrack-udp-timeout",
        "conntrack.udpTimeout",
    ),
    (
        "conntrack_udp_timeout_stream",
        "--conntrack-udp-timeout-stream",
        "conntrack.udpStreamTimeout",
    ),
    ("oom_score_adj", "--oom-score-adj", "oomScoreAdj"),
];

/// One warning per flag given on the command line that a configuration file overrides (see [`FILE_WINS`]),
/// naming the flag as given and the file field that applies instead.
pub fn ignored_flags(run_matches: &ArgMatches) -> Vec<String> {
    FILE_WINS
        .iter()
        .filter(|(id, _, _)| run_matches.value_source(id) == Some(ValueSource::CommandLine))
        .map(|(id, flag, field)| {
            let given: Vec<String> = run_matches
                .get_raw(id)
                .into_iter()
                .flatten()
                .map(|v| v.to_string_lossy().into_owned())
                .collect();
            let spelled = if given.is_empty() {
                (*flag).to_string()
            } else {
                format!("{flag}={}", given.join(","))
            };
            format!(
                "{spelled}: ignored, because --config is given and the file's {field} applies instead (as in \
                 kube-proxy, only --hostname-override and the logging flags override a configuration file)"
            )
        })
        .collect()
}

/// The settings `args` end up with once `file` is applied: every setting a KubeProxyConfiguration can express
/// comes from the file, whatever the command line says ([`FILE_WINS`]), except the node name and the log
/// format, where a flag given explicitly wins, as in kube-proxy. An environment variable does not count as
/// given: `NODE_NAME` is a fallback for the node name, below a `hostnameOverride` in the file.
pub fn merge(args: RunArgs, run_matches: &ArgMatches, file: &FileConfig) -> RunArgs {
    let explicit = |id: &str| run_matches.value_source(id) == Some(ValueSource::CommandLine);
    let mut out = args;
    macro_rules! from_file {
        ($($field:ident),* $(,)?) => {
            $( out.$field = file.$field.clone(); )*
        };
    }
    from_file!(
        cluster_cidr,
        detect_local_mode,
        pod_bridge_interface,
        pod_interface_name_prefix,
        nodeport_addresses,
        healthz_bind_address,
        metrics_bind_address,
        iptables_localhost_nodeports,
        conntrack_max_per_core,
        conntrack_min,
        conntrack_tcp_timeout_established,
        conntrack_tcp_timeout_close_wait,
        conntrack_tcp_be_liberal,
        conntrack_udp_timeout,
        conntrack_udp_timeout_stream,
    );
    // Logging flags win over the file's `logging` section, as kube-proxy copies them over it.
    if !explicit("log_format") {
        out.log_format = file.log_format;
    }
    out.proxy_mode = file.mode;
    // An unspecified address (the usual 0.0.0.0) says nothing of the node.
    out.upstream.bind_address = file
        .bind_address
        .iter()
        .copied()
        .filter(|ip| !ip.is_unspecified())
        .collect();
    out.upstream.bind_address_hard_fail = file.bind_address_hard_fail.then_some(true);
    // Unset means the default, as for the flag.
    out.upstream.oom_score_adj = (file.oom_score_adj != DEFAULT_OOM_SCORE_ADJ).then_some(file.oom_score_adj);
    // As upstream: the section of the mode in effect applies, the other one is ignored.
    let section = match out.proxy_mode {
        ProxyMode::Iptables => &file.iptables,
        ProxyMode::Nftables => &file.nftables,
    };
    out.masquerade_all = section.masquerade_all;
    out.iptables_masquerade_bit = section.masquerade_bit;
    out.sync_period = file.sync_period.unwrap_or(section.sync_period);
    out.min_sync_period = file.min_sync_period.unwrap_or(section.min_sync_period);
    if !explicit("hostname_override") && file.hostname_override.is_some() {
        out.hostname_override = file.hostname_override.clone();
    }
    // --manifests replaces the API server, so a kubeconfig from the file has nothing to configure; keeping it
    // would also break the rule that the two are never both set.
    out.kubeconfig = if out.manifests.is_some() {
        None
    } else {
        file.kubeconfig.clone()
    };
    out
}

/// Writes [`effective_config_yaml`] to `path` (`--write-config-to`).
pub fn write_effective_config(args: &RunArgs, path: &Path) -> Result<(), ConfigFileError> {
    std::fs::write(path, effective_config_yaml(args)).map_err(|error| ConfigFileError::Write {
        path: path.to_path_buf(),
        error,
    })
}

/// The effective configuration as a KubeProxyConfiguration: every setting svcproxy supports, with its value.
/// It reads back to the same arguments (except a zero `--min-sync-period`, which a file cannot express), and
/// uses only fields kube-proxy knows, so the same file can configure kube-proxy after a rollback.
pub fn effective_config_yaml(args: &RunArgs) -> String {
    let q = |s: &str| serde_json::to_string(s).expect("a string always serializes");
    let path = |p: &Option<PathBuf>| q(&p.as_deref().map(|p| p.to_string_lossy()).unwrap_or_default());
    let opt = |s: &Option<String>| q(s.as_deref().unwrap_or(""));
    let d = |d: Duration| q(&format_duration(d));
    let mode = match args.proxy_mode {
        ProxyMode::Iptables => "iptables",
        ProxyMode::Nftables => "nftables",
    };
    let detect_local_mode = args
        .detect_local_mode
        .to_possible_value()
        .expect("every mode has a name");
    let log_format = match args.log_format {
        LogFormat::Text => "text",
        LogFormat::Json => "json",
    };
    let cidrs: Vec<String> = args.cluster_cidr.iter().map(ToString::to_string).collect();
    let nodeports: Vec<String> = args.nodeport_addresses.iter().map(|a| q(a)).collect();

    let mut y = String::new();
    y.push_str(
        "# svcproxy's effective configuration: its configuration file and command-line flags merged.\n",
    );
    if args.manifests.is_some() {
        y.push_str(
            "# It was reading a manifest directory (--manifests), which a configuration file cannot say.\n",
        );
    }
    y.push_str(&format!("apiVersion: {API_VERSION}\nkind: {KIND}\n"));
    y.push_str(&format!("mode: {mode}\n"));
    y.push_str(&format!(
        "clientConnection:\n  kubeconfig: {}\n",
        path(&args.kubeconfig)
    ));
    y.push_str(&format!("hostnameOverride: {}\n", opt(&args.hostname_override)));
    y.push_str(&format!("clusterCIDR: {}\n", q(&cidrs.join(","))));
    y.push_str(&format!("detectLocalMode: {}\n", detect_local_mode.get_name()));
    y.push_str(&format!(
        "detectLocal:\n  bridgeInterface: {}\n  interfaceNamePrefix: {}\n",
        opt(&args.pod_bridge_interface),
        opt(&args.pod_interface_name_prefix)
    ));
    y.push_str(&format!("nodePortAddresses: [{}]\n", nodeports.join(", ")));
    if !args.upstream.bind_address.is_empty() {
        let ips: Vec<String> = args
            .upstream
            .bind_address
            .iter()
            .map(ToString::to_string)
            .collect();
        y.push_str(&format!("bindAddress: {}\n", q(&ips.join(","))));
    }
    if args.upstream.bind_address_hard_fail == Some(true) {
        y.push_str("bindAddressHardFail: true\n");
    }
    y.push_str(&format!(
        "healthzBindAddress: {}\n",
        q(&args.healthz_bind_address.to_string())
    ));
    y.push_str(&format!(
        "metricsBindAddress: {}\n",
        q(&args.metrics_bind_address.to_string())
    ));
    if args.min_sync_period.is_zero() {
        y.push_str(
            "# minSyncPeriod is 0 (no batching), which a file cannot say: 0s here means the default, 1s,\n\
             # as it does for kube-proxy, and next to a file the flag is ignored as well.\n",
        );
    }
    // Both sections carry the same values, so the file means the same thing whichever mode reads it.
    for section in ["iptables", "nftables"] {
        y.push_str(&format!("{section}:\n"));
        y.push_str(&format!("  masqueradeAll: {}\n", args.masquerade_all));
        y.push_str(&format!("  masqueradeBit: {}\n", args.iptables_masquerade_bit));
        if section == "iptables" {
            y.push_str(&format!(
                "  localhostNodePorts: {}\n",
                args.iptables_localhost_nodeports
            ));
        }
        y.push_str(&format!("  syncPeriod: {}\n", d(args.sync_period)));
        y.push_str(&format!("  minSyncPeriod: {}\n", d(args.min_sync_period)));
    }
    y.push_str("conntrack:\n");
    y.push_str(&format!("  maxPerCore: {}\n", args.conntrack_max_per_core));
    y.push_str(&format!("  min: {}\n", args.conntrack_min));
    y.push_str(&format!(
        "  tcpEstablishedTimeout: {}\n",
        d(args.conntrack_tcp_timeout_established)
    ));
    y.push_str(&format!(
        "  tcpCloseWaitTimeout: {}\n",
        d(args.conntrack_tcp_timeout_close_wait)
    ));
    y.push_str(&format!("  tcpBeLiberal: {}\n", args.conntrack_tcp_be_liberal));
    y.push_str(&format!("  udpTimeout: {}\n", d(args.conntrack_udp_timeout)));
    y.push_str(&format!(
        "  udpStreamTimeout: {}\n",
        d(args.conntrack_udp_timeout_stream)
    ));
    y.push_str(&format!("oomScoreAdj: {}\n", args.oom_score_adj()));
    y.push_str(&format!("logging:\n  format: {log_format}\n"));
    y
}

/// The effective configuration as upstream's `/configz` serves it: the KubeProxyConfiguration as JSON, under
/// its API group.
pub fn configz_json(args: &RunArgs) -> String {
    let config: Value = serde_saphyr::from_str(&effective_config_yaml(args)).unwrap_or(Value::Null);
    serde_json::json!({ API_GROUP: config }).to_string()
}

/// Parses and validates a KubeProxyConfiguration document.
pub fn parse(yaml: &str) -> Result<FileConfig, ConfigFileError> {
    // Through a generic value first: serde_path_to_error then names the field of any type error, which the
    // YAML deserializer alone would report only by line and column.
    let value: Value = serde_saphyr::from_str(yaml).map_err(|e| ConfigFileError::Yaml(e.to_string()))?;
    if value.is_null() {
        return Err(ConfigFileError::Empty);
    }
    // Strict first; each unknown field is then dropped with a warning and the document read again.
    let mut value = value;
    let mut ignored = Vec::new();
    let raw: RawConfig = loop {
        let error = match serde_path_to_error::deserialize(value.clone()) {
            Ok(raw) => break raw,
            Err(e) => e,
        };
        let field = match error.path().to_string() {
            p if p == "." => String::new(),
            p => p,
        };
        let message = error.inner().to_string();
        let unknown = match unknown_field_name(&message) {
            Some(name) if field.is_empty() => name,
            Some(name) if !field.ends_with(&name) => format!("{field}.{name}"),
            Some(_) => field,
            None if field.is_empty() => return Err(ConfigFileError::invalid("(document)", message)),
            None => {
                return Err(ConfigFileError::Invalid {
                    field,
                    reason: message,
                });
            }
        };
        if !remove_field(&mut value, &unknown) {
            return Err(ConfigFileError::UnknownField { field: unknown });
        }
        ignored.push(unknown);
    };
    let mut config = raw.validate()?;
    config.warnings.extend(ignored.into_iter().map(|field| {
        format!("{field}: unknown field, ignored (as kube-proxy's lenient decoding ignores it)")
    }));
    Ok(config)
}

/// Removes the field at the dotted `path` from an object tree; false if there is none to remove.
fn remove_field(value: &mut Value, path: &str) -> bool {
    let mut parts: Vec<&str> = path.split('.').collect();
    let Some(last) = parts.pop() else {
        return false;
    };
    let mut at = value;
    for part in parts {
        match at.get_mut(part) {
            Some(next) => at = next,
            None => return false,
        }
    }
    at.as_object_mut().is_some_and(|o| o.remove(last).is_some())
}

/// The field name in serde's "unknown field `x`, expected one of …" message.
fn unknown_field_name(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    Some(rest[..rest.find('`')?].to_string())
}

/// A Go-style duration string (`30s`, `1m0s`).
#[derive(Debug, Clone, Copy, PartialEq)]
struct GoDuration(Duration);

impl<'de> Deserialize<'de> for GoDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = GoDuration;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a duration such as \"30s\" or \"1m0s\"")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<GoDuration, E> {
                parse_duration(text).map(GoDuration).map_err(E::custom)
            }
        }
        d.deserialize_str(Visitor)
    }
}

/// The non-zero duration, if any: zero means "default" in these files.
fn set(d: Option<GoDuration>) -> Option<Duration> {
    d.map(|d| d.0).filter(|d| !d.is_zero())
}

/// The non-empty string, if any.
fn non_empty(s: &Option<String>) -> Option<&str> {
    s.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

/// Whether a value is what kubeadm writes for "not set": null, false, 0, "", "0", "0s", empty lists and maps,
/// and maps of nothing but those.
fn is_zero(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty() || s == "0" || parse_duration(s).is_ok_and(|d| d.is_zero()),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.values().all(is_zero),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
struct RawConfig {
    api_version: Option<String>,
    kind: Option<String>,
    bind_address: Option<String>,
    bind_address_hard_fail: Option<bool>,
    client_connection: Option<RawClientConnection>,
    #[serde(rename = "clusterCIDR")]
    cluster_cidr: Option<String>,
    config_sync_period: Option<GoDuration>,
    conntrack: Option<RawConntrack>,
    detect_local: Option<RawDetectLocal>,
    detect_local_mode: Option<String>,
    enable_profiling: Option<bool>,
    feature_gates: Option<BTreeMap<String, bool>>,
    healthz_bind_address: Option<String>,
    hostname_override: Option<String>,
    iptables: Option<RawIptables>,
    ipvs: Option<RawIpvs>,
    logging: Option<RawLogging>,
    metrics_bind_address: Option<String>,
    min_sync_period: Option<GoDuration>,
    mode: Option<String>,
    nftables: Option<RawNftables>,
    node_port_addresses: Option<Vec<String>>,
    oom_score_adj: Option<i64>,
    port_range: Option<String>,
    show_hidden_metrics_for_version: Option<String>,
    sync_period: Option<GoDuration>,
    winkernel: Option<RawWinkernel>,
    windows_run_as_service: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
struct RawClientConnection {
    kubeconfig: Option<String>,
    accept_content_types: Option<String>,
    content_type: Option<String>,
    qps: Option<f64>,
    burst: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
struct RawConntrack {
    max_per_core: Option<i64>,
    min: Option<i64>,
    tcp_established_timeout: Option<GoDuration>,
    tcp_close_wait_timeout: Option<GoDuration>,
    tcp_be_liberal: Option<bool>,
    udp_timeout: Option<GoDuration>,
    udp_stream_timeout: Option<GoDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
struct RawDetectLocal {
    bridge_interface: Option<String>,
    interface_name_prefix: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
struct RawIptables {
    masquerade_all: Option<bool>,
    masquerade_bit: Option<i64>,
    localhost_node_ports: Option<bool>,
    sync_period: Option<GoDuration>,
    min_sync_period: Option<GoDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
struct RawNftables {
    masquerade_all: Option<bool>,
    masquerade_bit: Option<i64>,
    sync_period: Option<GoDuration>,
    min_sync_period: Option<GoDuration>,
}

// The sections of modes svcproxy does not have: the field names are checked, the values only for being unset.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
struct RawIpvs {
    sync_period: Value,
    min_sync_period: Value,
    scheduler: Value,
    #[serde(rename = "excludeCIDRs")]
    exclude_cidrs: Value,
    #[serde(rename = "strictARP")]
    strict_arp: Value,
    tcp_timeout: Value,
    tcp_fin_timeout: Value,
    udp_timeout: Value,
}

impl RawIpvs {
    fn fields(&self) -> [(&'static str, &Value); 8] {
        [
            ("syncPeriod", &self.sync_period),
            ("minSyncPeriod", &self.min_sync_period),
            ("scheduler", &self.scheduler),
            ("excludeCIDRs", &self.exclude_cidrs),
            ("strictARP", &self.strict_arp),
            ("tcpTimeout", &self.tcp_timeout),
            ("tcpFinTimeout", &self.tcp_fin_timeout),
            ("udpTimeout", &self.udp_timeout),
        ]
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
struct RawWinkernel {
    network_name: Value,
    source_vip: Value,
    #[serde(rename = "enableDSR")]
    enable_dsr: Value,
    root_hns_endpoint_name: Value,
    forward_health_check_vip: Value,
}

impl RawWinkernel {
    fn fields(&self) -> [(&'static str, &Value); 5] {
        [
            ("networkName", &self.network_name),
            ("sourceVip", &self.source_vip),
            ("enableDSR", &self.enable_dsr),
            ("rootHnsEndpointName", &self.root_hns_endpoint_name),
            ("forwardHealthCheckVip", &self.forward_health_check_vip),
        ]
    }
}

// Logging is component-base's structure; only the format maps onto svcproxy. The rest is klog tuning, checked
// by name and otherwise taken as opaque values.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
struct RawLogging {
    format: Option<String>,
    flush_frequency: Value,
    verbosity: Value,
    vmodule: Value,
    options: Value,
}

impl RawConfig {
    fn validate(self) -> Result<FileConfig, ConfigFileError> {
        let mut warnings = Vec::new();
        let mut no_effect = |field: &str, why: &str| {
            warnings.push(format!("{field}: accepted but has no effect in svcproxy ({why})"));
        };

        match self.api_version.as_deref() {
            Some(API_VERSION) => {}
            Some(other) => {
                return Err(ConfigFileError::invalid(
                    "apiVersion",
                    format!("{other:?} is not {API_VERSION}"),
                ));
            }
            None => {
                return Err(ConfigFileError::invalid(
                    "apiVersion",
                    format!("missing; expected {API_VERSION}"),
                ));
            }
        }
        match self.kind.as_deref() {
            Some(KIND) => {}
            Some(other) => {
                return Err(ConfigFileError::invalid(
                    "kind",
                    format!("{other:?} is not {KIND}"),
                ));
            }
            None => {
                return Err(ConfigFileError::invalid(
                    "kind",
                    format!("missing; expected {KIND}"),
                ));
            }
        }

        let mode = match non_empty(&self.mode) {
            None | Some("iptables") => ProxyMode::Iptables,
            Some("nftables") => ProxyMode::Nftables,
            Some("ipvs") => {
                return Err(ConfigFileError::unsupported(
                    "mode",
                    "ipvs is not supported by svcproxy; use iptables or nftables",
                ));
            }
            Some("kernelspace") => {
                return Err(ConfigFileError::unsupported(
                    "mode",
                    "kernelspace is the Windows proxy; svcproxy runs on Linux only",
                ));
            }
            Some(other) => {
                return Err(ConfigFileError::invalid(
                    "mode",
                    format!("{other:?} is not a proxy mode (iptables, nftables)"),
                ));
            }
        };

        // Settings of modes and platforms svcproxy does not run, which kube-proxy in iptables or nftables mode on
        // Linux ignores as well (MetalLB's guide has `ipvs.strictARP: true` set in many such ConfigMaps).
        if let Some(ipvs) = &self.ipvs
            && let Some((name, _)) = ipvs.fields().into_iter().find(|(_, v)| !is_zero(v))
        {
            no_effect(
                &format!("ipvs.{name}"),
                "the ipvs section applies only in ipvs mode",
            );
        }
        if let Some(win) = &self.winkernel
            && let Some((name, _)) = win.fields().into_iter().find(|(_, v)| !is_zero(v))
        {
            no_effect(
                &format!("winkernel.{name}"),
                "Windows settings; svcproxy runs on Linux",
            );
        }
        if self.windows_run_as_service == Some(true) {
            no_effect("windowsRunAsService", "svcproxy runs on Linux");
        }
        if non_empty(&self.port_range).is_some() {
            no_effect(
                "portRange",
                "it belonged to the userspace proxy, which no longer exists",
            );
        }
        if self.enable_profiling == Some(true) {
            no_effect("enableProfiling", "svcproxy serves no profiling endpoints");
        }
        let conntrack = self.conntrack.unwrap_or_default();

        // Accepted without effect.
        if let Some(cc) = &self.client_connection {
            if non_empty(&cc.accept_content_types).is_some() || non_empty(&cc.content_type).is_some() {
                no_effect(
                    "clientConnection.contentType",
                    "svcproxy always talks JSON to the API server",
                );
            }
            if cc.qps.is_some_and(|q| q != 0.0) || cc.burst.is_some_and(|b| b != 0) {
                no_effect("clientConnection.qps", "svcproxy does not throttle its watches");
            }
        }
        if set(self.config_sync_period).is_some() {
            no_effect(
                "configSyncPeriod",
                "svcproxy's watches do not resync periodically",
            );
        }
        if let Some(gates) = self.feature_gates.as_ref().filter(|g| !g.is_empty()) {
            let list: Vec<String> = gates.iter().map(|(k, v)| format!("{k}={v}")).collect();
            no_effect(
                "featureGates",
                &format!("svcproxy has no feature gates; ignoring {}", list.join(",")),
            );
        }
        let oom_score_adj = match self.oom_score_adj {
            None => DEFAULT_OOM_SCORE_ADJ,
            Some(adj) => i32::try_from(adj)
                .ok()
                .filter(|adj| (-1000..=1000).contains(adj))
                .ok_or_else(|| {
                    ConfigFileError::invalid("oomScoreAdj", format!("{adj} is outside -1000-1000"))
                })?,
        };
        if non_empty(&self.show_hidden_metrics_for_version).is_some() {
            no_effect("showHiddenMetricsForVersion", "svcproxy hides no metrics");
        }
        let logging = self.logging.unwrap_or_default();
        for (name, value) in [
            ("flushFrequency", &logging.flush_frequency),
            ("verbosity", &logging.verbosity),
            ("vmodule", &logging.vmodule),
            ("options", &logging.options),
        ] {
            if !is_zero(value) {
                no_effect(
                    &format!("logging.{name}"),
                    "svcproxy's log level is set with RUST_LOG",
                );
            }
        }

        // Supported settings.
        let log_format = match non_empty(&logging.format) {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(ConfigFileError::invalid(
                    "logging.format",
                    format!("{other:?} is not a log format (text, json)"),
                ));
            }
        };

        // bindAddress chooses the family of the default server addresses, as it does upstream (and, when it
        // is a specific address, the node's address of its family: see `merge`).
        let mut bind_v6 = false;
        let mut bind_address = Vec::new();
        if let Some(list) = non_empty(&self.bind_address) {
            bind_address = list
                .split(',')
                .map(|ip| ip.trim().parse::<IpAddr>().map_err(|_| ip.trim().to_string()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|bad| {
                    ConfigFileError::invalid("bindAddress", format!("{bad:?} is not an IP address"))
                })?;
            bind_v6 = matches!(bind_address.as_slice(), [IpAddr::V6(_)]);
        }
        let (any, loopback): (IpAddr, IpAddr) = if bind_v6 {
            ("::".parse().expect("literal"), "::1".parse().expect("literal"))
        } else {
            (
                "0.0.0.0".parse().expect("literal"),
                "127.0.0.1".parse().expect("literal"),
            )
        };
        // A bare address takes the default port, as kube-proxy's defaulting gives it one.
        let socket = |field: &str, value: &Option<String>, default: SocketAddr| match non_empty(value) {
            None => Ok(default),
            Some(text) => match crate::cli::parse_bind_address(text, default.port()) {
                Err(_) => Err(ConfigFileError::invalid(
                    field,
                    format!("{text:?} is not an IP:port address"),
                )),
                // As kube-proxy's validation: only its deprecated port flags can turn a server off.
                Ok(addr) if addr.port() == 0 => Err(ConfigFileError::invalid(
                    field,
                    format!("{text:?}: port 0 is outside 1-65535"),
                )),
                Ok(addr) => Ok(addr),
            },
        };
        let healthz_bind_address = socket(
            "healthzBindAddress",
            &self.healthz_bind_address,
            SocketAddr::new(any, HEALTHZ_PORT),
        )?;
        let metrics_bind_address = socket(
            "metricsBindAddress",
            &self.metrics_bind_address,
            SocketAddr::new(loopback, METRICS_PORT),
        )?;

        let cluster_cidr = match non_empty(&self.cluster_cidr) {
            None => Vec::new(),
            Some(list) => list
                .split(',')
                .map(|c| {
                    c.trim().parse::<IpNet>().map_err(|_| {
                        ConfigFileError::invalid("clusterCIDR", format!("{:?} is not a CIDR", c.trim()))
                    })
                })
                .collect::<Result<_, _>>()?,
        };

        let detect_local_mode = match non_empty(&self.detect_local_mode) {
            None => DetectLocalMode::ClusterCidr,
            Some(text) => DetectLocalMode::from_str(text, false).map_err(|_| {
                ConfigFileError::invalid(
                    "detectLocalMode",
                    format!(
                        "{text:?} is not one of ClusterCIDR, NodeCIDR, BridgeInterface, InterfaceNamePrefix"
                    ),
                )
            })?,
        };
        let detect_local = self.detect_local.unwrap_or_default();

        let nodeport_addresses: Vec<String> = self
            .node_port_addresses
            .unwrap_or_default()
            .iter()
            .map(|a| a.trim().to_string())
            .filter(|a| !a.is_empty())
            .collect();
        NodePortSpec::parse(&nodeport_addresses).map_err(|_| {
            ConfigFileError::invalid(
                "nodePortAddresses",
                format!("{nodeport_addresses:?}: expected CIDRs, or just \"primary\""),
            )
        })?;

        let iptables = self.iptables.unwrap_or_default();
        let nftables = self.nftables.unwrap_or_default();
        let iptables_section = ModeSection {
            masquerade_all: iptables.masquerade_all.unwrap_or(false),
            masquerade_bit: masquerade_bit("iptables.masqueradeBit", iptables.masquerade_bit)?,
            sync_period: set(iptables.sync_period).unwrap_or(DEFAULT_SYNC_PERIOD),
            min_sync_period: set(iptables.min_sync_period).unwrap_or(DEFAULT_MIN_SYNC_PERIOD),
        };
        let nftables_section = ModeSection {
            masquerade_all: nftables.masquerade_all.unwrap_or(false),
            masquerade_bit: masquerade_bit("nftables.masqueradeBit", nftables.masquerade_bit)?,
            sync_period: set(nftables.sync_period).unwrap_or(DEFAULT_SYNC_PERIOD),
            min_sync_period: set(nftables.min_sync_period).unwrap_or(DEFAULT_MIN_SYNC_PERIOD),
        };

        Ok(FileConfig {
            mode,
            kubeconfig: self
                .client_connection
                .as_ref()
                .and_then(|cc| non_empty(&cc.kubeconfig))
                .map(PathBuf::from),
            hostname_override: non_empty(&self.hostname_override).map(str::to_string),
            cluster_cidr,
            detect_local_mode,
            pod_bridge_interface: non_empty(&detect_local.bridge_interface).map(str::to_string),
            pod_interface_name_prefix: non_empty(&detect_local.interface_name_prefix).map(str::to_string),
            nodeport_addresses,
            healthz_bind_address,
            metrics_bind_address,
            bind_address,
            bind_address_hard_fail: self.bind_address_hard_fail.unwrap_or(false),
            iptables: iptables_section,
            nftables: nftables_section,
            iptables_localhost_nodeports: iptables.localhost_node_ports.unwrap_or(false),
            sync_period: set(self.sync_period),
            min_sync_period: set(self.min_sync_period),
            conntrack_max_per_core: conntrack_count(
                "conntrack.maxPerCore",
                conntrack.max_per_core,
                DEFAULT_CONNTRACK_MAX_PER_CORE,
            )?,
            conntrack_min: conntrack_count("conntrack.min", conntrack.min, DEFAULT_CONNTRACK_MIN)?,
            // An explicit 0s here means "leave the kernel's value", unlike the sync periods, so only an
            // absent value takes the default.
            conntrack_tcp_timeout_established: conntrack
                .tcp_established_timeout
                .map_or(DEFAULT_TCP_ESTABLISHED_TIMEOUT, |d| d.0),
            conntrack_tcp_timeout_close_wait: conntrack
                .tcp_close_wait_timeout
                .map_or(DEFAULT_TCP_CLOSE_WAIT_TIMEOUT, |d| d.0),
            conntrack_tcp_be_liberal: conntrack.tcp_be_liberal.unwrap_or(false),
            conntrack_udp_timeout: conntrack.udp_timeout.map_or(Duration::ZERO, |d| d.0),
            conntrack_udp_timeout_stream: conntrack.udp_stream_timeout.map_or(Duration::ZERO, |d| d.0),
            oom_score_adj,
            log_format,
            warnings,
        })
    }
}

fn masquerade_bit(field: &str, value: Option<i64>) -> Result<u8, ConfigFileError> {
    match value {
        None => Ok(DEFAULT_MASQUERADE_BIT),
        Some(bit @ 0..=31) => Ok(bit as u8),
        Some(bit) => Err(ConfigFileError::invalid(field, format!("{bit} is outside 0-31"))),
    }
}

fn conntrack_count(field: &str, value: Option<i64>, default: u32) -> Result<u32, ConfigFileError> {
    match value {
        None => Ok(default),
        Some(n) if n < 0 => Err(ConfigFileError::invalid(field, format!("{n} is negative"))),
        Some(n) => u32::try_from(n)
            .ok()
            .filter(|&n| n <= i32::MAX as u32)
            .ok_or_else(|| ConfigFileError::invalid(field, format!("{n} is larger than {}", i32::MAX))),
    }
}
