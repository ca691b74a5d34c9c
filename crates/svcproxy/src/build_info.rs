//! What this build is, as the `kubernetes_build_info` series every Kubernetes component serves: dashboards
//! and alerts made for kube-proxy read the running version from it (`git_version`). svcproxy fills the labels
//! with its own version; what a Go build records and this one does not know (its commit, tree state, date)
//! is left empty.

use prometheus_client::encoding::EncodeLabelSet;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub build_date: String,
    pub compiler: String,
    pub git_commit: String,
    pub git_tree_state: String,
    pub git_version: String,
    pub go_version: String,
    pub major: String,
    pub minor: String,
    pub platform: String,
}

/// This build's labels: `git_version` `v<version>`, `major` and `minor` from it, and the platform as Go
/// spells it (`linux/amd64`), which is how dashboards group nodes.
pub fn this_build() -> BuildLabels {
    let version = env!("CARGO_PKG_VERSION");
    let mut numbers = version.split('.');
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        other => other,
    };
    BuildLabels {
        build_date: String::new(),
        compiler: "rustc".into(),
        git_commit: String::new(),
        git_tree_state: String::new(),
        git_version: format!("v{version}"),
        go_version: String::new(),
        major: numbers.next().unwrap_or_default().into(),
        minor: numbers.next().unwrap_or_default().into(),
        platform: format!("{}/{arch}", std::env::consts::OS),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_labels_carry_this_crates_version() {
        let build = this_build();
        assert_eq!(build.git_version, format!("v{}", env!("CARGO_PKG_VERSION")));
        assert_eq!(
            format!("{}.{}", build.major, build.minor),
            env!("CARGO_PKG_VERSION").rsplit_once('.').unwrap().0
        );
        assert!(build.platform.starts_with("linux/"), "{}", build.platform);
        #[cfg(target_arch = "x86_64")]
        assert_eq!(build.platform, "linux/amd64");
    }
}
