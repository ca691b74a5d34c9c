//! The nf_tables ruleset generation: every committed transaction, whoever sends it, moves it on by one. The
//! iptables backend seals its writes with it (see `svcproxy_iptables::seal`).

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use svcproxy_iptables::seal::Generation;

use super::nft_netlink::{ElementSocket, ElementSocketError, NetlinkElementSocket};

pub trait RulesetGeneration: Send + Sync {
    fn generation(&self) -> Result<Generation, ElementSocketError>;

    /// The generation, or `None` when it cannot be read (which callers treat as "anything may have changed").
    fn current(&self) -> Option<Generation> {
        self.generation()
            .inspect_err(|e| tracing::debug!(error = %e, "cannot read the nf_tables generation"))
            .ok()
    }
}

/// The real one: asked over an nf_tables netlink socket, in the boot and network namespace it was opened in.
#[derive(Debug)]
pub struct NfTablesGeneration {
    socket: NetlinkElementSocket,
    instance: u64,
}

impl NfTablesGeneration {
    /// Opens the socket in the network namespace of the calling thread, and names that namespace and this
    /// boot (the boot id and the namespace's inode: a generation counts anew in each).
    pub fn open() -> Result<Self, ElementSocketError> {
        let boot =
            std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map_err(ElementSocketError::Io)?;
        let boot_bits = boot
            .trim()
            .chars()
            .filter(char::is_ascii_hexdigit)
            .take(16)
            .collect::<String>();
        let boot_bits = u64::from_str_radix(&boot_bits, 16)
            .map_err(|e| ElementSocketError::Answer(format!("unreadable boot id {boot:?}: {e}")))?;
        let netns = std::fs::metadata("/proc/thread-self/ns/net")
            .map_err(ElementSocketError::Io)?
            .ino();
        let socket = NetlinkElementSocket::new()?;
        Ok(NfTablesGeneration {
            socket,
            instance: boot_bits ^ netns.rotate_left(32),
        })
    }
}

impl RulesetGeneration for NfTablesGeneration {
    fn generation(&self) -> Result<Generation, ElementSocketError> {
        Ok(Generation {
            instance: self.instance,
            value: ElementSocket::generation(&self.socket)?,
        })
    }
}

/// A counter standing in for the kernel's generation: [`super::iptables::RecordingIptables`] moves the one it
/// shares on by one per table section it is asked to restore, as iptables-nft commits each section as one
/// transaction; tests move it to play another writer.
#[derive(Debug, Clone, Default)]
pub struct CountingGeneration(pub Arc<AtomicU32>);

impl CountingGeneration {
    /// What the fake's generations name as their instance.
    pub const INSTANCE: u64 = 0x5eed;

    pub fn advance(&self, by: u32) {
        self.0.fetch_add(by, Ordering::SeqCst);
    }

    pub fn now(&self) -> Generation {
        Generation {
            instance: Self::INSTANCE,
            value: self.0.load(Ordering::SeqCst),
        }
    }
}

impl RulesetGeneration for CountingGeneration {
    fn generation(&self) -> Result<Generation, ElementSocketError> {
        Ok(self.now())
    }
}
