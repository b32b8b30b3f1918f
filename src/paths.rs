//! Where things live on the coordinator: the state directory (owner-only)
//! and the short directory for ssh control sockets.

use std::path::{Path, PathBuf};

use anyhow::Context;

/// `$XDG_STATE_HOME/nix-deploy`, or `/var/lib/nix-deploy` for root.
pub fn default_state_dir() -> PathBuf {
    if current_uid() == 0 {
        return PathBuf::from("/var/lib/nix-deploy");
    }
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("nix-deploy");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    PathBuf::from(home).join(".local/state/nix-deploy")
}

/// Create the state directory owner-only (0700), or make an existing one
/// so: it holds the history, whose exec output may carry anything a host
/// printed, and whose SQLite WAL is plain text. Below it, directories become
/// 0700 and files lose every permission of group and others (symlinks, GC
/// roots among them, are left alone). Returns one line per path it had to
/// tighten, for the caller to say.
pub fn secure_state_dir(dir: &Path) -> std::io::Result<Vec<String>> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mut tightened = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path)?;
        let mode = meta.permissions().mode() & 0o7777;
        let wanted = if meta.is_dir() {
            for entry in std::fs::read_dir(&path)? {
                stack.push(entry?.path());
            }
            0o700
        } else if meta.is_file() {
            mode & !0o077
        } else {
            continue;
        };
        if mode != wanted {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(wanted))?;
            tightened.push(format!(
                "{} was readable by others ({mode:04o}); it is now {wanted:04o}",
                path.display()
            ));
        }
    }
    Ok(tightened)
}

/// Our effective uid: the owner of `/proc/self` (no unsafe needed).
pub fn current_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(u32::MAX)
}

/// A short directory for ssh control sockets (their paths are limited to
/// ~100 bytes), named after the process's `holder` so that what a killed
/// process leaves can be found: see [`clean_control_dirs`].
pub fn control_dir(holder: &str) -> anyhow::Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(&format!("nix-deploy-{holder}-"))
        .tempdir_in(std::env::temp_dir())
        .context("creating a directory for ssh control sockets")
}

/// Stop the ssh control masters that killed coordinators (`dead` holders)
/// left running, and remove their directories.
pub async fn clean_control_dirs(dead: &[String]) {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("nix-deploy-") else {
            continue;
        };
        if !dead.iter().any(|h| rest.starts_with(&format!("{h}-"))) {
            continue;
        }
        let dir = entry.path();
        for socket in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            // `-O exit` asks the master behind the socket to stop.
            let cmd = crate::process::Cmd::new("ssh")
                .arg("-o")
                .arg(format!("ControlPath={}", socket.path().display()))
                .args(["-O", "exit", "nix-deploy-stale-master"]);
            let _ = crate::process::run(&cmd, std::time::Duration::from_secs(5), |_, _| {}).await;
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path)
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    }

    #[test]
    fn the_state_directory_is_owner_only_and_says_what_it_tightened() {
        let base = tempfile::tempdir().unwrap();
        let state = base.path().join("state");
        assert_eq!(secure_state_dir(&state).unwrap(), Vec::<String>::new());
        assert_eq!(mode(&state), 0o700);
        // What an older version left: a world-readable directory, database
        // and WAL, a subdirectory, and a GC root (a symlink, left alone).
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
        for file in ["nix-deploy.db", "nix-deploy.db-wal", "locks/a.lock"] {
            let path = state.join(file);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, "x").unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        std::fs::set_permissions(state.join("locks"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        let target = base.path().join("store-path");
        std::fs::write(&target, "x").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o444)).unwrap();
        std::os::unix::fs::symlink(&target, state.join("root")).unwrap();
        let said = secure_state_dir(&state).unwrap();
        assert_eq!(said.len(), 5, "{said:#?}");
        assert!(
            said.iter()
                .any(|l| l
                    .contains("nix-deploy.db-wal was readable by others (0644); it is now 0600")),
            "{said:#?}"
        );
        for (path, wanted) in [
            ("", 0o700),
            ("nix-deploy.db", 0o600),
            ("nix-deploy.db-wal", 0o600),
            ("locks", 0o700),
            ("locks/a.lock", 0o600),
        ] {
            assert_eq!(mode(&state.join(path)), wanted, "{path}");
        }
        assert_eq!(mode(&target), 0o444, "a symlink's target is not ours");
        assert_eq!(secure_state_dir(&state).unwrap(), Vec::<String>::new());
    }
}
