//! kube-proxy's command line has no subcommand (`kube-proxy --config=… --hostname-override=…`), so a node's
//! existing invocation is read as `svcproxy run …`. With that, and the binary installed under the name
//! `kube-proxy` as well, replacing kube-proxy can be a change of image alone: the DaemonSet's command,
//! flags, ConfigMap and RBAC stay as they are.

use std::ffi::{OsStr, OsString};
use std::path::Path;

use clap::CommandFactory;

use crate::cli::Cli;

/// The name kube-proxy's images install it under; started as this, svcproxy behaves as kube-proxy's command.
pub const KUBE_PROXY: &str = "kube-proxy";

/// `argv` with `run` inserted after the program name where the command line is kube-proxy's: started as
/// `kube-proxy` (anything but one of svcproxy's subcommands or `--version` follows), or started as svcproxy
/// with a flag where a subcommand belongs (other than help and version, which stay svcproxy's own).
pub fn with_run_implied<I>(argv: I) -> Vec<OsString>
where
    I: IntoIterator,
    I::Item: Into<OsString>,
{
    let mut argv: Vec<OsString> = argv.into_iter().map(Into::into).collect();
    let Some(program) = argv.first() else {
        return argv;
    };
    let as_kube_proxy = Path::new(program).file_name() == Some(OsStr::new(KUBE_PROXY));
    let first = argv.get(1).and_then(|a| a.to_str());
    let is_subcommand = |arg: &str| {
        Cli::command()
            .get_subcommands()
            .any(|s| s.get_name() == arg || s.get_all_aliases().any(|a| a == arg))
            || arg == "help"
    };
    let own_flag = |arg: &str| matches!(arg, "-h" | "--help" | "-V" | "--version");
    let implied = match first {
        Some("--version" | "-V") => false,
        Some(arg) if as_kube_proxy => !is_subcommand(arg),
        None => as_kube_proxy,
        Some(arg) => arg.starts_with('-') && !own_flag(arg),
    };
    if implied {
        argv.insert(1, OsString::from("run"));
    }
    argv
}

#[cfg(test)]
mod tests {
    use super::*;

    fn implied(argv: &[&str]) -> Vec<String> {
        with_run_implied(argv.iter().copied())
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    #[test]
    fn kube_proxys_command_line_is_run() {
        assert_eq!(
            implied(&[
                "/usr/local/bin/svcproxy",
                "--config=/var/lib/kube-proxy/config.conf",
                "--v=2"
            ]),
            [
                "/usr/local/bin/svcproxy",
                "run",
                "--config=/var/lib/kube-proxy/config.conf",
                "--v=2"
            ]
        );
        assert_eq!(
            implied(&["/usr/local/bin/kube-proxy", "--hostname-override=n"]),
            ["/usr/local/bin/kube-proxy", "run", "--hostname-override=n"]
        );
        // kube-proxy with no flags runs with its defaults; its help is the flags' help.
        assert_eq!(implied(&["kube-proxy"]), ["kube-proxy", "run"]);
        assert_eq!(
            implied(&["kube-proxy", "--help"]),
            ["kube-proxy", "run", "--help"]
        );
    }

    #[test]
    fn svcproxys_own_command_lines_are_left_alone() {
        for argv in [
            &["svcproxy", "run", "--v=2"][..],
            &["svcproxy", "cleanup"],
            &["svcproxy"],
            &["svcproxy", "--help"],
            &["svcproxy", "-h"],
            &["svcproxy", "--version"],
            &["svcproxy", "help", "run"],
            &["kube-proxy", "--version"],
            &["kube-proxy", "cleanup", "--dry-run"],
            &["kube-proxy", "explain", "--help"],
        ] {
            assert_eq!(implied(argv), argv, "{argv:?}");
        }
    }
}
