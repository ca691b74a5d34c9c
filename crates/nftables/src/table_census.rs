//! How big every nf_tables table on the node is, from one cheap netlink dump, and what that means for reading
//! our own table back.
//!
//! Our read-back takes rules and set declarations from `nft -t list ruleset`, the cheapest listing while our
//! table is most of the ruleset (0.2 s at 5,000 services, where `nft -t list table` still fetches and decodes
//! every map element: 0.7–0.9 s). But the kernel answers a rule dump in datagrams of about 32 KiB and, to
//! resume after each one, counts again from the first rule of the first table it lists. The cost grows with
//! the square of all the rules on the node, whoever wrote them: next to upstream's iptables rules for 5,000
//! Services (an `ip nat` table of 55,000 chains, as on a node being taken over from kube-proxy's iptables
//! mode) `nft -t list ruleset` spent 22–53 s in the kernel, on every read-back. A listing of one table
//! skips the other tables' rules without counting them. So the census decides: other tables bigger than ours
//! (and than a floor below which either listing is quick) mean the table's own listing.

use crate::element_batch::{NFNL_SUBSYS_NFTABLES, NLM_F_REQUEST, Writer};
use crate::element_dump::{NFGENMSG, NLM_F_DUMP, attributes, find};
use crate::ruleset::Family;

const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_TABLE_USE: u16 = 3;
/// `NFPROTO_UNSPEC`: a dump of every family.
const EVERY_FAMILY: u8 = 0;

/// The type of each answer message of a table dump.
pub const NEWTABLE_MESSAGE: u16 = NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWTABLE;

/// Below this many objects (chains, sets, ...) in the other tables together the ruleset listing stays
/// the cheaper one. Measured next to our table at 5,000 Services: upstream's iptables rules for 200
/// Services (2,200 chains) took its listing from 0.21 s to 0.47 s, for 500 (5,500 chains) to 0.73 s, for
/// 1,000 to 1.5 s, while listing our table alone takes 0.67–0.72 s. The crossover is where the other
/// tables are about our table's size, hence the comparison with it. The floor is for a small table of
/// ours: next to a few thousand foreign objects the ruleset listing is still quick.
pub const OTHER_TABLES_FLOOR: u64 = 2_000;

/// One table as the kernel counts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableCensus {
    /// The table's `NFPROTO_*` number (`ip` 2, `ip6` 10, `inet` 1, ...).
    pub family: u8,
    pub name: String,
    /// Its chains, sets, stateful objects and flowtables: the kernel's use count, which every one of them
    /// holds on its table.
    pub objects: u64,
}

/// Which listing to read our table's rules and set declarations from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableListing {
    /// `nft -t list ruleset`, our table cut out of it.
    Ruleset,
    /// `nft -t list table FAMILY NAME`.
    OwnTable,
}

/// A request to dump every table of every family.
pub fn table_dump_request(sequence: u32) -> Vec<u8> {
    let mut w = Writer { buf: Vec::new() };
    w.message(
        NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETTABLE,
        NLM_F_REQUEST | NLM_F_DUMP,
        sequence,
        EVERY_FAMILY,
        0,
        |_| {},
    );
    w.buf
}

/// The table one answer message of a table dump describes (its payload, after the netlink header).
pub fn table_of(payload: &[u8]) -> Result<TableCensus, String> {
    let family = *payload
        .first()
        .ok_or("table message without its nfgenmsg header")?;
    let attrs = attributes(
        payload
            .get(NFGENMSG..)
            .ok_or("table message shorter than its header")?,
    )?;
    let name = find(&attrs, NFTA_TABLE_NAME).ok_or("table message without a name")?;
    let name = String::from_utf8_lossy(name.strip_suffix(&[0]).unwrap_or(name)).into_owned();
    let objects = match find(&attrs, NFTA_TABLE_USE) {
        Some(bytes) => u32::from_be_bytes(
            bytes
                .try_into()
                .map_err(|_| format!("table {name}: use count of {} bytes", bytes.len()))?,
        ),
        None => 0,
    };
    Ok(TableCensus {
        family,
        name,
        objects: u64::from(objects),
    })
}

/// The `NFPROTO_*` number [`TableCensus::family`] holds for `family`.
pub fn nfproto_of(family: Family) -> u8 {
    crate::element_batch::nfproto(family)
}

/// The cheaper listing for reading table `family name` on a node holding `tables`.
pub fn cheaper_listing(tables: &[TableCensus], family: Family, name: &str) -> TableListing {
    let ours = |t: &&TableCensus| t.family == nfproto_of(family) && t.name == name;
    let own: u64 = tables.iter().filter(ours).map(|t| t.objects).sum();
    let others: u64 = tables.iter().filter(|t| !ours(t)).map(|t| t.objects).sum();
    if others > own.max(OTHER_TABLES_FLOOR) {
        TableListing::OwnTable
    } else {
        TableListing::Ruleset
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(family: u8, name: &str, objects: u64) -> TableCensus {
        TableCensus {
            family,
            name: name.into(),
            objects,
        }
    }

    #[test]
    fn the_listing_follows_how_much_of_the_ruleset_our_table_is() {
        use TableListing::{OwnTable, Ruleset};
        let cases: [(&str, Vec<TableCensus>, Family, TableListing); 5] = [
            (
                "our table is most of the ruleset",
                vec![
                    table(2, "svcproxy", 5_100),
                    table(10, "svcproxy", 20),
                    table(2, "filter", 12),
                    table(2, "nat", 40),
                ],
                Family::Ip,
                Ruleset,
            ),
            (
                "small on both sides: the floor keeps the cheap listing",
                vec![table(2, "svcproxy", 30), table(2, "nat", 900)],
                Family::Ip,
                Ruleset,
            ),
            (
                "kube-proxy's iptables mode at 5,000 services: 55,000 chains in ip nat",
                vec![
                    table(2, "svcproxy", 5_100),
                    table(2, "nat", 55_012),
                    table(2, "filter", 9),
                ],
                Family::Ip,
                OwnTable,
            ),
            (
                "the IPv4 nat table weighs on the IPv6 engine too: a ruleset dump walks every family",
                vec![
                    table(10, "svcproxy", 40),
                    table(2, "svcproxy", 100),
                    table(2, "nat", 3_000),
                ],
                Family::Ip6,
                OwnTable,
            ),
            (
                "our table of the other family is another table",
                vec![table(2, "svcproxy", 2_500), table(10, "svcproxy", 2_600)],
                Family::Ip,
                OwnTable,
            ),
        ];
        for (case, tables, family, want) in cases {
            assert_eq!(cheaper_listing(&tables, family, "svcproxy"), want, "{case}");
        }
    }

    #[test]
    fn a_table_message_is_read_as_the_kernel_writes_it() {
        // nfgenmsg (family ip, version 0, res_id 0), NFTA_TABLE_NAME "nat\0", NFTA_TABLE_FLAGS 0,
        // NFTA_TABLE_USE 55012 (big endian), NFTA_TABLE_HANDLE.
        let mut payload = vec![2, 0, 0, 0];
        payload.extend([8, 0, 1, 0, b'n', b'a', b't', 0]);
        payload.extend([8, 0, 2, 0, 0, 0, 0, 0]);
        payload.extend([8, 0, 3, 0]);
        payload.extend(55_012u32.to_be_bytes());
        payload.extend([12, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 7]);
        assert_eq!(table_of(&payload), Ok(table(2, "nat", 55_012)));
        assert!(table_of(&[2, 0, 0, 0]).is_err(), "a table without a name");
        assert!(table_of(&[]).is_err());
    }

    #[test]
    fn the_request_asks_for_a_dump_of_every_family() {
        let request = table_dump_request(7);
        assert_eq!(request.len(), 20);
        assert_eq!(u16::from_ne_bytes([request[4], request[5]]), 10 << 8 | 1);
        assert_eq!(u16::from_ne_bytes([request[6], request[7]]), 0x301);
        assert_eq!(u32::from_ne_bytes(request[8..12].try_into().unwrap()), 7);
        assert_eq!(request[16], 0);
    }
}
