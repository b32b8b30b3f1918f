//! Building a host's system on the host itself (`deployment.buildOnTarget`,
//! `--build-on-target`, deploy-rs's `remoteBuild`): the derivation and what
//! it needs are copied to the host (`nix copy --derivation`), which realises
//! it with its own substituters and builders. The coordinator builds nothing
//! and its store never holds the system, so what changes is read from the
//! host's closures ([`super::summary::host_closure_summary`]).

use nix_deploy_core::fleet::Host;
use nix_deploy_core::remote;

use crate::nix::Nix;
use crate::transport::ssh::{self, Connection, SshOptions};

/// Copy `host`'s derivation to it and realise it there; returns the system
/// (the toplevel), once the host has it: what it built must be what the
/// flake evaluated to.
pub(crate) async fn build(
    nix: &Nix,
    ssh_options: &SshOptions,
    connection: &Connection,
    host: &Host,
) -> Result<String, String> {
    let system = &host.system;
    let uri = host
        .target
        .store_uri()
        .ok_or_else(|| format!("{}: build: the host has no targetHost", host.name))?;
    let opts = ssh::nix_ssh_opts(&host.target, ssh_options, connection.control_socket())
        .map_err(|e| e.to_string())?;
    nix.copy_derivation(&uri, &system.drv_path, &opts)
        .await
        .map_err(|e| format!("{}: build: {e}", host.name))?;
    let out = connection
        .run(
            "build",
            &remote::realise_argv(&system.drv_path),
            nix.build_timeout,
        )
        .await
        .map_err(|e| e.to_string())?;
    let built: Vec<&str> = out.stdout.lines().map(str::trim).collect();
    if !built.contains(&system.build_output()) {
        return Err(format!(
            "{}: build: the host built {}, but the flake evaluated to {}",
            host.name,
            built.join(" "),
            system.build_output()
        ));
    }
    Ok(system.toplevel.clone())
}
