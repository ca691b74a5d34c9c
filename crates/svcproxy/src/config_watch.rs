//! Watches the `--config` file while svcproxy runs, so that a changed configuration takes effect.
//!
//! kube-proxy exits as soon as its file is written or renamed, whatever the new file says, and relies on its
//! pod being restarted; a ConfigMap edit therefore restarts every kube-proxy, and a broken edit leaves every
//! node crash-looping with no proxy at all. svcproxy re-reads the file first:
//! - settings that differ: it says which, and stops (exit status 1, the rules left in place) so that its
//!   restart, which finds the rules already right and rewrites only what the new settings change, applies them;
//! - the same settings (a ConfigMap re-projected, a file touched or rewritten as it was): nothing happens;
//! - a file that cannot be used (unreadable, invalid): it keeps running with the settings it started with and
//!   says why the new file would not start, where a restart would stop proxying on this node.
//!
//! The parent directory is watched, not the file: a ConfigMap volume replaces the file by swapping a symlink
//! in its directory, which a watch on the old file never sees.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::ArgMatches;
use notify::RecursiveMode;
use prometheus_client::metrics::gauge::Gauge;

use crate::cli::{ProxyMode, RunArgs};
use crate::config_file::{Resolved, effective_config_yaml, resolve};
use crate::dir_changes::watch_dir;

/// Long enough to coalesce an editor's write-rename burst or a ConfigMap volume's symlink swap.
const DEBOUNCE: Duration = Duration::from_millis(500);
/// A slow re-read covers an event the watch misses (network filesystems, an overflowed inotify queue).
const RESCAN: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum ConfigWatchError {
    #[error("cannot watch {}: {source}", dir.display())]
    Watch { dir: PathBuf, source: notify::Error },
}

/// What a re-read of the file means for the running daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigChange {
    /// The file resolves to the settings svcproxy runs with.
    Same,
    /// The settings differ; one entry per setting, `field: old → new`.
    Changed(Vec<String>),
    /// The file cannot be used; the message says why.
    Unusable(String),
}

/// Reads the file again as the start read it: resolved with the same command line, then checked as a whole
/// (a file can be valid field by field and still be refused, as a `minSyncPeriod` above `syncPeriod` is).
pub fn reread(command_line: &RunArgs, matches: &ArgMatches) -> Result<Resolved, String> {
    let resolved = resolve(command_line.clone(), matches).map_err(|e| e.to_string())?;
    resolved.args.check()?;
    Ok(resolved)
}

/// Compares what the file resolves to now with the settings svcproxy runs with.
pub fn compare(running: &RunArgs, reread: Result<Resolved, String>) -> ConfigChange {
    match reread {
        Err(e) => ConfigChange::Unusable(e),
        Ok(resolved) if resolved.args == *running => ConfigChange::Same,
        Ok(resolved) => {
            let changes = setting_changes(running, &resolved.args);
            if changes.is_empty() {
                // Something a KubeProxyConfiguration does not spell out; still a change.
                ConfigChange::Changed(vec!["settings the written configuration does not show".into()])
            } else {
                ConfigChange::Changed(changes)
            }
        }
    }
}

/// `field: old → new` for every setting of the effective configuration that differs, in the file's order.
/// The written configuration repeats the per-mode settings in both mode sections; only the section of the
/// mode svcproxy will run in is named.
fn setting_changes(before: &RunArgs, after: &RunArgs) -> Vec<String> {
    let other_section = match after.proxy_mode {
        ProxyMode::Iptables => "nftables.",
        ProxyMode::Nftables => "iptables.",
    };
    let in_effect = |yaml: String| {
        let mut all = settings(&yaml);
        all.retain(|field, _| !field.starts_with(other_section));
        all
    };
    let old = in_effect(effective_config_yaml(before));
    let new = in_effect(effective_config_yaml(after));
    let mut changes = Vec::new();
    for (field, (_, value)) in &new {
        match old.get(field) {
            Some((_, was)) if was == value => {}
            Some((_, was)) => changes.push((field, format!("{field}: {was} → {value}"))),
            None => changes.push((field, format!("{field}: {value}"))),
        }
    }
    for (field, (_, was)) in &old {
        if !new.contains_key(field) {
            changes.push((field, format!("{field}: {was} → (unset)")));
        }
    }
    changes.sort_by_key(|(field, _)| new.get(*field).or(old.get(*field)).map(|(order, _)| *order));
    changes.into_iter().map(|(_, change)| change).collect()
}

/// The written configuration as `section.field → (line, value)`. It nests one level deep (a section's
/// fields are indented under a line that ends in `:`), which is all [`effective_config_yaml`] writes.
fn settings(yaml: &str) -> BTreeMap<String, (usize, String)> {
    let mut out = BTreeMap::new();
    let mut section = String::new();
    for (line_no, line) in yaml.lines().enumerate() {
        if line.trim_start().starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let nested = line.starts_with(' ');
        let value = value.trim();
        if !nested && value.is_empty() {
            section = key.to_string();
            continue;
        }
        let field = if nested {
            format!("{section}.{}", key.trim())
        } else {
            key.to_string()
        };
        out.insert(field, (line_no, value.to_string()));
    }
    out
}

/// Watches `path` and returns when the file resolves to settings other than `running`: the reason to stop,
/// for the caller to log and exit with. `unusable` is 1 while the file cannot be used. `command_line` and `matches` are the `run` arguments as given, before
/// the file was applied, so that a re-read resolves exactly as the start did.
pub async fn watch(
    path: PathBuf,
    command_line: RunArgs,
    matches: ArgMatches,
    running: RunArgs,
    unusable: Gauge,
) -> Result<String, ConfigWatchError> {
    let dir = watched_dir(&path);
    let (_watch, mut fs_rx) =
        watch_dir(&dir, RecursiveMode::NonRecursive, DEBOUNCE).map_err(|source| ConfigWatchError::Watch {
            dir: dir.clone(),
            source,
        })?;

    let mut rescan = tokio::time::interval(RESCAN);
    rescan.tick().await;
    let mut last_problem: Option<String> = None;
    // The file was read at start, before this watch began: it is compared once as soon as the watch is up, so
    // an edit made in between is not left for the rescan a minute later.
    let mut watching = false;
    loop {
        if watching {
            tokio::select! {
                Some(()) = fs_rx.recv() => {},
                _ = rescan.tick() => {},
            }
        }
        watching = true;
        let change = compare(&running, reread(&command_line, &matches));
        unusable.set(i64::from(matches!(change, ConfigChange::Unusable(_))));
        match change {
            ConfigChange::Same => {
                if last_problem.take().is_some() {
                    tracing::info!(
                        file = %path.display(),
                        "the configuration file is usable again and means the settings svcproxy runs with"
                    );
                }
            }
            ConfigChange::Unusable(problem) => {
                // Said once per distinct problem: the rescan would repeat it every minute.
                if last_problem.as_ref() != Some(&problem) {
                    tracing::error!(
                        file = %path.display(),
                        "the configuration file changed but cannot be used: {problem}; svcproxy keeps running \
                         with the settings it started with (a restart would fail on this file)"
                    );
                    last_problem = Some(problem);
                }
            }
            ConfigChange::Changed(changes) => {
                return Ok(format!(
                    "the configuration file {} changed ({}); stopping so that the new settings take effect \
                     when svcproxy is restarted (the programmed rules stay in place)",
                    path.display(),
                    changes.join(", ")
                ));
            }
        }
    }
}

/// The directory holding `path` (`.` for a bare file name).
fn watched_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Cli;
    use clap::{CommandFactory, FromArgMatches};

    fn args(flags: &[&str]) -> RunArgs {
        let matches = Cli::command()
            .try_get_matches_from(["svcproxy", "run"].iter().chain(flags))
            .unwrap();
        RunArgs::from_arg_matches(matches.subcommand_matches("run").unwrap()).unwrap()
    }

    fn resolved(args: RunArgs) -> Result<Resolved, String> {
        Ok(Resolved {
            args,
            warnings: Vec::new(),
        })
    }

    #[test]
    fn the_same_settings_are_no_change() {
        let running = args(&["--cluster-cidr=10.244.0.0/16"]);
        assert_eq!(compare(&running, resolved(running.clone())), ConfigChange::Same);
    }

    #[test]
    fn changed_settings_are_named_with_their_section_in_the_files_order() {
        let running = args(&[]);
        let next = args(&[
            "--proxy-mode=nftables",
            "--iptables-masquerade-bit=9",
            "--conntrack-min=7",
        ]);
        assert_eq!(
            compare(&running, resolved(next)),
            ConfigChange::Changed(vec![
                "mode: iptables → nftables".into(),
                "nftables.masqueradeBit: 14 → 9".into(),
                "conntrack.min: 131072 → 7".into(),
            ])
        );
    }

    #[test]
    fn a_change_the_written_file_cannot_show_is_still_a_change() {
        let running = args(&[]);
        let next = args(&["--verify-period=7s"]);
        assert_ne!(running, next);
        assert!(matches!(compare(&running, resolved(next)), ConfigChange::Changed(c) if c.len() == 1));
    }

    #[test]
    fn a_file_that_cannot_be_used_says_why() {
        let dir = std::env::temp_dir().join(format!("svcproxy-reread-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.conf");
        let flag = format!("--config={}", path.display());
        let header = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n";
        let matches = Cli::command()
            .try_get_matches_from(["svcproxy", "run", &flag])
            .unwrap();
        let run = matches.subcommand_matches("run").unwrap();
        let command_line = RunArgs::from_arg_matches(run).unwrap();
        let running = args(&[]);
        let change = |body: &str| {
            std::fs::write(&path, format!("{header}{body}")).unwrap();
            compare(&running, reread(&command_line, run))
        };

        assert_eq!(
            change("iptables:\n  masqueradeBit: 40\n"),
            ConfigChange::Unusable(format!(
                "{}: iptables.masqueradeBit: 40 is outside 0-31",
                path.display()
            ))
        );
        // Valid field by field, refused as a whole, as the start would refuse it.
        assert!(matches!(
            change("iptables:\n  syncPeriod: 1s\n  minSyncPeriod: 5s\n"),
            ConfigChange::Unusable(e) if e.contains("must be at least --min-sync-period")
        ));
        assert!(matches!(
            change("iptables:\n  syncPeriod: 45s\n"),
            ConfigChange::Changed(_)
        ));
        std::fs::remove_file(&path).unwrap();
        let gone = compare(&running, reread(&command_line, run));
        assert!(
            matches!(&gone, ConfigChange::Unusable(e) if e.contains("cannot read")),
            "{gone:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_bare_file_name_is_watched_in_the_current_directory() {
        assert_eq!(watched_dir(Path::new("config.conf")), PathBuf::from("."));
        assert_eq!(
            watched_dir(Path::new("/var/lib/kube-proxy/config.conf")),
            PathBuf::from("/var/lib/kube-proxy")
        );
    }
}
