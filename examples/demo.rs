//! `just demo`: a local fleet shaped like the seed's (p620, p510, razer,
//! samsung) on real loopback test hosts, deployed with the real `nix-deploy`
//! binary, then one host changed and the fleet deployed again, a failing
//! change rolled back, and one command run on every host.
//!
//! Usage: demo [PATH-TO-nix-deploy]

// The test fleet and the programs that drive the real binary spawn processes
// themselves; the product does it only in `nix_deploy::process`.
#![allow(clippy::disallowed_methods)]

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, bail};
use nix_deploy_testkit::{Fleet, HostSpec};

fn main() -> anyhow::Result<()> {
    let binary = match std::env::args().nth(1) {
        Some(path) => PathBuf::from(path),
        None => std::env::current_exe()?
            .parent()
            .and_then(|examples| examples.parent())
            .map(|dir| dir.join("nix-deploy"))
            .context("cannot locate the nix-deploy binary; pass its path")?,
    };
    if !binary.is_file() {
        bail!(
            "{} does not exist: build it first (cargo build --release)",
            binary.display()
        );
    }

    banner("Starting a demo fleet: 4 NixOS-like test hosts on loopback addresses");
    let mut fleet = Fleet::start(vec![
        HostSpec::new("p620")
            .role("infrastructure")
            .tags(&["monitoring", "workstation"])
            .service("prometheus")
            .service("grafana")
            .activation_delay_ms(900),
        HostSpec::new("p510")
            .role("media-server")
            .tags(&["server"])
            .depends_on(&["p620"])
            .service("jellyfin")
            .activation_delay_ms(700),
        HostSpec::new("razer")
            .role("mobile")
            .tags(&["laptop"])
            .depends_on(&["p620"])
            .service("node-exporter")
            .package("firefox-120.0")
            .activation_delay_ms(600),
        HostSpec::new("samsung")
            .role("mobile")
            .tags(&["laptop"])
            .depends_on(&["p620"])
            .service("node-exporter")
            .activation_delay_ms(500),
    ])?;
    let state = tempfile::Builder::new()
        .prefix("nix-deploy-demo-")
        .tempdir()?;
    for name in fleet.host_names() {
        println!(
            "  {name:<8} ssh root@{} (own /nix store and /run)",
            fleet.address(&name)
        );
    }
    println!("  flake: {}", fleet.flake_ref());

    let run = |fleet: &Fleet, args: &[&str]| -> anyhow::Result<i32> {
        println!("\n$ nix-deploy {}", args.join(" "));
        let status = Command::new(&binary)
            .arg("--flake")
            .arg(fleet.flake_ref())
            .arg("--ssh-config")
            .arg(fleet.ssh_config())
            .arg("--state-dir")
            .arg(state.path())
            .args(args)
            .envs(fleet.env())
            .status()
            .with_context(|| format!("running {}", binary.display()))?;
        Ok(status.code().unwrap_or(-1))
    };

    banner(
        "1. The plan: every host is new, so every host is CHANGED; p620 (infrastructure) goes first",
    );
    run(&fleet, &["plan"])?;

    banner("2. Deploy the whole fleet");
    let code = run(&fleet, &["deploy", "--all"])?;
    if code != 0 {
        bail!("the first deployment failed (exit code {code})");
    }

    banner(
        "3. Change one host's configuration (razer: new node-exporter, firefox upgraded, htop added)",
    );
    fleet.update("razer", |spec| {
        spec.bump();
        spec.extra_packages = vec!["firefox-121.0".into(), "htop-3.2.2".into()];
    })?;
    println!("  razer now evaluates to {}", fleet.toplevel("razer")?);
    run(&fleet, &["plan"])?;

    banner("4. Deploy again: only razer is deployed, the others are skipped");
    let code = run(&fleet, &["deploy", "--all"])?;
    if code != 0 {
        bail!("the second deployment failed (exit code {code})");
    }

    banner("5. A change whose activation fails is rolled back automatically");
    fleet.update("samsung", |spec| {
        spec.bump();
        spec.fail_switch = true;
    })?;
    let code = run(&fleet, &["deploy", "samsung"])?;
    println!("  (exit code {code}: a host was rolled back)");

    banner("6. One command on many hosts, one summary (the seeds' multi-host check as one exec)");
    let code = run(
        &fleet,
        &[
            "exec",
            "--all",
            "--",
            "systemctl",
            "is-active",
            "node-exporter",
        ],
    )?;
    println!("  (exit code {code}: the laptops run node-exporter, the servers do not)");

    banner("7. What the history remembers");
    run(&fleet, &["status"])?;
    run(&fleet, &["history"])?;

    for name in fleet.host_names() {
        println!(
            "  {name:<8} runs generation {} ({})",
            fleet
                .generation(&name)
                .map(|g| g.to_string())
                .unwrap_or("-".into()),
            fleet.current_system(&name).unwrap_or_default()
        );
    }
    banner("Demo done; stopping the test hosts");
    fleet.stop();
    Ok(())
}

fn banner(text: &str) {
    println!("\n\x1b[1m== {text}\x1b[0m");
}
