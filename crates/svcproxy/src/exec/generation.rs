//! The nf_tables ruleset generation: every committed transaction, whoever sends it, moves it on by one. The
//! iptables backend seals its writes with it (see `svcproxy_iptables::seal`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use super::nft_netlink::{ElementSocket, ElementSocketError, NetlinkElementSocket};

pub trait RulesetGeneration: Send + Sync {
    fn generation(&self) -> Result<u32, ElementSocketError>;
}

impl RulesetGeneration for NetlinkElementSocket {
    fn generation(&self) -> Result<u32, ElementSocketError> {
        ElementSocket::generation(self)
    }
}

/// A counter standing in for the kernel's generation: [`super::iptables::RecordingIptables`] moves the one it
/// shares on by one per table section it is asked to restore, as iptables-nft commits each section as one
/// transaction; tests move it to play another writer.
#[derive(Debug, Clone, Default)]
pub struct CountingGeneration(pub Arc<AtomicU32>);

impl CountingGeneration {
    pub fn advance(&self, by: u32) {
        self.0.fetch_add(by, Ordering::SeqCst);
    }
}

impl RulesetGeneration for CountingGeneration {
    fn generation(&self) -> Result<u32, ElementSocketError> {
        Ok(self.0.load(Ordering::SeqCst))
    }
}
