//! The lab on the real kernel: every path the proxy's tests rely on must
//! carry traffic before any proxy rules exist.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use svcproxy_testkit::{Backend, ClientError, Lab, NetNs, spread, tcp_request, udp_request};

const TIMEOUT: Duration = Duration::from_secs(2);
const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 3);

const POD_A6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 1, 2);
const POD_B6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 1, 3);

fn addr(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// Asserts a TCP and a UDP round trip from `client` reach `identity` and
/// that the backend saw `source` as the sender.
fn assert_round_trips<A: Into<IpAddr> + Copy>(client: &NetNs, server: A, identity: &str, source: A) {
    let source: IpAddr = source.into();
    let tcp = tcp_request(client, addr(server, 8080), TIMEOUT).expect("tcp round trip");
    assert_eq!(tcp.identity, identity);
    assert_eq!(tcp.seen_source.ip(), source);
    let udp = udp_request(client, addr(server, 5353), TIMEOUT).expect("udp round trip");
    assert_eq!(udp.identity, identity);
    assert_eq!(udp.seen_source.ip(), source);
}

#[test]
fn pods_reach_each_other() {
    let lab = Lab::new();
    let a = lab.add_pod("a", POD_A);
    let b = lab.add_pod("b", POD_B);
    let _a = Backend::start(a.ns(), "pod-a", &[8080], &[5353]);
    let _b = Backend::start(b.ns(), "pod-b", &[8080], &[5353]);
    assert_round_trips(a.ns(), POD_B, "pod-b", POD_A);
    assert_round_trips(b.ns(), POD_A, "pod-a", POD_B);
}

#[test]
fn every_path_carries_ipv6_too() {
    let lab = Lab::new();
    let a = lab.add_dual_pod("a", POD_A, POD_A6);
    let b = lab.add_dual_pod("b", POD_B, POD_B6);
    assert_eq!(a.ip6(), Some(POD_A6));
    let _a = Backend::start(a.ns(), "pod-a", &[8080], &[5353]);
    let _b = Backend::start(b.ns(), "pod-b", &[8080], &[5353]);
    let _external = Backend::start(lab.external(), "external", &[8080], &[5353]);
    let _node = Backend::start(lab.node(), "node", &[8080], &[5353]);
    assert_round_trips(a.ns(), POD_B6, "pod-b", POD_A6);
    assert_round_trips(lab.external(), POD_A6, "pod-a", Lab::EXTERNAL_IP6);
    assert_round_trips(b.ns(), Lab::EXTERNAL_IP6, "external", POD_B6);
    assert_round_trips(b.ns(), Lab::NODE_IP6, "node", POD_B6);
    // The same backends still answer IPv4 clients, in IPv4 form.
    assert_round_trips(a.ns(), POD_B, "pod-b", POD_A);
}

#[test]
fn external_host_and_pods_reach_each_other() {
    let lab = Lab::new();
    let pod = lab.add_pod("web", POD_A);
    let _pod = Backend::start(pod.ns(), "pod", &[8080], &[5353]);
    let _external = Backend::start(lab.external(), "external", &[8080], &[5353]);
    assert_round_trips(lab.external(), POD_A, "pod", Lab::EXTERNAL_IP);
    assert_round_trips(pod.ns(), Lab::EXTERNAL_IP, "external", POD_A);
}

#[test]
fn node_and_pods_reach_each_other() {
    let lab = Lab::new();
    let pod = lab.add_pod("web", POD_A);
    let _pod = Backend::start(pod.ns(), "pod", &[8080], &[5353]);
    let _node = Backend::start(lab.node(), "node", &[8080], &[5353]);
    assert_round_trips(pod.ns(), Lab::NODE_IP, "node", POD_A);
    assert_round_trips(lab.node(), POD_A, "pod", Lab::NODE_IP);
}

#[test]
fn closed_ports_are_refused() {
    let lab = Lab::new();
    let pod = lab.add_pod("web", POD_A);
    let tcp = tcp_request(lab.external(), addr(POD_A, 9), TIMEOUT);
    assert!(matches!(tcp, Err(ClientError::Refused)), "{tcp:?}");
    let udp = udp_request(lab.external(), addr(POD_A, 9), TIMEOUT);
    assert!(matches!(udp, Err(ClientError::Refused)), "{udp:?}");
    drop(pod);
}

#[test]
fn node_netfilter_sees_forwarded_traffic() {
    let lab = Lab::new();
    let a = lab.add_pod("a", POD_A);
    let b = lab.add_pod("b", POD_B);
    let _b = Backend::start(b.ns(), "pod-b", &[8080], &[5353]);
    let dest = POD_B.to_string();
    let chain = ["iptables", "-w", "-A", "FORWARD", "-d", &dest, "-j"];
    lab.node()
        .exec(&[&chain[..], &["DROP"]].concat())
        .expect("add DROP rule");
    let short = Duration::from_millis(300);
    let dropped = tcp_request(a.ns(), addr(POD_B, 8080), short);
    assert!(matches!(dropped, Err(ClientError::Timeout)), "{dropped:?}");
    let dropped = udp_request(a.ns(), addr(POD_B, 5353), short);
    assert!(matches!(dropped, Err(ClientError::Timeout)), "{dropped:?}");

    lab.node()
        .exec(&["iptables", "-w", "-F", "FORWARD"])
        .expect("flush");
    lab.node()
        .exec(&[&chain[..], &["REJECT"]].concat())
        .expect("add REJECT rule");
    let rejected = tcp_request(a.ns(), addr(POD_B, 8080), TIMEOUT);
    assert!(matches!(rejected, Err(ClientError::Refused)), "{rejected:?}");
    let rejected = udp_request(a.ns(), addr(POD_B, 5353), TIMEOUT);
    assert!(matches!(rejected, Err(ClientError::Refused)), "{rejected:?}");
}

#[test]
fn spread_counts_identities_and_failures() {
    let lab = Lab::new();
    let pod = lab.add_pod("web", POD_A);
    let backend = Backend::start(pod.ns(), "web", &[8080], &[]);
    let counts = spread(lab.external(), addr(POD_A, 8080), 5);
    assert_eq!(counts.into_iter().collect::<Vec<_>>(), [("web".to_owned(), 5)]);
    // Stopping the backend closes its listener, so the port now refuses.
    drop(backend);
    let counts = spread(lab.external(), addr(POD_A, 8080), 3);
    assert_eq!(
        counts.into_iter().collect::<Vec<_>>(),
        [("<refused>".to_owned(), 3)]
    );
}

#[test]
fn namespaces_vanish_on_drop() {
    let lab = Lab::new();
    let pod = lab.add_pod("web", POD_A);
    let names: Vec<String> = [lab.node(), lab.external(), pod.ns()]
        .iter()
        .map(|ns| ns.name().to_owned())
        .collect();
    let node_veth = pod.node_veth().to_owned();
    assert!(lab.node().exec(&["ip", "link", "show", &node_veth]).is_ok());
    drop(pod);
    let gone = lab.node().exec(&["ip", "link", "show", &node_veth]);
    assert!(gone.is_err(), "pod veth should go with the pod namespace");
    drop(lab);
    for name in names {
        assert!(
            !Path::new("/run/netns").join(&name).exists(),
            "{name} still exists"
        );
    }
}

#[test]
fn exec_errors_carry_stderr() {
    let ns = NetNs::new("t").expect("create namespace");
    let err = ns.exec(&["ip", "link", "show", "no-such-link"]).unwrap_err();
    assert!(err.to_string().contains("no-such-link"), "{err}");
}

#[test]
fn run_creates_sockets_inside_the_namespace() {
    let ns = NetNs::new("t").expect("create namespace");
    ns.exec(&["ip", "addr", "add", "192.0.2.1/32", "dev", "lo"])
        .expect("address");
    // The address exists only in the namespace, so binding it proves where
    // the socket was made.
    let listener = ns
        .run(|| std::net::TcpListener::bind("192.0.2.1:0"))
        .expect("bind inside");
    assert!(std::net::TcpListener::bind("192.0.2.1:0").is_err());
    let port = listener.local_addr().unwrap().port();
    let stream = ns.run(|| std::net::TcpStream::connect(("192.0.2.1", port)));
    assert!(stream.is_ok(), "{stream:?}");
}

#[test]
fn a_pod_address_can_be_reused_at_once() {
    let lab = Lab::new();
    drop(lab.add_pod("first", POD_A));
    let second = lab.add_pod("second", POD_A);
    let _backend = Backend::start(second.ns(), "second", &[8080], &[]);
    let reply = tcp_request(lab.external(), addr(POD_A, 8080), TIMEOUT).expect("reach reused address");
    assert_eq!(reply.identity, "second");
}
