//! Running a program and collecting its output: the one seam for the few commands that do not deserve a
//! trait of their own (`nft`, `ip`, `ipset` in cleanup).

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use super::iptables::ExecError;

pub trait Runner: Send + Sync {
    /// Runs `program args…` with `stdin`, returning stdout; a non-zero exit is an error carrying stderr.
    fn run(&self, program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, ExecError>;
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SystemRunner;

impl Runner for SystemRunner {
    fn run(&self, program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, ExecError> {
        let spawn_err = |e: std::io::Error| ExecError::Spawn {
            program: program.to_string(),
            reason: e.to_string(),
        };
        let mut child = Command::new(program)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_err)?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            // A write error means the child exited early; its status says why.
            let _ = pipe.write_all(text.as_bytes());
        }
        let out = child.wait_with_output().map_err(spawn_err)?;
        if out.status.success() {
            // Without a copy when the output is valid UTF-8, as it is: a listing runs to megabytes.
            Ok(String::from_utf8(out.stdout)
                .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
        } else {
            Err(ExecError::Failed {
                program: program.to_string(),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            })
        }
    }
}

/// Canned answers: a command-line prefix and what a call starting with it returns.
type Answers = Arc<Mutex<Vec<(String, Result<String, ExecError>)>>>;

/// Answers from a script of canned outputs by program name and records every call.
#[derive(Debug, Clone, Default)]
pub struct RecordingRunner {
    pub calls: Arc<Mutex<Vec<String>>>,
    pub outputs: Answers,
}

impl RecordingRunner {
    /// The failure of a command asked about something that is not there (a table, a chain), for answers.
    pub fn absent() -> ExecError {
        ExecError::Failed {
            program: "x".into(),
            status: "exit status: 1".into(),
            stderr: "No such file or directory".into(),
        }
    }

    /// Answers calls whose command line starts with `prefix` with `result`.
    pub fn answer(&self, prefix: &str, result: Result<String, ExecError>) {
        self.outputs.lock().unwrap().push((prefix.to_string(), result));
    }
}

impl Runner for RecordingRunner {
    fn run(&self, program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, ExecError> {
        let line = std::iter::once(program)
            .chain(args.iter().copied())
            .collect::<Vec<_>>()
            .join(" ");
        let recorded = match stdin {
            Some(s) => format!("{line} <<{s}"),
            None => line.clone(),
        };
        self.calls.lock().unwrap().push(recorded);
        let outputs = self.outputs.lock().unwrap();
        outputs
            .iter()
            .find(|(prefix, _)| line.starts_with(prefix.as_str()))
            .map(|(_, r)| r.clone())
            .unwrap_or_else(|| {
                Err(ExecError::Spawn {
                    program: program.into(),
                    reason: "not installed".into(),
                })
            })
    }
}
