//! The commands when `--server` is set: the same requests, documents and
//! output, with the daemon doing the work.

use tokio_util::sync::CancellationToken;

use nix_deploy_core::reports::{
    Accepted, CancelAnswer, DeploymentList, HostHealth, PlanReport, StatusReport,
};
use nix_deploy_core::run::Deployment;

use super::apply::Applied;
use super::client::{Client, ClientError};
use super::{Cli, Command, EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, args, output, progress};

pub async fn run(cli: &Cli, server: &str) -> Result<u8, ClientError> {
    let client = Client::new(server, cli.token_file.as_deref())?;
    // The daemon reads its fleet and builds with its own settings: these
    // flags would do nothing.
    for (given, flag) in [
        (cli.source.is_some(), "--source"),
        (cli.builders.is_some(), "--builders"),
    ] {
        if given {
            return Err(ClientError::Api {
                status: 400,
                code: "bad_request".into(),
                message: format!(
                    "{flag} is the daemon's setting (`nix-deploy serve {flag} ...`); drop it with --server"
                ),
            });
        }
    }
    let print_error = |e: anyhow::Error| ClientError::Protocol(e.to_string());
    match &cli.command {
        Command::Plan {
            select,
            strategy,
            no_build,
            revision,
        } => {
            let request = args::plan_request(select, strategy, *no_build, revision.as_deref());
            let plan: PlanReport = client.post("/api/v1/plan", &request).await?;
            output::show(cli, &plan, output::print_plan).map_err(print_error)?;
            Ok(super::plan_exit_code(&plan))
        }
        Command::Deploy(args) => {
            let request = args::deploy_request(args).map_err(bad_request)?;
            let created: Accepted = client.post("/api/v1/deployments", &request).await?;
            follow(cli, &client, created.id).await
        }
        Command::Apply(args) => match args.applied().map_err(bad_request)? {
            Applied::Deploy(request) => {
                let created: Accepted = client.post("/api/v1/deployments", &*request).await?;
                follow(cli, &client, created.id).await
            }
            Applied::Keys(body) => {
                body.resolve().map_err(bad_request)?;
                let created: Accepted = client.post("/api/v1/upload-keys", &body).await?;
                follow(cli, &client, created.id).await
            }
            Applied::Build(_) => Err(local_only("apply build")),
        },
        Command::Build(_) => Err(local_only("build")),
        Command::Eval(_) => Err(local_only("eval")),
        Command::Doctor(_) => Err(local_only("doctor")),
        Command::ApplyLocal(_) => Err(local_only("apply-local")),
        Command::Completions { .. } => Ok(EXIT_OK),
        Command::Exec(args) => {
            let request = args.request();
            request.resolve().map_err(bad_request)?;
            let created: Accepted = client.post("/api/v1/exec", &request).await?;
            follow(cli, &client, created.id).await
        }
        Command::UploadKeys {
            select,
            parallel_limit,
        } => {
            let body = super::keys_request(select, *parallel_limit);
            body.resolve().map_err(bad_request)?;
            let created: Accepted = client.post("/api/v1/upload-keys", &body).await?;
            follow(cli, &client, created.id).await
        }
        Command::Status { live } => {
            let path = if *live {
                "/api/v1/status?live=true"
            } else {
                "/api/v1/status"
            };
            let status: StatusReport = client.get(path).await?;
            output::show(cli, &status, output::print_status).map_err(print_error)?;
            Ok(EXIT_OK)
        }
        Command::History { limit } => {
            let list: DeploymentList = client
                .get(&format!("/api/v1/deployments?limit={}", (*limit).max(1)))
                .await?;
            output::show(cli, &list, output::print_history).map_err(print_error)?;
            Ok(EXIT_OK)
        }
        Command::Show { id } => {
            let id = match id {
                Some(id) => *id,
                None => latest(&client, |_| true).await?,
            };
            if cli.json {
                let deployment: Deployment =
                    client.get(&format!("/api/v1/deployments/{id}")).await?;
                output::show(cli, &deployment, output::print_deployment).map_err(print_error)?;
            } else {
                let report = client
                    .get_text(&format!("/api/v1/deployments/{id}/report"))
                    .await?;
                println!("{}", output::escape(&report));
            }
            Ok(EXIT_OK)
        }
        Command::Cancel { id } => {
            let id = match id {
                Some(id) => *id,
                None => latest(&client, |d| d.status.is_active()).await?,
            };
            let answer: CancelAnswer = client
                .post(
                    &format!("/api/v1/deployments/{id}/cancel"),
                    &serde_json::json!({}),
                )
                .await?;
            output::show(cli, &answer, output::print_cancel).map_err(print_error)?;
            Ok(EXIT_OK)
        }
        Command::Resume { id, wait } => {
            let id = match id {
                Some(id) => *id,
                None => {
                    latest(&client, |d| {
                        d.kind == nix_deploy_core::run::RunKind::Deploy
                            && d.status.as_str() != "succeeded"
                            && !d.status.is_active()
                    })
                    .await?
                }
            };
            let created: Accepted = client
                .post(
                    &format!("/api/v1/deployments/{id}/resume"),
                    &serde_json::json!({ "wait": wait }),
                )
                .await?;
            follow(cli, &client, created.id).await
        }
        Command::Rollback {
            host,
            to_generation,
            ..
        } => {
            let created: Accepted = client
                .post(
                    &format!("/api/v1/hosts/{host}/rollback"),
                    &serde_json::json!({ "to_generation": to_generation }),
                )
                .await?;
            follow(cli, &client, created.id).await
        }
        Command::Health { host, .. } => {
            let health: HostHealth = client
                .post(
                    &format!("/api/v1/hosts/{host}/health"),
                    &serde_json::json!({}),
                )
                .await?;
            output::show(cli, &health, output::print_health).map_err(print_error)?;
            Ok(if health.reachable && health.healthy {
                EXIT_OK
            } else {
                EXIT_FAILED
            })
        }
        Command::ForgetIdentity { .. } => Err(ClientError::Api {
            status: 400,
            code: "bad_request".into(),
            message: "`forget-identity` changes this machine's state directory (the daemon's is the daemon host's own); run it there without --server".into(),
        }),
        Command::Approve(args) => {
            let gate: nix_deploy_core::approval::Gate = client
                .post(
                    &format!("/api/v1/deployments/{}/approve", args.id),
                    &serde_json::json!({ "comment": args.comment }),
                )
                .await?;
            output::show(cli, &gate, super::ops::print_gate).map_err(print_error)?;
            Ok(EXIT_OK)
        }
        Command::Reject(args) => {
            let gate: nix_deploy_core::approval::Gate = client
                .post(
                    &format!("/api/v1/deployments/{}/reject", args.id),
                    &serde_json::json!({ "reason": args.reason }),
                )
                .await?;
            output::show(cli, &gate, super::ops::print_gate).map_err(print_error)?;
            Ok(EXIT_OK)
        }
        Command::Audit(args) => super::ops::audit_remote(cli, &client, args).await,
        Command::Promote(args) => {
            let mut request = args.request().map_err(bad_request)?;
            request.options = args::strategy_from_env(request.options);
            let created: Accepted = client.post("/api/v1/promote", &request).await?;
            follow(cli, &client, created.id).await
        }
        Command::Serve { .. } => Err(ClientError::Api {
            status: 400,
            code: "bad_request".into(),
            message: "`serve` runs the daemon; do not combine it with --server".into(),
        }),
    }
}

/// A command that works on this machine only (exit code 2).
fn local_only(command: &str) -> ClientError {
    ClientError::Api {
        status: 400,
        code: "bad_request".into(),
        message: format!(
            "`{command}` runs on this machine, not through the daemon: drop --server (and NIX_DEPLOY_SERVER)"
        ),
    }
}

/// A request refused before it was sent (exit code 2).
fn bad_request(e: nix_deploy_core::options::OptionsError) -> ClientError {
    ClientError::Api {
        status: 400,
        code: "bad_request".into(),
        message: e.to_string(),
    }
}

/// The newest deployment `wanted` accepts.
async fn latest(client: &Client, wanted: impl Fn(&Deployment) -> bool) -> Result<i64, ClientError> {
    let list: DeploymentList = client.get("/api/v1/deployments?limit=50").await?;
    list.deployments
        .iter()
        .find(|d| wanted(d))
        .map(|d| d.id)
        .ok_or_else(|| ClientError::Api {
            status: 404,
            code: "not_found".into(),
            message: "no matching deployment".into(),
        })
}

/// Draw the deployment's events as they stream, then the report.
async fn follow(cli: &Cli, client: &Client, id: i64) -> Result<u8, ClientError> {
    let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
    let display = tokio::spawn(progress::render(receiver, super::fancy(cli)));
    // Ctrl-C here cancels the deployment on the daemon (after confirmation).
    let cancel = CancellationToken::new();
    let signals = tokio::spawn(super::on_signals(cancel.clone()));
    let followed = tokio::select! {
        result = client.follow(id, sender) => result,
        _ = cancel.cancelled() => {
            let _ = client
                .post::<_, CancelAnswer>(&format!("/api/v1/deployments/{id}/cancel"), &serde_json::json!({}))
                .await;
            // Keep watching until it has stopped.
            let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
            drop(receiver);
            client.follow(id, sender).await
        }
    };
    signals.abort();
    let _ = display.await;
    followed?;
    let deployment: Deployment = client.get(&format!("/api/v1/deployments/{id}")).await?;
    output::show(cli, &deployment, output::print_report)
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
    Ok(super::exit_code(&deployment))
}

/// Exit code for a client error.
pub fn exit_code(e: &ClientError) -> u8 {
    if e.is_bad_input() {
        EXIT_BAD_INPUT
    } else {
        EXIT_FAILED
    }
}
