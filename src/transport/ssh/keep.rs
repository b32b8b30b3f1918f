//! Masters kept between runs: each live master is recorded in an
//! owner-only directory of the state directory and resumed by the next run
//! (or the daemon's next deployment), so a repeated `plan` or `deploy` pays
//! no SSH handshake. A kept master exits by itself after being idle for the
//! keep-alive time (ssh's `ControlPersist`), and a record whose master is
//! gone is removed when found.
//!
//! A record is named after where the ssh configuration really sends a host
//! ([`super::identity::Destination`], from `ssh -G`), never after the words
//! of the configuration: once a wrong `HostName` is corrected, the host
//! gets a master to the machine the configuration now names. It also holds
//! the identity of the machine behind the master, checked against the
//! host's before the master is used for it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use openssh::Session;

use super::identity::Destination;

/// Masters kept between runs ([`super::Connection::connect`]).
#[derive(Clone, Debug)]
pub struct KeepAlive {
    /// Owner-only; holds one record per destination and the masters' sockets.
    pub dir: PathBuf,
    /// A kept master exits after this long without a session.
    pub idle: Duration,
}

/// The longest control directory whose sockets fit the kernel's 107
/// bytes: ssh binds `DIR/.ssh-connectionXXXXXX/master` first under a name
/// 17 bytes longer (`master.` + 16 random characters), then renames it.
pub(super) const MAX_KEEP_DIR: usize = 107 - "/.ssh-connectionXXXXXX/master.XXXXXXXXXXXXXXXX".len();

/// A live kept master and the identity of the machine behind it.
pub(super) struct Kept {
    pub session: Session,
    pub identity: Option<String>,
}

impl KeepAlive {
    /// Keep masters in `dir` (created owner-only) for `idle`; `None` when
    /// `idle` is zero. A directory whose path is too long for a socket is
    /// an error (the caller connects anew each run, and says why).
    pub fn new(dir: PathBuf, idle: Duration) -> std::io::Result<Option<Self>> {
        if idle.is_zero() {
            return Ok(None);
        }
        let too_long = |dir: &Path| {
            std::io::Error::other(format!(
                "{} is longer than the {MAX_KEEP_DIR} bytes an ssh control socket's directory may have",
                dir.display()
            ))
        };
        if dir.as_os_str().len() > MAX_KEEP_DIR {
            return Err(too_long(&dir));
        }
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        // An existing directory is made owner-only too: whoever can reach a
        // master's socket can run commands as us on the host.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        // Canonical, so that what a record points at is compared with the
        // directory itself, not with another spelling of it.
        let dir = dir.canonicalize()?;
        if dir.as_os_str().len() > MAX_KEEP_DIR {
            return Err(too_long(&dir));
        }
        let keep = KeepAlive { dir, idle };
        keep.sweep();
        Ok(Some(keep))
    }

    /// The record of the master for `destination`.
    pub(super) fn record(&self, destination: &Destination) -> PathBuf {
        self.dir.join(format!("{}.master", destination.key()))
    }

    /// A live master recorded at `record`, or `None` (and the stale record
    /// and its directory removed).
    pub(super) async fn resume(&self, record: &Path) -> Option<Kept> {
        let text = std::fs::read_to_string(record).ok()?;
        let mut lines = text.lines();
        let ctl = PathBuf::from(lines.next()?.trim());
        let identity = lines
            .next()
            .map(str::trim)
            .filter(|i| !i.is_empty())
            .map(str::to_string);
        // Only sockets in a master's directory of our own: the record could
        // be stale or tampered with, and we must neither talk to anyone
        // else's master nor remove anything outside our directory.
        let ours = self.master_dir(&ctl);
        if ours.is_some() {
            // The path as recorded: the canonical one may be too long for a
            // socket.
            let session = Session::resume_mux(ctl.clone().into_boxed_path(), None);
            if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(2), session.check()).await
            {
                return Some(Kept { session, identity });
            }
        }
        let _ = std::fs::remove_file(record);
        if let Some(dir) = ours {
            let _ = std::fs::remove_dir_all(dir);
        }
        None
    }

    /// The directory of the master whose socket is `ctl`, when it is one
    /// of ours: `ctl` is `<dir>/master` and `<dir>` is a real directory
    /// named `.ssh-connection*` directly in [`KeepAlive::dir`], compared
    /// after resolving `..` and symlinks (canonical paths).
    fn master_dir(&self, ctl: &Path) -> Option<PathBuf> {
        if ctl.file_name()? != "master" {
            return None;
        }
        let parent = ctl.parent()?;
        let named_ours = parent
            .file_name()?
            .to_str()
            .is_some_and(|n| n.starts_with(".ssh-connection"));
        let is_dir = std::fs::symlink_metadata(parent).ok()?.is_dir();
        let dir = std::fs::canonicalize(parent).ok()?;
        (named_ours && is_dir && dir.parent() == Some(self.dir.as_path())).then_some(dir)
    }

    /// Remember `session`'s master (to the machine `identity`) for the next
    /// run. Owner-only, like everything in the state directory: the record,
    /// and the master's directory (the openssh crate makes it 0755).
    pub(super) fn remember(&self, record: &Path, session: &Session, identity: Option<&str>) {
        use std::io::Write;
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        if let Some(dir) = session.control_socket().parent() {
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        }
        let tmp = record.with_extension("tmp");
        let text = format!(
            "{}\n{}\n",
            session.control_socket().display(),
            identity.unwrap_or_default()
        );
        let _ = std::fs::remove_file(&tmp);
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut file| file.write_all(text.as_bytes()));
        if written.is_ok() {
            let _ = std::fs::rename(&tmp, record);
        }
    }

    /// Remove what masters that exited (idle, or their host went away)
    /// left behind: a master's directory without its socket, older than a
    /// connection attempt can take, and records pointing nowhere.
    fn sweep(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(".ssh-connection") {
                let old = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > Duration::from_secs(120));
                if old && !path.join("master").exists() {
                    let _ = std::fs::remove_dir_all(&path);
                }
            } else if name.ends_with(".master") {
                let socket = std::fs::read_to_string(&path)
                    .ok()
                    .and_then(|t| t.lines().next().map(|l| PathBuf::from(l.trim())));
                if !socket.is_some_and(|s| s.exists()) {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_masters_live_in_an_owner_only_directory_short_enough_for_sockets() {
        use std::os::unix::fs::PermissionsExt;
        let base = tempfile::tempdir().unwrap();
        let minute = Duration::from_secs(60);
        assert!(
            KeepAlive::new(base.path().join("ssh"), Duration::ZERO)
                .unwrap()
                .is_none()
        );
        let keep = KeepAlive::new(base.path().join("ssh"), minute)
            .unwrap()
            .expect("kept");
        let mode = std::fs::metadata(&keep.dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let long = base.path().join("x".repeat(MAX_KEEP_DIR));
        let e = KeepAlive::new(long, minute).unwrap_err();
        assert!(e.to_string().contains("control socket"), "{e}");
        // The longest allowed directory still fits ssh's temporary name.
        assert!(MAX_KEEP_DIR + "/.ssh-connectionXXXXXX/master.XXXXXXXXXXXXXXXX".len() <= 107);
    }

    #[tokio::test]
    async fn a_tampered_record_never_leads_outside_our_directory() {
        let state = tempfile::tempdir().unwrap();
        std::fs::write(state.path().join("nix-deploy.db"), "history").unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir(outside.path().join("x")).unwrap();
        let keep = KeepAlive::new(state.path().join("ssh"), Duration::from_secs(60))
            .unwrap()
            .expect("kept");
        let record = keep.dir.join("0123.master");
        // `ssh/../x`: lexically "inside", really the state directory itself.
        // A symlink named like a master's directory, pointing elsewhere.
        std::os::unix::fs::symlink(
            outside.path().join("x"),
            keep.dir.join(".ssh-connectionLINK"),
        )
        .unwrap();
        for pointing_at in [
            keep.dir.join("..").join("x"),
            keep.dir.join("..").join("ssh").join(".."),
            keep.dir.join(".ssh-connectionLINK").join("master"),
        ] {
            std::fs::write(&record, format!("{}\n", pointing_at.display())).unwrap();
            assert!(keep.resume(&record).await.is_none());
            assert!(!record.exists(), "the stale record is removed");
            assert!(
                state.path().join("nix-deploy.db").exists(),
                "{}: the state directory survives",
                pointing_at.display()
            );
            assert!(outside.path().join("x").exists());
        }
        // A stale master of ours: its directory goes with the record.
        let ours = keep.dir.join(".ssh-connectionABCDEF");
        std::fs::create_dir(&ours).unwrap();
        std::fs::write(&record, format!("{}\n", ours.join("master").display())).unwrap();
        assert!(keep.resume(&record).await.is_none());
        assert!(!ours.exists() && !record.exists());
        assert!(keep.dir.exists());
    }

    #[tokio::test]
    async fn a_record_pointing_outside_the_directory_is_removed_and_nothing_else() {
        let base = tempfile::tempdir().unwrap();
        let keep = KeepAlive::new(base.path().join("ssh"), Duration::from_secs(60))
            .unwrap()
            .expect("kept");
        let precious = base.path().join("precious");
        std::fs::create_dir_all(&precious).unwrap();
        std::fs::write(precious.join("file"), "keep me").unwrap();
        // `ssh/../precious/master`: its parent's parent *spelled* as the
        // directory's parent, which resolves outside it.
        for socket in [
            keep.dir.join("..").join("precious").join("master"),
            keep.dir.join(".ssh-connection1/../../precious/master"),
        ] {
            let record = keep.dir.join("x.master");
            std::fs::write(&record, format!("{}\n", socket.display())).unwrap();
            assert!(keep.resume(&record).await.is_none());
            assert!(!record.exists(), "the stale record is removed");
            assert!(
                precious.join("file").exists(),
                "{socket:?} removed a directory"
            );
        }
        assert!(keep.dir.exists());
    }
}
