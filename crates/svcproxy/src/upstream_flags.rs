//! kube-proxy's command-line flags beyond svcproxy's own, accepted so that the arguments a node already passes
//! to kube-proxy start svcproxy too. The policy is the configuration file's (see [`crate::config_file`]): a
//! flag that only tunes something svcproxy does not have (or a mode it does not run, such as the `--ipvs-*`
//! flags GCE passes in every mode) is accepted and logged as having no effect. A few do act: klog's `-v` sets
//! the log level when `RUST_LOG` does not, `--bind-address` is taken as the file's `bindAddress` is,
//! `--cleanup` cleans up and exits, `--init-only` applies the start-up sysctls and exits, and `--oom-score-adj`
//! sets the process's OOM score adjustment.

use std::time::Duration;

use crate::cli::{parse_duration, parse_go_bool};

#[derive(Debug, Clone, Default, PartialEq, clap::Args)]
#[command(next_help_heading = "Other kube-proxy flags (accepted so its command line starts svcproxy)")]
pub struct UpstreamFlags {
    /// klog's verbosity. Without RUST_LOG it sets the log level: up to 3 info, 4 and 5 debug, 6 and above
    /// trace.
    #[arg(short = 'v', long = "v", value_name = "LEVEL")]
    pub verbosity: Option<u32>,

    /// klog's per-file verbosity. No effect: use RUST_LOG (e.g. RUST_LOG=svcproxy::sync=debug).
    #[arg(long, value_name = "PATTERN=N,...")]
    pub vmodule: Option<String>,

    /// The node's address(es), comma-separated. As in kube-proxy, only without --config: a specific address
    /// is the node's address of its family (instead of the Node object's first, for NodePorts on `primary`
    /// and the load-balancer source-range allowance), and a single IPv6 address serves the default health
    /// and metrics addresses on `[::]` and `[::1]`.
    #[arg(long, value_name = "IP[,IP]", value_delimiter = ',')]
    pub bind_address: Vec<std::net::IpAddr>,

    /// Remove what any kube-proxy version or svcproxy left on this node, then exit (what `svcproxy cleanup`
    /// does; kube-proxy's spelling of it).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true",
          default_value = "false", value_parser = parse_go_bool)]
    pub cleanup: bool,

    /// No effect: svcproxy writes each log line as it happens.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub log_flush_frequency: Option<Duration>,

    /// The OOM score adjustment svcproxy gives itself at start, as kube-proxy does [default: -999: the kernel
    /// kills svcproxy among the very last when the node runs out of memory, whatever its pod's QoS class].
    #[arg(long, value_name = "SCORE", allow_hyphen_values = true,
          value_parser = clap::value_parser!(i32).range(-1000..=1000))]
    pub oom_score_adj: Option<i32>,

    /// No effect: svcproxy's watches do not resync periodically.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub config_sync_period: Option<Duration>,

    /// No effect: svcproxy has no feature gates (a gate's setting is logged as ignored).
    #[arg(long, value_name = "KEY=BOOL,...")]
    pub feature_gates: Option<String>,

    /// No effect: svcproxy does not throttle its watches.
    #[arg(long, value_name = "QPS")]
    pub kube_api_qps: Option<f32>,

    /// No effect: svcproxy does not throttle its watches.
    #[arg(long, value_name = "COUNT")]
    pub kube_api_burst: Option<i32>,

    /// No effect: svcproxy talks JSON to the API server.
    #[arg(long, value_name = "TYPE")]
    pub kube_api_content_type: Option<String>,

    /// No effect: svcproxy hides no metrics.
    #[arg(long, value_name = "VERSION")]
    pub show_hidden_metrics_for_version: Option<String>,

    /// Exit when the health or metrics address cannot be bound. Unset or false: log it and retry every 5
    /// seconds while the rules are programmed, as kube-proxy does.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true",
          value_parser = parse_go_bool)]
    pub bind_address_hard_fail: Option<bool>,

    /// No effect: svcproxy serves no profiling endpoints.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true",
          value_parser = parse_go_bool)]
    pub profiling: Option<bool>,

    /// No effect: the range belonged to the userspace proxy, which no longer exists (kube-proxy ignores it too).
    #[arg(long, value_name = "RANGE")]
    pub proxy_port_range: Option<String>,

    /// Apply the start-up settings that need privileges (the conntrack sysctls, and route_localnet for
    /// localhost NodePorts), then exit, as kube-proxy's init containers use it.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true",
          default_value = "false", value_parser = parse_go_bool)]
    pub init_only: bool,

    /// kube-proxy's deprecated port of the health server: 0 turns it off; another port completes a
    /// --healthz-bind-address given as a bare IP. Ignored next to --config, as in kube-proxy.
    #[arg(long, value_name = "PORT")]
    pub healthz_port: Option<u16>,

    /// kube-proxy's deprecated port of the metrics server: 0 turns it off; another port completes a
    /// --metrics-bind-address given as a bare IP. Ignored next to --config, as in kube-proxy.
    #[arg(long, value_name = "PORT")]
    pub metrics_port: Option<u16>,

    /// No effect outside kube-proxy's ipvs mode, which svcproxy does not have.
    #[arg(long, value_name = "DURATION")]
    pub ipvs_sync_period: Option<String>,

    /// No effect outside kube-proxy's ipvs mode.
    #[arg(long, value_name = "DURATION")]
    pub ipvs_min_sync_period: Option<String>,

    /// No effect outside kube-proxy's ipvs mode.
    #[arg(long, value_name = "NAME")]
    pub ipvs_scheduler: Option<String>,

    /// No effect outside kube-proxy's ipvs mode.
    #[arg(long, value_name = "CIDRS")]
    pub ipvs_exclude_cidrs: Option<String>,

    /// No effect outside kube-proxy's ipvs mode.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true",
          value_parser = parse_go_bool)]
    pub ipvs_strict_arp: Option<bool>,

    /// No effect outside kube-proxy's ipvs mode.
    #[arg(long, value_name = "DURATION")]
    pub ipvs_tcp_timeout: Option<String>,

    /// No effect outside kube-proxy's ipvs mode.
    #[arg(long, value_name = "DURATION")]
    pub ipvs_tcpfin_timeout: Option<String>,

    /// No effect outside kube-proxy's ipvs mode.
    #[arg(long, value_name = "DURATION")]
    pub ipvs_udp_timeout: Option<String>,

    /// No effect: svcproxy writes every log line to stderr.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true",
          value_parser = parse_go_bool)]
    pub log_text_split_stream: Option<bool>,

    /// No effect: svcproxy does not buffer log lines.
    #[arg(long, value_name = "SIZE")]
    pub log_text_info_buffer_size: Option<String>,

    /// No effect: svcproxy writes every log line to stderr.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true",
          value_parser = parse_go_bool)]
    pub log_json_split_stream: Option<bool>,

    /// No effect: svcproxy does not buffer log lines.
    #[arg(long, value_name = "SIZE")]
    pub log_json_info_buffer_size: Option<String>,
}

impl UpstreamFlags {
    /// The flags given that have no effect, one sentence each for the log.
    pub fn check(&self) -> Vec<String> {
        let ipvs = [
            &self.ipvs_sync_period,
            &self.ipvs_min_sync_period,
            &self.ipvs_scheduler,
            &self.ipvs_exclude_cidrs,
            &self.ipvs_tcp_timeout,
            &self.ipvs_tcpfin_timeout,
            &self.ipvs_udp_timeout,
        ]
        .iter()
        .any(|f| f.is_some())
            || self.ipvs_strict_arp.is_some();
        let logging = self.log_text_split_stream.is_some()
            || self.log_text_info_buffer_size.is_some()
            || self.log_json_split_stream.is_some()
            || self.log_json_info_buffer_size.is_some();
        let given: [(&str, bool, &str); 11] = [
            (
                "profiling",
                self.profiling == Some(true),
                "svcproxy serves no profiling endpoints",
            ),
            (
                "proxy-port-range",
                self.proxy_port_range
                    .as_deref()
                    .is_some_and(|r| !r.trim().is_empty()),
                "the range belonged to the userspace proxy, which no longer exists",
            ),
            ("ipvs-*", ipvs, "they apply only in kube-proxy's ipvs mode"),
            (
                "log-*-split-stream/info-buffer-size",
                logging,
                "svcproxy writes every log line to stderr as it happens",
            ),
            (
                "vmodule",
                self.vmodule.is_some(),
                "the log level is set with RUST_LOG",
            ),
            (
                "log-flush-frequency",
                self.log_flush_frequency.is_some(),
                "each log line is written as it happens",
            ),
            (
                "config-sync-period",
                self.config_sync_period.is_some(),
                "svcproxy's watches do not resync periodically",
            ),
            (
                "feature-gates",
                self.feature_gates.is_some(),
                "svcproxy has no feature gates",
            ),
            (
                "kube-api-qps",
                self.kube_api_qps.is_some() || self.kube_api_burst.is_some(),
                "svcproxy does not throttle its watches",
            ),
            (
                "kube-api-content-type",
                self.kube_api_content_type.is_some(),
                "svcproxy always talks JSON to the API server",
            ),
            (
                "show-hidden-metrics-for-version",
                self.show_hidden_metrics_for_version.is_some(),
                "svcproxy hides no metrics",
            ),
        ];
        given
            .into_iter()
            .filter(|(_, given, _)| *given)
            .map(|(flag, _, why)| format!("--{flag}: accepted but has no effect in svcproxy ({why})"))
            .collect()
    }

    /// The log level klog's verbosity stands for, used when `RUST_LOG` is not set. kube-proxy logs its
    /// routine work at 2 and below, per-sync detail at 4, and per-rule detail from 6 up.
    pub fn log_level(&self) -> &'static str {
        match self.verbosity.unwrap_or(0) {
            0..=3 => "info",
            4..=5 => "debug",
            _ => "trace",
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        upstream: UpstreamFlags,
    }

    fn parse(args: &[&str]) -> UpstreamFlags {
        let argv = std::iter::once("svcproxy").chain(args.iter().copied());
        Flags::try_parse_from(argv).expect("flags parse").upstream
    }

    #[test]
    fn nothing_given_is_nothing_to_say() {
        assert_eq!(parse(&[]).check(), Vec::<String>::new());
        assert_eq!(parse(&[]).log_level(), "info");
    }

    #[test]
    fn klog_verbosity_sets_the_level() {
        for (args, level) in [
            (&["--v=2"][..], "info"),
            (&["-v", "3"], "info"),
            (&["--v", "4"], "debug"),
            (&["-v=5"], "debug"),
            (&["--v=6"], "trace"),
            (&["--v=10"], "trace"),
        ] {
            let flags = parse(args);
            assert_eq!(flags.log_level(), level, "{args:?}");
            assert_eq!(flags.check(), Vec::<String>::new(), "{args:?}");
        }
    }

    #[test]
    fn flags_without_effect_are_accepted_and_each_is_named() {
        let flags = parse(&[
            "--vmodule=proxier=5",
            "--log-flush-frequency=5s",
            "--config-sync-period=15m",
            "--feature-gates=NFTablesProxyMode=true",
            "--kube-api-qps=5",
            "--kube-api-burst=10",
            "--kube-api-content-type=application/vnd.kubernetes.protobuf",
            "--show-hidden-metrics-for-version=1.30",
        ]);
        let warnings = flags.check();
        for flag in [
            "--vmodule",
            "--log-flush-frequency",
            "--config-sync-period",
            "--feature-gates",
            "--kube-api-qps",
            "--kube-api-content-type",
            "--show-hidden-metrics-for-version",
        ] {
            assert!(
                warnings.iter().any(|w| w.starts_with(&format!("{flag}:"))),
                "{flag} not named: {warnings:?}"
            );
        }
        assert_eq!(warnings.len(), 7, "{warnings:?}");
        // Flags that act are not warned about; what svcproxy does anyway is not worth a warning.
        for acting in [
            "--bind-address-hard-fail",
            "--bind-address-hard-fail=false",
            "--oom-score-adj=-500",
        ] {
            assert_eq!(parse(&[acting]).check(), Vec::<String>::new());
        }
        assert_eq!(parse(&["--profiling=false"]).check(), Vec::<String>::new());
    }

    /// GCE's kube-proxy command line passes the ipvs flags in every mode; they and the other flags kube-proxy
    /// accepts for what svcproxy does not have are accepted, each named once.
    #[test]
    fn flags_of_what_svcproxy_does_not_have_are_accepted_and_named() {
        let flags = parse(&[
            "--ipvs-sync-period=1m",
            "--ipvs-min-sync-period=10s",
            "--ipvs-strict-arp",
            "--profiling",
            "--proxy-port-range=30000-32767",
            "--log-text-split-stream",
        ]);
        let warnings = flags.check();
        for flag in [
            "--profiling:",
            "--proxy-port-range:",
            "--ipvs-*:",
            "--log-*-split-stream/info-buffer-size:",
        ] {
            assert!(
                warnings.iter().any(|w| w.starts_with(flag)),
                "{flag} not named: {warnings:?}"
            );
        }
        assert_eq!(warnings.len(), 4, "{warnings:?}");
        assert_eq!(parse(&["--proxy-port-range="]).check(), Vec::<String>::new());
    }

    #[test]
    fn values_are_checked_as_kube_proxy_checks_them() {
        let argv = |a: &str| Flags::try_parse_from(["svcproxy", a]).map(|f| f.upstream);
        assert!(argv("--oom-score-adj=-1001").is_err());
        assert!(argv("--oom-score-adj=1000").is_ok());
        assert!(argv("--config-sync-period=soon").is_err());
        assert!(argv("--v=loud").is_err());
    }
}
