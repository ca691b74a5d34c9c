//! An update that only adds and removes set and map elements, as the nf_tables netlink batch the kernel
//! applies atomically, for a writer that keeps its netlink socket open.
//!
//! Why not `nft -f`: for such an update nearly all of `nft`'s time is its own (start-up, fetching every chain
//! and set of the table into its cache) and the wait when its socket closes (the kernel then flushes the work
//! that frees deleted objects, an RCU grace period of about 10 ms); the kernel's commit of a few elements
//! takes well under a millisecond. In the mapped layout an endpoint change is exactly such an update.
//!
//! Only the types our tables use are encoded (addresses, protocols, ports, `numgen` keys, endpoint
//! `address . port` data, verdicts); anything else is an [`EncodeError`] and the caller uses `nft`.

use std::net::{Ipv4Addr, Ipv6Addr};

use thiserror::Error;

use crate::ruleset::{CompactString, Element, Family, Ruleset, Set};

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EncodeError {
    #[error("set {set}: type {ty:?} is not one the netlink writer encodes")]
    Type { set: String, ty: String },
    #[error("set {set}: {what} {text:?} does not parse as {ty}")]
    Value {
        set: String,
        what: &'static str,
        text: String,
        ty: &'static str,
    },
    #[error("set {0} is not in the table")]
    UnknownSet(String),
    #[error("element comment {0:?} is longer than nftables allows")]
    Comment(String),
}

/// One element to add or delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElementChange {
    pub set: String,
    pub key: CompactString,
    pub element: Element,
    pub add: bool,
}

/// The element changes that turn `before` into `after`, when that is all that differs: same chains, same
/// set definitions, no set with flags (intervals and timeouts need more than a key and a value). `None`
/// otherwise. Deletions come first, as in a text transaction, so a changed value is a delete and an add.
pub fn element_changes(before: &Ruleset, after: &Ruleset) -> Option<Vec<ElementChange>> {
    if before.chains != after.chains || before.sets.len() != after.sets.len() {
        return None;
    }
    let mut deletes = Vec::new();
    let mut adds = Vec::new();
    for (name, old) in &before.sets {
        let new = after.sets.get(name)?;
        if !old.same_definition(new) || !old.flags.is_empty() {
            return None;
        }
        for (key, element) in &old.elements {
            if new.elements.get(key) != Some(element) {
                deletes.push(ElementChange {
                    set: name.clone(),
                    key: key.clone(),
                    element: element.clone(),
                    add: false,
                });
            }
        }
        for (key, element) in &new.elements {
            if old.elements.get(key) != Some(element) {
                adds.push(ElementChange {
                    set: name.clone(),
                    key: key.clone(),
                    element: element.clone(),
                    add: true,
                });
            }
        }
    }
    deletes.extend(adds);
    Some(deletes)
}

/// A batch ready to send, and the sequence numbers its messages carry (errors name them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedBatch {
    pub bytes: Vec<u8>,
    /// The first and last sequence number used, the batch's begin and end markers included.
    pub sequences: (u32, u32),
}

// Netlink and nf_tables constants (linux/netlink.h, linux/netfilter/nfnetlink.h, nf_tables.h).
pub(crate) const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_CREATE: u16 = 0x400;
const NLA_F_NESTED: u16 = 0x8000;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
pub(crate) const NFNL_SUBSYS_NFTABLES: u16 = 10;
pub(crate) const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
pub(crate) const NFT_MSG_GETGEN: u16 = 16;
pub(crate) const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
pub(crate) const NFTA_SET_ELEM_LIST_SET: u16 = 2;
pub(crate) const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
pub(crate) const NFTA_LIST_ELEM: u16 = 1;
pub(crate) const NFTA_SET_ELEM_KEY: u16 = 1;
pub(crate) const NFTA_SET_ELEM_DATA: u16 = 2;
pub(crate) const NFTA_SET_ELEM_USERDATA: u16 = 6;
pub(crate) const NFTA_DATA_VALUE: u16 = 1;
pub(crate) const NFTA_DATA_VERDICT: u16 = 2;
pub(crate) const NFTA_VERDICT_CODE: u16 = 1;
pub(crate) const NFTA_VERDICT_CHAIN: u16 = 2;
/// libnftnl's user-data tag for an element comment.
pub(crate) const UDATA_SET_ELEM_COMMENT: u8 = 0;
/// nftables keeps at most this many bytes of comment, its terminating NUL included.
const COMMENT_MAX: usize = 128;

pub(crate) fn nfproto(family: Family) -> u8 {
    match family {
        Family::Ip => 2,
        Family::Ip6 => 10,
        Family::Inet => 1,
        Family::Arp => 3,
        Family::Bridge => 7,
        Family::Netdev => 5,
    }
}

/// One field of a key or of map data, as the set's type names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Field {
    Addr4,
    Addr6,
    Proto,
    Port,
    /// `typeof numgen …`: an integer in host byte order, as `numgen` writes its register.
    HostU32,
}

impl Field {
    pub(crate) fn len(self) -> usize {
        match self {
            Field::Addr4 | Field::HostU32 => 4,
            Field::Addr6 => 16,
            Field::Proto => 1,
            Field::Port => 2,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Field::Addr4 => "an IPv4 address",
            Field::Addr6 => "an IPv6 address",
            Field::Proto => "a protocol",
            Field::Port => "a port",
            Field::HostU32 => "a number",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DataKind {
    Fields(Vec<Field>),
    Verdict,
}

pub(crate) fn type_fields(ty: &str) -> Option<Vec<Field>> {
    if let Some(rest) = ty.strip_prefix("type ") {
        return rest
            .split(" . ")
            .map(|t| match t.trim() {
                "ipv4_addr" => Some(Field::Addr4),
                "ipv6_addr" => Some(Field::Addr6),
                "inet_proto" => Some(Field::Proto),
                "inet_service" => Some(Field::Port),
                _ => None,
            })
            .collect();
    }
    typeof_fields(ty.strip_prefix("typeof ")?)
}

/// Fields of a `typeof` expression list: the selectors our tables use.
fn typeof_fields(list: &str) -> Option<Vec<Field>> {
    list.split(" . ")
        .map(|e| {
            let e = e.trim();
            if e.starts_with("numgen ") {
                Some(Field::HostU32)
            } else if matches!(e, "ip daddr" | "ip saddr") {
                Some(Field::Addr4)
            } else if matches!(e, "ip6 daddr" | "ip6 saddr") {
                Some(Field::Addr6)
            } else if e.ends_with(" dport") || e.ends_with(" sport") {
                Some(Field::Port)
            } else {
                None
            }
        })
        .collect()
}

pub(crate) fn data_kind(set: &Set) -> Option<Option<DataKind>> {
    Some(match set.data_type.as_deref() {
        None => None,
        Some("verdict") => Some(DataKind::Verdict),
        // A map declared with `typeof` prints its data as selectors too.
        Some(d) if set.key_type.starts_with("typeof ") => Some(DataKind::Fields(typeof_fields(d)?)),
        Some(d) => Some(DataKind::Fields(type_fields(&format!("type {d}"))?)),
    })
}

/// The bytes of `text` under `fields`: in a concatenation every field takes a whole number of 4-byte
/// registers; a single field takes its own length.
fn value_bytes(set: &str, what: &'static str, fields: &[Field], text: &str) -> Result<Vec<u8>, EncodeError> {
    let parts: Vec<&str> = text.split(" . ").map(str::trim).collect();
    let bad = |ty: &'static str| EncodeError::Value {
        set: set.to_string(),
        what,
        text: text.to_string(),
        ty,
    };
    if parts.len() != fields.len() {
        return Err(bad("as many fields as the type has"));
    }
    let mut out = Vec::new();
    for (field, part) in fields.iter().zip(parts) {
        let start = out.len();
        match field {
            Field::Addr4 => out.extend(part.parse::<Ipv4Addr>().map_err(|_| bad(field.name()))?.octets()),
            Field::Addr6 => out.extend(part.parse::<Ipv6Addr>().map_err(|_| bad(field.name()))?.octets()),
            Field::Proto => out.push(match part {
                "tcp" => 6,
                "udp" => 17,
                "sctp" => 132,
                _ => part.parse::<u8>().map_err(|_| bad(field.name()))?,
            }),
            Field::Port => out.extend(part.parse::<u16>().map_err(|_| bad(field.name()))?.to_be_bytes()),
            Field::HostU32 => out.extend(part.parse::<u32>().map_err(|_| bad(field.name()))?.to_ne_bytes()),
        }
        debug_assert_eq!(out.len() - start, field.len());
        if fields.len() > 1 {
            out.resize(out.len().next_multiple_of(4), 0);
        }
    }
    Ok(out)
}

/// `(code, chain)` of a verdict as printed.
fn verdict<'a>(set: &str, text: &'a str) -> Result<(i32, Option<&'a str>), EncodeError> {
    let mut words = text.split_whitespace();
    let code = match words.next() {
        Some("drop") => 0,
        Some("accept") => 1,
        Some("continue") => -1,
        Some("return") => -5,
        Some("jump") => -3,
        Some("goto") => -4,
        _ => {
            return Err(EncodeError::Value {
                set: set.to_string(),
                what: "value",
                text: text.to_string(),
                ty: "a verdict",
            });
        }
    };
    let chain = words.next();
    if (code == -3 || code == -4) != chain.is_some() || words.next().is_some() {
        return Err(EncodeError::Value {
            set: set.to_string(),
            what: "value",
            text: text.to_string(),
            ty: "a verdict",
        });
    }
    Ok((code, chain))
}

/// Netlink messages with their attributes, written into one buffer.
pub(crate) struct Writer {
    pub(crate) buf: Vec<u8>,
}

impl Writer {
    pub(crate) fn message(
        &mut self,
        ty: u16,
        flags: u16,
        seq: u32,
        family: u8,
        res_id: u16,
        body: impl FnOnce(&mut Self),
    ) {
        let start = self.buf.len();
        self.buf.extend([0; 4]); // length, patched below
        self.buf.extend(ty.to_ne_bytes());
        self.buf.extend(flags.to_ne_bytes());
        self.buf.extend(seq.to_ne_bytes());
        self.buf.extend(0u32.to_ne_bytes()); // port id: the kernel's
        self.buf.push(family);
        self.buf.push(0); // NFNETLINK_V0
        self.buf.extend(res_id.to_be_bytes());
        body(self);
        let len = (self.buf.len() - start) as u32;
        self.buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
    }

    fn attr(&mut self, ty: u16, value: &[u8]) {
        self.buf.extend(((4 + value.len()) as u16).to_ne_bytes());
        self.buf.extend(ty.to_ne_bytes());
        self.buf.extend(value);
        self.pad();
    }

    pub(crate) fn attr_str(&mut self, ty: u16, value: &str) {
        let mut v = value.as_bytes().to_vec();
        v.push(0);
        self.attr(ty, &v);
    }

    fn nested(&mut self, ty: u16, body: impl FnOnce(&mut Self)) {
        let start = self.buf.len();
        self.buf.extend([0; 2]);
        self.buf.extend((ty | NLA_F_NESTED).to_ne_bytes());
        body(self);
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn pad(&mut self) {
        self.buf.resize(self.buf.len().next_multiple_of(4), 0);
    }
}

/// What a map element maps to, encoded.
enum ElementData {
    Value(Vec<u8>),
    Verdict { code: i32, chain: Option<String> },
}

/// One element, encoded for its set.
struct Encoded {
    key: Vec<u8>,
    data: Option<ElementData>,
    comment: Option<Vec<u8>>,
}

fn encode_element(set_name: &str, set: &Set, change: &ElementChange) -> Result<Encoded, EncodeError> {
    let unsupported = || EncodeError::Type {
        set: set_name.to_string(),
        ty: format!("{} : {}", set.key_type, set.data_type.as_deref().unwrap_or("")),
    };
    let key_fields = type_fields(&set.key_type).ok_or_else(unsupported)?;
    let data = data_kind(set).ok_or_else(unsupported)?;
    let key = value_bytes(set_name, "key", &key_fields, &change.key)?;
    let data = match (data, change.add) {
        // A deletion names the element by its key alone.
        (_, false) | (None, true) => None,
        (Some(kind), true) => {
            let text = change
                .element
                .value
                .as_deref()
                .ok_or_else(|| EncodeError::Value {
                    set: set_name.to_string(),
                    what: "value",
                    text: String::new(),
                    ty: "a map value",
                })?;
            Some(match kind {
                DataKind::Verdict => {
                    let (code, chain) = verdict(set_name, text)?;
                    ElementData::Verdict {
                        code,
                        chain: chain.map(str::to_string),
                    }
                }
                DataKind::Fields(fields) => {
                    ElementData::Value(value_bytes(set_name, "value", &fields, text)?)
                }
            })
        }
    };
    let comment = match (&change.element.comment, change.add) {
        (Some(c), true) => {
            if c.len() + 1 > COMMENT_MAX {
                return Err(EncodeError::Comment(c.to_string()));
            }
            let mut tlv = vec![UDATA_SET_ELEM_COMMENT, (c.len() + 1) as u8];
            tlv.extend(c.as_bytes());
            tlv.push(0);
            Some(tlv)
        }
        _ => None,
    };
    Ok(Encoded { key, data, comment })
}

/// `changes` to table `rs` (whose set declarations give the types) as one batch: a begin marker, one
/// message per run of changes to the same set in the same direction, an end marker. Sequence numbers start
/// at `first_sequence`.
pub fn encode_batch(
    rs: &Ruleset,
    changes: &[ElementChange],
    first_sequence: u32,
) -> Result<EncodedBatch, EncodeError> {
    let family = nfproto(rs.family);
    let mut w = Writer { buf: Vec::new() };
    let mut seq = first_sequence;
    w.message(
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        seq,
        0,
        NFNL_SUBSYS_NFTABLES,
        |_| {},
    );
    let mut i = 0;
    while i < changes.len() {
        let first = &changes[i];
        let run = changes[i..]
            .iter()
            .take_while(|c| c.set == first.set && c.add == first.add)
            .count();
        let set = rs
            .sets
            .get(&first.set)
            .ok_or_else(|| EncodeError::UnknownSet(first.set.clone()))?;
        let encoded = changes[i..i + run]
            .iter()
            .map(|c| encode_element(&first.set, set, c))
            .collect::<Result<Vec<_>, _>>()?;
        let (msg, flags) = if first.add {
            (NFT_MSG_NEWSETELEM, NLM_F_REQUEST | NLM_F_CREATE)
        } else {
            (NFT_MSG_DELSETELEM, NLM_F_REQUEST)
        };
        seq = seq.wrapping_add(1);
        w.message(NFNL_SUBSYS_NFTABLES << 8 | msg, flags, seq, family, 0, |w| {
            w.attr_str(NFTA_SET_ELEM_LIST_TABLE, &rs.name);
            w.attr_str(NFTA_SET_ELEM_LIST_SET, &first.set);
            w.nested(NFTA_SET_ELEM_LIST_ELEMENTS, |w| {
                for e in &encoded {
                    w.nested(NFTA_LIST_ELEM, |w| {
                        w.nested(NFTA_SET_ELEM_KEY, |w| w.attr(NFTA_DATA_VALUE, &e.key));
                        match &e.data {
                            Some(ElementData::Value(bytes)) => {
                                w.nested(NFTA_SET_ELEM_DATA, |w| w.attr(NFTA_DATA_VALUE, bytes))
                            }
                            Some(ElementData::Verdict { code, chain }) => w.nested(NFTA_SET_ELEM_DATA, |w| {
                                w.nested(NFTA_DATA_VERDICT, |w| {
                                    w.attr(NFTA_VERDICT_CODE, &code.to_be_bytes());
                                    if let Some(c) = chain {
                                        w.attr_str(NFTA_VERDICT_CHAIN, c);
                                    }
                                })
                            }),
                            None => {}
                        }
                        if let Some(c) = &e.comment {
                            w.attr(NFTA_SET_ELEM_USERDATA, c);
                        }
                    });
                }
            });
        });
        i += run;
    }
    seq = seq.wrapping_add(1);
    w.message(
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        seq,
        0,
        NFNL_SUBSYS_NFTABLES,
        |_| {},
    );
    Ok(EncodedBatch {
        bytes: w.buf,
        sequences: (first_sequence, seq),
    })
}

/// A request for the ruleset generation. Sent after a batch, its answer comes after every error the batch
/// caused, so a writer knows the batch's outcome once the answer arrives.
pub fn generation_request(sequence: u32) -> Vec<u8> {
    let mut w = Writer { buf: Vec::new() };
    w.message(
        NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETGEN,
        NLM_F_REQUEST,
        sequence,
        0,
        0,
        |_| {},
    );
    w.buf
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ruleset::SetKind;

    fn table() -> Ruleset {
        let mut rs = Ruleset::new(Family::Ip, "svcproxy");
        rs.sets.insert(
            "hairpin".into(),
            Set::new(SetKind::Set, "type ipv4_addr . ipv4_addr", None),
        );
        rs.sets.insert(
            "service-ips".into(),
            Set::new(
                SetKind::Map,
                "type ipv4_addr . inet_proto . inet_service",
                Some("verdict"),
            ),
        );
        rs.sets.insert(
            "endpoints-tcp-33".into(),
            Set::new(
                SetKind::Map,
                "typeof numgen random mod 1",
                Some("ip daddr . tcp dport"),
            ),
        );
        rs
    }

    fn add(set: &str, key: &str, value: Option<&str>, comment: Option<&str>) -> ElementChange {
        ElementChange {
            set: set.into(),
            key: key.into(),
            element: Element {
                value: value.map(CompactString::from),
                comment: comment.map(CompactString::from),
            },
            add: true,
        }
    }

    /// Finds `needle` in `hay`.
    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    // The expected bytes are what `nft --debug=netlink` shows for the same elements:
    //   hairpin:     element 04030201 08070605
    //   service-ips: element 0302010a 00000006 00005000 : goto -> services, userdata { \x00\x06a/b:c\x00 }
    //   endpoints:   element 00000000 : 09ca0364 0000901f, userdata { \x00\x15scale/svc-00097:http\x00 }
    // (nft prints each 32-bit word in host order; the bytes below are as they travel.)
    #[test]
    fn keys_and_values_are_encoded_as_nft_encodes_them() {
        let rs = table();
        let changes = [
            add("hairpin", "1.2.3.4 . 5.6.7.8", None, None),
            add(
                "service-ips",
                "10.1.2.3 . tcp . 80",
                Some("goto services"),
                Some("a/b:c"),
            ),
            add(
                "endpoints-tcp-33",
                "0",
                Some("100.3.202.9 . 8080"),
                Some("scale/svc-00097:http"),
            ),
        ];
        let b = encode_batch(&rs, &changes, 7).unwrap();
        assert_eq!(b.sequences, (7, 11));
        assert!(contains(&b.bytes, &[1, 2, 3, 4, 5, 6, 7, 8]));
        assert!(contains(&b.bytes, &[10, 1, 2, 3, 6, 0, 0, 0, 0, 80, 0, 0]));
        assert!(contains(&b.bytes, b"services\0"));
        assert!(contains(&b.bytes, &(-4i32).to_be_bytes()));
        assert!(contains(&b.bytes, b"\x00\x06a/b:c\x00"));
        assert!(contains(&b.bytes, &[100, 3, 202, 9, 0x1f, 0x90, 0, 0]));
        assert!(contains(&b.bytes, b"\x00\x15scale/svc-00097:http\x00"));
        // Five messages: begin, one per set, end; each length field covers exactly its message.
        let mut at = 0;
        let mut types = Vec::new();
        while at < b.bytes.len() {
            let len = u32::from_ne_bytes(b.bytes[at..at + 4].try_into().unwrap()) as usize;
            types.push(u16::from_ne_bytes(b.bytes[at + 4..at + 6].try_into().unwrap()));
            at += len;
        }
        assert_eq!(at, b.bytes.len());
        assert_eq!(types, [0x10, 0x0a0c, 0x0a0c, 0x0a0c, 0x11]);
    }

    #[test]
    fn only_element_changes_are_batched() {
        let before = table();
        let mut after = table();
        after
            .sets
            .get_mut("hairpin")
            .unwrap()
            .elements
            .insert("1.1.1.1 . 1.1.1.1".into(), Element::default());
        let changes = element_changes(&before, &after).unwrap();
        assert_eq!(changes, [add("hairpin", "1.1.1.1 . 1.1.1.1", None, None)]);
        // A changed value is a delete, then an add.
        let mut moved = after.clone();
        moved.sets.get_mut("endpoints-tcp-33").unwrap().elements.insert(
            "0".into(),
            Element {
                value: Some("10.0.0.1 . 80".into()),
                comment: None,
            },
        );
        let mut moved2 = moved.clone();
        moved2.sets.get_mut("endpoints-tcp-33").unwrap().elements.insert(
            "0".into(),
            Element {
                value: Some("10.0.0.2 . 80".into()),
                comment: None,
            },
        );
        let changes = element_changes(&moved, &moved2).unwrap();
        assert_eq!(changes.len(), 2);
        assert!(!changes[0].add && changes[1].add);
        let b = encode_batch(&moved, &changes, 1).unwrap();
        assert!(contains(&b.bytes, &[10, 0, 0, 2, 0, 80, 0, 0]));
        // Any rule change needs nft.
        after.chains.insert("c".into(), Default::default());
        assert!(element_changes(&before, &after).is_none());
    }

    #[test]
    fn what_cannot_be_encoded_is_an_error() {
        let rs = table();
        let bad = [
            add("hairpin", "1.2.3.4", None, None),
            add("service-ips", "10.1.2.3 . tcp . 80", Some("goto"), None),
            add("endpoints-tcp-33", "-1", Some("10.0.0.1 . 80"), None),
            add("nowhere", "1", None, None),
        ];
        for change in bad {
            assert!(
                encode_batch(&rs, std::slice::from_ref(&change), 1).is_err(),
                "{change:?}"
            );
        }
    }
}
