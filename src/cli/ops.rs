//! Operating with other people from the command line: `approve`, `reject`
//! (deployments waiting at a gate), `promote` (between environments),
//! `audit` (the trail, a JSON-lines export, its verification, and what the
//! in-process CLI records in it), and the policy (windows, approval rules)
//! the in-process CLI reads from the daemon's configuration file.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use nix_deploy_core::approval::{Gate, GateState, Refusal, requester_identity};
use nix_deploy_core::audit::{AuditEntry, AuditRecord, Verification};
use nix_deploy_core::{duration, render};

use nix_deploy_core::grammar::PromoteArgs;
use nix_deploy_core::options::DeployOptions;

use super::client::Client;
use super::{Cli, EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, open_store, who};
use crate::daemon::config::{Config, ConfigError};
use crate::engine::{EngineError, Policy, PromoteJob};
use crate::store::{Decision, Store};

/// Where the CLI finds the windows and approval rules when
/// `NIX_DEPLOY_CONFIG` names no file: the daemon's usual place.
pub const SYSTEM_CONFIG: &str = "/etc/nix-deploy/config.toml";

/// The windows and approval rules of the daemon's configuration
/// (`NIX_DEPLOY_CONFIG`, else `/etc/nix-deploy/config.toml` if it exists):
/// a deployment from the CLI obeys the same rules as one through the daemon.
pub fn policy() -> Result<Policy, ConfigError> {
    let path = std::env::var_os("NIX_DEPLOY_CONFIG")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            let system = PathBuf::from(SYSTEM_CONFIG);
            system.is_file().then_some(system)
        });
    match path {
        Some(path) => Config::load(&path)?.policy(),
        None => Ok(Policy::default()),
    }
}

#[derive(Args, Debug, Clone)]
pub struct ApproveArgs {
    /// The deployment waiting for approval (or a pause to promote).
    pub id: i64,
    /// A note kept with the approval.
    #[arg(long, value_name = "TEXT")]
    pub comment: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct RejectArgs {
    pub id: i64,
    /// Why (recorded; the deployment is cancelled saying it).
    #[arg(long, value_name = "TEXT", required = true)]
    pub reason: String,
}

#[derive(Args, Debug, Clone)]
pub struct AuditArgs {
    /// Entries of this long ago and since (e.g. 7d, 12h) [default: all].
    #[arg(long, value_name = "DURATION", value_parser = duration::parse_span)]
    pub since: Option<Duration>,
    /// Check the hash chain: report the first entry changed or removed
    /// (exit 1 if one was).
    #[arg(long)]
    pub verify: bool,
}

/// The CLI user, as approvals and the audit trail name them.
fn identity() -> String {
    requester_identity(&who())
}

/// Append what the CLI user does in process to the audit trail, as the
/// daemon does for its callers.
pub async fn record(
    store: &Store,
    action: &str,
    target: &str,
    detail: serde_json::Value,
) -> anyhow::Result<()> {
    store
        .audit(&AuditRecord {
            actor: identity(),
            origin: "cli".into(),
            action: action.to_string(),
            target: target.to_string(),
            detail,
        })
        .await?;
    Ok(())
}

/// `promote`, in process: recorded in the audit trail (and its refusal).
pub async fn promote(cli: &Cli, args: &PromoteArgs) -> anyhow::Result<u8> {
    let mut request = args.request()?;
    request.options = super::args::strategy_from_env(request.options);
    let options = request.options.resolve(&DeployOptions::default())?;
    let (engine, _control) = super::engine(cli).await?;
    let action = if request.options.override_window.is_some() {
        "promote-override-window"
    } else {
        "promote"
    };
    record(
        engine.store(),
        action,
        "hosts",
        serde_json::json!({ "request": &request }),
    )
    .await?;
    let job = PromoteJob {
        request: request.clone(),
        options,
        trigger: "cli".into(),
        requested_by: who(),
    };
    let store = engine.store().clone();
    let result = super::watch(cli, |sink, cancel| engine.promote(job, Some(sink), cancel)).await;
    if let Err(e) = &result
        && e.downcast_ref::<EngineError>()
            .is_some_and(EngineError::is_bad_input)
    {
        record(
            &store,
            "promote-refused",
            "hosts",
            serde_json::json!({ "request": &request, "error": format!("{e:#}") }),
        )
        .await?;
    }
    result
}

pub async fn approve(cli: &Cli, args: &ApproveArgs) -> anyhow::Result<u8> {
    let store = open_store(cli).await?;
    let Some(deployment) = store.deployment(args.id).await? else {
        eprintln!("error: no deployment #{}", args.id);
        return Ok(EXIT_BAD_INPUT);
    };
    let me = identity();
    let requester = requester_identity(&deployment.requested_by);
    let decision = store
        .approve(args.id, &me, &requester, "cli", args.comment.as_deref())
        .await?;
    decided(cli, &store, &me, "approve", args.id, decision).await
}

pub async fn reject(cli: &Cli, args: &RejectArgs) -> anyhow::Result<u8> {
    let store = open_store(cli).await?;
    let me = identity();
    if args.reason.trim().is_empty() {
        eprintln!("error: --reason must say why");
        return Ok(EXIT_BAD_INPUT);
    }
    let decision = store
        .decide_gate(args.id, GateState::Rejected, &me, &args.reason)
        .await?;
    decided(cli, &store, &me, "reject", args.id, decision).await
}

/// Record and print what became of a yes or a no.
async fn decided(
    cli: &Cli,
    store: &Store,
    me: &str,
    action: &str,
    id: i64,
    decision: Decision,
) -> anyhow::Result<u8> {
    let (action, detail, result) = match decision {
        Decision::Done(gate) => (
            action.to_string(),
            serde_json::json!({ "gate": gate.number, "state": gate.state, "seen": gate.summary }),
            Ok(*gate),
        ),
        Decision::Refused(refusal) => (
            format!("{action}-refused"),
            serde_json::json!({ "error": refusal.to_string() }),
            Err(refusal),
        ),
    };
    store
        .audit(&AuditRecord {
            actor: me.to_string(),
            origin: "cli".into(),
            action,
            target: format!("deployment #{id}"),
            detail,
        })
        .await?;
    match result {
        Ok(gate) => {
            super::output::show(cli, &gate, print_gate)?;
            Ok(EXIT_OK)
        }
        Err(refusal) => refused(&refusal),
    }
}

fn refused(refusal: &Refusal) -> anyhow::Result<u8> {
    eprintln!("error: {refusal}");
    Ok(EXIT_BAD_INPUT)
}

/// A gate in a few lines.
pub fn print_gate(gate: &Gate) {
    println!(
        "gate {} ({}): {} — {}",
        gate.number,
        gate.title,
        gate.state.as_str(),
        gate.hosts.join(", ")
    );
    for approval in &gate.approvals {
        println!(
            "  approved by {} at {} via {}{}",
            approval.by,
            render::timestamp(approval.at),
            approval.via,
            approval
                .comment
                .as_deref()
                .map(|c| format!(": {c}"))
                .unwrap_or_default()
        );
    }
    if let (Some(by), Some(at)) = (&gate.decided_by, gate.decided_at)
        && gate.state != GateState::Approved
    {
        println!(
            "  {} by {by} at {}{}",
            gate.state.as_str(),
            render::timestamp(at),
            gate.reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        );
    }
    if gate.state == GateState::Open {
        println!("  still needed: {}", gate.missing());
    }
}

pub async fn audit(cli: &Cli, args: &AuditArgs) -> anyhow::Result<u8> {
    let store = open_store(cli).await?;
    if args.verify {
        return print_verification(cli, &store.verify_audit().await?);
    }
    let since = args
        .since
        .map(|d| crate::now_ms() - d.as_millis() as i64)
        .unwrap_or(i64::MIN);
    print_entries(cli, &store.audit_entries(since).await?)
}

/// `audit` through the daemon.
pub async fn audit_remote(
    cli: &Cli,
    client: &Client,
    args: &AuditArgs,
) -> Result<u8, super::client::ClientError> {
    if args.verify {
        let v: Verification = client.get("/api/v1/audit?verify=true").await?;
        return Ok(print_verification(cli, &v).unwrap_or(EXIT_FAILED));
    }
    let since = args
        .since
        .map(|d| crate::now_ms() - d.as_millis() as i64)
        .unwrap_or(0);
    #[derive(serde::Deserialize)]
    struct Entries {
        entries: Vec<AuditEntry>,
    }
    let list: Entries = client.get(&format!("/api/v1/audit?since={since}")).await?;
    Ok(print_entries(cli, &list.entries).unwrap_or(EXIT_FAILED))
}

fn print_verification(cli: &Cli, v: &Verification) -> anyhow::Result<u8> {
    if cli.json {
        println!("{}", serde_json::to_string_pretty(v)?);
    } else if v.ok {
        println!("audit trail intact: {} entries, head {}", v.entries, v.head);
    } else {
        println!(
            "audit trail BROKEN at entry {}: {}",
            v.first_bad_id.unwrap_or(0),
            v.problem.as_deref().unwrap_or("")
        );
    }
    Ok(if v.ok { EXIT_OK } else { EXIT_FAILED })
}

/// One line per entry; with `--json`, JSON lines (an export).
fn print_entries(cli: &Cli, entries: &[AuditEntry]) -> anyhow::Result<u8> {
    for entry in entries {
        if cli.json {
            println!("{}", serde_json::to_string(entry)?);
        } else {
            println!(
                "{:>6}  {}  {:<20} {:<10} {:<16} {}  {}",
                entry.id,
                render::timestamp(entry.at),
                entry.record.actor,
                entry.record.origin,
                entry.record.action,
                entry.record.target,
                if entry.record.detail.is_null() {
                    String::new()
                } else {
                    entry.record.detail.to_string()
                }
            );
        }
    }
    Ok(EXIT_OK)
}
