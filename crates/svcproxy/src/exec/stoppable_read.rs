//! Reading a command's output as it comes, and stopping the command once its result is no longer wanted.
//!
//! The read-backs run `iptables-save` (1.3 s at 5,000 services × 10 endpoints) and `nft -t list` (0.1–0.9 s),
//! most of it before the first byte. A change arriving meanwhile would wait for them; instead the read is
//! given up and the program killed, so the change is synced at once.

use std::io::Read;
use std::process::{ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::Abandon;
use super::iptables::ExecError;

/// How often a running read is looked at: whether the program has exited, or the read is no longer wanted.
/// The longest a change waits behind a read it stops; a poll is one `waitpid` and one look at a queue.
pub const READ_POLL: Duration = Duration::from_millis(2);

/// Runs `command` (no stdin) and hands its stdout to `read`, on this thread, while its stderr is drained on
/// another (a program that fills the stderr pipe would otherwise block before its stdout ends). A third thread
/// reaps the program when it exits, or kills it once `abandon` says so: its stdout then ends, which ends
/// `read`, and the result is [`ExecError::Abandoned`] whatever `read` made of the part it saw.
pub fn read_output<T>(
    program: &str,
    command: &mut Command,
    abandon: Abandon<'_>,
    read: impl FnOnce(ChildStdout) -> std::io::Result<T>,
) -> Result<T, ExecError> {
    let spawn_err = |e: std::io::Error| ExecError::Spawn {
        program: program.to_string(),
        reason: e.to_string(),
    };
    let abandoned_now = || ExecError::Abandoned {
        program: program.to_string(),
    };
    // Not started at all when the answer is already no.
    if abandon() {
        return Err(abandoned_now());
    }
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    let (Some(stdout), Some(mut stderr)) = (child.stdout.take(), child.stderr.take()) else {
        unreachable!("both pipes were requested");
    };
    let abandoned = AtomicBool::new(false);
    let (read, errors, status) = std::thread::scope(|scope| {
        let errors = scope.spawn(move || {
            let mut text = Vec::new();
            let _ = stderr.read_to_end(&mut text);
            text
        });
        let abandoned = &abandoned;
        let waiter = scope.spawn(move || -> std::io::Result<ExitStatus> {
            loop {
                if let Some(status) = child.try_wait()? {
                    return Ok(status);
                }
                if abandon() {
                    abandoned.store(true, Ordering::SeqCst);
                    let _ = child.kill();
                    return child.wait();
                }
                std::thread::sleep(READ_POLL);
            }
        });
        let read = read(stdout);
        let status = waiter.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
        (read, errors.join().unwrap_or_default(), status)
    });
    if abandoned.load(Ordering::SeqCst) {
        return Err(abandoned_now());
    }
    let status = status.map_err(spawn_err)?;
    if !status.success() {
        return Err(ExecError::Failed {
            program: program.to_string(),
            status: status.to_string(),
            stderr: String::from_utf8_lossy(&errors).trim().to_string(),
        });
    }
    read.map_err(spawn_err)
}

/// [`read_output`] of the whole output as text (lossily decoded, as [`super::runner::SystemRunner`] decodes).
pub fn read_text(program: &str, command: &mut Command, abandon: Abandon<'_>) -> Result<String, ExecError> {
    read_output(program, command, abandon, |mut stdout| {
        let mut bytes = Vec::new();
        stdout.read_to_end(&mut bytes)?;
        Ok(String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::never;

    fn sh(script: &str) -> Command {
        let mut command = Command::new("sh");
        command.args(["-c", script]);
        command
    }

    fn scratch_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("svcproxy-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_read_given_up_stops_the_program_and_says_so() {
        let dir = scratch_dir("stoppable-read");
        let pid_file = dir.join("pid");
        // Says where it runs (renamed into place, so the file is never seen half written), then takes its
        // time, as `nft` does fetching a large ruleset before printing it.
        let script = format!(
            "echo started; echo $$ > {0}.new && mv {0}.new {0}; exec sleep 60",
            pid_file.display()
        );
        let abandon = || pid_file.exists();
        let result = read_text("sh", &mut sh(&script), &abandon);
        assert!(matches!(result, Err(ExecError::Abandoned { .. })), "{result:?}");
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        // Killed and reaped: no such process is left.
        assert!(
            !std::path::Path::new(&format!("/proc/{}", pid.trim())).exists(),
            "the program {} still runs",
            pid.trim()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_read_nobody_gives_up_is_the_programs_output_or_its_failure() {
        assert_eq!(
            read_text("sh", &mut sh("printf 'a\\nb\\n'"), &never).unwrap(),
            "a\nb\n"
        );
        let failed = read_text("sh", &mut sh("echo partial; echo broken >&2; exit 3"), &never);
        match failed {
            Err(ExecError::Failed { stderr, status, .. }) => {
                assert_eq!(stderr, "broken");
                assert!(status.contains('3'), "{status}");
            }
            other => panic!("{other:?}"),
        }
        // Given up before it starts: it never runs.
        let dir = scratch_dir("stoppable-unstarted");
        let marker = dir.join("ran");
        let unstarted = read_text("sh", &mut sh(&format!("touch {}", marker.display())), &|| true);
        assert!(
            matches!(unstarted, Err(ExecError::Abandoned { .. })),
            "{unstarted:?}"
        );
        assert!(!marker.exists(), "the program ran");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
