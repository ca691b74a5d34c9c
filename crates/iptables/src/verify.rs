//! Read-back verification: does the kernel still hold what we wrote? Compares an `iptables-save` dump with
//! the ruleset of our last successful transaction, chain by chain, in a spelling-independent form.

use std::collections::BTreeSet;

use crate::canonical::canonical_rule;
use crate::config::RenderConfig;
use crate::jumps::missing_jumps;
use crate::kernel_view::{Found, KernelView};
use crate::ruleset::{Chain, Ruleset, TableName};
use crate::save_parser::tokenize;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DivergenceKind {
    /// One of our chains is gone (deleted, or the whole table flushed).
    MissingChain,
    /// The chain's rules differ from what we wrote: edited, inserted, deleted or reordered.
    ChangedRules { expected: usize, found: usize },
    /// A jump from a built-in chain into ours is missing, so traffic no longer reaches our rules.
    MissingJump { builtin: String, target: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Divergence {
    pub table: TableName,
    pub chain: String,
    pub kind: DivergenceKind,
    /// The service ports whose rules live in the chain (from the rule comments); empty for shared chains.
    pub services: Vec<String>,
}

impl Divergence {
    pub fn label(&self) -> &'static str {
        match self.kind {
            DivergenceKind::MissingChain => "missing_chain",
            DivergenceKind::ChangedRules { .. } => "changed_rules",
            DivergenceKind::MissingJump { .. } => "missing_jump",
        }
    }
}

impl std::fmt::Display for Divergence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = self.table.as_str();
        match &self.kind {
            DivergenceKind::MissingChain => write!(f, "{t}/{} is missing", self.chain)?,
            DivergenceKind::ChangedRules { expected, found } => write!(
                f,
                "{t}/{} differs from what was written ({expected} rules expected, {found} found)",
                self.chain
            )?,
            DivergenceKind::MissingJump { builtin, target } => {
                write!(f, "{t}/{builtin} no longer jumps to {target}")?
            }
        }
        if !self.services.is_empty() {
            write!(f, " (affects {})", self.services.join(", "))?;
        }
        Ok(())
    }
}

fn services_of(chain: &Chain) -> Vec<String> {
    let mut out = BTreeSet::new();
    for rule in chain.rules() {
        if let Some(args) = tokenize(rule)
            && let Some(pos) = args.iter().position(|a| a == "--comment")
            && let Some(comment) = args.get(pos + 1)
            && let Some(first) = comment.split_whitespace().next()
            && first.contains('/')
        {
            out.insert(first.to_string());
        }
    }
    out.into_iter().collect()
}

pub(crate) fn canonical_lines(chain: &Chain) -> Vec<Vec<String>> {
    chain
        .rules()
        .filter_map(tokenize)
        .map(|args| canonical_rule(&args))
        .collect()
}

/// Compares the kernel, read against `expected` (see [`KernelView`]), with `expected`. `chains`, when given,
/// limits the check to those chains (what a partial sync touched); the built-in jumps are always checked
/// because they are few.
pub fn verify(
    kernel: &KernelView,
    expected: &Ruleset,
    cfg: &RenderConfig,
    chains: Option<&[(TableName, String)]>,
) -> Vec<Divergence> {
    let mut out = Vec::new();
    for table in TableName::ALL {
        let ours = expected.table(table);
        let selected: Vec<(&str, &Chain)> = match chains {
            Some(list) => list
                .iter()
                .filter(|(t, _)| *t == table)
                .filter_map(|(_, name)| ours.chains.get_key_value(name.as_str()).map(|(k, c)| (&**k, c)))
                .collect(),
            None => ours.chains.iter().map(|(k, c)| (&**k, c)).collect(),
        };
        for (name, chain) in selected {
            let kind = match kernel.found(table, name) {
                Found::Same => continue,
                Found::Missing => DivergenceKind::MissingChain,
                Found::Different { rules } => DivergenceKind::ChangedRules {
                    expected: canonical_lines(chain).len(),
                    found: rules,
                },
            };
            out.push(Divergence {
                table,
                chain: name.to_string(),
                kind,
                services: services_of(chain),
            });
        }
    }
    for jump in missing_jumps(&kernel.saved, cfg) {
        out.push(Divergence {
            table: jump.table,
            chain: jump.chain.to_string(),
            kind: DivergenceKind::MissingJump {
                builtin: jump.chain.to_string(),
                target: jump.target.to_string(),
            },
            services: Vec::new(),
        });
    }
    out
}
