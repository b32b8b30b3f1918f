//! The commands when `--server` is set: the same behaviour and output, with
//! the daemon doing the work.

use tokio_util::sync::CancellationToken;

use super::{Cli, Command, EXIT_BAD_INPUT, EXIT_CANCELLED, EXIT_FAILED, EXIT_OK, output, progress};
use crate::client::{Client, ClientError};
use crate::engine::{DeployReport, PlanReport};
use crate::events::{DeploymentStatus, HostStatus};
use crate::store::{DeploymentRow, HostRun, HostStateRow};

/// A deployment as the API shows it → the CLI's types.
pub fn deployment_from_json(
    value: &serde_json::Value,
) -> Result<(DeploymentRow, Vec<HostRun>), ClientError> {
    let bad = |e: serde_json::Error| ClientError::Protocol(format!("deployment: {e}"));
    let mut row = value.clone();
    row["hosts"] = value["selected"].clone();
    let deployment: DeploymentRow = serde_json::from_value(row).map_err(bad)?;
    let mut runs = Vec::new();
    for host in value["hosts"].as_array().into_iter().flatten() {
        let mut run = host.clone();
        run["host"] = host["name"].clone();
        run["deployment_id"] = serde_json::json!(deployment.id);
        runs.push(serde_json::from_value::<HostRun>(run).map_err(bad)?);
    }
    Ok((deployment, runs))
}

fn report_of(deployment: DeploymentRow, runs: Vec<HostRun>) -> DeployReport {
    DeployReport {
        id: deployment.id,
        status: deployment.status,
        flake: deployment.flake,
        strategy: deployment.strategy,
        started_at: deployment.created_at,
        finished_at: deployment.finished_at.unwrap_or(deployment.created_at),
        error: deployment.error,
        hosts: runs,
    }
}

fn selection_json(select: &super::SelectArgs) -> serde_json::Map<String, serde_json::Value> {
    let mut map = serde_json::Map::new();
    map.insert("hosts".into(), serde_json::json!(select.hosts));
    map.insert("on".into(), serde_json::json!(select.on));
    map.insert("all".into(), serde_json::json!(select.all));
    map
}

pub async fn run(cli: &Cli, server: &str) -> Result<u8, ClientError> {
    let client = Client::new(server, cli.token_file.as_deref())?;
    match &cli.command {
        Command::Plan {
            select,
            strategy,
            no_build,
        } => {
            let mut body = selection_json(select);
            body.extend(strategy.json());
            body.insert("summaries".into(), serde_json::json!(!no_build));
            let plan = client.post("/api/v1/plan", &body.into()).await?;
            if cli.json {
                print(&plan);
            } else {
                let report: PlanReport = serde_json::from_value(plan)
                    .map_err(|e| ClientError::Protocol(format!("plan: {e}")))?;
                output::print_plan(&report);
            }
            Ok(EXIT_OK)
        }
        Command::Deploy(args) => {
            let mut body = selection_json(&args.select);
            body.extend(args.strategy.json());
            body.insert("wait".into(), serde_json::json!(args.wait));
            if let Some(revision) = &args.revision {
                body.insert("revision".into(), serde_json::json!(revision));
            }
            let created = client.post("/api/v1/deployments", &body.into()).await?;
            let id = created["id"]
                .as_i64()
                .ok_or_else(|| ClientError::Protocol("no deployment id".into()))?;
            follow(cli, &client, id).await
        }
        Command::Status => {
            let status = client.get("/api/v1/status").await?;
            if cli.json {
                print(&status);
            } else {
                let hosts: Vec<HostStateRow> = serde_json::from_value(status["hosts"].clone())
                    .map_err(|e| ClientError::Protocol(format!("status: {e}")))?;
                output::print_status(&hosts);
            }
            Ok(EXIT_OK)
        }
        Command::History { limit } => {
            let list = client
                .get(&format!("/api/v1/deployments?limit={}", (*limit).max(1)))
                .await?;
            if cli.json {
                print(&list);
            } else {
                let mut rows = Vec::new();
                for d in list["deployments"].as_array().into_iter().flatten() {
                    rows.push(deployment_from_json(d)?);
                }
                output::print_history(&rows);
            }
            Ok(EXIT_OK)
        }
        Command::Show { id } => {
            let id = match id {
                Some(id) => *id,
                None => latest(&client, |_| true).await?,
            };
            if cli.json {
                print(&client.get(&format!("/api/v1/deployments/{id}")).await?);
            } else {
                println!(
                    "{}",
                    client
                        .get_text(&format!("/api/v1/deployments/{id}/report"))
                        .await?
                );
            }
            Ok(EXIT_OK)
        }
        Command::Cancel { id } => {
            let id = match id {
                Some(id) => *id,
                None => latest(&client, |d| d["status"] == "running").await?,
            };
            let answer = client
                .post(
                    &format!("/api/v1/deployments/{id}/cancel"),
                    &serde_json::json!({}),
                )
                .await?;
            if cli.json {
                print(&answer);
            } else {
                println!(
                    "Cancel requested for deployment #{id}: no new hosts will start; running hosts finish or roll back."
                );
            }
            Ok(EXIT_OK)
        }
        Command::Resume { id, wait, .. } => {
            let id = match id {
                Some(id) => *id,
                None => {
                    latest(&client, |d| {
                        d["status"] != "succeeded" && d["status"] != "running"
                    })
                    .await?
                }
            };
            let created = client
                .post(
                    &format!("/api/v1/deployments/{id}/resume"),
                    &serde_json::json!({ "wait": wait }),
                )
                .await?;
            let id = created["id"].as_i64().unwrap_or(id);
            follow(cli, &client, id).await
        }
        Command::Rollback {
            host,
            to_generation,
            ..
        } => {
            let created = client
                .post(
                    &format!("/api/v1/hosts/{host}/rollback"),
                    &serde_json::json!({ "to_generation": to_generation }),
                )
                .await?;
            let id = created["id"]
                .as_i64()
                .ok_or_else(|| ClientError::Protocol("no deployment id".into()))?;
            follow(cli, &client, id).await
        }
        Command::Health { host, .. } => {
            let health = client
                .post(
                    &format!("/api/v1/hosts/{host}/health"),
                    &serde_json::json!({}),
                )
                .await?;
            super::print_health(cli, &health).map_err(|e| ClientError::Protocol(e.to_string()))
        }
        Command::Serve { .. } => Err(ClientError::Api {
            status: 400,
            code: "bad_request".into(),
            message: "`serve` runs the daemon; do not combine it with --server".into(),
        }),
    }
}

fn print(value: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

async fn latest(
    client: &Client,
    wanted: impl Fn(&serde_json::Value) -> bool,
) -> Result<i64, ClientError> {
    let list = client.get("/api/v1/deployments?limit=50").await?;
    list["deployments"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|d| wanted(d))
        .and_then(|d| d["id"].as_i64())
        .ok_or_else(|| ClientError::Api {
            status: 404,
            code: "not_found".into(),
            message: "no matching deployment".into(),
        })
}

/// Draw the deployment's events as they stream, then the report.
async fn follow(cli: &Cli, client: &Client, id: i64) -> Result<u8, ClientError> {
    use std::io::IsTerminal;
    let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
    let fancy = !cli.json && std::io::stdout().is_terminal() && std::io::stderr().is_terminal();
    let display = tokio::spawn(progress::render(receiver, fancy));
    // Ctrl-C here cancels the deployment on the daemon (after confirmation).
    let cancel = CancellationToken::new();
    let signals = tokio::spawn(super::on_signals(cancel.clone()));
    let followed = tokio::select! {
        result = client.follow(id, sender) => result,
        _ = cancel.cancelled() => {
            let _ = client
                .post(&format!("/api/v1/deployments/{id}/cancel"), &serde_json::json!({}))
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
    let value = client.get(&format!("/api/v1/deployments/{id}")).await?;
    let (deployment, runs) = deployment_from_json(&value)?;
    let report = report_of(deployment, runs);
    if cli.json {
        print(&output::report_json(&report));
    } else {
        output::print_report(&report);
    }
    Ok(match report.status {
        DeploymentStatus::Succeeded => EXIT_OK,
        DeploymentStatus::Cancelled
            if !report
                .hosts
                .iter()
                .any(|h: &HostRun| h.status.is_failure() && h.status != HostStatus::Cancelled) =>
        {
            EXIT_CANCELLED
        }
        DeploymentStatus::Running => EXIT_FAILED,
        _ => EXIT_FAILED,
    })
}

/// Exit code for a client error.
pub fn exit_code(e: &ClientError) -> u8 {
    if e.is_bad_input() {
        EXIT_BAD_INPUT
    } else {
        EXIT_FAILED
    }
}
