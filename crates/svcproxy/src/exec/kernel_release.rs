//! The running kernel's release string (what `uname -r` prints), for behaviour that depends on the version.

/// Where the release comes from: the running kernel, or a fixed string in tests.
pub trait KernelRelease: Send + Sync {
    fn release(&self) -> std::io::Result<String>;
}

/// The running kernel's, from `/proc/sys/kernel/osrelease`: the string `uname(2)` reports, the same in
/// every network namespace.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemKernelRelease;

impl KernelRelease for SystemKernelRelease {
    fn release(&self) -> std::io::Result<String> {
        Ok(std::fs::read_to_string("/proc/sys/kernel/osrelease")?
            .trim()
            .to_string())
    }
}

/// A release given in advance, to run a proxier as it runs on another kernel.
#[derive(Debug, Clone)]
pub struct FixedKernelRelease(pub String);

impl KernelRelease for FixedKernelRelease {
    fn release(&self) -> std::io::Result<String> {
        Ok(self.0.clone())
    }
}
