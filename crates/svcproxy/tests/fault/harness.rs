//! What every fault case needs: a client that keeps sending traffic through a Service and remembers every
//! answer, a watcher that records every `/healthz` transition, a view of the kernel's rules, wrapper binaries
//! that make `iptables-restore` misbehave on purpose, and a Prometheus reader.
//!
//! All timestamps are offsets from the case's origin, so traffic, health and fault injection line up.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use svcproxy_iptables::seal::SEAL_CHAIN;
use svcproxy_testkit::{Backend, Lab, NetNs, Pod};

use crate::common::{HEALTHZ, TempDir};

/// How often the watchers poll; fine enough to time detection and repair to a tenth of a second.
pub const POLL: Duration = Duration::from_millis(100);
/// A safety net for eventually-consistent outcomes, never a latency requirement: generous on purpose, because
/// the suite runs cases in parallel on small machines.
pub const WAIT: Duration = Duration::from_secs(45);
/// Per-request timeout of the traffic loop: a dropped packet shows as a failure within this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause between two requests of the traffic loop.
const REQUEST_GAP: Duration = Duration::from_millis(50);

pub fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// A node with pods answering on TCP 8080 and UDP 5353 (identity = pod name) and a client pod.
pub struct Cluster {
    pub lab: Lab,
    pub pods: Vec<Pod>,
    _backends: Vec<Backend>,
    pub client: Pod,
}

impl Cluster {
    /// `pods` are (name, address); the client sits at 10.244.0.50.
    pub fn new(pods: &[(&str, Ipv4Addr)]) -> Cluster {
        let lab = Lab::new();
        let pods: Vec<Pod> = pods.iter().map(|(name, ip)| lab.add_pod(name, *ip)).collect();
        let backends = pods
            .iter()
            .map(|p| Backend::start(p.ns(), p.name(), &[8080], &[5353]))
            .collect();
        let client = lab.add_pod("client", Ipv4Addr::new(10, 244, 0, 50));
        Cluster {
            lab,
            pods,
            _backends: backends,
            client,
        }
    }

    pub fn node(&self) -> &NetNs {
        self.lab.node()
    }
}

/// One answer (the backend's identity) or failure (why) of the traffic loop.
#[derive(Clone, Debug)]
pub struct Sample {
    pub at: Duration,
    pub outcome: Result<String, String>,
}

/// A client sending one TCP request after another to a Service from inside a namespace, in the background,
/// for the whole case: what users of the Service would have seen while the fault played out.
pub struct Traffic {
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Traffic {
    pub fn start(ns: &NetNs, target: SocketAddr, origin: Instant) -> Traffic {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = ns.spawn_thread({
            let (samples, stop) = (Arc::clone(&samples), Arc::clone(&stop));
            move || {
                while !stop.load(Ordering::Relaxed) {
                    let at = origin.elapsed();
                    let outcome = tcp_identity(target);
                    samples.lock().unwrap().push(Sample { at, outcome });
                    std::thread::sleep(REQUEST_GAP);
                }
            }
        });
        Traffic {
            samples,
            stop,
            thread: Some(thread),
        }
    }

    pub fn samples(&self) -> Vec<Sample> {
        self.samples.lock().unwrap().clone()
    }

    /// Samples taken at or after `from`.
    pub fn since(&self, from: Duration) -> Vec<Sample> {
        self.samples().into_iter().filter(|s| s.at >= from).collect()
    }

    /// Waits until at least `n` more requests have completed, so a check sees fresh traffic.
    pub fn wait_fresh(&self, n: usize) {
        let start = self.samples.lock().unwrap().len();
        svcproxy_testkit::wait_until(WAIT, POLL, "the traffic loop makes progress", || {
            (self.samples.lock().unwrap().len() >= start + n).then_some(())
        });
    }

    /// The samples of the last `n` requests from now on.
    pub fn next(&self, n: usize) -> Vec<Sample> {
        let start = self.samples.lock().unwrap().len();
        self.wait_fresh(n);
        self.samples()[start..].to_vec()
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn tcp_identity(target: SocketAddr) -> Result<String, String> {
    let mut stream =
        TcpStream::connect_timeout(&target, REQUEST_TIMEOUT).map_err(|e| e.kind().to_string())?;
    stream
        .set_read_timeout(Some(REQUEST_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut text = String::new();
    stream
        .read_to_string(&mut text)
        .map_err(|e| e.kind().to_string())?;
    text.split_whitespace()
        .next()
        .map(str::to_owned)
        .ok_or_else(|| "empty reply".to_owned())
}

pub fn identities(samples: &[Sample]) -> BTreeSet<String> {
    samples.iter().filter_map(|s| s.outcome.clone().ok()).collect()
}

pub fn failures(samples: &[Sample]) -> usize {
    samples.iter().filter(|s| s.outcome.is_err()).count()
}

/// Runs of consecutive failed requests: (first failure, first success after it, or the last sample).
pub fn outages(samples: &[Sample]) -> Vec<(Duration, Duration)> {
    let mut out = Vec::new();
    let mut start = None;
    for s in samples {
        match (&s.outcome, start) {
            (Err(_), None) => start = Some(s.at),
            (Ok(_), Some(from)) => {
                out.push((from, s.at));
                start = None;
            }
            _ => {}
        }
    }
    if let (Some(from), Some(last)) = (start, samples.last()) {
        out.push((from, last.at));
    }
    out
}

/// One line for the report: how many requests, how many failed, and the outages.
pub fn traffic_summary(samples: &[Sample]) -> String {
    let outages: Vec<String> = outages(samples)
        .iter()
        .map(|(a, b)| format!("{}..{}", secs(*a), secs(*b)))
        .collect();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for s in samples {
        let key = match &s.outcome {
            Ok(id) => id.clone(),
            Err(e) => format!("<{e}>"),
        };
        *seen.entry(key).or_default() += 1;
    }
    format!(
        "{} requests, {} failed {seen:?}{}",
        samples.len(),
        failures(samples),
        if outages.is_empty() {
            String::new()
        } else {
            format!(", outages {}", outages.join(" "))
        }
    )
}

/// A `/healthz` answer: the status (0 when nothing answered) and the `reason` field, if any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthPoint {
    pub at: Duration,
    pub status: u16,
    pub reason: Option<String>,
}

/// Polls `/healthz` in the node namespace in the background and keeps every change of status or reason.
pub struct HealthWatch {
    points: Arc<Mutex<Vec<HealthPoint>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HealthWatch {
    pub fn start(node: &NetNs, origin: Instant) -> HealthWatch {
        let points = Arc::new(Mutex::new(Vec::<HealthPoint>::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let addr: SocketAddr = HEALTHZ.parse().unwrap();
        let thread = node.spawn_thread({
            let (points, stop) = (Arc::clone(&points), Arc::clone(&stop));
            move || {
                while !stop.load(Ordering::Relaxed) {
                    let at = origin.elapsed();
                    let (status, reason) = healthz(addr);
                    let mut points = points.lock().unwrap();
                    let changed = points
                        .last()
                        .is_none_or(|p| p.status != status || p.reason != reason);
                    if changed {
                        points.push(HealthPoint { at, status, reason });
                    }
                    drop(points);
                    std::thread::sleep(POLL);
                }
            }
        });
        HealthWatch {
            points,
            stop,
            thread: Some(thread),
        }
    }

    pub fn points(&self) -> Vec<HealthPoint> {
        self.points.lock().unwrap().clone()
    }

    pub fn current(&self) -> Option<HealthPoint> {
        self.points.lock().unwrap().last().cloned()
    }

    /// The first recorded answer at or after `from` that satisfies `pred`.
    pub fn first_after(&self, from: Duration, pred: impl Fn(&HealthPoint) -> bool) -> Option<HealthPoint> {
        self.points().into_iter().find(|p| p.at >= from && pred(p))
    }

    /// Waits until the latest answer satisfies `pred` and returns it.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&HealthPoint) -> bool,
    ) -> HealthPoint {
        svcproxy_testkit::wait_until(timeout, POLL, what, || self.current().filter(|p| pred(p)))
    }

    /// `200@0.3s → 503@5.1s (reason) → 200@9.2s`, with reasons shortened and long flapping elided.
    pub fn summary(&self) -> String {
        let parts: Vec<String> = self
            .points()
            .iter()
            .map(|p| {
                let status = if p.status == 0 {
                    "down".to_owned()
                } else {
                    p.status.to_string()
                };
                match &p.reason {
                    Some(r) => format!("{status}@{} ({})", secs(p.at), shorten(r, 150)),
                    None => format!("{status}@{}", secs(p.at)),
                }
            })
            .collect();
        if parts.len() > 10 {
            format!(
                "{} → … {} more transitions … → {}",
                parts[..6].join(" → "),
                parts.len() - 8,
                parts[parts.len() - 2..].join(" → ")
            )
        } else {
            parts.join(" → ")
        }
    }
}

impl Drop for HealthWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub fn shorten(text: &str, max: usize) -> String {
    let one_line = text.replace('\n', " ");
    match one_line.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &one_line[..i]),
        None => one_line,
    }
}

fn healthz(addr: SocketAddr) -> (u16, Option<String>) {
    let get = || -> std::io::Result<String> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        write!(stream, "GET /healthz HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut raw = String::new();
        stream.read_to_string(&mut raw)?;
        Ok(raw)
    };
    let Ok(raw) = get() else { return (0, None) };
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    let reason = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("reason").and_then(|r| r.as_str()).map(str::to_owned));
    (status, reason)
}

/// `iptables-save -t <table>` (or another save binary, e.g. the legacy one) inside `ns`.
pub fn save_with(ns: &NetNs, program: &str, table: &str) -> String {
    ns.exec_stdout(&[program, "-t", table])
        .unwrap_or_else(|e| panic!("{program} -t {table}: {e}"))
}

pub fn save(ns: &NetNs, table: &str) -> String {
    save_with(ns, "iptables-save", table)
}

/// Chains of a dump with their rules (the `-A CHAIN` prefix removed), in the dump's rule order.
pub fn chains(dump: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in dump.lines() {
        if let Some(decl) = line.strip_prefix(':') {
            if let Some(name) = decl.split_whitespace().next() {
                out.entry(name.to_owned()).or_default();
            }
        } else if let Some(rule) = line.strip_prefix("-A ")
            && let Some((chain, args)) = rule.split_once(' ')
        {
            out.entry(chain.to_owned()).or_default().push(args.to_owned());
        }
    }
    out
}

/// Chain names of a dump that start with `prefix`.
pub fn chain_names(dump: &str, prefix: &str) -> BTreeSet<String> {
    chains(dump)
        .into_keys()
        .filter(|c| c.starts_with(prefix))
        .collect()
}

/// Differences between two dumps, chain by chain, our seal aside (empty when they hold the same rules in the
/// same order).
pub fn dump_diff(before: &str, after: &str) -> Vec<String> {
    let (a, b) = (chains(before), chains(after));
    // The seal changes with every write by design (it names the generation the write ended at).
    let names: BTreeSet<&String> = a
        .keys()
        .chain(b.keys())
        .filter(|n| n.as_str() != SEAL_CHAIN)
        .collect();
    let mut out = Vec::new();
    for name in names {
        match (a.get(name), b.get(name)) {
            (Some(x), Some(y)) if x == y => {}
            (Some(_), None) => out.push(format!("{name}: gone")),
            (None, Some(_)) => out.push(format!("{name}: new")),
            (Some(x), Some(y)) => out.push(format!("{name}: {x:?} became {y:?}")),
            (None, None) => {}
        }
    }
    out
}

/// A restore payload that (re)creates exactly `wanted` chains of `table` from a saved dump, with their rules
/// and nothing else: what another writer would send to put its chains back on a node.
pub fn extract(dump: &str, table: &str, wanted: &[&str]) -> String {
    let all = {
        let mut current = None;
        let mut section = String::new();
        for line in dump.lines() {
            if let Some(t) = line.strip_prefix('*') {
                current = Some(t == table);
            } else if current == Some(true) && line != "COMMIT" {
                section.push_str(line);
                section.push('\n');
            }
        }
        chains(&section)
    };
    let mut out = format!("*{table}\n");
    for name in wanted {
        assert!(all.contains_key(*name), "{name} is not in the {table} dump");
        out.push_str(&format!(":{name} - [0:0]\n"));
    }
    for name in wanted {
        for rule in &all[*name] {
            out.push_str(&format!("-A {name} {rule}\n"));
        }
    }
    out.push_str("COMMIT\n");
    out
}

/// Feeds `payload` to a restore binary inside `ns`, with `extra` flags (e.g. `--noflush`).
pub fn restore(ns: &NetNs, program: &str, extra: &[&str], payload: &str) {
    let mut child = ns
        .command(program)
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    child.stdin.take().unwrap().write_all(payload.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{program} {extra:?} failed: {}\npayload:\n{payload}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `iptables …` inside the node namespace, as another program on the node would run it.
pub fn iptables(ns: &NetNs, args: &[&str]) {
    let mut argv = vec!["iptables", "-w"];
    argv.extend_from_slice(args);
    ns.exec(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
}

/// The sum of every sample of `name` whose labels include all of `labels` (0 when there is none), from a
/// Prometheus or OpenMetrics text exposition. Summing makes the reading independent of label order and of
/// labels the test does not care about.
pub fn metric(exposition: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut total = 0.0;
    for line in exposition.lines().filter(|l| !l.starts_with('#')) {
        let Some((key, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (sample, label_text) = match key.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (key, ""),
        };
        if sample != name {
            continue;
        }
        let present: Vec<&str> = label_text.split(',').map(str::trim).collect();
        if labels
            .iter()
            .all(|(k, v)| present.contains(&format!("{k}=\"{v}\"").as_str()))
        {
            total += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    total
}

/// A directory of executables put first in svcproxy's `PATH`, standing in for the iptables tools.
pub struct Wrappers {
    dir: TempDir,
}

impl Wrappers {
    pub fn new() -> Wrappers {
        Wrappers {
            dir: TempDir::new("wrappers"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes an executable shell script called `name`.
    pub fn script(&self, name: &str, body: &str) {
        let path = self.dir.path().join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// The `PATH` that finds these wrappers before the real tools.
    pub fn path_env(&self) -> String {
        let rest = std::env::var("PATH").unwrap_or_default();
        format!("{}:{rest}", self.dir.path().display())
    }
}

/// Where `program` is on this process's `PATH`, so a wrapper can hand over to the real binary by full path.
pub fn real_binary(program: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("`{program}` is not on PATH; the fault-injection tests need it"))
}

/// Panics, naming the tool, unless `program --version` runs: real-kernel cases fail rather than skip.
pub fn require_tool(program: &str) {
    let ok = Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "this case needs `{program}` on PATH, and it does not run");
}

/// `ip:port` as a socket address.
pub fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// Polls `f` until it returns `Some`, giving the case time (from `origin`) at which it did.
pub fn measure<T>(
    origin: Instant,
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> (Duration, T) {
    let value = svcproxy_testkit::wait_until(timeout, POLL, what, &mut f);
    (origin.elapsed(), value)
}

/// Like `wait_until`, but gives `None` at the deadline instead of panicking, so a case can report every
/// measurement before it asserts.
pub fn poll_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(POLL);
    }
}

/// The last `n` lines of svcproxy's log, for failure messages that stay readable.
pub fn log_tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
