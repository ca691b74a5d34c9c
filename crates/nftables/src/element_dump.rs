//! Reading a set's elements back from nf_tables over netlink, as the text `nft list` prints for them.
//!
//! Why not `nft list table`: at 5,000 services × 10 endpoints the table holds about 50,000 map elements, and
//! `nft` takes about 0.5 s just to format them (its terse listing of the same table, rules and set
//! declarations without elements, takes under 0.1 s as `nft -t list ruleset`). Reading the elements ourselves
//! and the rest from the terse listing makes a read-back — on every restart and every verification — about a
//! tenth of the cost. Only the types [`crate::element_batch`] encodes are decoded; sets with flags (intervals,
//! timeouts) are left to `nft`.

use std::net::{Ipv4Addr, Ipv6Addr};

use thiserror::Error;

use crate::element_batch::{
    DataKind, Field, NFNL_SUBSYS_NFTABLES, NFT_MSG_NEWSETELEM, NFTA_DATA_VALUE, NFTA_DATA_VERDICT,
    NFTA_LIST_ELEM, NFTA_SET_ELEM_DATA, NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_LIST_ELEMENTS,
    NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_USERDATA, NFTA_VERDICT_CHAIN,
    NFTA_VERDICT_CODE, NLM_F_REQUEST, UDATA_SET_ELEM_COMMENT, Writer, data_kind, nfproto, type_fields,
};
use crate::ruleset::{CompactString, Element, Family, Set};

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("set {set}: type {ty:?} is not one the netlink reader decodes")]
    Type { set: String, ty: String },
    #[error("set {set}: malformed element dump: {what}")]
    Malformed { set: String, what: String },
}

/// The type of a set element dump answer (each carries some of the elements; `NLMSG_DONE` ends the dump).
pub const NEWSETELEM_MESSAGE: u16 = NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWSETELEM;
/// The answer to a generation request.
pub const NEWGEN_MESSAGE: u16 = NFNL_SUBSYS_NFTABLES << 8 | 15;
const NFT_MSG_GETSETELEM: u16 = 13;
pub(crate) const NLM_F_DUMP: u16 = 0x300;
const NFTA_SET_ELEM_FLAGS: u16 = 3;
const NFT_SET_ELEM_INTERVAL_END: u32 = 1;
const NFTA_GEN_ID: u16 = 1;
/// The attribute type without the nested and byte-order flags.
const NLA_TYPE_MASK: u16 = 0x3fff;
const NETLINK_HEADER: usize = 16;
pub(crate) const NFGENMSG: usize = 4;

/// A request to dump every element of set `set` of table `table`.
pub fn dump_request(family: Family, table: &str, set: &str, sequence: u32) -> Vec<u8> {
    let mut w = Writer { buf: Vec::new() };
    w.message(
        NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETSETELEM,
        NLM_F_REQUEST | NLM_F_DUMP,
        sequence,
        nfproto(family),
        0,
        |w| {
            w.attr_str(NFTA_SET_ELEM_LIST_TABLE, table);
            w.attr_str(NFTA_SET_ELEM_LIST_SET, set);
        },
    );
    w.buf
}

/// One netlink message of a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    pub ty: u16,
    pub sequence: u32,
    /// Everything after the netlink header.
    pub payload: &'a [u8],
}

/// The messages of one received datagram; an error if a length field does not fit.
pub fn messages(datagram: &[u8]) -> Result<Vec<Message<'_>>, String> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + NETLINK_HEADER <= datagram.len() {
        let len = u32::from_ne_bytes(datagram[at..at + 4].try_into().unwrap_or_default()) as usize;
        if len < NETLINK_HEADER || at + len > datagram.len() {
            return Err(format!(
                "message of {len} bytes at offset {at} of a {}-byte datagram",
                datagram.len()
            ));
        }
        out.push(Message {
            ty: u16::from_ne_bytes([datagram[at + 4], datagram[at + 5]]),
            sequence: u32::from_ne_bytes(datagram[at + 8..at + 12].try_into().unwrap_or_default()),
            payload: &datagram[at + NETLINK_HEADER..at + len],
        });
        at += len.next_multiple_of(4);
    }
    Ok(out)
}

/// The generation id of a generation answer's payload.
pub fn generation_of(payload: &[u8]) -> Option<u32> {
    let attrs = attributes(payload.get(NFGENMSG..)?).ok()?;
    let id = attrs.iter().find(|(ty, _)| *ty == NFTA_GEN_ID)?.1;
    Some(u32::from_be_bytes(id.try_into().ok()?))
}

/// The `(type, value)` attributes in `bytes`.
pub(crate) fn attributes(mut bytes: &[u8]) -> Result<Vec<(u16, &[u8])>, String> {
    let mut out = Vec::new();
    while bytes.len() >= 4 {
        let len = u16::from_ne_bytes([bytes[0], bytes[1]]) as usize;
        let ty = u16::from_ne_bytes([bytes[2], bytes[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > bytes.len() {
            return Err(format!("attribute of {len} bytes in {}", bytes.len()));
        }
        out.push((ty, &bytes[4..len]));
        bytes = &bytes[len.next_multiple_of(4).min(bytes.len())..];
    }
    Ok(out)
}

pub(crate) fn find<'a>(attrs: &[(u16, &'a [u8])], ty: u16) -> Option<&'a [u8]> {
    attrs.iter().find(|(t, _)| *t == ty).map(|(_, v)| *v)
}

/// Turns a set's dumped elements into the keys, values and comments `nft list` prints.
#[derive(Debug, Clone)]
pub struct ElementDecoder {
    set: String,
    key: Vec<Field>,
    data: Option<DataKind>,
}

impl ElementDecoder {
    pub fn for_set(name: &str, set: &Set) -> Result<Self, DecodeError> {
        let unsupported = || DecodeError::Type {
            set: name.to_string(),
            ty: format!("{} : {}", set.key_type, set.data_type.as_deref().unwrap_or("")),
        };
        if !set.flags.is_empty() {
            return Err(unsupported());
        }
        Ok(ElementDecoder {
            set: name.to_string(),
            key: type_fields(&set.key_type).ok_or_else(unsupported)?,
            data: data_kind(set).ok_or_else(unsupported)?,
        })
    }

    fn malformed(&self, what: impl Into<String>) -> DecodeError {
        DecodeError::Malformed {
            set: self.set.clone(),
            what: what.into(),
        }
    }

    /// Hands each element of one element message (its payload, after the netlink header) to `each`.
    pub fn decode_each(
        &self,
        payload: &[u8],
        mut each: impl FnMut(CompactString, Element),
    ) -> Result<(), DecodeError> {
        let body = payload
            .get(NFGENMSG..)
            .ok_or_else(|| self.malformed("message shorter than its header"))?;
        let attrs = attributes(body).map_err(|e| self.malformed(e))?;
        let Some(list) = find(&attrs, NFTA_SET_ELEM_LIST_ELEMENTS) else {
            return Ok(());
        };
        for (ty, element) in attributes(list).map_err(|e| self.malformed(e))? {
            if ty != NFTA_LIST_ELEM {
                continue;
            }
            let (key, element) = self.element(element)?;
            each(key, element);
        }
        Ok(())
    }

    fn element(&self, bytes: &[u8]) -> Result<(CompactString, Element), DecodeError> {
        let attrs = attributes(bytes).map_err(|e| self.malformed(e))?;
        if let Some(flags) = find(&attrs, NFTA_SET_ELEM_FLAGS)
            && u32::from_be_bytes(flags.try_into().unwrap_or_default()) & NFT_SET_ELEM_INTERVAL_END != 0
        {
            return Err(self.malformed("interval end element in a set without the interval flag"));
        }
        let key = find(&attrs, NFTA_SET_ELEM_KEY).ok_or_else(|| self.malformed("element without a key"))?;
        let key = self.value_text(&self.key, self.data_value(key, "key")?)?;
        let value = match (&self.data, find(&attrs, NFTA_SET_ELEM_DATA)) {
            (None, _) => None,
            (Some(_), None) => return Err(self.malformed(format!("element {key} of a map without a value"))),
            (Some(DataKind::Fields(fields)), Some(data)) => {
                Some(self.value_text(fields, self.data_value(data, "value")?)?)
            }
            (Some(DataKind::Verdict), Some(data)) => Some(self.verdict_text(data)?),
        };
        let comment = find(&attrs, NFTA_SET_ELEM_USERDATA).and_then(comment_of);
        Ok((
            key.into(),
            Element {
                value: value.map(CompactString::from),
                comment: comment.map(CompactString::from),
            },
        ))
    }

    fn data_value<'a>(&self, nested: &'a [u8], what: &str) -> Result<&'a [u8], DecodeError> {
        let attrs = attributes(nested).map_err(|e| self.malformed(e))?;
        find(&attrs, NFTA_DATA_VALUE).ok_or_else(|| self.malformed(format!("{what} without a value")))
    }

    /// The inverse of the encoder: in a concatenation each field fills whole 4-byte registers.
    fn value_text(&self, fields: &[Field], bytes: &[u8]) -> Result<String, DecodeError> {
        let mut text = String::new();
        let mut at = 0;
        for (i, field) in fields.iter().enumerate() {
            let raw = bytes
                .get(at..at + field.len())
                .ok_or_else(|| self.malformed(format!("{} bytes for {fields:?}", bytes.len())))?;
            if i > 0 {
                text.push_str(" . ");
            }
            match field {
                Field::Addr4 => {
                    let octets: [u8; 4] = raw.try_into().unwrap_or_default();
                    text.push_str(&Ipv4Addr::from(octets).to_string());
                }
                Field::Addr6 => {
                    let octets: [u8; 16] = raw.try_into().unwrap_or_default();
                    text.push_str(&Ipv6Addr::from(octets).to_string());
                }
                Field::Proto => text.push_str(&match raw[0] {
                    6 => "tcp".to_string(),
                    17 => "udp".to_string(),
                    132 => "sctp".to_string(),
                    n => n.to_string(),
                }),
                Field::Port => text.push_str(&u16::from_be_bytes([raw[0], raw[1]]).to_string()),
                Field::HostU32 => {
                    text.push_str(&u32::from_ne_bytes(raw.try_into().unwrap_or_default()).to_string())
                }
            }
            at += if fields.len() > 1 {
                field.len().next_multiple_of(4)
            } else {
                field.len()
            };
        }
        if at != bytes.len() {
            return Err(self.malformed(format!("{} bytes for {fields:?}", bytes.len())));
        }
        Ok(text)
    }

    fn verdict_text(&self, data: &[u8]) -> Result<String, DecodeError> {
        let attrs = attributes(data).map_err(|e| self.malformed(e))?;
        let verdict =
            find(&attrs, NFTA_DATA_VERDICT).ok_or_else(|| self.malformed("value without a verdict"))?;
        let attrs = attributes(verdict).map_err(|e| self.malformed(e))?;
        let code = find(&attrs, NFTA_VERDICT_CODE)
            .and_then(|c| c.try_into().ok())
            .map(i32::from_be_bytes)
            .ok_or_else(|| self.malformed("verdict without a code"))?;
        let chain = || -> Result<&str, DecodeError> {
            find(&attrs, NFTA_VERDICT_CHAIN)
                .map(|c| c.strip_suffix(&[0]).unwrap_or(c))
                .and_then(|c| std::str::from_utf8(c).ok())
                .ok_or_else(|| self.malformed("jump without a chain"))
        };
        Ok(match code {
            0 => "drop".to_string(),
            1 => "accept".to_string(),
            -1 => "continue".to_string(),
            -5 => "return".to_string(),
            -3 => format!("jump {}", chain()?),
            -4 => format!("goto {}", chain()?),
            other => return Err(self.malformed(format!("verdict code {other}"))),
        })
    }
}

/// The comment in an element's user data: type-length-value records, the comment NUL-terminated.
fn comment_of(mut udata: &[u8]) -> Option<String> {
    while udata.len() >= 2 {
        let (ty, len) = (udata[0], udata[1] as usize);
        let value = udata.get(2..2 + len)?;
        if ty == UDATA_SET_ELEM_COMMENT {
            let text = value.strip_suffix(&[0]).unwrap_or(value);
            return std::str::from_utf8(text).ok().map(str::to_string);
        }
        udata = &udata[2 + len..];
    }
    None
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::element_batch::{ElementChange, encode_batch};
    use crate::ruleset::{Ruleset, SetKind};

    fn table() -> Ruleset {
        let mut rs = Ruleset::new(Family::Ip, "svcproxy");
        let sets = [
            ("hairpin", SetKind::Set, "type ipv4_addr . ipv4_addr", None),
            (
                "service-ips",
                SetKind::Map,
                "type ipv4_addr . inet_proto . inet_service",
                Some("verdict"),
            ),
            (
                "nodeports",
                SetKind::Map,
                "type inet_proto . inet_service",
                Some("verdict"),
            ),
            (
                "endpoints-tcp-3",
                SetKind::Map,
                "typeof numgen random mod 1",
                Some("ip daddr . tcp dport"),
            ),
            (
                "endpoints6",
                SetKind::Map,
                "typeof numgen random mod 1",
                Some("ip6 daddr . udp dport"),
            ),
            ("cluster-ips", SetKind::Set, "type ipv4_addr", None),
        ];
        for (name, kind, key, data) in sets {
            rs.sets.insert(name.into(), Set::new(kind, key, data));
        }
        rs
    }

    fn element(value: Option<&str>, comment: Option<&str>) -> Element {
        Element {
            value: value.map(CompactString::from),
            comment: comment.map(CompactString::from),
        }
    }

    /// An element message as the kernel sends it in a dump has the layout of the one that adds the elements,
    /// so the encoder's batch, decoded, must give back exactly the elements it was made from.
    #[test]
    fn decoding_inverts_encoding() {
        let rs = table();
        let wanted: Vec<(&str, &str, Element)> = vec![
            ("hairpin", "10.244.0.5 . 10.244.0.5", element(None, None)),
            (
                "service-ips",
                "10.96.0.10 . udp . 53",
                element(Some("goto service-abc"), Some("kube-system/dns:dns")),
            ),
            (
                "service-ips",
                "10.96.0.1 . tcp . 443",
                element(Some("jump service-def"), None),
            ),
            ("service-ips", "10.96.0.2 . sctp . 9", element(Some("drop"), None)),
            ("nodeports", "tcp . 30080", element(Some("accept"), None)),
            ("nodeports", "sctp . 1", element(Some("return"), None)),
            (
                "endpoints-tcp-3",
                "0",
                element(Some("10.244.1.2 . 8080"), Some("ns/web:http")),
            ),
            (
                "endpoints-tcp-3",
                "196609",
                element(Some("10.244.1.3 . 65535"), None),
            ),
            ("endpoints6", "7", element(Some("fd00::1:2 . 53"), None)),
            ("cluster-ips", "255.255.255.255", element(None, None)),
        ];
        let changes: Vec<ElementChange> = wanted
            .iter()
            .map(|(set, key, e)| ElementChange {
                set: set.to_string(),
                key: (*key).into(),
                element: e.clone(),
                add: true,
            })
            .collect();
        let batch = encode_batch(&rs, &changes, 1).unwrap();
        let mut got: BTreeMap<String, BTreeMap<CompactString, Element>> = BTreeMap::new();
        for m in messages(&batch.bytes).unwrap() {
            if m.ty != NEWSETELEM_MESSAGE {
                continue;
            }
            let attrs = attributes(&m.payload[NFGENMSG..]).unwrap();
            let set = std::str::from_utf8(find(&attrs, NFTA_SET_ELEM_LIST_SET).unwrap())
                .unwrap()
                .trim_end_matches('\0')
                .to_string();
            let decoder = ElementDecoder::for_set(&set, &rs.sets[&set]).unwrap();
            let out = got.entry(set).or_default();
            decoder
                .decode_each(m.payload, |k, e| {
                    out.insert(k, e);
                })
                .unwrap();
        }
        let mut expected: BTreeMap<String, BTreeMap<CompactString, Element>> = BTreeMap::new();
        for (set, key, e) in wanted {
            expected.entry(set.to_string()).or_default().insert(key.into(), e);
        }
        assert_eq!(got, expected);
    }

    #[test]
    fn flagged_sets_and_damaged_messages_are_errors() {
        let mut set = Set::new(SetKind::Set, "type ipv4_addr", None);
        set.flags.insert("interval".into());
        assert!(matches!(
            ElementDecoder::for_set("s", &set),
            Err(DecodeError::Type { .. })
        ));
        let rs = table();
        let batch = encode_batch(
            &rs,
            &[ElementChange {
                set: "endpoints-tcp-3".into(),
                key: "1".into(),
                element: element(Some("10.0.0.1 . 80"), None),
                add: true,
            }],
            1,
        )
        .unwrap();
        let m = messages(&batch.bytes).unwrap()[1];
        let decoder = ElementDecoder::for_set("endpoints-tcp-3", &rs.sets["endpoints-tcp-3"]).unwrap();
        // Cut anywhere inside the element list: never a panic, never a wrong element.
        for cut in NFGENMSG..m.payload.len() {
            let mut out = BTreeMap::new();
            if decoder
                .decode_each(&m.payload[..cut], |k, e| {
                    out.insert(k, e);
                })
                .is_ok()
            {
                assert!(out.is_empty(), "cut at {cut}: {out:?}");
            }
        }
        // A set of another type reads the same bytes as malformed, not as something else.
        let other = ElementDecoder::for_set("hairpin", &rs.sets["hairpin"]).unwrap();
        assert!(other.decode_each(m.payload, |_, _| {}).is_err());
    }

    #[test]
    fn a_dump_request_names_table_and_set() {
        let r = dump_request(Family::Ip6, "svcproxy", "service-ips", 9);
        let m = messages(&r).unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].ty, 10 << 8 | 13);
        assert_eq!(m[0].sequence, 9);
        assert_eq!(m[0].payload[0], 10, "NFPROTO_IPV6");
        let attrs = attributes(&m[0].payload[NFGENMSG..]).unwrap();
        assert_eq!(find(&attrs, NFTA_SET_ELEM_LIST_TABLE), Some(&b"svcproxy\0"[..]));
        assert_eq!(find(&attrs, NFTA_SET_ELEM_LIST_SET), Some(&b"service-ips\0"[..]));
    }
}
