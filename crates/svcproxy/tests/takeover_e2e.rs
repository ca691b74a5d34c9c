//! Taking a node over from upstream kube-proxy, and handing it back: svcproxy starts on a node holding the rules
//! a real kube-proxy v1.31 wrote (its iptables-save output for the clusterip-basic reference scenario), replaces
//! them with no traffic gap and no leftovers, and when it stops leaves exactly the chains upstream writes. A
//! takeover that also switches mode (upstream's iptables mode to our nftables mode, or the reverse) removes
//! upstream's rules of the other mode once ours are in, again with no gap.

mod common;

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::{Svcproxy, TempDir};
use svcproxy_iptables::save_parser::parse_save;
use svcproxy_testkit::{Backend, Lab, NetNs, Pod, tcp_request, wait_until};

fn data(path: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/../iptables/tests/data/{path}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

/// Upstream's dump as restore input: nfacct matches need accounting objects a fresh namespace lacks, and
/// are not part of the behaviour.
fn loadable(dump: &str) -> String {
    dump.lines()
        .map(|l| {
            l.replace("-m nfacct --nfacct-name  ct_state_invalid_dropped_pkts ", "")
                .replace("-m nfacct --nfacct-name ct_state_invalid_dropped_pkts ", "")
        })
        .filter(|l| !l.contains("nfacct"))
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

fn kube_chains(ns: &NetNs) -> BTreeSet<String> {
    let saved = parse_save(&ns.exec_stdout(&["iptables-save"]).unwrap()).unwrap();
    saved
        .tables
        .iter()
        .flat_map(|(t, table)| {
            table
                .chains
                .keys()
                .filter(|c| c.starts_with("KUBE-"))
                .map(move |c| format!("{t}/{c}"))
        })
        .collect()
}

/// A node with the reference scenario's web endpoints as real pods and a client pod.
struct Node {
    lab: Lab,
    client: Pod,
    _pods: Vec<(Pod, Backend)>,
    dir: TempDir,
}

const VIP: &str = "10.96.1.20:80";

impl Node {
    fn new() -> Node {
        let lab = Lab::new();
        let pods = [(1, 14), (2, 15), (0, 16)]
            .iter()
            .map(|(b, c)| {
                let pod = lab.add_pod(&format!("web{c}"), Ipv4Addr::new(10, 244, *b, *c));
                let backend = Backend::start(pod.ns(), pod.name(), &[8080], &[]);
                (pod, backend)
            })
            .collect();
        let client = lab.add_pod("client", Ipv4Addr::new(10, 244, 0, 50));
        let dir = TempDir::new("takeover");
        dir.write("scenario.yaml", &data("scenarios/clusterip-basic.yaml"));
        // The apiserver's own service, which every reference run had.
        dir.write(
            "kubernetes.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: kubernetes, namespace: default}\nspec:\n  clusterIP: 10.96.0.1\n  ports: [{name: https, protocol: TCP, port: 443}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: kubernetes\n  namespace: default\n  labels: {kubernetes.io/service-name: kubernetes}\naddressType: IPv4\nports: [{name: https, protocol: TCP, port: 6443}]\nendpoints:\n- addresses: [10.0.0.10]\n",
        );
        Node {
            lab,
            client,
            _pods: pods,
            dir,
        }
    }

    fn ns(&self) -> &NetNs {
        self.lab.node()
    }

    /// Feeds `input` to `program` (`iptables-restore`, `nft -f -`) in the node.
    fn load(&self, program: &[&str], input: &str) {
        let mut cmd = self.ns().command(program[0]);
        cmd.args(&program[1..]).stdin(std::process::Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), input.as_bytes()).unwrap();
        assert!(
            child.wait().unwrap().success(),
            "{program:?} loads upstream's rules"
        );
    }

    /// Upstream kube-proxy v1.31's iptables-mode rules for the scenario, as it left them.
    fn load_upstream_iptables(&self) {
        self.load(
            &["iptables-restore"],
            &loadable(&data("upstream-v1.31.14-iptables/clusterip-basic.txt")),
        );
    }

    /// Upstream kube-proxy v1.31's nftables-mode table for the scenario (its listing loads back unchanged).
    fn load_upstream_nftables(&self) {
        let listing = std::fs::read_to_string(format!(
            "{}/tests/data/kube-proxy-v1.31.14-nftables-clusterip-basic.nft",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        self.load(&["nft", "-f", "-"], &listing);
    }

    fn nft_tables(&self) -> String {
        self.ns()
            .exec_stdout(&["nft", "list", "tables"])
            .unwrap_or_default()
    }

    /// Waits until the rules loaded before svcproxy starts answer on the web ClusterIP.
    fn wait_for_upstream(&self) {
        let vip: SocketAddr = VIP.parse().unwrap();
        wait_until(
            Duration::from_secs(10),
            Duration::from_millis(50),
            "upstream's rules serve the ClusterIP",
            || tcp_request(self.client.ns(), vip, Duration::from_secs(1)).ok(),
        );
    }

    /// Starts svcproxy with `args` while a client loop runs against the web ClusterIP (see [`without_a_gap`]),
    /// until it has synced and `done` holds.
    fn take_over(&self, args: &[&str], done: impl Fn(&Node) -> bool) -> Svcproxy {
        self.wait_for_upstream();
        self.without_a_gap(|| {
            let mut all = vec!["--manifests", self.dir.path().to_str().unwrap()];
            all.extend(args);
            let mut proxy = Svcproxy::start(self.ns(), &all);
            wait_until(
                Duration::from_secs(20),
                Duration::from_millis(100),
                "svcproxy synced and finished taking over",
                || {
                    proxy.assert_running();
                    (proxy.log().contains("synced") && done(self)).then_some(())
                },
            );
            proxy
        })
    }

    /// Runs `during` while a client loop requests the web ClusterIP every 10 ms, keeps the loop going until
    /// 20 more requests went through after `during` returned, and asserts that no request failed.
    fn without_a_gap<T>(&self, during: impl FnOnce() -> T) -> T {
        let vip: SocketAddr = VIP.parse().unwrap();
        let stop = AtomicBool::new(false);
        let (ok, failed) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let result = std::thread::scope(|scope| {
            let looping = scope.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    match tcp_request(self.client.ns(), vip, Duration::from_secs(1)) {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            eprintln!("request failed: {e:?} at {:?}", std::time::Instant::now());
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    std::thread::sleep(Duration::from_millis(10));
                }
            });
            let result = during();
            // Keep the loop going until a good number of requests went through what `during` left.
            let at_end = ok.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed);
            wait_until(
                Duration::from_secs(30),
                Duration::from_millis(50),
                "20 requests after the change",
                || (ok.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) >= at_end + 20).then_some(()),
            );
            stop.store(true, Ordering::Relaxed);
            looping.join().unwrap();
            result
        });
        let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
        println!("{ok} requests answered, {failed} failed");
        assert!(ok >= 20, "the loop ran");
        assert_eq!(failed, 0, "no traffic gap");
        result
    }
}

#[test]
fn takes_over_from_upstream_without_a_gap_and_hands_back_cleanly() {
    let node = Node::new();
    node.load_upstream_iptables();
    let upstream_chains = kube_chains(node.ns());
    let proxy = node.take_over(&[], |_| true);

    // No leftovers: every KUBE-* chain is one upstream also writes (the same names, hence the same hashes).
    let ours = kube_chains(node.ns());
    let extra: Vec<&String> = ours.difference(&upstream_chains).collect();
    assert!(extra.is_empty(), "chains upstream would not recognise: {extra:?}");
    proxy.assert_no_divergence();

    // Hand back: stopping leaves the rules in place, in upstream's names, and traffic keeps flowing.
    drop(proxy);
    assert_eq!(kube_chains(node.ns()), ours);
    let vip: SocketAddr = VIP.parse().unwrap();
    assert!(tcp_request(node.client.ns(), vip, Duration::from_secs(1)).is_ok());
}

/// kubelet's chains, which a mode switch leaves alone.
const KUBELET_CHAINS: [&str; 4] = [
    "KUBE-KUBELET-CANARY",
    "KUBE-IPTABLES-HINT",
    "KUBE-FIREWALL",
    "KUBE-MARK-DROP",
];

fn kube_proxy_chains(ns: &NetNs) -> BTreeSet<String> {
    kube_chains(ns)
        .into_iter()
        .filter(|c| !KUBELET_CHAINS.iter().any(|k| c.ends_with(&format!("/{k}"))))
        .collect()
}

/// Upstream in iptables mode, svcproxy in nftables mode: its table goes in first, then upstream's KUBE-*
/// chains go, so packets always meet one working set of rules and never two that disagree later.
#[test]
fn switches_from_upstream_iptables_mode_to_nftables_mode_without_a_gap() {
    let node = Node::new();
    node.load_upstream_iptables();
    assert!(!kube_proxy_chains(node.ns()).is_empty());
    let proxy = node.take_over(&["--proxy-mode", "nftables"], |n| {
        kube_proxy_chains(n.ns()).is_empty()
    });
    assert!(node.nft_tables().contains("table ip svcproxy"));
    assert!(proxy.log().contains("removed the other proxy mode's"));
    proxy.assert_no_divergence();
}

/// Upstream in nftables mode, svcproxy in iptables mode: upstream's `ip kube-proxy` table goes once our chains
/// are in.
#[test]
fn switches_from_upstream_nftables_mode_to_iptables_mode_without_a_gap() {
    let node = Node::new();
    node.load_upstream_nftables();
    assert!(node.nft_tables().contains("table ip kube-proxy"));
    let proxy = node.take_over(&[], |n| !n.nft_tables().contains("table ip kube-proxy"));
    assert!(kube_chains(node.ns()).contains("nat/KUBE-SERVICES"));
    proxy.assert_no_divergence();
}

/// A node that ran upstream's IPVS mode: its interface holds the Service addresses as local ones, which
/// would make the host, not the rules, answer them. It goes once svcproxy's rules are in, and the Services
/// answer through the rules. (Not run through `take_over`'s no-gap loop: removing any interface or address in
/// the node's namespace makes the kernel drop the one packet in flight, svcproxy or not.)
#[test]
fn removes_the_ipvs_modes_interface_after_taking_over() {
    let node = Node::new();
    node.load_upstream_iptables();
    let ipvs_up = |n: &Node| n.ns().exec(&["ip", "link", "show", "kube-ipvs0"]).is_ok();
    for step in [
        // Upstream's is a dummy device; this kernel may lack the module, and only the name matters here.
        &["ip", "link", "add", "kube-ipvs0", "type", "bridge"][..],
        &["ip", "addr", "add", "10.96.1.20/32", "dev", "kube-ipvs0"],
    ] {
        node.ns().exec(step).unwrap();
    }
    assert!(ipvs_up(&node));
    let mut proxy = Svcproxy::start(node.ns(), &["--manifests", node.dir.path().to_str().unwrap()]);
    wait_until(
        Duration::from_secs(20),
        Duration::from_millis(100),
        "the IPVS interface is gone, and the log says so",
        || {
            proxy.assert_running();
            (!ipvs_up(&node) && proxy.log().contains("IPVS: interface kube-ipvs0")).then_some(())
        },
    );
    let vip: SocketAddr = VIP.parse().unwrap();
    let seen = svcproxy_testkit::spread(node.client.ns(), vip, 20);
    assert!(seen.keys().all(|k| k.starts_with("web")), "{seen:?}");
    proxy.assert_no_divergence();
}

/// The web Service of the reference scenario as svcproxy last knew it before handing the node back: its one
/// endpoint a pod that upstream's rules no longer send traffic to.
const WEB_AS_LAST_KNOWN: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: ref-clusterip}\nspec:\n  clusterIP: 10.96.1.20\n  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: ref-clusterip\n  labels: {kubernetes.io/service-name: web}\naddressType: IPv4\nports: [{name: http, protocol: TCP, port: 8080}]\nendpoints:\n- addresses: [10.244.0.60]\n  conditions: {ready: true}\n  nodeName: node-a\n";

/// Handing a node back from our nftables mode to upstream's iptables mode. Our table stays when svcproxy stops
/// (removing it then would leave no rules until kube-proxy's first sync), so for a while, or for good if
/// nobody deletes it, the node holds both. The node's iptables nat chains (the CNI plugin's) existed before
/// our table, as on most nodes, and at equal priority the kernel lets the later-registered table decide first:
/// our stale table would keep sending the Service to the endpoints it last knew. Upstream's rules must decide.
#[test]
fn after_handing_back_from_nftables_mode_upstreams_rules_decide_not_our_stale_table() {
    let node = Node::new();
    // The CNI plugin's hostPort chains, in iptables' nat table from before svcproxy's time.
    for step in [
        &["iptables", "-t", "nat", "-N", "CNI-HOSTPORT-DNAT"][..],
        &[
            "iptables",
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-m",
            "addrtype",
            "--dst-type",
            "LOCAL",
            "-j",
            "CNI-HOSTPORT-DNAT",
        ],
        &[
            "iptables",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-m",
            "addrtype",
            "--dst-type",
            "LOCAL",
            "-j",
            "CNI-HOSTPORT-DNAT",
        ],
    ] {
        node.ns().exec(step).unwrap();
    }
    let gone = node.lab.add_pod("gone", Ipv4Addr::new(10, 244, 0, 60));
    let _gone = Backend::start(gone.ns(), gone.name(), &[8080], &[]);
    let dir = TempDir::new("handback");
    dir.write("web.yaml", WEB_AS_LAST_KNOWN);
    let vip: SocketAddr = VIP.parse().unwrap();
    let mut proxy = Svcproxy::start(
        node.ns(),
        &[
            "--proxy-mode",
            "nftables",
            "--manifests",
            dir.path().to_str().unwrap(),
        ],
    );
    wait_until(
        Duration::from_secs(20),
        Duration::from_millis(100),
        "svcproxy sends the web ClusterIP to the endpoint it knows",
        || {
            proxy.assert_running();
            tcp_request(node.client.ns(), vip, Duration::from_secs(1))
                .ok()
                .filter(|reply| reply.identity == "gone")
        },
    );
    // Stopped while no other proxy serves the node, svcproxy keeps its table: it is all the node has.
    assert!(proxy.terminate(), "{}", proxy.log());
    assert!(
        node.nft_tables().contains("table ip svcproxy"),
        "stopping leaves our table in place"
    );
    assert!(!proxy.log().contains("handed the node back"), "{}", proxy.log());

    // kube-proxy is back, in iptables mode, with the endpoints of today; it writes with `--noflush`, which
    // leaves the tables and their hooks as they were.
    node.load(
        &["iptables-restore", "--noflush"],
        &loadable(&data("upstream-v1.31.14-iptables/clusterip-basic.txt")),
    );
    let seen = svcproxy_testkit::spread(node.client.ns(), vip, 20);
    assert!(
        seen.keys().all(|k| k.starts_with("web")),
        "upstream's rules decide where the Service goes, not the table we left: {seen:?}"
    );
}

/// The hand-back without a gap in the other order: svcproxy took the node over in nftables mode, kube-proxy
/// (in either mode) is back while svcproxy still runs, and then svcproxy is stopped. Its table has nothing
/// left to do next to kube-proxy's rules, so it goes on the way out, and traffic keeps flowing throughout.
#[test]
fn stopping_once_kube_proxy_is_back_in_iptables_mode_removes_our_table_without_a_gap() {
    stopping_once_kube_proxy_is_back_removes_our_table(|node| {
        node.load(
            &["iptables-restore", "--noflush"],
            &loadable(&data("upstream-v1.31.14-iptables/clusterip-basic.txt")),
        )
    });
}

#[test]
fn stopping_once_kube_proxy_is_back_in_nftables_mode_removes_our_table_without_a_gap() {
    stopping_once_kube_proxy_is_back_removes_our_table(Node::load_upstream_nftables);
}

fn stopping_once_kube_proxy_is_back_removes_our_table(kube_proxy_back: impl Fn(&Node)) {
    let node = Node::new();
    node.load_upstream_iptables();
    let mut proxy = node.take_over(&["--proxy-mode", "nftables"], |n| {
        kube_proxy_chains(n.ns()).is_empty()
    });
    kube_proxy_back(&node);
    assert!(node.without_a_gap(|| proxy.terminate()), "{}", proxy.log());
    assert!(
        !node.nft_tables().contains("table ip svcproxy"),
        "{}",
        node.nft_tables()
    );
    assert!(
        proxy.log().contains(
            "handed the node back: removed our table ip svcproxy, because another proxy's rules are in place"
        ),
        "{}",
        proxy.log()
    );
    let vip: SocketAddr = VIP.parse().unwrap();
    let seen = svcproxy_testkit::spread(node.client.ns(), vip, 20);
    assert!(seen.keys().all(|k| k.starts_with("web")), "{seen:?}");
}

/// Stopped next to kube-proxy rules that do not serve every Service svcproxy served (leftovers of an older
/// cluster, or a kube-proxy still writing its first sync; here upstream's rules without the web Service),
/// svcproxy keeps its table and says what the other rules lack: handing the web Service to rules that do not
/// know it would leave it with nothing.
#[test]
fn stopping_next_to_rules_that_lack_a_service_keeps_our_table() {
    let node = Node::new();
    node.load_upstream_iptables();
    let mut proxy = node.take_over(&["--proxy-mode", "nftables"], |n| {
        kube_proxy_chains(n.ns()).is_empty()
    });
    let without_web: String = loadable(&data("upstream-v1.31.14-iptables/clusterip-basic.txt"))
        .lines()
        .filter(|l| !(l.starts_with("-A KUBE-SERVICES ") && l.contains("ref-clusterip/web:")))
        .map(|l| format!("{l}\n"))
        .collect();
    node.load(&["iptables-restore", "--noflush"], &without_web);
    assert!(node.without_a_gap(|| proxy.terminate()), "{}", proxy.log());
    assert!(
        node.nft_tables().contains("table ip svcproxy"),
        "{}",
        node.nft_tables()
    );
    let log = proxy.log();
    assert!(log.contains("kept our table ip svcproxy"), "{log}");
    assert!(
        log.contains("ref-clusterip/web:http (10.96.1.20:80/tcp)"),
        "{log}"
    );
    assert!(!log.contains("handed the node back"), "{log}");
    let vip: SocketAddr = VIP.parse().unwrap();
    let seen = svcproxy_testkit::spread(node.client.ns(), vip, 20);
    assert!(seen.keys().all(|k| k.starts_with("web")), "{seen:?}");
}

/// Stopped while it takes a node over from upstream's iptables mode (SIGTERM right after its first syncs,
/// while upstream's chains are being removed, as in a rollout that moves on quickly): the node keeps exactly
/// one working set of rules, ours or upstream's. The hand-back on SIGTERM once took the chains being removed
/// for a running kube-proxy's and deleted our table, and then the removal finished: no rules at all.
#[test]
fn stopped_while_taking_over_the_node_keeps_one_working_set_of_rules() {
    let node = Node::new();
    // Upstream's rules, with as many chains again as 2,000 Services have, so that removing them takes long
    // enough for the stop to come while it runs.
    let dump = loadable(&data("upstream-v1.31.14-iptables/clusterip-basic.txt"));
    let (before_nat, nat) = dump.split_once("*nat\n").expect("a nat table");
    let mut filler = String::new();
    for i in 0..20_000 {
        filler.push_str(&format!(":KUBE-SEP-FILLER{i:07} - [0:0]\n"));
    }
    for i in 0..20_000 {
        filler.push_str(&format!("-A KUBE-SEP-FILLER{i:07} -j RETURN\n"));
    }
    let nat = nat.replacen("COMMIT\n", &format!("{filler}COMMIT\n"), 1);
    node.load(&["iptables-restore"], &format!("{before_nat}*nat\n{nat}"));
    assert!(kube_proxy_chains(node.ns()).len() > 20_000);

    node.wait_for_upstream();
    let proxy = node.without_a_gap(|| {
        let mut proxy = Svcproxy::start(
            node.ns(),
            &[
                "--manifests",
                node.dir.path().to_str().unwrap(),
                "--proxy-mode",
                "nftables",
            ],
        );
        wait_until(
            Duration::from_secs(30),
            Duration::from_millis(10),
            "both families synced",
            || {
                proxy.assert_running();
                (proxy.log().matches("synced").count() >= 2).then_some(())
            },
        );
        assert!(proxy.terminate(), "{}", proxy.log());
        proxy
    });
    let ours = node.nft_tables().contains("table ip svcproxy");
    let upstreams = kube_proxy_chains(node.ns()).contains("nat/KUBE-SERVICES");
    assert!(
        ours != upstreams,
        "ours: {ours}, upstream's: {upstreams}; log:\n{}",
        proxy.log()
    );
    let vip: SocketAddr = VIP.parse().unwrap();
    let seen = svcproxy_testkit::spread(node.client.ns(), vip, 20);
    assert!(
        !seen.is_empty() && seen.keys().all(|k| k.starts_with("web")),
        "{seen:?}"
    );
}
