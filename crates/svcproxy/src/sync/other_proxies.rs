//! Another Service proxy's rules next to ours, in the other proxy mode: kube-proxy's nftables table while we
//! write iptables chains, or its KUBE-* iptables chains (or its nftables table) while we write our nftables
//! table. Packets pass through both, so the other rules keep redirecting Service traffic where no sync of
//! ours can see or repair them. At start svcproxy removes them after its first sync; this notices them coming
//! back, typically a kube-proxy DaemonSet that an upgrade tool put back on the node.

use svcproxy_model::IpFamily;

use crate::cleanup::present_nft_tables;
use crate::cli::ProxyMode;
use crate::exec::runner::Runner;

/// The chain every kube-proxy version's iptables mode hangs its Service rules from.
const KUBE_SERVICES: &str = "KUBE-SERVICES";

pub struct OtherProxies {
    runner: Box<dyn Runner>,
    family: IpFamily,
    /// The mode we run in; the other one is watched.
    mode: ProxyMode,
}

impl OtherProxies {
    pub fn new(runner: Box<dyn Runner>, family: IpFamily, mode: ProxyMode) -> Self {
        OtherProxies { runner, family, mode }
    }

    /// One sentence per finding, each with what to do.
    pub fn find(&self) -> Vec<String> {
        let (nft_family, iptables) = match self.family {
            IpFamily::V4 => ("ip", "iptables"),
            IpFamily::V6 => ("ip6", "ip6tables"),
        };
        let tables: &[&str] = match self.mode {
            ProxyMode::Iptables => &["kube-proxy", "svcproxy"],
            ProxyMode::Nftables => &["kube-proxy"],
        };
        let mut found: Vec<String> = present_nft_tables(self.runner.as_ref(), &[nft_family], tables)
            .unwrap_or_default()
            .into_iter()
            .map(|(family, name)| {
                format!(
                    "the nftables table {family} {name} (a Service proxy in nftables mode) exists next to \
                     svcproxy's rules: packets pass through both, and its rules keep redirecting Service traffic \
                     where svcproxy cannot see or repair them. Stop the proxy writing it (a kube-proxy DaemonSet \
                     put back?), then run `nft delete table {family} {name}` or restart svcproxy, which removes \
                     it after its first sync"
                )
            })
            .collect();
        if self.mode == ProxyMode::Nftables {
            for backend in ["nft", "legacy"] {
                if self.has_kube_services(iptables, backend) {
                    found.push(format!(
                        "kube-proxy's iptables chains (nat/{KUBE_SERVICES} in the {backend} backend) exist next to \
                         svcproxy's nftables table: packets pass through both, and those rules keep redirecting \
                         Service traffic where svcproxy cannot see or repair them. Stop the kube-proxy writing \
                         them (its DaemonSet put back?), then restart svcproxy, which removes them after its \
                         first sync"
                    ));
                }
            }
        }
        found
    }

    /// Whether nat/KUBE-SERVICES exists in one iptables backend (not installed or no such chain: no). The
    /// nf_tables backend is asked for the chain alone; the legacy one through a plain `-save`, which lists only
    /// the tables already in the kernel: naming the nat table would load the legacy nat module on a node that
    /// never used it.
    fn has_kube_services(&self, iptables: &str, backend: &str) -> bool {
        if backend == "nft" {
            let args = ["-w", "5", "-t", "nat", "-S", KUBE_SERVICES];
            return self.runner.run(&format!("{iptables}-nft"), &args, None).is_ok();
        }
        let Ok(dump) = self.runner.run(&format!("{iptables}-legacy-save"), &[], None) else {
            return false;
        };
        let declared = format!(":{KUBE_SERVICES} ");
        let mut in_nat = false;
        dump.lines().any(|l| {
            if let Some(table) = l.strip_prefix('*') {
                in_nat = table == "nat";
            }
            in_nat && l.starts_with(&declared)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::iptables::ExecError;
    use crate::exec::runner::RecordingRunner;

    fn absent() -> ExecError {
        RecordingRunner::absent()
    }

    #[test]
    fn iptables_mode_watches_the_nftables_tables_of_its_family() {
        let r = RecordingRunner::default();
        r.answer("nft list table ip6 kube-proxy", Ok(String::new()));
        r.answer("nft list table", Err(absent()));
        let found = OtherProxies::new(Box::new(r.clone()), IpFamily::V6, ProxyMode::Iptables).find();
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].contains("nft delete table ip6 kube-proxy"), "{found:?}");
        assert!(
            OtherProxies::new(Box::new(r), IpFamily::V4, ProxyMode::Iptables)
                .find()
                .is_empty()
        );
    }

    #[test]
    fn the_legacy_filter_table_alone_is_not_kube_proxys_nat() {
        let r = RecordingRunner::default();
        r.answer("nft list table", Err(absent()));
        r.answer(
            "iptables-legacy-save",
            Ok("*filter\n:KUBE-SERVICES - [0:0]\nCOMMIT\n".into()),
        );
        r.answer("iptables-nft", Err(absent()));
        assert!(
            OtherProxies::new(Box::new(r.clone()), IpFamily::V4, ProxyMode::Nftables)
                .find()
                .is_empty()
        );
        let calls = r.calls.lock().unwrap().clone();
        assert!(calls.contains(&"iptables-legacy-save".to_string()), "{calls:?}");
    }

    #[test]
    fn nftables_mode_watches_kube_services_in_both_backends() {
        let r = RecordingRunner::default();
        r.answer("nft list table", Err(absent()));
        r.answer(
            "iptables-legacy-save",
            Ok("*filter\n:KUBE-SERVICES - [0:0]\nCOMMIT\n*nat\n:KUBE-SERVICES - [0:0]\nCOMMIT\n".into()),
        );
        r.answer("iptables-nft", Err(absent()));
        let found = OtherProxies::new(Box::new(r), IpFamily::V4, ProxyMode::Nftables).find();
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].contains("nat/KUBE-SERVICES in the legacy backend"),
            "{found:?}"
        );
    }
}
