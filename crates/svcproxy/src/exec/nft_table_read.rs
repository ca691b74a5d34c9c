//! Reading one nftables table back from the kernel without `nft list table`: rules and set declarations from
//! the terse ruleset listing, set elements over netlink.
//!
//! At 5,000 services × 10 endpoints `nft list table` takes 0.8–1 s, nearly all of it `nft` formatting the
//! 50,000 map elements; this read takes a small fraction of that. It runs on every restart (to find what the
//! kernel already holds) and every verification. When other tables on the node outweigh ours (upstream's
//! iptables rules during a takeover), the terse listing of our table alone replaces that of the ruleset,
//! whose kernel cost grows with the square of every table's rules (see
//! [`svcproxy_nftables::table_census`]).

use std::collections::BTreeSet;

use svcproxy_nftables::table_census::{TableListing, cheaper_listing, nfproto_of};
use svcproxy_nftables::{Family, Ruleset, parse_listing, table_text};
use thiserror::Error;

use super::iptables::ExecError;
use super::nft::NftCommands;
use super::nft_netlink::{ElementSocket, ElementSocketError};
use super::{Abandon, never};

#[derive(Debug, Error)]
pub enum TableReadError {
    #[error("nft -t list ruleset: {0}")]
    Nft(ExecError),
    #[error(transparent)]
    Socket(ElementSocketError),
    #[error("terse listing: {0}")]
    Listing(String),
    /// Another transaction committed between the first request and the last.
    #[error("the ruleset changed while it was read")]
    Moved,
    /// The caller no longer wanted the read.
    #[error("the read was given up")]
    Abandoned,
}

impl TableReadError {
    fn of_nft(e: ExecError) -> Self {
        match e {
            ExecError::Abandoned { .. } => TableReadError::Abandoned,
            e => TableReadError::Nft(e),
        }
    }
}

/// The rules and set declarations of a table, read; its elements come next, set by set.
#[derive(Debug)]
pub struct TableStructure {
    pub table: Ruleset,
    /// The ruleset generation before the first request.
    generation: u32,
}

/// Table `family name` as the kernel holds it, `None` if there is none. The elements of dynamic sets (what
/// the datapath adds, e.g. affinity entries) are left out: they are never compared. Fails, rather than
/// mixing two states, when the ruleset generation moved while it was read.
pub fn read_table(
    nft: &dyn NftCommands,
    socket: &dyn ElementSocket,
    family: Family,
    name: &str,
) -> Result<Option<Ruleset>, TableReadError> {
    match read_structure(nft, socket, family, name, &never)? {
        Some(structure) => Ok(Some(structure.read_elements(socket, None, &never)?.0)),
        None => Ok(None),
    }
}

/// The first half of [`read_table`]: everything but the elements. The listing stops once `abandon` says so.
pub fn read_structure(
    nft: &dyn NftCommands,
    socket: &dyn ElementSocket,
    family: Family,
    name: &str,
    abandon: Abandon<'_>,
) -> Result<Option<TableStructure>, TableReadError> {
    let generation = socket.generation().map_err(TableReadError::Socket)?;
    // Without a census (a socket that cannot dump tables) the ruleset listing, right on nearly every node.
    let listing = match socket.tables() {
        Ok(tables) => {
            let ours = nfproto_of(family);
            if !tables.iter().any(|t| t.family == ours && t.name == name) {
                return Ok(None);
            }
            cheaper_listing(&tables, family, name)
        }
        Err(_) => TableListing::Ruleset,
    };
    let text = match listing {
        TableListing::Ruleset => nft.list_ruleset_terse(abandon).map_err(TableReadError::of_nft)?,
        TableListing::OwnTable => match nft
            .list_table_terse(family.keyword(), name, abandon)
            .map_err(TableReadError::of_nft)?
        {
            Some(text) => text,
            None => return Ok(None),
        },
    };
    let Some(ours) = table_text(&text, family, name) else {
        return Ok(None);
    };
    let table = parse_listing(ours)
        .map_err(|e| TableReadError::Listing(e.to_string()))?
        .tables
        .into_iter()
        .next()
        .ok_or_else(|| TableReadError::Listing("no table in the table's own listing".into()))?;
    Ok(Some(TableStructure { table, generation }))
}

impl TableStructure {
    /// The second half of [`read_table`]. Each set is compared with `expected`'s as it is read: one whose
    /// elements and declaration are the same keeps no elements and is named in the second part of the
    /// result, so a read-back never holds a second copy of all 50,000 elements of a 5,000-service table
    /// (compare with [`svcproxy_nftables::partial_transaction_given`]). Given up between two sets once
    /// `abandon` says so.
    pub fn read_elements(
        self,
        socket: &dyn ElementSocket,
        expected: Option<&Ruleset>,
        abandon: Abandon<'_>,
    ) -> Result<(Ruleset, BTreeSet<String>), TableReadError> {
        let TableStructure {
            mut table,
            generation,
        } = self;
        let (family, name) = (table.family, table.name.clone());
        let mut same = BTreeSet::new();
        for (set_name, set) in table.sets.iter_mut() {
            if set.is_dynamic() {
                continue;
            }
            if abandon() {
                return Err(TableReadError::Abandoned);
            }
            let wanted = expected
                .and_then(|e| e.sets.get(set_name))
                .filter(|w| w.same_definition(set));
            if let Some(wanted) = wanted
                && socket
                    .holds_exactly(family, &name, set_name, set, &wanted.elements)
                    .map_err(TableReadError::Socket)?
            {
                same.insert(set_name.clone());
                continue;
            }
            // Different (drift, or a sync still to come): read it whole, a second time in the first case.
            set.elements = socket
                .elements(family, &name, set_name, set)
                .map_err(TableReadError::Socket)?;
        }
        if socket.generation().map_err(TableReadError::Socket)? != generation {
            return Err(TableReadError::Moved);
        }
        Ok((table, same))
    }
}
