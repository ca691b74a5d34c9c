//! [`NetlinkConntrack`]: the conntrack table over ctnetlink (`NETLINK_NETFILTER`), without the `conntrack`
//! tool.

use std::collections::HashSet;
use std::io;
use std::sync::Mutex;

use netlink_packet_core::NetlinkPayload;
use netlink_packet_netfilter::NetfilterMessageInner;
use netlink_packet_netfilter::conntrack::ConntrackMessage;
use netlink_sys::protocols::NETLINK_NETFILTER;
use netlink_sys::{Socket, SocketAddr};
use svcproxy_model::IpFamily;
use svcproxy_model::conntrack_plan::FlowEntry;

use crate::codec::{self, Message};
use crate::{Conntrack, ConntrackError};

/// Room for the largest datagram the kernel builds for a dump (it caps dump skbs at 32 KiB) with headroom.
/// A big buffer also lets the kernel pack more entries per datagram, which matters for large tables.
const RECV_BUFFER: usize = 64 * 1024;
/// Deletes sent in one datagram. Each is acknowledged separately; the batch bounds how many acknowledgements
/// queue in the socket's receive buffer at once.
const DELETE_BATCH: usize = 128;

/// The conntrack table of the network namespace this value was created in.
///
/// The socket is opened by [`NetlinkConntrack::new`] and a netlink socket stays bound to the namespace it was
/// created in, so a client made on a thread that entered another namespace keeps working on that namespace
/// from any thread. Requests are serialised by a mutex: a netlink socket carries one conversation at a time.
#[derive(Debug)]
pub struct NetlinkConntrack {
    conversation: Mutex<Conversation>,
}

#[derive(Debug)]
struct Conversation {
    socket: Socket,
    sequence: u32,
}

impl NetlinkConntrack {
    pub fn new() -> Result<Self, ConntrackError> {
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(ConntrackError::Open)?;
        socket.bind_auto().map_err(ConntrackError::Open)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(ConntrackError::Open)?;
        // Error acknowledgements would otherwise echo each whole delete request back.
        socket.set_cap_ack(true).map_err(ConntrackError::Open)?;
        Ok(NetlinkConntrack {
            conversation: Mutex::new(Conversation { socket, sequence: 0 }),
        })
    }

    fn conversation(&self) -> std::sync::MutexGuard<'_, Conversation> {
        // A panic mid-request leaves at worst unread answers behind, which the sequence checks skip.
        self.conversation.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Conversation {
    fn next_sequence(&mut self) -> u32 {
        self.sequence = self.sequence.wrapping_add(1);
        self.sequence
    }

    fn send(&self, buf: &[u8], operation: &'static str) -> Result<(), ConntrackError> {
        self.socket
            .send(buf, 0)
            .map_err(|source| ConntrackError::Io { operation, source })?;
        Ok(())
    }

    fn receive(&self, buf: &mut [u8], operation: &'static str) -> Result<Vec<Message>, ConntrackError> {
        let len = self
            .socket
            // MSG_TRUNC makes recv report a datagram's real length, so a too-small buffer is an error
            // instead of silently lost entries.
            .recv(&mut &mut buf[..], libc::MSG_TRUNC)
            .map_err(|source| ConntrackError::Io { operation, source })?;
        if len > buf.len() {
            return Err(ConntrackError::Io {
                operation,
                source: io::Error::other(format!(
                    "datagram of {len} bytes does not fit the {}-byte buffer",
                    buf.len()
                )),
            });
        }
        Ok(codec::parse_datagram(&buf[..len])?)
    }
}

fn kernel_error(operation: &'static str, code: i32) -> ConntrackError {
    ConntrackError::Kernel {
        operation,
        source: io::Error::from_raw_os_error(code.abs()),
    }
}

impl Conntrack for NetlinkConntrack {
    fn list(&self, family: IpFamily) -> Result<Vec<FlowEntry>, ConntrackError> {
        const OP: &str = "dump";
        let mut c = self.conversation();
        let sequence = c.next_sequence();
        c.send(&codec::dump_request(family, sequence), OP)?;
        let mut buf = vec![0; RECV_BUFFER];
        let mut entries = Vec::new();
        loop {
            for message in c.receive(&mut buf, OP)? {
                // Answers to an earlier request that was abandoned half-way are skipped.
                if message.header.sequence_number != sequence {
                    continue;
                }
                match message.payload {
                    NetlinkPayload::Done(_) => return Ok(entries),
                    NetlinkPayload::Error(e) if e.code.is_some() => {
                        return Err(kernel_error(OP, e.raw_code()));
                    }
                    NetlinkPayload::InnerMessage(m) => {
                        if let NetfilterMessageInner::Conntrack(ConntrackMessage::New(attributes)) = m.inner {
                            entries.push(codec::entry_from_attributes(&attributes)?);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    fn delete(&self, entries: &[FlowEntry]) -> Result<usize, ConntrackError> {
        const OP: &str = "delete";
        let mut c = self.conversation();
        let mut buf = vec![0; RECV_BUFFER];
        // Encode every request before sending any, so an entry that cannot be named by its tuple fails the
        // call before anything was deleted.
        let requests = entries
            .iter()
            .map(|entry| {
                let sequence = c.next_sequence();
                Ok((sequence, codec::delete_request(entry, sequence)?))
            })
            .collect::<Result<Vec<_>, ConntrackError>>()?;
        let (mut deleted, mut failed, mut first_failure) = (0, 0, None);
        for batch in requests.chunks(DELETE_BATCH) {
            let request: Vec<u8> = batch
                .iter()
                .flat_map(|(_, bytes)| bytes.iter().copied())
                .collect();
            let mut pending: HashSet<u32> = batch.iter().map(|(sequence, _)| *sequence).collect();
            c.send(&request, OP)?;
            while !pending.is_empty() {
                for message in c.receive(&mut buf, OP)? {
                    if !pending.remove(&message.header.sequence_number) {
                        continue;
                    }
                    match message.payload {
                        NetlinkPayload::Error(e) => match e.raw_code().abs() {
                            0 => deleted += 1,
                            // Gone already: expired, or deleted by someone else. That is the goal.
                            libc::ENOENT => {}
                            code => {
                                failed += 1;
                                first_failure.get_or_insert(io::Error::from_raw_os_error(code));
                            }
                        },
                        // Anything but an acknowledgement answering a delete means the conversation is out of
                        // step; counting it as failed keeps the totals honest.
                        _ => {
                            failed += 1;
                            first_failure.get_or_insert(io::Error::other("unexpected answer to a delete"));
                        }
                    }
                }
            }
        }
        match first_failure {
            None => Ok(deleted),
            Some(first) => Err(ConntrackError::Partial {
                deleted,
                failed,
                first,
            }),
        }
    }
}
