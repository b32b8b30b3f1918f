//! Where things live on the coordinator: the state directory and the short
//! directory for ssh control sockets.

use std::path::PathBuf;

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
