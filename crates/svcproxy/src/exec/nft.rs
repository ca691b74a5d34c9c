//! Running `nft`.

use std::sync::{Arc, Mutex};

use std::process::Command;

use super::gate::Gate;
use super::iptables::ExecError;
use super::runner::{Runner, SystemRunner};
use super::stoppable_read::read_text;
use super::{Abandon, never};

pub trait NftCommands: Send + Sync {
    /// `nft -f -`: one atomic transaction.
    fn apply(&self, script: &str) -> Result<(), ExecError>;
    /// `nft list table FAMILY NAME`; `None` when the table does not exist. The listings a read-back makes
    /// (this one and the terse ones) stop `nft` once `abandon` says so, with [`ExecError::Abandoned`].
    fn list_table(&self, family: &str, name: &str, abandon: Abandon<'_>)
    -> Result<Option<String>, ExecError>;
    /// `nft list chain FAMILY TABLE CHAIN`; `None` when it does not exist.
    fn list_chain(&self, family: &str, table: &str, chain: &str) -> Result<Option<String>, ExecError>;
    /// `nft -t list ruleset`: every table's rules and set declarations, without set elements. Much cheaper
    /// than listing one table with its elements (0.06–0.2 s against 0.8 s at 5,000 services × 10
    /// endpoints: `nft` spends that time on the elements, which a single-table listing fetches and decodes
    /// even when terse), as long as the other tables are small (see `svcproxy_nftables::table_census`).
    fn list_ruleset_terse(&self, abandon: Abandon<'_>) -> Result<String, ExecError>;
    /// `nft -t list table FAMILY NAME`: one table's rules and set declarations; `None` when it does not
    /// exist. `nft` still fetches and decodes the table's elements (0.7–0.9 s at 5,000 services), but the
    /// kernel skips every other table's rules, which [`NftCommands::list_ruleset_terse`] pays for with the
    /// square of their number.
    fn list_table_terse(
        &self,
        family: &str,
        name: &str,
        abandon: Abandon<'_>,
    ) -> Result<Option<String>, ExecError>;
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SystemNft;

fn missing(e: &ExecError) -> bool {
    matches!(e, ExecError::Failed { stderr, .. } if stderr.contains("No such file or directory"))
}

impl NftCommands for SystemNft {
    fn apply(&self, script: &str) -> Result<(), ExecError> {
        SystemRunner.run("nft", &["-f", "-"], Some(script)).map(drop)
    }

    fn list_table(
        &self,
        family: &str,
        name: &str,
        abandon: Abandon<'_>,
    ) -> Result<Option<String>, ExecError> {
        listing(&["list", "table", family, name], abandon)
    }

    fn list_chain(&self, family: &str, table: &str, chain: &str) -> Result<Option<String>, ExecError> {
        listing(&["list", "chain", family, table, chain], &never)
    }

    fn list_ruleset_terse(&self, abandon: Abandon<'_>) -> Result<String, ExecError> {
        read_text(
            "nft",
            Command::new("nft").args(["-t", "list", "ruleset"]),
            abandon,
        )
    }

    fn list_table_terse(
        &self,
        family: &str,
        name: &str,
        abandon: Abandon<'_>,
    ) -> Result<Option<String>, ExecError> {
        listing(&["-t", "list", "table", family, name], abandon)
    }
}

/// `nft ARGS…` listing one thing, `None` when it is not there.
fn listing(args: &[&str], abandon: Abandon<'_>) -> Result<Option<String>, ExecError> {
    match read_text("nft", Command::new("nft").args(args), abandon) {
        Ok(text) => Ok(Some(text)),
        Err(e) if missing(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Records transactions and counts listings; listings answer from `listing`.
#[derive(Debug, Clone, Default)]
pub struct RecordingNft {
    pub applied: Arc<Mutex<Vec<String>>>,
    pub listing: Arc<Mutex<Option<String>>>,
    pub fail: Arc<Mutex<Vec<ExecError>>>,
    /// Listings asked for, of any kind.
    pub listings: Arc<std::sync::atomic::AtomicUsize>,
    /// Of those, the read-backs' listings of a whole table or ruleset, and the listings of one chain.
    pub table_listings: Arc<std::sync::atomic::AtomicUsize>,
    pub chain_listings: Arc<std::sync::atomic::AtomicUsize>,
    /// What listing one chain answers, when set (otherwise `listing`).
    pub chain_listing: Arc<Mutex<Option<String>>>,
    /// While closed, a transaction is recorded and then waits until it opens: a sync caught in the middle.
    pub apply_gate: Gate,
    /// While closed, a read-back's listing is counted and then waits until it opens, or until the caller
    /// abandons it.
    pub listing_gate: Gate,
}

impl RecordingNft {
    fn listed(&self) -> Option<String> {
        self.listings.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.listing.lock().unwrap().clone()
    }

    /// A read-back's listing: it waits at the gate.
    fn listed_unless(&self, abandon: Abandon<'_>) -> Result<Option<String>, ExecError> {
        self.listings.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.table_listings
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if !self.listing_gate.pass_unless(abandon) {
            return Err(ExecError::Abandoned {
                program: "nft".into(),
            });
        }
        Ok(self.listing.lock().unwrap().clone())
    }
}

impl NftCommands for RecordingNft {
    fn apply(&self, script: &str) -> Result<(), ExecError> {
        self.applied.lock().unwrap().push(script.to_string());
        self.apply_gate.pass();
        match self.fail.lock().unwrap().pop() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn list_table(
        &self,
        _family: &str,
        _name: &str,
        abandon: Abandon<'_>,
    ) -> Result<Option<String>, ExecError> {
        self.listed_unless(abandon)
    }

    fn list_chain(&self, _family: &str, _table: &str, _chain: &str) -> Result<Option<String>, ExecError> {
        self.chain_listings
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let listed = self.listed();
        Ok(self.chain_listing.lock().unwrap().clone().or(listed))
    }

    /// The listing, or an empty ruleset.
    fn list_ruleset_terse(&self, abandon: Abandon<'_>) -> Result<String, ExecError> {
        Ok(self.listed_unless(abandon)?.unwrap_or_default())
    }

    /// The listing (which holds the one table, or none).
    fn list_table_terse(
        &self,
        _family: &str,
        _name: &str,
        abandon: Abandon<'_>,
    ) -> Result<Option<String>, ExecError> {
        self.listed_unless(abandon)
    }
}
