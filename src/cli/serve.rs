//! `nix-deploy serve`: load the config, open the history, mark interrupted
//! deployments, reconcile hosts in the background, and serve the API until
//! SIGTERM or SIGINT.

use std::path::PathBuf;

use anyhow::Context;

use nix_deploy_core::fleet::Selection;

use super::Cli;
use crate::daemon::config::{Config, Secret, secret_path_here};
use crate::daemon::mail::Mailer;
use crate::daemon::notify::Notifier;
use crate::daemon::{self, AppState, Credentials, Token};
use crate::engine::{Engine, EngineConfig};
use crate::paths;
use crate::store::{Backend, Database, Role, Store, StoreOptions};

#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// The daemon's TOML config file.
    #[arg(long, value_name = "FILE", env = "NIX_DEPLOY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Listen address [default: from the config, else 127.0.0.1:7480].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
}

pub async fn serve(cli: &Cli, args: &ServeArgs) -> anyhow::Result<u8> {
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(listen) = &args.listen {
        config.listen = listen.clone();
    }
    if let Some(flake) = &cli.flake {
        config.flake = flake.clone();
    }
    let state_dir = cli
        .state_dir
        .clone()
        .or_else(|| config.state_dir.clone())
        .unwrap_or_else(paths::default_state_dir);
    let ssh_config = cli.ssh_config.clone().or_else(|| config.ssh_config.clone());

    // Secret files: absolute, or systemd credentials (relative paths).
    let read = |key: &str, path: &std::path::Path| -> anyhow::Result<Secret> {
        Secret::from_file(&secret_path_here(key, path)?).with_context(|| key.to_string())
    };
    config.notifications.read_url_files(|key, path| {
        read(key, path).map(|url| String::from_utf8_lossy(url.expose()).into_owned())
    })?;
    let mut tokens = Vec::new();
    for token in &config.tokens {
        tokens.push(Token {
            name: token.name.clone(),
            secret: read(&format!("token `{}`", token.name), &token.file)?,
            scope: token.scope,
            hosts: crate::daemon::config::hosts("tokens.hosts", &token.hosts)?,
        });
    }
    if tokens.is_empty() {
        tracing::warn!("no tokens configured: every /api/v1 request will be refused");
        eprintln!("warning: no [[tokens]] in the config; every API request will be refused");
    }
    let slack_secret = match &config.slack {
        Some(slack) => Some(read(
            "slack.signing-secret-file",
            &slack.signing_secret_file,
        )?),
        None => None,
    };
    let github_secret = match &config.github {
        Some(github) => Some(read("github.secret-file", &github.secret_file)?),
        None => None,
    };
    let notifier = notifier(&config, read)?;
    let ssh_identity = match (&cli.ssh_identity, &config.ssh_identity_file) {
        (Some(flag), _) => Some(flag.clone()),
        (None, Some(file)) => Some(secret_path_here("ssh-identity-file", file)?),
        (None, None) => None,
    };

    let store = Store::connect(&store_options(cli, &config, &state_dir)?).await?;
    let history = store.clone();
    let takeover = config.cluster.takeover && store.backend() == Backend::Postgres;
    let heartbeat = store.start_heartbeat(Role::Daemon { takeover }).await?;
    super::say_tightened(&store);
    paths::clean_control_dirs(store.dead_holders()).await;
    let interrupted = store.mark_interrupted().await?;
    // ssh control sockets live for the daemon's lifetime.
    let control = paths::control_dir(store.holder())?;
    // Kept masters are the daemon's connection pool: every deployment and
    // status probe resumes the host's master instead of connecting anew.
    let mut ssh = super::ssh_options(cli, &state_dir, control.path());
    ssh.config_file = ssh_config;
    ssh.identity_file = ssh_identity;
    let mut engine = EngineConfig::new(config.flake.clone(), ssh);
    engine.policy = std::sync::Arc::new(config.policy()?);
    engine.nix = super::nix_calls(cli).await?;
    // The command line's evaluation flags win over the file's.
    engine.eval_workers = cli.eval_workers.map(usize::from).or(config.eval_workers);
    engine.eval_cache = config.eval_cache && !cli.no_eval_cache && !cli.impure;
    engine.source = cli.source;
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let address = listener.local_addr()?;
    let state = AppState::new(
        config,
        engine.clone(),
        store.clone(),
        Credentials {
            tokens,
            slack_secret,
            github_secret,
        },
        notifier,
        heartbeat.leader(),
    );
    // Reconcile: what do the hosts actually run after a crash? (Probing records it.)
    if !interrupted.is_empty() {
        tracing::info!(
            ?interrupted,
            "deployments interrupted by a previous stop; probing the fleet"
        );
        let reconcile = Engine::new(engine, store);
        tokio::spawn(async move {
            let options = nix_deploy_core::options::DeployOptions::default();
            if let Err(e) = reconcile.plan(&Selection::default(), &options, false).await {
                tracing::warn!(cause = %e, "reconciling hosts after an interrupted deployment");
            }
        });
    }
    println!("nix-deploy: listening on http://{address}");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let served = daemon::run(listener, state, shutdown_signal()).await;
    // Resign and leave the coordinators while the history is open: another
    // daemon leads at once, and the cluster shows this one gone.
    heartbeat.stop().await;
    history.close().await;
    served?;
    Ok(super::EXIT_OK)
}

/// Notifications as configured: JSON webhooks signed with the secret from
/// its file, e-mail through `[smtp]` (its password from its file); `read`
/// reads a secret file (absolute, or a systemd credential).
fn notifier(
    config: &Config,
    read: impl Fn(&str, &std::path::Path) -> anyhow::Result<Secret>,
) -> anyhow::Result<Notifier> {
    let notifications = &config.notifications;
    let secret = match &notifications.webhook_secret_file {
        Some(file) => Some(read("notifications.webhook-secret-file", file)?),
        None => {
            if !notifications.json_webhooks.is_empty() {
                eprintln!(
                    "warning: notifications.json-webhooks are sent unsigned (set notifications.webhook-secret-file)"
                );
            }
            None
        }
    };
    let mailer = match &config.smtp {
        Some(smtp) => {
            let password = match &smtp.password_file {
                Some(file) => Some(read("smtp.password-file", file)?),
                None => None,
            };
            Some(Mailer::new(smtp, password, &notifications.email_to)?)
        }
        None => None,
    };
    Ok(Notifier::new(notifications.clone(), secret, mailer))
}

/// Where the daemon's history is: `--database` (or `NIX_DEPLOY_DATABASE`)
/// over the config's `database`, with the password from
/// `database-password-file`; else SQLite in the state directory.
fn store_options(
    cli: &Cli,
    config: &Config,
    state_dir: &std::path::Path,
) -> anyhow::Result<StoreOptions> {
    let mut options = StoreOptions::sqlite(state_dir);
    options.migrate = config.migrate;
    options.leases = config.lease_timing();
    let url = match (&cli.database, config.database_url()?) {
        (Some(url), _) => Some(url.clone()),
        (None, Some(url)) => Some(match &config.database_password_file {
            Some(file) => {
                let secret = Secret::from_file(&secret_path_here("database-password-file", file)?)
                    .context("the database password")?;
                url.with_password(&String::from_utf8_lossy(secret.expose()))
            }
            None => url,
        }),
        (None, None) => None,
    };
    if let Some(url) = url {
        options.database = Database::Postgres(url);
    }
    Ok(options)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut interrupt), Ok(mut terminate)) => {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
        }
        _ => std::future::pending::<()>().await,
    }
}
