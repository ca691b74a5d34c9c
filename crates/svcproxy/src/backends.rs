//! The two iptables backends (legacy x_tables and nf_tables) on one node. Packets pass through both, so KUBE-*
//! rules in the backend we do not write keep acting on traffic and we can neither see nor repair them.

use std::process::Command;

use crate::exec::iptables::{ExecError, IptablesCommands, SystemIptables};

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

    /// The commands of this backend for IPv4 (`iptables-legacy-save` …), when installed.
    pub fn commands(self) -> Option<SystemIptables> {
        let suffix = match self {
            Backend::Legacy => "legacy",
            Backend::Nft => "nft",
        };
        let probe = format!("iptables-{suffix}-save");
        Command::new(&probe)
            .arg("--version")
            .output()
            .ok()
            .filter(|o| o.status.success())?;
        Some(SystemIptables::with_binaries(
            format!("iptables-{suffix}-restore"),
            probe,
            format!("iptables-{suffix}"),
        ))
    }
}

/// Which backend plain `iptables` (the one we write with) uses, from its version line.
pub fn active_backend() -> Result<Backend, ExecError> {
    let out = Command::new("iptables")
        .arg("--version")
        .output()
        .map_err(|e| ExecError::Spawn {
            program: "iptables".into(),
            reason: e.to_string(),
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(if text.contains("legacy") {
        Backend::Legacy
    } else {
        Backend::Nft
    })
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
