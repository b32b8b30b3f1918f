//! GC roots on the coordinator: every toplevel a deployment builds for a
//! host, the system the host ran before and the system it boots (when this
//! store has them) are garbage-collector roots, so `nix-collect-garbage` on
//! the coordinator cannot delete what a rollback or a re-copy needs. The
//! host's running system and boot default are never pruned, however many
//! `--goal test` deployments came after them.
//!
//! Layout: `STATE/gcroots/HOST/<store path name>`, a symlink to the store
//! path, registered by `nix-store --realise PATH --add-root LINK` (Nix keeps
//! an indirect root in `/nix/var/nix/gcroots/auto` pointing at it). Each
//! deployment re-creates the link of what it built (and makes the link of
//! what the host ran when it is missing), so their modification times say
//! when a system was last deployed; beyond the
//! [`KEEP`] newest per host (never the two just rooted), links are removed,
//! and Nix forgets a root whose link is gone.
//!
//! `--keep-result` adds `STATE/results/HOST`: the last system built for the
//! host with that flag (by `build`, `apply` or `deploy`), never pruned.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::nix::Nix;

/// Roots kept per host: the newest few deployed systems.
pub const KEEP: usize = 3;

/// What [`protect`] did, for the record.
#[derive(Debug, Default)]
pub(crate) struct Rooted {
    pub rooted: Vec<String>,
    pub pruned: Vec<String>,
}

fn host_dir(state_dir: &Path, host: &str) -> PathBuf {
    state_dir.join("gcroots").join(host)
}

fn link_name(path: &str) -> Option<&str> {
    path.strip_prefix("/nix/store/")
        .filter(|n| !n.contains('/'))
}

/// Root `built`, and what the host runs and boots (`kept`), for `host`,
/// then prune the host's older roots (never those).
pub(crate) async fn protect(
    nix: &Nix,
    state_dir: &Path,
    host: &str,
    built: &str,
    kept: &[&str],
) -> Result<Rooted, String> {
    let dir = host_dir(state_dir, host);
    owner_only_dir(&dir).await?;
    let mut done = Rooted::default();
    let mut keep = Vec::new();
    // What the host has first, so the new one is the newest link.
    let mut paths: Vec<&str> = kept.iter().copied().filter(|p| *p != built).collect();
    paths.dedup();
    paths.push(built);
    for path in paths {
        let Some(name) = link_name(path) else {
            continue;
        };
        // Only what this store holds can be rooted (another machine may
        // have deployed the previous system).
        if tokio::fs::symlink_metadata(path).await.is_err() {
            continue;
        }
        let link = dir.join(name);
        // The system the host ran is usually rooted already (by the
        // deployment that built it): a process start saved.
        let rooted = path != built
            && tokio::fs::read_link(&link)
                .await
                .is_ok_and(|target| target == Path::new(path));
        if !rooted {
            let _ = tokio::fs::remove_file(&link).await;
            nix.add_root(path, &link.to_string_lossy())
                .await
                .map_err(|e| format!("rooting {path}: {e}"))?;
        }
        keep.push(name.to_string());
        done.rooted.push(path.to_string());
    }
    done.pruned = prune(&dir, &keep).await;
    Ok(done)
}

/// `--keep-result`: `STATE/results/HOST`, a GC root of the system last
/// built for `host` with that flag, replaced by the next one (never pruned by
/// deployments; delete it to let Nix collect the system). Returns the link.
pub(crate) async fn keep_result(
    nix: &Nix,
    state_dir: &Path,
    host: &str,
    built: &str,
) -> Result<PathBuf, String> {
    let dir = state_dir.join("results");
    owner_only_dir(&dir).await?;
    let link = dir.join(host);
    let _ = tokio::fs::remove_file(&link).await;
    nix.add_root(built, &link.to_string_lossy())
        .await
        .map_err(|e| format!("rooting {built}: {e}"))?;
    Ok(link)
}

/// Remove all but the [`KEEP`] newest links of `dir` (and those in `keep`).
async fn prune(dir: &Path, keep: &[String]) -> Vec<String> {
    let Ok(mut entries) = tokio::fs::read_dir(dir).await else {
        return Vec::new();
    };
    let mut links: Vec<(SystemTime, String, PathBuf)> = Vec::new();
    while let Ok(Some(entry)) = entries.next_entry().await {
        let path = entry.path();
        let Ok(meta) = tokio::fs::symlink_metadata(&path).await else {
            continue;
        };
        if !meta.file_type().is_symlink() {
            continue;
        }
        let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        let name = entry.file_name().to_string_lossy().into_owned();
        links.push((modified, name, path));
    }
    links.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| b.1.cmp(&a.1)));
    let mut pruned = Vec::new();
    for (index, (_, name, path)) in links.into_iter().enumerate() {
        if index < KEEP || keep.contains(&name) {
            continue;
        }
        if tokio::fs::remove_file(&path).await.is_ok() {
            pruned.push(format!("/nix/store/{name}"));
        }
    }
    pruned
}

/// Create `dir` (and what is missing above it) for its owner only, like the
/// rest of the state directory: never one the next start must tighten.
async fn owner_only_dir(dir: &Path) -> Result<(), String> {
    tokio::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .await
        .map_err(|e| format!("creating {}: {e}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keeps_the_newest_links_and_the_ones_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let name = |i: usize| format!("{}{i}-sys", "a".repeat(31));
        // Created oldest first (later links have later or equal times; equal
        // times are ordered by name, which follows creation order too).
        for i in 0..6 {
            std::os::unix::fs::symlink(format!("/nix/store/{}", name(i)), dir.path().join(name(i)))
                .unwrap();
        }
        let pruned = prune(dir.path(), &[name(0)]).await;
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, [name(0), name(3), name(4), name(5)]);
        assert_eq!(pruned.len(), 2);
        assert_eq!(link_name("/nix/store/abc-x"), Some("abc-x"));
        assert_eq!(link_name("/tmp/x"), None);
    }
}
