//! kube-proxy's packet counters: named nfacct objects (`nfnetlink_acct`) that iptables rules count into with
//! an `nfacct` match, created at start and read at each metrics scrape. They belong to the network namespace,
//! not to a process, so they outlive restarts and a counter keeps counting across them, as upstream's does.
//!
//! The messages are small enough to spell out here: one request with a name attribute, answered by an
//! acknowledgement or by the object with its counters.

use std::collections::BTreeMap;
use std::io;
use std::sync::Mutex;

use netlink_sys::protocols::NETLINK_NETFILTER;
use netlink_sys::{Socket, SocketAddr};
use svcproxy_nftables::element_dump::messages;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum NfacctError {
    #[error("nfacct netlink socket: {0}")]
    Io(io::Error),
    #[error("nfacct object {name}: {error}")]
    Refused { name: String, error: io::Error },
    #[error("nfacct object {name}: malformed answer: {what}")]
    Answer { name: String, what: String },
}

pub trait PacketCounters: Send + Sync {
    /// Creates the nfacct object `name`, unless it exists already (then its count goes on).
    fn ensure(&self, name: &str) -> Result<(), NfacctError>;
    /// The packets object `name` has counted.
    fn packets(&self, name: &str) -> Result<u64, NfacctError>;
}

// linux/netfilter/nfnetlink.h, nfnetlink_acct.h, netlink.h
const NFNL_SUBSYS_ACCT: u16 = 7;
const NFNL_MSG_ACCT_NEW: u16 = 0;
const NFNL_MSG_ACCT_GET: u16 = 1;
const NFACCT_NAME: u16 = 1;
const NFACCT_PKTS: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 2;
const NETLINK_HEADER: usize = 16;
const NFGENMSG: usize = 4;
/// The kernel's answer to creating an object that exists.
const EBUSY: i32 = 16;
/// Longest object name the kernel keeps (`NFACCT_NAME_MAX`, with its NUL).
const NAME_MAX: usize = 32;
const ANSWER_TIMEOUT_SECS: i64 = 5;

/// A request about object `name`: `ty` is `NFNL_MSG_ACCT_NEW` or `_GET`.
fn request(ty: u16, flags: u16, name: &str, sequence: u32) -> Vec<u8> {
    let attr_len = 4 + name.len() + 1;
    let len = NETLINK_HEADER + NFGENMSG + attr_len.next_multiple_of(4);
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&(len as u32).to_ne_bytes());
    out.extend_from_slice(&((NFNL_SUBSYS_ACCT << 8) | ty).to_ne_bytes());
    out.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK | flags).to_ne_bytes());
    out.extend_from_slice(&sequence.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: AF_UNSPEC, NFNETLINK_V0, resource id 0.
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&(attr_len as u16).to_ne_bytes());
    out.extend_from_slice(&NFACCT_NAME.to_ne_bytes());
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    out.resize(len, 0);
    out
}

/// The packet count in an nfacct object message's payload (after the netlink header).
fn packets_of(payload: &[u8]) -> Option<u64> {
    let mut attrs = payload.get(NFGENMSG..)?;
    while attrs.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([attrs[0], attrs[1]]));
        let ty = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
        let value = attrs.get(4..len)?;
        if ty == NFACCT_PKTS {
            return Some(u64::from_be_bytes(value.try_into().ok()?));
        }
        attrs = attrs.get(len.next_multiple_of(4).min(attrs.len())..)?;
    }
    None
}

/// The (negative) error code of an `NLMSG_ERROR` payload; 0 is an acknowledgement.
fn error_code(payload: &[u8]) -> Option<i32> {
    Some(i32::from_ne_bytes(payload.get(..4)?.try_into().ok()?))
}

/// The kernel's nfacct objects, over a netlink socket kept for the daemon's life.
pub struct NetlinkPacketCounters {
    conversation: Mutex<(Socket, u32)>,
}

impl NetlinkPacketCounters {
    pub fn new() -> Result<Self, NfacctError> {
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(NfacctError::Io)?;
        socket.bind_auto().map_err(NfacctError::Io)?;
        socket.connect(&SocketAddr::new(0, 0)).map_err(NfacctError::Io)?;
        socket.set_cap_ack(true).map_err(NfacctError::Io)?;
        // A scrape must not hang on the socket if the kernel ever does not answer.
        let timeout = nix::sys::time::TimeVal::new(ANSWER_TIMEOUT_SECS, 0);
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::ReceiveTimeout, &timeout)
            .map_err(|e| NfacctError::Io(e.into()))?;
        Ok(NetlinkPacketCounters {
            conversation: Mutex::new((socket, 0)),
        })
    }

    /// Sends one request about `name` and returns the packet count it answered with, if any, once the
    /// kernel acknowledged it; a kernel error comes back as its code.
    fn ask(&self, ty: u16, flags: u16, name: &str) -> Result<Result<Option<u64>, i32>, NfacctError> {
        if name.len() >= NAME_MAX {
            return Err(NfacctError::Answer {
                name: name.into(),
                what: format!("names are shorter than {NAME_MAX} bytes"),
            });
        }
        let mut conversation = self.conversation.lock().unwrap_or_else(|e| e.into_inner());
        let (socket, sequence) = &mut *conversation;
        *sequence = sequence.wrapping_add(1);
        let seq = *sequence;
        socket
            .send(&request(ty, flags, name, seq), 0)
            .map_err(NfacctError::Io)?;
        let mut buf = vec![0u8; 8192];
        let mut packets = None;
        loop {
            let len = socket.recv(&mut &mut buf[..], 0).map_err(NfacctError::Io)?;
            let answer = messages(&buf[..len]).map_err(|what| NfacctError::Answer {
                name: name.into(),
                what,
            })?;
            for m in answer.into_iter().filter(|m| m.sequence == seq) {
                if m.ty == NLMSG_ERROR {
                    return match error_code(m.payload) {
                        Some(0) => Ok(Ok(packets)),
                        Some(code) => Ok(Err(-code)),
                        None => Err(NfacctError::Answer {
                            name: name.into(),
                            what: "a short error message".into(),
                        }),
                    };
                }
                packets = packets_of(m.payload).or(packets);
            }
        }
    }
}

impl PacketCounters for NetlinkPacketCounters {
    fn ensure(&self, name: &str) -> Result<(), NfacctError> {
        match self.ask(NFNL_MSG_ACCT_NEW, NLM_F_CREATE, name)? {
            Ok(_) | Err(EBUSY) => Ok(()),
            Err(errno) => Err(NfacctError::Refused {
                name: name.into(),
                error: io::Error::from_raw_os_error(errno),
            }),
        }
    }

    fn packets(&self, name: &str) -> Result<u64, NfacctError> {
        match self.ask(NFNL_MSG_ACCT_GET, 0, name)? {
            Ok(Some(packets)) => Ok(packets),
            Ok(None) => Err(NfacctError::Answer {
                name: name.into(),
                what: "no packet count".into(),
            }),
            Err(errno) => Err(NfacctError::Refused {
                name: name.into(),
                error: io::Error::from_raw_os_error(errno),
            }),
        }
    }
}

/// Objects held in memory, for tests: `refuse` makes every call fail, as on a kernel without nfacct.
#[derive(Debug, Default)]
pub struct RecordingPacketCounters {
    pub objects: Mutex<BTreeMap<String, u64>>,
    pub refuse: bool,
}

impl PacketCounters for RecordingPacketCounters {
    fn ensure(&self, name: &str) -> Result<(), NfacctError> {
        if self.refuse {
            return Err(NfacctError::Refused {
                name: name.into(),
                error: io::Error::from_raw_os_error(2),
            });
        }
        self.objects.lock().unwrap().entry(name.into()).or_insert(0);
        Ok(())
    }

    fn packets(&self, name: &str) -> Result<u64, NfacctError> {
        self.objects
            .lock()
            .unwrap()
            .get(name)
            .copied()
            .ok_or_else(|| NfacctError::Refused {
                name: name.into(),
                error: io::Error::from_raw_os_error(2),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_a_netfilter_message_naming_the_object() {
        let msg = request(
            NFNL_MSG_ACCT_NEW,
            NLM_F_CREATE,
            "ct_state_invalid_dropped_pkts",
            7,
        );
        assert_eq!(msg.len() % 4, 0);
        assert_eq!(
            u32::from_ne_bytes(msg[0..4].try_into().unwrap()) as usize,
            msg.len()
        );
        assert_eq!(u16::from_ne_bytes([msg[4], msg[5]]), 0x700);
        assert_eq!(u16::from_ne_bytes([msg[6], msg[7]]), 0x405);
        assert_eq!(u32::from_ne_bytes(msg[8..12].try_into().unwrap()), 7);
        let attr = &msg[NETLINK_HEADER + NFGENMSG..];
        assert_eq!(usize::from(u16::from_ne_bytes([attr[0], attr[1]])), 4 + 29 + 1);
        assert_eq!(u16::from_ne_bytes([attr[2], attr[3]]), NFACCT_NAME);
        assert_eq!(&attr[4..34], b"ct_state_invalid_dropped_pkts\0");
    }

    #[test]
    fn the_packet_count_is_read_from_the_objects_attributes() {
        let mut payload = vec![0, 0, 0, 0];
        // NFACCT_NAME "x", padded; then NFACCT_PKTS, big-endian.
        payload.extend_from_slice(&6u16.to_ne_bytes());
        payload.extend_from_slice(&NFACCT_NAME.to_ne_bytes());
        payload.extend_from_slice(b"x\0\0\0");
        payload.extend_from_slice(&12u16.to_ne_bytes());
        payload.extend_from_slice(&NFACCT_PKTS.to_ne_bytes());
        payload.extend_from_slice(&1234u64.to_be_bytes());
        assert_eq!(packets_of(&payload), Some(1234));
        assert_eq!(packets_of(&payload[..12]), None);
    }

    #[test]
    fn the_fake_counts_what_it_was_asked_to_create() {
        let fake = RecordingPacketCounters::default();
        assert!(fake.packets("a").is_err());
        fake.ensure("a").unwrap();
        assert_eq!(fake.packets("a").unwrap(), 0);
        let refusing = RecordingPacketCounters {
            refuse: true,
            ..Default::default()
        };
        assert!(refusing.ensure("a").is_err());
    }
}
