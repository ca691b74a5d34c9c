//! The suite's results table. Each case records one row when it ends, passed or failed, into a file under
//! Cargo's temporary directory for integration tests (rows of earlier runs are dropped by process id), and
//! prints the table of every case finished so far: the last case to finish prints the whole table. Run with
//! `--nocapture` to see it, or read `fault-injection-results.txt` there afterwards.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::harness::secs;

/// Serialises rewriting the file between the suite's test threads.
static FILE_LOCK: Mutex<()> = Mutex::new(());

fn results_file() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fault-injection-results.txt")
}

/// One fault case in progress. Times are taken from the case's origin; `detected` and `repaired` are
/// measured from the moment the fault was injected.
pub struct Case {
    name: &'static str,
    origin: Instant,
    injected: Option<Duration>,
    detected: Option<Duration>,
    repaired: Option<Duration>,
    health: String,
    notes: Vec<String>,
    stage: String,
}

impl Case {
    pub fn new(name: &'static str) -> Case {
        eprintln!("[{name}] starting");
        Case {
            name,
            origin: Instant::now(),
            injected: None,
            detected: None,
            repaired: None,
            health: String::new(),
            notes: Vec::new(),
            stage: "setup".into(),
        }
    }

    pub fn origin(&self) -> Instant {
        self.origin
    }

    /// Time since the case began.
    pub fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    /// What the case is doing now; a failing case's row names it.
    pub fn stage(&mut self, stage: impl Into<String>) {
        self.stage = stage.into();
        eprintln!("[{}] {}: {}", self.name, secs(self.now()), self.stage);
    }

    /// The fault goes in now.
    pub fn injected(&mut self) -> Duration {
        let at = self.now();
        self.injected = Some(at);
        eprintln!("[{}] {}: fault injected", self.name, secs(at));
        at
    }

    pub fn injected_at(&self) -> Duration {
        self.injected.unwrap_or_default()
    }

    /// svcproxy noticed the fault at case time `at`.
    pub fn detected(&mut self, at: Duration) {
        let d = at.saturating_sub(self.injected_at());
        self.detected = Some(d);
        eprintln!("[{}] detected {} after injection", self.name, secs(d));
    }

    /// The kernel and traffic were right again at case time `at`.
    pub fn repaired(&mut self, at: Duration) {
        let d = at.saturating_sub(self.injected_at());
        self.repaired = Some(d);
        eprintln!("[{}] repaired {} after injection", self.name, secs(d));
    }

    pub fn health(&mut self, summary: String) {
        eprintln!("[{}] health: {summary}", self.name);
        self.health = summary;
    }

    pub fn note(&mut self, note: impl Into<String>) {
        let note = note.into();
        eprintln!("[{}] {note}", self.name);
        self.notes.push(note);
    }
}

impl Drop for Case {
    fn drop(&mut self) {
        let outcome = if std::thread::panicking() {
            format!("FAIL ({})", self.stage)
        } else {
            "pass".to_owned()
        };
        let show = |d: Option<Duration>| d.map(secs).unwrap_or_else(|| "-".into());
        let row = [
            self.name.to_owned(),
            show(self.detected),
            show(self.repaired),
            if self.health.is_empty() {
                "-".into()
            } else {
                self.health.clone()
            },
            outcome,
            std::iter::once(format!("took {}", secs(self.now())))
                .chain(self.notes.iter().cloned())
                .collect::<Vec<_>>()
                .join("; "),
        ]
        .map(|f| f.replace(['\t', '\n'], " "))
        .join("\t");
        let _guard = FILE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let pid = std::process::id().to_string();
        let path = results_file();
        let mut rows: Vec<String> = std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.split('\t').next() == Some(pid.as_str()))
            .map(str::to_owned)
            .collect();
        rows.push(format!("{pid}\t{row}"));
        rows.sort_by(|a, b| a.split('\t').nth(1).cmp(&b.split('\t').nth(1)));
        let _ = std::fs::write(&path, rows.join("\n") + "\n");
        let mut table = String::from(
            "\nfault injection results so far (case | detected after | repaired after | health | outcome | notes)\n",
        );
        for r in &rows {
            let fields: Vec<&str> = r.split('\t').skip(1).collect();
            table.push_str(&format!("  {}\n", fields.join(" | ")));
        }
        eprintln!("{table}");
    }
}
