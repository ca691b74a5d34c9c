//! Handing the node back on the way out, in nftables mode. Our table is ours alone and no kube-proxy version
//! knows it, so whatever svcproxy leaves behind stays until someone deletes it. Stopped while no other proxy
//! serves the node (svcproxy removed before kube-proxy is back), it must stay: it is all that keeps the
//! node's Services working until the next proxy has synced. Stopped while another proxy's rules are already
//! in place (kube-proxy put back first, then svcproxy removed: a hand-back without a gap), it has nothing
//! left to do: the other proxy's nat rules decide first (see the nftables renderer's
//! `NAT_PRIORITY_AFTER_OTHERS`), and our filter checks would keep applying what we last knew, such as a
//! load balancer's old source ranges. Then it goes, in each family where the other proxy is.

use svcproxy_model::IpFamily;

use crate::cli::ProxyMode;
use crate::exec::runner::Runner;
use crate::sync::other_proxies::OtherProxies;

/// What stopping did with our table in one family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepAside {
    /// No other proxy serves the family: the table stays.
    Kept,
    /// Another proxy serves the family (`found` says which) and our table is gone.
    Removed { table: String, found: String },
    /// Another proxy serves the family, but deleting our table failed; it stays.
    Failed { table: String, error: String },
}

/// For each of `families`, removes our table `name` when another proxy's rules are in that family.
pub fn step_aside<R: Runner + Clone + 'static>(
    runner: &R,
    families: &[IpFamily],
    name: &str,
) -> Vec<StepAside> {
    families
        .iter()
        .map(|&family| {
            let found = OtherProxies::new(Box::new(runner.clone()), family, ProxyMode::Nftables).find();
            let Some(first) = found.into_iter().next() else {
                return StepAside::Kept;
            };
            let nft_family = match family {
                IpFamily::V4 => "ip",
                IpFamily::V6 => "ip6",
            };
            let table = format!("{nft_family} {name}");
            match runner.run("nft", &["delete", "table", nft_family, name], None) {
                Ok(_) => StepAside::Removed {
                    table,
                    // What the proxy is, without the advice for a running svcproxy that follows.
                    found: first.split(':').next().unwrap_or(&first).to_string(),
                },
                Err(e) => StepAside::Failed {
                    table,
                    error: e.to_string(),
                },
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::iptables::ExecError;
    use crate::exec::runner::RecordingRunner;

    fn absent() -> ExecError {
        RecordingRunner::absent()
    }

    fn deletions(r: &RecordingRunner) -> Vec<String> {
        let calls = r.calls.lock().unwrap();
        calls
            .iter()
            .filter(|c| c.starts_with("nft delete"))
            .cloned()
            .collect()
    }

    #[test]
    fn with_no_other_proxy_the_table_stays() {
        let r = RecordingRunner::default();
        r.answer("nft list table", Err(absent()));
        r.answer("iptables-nft", Err(absent()));
        r.answer("iptables-legacy-save", Ok(String::new()));
        let outcome = step_aside(&r, &[IpFamily::V4], "svcproxy");
        assert_eq!(outcome, [StepAside::Kept]);
        assert_eq!(deletions(&r), Vec::<String>::new());
    }

    #[test]
    fn next_to_kube_proxys_rules_the_table_of_that_family_goes() {
        let r = RecordingRunner::default();
        // kube-proxy's iptables chains in IPv4 only.
        r.answer(
            "iptables-nft -w 5 -t nat -S KUBE-SERVICES",
            Ok("-N KUBE-SERVICES\n".into()),
        );
        r.answer("ip6tables-nft", Err(absent()));
        r.answer("nft list table", Err(absent()));
        r.answer("ip6tables-legacy-save", Ok(String::new()));
        r.answer("iptables-legacy-save", Ok(String::new()));
        r.answer("nft delete table ip svcproxy", Ok(String::new()));
        let outcome = step_aside(&r, &[IpFamily::V4, IpFamily::V6], "svcproxy");
        assert!(
            matches!(&outcome[0], StepAside::Removed { table, found } if table == "ip svcproxy" && found.contains("KUBE-SERVICES")),
            "{outcome:?}"
        );
        assert_eq!(outcome[1], StepAside::Kept);
        assert_eq!(deletions(&r), ["nft delete table ip svcproxy"]);
    }

    #[test]
    fn a_failed_deletion_is_reported() {
        let r = RecordingRunner::default();
        r.answer("nft list table ip kube-proxy", Ok(String::new()));
        r.answer("nft list table", Err(absent()));
        r.answer("iptables-nft", Err(absent()));
        r.answer("iptables-legacy-save", Ok(String::new()));
        r.answer("nft delete table", Err(absent()));
        let outcome = step_aside(&r, &[IpFamily::V4], "svcproxy");
        assert!(
            matches!(&outcome[0], StepAside::Failed { table, .. } if table == "ip svcproxy"),
            "{outcome:?}"
        );
    }
}
