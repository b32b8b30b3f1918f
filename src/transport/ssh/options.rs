//! What every connection of a run shares ([`SshOptions`]), and how a host's
//! sessions and its `nix copy` are told the same ssh settings: ours, the
//! host's own (`deployment.sshOptions`, through its [`host_config`]) and
//! its port and user.

use std::path::{Path, PathBuf};
use std::time::Duration;

use openssh::{ControlPersist, KnownHosts, SessionBuilder};

use nix_deploy_core::fleet::Target;

use super::{Identities, KeepAlive, SshError};
use crate::transport::host_config::host_config;

/// Options shared by every connection of a run.
#[derive(Clone, Debug)]
pub struct SshOptions {
    /// `--ssh-config`: replaces the user's ssh config for our sessions and `nix copy`.
    pub config_file: Option<PathBuf>,
    /// `--ssh-identity` (the daemon's `ssh-identity-file`): a private key
    /// offered by our sessions and `nix copy` (ssh's `-i`).
    pub identity_file: Option<PathBuf>,
    pub connect_timeout: Duration,
    /// Default timeout of a remote command when the step sets none.
    pub command_timeout: Duration,
    /// Where master sockets live; short, because socket paths are limited to ~100 bytes.
    pub control_dir: PathBuf,
    /// Keep masters alive between runs; `None`: every run connects anew.
    pub keep: Option<KeepAlive>,
    /// Each host's identity as first seen, checked on every new connection;
    /// `None`: not checked (only tests of this module).
    pub identities: Option<Identities>,
    /// The host that is this machine (`apply-local`): its commands run here
    /// as local processes, never over SSH.
    pub local: Option<String>,
}

impl SshOptions {
    pub fn new(config_file: Option<PathBuf>, control_dir: PathBuf) -> Self {
        SshOptions {
            config_file,
            identity_file: None,
            connect_timeout: Duration::from_secs(10),
            command_timeout: Duration::from_secs(60),
            control_dir,
            keep: None,
            identities: None,
            local: None,
        }
    }
}

/// `config`: the host's ssh configuration ([`host_config`]).
pub(super) fn builder(
    target: &Target,
    options: &SshOptions,
    keep: Option<&KeepAlive>,
    config: Option<&Path>,
) -> SessionBuilder {
    let mut b = SessionBuilder::default();
    // accept-new: first contact records the key, a changed key is refused.
    b.known_hosts_check(KnownHosts::Add)
        .connect_timeout(options.connect_timeout)
        .server_alive_interval(Duration::from_secs(5));
    if let Some(user) = &target.user {
        b.user(user.clone());
    }
    match keep {
        Some(keep) => {
            let idle = std::num::NonZeroUsize::new(keep.idle.as_secs().max(1) as usize)
                .expect("at least one second");
            b.control_directory(&keep.dir)
                .control_persist(ControlPersist::IdleFor(idle));
        }
        None => {
            b.control_directory(&options.control_dir);
        }
    }
    if let Some(port) = target.port {
        b.port(port);
    }
    if let Some(config) = config {
        b.config_file(config);
    }
    if let Some(identity) = &options.identity_file {
        b.keyfile(identity);
    }
    b
}

/// `NIX_SSHOPTS` for `nix copy`: the same ssh settings as our own sessions
/// (the host's own options through its [`host_config`]).
///
/// Nix 2.8 splits `NIX_SSHOPTS` on whitespace, so a config path containing
/// whitespace is refused rather than silently broken.
///
/// With `control_socket`, `nix copy` reuses our master connection to the host
/// (no second SSH handshake); if that master is gone, ssh connects normally.
pub fn nix_ssh_opts(
    target: &Target,
    options: &SshOptions,
    control_socket: Option<&Path>,
) -> Result<String, SshError> {
    let config = host_config(target, options)?;
    let mut opts = vec![
        "-o".to_string(),
        "BatchMode=yes".to_string(),
        "-o".to_string(),
        format!(
            "ConnectTimeout={}",
            options.connect_timeout.as_secs().max(1)
        ),
        "-o".to_string(),
        "StrictHostKeyChecking=accept-new".to_string(),
    ];
    if let Some(config) = &config {
        let text = config.to_string_lossy();
        if text.chars().any(char::is_whitespace) {
            return Err(SshError::ConfigPath(config.clone()));
        }
        opts.insert(0, text.into_owned());
        opts.insert(0, "-F".to_string());
    }
    if let Some(port) = target.port {
        opts.push("-p".to_string());
        opts.push(port.to_string());
    }
    if let Some(identity) = &options.identity_file {
        let text = identity.to_string_lossy();
        if text.chars().any(char::is_whitespace) {
            return Err(SshError::ConfigPath(identity.clone()));
        }
        opts.extend(["-i".to_string(), text.into_owned()]);
    }
    if let Some(socket) = control_socket {
        let text = socket.to_string_lossy();
        if !text.chars().any(char::is_whitespace) {
            opts.extend([
                "-o".to_string(),
                format!("ControlPath={text}"),
                "-o".to_string(),
                "ControlMaster=no".to_string(),
            ]);
        }
    }
    Ok(opts.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(port: Option<u16>) -> Target {
        Target {
            destination: Some("web1".into()),
            user: Some("root".into()),
            port,
            ssh_options: Vec::new(),
            escalation: nix_deploy_core::fleet::default_escalation(),
        }
    }

    #[test]
    fn nix_ssh_opts_carry_config_and_port() {
        let options = SshOptions::new(Some("/etc/fleet/ssh_config".into()), "/tmp/c".into());
        assert_eq!(
            nix_ssh_opts(&target(Some(2222)), &options, None).unwrap(),
            "-F /etc/fleet/ssh_config -o BatchMode=yes -o ConnectTimeout=10 \
             -o StrictHostKeyChecking=accept-new -p 2222"
        );
        let options = SshOptions::new(None, "/tmp/c".into());
        assert!(
            !nix_ssh_opts(&target(None), &options, None)
                .unwrap()
                .contains("-F")
        );
        let options = SshOptions::new(Some("/my configs/ssh".into()), "/tmp/c".into());
        assert!(nix_ssh_opts(&target(None), &options, None).is_err());
    }

    #[test]
    fn a_hosts_own_ssh_options_reach_nix_copy_through_its_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let options = SshOptions::new(None, dir.path().to_path_buf());
        let mut own = target(None);
        own.ssh_options = ["-o", "ProxyJump=bastion", "-i", "/keys/deploy"]
            .map(String::from)
            .to_vec();
        let opts = nix_ssh_opts(&own, &options, None).unwrap();
        let config = opts
            .strip_prefix("-F ")
            .and_then(|rest| rest.split(' ').next())
            .expect("a config file first");
        assert!(config.starts_with(&*dir.path().to_string_lossy()), "{opts}");
        let text = std::fs::read_to_string(config).unwrap();
        assert!(text.contains("ProxyJump bastion"), "{text}");
        assert!(text.contains("Include ~/.ssh/config"), "{text}");
        // The same options, the same file; others, another.
        assert_eq!(nix_ssh_opts(&own, &options, None).unwrap(), opts);
        own.ssh_options = ["-o", "ProxyJump=other"].map(String::from).to_vec();
        assert_ne!(nix_ssh_opts(&own, &options, None).unwrap(), opts);
    }
}
