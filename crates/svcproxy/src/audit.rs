//! `svcproxy audit`: will this node break on the next sync or upgrade? Reads both iptables backends in both
//! families and the list of nftables tables, and reports the hazards [`svcproxy_iptables::audit`] finds, each
//! with its fix. Works on a node run by upstream kube-proxy as well as by svcproxy, and on saved dumps.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use svcproxy_iptables::audit::{
    Hazard, IptablesBackend, IptablesDump, NftTable, NodeNetfilter, PROXY_NFT_TABLES, audit,
};
use svcproxy_iptables::save_parser::{SaveParseError, parse_save};
use svcproxy_model::IpFamily;

use crate::cleanup::present_nft_tables;
use crate::exec::runner::Runner;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot parse {what}: {source}")]
    Parse { what: String, source: SaveParseError },
    #[error("found no iptables-save of either backend and no nft: nothing to audit")]
    NothingToRead,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HazardView {
    /// A stable label: `orphan_reference`, `dangling_jump`, `split_backends`, `two_modes`, `obsolete_rule`.
    pub kind: String,
    pub location: String,
    pub rule: Option<String>,
    pub why: String,
    pub fix: String,
    /// The fix as shell commands, in order, when it is that exact.
    pub commands: Vec<String>,
}

impl From<&Hazard> for HazardView {
    fn from(h: &Hazard) -> Self {
        HazardView {
            kind: h.kind.label().to_string(),
            location: h.location.clone(),
            rule: h.rule.clone(),
            why: h.why.clone(),
            fix: h.fix.clone(),
            commands: h.commands.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditReport {
    /// What was read (`iptables-nft-save`, the proxy nftables tables, a file, …).
    pub read: Vec<String>,
    /// What could not be read and why (a backend that is not installed, say).
    pub skipped: Vec<String>,
    pub clean: bool,
    pub hazards: Vec<HazardView>,
}

/// Reads the node: `{ip,ip6}tables-{nft,legacy}-save` where installed (plain `iptables-save` when neither
/// is), and which proxy nftables tables exist.
pub fn read_node(runner: &dyn Runner) -> Result<(NodeNetfilter, Vec<String>, Vec<String>), AuditError> {
    let mut node = NodeNetfilter::default();
    let mut read = Vec::new();
    let mut skipped = Vec::new();
    for (family, prefix) in [(IpFamily::V4, "iptables"), (IpFamily::V6, "ip6tables")] {
        let mut any = false;
        for (backend, suffix) in [(IptablesBackend::Nft, "nft"), (IptablesBackend::Legacy, "legacy")] {
            let save = format!("{prefix}-{suffix}-save");
            match runner.run(&save, &[], None) {
                Ok(text) => {
                    let saved = parse_save(&text).map_err(|source| AuditError::Parse {
                        what: format!("{save} output"),
                        source,
                    })?;
                    node.iptables.push(IptablesDump {
                        backend,
                        family,
                        command: format!("{prefix}-{suffix}"),
                        saved,
                    });
                    read.push(save);
                    any = true;
                }
                Err(e) => skipped.push(e.to_string()),
            }
        }
        if !any {
            // An iptables without the -nft/-legacy names: one backend, whichever it is.
            let save = format!("{prefix}-save");
            match runner.run(&save, &[], None) {
                Ok(text) => {
                    let saved = parse_save(&text).map_err(|source| AuditError::Parse {
                        what: format!("{save} output"),
                        source,
                    })?;
                    node.iptables.push(IptablesDump {
                        backend: IptablesBackend::Unknown,
                        family,
                        command: prefix.to_string(),
                        saved,
                    });
                    read.push(save);
                }
                Err(e) => skipped.push(e.to_string()),
            }
        }
    }
    match present_nft_tables(runner, &["ip", "ip6", "inet"], &PROXY_NFT_TABLES) {
        Ok(present) => {
            node.nft_tables = present
                .into_iter()
                .map(|(family, name)| NftTable {
                    family: family.to_string(),
                    name: name.to_string(),
                })
                .collect();
            read.push("nft list table (each proxy table by name)".to_string());
        }
        Err(e) => skipped.push(e.to_string()),
    }
    if read.is_empty() {
        return Err(AuditError::NothingToRead);
    }
    Ok((node, read, skipped))
}

/// Reads saved dumps instead of the node. The `# Generated by …` line, when present, tells the family and
/// the backend; fixes are spelled with the plain `iptables`/`ip6tables` command.
pub fn read_files(paths: &[PathBuf]) -> Result<NodeNetfilter, AuditError> {
    let mut node = NodeNetfilter::default();
    for path in paths {
        node.iptables.push(read_file(path)?);
    }
    Ok(node)
}

fn read_file(path: &Path) -> Result<IptablesDump, AuditError> {
    let text = std::fs::read_to_string(path).map_err(|source| AuditError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let header = text
        .lines()
        .find(|l| l.starts_with("# Generated by"))
        .unwrap_or("");
    let family = if header.contains("ip6tables") {
        IpFamily::V6
    } else {
        IpFamily::V4
    };
    let backend = if header.contains("(nf_tables)") {
        IptablesBackend::Nft
    } else if header.contains("(legacy)") {
        IptablesBackend::Legacy
    } else {
        IptablesBackend::Unknown
    };
    let saved = parse_save(&text).map_err(|source| AuditError::Parse {
        what: path.display().to_string(),
        source,
    })?;
    Ok(IptablesDump {
        backend,
        family,
        command: if family == IpFamily::V6 {
            "ip6tables"
        } else {
            "iptables"
        }
        .to_string(),
        saved,
    })
}

pub fn report(node: &NodeNetfilter, read: Vec<String>, skipped: Vec<String>) -> AuditReport {
    let hazards: Vec<HazardView> = audit(node).iter().map(HazardView::from).collect();
    AuditReport {
        read,
        skipped,
        clean: hazards.is_empty(),
        hazards,
    }
}

/// The human form: what was read, then each hazard with why and fix.
pub fn render_text(r: &AuditReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Read: {}", r.read.join(", "));
    if r.clean {
        let _ = writeln!(out, "No hazards found.");
        return out;
    }
    let n = r.hazards.len();
    let _ = writeln!(out, "{n} hazard{} found:", if n == 1 { "" } else { "s" });
    for (i, h) in r.hazards.iter().enumerate() {
        let _ = writeln!(out, "\n{}. [{}] {}", i + 1, h.kind, h.location);
        if let Some(rule) = &h.rule {
            let _ = writeln!(out, "   rule: {rule}");
        }
        let _ = writeln!(out, "   why:  {}", h.why);
        let _ = writeln!(out, "   fix:  {}", h.fix);
    }
    out
}

/// `svcproxy audit`: the given dumps, or this node.
pub fn command(runner: &dyn Runner, files: &[PathBuf]) -> Result<AuditReport, AuditError> {
    if files.is_empty() {
        let (node, read, skipped) = read_node(runner)?;
        return Ok(report(&node, read, skipped));
    }
    let node = read_files(files)?;
    let read = files.iter().map(|f| f.display().to_string()).collect();
    Ok(report(&node, read, Vec::new()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::runner::RecordingRunner;

    #[test]
    fn reads_every_installed_backend_and_nft() {
        let r = RecordingRunner::default();
        r.answer(
            "iptables-nft-save",
            Ok("*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n".into()),
        );
        r.answer("iptables-legacy-save", Ok(String::new()));
        r.answer("nft list table ip kube-proxy", Ok(String::new()));
        r.answer(
            "nft list table",
            Err(crate::exec::iptables::ExecError::Failed {
                program: "nft".into(),
                status: "exit status: 1".into(),
                stderr: "Error: No such file or directory".into(),
            }),
        );
        let (node, read, skipped) = read_node(&r).unwrap();
        assert_eq!(
            read,
            [
                "iptables-nft-save",
                "iptables-legacy-save",
                "nft list table (each proxy table by name)"
            ]
        );
        assert_eq!(
            node.nft_tables,
            [NftTable {
                family: "ip".into(),
                name: "kube-proxy".into()
            }]
        );
        assert_eq!(node.iptables.len(), 2);
        assert_eq!(node.iptables[0].command, "iptables-nft");
        assert!(
            skipped.iter().any(|s| s.contains("ip6tables-save")),
            "{skipped:?}"
        );
        assert!(report(&node, read, skipped).clean);
    }

    #[test]
    fn nothing_installed_is_an_error() {
        assert!(matches!(
            read_node(&RecordingRunner::default()),
            Err(AuditError::NothingToRead)
        ));
    }
}
