//! Element-only updates sent straight to nf_tables over netlink, and element read-backs taken the same way, on
//! a socket kept open for the daemon's life.
//!
//! A sync whose update only adds and removes map and set elements (an endpoint change in the mapped layout)
//! goes here instead of to `nft -f`: `nft` spends 10–20 ms on itself for such an update (start-up, fetching
//! the table's chains and sets, and closing its socket, which makes the kernel wait for an RCU grace period
//! when the batch deleted something), the kernel's commit well under one. Everything else still goes to `nft`.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use netlink_sys::protocols::NETLINK_NETFILTER;
use netlink_sys::{Socket, SocketAddr};
use svcproxy_nftables::element_batch::generation_request;
use svcproxy_nftables::element_dump::{Message, NEWGEN_MESSAGE, NEWSETELEM_MESSAGE, generation_of, messages};
use svcproxy_nftables::table_census::{NEWTABLE_MESSAGE, TableCensus, table_dump_request, table_of};
use svcproxy_nftables::{
    CompactString, DecodeError, Element, ElementChange, ElementDecoder, EncodeError, Family, Ruleset, Set,
    dump_request, encode_batch,
};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ElementSocketError {
    /// Not a failure of the kernel: the update has a type the encoder does not know. Use `nft`.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    #[error("nf_tables netlink socket: {0}")]
    Io(io::Error),
    #[error("the kernel refused the element update: {0}")]
    Refused(io::Error),
    #[error("malformed answer from nf_tables: {0}")]
    Answer(String),
    /// A set the reader cannot decode (flags, an unknown type): read the table with `nft`.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("reading set {set}: {error}")]
    Dump { set: String, error: io::Error },
}

pub trait ElementSocket: Send + Sync {
    /// Applies `changes` to table `table` (whose set declarations give the element types) in one atomic
    /// batch: all of them or, on error, none.
    fn write(&self, table: &Ruleset, changes: &[ElementChange]) -> Result<(), ElementSocketError>;
    /// The ruleset's generation, which every committed transaction changes: equal before and after a
    /// read-back in several requests means they all saw the same ruleset.
    fn generation(&self) -> Result<u32, ElementSocketError>;
    /// Every table on the node, of every family, with its size.
    fn tables(&self) -> Result<Vec<TableCensus>, ElementSocketError>;
    /// Every element of set `name` (declared as `set`) of table `family table`, as `nft list` prints them.
    fn elements(
        &self,
        family: Family,
        table: &str,
        name: &str,
        set: &Set,
    ) -> Result<BTreeMap<CompactString, Element>, ElementSocketError>;
    /// Whether set `name` holds exactly `expected`, compared element by element as they arrive, so a large
    /// set that matches (the hairpin set: one element per endpoint) is never held in memory.
    fn holds_exactly(
        &self,
        family: Family,
        table: &str,
        name: &str,
        set: &Set,
        expected: &BTreeMap<CompactString, Element>,
    ) -> Result<bool, ElementSocketError>;
}

/// The real writer. The socket is opened in the network namespace of the thread that creates the writer and
/// stays bound to it.
#[derive(Debug)]
pub struct NetlinkElementSocket {
    conversation: Mutex<Conversation>,
}

#[derive(Debug)]
struct Conversation {
    socket: Socket,
    sequence: u32,
}

// linux/netlink.h
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const HEADER: usize = 16;
const ANSWER_TIMEOUT_SECS: i64 = 5;

impl Conversation {
    /// Sends the request `request(sequence)` and hands each answer message carrying its sequence number to
    /// `answer` until that returns a result.
    fn ask<T>(
        &mut self,
        request: impl FnOnce(u32) -> Vec<u8>,
        buffer: usize,
        mut answer: impl FnMut(Message<'_>) -> Result<Option<T>, ElementSocketError>,
    ) -> Result<T, ElementSocketError> {
        self.sequence = self.sequence.wrapping_add(1);
        let seq = self.sequence;
        self.socket
            .send(&request(seq), 0)
            .map_err(ElementSocketError::Io)?;
        let mut buf = vec![0u8; buffer];
        loop {
            let len = self
                .socket
                .recv(&mut &mut buf[..], 0)
                .map_err(ElementSocketError::Io)?;
            for m in messages(&buf[..len]).map_err(ElementSocketError::Answer)? {
                if m.sequence == seq
                    && let Some(done) = answer(m)?
                {
                    return Ok(done);
                }
            }
        }
    }
}

impl NetlinkElementSocket {
    pub fn new() -> Result<Self, ElementSocketError> {
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(ElementSocketError::Io)?;
        socket.bind_auto().map_err(ElementSocketError::Io)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(ElementSocketError::Io)?;
        // Error answers would otherwise echo each whole request back.
        socket.set_cap_ack(true).map_err(ElementSocketError::Io)?;
        // The kernel always answers, but a sync must not hang on a socket if it ever does not: the engine
        // would then stop. A timeout fails the sync, and the ladder goes on with `nft`.
        let timeout = nix::sys::time::TimeVal::new(ANSWER_TIMEOUT_SECS, 0);
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::ReceiveTimeout, &timeout)
            .map_err(|e| ElementSocketError::Io(e.into()))?;
        Ok(NetlinkElementSocket {
            conversation: Mutex::new(Conversation { socket, sequence: 0 }),
        })
    }
}

impl NetlinkElementSocket {
    /// Dumps set `name` of table `family table`, handing each element to `each` as it is decoded.
    fn dump_set(
        &self,
        family: Family,
        table: &str,
        name: &str,
        set: &Set,
        mut each: impl FnMut(CompactString, Element),
    ) -> Result<(), ElementSocketError> {
        let decoder = ElementDecoder::for_set(name, set)?;
        let mut c = self.conversation.lock().unwrap_or_else(|e| e.into_inner());
        // A dump datagram is at most 32 KiB (the kernel's cap); a larger buffer is never truncated.
        c.ask(
            |seq| dump_request(family, table, name, seq),
            64 * 1024,
            |m| match m.ty {
                NEWSETELEM_MESSAGE => Ok(decoder.decode_each(m.payload, &mut each).map(|()| None)?),
                NLMSG_DONE => Ok(Some(())),
                NLMSG_ERROR if error_code(m.payload) != 0 => Err(ElementSocketError::Dump {
                    set: name.to_string(),
                    error: io::Error::from_raw_os_error(-error_code(m.payload)),
                }),
                _ => Ok(None),
            },
        )
    }
}

impl ElementSocket for NetlinkElementSocket {
    fn write(&self, table: &Ruleset, changes: &[ElementChange]) -> Result<(), ElementSocketError> {
        // A panic mid-write leaves at worst unread answers, which the sequence numbers tell apart.
        let mut c = self.conversation.lock().unwrap_or_else(|e| e.into_inner());
        let first = c.sequence.wrapping_add(1);
        let batch = encode_batch(table, changes, first)?;
        let probe = batch.sequences.1.wrapping_add(1);
        c.sequence = probe;
        // Two datagrams: the kernel reads a batch to its end marker and drops whatever follows in the same
        // datagram.
        c.socket.send(&batch.bytes, 0).map_err(ElementSocketError::Io)?;
        c.socket
            .send(&generation_request(probe), 0)
            .map_err(ElementSocketError::Io)?;
        // The kernel handles the batch, then the generation request: once that is answered, every error of
        // the batch has been read.
        let mut refused = None;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let len = c
                .socket
                .recv(&mut &mut buf[..], 0)
                .map_err(ElementSocketError::Io)?;
            let mut at = 0;
            while at + HEADER <= len {
                let word = |o: usize| u32::from_ne_bytes(buf[o..o + 4].try_into().unwrap_or_default());
                let msg_len = word(at) as usize;
                let ty = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
                let seq = word(at + 8);
                if msg_len < HEADER || at + msg_len > len {
                    return Err(ElementSocketError::Answer(format!(
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
                        return Err(ElementSocketError::Answer(format!(
                            "the generation request failed: {}",
                            io::Error::from_raw_os_error(-code)
                        )));
                    }
                }
                if ty == NEWGEN_MESSAGE && seq == probe {
                    return match refused {
                        Some(e) => Err(ElementSocketError::Refused(e)),
                        None => Ok(()),
                    };
                }
                at += msg_len.next_multiple_of(4);
            }
        }
    }

    fn generation(&self) -> Result<u32, ElementSocketError> {
        let mut c = self.conversation.lock().unwrap_or_else(|e| e.into_inner());
        c.ask(generation_request, 8 * 1024, |m| match m.ty {
            NLMSG_ERROR => Err(ElementSocketError::Answer(error_text(m.payload))),
            NEWGEN_MESSAGE => generation_of(m.payload)
                .map(Some)
                .ok_or_else(|| ElementSocketError::Answer("generation answer without an id".into())),
            _ => Ok(None),
        })
    }

    fn tables(&self) -> Result<Vec<TableCensus>, ElementSocketError> {
        let mut c = self.conversation.lock().unwrap_or_else(|e| e.into_inner());
        let mut tables = Vec::new();
        c.ask(table_dump_request, 64 * 1024, |m| match m.ty {
            NEWTABLE_MESSAGE => {
                tables.push(table_of(m.payload).map_err(ElementSocketError::Answer)?);
                Ok(None)
            }
            NLMSG_DONE => Ok(Some(())),
            NLMSG_ERROR if error_code(m.payload) != 0 => Err(ElementSocketError::Answer(format!(
                "table dump: {}",
                error_text(m.payload)
            ))),
            _ => Ok(None),
        })?;
        Ok(tables)
    }

    fn elements(
        &self,
        family: Family,
        table: &str,
        name: &str,
        set: &Set,
    ) -> Result<BTreeMap<CompactString, Element>, ElementSocketError> {
        let mut out: BTreeMap<CompactString, Element> = BTreeMap::new();
        self.dump_set(family, table, name, set, |key, element| {
            out.insert(key, element);
        })?;
        Ok(out)
    }

    fn holds_exactly(
        &self,
        family: Family,
        table: &str,
        name: &str,
        set: &Set,
        expected: &BTreeMap<CompactString, Element>,
    ) -> Result<bool, ElementSocketError> {
        let (mut seen, mut same) = (0, true);
        self.dump_set(family, table, name, set, |key, element| {
            seen += 1;
            same &= expected.get(&key) == Some(&element);
        })?;
        // Keys are unique in a dump, so as many matches as expected elements means the same set.
        Ok(same && seen == expected.len())
    }
}

/// Records what it is asked to write; fails the writes `fail` holds, last first. Every read fails, as on a
/// kernel whose answers the reader cannot decode, so a proxier using it reads with `nft` (real reads are
/// tested against a real kernel).
#[derive(Debug, Clone, Default)]
pub struct RecordingElementSocket {
    pub written: Arc<Mutex<Vec<Vec<ElementChange>>>>,
    pub fail: Arc<Mutex<Vec<io::Error>>>,
}

impl ElementSocket for RecordingElementSocket {
    fn write(&self, table: &Ruleset, changes: &[ElementChange]) -> Result<(), ElementSocketError> {
        encode_batch(table, changes, 1)?;
        if let Some(e) = self.fail.lock().unwrap().pop() {
            return Err(ElementSocketError::Refused(e));
        }
        self.written.lock().unwrap().push(changes.to_vec());
        Ok(())
    }

    fn generation(&self) -> Result<u32, ElementSocketError> {
        Ok(0)
    }

    fn tables(&self) -> Result<Vec<TableCensus>, ElementSocketError> {
        Err(ElementSocketError::Answer(
            "the recording socket does not read".into(),
        ))
    }

    fn elements(
        &self,
        _family: Family,
        _table: &str,
        _name: &str,
        _set: &Set,
    ) -> Result<BTreeMap<CompactString, Element>, ElementSocketError> {
        Err(ElementSocketError::Answer(
            "the recording socket does not read".into(),
        ))
    }

    fn holds_exactly(
        &self,
        family: Family,
        table: &str,
        name: &str,
        set: &Set,
        expected: &BTreeMap<CompactString, Element>,
    ) -> Result<bool, ElementSocketError> {
        Ok(self.elements(family, table, name, set)? == *expected)
    }
}

/// The (negative) error code of an `NLMSG_ERROR` payload; 0 is an acknowledgement.
fn error_code(payload: &[u8]) -> i32 {
    payload
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .map(i32::from_ne_bytes)
        .unwrap_or(-(nix::errno::Errno::EPROTO as i32))
}

fn error_text(payload: &[u8]) -> String {
    io::Error::from_raw_os_error(-error_code(payload)).to_string()
}
