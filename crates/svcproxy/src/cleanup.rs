//! `svcproxy cleanup`: removes what any kube-proxy version or svcproxy left on this node, in both iptables
//! backends and both families, nftables tables, and the IPVS mode's leftovers that are visible. Idempotent:
//! a second run finds nothing and says so.

use svcproxy_iptables::cleanup::{cleanup_payload, plan_cleanup};
use svcproxy_iptables::save_parser::parse_save;

use svcproxy_model::IpFamily;

use crate::cli::ProxyMode;
use crate::exec::iptables::ExecError;
use crate::exec::runner::Runner;

/// nftables tables written by upstream's nftables mode and by us.
const NFT_TABLES: [&str; 2] = ["kube-proxy", "svcproxy"];
/// The chain old kubelets mark packets to drop with; still jumped to by their rules.
const KUBE_MARK_DROP: &str = "KUBE-MARK-DROP";
/// The dummy interface upstream's IPVS mode binds service addresses to.
const IPVS_INTERFACE: &str = "kube-ipvs0";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cleanup left work undone: {}", .0.join("; "))]
pub struct CleanupError(pub Vec<String>);

/// What one removal pass did and what it could not do.
#[derive(Default)]
struct Removal {
    done: Vec<String>,
    failed: Vec<String>,
}

impl Removal {
    fn finish(self) -> Result<Vec<String>, CleanupError> {
        if self.failed.is_empty() {
            Ok(self.done)
        } else {
            Err(CleanupError(self.failed))
        }
    }

    /// Every KUBE-* chain of one family in both iptables backends, except `keep`, and the rules jumping to
    /// them. `prefix` is `iptables` or `ip6tables`.
    fn iptables_chains(&mut self, runner: &dyn Runner, prefix: &str, keep: &[&str], dry_run: bool) {
        let family = if prefix == "iptables" { "IPv4" } else { "IPv6" };
        for backend in ["nft", "legacy"] {
            let save = format!("{prefix}-{backend}-save");
            let Ok(text) = runner.run(&save, &[], None) else {
                continue;
            };
            let saved = match parse_save(&text) {
                Ok(s) => s,
                Err(e) => {
                    self.failed.push(format!("cannot read {save} output: {e}"));
                    continue;
                }
            };
            let mut plan = plan_cleanup(&saved);
            for t in &mut plan {
                t.chains.retain(|c| !keep.contains(&c.as_str()));
                t.rules
                    .retain(|r| !r.jump.as_deref().is_some_and(|j| keep.contains(&j)));
            }
            plan.retain(|t| !t.is_empty());
            if plan.is_empty() {
                continue;
            }
            for t in &plan {
                for c in &t.chains {
                    self.done
                        .push(format!("{backend} {family} {}: chain {c}", t.table));
                }
                for r in &t.rules {
                    self.done
                        .push(format!("{backend} {family} {}: rule {}", t.table, r.line));
                }
            }
            if !dry_run {
                let restore = format!("{prefix}-{backend}-restore");
                if let Err(e) = runner.run(&restore, &["-w", "5", "--noflush"], Some(&cleanup_payload(&plan)))
                {
                    self.failed.push(e.to_string());
                }
            }
        }
    }

    /// What upstream's IPVS mode leaves: its dummy interface, which holds every ClusterIP, external and
    /// load-balancer address as a local address (so packets to them are delivered to the host instead of
    /// being forwarded), and its ipsets, destroyed after the iptables rules that matched on them are gone.
    fn ipvs_leftovers(&mut self, runner: &dyn Runner, dry_run: bool) {
        if runner.run("ip", &["link", "show", IPVS_INTERFACE], None).is_ok() {
            self.done.push(format!("IPVS: interface {IPVS_INTERFACE}"));
            if !dry_run && let Err(e) = runner.run("ip", &["link", "delete", IPVS_INTERFACE], None) {
                self.failed.push(e.to_string());
            }
        }
        if let Ok(sets) = runner.run("ipset", &["list", "-n"], None) {
            for set in sets.lines().map(str::trim).filter(|s| s.starts_with("KUBE-")) {
                self.done.push(format!("IPVS: ipset {set}"));
                if !dry_run && let Err(e) = runner.run("ipset", &["destroy", set], None) {
                    self.failed.push(e.to_string());
                }
            }
        }
    }

    /// The nftables tables named `names` in the families `families` (`ip`, `ip6`).
    fn nft_tables(&mut self, runner: &dyn Runner, families: &[&str], names: &[&str], dry_run: bool) {
        let Ok(present) = present_nft_tables(runner, families, names) else {
            return;
        };
        for (family, name) in present {
            self.done.push(format!("nftables: table {family} {name}"));
            if !dry_run && let Err(e) = runner.run("nft", &["delete", "table", family, name], None) {
                self.failed.push(e.to_string());
            }
        }
    }
}

/// Which of the tables `families` × `names` exist, asking for each by name; `Err` when nft cannot run.
///
/// Never `nft list tables`: nft 1.0 fetches every rule of every table to answer it, iptables-nft's included,
/// and the kernel's rule dump restarts from the top for each netlink message, so on a node with 200,000
/// KUBE-* rules that one listing costs seconds of CPU. Listing one table by name fetches only that table.
pub fn present_nft_tables<'a>(
    runner: &dyn Runner,
    families: &[&'a str],
    names: &[&'a str],
) -> Result<Vec<(&'a str, &'a str)>, ExecError> {
    let mut present = Vec::new();
    for family in families {
        for name in names {
            match runner.run("nft", &["list", "table", family, name], None) {
                Ok(_) => present.push((*family, *name)),
                Err(ExecError::Failed { .. }) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(present)
}

/// Removes everything; returns one line per removed item. `dry_run` only lists.
pub fn cleanup(runner: &dyn Runner, dry_run: bool) -> Result<Vec<String>, CleanupError> {
    let mut removal = Removal::default();
    for prefix in ["iptables", "ip6tables"] {
        removal.iptables_chains(runner, prefix, &[], dry_run);
    }
    removal.nft_tables(runner, &["ip", "ip6"], &NFT_TABLES, dry_run);
    removal.ipvs_leftovers(runner, dry_run);
    removal.finish()
}

/// Removes the other proxy modes' state in the families svcproxy serves, as upstream kube-proxy does when it
/// starts in a mode: in iptables mode the nftables tables (upstream's `kube-proxy`, and ours from an earlier
/// nftables run), in nftables mode every kube-proxy KUBE-* chain in both iptables backends, and in both the
/// IPVS mode's interface and ipsets. Packets meet both modes' rules, so stale ones would keep sending new
/// connections to endpoints that are gone.
///
/// Unlike upstream, the daemon runs this after its first sync has put its own rules in place, so no packet
/// meets neither. kubelet's chains stay, KUBE-MARK-DROP included: old kubelets still jump to it.
pub fn retire_other_mode(
    runner: &dyn Runner,
    mode: ProxyMode,
    families: &[IpFamily],
) -> Result<Vec<String>, CleanupError> {
    let mut removal = Removal::default();
    for family in families {
        let (nft_family, iptables) = match family {
            IpFamily::V4 => ("ip", "iptables"),
            IpFamily::V6 => ("ip6", "ip6tables"),
        };
        match mode {
            ProxyMode::Iptables => removal.nft_tables(runner, &[nft_family], &NFT_TABLES, false),
            ProxyMode::Nftables => removal.iptables_chains(runner, iptables, &[KUBE_MARK_DROP], false),
        }
    }
    removal.ipvs_leftovers(runner, false);
    removal.finish()
}

/// Lines that say what [`retire_other_mode`] removed, one per place (`nft IPv4 nat`, `nftables`, ...): its
/// items as they are where there are a few, counted by kind where there are many. Taking over from
/// kube-proxy's iptables mode at 5,000 Services removes 55,000 chains, a log line apiece otherwise.
pub fn summarize_removed(items: &[String]) -> Vec<String> {
    const LISTED: usize = 5;
    let mut places: Vec<(&str, Vec<&str>)> = Vec::new();
    for item in items {
        let (place, what) = item.split_once(": ").unwrap_or(("", item));
        match places.iter_mut().find(|(p, _)| *p == place) {
            Some((_, whats)) => whats.push(what),
            None => places.push((place, vec![what])),
        }
    }
    places
        .into_iter()
        .map(|(place, whats)| {
            let said = if whats.len() <= LISTED {
                whats.join(", ")
            } else {
                let mut kinds: Vec<(&str, usize)> = Vec::new();
                for what in &whats {
                    let kind = what.split_whitespace().next().unwrap_or(what);
                    match kinds.iter_mut().find(|(k, _)| *k == kind) {
                        Some((_, n)) => *n += 1,
                        None => kinds.push((kind, 1)),
                    }
                }
                kinds
                    .iter()
                    .map(|(kind, n)| format!("{n} {kind}{}", if *n == 1 { "" } else { "s" }))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            if place.is_empty() {
                said
            } else {
                format!("{place}: {said}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::runner::RecordingRunner;

    #[test]
    fn many_removals_are_counted_and_a_few_named() {
        let mut items: Vec<String> = (0..55_000)
            .map(|i| format!("nft IPv4 nat: chain KUBE-SEP-{i:016}"))
            .collect();
        items.push("nft IPv4 nat: rule -A PREROUTING -j KUBE-SERVICES".into());
        items.push("nft IPv4 filter: chain KUBE-FORWARD".into());
        items.push("nftables: table ip kube-proxy".into());
        assert_eq!(
            summarize_removed(&items),
            [
                "nft IPv4 nat: 55000 chains, 1 rule",
                "nft IPv4 filter: chain KUBE-FORWARD",
                "nftables: table ip kube-proxy",
            ]
        );
        assert!(summarize_removed(&[]).is_empty());
    }

    fn no_such_table() -> ExecError {
        ExecError::Failed {
            program: "nft".into(),
            status: "exit status: 1".into(),
            stderr: "Error: No such file or directory".into(),
        }
    }

    #[test]
    fn removes_iptables_nft_and_ipvs_leftovers() {
        let r = RecordingRunner::default();
        r.answer(
            "iptables-nft-save",
            Ok("*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n-A PREROUTING -j KUBE-SERVICES\nCOMMIT\n".into()),
        );
        r.answer("iptables-nft-restore", Ok(String::new()));
        r.answer("nft list table ip kube-proxy", Ok(String::new()));
        r.answer("nft list table ip6 svcproxy", Ok(String::new()));
        r.answer("nft list table", Err(no_such_table()));
        r.answer("nft delete", Ok(String::new()));
        r.answer("ipset list", Ok("KUBE-CLUSTER-IP\nmine\n".into()));
        r.answer("ipset destroy", Ok(String::new()));
        let done = cleanup(&r, false).unwrap();
        assert_eq!(
            done,
            [
                "nft IPv4 nat: chain KUBE-SERVICES",
                "nft IPv4 nat: rule -A PREROUTING -j KUBE-SERVICES",
                "nftables: table ip kube-proxy",
                "nftables: table ip6 svcproxy",
                "IPVS: ipset KUBE-CLUSTER-IP",
            ]
        );
        let calls = r.calls.lock().unwrap().clone();
        assert!(
            calls
                .iter()
                .any(|c| c.starts_with("iptables-nft-restore -w 5 --noflush <<*nat")),
            "{calls:?}"
        );
        assert!(calls.contains(&"nft delete table ip kube-proxy".to_string()));
        assert!(!calls.iter().any(|c| c.contains("ipset destroy mine")));
    }

    #[test]
    fn iptables_mode_retires_only_the_ipv4_nftables_tables() {
        let r = RecordingRunner::default();
        r.answer("nft list table ip kube-proxy", Ok(String::new()));
        r.answer("nft list table ip svcproxy", Ok(String::new()));
        r.answer("nft list table", Err(no_such_table()));
        r.answer("nft delete", Ok(String::new()));
        let done = retire_other_mode(&r, ProxyMode::Iptables, &[IpFamily::V4]).unwrap();
        assert_eq!(
            done,
            ["nftables: table ip kube-proxy", "nftables: table ip svcproxy"]
        );
        let calls = r.calls.lock().unwrap().clone();
        assert!(!calls.iter().any(|c| c.contains("iptables")), "{calls:?}");
    }

    #[test]
    fn nftables_mode_retires_kube_proxy_chains_but_keeps_kubelets() {
        let r = RecordingRunner::default();
        r.answer(
            "iptables-nft-save",
            Ok(
                "*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-MARK-DROP - [0:0]\n\
                :KUBE-KUBELET-CANARY - [0:0]\n-A PREROUTING -j KUBE-SERVICES\n\
                -A PREROUTING -s 192.0.2.1/32 -j KUBE-MARK-DROP\nCOMMIT\n"
                    .into(),
            ),
        );
        r.answer("iptables-nft-restore", Ok(String::new()));
        r.answer("nft list table ip kube-proxy", Ok(String::new()));
        let done = retire_other_mode(&r, ProxyMode::Nftables, &[IpFamily::V4]).unwrap();
        assert_eq!(
            done,
            [
                "nft IPv4 nat: chain KUBE-SERVICES",
                "nft IPv4 nat: rule -A PREROUTING -j KUBE-SERVICES",
            ]
        );
        let calls = r.calls.lock().unwrap().clone();
        assert!(!calls.iter().any(|c| c.starts_with("nft ")), "{calls:?}");
        assert!(!calls.iter().any(|c| c.starts_with("ip6tables")), "{calls:?}");
    }

    #[test]
    fn dry_run_changes_nothing() {
        let r = RecordingRunner::default();
        r.answer("nft list table ip kube-proxy", Ok(String::new()));
        r.answer("nft list table", Err(no_such_table()));
        assert_eq!(cleanup(&r, true).unwrap(), ["nftables: table ip kube-proxy"]);
        assert!(!r.calls.lock().unwrap().iter().any(|c| c.contains("delete")));
    }
}
