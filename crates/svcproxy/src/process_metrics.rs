//! The process's own resource use under the `process_*` names every Prometheus client library exports, as
//! kube-proxy does: the usual kube-proxy dashboards chart its memory and CPU from them, and alerts key on
//! `process_start_time_seconds` for restarts. Read from `/proc` at each scrape, so nothing runs between
//! scrapes.

use std::path::PathBuf;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// `/proc` reports process times in USER_HZ ticks, which the kernel fixes at 100 on every architecture it
/// exports to user space (whatever the internal HZ), so no `sysconf` call is needed.
const USER_HZ: f64 = 100.0;

/// One reading of the process, each value absent when its file could not be read or parsed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProcessSample {
    pub cpu_seconds: Option<f64>,
    pub resident_bytes: Option<u64>,
    pub virtual_bytes: Option<u64>,
    pub start_time_seconds: Option<f64>,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
    pub max_virtual_bytes: Option<u64>,
}

/// The fields of `/proc/<pid>/stat` used here.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Stat {
    ticks: u64,
    start_ticks: u64,
    virtual_bytes: u64,
}

/// Reads `stat`'s fields after the command name, which may itself hold spaces and parentheses: everything
/// up to the last `)` is the pid and name. Field numbers are those of proc(5).
fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // proc(5) counts from 1 and the name is field 2, so field n is fields[n - 3].
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(Stat {
        ticks: field(14)? + field(15)?,
        start_ticks: field(22)?,
        virtual_bytes: field(23)?,
    })
}

/// `VmRSS` of `/proc/<pid>/status`, in bytes (the file counts kB, whatever the page size).
fn parse_resident(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// When the machine booted, in seconds since the epoch: `btime` of `/proc/stat`.
fn parse_boot_time(stat: &str) -> Option<u64> {
    stat.lines()
        .find_map(|l| l.strip_prefix("btime ")?.trim().parse().ok())
}

/// The soft limit of one line of `/proc/<pid>/limits` ("Max open files  1024  524288  files"); unlimited is
/// reported as the largest value, as Prometheus's Go client reports it.
fn parse_limit(limits: &str, name: &str) -> Option<u64> {
    let rest = limits.lines().find_map(|l| l.strip_prefix(name))?;
    match rest.split_whitespace().next()? {
        "unlimited" => Some(u64::MAX),
        soft => soft.parse().ok(),
    }
}

/// Where the collector reads: a process's `/proc/<pid>` directory and the machine's `/proc/stat`.
#[derive(Debug, Clone)]
pub struct ProcessCollector {
    process_dir: PathBuf,
    machine_stat: PathBuf,
}

impl Default for ProcessCollector {
    fn default() -> Self {
        ProcessCollector {
            process_dir: PathBuf::from("/proc/self"),
            machine_stat: PathBuf::from("/proc/stat"),
        }
    }
}

impl ProcessCollector {
    pub fn reading(process_dir: PathBuf, machine_stat: PathBuf) -> Self {
        ProcessCollector {
            process_dir,
            machine_stat,
        }
    }

    pub fn sample(&self) -> ProcessSample {
        let read = |name: &str| std::fs::read_to_string(self.process_dir.join(name)).ok();
        let stat = read("stat").as_deref().and_then(parse_stat);
        let boot = std::fs::read_to_string(&self.machine_stat)
            .ok()
            .as_deref()
            .and_then(parse_boot_time);
        let limits = read("limits");
        ProcessSample {
            cpu_seconds: stat.map(|s| s.ticks as f64 / USER_HZ),
            resident_bytes: read("status").as_deref().and_then(parse_resident),
            virtual_bytes: stat.map(|s| s.virtual_bytes),
            start_time_seconds: stat
                .zip(boot)
                .map(|(s, boot)| boot as f64 + s.start_ticks as f64 / USER_HZ),
            open_fds: std::fs::read_dir(self.process_dir.join("fd"))
                .ok()
                .map(|entries| entries.count() as u64),
            max_fds: limits.as_deref().and_then(|l| parse_limit(l, "Max open files")),
            max_virtual_bytes: limits
                .as_deref()
                .and_then(|l| parse_limit(l, "Max address space")),
        }
    }
}

fn gauge(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: Option<f64>,
) -> std::fmt::Result {
    let Some(value) = value else {
        return Ok(());
    };
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        let s = self.sample();
        if let Some(cpu) = s.cpu_seconds {
            let metric = ConstCounter::new(cpu);
            metric.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                metric.metric_type(),
            )?)?;
        }
        let bytes = |v: Option<u64>| v.map(|v| v as f64);
        gauge(
            &mut encoder,
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            bytes(s.resident_bytes),
        )?;
        gauge(
            &mut encoder,
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes",
            bytes(s.virtual_bytes),
        )?;
        gauge(
            &mut encoder,
            "process_virtual_memory_max_bytes",
            "Maximum amount of virtual memory available in bytes",
            bytes(s.max_virtual_bytes),
        )?;
        gauge(
            &mut encoder,
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds",
            s.start_time_seconds,
        )?;
        gauge(
            &mut encoder,
            "process_open_fds",
            "Number of open file descriptors",
            bytes(s.open_fds),
        )?;
        gauge(
            &mut encoder,
            "process_max_fds",
            "Maximum number of open file descriptors",
            bytes(s.max_fds),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A command name with a space and a parenthesis, as a process may name itself.
    const STAT: &str = "4242 (svc proxy) S 1 4242 4242 0 -1 4194560 1520 0 0 0 250 75 0 0 20 0 9 0 \
                        123456 105000000 2500 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0\n";

    #[test]
    fn stat_fields_are_read_after_the_last_parenthesis() {
        assert_eq!(
            parse_stat(STAT),
            Some(Stat {
                ticks: 325,
                start_ticks: 123456,
                virtual_bytes: 105_000_000
            })
        );
        assert_eq!(parse_stat("4242 (svcproxy) S 1"), None);
    }

    #[test]
    fn status_limits_and_boot_time_are_parsed() {
        assert_eq!(
            parse_resident("Name:\tsvcproxy\nVmRSS:\t   30412 kB\n"),
            Some(30412 * 1024)
        );
        assert_eq!(
            parse_boot_time("cpu  1 2 3\nbtime 1764100000\nprocesses 9\n"),
            Some(1_764_100_000)
        );
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max address space         unlimited            unlimited            bytes\n\
                      Max open files            1024                 524288               files\n";
        assert_eq!(parse_limit(limits, "Max open files"), Some(1024));
        assert_eq!(parse_limit(limits, "Max address space"), Some(u64::MAX));
    }

    #[test]
    fn a_fixture_process_is_sampled_whole() {
        let dir = std::env::temp_dir().join(format!("svcproxy-proc-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("fd")).unwrap();
        for fd in ["0", "1", "2"] {
            std::fs::write(dir.join("fd").join(fd), "").unwrap();
        }
        std::fs::write(dir.join("stat"), STAT).unwrap();
        std::fs::write(dir.join("status"), "VmRSS:\t 2048 kB\n").unwrap();
        std::fs::write(
            dir.join("limits"),
            "Max open files            1024     4096     files\n",
        )
        .unwrap();
        std::fs::write(dir.join("machine-stat"), "btime 1000\n").unwrap();
        let sample = ProcessCollector::reading(dir.clone(), dir.join("machine-stat")).sample();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            sample,
            ProcessSample {
                cpu_seconds: Some(3.25),
                resident_bytes: Some(2048 * 1024),
                virtual_bytes: Some(105_000_000),
                start_time_seconds: Some(1000.0 + 1234.56),
                open_fds: Some(3),
                max_fds: Some(1024),
                max_virtual_bytes: None,
            }
        );
    }
}
