//! The manifests in deploy/ agree with the binary: the DaemonSet's command line parses, its --config names
//! the ConfigMap's key where the ConfigMap is mounted, that configuration (and its kubeconfig) parse, the
//! probes hit paths and the port the health server really serves, and the ClusterRole grants exactly what
//! svcproxy uses.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{CommandFactory, FromArgMatches, Parser};
use serde_json::Value;
use svcproxy::cli::{Cli, RunArgs};
use svcproxy::config_file;
use svcproxy::health::ProxyHealth;
use svcproxy::http_server::{AppState, health_router};
use svcproxy::metrics::Metrics;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

fn load(name: &str) -> Value {
    let path = deploy_dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no string at {pointer} in {v:#}"))
}

fn array_at<'a>(v: &'a Value, pointer: &str) -> &'a Vec<Value> {
    v.pointer(pointer)
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("no list at {pointer} in {v:#}"))
}

/// The manifests the kustomization applies, by kind.
struct Manifests {
    kustomization: Value,
    service_account: Value,
    cluster_role: Value,
    binding: Value,
    config_map: Value,
    daemon_set: Value,
}

fn manifests() -> Manifests {
    let kustomization = load("kustomization.yaml");
    let mut by_kind = std::collections::BTreeMap::new();
    for resource in array_at(&kustomization, "/resources") {
        let name = resource.as_str().expect("resource file name");
        let doc = load(name);
        let kind = str_at(&doc, "/kind").to_string();
        assert!(by_kind.insert(kind.clone(), doc).is_none(), "two {kind}s");
    }
    let mut take = |kind: &str| {
        by_kind
            .remove(kind)
            .unwrap_or_else(|| panic!("no {kind} in deploy/"))
    };
    let m = Manifests {
        service_account: take("ServiceAccount"),
        cluster_role: take("ClusterRole"),
        binding: take("ClusterRoleBinding"),
        config_map: take("ConfigMap"),
        daemon_set: take("DaemonSet"),
        kustomization,
    };
    assert!(by_kind.is_empty(), "unexpected resources: {:?}", by_kind.keys());
    m
}

fn container(m: &Manifests) -> &Value {
    let containers = array_at(&m.daemon_set, "/spec/template/spec/containers");
    assert_eq!(containers.len(), 1);
    &containers[0]
}

fn command(m: &Manifests) -> Vec<String> {
    array_at(container(m), "/command")
        .iter()
        .map(|a| a.as_str().expect("command word").to_string())
        .collect()
}

/// Where the ConfigMap is mounted in the container.
fn config_mount(m: &Manifests) -> String {
    let config_map = str_at(&m.config_map, "/metadata/name");
    let volume = array_at(&m.daemon_set, "/spec/template/spec/volumes")
        .iter()
        .find(|v| v.pointer("/configMap/name").and_then(Value::as_str) == Some(config_map))
        .expect("a volume of the ConfigMap");
    let mount = array_at(container(m), "/volumeMounts")
        .iter()
        .find(|vm| vm["name"] == volume["name"])
        .expect("the ConfigMap volume is mounted");
    str_at(mount, "/mountPath").to_string()
}

/// The `run` arguments the DaemonSet's pod ends up with: its command line plus the ConfigMap's configuration.
fn pod_args(m: &Manifests) -> RunArgs {
    let matches = Cli::command()
        .try_get_matches_from(command(m))
        .expect("the DaemonSet's command line parses");
    let run = matches.subcommand_matches("run").expect("it runs `svcproxy run`");
    let args = RunArgs::from_arg_matches(run).unwrap();
    let file = config_file::parse(str_at(&m.config_map, "/data/config.conf")).unwrap();
    config_file::merge(args, run, &file)
}

#[test]
fn every_file_is_listed_and_namespaced_by_the_kustomization() {
    let m = manifests();
    assert_eq!(str_at(&m.kustomization, "/namespace"), "kube-system");
    let listed: BTreeSet<String> = array_at(&m.kustomization, "/resources")
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect();
    let on_disk: BTreeSet<String> = std::fs::read_dir(deploy_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    assert_eq!(listed, on_disk);
    // The namespace comes from the kustomization alone, so it can be changed in one place.
    for doc in [
        &m.service_account,
        &m.cluster_role,
        &m.binding,
        &m.config_map,
        &m.daemon_set,
    ] {
        assert!(doc.pointer("/metadata/namespace").is_none(), "{doc:#}");
    }
    let image = str_at(container(&m), "/image");
    let images = array_at(&m.kustomization, "/images");
    assert!(
        images
            .iter()
            .any(|i| image.starts_with(&format!("{}:", str_at(i, "/name")))),
        "the kustomization's images entry must match {image}"
    );
}

#[test]
fn the_command_line_parses_and_reads_the_configmaps_key() {
    let m = manifests();
    let cmd = command(&m);
    assert_eq!(cmd[..2], ["svcproxy", "run"]);
    let cli = Cli::try_parse_from(&cmd).expect("the DaemonSet's command line parses");
    let svcproxy::cli::Command::Run(args) = cli.command else {
        panic!("the DaemonSet runs `svcproxy run`")
    };
    let config = args.config.expect("the DaemonSet passes --config");
    let expected = Path::new(&config_mount(&m)).join("config.conf");
    assert_eq!(config, expected);
    assert_eq!(config, Path::new("/var/lib/svcproxy/config.conf"));
}

#[test]
fn the_configmaps_configuration_parses_without_warnings() {
    let m = manifests();
    let file = config_file::parse(str_at(&m.config_map, "/data/config.conf")).unwrap();
    assert_eq!(file.warnings, Vec::<String>::new());
    let args = pod_args(&m);
    // Its kubeconfig is the ConfigMap's other key, in the same mount.
    let kubeconfig = args
        .kubeconfig
        .clone()
        .expect("the configuration names a kubeconfig");
    assert_eq!(kubeconfig, Path::new(&config_mount(&m)).join("kubeconfig.conf"));
    // Nothing else on the command line: what the file says is what runs.
    assert_eq!(
        args.config.as_deref(),
        Some(Path::new("/var/lib/svcproxy/config.conf"))
    );
}

#[test]
fn the_kubeconfig_uses_the_service_account_and_parses() {
    let m = manifests();
    let text = str_at(&m.config_map, "/data/kubeconfig.conf");
    let kc = kube::config::Kubeconfig::from_yaml(text).expect("kube reads the kubeconfig");
    let cluster = kc.clusters[0].cluster.as_ref().unwrap();
    assert!(cluster.server.as_deref().unwrap().starts_with("https://"));
    assert_eq!(
        cluster.certificate_authority.as_deref(),
        Some("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt")
    );
    let user = kc.auth_infos[0].auth_info.as_ref().unwrap();
    assert_eq!(
        user.token_file.as_deref(),
        Some("/var/run/secrets/kubernetes.io/serviceaccount/token")
    );
    assert_eq!(kc.current_context.as_deref(), Some("default"));
}

#[test]
fn the_pod_is_shaped_like_kube_proxys() {
    let m = manifests();
    let spec = &m.daemon_set["spec"]["template"]["spec"];
    assert_eq!(spec["hostNetwork"], true);
    assert_eq!(spec["priorityClassName"], "system-node-critical");
    assert_eq!(spec["serviceAccountName"], m.service_account["metadata"]["name"]);
    assert_eq!(spec["nodeSelector"]["kubernetes.io/os"], "linux");
    assert!(
        array_at(spec, "/tolerations")
            .iter()
            .any(|t| t["operator"] == "Exists" && t.get("key").is_none()),
        "tolerates every taint"
    );
    assert_eq!(container(&m)["securityContext"]["privileged"], true);
    // The selector selects the pods it creates.
    assert_eq!(
        m.daemon_set["spec"]["selector"]["matchLabels"]["k8s-app"],
        m.daemon_set["spec"]["template"]["metadata"]["labels"]["k8s-app"]
    );

    // NODE_NAME from the Downward API, and it is the variable --hostname-override falls back to.
    let env = array_at(container(&m), "/env");
    let node_name = env
        .iter()
        .find(|e| e["name"] == "NODE_NAME")
        .expect("NODE_NAME is set");
    assert_eq!(
        str_at(node_name, "/valueFrom/fieldRef/fieldPath"),
        "spec.nodeName"
    );
    let cmd = Cli::command();
    let run = cmd.find_subcommand("run").unwrap();
    let hostname = run
        .get_arguments()
        .find(|a| a.get_id() == "hostname_override")
        .unwrap();
    assert_eq!(hostname.get_env().and_then(|e| e.to_str()), Some("NODE_NAME"));

    // The host paths kube-proxy mounts.
    let volumes = array_at(spec, "/volumes");
    let mounts = array_at(container(&m), "/volumeMounts");
    for (path, read_only, host_type) in [
        ("/run/xtables.lock", false, Some("FileOrCreate")),
        ("/lib/modules", true, None),
    ] {
        let mount = mounts
            .iter()
            .find(|vm| vm["mountPath"] == path)
            .unwrap_or_else(|| panic!("{path}"));
        assert_eq!(mount["readOnly"].as_bool().unwrap_or(false), read_only, "{path}");
        let volume = volumes.iter().find(|v| v["name"] == mount["name"]).unwrap();
        assert_eq!(str_at(volume, "/hostPath/path"), path);
        assert_eq!(
            volume.pointer("/hostPath/type").and_then(Value::as_str),
            host_type,
            "{path}"
        );
    }
}

#[test]
fn the_cluster_role_grants_exactly_what_svcproxy_uses() {
    let m = manifests();
    let mut granted = BTreeSet::new();
    for rule in array_at(&m.cluster_role, "/rules") {
        assert!(rule.get("resourceNames").is_none() && rule.get("nonResourceURLs").is_none());
        for group in array_at(rule, "/apiGroups") {
            for resource in array_at(rule, "/resources") {
                for verb in array_at(rule, "/verbs") {
                    granted.insert(format!(
                        "{}/{}:{}",
                        group.as_str().unwrap(),
                        resource.as_str().unwrap(),
                        verb.as_str().unwrap()
                    ));
                }
            }
        }
    }
    let mut expected = BTreeSet::new();
    for (group, resource, verbs) in [
        ("", "services", ["get", "list", "watch"].as_slice()),
        ("", "nodes", &["get", "list", "watch"]),
        ("discovery.k8s.io", "endpointslices", &["get", "list", "watch"]),
        ("networking.k8s.io", "servicecidrs", &["get", "list", "watch"]),
        ("", "events", &["create", "patch"]),
        ("events.k8s.io", "events", &["create", "patch"]),
    ] {
        for verb in verbs {
            expected.insert(format!("{group}/{resource}:{verb}"));
        }
    }
    assert_eq!(granted, expected);

    // Bound to the DaemonSet's service account, in the kustomization's namespace.
    assert_eq!(m.binding["roleRef"]["kind"], "ClusterRole");
    assert_eq!(m.binding["roleRef"]["name"], m.cluster_role["metadata"]["name"]);
    let subjects = array_at(&m.binding, "/subjects");
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0]["kind"], "ServiceAccount");
    assert_eq!(subjects[0]["name"], m.service_account["metadata"]["name"]);
    assert_eq!(subjects[0]["namespace"], m.kustomization["namespace"]);
}

#[test]
fn probes_use_the_health_servers_port_and_the_rollout_outlasts_its_timeout() {
    let m = manifests();
    let args = pod_args(&m);
    let c = container(&m);
    for (probe, path) in [("livenessProbe", "/livez"), ("readinessProbe", "/healthz")] {
        assert_eq!(str_at(c, &format!("/{probe}/httpGet/path")), path);
        assert_eq!(
            c[probe]["httpGet"]["port"].as_u64(),
            Some(u64::from(args.healthz_bind_address.port())),
            "{probe}"
        );
    }
    assert!(
        args.healthz_bind_address.ip().is_unspecified(),
        "kubelet probes the node's address"
    );
    // /healthz turns 503 after 2 x syncPeriod; a pod must stay ready longer than that, plus the probe's
    // reaction time, before the rollout moves on.
    let min_ready = m.daemon_set["spec"]["minReadySeconds"].as_u64().unwrap();
    let readiness = &c["readinessProbe"];
    let reaction =
        readiness["periodSeconds"].as_u64().unwrap() * readiness["failureThreshold"].as_u64().unwrap();
    assert!(
        min_ready > 2 * args.sync_period.as_secs() + reaction,
        "minReadySeconds {min_ready}"
    );
}

/// The status line of `GET path` against the health router.
async fn get(path: &str) -> String {
    let state = AppState {
        health: Arc::new(ProxyHealth::new(std::time::Duration::from_secs(60))),
        metrics: Arc::new(Metrics::new()),
        proxy_mode: "iptables",
        configz: "{}".into(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, health_router(state)).await });
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    conn.read_to_string(&mut response).await.unwrap();
    server.abort();
    response.lines().next().unwrap_or_default().to_string()
}

#[tokio::test]
async fn the_probe_paths_are_served_by_the_health_server() {
    let m = manifests();
    let c = container(&m);
    for probe in ["livenessProbe", "readinessProbe"] {
        let path = str_at(c, &format!("/{probe}/httpGet/path"));
        assert_eq!(get(path).await, "HTTP/1.1 200 OK", "{probe} {path}");
    }
    assert!(get("/no-such-path").await.starts_with("HTTP/1.1 404"));
}

/// kubeadm's kube-proxy DaemonSet runs `/usr/local/bin/kube-proxy --config=… --hostname-override=…`. The image
/// installs svcproxy under that name too, and the binary, started under either name with kube-proxy's command
/// line, reads it as `run`: here it writes the configuration it would run with, which is the file's (the
/// ignored flag named on stderr) with the node name from the flag.
#[test]
fn kube_proxys_command_line_runs_it_under_either_name() {
    let dockerfile = std::fs::read_to_string(deploy_dir().join("Dockerfile")).unwrap();
    assert!(
        dockerfile.contains("RUN ln -s svcproxy /usr/local/bin/kube-proxy"),
        "the image installs the kube-proxy name"
    );
    let dir = std::env::temp_dir().join(format!("svcproxy-as-kube-proxy-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let kube_proxy = dir.join("kube-proxy");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_svcproxy"), &kube_proxy).unwrap();
    let config = dir.join("config.conf");
    std::fs::write(
        &config,
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: nftables\n\
         clusterCIDR: 10.244.0.0/16\n",
    )
    .unwrap();
    for program in [kube_proxy.as_path(), Path::new(env!("CARGO_BIN_EXE_svcproxy"))] {
        let written = dir.join("written.yaml");
        let out = std::process::Command::new(program)
            .arg(format!("--config={}", config.display()))
            .args(["--hostname-override=node-a", "--cluster-cidr=10.0.0.0/8"])
            .arg(format!("--write-config-to={}", written.display()))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{}: {stderr}", program.display());
        assert!(
            stderr.contains("--cluster-cidr=10.0.0.0/8: ignored, because --config is given"),
            "{stderr}"
        );
        let yaml = std::fs::read_to_string(&written).unwrap();
        for line in [
            "mode: nftables",
            "clusterCIDR: \"10.244.0.0/16\"",
            "hostnameOverride: \"node-a\"",
        ] {
            assert!(yaml.lines().any(|l| l == line), "{line} missing:\n{yaml}");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
