//! The netlink client against the real kernel, in a throwaway network namespace: UDP sent through DNAT rules
//! creates the entries, the `conntrack` tool is the reference for what the table holds, and deletes must
//! remove exactly the entries they name.
//!
//! Needs root, iproute2, iptables and conntrack-tools; without them the test fails rather than skips, so a
//! green run always means the kernel was exercised.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::Duration;

use svcproxy_conntrack::{Conntrack, NetlinkConntrack, clean_stale_flows};
use svcproxy_model::conntrack_plan::{FlowEntry, FlowProtocol};
use svcproxy_model::topology::Categorized;
use svcproxy_model::{
    EndpointInfo, Intent, IpFamily, ObjectName, Protocol, ServicePortIntent, ServicePortName, ServiceType,
    SessionAffinity,
};
use svcproxy_testkit::{NetNs, require_root};

const VIP: &str = "10.96.0.10";
/// A second service whose flows are put in conntrack zone 7, to check that deletes name the zone.
const ZONED_VIP: &str = "10.96.0.11";
const ZONE: u16 = 7;
const VIP6: &str = "fd00:96::10";
const CLIENT_ADDR: &str = "10.0.0.1";

fn setup(ns: &NetNs) {
    let steps: &[&[&str]] = &[
        // Routes for the service addresses, so the client's packets reach the nat OUTPUT hook at all.
        // A veth pair because it is always there (dummy devices need a module this kernel may lack).
        &["ip", "link", "add", "ct0", "type", "veth", "peer", "name", "ct1"],
        &["ip", "link", "set", "ct0", "up"],
        &["ip", "link", "set", "ct1", "up"],
        &["ip", "addr", "add", "10.0.0.1/24", "dev", "ct0"],
        &["ip", "route", "add", "10.96.0.0/16", "dev", "ct0"],
        &["ip", "addr", "add", "fd00::1/64", "dev", "ct0", "nodad"],
        &["ip", "-6", "route", "add", "fd00:96::/64", "dev", "ct0"],
        &[
            "iptables",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "udp",
            "-d",
            VIP,
            "--dport",
            "53",
            "-j",
            "DNAT",
            "--to-destination",
            "127.0.0.1:5353",
        ],
        &[
            "iptables", "-t", "raw", "-A", "OUTPUT", "-p", "udp", "-d", ZONED_VIP, "-j", "CT", "--zone", "7",
        ],
        // The zoned flow's answers must be looked up in the same zone to be recognised as replies.
        &[
            "iptables",
            "-t",
            "raw",
            "-A",
            "OUTPUT",
            "-p",
            "udp",
            "-s",
            "127.0.0.1",
            "--sport",
            "5354",
            "-j",
            "CT",
            "--zone",
            "7",
        ],
        &[
            "iptables",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "udp",
            "-d",
            ZONED_VIP,
            "--dport",
            "53",
            "-j",
            "DNAT",
            "--to-destination",
            "127.0.0.1:5354",
        ],
        &[
            "ip6tables",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "udp",
            "-d",
            VIP6,
            "--dport",
            "53",
            "-j",
            "DNAT",
            "--to-destination",
            "[::1]:5353",
        ],
    ];
    for step in steps {
        ns.exec(step).unwrap_or_else(|e| panic!("namespace setup: {e}"));
    }
}

/// Sends one datagram from a fresh socket to `dst` and waits for the echo, proving the path (and its NAT)
/// works both ways. Returns the client's address as the original tuple shows it.
fn exchange(dst: &str) -> SocketAddr {
    let dst: SocketAddr = dst.parse().unwrap();
    let bind = if dst.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
    let client = UdpSocket::bind(bind).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    client.connect(dst).unwrap();
    client.send(b"ping").unwrap();
    let mut buf = [0; 16];
    let n = client
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no echo from {dst}: {e}"));
    assert_eq!(&buf[..n], b"ping");
    client.local_addr().unwrap()
}

/// Answers every datagram with itself, until the socket is dropped with the namespace.
fn echo(addr: &str) {
    let sock = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    std::thread::spawn(move || {
        let mut buf = [0; 64];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let _ = sock.send_to(&buf[..n], from);
        }
    });
}

/// The UDP entries of one family as `conntrack -L` prints them, reduced to the fields [`FlowEntry`]'s
/// `Display` shows, so the two listings compare as sets of strings.
fn reference(ns: &NetNs, family: IpFamily) -> BTreeSet<String> {
    let f = match family {
        IpFamily::V4 => "ipv4",
        IpFamily::V6 => "ipv6",
    };
    let out = ns
        .exec_stdout(&["conntrack", "-L", "-f", f, "-p", "udp"])
        .unwrap_or_else(|e| panic!("conntrack -L: {e}"));
    out.lines()
        .map(|line| {
            let mut fields = vec!["udp".to_string()];
            let mut zone = None;
            for word in line.split_whitespace() {
                match word.split_once('=') {
                    Some(("src" | "dst" | "sport" | "dport", _)) => fields.push(word.to_string()),
                    Some(("zone", z)) if z != "0" => zone = Some(word.to_string()),
                    _ => {}
                }
            }
            fields.extend(zone);
            fields.join(" ")
        })
        .collect()
}

fn udp_strings(entries: &[FlowEntry]) -> BTreeSet<String> {
    entries
        .iter()
        .filter(|e| e.protocol == FlowProtocol::Udp)
        .map(ToString::to_string)
        .collect()
}

fn list(ct: &NetlinkConntrack, family: IpFamily) -> Vec<FlowEntry> {
    ct.list(family).unwrap_or_else(|e| panic!("list {family}: {e}"))
}

fn find(entries: &[FlowEntry], client: SocketAddr) -> FlowEntry {
    *entries
        .iter()
        .find(|e| e.original.src_addr() == client)
        .unwrap_or_else(|| panic!("no entry from {client} in {entries:#?}"))
}

/// The DNS service as the engine would have applied it, sending to `endpoint`.
fn dns_intent(endpoint: &str) -> Intent {
    let endpoint: SocketAddr = endpoint.parse().unwrap();
    let info = EndpointInfo {
        ip: endpoint.ip(),
        port: endpoint.port(),
        ready: true,
        serving: true,
        terminating: false,
        is_local: true,
        zone_hints: None,
        node_hints: None,
    };
    let name = ServicePortName::new(ObjectName::new("kube-system", "dns"), "dns", Protocol::Udp);
    let spi = ServicePortIntent {
        name: name.clone(),
        service_type: ServiceType::ClusterIP,
        cluster_ip: VIP.parse().unwrap(),
        port: 53,
        node_port: None,
        external_ips: Vec::new(),
        load_balancer_ips: Vec::new(),
        source_ranges: Vec::new(),
        session_affinity: SessionAffinity::None,
        external_policy_local: false,
        internal_policy_local: false,
        health_check_node_port: None,
        local_ready_ips: Vec::new(),
        draining: Vec::new(),
        endpoints: Categorized::new(vec![info], Vec::new(), true),
        total_endpoints: 1,
        content_hash: 0,
    };
    Intent {
        service_ports: [(name, std::sync::Arc::new(spi))].into_iter().collect(),
    }
}

#[test]
fn lists_and_deletes_entries_in_a_network_namespace() {
    require_root();
    let ns = NetNs::new("ct").unwrap_or_else(|e| panic!("create namespace: {e}"));
    setup(&ns);

    // Everything that creates sockets runs inside the namespace; the client handed back keeps talking to
    // that namespace's table from this thread.
    let (ct, first, second, direct, zoned, v6) = ns.run(|| {
        echo("127.0.0.1:5353");
        echo("127.0.0.1:5354");
        echo("[::1]:5353");
        let first = exchange(&format!("{VIP}:53"));
        let second = exchange(&format!("{VIP}:53"));
        let direct = exchange("127.0.0.1:5353");
        let zoned = exchange(&format!("{ZONED_VIP}:53"));
        let v6 = exchange(&format!("[{VIP6}]:53"));
        let ct = NetlinkConntrack::new().unwrap_or_else(|e| panic!("open ctnetlink: {e}"));
        (ct, first, second, direct, zoned, v6)
    });

    // The listing matches the conntrack tool's, field for field, in both families.
    let v4 = list(&ct, IpFamily::V4);
    let tool_v4 = reference(&ns, IpFamily::V4);
    assert_eq!(tool_v4.len(), 4, "one entry per exchange: {tool_v4:#?}");
    assert_eq!(udp_strings(&v4), tool_v4);
    let v6_entries = list(&ct, IpFamily::V6);
    let tool_v6 = reference(&ns, IpFamily::V6);
    assert_eq!(tool_v6.len(), 1, "{tool_v6:#?}");
    assert_eq!(udp_strings(&v6_entries), tool_v6);
    assert!(v4.iter().all(|e| e.original.src.is_ipv4()));
    assert!(v6_entries.iter().all(|e| e.original.src.is_ipv6()));

    // Tuples as DNAT recorded them: the reply comes from the backend, addressed to the client.
    let client_ip: IpAddr = CLIENT_ADDR.parse().unwrap();
    let e1 = find(&v4, first);
    assert_eq!(first.ip(), client_ip);
    assert_eq!(e1.protocol, FlowProtocol::Udp);
    assert_eq!(e1.original.dst_addr(), format!("{VIP}:53").parse().unwrap());
    assert_eq!(e1.reply.src_addr(), "127.0.0.1:5353".parse().unwrap());
    assert_eq!(e1.reply.dst_addr(), first);
    assert_eq!(e1.zone, 0);
    assert!(e1.id.is_some(), "the kernel reports entry ids");
    let ez = find(&v4, zoned);
    assert_eq!(ez.zone, ZONE);
    assert_eq!(ez.reply.src_addr(), "127.0.0.1:5354".parse().unwrap());
    let e6 = find(&v6_entries, v6);
    assert_eq!(e6.original.dst_addr(), format!("[{VIP6}]:53").parse().unwrap());
    assert_eq!(e6.reply.src_addr(), "[::1]:5353".parse().unwrap());

    // The host's table is another one: a client opened out here does not see the namespace's flows.
    let host = NetlinkConntrack::new().unwrap_or_else(|e| panic!("open ctnetlink in the host: {e}"));
    assert!(
        list(&host, IpFamily::V4)
            .iter()
            .all(|e| e.original.src_addr() != first || e.original.dst_addr() != e1.original.dst_addr()),
        "the namespace's entry is visible from the host namespace"
    );

    // Deleting one entry removes exactly that one.
    let before = udp_strings(&v4);
    assert_eq!(ct.delete(&[e1]).unwrap(), 1);
    let after = udp_strings(&list(&ct, IpFamily::V4));
    let mut expected = before.clone();
    expected.remove(&e1.to_string());
    assert_eq!(after, expected);
    assert_eq!(after, reference(&ns, IpFamily::V4));
    for survivor in [second, direct, zoned] {
        find(&list(&ct, IpFamily::V4), survivor);
    }

    // Gone already is not an error, just nothing deleted.
    assert_eq!(ct.delete(&[e1]).unwrap(), 0);

    // An entry is only deleted in its own zone, and only while its id still matches.
    let wrong_id = FlowEntry {
        id: ez.id.map(|id| id.wrapping_add(1)),
        ..ez
    };
    let wrong_zone = FlowEntry {
        zone: 0,
        id: None,
        ..ez
    };
    assert_eq!(ct.delete(&[wrong_id, wrong_zone]).unwrap(), 0);
    find(&list(&ct, IpFamily::V4), zoned);
    assert_eq!(ct.delete(&[ez]).unwrap(), 1);

    // The whole cleanup: with the backend still current nothing is stale; once the service points
    // elsewhere, the remaining flow to its VIP goes, and the flow that bypassed the service stays.
    let report = clean_stale_flows(&ct, IpFamily::V4, None, &dns_intent("127.0.0.1:5353"), &[]).unwrap();
    assert_eq!((report.stale, report.deleted), (0, 0));
    let report = clean_stale_flows(&ct, IpFamily::V4, None, &dns_intent("127.0.0.2:5353"), &[]).unwrap();
    assert_eq!((report.stale, report.deleted), (1, 1));
    let left = list(&ct, IpFamily::V4);
    find(&left, direct);
    assert!(left.iter().all(|e| e.original.src_addr() != second));
    assert_eq!(udp_strings(&left), reference(&ns, IpFamily::V4));

    // IPv6 deletes go through the same path.
    assert_eq!(ct.delete(&[e6]).unwrap(), 1);
    assert!(
        list(&ct, IpFamily::V6)
            .iter()
            .all(|e| e.original.src_addr() != v6)
    );
}

#[test]
fn dumps_and_deletes_tables_larger_than_one_datagram() {
    // Far more entries than fit one dump datagram, and more than one delete batch.
    const FLOWS: usize = 600;
    require_root();
    let ns = NetNs::new("ctbig").unwrap_or_else(|e| panic!("create namespace: {e}"));
    // A namespace tracks nothing until some rule needs conntrack.
    ns.exec(&[
        "iptables",
        "-A",
        "OUTPUT",
        "-m",
        "conntrack",
        "--ctstate",
        "NEW",
        "-j",
        "ACCEPT",
    ])
    .unwrap_or_else(|e| panic!("enable tracking: {e}"));
    let (ct, _sockets) = ns.run(|| {
        // Nothing listens on the port: each datagram still leaves an (unreplied) entry behind. The sockets
        // stay open so no two of them get the same ephemeral port, which would make one flow of two.
        let sockets: Vec<UdpSocket> = (0..FLOWS)
            .map(|_| {
                let s = UdpSocket::bind("127.0.0.1:0").unwrap();
                s.send_to(b"x", "127.0.0.1:6000").unwrap();
                s
            })
            .collect();
        (
            NetlinkConntrack::new().unwrap_or_else(|e| panic!("open ctnetlink: {e}")),
            sockets,
        )
    });
    let entries: Vec<FlowEntry> = list(&ct, IpFamily::V4)
        .into_iter()
        .filter(|e| e.original.dst_port == 6000)
        .collect();
    assert_eq!(entries.len(), FLOWS);
    assert_eq!(udp_strings(&entries), reference(&ns, IpFamily::V4));
    assert_eq!(ct.delete(&entries).unwrap(), FLOWS);
    assert!(reference(&ns, IpFamily::V4).is_empty());
}
