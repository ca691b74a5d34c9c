//! Packet-flow tables: for every reference scenario, what happens to a new connection's first packet, by
//! (origin, source, destination, port, protocol) → (candidate endpoints, masqueraded?, verdict).
//!
//! Each table runs through the tracer against four rule sets that must all give the expected answer:
//! our rendering of the scenario, upstream kube-proxy v1.31.14's `iptables-save` dump of it, our full payload
//! applied to a live kernel in a fresh network namespace and read back with `iptables-save`, and upstream
//! v1.30.3's dump (where a row says that version differs).
//!
//! The node is `node-a` at 10.0.0.10 with cluster CIDR 10.244.0.0/16. Upstream ran with localhost NodePorts
//! on and we render with our default (off), so the rows use non-loopback destinations only; the difference
//! has its own test at the end. Clients: a pod on this node is 10.244.0.5, a host outside the cluster is
//! 172.16.0.5, the node itself is 10.0.0.10.

mod common;

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::process::{Command, Stdio};

use common::scenario::scenario_state;
use common::*;
use svcproxy_iptables::{
    LocalDetector, NodeContext, RenderConfig, SavedRuleset, full_payload, jump_rules, missing_jumps,
    parse_save, render, saved_view, trace,
};
use svcproxy_model::Protocol;
use svcproxy_model::trace::{Origin, Packet, Trace, Verdict};

/// The reference setup's detector and node address; everything else is our default.
fn cfg() -> RenderConfig {
    RenderConfig {
        local_detector: LocalDetector::Cidrs(vec![net("10.244.0.0/16")]),
        node_ip: Some(ip("10.0.0.10")),
        ..RenderConfig::default()
    }
}

fn node() -> NodeContext {
    NodeContext::new(vec![ip("10.0.0.10")])
}

// Rows: `origin source > destination:port/protocol => verdict, masq|keep[, endpoint …]`.

/// The API server's own service, present in every scenario.
const KUBERNETES: &[&str] = &[
    "pod 10.244.0.5 > 10.96.0.1:443/tcp => accept, keep, 10.0.0.10:6443",
    // Hairpin to the node's own address: the node's packet leaves through POSTROUTING before looping back.
    "host 10.0.0.10 > 10.96.0.1:443/tcp => accept, masq, 10.0.0.10:6443",
    // Marked, but delivered locally: POSTROUTING is not on the way, so the source stays.
    "external 172.16.0.5 > 10.96.0.1:443/tcp => accept, keep, 10.0.0.10:6443",
];

const CLUSTERIP_BASIC: &[&str] = &[
    "pod 10.244.0.5 > 10.96.1.10:53/tcp => accept, keep, 10.244.0.13:5353 10.244.1.11:5353 10.244.2.12:5353",
    "pod 10.244.0.5 > 10.96.1.10:53/udp => accept, keep, 10.244.0.13:5353 10.244.1.11:5353 10.244.2.12:5353",
    "pod 10.244.0.5 > 10.96.1.10:53/sctp => accept, keep, 10.244.0.13:5353 10.244.1.11:5353 10.244.2.12:5353",
    "host 10.0.0.10 > 10.96.1.10:53/udp => accept, masq, 10.244.0.13:5353 10.244.1.11:5353 10.244.2.12:5353",
    "external 172.16.0.5 > 10.96.1.20:80/tcp => accept, masq, 10.244.0.16:8080 10.244.1.14:8080 10.244.2.15:8080",
    "pod 10.244.0.5 > 10.96.1.20:443/tcp => accept, keep, 10.244.0.16:8443 10.244.1.14:8443 10.244.2.15:8443",
    "pod 10.244.0.5 > 10.96.1.30:80/tcp => accept, keep, 10.244.1.17:8080",
    "host 10.0.0.10 > 10.96.1.30:80/tcp => accept, masq, 10.244.1.17:8080",
    // A port or protocol the service does not have passes through untouched.
    "pod 10.244.0.5 > 10.96.1.20:8080/tcp => accept, keep",
    "pod 10.244.0.5 > 10.96.1.30:80/udp => accept, keep",
    // Hairpin: the endpoint (a pod on another node, routed through this one) reaching its own service.
    "external 10.244.1.17 > 10.96.1.30:80/tcp => accept, masq, 10.244.1.17:8080",
];

const NO_ENDPOINTS: &[&str] = &[
    "pod 10.244.0.5 > 10.96.2.10:80/tcp => reject, keep",
    "host 10.0.0.10 > 10.96.2.20:80/tcp => reject, keep",
    "external 172.16.0.5 > 10.96.2.30:80/tcp => reject, keep",
    "pod 10.244.0.5 > 10.96.2.40:80/tcp => reject, keep",
    "external 172.16.0.5 > 10.0.0.10:30210/tcp => reject, keep",
    // Not DNAT-ed on the way out, so the rejection happens in INPUT after the packet loops back.
    "host 10.0.0.10 > 10.0.0.10:30210/tcp => reject, keep",
    "pod 10.244.0.5 > 10.96.2.10:81/tcp => accept, keep",
];

const NODEPORT: &[&str] = &[
    "external 172.16.0.5 > 10.0.0.10:30310/tcp => accept, masq, 10.244.1.31:8080 10.244.2.32:8080",
    "external 172.16.0.5 > 10.0.0.10:30320/udp => accept, masq, 10.244.0.34:5353 10.244.1.33:5353",
    "external 172.16.0.5 > 10.0.0.10:30330/tcp => accept, masq, 10.244.2.35:8000",
    "external 172.16.0.5 > 10.0.0.10:30330/udp => accept, masq, 10.244.2.35:8000",
    "external 172.16.0.5 > 10.0.0.10:30330/sctp => accept, keep",
    "external 172.16.0.5 > 10.0.0.10:30311/tcp => accept, keep",
    "host 10.0.0.10 > 10.0.0.10:30310/tcp => accept, masq, 10.244.1.31:8080 10.244.2.32:8080",
    "pod 10.244.0.5 > 10.0.0.10:30310/tcp => accept, masq, 10.244.1.31:8080 10.244.2.32:8080",
    "pod 10.244.0.5 > 10.96.3.10:80/tcp => accept, keep, 10.244.1.31:8080 10.244.2.32:8080",
    "pod 10.244.0.5 > 10.96.3.30:8000/udp => accept, keep, 10.244.2.35:8000",
];

const LOADBALANCER: &[&str] = &[
    "external 172.16.0.5 > 192.0.2.41:80/tcp => accept, masq, 10.244.1.41:8080 10.244.2.42:8080",
    "external 172.16.0.5 > 10.0.0.10:30410/tcp => accept, masq, 10.244.1.41:8080 10.244.2.42:8080",
    // loadBalancerSourceRanges 203.0.113.0/24 and 192.168.10.0/24.
    "external 203.0.113.5 > 192.0.2.42:80/tcp => accept, masq, 10.244.1.43:8080",
    "external 192.168.10.7 > 192.0.2.42:80/tcp => accept, masq, 10.244.1.43:8080",
    "external 172.16.0.5 > 192.0.2.42:80/tcp => drop, keep",
    "pod 10.244.0.5 > 192.0.2.42:80/tcp => drop, keep",
    "host 10.0.0.10 > 192.0.2.42:80/tcp => drop, keep",
    // NodePorts are not subject to the source ranges.
    "external 172.16.0.5 > 10.0.0.10:30420/tcp => accept, masq, 10.244.1.43:8080",
    // ClientIP affinity: a first packet may go to any endpoint.
    "external 172.16.0.5 > 192.0.2.43:80/tcp => accept, masq, 10.244.1.44:8080 10.244.2.45:8080",
    "external 172.16.0.5 > 192.0.2.44:80/tcp => accept, masq, 10.244.1.44:8080 10.244.2.45:8080",
    "pod 10.244.0.5 > 10.96.4.30:80/tcp => accept, keep, 10.244.1.44:8080 10.244.2.45:8080",
    // ipMode Proxy: the load balancer proxies, so its address is not captured; the NodePort still works.
    "external 172.16.0.5 > 192.0.2.45:80/tcp => accept, keep",
    "external 172.16.0.5 > 10.0.0.10:30440/tcp => accept, masq, 10.244.2.46:8080",
];

const EXTERNALIPS: &[&str] = &[
    "external 172.16.0.5 > 198.51.100.51:80/tcp => accept, masq, 10.244.1.51:8080 10.244.2.52:8080",
    "pod 10.244.0.5 > 198.51.100.51:80/tcp => accept, masq, 10.244.1.51:8080 10.244.2.52:8080",
    "external 172.16.0.5 > 198.51.100.52:443/tcp => accept, masq, 10.244.0.53:8443",
    "external 172.16.0.5 > 198.51.100.53:443/udp => accept, masq, 10.244.0.53:8443",
    "external 172.16.0.5 > 198.51.100.54:80/tcp => reject, keep",
    "pod 10.244.0.5 > 10.96.5.30:80/tcp => reject, keep",
    // externalTrafficPolicy Local: outside clients keep their address and reach only this node's endpoint;
    // pods and the node itself are sent to every endpoint.
    "external 172.16.0.5 > 198.51.100.55:80/tcp => accept, keep, 10.244.0.55:8080",
    "pod 10.244.0.5 > 198.51.100.55:80/tcp => accept, keep, 10.244.0.55:8080 10.244.1.56:8080",
    "host 10.0.0.10 > 198.51.100.55:80/tcp => accept, masq, 10.244.0.55:8080 10.244.1.56:8080",
    // Hairpin from the only (local) endpoint.
    "pod 10.244.0.53 > 10.96.5.20:443/tcp => accept, masq, 10.244.0.53:8443",
];

const ETP_LOCAL: &[&str] = &[
    "external 172.16.0.5 > 192.0.2.61:80/tcp => accept, keep, 10.244.0.61:8080",
    "external 172.16.0.5 > 10.0.0.10:30610/tcp => accept, keep, 10.244.0.61:8080",
    "pod 10.244.0.5 > 192.0.2.61:80/tcp => accept, keep, 10.244.0.61:8080 10.244.1.62:8080",
    "host 10.0.0.10 > 192.0.2.61:80/tcp => accept, masq, 10.244.0.61:8080 10.244.1.62:8080",
    "host 10.0.0.10 > 10.0.0.10:30610/tcp => accept, masq, 10.244.0.61:8080 10.244.1.62:8080",
    // No local endpoint: outside clients are dropped, pods and the node short-circuit to every endpoint.
    "external 172.16.0.5 > 192.0.2.62:80/tcp => drop, keep",
    "external 172.16.0.5 > 10.0.0.10:30620/tcp => drop, keep",
    "pod 10.244.0.5 > 192.0.2.62:80/tcp => accept, keep, 10.244.1.63:8080 10.244.2.64:8080",
    "host 10.0.0.10 > 10.0.0.10:30620/tcp => accept, masq, 10.244.1.63:8080 10.244.2.64:8080",
    "pod 10.244.0.5 > 10.96.6.20:80/tcp => accept, keep, 10.244.1.63:8080 10.244.2.64:8080",
    "external 172.16.0.5 > 10.0.0.10:30630/tcp => accept, keep, 10.244.0.65:8080",
    "pod 10.244.0.65 > 10.96.6.30:80/tcp => accept, masq, 10.244.0.65:8080",
    // The health-check node port is open whatever the endpoints.
    "external 172.16.0.5 > 10.0.0.10:32620/tcp => accept, keep",
];

const ITP_LOCAL: &[&str] = &[
    "pod 10.244.0.5 > 10.96.7.10:80/tcp => accept, keep, 10.244.0.71:8080",
    "host 10.0.0.10 > 10.96.7.10:80/tcp => accept, masq, 10.244.0.71:8080",
    "external 172.16.0.5 > 10.96.7.10:80/tcp => accept, masq, 10.244.0.71:8080",
    "pod 10.244.0.71 > 10.96.7.10:80/tcp => accept, masq, 10.244.0.71:8080",
    "pod 10.244.0.5 > 10.96.7.20:80/tcp => drop, keep",
    "host 10.0.0.10 > 10.96.7.20:80/tcp => drop, keep",
    "pod 10.244.0.5 > 10.96.7.30:80/tcp => accept, keep, 10.244.0.75:8080",
    // externalTrafficPolicy Cluster on the same service: its NodePort uses every endpoint.
    "external 172.16.0.5 > 10.0.0.10:30730/tcp => accept, masq, 10.244.0.75:8080 10.244.2.76:8080",
];

const TERMINATING: &[&str] = &[
    "pod 10.244.0.5 > 10.96.8.10:80/tcp => accept, keep, 10.244.1.81:8080",
    "pod 10.244.0.5 > 10.96.8.20:80/tcp => accept, keep, 10.244.1.83:8080 10.244.2.84:8080",
    "pod 10.244.0.5 > 10.96.8.30:80/tcp => reject, keep",
    "external 172.16.0.5 > 192.0.2.84:80/tcp => accept, keep, 10.244.0.86:8080",
    "external 172.16.0.5 > 10.0.0.10:30840/tcp => accept, keep, 10.244.0.86:8080",
    "pod 10.244.0.5 > 192.0.2.84:80/tcp => accept, keep, 10.244.1.87:8080",
    "pod 10.244.0.5 > 10.96.8.40:80/tcp => accept, keep, 10.244.1.87:8080",
    "pod 10.244.0.5 > 10.96.8.50:80/tcp => accept, keep, 10.244.0.88:8080",
    "host 10.0.0.10 > 10.96.8.50:80/tcp => accept, masq, 10.244.0.88:8080",
];

/// The row v1.30.3 answers differently: it ignores trafficDistribution, so PreferClose's hints do not apply.
const PREFER_CLOSE: &str = "pod 10.244.0.5 > 10.96.9.20:80/tcp";

const TOPOLOGY: &[&str] = &[
    "pod 10.244.0.5 > 10.96.9.10:80/tcp => accept, keep, 10.244.0.91:8080 10.244.1.92:8080",
    "external 172.16.0.5 > 10.96.9.10:80/tcp => accept, masq, 10.244.0.91:8080 10.244.1.92:8080",
    "pod 10.244.0.5 > 10.96.9.20:80/tcp => accept, keep, 10.244.1.94:8080",
    "pod 10.244.0.5 > 10.96.9.30:80/tcp => accept, keep, 10.244.2.96:8080 10.244.2.97:8080",
    "pod 10.244.0.5 > 10.96.9.40:80/tcp => accept, keep, 10.244.1.98:8080 10.244.2.99:8080",
];

const V1_30_OVERRIDES: &[&str] =
    &["pod 10.244.0.5 > 10.96.9.20:80/tcp => accept, keep, 10.244.1.94:8080 10.244.2.95:8080"];

const IGNORED: &[&str] = &[
    "pod 10.244.0.5 > 10.96.10.30:80/tcp => accept, keep",
    "host 10.0.0.10 > 10.96.10.30:80/tcp => accept, keep",
    "pod 10.244.0.5 > 10.96.10.40:80/tcp => reject, keep",
];

#[derive(Debug, Clone, PartialEq, Eq)]
struct Expected {
    verdict: Verdict,
    masquerade: bool,
    endpoints: Vec<String>,
}

struct Row {
    text: &'static str,
    packet: Packet,
    expected: Expected,
}

fn parse_row(text: &'static str) -> Row {
    let (left, right) = text.split_once(" => ").expect("row has =>");
    let words: Vec<&str> = left.split_whitespace().collect();
    let [origin, source, ">", target] = words[..] else {
        panic!("row {text:?}: expected `origin source > destination:port/protocol`");
    };
    let origin = match origin {
        "pod" => Origin::Pod,
        "host" => Origin::Host,
        "external" => Origin::External,
        other => panic!("row {text:?}: origin {other:?}"),
    };
    let (address, protocol) = target.split_once('/').expect("protocol");
    let (destination, port) = address.rsplit_once(':').expect("port");
    let protocol = protocol.to_uppercase().parse::<Protocol>().unwrap();
    let parts: Vec<&str> = right.split(", ").collect();
    let verdict = match parts[0] {
        "accept" => Verdict::Accept,
        "drop" => Verdict::Drop,
        "reject" => Verdict::Reject,
        other => panic!("row {text:?}: verdict {other:?}"),
    };
    let masquerade = match parts[1] {
        "masq" => true,
        "keep" => false,
        other => panic!("row {text:?}: masquerade {other:?}"),
    };
    let mut endpoints: Vec<String> = parts
        .get(2)
        .map(|e| e.split_whitespace().map(String::from).collect())
        .unwrap_or_default();
    endpoints.sort();
    Row {
        text,
        packet: Packet {
            origin,
            source: source.parse::<IpAddr>().unwrap(),
            destination: destination.parse::<IpAddr>().unwrap(),
            port: port.parse().unwrap(),
            protocol,
        },
        expected: Expected {
            verdict,
            masquerade,
            endpoints,
        },
    }
}

fn rows_of(scenario: &str) -> Vec<&'static str> {
    let own: &[&[&str]] = match scenario {
        "clusterip-basic" => &[CLUSTERIP_BASIC],
        "no-endpoints" => &[NO_ENDPOINTS],
        "nodeport" => &[NODEPORT],
        "loadbalancer" => &[LOADBALANCER],
        "externalips" => &[EXTERNALIPS],
        "etp-local" => &[ETP_LOCAL],
        "itp-local" => &[ITP_LOCAL],
        "terminating" => &[TERMINATING],
        "topology" => &[TOPOLOGY],
        "ignored" => &[IGNORED],
        // The concatenation of all the others, which use disjoint addresses: every row still holds.
        "all-in-one" => &[
            CLUSTERIP_BASIC,
            NO_ENDPOINTS,
            NODEPORT,
            LOADBALANCER,
            EXTERNALIPS,
            ETP_LOCAL,
            ITP_LOCAL,
            TERMINATING,
            TOPOLOGY,
            IGNORED,
        ],
        other => panic!("no table for {other}"),
    };
    KUBERNETES
        .iter()
        .chain(own.iter().copied().flatten())
        .copied()
        .collect()
}

/// One rule set to check a table against.
struct Input {
    name: String,
    saved: SavedRuleset,
    /// Rows this input answers differently, for a known reason given where the rows are defined.
    overrides: &'static [&'static str],
}

fn describe(t: &Trace) -> Expected {
    Expected {
        verdict: t.verdict,
        masquerade: t.masquerade,
        endpoints: t.endpoints.clone(),
    }
}

/// Every row of `rows` traced through `input`; one message per row that does not hold.
fn failures(rows: &[&'static str], input: &Input) -> Vec<String> {
    let overrides: Vec<Row> = input.overrides.iter().map(|r| parse_row(r)).collect();
    let mut out = Vec::new();
    for row in rows.iter().map(|r| parse_row(r)) {
        let expected = overrides
            .iter()
            .find(|o| o.packet == row.packet)
            .map_or(&row.expected, |o| &o.expected);
        match trace(&input.saved, &row.packet, &node()) {
            Ok(t) if describe(&t) == *expected => {}
            Ok(t) => {
                let mut msg = format!("{}: {}\n    got {:?}, steps:", input.name, row.text, describe(&t));
                for s in &t.steps {
                    let _ = write!(msg, "\n      {} {}", s.chain, s.rule);
                }
                out.push(msg);
            }
            Err(e) => out.push(format!("{}: {}\n    error: {e}", input.name, row.text)),
        }
    }
    out
}

fn data(path: &str) -> String {
    let full = format!("{}/tests/data/{path}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{full}: {e}"))
}

fn upstream(version: &str, scenario: &str) -> SavedRuleset {
    parse_save(&data(&format!("upstream-{version}-iptables/{scenario}.txt"))).unwrap()
}

/// A network namespace of our own, deleted when dropped.
struct Netns(String);

impl Netns {
    fn create(tag: &str) -> Netns {
        let name = format!("svcp-flow-{}-{tag}", std::process::id());
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .unwrap_or_else(|e| panic!("the live-kernel input needs iproute2's `ip`: {e}"));
        assert!(
            out.status.success(),
            "the live-kernel input needs root to create a network namespace: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Netns(name)
    }

    fn exec(&self, args: &[&str], stdin: Option<&str>) -> String {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{args:?}: {e}"));
        let mut pipe = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            pipe.write_all(text.as_bytes()).unwrap();
        }
        drop(pipe);
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{args:?} in {}: {}",
            self.0,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "delete", &self.0]).status();
    }
}

/// Our full payload, as the applier would send it to a host with none of our rules, applied to a fresh
/// namespace and read back.
fn kernel_readback(scenario: &str, payload: &str) -> SavedRuleset {
    let ns = Netns::create(scenario);
    ns.exec(&["iptables-restore", "--noflush"], Some(payload));
    parse_save(&ns.exec(&["iptables-save"], None)).unwrap()
}

fn check_scenario(scenario: &str) {
    let intent = intent_of(&scenario_state(&data(&format!("scenarios/{scenario}.yaml"))));
    let cfg = cfg();
    let ours = render(&intent, &cfg);
    let jumps = missing_jumps(&SavedRuleset::default(), &cfg);
    let payload = full_payload(&ours, &[], &jumps);
    let kernel = kernel_readback(scenario, payload.text());
    // Everything we sent is there, in the kernel's own spelling (which is what makes this input worth having).
    let held: usize = ["filter", "nat"]
        .iter()
        .map(|t| kernel.tables[*t].rules.len())
        .sum();
    assert_eq!(held, payload.rules_written, "{scenario}");
    assert!(
        kernel.tables["nat"]
            .rules_of("KUBE-MARK-MASQ")
            .all(|r| r.line.contains("--set-xmark")),
        "{scenario}: the read-back should be respelled by iptables-save"
    );
    let inputs = [
        Input {
            name: "ours".into(),
            saved: saved_view(&ours, &jump_rules(&cfg)).unwrap(),
            overrides: &[],
        },
        Input {
            name: "upstream v1.31.14".into(),
            saved: upstream("v1.31.14", scenario),
            overrides: &[],
        },
        Input {
            name: "kernel read-back of ours".into(),
            saved: kernel,
            overrides: &[],
        },
        Input {
            name: "upstream v1.30.3".into(),
            saved: upstream("v1.30.3", scenario),
            overrides: V1_30_OVERRIDES,
        },
    ];
    let rows = rows_of(scenario);
    let all: Vec<String> = inputs.iter().flat_map(|i| failures(&rows, i)).collect();
    assert!(
        all.is_empty(),
        "{scenario}: {} of {} row checks failed:\n{}",
        all.len(),
        rows.len() * inputs.len(),
        all.join("\n")
    );
}

#[test]
fn all_in_one() {
    check_scenario("all-in-one");
}

#[test]
fn clusterip_basic() {
    check_scenario("clusterip-basic");
}

#[test]
fn etp_local() {
    check_scenario("etp-local");
}

#[test]
fn externalips() {
    check_scenario("externalips");
}

#[test]
fn ignored() {
    check_scenario("ignored");
}

#[test]
fn itp_local() {
    check_scenario("itp-local");
}

#[test]
fn loadbalancer() {
    check_scenario("loadbalancer");
}

#[test]
fn no_endpoints() {
    check_scenario("no-endpoints");
}

#[test]
fn nodeport() {
    check_scenario("nodeport");
}

#[test]
fn terminating() {
    check_scenario("terminating");
}

#[test]
fn topology() {
    check_scenario("topology");
}

#[test]
fn the_v1_30_override_is_needed() {
    let input = Input {
        name: "upstream v1.30.3 without overrides".into(),
        saved: upstream("v1.30.3", "topology"),
        overrides: &[],
    };
    let failed = failures(&rows_of("topology"), &input);
    assert_eq!(failed.len(), 1, "{failed:#?}");
    assert!(failed[0].contains(PREFER_CLOSE), "{}", failed[0]);
}

/// The tables must be able to fail: break one rule of a dump and the rows that depend on it must say so, for
/// each of the three things a row checks.
#[test]
fn broken_rules_fail_rows() {
    let cases = [
        (
            "clusterip-basic",
            // The DNAT of `single`'s only endpoint: its packets pass through un-DNAT-ed.
            "-A KUBE-SEP-YVPFCZAWICKFYL42 -p tcp",
            &[
                "pod 10.244.0.5 > 10.96.1.30:80/tcp",
                "host 10.0.0.10 > 10.96.1.30:80/tcp",
                "external 10.244.1.17 > 10.96.1.30:80/tcp",
            ][..],
        ),
        (
            "loadbalancer",
            // The firewall drop: sources outside the ranges get through.
            "-A KUBE-PROXY-FIREWALL -d 192.0.2.42/32",
            &[
                "external 172.16.0.5 > 192.0.2.42:80/tcp",
                "pod 10.244.0.5 > 192.0.2.42:80/tcp",
                "host 10.0.0.10 > 192.0.2.42:80/tcp",
            ][..],
        ),
        (
            "etp-local",
            // The hairpin mark of etp-local-np's endpoint: it would answer itself and reset the connection.
            "-A KUBE-SEP-P6YO2V5DH2VDADPI -s 10.244.0.65/32",
            &["pod 10.244.0.65 > 10.96.6.30:80/tcp"][..],
        ),
    ];
    for (scenario, prefix, rows_hit) in cases {
        let text = data(&format!("upstream-v1.31.14-iptables/{scenario}.txt"));
        let broken: String = text
            .lines()
            .filter(|l| !l.starts_with(prefix))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(
            text.lines().count() - 1,
            broken.lines().count(),
            "{scenario}: {prefix}"
        );
        let input = Input {
            name: format!("{scenario} without `{prefix}`"),
            saved: parse_save(&broken).unwrap(),
            overrides: &[],
        };
        let failed = failures(&rows_of(scenario), &input);
        let hit: Vec<&str> = rows_hit
            .iter()
            .copied()
            .filter(|r| failed.iter().any(|f| f.contains(&format!("{r} =>"))))
            .collect();
        assert_eq!(hit, rows_hit, "{failed:#?}");
        assert_eq!(failed.len(), rows_hit.len(), "{failed:#?}");
    }
}

/// Upstream ran with localhost NodePorts on; we default to off. The flows through 127.0.0.1 are the only
/// ones that differ, and agree again once we render with the option on.
#[test]
fn localhost_node_ports_are_the_known_difference() {
    let on = "host 127.0.0.1 > 127.0.0.1:30310/tcp => accept, masq, 10.244.1.31:8080 10.244.2.32:8080";
    let off = "host 127.0.0.1 > 127.0.0.1:30310/tcp => accept, keep";
    let intent = intent_of(&scenario_state(&data("scenarios/nodeport.yaml")));
    let with = RenderConfig {
        localhost_node_ports: true,
        ..cfg()
    };
    let view = |c: &RenderConfig| saved_view(&render(&intent, c), &jump_rules(c)).unwrap();
    let cases = [
        ("upstream v1.31.14", upstream("v1.31.14", "nodeport"), on),
        ("upstream v1.30.3", upstream("v1.30.3", "nodeport"), on),
        ("ours with localhost NodePorts", view(&with), on),
        ("ours by default", view(&cfg()), off),
    ];
    for (name, saved, row) in cases {
        let input = Input {
            name: name.into(),
            saved,
            overrides: &[],
        };
        let failed = failures(&[row], &input);
        assert!(failed.is_empty(), "{failed:#?}");
    }
}
