//! "Did you mean …?": the closest of the names a word could have meant, for
//! the errors of a mistyped host, tag, goal, Nix setting or command. One
//! measure everywhere (`strsim`): a name within a small edit distance
//! (optimal string alignment, so `wbe` is one swap from `web`), or, for long
//! names, a high Jaro-Winkler similarity (which favours a shared beginning).

/// Jaro-Winkler similarity above which a long name is suggested.
const SIMILARITY: f64 = 0.85;

/// Edits a word of `len` characters may be away from a suggestion: none for
/// one character (every one-letter name would match), then one per four.
fn allowed_edits(len: usize) -> usize {
    if len <= 1 { 0 } else { (len / 4).max(1) }
}

/// The names among `candidates` closest to `word`, best first (at most
/// three, none equal to `word`).
pub fn closest<'a, I, S>(word: &str, candidates: I) -> Vec<String>
where
    I: IntoIterator<Item = &'a S>,
    S: AsRef<str> + ?Sized + 'a,
{
    let edits = allowed_edits(word.chars().count());
    let mut scored: Vec<(usize, f64, String)> = candidates
        .into_iter()
        .map(AsRef::as_ref)
        .filter(|c| *c != word)
        .map(|c| {
            (
                strsim::osa_distance(word, c),
                strsim::jaro_winkler(word, c),
                c.to_string(),
            )
        })
        .filter(|(distance, similarity, _)| {
            *distance <= edits || (word.chars().count() > 4 && *similarity >= SIMILARITY)
        })
        .collect();
    scored.sort_by(|a, b| {
        a.0.cmp(&b.0)
            .then_with(|| b.1.total_cmp(&a.1))
            .then_with(|| a.2.cmp(&b.2))
    });
    scored.dedup_by(|a, b| a.2 == b.2);
    scored
        .into_iter()
        .take(3)
        .map(|(_, _, name)| name)
        .collect()
}

/// `; did you mean `a` or `b`?` (with `prefix` before each name, e.g. `@`
/// for tags), or nothing when no name is close.
pub fn did_you_mean<'a, I, S>(word: &str, candidates: I, prefix: &str) -> String
where
    I: IntoIterator<Item = &'a S>,
    S: AsRef<str> + ?Sized + 'a,
{
    let names: Vec<String> = closest(word, candidates)
        .into_iter()
        .map(|n| format!("`{prefix}{n}`"))
        .collect();
    match names.as_slice() {
        [] => String::new(),
        [one] => format!("; did you mean {one}?"),
        [init @ .., last] => format!("; did you mean {} or {last}?", init.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_names_only() {
        let hosts = ["web-1", "web-2", "db-1", "monitoring"];
        assert_eq!(closest("wbe-1", &hosts)[0], "web-1");
        assert_eq!(closest("monitorng", &hosts), ["monitoring"]);
        assert!(closest("zzz", &hosts).is_empty());
        assert!(
            closest("web-1", &["web-1"]).is_empty(),
            "not the word itself"
        );
        assert_eq!(closest("wbe", &["web", "db"]), ["web"]);
        assert_eq!(closest("bb", &["a", "b", "c"]), ["b"]);
        assert!(
            closest("x", &["a", "b"]).is_empty(),
            "one letter is not a typo"
        );
        assert_eq!(closest("max-jbos", &["max-jobs", "cores"]), ["max-jobs"]);
        assert_eq!(
            did_you_mean("monitorng", &hosts, "@"),
            "; did you mean `@monitoring`?"
        );
        assert_eq!(did_you_mean("zzz", &hosts, ""), "");
        assert_eq!(closest("swtich", &["switch", "boot", "test"]), ["switch"]);
    }
}
