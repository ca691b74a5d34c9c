//! Handing the node back on the way out, in nftables mode. Our table is ours alone and no kube-proxy version
//! knows it, so whatever svcproxy leaves behind stays until someone deletes it. Stopped while no other proxy
//! serves the node (svcproxy removed before kube-proxy is back), it must stay: it is all that keeps the
//! node's Services working until the next proxy has synced. Stopped while another proxy's rules are already
//! in place (kube-proxy put back first, then svcproxy removed: a hand-back without a gap), it has nothing
//! left to do: the other proxy's nat rules decide first (see the nftables renderer's
//! `NAT_PRIORITY_AFTER_OTHERS`), and our filter checks would keep applying what we last knew, such as a
//! load balancer's old source ranges. Then it goes, in each family where the other proxy is, but only once
//! those rules serve every Service ours did (see [`crate::served_frontends`]): rules that are merely there may
//! be leftovers nobody keeps up, or a kube-proxy still writing its first sync, and handing a Service to rules
//! that do not know it would leave it with nothing. Such a hand-back waits a few seconds for them, then keeps
//! the table and says which Services the other rules lack.
//!
//! Where a Service is addressed is checked, not where the other rules send it: for a Service they know, their
//! nat rules decide before ours whether our table stays or not, so keeping it could not correct endpoints of
//! theirs gone stale; it only helps the Services they do not know at all.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use svcproxy_model::IpFamily;

use crate::cli::ProxyMode;
use crate::exec::runner::Runner;
use crate::served_frontends::{Frontend, served_by_others};
use crate::sync::other_proxies::OtherProxies;

/// What stopping did with our table in one family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepAside {
    /// No other proxy serves the family: the table stays.
    Kept,
    /// Another proxy's rules are there (`found` says whose) but do not serve every Service we do (`unserved`
    /// names some, `count` says how many): leftovers, or a proxy that has not synced yet. The table stays, so
    /// those Services keep working.
    Unserved {
        table: String,
        found: String,
        unserved: Vec<String>,
        count: usize,
    },
    /// Another proxy serves the family (`found` says which) and our table is gone.
    Removed { table: String, found: String },
    /// Another proxy serves the family, but deleting our table failed; it stays.
    Failed { table: String, error: String },
}

/// One family we stop in, and the Services we served there (by frontend, with their names).
pub type Served = (IpFamily, BTreeMap<Frontend, String>);

/// How many Services an [`StepAside::Unserved`] names.
const NAMED: usize = 5;

/// For each family, removes our table `name` when another proxy's rules are in that family and serve every
/// Service we served there.
pub fn step_aside<R: Runner + Clone + 'static>(
    runner: &R,
    families: &[Served],
    name: &str,
) -> Vec<StepAside> {
    families
        .iter()
        .map(|(family, ours)| {
            let found = OtherProxies::new(Box::new(runner.clone()), *family, ProxyMode::Nftables).find();
            let Some(first) = found.into_iter().next() else {
                return StepAside::Kept;
            };
            let nft_family = match family {
                IpFamily::V4 => "ip",
                IpFamily::V6 => "ip6",
            };
            let table = format!("{nft_family} {name}");
            // What the proxy is, without the advice for a running svcproxy that follows.
            let found = first.split(':').next().unwrap_or(&first).to_string();
            let served = served_by_others(runner, *family);
            let unserved: Vec<String> = ours
                .iter()
                .filter(|(frontend, _)| !served.contains(frontend))
                .map(|(frontend, spn)| format!("{spn} ({frontend})"))
                .collect();
            if !unserved.is_empty() {
                return StepAside::Unserved {
                    table,
                    found,
                    count: unserved.len(),
                    unserved: unserved.into_iter().take(NAMED).collect(),
                };
            }
            match runner.run("nft", &["delete", "table", nft_family, name], None) {
                Ok(_) => StepAside::Removed { table, found },
                Err(e) => StepAside::Failed {
                    table,
                    error: e.to_string(),
                },
            }
        })
        .collect()
}

/// [`step_aside`], asked again every `pause` for up to `patience` in the families where the other proxy does
/// not serve every Service yet: a kube-proxy put back moments ago may still be writing its first sync.
pub fn step_aside_once_served<R: Runner + Clone + 'static>(
    runner: &R,
    families: &[Served],
    name: &str,
    patience: Duration,
    pause: Duration,
) -> Vec<StepAside> {
    let until = Instant::now() + patience;
    let mut outcomes = step_aside(runner, families, name);
    loop {
        let waiting: Vec<usize> = (0..outcomes.len())
            .filter(|&i| matches!(outcomes[i], StepAside::Unserved { .. }))
            .collect();
        if waiting.is_empty() || Instant::now() + pause > until {
            return outcomes;
        }
        std::thread::sleep(pause);
        let again: Vec<Served> = waiting.iter().map(|&i| families[i].clone()).collect();
        for (i, outcome) in waiting.into_iter().zip(step_aside(runner, &again, name)) {
            outcomes[i] = outcome;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::iptables::ExecError;
    use crate::exec::runner::RecordingRunner;
    use crate::served_frontends::Frontend;

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

    /// The one Service we served: kube-dns's UDP port.
    fn ours() -> BTreeMap<Frontend, String> {
        let frontend = Frontend {
            ip: Some("10.96.0.10".parse().unwrap()),
            protocol: svcproxy_model::Protocol::Udp,
            port: 53,
        };
        BTreeMap::from([(frontend, "kube-system/kube-dns:dns".to_string())])
    }

    /// kube-proxy's nat `KUBE-SERVICES` as `iptables-save` prints it, with kube-dns's UDP port at each of `ips`.
    fn kube_proxy_serving(ips: &[&str]) -> String {
        let rules: String = ips
            .iter()
            .map(|ip| {
                format!("-A KUBE-SERVICES -d {ip}/32 -p udp -m udp --dport 53 -j KUBE-SVC-TCOU7JCQXEZGVUNU\n")
            })
            .collect();
        format!("*nat\n:KUBE-SERVICES - [0:0]\n{rules}COMMIT\n")
    }

    /// kube-proxy's chains are there but lack a Service we served (leftovers of an older cluster, or a
    /// kube-proxy still writing its first sync): the table stays, named with what is missing, and is asked
    /// about again until the patience runs out.
    #[test]
    fn next_to_rules_that_lack_one_of_our_services_the_table_stays() {
        let r = RecordingRunner::default();
        r.answer(
            "iptables-nft -w 5 -t nat -S KUBE-SERVICES",
            Ok("-N KUBE-SERVICES\n".into()),
        );
        r.answer("iptables-nft-save", Ok(kube_proxy_serving(&["10.96.0.11"])));
        r.answer("nft list table", Err(absent()));
        r.answer("iptables-legacy-save", Ok(String::new()));
        r.answer("nft delete table ip svcproxy", Ok(String::new()));
        let outcome = step_aside_once_served(
            &r,
            &[(IpFamily::V4, ours())],
            "svcproxy",
            Duration::from_millis(30),
            Duration::from_millis(10),
        );
        match &outcome[..] {
            [
                StepAside::Unserved {
                    table,
                    found,
                    unserved,
                    count,
                },
            ] => {
                assert_eq!(table, "ip svcproxy");
                assert!(found.contains("KUBE-SERVICES"), "{found}");
                assert_eq!(unserved, &["kube-system/kube-dns:dns (10.96.0.10:53/udp)"]);
                assert_eq!(*count, 1);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(deletions(&r), Vec::<String>::new());
        let asked = r
            .calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| *c == "iptables-nft-save")
            .count();
        assert!(asked >= 2, "asked again while patient: {asked}");
    }

    #[test]
    fn with_no_other_proxy_the_table_stays() {
        let r = RecordingRunner::default();
        r.answer("nft list table", Err(absent()));
        r.answer("iptables-nft", Err(absent()));
        r.answer("iptables-legacy-save", Ok(String::new()));
        let outcome = step_aside(&r, &[(IpFamily::V4, ours())], "svcproxy");
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
        r.answer("iptables-nft-save", Ok(kube_proxy_serving(&["10.96.0.10"])));
        r.answer("ip6tables-nft", Err(absent()));
        r.answer("nft list table", Err(absent()));
        r.answer("ip6tables-legacy-save", Ok(String::new()));
        r.answer("iptables-legacy-save", Ok(String::new()));
        r.answer("nft delete table ip svcproxy", Ok(String::new()));
        let outcome = step_aside(
            &r,
            &[(IpFamily::V4, ours()), (IpFamily::V6, BTreeMap::new())],
            "svcproxy",
        );
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
        let outcome = step_aside(&r, &[(IpFamily::V4, BTreeMap::new())], "svcproxy");
        assert!(
            matches!(&outcome[0], StepAside::Failed { table, .. } if table == "ip svcproxy"),
            "{outcome:?}"
        );
    }
}
