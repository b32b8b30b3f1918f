//! Secrets that never touch the store: `deployment.keys`, uploaded over the
//! host's existing SSH connection, on stdin, by a fixed script that writes
//! each key atomically with its owner and mode ([`nix_deploy_core::keys`]).
//!
//! A key's contents are read only when it is uploaded, into a
//! [`Secret`]: `text` from one evaluation of the texts of the hosts that have
//! any (never part of the fleet's evaluation), `keyFile` from the
//! coordinator's file system, `keyCommand` through [`crate::process`]. They
//! go to the host's stdin and nowhere else: not on a command line, not in
//! the history, an event, a log line or `--json`.
//!
//! When: pre-activation keys before the activation, post-activation keys
//! after it, every key again after a reboot (`/run/keys` is a tmpfs), and
//! every key of the selected hosts with `nix-deploy upload-keys`. A
//! deployment's uploads keep what they replace for the way back
//! ([`super::keys_back`]); `upload-keys`, which changes no system, keeps
//! nothing.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::sync::OnceCell;

use nix_deploy_core::fleet::HostMeta;
use nix_deploy_core::keys::{self, Keep, Key, KeySource, Secret};
use nix_deploy_core::source::FleetSource;

use crate::nix::Nix;
use crate::process::Cmd;
use crate::transport::ssh::{Connection, SshError};

/// How long reading one key (a file, a command) may take.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// How long writing one key on a host may take.
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(60);
/// The largest key accepted: keys are passwords, tokens and certificates.
const MAX_KEY_BYTES: usize = 1024 * 1024;

/// Host → key attribute → contents.
type Texts = BTreeMap<String, BTreeMap<String, Secret>>;

/// The `text` keys of one run's hosts, evaluated once, the first time a
/// host needs one (never before: a run whose hosts never upload a key never
/// evaluates them).
pub(crate) struct KeyTexts {
    flake: String,
    source: FleetSource,
    nix: Nix,
    /// The hosts of this run with a `text` key.
    hosts: Vec<String>,
    texts: OnceCell<Result<Texts, String>>,
}

impl KeyTexts {
    pub fn new(flake: &str, source: FleetSource, nix: &Nix, hosts: &[&HostMeta]) -> Self {
        KeyTexts {
            flake: flake.to_string(),
            source,
            nix: nix.clone(),
            hosts: hosts
                .iter()
                .filter(|h| h.keys.iter().any(|k| k.source == KeySource::Text))
                .map(|h| h.name.clone())
                .collect(),
            texts: OnceCell::new(),
        }
    }

    /// For runs that upload no keys.
    pub fn none() -> Self {
        KeyTexts::new("", FleetSource::default(), &Nix::default(), &[])
    }

    async fn text(&self, host: &str, key: &Key) -> Result<Secret, String> {
        let texts = self
            .texts
            .get_or_init(|| async {
                self.nix
                    .key_texts(&self.flake, self.source, &self.hosts)
                    .await
                    .map_err(|e| e.to_string())
            })
            .await
            .as_ref()
            .map_err(|e| format!("reading the texts of deployment.keys: {e}"))?;
        texts
            .get(host)
            .and_then(|keys| keys.get(&key.attr))
            .cloned()
            .ok_or_else(|| format!("deployment.keys.{} has no text any more", key.attr))
    }
}

/// The contents of `key`, read now, never more than [`MAX_KEY_BYTES`] (+1
/// to know it is too large): a key file must be a regular file, a key
/// command is stopped (with everything it started) once it printed too much.
async fn read(texts: &KeyTexts, host: &str, key: &Key) -> Result<Secret, String> {
    let too_large = || format!("larger than {MAX_KEY_BYTES} bytes, the most a key may have");
    let secret = match &key.source {
        KeySource::Text => texts.text(host, key).await?,
        KeySource::File(path) => read_key_file(path, MAX_KEY_BYTES).await?,
        KeySource::Command(argv) => {
            let cmd = Cmd::new(argv[0].clone()).args(argv[1..].iter().cloned());
            let bytes = crate::process::run_bytes(&cmd, READ_TIMEOUT, MAX_KEY_BYTES)
                .await
                .map_err(|e| match e {
                    crate::process::ExecError::TooLarge { .. } => {
                        format!("keyCommand printed {}; it was stopped", too_large())
                    }
                    e => format!("keyCommand: {e}"),
                })?;
            Secret::new(bytes)
        }
    };
    if secret.len() > MAX_KEY_BYTES {
        return Err(format!("the key is {}", too_large()));
    }
    Ok(secret)
}

/// A `keyFile`'s contents: a regular file (symlinks followed) of at most
/// `limit` bytes. Anything else is refused before a byte is read: a FIFO
/// would wait for a writer forever (holding the run's leases), a device
/// like `/dev/zero` never ends. The file is opened without blocking and
/// checked again once open, so swapping it meanwhile cannot make us wait.
async fn read_key_file(path: &str, limit: usize) -> Result<Secret, String> {
    use std::io::Read;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let not_regular = |path: &str, kind: std::fs::FileType| {
        let what = if kind.is_fifo() {
            "a FIFO (named pipe)"
        } else if kind.is_char_device() {
            "a character device"
        } else if kind.is_block_device() {
            "a block device"
        } else if kind.is_socket() {
            "a socket"
        } else if kind.is_dir() {
            "a directory"
        } else {
            "not a file"
        };
        format!("keyFile {path} is {what}, not a regular file")
    };
    let owned = path.to_string();
    let work = tokio::task::spawn_blocking(move || {
        let path = owned.as_str();
        let failed = |e: std::io::Error| format!("keyFile {path}: {e}");
        let kind = std::fs::metadata(path).map_err(failed)?.file_type();
        if !kind.is_file() {
            return Err(not_regular(path, kind));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
            .open(path)
            .map_err(failed)?;
        let kind = file.metadata().map_err(failed)?.file_type();
        if !kind.is_file() {
            return Err(not_regular(path, kind));
        }
        let mut bytes = Vec::new();
        file.take(limit as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(failed)?;
        if bytes.len() > limit {
            return Err(format!(
                "keyFile {path} is larger than {limit} bytes, the most a key may have"
            ));
        }
        Ok(Secret::new(bytes))
    });
    match tokio::time::timeout(READ_TIMEOUT, work).await {
        Ok(Ok(read)) => read,
        Ok(Err(e)) => Err(format!("keyFile {path}: {e}")),
        Err(_) => Err(format!(
            "keyFile {path}: not read within {}s",
            READ_TIMEOUT.as_secs()
        )),
    }
}

/// Upload `keys` to `host` over `connection`, keeping what they replace as
/// `keep` says; `done` gets one line per key uploaded (where it went, owner
/// and mode, warnings; never its contents), also when a later key fails.
///
/// `require_ownership`: fail when the key's user or group does not exist
/// (false only before the first activation of a system that may create them).
pub(crate) async fn upload(
    connection: &Connection,
    texts: &KeyTexts,
    host: &HostMeta,
    keys: &[&Key],
    require_ownership: bool,
    keep: Keep<'_>,
    done: &mut Vec<String>,
) -> Result<(), String> {
    for key in keys {
        let secret = read(texts, &host.name, key)
            .await
            .map_err(|e| format!("{}: keys: {}: {e}", host.name, key.attr))?;
        // Length and hash go with it: a cut-off upload is refused on the
        // host and the old key stays.
        let input = keys::upload_input(&secret);
        drop(secret);
        let output = connection
            .run_with_stdin(
                "keys",
                &keys::upload_argv(key, require_ownership, &keep),
                input.expose(),
                UPLOAD_TIMEOUT,
            )
            .await
            .map_err(|e| upload_error(&host.name, key, e))?;
        drop(input);
        let mut line = format!(
            "{} ({}:{} {})",
            key.path(),
            key.user,
            key.group,
            key.permissions
        );
        let warning = output.stderr.trim();
        if !warning.is_empty() {
            line.push_str(&format!(": {}", warning.lines().last().unwrap_or_default()));
        }
        done.push(line);
    }
    Ok(())
}

/// Why writing `key` on `host` failed, naming both (the upload script's
/// own words for a refusal, never its text).
fn upload_error(host: &str, key: &Key, error: SshError) -> String {
    match error {
        SshError::Exit { code, stderr, .. } => format!(
            "{host}: keys: {}: writing {} failed (exit code {code}){}",
            key.attr,
            key.path(),
            crate::process::format_tail(&stderr)
        ),
        SshError::Timeout { timeout, .. } => format!(
            "{host}: keys: {}: writing {} did not finish within {}s",
            key.attr,
            key.path(),
            timeout.as_secs()
        ),
        e => format!("{e} (key {})", key.attr),
    }
}
