//! Command-line interface. Flag names and defaults follow upstream kube-proxy where the option exists there.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use ipnet::IpNet;

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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProxyMode {
    Iptables,
    Nftables,
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

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Which netfilter backend programs the rules.
    #[arg(long, value_enum, default_value = "iptables")]
    pub proxy_mode: ProxyMode,

    /// Path to a kubeconfig. Without it (and without --manifests) the in-cluster service account is used.
    #[arg(long, conflicts_with = "manifests")]
    pub kubeconfig: Option<PathBuf>,

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
    #[arg(long)]
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
    /// primary address. Default: every local address.
    #[arg(long, value_delimiter = ',', value_name = "CIDRS|primary")]
    pub nodeport_addresses: Vec<String>,

    /// Also accept NodePort connections on 127.0.0.0/8. Off by default: it needs route_localnet, which lets
    /// martian packets reach localhost services (CVE-2020-8558); a guard rule is written when it is on.
    #[arg(long)]
    pub iptables_localhost_nodeports: bool,

    /// Where /healthz and /livez are served.
    #[arg(long, default_value = "0.0.0.0:10256")]
    pub healthz_bind_address: SocketAddr,

    /// Where /metrics is served.
    #[arg(long, default_value = "127.0.0.1:10249")]
    pub metrics_bind_address: SocketAddr,

    /// Minimum interval between syncs: changes arriving faster are batched (e.g. 1s, 500ms, 0 to disable).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub min_sync_period: Duration,

    /// Retry interval after a failed sync; a change not programmed within twice this marks the proxy unhealthy.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub sync_period: Duration,

    /// Log output format.
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// Parses Go-style durations as kube-proxy's flags take them: `1s`, `500ms`, `1m30s`, `2h`, `0`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    if rest.is_empty() {
        return Err("empty duration".into());
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or(format!("{s:?}: missing unit"))?;
        let (num, tail) = rest.split_at(digits);
        let value: f64 = num.parse().map_err(|_| format!("{s:?}: bad number {num:?}"))?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let secs = match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            other => {
                return Err(format!(
                    "{s:?}: unknown unit {other:?} (use ns, us, ms, s, m or h)"
                ));
            }
        };
        total += Duration::from_secs_f64(value * secs);
        rest = tail;
    }
    Ok(total)
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
        let Command::Run(args) = cli.command;
        assert_eq!(args.healthz_bind_address.to_string(), "0.0.0.0:10256");
        assert_eq!(args.metrics_bind_address.to_string(), "127.0.0.1:10249");
        assert_eq!(args.min_sync_period, Duration::from_secs(1));
        assert_eq!(args.sync_period, Duration::from_secs(30));
        assert_eq!(args.iptables_masquerade_bit, 14);
    }

    #[test]
    fn kubeconfig_and_manifests_exclude_each_other() {
        assert!(Cli::try_parse_from(["svcproxy", "run", "--kubeconfig", "a", "--manifests", "b"]).is_err());
    }
}
