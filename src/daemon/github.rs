//! GitHub push webhooks: signature verification (`X-Hub-Signature-256`),
//! push event parsing, and pinning the fleet's flake to the pushed commit so
//! exactly what was pushed is deployed.

use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GithubError {
    #[error("missing X-Hub-Signature-256 header")]
    MissingSignature,
    #[error("malformed signature header (expected `sha256=<hex>`)")]
    MalformedSignature,
    #[error("signature does not match the body")]
    BadSignature,
    #[error("malformed push event: {0}")]
    Malformed(String),
    #[error("`{0}` is not a commit id (40 hex digits)")]
    BadRevision(String),
    #[error("cannot pin `{0}` to a revision (use a github: or git+… flake reference)")]
    Unpinnable(String),
}

/// Check `sha256=<hex>` against HMAC-SHA256(secret, body), in constant time.
pub fn verify_signature(secret: &[u8], body: &[u8], header: &str) -> Result<(), GithubError> {
    if header.is_empty() {
        return Err(GithubError::MissingSignature);
    }
    let hex_part = header
        .strip_prefix("sha256=")
        .ok_or(GithubError::MalformedSignature)?;
    let expected = hex::decode(hex_part).map_err(|_| GithubError::MalformedSignature)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).map_err(|_| GithubError::BadSignature)?;
    mac.update(body);
    // `verify_slice` compares in constant time.
    mac.verify_slice(&expected)
        .map_err(|_| GithubError::BadSignature)
}

/// The parts of a push event we act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushEvent {
    pub git_ref: String,
    pub before: String,
    pub after: String,
    pub deleted: bool,
    pub repository: String,
    pub pusher: String,
    pub head_commit_message: Option<String>,
    /// When the pushed head commit was made (Unix seconds), if given.
    pub head_commit_at: Option<i64>,
}

#[derive(Deserialize)]
struct RawPush {
    #[serde(rename = "ref")]
    git_ref: String,
    #[serde(default)]
    before: String,
    after: String,
    #[serde(default)]
    deleted: bool,
    repository: Option<RawRepository>,
    pusher: Option<RawPusher>,
    head_commit: Option<RawCommit>,
}

#[derive(Deserialize)]
struct RawRepository {
    full_name: String,
}

#[derive(Deserialize)]
struct RawPusher {
    name: String,
}

#[derive(Deserialize)]
struct RawCommit {
    message: Option<String>,
    timestamp: Option<String>,
}

pub fn parse_push(body: &[u8]) -> Result<PushEvent, GithubError> {
    let raw: RawPush =
        serde_json::from_slice(body).map_err(|e| GithubError::Malformed(e.to_string()))?;
    Ok(PushEvent {
        git_ref: raw.git_ref,
        before: raw.before,
        after: raw.after,
        deleted: raw.deleted,
        repository: raw.repository.map(|r| r.full_name).unwrap_or_default(),
        pusher: raw
            .pusher
            .map(|p| p.name)
            .filter(|n| nix_deploy_core::shell::is_valid_user(n))
            .unwrap_or_else(|| "unknown".into()),
        head_commit_at: raw
            .head_commit
            .as_ref()
            .and_then(|c| c.timestamp.as_deref())
            .and_then(|t| {
                time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
            })
            .map(|t| t.unix_timestamp()),
        head_commit_message: raw.head_commit.and_then(|c| c.message),
    })
}

/// `refs/heads/main` → `main`; tags and other refs → `None`.
pub fn branch(git_ref: &str) -> Option<&str> {
    git_ref
        .strip_prefix("refs/heads/")
        .filter(|b| !b.is_empty())
}

fn is_commit(rev: &str) -> bool {
    rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The flake reference pinned to commit `rev`.
pub fn flake_at_revision(flake: &str, rev: &str) -> Result<String, GithubError> {
    if !is_commit(rev) {
        return Err(GithubError::BadRevision(rev.to_string()));
    }
    let rev = rev.to_ascii_lowercase();
    if let Some(rest) = flake.strip_prefix("github:") {
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        if parts.len() < 2 {
            return Err(GithubError::Unpinnable(flake.to_string()));
        }
        parts.truncate(2);
        let query: Vec<&str> = query
            .split('&')
            .filter(|p| !p.is_empty() && !p.starts_with("ref=") && !p.starts_with("rev="))
            .collect();
        let mut pinned = format!("github:{}/{}/{rev}", parts[0], parts[1]);
        if !query.is_empty() {
            pinned.push('?');
            pinned.push_str(&query.join("&"));
        }
        return Ok(pinned);
    }
    if flake.starts_with("git+") {
        let (base, query) = flake.split_once('?').unwrap_or((flake, ""));
        let mut params: Vec<String> = query
            .split('&')
            .filter(|p| !p.is_empty() && !p.starts_with("ref=") && !p.starts_with("rev="))
            .map(str::to_string)
            .collect();
        params.push(format!("rev={rev}"));
        return Ok(format!("{base}?{}", params.join("&")));
    }
    Err(GithubError::Unpinnable(flake.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

    fn sign(secret: &[u8], body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
        mac.update(body);
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    }

    #[test]
    fn verifies_signatures() {
        let body = br#"{"ref":"refs/heads/main"}"#;
        assert_eq!(
            verify_signature(b"s3cret", body, &sign(b"s3cret", body)),
            Ok(())
        );
        assert_eq!(
            verify_signature(b"s3cret", body, &sign(b"other", body)),
            Err(GithubError::BadSignature)
        );
        assert_eq!(
            verify_signature(b"s3cret", b"tampered", &sign(b"s3cret", body)),
            Err(GithubError::BadSignature)
        );
        assert_eq!(
            verify_signature(b"s", body, ""),
            Err(GithubError::MissingSignature)
        );
        assert_eq!(
            verify_signature(b"s", body, "sha1=abc"),
            Err(GithubError::MalformedSignature)
        );
        assert_eq!(
            verify_signature(b"s", body, "sha256=zz"),
            Err(GithubError::MalformedSignature)
        );
    }

    #[test]
    fn parses_pushes_and_branches() {
        let body = serde_json::json!({
            "ref": "refs/heads/main", "before": "0".repeat(40), "after": SHA,
            "repository": { "full_name": "me/fleet" }, "pusher": { "name": "alice" },
            "head_commit": { "message": "bump" }
        })
        .to_string();
        let push = parse_push(body.as_bytes()).unwrap();
        assert_eq!(push.after, SHA);
        assert_eq!(push.repository, "me/fleet");
        assert_eq!(push.pusher, "alice");
        assert!(!push.deleted);
        assert_eq!(branch(&push.git_ref), Some("main"));
        assert_eq!(branch("refs/tags/v1"), None);
        assert!(parse_push(b"{}").is_err());
        assert!(parse_push(b"nope").is_err());
    }

    #[test]
    fn pins_flakes_to_the_commit() {
        assert_eq!(
            flake_at_revision("github:me/fleet", SHA).unwrap(),
            format!("github:me/fleet/{SHA}")
        );
        assert_eq!(
            flake_at_revision("github:me/fleet/main?dir=hosts", SHA).unwrap(),
            format!("github:me/fleet/{SHA}?dir=hosts")
        );
        assert_eq!(
            flake_at_revision("git+https://git.example.org/fleet?ref=main", SHA).unwrap(),
            format!("git+https://git.example.org/fleet?rev={SHA}")
        );
        assert_eq!(
            flake_at_revision("git+file:///srv/fleet", SHA).unwrap(),
            format!("git+file:///srv/fleet?rev={SHA}")
        );
        assert!(matches!(
            flake_at_revision("path:/srv/fleet", SHA),
            Err(GithubError::Unpinnable(_))
        ));
        assert!(matches!(
            flake_at_revision("github:me/fleet", "main"),
            Err(GithubError::BadRevision(_))
        ));
        assert!(flake_at_revision("github:me/fleet", "0123;rm -rf").is_err());
    }
}
