//! `nix-deploy doctor`: this machine (Nix and its flakes, SSH keys), the
//! flake, and every selected host (reachable, privileges, copies), each
//! finding with its fix ([`nix_deploy_core::doctor`]); the fleet's checks
//! are the engine's. Exit 1 when a check failed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;

use nix_deploy_core::doctor::{self, DoctorReport, Finding, Verdict};

use super::args::SelectArgs;
use super::{Cli, EXIT_FAILED, EXIT_OK, errors, output};
use crate::process;

#[derive(Args, Debug, Clone)]
pub struct DoctorArgs {
    #[command(flatten)]
    pub select: SelectArgs,
}

/// Key files ssh tries by default.
const DEFAULT_KEYS: [&str; 5] = [
    "id_ed25519",
    "id_ecdsa",
    "id_rsa",
    "id_ed25519_sk",
    "id_ecdsa_sk",
];

pub async fn run(cli: &Cli, args: &DoctorArgs) -> anyhow::Result<u8> {
    let nix = super::nix_calls(cli).await?;
    let version = nix.version().await.map_err(|e| e.to_string());
    let mut findings = vec![doctor::nix(version.as_deref().map_err(String::as_str))];
    let flakes = nix.flakes_probe().await;
    findings.push(doctor::flakes(flakes.as_deref().map_err(String::as_str)));
    findings.push(ssh_keys(cli).await);

    let here = std::env::current_dir().unwrap_or_default();
    if cli.flake.is_none() && !errors::flake_above(&here) {
        findings.push(doctor::flake(".", Err(&errors::no_flake_here(&here)), true));
    } else {
        let (engine, _control) = super::engine(cli).await?;
        findings.extend(engine.doctor(&args.select.selection()).await?);
    }
    let report = DoctorReport { findings };
    output::show(cli, &report, print)?;
    Ok(if report.failed() {
        EXIT_FAILED
    } else {
        EXIT_OK
    })
}

/// The agent's keys and the key files ssh would offer.
async fn ssh_keys(cli: &Cli) -> Finding {
    let agent = if std::env::var_os("SSH_AUTH_SOCK").is_some_and(|s| !s.is_empty()) {
        let listed = process::run(
            &doctor::ssh_add_command(),
            Duration::from_secs(10),
            |_, _| {},
        )
        .await
        .map(|out| out.stdout)
        .map_err(|e| e.stderr_tail().to_string());
        doctor::agent_from(listed.as_deref().map_err(String::as_str))
    } else {
        doctor::Agent::Absent
    };
    let mut files: Vec<PathBuf> = Vec::new();
    if let Some(identity) = &cli.ssh_identity {
        files.push(identity.clone());
    }
    if let Some(home) = std::env::var_os("HOME") {
        let dir = Path::new(&home).join(".ssh");
        files.extend(DEFAULT_KEYS.iter().map(|k| dir.join(k)));
    }
    if let Some(config) = &cli.ssh_config
        && let Ok(text) = std::fs::read_to_string(config)
    {
        files.extend(doctor::identity_files(&text).into_iter().map(PathBuf::from));
    }
    let present: Vec<String> = files
        .iter()
        .filter(|f| f.is_file())
        .map(|f| f.display().to_string())
        .collect();
    doctor::ssh_keys(agent, &present)
}

/// One line per finding, its fix under it, then the count.
fn print(report: &DoctorReport) {
    let rows = report
        .findings
        .iter()
        .map(|f| {
            vec![
                f.verdict.as_str().to_string(),
                f.host.clone().unwrap_or_else(|| "-".into()),
                f.check.clone(),
                f.detail.clone(),
            ]
        })
        .collect();
    output::table(&["RESULT", "HOST", "CHECK", "FOUND"], rows);
    let to_fix: Vec<&Finding> = report.findings.iter().filter(|f| f.fix.is_some()).collect();
    if !to_fix.is_empty() {
        println!();
        println!("To fix:");
        for f in to_fix {
            let subject = match &f.host {
                Some(host) => format!("{host} {}", f.check),
                None => f.check.clone(),
            };
            println!(
                "  {} ({}): {}",
                subject,
                f.verdict.as_str(),
                f.fix.as_deref().unwrap_or_default()
            );
        }
    }
    let count = |v: Verdict| report.findings.iter().filter(|f| f.verdict == v).count();
    println!();
    println!(
        "{} checks: {} ok, {} warnings, {} failed",
        report.findings.len(),
        count(Verdict::Ok),
        count(Verdict::Warn),
        count(Verdict::Fail)
    );
}
