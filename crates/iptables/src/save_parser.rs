//! Reading `iptables-save` output back: which chains exist, with which rules.
//!
//! Tokenising follows `iptables-restore`'s own reader, so anything iptables-save prints reads back as the
//! arguments it stands for: words split on blanks, runs of blanks collapse (some extensions print two),
//! double quotes group words, and inside quotes a backslash escapes the next character (iptables-save
//! escapes `"`, `\` and `'` that way). Outside quotes a backslash is an ordinary character.

use std::collections::BTreeMap;

/// One rule as saved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedRule {
    pub chain: String,
    /// Every argument after `-A CHAIN`, unquoted, including the target and its options.
    pub args: Vec<String>,
    /// The `-j` or `-g` target; both make the chain a reference of this rule.
    pub jump: Option<String>,
    /// The first `--comment` value.
    pub comment: Option<String>,
    /// The line as printed (without a leading `[packets:bytes]` counter).
    pub line: String,
}

/// One table as saved.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SavedTable {
    /// Chain name → policy (`Some("ACCEPT")` for built-in chains, `None` for user chains, printed as `-`).
    pub chains: BTreeMap<String, Option<String>>,
    /// Rules in the order printed, which is each chain's order.
    pub rules: Vec<SavedRule>,
}

impl SavedTable {
    /// One chain's rules. Scans the table: for many chains use [`SavedTable::rules_by_chain`].
    pub fn rules_of<'a>(&'a self, chain: &'a str) -> impl Iterator<Item = &'a SavedRule> + 'a {
        self.rules.iter().filter(move |r| r.chain == chain)
    }

    /// Every chain's rules in one pass, for comparing whole tables (looking each chain up with `rules_of`
    /// would be quadratic on a large cluster).
    pub fn rules_by_chain(&self) -> std::collections::HashMap<&str, Vec<&SavedRule>> {
        let mut out: std::collections::HashMap<&str, Vec<&SavedRule>> = std::collections::HashMap::new();
        for rule in &self.rules {
            out.entry(rule.chain.as_str()).or_default().push(rule);
        }
        out
    }
}

/// Every table of one `iptables-save` run, by name.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SavedRuleset {
    pub tables: BTreeMap<String, SavedTable>,
}

impl SavedRuleset {
    pub fn table(&self, name: &str) -> Option<&SavedTable> {
        self.tables.get(name)
    }
}

/// Why a dump could not be read; `line` is 1-based.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SaveParseError {
    #[error("line {line}: unterminated double quote")]
    UnterminatedQuote { line: usize },
    #[error("line {line}: {what} outside a table section")]
    OutsideTable { line: usize, what: &'static str },
    #[error("line {line}: table {table:?} starts before the previous table was committed")]
    NestedTable { line: usize, table: String },
    #[error("line {line}: table {table:?} appears twice")]
    DuplicateTable { line: usize, table: String },
    #[error("line {line}: malformed chain declaration")]
    BadChainLine { line: usize },
    #[error("line {line}: rule for undeclared chain {chain:?}")]
    UndeclaredChain { line: usize, chain: String },
    #[error("line {line}: malformed rule")]
    BadRule { line: usize },
    #[error("line {line}: unrecognised line")]
    Unrecognised { line: usize },
    #[error("table {table:?} is not committed")]
    MissingCommit { table: String },
}

/// Splits one line into arguments the way `iptables-restore` does; `None` for an unterminated quote.
pub fn tokenize(line: &str) -> Option<Vec<String>> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut in_word = false;
    let mut quoted = false;
    let mut escaped = false;
    for c in line.chars() {
        if quoted {
            if escaped {
                current.push(c);
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                quoted = false;
            } else {
                current.push(c);
            }
            continue;
        }
        match c {
            '"' => {
                quoted = true;
                in_word = true;
            }
            ' ' | '\t' | '\n' | '\r' => {
                if in_word {
                    out.push(std::mem::take(&mut current));
                    in_word = false;
                }
            }
            _ => {
                current.push(c);
                in_word = true;
            }
        }
    }
    if quoted {
        return None;
    }
    if in_word {
        out.push(current);
    }
    Some(out)
}

/// Parses a whole `iptables-save` dump (any number of tables, with or without `-c` counters).
pub fn parse_save(text: &str) -> Result<SavedRuleset, SaveParseError> {
    let mut reader = SaveReader::default();
    for raw in text.lines() {
        reader.line(raw, |_, _, rule| Some(rule))?;
    }
    reader.finish()
}

/// [`parse_save`] one line at a time, so a dump can be read as `iptables-save` prints it instead of being held
/// whole next to what is parsed from it (the dump is 17 MB at 5,000 services × 10 endpoints), and so a caller
/// can fold rules it only compares instead of keeping them (see [`crate::kernel_view`]).
#[derive(Debug, Default)]
pub struct SaveReader {
    out: SavedRuleset,
    current: Option<(String, SavedTable)>,
    /// Lines read so far, to name the failing one as `parse_save` does.
    line: usize,
}

impl SaveReader {
    /// Reads the next line (without its newline). Each rule is handed to `keep` with the name of its table and
    /// the table as read so far (its chains all declared): what `keep` returns is stored, `None` drops it.
    pub fn line(
        &mut self,
        raw: &str,
        keep: impl FnOnce(&str, &SavedTable, SavedRule) -> Option<SavedRule>,
    ) -> Result<(), SaveParseError> {
        self.line += 1;
        let line = self.line;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            return Ok(());
        }
        if let Some(name) = trimmed.strip_prefix('*') {
            if let Some((table, _)) = &self.current {
                return Err(SaveParseError::NestedTable {
                    line,
                    table: table.clone(),
                });
            }
            let name = name.trim().to_string();
            if self.out.tables.contains_key(&name) {
                return Err(SaveParseError::DuplicateTable { line, table: name });
            }
            self.current = Some((name, SavedTable::default()));
            return Ok(());
        }
        if trimmed == "COMMIT" {
            let Some((name, table)) = self.current.take() else {
                return Err(SaveParseError::OutsideTable { line, what: "COMMIT" });
            };
            self.out.tables.insert(name, table);
            return Ok(());
        }
        if let Some(decl) = trimmed.strip_prefix(':') {
            let Some((_, table)) = self.current.as_mut() else {
                return Err(SaveParseError::OutsideTable {
                    line,
                    what: "chain declaration",
                });
            };
            let mut words = decl.split_whitespace();
            let (Some(name), Some(policy)) = (words.next(), words.next()) else {
                return Err(SaveParseError::BadChainLine { line });
            };
            let policy = (policy != "-").then(|| policy.to_string());
            table.chains.insert(name.to_string(), policy);
            return Ok(());
        }
        let rule_text = strip_counters(trimmed);
        if rule_text.starts_with("-A ") || rule_text.starts_with("-A\t") {
            let Some((name, table)) = self.current.as_mut() else {
                return Err(SaveParseError::OutsideTable { line, what: "rule" });
            };
            let rule = parse_rule(rule_text, line)?;
            if !table.chains.contains_key(&rule.chain) {
                return Err(SaveParseError::UndeclaredChain {
                    line,
                    chain: rule.chain,
                });
            }
            if let Some(rule) = keep(name, table, rule) {
                table.rules.push(rule);
            }
            return Ok(());
        }
        Err(SaveParseError::Unrecognised { line })
    }

    /// How many lines have been read, counting blank ones: the number of the last line read.
    pub fn lines_read(&self) -> usize {
        self.line
    }

    /// The dump read so far; fails if a table is still open.
    pub fn finish(self) -> Result<SavedRuleset, SaveParseError> {
        if let Some((table, _)) = self.current {
            return Err(SaveParseError::MissingCommit { table });
        }
        Ok(self.out)
    }
}

/// `iptables-save -c` prefixes rules with `[packets:bytes]`.
pub(crate) fn strip_counters(line: &str) -> &str {
    if line.starts_with('[')
        && let Some(end) = line.find(']')
    {
        return line[end + 1..].trim_start();
    }
    line
}

pub(crate) fn parse_rule(text: &str, line: usize) -> Result<SavedRule, SaveParseError> {
    let mut words = tokenize(text)
        .ok_or(SaveParseError::UnterminatedQuote { line })?
        .into_iter();
    let (Some(_append), Some(chain)) = (words.next(), words.next()) else {
        return Err(SaveParseError::BadRule { line });
    };
    let args: Vec<String> = words.collect();
    let mut jump = None;
    let mut comment = None;
    for pair in args.windows(2) {
        match pair[0].as_str() {
            "-j" | "-g" | "--jump" | "--goto" if jump.is_none() => jump = Some(pair[1].clone()),
            "--comment" if comment.is_none() => comment = Some(pair[1].clone()),
            _ => {}
        }
    }
    if matches!(args.last().map(String::as_str), Some("-j" | "-g" | "--comment")) {
        return Err(SaveParseError::BadRule { line });
    }
    Ok(SavedRule {
        chain,
        args,
        jump,
        comment,
        line: text.to_string(),
    })
}

/// Quotes one argument as iptables-save prints it: bare when it is only letters, digits, `_` and `-`,
/// otherwise in double quotes with `"`, `\` and `'` escaped. Used to re-print parsed rules.
pub fn quote_arg(arg: &str) -> String {
    let bare = !arg.is_empty()
        && arg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if bare {
        return arg.to_string();
    }
    let mut out = String::with_capacity(arg.len() + 2);
    out.push('"');
    for c in arg.chars() {
        if matches!(c, '"' | '\\' | '\'') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_handles_quotes_escapes_and_blank_runs() {
        let t =
            tokenize(r#"-A X -m comment --comment "a \"b\" c\\d" -m nfacct --nfacct-name  n -j Y"#).unwrap();
        assert_eq!(
            t,
            [
                "-A",
                "X",
                "-m",
                "comment",
                "--comment",
                r#"a "b" c\d"#,
                "-m",
                "nfacct",
                "--nfacct-name",
                "n",
                "-j",
                "Y"
            ]
        );
        assert_eq!(tokenize(r#"a\b "" c"#).unwrap(), [r"a\b", "", "c"]);
        assert!(tokenize(r#"-A X --comment "open"#).is_none());
    }

    #[test]
    fn parses_tables_chains_rules() {
        let dump = "# Generated by iptables-save\n*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n\
            [5:300] -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
            -A KUBE-SERVICES -g KUBE-X\nCOMMIT\n# Completed\n*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n";
        let saved = parse_save(dump).unwrap();
        let nat = saved.table("nat").unwrap();
        assert_eq!(nat.chains.get("PREROUTING"), Some(&Some("ACCEPT".to_string())));
        assert_eq!(nat.chains.get("KUBE-SERVICES"), Some(&None));
        let rule = &nat.rules[0];
        assert_eq!(rule.chain, "PREROUTING");
        assert_eq!(rule.jump.as_deref(), Some("KUBE-SERVICES"));
        assert_eq!(rule.comment.as_deref(), Some("kubernetes service portals"));
        assert!(rule.line.starts_with("-A PREROUTING"));
        assert_eq!(nat.rules[1].jump.as_deref(), Some("KUBE-X"));
        assert!(saved.table("filter").unwrap().rules.is_empty());
    }

    #[test]
    fn errors_name_the_line() {
        let cases = [
            (
                "-A X -j Y\n",
                SaveParseError::OutsideTable {
                    line: 1,
                    what: "rule",
                },
            ),
            (
                "*nat\n:X - [0:0]\n-A X --comment \"a\n",
                SaveParseError::UnterminatedQuote { line: 3 },
            ),
            (
                "*nat\n-A X -j Y\nCOMMIT\n",
                SaveParseError::UndeclaredChain {
                    line: 2,
                    chain: "X".into(),
                },
            ),
            ("*nat\n:X\nCOMMIT\n", SaveParseError::BadChainLine { line: 2 }),
            (
                "*nat\n:X - [0:0]\n-A X -j\nCOMMIT\n",
                SaveParseError::BadRule { line: 3 },
            ),
            ("*nat\nbogus\n", SaveParseError::Unrecognised { line: 2 }),
            (
                "*nat\n*filter\n",
                SaveParseError::NestedTable {
                    line: 2,
                    table: "nat".into(),
                },
            ),
            (
                "*nat\nCOMMIT\n*nat\n",
                SaveParseError::DuplicateTable {
                    line: 3,
                    table: "nat".into(),
                },
            ),
            ("*nat\n", SaveParseError::MissingCommit { table: "nat".into() }),
        ];
        for (text, want) in cases {
            assert_eq!(parse_save(text), Err(want), "{text:?}");
        }
        assert_eq!(
            SaveParseError::UndeclaredChain {
                line: 7,
                chain: "X".into()
            }
            .to_string(),
            "line 7: rule for undeclared chain \"X\""
        );
    }

    #[test]
    fn quote_arg_matches_iptables_save() {
        assert_eq!(quote_arg("KUBE-SVC-X"), "KUBE-SVC-X");
        assert_eq!(
            quote_arg("default/kubernetes:https"),
            "\"default/kubernetes:https\""
        );
        assert_eq!(quote_arg(r#"a"b'c\"#), r#""a\"b\'c\\""#);
        assert_eq!(quote_arg(""), "\"\"");
    }
}
