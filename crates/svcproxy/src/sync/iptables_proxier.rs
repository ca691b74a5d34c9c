//! The iptables backend as the engine drives it.
//!
//! The kernel is listed only on full syncs (to collect leftovers and find missing jumps from the built-in
//! chains); partial syncs diff the new rules against the last applied ones held in memory and send only what
//! changed, so their cost follows the size of the change, not the size of the cluster.

use std::sync::Arc;
use svcproxy_iptables::config::{LocalDetector, RenderConfig};
use svcproxy_iptables::ruleset::Ruleset;
use svcproxy_iptables::{gc, jumps, payload, render, save_parser};

use svcproxy_model::Node;
use svcproxy_model::intent::build_intent;
use svcproxy_model::{ClusterState, IntentConfig, IpFamily};

use super::proxier::{Proxier, SyncError, SyncReport};
use crate::cli::{DetectLocalMode, RunArgs};
use crate::exec::iptables::{ExecError, IptablesCommands};
use crate::node_addresses::{LocalAddresses, NodePortSpec, NodePortSpecError, primary_ip};

/// Payload lines quoted around a failing line when the kernel refuses a transaction.
const CONTEXT_LINES: usize = 2;

/// The parts of the rendering configuration that depend on the Node object or the host's addresses, which can
/// change while we run; resolved again on every sync.
#[derive(Debug, Clone)]
pub struct ProxierOptions {
    /// Everything fixed by flags.
    pub base: RenderConfig,
    pub detect_local: DetectLocal,
    pub nodeport_addresses: NodePortSpec,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DetectLocal {
    Cidrs(Vec<ipnet::IpNet>),
    NodePodCidrs,
    Bridge(String),
    InterfacePrefix(String),
    None,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionsError {
    #[error("--detect-local-mode={0} needs {1}")]
    MissingDetectLocalInput(&'static str, &'static str),
    #[error(transparent)]
    NodePorts(#[from] NodePortSpecError),
    #[error("invalid rendering configuration: {0}")]
    Render(#[from] svcproxy_iptables::config::ConfigError),
}

impl ProxierOptions {
    pub fn from_args(args: &RunArgs, family: IpFamily) -> Result<Self, OptionsError> {
        let cidrs: Vec<_> = args
            .cluster_cidr
            .iter()
            .copied()
            .filter(|c| family.contains(&c.addr()))
            .collect();
        let detect_local = match args.detect_local_mode {
            // Without a cluster CIDR upstream falls back to no detector, and so do we.
            DetectLocalMode::ClusterCidr if cidrs.is_empty() => DetectLocal::None,
            DetectLocalMode::ClusterCidr => DetectLocal::Cidrs(cidrs),
            DetectLocalMode::NodeCidr => DetectLocal::NodePodCidrs,
            DetectLocalMode::BridgeInterface => {
                DetectLocal::Bridge(args.pod_bridge_interface.clone().ok_or(
                    OptionsError::MissingDetectLocalInput("BridgeInterface", "--pod-bridge-interface"),
                )?)
            }
            DetectLocalMode::InterfaceNamePrefix => {
                DetectLocal::InterfacePrefix(args.pod_interface_name_prefix.clone().ok_or(
                    OptionsError::MissingDetectLocalInput(
                        "InterfaceNamePrefix",
                        "--pod-interface-name-prefix",
                    ),
                )?)
            }
        };
        let base = RenderConfig {
            family,
            masquerade_bit: args.iptables_masquerade_bit,
            masquerade_all: args.masquerade_all,
            localhost_node_ports: args.iptables_localhost_nodeports,
            ..RenderConfig::default()
        };
        base.validate()?;
        Ok(ProxierOptions {
            base,
            detect_local,
            nodeport_addresses: NodePortSpec::parse(&args.nodeport_addresses)?,
        })
    }

    /// The configuration for one sync.
    pub fn resolve(&self, node: Option<&Node>, local: &[std::net::IpAddr]) -> RenderConfig {
        let family = self.base.family;
        let local_detector = match &self.detect_local {
            DetectLocal::Cidrs(c) => LocalDetector::Cidrs(c.clone()),
            DetectLocal::NodePodCidrs => {
                let cidrs: Vec<_> = node
                    .map(|n| {
                        n.pod_cidrs
                            .iter()
                            .copied()
                            .filter(|c| family.contains(&c.addr()))
                            .collect()
                    })
                    .unwrap_or_default();
                if cidrs.is_empty() {
                    LocalDetector::None
                } else {
                    LocalDetector::Cidrs(cidrs)
                }
            }
            DetectLocal::Bridge(b) => LocalDetector::BridgeInterface(b.clone()),
            DetectLocal::InterfacePrefix(p) => LocalDetector::InterfaceNamePrefix(p.clone()),
            DetectLocal::None => LocalDetector::None,
        };
        RenderConfig {
            local_detector,
            node_port_addresses: self.nodeport_addresses.resolve(family, local, node),
            node_ip: primary_ip(family, node),
            ..self.base.clone()
        }
    }
}

pub struct IptablesProxier {
    cmds: Box<dyn IptablesCommands>,
    addresses: Box<dyn LocalAddresses>,
    intent_config: IntentConfig,
    options: ProxierOptions,
    /// The rules the kernel holds after our last successful transaction, and the configuration they were
    /// rendered with; `None` forces a full sync.
    applied: Option<(Ruleset, RenderConfig)>,
}

impl IptablesProxier {
    pub fn new(
        cmds: Box<dyn IptablesCommands>,
        addresses: Box<dyn LocalAddresses>,
        intent_config: IntentConfig,
        options: ProxierOptions,
    ) -> Self {
        IptablesProxier {
            cmds,
            addresses,
            intent_config,
            options,
            applied: None,
        }
    }

    fn refused(e: ExecError, payload: &payload::Payload) -> SyncError {
        let reason = e.to_string();
        let context = failing_line(&reason)
            .map(|n| {
                let lines = payload.lines_around(n, CONTEXT_LINES);
                let quoted: Vec<String> = lines.iter().map(|(i, l)| format!("\n  {i:>6}: {l}")).collect();
                format!("; payload around line {n}:{}", quoted.concat())
            })
            .unwrap_or_default();
        SyncError::Refused { reason, context }
    }
}

/// The line number iptables-restore names in its error (`line 8022 failed`, or `Error occurred at line: 367`).
fn failing_line(stderr: &str) -> Option<usize> {
    for marker in ["Error occurred at line: ", "line "] {
        if let Some(pos) = stderr.find(marker) {
            let digits: String = stderr[pos + marker.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            if let Ok(n) = digits.parse() {
                return Some(n);
            }
        }
    }
    None
}

impl Proxier for IptablesProxier {
    fn family(&self) -> IpFamily {
        self.intent_config.family
    }

    fn sync(&mut self, state: &ClusterState, full: bool) -> Result<SyncReport, SyncError> {
        let intent = build_intent(state, &self.intent_config);
        let config = self
            .options
            .resolve(state.node.as_ref(), &self.addresses.addresses());
        let next = render::render(&intent, &config);
        // A configuration change (a new node address, say) can touch every chain: treat it as full.
        let full = full
            || self
                .applied
                .as_ref()
                .is_none_or(|(_, applied_with)| *applied_with != config);
        let payload = match (&self.applied, full) {
            (Some((prev, _)), false) => payload::partial_payload(prev, &next, &[]),
            _ => {
                let text = self
                    .cmds
                    .save(&["filter", "nat"])
                    .map_err(|e| SyncError::ReadBack(e.to_string()))?;
                let saved = save_parser::parse_save(&text).map_err(|e| SyncError::ReadBack(e.to_string()))?;
                let stale = gc::stale_owned_chains(&saved, &next);
                let missing = jumps::missing_jumps(&saved, &config);
                payload::full_payload(&next, &stale, &missing)
            }
        };
        let lines = payload.line_count;
        if lines > 0
            && let Err(e) = self.cmds.restore(&payload.text)
        {
            self.applied = None;
            return Err(Self::refused(e, &payload));
        }
        self.applied = Some((next, config));
        Ok(SyncReport {
            full,
            intent: Arc::new(intent),
            payload_lines: lines,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_failing_line_in_both_backends_messages() {
        assert_eq!(failing_line("iptables-restore: line 8022 failed"), Some(8022));
        assert_eq!(
            failing_line(
                "iptables-restore v1.8.9 (nf_tables): Chain 'X' does not exist\nError occurred at line: 367"
            ),
            Some(367)
        );
        assert_eq!(
            failing_line("Another app is currently holding the xtables lock"),
            None
        );
    }
}
