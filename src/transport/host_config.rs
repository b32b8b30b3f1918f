//! A host's own ssh options (`deployment.sshOptions`, deploy-rs's `sshOpts`)
//! as an ssh configuration file that our sessions, `ssh -G` and `nix copy`
//! all read ([`nix_deploy_core::sshopts`] turns the options into lines).

use std::path::PathBuf;

use nix_deploy_core::fleet::Target;

use super::ssh::{SshError, SshOptions};

/// The ssh configuration file a host's sessions (and its `nix copy`) read:
/// `--ssh-config` (or none: ssh's own), unless the host has extra ssh options
/// (`deployment.sshOptions`): then a file of their configuration lines
/// followed by that configuration ([`nix_deploy_core::sshopts`]; in ssh, the
/// first value given wins, as on the command line), written owner-only in the
/// control directory under a name that follows its contents.
pub fn host_config(target: &Target, options: &SshOptions) -> Result<Option<PathBuf>, SshError> {
    if target.ssh_options.is_empty() {
        return Ok(options.config_file.clone());
    }
    let refused = |message: String| SshError::Options {
        host: target.describe().to_string(),
        message,
    };
    let lines = nix_deploy_core::sshopts::config_lines(&target.ssh_options)
        .map_err(|e| refused(format!("deployment.sshOptions: {e}")))?;
    let mut text = String::from(
        "# nix-deploy: this host's deployment.sshOptions, then its ssh configuration.\n",
    );
    for line in lines {
        text.push_str(&line);
        text.push('\n');
    }
    match &options.config_file {
        Some(config) => text.push_str(&format!("Include \"{}\"\n", config.display())),
        None => text.push_str("Include ~/.ssh/config\nInclude /etc/ssh/ssh_config\n"),
    }
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(text.as_bytes());
    let name: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    let path = options.control_dir.join(format!("{name}.ssh_config"));
    if std::fs::read_to_string(&path).is_ok_and(|old| old == text) {
        return Ok(Some(path));
    }
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::create_dir_all(&options.control_dir)?;
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(text.as_bytes())?;
        std::fs::rename(&tmp, &path)
    };
    write().map_err(|e| refused(format!("writing {}: {e}", path.display())))?;
    Ok(Some(path))
}
