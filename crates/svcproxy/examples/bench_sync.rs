//! Programs N services × M endpoints into a private network namespace through the real binary, fed by a fake
//! API server speaking list/watch, and prints: the first (cold) sync, one endpoint change from API event to
//! kernel, a restart onto rules that are already right (then again after another program committed to
//! nf_tables, so the proxy cannot take the kernel's state on trust), and the peak memory of the proxy.
//!
//! `bench_sync [--services 1000,5000] [--endpoints 10] [--changes 5] [--proxy-mode iptables|nftables]
//! [--iptables-backend auto|nft|legacy] [--dual-stack] [--verify-period 0] [--settle 0] [--takeover]` (root;
//! build the binary first: `cargo build --release --bin svcproxy --example bench_sync`). `--settle N` keeps the first proxy running N
//! seconds after the changes before it is stopped (with a `--verify-period` shorter than that, periodic
//! read-backs run meanwhile) and prints the CPU time it and its children (`iptables-save`, `nft`) used then.
//! `--takeover` then measures a start next to the other mode's rules only, as on a node taken over from
//! kube-proxy in that mode. With `--dual-stack` every Service is RequireDualStack with an IPv6 EndpointSlice
//! as well. The proxy serves both families either way (the IPv6 ruleset is empty without it), and a cold
//! sync or restart is done when both have synced (the changes touch IPv4 slices).

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Value, json};
use svcproxy_testkit::{FakeApiServer, NetNs};

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

fn binary() -> PathBuf {
    let exe = std::env::current_exe().expect("own path");
    exe.parent()
        .and_then(Path::parent)
        .map(|d| d.join("svcproxy"))
        .expect("target directory")
}

fn ip(base: [u8; 4], n: u32) -> String {
    let v = u32::from_be_bytes(base) + n;
    std::net::Ipv4Addr::from(v).to_string()
}

fn ip6(prefix: &str, n: u32) -> String {
    format!("{prefix}{:x}:{:x}", n >> 16, n & 0xffff)
}

fn service(i: u32, dual: bool) -> Value {
    let v4 = ip([10, 96, 128, 0], i + 1);
    let ports = json!([{"name": "http", "protocol": "TCP", "port": 80}]);
    if dual {
        let v6 = ip6("fd00:10:96::", i + 1);
        json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": format!("svc-{i}"), "namespace": "scale"},
            "spec": {"clusterIP": v4, "clusterIPs": [v4, v6], "ipFamilyPolicy": "RequireDualStack",
                     "ipFamilies": ["IPv4", "IPv6"], "ports": ports}})
    } else {
        json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": format!("svc-{i}"), "namespace": "scale"},
            "spec": {"clusterIP": v4, "ports": ports}})
    }
}

/// The IPv6 slice of a dual-stack service.
fn slice6(i: u32, m: u32) -> Value {
    let endpoints: Vec<Value> = (0..m)
        .map(|e| {
            json!({"addresses": [ip6("fd00:10:244::", i * m + e + 1)], "conditions": {"ready": true},
                   "nodeName": if e % 2 == 0 { "node-b" } else { "node-c" }})
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("svc-{i}-v6"), "namespace": "scale", "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
        "addressType": "IPv6", "ports": [{"name": "http", "protocol": "TCP", "port": 8080}], "endpoints": endpoints})
}

fn slice(i: u32, m: u32, generation: u32) -> Value {
    // Endpoint addresses as the reference generator lays them out, skipping .0 and .255; `generation` moves
    // the last endpoint so each change is a real one.
    let endpoints: Vec<Value> = (0..m)
        .map(|e| {
            let mut n = i * m + e + 1 + if e + 1 == m { generation * 7919 } else { 0 };
            n += n / 254 * 2;
            json!({"addresses": [ip([10, 244, 0, 0], n)], "conditions": {"ready": true},
                   "nodeName": if e % 2 == 0 { "node-b" } else { "node-c" }})
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("svc-{i}-1"), "namespace": "scale", "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
        "addressType": "IPv4", "ports": [{"name": "http", "protocol": "TCP", "port": 8080}], "endpoints": endpoints})
}

/// One `synced` log line.
struct Synced {
    at: SystemTime,
    seconds: f64,
    lines: u64,
    kind: String,
}

struct Proxy {
    child: Child,
    log: PathBuf,
    read: usize,
    profiled: bool,
}

impl Proxy {
    fn start(ns: &NetNs, kubeconfig: &Path, log: PathBuf, mode: &str, dual: bool, verify: &str) -> Proxy {
        let backend = arg("--iptables-backend", "auto");
        // BENCH_PROFILER runs the proxy under a profiler, e.g. `heaptrack -o /tmp/proxy-{run}` (`{run}` becomes
        // this run's log name); its peak RSS is then the profiler's.
        let run = log.file_stem().and_then(|s| s.to_str()).unwrap_or("run");
        let profiler = std::env::var("BENCH_PROFILER")
            .unwrap_or_default()
            .replace("{run}", run);
        let profiled = !profiler.is_empty();
        let mut words = profiler.split_whitespace();
        let mut command = match words.next() {
            Some(program) => {
                let mut c = ns.command(program);
                c.args(words).arg(binary());
                c
            }
            None => ns.command(binary().to_str().unwrap()),
        };
        // As the DaemonSet and the image run it (see deploy/).
        command.env("MALLOC_ARENA_MAX", "1").env_remove("RUST_BACKTRACE");
        let child = command
            .args([
                "run",
                "--kubeconfig",
                kubeconfig.to_str().unwrap(),
                "--hostname-override",
                "node-a",
            ])
            .args([
                "--cluster-cidr",
                if dual {
                    "10.244.0.0/16,fd00:10:244::/64"
                } else {
                    "10.244.0.0/16"
                },
                "--log-format",
                "json",
                "--verify-period",
                verify,
            ])
            .args([
                "--proxy-mode",
                mode,
                "--iptables-backend",
                &backend,
                "--min-sync-period",
                "0",
                "--healthz-bind-address",
                "127.0.0.1:10256",
            ])
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .expect("start svcproxy (build it with --release first)");
        Proxy {
            child,
            log,
            read: 0,
            profiled,
        }
    }

    /// Waits until the log holds `text` (anywhere, seen or not).
    fn wait_for_log(&self, text: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !fs::read_to_string(&self.log).unwrap_or_default().contains(text) {
            assert!(Instant::now() < deadline, "no {text:?} within {timeout:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the next `synced` line after those already seen.
    fn next_sync(&mut self, timeout: Duration) -> Synced {
        let deadline = Instant::now() + timeout;
        loop {
            let file = fs::File::open(&self.log).unwrap();
            let lines: Vec<String> = BufReader::new(file).lines().map_while(Result::ok).collect();
            for (i, line) in lines.iter().enumerate().skip(self.read) {
                self.read = i + 1;
                let Ok(v) = serde_json::from_str::<Value>(line) else {
                    continue;
                };
                if v.pointer("/fields/message").and_then(Value::as_str) != Some("synced") {
                    continue;
                }
                let at: jiff::Timestamp = v["timestamp"].as_str().unwrap().parse().unwrap();
                return Synced {
                    at: SystemTime::from(at),
                    seconds: v
                        .pointer("/fields/seconds")
                        .and_then(Value::as_f64)
                        .unwrap_or_default(),
                    lines: v
                        .pointer("/fields/payload_lines")
                        .and_then(Value::as_u64)
                        .unwrap_or_default(),
                    kind: v
                        .pointer("/fields/kind")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .trim_matches('"')
                        .to_string(),
                };
            }
            assert!(
                Instant::now() < deadline,
                "no sync within {timeout:?}; log: {}",
                self.log.display()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for `count` more `synced` lines (one per family for a cold sync or a restart) and returns the
    /// last, with the longest sync's seconds and the lines of all.
    fn next_syncs(&mut self, count: usize, timeout: Duration) -> Synced {
        let mut last = self.next_sync(timeout);
        for _ in 1..count {
            let s = self.next_sync(timeout);
            last = Synced {
                at: s.at.max(last.at),
                seconds: s.seconds.max(last.seconds),
                lines: s.lines + last.lines,
                kind: s.kind,
            };
        }
        last
    }

    /// CPU seconds used so far by the proxy and its children that have ended (`/proc/PID/stat`: utime, stime,
    /// cutime, cstime, in clock ticks).
    fn cpu_seconds(&self, ticks_per_second: f64) -> f64 {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // The fields after the command name, which is in parentheses and may hold spaces.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        // utime is field 14 of the line, the 12th after the name.
        let ticks: f64 = fields
            .iter()
            .skip(11)
            .take(4)
            .filter_map(|f| f.parse::<f64>().ok())
            .sum();
        ticks / ticks_per_second
    }

    /// Peak resident memory so far, from the kernel's high-water mark.
    fn peak_rss_mib(&self) -> f64 {
        self.memory_mib("VmHWM:")
    }

    /// Resident memory now: what a long run of changes leaves behind shows here, not in the peak, which the
    /// cold sync sets.
    fn rss_mib(&self) -> f64 {
        self.memory_mib("VmRSS:")
    }

    fn memory_mib(&self, field: &str) -> f64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map(|kib| kib / 1024.0)
            .unwrap_or_default()
    }

    fn stop(mut self) {
        // SIGTERM: the rules stay, as on a real node during a restart. Under a profiler the proxy is the
        // child's child: the profiler ends once the proxy has, so the next run never finds its ports taken.
        let (program, args) = if self.profiled {
            (
                "pkill",
                vec!["-TERM".to_string(), "-P".into(), self.child.id().to_string()],
            )
        } else {
            ("kill", vec![self.child.id().to_string()])
        };
        let _ = std::process::Command::new(program).args(args).status();
        let _ = self.child.wait();
    }
}

fn main() {
    let sizes: Vec<u32> = arg("--services", "1000,5000")
        .split(',')
        .map(|s| s.parse().unwrap())
        .collect();
    let m: u32 = arg("--endpoints", "10").parse().unwrap();
    let changes: u32 = arg("--changes", "5").parse().unwrap();
    let mode = arg("--proxy-mode", "iptables");
    let dual = std::env::args().any(|a| a == "--dual-stack");
    let verify = arg("--verify-period", "0");
    let settle: u64 = arg("--settle", "0").parse().unwrap();
    let takeover = std::env::args().any(|a| a == "--takeover");
    // svcproxy serves both families wherever the node has them, as the namespace does: a cold sync or a
    // restart is done when both engines have synced, even when only IPv4 has Services.
    let families = 2;
    println!(
        "proxy mode: {mode}{}{}",
        if mode == "iptables" {
            format!(", backend {}", arg("--iptables-backend", "auto"))
        } else {
            String::new()
        },
        if dual { ", dual stack" } else { "" }
    );
    let work = std::env::temp_dir().join(format!("svcproxy-bench-{}", std::process::id()));
    fs::create_dir_all(&work).unwrap();
    println!(
        "| services × endpoints | cold sync | lines | one change: event → kernel (median of {changes}) | of which the sync | change lines | restart sync | restart: start → synced | restart lines | restart after another writer: sync; start → synced | peak RSS: running; restart; restart after another writer |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for n in sizes {
        let ns = NetNs::new("bench").expect("network namespace (run as root)");
        let api = FakeApiServer::start_in(&ns, "127.0.0.1:0".parse().unwrap());
        api.store()
            .apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"}}))
            .unwrap();
        for i in 0..n {
            api.store().apply(service(i, dual)).unwrap();
            api.store().apply(slice(i, m, 0)).unwrap();
            if dual {
                api.store().apply(slice6(i, m)).unwrap();
            }
        }
        let kubeconfig = work.join(format!("kubeconfig-{n}"));
        api.write_kubeconfig(&kubeconfig).unwrap();

        let mut proxy = Proxy::start(
            &ns,
            &kubeconfig,
            work.join(format!("cold-{n}.log")),
            &mode,
            dual,
            &verify,
        );
        // A change made while the cold sync runs (its lists are done, so the change is not in it): it is
        // synced right after the cold sync, ahead of the read-back that follows a sync.
        proxy.wait_for_log("initial lists of", Duration::from_secs(120));
        std::thread::sleep(Duration::from_millis(300));
        api.store().apply(slice(n - 1, m, 1000)).unwrap();
        let cold = proxy.next_syncs(families, Duration::from_secs(600));
        let during = proxy.next_sync(Duration::from_secs(60));
        assert_eq!(
            during.kind, "partial",
            "the change made during the cold sync came after it"
        );
        let after_cold = during
            .at
            .duration_since(cold.at)
            .unwrap_or_default()
            .as_secs_f64()
            * 1000.0;
        let mut latencies = Vec::new();
        let mut sync_times = Vec::new();
        let mut change_lines = 0;
        let mut rss_after_first = 0.0;
        for c in 0..changes {
            let i = (c * 7919) % n;
            let sent = SystemTime::now();
            api.store().apply(slice(i, m, c + 1)).unwrap();
            let s = proxy.next_sync(Duration::from_secs(60));
            latencies.push(s.at.duration_since(sent).unwrap_or_default().as_secs_f64() * 1000.0);
            sync_times.push(s.seconds * 1000.0);
            change_lines = s.lines;
            debug_assert_eq!(s.kind, "partial");
            if c == 0 {
                rss_after_first = proxy.rss_mib();
            }
        }
        let rss_after_all = proxy.rss_mib();
        // The first change is sent the moment the cold sync is logged, when the read-back after it is due.
        let first_change = latencies.first().copied().unwrap_or_default();
        latencies.sort_by(f64::total_cmp);
        sync_times.sort_by(f64::total_cmp);
        let ticks_per_second: f64 = std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0);
        let cpu_before = proxy.cpu_seconds(ticks_per_second);
        std::thread::sleep(Duration::from_secs(settle));
        let idle_cpu = proxy.cpu_seconds(ticks_per_second) - cpu_before;
        let running_peak = proxy.peak_rss_mib();
        proxy.stop();

        let started = SystemTime::now();
        let mut restarted = Proxy::start(
            &ns,
            &kubeconfig,
            work.join(format!("restart-{n}.log")),
            &mode,
            dual,
            "0",
        );
        let restart = restarted.next_syncs(families, Duration::from_secs(600));
        let restart_wall = restart
            .at
            .duration_since(started)
            .unwrap_or_default()
            .as_secs_f64();
        let restart_peak = restarted.peak_rss_mib();
        restarted.stop();

        // Another program commits to nf_tables while the proxy is down (a table of its own, touching none of
        // ours): the restart can no longer take the kernel's state on trust and reads it.
        let other = match mode.as_str() {
            "nftables" => ns.exec(&["nft", "add", "table", "ip", "bench-other-writer"]),
            _ => ns.exec(&["iptables", "-t", "filter", "-N", "BENCH-OTHER-WRITER"]),
        };
        assert!(
            other.is_ok_and(|o| o.status.success()),
            "the other writer's commit"
        );
        let started = SystemTime::now();
        let mut reread = Proxy::start(
            &ns,
            &kubeconfig,
            work.join(format!("reread-{n}.log")),
            &mode,
            dual,
            "0",
        );
        let reread_sync = reread.next_syncs(families, Duration::from_secs(600));
        let reread_wall = reread_sync
            .at
            .duration_since(started)
            .unwrap_or_default()
            .as_secs_f64();
        let reread_peak = reread.peak_rss_mib();
        reread.stop();
        println!(
            "| {n} × {m} | {:.2} s | {} | {:.1} ms | {:.1} ms | {change_lines} | {:.2} s | {restart_wall:.2} s | {} | {:.2} s; {reread_wall:.2} s | {running_peak:.0}; {restart_peak:.0}; {reread_peak:.0} MiB |",
            cold.seconds,
            cold.lines,
            latencies[latencies.len() / 2],
            sync_times[sync_times.len() / 2],
            restart.seconds,
            restart.lines,
            reread_sync.seconds
        );
        println!(
            "{n} × {m}: a change made during the cold sync was in the kernel {after_cold:.1} ms after it; the \
             first change sent as the cold sync ended, {first_change:.1} ms event → kernel"
        );
        if changes > 1 {
            println!(
                "{n} × {m}: resident memory {rss_after_first:.1} MiB after the first change, \
                 {rss_after_all:.1} MiB after all {changes}"
            );
        }
        if settle > 0 {
            println!(
                "{n} × {m}: idle for {settle} s with --verify-period {verify}: {idle_cpu:.2} s of CPU (the proxy and its children)"
            );
        }
        if takeover {
            // A node taken over from a proxy in the other mode, whose rules alone are there: upstream's
            // chains in nat and filter (written here by svcproxy in iptables mode), or a table of the
            // nftables mode. The proxy starting puts its own rules in, then removes those.
            let other = if mode == "nftables" {
                let _ = ns.exec(&["nft", "delete", "table", "ip", "svcproxy"]);
                let _ = ns.exec(&["nft", "delete", "table", "ip6", "svcproxy"]);
                "iptables"
            } else {
                // Stopped once synced, svcproxy in nftables mode has removed our chains itself and keeps
                // its table, the only rules left.
                "nftables"
            };
            let mut before = Proxy::start(
                &ns,
                &kubeconfig,
                work.join(format!("{other}-{n}.log")),
                other,
                dual,
                "0",
            );
            before.next_syncs(families, Duration::from_secs(600));
            before.stop();
            let started = SystemTime::now();
            let mut after = Proxy::start(
                &ns,
                &kubeconfig,
                work.join(format!("takeover-{n}.log")),
                &mode,
                dual,
                "0",
            );
            let first = after.next_syncs(families, Duration::from_secs(900));
            let wall = first.at.duration_since(started).unwrap_or_default().as_secs_f64();
            let cpu = after.cpu_seconds(ticks_per_second);
            after.stop();
            println!(
                "{n} × {m}: taking over from {other} mode's rules: synced {wall:.2} s after start (the sync {:.2} s, {} lines), {cpu:.2} s of CPU by then (the proxy and its children)",
                first.seconds, first.lines
            );
        }
    }
    // BENCH_KEEP keeps the proxies' logs.
    if std::env::var_os("BENCH_KEEP").is_some() {
        println!("logs: {}", work.display());
    } else {
        let _ = fs::remove_dir_all(&work);
    }
}
