//! How an error reaches the person at the terminal: the whole chain of
//! causes, each said once (an error whose message already holds its cause's
//! text does not get it appended again), and hints that name the flag to
//! use when a word was misplaced (`deploy boot`, `deploy --parallel 20`) or
//! there is no flake where we looked.

use std::path::Path;

use nix_deploy_core::fleet::InventoryError;

use crate::engine::EngineError;

/// Bad input found by the command line itself (exit 2, nothing touched).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadInput(pub String);

/// `error`'s message and its causes, each once, joined by `: `.
pub fn render(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let message = cause.to_string();
        let message = message.trim_end();
        if message.is_empty() || text.contains(message) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(message);
    }
    text
}

/// The host word of an "unknown host" error, if `error` is one.
fn unknown_host(error: &anyhow::Error) -> Option<&str> {
    match error.downcast_ref::<EngineError>()? {
        EngineError::Inventory(InventoryError::UnknownHost { name, .. }) => Some(name),
        _ => None,
    }
}

/// A hint for a word taken as a host that was meant as something else:
/// `deploy --parallel 20` (a limit is `--parallel-limit`/`-p`; `--parallel`
/// is the strategy). Goals (`deploy boot`) are hinted at by the selection
/// itself, for every caller.
pub fn misplaced_word(error: &anyhow::Error, parallel_given: bool) -> Option<String> {
    let word = unknown_host(error)?;
    (parallel_given && !word.is_empty() && word.chars().all(|c| c.is_ascii_digit())).then(|| {
        format!(
            "`{word}` is not a host: `--parallel` takes no number (it is `--strategy parallel`); \
             to deploy at most {word} hosts at once, write `--parallel-limit {word}` (or `-p {word}`)"
        )
    })
}

/// Where a flake would be found for the default `--flake .`: this directory
/// or one above it (Nix searches upwards too).
pub fn flake_above(dir: &Path) -> bool {
    dir.ancestors().any(|d| d.join("flake.nix").is_file())
}

/// The error for `--flake .` without a flake here.
pub fn no_flake_here(dir: &Path) -> String {
    format!(
        "no flake.nix in {} or above it: run nix-deploy in your fleet's flake, or name it with \
         `--flake PATH|URL` (or NIX_DEPLOY_FLAKE), e.g. `--flake ~/fleet` or `--flake github:me/fleet`",
        dir.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("`nix eval` failed (exit status: 1):\nerror: syntax error")]
    struct Exec;

    #[derive(Debug, thiserror::Error)]
    #[error("evaluating `.#nixosConfigurations` failed: {source}")]
    struct Eval {
        #[source]
        source: Exec,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("reading the fleet")]
    struct Outer(#[source] Eval);

    #[test]
    fn each_cause_is_said_once() {
        let error = anyhow::Error::new(Outer(Eval { source: Exec }));
        let text = render(&error);
        assert_eq!(
            text,
            "reading the fleet: evaluating `.#nixosConfigurations` failed: `nix eval` failed (exit status: 1):\nerror: syntax error"
        );
        assert_eq!(text.matches("syntax error").count(), 1);
        let plain = anyhow::anyhow!("no deployment with id 7");
        assert_eq!(render(&plain), "no deployment with id 7");
    }

    #[test]
    fn a_number_after_parallel_is_a_limit() {
        let error = |name: &str| {
            anyhow::Error::new(EngineError::Inventory(InventoryError::UnknownHost {
                name: name.into(),
                hint: String::new(),
            }))
        };
        let hint = misplaced_word(&error("20"), true).unwrap();
        assert!(hint.contains("--parallel-limit 20"), "{hint}");
        assert!(misplaced_word(&error("20"), false).is_none());
        assert!(misplaced_word(&error("web1"), true).is_none());
    }

    #[test]
    fn a_flake_is_found_here_or_above() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("hosts/web");
        std::fs::create_dir_all(&nested).unwrap();
        assert!(!flake_above(&nested) || Path::new("/flake.nix").is_file());
        std::fs::write(dir.path().join("flake.nix"), "{ }").unwrap();
        assert!(flake_above(&nested));
        assert!(no_flake_here(&nested).contains("--flake"));
    }
}
