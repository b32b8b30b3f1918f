//! Whether the coordinator behind a deployment or a lease still runs.
//!
//! Each process that opens the history holds an exclusive `flock` on a file
//! of its own, `locks/<holder>.lock` in the state directory, for as long as it
//! lives; the kernel drops the lock when the process ends, however it ends.
//! A holder is alive exactly when its lock is still held: no pid reuse, no
//! guessing from command lines (a coordinator run through a symlink or a
//! wrapper is as alive as any).

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};

use super::StoreError;

/// The lock this process holds while its store is open.
#[derive(Debug)]
pub(super) struct ProcessLock {
    holder: String,
    path: PathBuf,
    _file: File,
}

fn locks_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("locks")
}

fn lock_path(state_dir: &Path, holder: &str) -> PathBuf {
    locks_dir(state_dir).join(format!("{holder}.lock"))
}

impl ProcessLock {
    pub fn acquire(state_dir: &Path) -> Result<Self, StoreError> {
        let dir = locks_dir(state_dir);
        let create = |source| StoreError::CreateDir {
            path: dir.clone(),
            source,
        };
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(create)?;
        }
        let holder = uuid::Uuid::new_v4().simple().to_string();
        let path = lock_path(state_dir, &holder);
        let file = {
            use std::os::unix::fs::OpenOptionsExt;
            OpenOptions::new()
                .create_new(true)
                .write(true)
                .mode(0o600)
                .open(&path)
                .map_err(create)?
        };
        file.lock().map_err(create)?;
        Ok(ProcessLock {
            holder,
            path,
            _file: file,
        })
    }

    pub fn holder(&self) -> &str {
        &self.holder
    }
}

impl Drop for ProcessLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Whether `holder`'s process still runs (holds its lock).
pub(super) fn alive(state_dir: &Path, holder: &str) -> bool {
    // Holders are our own uuids; anything else names no lock.
    if holder.is_empty() || !holder.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return false;
    }
    let Ok(file) = File::open(lock_path(state_dir, holder)) else {
        return false;
    };
    match file.try_lock_shared() {
        Err(TryLockError::WouldBlock) => true,
        // We got it: nobody holds it any more. (Dropping the file unlocks.)
        Ok(()) => false,
        // Cannot tell (an odd file system): do not declare anyone dead.
        Err(TryLockError::Error(_)) => true,
    }
}

/// Remove the lock files of processes that are gone; returns their holders
/// (what they left elsewhere can be cleaned up too).
pub(super) fn remove_dead(state_dir: &Path) -> Vec<String> {
    let mut dead = Vec::new();
    let Ok(entries) = std::fs::read_dir(locks_dir(state_dir)) else {
        return dead;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(holder) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".lock"))
        else {
            continue;
        };
        if !alive(state_dir, holder) {
            dead.push(holder.to_string());
            let _ = std::fs::remove_file(&path);
        }
    }
    dead
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lock_is_alive_and_a_released_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let lock = ProcessLock::acquire(dir.path()).unwrap();
        let holder = lock.holder().to_string();
        assert!(alive(dir.path(), &holder));
        assert!(!alive(dir.path(), "0123abcd"));
        assert!(!alive(dir.path(), "../etc/passwd"));
        drop(lock);
        assert!(!alive(dir.path(), &holder));
    }

    #[test]
    fn dead_locks_are_cleaned_up_and_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let live = ProcessLock::acquire(dir.path()).unwrap();
        // A lock file left by a process that died: present, not held.
        std::fs::write(lock_path(dir.path(), "deadbeef"), "").unwrap();
        assert_eq!(remove_dead(dir.path()), ["deadbeef"]);
        assert!(!lock_path(dir.path(), "deadbeef").exists());
        assert!(lock_path(dir.path(), live.holder()).exists());
    }
}
