//! The nftables backend of svcproxy, as pure functions: our own table (`ip svcproxy` / `ip6 svcproxy`)
//! rendered from an [`Intent`](svcproxy_model::Intent) as plain data, transactions for `nft -f -` (clean
//! rebuild, partial update, bounded cold-sync chunks), a parser for `nft list` output, a model of how the
//! kernel applies a transaction, and a packet tracer that walks a table like netfilter does.
//!
//! Nothing here runs processes or touches the kernel: the same inputs always give byte-identical outputs.
//!
//! A sync loop uses it like this:
//! - at start, apply [`probe_transaction`] (refuse to start if the kernel refuses it), then
//!   [`delete_table_transaction`] for upstream's `kube-proxy` tables, then [`full_transaction`] of
//!   [`render`]`(intent)` — or, on a cold start with many services, the parts of [`chunked_full`] in order;
//! - on every change, [`partial_transaction`]`(last applied, render(new intent))`, keeping the applied
//!   [`Ruleset`] in memory rather than listing the kernel (fall back to a full transaction on failure); on
//!   kernels before 6.2 ([`KernelVersion`]) through [`DeferredDeletions`], which holds the deletion of removed
//!   chains for a later transaction;
//! - to verify, [`parse_listing`] of `nft list table ip svcproxy` (or, much faster, of [`table_text`] of
//!   `nft -t list ruleset` with each set's elements dumped over netlink, [`dump_request`], and decoded by an
//!   [`ElementDecoder`]; [`table_census::cheaper_listing`] says when other tables make listing ours alone
//!   cheaper), then
//!   `partial_transaction(&read_back.without_dynamic_elements(), &desired)`: empty means the kernel matches,
//!   otherwise its `services` name the affected Services and its text is the repair;
//! - to explain, [`trace`] a packet through the desired or the read-back table.
#![forbid(unsafe_code)]

pub mod addr_text;
pub mod commands;
pub mod config;
pub mod deferred;
pub mod dispatch;
pub mod element_batch;
pub mod element_dump;
pub mod fixed;
pub mod incremental;
pub mod listing;
pub mod names;
pub mod probe;
pub mod references;
pub mod render;
pub mod rule_syntax;
pub mod ruleset;
pub mod service_port;
pub mod simulate;
pub mod slots;
pub mod table_census;
pub mod tracer;
pub mod transaction;

pub use config::{ConfigError, DispatchLayout, LocalDetector, NodePortAddresses, RenderConfig};
pub use deferred::{DELETION_DELAY, DeferredDeletions, DueDeletions};
pub use element_batch::{ElementChange, EncodeError, EncodedBatch, element_changes, encode_batch};
pub use element_dump::{DecodeError, ElementDecoder, dump_request};
pub use incremental::{RenderedTable, TableUpdate, render_table, render_table_after};
pub use listing::{Listing, ListingError, parse_listing, table_text};
pub use probe::{KernelVersion, PROBE_TABLE, probe_transaction};
pub use render::{render, render_after};
pub use ruleset::{
    BaseChain, Chain, ChainType, CompactString, Element, Family, Hook, Policy, Ruleset, Set, SetKind,
};
pub use simulate::{Kernel, SimError};
pub use slots::Slots;
pub use tracer::{TraceError, trace};
pub use transaction::{
    PlanError, Transaction, TransactionKind, chunked_full, delete_table_transaction, full_in_chunks,
    full_transaction, partial_transaction, partial_transaction_given,
};
