//! The one error type of the [`crate::Conntrack`] trait, shared by every implementation so callers handle
//! the real client and the fake alike.

use std::io;

use crate::codec::CodecError;

#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    #[error("cannot open a netfilter netlink socket: {0}")]
    Open(#[source] io::Error),
    #[error("netlink {operation}: {source}")]
    Io {
        operation: &'static str,
        #[source]
        source: io::Error,
    },
    /// The kernel answered the request with an error (EPERM without CAP_NET_ADMIN, for instance).
    #[error("kernel refused the conntrack {operation}: {source}")]
    Kernel {
        operation: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// Some deletes failed for a reason other than the entry being gone already; the others were done.
    #[error("deleted {deleted} conntrack entries, {failed} deletes failed (first: {first})")]
    Partial {
        deleted: usize,
        failed: usize,
        #[source]
        first: io::Error,
    },
}
