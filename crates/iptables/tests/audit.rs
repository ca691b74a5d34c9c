//! The upgrade audit on real kube-proxy output: every reference dump (what v1.30.3 and v1.31.14 programmed) is
//! clean, and each hazard injected into one is found, located, and given the fix that removes it.

use svcproxy_iptables::audit::{
    Hazard, HazardKind, IptablesBackend, IptablesDump, NftTable, NodeNetfilter, audit, parse_nft_tables,
};
use svcproxy_iptables::parse_save;
use svcproxy_model::IpFamily;

const VERSIONS: [&str; 2] = ["upstream-v1.30.3-iptables", "upstream-v1.31.14-iptables"];
const SCENARIOS: [&str; 11] = [
    "all-in-one",
    "clusterip-basic",
    "etp-local",
    "externalips",
    "ignored",
    "itp-local",
    "loadbalancer",
    "no-endpoints",
    "nodeport",
    "terminating",
    "topology",
];

/// Chains of the `etp-local` scenario's Service ref-etp/etp-local-lb:http and its local endpoint.
const SVC: &str = "KUBE-SVC-MT7TXGKFDAJY355P";
const EXT: &str = "KUBE-EXT-MT7TXGKFDAJY355P";
const SEP: &str = "KUBE-SEP-NKCU77EII7YRBULQ";
const XLB: &str = "KUBE-XLB-MT7TXGKFDAJY355P";

fn read(version: &str, name: &str) -> String {
    let path = format!("{}/tests/data/{version}/{name}.txt", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn etp_local() -> String {
    read("upstream-v1.31.14-iptables", "etp-local")
}

fn node(backend: IptablesBackend, text: &str) -> NodeNetfilter {
    NodeNetfilter {
        iptables: vec![dump(backend, text)],
        nft_tables: Vec::new(),
    }
}

fn dump(backend: IptablesBackend, text: &str) -> IptablesDump {
    IptablesDump {
        backend,
        family: IpFamily::V4,
        command: match backend {
            IptablesBackend::Legacy => "iptables-legacy",
            IptablesBackend::Nft => "iptables-nft",
            IptablesBackend::Unknown => "iptables",
        }
        .into(),
        saved: parse_save(text).unwrap(),
    }
}

/// Adds chain declarations and rules to one table of a dump, as another writer would have left them.
fn inject(text: &str, table: &str, chains: &[&str], rules: &[&str]) -> String {
    let mut out = String::new();
    let mut in_table = false;
    for line in text.lines() {
        if line == "COMMIT" && in_table {
            for rule in rules {
                out.push_str(rule);
                out.push('\n');
            }
            in_table = false;
        }
        out.push_str(line);
        out.push('\n');
        if line == format!("*{table}") {
            in_table = true;
            for chain in chains {
                out.push_str(&format!(":{chain} - [0:0]\n"));
            }
        }
    }
    out
}

fn only(found: &[Hazard]) -> &Hazard {
    assert_eq!(found.len(), 1, "expected exactly one hazard: {found:#?}");
    &found[0]
}

#[test]
fn every_reference_dump_is_clean() {
    for version in VERSIONS {
        for name in SCENARIOS {
            let found = audit(&node(IptablesBackend::Nft, &read(version, name)));
            assert!(found.is_empty(), "{version}/{name}: {found:#?}");
        }
    }
}

#[test]
fn a_kube_proxy_1_23_chain_that_still_references_an_endpoint_chain() {
    let text = inject(
        &etp_local(),
        "nat",
        &[XLB],
        &[&format!(
            "-A {XLB} -m comment --comment \"Balancing rule 0 for ref-etp/etp-local-lb:http\" -j {SEP}"
        )],
    );
    let found = audit(&node(IptablesBackend::Nft, &text));
    let h = only(&found);
    assert_eq!(h.kind, HazardKind::OrphanReference);
    assert_eq!(h.location, format!("nf_tables IPv4 nat/{XLB}"));
    assert!(h.why.contains("kube-proxy 1.23") && h.why.contains(SEP), "{h}");
    assert!(h.why.contains("Device or resource busy"), "{h}");
    assert!(
        h.fix.starts_with(&format!(
            "iptables-nft -t nat -F {XLB}; iptables-nft -t nat -X {XLB}"
        )),
        "{h}"
    );
}

#[test]
fn any_unreachable_service_chain_with_references_is_an_orphan() {
    let orphan = "KUBE-SVC-AAAAAAAAAAAAAAAA";
    let text = inject(
        &etp_local(),
        "nat",
        &[orphan],
        &[&format!("-A {orphan} -j {SEP}")],
    );
    let h = only(&audit(&node(IptablesBackend::Legacy, &text))).clone();
    assert_eq!(h.kind, HazardKind::OrphanReference);
    assert_eq!(h.location, format!("legacy IPv4 nat/{orphan}"));
    assert!(!h.why.contains("1.23"), "{h}");
    assert!(
        h.fix.starts_with(&format!(
            "iptables-legacy -t nat -F {orphan}; iptables-legacy -t nat -X {orphan}"
        )),
        "{h}"
    );
}

#[test]
fn a_reachable_xlb_chain_is_obsolete_and_its_reference_goes_first() {
    let jump = format!(
        "-A KUBE-NODEPORTS -p tcp -m comment --comment \"ref-etp/etp-local-lb:http\" -m tcp --dport 30610 -j {XLB}"
    );
    let text = inject(
        &etp_local(),
        "nat",
        &[XLB],
        &[&jump, &format!("-A {XLB} -j {SEP}")],
    );
    let h = only(&audit(&node(IptablesBackend::Nft, &text))).clone();
    assert_eq!(h.kind, HazardKind::ObsoleteRule);
    assert!(h.why.contains("traffic still passes through"), "{h}");
    assert!(
        h.fix.starts_with(&format!(
            "iptables-nft -t nat -D KUBE-NODEPORTS -p tcp -m comment --comment ref-etp/etp-local-lb:http -m tcp \
             --dport 30610 -j {XLB}; iptables-nft -t nat -F {XLB}; iptables-nft -t nat -X {XLB}"
        )),
        "{h}"
    );
}

#[test]
fn kube_mark_drop_users() {
    let rule =
        format!("-A {EXT} -m comment --comment \"ref-etp/etp-local-lb:http firewall\" -j KUBE-MARK-DROP");
    let text = inject(
        &etp_local(),
        "nat",
        &["KUBE-MARK-DROP"],
        &["-A KUBE-MARK-DROP -j MARK --set-xmark 0x8000/0x8000", &rule],
    );
    let h = only(&audit(&node(IptablesBackend::Nft, &text))).clone();
    assert_eq!(h.kind, HazardKind::ObsoleteRule);
    assert_eq!(h.rule.as_deref(), Some(rule.as_str()));
    assert!(h.why.contains("loadBalancerSourceRanges"), "{h}");
    assert_eq!(
        h.fix,
        format!(
            "iptables-nft -t nat -D {EXT} -m comment --comment 'ref-etp/etp-local-lb:http firewall' -j KUBE-MARK-DROP"
        )
    );
}

#[test]
fn physdev_rule_shapes() {
    let rule = format!(
        "-A {SVC} -m comment --comment \"ref-etp/etp-local-lb:http\" -m physdev ! --physdev-is-in -j KUBE-MARK-MASQ"
    );
    let text = inject(&etp_local(), "nat", &[], &[&rule]);
    let h = only(&audit(&node(IptablesBackend::Nft, &text))).clone();
    assert_eq!(h.kind, HazardKind::ObsoleteRule);
    assert!(h.why.contains("br_netfilter"), "{h}");
    assert_eq!(
        h.fix,
        format!(
            "iptables-nft -t nat -D {SVC} -m comment --comment ref-etp/etp-local-lb:http -m physdev ! --physdev-is-in \
             -j KUBE-MARK-MASQ"
        )
    );
}

#[test]
fn jumps_to_chains_that_do_not_exist() {
    let rule = "-A KUBE-SERVICES -d 10.96.9.9/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-ZZZZZZZZZZZZZZZZ";
    let text = inject(&etp_local(), "nat", &[], &[rule]);
    let h = only(&audit(&node(IptablesBackend::Unknown, &text))).clone();
    assert_eq!(h.kind, HazardKind::DanglingJump);
    assert_eq!(h.location, "IPv4 nat/KUBE-SERVICES");
    assert_eq!(
        h.fix,
        "iptables -t nat -D KUBE-SERVICES -d 10.96.9.9/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-ZZZZZZZZZZZZZZZZ"
    );
}

#[test]
fn kube_state_in_both_backends() {
    let state = NodeNetfilter {
        iptables: vec![
            dump(
                IptablesBackend::Legacy,
                &read("upstream-v1.30.3-iptables", "etp-local"),
            ),
            dump(IptablesBackend::Nft, &etp_local()),
        ],
        nft_tables: Vec::new(),
    };
    let h = only(&audit(&state)).clone();
    assert_eq!(h.kind, HazardKind::SplitBackends);
    assert_eq!(h.location, "IPv4 legacy and nf_tables");
    assert!(h.fix.contains("svcproxy cleanup"), "{h}");
    // Both dumps are kube-proxy's, and each carries its canary.
    assert!(
        h.why.ends_with(
            "Marks of who wrote each side: legacy: kube-proxy (its KUBE-PROXY-CANARY chain). nf_tables: \
             kube-proxy (its KUBE-PROXY-CANARY chain)."
        ),
        "{h}"
    );

    // svcproxy's seal and kubelet's markers are named too: here kubelet writes legacy and svcproxy nf_tables,
    // the skew that leaves a proxy and kubelet on different backends.
    let legacy = inject(
        &read("upstream-v1.30.3-iptables", "etp-local"),
        "mangle",
        &["KUBE-IPTABLES-HINT"],
        &[],
    );
    let sealed = inject(&etp_local(), "filter", &["SVCPROXY-SEAL"], &[]);
    let state = NodeNetfilter {
        iptables: vec![
            dump(IptablesBackend::Legacy, &legacy),
            dump(IptablesBackend::Nft, &sealed),
        ],
        nft_tables: Vec::new(),
    };
    let h = only(&audit(&state)).clone();
    assert!(
        h.why.ends_with(
            "Marks of who wrote each side: legacy: kube-proxy (its KUBE-PROXY-CANARY chain), kubelet (its \
             marker chains). nf_tables: svcproxy (its SVCPROXY-SEAL chain), kube-proxy (its KUBE-PROXY-CANARY \
             chain)."
        ),
        "{h}"
    );

    // kubelet's own chains in the other backend are no proxy state.
    let kubelet = "*filter\n:INPUT ACCEPT [0:0]\n:KUBE-FIREWALL - [0:0]\n:KUBE-KUBELET-CANARY - [0:0]\n\
                   -A INPUT -j KUBE-FIREWALL\nCOMMIT\n";
    let state = NodeNetfilter {
        iptables: vec![
            dump(IptablesBackend::Legacy, kubelet),
            dump(IptablesBackend::Nft, &etp_local()),
        ],
        nft_tables: Vec::new(),
    };
    assert!(audit(&state).is_empty());
}

#[test]
fn iptables_chains_and_an_nftables_proxy_table_at_once() {
    let mut state = node(IptablesBackend::Nft, &etp_local());
    state.nft_tables =
        parse_nft_tables("table ip nat\ntable ip filter\ntable ip kube-proxy\ntable ip6 kube-proxy\n");
    let found = audit(&state);
    assert_eq!(found.len(), 2, "{found:#?}");
    assert!(found.iter().all(|h| h.kind == HazardKind::TwoModes));
    assert_eq!(found[0].location, "nftables table ip kube-proxy");
    assert!(
        found[0].fix.contains("`nft delete table ip kube-proxy`"),
        "{}",
        found[0]
    );

    // A node in nftables mode with only kubelet's iptables chains is clean.
    let kubelet =
        "*filter\n:INPUT ACCEPT [0:0]\n:KUBE-FIREWALL - [0:0]\n:KUBE-KUBELET-CANARY - [0:0]\nCOMMIT\n";
    let mut state = node(IptablesBackend::Nft, kubelet);
    state.nft_tables = vec![NftTable {
        family: "ip".into(),
        name: "kube-proxy".into(),
    }];
    assert!(audit(&state).is_empty());
}
