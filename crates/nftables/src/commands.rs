//! The `nft -f` command lines we emit, one function per command. Definitions are written with explicit
//! ` ; ` separators inside braces because `nft` 1.0.x's parser requires a separator before a closing brace.

use std::fmt::Write;

use crate::ruleset::{BaseChain, Chain, CompactString, Element, Policy, Set};

/// Elements per `add element` / `delete element` command: keeps lines (and `nft`'s error messages, which
/// quote the line) readable without costing measurable parse time.
pub const ELEMENTS_PER_COMMAND: usize = 256;

pub fn quote(text: &str) -> String {
    // Comments are ours and never contain quotes; this keeps a stray one from breaking the transaction.
    format!("\"{}\"", text.replace('"', "'"))
}

pub fn add_table(out: &mut String, table: &str, comment: Option<&str>) {
    // Writing to a String cannot fail, here and below.
    let _ = match comment {
        Some(c) => writeln!(out, "add table {table} {{ comment {} ; }}", quote(c)),
        None => writeln!(out, "add table {table}"),
    };
}

fn base_spec(b: &BaseChain) -> String {
    format!(
        "type {} hook {} priority {} ; policy {} ;",
        b.chain_type.keyword(),
        b.hook.keyword(),
        b.priority,
        match b.policy {
            Policy::Accept => "accept",
            Policy::Drop => "drop",
        }
    )
}

pub fn add_chain(out: &mut String, table: &str, name: &str, chain: &Chain) {
    let mut spec = String::new();
    if let Some(b) = &chain.base {
        spec.push_str(&base_spec(b));
    }
    if let Some(c) = &chain.comment {
        if !spec.is_empty() {
            spec.push(' ');
        }
        let _ = write!(spec, "comment {} ;", quote(c));
    }
    if spec.is_empty() {
        let _ = writeln!(out, "add chain {table} {name}");
    } else {
        let _ = writeln!(out, "add chain {table} {name} {{ {spec} }}");
    }
}

pub fn flush_chain(out: &mut String, table: &str, name: &str) {
    let _ = writeln!(out, "flush chain {table} {name}");
}

pub fn delete_chain(out: &mut String, table: &str, name: &str) {
    let _ = writeln!(out, "delete chain {table} {name}");
}

pub fn add_rule(out: &mut String, table: &str, chain: &str, rule: &str) {
    let _ = writeln!(out, "add rule {table} {chain} {rule}");
}

pub fn add_set(out: &mut String, table: &str, name: &str, set: &Set) {
    let mut spec = set.key_type.clone();
    if let Some(d) = &set.data_type {
        let _ = write!(spec, " : {d}");
    }
    spec.push_str(" ;");
    if !set.flags.is_empty() {
        let flags: Vec<&str> = set.flags.iter().map(String::as_str).collect();
        let _ = write!(spec, " flags {} ;", flags.join(","));
    }
    if let Some(t) = set.timeout {
        let _ = write!(spec, " timeout {t}s ;");
    }
    if let Some(s) = set.size {
        let _ = write!(spec, " size {s} ;");
    }
    if let Some(c) = &set.comment {
        let _ = write!(spec, " comment {} ;", quote(c));
    }
    let _ = writeln!(out, "add {} {table} {name} {{ {spec} }}", set.kind.keyword());
}

pub fn delete_set(out: &mut String, table: &str, name: &str, set: &Set) {
    let _ = writeln!(out, "delete {} {table} {name}", set.kind.keyword());
}

fn write_element(out: &mut String, key: &str, element: &Element) {
    out.push_str(key);
    if let Some(c) = &element.comment {
        let _ = write!(out, " comment {}", quote(c));
    }
    if let Some(v) = &element.value {
        let _ = write!(out, " : {v}");
    }
}

/// Written straight into `out`, `ELEMENTS_PER_COMMAND` to a command: a cold sync adds tens of thousands of
/// elements, and a string per element first would double what the text costs.
pub fn add_elements<'a>(
    out: &mut String,
    table: &str,
    set: &str,
    elements: impl IntoIterator<Item = (&'a CompactString, &'a Element)>,
) {
    let mut in_command = 0;
    for (key, element) in elements {
        if in_command == 0 {
            let _ = write!(out, "add element {table} {set} {{ ");
        } else {
            out.push_str(", ");
        }
        write_element(out, key, element);
        in_command += 1;
        if in_command == ELEMENTS_PER_COMMAND {
            out.push_str(" }\n");
            in_command = 0;
        }
    }
    if in_command > 0 {
        out.push_str(" }\n");
    }
}

pub fn delete_elements<'a>(
    out: &mut String,
    table: &str,
    set: &str,
    keys: impl IntoIterator<Item = &'a CompactString>,
) {
    let keys: Vec<&str> = keys.into_iter().map(CompactString::as_str).collect();
    for batch in keys.chunks(ELEMENTS_PER_COMMAND) {
        let _ = writeln!(out, "delete element {table} {set} {{ {} }}", batch.join(", "));
    }
}
