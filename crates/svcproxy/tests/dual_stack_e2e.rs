//! Dual-stack on a real kernel, in both modes: with an IPv6 cluster CIDR svcproxy runs an engine per family,
//! and a RequireDualStack NodePort Service answers on its IPv4 and its IPv6 ClusterIP (source kept from a
//! pod), and on the node's IPv6 address from outside (masqueraded); each family follows its own
//! EndpointSlice.

#[macro_use]
mod common;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use common::{Svcproxy, TempDir};
use svcproxy_testkit::{Backend, Lab, NetNs, Pod, http_get, tcp_request, udp_request, wait_until};

const WAIT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(100);
const T: Duration = Duration::from_secs(2);

const VIP4: &str = "10.96.0.60";
const VIP6: &str = "fd00:10:96::60";

fn pod6(n: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, n)
}

fn manifest(v6_endpoints: &[u16]) -> String {
    let v6: String = v6_endpoints
        .iter()
        .map(|n| {
            format!(
                "- addresses: [\"{}\"]\n  conditions: {{ready: true}}\n  nodeName: node-a\n",
                pod6(*n)
            )
        })
        .collect();
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: web, namespace: demo}}
spec:
  type: NodePort
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIP: {VIP4}
  clusterIPs: [{VIP4}, \"{VIP6}\"]
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30060}}
  - {{name: dns, protocol: UDP, port: 53, targetPort: 5353, nodePort: 30053}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-v4
  namespace: demo
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports:
- {{name: http, protocol: TCP, port: 8080}}
- {{name: dns, protocol: UDP, port: 5353}}
endpoints:
- addresses: [10.244.0.11]
  conditions: {{ready: true}}
  nodeName: node-a
- addresses: [10.244.0.12]
  conditions: {{ready: true}}
  nodeName: node-a
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-v6
  namespace: demo
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv6
ports:
- {{name: http, protocol: TCP, port: 8080}}
- {{name: dns, protocol: UDP, port: 5353}}
endpoints:
{v6}---
apiVersion: v1
kind: Service
metadata: {{name: v6lb, namespace: demo}}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  ipFamilyPolicy: SingleStack
  ipFamilies: [IPv6]
  clusterIP: \"fd00:10:96::70\"
  clusterIPs: [\"fd00:10:96::70\"]
  healthCheckNodePort: 30400
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30070}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: v6lb-v6
  namespace: demo
  labels: {{kubernetes.io/service-name: v6lb}}
addressType: IPv6
ports:
- {{name: http, protocol: TCP, port: 8080}}
endpoints:
- addresses: [\"{}\"]
  conditions: {{ready: true}}
  nodeName: node-a
",
        pod6(11)
    )
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

fn reachable(ns: &NetNs, to: SocketAddr) -> BTreeSet<String> {
    (0..20)
        .filter_map(|_| tcp_request(ns, to, T).ok())
        .map(|r| r.identity)
        .collect()
}

fn ids(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

struct Setup {
    lab: Lab,
    client: Pod,
    dir: TempDir,
    proxy: Svcproxy,
    _pods: Vec<(Pod, Backend)>,
}

fn setup(mode: &str) -> Setup {
    setup_with(mode, &[])
}

fn setup_with(mode: &str, extra_args: &[&str]) -> Setup {
    let lab = Lab::new();
    let pods = [11u8, 12]
        .iter()
        .map(|&n| {
            let pod = lab.add_dual_pod(&format!("pod{n}"), Ipv4Addr::new(10, 244, 0, n), pod6(n.into()));
            let backend = Backend::start(pod.ns(), pod.name(), &[8080], &[5353]);
            (pod, backend)
        })
        .collect();
    let client = lab.add_dual_pod("client", Ipv4Addr::new(10, 244, 0, 50), pod6(0x50));
    let dir = TempDir::new("dual");
    dir.write("web.yaml", &manifest(&[11, 12]));
    let mut args = vec![
        "--manifests",
        dir.path().to_str().unwrap(),
        "--proxy-mode",
        mode,
        "--cluster-cidr",
        "fd00:10:244::/64",
    ];
    args.extend_from_slice(extra_args);
    let proxy = Svcproxy::start(lab.node(), &args);
    Setup {
        lab,
        client,
        dir,
        proxy,
        _pods: pods,
    }
}

fn both_families_are_served(mode: &str) {
    let mut s = setup(mode);
    let both = ids(&["pod11", "pod12"]);
    wait_until(WAIT, POLL, "the IPv6 ClusterIP reaches both pods", || {
        s.proxy.assert_running();
        (reachable(s.client.ns(), addr(VIP6, 80)) == both).then_some(())
    });
    assert_eq!(reachable(s.client.ns(), addr(VIP4, 80)), both);

    // From a pod the source is kept, in either family.
    let reply = tcp_request(s.client.ns(), addr(VIP6, 80), T).unwrap();
    assert_eq!(reply.seen_source.ip(), IpAddr::V6(pod6(0x50)));
    let reply = udp_request(s.client.ns(), addr(VIP6, 53), T).unwrap();
    assert_eq!(reply.seen_source.ip(), IpAddr::V6(pod6(0x50)));

    // The NodePort on the node's IPv6 address, from outside: masqueraded to the node's address.
    let node_port = SocketAddr::new(Lab::NODE_IP6.into(), 30060);
    wait_until(WAIT, POLL, "the IPv6 NodePort answers from outside", || {
        tcp_request(s.lab.external(), node_port, T).ok()
    });
    let reply = tcp_request(s.lab.external(), node_port, T).unwrap();
    assert_eq!(reply.seen_source.ip(), IpAddr::V6(Lab::NODE_IP6));

    // Each family follows its own slice: pod12 leaves the IPv6 one only.
    s.dir.write("web.yaml", &manifest(&[11]));
    wait_until(WAIT, POLL, "the IPv6 ClusterIP reaches pod11 only", || {
        s.proxy.assert_running();
        (reachable(s.client.ns(), addr(VIP6, 80)) == ids(&["pod11"])).then_some(())
    });
    assert_eq!(reachable(s.client.ns(), addr(VIP4, 80)), both);

    // Both families' rules are where each mode keeps them, and the node reports healthy.
    let owned = match mode {
        "iptables" => s
            .lab
            .node()
            .exec_stdout(&["ip6tables-save", "-t", "nat"])
            .unwrap(),
        _ => s
            .lab
            .node()
            .exec_stdout(&["nft", "list", "table", "ip6", "svcproxy"])
            .unwrap(),
    };
    assert!(owned.contains("demo/web:http"), "{owned}");
    let (status, body) = http_get(s.lab.node(), addr("127.0.0.1", 10256), "/healthz", T).unwrap();
    assert_eq!(status, 200, "{body}");

    // An IPv6-only Service's health-check node port answers on IPv6 from the IPv6 intent (one local
    // endpoint), and nothing of it listens on IPv4.
    let hc6 = SocketAddr::new(Lab::NODE_IP6.into(), 30400);
    let (status, body) = http_get(s.lab.external(), hc6, "/", T).unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"localEndpoints\": 1"), "{body}");
    assert!(http_get(s.lab.external(), addr("10.0.0.10", 30400), "/", T).is_err());
    s.proxy.assert_no_divergence();

    // explain reads the IPv6 rules for an IPv6 destination, and they agree with the IPv6 intent.
    let (from, to) = (pod6(0x50).to_string(), format!("[{VIP6}]:80/tcp"));
    let r = common::explain_json(
        s.lab.node(),
        &[
            "--from",
            &from,
            "--to",
            &to,
            "--manifests",
            s.dir.path().to_str().unwrap(),
            "--hostname-override",
            "node-a",
            "--proxy-mode",
            mode,
            "--cluster-cidr",
            "10.244.0.0/16,fd00:10:244::/64",
        ],
    );
    assert_eq!(r["agree"], true, "{r:#}");
    assert_eq!(r["service"]["name"], "demo/web:http", "{r:#}");
    let endpoints = r["kernel"]["endpoints"].as_array().unwrap();
    assert_eq!(endpoints.len(), 1, "pod11 only, as the IPv6 slice says: {r:#}");
    assert_eq!(endpoints[0], format!("[{}]:8080", pod6(11)).as_str(), "{r:#}");

    // Made single-stack IPv4, the Service leaves the IPv6 engine (which only ever gets Services of its
    // family) and keeps answering on IPv4.
    let single = manifest(&[11])
        .replacen(
            "ipFamilyPolicy: RequireDualStack",
            "ipFamilyPolicy: SingleStack",
            1,
        )
        .replacen("ipFamilies: [IPv4, IPv6]", "ipFamilies: [IPv4]", 1)
        .replacen(
            &format!("clusterIPs: [{VIP4}, \"{VIP6}\"]"),
            &format!("clusterIPs: [{VIP4}]"),
            1,
        );
    assert!(!single.contains(&format!("\"{VIP6}\"")), "{single}");
    s.dir.write("web.yaml", &single);
    wait_until(WAIT, POLL, "the IPv6 ClusterIP no longer answers", || {
        s.proxy.assert_running();
        tcp_request(s.client.ns(), addr(VIP6, 80), T)
            .is_err()
            .then_some(())
    });
    assert_eq!(reachable(s.client.ns(), addr(VIP4, 80)), both);
}

/// `--nodeport-addresses` naming only IPv4 CIDRs restricts IPv4 NodePorts and leaves IPv6 ones on every
/// address, as upstream reads the list per family.
fn a_nodeport_list_of_one_family_leaves_the_other_open(mode: &str) {
    let mut s = setup_with(mode, &["--nodeport-addresses", "10.0.0.0/24"]);
    let v6 = SocketAddr::new(Lab::NODE_IP6.into(), 30060);
    wait_until(WAIT, POLL, "the IPv6 NodePort answers from outside", || {
        s.proxy.assert_running();
        tcp_request(s.lab.external(), v6, T).ok()
    });
    // Each family has its own engine: the IPv4 one may sync a moment later.
    wait_until(
        WAIT,
        POLL,
        "the IPv4 NodePort answers on the listed address",
        || tcp_request(s.lab.external(), addr("10.0.0.10", 30060), T).ok(),
    );
    s.proxy.assert_no_divergence();
}

in_both_modes!(
    both_families_are_served,
    a_nodeport_list_of_one_family_leaves_the_other_open
);

/// Without an IPv6 CIDR in `--cluster-cidr` (as with NodeCIDR or interface-based local-traffic detection, or
/// an operator who lists only IPv4), IPv6 Services are served all the same, as upstream serves every family
/// the node can program.
fn ipv6_is_served_without_an_ipv6_cluster_cidr(mode: &str) {
    let lab = Lab::new();
    let _pod = lab.add_dual_pod("pod11", Ipv4Addr::new(10, 244, 0, 11), pod6(11));
    let _backend = Backend::start(_pod.ns(), _pod.name(), &[8080], &[5353]);
    let client = lab.add_dual_pod("client", Ipv4Addr::new(10, 244, 0, 50), pod6(0x50));
    let dir = TempDir::new("dual-v4");
    dir.write("web.yaml", &manifest(&[11]));
    let mut proxy = Svcproxy::start(
        lab.node(),
        &["--manifests", dir.path().to_str().unwrap(), "--proxy-mode", mode],
    );
    wait_until(WAIT, POLL, "the IPv6 ClusterIP reaches pod11", || {
        proxy.assert_running();
        (reachable(client.ns(), addr(VIP6, 80)) == ids(&["pod11"])).then_some(())
    });
    assert!(!proxy.log().contains("programs no IPv6 rules"), "{}", proxy.log());
}

in_both_modes!(ipv6_is_served_without_an_ipv6_cluster_cidr);

/// Waits until the log names the IPv6 Services nothing programs and says `why`, then for a healthy node: a
/// family the node cannot program is no failure of the one it can.
fn serves_ipv4_only_naming_why(lab: &Lab, proxy: &mut Svcproxy, why: &[&str]) {
    wait_until(WAIT, POLL, "the unserved IPv6 Services are named", || {
        proxy.assert_running();
        let log = proxy.log();
        (log.contains("Services have IPv6 cluster IPs, but svcproxy programs no IPv6 rules")
            && why.iter().all(|w| log.contains(w)))
        .then_some(())
    });
    wait_until(WAIT, POLL, "the IPv4-only node is healthy", || {
        let (status, _) = http_get(lab.node(), addr("127.0.0.1", 10256), "/healthz", T).ok()?;
        (status == 200).then_some(())
    });
}

/// A node whose ip6tables cannot read its nat table (no ip6tables, or no IPv6 netfilter) serves IPv4 only,
/// healthy, and the log names the IPv6 Services nothing programs and why, since nothing else would.
#[test]
fn ipv6_services_on_a_node_without_ip6tables_are_named() {
    let lab = Lab::new();
    let dir = TempDir::new("dual-v4");
    dir.write("web.yaml", &manifest(&[11]));
    let wrappers = TempDir::new("no-ip6tables");
    for tool in ["ip6tables-nft", "ip6tables-legacy"] {
        wrappers.write(
            tool,
            "#!/bin/sh\necho \"can't initialize ip6tables table 'nat'\" >&2\nexit 3\n",
        );
        let path = wrappers.path().join(tool);
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let path = format!("{}:{}", wrappers.path().display(), std::env::var("PATH").unwrap());
    let mut proxy = Svcproxy::start_with_env(
        lab.node(),
        &["--manifests", dir.path().to_str().unwrap()],
        &[("PATH", &path)],
    );
    serves_ipv4_only_naming_why(
        &lab,
        &mut proxy,
        &["ip6tables-nft -t nat -S POSTROUTING` does not work"],
    );
    let rules = lab.node().exec_stdout(&["nft", "list", "ruleset"]).unwrap();
    assert!(!rules.contains("table ip6 nat"), "{rules}");
}

/// nftables mode on a node whose nft cannot declare an IPv6 NAT chain: IPv4 only, healthy, and the reason in
/// the log (nft's own error), instead of an IPv6 engine failing every sync.
#[test]
fn ipv6_services_on_a_node_without_ipv6_nat_in_nftables_are_named() {
    let lab = Lab::new();
    let dir = TempDir::new("dual-nft");
    dir.write("web.yaml", &manifest(&[11]));
    let real = std::env::split_paths(&std::env::var_os("PATH").unwrap())
        .map(|d| d.join("nft"))
        .find(|p| p.is_file())
        .expect("nft on PATH");
    let wrappers = TempDir::new("no-ip6-nat");
    // A check naming the IPv6 probe table fails as a kernel without IPv6 NAT answers; everything else is nft.
    wrappers.write(
        "nft",
        &format!(
            "#!/bin/sh\nif [ \"$1\" = \"-c\" ]; then\n  input=$(cat)\n  case \"$input\" in\n    *\"ip6 svcproxy-family-probe\"*)\n      echo \"Error: Could not process rule: Operation not supported\" >&2; exit 1;;\n  esac\n  printf '%s\\n' \"$input\" | exec {real} \"$@\"\nfi\nexec {real} \"$@\"\n",
            real = real.display()
        ),
    );
    std::fs::set_permissions(
        wrappers.path().join("nft"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let path = format!("{}:{}", wrappers.path().display(), std::env::var("PATH").unwrap());
    let mut proxy = Svcproxy::start_with_env(
        lab.node(),
        &[
            "--manifests",
            dir.path().to_str().unwrap(),
            "--proxy-mode",
            "nftables",
        ],
        &[("PATH", &path)],
    );
    serves_ipv4_only_naming_why(
        &lab,
        &mut proxy,
        &["nft cannot declare an ip6 NAT chain", "Operation not supported"],
    );
    let tables = lab.node().exec_stdout(&["nft", "list", "tables"]).unwrap();
    assert!(
        tables.contains("table ip svcproxy") && !tables.contains("ip6"),
        "{tables}"
    );
}
