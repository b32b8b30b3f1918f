//! Knowing each host by the machine it is.
//!
//! [`Destination`]: where the ssh configuration really sends a host, as
//! `ssh -G` resolves it (address, port, user, keys, proxies): what a kept
//! master is found by.
//!
//! [`Identities`]: each host's identity, its `/etc/machine-id`, learned at
//! first contact and kept in an owner-only directory of the state directory
//! (one file per host). Every new master, every kept master reused for a
//! host and every confirmation's new connection is checked against it: a
//! machine that is not the one first seen as that host (an ssh config that
//! points the host at another machine, an address that moved) stops that
//! host with an error naming both, before anything runs there.
//! `nix-deploy forget-identity HOST` forgets one after a reinstall.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nix_deploy_core::fleet::Target;

use super::{Connection, SshError, SshOptions};
use crate::process::Cmd;
use crate::transport::host_config::host_config;

/// How long `ssh -G` may take: it reads the configuration and resolves
/// nothing over the network.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The settings of `ssh -G` that decide which machine a connection reaches
/// and as whom.
const DECISIVE: [&str; 9] = [
    "hostname",
    "port",
    "user",
    "identityfile",
    "certificatefile",
    "proxyjump",
    "proxycommand",
    "hostkeyalias",
    "userknownhostsfile",
];

/// Where a host's connections really go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    /// The decisive settings, `key value` per line, in `ssh -G`'s order.
    pub settings: String,
}

impl Destination {
    /// What `ssh -G` makes of `target` with our options and the host's own
    /// (`deployment.sshOptions`, through its [`host_config`]). The host's
    /// options are part of the result even where `ssh -G` shows none of
    /// them: a master opened with other options is never this host's.
    pub async fn resolve(target: &Target, options: &SshOptions) -> Result<Self, String> {
        let Some(destination) = target.destination.as_deref() else {
            return Err("deployment.targetHost is null: the host has no ssh destination".into());
        };
        let config = host_config(target, options).map_err(|e| e.to_string())?;
        let mut cmd = Cmd::new("ssh").arg("-G");
        if let Some(config) = &config {
            cmd = cmd.arg("-F").arg(config.to_string_lossy().into_owned());
        }
        if let Some(identity) = &options.identity_file {
            cmd = cmd.arg("-i").arg(identity.to_string_lossy().into_owned());
        }
        if let Some(port) = target.port {
            cmd = cmd.arg("-p").arg(port.to_string());
        }
        if let Some(user) = &target.user {
            cmd = cmd.arg("-l").arg(user.clone());
        }
        cmd = cmd.arg("--").arg(destination.to_string());
        let out = crate::process::run(&cmd, RESOLVE_TIMEOUT, |_, _| {})
            .await
            .map_err(|e| format!("resolving {destination} with `ssh -G`: {e}"))?;
        let mut resolved = Self::from_ssh_g(&out.stdout);
        if !target.ssh_options.is_empty() {
            resolved.settings.push_str("\nsshoptions ");
            resolved
                .settings
                .push_str(&nix_deploy_core::shell::join(&target.ssh_options));
        }
        Ok(resolved)
    }

    /// The decisive settings of `ssh -G`'s output.
    pub fn from_ssh_g(output: &str) -> Self {
        let settings = output
            .lines()
            .filter(|line| {
                let key = line.split_whitespace().next().unwrap_or_default();
                DECISIVE.contains(&key.to_ascii_lowercase().as_str())
            })
            .collect::<Vec<_>>()
            .join("\n");
        Destination { settings }
    }

    /// A short name for records: a digest of the settings.
    pub fn key(&self) -> String {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(self.settings.as_bytes());
        digest[..12].iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl Connection {
    /// The identity of the machine behind this connection, when it has one
    /// (`None` when identities are not checked).
    pub(super) async fn identity(&self, options: &SshOptions) -> Option<String> {
        options.identities.as_ref()?;
        match self
            .run("identity", &identity_argv(), options.command_timeout)
            .await
        {
            Ok(out) => parse_identity(&out.stdout),
            Err(e) => {
                tracing::warn!(host = %self.host, cause = %e, "cannot read the machine's identity");
                None
            }
        }
    }

    /// This connection reaches the machine first seen as its host (learned
    /// now at first contact). A machine without an identity cannot be told
    /// from another: said, not checked.
    pub(super) async fn check_identity(
        &self,
        options: &SshOptions,
        identity: Option<&str>,
    ) -> Result<(), SshError> {
        let Some(identities) = &options.identities else {
            return Ok(());
        };
        let Some(found) = identity else {
            tracing::warn!(
                host = %self.host,
                "the machine has no /etc/machine-id: it cannot be told from another machine"
            );
            return Ok(());
        };
        let named = self.target.describe();
        match identities.check(&self.host, named, found) {
            Err(SshError::Identity {
                host,
                expected,
                found,
                ..
            }) => {
                // Say where the ssh config really sent it.
                let destination = match Destination::resolve(&self.target, options).await {
                    Ok(resolved) => resolved
                        .settings
                        .lines()
                        .find_map(|l| l.strip_prefix("hostname "))
                        .map(|address| format!("{named} ({address})"))
                        .unwrap_or_else(|| named.to_string()),
                    Err(_) => named.to_string(),
                };
                Err(SshError::Identity {
                    host,
                    destination,
                    expected,
                    found,
                })
            }
            other => other,
        }
    }
}

/// The remote command that prints a machine's identity.
pub(super) fn identity_argv() -> Vec<String> {
    ["cat", "/etc/machine-id"].map(String::from).to_vec()
}

/// A machine id as systemd writes it: 32 hex digits.
pub(super) fn parse_identity(stdout: &str) -> Option<String> {
    let id = stdout.trim();
    (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_ascii_lowercase())
}

/// Each host's identity as first seen.
#[derive(Clone, Debug)]
pub struct Identities {
    dir: PathBuf,
}

impl Identities {
    /// Identities kept in `dir` (created owner-only).
    pub fn new(dir: PathBuf) -> std::io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        Ok(Identities { dir })
    }

    fn file(&self, host: &str) -> PathBuf {
        // Host names are validated (letters, digits, `-`, `_`, `.`), never
        // `..` alone: one file each.
        self.dir.join(format!("{host}.id"))
    }

    /// The identity `host` was first seen with, if it was.
    pub fn expected(&self, host: &str) -> Option<String> {
        std::fs::read_to_string(self.file(host))
            .ok()
            .and_then(|text| parse_identity(&text))
    }

    /// Forget `host`'s identity (a reinstalled machine); whether there was one.
    pub fn forget(&self, host: &str) -> std::io::Result<bool> {
        match std::fs::remove_file(self.file(host)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Check that `found` is `host`'s identity; learn it at first contact.
    pub(super) fn check(&self, host: &str, destination: &str, found: &str) -> Result<(), SshError> {
        match self.expected(host) {
            Some(expected) if expected == found => Ok(()),
            Some(expected) => Err(SshError::Identity {
                host: host.to_string(),
                destination: destination.to_string(),
                expected,
                found: found.to_string(),
            }),
            None => self.learn(host, found).map_err(|e| SshError::Connect {
                host: host.to_string(),
                destination: destination.to_string(),
                message: format!(
                    "cannot remember its identity in {}: {e}",
                    self.dir.display()
                ),
            }),
        }
    }

    /// Owner-only, like everything in the state directory.
    fn learn(&self, host: &str, identity: &str) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.file(host);
        let tmp = path.with_extension("tmp");
        let _ = std::fs::remove_file(&tmp);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?
            .write_all(format!("{identity}\n").as_bytes())?;
        std::fs::rename(&tmp, &path)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_destination_is_what_ssh_resolves_not_how_the_config_spells_it() {
        let a = Destination::from_ssh_g(
            "user root\nhostname 127.1.2.3\nport 22\naddkeystoagent false\nidentityfile ~/.ssh/id\nproxyjump none\n",
        );
        let same = Destination::from_ssh_g(
            "user root\nhostname 127.1.2.3\nport 22\naddkeystoagent true\nidentityfile ~/.ssh/id\nproxyjump none\n",
        );
        let moved = Destination::from_ssh_g(
            "user root\nhostname 127.1.2.4\nport 22\nidentityfile ~/.ssh/id\nproxyjump none\n",
        );
        assert_eq!(
            a.key(),
            same.key(),
            "settings that do not decide the machine"
        );
        assert_ne!(a.key(), moved.key());
        assert_eq!(a.key().len(), 24);
    }

    #[tokio::test]
    async fn a_hosts_own_ssh_options_are_part_of_where_it_goes() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("ssh_config");
        std::fs::write(&config, "Host web1\n  HostName 127.0.0.9\n").unwrap();
        let options = SshOptions::new(Some(config), dir.path().join("control"));
        let mut target = Target {
            destination: Some("web1".into()),
            user: Some("root".into()),
            port: None,
            ssh_options: Vec::new(),
            escalation: nix_deploy_core::fleet::default_escalation(),
        };
        let plain = Destination::resolve(&target, &options).await.unwrap();
        assert!(plain.settings.contains("hostname 127.0.0.9"), "{plain:?}");
        // Options ssh -G shows nothing decisive of still make another master.
        target.ssh_options = ["-o", "ServerAliveInterval=7"].map(String::from).to_vec();
        let other = Destination::resolve(&target, &options).await.unwrap();
        assert_ne!(plain.key(), other.key());
        // Options that send the host elsewhere are resolved by ssh itself.
        target.ssh_options = ["-o", "HostName=127.0.0.10"].map(String::from).to_vec();
        let moved = Destination::resolve(&target, &options).await.unwrap();
        assert!(moved.settings.contains("hostname 127.0.0.10"), "{moved:?}");
        // No destination, nothing to resolve.
        target.destination = None;
        assert!(Destination::resolve(&target, &options).await.is_err());
    }

    #[test]
    fn identities_are_learned_once_and_checked_after() {
        let dir = tempfile::tempdir().unwrap();
        let ids = Identities::new(dir.path().join("identities")).unwrap();
        let one = "0123456789abcdef0123456789abcdef";
        let two = "fedcba9876543210fedcba9876543210";
        assert_eq!(ids.expected("h1"), None);
        ids.check("h1", "127.0.0.2", one).unwrap();
        assert_eq!(ids.expected("h1").as_deref(), Some(one));
        ids.check("h1", "127.0.0.2", one).unwrap();
        let e = ids.check("h1", "127.0.0.3", two).unwrap_err().to_string();
        assert!(
            e.contains("h1") && e.contains("127.0.0.3") && e.contains("machine"),
            "{e}"
        );
        assert!(e.contains("forget-identity h1"), "{e}");
        assert!(ids.forget("h1").unwrap());
        assert!(!ids.forget("h1").unwrap());
        ids.check("h1", "127.0.0.3", two).unwrap();
        assert_eq!(
            parse_identity(&format!("{}\n", one.to_uppercase())).as_deref(),
            Some(one)
        );
        assert_eq!(parse_identity("cat: /etc/machine-id: No such file"), None);
    }
}
