//! [`RecordingConntrack`]: an in-memory table for tests of code that cleans conntrack.

use std::sync::Mutex;

use svcproxy_model::IpFamily;
use svcproxy_model::conntrack_plan::FlowEntry;

use crate::{Conntrack, ConntrackError};

/// A fake table: lists canned entries, and deletes from them the way the kernel does (by protocol, original
/// tuple and zone, and by id when the request names one), recording every requested delete.
#[derive(Debug, Default)]
pub struct RecordingConntrack {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    table: Vec<FlowEntry>,
    deleted: Vec<FlowEntry>,
    lists: Vec<IpFamily>,
    failing: bool,
}

impl RecordingConntrack {
    pub fn new(table: impl IntoIterator<Item = FlowEntry>) -> Self {
        RecordingConntrack {
            state: Mutex::new(State {
                table: table.into_iter().collect(),
                ..State::default()
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A test that panicked while holding the lock has failed already; its state is still worth reading.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds an entry, as traffic would.
    pub fn insert(&self, entry: FlowEntry) {
        self.state().table.push(entry);
    }

    /// What the table holds now.
    pub fn table(&self) -> Vec<FlowEntry> {
        self.state().table.clone()
    }

    /// Every entry a delete was requested for, in order, whether or not it still existed.
    pub fn deleted(&self) -> Vec<FlowEntry> {
        self.state().deleted.clone()
    }

    /// The family of every list call, in order.
    pub fn lists(&self) -> Vec<IpFamily> {
        self.state().lists.clone()
    }

    /// Makes every later call fail as a kernel refusal would, until switched off.
    pub fn set_failing(&self, failing: bool) {
        self.state().failing = failing;
    }
}

fn refused(operation: &'static str) -> ConntrackError {
    ConntrackError::Kernel {
        operation,
        source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
    }
}

/// Whether a delete request for `wanted` removes `have`.
fn matches(wanted: &FlowEntry, have: &FlowEntry) -> bool {
    wanted.protocol == have.protocol
        && wanted.original == have.original
        && wanted.zone == have.zone
        && wanted.id.is_none_or(|id| have.id == Some(id))
}

impl Conntrack for RecordingConntrack {
    fn list(&self, family: IpFamily) -> Result<Vec<FlowEntry>, ConntrackError> {
        let mut s = self.state();
        if s.failing {
            return Err(refused("dump"));
        }
        s.lists.push(family);
        Ok(s.table
            .iter()
            .filter(|e| family.contains(&e.original.src))
            .copied()
            .collect())
    }

    fn delete(&self, entries: &[FlowEntry]) -> Result<usize, ConntrackError> {
        let mut s = self.state();
        if s.failing {
            return Err(refused("delete"));
        }
        let mut deleted = 0;
        for wanted in entries {
            s.deleted.push(*wanted);
            if let Some(i) = s.table.iter().position(|have| matches(wanted, have)) {
                s.table.remove(i);
                deleted += 1;
            }
        }
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use svcproxy_model::conntrack_plan::{FlowProtocol, FlowTuple};

    fn entry(dst: &str, id: Option<u32>) -> FlowEntry {
        let dst: std::net::SocketAddr = dst.parse().unwrap();
        let client = if dst.is_ipv4() {
            "10.0.0.1:40000"
        } else {
            "[fd00::1]:40000"
        };
        let client = client.parse().unwrap();
        FlowEntry {
            id,
            ..FlowEntry::new(
                FlowProtocol::Udp,
                FlowTuple::new(client, dst),
                FlowTuple::new(dst, client),
            )
        }
    }

    #[test]
    fn deletes_like_the_kernel_and_records_requests() {
        let a = entry("10.96.0.10:53", Some(1));
        let b = entry("[fd00::10]:53", Some(2));
        let ct = RecordingConntrack::new([a, b]);
        assert_eq!(ct.list(IpFamily::V4).unwrap(), vec![a]);
        assert_eq!(ct.list(IpFamily::V6).unwrap(), vec![b]);
        // A stale id names an entry that no longer exists: nothing is removed, like the kernel's ENOENT.
        let wrong_id = FlowEntry { id: Some(9), ..a };
        assert_eq!(ct.delete(&[wrong_id]).unwrap(), 0);
        assert_eq!(ct.delete(&[a, a]).unwrap(), 1);
        assert_eq!(ct.table(), vec![b]);
        assert_eq!(ct.deleted(), vec![wrong_id, a, a]);
        assert_eq!(ct.lists(), vec![IpFamily::V4, IpFamily::V6]);
    }

    #[test]
    fn failing_mode_refuses_everything() {
        let ct = RecordingConntrack::new([]);
        ct.set_failing(true);
        assert!(matches!(
            ct.list(IpFamily::V4),
            Err(ConntrackError::Kernel { .. })
        ));
        assert!(ct.delete(&[]).is_err());
        ct.set_failing(false);
        assert!(ct.list(IpFamily::V4).unwrap().is_empty());
    }
}
