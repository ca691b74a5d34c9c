//! External commands behind small traits, each with a real implementation and a recording fake.

pub mod generation;
pub mod iptables;
pub mod kernel_release;
pub mod nfacct;
pub mod nft;
pub mod nft_netlink;
pub mod nft_table_read;
pub mod runner;
