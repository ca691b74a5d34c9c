//! The `--config` file is watched, projected the way a ConfigMap volume projects it (a timestamped directory
//! and a `..data` symlink swapped atomically): new settings stop svcproxy so that its restart applies them,
//! with the rules left in place; the same settings, or a file that cannot be used, keep it running.

mod common;

use std::os::unix::fs::symlink;
use std::path::PathBuf;
use std::time::Duration;

use common::{HEALTHZ, METRICS, Svcproxy, TempDir, WebLab, metric_value};
use svcproxy_testkit::{tcp_request, wait_until};

const WAIT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(100);
const T: Duration = Duration::from_secs(2);

/// The lab's settings as a KubeProxyConfiguration, with `sync_period` the one setting the test changes.
fn config(sync_period: &str) -> String {
    format!(
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clusterCIDR: 10.244.0.0/16
healthzBindAddress: {HEALTHZ}
metricsBindAddress: {METRICS}
iptables:
  syncPeriod: {sync_period}
"
    )
}

/// A directory laid out as kubelet lays out a ConfigMap volume: `config.conf` → `..data/config.conf`, and
/// `..data` → the current timestamped directory, replaced by renaming a new symlink over it.
struct ConfigMapVolume {
    dir: TempDir,
    version: u32,
}

impl ConfigMapVolume {
    fn new(text: &str) -> ConfigMapVolume {
        let mut volume = ConfigMapVolume {
            dir: TempDir::new("configmap"),
            version: 0,
        };
        volume.project(text);
        symlink("..data/config.conf", volume.path()).unwrap();
        volume
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("config.conf")
    }

    fn project(&mut self, text: &str) {
        self.version += 1;
        let version = format!("..2026_11_26_00_00_00.{}", self.version);
        std::fs::create_dir(self.dir.path().join(&version)).unwrap();
        std::fs::write(self.dir.path().join(&version).join("config.conf"), text).unwrap();
        let staged = self.dir.path().join("..data_tmp");
        symlink(&version, &staged).unwrap();
        std::fs::rename(&staged, self.dir.path().join("..data")).unwrap();
    }
}

#[test]
fn a_changed_configuration_file_stops_it_and_a_broken_one_does_not() {
    let web = WebLab::new();
    let mut volume = ConfigMapVolume::new(&config("30s"));
    let path = volume.path();
    let mut proxy = Svcproxy::start(
        web.lab.node(),
        &["--manifests", web.manifests(), "--config", path.to_str().unwrap()],
    );
    wait_until(WAIT, POLL, "web answers", || {
        proxy.assert_running();
        tcp_request(web.client.ns(), web.vip(), T).ok()
    });
    // The harness passes --cluster-cidr and the server addresses as flags too: next to a file, ignored, and said.
    let log = proxy.log();
    assert!(
        log.contains("--cluster-cidr=10.244.0.0/16: ignored, because --config is given"),
        "{log}"
    );

    // The same settings projected again, then a file that cannot be used: the second is reported, which
    // shows the first was read and let be.
    volume.project(&config("30s"));
    volume.project(&config("30s").replace("mode: iptables", "mode: ipvs"));
    wait_until(WAIT, POLL, "the unusable file is reported", || {
        proxy.assert_running();
        proxy
            .log()
            .contains("the configuration file changed but cannot be used: ")
            .then_some(())
    });
    let log = proxy.log();
    assert!(log.contains("mode: "), "the problem names the field:\n{log}");
    assert!(!log.contains("stopping so that"), "{log}");
    tcp_request(web.client.ns(), web.vip(), T).expect("traffic flows on the settings it started with");
    let unusable =
        |proxy: &Svcproxy| metric_value(&proxy.metrics(web.lab.node()), "svcproxy_config_file_unusable");
    assert_eq!(unusable(&proxy), Some(1.0));
    // Mended: usable again, and the same settings, so it keeps running.
    volume.project(&config("30s"));
    wait_until(WAIT, POLL, "the mended file is seen", || {
        proxy.assert_running();
        (unusable(&proxy) == Some(0.0)).then_some(())
    });

    volume.project(&config("45s"));
    let status = proxy
        .wait_exit(WAIT)
        .unwrap_or_else(|| panic!("still running after the settings changed:\n{}", proxy.log()));
    assert_eq!(status.code(), Some(1), "{}", proxy.log());
    let log = proxy.log();
    assert!(
        log.contains(&format!(
            "the configuration file {} changed (iptables.syncPeriod: \"30s\" → \"45s\"); stopping so that the new \
             settings take effect",
            path.display()
        )),
        "{log}"
    );
    tcp_request(web.client.ns(), web.vip(), T).expect("the rules stay in place after it stops");
}
