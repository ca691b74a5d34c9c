//! The iptables backend of svcproxy, as pure functions: chain names that match upstream kube-proxy byte for
//! byte, the desired rule set rendered from an [`Intent`](svcproxy_model::Intent), `iptables-restore` payloads
//! (full and partial), the jump rules from the built-in chains, a parser for `iptables-save` output, and a packet
//! tracer that tells what the kernel would do with a new connection under a given dump.
//!
//! Nothing here runs processes or touches the kernel: the same inputs always give byte-identical outputs, so
//! everything can be tested without privileges and the applier stays a thin layer.
#![forbid(unsafe_code)]

pub mod audit;
pub mod canonical;
pub mod chain_name;
mod chain_name_text;
pub mod cleanup;
pub mod config;
pub mod failure;
pub mod gc;
pub mod jumps;
pub mod kernel_view;
pub mod parallel;
pub mod payload;
pub mod render;
mod rule_text;
pub mod ruleset;
pub mod save_parser;
pub mod saved_view;
pub mod seal;
pub mod service_rules;
pub mod staging;
pub mod trace_rule;
pub mod tracer;
pub mod verify;

pub use chain_name::{ServiceChains, is_owned_service_chain, sep_chain, service_chain_hash};
pub use config::{ConfigError, LocalDetector, NodePortAddresses, RenderConfig};
pub use gc::stale_owned_chains;
pub use jumps::{JumpRule, jump_rules, missing_jumps};
pub use kernel_view::{Found, KernelReader, KernelView};
pub use payload::{Payload, full_payload, partial_payload};
pub use render::{
    LARGE_CLUSTER_ENDPOINTS, assemble, is_large_cluster, payload_of_parts, reassemble, render, render_payload,
};
pub use ruleset::{Chain, ChainName, Ruleset, Table, TableName};
pub use save_parser::{SaveParseError, SaveReader, SavedRule, SavedRuleset, SavedTable, parse_save};
pub use saved_view::saved_view;
pub use service_rules::{ServicePortRules, SharedRule, render_service_port};
pub use tracer::{NodeContext, TraceError, trace};
