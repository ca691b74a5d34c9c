//! External commands behind small traits, each with a real implementation and a recording fake.

pub mod gate;
pub mod generation;
pub mod iptables;
pub mod kernel_release;
pub mod nfacct;
pub mod nft;
pub mod nft_netlink;
pub mod nft_table_read;
pub mod runner;
pub mod stoppable_read;

/// Asked now and then while a long read runs: true once its result is no longer wanted (a change is waiting
/// to be synced, and a read taken before that sync would be stale anyway).
pub type Abandon<'a> = &'a (dyn Fn() -> bool + Sync);

/// An [`Abandon`] that never gives up: `&never`.
pub fn never() -> bool {
    false
}
