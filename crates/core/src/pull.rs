//! Pull mode, for fleets without webhooks: the git remote behind a flake
//! reference, the `git ls-remote` that asks it where a branch points, and
//! its answer. Pure; the daemon's watch runs the command and decides.

use crate::command::Cmd;

/// A branch name we are willing to pass to git: the safe part of
/// `git check-ref-format`.
pub fn is_valid_branch(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && !name.starts_with(['-', '/', '.'])
        && !name.ends_with(['/', '.'])
        && !name.ends_with(".lock")
        && !name.contains("..")
        && !name.contains("//")
        && !name.contains("/.")
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'))
}

/// The git remote of a flake reference: `github:o/r` and `gitlab:o/r` are
/// their HTTPS repositories, `git+URL` is the URL without its query.
pub fn git_remote(flake: &str) -> Result<String, String> {
    let not_git = || {
        format!(
            "`{flake}` is not a git flake (pull mode needs github:, gitlab: or git+https/ssh/file references)"
        )
    };
    let base = flake.split(['?', '#']).next().unwrap_or("");
    let forge = |prefix: &str, host: &str| -> Option<Result<String, String>> {
        let rest = base.strip_prefix(prefix)?;
        let mut parts = rest.split('/');
        let (owner, repo) = (parts.next()?, parts.next()?);
        let valid = |s: &str| {
            !s.is_empty()
                && !s.starts_with(['-', '.'])
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        };
        Some(if valid(owner) && valid(repo) {
            Ok(format!("https://{host}/{owner}/{repo}.git"))
        } else {
            Err(not_git())
        })
    };
    if let Some(remote) = forge("github:", "github.com") {
        return remote;
    }
    if let Some(remote) = forge("gitlab:", "gitlab.com") {
        return remote;
    }
    let url = base.strip_prefix("git+").ok_or_else(not_git)?;
    let allowed = ["https://", "http://", "ssh://", "file://"];
    if !allowed.iter().any(|p| url.starts_with(p))
        || url.len() <= "file://".len()
        || url.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(not_git());
    }
    Ok(url.to_string())
}

/// `git ls-remote REMOTE refs/heads/BRANCH`, never prompting (no terminal
/// prompt, ssh in batch mode).
pub fn ls_remote_command(remote: &str, branch: &str) -> Cmd {
    Cmd::new("git")
        .args([
            "-c",
            "core.sshCommand=ssh -o BatchMode=yes",
            "ls-remote",
            "--heads",
            remote,
        ])
        .arg(format!("refs/heads/{branch}"))
        .env("GIT_TERMINAL_PROMPT", "0")
}

/// The commit `refs/heads/BRANCH` points at, from `git ls-remote`'s output.
pub fn parse_ls_remote(stdout: &str, branch: &str) -> Result<String, String> {
    let wanted = format!("refs/heads/{branch}");
    for line in stdout.lines() {
        let mut fields = line.split_whitespace();
        let (Some(commit), Some(name)) = (fields.next(), fields.next()) else {
            continue;
        };
        if name != wanted {
            continue;
        }
        let hex = commit.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex || !(commit.len() == 40 || commit.len() == 64) {
            return Err(format!("`{commit}` is not a commit id"));
        }
        return Ok(commit.to_ascii_lowercase());
    }
    Err(format!("the remote has no branch `{branch}`"))
}

/// When the commit a flake's metadata describes was made (Unix seconds):
/// `lastModified` of `nix flake metadata --json`.
pub fn last_modified(metadata_json: &str) -> Option<i64> {
    let meta: serde_json::Value = serde_json::from_str(metadata_json).ok()?;
    meta.get("lastModified")
        .or_else(|| meta.get("locked").and_then(|l| l.get("lastModified")))
        .and_then(serde_json::Value::as_i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

    #[test]
    fn branches() {
        for good in ["main", "release/2024.05", "feature_x-1"] {
            assert!(is_valid_branch(good), "{good}");
        }
        for bad in [
            "", "-x", "/x", "x/", "a..b", "a//b", "x.lock", "a b", "a;b", "$(x)", ".x", "a/.b",
        ] {
            assert!(!is_valid_branch(bad), "{bad}");
        }
    }

    #[test]
    fn remotes_of_flake_references() {
        assert_eq!(
            git_remote("github:me/fleet").unwrap(),
            "https://github.com/me/fleet.git"
        );
        assert_eq!(
            git_remote("github:me/fleet/main?dir=hosts").unwrap(),
            "https://github.com/me/fleet.git"
        );
        assert_eq!(
            git_remote("gitlab:me/fleet").unwrap(),
            "https://gitlab.com/me/fleet.git"
        );
        assert_eq!(
            git_remote("git+https://git.example.org/fleet?ref=main").unwrap(),
            "https://git.example.org/fleet"
        );
        assert_eq!(
            git_remote("git+ssh://git@example.org/fleet.git").unwrap(),
            "ssh://git@example.org/fleet.git"
        );
        assert_eq!(
            git_remote("git+file:///srv/fleet").unwrap(),
            "file:///srv/fleet"
        );
        for bad in [
            ".",
            "path:/srv/fleet",
            "/srv/fleet",
            "github:me",
            "github:-x/y",
            "git+ftp://x/y",
            "git+file://",
            "git+https://a b",
        ] {
            assert!(git_remote(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ls_remote_is_an_argument_vector_and_its_answer_is_checked() {
        let cmd = ls_remote_command("file:///srv/fleet", "main");
        assert_eq!(cmd.program(), "git");
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args[3..],
            ["--heads", "file:///srv/fleet", "refs/heads/main"]
        );
        assert_eq!(cmd.get_env("GIT_TERMINAL_PROMPT"), Some("0"));
        let out = format!(
            "{SHA}\trefs/heads/main-old\n{}\trefs/heads/main\n",
            SHA.to_uppercase()
        );
        assert_eq!(parse_ls_remote(&out, "main").unwrap(), SHA);
        assert!(
            parse_ls_remote("", "main")
                .unwrap_err()
                .contains("no branch")
        );
        assert!(parse_ls_remote("xyz\trefs/heads/main\n", "main").is_err());
        assert_eq!(
            last_modified(r#"{"lastModified": 1700000000}"#),
            Some(1_700_000_000)
        );
        assert_eq!(last_modified(r#"{"locked": {"lastModified": 5}}"#), Some(5));
        assert_eq!(last_modified("{}"), None);
    }
}
