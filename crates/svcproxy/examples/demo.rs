//! The demo behind `scripts/demo.sh`: a simulated node in private network namespaces, svcproxy programming
//! it from `examples/manifests`, and real requests reaching real backend pods through the ClusterIPs.
//!
//! `demo [--rounds N]`: stop after N rounds instead of waiting for Ctrl-C.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use svcproxy_testkit::{Backend, ClientError, Lab, NetNs, http_get, tcp_request, udp_request};

const T: Duration = Duration::from_secs(2);

fn describe(result: Result<svcproxy_testkit::Reply, ClientError>) -> String {
    match result {
        Ok(r) => format!(
            "answered by {:<6} (it saw the client as {})",
            r.identity,
            r.seen_source.ip()
        ),
        Err(ClientError::Refused) => "refused (the Service has no endpoints)".to_string(),
        Err(e) => format!("failed: {e}"),
    }
}

fn svcproxy_binary() -> PathBuf {
    // The demo is built next to the binary (target/<profile>/examples/demo → target/<profile>/svcproxy).
    let exe = std::env::current_exe().expect("own path");
    exe.parent()
        .and_then(Path::parent)
        .map(|d| d.join("svcproxy"))
        .expect("target directory")
}

fn copy_manifests(to: &Path) {
    let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/manifests");
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(&from).expect("examples/manifests") {
        let path = entry.unwrap().path();
        fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
    }
}

struct Proxy(Child);

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_proxy(node: &NetNs, manifests: &Path, log: &Path) -> Proxy {
    let child = node
        .command(svcproxy_binary().to_str().unwrap())
        .args([
            "run",
            "--manifests",
            manifests.to_str().unwrap(),
            "--hostname-override",
            "node-a",
        ])
        .args(["--cluster-cidr", "10.244.0.0/16"])
        .stdout(Stdio::null())
        .stderr(fs::File::create(log).unwrap())
        .spawn()
        .expect("start svcproxy (build it first: cargo build --release --bin svcproxy)");
    Proxy(child)
}

fn main() {
    let rounds: Option<u32> = std::env::args()
        .skip_while(|a| a != "--rounds")
        .nth(1)
        .and_then(|n| n.parse().ok());
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            // Ctrl-C, or a plain `kill`/`timeout`: either way the namespaces are removed on the way out.
            rt.block_on(async {
                let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
                let terminated = async {
                    match term.as_mut() {
                        Some(t) => {
                            t.recv().await;
                        }
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    () = terminated => {}
                }
            });
            stop.store(true, Ordering::SeqCst);
        });
    }

    println!(
        "Building a simulated node: network namespaces for the node, three pods, a client pod and an outside host…"
    );
    let lab = Lab::new();
    let pods: Vec<_> = (1..=3)
        .map(|i| lab.add_pod(&format!("web-{i}"), Ipv4Addr::new(10, 244, 0, 10 + i)))
        .collect();
    let _backends: Vec<_> = pods
        .iter()
        .map(|p| Backend::start(p.ns(), p.name(), &[8080, 5353], &[5353]))
        .collect();
    let client = lab.add_pod("client", Ipv4Addr::new(10, 244, 0, 50));
    for p in &pods {
        println!(
            "  pod {:<6} {}  (answers on TCP 8080 and 5353, UDP 5353)",
            p.name(),
            p.ip()
        );
    }
    println!(
        "  pod client {}   outside host 10.0.0.20   node 10.0.0.10 (namespace {})",
        client.ip(),
        lab.node().name()
    );

    let work = std::env::temp_dir().join(format!("svcproxy-demo-{}", std::process::id()));
    let manifests = work.join("manifests");
    copy_manifests(&manifests);
    let log = work.join("svcproxy.log");
    println!(
        "\nStarting svcproxy on a copy of examples/manifests ({})",
        manifests.display()
    );
    println!("  its log: {}", log.display());
    let _proxy = start_proxy(lab.node(), &manifests, &log);

    let web: SocketAddr = "10.96.0.100:80".parse().unwrap();
    let started = Instant::now();
    while tcp_request(client.ns(), web, T).is_err() {
        if started.elapsed() > Duration::from_secs(30) {
            eprintln!(
                "svcproxy did not program the ClusterIP in 30 s; its log:\n{}",
                fs::read_to_string(&log).unwrap_or_default()
            );
            std::process::exit(1);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("  programmed in {:.1} s", started.elapsed().as_secs_f64());

    let ns = lab.node().name().to_string();
    println!("\nHealth and metrics (inside the node namespace):");
    println!("  health:  ip netns exec {ns} curl -s http://127.0.0.1:10256/healthz");
    println!("  metrics: ip netns exec {ns} curl -s http://127.0.0.1:10249/metrics");
    println!("  rules:   ip netns exec {ns} iptables-save -t nat");
    if let Ok((code, body)) = http_get(lab.node(), "127.0.0.1:10256".parse().unwrap(), "/healthz", T) {
        println!("  /healthz → {code} {body}");
    }

    println!("\nRequests through the ClusterIPs (Ctrl-C to stop and clean up):");
    let mut round = 0;
    while !stop.load(Ordering::SeqCst) && rounds.is_none_or(|n| round < n) {
        round += 1;
        println!("round {round}");
        println!(
            "  client pod   → web 10.96.0.100:80/TCP   {}",
            describe(tcp_request(client.ns(), web, T))
        );
        println!(
            "  outside host → web 10.96.0.100:80/TCP   {}",
            describe(tcp_request(lab.external(), web, T))
        );
        let dns: SocketAddr = "10.96.0.10:53".parse().unwrap();
        println!(
            "  client pod   → dns 10.96.0.10:53/UDP    {}",
            describe(udp_request(client.ns(), dns, T))
        );
        let empty: SocketAddr = "10.96.0.200:80".parse().unwrap();
        println!(
            "  client pod   → empty 10.96.0.200:80/TCP {}",
            describe(tcp_request(client.ns(), empty, T))
        );
        if round == 4 {
            let path = manifests.join("web.yaml");
            let text = fs::read_to_string(&path).unwrap();
            let cut = text.find("- addresses: [10.244.0.13]").unwrap();
            fs::write(&path, &text[..cut]).unwrap();
            println!(
                "  >> removed web-3 (10.244.0.13) from the web EndpointSlice; svcproxy follows the file"
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    println!("\nStopping svcproxy and removing the namespaces.");
    let _ = fs::remove_dir_all(&work);
}
