//! The iptables backend as the engine drives it.
//!
//! The kernel is listed only on full syncs (to collect leftovers and find missing jumps from the built-in
//! chains); partial syncs diff the new rules against the last applied ones held in memory and send only what
//! changed, so their cost follows the size of the change, not the size of the cluster.

use svcproxy_iptables::config::{LocalDetector, RenderConfig};
use svcproxy_iptables::ruleset::Ruleset;
use svcproxy_iptables::{gc, jumps, payload, render, save_parser};
use svcproxy_model::intent::build_intent;
use svcproxy_model::{ClusterState, IntentConfig, IpFamily};

use super::proxier::{Proxier, SyncError, SyncReport};
use crate::cli::RunArgs;
use crate::exec::iptables::{ExecError, IptablesCommands};

/// Payload lines quoted around a failing line when the kernel refuses a transaction.
const CONTEXT_LINES: usize = 2;

pub fn render_config(args: &RunArgs, family: IpFamily) -> RenderConfig {
    let cidrs: Vec<_> = args
        .cluster_cidr
        .iter()
        .copied()
        .filter(|c| family.contains(&c.addr()))
        .collect();
    RenderConfig {
        family,
        masquerade_bit: args.iptables_masquerade_bit,
        masquerade_all: args.masquerade_all,
        local_detector: if cidrs.is_empty() {
            LocalDetector::None
        } else {
            LocalDetector::Cidrs(cidrs)
        },
        ..RenderConfig::default()
    }
}

pub struct IptablesProxier {
    cmds: Box<dyn IptablesCommands>,
    intent_config: IntentConfig,
    render_config: RenderConfig,
    /// The rules the kernel holds after our last successful transaction; `None` forces a full sync.
    applied: Option<Ruleset>,
}

impl IptablesProxier {
    pub fn new(
        cmds: Box<dyn IptablesCommands>,
        intent_config: IntentConfig,
        render_config: RenderConfig,
    ) -> Self {
        IptablesProxier {
            cmds,
            intent_config,
            render_config,
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
        let next = render::render(&intent, &self.render_config);
        let full = full || self.applied.is_none();
        let payload = match (&self.applied, full) {
            (Some(prev), false) => payload::partial_payload(prev, &next, &[]),
            _ => {
                let text = self
                    .cmds
                    .save(&["filter", "nat"])
                    .map_err(|e| SyncError::ReadBack(e.to_string()))?;
                let saved = save_parser::parse_save(&text).map_err(|e| SyncError::ReadBack(e.to_string()))?;
                let stale = gc::stale_owned_chains(&saved, &next);
                let missing = jumps::missing_jumps(&saved, &self.render_config);
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
        self.applied = Some(next);
        Ok(SyncReport {
            full,
            service_ports: intent.service_ports.len(),
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
