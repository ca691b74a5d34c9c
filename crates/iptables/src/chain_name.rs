//! Chain names, computed exactly as upstream kube-proxy computes them.
//!
//! Byte-identical names are what let svcproxy take a node over from kube-proxy (and hand it back) without
//! leftovers: each side recognises and rewrites the other's chains, and ClientIP affinity survives because the
//! `recent` lists are named after the endpoint chains.

use data_encoding::BASE32_NOPAD;
use sha2::{Digest, Sha256};
use svcproxy_model::{EndpointInfo, Protocol, ServicePortName};

use crate::rule_text::push_endpoint;
use crate::ruleset::ChainName;

/// nat: entry point for service traffic, one rule per (service port, destination address).
pub const KUBE_SERVICES: &str = "KUBE-SERVICES";
/// nat: NodePort dispatch; filter: health-check node port ACCEPTs.
pub const KUBE_NODEPORTS: &str = "KUBE-NODEPORTS";
/// nat: masquerades marked packets.
pub const KUBE_POSTROUTING: &str = "KUBE-POSTROUTING";
/// nat: sets the masquerade bit.
pub const KUBE_MARK_MASQ: &str = "KUBE-MARK-MASQ";
/// filter: REJECT/DROP for external destinations of services without (local) endpoints.
pub const KUBE_EXTERNAL_SERVICES: &str = "KUBE-EXTERNAL-SERVICES";
/// filter: forwarding accept rules.
pub const KUBE_FORWARD: &str = "KUBE-FORWARD";
/// filter: DROP for load-balancer traffic from outside `loadBalancerSourceRanges`.
pub const KUBE_PROXY_FIREWALL: &str = "KUBE-PROXY-FIREWALL";
/// filter: the localnet anti-martian rule; shared with kubelet, so never deleted by us.
pub const KUBE_FIREWALL: &str = "KUBE-FIREWALL";

pub const SVC_PREFIX: &str = "KUBE-SVC-";
pub const SVL_PREFIX: &str = "KUBE-SVL-";
pub const EXT_PREFIX: &str = "KUBE-EXT-";
pub const FW_PREFIX: &str = "KUBE-FW-";
pub const SEP_PREFIX: &str = "KUBE-SEP-";
/// Written by kube-proxy ≤ 1.23 for eTP=Local; releases ≥ 1.28 no longer collect it, so we must.
pub const XLB_PREFIX: &str = "KUBE-XLB-";

/// Length of the hash part of a per-service chain name.
pub const HASH_LEN: usize = 16;

/// Upstream takes the first 16 characters of the padded standard base32 encoding of the SHA-256 of its input.
/// Ten bytes encode to exactly sixteen characters, so encoding only those gives the same prefix without the
/// rest. The input is the concatenation of `parts`, hashed without being joined first, and the hash is
/// spelled into `out` (a render hashes every service port).
fn hash16<'o>(parts: &[&str], out: &'o mut [u8; HASH_LEN]) -> &'o str {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part.as_bytes());
    }
    BASE32_NOPAD.encode_mut(&hasher.finalize()[..10], out);
    std::str::from_utf8(out).expect("base32 is ASCII")
}

/// The hash the SVC, SVL, EXT and FW chains of one service port share: the service-port name (`ns/svc:port`,
/// or `ns/svc` for an unnamed port) immediately followed by the lower-case protocol.
pub fn service_chain_hash(spn: &ServicePortName) -> String {
    let mut hash = [0u8; HASH_LEN];
    hash16(&[&spn.to_string(), spn.protocol.lower()], &mut hash).to_owned()
}

pub fn svc_chain(spn: &ServicePortName) -> String {
    format!("{SVC_PREFIX}{}", service_chain_hash(spn))
}

pub fn svl_chain(spn: &ServicePortName) -> String {
    format!("{SVL_PREFIX}{}", service_chain_hash(spn))
}

pub fn ext_chain(spn: &ServicePortName) -> String {
    format!("{EXT_PREFIX}{}", service_chain_hash(spn))
}

pub fn fw_chain(spn: &ServicePortName) -> String {
    format!("{FW_PREFIX}{}", service_chain_hash(spn))
}

/// The endpoint chain: the service hash input followed by `ip:port` (`[ip]:port` for IPv6), so the same
/// backend of two service ports gets two chains, and a target-port change renames the chain.
pub fn sep_chain(spn: &ServicePortName, endpoint: &EndpointInfo) -> String {
    SepNames::new(spn).name(endpoint).to_string()
}

/// Names the endpoint chains of one service port. The hash input is the service port's name and protocol
/// followed by the endpoint: the hash is seeded with the common part once, IPv4 endpoints are spelled
/// without the formatting machinery, and the name is encoded in a reused buffer and shared from there (a full
/// render names every endpoint: 100,000 at 10,000 Services).
pub struct SepNames {
    seeded: Sha256,
    endpoint: String,
    name: String,
}

impl SepNames {
    pub fn new(spn: &ServicePortName) -> Self {
        SepNames::spelled(&spn.to_string(), spn.protocol)
    }

    /// For a service port whose name is already spelled (`ns/svc:port`).
    pub fn spelled(spn: &str, protocol: Protocol) -> Self {
        let mut names = SepNames {
            seeded: Sha256::new(),
            endpoint: String::with_capacity(48),
            name: String::with_capacity(SEP_PREFIX.len() + HASH_LEN),
        };
        names.reseed(spn, protocol);
        names
    }

    /// Names the endpoint chains of another service port from now on, keeping the buffers: a thread that
    /// renders thousands of service ports allocated three of them for each.
    pub fn reseed(&mut self, spn: &str, protocol: Protocol) {
        self.seeded = Sha256::new()
            .chain_update(spn.as_bytes())
            .chain_update(protocol.lower().as_bytes());
    }

    pub fn name(&mut self, endpoint: &EndpointInfo) -> ChainName {
        ChainName::from(self.spell(endpoint))
    }

    /// The endpoint chain's name, in a buffer the next call reuses.
    pub fn spell(&mut self, endpoint: &EndpointInfo) -> &str {
        self.endpoint.clear();
        push_endpoint(&mut self.endpoint, endpoint);
        let digest = self
            .seeded
            .clone()
            .chain_update(self.endpoint.as_bytes())
            .finalize();
        self.name.clear();
        self.name.push_str(SEP_PREFIX);
        BASE32_NOPAD.encode_append(&digest[..10], &mut self.name);
        &self.name
    }
}

/// The four per-service chain names of one service port; hashing once serves all of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceChains {
    pub svc: ChainName,
    pub svl: ChainName,
    pub ext: ChainName,
    pub fw: ChainName,
}

impl ServiceChains {
    pub fn new(spn: &ServicePortName) -> Self {
        ServiceChains::spelled(&spn.to_string(), spn.protocol)
    }

    /// For a service port whose name is already spelled (`ns/svc:port`).
    pub fn spelled(spn: &str, protocol: Protocol) -> Self {
        let mut hash = [0u8; HASH_LEN];
        let hash = hash16(&[spn, protocol.lower()], &mut hash);
        let mut name = [0u8; SVC_PREFIX.len() + HASH_LEN];
        let mut prefixed = |prefix: &str| {
            let len = prefix.len() + HASH_LEN;
            name[..prefix.len()].copy_from_slice(prefix.as_bytes());
            name[prefix.len()..len].copy_from_slice(hash.as_bytes());
            ChainName::from(std::str::from_utf8(&name[..len]).expect("prefix and hash are ASCII"))
        };
        ServiceChains {
            svc: prefixed(SVC_PREFIX),
            svl: prefixed(SVL_PREFIX),
            ext: prefixed(EXT_PREFIX),
            fw: prefixed(FW_PREFIX),
        }
    }
}

/// Whether a chain is a per-service chain that some version of kube-proxy or svcproxy wrote:
/// `KUBE-(SVC|SVL|EXT|FW|SEP|XLB)-` and exactly 16 characters of the base32 alphabet.
///
/// These are ours to collect whoever wrote them. Matching the full shape rather than the prefix leaves alone
/// anything an administrator named `KUBE-SVC-mine`.
pub fn is_owned_service_chain(name: &str) -> bool {
    // Checked without packing: a cold sync asks this of every chain, several times over.
    service_chain_parts(name.as_bytes())
        .is_some_and(|(_, hash)| hash.iter().all(|b| matches!(b, b'A'..=b'Z' | b'2'..=b'7')))
}

/// Which per-service prefix `name` has (by its place in the list) and what follows it, when that is as long
/// as a hash.
fn service_chain_parts(name: &[u8]) -> Option<(usize, &[u8])> {
    let (kind, hash) = [
        SVC_PREFIX, SVL_PREFIX, EXT_PREFIX, FW_PREFIX, SEP_PREFIX, XLB_PREFIX,
    ]
    .iter()
    .enumerate()
    .find_map(|(kind, prefix)| name.strip_prefix(prefix.as_bytes()).map(|hash| (kind, hash)))?;
    (hash.len() == HASH_LEN).then_some((kind, hash))
}

/// An owned per-service chain name packed into 11 bytes: which prefix, then the 16 base32 characters of its
/// hash at 5 bits each. `None` for any other name. A map of how 55,000 chains compared (a read-back at 5,000
/// services) holds these instead of the names: 24-byte entries instead of 48.
pub(crate) fn packed_service_chain(name: &[u8]) -> Option<[u8; 11]> {
    let (kind, hash) = service_chain_parts(name)?;
    let mut bits: u128 = 0;
    for b in hash {
        let value = match b {
            b'A'..=b'Z' => b - b'A',
            b'2'..=b'7' => b - b'2' + 26,
            _ => return None,
        };
        bits = bits << 5 | u128::from(value);
    }
    let mut packed = [0u8; 11];
    packed[0] = u8::try_from(kind).expect("six prefixes");
    packed[1..].copy_from_slice(&bits.to_be_bytes()[6..]);
    Some(packed)
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use svcproxy_model::{ObjectName, Protocol};

    use super::*;

    fn spn(ns: &str, svc: &str, port: &str, protocol: Protocol) -> ServicePortName {
        ServicePortName::new(ObjectName::new(ns, svc), port, protocol)
    }

    fn ep(ip: &str, port: u16) -> EndpointInfo {
        EndpointInfo {
            ip: ip.parse::<IpAddr>().unwrap(),
            port,
            ready: true,
            serving: true,
            terminating: false,
            is_local: false,
            zone_hints: None,
            node_hints: None,
        }
    }

    #[test]
    fn service_hash_vectors() {
        use Protocol::*;
        let cases = [
            (spn("ns1", "svc1", "p80", Tcp), "XPGD46QRK7WJZT7O"),
            (spn("ns2", "svc2", "p80", Tcp), "GNZBNJ2PO5MGZ6GT"),
            (spn("ns3", "svc3", "p80", Tcp), "X27LE4BHSL4DOUIK"),
            (spn("ns4", "svc4", "p80", Tcp), "4SW47YFZTEDKD3PK"),
            (spn("ns5", "svc5", "p80", Tcp), "NUKIZ6OKUXPJNT4C"),
            (spn("ns2", "svc2", "p8080", Tcp), "2VJB64SDSIJUP5T6"),
            (spn("ns4", "svc4", "p8082", Tcp), "EBDQOQU5SJFXRIL3"),
            (spn("default", "kubernetes", "https", Tcp), "NPX46M4PTMTKRN6Y"),
            (spn("kube-system", "kube-dns", "dns", Udp), "TCOU7JCQXEZGVUNU"),
            (spn("kube-system", "kube-dns", "dns-tcp", Tcp), "ERIFXISQEP7F7OF4"),
            (spn("kube-system", "kube-dns", "metrics", Tcp), "JD5MR3NA4I4DYORP"),
            (spn("ns1", "svc1", "", Tcp), "AQI2S6QIMU7PVVRP"),
            (spn("ns1", "svc1", "p80", Udp), "OJWW7NSBVZTDHXNW"),
            (spn("ns1", "svc1", "p80", Sctp), "GFCIFIA5VTFSTMSM"),
            (spn("demo", "web", "http", Tcp), "XRY76EGRC3BSCIIJ"),
        ];
        for (name, want) in cases {
            assert_eq!(service_chain_hash(&name), want, "{name}");
        }
    }

    #[test]
    fn endpoint_hash_vectors() {
        let p80 = spn("ns1", "svc1", "p80", Protocol::Tcp);
        let cases = [
            (p80.clone(), ep("10.180.0.1", 80), "KUBE-SEP-SXIVWICOYRO3J4NJ"),
            (
                spn("ns2", "svc2", "p80", Protocol::Tcp),
                ep("10.180.0.2", 80),
                "KUBE-SEP-RS4RBKLTHTF2IUXJ",
            ),
            (
                spn("ns5", "svc5", "p80", Protocol::Tcp),
                ep("10.180.0.3", 80),
                "KUBE-SEP-I77PXRDZVX7PMWMN",
            ),
            (p80, ep("2001:db8::1", 80), "KUBE-SEP-PXJBZORW63OXSFDY"),
            (
                spn("demo", "web", "http", Protocol::Tcp),
                ep("10.244.1.5", 8080),
                "KUBE-SEP-NW5VICAF3Z2QABHQ",
            ),
            (
                spn("demo", "web", "http", Protocol::Tcp),
                ep("10.244.2.7", 8080),
                "KUBE-SEP-JPICTQTYOLMYNIJ7",
            ),
        ];
        for (name, endpoint, want) in cases {
            assert_eq!(sep_chain(&name, &endpoint), want, "{name} {endpoint}");
        }
    }

    #[test]
    fn endpoints_are_spelled_as_display_spells_them() {
        for (ip, port) in [
            ("0.0.0.0", 0),
            ("10.244.1.5", 8080),
            ("255.255.255.255", 65535),
            ("1.20.100.9", 9),
            ("2001:db8::1", 80),
            ("::ffff:10.0.0.1", 443),
        ] {
            let endpoint = ep(ip, port);
            let mut spelled = String::new();
            push_endpoint(&mut spelled, &endpoint);
            assert_eq!(spelled, endpoint.to_string());
        }
    }

    #[test]
    fn chain_prefixes_share_the_hash() {
        let name = spn("default", "kubernetes", "https", Protocol::Tcp);
        let chains = ServiceChains::new(&name);
        assert_eq!(chains.svc, "KUBE-SVC-NPX46M4PTMTKRN6Y");
        assert_eq!(chains.svl, "KUBE-SVL-NPX46M4PTMTKRN6Y");
        assert_eq!(chains.ext, "KUBE-EXT-NPX46M4PTMTKRN6Y");
        assert_eq!(chains.fw, "KUBE-FW-NPX46M4PTMTKRN6Y");
        assert_eq!(svc_chain(&name), &*chains.svc);
        assert_eq!(svl_chain(&name), &*chains.svl);
        assert_eq!(ext_chain(&name), &*chains.ext);
        assert_eq!(fw_chain(&name), &*chains.fw);
    }

    #[test]
    fn ownership_pattern() {
        for owned in [
            "KUBE-SVC-NPX46M4PTMTKRN6Y",
            "KUBE-SVL-GNZBNJ2PO5MGZ6GT",
            "KUBE-EXT-GNZBNJ2PO5MGZ6GT",
            "KUBE-FW-NUKIZ6OKUXPJNT4C",
            "KUBE-SEP-SXIVWICOYRO3J4NJ",
            "KUBE-XLB-GNZBNJ2PO5MGZ6GT",
        ] {
            assert!(is_owned_service_chain(owned), "{owned}");
        }
        for foreign in [
            "KUBE-SERVICES",
            "KUBE-NODEPORTS",
            "KUBE-MARK-MASQ",
            "KUBE-SVC-NPX46M4PTMTKRN6",
            "KUBE-SVC-NPX46M4PTMTKRN6YY",
            "KUBE-SVC-npx46m4ptmtkrn6y",
            "KUBE-SVC-NPX46M4PTMTKRN61",
            "KUBE-SVC-NPX46M4PTMTKRN68",
            "KUBE-ABC-NPX46M4PTMTKRN6Y",
            "XKUBE-SVC-NPX46M4PTMTKRN6Y",
            "KUBE-FIREWALL",
        ] {
            assert!(!is_owned_service_chain(foreign), "{foreign}");
        }
    }

    #[test]
    fn packing_a_service_chain_name_keeps_it_apart_from_every_other() {
        let names = [
            "KUBE-SEP-AAAAAAAAAAAAAAAA",
            "KUBE-SEP-AAAAAAAAAAAAAAAB",
            "KUBE-SEP-BAAAAAAAAAAAAAAA",
            "KUBE-SVC-AAAAAAAAAAAAAAAA",
            "KUBE-SVL-AAAAAAAAAAAAAAAA",
            "KUBE-EXT-AAAAAAAAAAAAAAAA",
            "KUBE-FW-AAAAAAAAAAAAAAAA",
            "KUBE-XLB-AAAAAAAAAAAAAAAA",
            "KUBE-SEP-7777777777777777",
            "KUBE-SEP-ZZZZZZZZZZZZZZZZ",
            "KUBE-SEP-2222222222222222",
        ];
        let packed: std::collections::BTreeSet<[u8; 11]> = names
            .iter()
            .map(|n| packed_service_chain(n.as_bytes()).unwrap_or_else(|| panic!("{n}")))
            .collect();
        assert_eq!(packed.len(), names.len());
        for name in names {
            assert!(is_owned_service_chain(name));
        }
        for other in [
            "KUBE-SEP-AAAAAAAAAAAAAAA",
            "KUBE-SEP-AAAAAAAAAAAAAAAAA",
            "KUBE-SEP-aAAAAAAAAAAAAAAA",
            "KUBE-SEP-1AAAAAAAAAAAAAAA",
            "KUBE-SERVICES",
            "KUBE-MARK-MASQ",
            "",
        ] {
            assert_eq!(packed_service_chain(other.as_bytes()), None, "{other}");
            assert!(!is_owned_service_chain(other), "{other}");
        }
    }
}
