use std::fs::File;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;

use nix::sched::{CloneFlags, setns};

/// Where `ip netns add` leaves the bind mount that keeps a namespace alive.
const NETNS_RUN_DIR: &str = "/run/netns";

/// Distinguishes namespaces made by one test process; the pid in the name
/// keeps concurrently running test binaries apart.
static NEXT_ID: AtomicU32 = AtomicU32::new(0);

#[derive(Debug, thiserror::Error)]
pub enum NetNsError {
    #[error("could not run `{command}`: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("could not write sysctl {key} in namespace {namespace}: {source}")]
    Sysctl {
        namespace: String,
        key: String,
        #[source]
        source: std::io::Error,
    },
}

/// A named network namespace (as `ip netns` manages them), deleted on drop.
///
/// Loopback is brought up on creation: nearly every user needs it and a
/// forgotten `lo` makes local connections fail in confusing ways.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates a namespace whose name starts with `tag` (kept short so names
    /// stay readable in `ip netns list`).
    pub fn new(tag: &str) -> Result<NetNs, NetNsError> {
        let pid = std::process::id();
        loop {
            let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
            let name = format!("sp{tag}-{pid}-{id}");
            match run_checked(Command::new("ip").args(["netns", "add", &name])) {
                Ok(_) => {
                    let ns = NetNs { name };
                    ns.exec(&["ip", "link", "set", "lo", "up"])?;
                    return Ok(ns);
                }
                // A namespace leaked by an earlier process that had our pid.
                Err(NetNsError::Failed { stderr, .. }) if stderr.contains("exists") => continue,
                Err(err) => return Err(err),
            }
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs a command inside the namespace and waits for it; a non-zero exit
    /// is an error carrying the command's stderr.
    pub fn exec(&self, argv: &[&str]) -> Result<Output, NetNsError> {
        let (program, args) = argv.split_first().expect("exec needs a program to run");
        run_checked(self.command(program).args(args))
    }

    /// Like [`NetNs::exec`] but returns stdout as text.
    pub fn exec_stdout(&self, argv: &[&str]) -> Result<String, NetNsError> {
        let output = self.exec(argv)?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// A command that will run `program` inside the namespace, for processes
    /// the caller wants to spawn and manage itself.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }

    /// Sets a sysctl as seen from inside the namespace (`net.*` keys are
    /// per-namespace). `key` uses dots, as `sysctl` does.
    pub fn set_sysctl(&self, key: &str, value: &str) -> Result<(), NetNsError> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        // /proc/sys/net resolves against the opening thread's namespace.
        self.run(|| std::fs::write(&path, value))
            .map_err(|source| NetNsError::Sysctl {
                namespace: self.name.clone(),
                key: key.to_owned(),
                source,
            })
    }

    /// Runs `f` on a thread that has joined the namespace and waits for its
    /// result. Sockets `f` creates belong to the namespace for their whole
    /// life, so they may be handed back and used from any thread.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let handle = self.open_handle();
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    enter(&handle, &self.name);
                    f()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Starts a long-lived thread inside the namespace (a server, say).
    pub fn spawn_thread<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
        let handle = self.open_handle();
        let name = self.name.clone();
        std::thread::Builder::new()
            .name(format!("in-{name}"))
            .spawn(move || {
                enter(&handle, &name);
                f()
            })
            .expect("spawn a thread")
    }

    /// Opened by the caller so a deleted namespace fails here, with context,
    /// rather than inside a thread.
    fn open_handle(&self) -> File {
        let path = format!("{NETNS_RUN_DIR}/{}", self.name);
        File::open(&path).unwrap_or_else(|err| panic!("open {path}: {err}"))
    }
}

fn enter(handle: &File, name: &str) {
    setns(handle, CloneFlags::CLONE_NEWNET)
        .unwrap_or_else(|err| panic!("setns into network namespace {name}: {err}"));
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // The kernel tears the namespace down (interfaces, veth peers in
        // other namespaces, netfilter state) asynchronously once the last
        // reference is gone, so its devices may outlive this call briefly.
        if let Err(err) = run_checked(Command::new("ip").args(["netns", "del", &self.name])) {
            tracing::warn!("leaking network namespace {}: {err}", self.name);
        }
    }
}

pub(crate) fn run_checked(command: &mut Command) -> Result<Output, NetNsError> {
    let rendered = render(command);
    let output = command.output().map_err(|source| NetNsError::Spawn {
        command: rendered.clone(),
        source,
    })?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(NetNsError::Failed {
            command: rendered,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

fn render(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|part| part.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}
