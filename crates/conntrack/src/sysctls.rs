//! The conntrack sysctls set once at start, as kube-proxy sets them: a table big enough for a node full of
//! service traffic, and TCP timeouts that drop idle entries sooner than the kernel's five days.
//!
//! Planning is pure ([`plan_sysctls`]); [`apply_sysctls`] writes the plan and reports each item separately,
//! because some of them only work in the initial network namespace or with a writable `/sys`, and those
//! failures are worth a warning, not a refusal to start.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// The conntrack settings of the proxy configuration. A zero leaves the kernel's value alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConntrackSysctlConfig {
    /// Table entries per CPU (`--conntrack-max-per-core`); 0 leaves the table size alone entirely.
    pub max_per_core: u64,
    /// Floor for the scaled table size (`--conntrack-min`).
    pub min: u64,
    pub tcp_established_timeout_secs: u64,
    pub tcp_close_wait_timeout_secs: u64,
    /// Accept TCP packets outside the window instead of marking them invalid.
    pub tcp_be_liberal: bool,
    pub udp_timeout_secs: u64,
    pub udp_stream_timeout_secs: u64,
}

/// kube-proxy's defaults.
impl Default for ConntrackSysctlConfig {
    fn default() -> Self {
        ConntrackSysctlConfig {
            max_per_core: 32_768,
            min: 131_072,
            tcp_established_timeout_secs: 24 * 3600,
            tcp_close_wait_timeout_secs: 3600,
            tcp_be_liberal: false,
            udp_timeout_secs: 0,
            udp_stream_timeout_secs: 0,
        }
    }
}

/// How a planned value is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// Make the file hold exactly this value.
    Set,
    /// Raise the value to at least this; a larger value someone chose is kept.
    Raise,
}

/// One file to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysctlSetting {
    /// Absolute path under `/proc/sys` or `/sys`.
    pub path: &'static str,
    pub value: u64,
    pub mode: WriteMode,
    /// The kernel only lets the initial network namespace (or a writable `/sys`) change this one, so in a
    /// container a failure is expected: report it as a warning and go on.
    pub failure_is_warning: bool,
}

pub const CONNTRACK_MAX: &str = "/proc/sys/net/netfilter/nf_conntrack_max";
/// The hash table's bucket count; the kernel sizes it for the default maximum, and a much larger maximum
/// with the same buckets makes long chains.
pub const CONNTRACK_HASHSIZE: &str = "/sys/module/nf_conntrack/parameters/hashsize";
pub const TCP_TIMEOUT_ESTABLISHED: &str = "/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_established";
pub const TCP_TIMEOUT_CLOSE_WAIT: &str = "/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_close_wait";
pub const TCP_BE_LIBERAL: &str = "/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal";
pub const UDP_TIMEOUT: &str = "/proc/sys/net/netfilter/nf_conntrack_udp_timeout";
pub const UDP_TIMEOUT_STREAM: &str = "/proc/sys/net/netfilter/nf_conntrack_udp_timeout_stream";
/// Not a conntrack setting, but written the same way: lets IPv4 packets from 127.0.0.0/8 be routed off the
/// loopback device once DNAT sends them to a pod, which localhost NodePorts need.
pub const ROUTE_LOCALNET: &str = "/proc/sys/net/ipv4/conf/all/route_localnet";

/// The machine's online CPUs, as `/sys/devices/system/cpu/online` lists them (`0-3,8-11`). The table serves
/// the whole node, so it is sized by the machine's CPUs, not by the CPU share or affinity of the container
/// svcproxy runs in (which is what `available_parallelism` reports); upstream counts them the same way.
pub fn online_cpus() -> Option<usize> {
    count_cpu_list(&fs::read_to_string("/sys/devices/system/cpu/online").ok()?)
}

/// Counts the CPUs of a kernel CPU list: comma-separated numbers and inclusive ranges.
pub fn count_cpu_list(list: &str) -> Option<usize> {
    let mut count = 0;
    for part in list.trim().split(',') {
        let (first, last) = match part.split_once('-') {
            Some((a, b)) => (a.parse::<usize>().ok()?, b.parse::<usize>().ok()?),
            None => {
                let n = part.parse::<usize>().ok()?;
                (n, n)
            }
        };
        count += last.checked_sub(first)? + 1;
    }
    (count > 0).then_some(count)
}

/// The table size: per-core entries times CPUs, at least `min`; none when per-core is 0.
pub fn conntrack_max(config: &ConntrackSysctlConfig, cpus: usize) -> Option<u64> {
    (config.max_per_core > 0).then(|| (config.max_per_core * cpus as u64).max(config.min))
}

/// What to write for `config` on a machine with `cpus` CPUs, in the order to write it (the table size
/// before its hash buckets).
pub fn plan_sysctls(config: &ConntrackSysctlConfig, cpus: usize) -> Vec<SysctlSetting> {
    let mut out = Vec::new();
    let mut push = |path, value, mode, failure_is_warning| {
        out.push(SysctlSetting {
            path,
            value,
            mode,
            failure_is_warning,
        })
    };
    if let Some(max) = conntrack_max(config, cpus) {
        push(CONNTRACK_MAX, max, WriteMode::Set, true);
        // The kernel's own ratio for a table it sizes itself: four entries per bucket.
        push(CONNTRACK_HASHSIZE, max / 4, WriteMode::Raise, true);
    }
    for (path, secs) in [
        (TCP_TIMEOUT_ESTABLISHED, config.tcp_established_timeout_secs),
        (TCP_TIMEOUT_CLOSE_WAIT, config.tcp_close_wait_timeout_secs),
    ] {
        if secs > 0 {
            push(path, secs, WriteMode::Set, false);
        }
    }
    if config.tcp_be_liberal {
        push(TCP_BE_LIBERAL, 1, WriteMode::Set, false);
    }
    for (path, secs) in [
        (UDP_TIMEOUT, config.udp_timeout_secs),
        (UDP_TIMEOUT_STREAM, config.udp_stream_timeout_secs),
    ] {
        if secs > 0 {
            push(path, secs, WriteMode::Set, false);
        }
    }
    out
}

#[derive(Debug, thiserror::Error)]
pub enum SysctlError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} holds {content:?}, not a number")]
    NotANumber { path: PathBuf, content: String },
    #[error("cannot write {value} to {path}: {source}")]
    Write {
        path: PathBuf,
        value: u64,
        #[source]
        source: io::Error,
    },
}

/// What applying one setting did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The file already satisfied the setting; nothing was written.
    Unchanged {
        current: u64,
    },
    Written {
        previous: u64,
    },
}

#[derive(Debug)]
pub struct SysctlOutcome {
    pub setting: SysctlSetting,
    pub result: Result<Applied, SysctlError>,
}

impl SysctlOutcome {
    /// Failed, but in a way the proxy should only warn about.
    pub fn is_warning(&self) -> bool {
        self.result.is_err() && self.setting.failure_is_warning
    }

    /// Failed in a way the caller should treat as an error.
    pub fn is_error(&self) -> bool {
        self.result.is_err() && !self.setting.failure_is_warning
    }
}

/// Writes every setting, going on after failures, and returns one outcome per setting.
pub fn apply_sysctls(settings: &[SysctlSetting]) -> Vec<SysctlOutcome> {
    apply_sysctls_under(Path::new("/"), settings)
}

/// [`apply_sysctls`] with the setting paths taken relative to `root`, so the logic runs against a scratch
/// directory in tests.
pub fn apply_sysctls_under(root: &Path, settings: &[SysctlSetting]) -> Vec<SysctlOutcome> {
    settings
        .iter()
        .map(|setting| SysctlOutcome {
            setting: setting.clone(),
            result: apply_one(&root.join(setting.path.trim_start_matches('/')), setting),
        })
        .collect()
}

/// The number a sysctl file holds.
pub fn read_sysctl(path: &Path) -> Result<u64, SysctlError> {
    let content = fs::read_to_string(path).map_err(|source| SysctlError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    content.trim().parse().map_err(|_| SysctlError::NotANumber {
        path: path.to_path_buf(),
        content: content.trim().to_string(),
    })
}

fn apply_one(path: &Path, setting: &SysctlSetting) -> Result<Applied, SysctlError> {
    let current = read_sysctl(path)?;
    let satisfied = match setting.mode {
        WriteMode::Set => current == setting.value,
        WriteMode::Raise => current >= setting.value,
    };
    if satisfied {
        return Ok(Applied::Unchanged { current });
    }
    fs::write(path, setting.value.to_string()).map_err(|source| SysctlError::Write {
        path: path.to_path_buf(),
        value: setting.value,
        source,
    })?;
    Ok(Applied::Written { previous: current })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn planned(config: &ConntrackSysctlConfig, cpus: usize) -> Vec<(&'static str, u64)> {
        plan_sysctls(config, cpus)
            .into_iter()
            .map(|s| (s.path, s.value))
            .collect()
    }

    #[test]
    fn cpu_lists_count_as_the_kernel_writes_them() {
        assert_eq!(count_cpu_list("0\n"), Some(1));
        assert_eq!(count_cpu_list("0-63\n"), Some(64));
        assert_eq!(count_cpu_list("0-3,8-11,15"), Some(9));
        for bad in ["", "3-1", "a", "0-", "0,,1"] {
            assert_eq!(count_cpu_list(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn defaults_scale_the_table_by_cpus_with_a_floor() {
        let config = ConntrackSysctlConfig::default();
        assert_eq!(
            planned(&config, 2),
            [
                (CONNTRACK_MAX, 131_072),
                (CONNTRACK_HASHSIZE, 32_768),
                (TCP_TIMEOUT_ESTABLISHED, 86_400),
                (TCP_TIMEOUT_CLOSE_WAIT, 3_600),
            ]
        );
        assert_eq!(conntrack_max(&config, 16), Some(524_288));
    }

    #[test]
    fn zeros_leave_the_kernel_alone() {
        let config = ConntrackSysctlConfig {
            max_per_core: 0,
            min: 131_072,
            tcp_established_timeout_secs: 0,
            tcp_close_wait_timeout_secs: 0,
            ..ConntrackSysctlConfig::default()
        };
        assert!(plan_sysctls(&config, 8).is_empty());
    }

    #[test]
    fn optional_settings_appear_when_set() {
        let config = ConntrackSysctlConfig {
            tcp_be_liberal: true,
            udp_timeout_secs: 30,
            udp_stream_timeout_secs: 120,
            ..ConntrackSysctlConfig::default()
        };
        let got = planned(&config, 1);
        assert!(got.contains(&(TCP_BE_LIBERAL, 1)));
        assert!(got.contains(&(UDP_TIMEOUT, 30)));
        assert!(got.contains(&(UDP_TIMEOUT_STREAM, 120)));
    }

    /// A scratch tree with the given files, removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str, files: &[(&str, &str)]) -> Self {
            let root = std::env::temp_dir().join(format!("svcproxy-sysctl-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&root);
            for (path, content) in files {
                let p = root.join(path.trim_start_matches('/'));
                fs::create_dir_all(p.parent().unwrap()).unwrap();
                fs::write(p, content).unwrap();
            }
            Scratch(root)
        }

        fn read(&self, path: &str) -> String {
            fs::read_to_string(self.0.join(path.trim_start_matches('/'))).unwrap()
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn applies_each_item_and_reports_each_outcome() {
        let scratch = Scratch::new(
            "apply",
            &[
                (CONNTRACK_MAX, "65536\n"),
                // Someone already chose more buckets than we would: kept.
                (CONNTRACK_HASHSIZE, "65536\n"),
                (TCP_TIMEOUT_ESTABLISHED, "432000\n"),
                (TCP_TIMEOUT_CLOSE_WAIT, "3600\n"),
            ],
        );
        let outcomes = apply_sysctls_under(&scratch.0, &plan_sysctls(&ConntrackSysctlConfig::default(), 2));
        let results: Vec<Applied> = outcomes.iter().map(|o| *o.result.as_ref().unwrap()).collect();
        assert_eq!(
            results,
            [
                Applied::Written { previous: 65_536 },
                Applied::Unchanged { current: 65_536 },
                Applied::Written { previous: 432_000 },
                Applied::Unchanged { current: 3_600 },
            ]
        );
        assert_eq!(scratch.read(CONNTRACK_MAX), "131072");
        assert_eq!(scratch.read(CONNTRACK_HASHSIZE), "65536\n");
        assert_eq!(scratch.read(TCP_TIMEOUT_ESTABLISHED), "86400");
    }

    #[test]
    fn table_size_failure_is_a_warning_timeout_failure_an_error() {
        // Neither the table size nor the hash size exists here (as when the kernel refuses them in a
        // container); the timeouts' directory exists but one file holds garbage.
        let scratch = Scratch::new(
            "fail",
            &[
                (TCP_TIMEOUT_ESTABLISHED, "86400"),
                (TCP_TIMEOUT_CLOSE_WAIT, "soon"),
            ],
        );
        let outcomes = apply_sysctls_under(&scratch.0, &plan_sysctls(&ConntrackSysctlConfig::default(), 2));
        let summary: Vec<(&str, bool, bool)> = outcomes
            .iter()
            .map(|o| (o.setting.path, o.is_warning(), o.is_error()))
            .collect();
        assert_eq!(
            summary,
            [
                (CONNTRACK_MAX, true, false),
                (CONNTRACK_HASHSIZE, true, false),
                (TCP_TIMEOUT_ESTABLISHED, false, false),
                (TCP_TIMEOUT_CLOSE_WAIT, false, true),
            ]
        );
        assert!(matches!(outcomes[3].result, Err(SysctlError::NotANumber { .. })));
    }
}
