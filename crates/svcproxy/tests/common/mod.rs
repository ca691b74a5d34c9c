//! Helpers shared by the end-to-end tests: a temporary directory and a svcproxy process running inside a lab's
//! node namespace.
#![allow(dead_code)]

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use svcproxy_model::{
    ClusterState, Endpoint, EndpointPort, EndpointSlice, IpFamily, ObjectName, Protocol, Service, ServicePort,
};
use svcproxy_testkit::{Backend, Lab, NetNs, Pod, http_get};

pub const HEALTHZ: &str = "127.0.0.1:10256";
pub const METRICS: &str = "127.0.0.1:10249";

/// Service `demo/web` (ClusterIP 10.96.0.100, port 80 `http`) with one ready endpoint, 10.244.0.11:8080.
pub const WEB_ONE_ENDPOINT: &str = "apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  clusterIP: 10.96.0.100
  ports:
  - {name: http, protocol: TCP, port: 80, targetPort: 8080}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: demo
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
- {name: http, protocol: TCP, port: 8080}
endpoints:
- addresses: [10.244.0.11]
  conditions: {ready: true}
";

/// Where [`WEB_ONE_ENDPOINT`]'s Service listens.
pub const WEB_VIP: &str = "10.96.0.100:80";

/// A lab serving [`WEB_ONE_ENDPOINT`]: its endpoint pod answering on 8080, a client pod (10.244.0.50), and a
/// manifest directory holding the Service and its slice.
pub struct WebLab {
    // Fields drop in this order: the backend's processes before the pods' namespaces, those before the node's.
    _backend: Backend,
    _endpoint: Pod,
    pub client: Pod,
    pub dir: TempDir,
    pub lab: Lab,
}

impl WebLab {
    pub fn new() -> WebLab {
        let lab = Lab::new();
        let endpoint = lab.add_pod("pod11", std::net::Ipv4Addr::new(10, 244, 0, 11));
        let backend = Backend::start(endpoint.ns(), endpoint.name(), &[8080], &[]);
        let client = lab.add_pod("client", std::net::Ipv4Addr::new(10, 244, 0, 50));
        let dir = TempDir::new("manifests");
        dir.write("web.yaml", WEB_ONE_ENDPOINT);
        WebLab {
            _backend: backend,
            _endpoint: endpoint,
            client,
            dir,
            lab,
        }
    }

    /// The manifest directory, as `--manifests` takes it.
    pub fn manifests(&self) -> &str {
        self.dir.path().to_str().unwrap()
    }

    pub fn vip(&self) -> SocketAddr {
        WEB_VIP.parse().unwrap()
    }
}

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "svcproxy-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    pub fn write(&self, name: &str, text: &str) {
        // Write then rename, as editors and ConfigMap volumes do, so a reader never sees half a file.
        let tmp = self.0.join(format!(".{name}.tmp"));
        fs::write(&tmp, text).unwrap();
        fs::rename(&tmp, self.0.join(name)).unwrap();
    }
    pub fn remove(&self, name: &str) {
        fs::remove_file(self.0.join(name)).unwrap();
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// svcproxy running in a namespace; killed on drop. Its log goes to a file the test can read.
pub struct Svcproxy {
    child: Child,
    log: PathBuf,
    _dir: TempDir,
}

impl Svcproxy {
    pub fn start(ns: &NetNs, args: &[&str]) -> Svcproxy {
        Self::start_with_env(ns, args, &[])
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The OOM score adjustment the kernel holds for the running process.
    pub fn oom_score_adj(&self) -> i32 {
        let path = format!("/proc/{}/oom_score_adj", self.child.id());
        fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {path}: {e}"))
            .trim()
            .parse()
            .unwrap()
    }

    /// Stops svcproxy as a pod's deletion does, with SIGTERM, and waits for it to exit; returns whether it
    /// exited successfully.
    pub fn terminate(&mut self) -> bool {
        let pid = self.child.id().to_string();
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(sent.success(), "kill -TERM {pid}");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.success();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "svcproxy did not exit within 30 s of SIGTERM; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("svcproxy exited with {status}; log:\n{}", self.log());
        }
    }

    /// Read-back compares the kernel with what was written after every sync; on an undisturbed node it must
    /// never find a difference (a false one would mean needless repairs).
    pub fn assert_no_divergence(&self) {
        let log = self.log();
        assert!(!log.contains("diverges"), "unexpected divergence:\n{log}");
    }

    pub fn metrics(&self, ns: &NetNs) -> String {
        let addr: SocketAddr = METRICS.parse().unwrap();
        http_get(ns, addr, "/metrics", Duration::from_secs(5))
            .map(|(_, b)| b)
            .unwrap_or_default()
    }
}

impl Drop for Svcproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("svcproxy log:\n{}", self.log());
        }
    }
}

/// `svcproxy status --output json` run in `ns`, as an operator on the node would; `Null` when the daemon
/// does not answer.
pub fn status_json(ns: &NetNs) -> serde_json::Value {
    let out = ns
        .command(env!("CARGO_BIN_EXE_svcproxy"))
        .args(["status", "--output", "json"])
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

/// `svcproxy explain ARGS --output json` run in `ns`; its report, or a panic quoting what it printed instead.
pub fn explain_json(ns: &NetNs, args: &[&str]) -> serde_json::Value {
    let out = ns
        .command(env!("CARGO_BIN_EXE_svcproxy"))
        .arg("explain")
        .args(args)
        .args(["--output", "json"])
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)))
}

/// The value of one sample line of a Prometheus text exposition (`name{labels} value`), if present.
pub fn metric_value(exposition: &str, name_and_labels: &str) -> Option<f64> {
    exposition.lines().find_map(|l| {
        let (key, value) = l.rsplit_once(' ')?;
        (key == name_and_labels).then(|| value.parse().ok()).flatten()
    })
}

impl Svcproxy {
    /// Like [`Svcproxy::start`], with extra environment for the process: a `PATH` that puts wrapper binaries
    /// first, an `XTABLES_LOCKFILE`, and so on. Everything else (flags, log capture) is as `start` does it.
    pub fn start_with_env(ns: &NetNs, args: &[&str], env: &[(&str, &str)]) -> Svcproxy {
        let dir = TempDir::new("log");
        let log = dir.path().join("svcproxy.log");
        let file = fs::File::create(&log).unwrap();
        let child = ns
            .command(env!("CARGO_BIN_EXE_svcproxy"))
            .arg("run")
            .args(["--hostname-override", "node-a", "--cluster-cidr", "10.244.0.0/16"])
            .args([
                "--healthz-bind-address",
                HEALTHZ,
                "--metrics-bind-address",
                METRICS,
            ])
            .args(["--min-sync-period", "0"])
            .args(args)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start svcproxy");
        Svcproxy {
            child,
            log,
            _dir: dir,
        }
    }

    /// The process id (`ip netns exec` execs the binary, so this is svcproxy itself).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no shutdown path runs, as when the node's OOM killer or a crash ends the process.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits up to `timeout` for the process to exit on its own; `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// `in_both_modes!(case, …)`: a test per backend for each `fn case(mode: &str)`, in a module named after it
/// (`case::iptables`, `case::nftables`), so every behaviour runs through the same harness in both modes.
#[allow(unused_macros)]
macro_rules! in_both_modes {
    ($($name:ident),* $(,)?) => {
        $(mod $name {
            #[test]
            fn iptables() {
                super::$name("iptables")
            }
            #[test]
            fn nftables() {
                super::$name("nftables")
            }
        })*
    };
}

/// The smallest cluster the proxier-level tests drive: ClusterIP Service `ns/web` (10.96.0.10, port `http`
/// 80/TCP to 8080) whose one slice holds `endpoints`, all ready.
pub fn web_cluster(endpoints: &[&str]) -> ClusterState {
    let name = ObjectName::new("ns", "web");
    let service = Service::cluster_ip(
        name.clone(),
        "10.96.0.10".parse().unwrap(),
        vec![ServicePort {
            name: "http".into(),
            protocol: Protocol::Tcp,
            port: 80,
            node_port: None,
        }],
    );
    let slice = EndpointSlice {
        name: ObjectName::new("ns", "web-1"),
        service_name: "web".into(),
        address_family: Some(IpFamily::V4),
        ports: vec![EndpointPort {
            name: "http".into(),
            protocol: Protocol::Tcp,
            port: 8080,
        }],
        endpoints: endpoints
            .iter()
            .map(|ip| Endpoint::ready(ip.parse().unwrap(), None))
            .collect(),
        last_change_trigger_time: None,
    };
    ClusterState {
        services: std::collections::BTreeMap::from([(name, service)]),
        endpoint_slices: std::collections::BTreeMap::from([(slice.name.clone(), slice)]),
        node: None,
        service_cidrs: Default::default(),
    }
}
