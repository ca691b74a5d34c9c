//! The two iptables backends (legacy x_tables and nf_tables) on one node. Packets pass through both, so KUBE-*
//! rules in the backend we do not write keep acting on traffic and we can neither see nor repair them.

use std::process::Command;

use svcproxy_model::IpFamily;

use crate::cli::{IptablesBackendChoice, ProxyMode, RunArgs};
use crate::exec::iptables::{ExecError, IptablesCommands, SystemIptables};
use crate::exec::runner::Runner;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Legacy,
    Nft,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Legacy => "legacy",
            Backend::Nft => "nf_tables",
        }
    }

    pub fn other(self) -> Backend {
        match self {
            Backend::Legacy => Backend::Nft,
            Backend::Nft => Backend::Legacy,
        }
    }

    /// The binaries' suffix: `iptables-nft-restore`, `ip6tables-legacy-save`, …
    fn suffix(self) -> &'static str {
        match self {
            Backend::Legacy => "legacy",
            Backend::Nft => "nft",
        }
    }

    /// This backend's own binaries for `family`. Plain `iptables-restore` is whichever backend the image's
    /// alternatives point at, which need not be the one kubelet writes.
    pub fn family_commands(self, family: IpFamily) -> SystemIptables {
        let (prefix, suffix) = (family_prefix(family), self.suffix());
        SystemIptables::with_binaries(
            format!("{prefix}-{suffix}-restore"),
            format!("{prefix}-{suffix}-save"),
            format!("{prefix}-{suffix}"),
        )
    }

    /// This backend's `iptables-save` for `family`: `ip6tables-nft-save`, …
    pub fn save_binary(self, family: IpFamily) -> String {
        format!("{}-{}-save", family_prefix(family), self.suffix())
    }

    /// The commands of this backend for IPv4 (`iptables-legacy-save` …), when installed.
    pub fn commands(self) -> Option<SystemIptables> {
        let probe = format!("iptables-{}-save", self.suffix());
        Command::new(&probe)
            .arg("--version")
            .output()
            .ok()
            .filter(|o| o.status.success())?;
        Some(self.family_commands(IpFamily::V4))
    }
}

fn family_prefix(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "iptables",
        IpFamily::V6 => "ip6tables",
    }
}

/// The chains kubelet creates in the mangle table of the backend it writes, for other components to find.
const KUBELET_MARKERS: [&str; 2] = ["KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY"];

/// The backend svcproxy writes in iptables mode, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub backend: Backend,
    pub reason: String,
}

/// Picks the backend for `--iptables-backend`. `auto` looks for kubelet's marker chains in the mangle table:
/// nf_tables first (IPv4, then IPv6), then legacy, and takes nf_tables when neither backend has them (current
/// distributions' default). Writing where kubelet writes keeps its `KUBE-FIREWALL` and our chains in one
/// backend, which the mixed-backend check at start requires.
pub fn choose(choice: IptablesBackendChoice, runner: &dyn Runner) -> Choice {
    let explicit = |backend| Choice {
        backend,
        reason: "set by --iptables-backend".into(),
    };
    match choice {
        IptablesBackendChoice::Nft => return explicit(Backend::Nft),
        IptablesBackendChoice::Legacy => return explicit(Backend::Legacy),
        IptablesBackendChoice::Auto => {}
    }
    for backend in [Backend::Nft, Backend::Legacy] {
        for family in [IpFamily::V4, IpFamily::V6] {
            let save = backend.save_binary(family);
            // A missing binary or a family the kernel lacks is no marker: look on.
            let Ok(text) = runner.run(&save, &["-t", "mangle"], None) else {
                continue;
            };
            if let Some(marker) = text.lines().find_map(|l| {
                let name = l.strip_prefix(':')?.split_whitespace().next()?;
                KUBELET_MARKERS.contains(&name).then_some(name)
            }) {
                return Choice {
                    backend,
                    reason: format!("kubelet's {marker} chain is in {save}'s mangle table"),
                };
            }
        }
    }
    Choice {
        backend: Backend::Nft,
        reason: "no kubelet marker chain in either backend; nf_tables is the default".into(),
    }
}

/// The backend the daemon configured by `run` writes: [`choose`]'s in iptables mode. nftables mode writes no
/// iptables backend; the answer is then nf_tables and nothing is read.
pub fn for_args(run: &RunArgs, runner: &dyn Runner) -> Backend {
    match run.proxy_mode {
        ProxyMode::Iptables => choose(run.iptables_backend, runner).backend,
        ProxyMode::Nftables => Backend::Nft,
    }
}

/// KUBE-* chains in every table of a backend, except kubelet's markers (which only say which backend kubelet
/// picked).
pub fn kube_chains(cmds: &dyn IptablesCommands) -> Result<Vec<String>, ExecError> {
    let text = cmds.save(&[])?;
    let mut table = String::new();
    let mut out = Vec::new();
    for line in text.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t.to_string();
        } else if let Some(decl) = line.strip_prefix(':')
            && let Some(name) = decl.split_whitespace().next()
            && name.starts_with("KUBE-")
            && !matches!(name, "KUBE-KUBELET-CANARY" | "KUBE-IPTABLES-HINT")
        {
            out.push(format!("{table}/{name}"));
        }
    }
    Ok(out)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "KUBE-* chains exist in both iptables backends: {ours_name} (which svcproxy writes) has {ours} and {theirs_name} has {theirs}. \
     Packets pass through both, so the {theirs_name} rules would keep redirecting traffic where svcproxy cannot see or repair them. \
     Fix: make every component on this node use the {ours_name} backend, then remove the leftovers with `svcproxy cleanup`."
)]
pub struct MixedBackends {
    pub ours_name: &'static str,
    pub theirs_name: &'static str,
    pub ours: String,
    pub theirs: String,
}

fn summary(chains: &[String]) -> String {
    let shown: Vec<&str> = chains.iter().take(4).map(String::as_str).collect();
    let more = chains.len().saturating_sub(shown.len());
    if more > 0 {
        format!("{} and {more} more", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

/// Refuses a node whose other backend holds KUBE-* state while ours does too.
pub fn check_mixed(
    ours: Backend,
    ours_chains: &[String],
    theirs_chains: &[String],
) -> Result<(), MixedBackends> {
    if ours_chains.is_empty() || theirs_chains.is_empty() {
        return Ok(());
    }
    Err(MixedBackends {
        ours_name: ours.name(),
        theirs_name: ours.other().name(),
        ours: summary(ours_chains),
        theirs: summary(theirs_chains),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::runner::RecordingRunner;

    const HINT: &str = "*mangle\n:PREROUTING ACCEPT [0:0]\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n";
    const CANARY: &str = "*mangle\n:KUBE-KUBELET-CANARY - [0:0]\nCOMMIT\n";
    const EMPTY: &str = "*mangle\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n";

    /// A node whose four mangle tables read as given (`None`: the save fails, as when not installed).
    fn node(
        nft4: Option<&str>,
        nft6: Option<&str>,
        legacy4: Option<&str>,
        legacy6: Option<&str>,
    ) -> RecordingRunner {
        let r = RecordingRunner::default();
        for (program, text) in [
            ("iptables-nft-save", nft4),
            ("ip6tables-nft-save", nft6),
            ("iptables-legacy-save", legacy4),
            ("ip6tables-legacy-save", legacy6),
        ] {
            let answer = text.map(str::to_string).ok_or_else(|| ExecError::Spawn {
                program: program.into(),
                reason: "No such file or directory".into(),
            });
            r.answer(&format!("{program} -t mangle"), answer);
        }
        r
    }

    fn auto(r: &RecordingRunner) -> Choice {
        choose(IptablesBackendChoice::Auto, r)
    }

    #[test]
    fn marker_only_in_nft_picks_nft_without_reading_legacy() {
        let r = node(Some(HINT), Some(EMPTY), Some(EMPTY), Some(EMPTY));
        let c = auto(&r);
        assert_eq!(c.backend, Backend::Nft);
        assert!(
            c.reason.contains("KUBE-IPTABLES-HINT") && c.reason.contains("iptables-nft-save"),
            "{c:?}"
        );
        assert_eq!(*r.calls.lock().unwrap(), ["iptables-nft-save -t mangle"]);
    }

    #[test]
    fn marker_only_in_legacy_picks_legacy() {
        let r = node(Some(EMPTY), Some(EMPTY), Some(CANARY), Some(EMPTY));
        let c = auto(&r);
        assert_eq!(c.backend, Backend::Legacy);
        assert!(
            c.reason.contains("KUBE-KUBELET-CANARY") && c.reason.contains("iptables-legacy-save"),
            "{c:?}"
        );
    }

    #[test]
    fn markers_in_both_backends_pick_nft() {
        let r = node(Some(CANARY), Some(EMPTY), Some(HINT), Some(EMPTY));
        assert_eq!(auto(&r).backend, Backend::Nft);
    }

    #[test]
    fn no_marker_anywhere_defaults_to_nft() {
        let r = node(Some(EMPTY), Some(EMPTY), Some(EMPTY), Some(EMPTY));
        let c = auto(&r);
        assert_eq!(c.backend, Backend::Nft);
        assert!(c.reason.contains("default"), "{c:?}");
        // Every place kubelet could have marked was looked at, nf_tables first.
        assert_eq!(
            *r.calls.lock().unwrap(),
            [
                "iptables-nft-save -t mangle",
                "ip6tables-nft-save -t mangle",
                "iptables-legacy-save -t mangle",
                "ip6tables-legacy-save -t mangle",
            ]
        );
    }

    #[test]
    fn an_ipv6_only_marker_counts() {
        let r = node(Some(EMPTY), Some(EMPTY), Some(EMPTY), Some(HINT));
        let c = auto(&r);
        assert_eq!(c.backend, Backend::Legacy);
        assert!(c.reason.contains("ip6tables-legacy-save"), "{c:?}");
    }

    #[test]
    fn missing_binaries_are_no_marker() {
        let r = node(None, None, Some(HINT), None);
        assert_eq!(auto(&r).backend, Backend::Legacy);
        let r = node(None, None, None, None);
        assert_eq!(auto(&r).backend, Backend::Nft);
    }

    #[test]
    fn markers_must_be_chains_not_mentions() {
        // A rule's comment naming the marker is not kubelet's chain.
        let r = node(
            Some("*mangle\n-A PREROUTING -m comment --comment KUBE-IPTABLES-HINT -j ACCEPT\nCOMMIT\n"),
            Some(EMPTY),
            Some(HINT),
            Some(EMPTY),
        );
        assert_eq!(auto(&r).backend, Backend::Legacy);
    }

    #[test]
    fn an_explicit_backend_reads_nothing() {
        let r = node(Some(HINT), Some(HINT), Some(HINT), Some(HINT));
        assert_eq!(choose(IptablesBackendChoice::Legacy, &r).backend, Backend::Legacy);
        assert_eq!(choose(IptablesBackendChoice::Nft, &r).backend, Backend::Nft);
        assert!(r.calls.lock().unwrap().is_empty());
    }

    #[test]
    fn family_commands_name_the_backends_binaries() {
        let text = format!("{:?}", Backend::Legacy.family_commands(IpFamily::V6));
        assert!(
            text.contains("\"ip6tables-legacy-restore\"")
                && text.contains("\"ip6tables-legacy-save\"")
                && text.contains("\"ip6tables-legacy\""),
            "{text}"
        );
    }

    #[test]
    fn refuses_only_when_both_hold_kube_chains() {
        let some = vec!["nat/KUBE-SERVICES".to_string()];
        assert!(check_mixed(Backend::Nft, &some, &[]).is_ok());
        assert!(check_mixed(Backend::Nft, &[], &some).is_ok());
        let err = check_mixed(Backend::Nft, &some, &some).unwrap_err().to_string();
        assert!(
            err.contains("nf_tables (which svcproxy writes)") && err.contains("legacy has nat/KUBE-SERVICES"),
            "{err}"
        );
        assert!(err.contains("svcproxy cleanup"), "{err}");
    }
}
