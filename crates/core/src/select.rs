//! Selection as people write it, the same for the CLI (`deploy`, `plan`,
//! `exec`, `upload-keys`), the API's bodies and the chat command:
//!
//! - `web1` — a host by name; `web-*`, `db?`, `edge-[ab]` — host names by glob;
//! - `@edge` — hosts with a tag; `@edge-*` — hosts with a tag matching a glob;
//! - several selectors (positional words, repeated `--on`, or a
//!   comma-separated list such as `web-*,@db`) select the union;
//! - `--exclude SEL` (repeatable, same syntax) removes hosts from it;
//! - nothing at all (or `--all`) is every host.
//!
//! Every selector must match at least one host, and every exclusion too: a
//! typo is an error (exit 2), never an empty or a silently larger deployment.
//!
//! Globs: `*` (any run of characters), `?` (one character), `[abc]`, `[a-z]`
//! and `[!a-z]` (one character in or not in a set). Everything else must be a
//! character host names and tags may have (letters, digits, `-`, `_`, `.`).

use std::collections::BTreeSet;

use crate::fleet::{HostMeta, Inventory, InventoryError, Selection};

mod unknown;
use unknown::{TagsKnown, unknown_host_among};
pub use unknown::{unknown_host, unknown_tag};

/// One part of a glob.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    Literal(char),
    /// `?`
    One,
    /// `*`
    Any,
    /// `[...]`: ranges (single characters are `(c, c)`), negated or not.
    Class {
        ranges: Vec<(char, char)>,
        negated: bool,
    },
}

/// A shell-style glob over host names or tags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Glob {
    text: String,
    tokens: Vec<Token>,
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.'
}

impl Glob {
    /// Parse `text`; an error says what is wrong with it.
    pub fn new(text: &str) -> Result<Glob, String> {
        if text.is_empty() {
            return Err("an empty pattern".into());
        }
        if text.len() > 253 {
            return Err("longer than 253 characters".into());
        }
        let mut tokens = Vec::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '*' => {
                    // `**` is `*`.
                    if tokens.last() != Some(&Token::Any) {
                        tokens.push(Token::Any);
                    }
                }
                '?' => tokens.push(Token::One),
                '[' => {
                    let negated = matches!(chars.peek(), Some('!') | Some('^'));
                    if negated {
                        chars.next();
                    }
                    let mut ranges = Vec::new();
                    let mut closed = false;
                    while let Some(c) = chars.next() {
                        if c == ']' && !ranges.is_empty() {
                            closed = true;
                            break;
                        }
                        if !is_name_char(c) {
                            return Err(format!("`{c}` cannot appear in a host name or tag"));
                        }
                        if chars.peek() == Some(&'-') {
                            let mut ahead = chars.clone();
                            ahead.next();
                            match ahead.peek() {
                                Some(&end) if end != ']' => {
                                    chars.next();
                                    chars.next();
                                    if !is_name_char(end) {
                                        return Err(format!(
                                            "`{end}` cannot appear in a host name or tag"
                                        ));
                                    }
                                    if end < c {
                                        return Err(format!("the range `{c}-{end}` is backwards"));
                                    }
                                    ranges.push((c, end));
                                    continue;
                                }
                                _ => {}
                            }
                        }
                        ranges.push((c, c));
                    }
                    if !closed {
                        return Err("a `[` without its `]`".into());
                    }
                    tokens.push(Token::Class { ranges, negated });
                }
                c if is_name_char(c) => tokens.push(Token::Literal(c)),
                c => {
                    return Err(format!(
                        "`{c}` cannot appear in a host name or tag (globs may use *, ? and [...])"
                    ));
                }
            }
        }
        Ok(Glob {
            text: text.to_string(),
            tokens,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether this pattern has no wildcard: it names exactly one thing.
    pub fn is_literal(&self) -> bool {
        self.tokens.iter().all(|t| matches!(t, Token::Literal(_)))
    }

    /// Whether `text` matches the whole pattern.
    pub fn matches(&self, text: &str) -> bool {
        let text: Vec<char> = text.chars().collect();
        let (mut t, mut p) = (0usize, 0usize);
        // Where the last `*` was, and where in the text it resumes.
        let mut star: Option<(usize, usize)> = None;
        while t < text.len() {
            let step = match self.tokens.get(p) {
                Some(Token::Any) => {
                    star = Some((p, t));
                    p += 1;
                    continue;
                }
                Some(Token::Literal(c)) => *c == text[t],
                Some(Token::One) => true,
                Some(Token::Class { ranges, negated }) => {
                    let inside = ranges.iter().any(|(a, b)| (*a..=*b).contains(&text[t]));
                    inside != *negated
                }
                None => false,
            };
            if step {
                t += 1;
                p += 1;
            } else if let Some((star_p, star_t)) = star {
                // Let the last `*` swallow one more character.
                p = star_p + 1;
                t = star_t + 1;
                star = Some((star_p, star_t + 1));
            } else {
                return false;
            }
        }
        self.tokens[p..].iter().all(|t| *t == Token::Any)
    }
}

/// What one selector is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selector {
    /// Host names (`web1`, `web-*`).
    Name(Glob),
    /// Tags (`@edge`, `@edge-*`).
    Tag(Glob),
}

impl Selector {
    /// One selector: `NAME-GLOB` or `@TAG-GLOB`.
    pub fn parse(text: &str) -> Result<Selector, InventoryError> {
        let bad = |reason: String| InventoryError::BadSelector {
            selector: text.to_string(),
            reason,
        };
        match text.strip_prefix('@') {
            Some(tag) => Glob::new(tag).map(Selector::Tag).map_err(bad),
            None => {
                if text.starts_with('-') {
                    return Err(bad("it starts with `-`".into()));
                }
                Glob::new(text).map(Selector::Name).map_err(bad)
            }
        }
    }

    /// Every selector in `words`, each of which may be a comma-separated list.
    pub fn parse_all(words: &[String]) -> Result<Vec<Selector>, InventoryError> {
        let mut selectors = Vec::new();
        for word in words {
            for part in word.split(',') {
                let part = part.trim();
                if part.is_empty() {
                    return Err(InventoryError::BadSelector {
                        selector: word.clone(),
                        reason: "an empty selector in a comma-separated list".into(),
                    });
                }
                selectors.push(Selector::parse(part)?);
            }
        }
        Ok(selectors)
    }

    /// The selector as it was written.
    pub fn text(&self) -> String {
        match self {
            Selector::Name(glob) => glob.as_str().to_string(),
            Selector::Tag(glob) => format!("@{}", glob.as_str()),
        }
    }

    /// Whether this selector picks `host`, as far as the host's own
    /// metadata tells.
    pub fn matches(&self, host: &HostMeta) -> bool {
        self.matches_name_and_tags(&host.name, &host.tags)
    }

    /// [`Selector::matches`] on a host's name and tags.
    pub fn matches_name_and_tags(&self, name: &str, tags: &[String]) -> bool {
        match self {
            Selector::Name(glob) => glob.matches(name),
            Selector::Tag(glob) => tags.iter().any(|tag| glob.matches(tag)),
        }
    }

    /// The error for a selector that matched nothing among `known` names.
    fn no_match(&self, inventory: &Inventory, known: &[String]) -> InventoryError {
        match self {
            Selector::Name(glob) if glob.is_literal() => {
                let tags = inventory.tags();
                unknown_host_among(glob.as_str(), known, &tags, TagsKnown::Yes)
            }
            Selector::Tag(glob) if glob.is_literal() => unknown_tag(inventory, glob.as_str()),
            _ => InventoryError::NoMatch {
                selector: self.text(),
            },
        }
    }
}

/// Hosts a policy is about (a window, an approval rule, a token's or a chat
/// user's reach): the union of selectors, none meaning every host. Unlike a
/// selection, a filter need not match anything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostFilter {
    selectors: Vec<Selector>,
}

impl HostFilter {
    /// Every host.
    pub fn everything() -> Self {
        HostFilter::default()
    }

    /// The selectors as written (comma lists allowed); an error names the bad one.
    pub fn parse(words: &[String]) -> Result<HostFilter, InventoryError> {
        Ok(HostFilter {
            selectors: Selector::parse_all(words)?,
        })
    }

    pub fn is_everything(&self) -> bool {
        self.selectors.is_empty()
    }

    pub fn matches(&self, name: &str, tags: &[String]) -> bool {
        self.is_everything()
            || self
                .selectors
                .iter()
                .any(|s| s.matches_name_and_tags(name, tags))
    }

    /// The selectors as written, for messages.
    pub fn describe(&self) -> String {
        if self.is_everything() {
            return "every host".into();
        }
        self.selectors
            .iter()
            .map(Selector::text)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The include and exclude selectors of a selection.
fn parse(selection: &Selection) -> Result<(Vec<Selector>, Vec<Selector>), InventoryError> {
    let include = Selector::parse_all(&[selection.names.clone(), selection.tags.clone()].concat())?;
    let exclude = Selector::parse_all(&selection.exclude)?;
    Ok((include, exclude))
}

/// Resolve a selection to host names, sorted and without duplicates.
pub fn resolve(
    inventory: &Inventory,
    selection: &Selection,
) -> Result<Vec<String>, InventoryError> {
    resolve_partial(inventory, &BTreeSet::new(), selection).map(|(chosen, _)| chosen)
}

/// Resolve a selection over a fleet some of whose hosts could not be
/// evaluated (`unevaluated`: their names are known, their tags are not).
/// Returns the chosen hosts that evaluated and those that did not. A tag
/// selector cannot know the tags of an unevaluated host: callers that must
/// be exact refuse such selections (see [`uses_tags`]).
pub fn resolve_partial(
    inventory: &Inventory,
    unevaluated: &BTreeSet<String>,
    selection: &Selection,
) -> Result<(Vec<String>, Vec<String>), InventoryError> {
    let (include, exclude) = parse(selection)?;
    let mut everyone: BTreeSet<String> = inventory.hosts().map(|h| h.name.clone()).collect();
    everyone.extend(unevaluated.iter().cloned());
    let known: Vec<String> = everyone.iter().cloned().collect();
    let resolve_one = |selector: &Selector| -> Result<BTreeSet<String>, InventoryError> {
        let found: BTreeSet<String> = match selector {
            Selector::Name(glob) => everyone
                .iter()
                .filter(|n| glob.matches(n))
                .cloned()
                .collect(),
            Selector::Tag(_) => inventory
                .hosts()
                .filter(|h| selector.matches(h))
                .map(|h| h.name.clone())
                .collect(),
        };
        if found.is_empty() {
            Err(selector.no_match(inventory, &known))
        } else {
            Ok(found)
        }
    };
    let mut chosen: BTreeSet<String> = if selection.all || include.is_empty() {
        everyone.clone()
    } else {
        let mut chosen = BTreeSet::new();
        for selector in &include {
            chosen.extend(resolve_one(selector)?);
        }
        chosen
    };
    for selector in &exclude {
        for name in resolve_one(selector)? {
            chosen.remove(&name);
        }
    }
    if chosen.is_empty() {
        return Err(InventoryError::NothingLeft {
            excluded: selection.exclude.join(", "),
        });
    }
    Ok(chosen.into_iter().partition(|n| !unevaluated.contains(n)))
}

/// Whether `host` is selected, as far as its own metadata tells: exact for
/// every host that exists (selectors that match nothing are found later,
/// and a selection that does not parse selects nothing here).
pub fn may_select(selection: &Selection, host: &HostMeta) -> bool {
    let Ok((include, exclude)) = parse(selection) else {
        return false;
    };
    (selection.all || include.is_empty() || include.iter().any(|s| s.matches(host)))
        && !exclude.iter().any(|s| s.matches(host))
}

/// Check a selection's host-name selectors against the fleet's names,
/// before any host is evaluated: a misspelt host is an error at once.
pub fn check_names(selection: &Selection, names: &[String]) -> Result<(), InventoryError> {
    let (include, exclude) = parse(selection)?;
    for selector in include.iter().chain(&exclude) {
        if let Selector::Name(glob) = selector
            && !names.iter().any(|n| glob.matches(n))
        {
            // The hosts' tags are not known before evaluation: a word that
            // is no host's name may be meant as a tag.
            return Err(if glob.is_literal() {
                unknown_host_among(glob.as_str(), names, &BTreeSet::new(), TagsKnown::No)
            } else {
                InventoryError::NoMatch {
                    selector: selector.text(),
                }
            });
        }
    }
    Ok(())
}

/// Whether any selector of the selection is about tags.
pub fn uses_tags(selection: &Selection) -> bool {
    parse(selection).is_ok_and(|(include, exclude)| {
        include
            .iter()
            .chain(&exclude)
            .any(|s| matches!(s, Selector::Tag(_)))
    })
}

/// Check the syntax of selectors without a fleet (API bodies, chat).
pub fn check(words: &[String]) -> Result<(), InventoryError> {
    Selector::parse_all(words).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn glob(text: &str) -> Glob {
        Glob::new(text).unwrap()
    }

    #[test]
    fn globs_match_whole_names() {
        assert!(glob("web-*").matches("web-1"));
        assert!(glob("web-*").matches("web-"));
        assert!(!glob("web-*").matches("xweb-1"));
        assert!(glob("*").matches(""));
        assert!(glob("*-db").matches("eu-west-db"));
        assert!(!glob("*-db").matches("eu-west-db2"));
        assert!(glob("w?b").matches("web"));
        assert!(!glob("w?b").matches("wb"));
        assert!(glob("edge-[ab]").matches("edge-b"));
        assert!(!glob("edge-[ab]").matches("edge-c"));
        assert!(glob("n[0-9]").matches("n7"));
        assert!(glob("n[!0-9]").matches("nx"));
        assert!(!glob("n[!0-9]").matches("n7"));
        assert!(glob("a*b*c").matches("aXXbYYc"));
        assert!(glob("a*b*c").matches("abc"));
        assert!(!glob("a*b*c").matches("aXXbYY"));
        assert!(glob("*a*a*a*").matches("banana-a"));
        assert!(glob("web1").is_literal());
        assert!(!glob("web*").is_literal());
        assert!(glob("[-a]").matches("-"));
    }

    #[test]
    fn globs_refuse_what_no_name_has() {
        for bad in [
            "", "a b", "a;b", "$(x)", "a/b", "[ab", "[z-a]", "a\u{e9}", "[a;]",
        ] {
            assert!(Glob::new(bad).is_err(), "{bad:?}");
        }
        assert!(Selector::parse("-oProxyCommand=x").is_err());
        assert!(Selector::parse("@").is_err());
        let e = Selector::parse_all(&["a,,b".into()]).unwrap_err();
        assert!(e.to_string().contains("empty selector"), "{e}");
        assert_eq!(
            Selector::parse_all(&["web-*, @db".into(), "x".into()])
                .unwrap()
                .iter()
                .map(Selector::text)
                .collect::<Vec<_>>(),
            ["web-*", "@db", "x"]
        );
    }

    fn fleet() -> Inventory {
        let p = "/nix/store/q4zfsrsm5n0vhqjrgz2c1lc78slrrsmw-nixos-system";
        let d = "/nix/store/c7syrkx06plw1dwvs86ny93v9ivpjlw3-nixos-system.drv";
        let host = |tags: &[&str]| serde_json::json!({ "toplevel": p, "drvPath": d, "deployment": { "tags": tags } });
        let json = serde_json::json!({
            "web-1": host(&["web", "edge-eu"]),
            "web-2": host(&["web", "edge-us"]),
            "db-1": host(&["db"]),
            "mon": host(&["monitoring"]),
        });
        Inventory::from_eval_json(crate::source::FleetSource::Nixos, &json.to_string()).unwrap()
    }

    fn select(
        names: &[&str],
        on: &[&str],
        exclude: &[&str],
        all: bool,
    ) -> Result<Vec<String>, String> {
        let words = |w: &[&str]| w.iter().map(|s| s.to_string()).collect();
        let selection = Selection {
            names: words(names),
            tags: words(on),
            exclude: words(exclude),
            all,
        };
        resolve(&fleet(), &selection).map_err(|e| e.to_string())
    }

    #[test]
    fn every_form_of_selection() {
        assert_eq!(select(&[], &[], &[], false).unwrap().len(), 4);
        assert_eq!(select(&["mon"], &[], &[], true).unwrap().len(), 4);
        assert_eq!(
            select(&[], &["web-*"], &[], false).unwrap(),
            ["web-1", "web-2"]
        );
        assert_eq!(
            select(&[], &["@edge-*"], &[], false).unwrap(),
            ["web-1", "web-2"]
        );
        assert_eq!(select(&[], &["@edge-eu"], &[], false).unwrap(), ["web-1"]);
        // Several --on, and lists: the union.
        assert_eq!(
            select(&[], &["@db", "mon"], &[], false).unwrap(),
            ["db-1", "mon"]
        );
        assert_eq!(
            select(&["web-1,@db"], &["mon"], &[], false).unwrap(),
            ["db-1", "mon", "web-1"]
        );
        // Exclusions, from the selection or from everything.
        assert_eq!(
            select(&[], &["@web"], &["web-2"], false).unwrap(),
            ["web-1"]
        );
        assert_eq!(select(&[], &[], &["web-*", "@db"], false).unwrap(), ["mon"]);
    }

    #[test]
    fn a_selector_that_matches_nothing_is_an_error() {
        let e = select(&[], &["api-*"], &[], false).unwrap_err();
        assert!(e.contains("`api-*` matches no host"), "{e}");
        let e = select(&[], &["@edge-ap*"], &[], false).unwrap_err();
        assert!(e.contains("`@edge-ap*` matches no host"), "{e}");
        let e = select(&["web3"], &[], &[], false).unwrap_err();
        assert!(e.contains("unknown host `web3`"), "{e}");
        // A bare word that is a tag says how to select the tag.
        let e = select(&[], &["web"], &[], false).unwrap_err();
        assert!(e.contains("`@web` selects the hosts with that tag"), "{e}");
        let e = select(&[], &["@nope"], &[], false).unwrap_err();
        assert!(e.contains("no host has tag `nope`"), "{e}");
        // An exclusion that matches nothing is a typo too.
        let e = select(&[], &[], &["wbe-*"], false).unwrap_err();
        assert!(e.contains("`wbe-*` matches no host"), "{e}");
        // Excluding everything selected leaves nothing to do.
        let e = select(&[], &["@db"], &["db-*"], false).unwrap_err();
        assert!(e.contains("no host is left"), "{e}");
        // A goal where a host was expected.
        let e = select(&["boot"], &[], &[], false).unwrap_err();
        assert!(
            e.contains(
                "`boot` is a goal, not a host: use `--goal boot` (or `nix-deploy apply boot`)"
            ),
            "{e}"
        );
        // Did you mean: close host names and tags.
        let e = select(&["wbe-2"], &[], &[], false).unwrap_err();
        assert!(e.contains("did you mean `web-2`"), "{e}");
        let e = select(&[], &["@monitorng"], &[], false).unwrap_err();
        assert_eq!(
            e,
            "no host has tag `monitorng`; did you mean `@monitoring`?"
        );
        let e = select(&["a b"], &[], &[], false).unwrap_err();
        assert!(e.contains("`a b`"), "{e}");
    }

    fn selection(names: &[&str], on: &[&str], exclude: &[&str]) -> Selection {
        let words = |w: &[&str]| w.iter().map(|s| s.to_string()).collect();
        Selection {
            names: words(names),
            tags: words(on),
            exclude: words(exclude),
            all: false,
        }
    }

    #[test]
    fn hosts_that_failed_to_evaluate_are_selected_apart() {
        let inventory = fleet();
        let failed: BTreeSet<String> = ["web-3".to_string()].into();
        let resolve = |s: Selection| resolve_partial(&inventory, &failed, &s);
        // Naming only a failed host selects no other.
        assert_eq!(
            resolve(selection(&["web-3"], &[], &[])).unwrap(),
            (vec![], vec!["web-3".to_string()])
        );
        let (chosen, unevaluated) = resolve(selection(&["web-*"], &[], &["web-1"])).unwrap();
        assert_eq!(
            (chosen, unevaluated),
            (vec!["web-2".into()], vec!["web-3".into()])
        );
        let (chosen, unevaluated) = resolve(Selection::default()).unwrap();
        assert_eq!(chosen.len(), 4);
        assert_eq!(unevaluated, ["web-3"]);
        // A tag selector knows only evaluated hosts' tags.
        let (chosen, unevaluated) = resolve(selection(&["@web"], &[], &[])).unwrap();
        assert_eq!(chosen, ["web-1", "web-2"]);
        assert!(unevaluated.is_empty());
        let e = resolve(selection(&["nope"], &[], &[])).unwrap_err();
        assert!(
            e.to_string().contains("web-3"),
            "the known hosts include it: {e}"
        );
    }

    #[test]
    fn a_host_is_picked_early_only_if_its_own_metadata_selects_it() {
        let inventory = fleet();
        let web = inventory.get("web-1").unwrap();
        assert!(may_select(&Selection::default(), web));
        assert!(may_select(&selection(&["web-1"], &[], &[]), web));
        assert!(may_select(&selection(&["w*"], &[], &[]), web));
        assert!(may_select(&selection(&["@edge-*"], &[], &[]), web));
        assert!(may_select(&selection(&[], &["db-1,@web"], &[]), web));
        assert!(!may_select(&selection(&["db-1"], &[], &[]), web));
        assert!(!may_select(&selection(&[], &[], &["@edge-eu"]), web));
        assert!(!may_select(&selection(&["a b"], &[], &[]), web));
    }

    #[test]
    fn a_large_fleet_is_counted_not_listed() {
        let names: Vec<String> = (0..500).map(|i| format!("node-{i:03}")).collect();
        let e = check_names(&selection(&["node-5000"], &[], &[]), &names).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("the fleet has 500 hosts"), "{text}");
        assert!(text.len() < 300, "{text}");
    }

    #[test]
    fn names_are_checked_before_anything_is_evaluated() {
        let names: Vec<String> = ["web-1".into(), "db-1".into()].into();
        assert!(check_names(&selection(&["web-*", "@anything"], &[], &[]), &names).is_ok());
        let e = check_names(&selection(&["wbe-1"], &[], &[]), &names).unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown host `wbe-1`; did you mean `web-1`?; `@wbe-1` selects the hosts with that \
             tag, if it is one (the fleet has: web-1, db-1)"
        );
        let e = check_names(&selection(&[], &[], &["api-*"]), &names).unwrap_err();
        assert!(e.to_string().contains("`api-*` matches no host"), "{e}");
        assert!(uses_tags(&selection(&["web-1"], &[], &["@db"])));
        assert!(!uses_tags(&selection(&["web-1"], &["db-*"], &[])));
    }
}
