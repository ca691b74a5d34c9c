use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Tools the lab drives; a missing one would otherwise surface as an obscure
/// failure deep inside a test.
const REQUIRED_TOOLS: &[&str] = &["ip", "iptables", "iptables-save", "iptables-restore"];

/// Panics unless the process can build network namespaces and program
/// netfilter.
///
/// Real-kernel tests must fail loudly rather than skip: a skipped test reads
/// as a passed one in a summary, and the whole point of these tests is that
/// they ran against the kernel.
pub fn require_root() {
    let mut missing = Vec::new();
    match std::fs::metadata("/proc/self") {
        Ok(meta) if meta.uid() == 0 => {}
        Ok(meta) => missing.push(format!("uid 0 (running as uid {})", meta.uid())),
        Err(err) => missing.push(format!("uid 0 (cannot read /proc/self: {err})")),
    }
    for tool in REQUIRED_TOOLS {
        if !on_path(tool) {
            missing.push(format!("`{tool}` on PATH"));
        }
    }
    assert!(
        missing.is_empty(),
        "real-kernel tests need root and iproute2/iptables: {}",
        missing.join(", ")
    );
}

fn on_path(program: &str) -> bool {
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&path).any(|dir| is_executable(&dir.join(program)))
}

fn is_executable(path: &Path) -> bool {
    path.metadata()
        .is_ok_and(|meta| meta.is_file() && meta.mode() & 0o111 != 0)
}
