//! What a command line sets up before it runs a command: the history (and,
//! on PostgreSQL, this process's heartbeat), how Nix is called, the SSH
//! settings, and the engine on them.

use crate::engine::{Engine, EngineConfig, EngineError};
use crate::nix::Nix;
use crate::paths;
use crate::store::{Backend, Database, Heartbeat, Role, Store, StoreOptions};
use crate::transport::ssh::{Identities, KeepAlive, SshOptions};

use super::{Cli, errors, ops, output};

/// Open the history; deployments whose coordinator died are marked
/// `interrupted` on the way (crash recovery). On PostgreSQL this process
/// keeps its leases alive with a heartbeat while the command runs.
pub(super) async fn open_store(cli: &Cli) -> anyhow::Result<Store> {
    let dir = state_dir(cli);
    let mut options = StoreOptions::sqlite(&dir);
    if let Some(url) = &cli.database {
        options.database = Database::Postgres(url.clone());
    }
    let store = Store::connect(&options).await?;
    if store.backend() == Backend::Postgres {
        let heartbeat = store.start_heartbeat(Role::Cli).await?;
        let mut slot = HEARTBEAT.lock().await;
        if let Some(old) = slot.replace(heartbeat) {
            old.stop().await;
        }
    }
    say_tightened(&store);
    paths::clean_control_dirs(store.dead_holders()).await;
    for id in store.mark_interrupted().await? {
        eprintln!(
            "note: deployment #{id} was interrupted (its coordinator stopped); `nix-deploy resume {id}` continues it"
        );
    }
    Ok(store)
}

/// This command's heartbeat (PostgreSQL), stopped when the command ends:
/// the one process-wide value of the CLI, so that `run` can end it whatever
/// command opened the history.
pub(super) static HEARTBEAT: tokio::sync::Mutex<Option<Heartbeat>> =
    tokio::sync::Mutex::const_new(None);

/// Say what opening the history had to make owner-only.
pub(crate) fn say_tightened(store: &Store) {
    for line in store.tightened() {
        eprintln!(
            "note: {} (the state directory is for its owner only)",
            output::escape(line)
        );
    }
}

fn engine_config(
    cli: &Cli,
    nix: Nix,
    control_dir: &std::path::Path,
) -> anyhow::Result<EngineConfig> {
    let ssh = ssh_options(cli, &state_dir(cli), control_dir);
    let mut config = EngineConfig::new(cli.flake(), ssh);
    config.nix = nix;
    config.policy = std::sync::Arc::new(ops::policy()?);
    config.eval_workers = cli.eval_workers.map(usize::from);
    config.source = cli.source;
    // An impure evaluation may read anything: its results are never cached.
    config.eval_cache = !cli.no_eval_cache && !cli.impure;
    Ok(config)
}

/// How this command line calls Nix (`--show-trace`, `--impure`,
/// `--nix-option`, checked against this Nix), for a flake that exists: the
/// default `--flake .` needs a flake.nix here or above.
pub(super) async fn nix(cli: &Cli) -> anyhow::Result<Nix> {
    if cli.flake.is_none() {
        let here = std::env::current_dir().unwrap_or_default();
        if !errors::flake_above(&here) {
            return Err(errors::BadInput(errors::no_flake_here(&here)).into());
        }
    }
    nix_calls(cli).await
}

/// The Nix flags of this command line, checked against this Nix.
pub(crate) async fn nix_calls(cli: &Cli) -> anyhow::Result<Nix> {
    let nix = Nix {
        flags: cli.nix_flags(),
        builders: cli.builders.clone(),
        ..Nix::default()
    };
    nix.check_options().await.map_err(EngineError::Eval)?;
    Ok(nix)
}

pub(super) fn state_dir(cli: &Cli) -> std::path::PathBuf {
    cli.state_dir
        .clone()
        .unwrap_or_else(paths::default_state_dir)
}

/// The SSH settings of this command line (shared with `serve`).
pub(crate) fn ssh_options(
    cli: &Cli,
    state_dir: &std::path::Path,
    control_dir: &std::path::Path,
) -> SshOptions {
    let mut ssh = SshOptions::new(cli.ssh_config.clone(), control_dir.to_path_buf());
    ssh.connect_timeout = cli.connect_timeout;
    ssh.command_timeout = cli.command_timeout;
    ssh.identity_file = cli.ssh_identity.clone();
    ssh.keep = match KeepAlive::new(state_dir.join("ssh"), cli.ssh_keep_alive) {
        Ok(keep) => keep,
        Err(e) => {
            // Slower, not wrong: every run connects anew.
            tracing::warn!("not keeping SSH connections between runs: {e}");
            None
        }
    };
    ssh.identities = match Identities::new(state_dir.join("identities")) {
        Ok(identities) => Some(identities),
        Err(e) => {
            tracing::warn!("cannot check which machine each host is: {e}");
            None
        }
    };
    ssh
}

/// The engine for this command line, and the directory of its ssh control
/// sockets (removed when dropped).
pub(super) async fn engine(cli: &Cli) -> anyhow::Result<(Engine, tempfile::TempDir)> {
    engine_here(cli, None).await
}

/// [`engine`], where `here` is the host that is this machine
/// (`apply-local`): its commands run here, not over SSH.
pub(super) async fn engine_here(
    cli: &Cli,
    here: Option<&str>,
) -> anyhow::Result<(Engine, tempfile::TempDir)> {
    let nix = nix(cli).await?;
    let store = open_store(cli).await?;
    let control = paths::control_dir(store.holder())?;
    let mut config = engine_config(cli, nix, control.path())?;
    config.ssh.local = here.map(str::to_string);
    Ok((Engine::new(config, store), control))
}
