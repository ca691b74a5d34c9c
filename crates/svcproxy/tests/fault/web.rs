//! The plainest node most cases start from: demo/web (10.96.0.100:80 → pod11, pod12 on 8080), svcproxy
//! reading it from a manifest directory, a client loop on the ClusterIP and a `/healthz` watcher.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use svcproxy_iptables::chain_name::{sep_chain, svc_chain};
use svcproxy_model::{EndpointInfo, ObjectName, Protocol, ServicePortName};
use svcproxy_testkit::wait_until;

use super::harness::{Cluster, HealthWatch, POLL, Traffic, WAIT, addr, identities};
use super::manifests::{HTTP, service};
use super::report::Case;
use crate::common::{Svcproxy, TempDir};

pub const VIP: &str = "10.96.0.100";

pub fn spn() -> ServicePortName {
    ServicePortName::new(ObjectName::new("demo", "web"), "http", Protocol::Tcp)
}

/// Our KUBE-SVC chain for demo/web.
pub fn web_svc_chain() -> String {
    svc_chain(&spn())
}

/// Our KUBE-SEP chain for demo/web's endpoint at `ip`.
pub fn web_sep_chain(ip: &str) -> String {
    let endpoint = EndpointInfo {
        ip: ip.parse().unwrap(),
        port: 8080,
        ready: true,
        serving: true,
        terminating: false,
        is_local: true,
        zone_hints: None,
        node_hints: None,
    };
    sep_chain(&spn(), &endpoint)
}

pub fn names(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// demo/web with the given pod addresses as ready endpoints on this node.
pub fn web_manifest(ips: &[&str]) -> String {
    let eps: Vec<(&str, &str)> = ips.iter().map(|ip| (*ip, "node-a")).collect();
    service("demo", "web", VIP, "", "", &[HTTP], &eps)
}

pub struct WebNode {
    pub cluster: Cluster,
    pub dir: TempDir,
    pub proxy: Svcproxy,
    pub traffic: Traffic,
    pub health: HealthWatch,
}

impl WebNode {
    /// Starts svcproxy with `args` and `env` and waits until both pods answer and `/healthz` is 200.
    pub fn start(case: &Case, args: &[&str], env: &[(&str, &str)]) -> WebNode {
        let cluster = Cluster::new(&[
            ("pod11", Ipv4Addr::new(10, 244, 0, 11)),
            ("pod12", Ipv4Addr::new(10, 244, 0, 12)),
        ]);
        let dir = TempDir::new("web");
        dir.write("web.yaml", &web_manifest(&["10.244.0.11", "10.244.0.12"]));
        let mut all = vec!["--manifests", dir.path().to_str().unwrap()];
        all.extend_from_slice(args);
        let mut proxy = Svcproxy::start_with_env(cluster.node(), &all, env);
        let traffic = Traffic::start(cluster.client.ns(), addr(VIP, 80), case.origin());
        let health = HealthWatch::start(cluster.node(), case.origin());
        wait_until(WAIT, POLL, "both endpoints answer", || {
            proxy.assert_running();
            (identities(&traffic.next(10)) == names(&["pod11", "pod12"])).then_some(())
        });
        health.wait_for("healthz is 200", WAIT, |p| p.status == 200 && p.reason.is_none());
        WebNode {
            cluster,
            dir,
            proxy,
            traffic,
            health,
        }
    }

    pub fn set_endpoints(&self, ips: &[&str]) {
        self.dir.write("web.yaml", &web_manifest(ips));
    }

    pub fn metrics(&self) -> String {
        self.proxy.metrics(self.cluster.node())
    }

    /// Waits until ten fresh requests in a row reach exactly `want`.
    pub fn wait_traffic(&mut self, want: &[&str]) {
        let want = names(want);
        wait_until(WAIT, POLL, &format!("traffic reaches exactly {want:?}"), || {
            self.proxy.assert_running();
            (identities(&self.traffic.next(10)) == want).then_some(())
        });
    }
}
