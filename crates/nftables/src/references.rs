//! What a rule or an element refers to. The kernel refuses to delete a chain or set that is still referenced
//! and to add a reference to one that does not exist, so the planner orders commands by these references and
//! the simulator enforces the same rules.

/// Words of a rule outside quoted strings, with `{`, `}` and `,` split off as words of their own, so a jump
/// inside an anonymous map (`{ 0 : goto a, 1 : goto b }`) is found like any other.
fn words(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start: Option<usize> = None;
    let mut in_quote = false;
    for (i, c) in text.char_indices() {
        if in_quote {
            if c == '"' {
                in_quote = false;
            }
            continue;
        }
        match c {
            '"' => {
                if let Some(s) = start.take() {
                    out.push(&text[s..i]);
                }
                in_quote = true;
            }
            ' ' | '\t' | '{' | '}' | ',' => {
                if let Some(s) = start.take() {
                    out.push(&text[s..i]);
                }
                if c != ' ' && c != '\t' {
                    out.push(&text[i..i + 1]);
                }
            }
            _ => {
                if start.is_none() {
                    start = Some(i);
                }
            }
        }
    }
    if let Some(s) = start
        && !in_quote
    {
        out.push(&text[s..]);
    }
    out
}

/// Chains a rule jumps or goes to.
pub fn chain_targets(rule: &str) -> Vec<&str> {
    let w = words(rule);
    w.windows(2)
        .filter(|p| p[0] == "jump" || p[0] == "goto")
        .map(|p| p[1])
        .collect()
}

/// Named sets and maps a rule uses (`@name`).
pub fn set_references(rule: &str) -> Vec<&str> {
    words(rule)
        .into_iter()
        .filter_map(|w| w.strip_prefix('@'))
        .collect()
}

/// The chain a verdict (`goto x`, `jump x`) names, if any.
pub fn verdict_target(verdict: &str) -> Option<&str> {
    let mut it = verdict.split_whitespace();
    match (it.next(), it.next()) {
        (Some("jump" | "goto"), Some(chain)) => Some(chain),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_targets_in_anonymous_maps_but_not_comments() {
        let r = "numgen random mod 2 vmap { 0 : goto a/b__1.2.3.4/80, 1 : goto c } comment \"goto x\"";
        assert_eq!(chain_targets(r), ["a/b__1.2.3.4/80", "c"]);
        assert_eq!(
            set_references("ip saddr @aff-1 goto e"),
            ["aff-1"],
            "set reference"
        );
        assert_eq!(set_references("update @aff-1 { ip saddr }"), ["aff-1"], "update");
        assert_eq!(verdict_target("goto reject-chain"), Some("reject-chain"));
        assert_eq!(verdict_target("drop"), None);
    }
}
