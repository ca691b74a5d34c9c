//! Reading one nftables table back from the kernel without `nft list table`: rules and set declarations from
//! the terse ruleset listing, set elements over netlink.
//!
//! At 5,000 services × 10 endpoints `nft list table` takes 0.8–1 s, nearly all of it `nft` formatting the
//! 50,000 map elements; this read takes a small fraction of that. It runs on every restart (to find what the
//! kernel already holds) and every verification.

use svcproxy_nftables::{Family, Ruleset, parse_listing, table_text};
use thiserror::Error;

use super::iptables::ExecError;
use super::nft::NftCommands;
use super::nft_netlink::{ElementSocket, ElementSocketError};

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
    let before = socket.generation().map_err(TableReadError::Socket)?;
    let text = nft.list_ruleset_terse().map_err(TableReadError::Nft)?;
    let Some(ours) = table_text(&text, family, name) else {
        return Ok(None);
    };
    let mut table = parse_listing(ours)
        .map_err(|e| TableReadError::Listing(e.to_string()))?
        .tables
        .into_iter()
        .next()
        .ok_or_else(|| TableReadError::Listing("no table in the table's own listing".into()))?;
    drop(text);
    for (set_name, set) in table.sets.iter_mut() {
        if set.is_dynamic() {
            continue;
        }
        set.elements = socket
            .elements(family, name, set_name, set)
            .map_err(TableReadError::Socket)?;
    }
    if socket.generation().map_err(TableReadError::Socket)? != before {
        return Err(TableReadError::Moved);
    }
    Ok(Some(table))
}
