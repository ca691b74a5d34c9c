//! The process's OOM score adjustment, written at start as kube-proxy writes its own (`--oom-score-adj`, the
//! configuration file's `oomScoreAdj`; -999 unless set). kube-proxy's DaemonSet asks for no resources, so the
//! kubelet makes its pod BestEffort and gives it 1000, first in line when the node runs out of memory;
//! kube-proxy lowers its own score so that the node's Service rules keep being kept. Run from that same
//! DaemonSet, svcproxy must do the same.
//!
//! The value is read first and written only when it differs: lowering it needs `CAP_SYS_RESOURCE`, which a
//! process already at the value has no need for. A failure is reported, not fatal, as in kube-proxy.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// kube-proxy's default (Kubernetes reserves -1000, never kill, for nothing but critical node daemons'
/// explicit choice; -999 puts the proxy just above them).
pub const DEFAULT_OOM_SCORE_ADJ: i32 = -999;

/// Where the kernel keeps this process's adjustment.
pub const OWN_OOM_SCORE_ADJ: &str = "/proc/self/oom_score_adj";

#[derive(Debug, thiserror::Error)]
pub enum OomScoreError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{} holds {content:?}, not an OOM score adjustment", path.display())]
    NotANumber { path: PathBuf, content: String },
    #[error("cannot write {value} to {} (lowering it needs CAP_SYS_RESOURCE): {source}", path.display())]
    Write {
        path: PathBuf,
        value: i32,
        source: io::Error,
    },
}

/// What setting the adjustment did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OomScoreApplied {
    /// It already held the value; nothing was written.
    Unchanged,
    /// It held `from` and now holds the value.
    Changed { from: i32 },
}

/// Makes the adjustment file at `path` hold `value` (`path` is [`OWN_OOM_SCORE_ADJ`] outside tests).
pub fn set_oom_score_adj(path: &Path, value: i32) -> Result<OomScoreApplied, OomScoreError> {
    let content = fs::read_to_string(path).map_err(|source| OomScoreError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let from: i32 = content.trim().parse().map_err(|_| OomScoreError::NotANumber {
        path: path.to_path_buf(),
        content: content.trim().to_string(),
    })?;
    if from == value {
        return Ok(OomScoreApplied::Unchanged);
    }
    fs::write(path, value.to_string()).map_err(|source| OomScoreError::Write {
        path: path.to_path_buf(),
        value,
        source,
    })?;
    Ok(OomScoreApplied::Changed { from })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch file holding `content`, named after the test so that tests running at once do not share it.
    fn scratch(test: &str, content: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("svcproxy-oom-{test}-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("oom_score_adj");
        fs::write(&path, content).unwrap();
        path
    }

    #[test]
    fn a_different_value_is_written_and_the_old_one_reported() {
        let path = scratch("changed", "1000\n");
        assert_eq!(
            set_oom_score_adj(&path, -999).unwrap(),
            OomScoreApplied::Changed { from: 1000 }
        );
        assert_eq!(fs::read_to_string(&path).unwrap(), "-999");
    }

    #[test]
    fn the_value_already_there_is_not_written_again() {
        let path = scratch("unchanged", "-999\n");
        assert_eq!(
            set_oom_score_adj(&path, -999).unwrap(),
            OomScoreApplied::Unchanged
        );
        // A write would have left "-999" without the kernel's newline.
        assert_eq!(fs::read_to_string(&path).unwrap(), "-999\n");
    }

    #[test]
    fn what_cannot_be_read_or_parsed_is_an_error_naming_the_file() {
        let path = scratch("unparsable", "lots\n");
        let err = set_oom_score_adj(&path, -999).unwrap_err().to_string();
        assert!(err.contains("oom_score_adj") && err.contains("\"lots\""), "{err}");
        let missing = path.with_file_name("absent");
        assert!(matches!(
            set_oom_score_adj(&missing, -999),
            Err(OomScoreError::Read { .. })
        ));
    }
}
