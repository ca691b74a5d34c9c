//! What went wrong when `iptables-restore` refused a transaction, read from its error text, so the next
//! attempt can repair the cause instead of repeating the same payload.

/// The classes of failure the sync engine reacts to differently.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailureKind {
    /// A chain could not be deleted because a rule still jumps to it (the incident's failure).
    ReferencedChain { chain: String },
    /// A rule jumps to a chain that does not exist.
    MissingChain { chain: String },
    /// The kernel or the iptables binary lacks a match or target module (`recent`, `statistic`, `sctp`…).
    MissingExtension { kind: &'static str, name: String },
    /// iptables does not know an option (an older binary, e.g. without `--random-fully`).
    UnknownOption { option: String },
    /// Another program held the xtables lock for longer than we wait.
    Lock,
    /// A rule to delete was not there any more: another writer changed the table meanwhile.
    RuleVanished,
    /// Anything else; the message says what.
    Other,
}

/// A classified failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub kind: FailureKind,
    /// The payload line the error names (1-based), if it names one.
    pub line: Option<usize>,
}

impl FailureKind {
    /// Whether rewriting everything we own (after reading the kernel again) can fix it.
    pub fn repairable_by_rebuild(&self) -> bool {
        matches!(
            self,
            FailureKind::ReferencedChain { .. }
                | FailureKind::MissingChain { .. }
                | FailureKind::RuleVanished
                | FailureKind::Lock
                | FailureKind::Other
        )
    }

    /// A short stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            FailureKind::ReferencedChain { .. } => "referenced_chain",
            FailureKind::MissingChain { .. } => "missing_chain",
            FailureKind::MissingExtension { .. } => "missing_extension",
            FailureKind::UnknownOption { .. } => "unknown_option",
            FailureKind::Lock => "lock",
            FailureKind::RuleVanished => "rule_vanished",
            FailureKind::Other => "other",
        }
    }
}

/// The text between two delimiters, e.g. the chain name in `chain 'X' does not exist`.
fn between<'a>(text: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let rest = &text[text.find(start)? + start.len()..];
    Some(&rest[..rest.find(end)?])
}

/// The line number in both backends' spellings: legacy `line 8022 failed`, nft `Error occurred at line: 367`
/// or `line 3: CHAIN_DEL failed`.
fn failing_line(text: &str) -> Option<usize> {
    for marker in ["Error occurred at line: ", "line "] {
        let mut rest = text;
        while let Some(pos) = rest.find(marker) {
            rest = &rest[pos + marker.len()..];
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            if let Ok(n) = digits.parse() {
                return Some(n);
            }
        }
    }
    None
}

/// Classifies `iptables-restore`'s error output.
pub fn classify(stderr: &str) -> Failure {
    let line = failing_line(stderr);
    let kind = if stderr.contains("xtables lock") {
        FailureKind::Lock
    } else if stderr.contains("Device or resource busy") {
        let chain = stderr
            .rsplit("chain ")
            .next()
            .unwrap_or("")
            .split_whitespace()
            .next()
            .unwrap_or("");
        FailureKind::ReferencedChain {
            chain: chain.to_string(),
        }
    } else if let Some(chain) = between(stderr, "Chain '", "' does not exist") {
        FailureKind::MissingChain {
            chain: chain.to_string(),
        }
    } else if let Some(name) = between(stderr, "Couldn't load match `", "'") {
        FailureKind::MissingExtension {
            kind: "match",
            name: name.to_string(),
        }
    } else if let Some(name) = between(stderr, "Couldn't load target `", "'") {
        // Legacy iptables reports a missing chain the same way as a missing target module.
        if name.starts_with("KUBE-") {
            FailureKind::MissingChain {
                chain: name.to_string(),
            }
        } else {
            FailureKind::MissingExtension {
                kind: "target",
                name: name.to_string(),
            }
        }
    } else if let Some(option) = between(stderr, "unknown option \"", "\"") {
        FailureKind::UnknownOption {
            option: option.to_string(),
        }
    } else if stderr.contains("does a matching rule exist") {
        FailureKind::RuleVanished
    } else {
        FailureKind::Other
    };
    Failure { kind, line }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Messages as iptables 1.8.9 (nf_tables) and legacy iptables print them.
    #[test]
    fn classifies_real_messages() {
        let f = classify(
            "iptables-restore v1.8.9 (nf_tables): \nline 3: CHAIN_DEL failed (Device or resource busy): chain KUBE-SEP-ABC",
        );
        assert_eq!(
            f,
            Failure {
                kind: FailureKind::ReferencedChain {
                    chain: "KUBE-SEP-ABC".into()
                },
                line: Some(3)
            }
        );
        let f = classify("iptables-restore: line 8022 failed");
        assert_eq!(
            f,
            Failure {
                kind: FailureKind::Other,
                line: Some(8022)
            }
        );
        let f = classify(
            "iptables-restore v1.8.9 (nf_tables): Chain 'KUBE-MARK-DROP' does not exist\nError occurred at line: 4\nTry `iptables-restore -h'",
        );
        assert_eq!(
            f,
            Failure {
                kind: FailureKind::MissingChain {
                    chain: "KUBE-MARK-DROP".into()
                },
                line: Some(4)
            }
        );
        let f = classify(
            "iptables-restore v1.8.9 (nf_tables): Couldn't load match `recent':No such file or directory\n\nError occurred at line: 3",
        );
        assert_eq!(
            f.kind,
            FailureKind::MissingExtension {
                kind: "match",
                name: "recent".into()
            }
        );
        let f = classify(
            "iptables-restore v1.8.9 (nf_tables): unknown option \"--random-fully\"\nError occurred at line: 9",
        );
        assert_eq!(
            f.kind,
            FailureKind::UnknownOption {
                option: "--random-fully".into()
            }
        );
        let f = classify("Another app is currently holding the xtables lock. Stopped waiting after 5s.");
        assert_eq!(f.kind, FailureKind::Lock);
        let f = classify(
            "iptables-restore: line 3 failed: Bad rule (does a matching rule exist in that chain?).",
        );
        assert_eq!(f.kind, FailureKind::RuleVanished);
        let f = classify("iptables-restore: Couldn't load target `KUBE-SVC-X':No such file or directory");
        assert_eq!(
            f.kind,
            FailureKind::MissingChain {
                chain: "KUBE-SVC-X".into()
            }
        );
    }
}
