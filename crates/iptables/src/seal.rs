//! The seal: a record, kept in the kernel next to our rules, of which rules we last wrote and at which nf_tables
//! ruleset generation, so a restart can tell without reading anything else that the kernel still holds them.
//!
//! Why: reading the kernel back is what makes a restart slow (`iptables-save` alone takes 1.3 s at 5,000
//! services × 10 endpoints, and parsing what it prints more). With iptables-nft every committed transaction,
//! from any program and for any table, moves the netns's nf_tables generation on by one, and nothing else
//! does. So if the generation now is the one our last write ended at, nobody has written since, and the kernel
//! holds exactly what that write left: the rules whose digest the seal carries.
//!
//! How a seal stays honest:
//! - each restore we run carries the seal in its last table section (a filter section of its own when it has
//!   none). iptables-nft commits each section as one transaction, and every section we write changes
//!   something, so the restore moves the generation by exactly its number of sections; the seal names the
//!   generation the restore will end at (read just before it, plus its sections). Should a section ever turn
//!   out empty, the generation falls short of the seal's, and the writer voids the seal at once (a seal naming
//!   a generation still to come would be proven by whatever commit reaches it);
//! - the seal lives in the last section rather than a section of its own so that it costs no transaction:
//!   a one-service change is one nat transaction either way. So each table has a seal chain, and the one
//!   naming the generation the kernel is at is the seal;
//! - a seal carries a digest only when the write completes a sync and the kernel was known to hold our last
//!   state when it started (no foreign commit since our previous write or our last full read); otherwise it
//!   carries none, and a restart reads the kernel as before;
//! - if any other transaction lands between the generation read and the end of the restore, the generation
//!   passes the one the seal names and never comes back to it, so the seal is void;
//! - the seal also names the boot and network namespace its generation counts in: both count from the start
//!   again, so a dump with an old seal restored after a reboot or in another namespace proves nothing.
//!
//! - the IPv4 and IPv6 tables share the one generation, so on a dual-stack node each family's writes move it
//!   past the other's seal. A seal therefore also names the generation since which every commit was one of
//!   this process's restores (`since`, kept by a ledger both families write to): a family whose own seal
//!   carries the digest it would write is still proven when the newest seal of either family names the
//!   generation the kernel is at and vouches for every commit after the family's own seal. The other family's
//!   restores never touch this family's tables, and one of its own would have left a newer seal of its own.
//!
//! Legacy iptables does not move the nf_tables generation, so there is no seal with it.

use sha2::{Digest as _, Sha256};

use crate::jumps::JumpRule;
use crate::payload::Payload;
use crate::ruleset::{Chain, Ruleset, TableName};
use crate::save_parser::tokenize;

/// The chain holding a seal, in filter and in nat: one comment-only rule, never jumped to. Not `KUBE-`:
/// upstream kube-proxy must not take it for one of its own, and it means nothing to it.
pub const SEAL_CHAIN: &str = "SVCPROXY-SEAL";

/// Where a payload without sections gets its seal: a filter transaction is cheap (the kernel re-validates a
/// table's whole jump graph on a commit that adds a rule, and nat holds every service chain).
const SEAL_ONLY_TABLE: TableName = TableName::Filter;

const COMMENT_PREFIX: &str = "svcproxy seal";

/// What a ruleset plus its jumps hash to; see [`RulesetDigest`].
pub type Digest = u128;

/// Where the nf_tables ruleset stands: its generation, and which boot and network namespace that counts in.
/// A generation number alone repeats: a new namespace, or the host after a reboot, counts from the start
/// again, so a dump restored there could land on the number an old seal names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Generation {
    /// Identifies the kernel boot and the network namespace.
    pub instance: u64,
    pub value: u32,
}

impl Generation {
    /// This generation moved on by `commits` transactions.
    pub fn after(self, commits: u32) -> Generation {
        Generation {
            value: self.value.wrapping_add(commits),
            ..self
        }
    }
}

/// One seal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seal {
    /// The nf_tables generation the sealing restore ends at.
    pub generation: Generation,
    /// Every commit after this generation (of the same instance) up to `generation` was one of the sealing
    /// process's restores; `generation` itself when nothing is known.
    pub ours_since: u32,
    /// The digest of the rules the kernel holds at that generation; `None` when the write that left this
    /// seal was not known to complete a sync on top of a known state.
    pub digest: Option<Digest>,
}

impl Seal {
    /// The rule comment spelling this seal.
    pub fn comment(&self) -> String {
        let Generation { instance, value } = self.generation;
        let since = self.ours_since;
        match self.digest {
            Some(d) => format!(
                "{COMMENT_PREFIX} generation={value} instance={instance:016x} since={since} digest={d:032x}"
            ),
            None => {
                format!("{COMMENT_PREFIX} generation={value} instance={instance:016x} since={since} unsealed")
            }
        }
    }

    /// The seal in `iptables -S SVCPROXY-SEAL` output (or any listing of that chain's rules); `None` when
    /// there is none, or more than one, or one we cannot read: all of which mean "read the kernel".
    pub fn from_listing(listing: &str) -> Option<Seal> {
        let mut found = None;
        for line in listing.lines().filter(|l| l.starts_with("-A ")) {
            let args = tokenize(line)?;
            if args.get(1).map(String::as_str) != Some(SEAL_CHAIN) {
                continue;
            }
            let comment = args
                .iter()
                .position(|a| a == "--comment")
                .and_then(|i| args.get(i + 1))?;
            if found.is_some() {
                return None;
            }
            found = Some(Self::parse_comment(comment)?);
        }
        found
    }

    fn parse_comment(comment: &str) -> Option<Seal> {
        let rest = comment.strip_prefix(COMMENT_PREFIX)?;
        let mut words = rest.split_whitespace();
        let value = words.next()?.strip_prefix("generation=")?.parse().ok()?;
        let instance = words.next()?.strip_prefix("instance=")?;
        (instance.len() == 16).then_some(())?;
        let generation = Generation {
            instance: u64::from_str_radix(instance, 16).ok()?,
            value,
        };
        // Seals written before `since` existed vouch for no commit but their own.
        let mut word = words.next()?;
        let ours_since = match word.strip_prefix("since=") {
            Some(since) => {
                word = words.next()?;
                since.parse().ok()?
            }
            None => value,
        };
        let digest = match word {
            "unsealed" => None,
            d => {
                let hex = d.strip_prefix("digest=")?;
                (hex.len() == 32).then_some(())?;
                Some(u128::from_str_radix(hex, 16).ok()?)
            }
        };
        words.next().is_none().then_some(Seal {
            generation,
            ours_since,
            digest,
        })
    }

    /// Whether this seal proves that the kernel, now at `generation`, holds the rules of `digest`.
    pub fn proves(&self, generation: Generation, digest: Digest) -> bool {
        self.generation == generation && self.digest == Some(digest)
    }

    /// Whether this seal vouches that every commit after `earlier` up to its own generation was one of its
    /// process's restores.
    pub fn ours_after(&self, earlier: Generation) -> bool {
        let since = Generation {
            value: self.ours_since,
            ..self.generation
        };
        since.is_at_or_before(earlier) && earlier.is_at_or_before(self.generation)
    }
}

impl Generation {
    /// Whether `self` comes no later than `other` in the same instance (the counter wraps).
    pub fn is_at_or_before(self, other: Generation) -> bool {
        self.instance == other.instance && (other.value.wrapping_sub(self.value) as i32) >= 0
    }
}

/// Whether the kernel, now at `now`, holds the rules of `digest` in the tables `own` (the newest seal in them)
/// seals: `own` carries that digest and either names `now` itself, or `latest` (the newest seal of any of our
/// tables, the other family's included) names `now` and vouches for every commit since `own`'s. The other
/// family's restores leave these tables alone, and a restore of this family would have left a newer `own`.
pub fn proven(own: Option<Seal>, latest: Option<Seal>, now: Generation, digest: Digest) -> bool {
    let Some(own) = own else {
        return false;
    };
    own.proves(now, digest)
        || (own.digest == Some(digest)
            && latest.is_some_and(|l| l.generation == now && l.ours_after(own.generation)))
}

/// The digest of one chain: a sum of such digests is the digest of a ruleset, so a sync that re-renders a few
/// service ports re-hashes only their chains (the sum is over chains in any order, and a chain's name is part
/// of its digest, so moving rules between chains changes it).
pub fn chain_digest(table: TableName, name: &str, chain: &Chain) -> Digest {
    let mut h = Sha256::new();
    h.update(table.as_str());
    h.update([0]);
    h.update(name);
    h.update([0]);
    h.update(chain.text());
    first_128_bits(h)
}

fn jump_digest(jump: &JumpRule) -> Digest {
    let mut h = Sha256::new();
    h.update("jump");
    h.update([0]);
    h.update(jump.table.as_str());
    h.update([0]);
    h.update(jump.insert_line());
    first_128_bits(h)
}

fn first_128_bits(h: Sha256) -> Digest {
    let out = h.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&out[..16]);
    u128::from_be_bytes(bytes)
}

/// Sums chain digests into the digest of a whole ruleset with its jumps from the built-in chains.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RulesetDigest(Digest);

impl RulesetDigest {
    pub fn add(&mut self, part: Digest) {
        self.0 = self.0.wrapping_add(part);
    }

    /// Takes back a part [`RulesetDigest::add`] added: a running sum follows parts that come and go.
    pub fn remove(&mut self, part: Digest) {
        self.0 = self.0.wrapping_sub(part);
    }

    pub fn add_chain(&mut self, table: TableName, name: &str, chain: &Chain) {
        self.add(chain_digest(table, name, chain));
    }

    pub fn add_jumps(&mut self, jumps: &[JumpRule]) {
        for jump in jumps {
            self.add(jump_digest(jump));
        }
    }

    pub fn value(self) -> Digest {
        self.0
    }

    /// Every chain of `ruleset` and `jumps`, hashed afresh.
    pub fn of(ruleset: &Ruleset, jumps: &[JumpRule]) -> Digest {
        let mut d = RulesetDigest::default();
        for table in TableName::ALL {
            for (name, chain) in &ruleset.table(table).chains {
                d.add_chain(table, name, chain);
            }
        }
        d.add_jumps(jumps);
        d.value()
    }
}

/// `payload` sealed for a kernel now at `generation` (read just before the restore): the seal chain is
/// declared (which flushes it) and given its one rule in the payload's last section, or in a filter section
/// that is the whole payload when it has none. The seal names the generation the restore ends at: `generation`
/// plus the number of sections (see the module's notes for why that holds).
pub fn sealed(payload: Payload, generation: Generation, digest: Option<Digest>) -> (Payload, Seal) {
    sealed_since(payload, generation, generation.value, digest)
}

/// [`sealed`], vouching that every commit after generation `ours_since` up to `generation` was one of this
/// process's restores (the restore itself is, too).
pub fn sealed_since(
    mut payload: Payload,
    generation: Generation,
    ours_since: u32,
    digest: Option<Digest>,
) -> (Payload, Seal) {
    // Where the last section starts and ends, as byte offsets: the seal goes in in place, since a cold sync's
    // transactions are megabytes each.
    let (mut sections, mut offset) = (0u32, 0);
    let (mut after_table_line, mut commit_at) = (None, None);
    for line in payload.as_bytes().split_inclusive(|b| *b == b'\n') {
        let bare = line.strip_suffix(b"\n").unwrap_or(line);
        if bare.starts_with(b"*") {
            sections += 1;
            after_table_line = Some(offset + line.len());
            commit_at = None;
        } else if bare == b"COMMIT" && after_table_line.is_some() && commit_at.is_none() {
            commit_at = Some(offset);
        }
        offset += line.len();
    }
    let section = after_table_line.zip(commit_at);
    if section.is_none() {
        sections += 1;
    }
    let seal = Seal {
        generation: generation.after(sections),
        ours_since,
        digest,
    };
    let declare = format!(":{SEAL_CHAIN} - [0:0]\n");
    let rule = format!("-A {SEAL_CHAIN} -m comment --comment \"{}\"\n", seal.comment());
    match section {
        Some((after_table_line, commit_at)) => {
            payload.insert_lines(commit_at, &rule);
            payload.insert_lines(after_table_line, &declare);
            payload.line_count += 2;
        }
        None => {
            let mut alone = Payload::from_text(format!("*{SEAL_ONLY_TABLE}\n{declare}{rule}COMMIT\n"));
            alone.chains_written = payload.chains_written;
            alone.rules_written = payload.rules_written;
            payload = alone;
        }
    }
    payload.chains_written += 1;
    payload.rules_written += 1;
    (payload, seal)
}

/// Of the seals found in each table, the one naming the latest generation (each restore rewrites one). Two
/// name the same one only when a restore fell short of its sections: its seal named a generation still to
/// come, and the void seal written at once to replace it named that same generation. The void one is the
/// truth then.
pub fn newest(seals: impl IntoIterator<Item = Option<Seal>>) -> Option<Seal> {
    seals
        .into_iter()
        .flatten()
        .max_by_key(|s| (s.generation.instance, s.generation.value, s.digest.is_none()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RenderConfig;
    use crate::jumps::jump_rules;

    fn at(value: u32) -> Generation {
        Generation {
            instance: 0xaa,
            value,
        }
    }

    #[test]
    fn a_seal_reads_back_from_a_listing() {
        for seal in [
            Seal {
                generation: at(4_000_000_001),
                ours_since: 3_999_999_990,
                digest: Some(0x0123_4567_89ab_cdef_0011_2233_4455_6677),
            },
            Seal {
                generation: at(7),
                ours_since: 7,
                digest: None,
            },
        ] {
            // As `iptables -S` prints it.
            let listing = format!(
                "-N {SEAL_CHAIN}\n-A {SEAL_CHAIN} -m comment --comment \"{}\"\n",
                seal.comment()
            );
            assert_eq!(Seal::from_listing(&listing), Some(seal));
        }
    }

    #[test]
    fn anything_but_one_well_formed_seal_reads_as_none() {
        let good = format!(
            "-A {SEAL_CHAIN} -m comment --comment \"{}\"",
            Seal {
                generation: at(3),
                ours_since: 1,
                digest: Some(5)
            }
            .comment()
        );
        assert!(Seal::from_listing(&good).is_some());
        for listing in [
            String::new(),
            format!("-N {SEAL_CHAIN}"),
            format!("{good}\n{good}"),
            format!(
                "-A {SEAL_CHAIN} -m comment --comment \"svcproxy seal generation=3 instance=00000000000000aa digest=12\""
            ),
            format!(
                "-A {SEAL_CHAIN} -m comment --comment \"svcproxy seal generation=3 instance=aa unsealed\""
            ),
            format!("-A {SEAL_CHAIN} -m comment --comment \"svcproxy seal generation=3 unsealed\""),
            format!(
                "-A {SEAL_CHAIN} -m comment --comment \"svcproxy seal generation=3 instance=00000000000000aa since=x unsealed\""
            ),
            format!(
                "-A {SEAL_CHAIN} -m comment --comment \"svcproxy seal generation=3 instance=00000000000000aa since=1\""
            ),
            format!(
                "-A {SEAL_CHAIN} -m comment --comment \"svcproxy seal generation=x instance=00000000000000aa unsealed\""
            ),
            format!(
                "-A {SEAL_CHAIN} -m comment --comment \"svcproxy seal generation=3 instance=00000000000000aa unsealed extra\""
            ),
            format!("-A {SEAL_CHAIN} -m comment --comment \"something else\""),
            format!("-A {SEAL_CHAIN} -j ACCEPT"),
        ] {
            assert_eq!(Seal::from_listing(&listing), None, "{listing}");
        }
    }

    #[test]
    fn only_the_named_generation_and_digest_prove_anything() {
        let seal = Seal {
            generation: at(10),
            ours_since: 10,
            digest: Some(99),
        };
        assert!(seal.proves(at(10), 99));
        assert!(!seal.proves(at(11), 99));
        assert!(!seal.proves(at(10), 98));
        let elsewhere = Generation {
            instance: 0xbb,
            value: 10,
        };
        assert!(!seal.proves(elsewhere, 99), "another boot or namespace");
        let unsealed = Seal {
            generation: at(10),
            ours_since: 10,
            digest: None,
        };
        assert!(!unsealed.proves(at(10), 99));
    }

    fn ruleset(lines: &[(&str, &[&str])]) -> Ruleset {
        let mut r = Ruleset::default();
        for (name, rules) in lines {
            r.nat.chains.insert((*name).into(), Chain::new(name, *rules));
        }
        r
    }

    #[test]
    fn the_digest_follows_every_chain_name_rule_and_jump() {
        let jumps = jump_rules(&RenderConfig::default());
        let base = ruleset(&[("KUBE-A", &["-A KUBE-A -j KUBE-B"]), ("KUBE-B", &[])]);
        let d = RulesetDigest::of(&base, &jumps);
        assert_eq!(d, RulesetDigest::of(&base.clone(), &jumps));
        let others = [
            ruleset(&[("KUBE-A", &["-A KUBE-A -j KUBE-C"]), ("KUBE-B", &[])]),
            ruleset(&[("KUBE-A", &["-A KUBE-A -j KUBE-B"]), ("KUBE-C", &[])]),
            ruleset(&[("KUBE-A", &["-A KUBE-A -j KUBE-B"])]),
            ruleset(&[("KUBE-A", &[]), ("KUBE-B", &["-A KUBE-B -j KUBE-B"])]),
        ];
        for other in others {
            assert_ne!(RulesetDigest::of(&other, &jumps), d, "{other:?}");
        }
        assert_ne!(RulesetDigest::of(&base, &jumps[1..]), d);
        let mut moved = base.clone();
        let chain = moved.nat.chains.remove("KUBE-B").unwrap();
        moved.filter.chains.insert("KUBE-B".into(), chain);
        assert_ne!(RulesetDigest::of(&moved, &jumps), d);
    }

    #[test]
    fn the_digest_of_parts_is_the_digest_of_the_whole() {
        let r = ruleset(&[
            ("KUBE-A", &["-A KUBE-A -j KUBE-B"]),
            ("KUBE-B", &["-A KUBE-B -j RETURN"]),
        ]);
        let mut parts = RulesetDigest::default();
        for (name, chain) in r.nat.chains.iter().rev() {
            parts.add(chain_digest(TableName::Nat, name, chain));
        }
        assert_eq!(parts.value(), RulesetDigest::of(&r, &[]));
    }

    #[test]
    fn the_last_section_carries_the_seal() {
        let seal = Seal {
            generation: at(12),
            ours_since: 11,
            digest: Some(1),
        };
        let rule = format!("-A {SEAL_CHAIN} -m comment --comment \"{}\"", seal.comment());
        let mut nat_only = Payload::from_text("*nat\n:KUBE-A - [0:0]\n-A KUBE-A -j RETURN\nCOMMIT\n");
        nat_only.chains_written = 1;
        nat_only.rules_written = 1;
        let (p, written) = sealed(nat_only, at(11), Some(1));
        assert_eq!(written, seal, "one transaction from generation 11");
        assert_eq!(
            p.text(),
            format!("*nat\n:{SEAL_CHAIN} - [0:0]\n:KUBE-A - [0:0]\n-A KUBE-A -j RETURN\n{rule}\nCOMMIT\n")
        );
        assert_eq!(p.line_count, p.text().lines().count());

        let both = Payload::from_text("*filter\n:KUBE-F - [0:0]\nCOMMIT\n*nat\n:KUBE-A - [0:0]\nCOMMIT\n");
        let (p, written) = sealed_since(both, at(10), 11, Some(1));
        assert_eq!(written, seal);
        assert_eq!(
            p.text(),
            format!(
                "*filter\n:KUBE-F - [0:0]\nCOMMIT\n*nat\n:{SEAL_CHAIN} - [0:0]\n:KUBE-A - [0:0]\n{rule}\nCOMMIT\n"
            )
        );
        assert_eq!(p.line_count, p.text().lines().count());
        assert_eq!(Seal::from_listing(p.text()), Some(seal));

        let (p, written) = sealed(Payload::default(), at(11), Some(1));
        assert_eq!(written, seal);
        assert_eq!(
            p.text(),
            format!("*filter\n:{SEAL_CHAIN} - [0:0]\n{rule}\nCOMMIT\n")
        );
    }

    #[test]
    fn the_newest_seal_is_the_one_with_the_latest_generation() {
        let seal = |value| {
            Some(Seal {
                generation: at(value),
                ours_since: value,
                digest: None,
            })
        };
        assert_eq!(newest([seal(4), seal(9)]), seal(9));
        let claimed = Some(Seal {
            generation: at(9),
            ours_since: 7,
            digest: Some(3),
        });
        assert_eq!(newest([seal(9), claimed]), seal(9), "the void seal wins a tie");
        assert_eq!(newest([claimed, seal(9)]), seal(9));
        assert_eq!(newest([seal(9), None]), seal(9));
        assert_eq!(newest([None, None]), None);
    }

    #[test]
    fn a_seal_without_since_vouches_for_its_own_commit_only() {
        let listing = format!(
            "-A {SEAL_CHAIN} -m comment --comment \"svcproxy seal generation=9 instance=00000000000000aa digest=00000000000000000000000000000005\""
        );
        let seal = Seal::from_listing(&listing).unwrap();
        assert_eq!(seal.ours_since, 9);
        assert!(seal.proves(at(9), 5));
        assert!(!seal.ours_after(at(8)));
    }

    #[test]
    fn a_seal_vouches_for_the_commits_after_its_since() {
        let seal = Seal {
            generation: at(20),
            ours_since: 15,
            digest: None,
        };
        for earlier in [15, 16, 20] {
            assert!(seal.ours_after(at(earlier)), "{earlier}");
        }
        for earlier in [14, 21] {
            assert!(!seal.ours_after(at(earlier)), "{earlier}");
        }
        let elsewhere = Generation {
            instance: 0xbb,
            value: 16,
        };
        assert!(!seal.ours_after(elsewhere));
        // Across the counter's wrap.
        let wrapped = Seal {
            generation: at(3),
            ours_since: u32::MAX - 2,
            digest: None,
        };
        assert!(wrapped.ours_after(at(u32::MAX)));
        assert!(wrapped.ours_after(at(1)));
        assert!(!wrapped.ours_after(at(u32::MAX - 3)));
    }

    #[test]
    fn a_family_is_proven_through_the_newest_seal_of_either() {
        let own = |value, digest| {
            Some(Seal {
                generation: at(value),
                ours_since: value - 1,
                digest: Some(digest),
            })
        };
        let other = |value, since| {
            Some(Seal {
                generation: at(value),
                ours_since: since,
                digest: Some(77),
            })
        };
        // Its own seal names the generation now.
        assert!(proven(own(10, 5), own(10, 5), at(10), 5));
        // The other family wrote since, and vouches for every commit after our seal.
        assert!(proven(own(10, 5), other(12, 8), at(12), 5));
        assert!(proven(own(10, 5), other(12, 10), at(12), 5));
        // Not: the other family's run of commits starts after ours (a commit in between is nobody's we
        // know), the newest seal is not where the kernel is, the digest differs, or there is no own seal.
        assert!(!proven(own(10, 5), other(12, 11), at(12), 5));
        assert!(!proven(own(10, 5), other(12, 8), at(13), 5));
        assert!(!proven(own(10, 6), other(12, 8), at(12), 5));
        assert!(!proven(None, other(12, 8), at(12), 5));
        let unsealed = Some(Seal {
            generation: at(10),
            ours_since: 9,
            digest: None,
        });
        assert!(!proven(unsealed, other(12, 8), at(12), 5));
    }
}
