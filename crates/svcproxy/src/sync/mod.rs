//! The sync engine: one task owns the cluster state and is the only writer of the kernel.

pub mod commit_ledger;
pub mod conntrack_step;
pub mod engine;
pub mod intent_cache;
pub mod iptables_proxier;
pub mod nft_proxier;
pub mod other_proxies;
pub mod proxier;
pub mod throttle;
