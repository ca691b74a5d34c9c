//! KubeProxyConfiguration files: every supported field, kube-proxy's defaulting, strictness about what is
//! unknown, invalid or unsupported, precedence of command-line flags, and --write-config-to reading back.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgMatches, CommandFactory, FromArgMatches};
use svcproxy::cli::{Cli, DetectLocalMode, LogFormat, ProxyMode, RunArgs};
use svcproxy::config_file::{ConfigFileError, effective_config_yaml, ignored_flags, merge, parse, resolve};

const HEADER: &str = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n";

/// `svcproxy run <flags>`, parsed as the binary parses it, with the matches that tell which flags were given.
fn command_line(flags: &[&str]) -> (RunArgs, ArgMatches) {
    let argv = ["svcproxy", "run"].iter().chain(flags);
    let matches = Cli::command()
        .try_get_matches_from(argv)
        .expect("command line parses");
    let run = matches.subcommand_matches("run").expect("run subcommand").clone();
    (RunArgs::from_arg_matches(&run).expect("run arguments"), run)
}

/// The arguments `svcproxy run <flags>` ends up with when the file says `yaml`.
fn effective(flags: &[&str], yaml: &str) -> RunArgs {
    let (args, matches) = command_line(flags);
    let file = parse(yaml).unwrap_or_else(|e| panic!("{e}\n---\n{yaml}"));
    merge(args, &matches, &file)
}

fn defaults() -> RunArgs {
    command_line(&[]).0
}

fn parse_err(body: &str) -> ConfigFileError {
    let yaml = format!("{HEADER}{body}");
    match parse(&yaml) {
        Ok(cfg) => panic!("accepted:\n{yaml}\n{cfg:#?}"),
        Err(e) => e,
    }
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// What `kubectl -n kube-system get configmap kube-proxy` shows under config.conf on a kubeadm cluster: every
/// field present, nearly all of them zero values meaning "default".
const KUBEADM_CONFIG: &str = r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
bindAddress: 0.0.0.0
bindAddressHardFail: false
clientConnection:
  acceptContentTypes: ""
  burst: 0
  contentType: ""
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 0
clusterCIDR: 10.244.0.0/16
configSyncPeriod: 0s
conntrack:
  maxPerCore: null
  min: null
  tcpBeLiberal: false
  tcpCloseWaitTimeout: null
  tcpEstablishedTimeout: null
  udpStreamTimeout: 0s
  udpTimeout: 0s
detectLocal:
  bridgeInterface: ""
  interfaceNamePrefix: ""
detectLocalMode: ""
enableProfiling: false
healthzBindAddress: ""
hostnameOverride: ""
iptables:
  localhostNodePorts: null
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
ipvs:
  excludeCIDRs: null
  minSyncPeriod: 0s
  scheduler: ""
  strictARP: false
  syncPeriod: 0s
  tcpFinTimeout: 0s
  tcpTimeout: 0s
  udpTimeout: 0s
kind: KubeProxyConfiguration
logging:
  flushFrequency: 0
  options:
    json:
      infoBufferSize: "0"
    text:
      infoBufferSize: "0"
  verbosity: 0
metricsBindAddress: ""
mode: ""
nftables:
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
nodePortAddresses: null
oomScoreAdj: null
portRange: ""
showHiddenMetricsForVersion: ""
winkernel:
  enableDSR: false
  forwardHealthCheckVip: false
  networkName: ""
  rootHnsEndpointName: ""
  sourceVip: ""
"#;

/// Every supported field set to something other than its default.
const EVERY_FIELD: &str = r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clientConnection:
  kubeconfig: /etc/svcproxy/kubeconfig
hostnameOverride: node-7
clusterCIDR: 10.244.0.0/16, fd00:10:244::/56
detectLocalMode: InterfaceNamePrefix
detectLocal:
  bridgeInterface: cbr0
  interfaceNamePrefix: veth
nodePortAddresses: [192.168.0.0/16, 10.0.0.0/8]
bindAddress: 0.0.0.0
healthzBindAddress: 127.0.0.1:20256
metricsBindAddress: 0.0.0.0:20249
iptables:
  masqueradeAll: true
  masqueradeBit: 5
  localhostNodePorts: true
  syncPeriod: 1m0s
  minSyncPeriod: 250ms
conntrack:
  maxPerCore: 0
  min: 65536
  tcpEstablishedTimeout: 2h0m0s
  tcpCloseWaitTimeout: 30s
  tcpBeLiberal: true
  udpTimeout: 30s
  udpStreamTimeout: 2m0s
oomScoreAdj: -500
logging:
  format: json
"#;

#[test]
fn every_supported_field_reaches_the_arguments() {
    let args = effective(&[], EVERY_FIELD);
    assert_eq!(args.proxy_mode, ProxyMode::Iptables);
    assert_eq!(args.kubeconfig, Some(PathBuf::from("/etc/svcproxy/kubeconfig")));
    assert_eq!(args.hostname_override.as_deref(), Some("node-7"));
    assert_eq!(
        args.cluster_cidr,
        vec![
            "10.244.0.0/16".parse().unwrap(),
            "fd00:10:244::/56".parse().unwrap()
        ]
    );
    assert_eq!(args.detect_local_mode, DetectLocalMode::InterfaceNamePrefix);
    assert_eq!(args.pod_bridge_interface.as_deref(), Some("cbr0"));
    assert_eq!(args.pod_interface_name_prefix.as_deref(), Some("veth"));
    assert_eq!(args.nodeport_addresses, ["192.168.0.0/16", "10.0.0.0/8"]);
    assert_eq!(
        args.healthz_bind_address,
        "127.0.0.1:20256".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(
        args.metrics_bind_address,
        "0.0.0.0:20249".parse::<SocketAddr>().unwrap()
    );
    assert!(args.masquerade_all);
    assert_eq!(args.iptables_masquerade_bit, 5);
    assert!(args.iptables_localhost_nodeports);
    assert_eq!(args.sync_period, secs(60));
    assert_eq!(args.min_sync_period, Duration::from_millis(250));
    assert_eq!(args.conntrack_max_per_core, 0);
    assert_eq!(args.conntrack_min, 65536);
    assert_eq!(args.conntrack_tcp_timeout_established, secs(7200));
    assert_eq!(args.conntrack_tcp_timeout_close_wait, secs(30));
    assert!(args.conntrack_tcp_be_liberal);
    assert_eq!(args.conntrack_udp_timeout, secs(30));
    assert_eq!(args.conntrack_udp_timeout_stream, secs(120));
    assert_eq!(args.log_format, LogFormat::Json);
    assert_eq!(args.oom_score_adj(), -500);
    assert!(parse(EVERY_FIELD).unwrap().warnings.is_empty());
}

/// `oomScoreAdj` is a pointer in kube-proxy's configuration: unset or `null` (kubeadm's) is -999, and an
/// explicit 0 is 0, not the default.
#[test]
fn the_oom_score_adjustment_defaults_as_kube_proxys_does() {
    let adj = |yaml: &str| effective(&[], &format!("{HEADER}{yaml}")).oom_score_adj();
    assert_eq!(adj(""), -999);
    assert_eq!(adj("oomScoreAdj: null\n"), -999);
    assert_eq!(adj("oomScoreAdj: 0\n"), 0);
    assert_eq!(adj("oomScoreAdj: 1000\n"), 1000);
    assert_eq!(command_line(&["--oom-score-adj=-10"]).0.oom_score_adj(), -10);
    assert_eq!(defaults().oom_score_adj(), -999);
}

#[test]
fn a_file_with_only_its_type_gives_the_flag_defaults() {
    assert_eq!(effective(&[], HEADER), defaults());
}

#[test]
fn kubeadms_config_is_accepted_and_its_zero_values_mean_defaults() {
    let file = parse(KUBEADM_CONFIG).unwrap();
    assert_eq!(file.warnings, Vec::<String>::new());
    let args = effective(&[], KUBEADM_CONFIG);
    let expected = RunArgs {
        kubeconfig: Some("/var/lib/kube-proxy/kubeconfig.conf".into()),
        cluster_cidr: vec!["10.244.0.0/16".parse().unwrap()],
        ..defaults()
    };
    assert_eq!(args, expected);
    // The defaults spelled out, as kube-proxy applies them.
    assert_eq!(args.iptables_masquerade_bit, 14);
    assert_eq!(args.sync_period, secs(30));
    assert_eq!(args.min_sync_period, secs(1));
    assert_eq!(args.conntrack_max_per_core, 32768);
    assert_eq!(args.conntrack_min, 131072);
    assert_eq!(args.conntrack_tcp_timeout_established, secs(24 * 3600));
    assert_eq!(args.conntrack_tcp_timeout_close_wait, secs(3600));
    assert_eq!(args.healthz_bind_address.to_string(), "0.0.0.0:10256");
    assert_eq!(args.metrics_bind_address.to_string(), "127.0.0.1:10249");
}

#[test]
fn zero_values_follow_kube_proxys_defaulting() {
    // Sync periods: 0 is "unset". Conntrack: null is "unset" but an explicit 0 means "leave the kernel's
    // value".
    let args = effective(
        &[],
        &format!(
            "{HEADER}iptables:\n  masqueradeBit: 0\n  syncPeriod: 0s\n  minSyncPeriod: 0s\n\
             conntrack:\n  maxPerCore: 0\n  min: 0\n  tcpEstablishedTimeout: 0s\n  tcpCloseWaitTimeout: 0s\n"
        ),
    );
    assert_eq!(args.iptables_masquerade_bit, 0);
    assert_eq!(args.sync_period, secs(30));
    assert_eq!(args.min_sync_period, secs(1));
    assert_eq!(args.conntrack_max_per_core, 0);
    assert_eq!(args.conntrack_min, 0);
    assert_eq!(args.conntrack_tcp_timeout_established, Duration::ZERO);
    assert_eq!(args.conntrack_tcp_timeout_close_wait, Duration::ZERO);
}

#[test]
fn the_section_of_the_mode_in_effect_applies() {
    let yaml = format!(
        "{HEADER}mode: nftables\n\
         iptables: {{masqueradeAll: false, masqueradeBit: 3, syncPeriod: 10s, minSyncPeriod: 2s}}\n\
         nftables: {{masqueradeAll: true, masqueradeBit: 7, syncPeriod: 20s, minSyncPeriod: 3s}}\n"
    );
    let nft = effective(&[], &yaml);
    assert_eq!(nft.proxy_mode, ProxyMode::Nftables);
    assert!(nft.masquerade_all);
    assert_eq!(nft.iptables_masquerade_bit, 7);
    assert_eq!((nft.sync_period, nft.min_sync_period), (secs(20), secs(3)));

    // A mode flag next to the file is ignored, so it cannot pick the other section either.
    assert_eq!(effective(&["--proxy-mode=iptables"], &yaml), nft);

    let ipt = effective(&[], &yaml.replace("mode: nftables", "mode: iptables"));
    assert_eq!(ipt.proxy_mode, ProxyMode::Iptables);
    assert!(!ipt.masquerade_all);
    assert_eq!(ipt.iptables_masquerade_bit, 3);
    assert_eq!((ipt.sync_period, ipt.min_sync_period), (secs(10), secs(2)));
}

#[test]
fn top_level_sync_periods_win_over_the_section() {
    let args = effective(
        &[],
        &format!(
            "{HEADER}syncPeriod: 45s\nminSyncPeriod: 5s\niptables:\n  syncPeriod: 10s\n  minSyncPeriod: 2s\n"
        ),
    );
    assert_eq!((args.sync_period, args.min_sync_period), (secs(45), secs(5)));
}

#[test]
fn an_ipv6_bind_address_moves_the_default_servers_to_ipv6() {
    let args = effective(&[], &format!("{HEADER}bindAddress: \"::\"\n"));
    assert_eq!(args.healthz_bind_address.to_string(), "[::]:10256");
    assert_eq!(args.metrics_bind_address.to_string(), "[::1]:10249");
}

/// kube-proxy decodes leniently when strict decoding fails: an unknown field (misspelt, or of another
/// version) does not stop it, and must not stop svcproxy; it is named in a warning.
#[test]
fn unknown_fields_are_ignored_with_a_warning_naming_them() {
    for (body, field) in [
        ("masqueradeAll: true\n", "masqueradeAll"),
        ("iptables:\n  masqueradeBits: 14\n", "iptables.masqueradeBits"),
        ("conntrack:\n  maxPerCpu: 1\n", "conntrack.maxPerCpu"),
        ("detectLocal:\n  bridge: cbr0\n", "detectLocal.bridge"),
        (
            "clientConnection:\n  kubeConfig: /x\n",
            "clientConnection.kubeConfig",
        ),
        ("ipvs:\n  schedular: rr\n", "ipvs.schedular"),
        ("logging:\n  level: 4\n", "logging.level"),
    ] {
        let yaml = format!("{HEADER}{body}");
        let file = parse(&yaml).unwrap_or_else(|e| panic!("{body}: {e}"));
        assert_eq!(
            file.warnings,
            [format!(
                "{field}: unknown field, ignored (as kube-proxy's lenient decoding ignores it)"
            )],
            "{body}"
        );
    }
    // Several at once, and the known fields beside them still apply.
    let file = parse(&format!(
        "{HEADER}udpIdleTimeout: 250ms\nresourceContainer: /kube-proxy\nclusterCIDR: 10.244.0.0/16\n"
    ))
    .unwrap();
    assert_eq!(file.warnings.len(), 2, "{:?}", file.warnings);
    assert_eq!(
        file.cluster_cidr,
        ["10.244.0.0/16".parse::<ipnet::IpNet>().unwrap()]
    );
}

#[test]
fn invalid_values_are_errors_naming_the_field() {
    for (body, field, says) in [
        (
            "iptables:\n  masqueradeBit: 40\n",
            "iptables.masqueradeBit",
            "40 is outside 0-31",
        ),
        (
            "nftables:\n  masqueradeBit: -1\n",
            "nftables.masqueradeBit",
            "-1 is outside 0-31",
        ),
        (
            "iptables:\n  syncPeriod: 30\n",
            "iptables.syncPeriod",
            "expected a duration such as \"30s\"",
        ),
        (
            "iptables:\n  minSyncPeriod: 1 second\n",
            "iptables.minSyncPeriod",
            "unknown unit",
        ),
        (
            "iptables:\n  syncPeriod: -5s\n",
            "iptables.syncPeriod",
            "negative",
        ),
        (
            "iptables:\n  masqueradeAll: \"yes\"\n",
            "iptables.masqueradeAll",
            "invalid type",
        ),
        (
            "conntrack:\n  maxPerCore: -1\n",
            "conntrack.maxPerCore",
            "-1 is negative",
        ),
        ("conntrack:\n  min: 4294967296\n", "conntrack.min", "larger than"),
        (
            "conntrack:\n  udpTimeout: 5x\n",
            "conntrack.udpTimeout",
            "unknown unit",
        ),
        ("clusterCIDR: 10.244.0.0/33\n", "clusterCIDR", "is not a CIDR"),
        (
            "clusterCIDR: 10.244.0.0/16,pods\n",
            "clusterCIDR",
            "\"pods\" is not a CIDR",
        ),
        (
            "healthzBindAddress: 0.0.0.0:port\n",
            "healthzBindAddress",
            "not an IP:port",
        ),
        (
            "metricsBindAddress: localhost:10249\n",
            "metricsBindAddress",
            "not an IP:port",
        ),
        (
            "healthzBindAddress: 0.0.0.0:0\n",
            "healthzBindAddress",
            "port 0 is outside 1-65535",
        ),
        ("bindAddress: any\n", "bindAddress", "not an IP address"),
        ("mode: userspace\n", "mode", "not a proxy mode"),
        ("detectLocalMode: PodCIDR\n", "detectLocalMode", "not one of"),
        (
            "nodePortAddresses: [10.0.0.0/8, primary]\n",
            "nodePortAddresses",
            "primary",
        ),
        ("nodePortAddresses: [eth0]\n", "nodePortAddresses", "eth0"),
        ("logging:\n  format: xml\n", "logging.format", "not a log format"),
        ("oomScoreAdj: -2000\n", "oomScoreAdj", "outside -1000-1000"),
        (
            "featureGates: {SomeGate: maybe}\n",
            "featureGates.SomeGate",
            "invalid type",
        ),
    ] {
        let err = parse_err(body);
        assert!(matches!(err, ConfigFileError::Invalid { .. }), "{body}: {err:?}");
        assert_eq!(err.field(), Some(field), "{body}: {err}");
        assert!(err.to_string().starts_with(&format!("{field}: ")), "{err}");
        assert!(err.to_string().contains(says), "{body}: {err}");
    }
}

#[test]
fn the_document_must_be_a_kube_proxy_configuration() {
    let wrong_version = parse("apiVersion: kubeproxy.config.k8s.io/v1beta1\nkind: KubeProxyConfiguration\n");
    assert_eq!(wrong_version.unwrap_err().field(), Some("apiVersion"));
    let wrong_kind = parse("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeletConfiguration\n");
    assert_eq!(wrong_kind.unwrap_err().field(), Some("kind"));
    assert_eq!(
        parse("kind: KubeProxyConfiguration\n").unwrap_err().field(),
        Some("apiVersion")
    );
    assert!(matches!(
        parse(""),
        Err(ConfigFileError::Empty | ConfigFileError::Yaml(_))
    ));
    assert!(matches!(
        parse("# nothing\n"),
        Err(ConfigFileError::Empty | ConfigFileError::Yaml(_))
    ));
    assert!(matches!(
        parse("mode: [iptables\n"),
        Err(ConfigFileError::Yaml(_))
    ));
    assert!(parse("- iptables\n").is_err());
}

#[test]
fn unsupported_options_are_refused_and_say_so() {
    // What kube-proxy ignores outside its ipvs mode or Windows is ignored here too, with a warning.
    for (body, field) in [
        ("ipvs:\n  scheduler: rr\n", "ipvs.scheduler"),
        ("ipvs:\n  strictARP: true\n", "ipvs.strictARP"),
        ("ipvs:\n  syncPeriod: 30s\n", "ipvs.syncPeriod"),
        ("ipvs:\n  excludeCIDRs: [10.0.0.0/8]\n", "ipvs.excludeCIDRs"),
        ("winkernel:\n  enableDSR: true\n", "winkernel.enableDSR"),
        ("winkernel:\n  networkName: l2bridge\n", "winkernel.networkName"),
        ("windowsRunAsService: true\n", "windowsRunAsService"),
        ("portRange: 30000-32767\n", "portRange"),
        ("enableProfiling: true\n", "enableProfiling"),
    ] {
        let file = parse(&format!("{HEADER}{body}")).unwrap_or_else(|e| panic!("{body}: {e}"));
        assert!(
            file.warnings.iter().any(|w| w.starts_with(&format!("{field}: "))),
            "{body}: {:?}",
            file.warnings
        );
    }
    // A mode svcproxy cannot run stops it, saying so.
    for (body, field) in [("mode: ipvs\n", "mode"), ("mode: kernelspace\n", "mode")] {
        let err = parse_err(body);
        assert!(
            matches!(err, ConfigFileError::Unsupported { .. }),
            "{body}: {err:?}"
        );
        assert_eq!(err.field(), Some(field), "{body}: {err}");
    }
    assert!(
        parse_err("mode: ipvs\n")
            .to_string()
            .contains("not supported by svcproxy")
    );
}

#[test]
fn settings_without_effect_are_accepted_with_a_warning() {
    let file = parse(&format!(
        "{HEADER}oomScoreAdj: -999\nconfigSyncPeriod: 15m0s\nfeatureGates: {{SomeGate: true}}\n\
         showHiddenMetricsForVersion: \"1.30\"\n\
         clientConnection: {{qps: 50, burst: 100, contentType: application/json}}\n\
         logging: {{verbosity: 4, flushFrequency: 5s}}\nbindAddressHardFail: true\n"
    ))
    .unwrap();
    let fields: Vec<&str> = file
        .warnings
        .iter()
        .map(|w| w.split(':').next().unwrap())
        .collect();
    assert_eq!(
        fields,
        [
            "clientConnection.contentType",
            "clientConnection.qps",
            "configSyncPeriod",
            "featureGates",
            "showHiddenMetricsForVersion",
            "logging.flushFrequency",
            "logging.verbosity",
        ]
    );
    assert!(file.warnings.iter().all(|w| w.contains("no effect in svcproxy")));
    assert!(file.warnings[3].contains("SomeGate=true"));
}

/// As in kube-proxy, a file wins over every flag for what it can express: a DaemonSet's leftover flags, which
/// kube-proxy has been ignoring, must not start to count when the node switches to svcproxy. Each ignored flag
/// is named in a warning; the node name and the log format are the exceptions, where the flag wins.
#[test]
fn a_configuration_file_wins_over_every_flag_it_can_express() {
    let flags = [
        "--proxy-mode=nftables",
        "--kubeconfig=/etc/kubernetes/proxy.conf",
        "--hostname-override=cli-node",
        "--cluster-cidr=10.0.0.0/8",
        "--detect-local-mode=BridgeInterface",
        "--pod-bridge-interface=br0",
        "--pod-interface-name-prefix=cali",
        "--nodeport-addresses=primary",
        "--healthz-bind-address=0.0.0.0:1",
        "--metrics-bind-address=0.0.0.0:2",
        "--bind-address=10.0.0.1",
        "--bind-address-hard-fail",
        "--masquerade-all=false",
        "--iptables-masquerade-bit=20",
        "--iptables-localhost-nodeports=false",
        "--iptables-sync-period=2m",
        "--iptables-min-sync-period=3s",
        "--conntrack-max-per-core=1",
        "--conntrack-min=2",
        "--conntrack-tcp-timeout-established=3s",
        "--conntrack-tcp-timeout-close-wait=4s",
        "--conntrack-tcp-be-liberal=false",
        "--conntrack-udp-timeout=5s",
        "--conntrack-udp-timeout-stream=6s",
        "--oom-score-adj=100",
        "--log-format=text",
    ];
    let merged = effective(&flags, EVERY_FIELD);
    assert_eq!(
        merged,
        RunArgs {
            hostname_override: Some("cli-node".into()),
            log_format: LogFormat::Text,
            ..effective(&[], EVERY_FIELD)
        }
    );

    let (_, matches) = command_line(&flags);
    let warnings = ignored_flags(&matches);
    assert_eq!(warnings.len(), flags.len() - 2, "{warnings:#?}");
    for flag in flags {
        let name = flag.split('=').next().unwrap();
        let named = warnings
            .iter()
            .any(|w| w.starts_with(name) || w.contains(&format!("/{name}=")));
        let exempt = ["--hostname-override", "--log-format"].contains(&name);
        assert_eq!(named, !exempt, "{flag}: {warnings:#?}");
    }
    assert!(
        warnings.contains(
            &"--proxy-mode=nftables: ignored, because --config is given and the file's mode applies instead \
              (as in kube-proxy, only --hostname-override and the logging flags override a configuration file)"
                .to_string()
        ),
        "{warnings:#?}"
    );
    assert!(
        warnings
            .iter()
            .any(|w| w.starts_with("--sync-period/--iptables-sync-period=2m: ignored")),
        "{warnings:#?}"
    );
    // A flag that is not given is not named, and the node name given next to a file is not a warning.
    let (_, matches) = command_line(&["--hostname-override=n", "--v=4", "--iptables-backend=legacy"]);
    assert_eq!(ignored_flags(&matches), Vec::<String>::new());
}

#[test]
fn a_flag_spelled_with_the_files_value_is_ignored_all_the_same() {
    let file = format!("{HEADER}iptables:\n  masqueradeBit: 9\n  syncPeriod: 10s\n");
    assert_eq!(effective(&[], &file).iptables_masquerade_bit, 9);
    assert_eq!(
        effective(&["--iptables-masquerade-bit=14"], &file).iptables_masquerade_bit,
        9
    );
    assert_eq!(effective(&["--sync-period=30s"], &file).sync_period, secs(10));
    let (_, matches) = command_line(&["--iptables-masquerade-bit=9"]);
    assert_eq!(ignored_flags(&matches).len(), 1);
}

#[test]
fn a_manifest_directory_drops_the_files_kubeconfig() {
    let args = effective(&["--manifests=/srv/manifests"], EVERY_FIELD);
    assert_eq!(args.kubeconfig, None);
    assert_eq!(args.manifests, Some(PathBuf::from("/srv/manifests")));
}

/// The arguments a written configuration reads back to, with nothing on the command line but --config.
fn read_back(args: &RunArgs) -> RunArgs {
    let yaml = effective_config_yaml(args);
    let mut back = effective(&[], &yaml);
    // What a KubeProxyConfiguration cannot carry.
    back.config = args.config.clone();
    back.write_config_to = args.write_config_to.clone();
    back.manifests = args.manifests.clone();
    if back.manifests.is_some() {
        back.kubeconfig = args.kubeconfig.clone();
    }
    back
}

#[test]
fn written_configuration_reads_back_to_the_same_arguments() {
    let cases: Vec<Vec<&str>> = vec![
        vec![],
        vec![
            "--write-config-to=/tmp/out.yaml",
            "--config=/etc/svcproxy/config.conf",
        ],
        vec![
            "--proxy-mode=nftables",
            "--kubeconfig=/etc/kube config/\"quoted\".yaml",
            "--hostname-override=Node: #1",
            "--cluster-cidr=10.244.0.0/16,fd00::/48",
            "--detect-local-mode=BridgeInterface",
            "--pod-bridge-interface=br-pods",
            "--pod-interface-name-prefix=veth",
            "--nodeport-addresses=10.0.0.0/8,fd00::/8",
            "--healthz-bind-address=[::]:10256",
            "--metrics-bind-address=[::1]:10249",
            "--masquerade-all",
            "--iptables-masquerade-bit=0",
            "--iptables-localhost-nodeports",
            "--sync-period=1h2m3.5s",
            "--min-sync-period=1500us",
            "--conntrack-max-per-core=0",
            "--conntrack-min=1",
            "--conntrack-tcp-timeout-established=0",
            "--conntrack-tcp-timeout-close-wait=17s",
            "--conntrack-tcp-be-liberal",
            "--conntrack-udp-timeout=30s",
            "--conntrack-udp-timeout-stream=2m",
            "--log-format=json",
        ],
        vec!["--nodeport-addresses=primary", "--detect-local-mode=NodeCIDR"],
        vec!["--bind-address=10.0.0.99", "--bind-address-hard-fail"],
        vec![
            "--manifests=/srv/manifests",
            "--detect-local-mode=InterfaceNamePrefix",
        ],
    ];
    for flags in cases {
        let args = command_line(&flags).0;
        assert_eq!(
            read_back(&args),
            args,
            "{flags:?}\n{}",
            effective_config_yaml(&args)
        );
    }
    for args in [effective(&[], EVERY_FIELD), effective(&[], KUBEADM_CONFIG)] {
        assert_eq!(read_back(&args), args, "{}", effective_config_yaml(&args));
    }
}

#[test]
fn written_configuration_spells_durations_and_defaults_as_kube_proxy_does() {
    let yaml = effective_config_yaml(&defaults());
    for line in [
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1",
        "kind: KubeProxyConfiguration",
        "mode: iptables",
        "  syncPeriod: \"30s\"",
        "  minSyncPeriod: \"1s\"",
        "  tcpEstablishedTimeout: \"24h0m0s\"",
        "  tcpCloseWaitTimeout: \"1h0m0s\"",
        "  masqueradeBit: 14",
        "  localhostNodePorts: false",
        "healthzBindAddress: \"0.0.0.0:10256\"",
    ] {
        assert!(yaml.lines().any(|l| l == line), "missing {line:?} in\n{yaml}");
    }
    assert!(parse(&yaml).unwrap().warnings.is_empty());
}

#[test]
fn a_zero_min_sync_period_is_explained_in_the_written_file() {
    // A file cannot ask for 0 (kube-proxy reads 0s as "default"), and next to a file the flag does not count.
    let args = command_line(&["--min-sync-period=0"]).0;
    let yaml = effective_config_yaml(&args);
    assert!(
        yaml.contains("# minSyncPeriod is 0 (no batching), which a file cannot say"),
        "{yaml}"
    );
    assert_eq!(effective(&[], &yaml).min_sync_period, secs(1));
    assert_eq!(
        effective(&["--min-sync-period=0"], &yaml).min_sync_period,
        secs(1)
    );
}

fn temp_file(name: &str, contents: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("svcproxy-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

#[test]
fn resolve_reads_the_file_named_by_config() {
    let path = temp_file("every-field.yaml", EVERY_FIELD);
    let config_flag = format!("--config={}", path.display());
    let (args, matches) = command_line(&[&config_flag, "--iptables-masquerade-bit=1"]);
    let resolved = resolve(args, &matches).unwrap();
    assert_eq!(resolved.args.iptables_masquerade_bit, 5);
    assert_eq!(resolved.args.hostname_override.as_deref(), Some("node-7"));
    assert_eq!(resolved.args.config, Some(path.clone()));
    assert_eq!(resolved.warnings.len(), 1, "{:?}", resolved.warnings);
    assert!(
        resolved.warnings[0].starts_with("--iptables-masquerade-bit=1: ignored, because --config is given")
    );

    // Without --config nothing changes.
    let (args, matches) = command_line(&["--masquerade-all"]);
    assert_eq!(resolve(args.clone(), &matches).unwrap().args, args);

    // Errors name the file, then the field.
    let bad = temp_file("bad.yaml", &format!("{HEADER}iptables:\n  masqueradeBit: 40\n"));
    let (args, matches) = command_line(&[&format!("--config={}", bad.display())]);
    let err = resolve(args, &matches).unwrap_err();
    assert_eq!(err.field(), Some("iptables.masqueradeBit"));
    assert_eq!(
        err.to_string(),
        format!("{}: iptables.masqueradeBit: 40 is outside 0-31", bad.display())
    );

    let missing = path.with_file_name("missing.yaml");
    let (args, matches) = command_line(&[&format!("--config={}", missing.display())]);
    assert!(matches!(
        resolve(args, &matches),
        Err(ConfigFileError::Read { .. })
    ));
}

#[test]
fn write_effective_config_writes_a_file_that_resolves_back() {
    let (args, _) = command_line(&["--cluster-cidr=10.244.0.0/16", "--conntrack-min=1000"]);
    let path = std::env::temp_dir().join(format!("svcproxy-written-{}.yaml", std::process::id()));
    svcproxy::config_file::write_effective_config(&args, &path).unwrap();
    let (again, matches) = command_line(&[&format!("--config={}", path.display())]);
    let resolved = resolve(again, &matches).unwrap();
    assert_eq!(
        RunArgs {
            config: None,
            ..resolved.args
        },
        args
    );
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn bind_address_without_a_file_chooses_the_family_of_the_default_servers() {
    let resolved = |flags: &[&str]| {
        let (args, matches) = command_line(flags);
        resolve(args, &matches).unwrap()
    };
    let v6 = resolved(&["--bind-address=::"]);
    assert_eq!(v6.args.healthz_bind_address, "[::]:10256".parse().unwrap());
    assert_eq!(v6.args.metrics_bind_address, "[::1]:10249".parse().unwrap());
    assert!(v6.warnings.is_empty(), "{:?}", v6.warnings);
    // An address given explicitly stays; IPv4 or both families keep the IPv4 defaults, as upstream.
    let kept = resolved(&["--bind-address=fd00::1", "--healthz-bind-address=0.0.0.0:1"]);
    assert_eq!(kept.args.healthz_bind_address, "0.0.0.0:1".parse().unwrap());
    assert_eq!(kept.args.metrics_bind_address, "[::1]:10249".parse().unwrap());
    for flags in [
        &["--bind-address=0.0.0.0"][..],
        &["--bind-address=10.0.0.1,fd00::1"],
        &[],
    ] {
        assert_eq!(
            resolved(flags).args.healthz_bind_address,
            defaults().healthz_bind_address,
            "{flags:?}"
        );
        assert_eq!(
            resolved(flags).args.metrics_bind_address,
            defaults().metrics_bind_address,
            "{flags:?}"
        );
    }
    assert!(
        Cli::command()
            .try_get_matches_from(["svcproxy", "run", "--bind-address=localhost"])
            .is_err(),
        "not an IP address"
    );
}

#[test]
fn bind_address_with_a_file_is_ignored_and_said_so() {
    let dir = std::env::temp_dir().join(format!("svcproxy-bind-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("config.conf");
    std::fs::write(&path, HEADER).unwrap();
    let (args, matches) = command_line(&["--config", path.to_str().unwrap(), "--bind-address=::"]);
    let resolved = resolve(args, &matches).unwrap();
    assert_eq!(
        resolved.args.healthz_bind_address,
        defaults().healthz_bind_address
    );
    assert!(
        resolved
            .warnings
            .iter()
            .any(|w| w.starts_with("--bind-address=::: ignored, because --config is given")),
        "{:?}",
        resolved.warnings
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A specific bind address (flag without a file, or the file's `bindAddress`) is the node's address of its
/// family, ahead of the Node object's: it is what `primary` NodePorts open on and what the load-balancer
/// source-range allowance names.
#[test]
fn a_specific_bind_address_is_the_nodes_address() {
    use svcproxy::sync::iptables_proxier::ProxierOptions;
    use svcproxy_iptables::config::NodePortAddresses;
    use svcproxy_model::{IpFamily, Node};

    let node = Node {
        addresses: vec!["10.0.0.10".parse().unwrap()],
        ..Default::default()
    };
    let local = ["10.0.0.10".parse().unwrap(), "10.0.0.99".parse().unwrap()];
    let from_flag = command_line(&["--bind-address", "10.0.0.99", "--nodeport-addresses", "primary"]).0;
    let from_file = effective(
        &[],
        &format!("{HEADER}bindAddress: 10.0.0.99\nnodePortAddresses: [primary]\n"),
    );
    for args in [from_flag, from_file] {
        let config = ProxierOptions::from_args(&args, IpFamily::V4)
            .unwrap()
            .resolve(Some(&node), &local);
        assert_eq!(config.node_ip, Some("10.0.0.99".parse().unwrap()));
        assert_eq!(
            config.node_port_addresses,
            NodePortAddresses::Ips(vec!["10.0.0.99".parse().unwrap()])
        );
    }
    // The unspecified address says nothing of the node: the Node object's address stays.
    for flags in [&["--bind-address", "0.0.0.0"][..], &[]] {
        let args = command_line(flags).0;
        let config = ProxierOptions::from_args(&args, IpFamily::V4)
            .unwrap()
            .resolve(Some(&node), &local);
        assert_eq!(config.node_ip, Some("10.0.0.10".parse().unwrap()));
    }
}

/// A bare address, which kube-proxy accepts for its listen addresses, takes the default port, in the file and
/// on the command line.
#[test]
fn a_bare_listen_address_takes_the_default_port() {
    let args = effective(
        &[],
        &format!("{HEADER}healthzBindAddress: 0.0.0.0\nmetricsBindAddress: \"::\"\n"),
    );
    assert_eq!(args.healthz_bind_address.to_string(), "0.0.0.0:10256");
    assert_eq!(args.metrics_bind_address.to_string(), "[::]:10249");
    let (args, _) = command_line(&[
        "--metrics-bind-address=0.0.0.0",
        "--healthz-bind-address=127.0.0.1",
    ]);
    assert_eq!(args.metrics_bind_address.to_string(), "0.0.0.0:10249");
    assert_eq!(args.healthz_bind_address.to_string(), "127.0.0.1:10256");
    let (args, _) = command_line(&["--logging-format=json"]);
    assert_eq!(
        args.log_format,
        LogFormat::Json,
        "kube-proxy's spelling of --log-format"
    );
}

/// kube-proxy's deprecated port flags, without a file: 0 turns a server off, another port completes an
/// address given as a bare IP and does nothing (said) next to one with a port; next to a file, ignored.
#[test]
fn the_deprecated_port_flags_act_as_in_kube_proxy() {
    let resolved = |flags: &[&str]| {
        let (args, matches) = command_line(flags);
        resolve(args, &matches).unwrap()
    };
    let off = resolved(&["--healthz-port=0", "--metrics-port=0"]);
    assert_eq!(off.args.healthz_bind_address, "0.0.0.0:0".parse().unwrap());
    assert_eq!(off.args.metrics_bind_address, "127.0.0.1:0".parse().unwrap());
    assert!(off.warnings.is_empty(), "{:?}", off.warnings);

    let completed = resolved(&["--metrics-bind-address=0.0.0.0", "--metrics-port=9100"]);
    assert_eq!(
        completed.args.metrics_bind_address,
        "0.0.0.0:9100".parse().unwrap()
    );
    assert!(completed.warnings.is_empty(), "{:?}", completed.warnings);

    let named = resolved(&[
        "--metrics-port=9100",
        "--healthz-bind-address=[::]:1",
        "--healthz-port=2",
    ]);
    assert_eq!(named.args.metrics_bind_address, defaults().metrics_bind_address);
    assert_eq!(named.args.healthz_bind_address, "[::]:1".parse().unwrap());
    assert_eq!(
        named.warnings,
        [
            "--healthz-port=2: no effect, because --healthz-bind-address ([::]:1) names its port, as in kube-proxy",
            "--metrics-port=9100: no effect, because --metrics-bind-address (127.0.0.1:10249) names its port, as \
             in kube-proxy",
        ]
    );

    // Not with --write-config-to (its file could not say "off"), and not next to a file.
    let written = resolved(&["--healthz-port=0", "--write-config-to=/dev/null"]);
    assert_eq!(written.args.healthz_bind_address, defaults().healthz_bind_address);
    let path = temp_file("port-flags.yaml", HEADER);
    let with_file = resolved(&[&format!("--config={}", path.display()), "--healthz-port=0"]);
    assert_eq!(
        with_file.args.healthz_bind_address,
        defaults().healthz_bind_address
    );
    assert!(
        with_file.warnings[0].starts_with("--healthz-port=0: ignored, because --config is given"),
        "{:?}",
        with_file.warnings
    );
}
