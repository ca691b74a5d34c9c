//! `svcproxy cleanup`: removes what any kube-proxy version or svcproxy left on this node, in both iptables
//! backends and both families, nftables tables, and the IPVS mode's leftovers that are visible. Idempotent:
//! a second run finds nothing and says so.

use svcproxy_iptables::cleanup::{cleanup_payload, plan_cleanup};
use svcproxy_iptables::save_parser::parse_save;

use crate::exec::runner::Runner;

/// nftables tables written by upstream's nftables mode and by us.
const NFT_TABLES: [&str; 2] = ["kube-proxy", "svcproxy"];
/// The dummy interface upstream's IPVS mode binds service addresses to.
const IPVS_INTERFACE: &str = "kube-ipvs0";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cleanup left work undone: {}", .0.join("; "))]
pub struct CleanupError(pub Vec<String>);

/// Removes everything; returns one line per removed item. `dry_run` only lists.
pub fn cleanup(runner: &dyn Runner, dry_run: bool) -> Result<Vec<String>, CleanupError> {
    let mut done = Vec::new();
    let mut failed = Vec::new();
    for (family, prefix) in [("IPv4", "iptables"), ("IPv6", "ip6tables")] {
        for backend in ["nft", "legacy"] {
            let save = format!("{prefix}-{backend}-save");
            let Ok(text) = runner.run(&save, &[], None) else {
                continue;
            };
            let saved = match parse_save(&text) {
                Ok(s) => s,
                Err(e) => {
                    failed.push(format!("cannot read {save} output: {e}"));
                    continue;
                }
            };
            let plan = plan_cleanup(&saved);
            if plan.is_empty() {
                continue;
            }
            for t in &plan {
                for c in &t.chains {
                    done.push(format!("{backend} {family} {}: chain {c}", t.table));
                }
                for r in &t.rules {
                    done.push(format!("{backend} {family} {}: rule {}", t.table, r.line));
                }
            }
            if !dry_run {
                let restore = format!("{prefix}-{backend}-restore");
                if let Err(e) = runner.run(&restore, &["-w", "5", "--noflush"], Some(&cleanup_payload(&plan)))
                {
                    failed.push(e.to_string());
                }
            }
        }
    }

    if let Ok(listing) = runner.run("nft", &["list", "tables"], None) {
        for line in listing.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            if let ["table", family, name] = words.as_slice()
                && NFT_TABLES.contains(name)
            {
                done.push(format!("nftables: table {family} {name}"));
                if !dry_run && let Err(e) = runner.run("nft", &["delete", "table", family, name], None) {
                    failed.push(e.to_string());
                }
            }
        }
    }

    if runner.run("ip", &["link", "show", IPVS_INTERFACE], None).is_ok() {
        done.push(format!("IPVS: interface {IPVS_INTERFACE}"));
        if !dry_run && let Err(e) = runner.run("ip", &["link", "delete", IPVS_INTERFACE], None) {
            failed.push(e.to_string());
        }
    }
    // IPVS mode's ipsets; destroyed after the iptables rules that matched on them are gone.
    if let Ok(sets) = runner.run("ipset", &["list", "-n"], None) {
        for set in sets.lines().map(str::trim).filter(|s| s.starts_with("KUBE-")) {
            done.push(format!("IPVS: ipset {set}"));
            if !dry_run && let Err(e) = runner.run("ipset", &["destroy", set], None) {
                failed.push(e.to_string());
            }
        }
    }
    if failed.is_empty() {
        Ok(done)
    } else {
        Err(CleanupError(failed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::runner::RecordingRunner;

    #[test]
    fn removes_iptables_nft_and_ipvs_leftovers() {
        let r = RecordingRunner::default();
        r.answer(
            "iptables-nft-save",
            Ok("*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n-A PREROUTING -j KUBE-SERVICES\nCOMMIT\n".into()),
        );
        r.answer("iptables-nft-restore", Ok(String::new()));
        r.answer(
            "nft list tables",
            Ok("table ip filter\ntable ip kube-proxy\ntable ip6 svcproxy\n".into()),
        );
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
    fn dry_run_changes_nothing() {
        let r = RecordingRunner::default();
        r.answer("nft list tables", Ok("table ip kube-proxy\n".into()));
        assert_eq!(cleanup(&r, true).unwrap(), ["nftables: table ip kube-proxy"]);
        assert!(!r.calls.lock().unwrap().iter().any(|c| c.contains("delete")));
    }
}
