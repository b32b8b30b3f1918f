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
//! every key of the selected hosts with `nix-deploy upload-keys`.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::sync::OnceCell;

use nix_deploy_core::fleet::Host;
use nix_deploy_core::keys::{self, Key, KeySource, Secret};

use crate::nix::Nix;
use crate::process::Cmd;
use crate::transport::ssh::Connection;

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
    nix: Nix,
    /// The hosts of this run with a `text` key.
    hosts: Vec<String>,
    texts: OnceCell<Result<Texts, String>>,
}

impl KeyTexts {
    pub fn new(flake: &str, nix: &Nix, hosts: &[Host]) -> Self {
        KeyTexts {
            flake: flake.to_string(),
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
        KeyTexts::new("", &Nix::default(), &[])
    }

    async fn text(&self, host: &str, key: &Key) -> Result<Secret, String> {
        let texts = self
            .texts
            .get_or_init(|| async {
                self.nix
                    .key_texts(&self.flake, &self.hosts)
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

/// The contents of `key`, read now.
async fn read(texts: &KeyTexts, host: &str, key: &Key) -> Result<Secret, String> {
    let secret = match &key.source {
        KeySource::Text => texts.text(host, key).await?,
        KeySource::File(path) => {
            let bytes = tokio::fs::read(path)
                .await
                .map_err(|e| format!("keyFile {path}: {e}"))?;
            Secret::new(bytes)
        }
        KeySource::Command(argv) => {
            let cmd = Cmd::new(argv[0].clone()).args(argv[1..].iter().cloned());
            let bytes = crate::process::run_bytes(&cmd, READ_TIMEOUT)
                .await
                .map_err(|e| format!("keyCommand: {e}"))?;
            Secret::new(bytes)
        }
    };
    if secret.len() > MAX_KEY_BYTES {
        return Err(format!(
            "the key is {} bytes, more than {MAX_KEY_BYTES}",
            secret.len()
        ));
    }
    Ok(secret)
}

/// Upload `keys` to `host` over `connection`; returns one line per key
/// (where it went, owner and mode, warnings): never its contents.
///
/// `require_ownership`: fail when the key's user or group does not exist
/// (false only before the first activation of a system that may create them).
pub(crate) async fn upload(
    connection: &Connection,
    texts: &KeyTexts,
    host: &Host,
    keys: &[&Key],
    require_ownership: bool,
) -> Result<Vec<String>, String> {
    let mut lines = Vec::new();
    for key in keys {
        let secret = read(texts, &host.name, key)
            .await
            .map_err(|e| format!("{}: keys: {}: {e}", host.name, key.attr))?;
        let output = connection
            .run_with_stdin(
                "keys",
                &keys::upload_argv(key, require_ownership),
                secret.expose(),
                UPLOAD_TIMEOUT,
            )
            .await
            .map_err(|e| format!("{} (key {})", e, key.attr))?;
        drop(secret);
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
        lines.push(line);
    }
    Ok(lines)
}
