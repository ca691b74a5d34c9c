//! The iptables backend as the engine drives it.
//!
//! The kernel is listed only on full syncs (to collect leftovers and find missing jumps from the built-in
//! chains); partial syncs diff the new rules against the last applied ones held in memory and send only what
//! changed, so their cost follows the size of the change, not the size of the cluster.

use std::collections::HashMap;
use std::sync::Arc;
use svcproxy_iptables::chain_name::KUBE_SERVICES;
use svcproxy_iptables::config::{LocalDetector, RenderConfig};
use svcproxy_iptables::failure::{FailureKind, classify};

use svcproxy_iptables::gc::GcPlan;
use svcproxy_iptables::jumps::JumpRule;
use svcproxy_iptables::kernel_view::{KernelReader, KernelView};
use svcproxy_iptables::parallel::{MIN_ITEMS_PER_THREAD, map_in_order};
use svcproxy_iptables::payload::Payload;
use svcproxy_iptables::render::Replaced;
use svcproxy_iptables::ruleset::{Chain, Ruleset, TableName};
use svcproxy_iptables::save_parser::SavedRuleset;
use svcproxy_iptables::seal::{
    self, Digest, Generation, RulesetDigest, SEAL_CHAIN, Seal, chain_digest, newest,
};
use svcproxy_iptables::service_rules::{ServicePortRules, render_service_port};
use svcproxy_iptables::staging::{Baseline, DEFAULT_MAX_CHAINS, Groups, stage};
use svcproxy_iptables::verify::{Divergence, verify};
use svcproxy_iptables::{gc, jumps, render};

use svcproxy_model::Node;
use svcproxy_model::{ClusterState, IntentChanges, IntentConfig, IpFamily};

use super::commit_ledger::CommitLedger;
use super::intent_cache::IntentCache;
use super::other_proxies::OtherProxies;
use super::proxier::{
    ConntrackRun, Finding, Proxier, SyncError, SyncMode, SyncReport, TableRules, VerifyScope,
};
use crate::backends::{Backend, check_mixed, kube_chains};
use crate::cli::{DetectLocalMode, ProxyMode, RunArgs};
use crate::exec::generation::RulesetGeneration;
use crate::exec::iptables::{ExecError, IptablesCommands};
use crate::exec::{Abandon, never};
use crate::node_addresses::{LocalAddresses, NodePortSpec, NodePortSpecError, primary_ip};
use crate::packet_counters::CountingSwitch;
use svcproxy_conntrack::Conntrack;
use svcproxy_conntrack::sysctls::{TCP_BE_LIBERAL, read_sysctl};

use super::conntrack_step::reconcile;
use imbl::ordmap::DiffItem;
use svcproxy_iptables::config::NodePortAddresses;
use svcproxy_model::{Intent, ServicePortIntent, ServicePortName};

/// Payload lines quoted around a failing line when the kernel refuses a transaction.
const CONTEXT_LINES: usize = 2;

/// The parts of the rendering configuration that depend on the Node object or the host's addresses, which can
/// change while we run; resolved again on every sync.
#[derive(Debug, Clone)]
pub struct ProxierOptions {
    /// Everything fixed by flags.
    pub base: RenderConfig,
    pub detect_local: DetectLocal,
    pub nodeport_addresses: NodePortSpec,
    /// `--bind-address`'s specific address of this family: the node's address, ahead of the Node object's.
    pub bind_ip: Option<std::net::IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DetectLocal {
    Cidrs(Vec<ipnet::IpNet>),
    NodePodCidrs,
    Bridge(String),
    InterfacePrefix(String),
    None,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionsError {
    #[error("--detect-local-mode={0} needs {1}")]
    MissingDetectLocalInput(&'static str, &'static str),
    #[error(transparent)]
    NodePorts(#[from] NodePortSpecError),
    #[error("invalid rendering configuration: {0}")]
    Render(#[from] svcproxy_iptables::config::ConfigError),
}

impl ProxierOptions {
    pub fn from_args(args: &RunArgs, family: IpFamily) -> Result<Self, OptionsError> {
        let cidrs: Vec<_> = args
            .cluster_cidr
            .iter()
            .copied()
            .filter(|c| family.contains(&c.addr()))
            .collect();
        let detect_local = match args.detect_local_mode {
            // Without a cluster CIDR upstream falls back to no detector, and so do we.
            DetectLocalMode::ClusterCidr if cidrs.is_empty() => DetectLocal::None,
            DetectLocalMode::ClusterCidr => DetectLocal::Cidrs(cidrs),
            DetectLocalMode::NodeCidr => DetectLocal::NodePodCidrs,
            DetectLocalMode::BridgeInterface => {
                DetectLocal::Bridge(args.pod_bridge_interface.clone().ok_or(
                    OptionsError::MissingDetectLocalInput("BridgeInterface", "--pod-bridge-interface"),
                )?)
            }
            DetectLocalMode::InterfaceNamePrefix => {
                DetectLocal::InterfacePrefix(args.pod_interface_name_prefix.clone().ok_or(
                    OptionsError::MissingDetectLocalInput(
                        "InterfaceNamePrefix",
                        "--pod-interface-name-prefix",
                    ),
                )?)
            }
        };
        let base = RenderConfig {
            family,
            masquerade_bit: args.iptables_masquerade_bit,
            masquerade_all: args.masquerade_all,
            localhost_node_ports: args.iptables_localhost_nodeports,
            // Liberal TCP tracking exists to let out-of-window packets through, which the INVALID drop would
            // undo: upstream leaves the drop out when the flag asks for it or the node already has it.
            drop_invalid: !(args.conntrack_tcp_be_liberal || conntrack_is_liberal()),
            ..RenderConfig::default()
        };
        base.validate()?;
        Ok(ProxierOptions {
            base,
            bind_ip: args
                .upstream
                .bind_address
                .iter()
                .copied()
                .find(|ip| family.contains(ip) && !ip.is_unspecified()),
            detect_local,
            nodeport_addresses: match NodePortSpec::parse(&args.nodeport_addresses)? {
                // Upstream's nftables mode opens NodePorts only on the node's primary addresses unless told
                // otherwise (its iptables mode on every local address); each mode keeps its default.
                NodePortSpec::All if args.proxy_mode == ProxyMode::Nftables => NodePortSpec::Primary,
                spec => spec,
            },
        })
    }

    /// The configuration for one sync.
    pub fn resolve(&self, node: Option<&Node>, local: &[std::net::IpAddr]) -> RenderConfig {
        let family = self.base.family;
        let node_ip = self.bind_ip.or_else(|| primary_ip(family, node));
        let local_detector = match &self.detect_local {
            DetectLocal::Cidrs(c) => LocalDetector::Cidrs(c.clone()),
            DetectLocal::NodePodCidrs => {
                let cidrs: Vec<_> = node
                    .map(|n| {
                        n.pod_cidrs
                            .iter()
                            .copied()
                            .filter(|c| family.contains(&c.addr()))
                            .collect()
                    })
                    .unwrap_or_default();
                if cidrs.is_empty() {
                    LocalDetector::None
                } else {
                    LocalDetector::Cidrs(cidrs)
                }
            }
            DetectLocal::Bridge(b) => LocalDetector::BridgeInterface(b.clone()),
            DetectLocal::InterfacePrefix(p) => LocalDetector::InterfaceNamePrefix(p.clone()),
            DetectLocal::None => LocalDetector::None,
        };
        RenderConfig {
            local_detector,
            node_port_addresses: self.nodeport_addresses.resolve(family, local, node_ip),
            node_ip,
            ..self.base.clone()
        }
    }

    /// `--detect-local-mode=NodeCIDR` and the Node (not seen, or without pod CIDRs) gives no pod range: until
    /// it does, pod traffic is not told apart, so off-cluster clients of a ClusterIP are not masqueraded and
    /// pods reaching an externalTrafficPolicy Local Service's external address are not sent to its endpoints
    /// elsewhere. Upstream waits at start until the Node has its pod CIDRs; svcproxy programs everything else
    /// meanwhile. (A Node with pod CIDRs of the other family only is a single-stack node: nothing to say.)
    pub fn lacks_pod_cidrs(&self, node: Option<&Node>) -> bool {
        self.detect_local == DetectLocal::NodePodCidrs && node.is_none_or(|n| n.pod_cidrs.is_empty())
    }

    /// Says so, when [`Self::lacks_pod_cidrs`]: called when the configuration changes, so once per change.
    pub fn warn_if_lacking_pod_cidrs(&self, node: Option<&Node>) {
        if self.lacks_pod_cidrs(node) {
            tracing::warn!(
                family = ?self.base.family,
                "--detect-local-mode=NodeCIDR, but the Node has no pod CIDRs (yet): pod traffic cannot be told \
                 apart, so off-cluster clients of ClusterIPs are not masqueraded until it has"
            );
        }
    }
}

/// `nf_conntrack_tcp_be_liberal` is on in this network namespace (unreadable, as before conntrack is loaded,
/// counts as off).
fn conntrack_is_liberal() -> bool {
    read_sysctl(std::path::Path::new(TCP_BE_LIBERAL)).is_ok_and(|v| v != 0)
}

pub struct IptablesProxier {
    cmds: Box<dyn IptablesCommands>,
    addresses: Box<dyn LocalAddresses>,
    intent_config: IntentConfig,
    intents: IntentCache,
    options: ProxierOptions,
    /// The rules the kernel holds after our last successful transaction, and the configuration they were
    /// rendered with; `None` forces a full sync.
    applied: Option<(Ruleset, RenderConfig)>,
    /// Chains partial transactions wrote since the last read-back, for the read-back after their syncs.
    touched: Vec<(TableName, String)>,
    /// A sync since the last read-back wrote in full (and not just chains it could list): the read-back after
    /// it reads everything.
    wrote_in_full: bool,
    /// Rules of the applied ruleset per table, kept up to date from what each partial sync replaced: counting
    /// them afresh reads every chain, which a one-endpoint change must not.
    rule_totals: Option<[usize; 2]>,
    conntrack: Option<Box<dyn Conntrack>>,
    /// Chains per transaction (see the staging module for why transactions are bounded).
    max_chains: usize,
    /// Rendered rules of each service port by intent hash, with the configuration and mode they were rendered
    /// with: a sync re-renders only the ports that changed, so its cost follows the change, not the cluster.
    render_cache: RenderCache,
    /// The intent of the last successful sync, to find UDP/SCTP service ports that changed.
    applied_intent: Option<Arc<Intent>>,
    /// The iptables backend we write and the other one's commands, to notice KUBE-* chains appearing there.
    other_backend: Option<(Backend, Box<dyn IptablesCommands>)>,
    /// Watches for a proxy of the other mode writing next to us.
    other_proxies: Option<OtherProxies>,
    counting_switch: Option<CountingSwitch>,
    /// The nf_tables generation, to seal what we write (see `svcproxy_iptables::seal`); `None` with legacy
    /// iptables, whose writes do not move it.
    generation: Option<Box<dyn RulesetGeneration>>,
    /// The generation at which the kernel is known to hold our last state: set by a full read during which the
    /// generation did not move and carried through each restore that moved it by exactly its own transactions.
    custody: Option<Generation>,
    /// The generation at which the kernel is known to hold our last state because it was read: a whole read
    /// found it exact, or our own writes since one did were each checked by the read-back after their sync.
    /// While the generation stays there (or moves only by the other family's restores, which leave these
    /// tables alone), nothing can have changed, and a periodic read-back has nothing to find: at 5,000
    /// services it would read a 17 MB dump every minute for nothing.
    verified: Option<Generation>,
    /// Where our writes since `verified` left the kernel, until the read-back after their sync checks them.
    unchecked: Option<Generation>,
    /// The seal the kernel holds, as far as we know.
    kernel_seal: Option<Seal>,
    /// Our own commits, shared with the other family's proxier on a dual-stack node.
    ledger: CommitLedger,
    /// The other family's commands, to read its seals: on a dual-stack node its writes are the latest as
    /// often as ours.
    sibling: Option<Box<dyn IptablesCommands>>,
    /// Whether a sync has run in this process: only the first trusts a seal instead of reading the kernel.
    started: bool,
    /// The render cache's epoch `applied` was assembled at (see [`RenderCache::epoch`]).
    applied_epoch: Option<u64>,
    /// The digest of `applied` with its jumps, for sealing a kernel a read-back found holding it.
    applied_digest: Option<Digest>,
}

/// Restores up to this many lines take turns with the other family's (see [`IptablesProxier::restore_sealed`]).
const TURN_TAKING_LINES: usize = 2_000;

/// Above this many touched chains, reading the whole table back is cheaper than listing chains one by one.
const PER_CHAIN_READBACK_LIMIT: usize = 16;

impl IptablesProxier {
    pub fn new(
        cmds: Box<dyn IptablesCommands>,
        addresses: Box<dyn LocalAddresses>,
        intent_config: IntentConfig,
        options: ProxierOptions,
    ) -> Self {
        IptablesProxier {
            cmds,
            addresses,
            intents: IntentCache::new(intent_config.clone()),
            intent_config,
            options,
            applied: None,
            touched: Vec::new(),
            wrote_in_full: false,
            rule_totals: None,
            conntrack: None,
            max_chains: DEFAULT_MAX_CHAINS,
            render_cache: RenderCache::default(),
            applied_intent: None,
            other_backend: None,
            other_proxies: None,
            counting_switch: None,
            generation: None,
            custody: None,
            verified: None,
            unchecked: None,
            kernel_seal: None,
            ledger: CommitLedger::default(),
            sibling: None,
            started: false,
            applied_epoch: None,
            applied_digest: None,
        }
    }

    /// Seals every write with the nf_tables generation (only for iptables-nft), so a restart onto rules that
    /// are still in place reads one chain instead of the whole kernel.
    pub fn with_generation(mut self, generation: Box<dyn RulesetGeneration>) -> Self {
        self.generation = Some(generation);
        self
    }

    /// Shares the record of our own commits with the other family's proxier (dual stack), so neither takes
    /// the other's writes for a foreign program's.
    pub fn with_commit_ledger(mut self, ledger: CommitLedger) -> Self {
        self.ledger = ledger;
        self
    }

    /// Chains per transaction, for a backend whose costs differ from iptables-nft's (see
    /// `svcproxy_iptables::staging::LEGACY_MAX_CHAINS`).
    pub fn with_max_chains(mut self, max_chains: usize) -> Self {
        self.max_chains = max_chains;
        self
    }

    /// The other family's commands (dual stack), whose seals a restart also reads.
    pub fn with_sibling_seals(mut self, sibling: Box<dyn IptablesCommands>) -> Self {
        self.sibling = Some(sibling);
        self
    }

    fn generation_now(&self) -> Option<Generation> {
        self.generation.as_ref()?.current()
    }

    /// Whether the kernel's seal proves it holds the rules of `digest` (our chains and jumps, nothing stale)
    /// right now: then a full sync has nothing to read or write.
    fn kernel_proven(&mut self, digest: Digest) -> bool {
        let ledger = self.ledger.clone();
        let _turn = ledger.turn();
        let Some(before) = self.generation_now() else {
            return false;
        };
        let Some(own) = seals_of(self.cmds.as_ref()) else {
            return false;
        };
        let sibling = match &self.sibling {
            Some(cmds) => match seals_of(cmds.as_ref()) {
                Some(seals) => seals,
                None => return false,
            },
            None => None,
        };
        self.kernel_seal = own;
        let latest = newest([own, sibling]);
        // Unmoved across the listing: the seals we read are the ones that generation holds.
        let proven = self.generation_now() == Some(before) && seal::proven(own, latest, before, digest);
        if proven {
            self.custody = Some(before);
            if let Some(latest) = latest {
                let since = Generation {
                    value: latest.ours_since,
                    ..latest.generation
                };
                self.ledger.adopt(since, before);
            }
        }
        proven
    }

    /// Reports a proxy of the other mode (an nftables table of kube-proxy's or ours) writing next to us.
    pub fn with_other_proxies(mut self, other: OtherProxies) -> Self {
        self.other_proxies = Some(other);
        self
    }

    /// Says through `switch` when the rules stop counting packets (see [`CountingSwitch`]).
    pub fn with_counting_switch(mut self, switch: CountingSwitch) -> Self {
        self.counting_switch = Some(switch);
        self
    }

    /// Watches the backend we do not write (`theirs`, while we write `ours`) for KUBE-* chains: packets pass
    /// through both backends, so rules there act on Service traffic where we can neither see nor repair them.
    pub fn with_other_backend(mut self, ours: Backend, theirs: Box<dyn IptablesCommands>) -> Self {
        self.other_backend = Some((ours, theirs));
        self
    }

    /// The ruleset for `intent`, re-rendering only changed service ports, and its digest without the jumps
    /// (each part's chains are hashed once, when rendered; the shared chains whenever they are rebuilt). When
    /// the applied ruleset could be patched into it, it was (so it is no longer held as applied), and what the
    /// patch replaced comes along.
    ///
    /// After the first render the work follows the change: the service ports that differ are found by
    /// diffing the intent with the one the cache was rendered from (they share the tree of every unchanged
    /// port, which the diff skips), the parts' digest is kept as a running sum, and the shared chains are
    /// neither rebuilt nor hashed again unless a changed part's lines in them changed. Looking at every
    /// service port instead (moving its cache entry, summing its digest, listing it in order, hashing
    /// `KUBE-SERVICES`) cost 3.7 ms a change at 10,000 services.
    fn render_cached(
        &mut self,
        intent: &Arc<Intent>,
        config: &RenderConfig,
    ) -> (Ruleset, RulesetDigest, Option<Replaced>) {
        let large = render::is_large_cluster(intent);
        let cache = &mut self.render_cache;
        let reset = cache.config.as_ref() != Some(config) || cache.large != large;
        if reset {
            cache.parts.clear();
            cache.parts_digest = RulesetDigest::default();
            cache.intent = None;
            cache.config = Some(config.clone());
            cache.large = large;
        }
        // The applied ruleset can be patched only if it was assembled from the parts the cache holds now.
        let patchable = !reset && self.applied_epoch == Some(cache.epoch);
        cache.epoch += 1;
        let mut removed = Vec::new();
        let mut stale: Vec<(ServicePortName, &ServicePortIntent)> = Vec::new();
        let mut drop_part = |cache: &mut RenderCache, name: &ServicePortName| {
            if let Some((_, part, digest)) = cache.parts.remove(name) {
                cache.parts_digest.remove(digest);
                removed.push(part);
            }
        };
        match cache.intent.take() {
            Some(previous) => {
                for item in previous.service_ports.diff(&intent.service_ports) {
                    match item {
                        DiffItem::Remove(name, _) => drop_part(cache, name),
                        DiffItem::Add(name, spi) => {
                            drop_part(cache, name);
                            stale.push((name.clone(), spi));
                        }
                        DiffItem::Update { new: (name, spi), .. } => {
                            if cache
                                .parts
                                .get(name)
                                .is_some_and(|(hash, _, _)| *hash == spi.content_hash)
                            {
                                continue;
                            }
                            drop_part(cache, name);
                            stale.push((name.clone(), spi));
                        }
                    }
                }
            }
            None => {
                for (_, (_, part, _)) in cache.parts.drain() {
                    removed.push(part);
                }
                cache.parts_digest = RulesetDigest::default();
                stale.extend(
                    intent
                        .service_ports
                        .iter()
                        .map(|(name, spi)| (name.clone(), &**spi)),
                );
            }
        }
        // A cold sync renders every service port: on every core.
        let fresh = map_in_order(&stale, MIN_ITEMS_PER_THREAD, |(_, spi)| {
            rendered_part(spi, config, large)
        });
        let mut added = Vec::with_capacity(fresh.len());
        for ((name, spi), (part, digest)) in stale.into_iter().zip(fresh) {
            added.push(part.clone());
            cache.parts_digest.add(digest);
            cache.parts.insert(name, (spi.content_hash, part, digest));
        }
        cache.intent = Some(intent.clone());
        let parts = &cache.parts;
        let in_order = || intent.service_ports.keys().map(|name| &*parts[name].1);
        // Assembling reads the parts twice (sizing, then filling).
        let assemble_all = || render::assemble(config, in_order().collect::<Vec<_>>());
        let (ruleset, replaced) = match self.applied.take() {
            Some((mut ruleset, applied_with)) if patchable && applied_with == *config => {
                let removed: Vec<&ServicePortRules> = removed.iter().map(|p| &**p).collect();
                let added: Vec<&ServicePortRules> = added.iter().map(|p| &**p).collect();
                let replaced = render::reassemble(config, &mut ruleset, &removed, &added, in_order());
                debug_assert!(
                    ruleset == assemble_all(),
                    "a patched ruleset differs from the one assembled whole"
                );
                (ruleset, Some(replaced))
            }
            applied => {
                self.applied = applied;
                (assemble_all(), None)
            }
        };
        // The shared chains, looked up by name (walking the whole map for them cost every sync a pass over
        // every chain), and hashed again only when this render built them.
        let rebuilt = replaced.as_ref().is_none_or(|replaced| {
            replaced
                .keys()
                .any(|(table, name)| render::SHARED_CHAINS.contains(&(*table, name.as_str())))
        });
        if rebuilt {
            let mut shared = RulesetDigest::default();
            for (table, name) in render::SHARED_CHAINS {
                if let Some(chain) = ruleset.table(table).chains.get(name) {
                    shared.add_chain(table, name, chain);
                }
            }
            cache.shared_digest = shared;
        }
        // Every chain counted once: the parts' chains and the shared ones are all the ruleset has.
        debug_assert_eq!(
            cache
                .parts
                .values()
                .map(|(_, part, _)| part.chains.len())
                .sum::<usize>()
                + render::SHARED_CHAINS
                    .iter()
                    .filter(|(table, name)| ruleset.table(*table).chains.contains_key(*name))
                    .count(),
            ruleset.filter.chains.len() + ruleset.nat.chains.len()
        );
        let mut digest = cache.parts_digest;
        digest.add(cache.shared_digest.value());
        debug_assert_eq!(
            digest.value(),
            RulesetDigest::of(&ruleset, &[]),
            "the running digest differs from the ruleset's hashed afresh"
        );
        (ruleset, digest, replaced)
    }

    /// Cleans stale UDP and SCTP flows after syncs that changed such service ports.
    pub fn with_conntrack(mut self, conntrack: Box<dyn Conntrack>) -> Self {
        self.conntrack = Some(conntrack);
        self
    }

    /// Deletes the conntrack entries that would keep datagrams going to endpoints that are gone (or keep them
    /// un-NATed from while the service had none). Runs only when a UDP or SCTP service port changed, since
    /// it lists the whole table. A failure is reported, not fatal: the rules are right either way.
    fn clean_conntrack(
        &self,
        intent: &Intent,
        config: &RenderConfig,
        local: &[std::net::IpAddr],
    ) -> Option<ConntrackRun> {
        let conntrack = self.conntrack.as_ref()?;
        let previous = self.applied_intent.as_deref();
        let family = self.intent_config.family;
        let mut node_ips: Vec<std::net::IpAddr> = match &config.node_port_addresses {
            NodePortAddresses::All => local
                .iter()
                .copied()
                .filter(|ip| family.contains(ip) && !ip.is_loopback())
                .collect(),
            NodePortAddresses::Ips(ips) => ips.clone(),
        };
        if config.localhost_node_ports_active() {
            node_ips.push(std::net::Ipv4Addr::LOCALHOST.into());
        }
        reconcile(conntrack.as_ref(), family, previous, intent, &node_ips)
    }

    /// [`Self::read_kernel`] for a full sync: also learns the seal the kernel holds and, when nothing but our
    /// own restores moved the generation during the read, that the kernel is at a known state.
    fn read_kernel_for_sync(&mut self, expected: &Ruleset) -> Result<KernelView, SyncError> {
        let before = self.generation_before_read();
        let kernel = self.read_kernel(expected, &never)?;
        // Unmoved during the read, or moved only by our own restores (the other family's, which leave these
        // tables alone): the read is what the kernel holds now. Looked at with none of the other family's
        // restores under way, so one that ran during the read is on the record.
        let ledger = self.ledger.clone();
        let _quiet = ledger.no_big_restore();
        let _turn = ledger.turn();
        let after = self.generation_now();
        self.custody = before
            .zip(after)
            .filter(|(b, a)| self.ledger.ours_between(*b, *a))
            .map(|(_, a)| a);
        self.kernel_seal = seal_in(&kernel.saved);
        Ok(kernel)
    }

    /// The kernel's filter and nat tables, read against `expected` as `iptables-save` prints them: neither the
    /// dump nor the rules of our own chains are ever held whole (see [`KernelView`]). Given up once `abandon`
    /// says so.
    fn read_kernel(&self, expected: &Ruleset, abandon: Abandon<'_>) -> Result<KernelView, SyncError> {
        let mut reader = KernelReader::new(expected);
        self.cmds
            .save_lines(&["filter", "nat"], &mut |line| reader.line(line), abandon)
            .map_err(|e| match e {
                ExecError::Abandoned { .. } => SyncError::Abandoned,
                e => SyncError::ReadBack(e.to_string()),
            })?;
        reader.finish().map_err(|e| SyncError::ReadBack(e.to_string()))
    }

    /// Lists `chains` one by one (`iptables -S`) and reads them against `expected` as [`Self::read_kernel`] reads
    /// whole tables. The canary lists KUBE-SERVICES every two seconds: kept as parsed rules, its 5,000 rules
    /// at 5,000 services took 10 MB each time.
    fn read_chains(
        &self,
        chains: &[(TableName, String)],
        expected: &Ruleset,
    ) -> Result<KernelView, SyncError> {
        let mut listings = Vec::with_capacity(chains.len());
        for (table, chain) in chains {
            let listing = self
                .cmds
                .list_chain(table.as_str(), chain)
                .map_err(|e| SyncError::ReadBack(e.to_string()))?;
            listings.push((*table, chain.as_str(), listing));
        }
        let mut reader = KernelReader::new(expected);
        for table in TableName::ALL {
            let mut open = false;
            for (_, chain, listing) in listings.iter().filter(|(t, _, _)| *t == table) {
                // `None`: the chain does not exist.
                let Some(listing) = listing else { continue };
                if !open {
                    reader.line(&format!("*{table}"));
                    open = true;
                }
                reader.line(&format!(":{chain} - [0:0]"));
                for rule in listing.lines().filter(|l| l.starts_with("-A ")) {
                    reader.line(rule);
                }
            }
            if open {
                reader.line("COMMIT");
            }
        }
        reader.finish().map_err(|e| SyncError::ReadBack(e.to_string()))
    }

    fn stop_counting(&mut self) {
        tracing::warn!(
            "the iptables nfacct match does not work here: writing the rules without packet counters \
             (kubeproxy_iptables_*_packets_total stay at their last values)"
        );
        self.options.base.packet_counters = false;
        if let Some(switch) = &self.counting_switch {
            switch.turn_off();
        }
    }

    /// Turns a refused transaction into a classified error, quoting the payload lines the error points at,
    /// and repairs what this side can: an iptables without `--random-fully`, or a kernel without the `nfacct`
    /// match, gets rules without them next time.
    fn refused(&mut self, e: ExecError, payload: &Payload) -> SyncError {
        let reason = e.to_string();
        let failure = classify(&reason);
        let context = failure
            .line
            .map(|n| {
                let quoted: Vec<String> = payload
                    .lines_around(n, CONTEXT_LINES)
                    .iter()
                    .map(|(i, l)| format!("\n  {i:>6}: {l}"))
                    .collect();
                format!("; payload around line {n}:{}", quoted.concat())
            })
            .unwrap_or_default();
        // A kernel with nfacct objects but without the iptables `nfacct` match (kubernetes#142068, where every
        // restore failed for good) fails on the first line that counts; the rules go on without counting.
        let counting_line = failure.line.is_some_and(|n| {
            payload
                .lines_around(n, 0)
                .iter()
                .any(|(_, l)| l.contains("-m nfacct"))
        });
        let repairable = match &failure.kind {
            FailureKind::UnknownOption { option }
                if option == "--random-fully" && self.options.base.random_fully =>
            {
                self.options.base.random_fully = false;
                true
            }
            FailureKind::MissingExtension { name, .. }
                if name == "nfacct" && self.options.base.packet_counters =>
            {
                self.stop_counting();
                true
            }
            _ if counting_line && self.options.base.packet_counters => {
                self.stop_counting();
                true
            }
            kind => kind.repairable_by_rebuild(),
        };
        let hint = match &failure.kind {
            FailureKind::MissingExtension { kind, name } => format!(
                " (the kernel or iptables lacks the {name} {kind}: load the xt_{name} module or install an iptables with it)"
            ),
            FailureKind::ReferencedChain { chain } => {
                format!(" (a rule outside our chains still jumps to {chain}; the next attempt removes it)")
            }
            FailureKind::Lock => " (another program holds the xtables lock)".to_string(),
            _ => String::new(),
        };
        SyncError::Refused {
            class: failure.kind.label(),
            repairable,
            reason: format!("{reason}{hint}"),
            context,
        }
    }

    /// Stages the transactions from `baseline` to `next` and applies them one by one, each sealed; a sync that
    /// has nothing to write still seals a kernel known to hold `next` whose seal does not say so yet. Returns
    /// the lines written and, for a partial sync, the chains written (for the read-back after it).
    #[allow(clippy::too_many_arguments)]
    fn apply_staged(
        &mut self,
        baseline: Baseline<'_>,
        next: &Ruleset,
        groups: Groups<'_>,
        plan: &GcPlan,
        jumps: &[JumpRule],
        mode: SyncMode,
        digest: Digest,
    ) -> Result<Written, SyncError> {
        let (mut lines, mut touched, mut writes) = (0, Vec::new(), 0);
        let mut rules = [0; 2];
        let max_chains = self.max_chains;
        let staged: Result<(), Box<(ExecError, Payload)>> = stage(
            baseline,
            next,
            groups,
            plan,
            jumps,
            max_chains,
            |payload, last| {
                writes += 1;
                let (count, chains) = (
                    payload.line_count,
                    (mode == SyncMode::Partial).then(|| written_chains(&payload)),
                );
                let table_rules = payload.chain_rules_by_table;
                self.restore_sealed(payload, last.then_some(digest))?;
                lines += count;
                for (sum, n) in rules.iter_mut().zip(table_rules) {
                    *sum += n;
                }
                touched.extend(chains.into_iter().flatten());
                Ok(())
            },
        );
        if let Err(refused) = staged {
            let (e, payload) = *refused;
            self.applied = None;
            return Err(self.refused(e, &payload));
        }
        if writes == 0
            && let Some(at) = self.custody
            && !self.seal_holds(at, digest)
        {
            match self.restore_sealed(Payload::default(), Some(digest)) {
                Ok(()) => writes = 1,
                // The rules are right either way; only the next restart's shortcut is lost.
                Err(refused) => tracing::warn!(error = %refused.0, "cannot write the seal"),
            }
        }
        Ok(Written {
            lines,
            writes,
            touched,
            rules,
        })
    }

    /// Restores `payload` with the seal written into it (see `svcproxy_iptables::seal`): carrying `digest` when
    /// given (the sync's last transaction) and the kernel was at a known state just before, a void seal
    /// otherwise. Without a readable generation the payload goes as it is.
    fn restore_sealed(
        &mut self,
        payload: Payload,
        digest: Option<Digest>,
    ) -> Result<(), Box<(ExecError, Payload)>> {
        let ledger = self.ledger.clone();
        // Small restores (changes, seals) take turns with the other family's, so each counts its own
        // transactions exactly. A cold sync's big ones do not: serialised, a dual-stack cold sync at 5,000
        // services took half as long again (12.4 s against 8.3 s). Overlapping, they miscount and lose
        // custody, which the next periodic read-back that finds the kernel right regains.
        let small = payload.line_count <= TURN_TAKING_LINES;
        let _turn = small.then(|| ledger.turn());
        let _big = (!small).then(|| ledger.big_restore());
        // A write takes the kernel away from what was last verified; only the read-back after the sync can
        // bring it back, and only if this write continues from it.
        let continues = self.custody.is_some() && self.verified.or(self.unchecked) == self.custody;
        self.verified = None;
        self.unchecked = None;
        let Some(before) = self.generation_now() else {
            self.custody = None;
            self.ledger.forget();
            return self
                .cmds
                .restore(payload.as_bytes())
                .map_err(|e| Box::new((e, payload)));
        };
        // Still known if every commit since the one we know it at was ours (the other family's, say).
        let known = self
            .custody
            .is_some_and(|at| self.ledger.ours_between(at, before));
        let since = self.ledger.ours_since(before);
        let (payload, seal) = seal::sealed_since(payload, before, since.value, digest.filter(|_| known));
        if let Err(e) = self.cmds.restore(payload.as_bytes()) {
            self.custody = None;
            self.kernel_seal = None;
            self.ledger.forget();
            return Err(Box::new((e, payload)));
        }
        self.kernel_seal = Some(seal);
        // Exactly our own transactions since `before`: the kernel holds what we know it to.
        let after = self.generation_now();
        let exact = after == Some(seal.generation);
        if exact {
            self.ledger.record(before, seal.generation);
        } else {
            self.ledger.forget();
        }
        self.custody = (known && exact).then_some(seal.generation);
        if continues {
            self.unchecked = self.custody;
        }
        if let Some(after) = after
            && after.instance == seal.generation.instance
            && (seal.generation.value.wrapping_sub(after.value) as i32) > 0
        {
            // Fewer transactions than sections: the seal names a generation still to come, which whatever
            // commit reaches it would prove. Replace it by one naming where the kernel really is.
            tracing::warn!(
                seal = seal.generation.value,
                now = after.value,
                "a restore moved the generation less than its sections; voiding its seal"
            );
            let (void, seal) = seal::sealed(Payload::default(), after, None);
            if let Err(e) = self.cmds.restore(void.as_bytes()) {
                tracing::warn!(error = %e, "cannot void the seal");
                self.kernel_seal = None;
            } else {
                self.kernel_seal = Some(seal);
            }
        }
        Ok(())
    }

    /// Whether a restart would find the kernel, at `at`, proven to hold the rules of `digest`: our seal carries
    /// that digest and names `at`, or every commit since it was ours (then the newest of them left a seal
    /// vouching for them all).
    fn seal_holds(&self, at: Generation, digest: Digest) -> bool {
        self.kernel_seal
            .is_some_and(|s| s.digest == Some(digest) && self.ledger.ours_between(s.generation, at))
    }

    /// A full read-back that started at `before` found the kernel holding exactly `applied` (its chains, its
    /// jumps, nothing stale) and `seal`: if nothing but our own restores moved the generation meanwhile, the
    /// kernel is at a known state again, and it is sealed so that a restart can trust it. Custody lost to
    /// another program's commit (a CNI plugin's, say) or to overlapping cold-sync restores comes back here.
    ///
    /// On a dual-stack node this is also how custody comes back after a cold sync: the two families' big
    /// restores overlap (see [`Self::restore_sealed`]) and miscount. The read-back right after the full sync
    /// regains it: should it end while the other family's cold sync is still writing, it waits for the
    /// restore under way to end, which is then on the record.
    fn regain_custody(&mut self, before: Option<Generation>, seal: Option<Seal>) {
        let Some(digest) = self.applied_digest else {
            return;
        };
        let at = {
            let ledger = self.ledger.clone();
            let _quiet = ledger.no_big_restore();
            let _turn = ledger.turn();
            match before.zip(self.generation_now()) {
                Some((b, a)) if self.ledger.ours_between(b, a) => a,
                _ => return,
            }
        };
        self.custody = Some(at);
        self.kernel_seal = seal;
        if !self.seal_holds(at, digest)
            && let Err(refused) = self.restore_sealed(Payload::default(), Some(digest))
        {
            tracing::warn!(error = %refused.0, "cannot write the seal");
        }
    }

    /// Whether the kernel still holds what was last verified: the generation has not moved since, except by
    /// the other family's restores (which write the other family's tables).
    fn unchanged_since_verified(&self) -> bool {
        let Some(verified) = self.verified else {
            return false;
        };
        self.custody == Some(verified)
            && self
                .generation_now()
                .is_some_and(|now| self.ledger.ours_between(verified, now))
    }

    /// The generation before a full read, where the ledger starts a run unless one ends there, so that the
    /// other family's restores during the read are accounted from it.
    fn generation_before_read(&self) -> Option<Generation> {
        let ledger = self.ledger.clone();
        // With no restore of the other family's under way: one that began before and ended during the read
        // might have overlapped one of ours, and could not be on the record.
        let _quiet = ledger.no_big_restore();
        let _turn = ledger.turn();
        let before = self.generation_now();
        if let Some(before) = before {
            self.ledger.observe(before);
        }
        before
    }

    /// Records a successful sync.
    #[allow(clippy::too_many_arguments)]
    fn synced(
        &mut self,
        intent: Arc<Intent>,
        next: Ruleset,
        config: RenderConfig,
        mode: SyncMode,
        digest: Digest,
        written: Written,
        rule_totals: [usize; 2],
    ) -> SyncReport {
        let Written {
            lines,
            writes,
            touched,
            rules,
        } = written;
        self.applied_digest = Some(digest);
        self.rule_totals = Some(rule_totals);
        // Added to what earlier syncs wrote, until a read-back checks it: the engine may run one more sync
        // before the read-back after the first.
        self.wrote_in_full |= mode != SyncMode::Partial && lines > 0;
        // Each chain once: two syncs often write the same ones, and a chain listed twice reads as holding
        // its rules twice.
        self.touched.extend(touched);
        self.touched.sort_unstable();
        self.touched.dedup();
        if self.touched.len() > PER_CHAIN_READBACK_LIMIT {
            // Read whole at the next read-back anyway; without one after each sync, the list must not grow.
            self.wrote_in_full = true;
            self.touched = Vec::new();
        }
        let conntrack = self.clean_conntrack(&intent, &config, &self.addresses.addresses());
        self.applied_intent = Some(intent.clone());
        self.applied = Some((next, config));
        self.applied_epoch = Some(self.render_cache.epoch);
        SyncReport {
            full: mode != SyncMode::Partial,
            intent,
            payload_lines: lines,
            writes,
            node_port_ips: match &self.applied.as_ref().map(|(_, c)| &c.node_port_addresses) {
                Some(NodePortAddresses::Ips(ips)) => Some(ips.clone()),
                _ => None,
            },
            conntrack,
            follow_up: None,
            cleanup_failed: false,
            iptables_rules: TableName::ALL
                .iter()
                .map(|t| TableRules {
                    table: t.as_str(),
                    total: rule_totals[t.position()],
                    written: rules[t.position()],
                })
                .collect(),
        }
    }

    fn verify_with(&self, kernel: &KernelView, chains: Option<&[(TableName, String)]>) -> Vec<Finding> {
        match &self.applied {
            Some((ruleset, config)) => verify(kernel, ruleset, config, chains)
                .iter()
                .map(finding)
                .collect(),
            None => Vec::new(),
        }
    }
}

impl Proxier for IptablesProxier {
    fn family(&self) -> IpFamily {
        self.intent_config.family
    }

    fn owned_rules(&self) -> &'static str {
        "KUBE-* chains"
    }

    fn sync(
        &mut self,
        state: &ClusterState,
        changes: &IntentChanges,
        mode: SyncMode,
    ) -> Result<SyncReport, SyncError> {
        let intent = self.intents.next(state, changes);
        let config = self
            .options
            .resolve(state.node.as_ref(), &self.addresses.addresses());
        // A configuration change (a new node address, say) can touch every chain: treat it as full.
        let mode = match &self.applied {
            Some((_, applied_with)) if *applied_with == config => mode,
            _ => {
                self.options.warn_if_lacking_pod_cidrs(state.node.as_ref());
                mode.max(SyncMode::Full)
            }
        };
        let (next, mut digest, replaced) = self.render_cached(&intent, &config);
        digest.add_jumps(&jumps::jump_rules(&config));
        let digest = digest.value();
        let first = !std::mem::replace(&mut self.started, true);
        if first && mode == SyncMode::Full && self.kernel_proven(digest) {
            tracing::info!(
                "the kernel's seal shows our rules in place since our last write: nothing to read or write"
            );
            let totals = next.rule_counts();
            return Ok(self.synced(intent, next, config, mode, digest, Written::default(), totals));
        }
        // The kernel holds our last write (as far as a partial sync assumes), which was patched into `next`
        // recording what changed, or is still held whole.
        let previous = match (mode, replaced, self.applied.take()) {
            (SyncMode::Partial, Some(replaced), _) => Some(Previous::Patched(replaced)),
            (SyncMode::Partial, None, Some((prev, _))) => Some(Previous::Whole(prev)),
            _ => None,
        };
        let written = match &previous {
            Some(previous) => {
                let baseline = match previous {
                    Previous::Patched(replaced) => Baseline::Replaced(replaced),
                    Previous::Whole(prev) => Baseline::Applied(prev),
                };
                self.apply_staged(
                    baseline,
                    &next,
                    Groups::ByName,
                    &GcPlan::default(),
                    &[],
                    mode,
                    digest,
                )
            }
            None => {
                // The ruleset's service ports, as it was assembled from them: each transaction of a full sync
                // carries whole service ports.
                let parts: Vec<Arc<ServicePortRules>> = intent
                    .service_ports
                    .keys()
                    .map(|name| self.render_cache.parts[name].1.clone())
                    .collect();
                let groups = Groups::Parts(&parts);
                let kernel = self.read_kernel_for_sync(&next)?;
                if mode == SyncMode::Rebuild {
                    let plan = gc::plan_rebuild(&kernel.saved, &next);
                    let jumps = jumps::jump_rules(&config);
                    self.apply_staged(Baseline::None, &next, groups, &plan, &jumps, mode, digest)
                } else {
                    // Against what the kernel holds: a restart onto rules that are already right writes nothing.
                    let plan = gc::plan_gc(&kernel.saved, &next);
                    let missing = jumps::missing_jumps(&kernel.saved, &config);
                    self.apply_staged(
                        Baseline::Kernel(&kernel),
                        &next,
                        groups,
                        &plan,
                        &missing,
                        mode,
                        digest,
                    )
                }
            }
        };
        let mode = if previous.is_some() {
            mode
        } else {
            mode.max(SyncMode::Full)
        };
        let written = written?;
        let totals = match (&previous, self.rule_totals) {
            (Some(Previous::Patched(replaced)), Some(before)) => patched_totals(before, replaced, &next),
            _ => next.rule_counts(),
        };
        debug_assert_eq!(totals, next.rule_counts(), "rule totals kept by patching drifted");
        Ok(self.synced(intent, next, config, mode, digest, written, totals))
    }

    /// The whole read (`iptables-save`, 1.3 s at 5,000 Services) is what `abandon` can stop; listing the few
    /// chains a partial sync wrote is not worth stopping.
    fn verify_unless(&mut self, scope: VerifyScope, abandon: Abandon<'_>) -> Result<Vec<Finding>, SyncError> {
        if self.applied.is_none() {
            return Ok(Vec::new());
        }
        if scope == VerifyScope::All && self.unchanged_since_verified() {
            tracing::debug!(
                "periodic read-back skipped: nothing has committed since the kernel was verified"
            );
            return Ok(Vec::new());
        }
        let touched = std::mem::take(&mut self.touched);
        let in_full = std::mem::take(&mut self.wrote_in_full);
        if scope == VerifyScope::LastSync && touched.len() <= PER_CHAIN_READBACK_LIMIT && !in_full {
            // A partial sync wrote a few chains: list just those, never the whole table.
            let Some((ruleset, _)) = &self.applied else {
                return Ok(Vec::new());
            };
            let kernel = self.read_chains(&touched, ruleset)?;
            let mut divergences = self.verify_with(&kernel, Some(&touched));
            // Built-in jumps are not in a per-chain listing; they are checked by the full read-backs.
            divergences.retain(|d| d.kind != "missing_jump");
            // The chains the sync wrote are right, on top of a kernel verified before it: verified again.
            if divergences.is_empty() && self.unchecked.is_some() && self.unchecked == self.custody {
                self.verified = self.unchecked.take();
            } else if !divergences.is_empty() {
                self.unchecked = None;
            }
            return Ok(divergences);
        }
        let Some((ruleset, _)) = &self.applied else {
            return Ok(Vec::new());
        };
        let before = self.generation_before_read();
        let kernel = match self.read_kernel(ruleset, abandon) {
            Ok(kernel) => kernel,
            Err(e) => {
                // What the read was to cover is still to be covered, by the read that replaces it.
                self.touched = touched;
                self.wrote_in_full = in_full;
                return Err(e);
            }
        };
        let findings = self.verify_with(&kernel, None);
        let exact = findings.is_empty() && gc::plan_gc(&kernel.saved, ruleset).is_empty();
        self.unchecked = None;
        self.verified = None;
        if exact && self.generation.is_some() {
            self.regain_custody(before, seal_in(&kernel.saved));
            // Custody comes back only when nothing but our own restores moved the generation during the read:
            // then the kernel at that generation is the one read.
            self.verified = self.custody;
        }
        Ok(findings)
    }

    fn hazards(&mut self) -> Vec<String> {
        if self.applied.is_none() {
            return Vec::new();
        }
        let mut found = Vec::new();
        if let Some((ours, theirs)) = &self.other_backend {
            match kube_chains(theirs.as_ref()) {
                Ok(chains) => found.extend(
                    check_mixed(*ours, &[format!("nat/{KUBE_SERVICES}")], &chains)
                        .err()
                        .map(|mixed| mixed.to_string()),
                ),
                Err(e) => tracing::debug!("cannot read the {} iptables backend: {e}", ours.other().name()),
            }
        }
        if let Some(other) = &self.other_proxies {
            found.extend(other.find());
        }
        found
    }

    fn canary(&mut self) -> Result<Vec<Finding>, SyncError> {
        // KUBE-SERVICES is the entry to everything in nat; a flush of the table or of the chain shows there
        // first, and listing one chain costs a fraction of a full dump (still 0.1 s at 5,000 services, every
        // 2 s: nothing to pay while nothing has committed).
        if self.unchanged_since_verified() {
            return Ok(Vec::new());
        }
        let Some((ruleset, config)) = &self.applied else {
            return Ok(Vec::new());
        };
        let chain = (TableName::Nat, KUBE_SERVICES.to_string());
        let kernel = self.read_chains(std::slice::from_ref(&chain), ruleset)?;
        let mut found: Vec<Finding> = verify(&kernel, ruleset, config, Some(std::slice::from_ref(&chain)))
            .iter()
            .map(finding)
            .collect();
        found.retain(|d| d.kind != "missing_jump");
        Ok(found)
    }
}

fn finding(d: &Divergence) -> Finding {
    Finding {
        what: d.to_string(),
        kind: d.label(),
        services: d.services.clone(),
    }
}

/// What a partial sync compares `next` with.
/// What a sync's transactions wrote.
#[derive(Default)]
struct Written {
    lines: usize,
    /// `iptables-restore` runs, a seal written alone among them.
    writes: usize,
    /// For a partial sync, the chains written (for the read-back after it).
    touched: Vec<(TableName, String)>,
    /// Rules of our own chains written, per table.
    rules: [usize; 2],
}

/// The rules per table after a partial sync, from those before it and the chains it replaced (each as it was,
/// or absent before): only the changed chains are read.
fn patched_totals(before: [usize; 2], replaced: &Replaced, next: &Ruleset) -> [usize; 2] {
    let mut totals = before;
    for ((table, name), old) in replaced {
        let slot = &mut totals[table.position()];
        *slot -= old.as_ref().map_or(0, Chain::len);
        *slot += next.table(*table).chain(name).map_or(0, Chain::len);
    }
    totals
}

enum Previous {
    /// The applied ruleset became `next` in place; these are the chains that changed, as they were.
    Patched(Replaced),
    Whole(Ruleset),
}

#[derive(Default)]
struct RenderCache {
    config: Option<RenderConfig>,
    large: bool,
    /// The intent `parts` were rendered from, to find the next one's changed service ports by diffing.
    intent: Option<Arc<Intent>>,
    /// The sum of the parts' digests, kept as parts come and go.
    parts_digest: RulesetDigest,
    /// The sum of the shared chains' digests, as the last render built them.
    shared_digest: RulesetDigest,
    /// Moves on with every render: a ruleset assembled at the current epoch is the assembly of `parts`, so the
    /// next render may patch it instead of assembling anew.
    epoch: u64,
    /// By service port: the intent hash it was rendered from, its rules and their digest.
    parts: HashMap<ServicePortName, (u64, Arc<ServicePortRules>, Digest)>,
}

/// One service port's rules and the sum of their chains' digests.
fn rendered_part(
    spi: &svcproxy_model::ServicePortIntent,
    config: &RenderConfig,
    large: bool,
) -> (Arc<ServicePortRules>, Digest) {
    let part = render_service_port(spi, config, large);
    let mut digest = RulesetDigest::default();
    for (name, chain) in &part.chains {
        digest.add(chain_digest(TableName::Nat, name, chain));
    }
    (Arc::new(part), digest.value())
}

/// The newest of the seals in filter and nat as `cmds` lists them; `None` (read the kernel) when a listing
/// fails.
fn seals_of(cmds: &dyn IptablesCommands) -> Option<Option<Seal>> {
    let mut seals = Vec::new();
    for table in TableName::ALL {
        match cmds.list_chain(table.as_str(), SEAL_CHAIN) {
            Ok(listing) => seals.push(listing.as_deref().and_then(Seal::from_listing)),
            Err(e) => {
                tracing::debug!(error = %e, "cannot list the seal chain");
                return None;
            }
        }
    }
    Some(newest(seals))
}

/// The seal in a dump: of each table's, the newest.
fn seal_in(saved: &SavedRuleset) -> Option<Seal> {
    newest(TableName::ALL.map(|table| {
        let listing: String = saved
            .table(table.as_str())?
            .rules_of(SEAL_CHAIN)
            .map(|r| format!("{}\n", r.line))
            .collect();
        Seal::from_listing(&listing)
    }))
}

/// The chains a payload declares (and so rewrites), by table.
fn written_chains(payload: &Payload) -> Vec<(TableName, String)> {
    let mut table = None;
    let mut out = Vec::new();
    for line in payload.lines() {
        if let Some(name) = line.strip_prefix('*') {
            table = TableName::ALL.into_iter().find(|t| t.as_str() == name);
        } else if let (Some(t), Some(decl)) = (table, line.strip_prefix(':')) {
            if let Some(name) = decl.split_whitespace().next() {
                out.push((t, name.to_string()));
            }
        } else if let Some(name) = line.strip_prefix("-X ") {
            out.retain(|(t, n)| Some(*t) != table || n != name);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_cidr_mode_lacks_pod_cidrs_until_the_node_has_some() {
        let options = ProxierOptions {
            base: RenderConfig::default(),
            detect_local: DetectLocal::NodePodCidrs,
            nodeport_addresses: NodePortSpec::All,
            bind_ip: None,
        };
        assert!(options.lacks_pod_cidrs(None), "no Node yet");
        let mut node = Node {
            name: "node-a".into(),
            ..Node::default()
        };
        assert!(options.lacks_pod_cidrs(Some(&node)), "a Node without pod CIDRs");
        node.pod_cidrs = vec!["fd00:10:244::/64".parse().unwrap()];
        assert!(
            !options.lacks_pod_cidrs(Some(&node)),
            "a single-stack node of the other family"
        );
        let cluster_cidr = ProxierOptions {
            detect_local: DetectLocal::None,
            ..options.clone()
        };
        assert!(!cluster_cidr.lacks_pod_cidrs(None));
    }

    #[test]
    fn written_chains_excludes_deleted_ones() {
        let payload = Payload::from_text(
            "*nat\n:KUBE-SVC-A - [0:0]\n:KUBE-SEP-B - [0:0]\n-A KUBE-SVC-A -j KUBE-SEP-C\n-X KUBE-SEP-B\nCOMMIT\n",
        );
        assert_eq!(
            written_chains(&payload),
            vec![(TableName::Nat, "KUBE-SVC-A".to_string())]
        );
    }
}
