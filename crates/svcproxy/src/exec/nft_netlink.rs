//! Element-only updates sent straight to nf_tables over netlink, on a socket kept open for the daemon's life.
//!
//! A sync whose update only adds and removes map and set elements (an endpoint change in the mapped layout)
//! goes here instead of to `nft -f`: `nft` spends 10–20 ms on itself for such an update (start-up, fetching
//! the table's chains and sets, and closing its socket, which makes the kernel wait for an RCU grace period
//! when the batch deleted something), the kernel's commit well under one. Everything else still goes to `nft`.

use std::io;
use std::sync::{Arc, Mutex};

use netlink_sys::protocols::NETLINK_NETFILTER;
use netlink_sys::{Socket, SocketAddr};
use svcproxy_nftables::element_batch::generation_request;
use svcproxy_nftables::{ElementChange, EncodeError, Ruleset, encode_batch};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ElementWriteError {
    /// Not a failure of the kernel: the update has a type the encoder does not know. Use `nft`.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    #[error("nf_tables netlink socket: {0}")]
    Io(io::Error),
    #[error("the kernel refused the element update: {0}")]
    Refused(io::Error),
    #[error("malformed answer from nf_tables: {0}")]
    Answer(String),
}

pub trait ElementWriter: Send + Sync {
    /// Applies `changes` to table `table` (whose set declarations give the element types) in one atomic
    /// batch: all of them or, on error, none.
    fn write(&self, table: &Ruleset, changes: &[ElementChange]) -> Result<(), ElementWriteError>;
}

/// The real writer. The socket is opened in the network namespace of the thread that creates the writer and
/// stays bound to it.
#[derive(Debug)]
pub struct NetlinkElementWriter {
    conversation: Mutex<Conversation>,
}

#[derive(Debug)]
struct Conversation {
    socket: Socket,
    sequence: u32,
}

// linux/netlink.h
const NLMSG_ERROR: u16 = 2;
const NFT_NEWGEN: u16 = 10 << 8 | 15;
const HEADER: usize = 16;
const ANSWER_TIMEOUT_SECS: i64 = 5;

impl NetlinkElementWriter {
    pub fn new() -> Result<Self, ElementWriteError> {
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(ElementWriteError::Io)?;
        socket.bind_auto().map_err(ElementWriteError::Io)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(ElementWriteError::Io)?;
        // Error answers would otherwise echo each whole request back.
        socket.set_cap_ack(true).map_err(ElementWriteError::Io)?;
        // The kernel always answers, but a sync must not hang on a socket if it ever does not: the engine
        // would then stop. A timeout fails the sync, and the ladder goes on with `nft`.
        let timeout = nix::sys::time::TimeVal::new(ANSWER_TIMEOUT_SECS, 0);
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::ReceiveTimeout, &timeout)
            .map_err(|e| ElementWriteError::Io(e.into()))?;
        Ok(NetlinkElementWriter {
            conversation: Mutex::new(Conversation { socket, sequence: 0 }),
        })
    }
}

impl ElementWriter for NetlinkElementWriter {
    fn write(&self, table: &Ruleset, changes: &[ElementChange]) -> Result<(), ElementWriteError> {
        // A panic mid-write leaves at worst unread answers, which the sequence numbers tell apart.
        let mut c = self.conversation.lock().unwrap_or_else(|e| e.into_inner());
        let first = c.sequence.wrapping_add(1);
        let batch = encode_batch(table, changes, first)?;
        let probe = batch.sequences.1.wrapping_add(1);
        c.sequence = probe;
        // Two datagrams: the kernel reads a batch to its end marker and drops whatever follows in the same
        // datagram.
        c.socket.send(&batch.bytes, 0).map_err(ElementWriteError::Io)?;
        c.socket
            .send(&generation_request(probe), 0)
            .map_err(ElementWriteError::Io)?;
        // The kernel handles the batch, then the generation request: once that is answered, every error of
        // the batch has been read.
        let mut refused = None;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let len = c
                .socket
                .recv(&mut &mut buf[..], 0)
                .map_err(ElementWriteError::Io)?;
            let mut at = 0;
            while at + HEADER <= len {
                let word = |o: usize| u32::from_ne_bytes(buf[o..o + 4].try_into().unwrap_or_default());
                let msg_len = word(at) as usize;
                let ty = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
                let seq = word(at + 8);
                if msg_len < HEADER || at + msg_len > len {
                    return Err(ElementWriteError::Answer(format!(
                        "message of {msg_len} bytes in a datagram of {len}"
                    )));
                }
                let ours = seq.wrapping_sub(first) <= probe.wrapping_sub(first);
                if ty == NLMSG_ERROR && ours && msg_len >= HEADER + 4 {
                    let code = word(at + HEADER) as i32;
                    if code != 0 && refused.is_none() {
                        refused = Some(io::Error::from_raw_os_error(-code));
                    }
                    if seq == probe && code != 0 {
                        return Err(ElementWriteError::Answer(format!(
                            "the generation request failed: {}",
                            io::Error::from_raw_os_error(-code)
                        )));
                    }
                }
                if ty == NFT_NEWGEN && seq == probe {
                    return match refused {
                        Some(e) => Err(ElementWriteError::Refused(e)),
                        None => Ok(()),
                    };
                }
                at += msg_len.next_multiple_of(4);
            }
        }
    }
}

/// Records what it is asked to write; fails the writes `fail` holds, last first.
#[derive(Debug, Clone, Default)]
pub struct RecordingElementWriter {
    pub written: Arc<Mutex<Vec<Vec<ElementChange>>>>,
    pub fail: Arc<Mutex<Vec<io::Error>>>,
}

impl ElementWriter for RecordingElementWriter {
    fn write(&self, table: &Ruleset, changes: &[ElementChange]) -> Result<(), ElementWriteError> {
        encode_batch(table, changes, 1)?;
        if let Some(e) = self.fail.lock().unwrap().pop() {
            return Err(ElementWriteError::Refused(e));
        }
        self.written.lock().unwrap().push(changes.to_vec());
        Ok(())
    }
}
