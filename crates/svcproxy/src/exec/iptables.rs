//! Running `iptables-restore` and `iptables-save`.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use svcproxy_iptables::seal::SEAL_CHAIN;
use svcproxy_model::IpFamily;

use super::Abandon;
use super::gate::Gate;
use super::generation::CountingGeneration;
use super::stoppable_read::read_output;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExecError {
    #[error("cannot run {program}: {reason}")]
    Spawn { program: String, reason: String },
    #[error("{program} exited with {status}: {stderr}")]
    Failed {
        program: String,
        status: String,
        stderr: String,
    },
    /// The caller no longer wanted the result and the command was stopped.
    #[error("{program} stopped: its result was no longer wanted")]
    Abandoned { program: String },
}

/// The two calls a sync makes. Implementations must be usable from a blocking context.
pub trait IptablesCommands: Send + Sync {
    /// `iptables-restore --noflush`: one atomic transaction per table in `payload`.
    fn restore(&self, payload: &[u8]) -> Result<(), ExecError>;
    /// `iptables-save` of the given tables, concatenated; every table when `tables` is empty.
    fn save(&self, tables: &[&str]) -> Result<String, ExecError>;
    /// [`IptablesCommands::save`], handing each line (without its newline) to `line` in order. A real
    /// implementation passes lines on as `iptables-save` prints them, so the dump (17 MB at 5,000 services ×
    /// 10 endpoints) is never held whole, and stops `iptables-save` (returning
    /// [`ExecError::Abandoned`]) once `abandon` says so: at 5,000 services a dump takes over a second, most
    /// of it before the first line.
    fn save_lines(
        &self,
        tables: &[&str],
        line: &mut dyn FnMut(&str),
        abandon: Abandon<'_>,
    ) -> Result<(), ExecError> {
        if abandon() {
            return Err(ExecError::Abandoned {
                program: "iptables-save".into(),
            });
        }
        self.save(tables)?.lines().for_each(line);
        Ok(())
    }
    /// `iptables -t TABLE -S CHAIN`: one chain's rules; `None` when the chain does not exist.
    fn list_chain(&self, table: &str, chain: &str) -> Result<Option<String>, ExecError>;
}

/// The real binaries. The wait flags match upstream's: wait up to 5 s for the xtables lock, polling every
/// 100 ms, instead of failing at once when another writer (kubelet, a CNI plugin) holds it.
#[derive(Debug, Clone)]
pub struct SystemIptables {
    restore: String,
    save: String,
    iptables: String,
}

impl SystemIptables {
    pub fn new(family: IpFamily) -> Self {
        match family {
            IpFamily::V4 => Self::with_binaries("iptables-restore", "iptables-save", "iptables"),
            IpFamily::V6 => Self::with_binaries("ip6tables-restore", "ip6tables-save", "ip6tables"),
        }
    }

    /// Specific binaries, e.g. one backend's (`iptables-legacy-restore`, …).
    pub fn with_binaries(
        restore: impl Into<String>,
        save: impl Into<String>,
        iptables: impl Into<String>,
    ) -> Self {
        SystemIptables {
            restore: restore.into(),
            save: save.into(),
            iptables: iptables.into(),
        }
    }
}

fn spawn_err(program: &str, e: std::io::Error) -> ExecError {
    ExecError::Spawn {
        program: program.to_string(),
        reason: e.to_string(),
    }
}

impl IptablesCommands for SystemIptables {
    fn restore(&self, payload: &[u8]) -> Result<(), ExecError> {
        let mut child = Command::new(&self.restore)
            .args(["-w", "5", "-W", "100000", "--noflush", "--counters"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| spawn_err(&self.restore, e))?;
        if let Some(mut stdin) = child.stdin.take() {
            // A write error means the child died early; its exit status and stderr below say why.
            let _ = stdin.write_all(payload);
        }
        let out = child
            .wait_with_output()
            .map_err(|e| spawn_err(&self.restore, e))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(ExecError::Failed {
                program: self.restore.to_string(),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            })
        }
    }

    fn save(&self, tables: &[&str]) -> Result<String, ExecError> {
        let mut all = String::new();
        // No table named means every table.
        let selections: Vec<Vec<&str>> = if tables.is_empty() {
            vec![Vec::new()]
        } else {
            tables.iter().map(|t| vec!["-t", *t]).collect()
        };
        for args in selections {
            let out = Command::new(&self.save)
                .args(&args)
                .output()
                .map_err(|e| spawn_err(&self.save, e))?;
            if !out.status.success() {
                return Err(ExecError::Failed {
                    program: self.save.to_string(),
                    status: out.status.to_string(),
                    stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                });
            }
            all.push_str(&String::from_utf8_lossy(&out.stdout));
        }
        Ok(all)
    }

    fn save_lines(
        &self,
        tables: &[&str],
        line: &mut dyn FnMut(&str),
        abandon: Abandon<'_>,
    ) -> Result<(), ExecError> {
        // Several tables: one `iptables-save` of everything, passing on only their blocks. iptables-nft
        // fetches the whole ruleset whichever table it is asked for, so each `-t` costs as much as all of
        // them (5,000 services × 10 endpoints: 0.7 s for the small filter table, 1.3 s for nat, 1.3 s for
        // both at once).
        let several = tables.len() > 1;
        let selections: Vec<Vec<&str>> = if tables.is_empty() || several {
            vec![Vec::new()]
        } else {
            tables.iter().map(|t| vec!["-t", *t]).collect()
        };
        let mut wanted = true;
        let mut line = |l: &str| {
            if several && let Some(table) = l.strip_prefix('*') {
                wanted = tables.contains(&table.trim());
            }
            if wanted {
                line(l);
            }
        };
        for args in selections {
            read_output(
                &self.save,
                Command::new(&self.save).args(&args),
                abandon,
                |stdout| each_line(stdout, &mut line),
            )?;
        }
        Ok(())
    }

    fn list_chain(&self, table: &str, chain: &str) -> Result<Option<String>, ExecError> {
        let out = Command::new(&self.iptables)
            .args(["-w", "5", "-W", "100000", "-t", table, "-S", chain])
            .output()
            .map_err(|e| spawn_err(&self.iptables, e))?;
        if out.status.success() {
            return Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned()));
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        // iptables says so in words and exits 1 when the chain is not there.
        // iptables-nft says "incompatible, use 'nft' tool" when the chain's table or base chains were removed
        // from under it (a flush with `-X`): for us the chain is gone either way.
        if stderr.contains("No chain/target/match by that name")
            || stderr.contains("does not exist")
            || stderr.contains("is incompatible")
        {
            return Ok(None);
        }
        Err(ExecError::Failed {
            program: self.iptables.to_string(),
            status: out.status.to_string(),
            stderr: stderr.trim().to_string(),
        })
    }
}

/// Hands each line of `from` to `line`, decoded as `String::from_utf8_lossy` decodes a whole text (a line
/// break never falls inside a character, so decoding line by line gives the same lines).
fn each_line(from: impl Read, line: &mut dyn FnMut(&str)) -> std::io::Result<()> {
    let mut reader = BufReader::with_capacity(64 * 1024, from);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf)? == 0 {
            return Ok(());
        }
        // As `str::lines`: the newline goes, and a carriage return just before it.
        let text = match buf.strip_suffix(b"\n") {
            Some(text) => text.strip_suffix(b"\r").unwrap_or(text),
            None => &buf,
        };
        line(&String::from_utf8_lossy(text));
    }
}

/// A call the fake received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    Restore(String),
    Save(Vec<String>),
    ListChain(String, String),
}

/// Records every call; answers saves with a canned dump and fails restores on demand. Of the kernel it models
/// only what the seal needs: a successful restore moves `generation` on by one per table section, and each
/// table's seal chain lists the seal last written there.
#[derive(Debug, Clone, Default)]
pub struct RecordingIptables {
    pub calls: Arc<Mutex<Vec<Recorded>>>,
    pub save_output: Arc<Mutex<String>>,
    pub fail_restores: Arc<Mutex<Vec<ExecError>>>,
    pub generation: CountingGeneration,
    /// How many of the coming table sections commit nothing (the generation does not move for them).
    pub empty_sections: Arc<Mutex<u32>>,
    /// How many of the coming saves see another program commit while they read (the generation moves by one).
    pub commits_during_saves: Arc<Mutex<u32>>,
    /// While closed, a restore is recorded and then waits until it opens: a sync caught in the middle.
    pub restore_gate: Gate,
    /// While closed, a save is recorded and then waits until it opens, or until the caller abandons it.
    pub save_gate: Gate,
    seals: Arc<Mutex<std::collections::BTreeMap<String, String>>>,
}

impl RecordingIptables {
    /// A fake whose restores move `generation`: the other family's fake on the same (pretend) kernel.
    pub fn sharing_generation(generation: &CountingGeneration) -> Self {
        RecordingIptables {
            generation: generation.clone(),
            ..Self::default()
        }
    }

    fn record_save(&self, tables: &[&str]) {
        self.calls
            .lock()
            .unwrap()
            .push(Recorded::Save(tables.iter().map(|t| t.to_string()).collect()));
    }

    /// What a save prints, once the read is under way: another program may commit meanwhile.
    fn saved(&self) -> String {
        let mut commits = self.commits_during_saves.lock().unwrap();
        if *commits > 0 {
            *commits -= 1;
            self.generation.advance(1);
        }
        self.save_output.lock().unwrap().clone()
    }

    pub fn restores(&self) -> Vec<String> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter_map(|c| match c {
                Recorded::Restore(p) => Some(p.clone()),
                Recorded::Save(_) | Recorded::ListChain(..) => None,
            })
            .collect()
    }
}

impl IptablesCommands for RecordingIptables {
    fn restore(&self, payload: &[u8]) -> Result<(), ExecError> {
        let payload = String::from_utf8_lossy(payload);
        self.calls
            .lock()
            .unwrap()
            .push(Recorded::Restore(payload.to_string()));
        self.restore_gate.pass();
        if let Some(e) = self.fail_restores.lock().unwrap().pop() {
            return Err(e);
        }
        let mut sections = payload.lines().filter(|l| l.starts_with('*')).count() as u32;
        let mut empty = self.empty_sections.lock().unwrap();
        let skipped = (*empty).min(sections);
        *empty -= skipped;
        sections -= skipped;
        self.generation.advance(sections);
        let seal_rule = format!("-A {SEAL_CHAIN} ");
        let mut table = "";
        for line in payload.lines() {
            if let Some(t) = line.strip_prefix('*') {
                table = t;
            } else if line.starts_with(&seal_rule) {
                self.seals
                    .lock()
                    .unwrap()
                    .insert(table.to_string(), format!("-N {SEAL_CHAIN}\n{line}\n"));
            }
        }
        Ok(())
    }

    fn save_lines(
        &self,
        tables: &[&str],
        line: &mut dyn FnMut(&str),
        abandon: Abandon<'_>,
    ) -> Result<(), ExecError> {
        self.record_save(tables);
        if !self.save_gate.pass_unless(abandon) {
            return Err(ExecError::Abandoned {
                program: "iptables-save".into(),
            });
        }
        self.saved().lines().for_each(line);
        Ok(())
    }

    fn save(&self, tables: &[&str]) -> Result<String, ExecError> {
        self.record_save(tables);
        self.save_gate.pass();
        Ok(self.saved())
    }

    fn list_chain(&self, table: &str, chain: &str) -> Result<Option<String>, ExecError> {
        self.calls
            .lock()
            .unwrap()
            .push(Recorded::ListChain(table.to_string(), chain.to_string()));
        if chain == SEAL_CHAIN {
            return Ok(self.seals.lock().unwrap().get(table).cloned());
        }
        // Otherwise the fake does not model the kernel: report nothing, so verification finds the chain missing
        // only when a test supplies a dump through `save_output`.
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::never;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// An `iptables-save` stand-in that prints a table's first line, says where it runs, and then takes its
    /// time, as the real one does fetching a large ruleset.
    fn slow_save(dir: &std::path::Path) -> (String, std::path::PathBuf) {
        let pid_file = dir.join("pid");
        let script = dir.join("slow-save");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\necho '*nat'\necho $$ > {}\nexec sleep 60\n",
                pid_file.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        (script.display().to_string(), pid_file)
    }

    /// Runs `save` again while the script it starts was only just written: another test's child, forked
    /// while that file was still open for writing, makes exec fail with ETXTBSY for a moment.
    fn retry_busy(mut save: impl FnMut() -> Result<(), ExecError>) -> Result<(), ExecError> {
        for _ in 0..20 {
            match save() {
                Err(ExecError::Spawn { reason, .. }) if reason.contains("Text file busy") => {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                other => return other,
            }
        }
        save()
    }

    #[test]
    fn an_abandoned_save_stops_iptables_save_and_says_so() {
        let dir = std::env::temp_dir().join(format!("svcproxy-slow-save-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (save, pid_file) = slow_save(&dir);
        let cmds = SystemIptables::with_binaries("true", save, "true");
        let mut lines = Vec::new();
        let printed = AtomicBool::new(false);
        // Given up only once the stand-in is under way (it has printed and written its pid).
        let abandon = || printed.load(Ordering::SeqCst) && pid_file.exists();
        let result = retry_busy(|| {
            lines.clear();
            cmds.save_lines(
                &["nat"],
                &mut |l| {
                    lines.push(l.to_string());
                    printed.store(true, Ordering::SeqCst);
                },
                &abandon,
            )
        });
        assert!(matches!(result, Err(ExecError::Abandoned { .. })), "{result:?}");
        assert_eq!(lines, ["*nat"]);
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        // Killed and reaped: no such process is left.
        assert!(
            !std::path::Path::new(&format!("/proc/{}", pid.trim())).exists(),
            "iptables-save {} still runs",
            pid.trim()
        );
        // A read nobody gives up is read to its end.
        std::fs::write(
            dir.join("quick-save"),
            "#!/bin/sh\necho '*nat'\necho ':KUBE-SERVICES - [0:0]'\n",
        )
        .unwrap();
        std::fs::set_permissions(dir.join("quick-save"), std::fs::Permissions::from_mode(0o755)).unwrap();
        let cmds =
            SystemIptables::with_binaries("true", dir.join("quick-save").display().to_string(), "true");
        let mut lines = Vec::new();
        retry_busy(|| {
            lines.clear();
            cmds.save_lines(&["nat"], &mut |l| lines.push(l.to_string()), &never)
        })
        .unwrap();
        assert_eq!(lines, ["*nat", ":KUBE-SERVICES - [0:0]"]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
