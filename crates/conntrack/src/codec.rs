//! Translation between ctnetlink messages and [`FlowEntry`]: the dump request, the delete request, and the
//! parsing of the entries a dump returns. Pure, so the byte layout is tested without a kernel.

use std::net::IpAddr;

use netlink_packet_core::{
    DecodeError, DefaultNla, NLA_TYPE_MASK, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader,
    NetlinkMessage, NetlinkPayload, Nla,
};
use netlink_packet_netfilter::conntrack::{
    ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Protocol, Tuple,
};
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterProtoFamily};
use svcproxy_model::IpFamily;
use svcproxy_model::conntrack_plan::{FlowEntry, FlowProtocol, FlowTuple};

/// `CTA_ID`: the entry's id, big-endian u32. The packet crate has no variant for it.
const CTA_ID: u16 = 12;
/// `CTA_ZONE`: the entry's zone, big-endian u16. The packet crate has no variant for it.
const CTA_ZONE: u16 = 18;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("malformed netlink message: {0}")]
    Decode(#[from] DecodeError),
    #[error("netlink message of {length} bytes at offset {offset} overruns the {available}-byte datagram")]
    Truncated {
        offset: usize,
        length: usize,
        available: usize,
    },
    #[error("conntrack entry without {0}")]
    Missing(&'static str),
    #[error(
        "{0}: a {1} flow is not identified by addresses and ports alone, so it cannot be deleted by tuple"
    )]
    NoPorts(FlowEntry, String),
    #[error("{0}: source and destination addresses are of different families")]
    MixedFamilies(FlowEntry),
}

pub type Message = NetlinkMessage<NetfilterMessage>;

fn netfilter_family(family: IpFamily) -> NetfilterProtoFamily {
    match family {
        IpFamily::V4 => NetfilterProtoFamily::IPv4,
        IpFamily::V6 => NetfilterProtoFamily::IPv6,
    }
}

fn serialize(flags: u16, sequence_number: u32, family: IpFamily, message: ConntrackMessage) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = sequence_number;
    let mut packet = NetlinkMessage::new(
        header,
        NetlinkPayload::from(NetfilterMessage::new(
            NetfilterHeader::new(netfilter_family(family), 0, 0),
            message,
        )),
    );
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    buf
}

/// A request for every entry of one family. The kernel answers with one `IPCTNL_MSG_CT_NEW` message per
/// entry, spread over as many datagrams as it needs, then `NLMSG_DONE`.
pub fn dump_request(family: IpFamily, sequence_number: u32) -> Vec<u8> {
    serialize(
        NLM_F_REQUEST | NLM_F_DUMP,
        sequence_number,
        family,
        ConntrackMessage::Get(Vec::new()),
    )
}

/// A request deleting exactly `entry`, acknowledged either way.
///
/// The original tuple is always sent: a delete without any tuple is the kernel's "flush the whole table".
/// The zone is sent so an entry in another zone is found, and the id, when known, so that an entry which
/// expired and was recreated with the same tuple after the listing (and so follows the current rules) is
/// left alone: the kernel answers ENOENT for an id mismatch.
pub fn delete_request(entry: &FlowEntry, sequence_number: u32) -> Result<Vec<u8>, CodecError> {
    if !entry.protocol.has_ports() {
        return Err(CodecError::NoPorts(*entry, entry.protocol.name()));
    }
    let o = &entry.original;
    let family = IpFamily::of(&o.src);
    if IpFamily::of(&o.dst) != family {
        return Err(CodecError::MixedFamilies(*entry));
    }
    let mut attributes = vec![ConntrackAttribute::CtaTupleOrig(tuple_attributes(
        entry.protocol,
        o,
    ))];
    if entry.zone != 0 {
        attributes.push(ConntrackAttribute::Other(DefaultNla::new(
            CTA_ZONE,
            entry.zone.to_be_bytes().to_vec(),
        )));
    }
    if let Some(id) = entry.id {
        attributes.push(ConntrackAttribute::Other(DefaultNla::new(
            CTA_ID,
            id.to_be_bytes().to_vec(),
        )));
    }
    Ok(serialize(
        NLM_F_REQUEST | NLM_F_ACK,
        sequence_number,
        family,
        ConntrackMessage::Delete(attributes),
    ))
}

fn tuple_attributes(protocol: FlowProtocol, t: &FlowTuple) -> Vec<Tuple> {
    vec![
        Tuple::Ip(vec![
            IPTuple::SourceAddress(t.src),
            IPTuple::DestinationAddress(t.dst),
        ]),
        Tuple::Proto(vec![
            ProtoTuple::Protocol(Protocol::from(protocol.number())),
            ProtoTuple::SourcePort(t.src_port),
            ProtoTuple::DestinationPort(t.dst_port),
        ]),
    ]
}

/// Splits one received datagram into its netlink messages.
pub fn parse_datagram(buf: &[u8]) -> Result<Vec<Message>, CodecError> {
    let mut out = Vec::new();
    let mut offset = 0;
    // A netlink header is 16 bytes; anything shorter at the end is padding.
    while buf.len() - offset >= 16 {
        let rest = &buf[offset..];
        let length = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if length < 16 || length > rest.len() {
            return Err(CodecError::Truncated {
                offset,
                length,
                available: buf.len(),
            });
        }
        out.push(Message::deserialize(&rest[..length])?);
        // Messages start on 4-byte boundaries.
        offset += length.next_multiple_of(4);
    }
    Ok(out)
}

/// The flow an entry message (a dump answer or an event) describes.
pub fn entry_from_attributes(attributes: &[ConntrackAttribute]) -> Result<FlowEntry, CodecError> {
    let mut original = None;
    let mut reply = None;
    let mut zone = 0;
    let mut id = None;
    for a in attributes {
        match a {
            ConntrackAttribute::CtaTupleOrig(t) => original = Some(parse_tuple(t)?),
            ConntrackAttribute::CtaTupleReply(t) => reply = Some(parse_tuple(t)?),
            ConntrackAttribute::Other(nla) => match nla.kind() & NLA_TYPE_MASK {
                CTA_ZONE => zone = u16::from_be_bytes(value::<2>(nla, "zone")?),
                CTA_ID => id = Some(u32::from_be_bytes(value::<4>(nla, "id")?)),
                _ => {}
            },
            _ => {}
        }
    }
    let (protocol, original) = original.ok_or(CodecError::Missing("original tuple"))?;
    let (_, reply) = reply.ok_or(CodecError::Missing("reply tuple"))?;
    Ok(FlowEntry {
        protocol,
        original,
        reply,
        zone,
        id,
    })
}

fn value<const N: usize>(nla: &DefaultNla, what: &'static str) -> Result<[u8; N], CodecError> {
    let mut v = [0; N];
    if nla.value_len() != N {
        return Err(CodecError::Missing(what));
    }
    nla.emit_value(&mut v);
    Ok(v)
}

fn parse_tuple(tuple: &[Tuple]) -> Result<(FlowProtocol, FlowTuple), CodecError> {
    let mut src: Option<IpAddr> = None;
    let mut dst: Option<IpAddr> = None;
    let mut protocol = None;
    let (mut src_port, mut dst_port) = (0, 0);
    for part in tuple {
        match part {
            Tuple::Ip(ips) => {
                for ip in ips {
                    match ip {
                        IPTuple::SourceAddress(a) => src = Some(*a),
                        IPTuple::DestinationAddress(a) => dst = Some(*a),
                        _ => {}
                    }
                }
            }
            Tuple::Proto(protos) => {
                for p in protos {
                    match p {
                        ProtoTuple::Protocol(n) => protocol = Some(FlowProtocol::from_number(u8::from(*n))),
                        ProtoTuple::SourcePort(port) => src_port = *port,
                        ProtoTuple::DestinationPort(port) => dst_port = *port,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    let missing = CodecError::Missing;
    Ok((
        protocol.ok_or_else(|| missing("protocol number"))?,
        FlowTuple {
            src: src.ok_or_else(|| missing("source address"))?,
            dst: dst.ok_or_else(|| missing("destination address"))?,
            src_port,
            dst_port,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_netfilter::NetfilterMessageInner;

    fn entry() -> FlowEntry {
        FlowEntry {
            protocol: FlowProtocol::Udp,
            original: FlowTuple::new(
                "10.0.0.1:40000".parse().unwrap(),
                "10.96.0.10:53".parse().unwrap(),
            ),
            reply: FlowTuple::new(
                "127.0.0.1:5353".parse().unwrap(),
                "10.0.0.1:40000".parse().unwrap(),
            ),
            zone: 7,
            id: Some(0xdead_beef),
        }
    }

    fn only_message(buf: &[u8]) -> Message {
        let mut messages = parse_datagram(buf).unwrap();
        assert_eq!(messages.len(), 1);
        messages.remove(0)
    }

    fn conntrack(m: Message) -> ConntrackMessage {
        match m.payload {
            NetlinkPayload::InnerMessage(NetfilterMessage {
                inner: NetfilterMessageInner::Conntrack(c),
                ..
            }) => c,
            other => panic!("not a conntrack message: {other:?}"),
        }
    }

    #[test]
    fn dump_request_is_a_get_dump_of_the_family() {
        let m = only_message(&dump_request(IpFamily::V6, 42));
        assert_eq!(m.header.sequence_number, 42);
        assert_eq!(m.header.flags, NLM_F_REQUEST | NLM_F_DUMP);
        // Subsystem ctnetlink (1) in the high byte, IPCTNL_MSG_CT_GET (1) in the low one.
        assert_eq!(m.header.message_type, 0x0101);
        let NetlinkPayload::InnerMessage(nf) = &m.payload else {
            panic!("no payload")
        };
        assert_eq!(nf.header.family, NetfilterProtoFamily::IPv6);
    }

    #[test]
    fn delete_request_names_the_original_tuple_zone_and_id() {
        let m = only_message(&delete_request(&entry(), 9).unwrap());
        assert_eq!(m.header.flags, NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(m.header.message_type, 0x0102);
        let ConntrackMessage::Delete(attributes) = conntrack(m) else {
            panic!("not a delete")
        };
        // Parsing the request back gives the entry minus the reply tuple, which a delete does not need.
        let with_reply: Vec<ConntrackAttribute> = attributes
            .iter()
            .cloned()
            .chain([ConntrackAttribute::CtaTupleReply(tuple_attributes(
                FlowProtocol::Udp,
                &entry().reply,
            ))])
            .collect();
        assert_eq!(entry_from_attributes(&with_reply).unwrap(), entry());
        assert!(matches!(
            entry_from_attributes(&attributes),
            Err(CodecError::Missing("reply tuple"))
        ));
    }

    #[test]
    fn zone_zero_and_unknown_id_are_left_out() {
        let mut e = entry();
        e.zone = 0;
        e.id = None;
        let ConntrackMessage::Delete(attributes) = conntrack(only_message(&delete_request(&e, 1).unwrap()))
        else {
            panic!("not a delete")
        };
        assert_eq!(attributes.len(), 1);
    }

    #[test]
    fn entry_message_round_trips_through_bytes() {
        let e = entry();
        let message = ConntrackMessage::New(vec![
            ConntrackAttribute::CtaTupleOrig(tuple_attributes(e.protocol, &e.original)),
            ConntrackAttribute::CtaTupleReply(tuple_attributes(e.protocol, &e.reply)),
            ConntrackAttribute::CtaMark(0),
            ConntrackAttribute::Other(DefaultNla::new(CTA_ZONE, 7u16.to_be_bytes().to_vec())),
            ConntrackAttribute::Other(DefaultNla::new(CTA_ID, 0xdead_beef_u32.to_be_bytes().to_vec())),
        ]);
        // Two messages in one datagram, as a dump delivers them.
        let mut datagram = serialize(0, 5, IpFamily::V4, message.clone());
        datagram.extend(serialize(0, 5, IpFamily::V4, message));
        let messages = parse_datagram(&datagram).unwrap();
        assert_eq!(messages.len(), 2);
        for m in messages {
            let ConntrackMessage::New(attributes) = conntrack(m) else {
                panic!("not an entry")
            };
            assert_eq!(entry_from_attributes(&attributes).unwrap(), e);
        }
    }

    #[test]
    fn portless_and_mixed_family_entries_cannot_be_deleted() {
        let mut icmp = entry();
        icmp.protocol = FlowProtocol::Other(1);
        assert!(matches!(delete_request(&icmp, 1), Err(CodecError::NoPorts(..))));
        let mut mixed = entry();
        mixed.original.dst = "fd00::1".parse().unwrap();
        assert!(matches!(
            delete_request(&mixed, 1),
            Err(CodecError::MixedFamilies(_))
        ));
    }

    #[test]
    fn overrunning_length_is_an_error_not_a_panic() {
        let mut datagram = dump_request(IpFamily::V4, 1);
        datagram[0] = 200;
        assert!(matches!(
            parse_datagram(&datagram),
            Err(CodecError::Truncated { .. })
        ));
    }
}
