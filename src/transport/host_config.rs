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
    // Hosts sharing the same options connect at once and write the same
    // file: each through a temporary file of its own (owner-only), renamed
    // into place, so no writer ever sees another's half-written file or
    // loses its own to another's rename.
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        std::fs::create_dir_all(&options.control_dir)?;
        let mut file = tempfile::Builder::new()
            .prefix(&format!("{name}."))
            .suffix(".tmp")
            .tempfile_in(&options.control_dir)?;
        file.write_all(text.as_bytes())?;
        file.persist(&path).map(|_| ()).map_err(|e| e.error)
    };
    write().map_err(|e| refused(format!("writing {}: {e}", path.display())))?;
    Ok(Some(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Eight hosts with the same `sshOptions` connect at once: every one
    /// gets the file (one writer renaming its temporary file over another's
    /// made the others fail, and their masters were not kept).
    #[test]
    fn hosts_with_the_same_options_write_their_file_at_once() {
        for _ in 0..20 {
            at_once();
        }
    }

    fn at_once() {
        let dir = tempfile::tempdir().unwrap();
        let options = SshOptions::new(None, dir.path().join("control"));
        let target = Target {
            destination: Some("h".into()),
            user: None,
            port: None,
            ssh_options: vec!["-o".into(), "Compression=no".into()],
            escalation: nix_deploy_core::fleet::default_escalation(),
        };
        let start = std::sync::Barrier::new(16);
        let written: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..16)
                .map(|_| {
                    s.spawn(|| {
                        start.wait();
                        host_config(&target, &options)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let paths: Vec<PathBuf> = written.into_iter().map(|w| w.unwrap().unwrap()).collect();
        assert!(paths.windows(2).all(|p| p[0] == p[1]));
        let text = std::fs::read_to_string(&paths[0]).unwrap();
        assert!(text.contains("Compression no"), "{text}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&paths[0]).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // Nothing temporary left behind.
        let left = std::fs::read_dir(dir.path().join("control"))
            .unwrap()
            .count();
        assert_eq!(left, 1);
    }
}
