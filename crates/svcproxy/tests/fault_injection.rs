//! Fault injection on a real kernel: the family of failures behind the best-known kube-proxy outage, where a
//! version skew left `iptables-restore` failing on every sync (`line 8022 failed`, `Sync failed; retrying in
//! 30s`), leftover chains of another version referenced the running version's chains, and Service routing
//! froze while the proxy reported itself healthy.
//!
//! Each case builds a node in network namespaces, runs svcproxy against it, keeps a client sending traffic
//! through a Service the whole time, injects one fault, and asserts on outcomes: the kernel converges to
//! what the cluster says, traffic comes back (or never stops), and `/healthz` tells the truth meanwhile.
//! Times to detect and to repair are measured and printed, never asserted: they belong to the machine.
//!
//! | case | fault |
//! |---|---|
//! | A | chains of other versions (KUBE-XLB, KUBE-EXT/KUBE-SVL) referencing ours appear; their endpoint goes |
//! | B | a v1.23 node (KUBE-XLB jumping to a KUBE-SEP) taken over directly |
//! | C | kubelet's KUBE-MARK-DROP, used by old chains, is deleted |
//! | D | a second writer rewrites one of our chains every second |
//! | E | KUBE-* chains in both the legacy and the nf_tables backend (at start; E2: appearing while running); E3: an nftables kube-proxy table appearing while running |
//! | F | nat flushed; a KUBE-SVC chain deleted; a rule inserted into ours |
//! | G | `iptables-restore` fails four times in a row |
//! | H | the xtables lock held by someone else |
//! | I | SIGKILL in the middle of a sync, then a restart |
//! | J | the API server unreachable for 30 s while endpoints churn |
//! | K | the kernel lacks the `recent` match |
//!
//! Every case records a row in a results table (see `fault::report`); run with `--nocapture` to watch.

mod common;
mod fault;
