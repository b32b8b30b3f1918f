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

/// A short directory for ssh control sockets (their paths are limited to ~100 bytes).
pub fn control_dir() -> anyhow::Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("nix-deploy-")
        .tempdir_in(std::env::temp_dir())
        .context("creating a directory for ssh control sockets")
}
