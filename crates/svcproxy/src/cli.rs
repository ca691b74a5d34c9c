//! Command-line interface. Flag names and defaults follow upstream kube-proxy where the option exists there;
//! the same settings can come from a KubeProxyConfiguration file (`--config`, see [`crate::config_file`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use ipnet::IpNet;

use crate::upstream_flags::UpstreamFlags;

#[derive(Debug, Parser)]
#[command(
    name = "svcproxy",
    version,
    about = "Node Service proxy for Kubernetes: programs netfilter so Service IPs reach their pods",
    long_about = "svcproxy watches Services, EndpointSlices and its Node and programs this node's netfilter so \
                  ClusterIPs, NodePorts, externalIPs and load-balancer IPs reach the right pods. It is a drop-in \
                  replacement for kube-proxy: same flags, same iptables chains."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy: watch the cluster (or a manifest directory) and keep the node's rules in sync.
    Run(Box<RunArgs>),
    /// Remove everything any kube-proxy version or svcproxy left on this node (iptables chains in both
    /// backends and families, nftables tables, IPVS leftovers), then exit. Safe to run twice.
    Cleanup(CleanupArgs),
    /// Why can (or can't) a client reach a Service? Traces a new connection's first packet through the live
    /// rules and through what the intent says, and shows where they part.
    Explain(Box<ExplainArgs>),
    /// Compare the live rules with the intent, per service port. Exit status 0 when equal, 1 when not.
    Diff(Box<DiffArgs>),
    /// Show what a running svcproxy has programmed, per service port (from its debug endpoint).
    Status(StatusArgs),
    /// Look for netfilter state that will break a sync or an upgrade (works on nodes run by kube-proxy too).
    /// Exit status 0 when none is found, 1 when some is.
    Audit(AuditArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct CleanupArgs {
    /// List what would be removed without removing it.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

/// Where the traced packet enters the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TraceOrigin {
    /// A pod on this node.
    Pod,
    /// A process on the node itself.
    Host,
    /// Another machine, through the node's uplink.
    External,
}

// The intent is rendered exactly as the daemon renders it only with the daemon's own settings, so the
// commands that compare with it take every flag of `run` (and its --config file).
const DAEMON_FLAGS: &str = "The daemon's settings (give the same flags or --config as `svcproxy run`)";

#[derive(Debug, Clone, clap::Args)]
pub struct ExplainArgs {
    /// The client: an IP address, or a pod as NAMESPACE/NAME.
    #[arg(long, value_name = "IP|NAMESPACE/POD")]
    pub from: String,

    /// The destination: a service port as NAMESPACE/SERVICE:PORT (port name or number; NAMESPACE/SERVICE for a
    /// single-port Service), or an address as IP:PORT[/tcp|udp|sctp].
    #[arg(long, value_name = "SERVICE|IP:PORT/PROTO")]
    pub to: String,

    /// Where the packet enters the node [default: pod for pods and pod-network addresses, host for this node's
    /// addresses, external otherwise].
    #[arg(long, value_enum)]
    pub origin: Option<TraceOrigin>,

    /// The interface the packet arrives on, for rules that match interfaces (--detect-local-mode
    /// BridgeInterface or InterfaceNamePrefix).
    #[arg(long, value_name = "IFACE")]
    pub in_interface: Option<String>,

    #[arg(long, value_enum, default_value = "text")]
    pub output: OutputFormat,

    /// Ask the running svcproxy at this URL (its --metrics-bind-address) instead of reading the intent here.
    #[arg(long, value_name = "URL", num_args = 0..=1, default_missing_value = "http://127.0.0.1:10249")]
    pub daemon: Option<String>,

    #[command(flatten, next_help_heading = DAEMON_FLAGS)]
    pub run: RunArgs,
}

#[derive(Debug, Clone, clap::Args)]
pub struct DiffArgs {
    #[arg(long, value_enum, default_value = "text")]
    pub output: OutputFormat,

    /// Ask the running svcproxy at this URL (its --metrics-bind-address) instead of reading the intent here.
    #[arg(long, value_name = "URL", num_args = 0..=1, default_missing_value = "http://127.0.0.1:10249")]
    pub daemon: Option<String>,

    #[command(flatten, next_help_heading = DAEMON_FLAGS)]
    pub run: RunArgs,
}

#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    /// The running svcproxy's metrics address.
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:10249")]
    pub daemon: String,

    #[arg(long, value_enum, default_value = "text")]
    pub output: OutputFormat,
}

#[derive(Debug, Clone, clap::Args)]
pub struct AuditArgs {
    #[arg(long, value_enum, default_value = "text")]
    pub output: OutputFormat,

    /// Audit these saved `iptables-save` dumps instead of this node.
    #[arg(long, value_name = "FILE")]
    pub file: Vec<std::path::PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProxyMode {
    Iptables,
    Nftables,
}

/// `--iptables-backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IptablesBackendChoice {
    /// The backend holding kubelet's marker chains; nf_tables when neither does.
    Auto,
    Nft,
    Legacy,
}

/// How traffic from this node's pods is recognised (upstream `--detect-local-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DetectLocalMode {
    /// Sources inside `--cluster-cidr`.
    #[value(name = "ClusterCIDR")]
    ClusterCidr,
    /// Sources inside the Node's `spec.podCIDRs`.
    #[value(name = "NodeCIDR")]
    NodeCidr,
    /// Packets arriving on `--pod-bridge-interface`.
    #[value(name = "BridgeInterface")]
    BridgeInterface,
    /// Packets arriving on interfaces named `--pod-interface-name-prefix`*.
    #[value(name = "InterfaceNamePrefix")]
    InterfaceNamePrefix,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

// PartialEq: a configuration written with --write-config-to must read back to the same arguments, and the
// tests say so by comparing them.
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct RunArgs {
    /// A KubeProxyConfiguration file (kubeproxy.config.k8s.io/v1alpha1), as kube-proxy's --config takes it.
    /// As with kube-proxy, the file wins: next to it only --hostname-override, the logging flags and
    /// svcproxy's own flags apply; any other flag given is ignored, with a warning naming it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Write the effective configuration (the file and the flags merged) to FILE as a KubeProxyConfiguration,
    /// then exit without touching the node.
    #[arg(long, value_name = "FILE")]
    pub write_config_to: Option<PathBuf>,

    /// Which netfilter backend programs the rules.
    #[arg(long, value_enum, default_value = "iptables")]
    pub proxy_mode: ProxyMode,

    /// In iptables mode, which iptables backend to write: `auto` uses the one kubelet writes (its marker
    /// chains in the mangle table), so both keep their rules in the same place.
    #[arg(long, value_enum, default_value = "auto")]
    pub iptables_backend: IptablesBackendChoice,

    /// Path to a kubeconfig. Without it (and without --manifests) the in-cluster service account is used.
    #[arg(long, conflicts_with = "manifests")]
    pub kubeconfig: Option<PathBuf>,

    /// The API server's URL, overriding the one in the kubeconfig (or the in-cluster one).
    #[arg(long, value_name = "URL", conflicts_with = "manifests")]
    pub master: Option<String>,

    /// Read Services, EndpointSlices and the Node from YAML files in this directory instead of the API, and
    /// follow changes to them. For demos, tests and clusterless setups.
    #[arg(long, value_name = "DIR")]
    pub manifests: Option<PathBuf>,

    /// This node's name, as Pods' nodeName and the Node object spell it [default: $NODE_NAME, else the hostname]
    #[arg(long, env = "NODE_NAME")]
    pub hostname_override: Option<String>,

    /// The pods' address range(s), comma-separated. Traffic to a ClusterIP from outside them is masqueraded so
    /// replies come back through this node.
    #[arg(long, value_delimiter = ',', value_name = "CIDR")]
    pub cluster_cidr: Vec<IpNet>,

    /// Masquerade all traffic sent to Service cluster IPs.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true",
          default_value = "false", value_parser = parse_go_bool)]
    pub masquerade_all: bool,

    /// The fwmark bit (0-31) that marks packets to be masqueraded.
    #[arg(long, default_value_t = 14, value_parser = clap::value_parser!(u8).range(0..=31))]
    pub iptables_masquerade_bit: u8,

    /// How to tell pod traffic from other traffic (only pod traffic keeps its source when it reaches a ClusterIP).
    #[arg(long, value_enum, default_value = "ClusterCIDR")]
    pub detect_local_mode: DetectLocalMode,

    /// The bridge pods are attached to, with --detect-local-mode=BridgeInterface.
    #[arg(long, value_name = "IFACE")]
    pub pod_bridge_interface: Option<String>,

    /// The name prefix of pod interfaces, with --detect-local-mode=InterfaceNamePrefix.
    #[arg(long, value_name = "PREFIX")]
    pub pod_interface_name_prefix: Option<String>,

    /// Node addresses that accept NodePort connections: comma-separated CIDRs, or `primary` for the Node's
    /// primary address of each family. A family the list says nothing of keeps every local address. Default:
    /// every local address in iptables mode, `primary` in nftables mode (as kube-proxy).
    #[arg(long, value_delimiter = ',', value_name = "CIDRS|primary")]
    pub nodeport_addresses: Vec<String>,

    /// Also accept NodePort connections on 127.0.0.0/8 (sets route_localnet=1). Off by default:
    /// route_localnet lets martian packets reach localhost services (CVE-2020-8558); a guard rule is written
    /// when it is on.
    /// (kube-proxy defaults to on; svcproxy does not, also when a configuration file leaves
    /// `iptables.localhostNodePorts` unset.)
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true",
          default_value = "false", value_parser = parse_go_bool)]
    pub iptables_localhost_nodeports: bool,

    /// Where /healthz and /livez are served (IP:port; a bare IP takes port 10256).
    #[arg(long, default_value = "0.0.0.0:10256", value_parser = |s: &str| parse_bind_address(s, 10256))]
    pub healthz_bind_address: SocketAddr,

    /// Where /metrics is served (IP:port; a bare IP takes port 10249).
    #[arg(long, default_value = "127.0.0.1:10249", value_parser = |s: &str| parse_bind_address(s, 10249))]
    pub metrics_bind_address: SocketAddr,

    /// Minimum interval between syncs: changes arriving faster are batched (e.g. 1s, 500ms, 0 to disable).
    #[arg(
        long,
        visible_alias = "iptables-min-sync-period",
        value_name = "DURATION",
        default_value = "1s",
        value_parser = parse_duration
    )]
    pub min_sync_period: Duration,

    /// Retry interval after a failed sync; a change not programmed within twice this marks the proxy unhealthy.
    #[arg(
        long,
        visible_alias = "iptables-sync-period",
        value_name = "DURATION",
        default_value = "30s",
        value_parser = parse_positive_duration
    )]
    pub sync_period: Duration,

    /// Connection-tracking entries to allow per CPU core: nf_conntrack_max becomes the larger of this
    /// times the number of cores and --conntrack-min. 0 leaves nf_conntrack_max as it is.
    #[arg(long, value_name = "COUNT", default_value_t = 32768, value_parser = conntrack_count())]
    pub conntrack_max_per_core: u32,

    /// The least nf_conntrack_max to set, whatever the number of cores.
    #[arg(long, value_name = "COUNT", default_value_t = 131072, value_parser = conntrack_count())]
    pub conntrack_min: u32,

    /// Idle timeout of established TCP connections in the connection-tracking table (0 leaves the kernel's).
    #[arg(long, value_name = "DURATION", default_value = "24h0m0s", value_parser = parse_duration)]
    pub conntrack_tcp_timeout_established: Duration,

    /// How long a TCP entry in CLOSE_WAIT stays in the connection-tracking table (0 leaves the kernel's).
    #[arg(long, value_name = "DURATION", default_value = "1h0m0s", value_parser = parse_duration)]
    pub conntrack_tcp_timeout_close_wait: Duration,

    /// Let connection tracking accept TCP packets outside the window it expects instead of marking them
    /// INVALID (nf_conntrack_tcp_be_liberal=1), for networks that reorder or offload so much that established
    /// connections get reset. Off leaves the kernel's setting as it is.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true",
          default_value = "false", value_parser = parse_go_bool)]
    pub conntrack_tcp_be_liberal: bool,

    /// Idle timeout of unreplied UDP flows in the connection-tracking table (0 leaves the kernel's).
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = parse_duration)]
    pub conntrack_udp_timeout: Duration,

    /// Idle timeout of UDP flows that have seen replies ("streams") (0 leaves the kernel's).
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = parse_duration)]
    pub conntrack_udp_timeout_stream: Duration,

    /// Log output format (`--logging-format`, kube-proxy's spelling, too).
    #[arg(long, visible_alias = "logging-format", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// How often every rule svcproxy owns is read back from the kernel and compared with what it wrote (what a
    /// sync wrote is always read back right after it). 0 disables the periodic check.
    #[arg(long, default_value = "1m0s", value_parser = parse_duration)]
    pub verify_period: Duration,

    /// After this many consecutive failed syncs /healthz answers 503 with the reason.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub unhealthy_after: u32,

    #[command(flatten)]
    pub upstream: UpstreamFlags,
}

// kube-proxy's conntrack counts are int32s; keeping to that range means a value accepted here is accepted by
// kube-proxy too, after a rollback.
fn conntrack_count() -> clap::builder::RangedI64ValueParser<u32> {
    clap::value_parser!(u32).range(0..=i64::from(i32::MAX))
}

/// Parses Go-style durations as kube-proxy's flags and configuration files take them: `1s`, `500ms`,
/// `1m30s`, `1.5h`, `0`. Exact to the nanosecond (integer arithmetic), so a duration written by
/// [`format_duration`] reads back unchanged. Negative durations are refused: no setting here has a meaning
/// for them.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let text = s.trim();
    let unsigned = text.strip_prefix('+').unwrap_or(text);
    if unsigned.starts_with('-') {
        return Err(format!("{text:?}: negative durations are not allowed"));
    }
    if unsigned == "0" {
        return Ok(Duration::ZERO);
    }
    if unsigned.is_empty() {
        return Err("empty duration".into());
    }
    let mut total: u128 = 0;
    let mut rest = unsigned;
    while !rest.is_empty() {
        let int_len = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        let (int_part, tail) = rest.split_at(int_len);
        let (frac_part, tail) = match tail.strip_prefix('.') {
            Some(t) => t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len())),
            None => ("", tail),
        };
        if int_part.is_empty() && frac_part.is_empty() {
            return Err(format!("{text:?}: expected a number before {tail:?}"));
        }
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let unit_ns: u128 = match unit {
            "ns" => 1,
            // Go accepts both the micro sign and the Greek mu.
            "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => return Err(format!("{text:?}: missing unit (use ns, us, ms, s, m or h)")),
            other => {
                return Err(format!(
                    "{text:?}: unknown unit {other:?} (use ns, us, ms, s, m or h)"
                ));
            }
        };
        let too_long = || format!("{text:?}: too long");
        let int: u128 = if int_part.is_empty() {
            0
        } else {
            int_part.parse().map_err(|_| too_long())?
        };
        // Digits beyond nanosecond resolution cannot change the result of any unit; dropping them keeps the
        // arithmetic within u128.
        let frac_digits = &frac_part[..frac_part.len().min(19)];
        let frac_value: u128 = if frac_digits.is_empty() {
            0
        } else {
            frac_digits.parse().map_err(|_| too_long())?
        };
        let scale = 10u128.pow(frac_digits.len() as u32);
        total = int
            .checked_mul(unit_ns)
            .and_then(|n| n.checked_add(frac_value * unit_ns / scale))
            .and_then(|n| total.checked_add(n))
            .ok_or_else(too_long)?;
        rest = tail;
    }
    let secs = u64::try_from(total / 1_000_000_000).map_err(|_| format!("{text:?}: too long"))?;
    Ok(Duration::new(secs, (total % 1_000_000_000) as u32))
}

/// Like [`parse_duration`], for periods that must not be zero.
pub fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        Duration::ZERO => Err(format!("{:?}: must be greater than 0", s.trim())),
        d => Ok(d),
    }
}

/// Formats a duration the way Go's `time.Duration` prints it (`0s`, `500ms`, `1m30s`, `24h0m0s`), which is
/// how KubeProxyConfiguration files spell durations.
pub fn format_duration(d: Duration) -> String {
    // Whole units, then the remainder as a decimal fraction without trailing zeros.
    fn with_fraction(value: u128, unit: u128, digits: usize) -> String {
        let whole = value / unit;
        let frac = value % unit;
        if frac == 0 {
            return whole.to_string();
        }
        let frac = format!("{frac:0digits$}");
        format!("{whole}.{}", frac.trim_end_matches('0'))
    }
    let ns = d.as_nanos();
    match ns {
        0 => "0s".into(),
        1..1_000 => format!("{ns}ns"),
        1_000..1_000_000 => format!("{}\u{b5}s", with_fraction(ns, 1_000, 3)),
        1_000_000..1_000_000_000 => format!("{}ms", with_fraction(ns, 1_000_000, 6)),
        _ => {
            let hours = ns / 3_600_000_000_000;
            let minutes = ns / 60_000_000_000 % 60;
            let seconds = with_fraction(ns % 60_000_000_000, 1_000_000_000, 9);
            if hours > 0 {
                format!("{hours}h{minutes}m{seconds}s")
            } else if minutes > 0 {
                format!("{minutes}m{seconds}s")
            } else {
                format!("{seconds}s")
            }
        }
    }
}

/// A listen address as kube-proxy takes one: `IP:port`, or a bare IP that gets `default_port`.
impl RunArgs {
    /// The OOM score adjustment to give the process: `--oom-score-adj` (or the file's), else kube-proxy's
    /// default.
    pub fn oom_score_adj(&self) -> i32 {
        self.upstream
            .oom_score_adj
            .unwrap_or(crate::oom_score::DEFAULT_OOM_SCORE_ADJ)
    }

    /// What kube-proxy's configuration validation refuses among settings each accepted on its own, checked
    /// once flags and file are merged: a configuration svcproxy runs with must be one kube-proxy would run
    /// with too, or handing the node back fails.
    pub fn check(&self) -> Result<(), String> {
        if self.min_sync_period > self.sync_period {
            return Err(format!(
                "--sync-period (syncPeriod) {:?} must be at least --min-sync-period (minSyncPeriod) {:?}",
                self.sync_period, self.min_sync_period
            ));
        }
        match self.cluster_cidr.as_slice() {
            [] | [_] => Ok(()),
            [a, b] if a.addr().is_ipv4() != b.addr().is_ipv4() => Ok(()),
            cidrs => Err(format!(
                "--cluster-cidr (clusterCIDR) {}: one CIDR, or two of different IP families (dual-stack)",
                cidrs
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            )),
        }
    }
}

pub fn parse_bind_address(text: &str, default_port: u16) -> Result<SocketAddr, String> {
    let text = text.trim();
    text.parse::<SocketAddr>()
        .or_else(|_| {
            text.parse::<std::net::IpAddr>()
                .map(|ip| SocketAddr::new(ip, default_port))
        })
        .map_err(|_| format!("{text:?} is neither IP:port nor an IP address"))
}

/// Parses a boolean flag value the way kube-proxy's (Go) flags do, so `--masquerade-all=false` from an
/// existing command line means what it meant there.
pub fn parse_go_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        other => Err(format!("{other:?} is not a boolean (true or false)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(parse_duration("1s").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5d").is_err());
    }

    #[test]
    fn upstream_defaults() {
        let cli = Cli::try_parse_from(["svcproxy", "run"]).unwrap();
        let Command::Run(args) = cli.command else {
            panic!("expected run")
        };
        assert_eq!(args.healthz_bind_address.to_string(), "0.0.0.0:10256");
        assert_eq!(args.metrics_bind_address.to_string(), "127.0.0.1:10249");
        assert_eq!(args.min_sync_period, Duration::from_secs(1));
        assert_eq!(args.sync_period, Duration::from_secs(30));
        assert_eq!(args.iptables_masquerade_bit, 14);
    }

    #[test]
    fn go_durations_are_exact() {
        assert_eq!(parse_duration("1.5h").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("333ms").unwrap(), Duration::from_millis(333));
        assert_eq!(parse_duration("1.000000001s").unwrap(), Duration::new(1, 1));
        assert_eq!(parse_duration("2\u{b5}s").unwrap(), Duration::from_micros(2));
        assert_eq!(parse_duration("+3s").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("-1s").unwrap_err().contains("negative"));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("1h30").is_err());
        assert!(parse_positive_duration("0s").is_err());
    }

    #[test]
    fn go_duration_spelling() {
        for (d, text) in [
            (Duration::ZERO, "0s"),
            (Duration::from_nanos(7), "7ns"),
            (Duration::from_nanos(1_500), "1.5\u{b5}s"),
            (Duration::from_millis(500), "500ms"),
            (Duration::from_secs(1), "1s"),
            (Duration::from_millis(1_500), "1.5s"),
            (Duration::from_secs(90), "1m30s"),
            (Duration::from_secs(3600), "1h0m0s"),
            (Duration::from_secs(86400), "24h0m0s"),
            (Duration::new(7201, 500_000_000), "2h0m1.5s"),
        ] {
            assert_eq!(format_duration(d), text);
            assert_eq!(parse_duration(text).unwrap(), d, "{text}");
        }
    }

    proptest::proptest! {
        #[test]
        fn duration_spelling_round_trips(secs in 0u64..10_000_000, nanos in 0u32..1_000_000_000) {
            let d = Duration::new(secs, nanos);
            proptest::prop_assert_eq!(parse_duration(&format_duration(d)).unwrap(), d);
        }
    }

    #[test]
    fn conntrack_defaults_are_upstreams() {
        let cli = Cli::try_parse_from(["svcproxy", "run"]).unwrap();
        let Command::Run(args) = cli.command else {
            panic!("expected run")
        };
        assert_eq!(args.conntrack_max_per_core, 32768);
        assert_eq!(args.conntrack_min, 131072);
        assert_eq!(args.conntrack_tcp_timeout_established, Duration::from_secs(86400));
        assert_eq!(args.conntrack_tcp_timeout_close_wait, Duration::from_secs(3600));
        assert_eq!(args.conntrack_udp_timeout, Duration::ZERO);
        assert_eq!(args.conntrack_udp_timeout_stream, Duration::ZERO);
        assert!(!args.masquerade_all);
        assert!(!args.iptables_localhost_nodeports);
        assert_eq!(args.config, None);
        assert_eq!(args.write_config_to, None);
    }

    #[test]
    fn upstream_spellings_are_accepted() {
        let cli = Cli::try_parse_from([
            "svcproxy",
            "run",
            "--iptables-min-sync-period=2s",
            "--iptables-sync-period",
            "1m",
            "--masquerade-all=false",
            "--iptables-localhost-nodeports",
            "--conntrack-max-per-core=0",
            "--conntrack-tcp-timeout-close-wait=60s",
            "--config=/etc/svcproxy/config.conf",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("expected run")
        };
        assert_eq!(args.min_sync_period, Duration::from_secs(2));
        assert_eq!(args.sync_period, Duration::from_secs(60));
        assert!(!args.masquerade_all);
        assert!(args.iptables_localhost_nodeports);
        assert_eq!(args.conntrack_max_per_core, 0);
        assert_eq!(args.conntrack_tcp_timeout_close_wait, Duration::from_secs(60));
        assert_eq!(args.config, Some(PathBuf::from("/etc/svcproxy/config.conf")));

        let cli = Cli::try_parse_from(["svcproxy", "run", "--masquerade-all=True"]).unwrap();
        let Command::Run(args) = cli.command else {
            panic!("expected run")
        };
        assert!(args.masquerade_all);
    }

    #[test]
    fn bad_values_are_refused() {
        for bad in [
            "--sync-period=0",
            "--masquerade-all=maybe",
            "--conntrack-min=-1",
            "--conntrack-max-per-core=4294967295",
            "--conntrack-udp-timeout=-5s",
        ] {
            assert!(Cli::try_parse_from(["svcproxy", "run", bad]).is_err(), "{bad}");
        }
    }

    #[test]
    fn kubeconfig_and_manifests_exclude_each_other() {
        assert!(Cli::try_parse_from(["svcproxy", "run", "--kubeconfig", "a", "--manifests", "b"]).is_err());
    }

    #[test]
    fn settings_kube_proxy_refuses_together_are_refused() {
        let run = |flags: &[&str]| {
            let cli = Cli::parse_from(["svcproxy", "run"].iter().chain(flags));
            let Command::Run(args) = cli.command else {
                unreachable!()
            };
            args.check()
        };
        assert_eq!(run(&[]), Ok(()));
        assert_eq!(run(&["--cluster-cidr", "10.244.0.0/16,fd00:10:244::/64"]), Ok(()));
        let e = run(&["--min-sync-period", "40s"]).unwrap_err();
        assert!(e.contains("--min-sync-period") && e.contains("40s"), "{e}");
        assert!(run(&["--min-sync-period", "30s"]).is_ok(), "equal is allowed");
        let e = run(&["--cluster-cidr", "10.244.0.0/16,10.245.0.0/16"]).unwrap_err();
        assert!(e.contains("10.244.0.0/16,10.245.0.0/16"), "{e}");
        assert!(run(&["--cluster-cidr", "10.0.0.0/16,fd00::/64,10.1.0.0/16"]).is_err());
    }
}
