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
mod tests;
