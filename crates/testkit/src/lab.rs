use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::netns::{NetNs, NetNsError, run_checked};
use crate::require_root::require_root;

/// Gateway address pods route through. Nothing owns it: the node's veth
/// answers ARP for it by proxy, so every pod can use the same one.
const POD_GATEWAY: &str = "169.254.1.1";
/// The IPv6 gateway: every node-side pod veth carries this link-local
/// address, so every pod routes through the same one.
const POD_GATEWAY6: &str = "fe80::1";

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("setting up the lab's {part}: {source}")]
    Setup {
        part: String,
        #[source]
        source: NetNsError,
    },
}

trait Context<T> {
    fn context(self, part: impl Into<String>) -> Result<T, LabError>;
}

impl<T> Context<T> for Result<T, NetNsError> {
    fn context(self, part: impl Into<String>) -> Result<T, LabError> {
        self.map_err(|source| LabError::Setup {
            part: part.into(),
            source,
        })
    }
}

/// A simulated Kubernetes node on the real kernel.
///
/// ```text
///   external 10.0.0.20/24 ──veth── eth0 10.0.0.10/24  node  vethN ──veth── eth0 pod-ip/32  pod
///            fd00:10::20/64             fd00:10::10/64                        pod-ip6/128
/// ```
///
/// Every link is dual-stack; pods get an IPv6 address when added with
/// [`Lab::add_dual_pod`]. IPv6 addresses skip duplicate address detection, so
/// they work the moment they are added.
///
/// Pods hang off the node on routed veths, each with a /32 host route on the
/// node side. There is deliberately no bridge: bridged replies between pods
/// would skip the node's iptables unless br_netfilter is loaded, hiding
/// exactly the hairpin and masquerade behaviour the tests are meant to see.
/// The external host reaches the ClusterIP and pod ranges through the node.
#[derive(Debug)]
pub struct Lab {
    node: NetNs,
    external: NetNs,
    next_veth: AtomicU32,
}

/// A pod attached to a [`Lab`]'s node; its namespace is deleted on drop.
#[derive(Debug)]
pub struct Pod {
    name: String,
    ip: Ipv4Addr,
    ip6: Option<Ipv6Addr>,
    ns: NetNs,
    node_veth: String,
    node_ns: String,
}

impl Lab {
    pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
    pub const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 20);
    pub const SERVICE_CIDR: &str = "10.96.0.0/12";
    pub const POD_CIDR: &str = "10.244.0.0/16";
    pub const NODE_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 0x10);
    pub const EXTERNAL_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 0x20);
    pub const SERVICE_CIDR6: &str = "fd00:10:96::/112";
    pub const POD_CIDR6: &str = "fd00:10:244::/64";

    /// Builds the lab, panicking with the reason if the machine cannot.
    pub fn new() -> Lab {
        require_root();
        Lab::try_new().unwrap_or_else(|err| panic!("{err}"))
    }

    pub fn try_new() -> Result<Lab, LabError> {
        let node = NetNs::new("node").context("node namespace")?;
        let external = NetNs::new("ext").context("external namespace")?;
        let node_cidr = format!("{}/24", Lab::NODE_IP);
        let external_cidr = format!("{}/24", Lab::EXTERNAL_IP);
        let external_ip = Lab::EXTERNAL_IP.to_string();
        let node_ip = Lab::NODE_IP.to_string();

        node.set_sysctl("net.ipv4.ip_forward", "1")
            .context("node forwarding")?;
        // Creating the peer straight inside the other namespace lets both
        // ends be called eth0 without a detour through the caller's namespace.
        node.exec(&[
            "ip",
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            external.name(),
        ])
        .context("node uplink")?;
        for (ns, cidr) in [(&node, &node_cidr), (&external, &external_cidr)] {
            ns.exec(&["ip", "addr", "add", cidr, "dev", "eth0"])
                .context("uplink address")?;
            ns.exec(&["ip", "link", "set", "eth0", "up"])
                .context("uplink state")?;
        }
        node.exec(&["ip", "route", "add", "default", "via", &external_ip])
            .context("node default route")?;
        for cidr in [Lab::SERVICE_CIDR, Lab::POD_CIDR] {
            external
                .exec(&["ip", "route", "add", cidr, "via", &node_ip])
                .context("external routes to the cluster")?;
        }

        node.set_sysctl("net.ipv6.conf.all.forwarding", "1")
            .context("node IPv6 forwarding")?;
        let (node_ip6, external_ip6) = (Lab::NODE_IP6.to_string(), Lab::EXTERNAL_IP6.to_string());
        for (ns, ip) in [(&node, &node_ip6), (&external, &external_ip6)] {
            ns.exec(&[
                "ip",
                "-6",
                "addr",
                "add",
                &format!("{ip}/64"),
                "dev",
                "eth0",
                "nodad",
            ])
            .context("uplink IPv6 address")?;
        }
        node.exec(&["ip", "-6", "route", "add", "default", "via", &external_ip6])
            .context("node IPv6 default route")?;
        for cidr in [Lab::SERVICE_CIDR6, Lab::POD_CIDR6] {
            external
                .exec(&["ip", "-6", "route", "add", cidr, "via", &node_ip6])
                .context("external IPv6 routes to the cluster")?;
        }
        Ok(Lab {
            node,
            external,
            next_veth: AtomicU32::new(0),
        })
    }

    pub fn node(&self) -> &NetNs {
        &self.node
    }

    pub fn external(&self) -> &NetNs {
        &self.external
    }

    /// Attaches a new pod with address `ip`, panicking if that fails.
    pub fn add_pod(&self, name: &str, ip: Ipv4Addr) -> Pod {
        self.try_add_pod(name, ip)
            .unwrap_or_else(|err| panic!("adding pod {name} ({ip}): {err}"))
    }

    /// Attaches a new pod with addresses `ip` and `ip6`, panicking if that fails.
    pub fn add_dual_pod(&self, name: &str, ip: Ipv4Addr, ip6: Ipv6Addr) -> Pod {
        self.try_add_pod(name, ip)
            .and_then(|mut pod| {
                self.add_ipv6(&pod, ip6)?;
                pod.ip6 = Some(ip6);
                Ok(pod)
            })
            .unwrap_or_else(|err| panic!("adding pod {name} ({ip}, {ip6}): {err}"))
    }

    fn add_ipv6(&self, pod: &Pod, ip6: Ipv6Addr) -> Result<(), LabError> {
        let host_route = format!("{ip6}/128");
        self.node
            .exec(&[
                "ip",
                "-6",
                "addr",
                "add",
                &format!("{POD_GATEWAY6}/64"),
                "dev",
                &pod.node_veth,
                "nodad",
            ])
            .context("pod veth IPv6 gateway")?;
        self.node
            .exec(&["ip", "-6", "route", "add", &host_route, "dev", &pod.node_veth])
            .context("node IPv6 route to pod")?;
        pod.ns
            .exec(&["ip", "-6", "addr", "add", &host_route, "dev", "eth0", "nodad"])
            .context("pod IPv6 address")?;
        pod.ns
            .exec(&[
                "ip",
                "-6",
                "route",
                "add",
                "default",
                "via",
                POD_GATEWAY6,
                "dev",
                "eth0",
            ])
            .context("pod IPv6 default route")?;
        Ok(())
    }

    pub fn try_add_pod(&self, name: &str, ip: Ipv4Addr) -> Result<Pod, LabError> {
        let ns = NetNs::new("pod").context("pod namespace")?;
        let node_veth = format!("veth{}", self.next_veth.fetch_add(1, Ordering::Relaxed));
        let host_route = format!("{ip}/32");

        self.node
            .exec(&[
                "ip",
                "link",
                "add",
                &node_veth,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns.name(),
            ])
            .context("pod veth")?;
        // Proxy ARP makes the node answer for the pod's gateway (and anything
        // else it routes elsewhere), so the veth needs no address of its own.
        self.node
            .set_sysctl(&format!("net.ipv4.conf.{node_veth}.proxy_arp"), "1")
            .context("pod veth proxy ARP")?;
        self.node
            .exec(&["ip", "link", "set", &node_veth, "up"])
            .context("pod veth state")?;
        self.node
            .exec(&["ip", "route", "add", &host_route, "dev", &node_veth])
            .context("node route to pod")?;

        ns.exec(&["ip", "addr", "add", &host_route, "dev", "eth0"])
            .context("pod address")?;
        ns.exec(&["ip", "link", "set", "eth0", "up"])
            .context("pod link state")?;
        ns.exec(&["ip", "route", "add", POD_GATEWAY, "dev", "eth0", "scope", "link"])
            .context("pod gateway route")?;
        ns.exec(&["ip", "route", "add", "default", "via", POD_GATEWAY, "dev", "eth0"])
            .context("pod default route")?;

        Ok(Pod {
            name: name.to_owned(),
            ip,
            ip6: None,
            ns,
            node_veth,
            node_ns: self.node.name().to_owned(),
        })
    }
}

impl Default for Lab {
    fn default() -> Lab {
        Lab::new()
    }
}

impl Pod {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The pod's IPv6 address, when it was added with one.
    pub fn ip6(&self) -> Option<Ipv6Addr> {
        self.ip6
    }

    pub fn ns(&self) -> &NetNs {
        &self.ns
    }

    /// The node-side end of the pod's veth, as named in the node namespace.
    pub fn node_veth(&self) -> &str {
        &self.node_veth
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        // The kernel dismantles a deleted namespace asynchronously, so its
        // veth (and the node's route through it) would linger for a while
        // and block a new pod reusing this address. Deleting our end takes
        // both ends down at once. Failure just means the node is gone too.
        let _ = run_checked(Command::new("ip").args(["-n", &self.node_ns, "link", "del", &self.node_veth]));
    }
}
