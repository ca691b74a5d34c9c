//! Fault injection on a real kernel in nftables mode: the same discipline as the iptables suite
//! (`fault_injection.rs`) applied to our own table `ip svcproxy`. Each case builds a node in network
//! namespaces, runs svcproxy with `--proxy-mode nftables`, keeps a client sending traffic through a Service the
//! whole time, injects one fault, and asserts on outcomes: the table converges to what the cluster says,
//! traffic comes back (or never stops), and `/healthz` tells the truth meanwhile. Times to detect and to repair
//! are measured and printed, never asserted.
//!
//! | case | fault |
//! |---|---|
//! | N-A | our table deleted (`nft delete table ip svcproxy`) |
//! | N-B1 | one of our chains flushed |
//! | N-B2 | a rule inserted into one of our chains |
//! | N-B3 | a map element removed |
//! | N-C | a second writer re-adds a foreign rule to one of our chains every second |
//! | N-D | `nft -f` fails four times in a row |
//! | N-E | the kernel lacks `numgen` (every transaction using it refused, the start-up probe included) |
//! | N-F | takeover from upstream kube-proxy's nftables mode (its `ip kube-proxy` table) under traffic |
//! | N-G | kube-proxy's iptables chains appear next to our table while running |
//!
//! Every case records a row in the suite's results table (see `fault::report`); run with `--nocapture` to
//! watch.

mod common;

/// The shared fault-injection helpers, without the iptables cases that `fault/mod.rs` also declares: those
/// run in their own test binary.
#[allow(dead_code)]
mod fault {
    #[path = "harness.rs"]
    pub mod harness;
    #[path = "manifests.rs"]
    pub mod manifests;
    #[path = "report.rs"]
    pub mod report;
    #[path = "second_writer.rs"]
    pub mod second_writer;
    #[path = "web.rs"]
    pub mod web;
    #[path = "write_failures.rs"]
    pub mod write_failures;
}

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Duration;

use common::{Svcproxy, TempDir};
use fault::harness::{
    Cluster, HealthWatch, Traffic, WAIT, Wrappers, addr, failures, identities, log_tail, measure, metric,
    poll_for, real_binary, require_tool, traffic_summary,
};
use fault::report::Case;
use fault::second_writer::{Fight, SYNC_PERIOD_S, SecondWriter, WRITER_COMMENT, fight_and_settle};
use fault::web::{VIP, WebNode, names, spn};
use fault::write_failures::writes_refused_then_recovered;
use svcproxy_nftables::names::{SERVICE_IPS, cluster_chain};
use svcproxy_nftables::{Family, Ruleset, parse_listing};
use svcproxy_testkit::{Backend, Lab, NetNs, wait_until};

const NFTABLES: [&str; 2] = ["--proxy-mode", "nftables"];
/// The fast checks (the 2-second canary, and the 2-second read-back the edits run with) must notice an edit
/// well before the default 60-second read-back would: a longer deadline could pass on the wrong check.
const DETECT: Duration = Duration::from_secs(30);

/// Our table as the kernel lists it (`None` when it does not exist), without what traffic writes (affinity
/// sets), so two readings compare equal exactly when svcproxy's own content is the same.
fn our_table(ns: &NetNs) -> Option<Ruleset> {
    let text = ns.exec_stdout(&["nft", "list", "table", "ip", "svcproxy"]).ok()?;
    let listing = parse_listing(&text).unwrap_or_else(|e| panic!("our table does not parse: {e}\n{text}"));
    listing
        .table(Family::Ip, "svcproxy")
        .map(Ruleset::without_dynamic_elements)
}

/// `nft ARGS…` in the node namespace, as another program on the node would run it.
fn nft(ns: &NetNs, args: &[&str]) {
    let mut argv = vec!["nft"];
    argv.extend_from_slice(args);
    ns.exec(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
}

/// Objects of `want` that `got` lacks or holds differently, and objects `got` has in addition: a readable
/// account of how the kernel's table differs from a snapshot.
fn table_diff(want: &Ruleset, got: Option<&Ruleset>) -> Vec<String> {
    let Some(got) = got else {
        return vec!["table ip svcproxy is missing".into()];
    };
    let mut out = Vec::new();
    for (name, chain) in &want.chains {
        match got.chains.get(name) {
            None => out.push(format!("chain {name}: missing")),
            Some(c) if c != chain => {
                out.push(format!("chain {name}: {:?} became {:?}", chain.rules, c.rules))
            }
            Some(_) => {}
        }
    }
    for (name, set) in &want.sets {
        match got.sets.get(name) {
            None => out.push(format!("set {name}: missing")),
            Some(s) if s != set => out.push(format!(
                "set {name}: elements {:?} became {:?}",
                set.elements.keys().collect::<Vec<_>>(),
                s.elements.keys().collect::<Vec<_>>()
            )),
            Some(_) => {}
        }
    }
    out.extend(
        got.chains
            .keys()
            .filter(|n| !want.chains.contains_key(*n))
            .map(|n| format!("chain {n}: not written by svcproxy")),
    );
    out.extend(
        got.sets
            .keys()
            .filter(|n| !want.sets.contains_key(*n))
            .map(|n| format!("set {n}: not written by svcproxy")),
    );
    out
}

/// A log line without its terminal colours and without the timestamp, level and target before the message.
fn plain(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // An escape sequence runs up to its final letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    match out.split_once(": ") {
        Some((_, message)) => message.to_string(),
        None => out,
    }
}

fn divergence_lines(proxy: &Svcproxy) -> Vec<String> {
    proxy
        .log()
        .lines()
        .filter(|l| l.contains("kernel diverges from what was written"))
        .map(str::to_owned)
        .collect()
}

/// demo/web's chain that picks among its endpoints.
fn web_chain() -> String {
    cluster_chain(&spn())
}

/// The common shape of the one-off edits: snapshot our table, break it, then time detection (a divergence
/// logged, by the check `by`) and repair (the table exactly as before, traffic answered by both pods, health
/// 200 without a reason).
fn one_off_edit(name: &'static str, args: &[&str], by: &str, break_it: impl FnOnce(&NetNs)) {
    let mut case = Case::new(name);
    let mut all = NFTABLES.to_vec();
    all.extend_from_slice(args);
    let mut s = WebNode::start(&case, &all, &[]);
    let before = our_table(s.cluster.node()).expect("svcproxy wrote its table");
    let divergences_before = divergence_lines(&s.proxy).len();
    let metrics_before = s.metrics();

    case.stage("editing our table behind svcproxy's back");
    case.injected();
    break_it(s.cluster.node());
    let (detected_at, ()) = measure(case.origin(), "the divergence is logged", DETECT, || {
        s.proxy.assert_running();
        (divergence_lines(&s.proxy).len() > divergences_before).then_some(())
    });
    case.detected(detected_at);
    let line = divergence_lines(&s.proxy)[divergences_before].clone();
    case.stage("waiting for the repair");
    let repaired = poll_for(WAIT, || {
        table_diff(&before, our_table(s.cluster.node()).as_ref())
            .is_empty()
            .then_some(())
    });
    if repaired.is_some() {
        case.repaired(case.now());
    }
    let left = table_diff(&before, our_table(s.cluster.node()).as_ref());
    assert!(
        left.is_empty(),
        "the table is not as svcproxy wrote it {}s after the edit: {left:?}\n{}",
        WAIT.as_secs(),
        log_tail(&s.proxy.log(), 12)
    );
    s.wait_traffic(&["pod11", "pod12"]);
    s.health.wait_for("healthz is 200 without a reason", WAIT, |p| {
        p.status == 200 && p.reason.is_none()
    });
    let metrics = s.metrics();
    let counted = |name: &str| metric(&metrics, name, &[]) - metric(&metrics_before, name, &[]);
    let (divergences, repairs) = (
        counted("svcproxy_divergences_total"),
        counted("svcproxy_repairs_total"),
    );
    case.note(format!(
        "first finding: {}",
        fault::harness::shorten(&plain(&line), 200)
    ));
    case.note(format!(
        "divergences counted {divergences}, repairs counted {repairs}"
    ));
    case.note(format!(
        "traffic after injection: {}",
        traffic_summary(&s.traffic.since(case.injected_at()))
    ));
    case.health(s.health.summary());
    assert!(
        line.contains(by),
        "the {by} check finds this edit, not another one: {line}"
    );
    assert!(line.contains("ip svcproxy"), "the log names the table: {line}");
    assert!(
        divergences >= 1.0,
        "the divergence is counted in svcproxy_divergences_total"
    );
    assert!(repairs >= 1.0, "the repair is counted in svcproxy_repairs_total");
    s.proxy.assert_running();
}

/// N-A: the whole table deleted, as `nft flush ruleset` in a careless script or another tool's cleanup would.
/// The canary (a 2-second listing of one base chain) catches it with default flags, and the repair is a cold
/// sync that writes the table afresh.
#[test]
fn na_table_deleted() {
    one_off_edit("N-A table deleted", &[], "canary", |node| {
        nft(node, &["delete", "table", "ip", "svcproxy"]);
    });
}

/// N-B1: demo/web's endpoint-picking chain flushed: its map element still leads there, but nothing is DNATed.
/// Only a full read-back sees inside per-service chains, so this runs with `--verify-period 2s`.
#[test]
fn nb1_chain_flushed() {
    one_off_edit(
        "N-B1 service chain flushed",
        &["--verify-period", "2s"],
        "periodic",
        |node| nft(node, &["flush", "chain", "ip", "svcproxy", &web_chain()]),
    );
}

/// N-B2: a rule inserted at the top of demo/web's chain that sends every connection to one endpoint; traffic
/// still flows, to the wrong share of pods.
#[test]
fn nb2_rule_inserted() {
    one_off_edit(
        "N-B2 rule inserted into our chain",
        &["--verify-period", "2s"],
        "periodic",
        |node| {
            nft(
                node,
                &[
                    "insert",
                    "rule",
                    "ip",
                    "svcproxy",
                    &web_chain(),
                    "meta",
                    "l4proto",
                    "tcp",
                    "dnat",
                    "to",
                    "10.244.0.11:8080",
                ],
            );
        },
    );
}

/// N-B3: demo/web's element of the ClusterIP map removed: the Service's address leads nowhere.
#[test]
fn nb3_map_element_removed() {
    one_off_edit(
        "N-B3 map element removed",
        &["--verify-period", "2s"],
        "periodic",
        |node| {
            let key = format!("{{ {VIP} . tcp . 80 }}");
            nft(node, &["delete", "element", "ip", "svcproxy", SERVICE_IPS, &key]);
        },
    );
}

/// Repairs are counted over this long once svcproxy has recognised the second writer.
const FIGHT_WINDOW: Duration = Duration::from_secs(15);

/// N-C: a second writer re-inserts a (harmless) rule into demo/web's chain every second (see
/// [`fight_and_settle`] for what svcproxy must do).
#[test]
fn nc_second_writer_every_second() {
    let mut case = Case::new("N-C second writer, 1/s");
    let period = format!("{SYNC_PERIOD_S}s");
    let mut args = NFTABLES.to_vec();
    args.extend(["--verify-period", "1s", "--sync-period", &period]);
    let mut s = WebNode::start(&case, &args, &[]);
    let before = our_table(s.cluster.node()).expect("svcproxy wrote its table");
    let namespace = s.cluster.node().name().to_owned();
    let chain = web_chain();
    let put_back = move || {
        let nft = |args: &[&str]| {
            Command::new("ip")
                .args(["netns", "exec", &namespace, "nft"])
                .args(args)
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        };
        let present = nft(&["list", "chain", "ip", "svcproxy", &chain])
            .is_some_and(|text| text.contains(WRITER_COMMENT));
        let comment = format!("\"{WRITER_COMMENT}\"");
        let insert = [
            "insert",
            "rule",
            "ip",
            "svcproxy",
            &chain,
            "jump",
            "mark-for-masquerade",
            "comment",
            &comment,
        ];
        !present && nft(&insert).is_some()
    };
    let difference = |s: &WebNode| table_diff(&before, our_table(s.cluster.node()).as_ref());
    let (reason, mut problems) = fight_and_settle(
        &mut case,
        &mut s,
        || SecondWriter::start(put_back),
        Fight {
            window: FIGHT_WINDOW,
            reported: &|reason| reason.contains("another") && reason.contains("writing"),
            difference: &difference,
        },
    );
    if reason.contains("KUBE-*") {
        problems.push(format!(
            "in nftables mode the other writer changes our table, not KUBE-* chains; the reason says: {reason}"
        ));
    }
    assert!(
        problems.is_empty(),
        "{}\nlast log lines:\n{}",
        problems.join("\n"),
        log_tail(&s.proxy.log(), 12)
    );
    s.proxy.assert_running();
}

/// The real `nft` behind a wrapper that refuses transactions (`nft -f`) while a counter file holds a positive
/// number, with the message nft prints when the kernel refuses a command of a batch: the location, the
/// kernel's error, and the command quoted with carets under it. Listings always reach the real binary.
fn failing_nft(wrappers: &Wrappers) {
    let dir = wrappers.path().display().to_string();
    let real = real_binary("nft").display().to_string();
    wrappers.script(
        "nft",
        &format!(
            r#"n=$(cat "{dir}/fail-count" 2>/dev/null || echo 0)
if [ "$1" = "-f" ] && [ "$n" -gt 0 ]; then
  echo $((n - 1)) > "{dir}/fail-count"
  first=$(head -n 1)
  cat > /dev/null
  echo "/dev/stdin:1:1-${{#first}}: Error: Could not process rule: Device or resource busy" >&2
  echo "$first" >&2
  echo "$first" | sed 's/./^/g' >&2
  exit 1
fi
exec "{real}" "$@"
"#
        ),
    );
}

const FAILURES: u32 = 4;

/// N-D: four transactions in a row refused right after an endpoint change; then the real binary takes over
/// again. A refused transaction changes nothing, so the old table serves until one succeeds.
#[test]
fn nd_nft_fails_then_recovers() {
    let mut case = Case::new("N-D nft -f fails 4x");
    require_tool("nft");
    let wrappers = Wrappers::new();
    failing_nft(&wrappers);
    let path = wrappers.path_env();
    let mut args = NFTABLES.to_vec();
    args.extend(["--sync-period", "2s", "--unhealthy-after", "3"]);
    let mut s = WebNode::start(&case, &args, &[("PATH", &path)]);
    writes_refused_then_recovered(&mut case, &mut s, &wrappers, FAILURES, "Device or resource busy");
}

/// The real `nft` behind a wrapper that behaves like a kernel without the `numgen` expression: every
/// transaction using it is refused with nft's words for a missing expression type (the kernel answers
/// ENOENT when it cannot load the expression's module), naming the first such line. The start-up probe
/// uses `numgen` in its throw-away table, so it is refused too.
fn kernel_without_numgen(wrappers: &Wrappers) {
    let dir = wrappers.path().display().to_string();
    let real = real_binary("nft").display().to_string();
    wrappers.script(
        "nft",
        &format!(
            r#"if [ "$1" = "-f" ]; then
  script="{dir}/script.$$"
  cat > "$script"
  hit=$(grep -n -m 1 -e numgen "$script" || grep -n -m 1 -e svcproxy-probe "$script")
  if [ -n "$hit" ]; then
    n=${{hit%%:*}}
    line=${{hit#*:}}
    rm -f "$script"
    echo "/dev/stdin:$n:1-${{#line}}: Error: Could not process rule: No such file or directory" >&2
    echo "$line" >&2
    echo "$line" | sed 's/./^/g' >&2
    exit 1
  fi
  "{real}" "$@" < "$script"
  status=$?
  rm -f "$script"
  exit $status
fi
exec "{real}" "$@"
"#
        ),
    );
}

/// N-E: the kernel lacks a feature our table needs. svcproxy must refuse before writing anything, and since no
/// rewrite can fix a missing feature, turn `/healthz` red at the first refusal with a reason that names what
/// is missing (nft's message and the line it quotes) and class the failure as a missing extension, as the
/// iptables backend does for a missing match (case K).
#[test]
fn ne_kernel_without_numgen() {
    let mut case = Case::new("N-E kernel lacks numgen");
    require_tool("nft");
    let wrappers = Wrappers::new();
    kernel_without_numgen(&wrappers);
    let path = wrappers.path_env();
    let cluster = Cluster::new(&[
        ("pod11", Ipv4Addr::new(10, 244, 0, 11)),
        ("pod12", Ipv4Addr::new(10, 244, 0, 12)),
    ]);
    let dir = TempDir::new("web");
    dir.write(
        "web.yaml",
        &fault::web::web_manifest(&["10.244.0.11", "10.244.0.12"]),
    );
    let mut args = NFTABLES.to_vec();
    // A sync period long enough that "red at the first refusal" and "red after three" cannot be confused.
    args.extend(["--manifests", dir.path().to_str().unwrap(), "--sync-period", "5s"]);
    case.injected();
    let mut proxy = Svcproxy::start_with_env(cluster.node(), &args, &[("PATH", &path)]);
    let traffic = Traffic::start(cluster.client.ns(), addr(VIP, 80), case.origin());
    let health = HealthWatch::start(cluster.node(), case.origin());

    case.stage("waiting for healthz to report the refusal");
    let red = poll_for(WAIT, || {
        proxy.assert_running();
        health.current().filter(|p| p.status == 503 && p.reason.is_some())
    });
    // Each family's engine fails on its own (the node serves IPv6 too): count the IPv4 one's.
    let failures_when_red = red.as_ref().map(|_| {
        metric(
            &proxy.metrics(cluster.node()),
            "svcproxy_sync_failures_total",
            &[("ip_family", "IPv4")],
        )
    });
    if let Some(p) = &red {
        case.detected(p.at);
    }
    // A few more retries, to see whether they climb the ladder or wait.
    case.stage("watching the retries");
    std::thread::sleep(Duration::from_secs(6));
    proxy.assert_running();
    let m = proxy.metrics(cluster.node());
    let classes: Vec<String> = ["missing_extension", "other", "read_back"]
        .iter()
        .map(|c| {
            format!(
                "{c}={}",
                metric(&m, "svcproxy_sync_failures_total", &[("class", c)])
            )
        })
        .collect();
    let rungs: Vec<String> = ["full", "rebuild"]
        .iter()
        .map(|k| {
            format!(
                "{k}={}",
                metric(&m, "svcproxy_syncs_total", &[("kind", k), ("result", "failure")])
            )
        })
        .collect();
    // Counted under upstream's nftables metric, not the iptables-restore one.
    assert!(
        metric(&m, "kubeproxy_sync_proxy_rules_nftables_sync_failures_total", &[]) >= 1.0,
        "{m}"
    );
    assert!(!m.contains("iptables_restore_failures"), "{m}");
    let log = proxy.log();
    let failed = log
        .lines()
        .find(|l| l.contains("sync failed"))
        .unwrap_or_default()
        .to_owned();
    case.note(format!(
        "failures by class {}; failed syncs by rung {}; failed syncs when healthz turned red: {}",
        classes.join(" "),
        rungs.join(" "),
        failures_when_red.map_or("-".into(), |n| n.to_string())
    ));
    case.note(format!(
        "first failure logged: {}",
        fault::harness::shorten(&plain(&failed), 240)
    ));
    case.note(format!("traffic: {}", traffic_summary(&traffic.samples())));
    case.health(health.summary());

    case.stage("checking the outcome");
    let mut problems = Vec::new();
    let table = cluster
        .node()
        .exec_stdout(&["nft", "list", "tables"])
        .unwrap_or_default();
    if table.contains("svcproxy") {
        problems.push(format!(
            "nothing may be written before the probe passes; the kernel holds: {table}"
        ));
    }
    match &red {
        None => problems.push(format!(
            "healthz never turned red in {}s: {}",
            WAIT.as_secs(),
            health.summary()
        )),
        Some(p) => {
            let reason = p.reason.as_deref().unwrap_or_default();
            if !(reason.contains("numgen") && reason.contains("No such file or directory")) {
                problems.push(format!(
                    "the reason must quote nft's message and the line naming the missing feature: {reason}"
                ));
            }
            if !reason.contains("missing_extension") {
                problems.push(format!(
                    "the reason must say a kernel extension is missing; it says: {}",
                    fault::harness::shorten(reason, 300)
                ));
            }
        }
    }
    if metric(
        &m,
        "svcproxy_sync_failures_total",
        &[("class", "missing_extension")],
    ) < 1.0
    {
        problems.push(format!(
            "the refusal must be classed missing_extension in svcproxy_sync_failures_total: {}",
            classes.join(" ")
        ));
    }
    if failures_when_red.is_some_and(|n| n > 1.0) {
        problems.push(format!(
            "no rewrite can fix a missing kernel feature, so healthz must turn red at the first refusal, not \
             after {} failed syncs",
            failures_when_red.unwrap_or_default()
        ));
    }
    assert!(
        problems.is_empty(),
        "{}\nlast log lines:\n{}",
        problems.join("\n"),
        log_tail(&log, 6)
    );
}

/// The reference scenario and the apiserver's own Service, as the daemon's manifests.
fn takeover_manifests(dir: &TempDir) {
    let scenario = std::fs::read_to_string(format!(
        "{}/../iptables/tests/data/scenarios/clusterip-basic.yaml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    dir.write("scenario.yaml", &scenario);
    // The apiserver's own service, which every reference run had.
    dir.write(
        "kubernetes.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: kubernetes, namespace: default}\nspec:\n  clusterIP: 10.96.0.1\n  ports: [{name: https, protocol: TCP, port: 443}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: kubernetes\n  namespace: default\n  labels: {kubernetes.io/service-name: kubernetes}\naddressType: IPv4\nports: [{name: https, protocol: TCP, port: 6443}]\nendpoints:\n- addresses: [10.0.0.10]\n",
    );
}

/// N-F: a node programmed by upstream kube-proxy v1.31 in nftables mode (its `nft list ruleset` for the
/// clusterip-basic reference scenario, loaded back with `nft -f`) is taken over with a client loop running:
/// no request may fail, and upstream's `ip kube-proxy` table must be gone afterwards.
#[test]
fn nf_takeover_from_upstream_nftables() {
    let mut case = Case::new("N-F takeover from upstream nftables");
    let lab = Lab::new();
    // The scenario's endpoints as real pods: web (8080, 8443), single (8080), multi-proto (5353).
    let pods: Vec<(&str, Ipv4Addr, &[u16], &[u16])> = vec![
        ("web14", Ipv4Addr::new(10, 244, 1, 14), &[8080, 8443], &[]),
        ("web15", Ipv4Addr::new(10, 244, 2, 15), &[8080, 8443], &[]),
        ("web16", Ipv4Addr::new(10, 244, 0, 16), &[8080, 8443], &[]),
        ("single17", Ipv4Addr::new(10, 244, 1, 17), &[8080], &[]),
        ("dns11", Ipv4Addr::new(10, 244, 1, 11), &[5353], &[5353]),
        ("dns12", Ipv4Addr::new(10, 244, 2, 12), &[5353], &[5353]),
        ("dns13", Ipv4Addr::new(10, 244, 0, 13), &[5353], &[5353]),
    ];
    let pods: Vec<_> = pods
        .into_iter()
        .map(|(name, ip, tcp, udp)| {
            let pod = lab.add_pod(name, ip);
            let backend = Backend::start(pod.ns(), name, tcp, udp);
            (pod, backend)
        })
        .collect();
    let client = lab.add_pod("client", Ipv4Addr::new(10, 244, 0, 50));

    // Upstream's table, as its kube-proxy left it. The listing loads back unchanged: it holds no counters or
    // stateful objects a fresh namespace would lack.
    let listing = std::fs::read_to_string(format!(
        "{}/tests/data/kube-proxy-v1.31.14-nftables-clusterip-basic.nft",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let mut load = lab.node().command("nft");
    load.args(["-f", "-"]).stdin(std::process::Stdio::piped());
    let mut child = load.spawn().unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), listing.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success(), "upstream's listing loads");
    let tables = |ns: &NetNs| ns.exec_stdout(&["nft", "list", "tables"]).unwrap_or_default();
    assert!(tables(lab.node()).contains("table ip kube-proxy"));

    let web = addr("10.96.1.20", 80);
    let all_web = names(&["web14", "web15", "web16"]);
    wait_until(
        WAIT,
        Duration::from_millis(100),
        "upstream's table serves web",
        || (identities(&Traffic::start(client.ns(), web, case.origin()).next(6)).len() > 1).then_some(()),
    );

    let dir = TempDir::new("takeover-nft");
    takeover_manifests(&dir);
    let traffic = Traffic::start(client.ns(), web, case.origin());
    traffic.wait_fresh(10);
    case.stage("svcproxy starting over upstream's table");
    case.injected();
    let mut args = NFTABLES.to_vec();
    args.extend(["--manifests", dir.path().to_str().unwrap()]);
    let mut proxy = Svcproxy::start(lab.node(), &args);
    let health = HealthWatch::start(lab.node(), case.origin());
    let (synced_at, ()) = measure(case.origin(), "svcproxy synced", WAIT, || {
        proxy.assert_running();
        proxy.log().contains("synced").then_some(())
    });
    case.detected(synced_at);
    // Traffic goes on for a while after the takeover, so a late gap (a conntrack or ordering effect) shows.
    traffic.wait_fresh(20);
    let upstream_gone = poll_for(WAIT, || {
        (!tables(lab.node()).contains("table ip kube-proxy")).then_some(())
    });
    if upstream_gone.is_some() {
        case.repaired(case.now());
    }
    let reached = identities(&traffic.next(30));
    let samples = traffic.since(case.injected_at());
    let left = tables(lab.node());
    case.note(format!("traffic: {}", traffic_summary(&samples)));
    case.note(format!(
        "tables afterwards: {}",
        left.lines().collect::<Vec<_>>().join(", ")
    ));
    health.wait_for("healthz is 200 without a reason", WAIT, |p| {
        p.status == 200 && p.reason.is_none()
    });
    case.health(health.summary());

    assert_eq!(failures(&samples), 0, "no request may fail during the takeover");
    assert!(
        upstream_gone.is_some(),
        "upstream's ip kube-proxy table is gone after the takeover: {left}"
    );
    assert!(left.contains("table ip svcproxy"), "{left}");
    assert_eq!(reached, all_web, "every web endpoint answers through our table");
    // Our table serves every Service port of the scenario that has a listening endpoint.
    for (vip, port) in [("10.96.1.20", 443), ("10.96.1.30", 80), ("10.96.1.10", 53)] {
        let got = identities(&Traffic::start(client.ns(), addr(vip, port), case.origin()).next(6));
        assert!(!got.is_empty(), "{vip}:{port} answers through our table");
    }
    proxy.assert_no_divergence();
    proxy.assert_running();
    drop(pods);
}

/// N-G: kube-proxy in iptables mode comes back next to our table (an upgrade tool put its DaemonSet back) and
/// writes its KUBE-SERVICES chain. svcproxy cannot repair rules of the other mode, so `/healthz` turns red
/// naming them and what to do, and green again once they are gone.
#[test]
fn ng_kube_proxy_iptables_chains_appear() {
    let mut case = Case::new("N-G kube-proxy's iptables chains appear");
    let mut args = NFTABLES.to_vec();
    args.extend(["--verify-period", "1s"]);
    let s = WebNode::start(&case, &args, &[]);
    let node = s.cluster.node();

    case.stage("kube-proxy writes nat/KUBE-SERVICES");
    case.injected();
    fault::harness::restore(
        node,
        "iptables-restore",
        &["--noflush"],
        "*nat\n:KUBE-SERVICES - [0:0]\n-A PREROUTING -j KUBE-SERVICES\nCOMMIT\n",
    );
    let red = s
        .health
        .wait_for("healthz names kube-proxy's chains", DETECT, |p| {
            p.status == 503
                && p.reason
                    .as_deref()
                    .is_some_and(|r| r.contains("nat/KUBE-SERVICES"))
        });
    case.detected(red.at);

    case.stage("the chains removed");
    fault::harness::iptables(node, &["-t", "nat", "-D", "PREROUTING", "-j", "KUBE-SERVICES"]);
    fault::harness::iptables(node, &["-t", "nat", "-X", "KUBE-SERVICES"]);
    let green = s.health.wait_for("healthz is 200 again", DETECT, |p| {
        p.status == 200 && p.reason.is_none()
    });
    case.repaired(green.at);
    case.health(s.health.summary());
    let samples = s.traffic.next(10);
    assert_eq!(failures(&samples), 0, "{}", traffic_summary(&samples));
}
