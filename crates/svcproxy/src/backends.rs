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

    /// This backend's `iptables` for `family`: `ip6tables-nft`, …
    pub fn binary(self, family: IpFamily) -> String {
        format!("{}-{}", family_prefix(family), self.suffix())
    }

    /// Whether this backend's IPv4 `iptables-restore` runs.
    pub fn installed(self, runner: &dyn Runner) -> bool {
        let restore = format!("{}-restore", self.binary(IpFamily::V4));
        runner.run(&restore, &["--version"], None).is_ok()
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
    // Each marker is asked for by name (`iptables-nft -t mangle -S KUBE-IPTABLES-HINT`): iptables-nft-save
    // fetches the whole family's ruleset whatever table it is asked for, 1.3 s next to 50,000 NAT chains,
    // which a restart onto rules already in place would spend before anything else.
    for backend in [Backend::Nft, Backend::Legacy] {
        for family in [IpFamily::V4, IpFamily::V6] {
            let program = backend.binary(family);
            for marker in KUBELET_MARKERS {
                // A missing chain, binary or family fails alike: no marker, look on.
                if runner
                    .run(&program, &["-t", "mangle", "-S", marker], None)
                    .is_ok()
                {
                    return Choice {
                        backend,
                        reason: format!("kubelet's {marker} chain is in {program}'s mangle table"),
                    };
                }
            }
        }
    }
    // An image with only one backend's binaries (a distribution's legacy-only iptables, say) takes that one:
    // writing nf_tables there would fail every sync.
    if !Backend::Nft.installed(runner) && Backend::Legacy.installed(runner) {
        return Choice {
            backend: Backend::Legacy,
            reason: "no kubelet marker chain in either backend, and only iptables-legacy is installed".into(),
        };
    }
    Choice {
        backend: Backend::Nft,
        reason: "no kubelet marker chain in either backend; nf_tables is the default".into(),
    }
}

/// Refuses a backend whose `iptables-restore` cannot run, naming it: every sync would fail otherwise, which a
/// start-up error says more plainly.
pub fn require_installed(backend: Backend, runner: &dyn Runner) -> Result<(), String> {
    if backend.installed(runner) {
        return Ok(());
    }
    let restore = format!("{}-restore", backend.binary(IpFamily::V4));
    Err(format!(
        "the {} iptables backend cannot be written: `{restore} --version` does not run (install the iptables \
         package, or choose the installed backend with --iptables-backend)",
        backend.name()
    ))
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

    const HINT: &[&str] = &["KUBE-IPTABLES-HINT"];
    const CANARY: &[&str] = &["KUBE-KUBELET-CANARY"];
    const NONE: &[&str] = &[];

    /// A node whose four mangle tables hold the given marker chains (`None`: the binary is not installed).
    /// Asking for any other chain fails, as `iptables -S` of a missing chain does.
    fn node(
        nft4: Option<&[&str]>,
        nft6: Option<&[&str]>,
        legacy4: Option<&[&str]>,
        legacy6: Option<&[&str]>,
    ) -> RecordingRunner {
        let r = RecordingRunner::default();
        for (program, chains) in [
            ("iptables-nft", nft4),
            ("ip6tables-nft", nft6),
            ("iptables-legacy", legacy4),
            ("ip6tables-legacy", legacy6),
        ] {
            if chains.is_some() {
                r.answer(&format!("{program}-restore --version"), Ok("v1.8.9\n".into()));
            }
            for chain in chains.unwrap_or_default() {
                r.answer(
                    &format!("{program} -t mangle -S {chain}"),
                    Ok(format!("-N {chain}\n")),
                );
            }
        }
        r
    }

    fn auto(r: &RecordingRunner) -> Choice {
        choose(IptablesBackendChoice::Auto, r)
    }

    #[test]
    fn marker_only_in_nft_picks_nft_without_reading_legacy() {
        let r = node(Some(HINT), Some(NONE), Some(NONE), Some(NONE));
        let c = auto(&r);
        assert_eq!(c.backend, Backend::Nft);
        assert!(
            c.reason.contains("KUBE-IPTABLES-HINT") && c.reason.contains("iptables-nft"),
            "{c:?}"
        );
        assert_eq!(
            *r.calls.lock().unwrap(),
            ["iptables-nft -t mangle -S KUBE-IPTABLES-HINT"]
        );
    }

    #[test]
    fn marker_only_in_legacy_picks_legacy() {
        let r = node(Some(NONE), Some(NONE), Some(CANARY), Some(NONE));
        let c = auto(&r);
        assert_eq!(c.backend, Backend::Legacy);
        assert!(
            c.reason.contains("KUBE-KUBELET-CANARY") && c.reason.contains("iptables-legacy"),
            "{c:?}"
        );
    }

    #[test]
    fn markers_in_both_backends_pick_nft() {
        let r = node(Some(CANARY), Some(NONE), Some(HINT), Some(NONE));
        assert_eq!(auto(&r).backend, Backend::Nft);
    }

    #[test]
    fn no_marker_anywhere_defaults_to_nft() {
        let r = node(Some(NONE), Some(NONE), Some(NONE), Some(NONE));
        let c = auto(&r);
        assert_eq!(c.backend, Backend::Nft);
        assert!(c.reason.contains("default"), "{c:?}");
        // Every place kubelet could have marked was asked for each marker by name, nf_tables first; no
        // table was listed whole.
        let calls: Vec<String> = (r.calls.lock().unwrap().iter())
            .filter(|c| !c.ends_with("--version"))
            .cloned()
            .collect();
        let programs: Vec<&str> = calls.iter().map(|c| c.split(' ').next().unwrap()).collect();
        assert_eq!(
            programs,
            [
                "iptables-nft",
                "iptables-nft",
                "ip6tables-nft",
                "ip6tables-nft",
                "iptables-legacy",
                "iptables-legacy",
                "ip6tables-legacy",
                "ip6tables-legacy",
            ]
        );
        assert!(
            calls.iter().all(|c| c.contains("-t mangle -S KUBE-")),
            "{calls:?}"
        );
    }

    #[test]
    fn an_ipv6_only_marker_counts() {
        let r = node(Some(NONE), Some(NONE), Some(NONE), Some(HINT));
        let c = auto(&r);
        assert_eq!(c.backend, Backend::Legacy);
        assert!(c.reason.contains("ip6tables-legacy"), "{c:?}");
    }

    #[test]
    fn missing_binaries_are_no_marker() {
        let r = node(None, None, Some(HINT), None);
        assert_eq!(auto(&r).backend, Backend::Legacy);
        let r = node(None, None, None, None);
        assert_eq!(auto(&r).backend, Backend::Nft);
    }

    #[test]
    fn with_no_marker_the_only_installed_backend_is_taken() {
        let r = node(None, None, Some(NONE), Some(NONE));
        let c = auto(&r);
        assert_eq!(c.backend, Backend::Legacy);
        assert!(c.reason.contains("only iptables-legacy"), "{c:?}");
        // Both installed: nf_tables, the default.
        let r = node(Some(NONE), None, Some(NONE), None);
        assert_eq!(auto(&r).backend, Backend::Nft);
    }

    #[test]
    fn a_backend_that_is_not_installed_is_refused_by_name() {
        let r = node(None, None, Some(NONE), None);
        let e = require_installed(Backend::Nft, &r).unwrap_err();
        assert!(
            e.contains("nf_tables") && e.contains("iptables-nft-restore"),
            "{e}"
        );
        assert_eq!(require_installed(Backend::Legacy, &r), Ok(()));
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
