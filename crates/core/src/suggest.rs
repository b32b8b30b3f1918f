//! "Did you mean …?": the closest of the names a word could have meant, for
//! the errors of a mistyped host, tag, goal, Nix setting or command. One
//! measure everywhere (`strsim`'s Jaro-Winkler similarity, which favours a
//! shared beginning, as typos of long names have), one threshold.

/// How similar a word and a name must be to suggest the name.
const THRESHOLD: f64 = 0.8;

/// The names among `candidates` closest to `word`, best first (at most
/// three, none equal to `word`).
pub fn closest<'a, I, S>(word: &str, candidates: I) -> Vec<String>
where
    I: IntoIterator<Item = &'a S>,
    S: AsRef<str> + ?Sized + 'a,
{
    let mut scored: Vec<(f64, String)> = candidates
        .into_iter()
        .map(AsRef::as_ref)
        .filter(|c| *c != word)
        .map(|c| (strsim::jaro_winkler(word, c), c.to_string()))
        .filter(|(score, _)| *score >= THRESHOLD)
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    scored.dedup_by(|a, b| a.1 == b.1);
    scored.into_iter().take(3).map(|(_, name)| name).collect()
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
        assert_eq!(closest("wbe-1", &hosts), ["web-1", "web-2"]);
        assert_eq!(closest("monitorng", &hosts), ["monitoring"]);
        assert!(closest("zzz", &hosts).is_empty());
        assert!(
            closest("web-1", &["web-1"]).is_empty(),
            "not the word itself"
        );
        assert_eq!(
            did_you_mean("monitorng", &hosts, "@"),
            "; did you mean `@monitoring`?"
        );
        assert_eq!(
            did_you_mean("wbe-1", &hosts, ""),
            "; did you mean `web-1` or `web-2`?"
        );
        assert_eq!(did_you_mean("zzz", &hosts, ""), "");
        assert_eq!(closest("swtich", &["switch", "boot", "test"]), ["switch"]);
    }
}
