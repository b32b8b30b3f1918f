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

use tokio::sync::{OnceCell, mpsc};
use tokio_util::sync::CancellationToken;

use nix_deploy_core::events::{Event, HostStatus, Step};
use nix_deploy_core::exec::CommandOutput;
use nix_deploy_core::fleet::{Host, Selection};
use nix_deploy_core::keys::{self, Key, KeySource, Secret};
use nix_deploy_core::run::{Deployment, RunKind};

use super::exec::HostWork;
use super::prepare::Leases;
use super::{Engine, EngineError};
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
pub(super) struct KeyTexts {
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
pub(super) async fn upload(
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

/// Who asked for an `upload-keys` run.
#[derive(Clone, Debug, Default)]
pub struct UploadKeysRequest {
    pub selection: Selection,
    pub parallel_limit: usize,
    pub trigger: String,
    pub requested_by: String,
}

impl Engine {
    /// `nix-deploy upload-keys`: every key of the selected hosts, again,
    /// without deploying. Hosts are leased (no deployment touches them
    /// meanwhile); a host without keys is skipped. Recorded as a run of kind
    /// `upload-keys`.
    pub async fn upload_keys(
        &self,
        request: UploadKeysRequest,
        sink: Option<mpsc::UnboundedSender<Event>>,
        cancel: CancellationToken,
    ) -> Result<Deployment, EngineError> {
        self.store.mark_interrupted().await?;
        let hosts = self.selected_hosts(&request.selection).await?;
        let names: Vec<String> = hosts.iter().map(|h| h.name.clone()).collect();
        let leases = Leases::acquire(&self.store, &names, false, &cancel, None).await?;
        let texts =
            std::sync::Arc::new(KeyTexts::new(&self.config.flake, &self.config.nix, &hosts));
        let work: HostWork = std::sync::Arc::new(move |host, connection, mut slot| {
            let texts = texts.clone();
            Box::pin(async move {
                if host.keys.is_empty() {
                    slot.run.status = HostStatus::Skipped;
                    slot.run.reason = Some("no deployment.keys".into());
                    return Ok((slot, connection));
                }
                let all: Vec<&Key> = host.keys.iter().collect();
                let result = slot
                    .record_step(Step::Keys, upload(&connection, &texts, &host, &all, true))
                    .await?;
                match result {
                    Ok(lines) => {
                        slot.run.status = HostStatus::Succeeded;
                        slot.run.output = Some(CommandOutput {
                            exit_code: Some(0),
                            stdout: lines.join("\n"),
                            stderr: String::new(),
                        });
                    }
                    Err(e) => {
                        slot.run.status = HostStatus::Failed;
                        slot.run.error = Some(e);
                    }
                }
                Ok((slot, connection))
            })
        });
        let result = self
            .run_on_hosts(
                RunKind::UploadKeys,
                None,
                hosts,
                request.parallel_limit,
                &request.trigger,
                &request.requested_by,
                sink,
                cancel,
                work,
            )
            .await;
        leases.release().await;
        result
    }
}
