//! Rebooting a test host for real, as a machine reboots:
//!
//! 1. every process of the host is stopped (its sshd, every connection and
//!    whatever runs over them);
//! 2. its `/run` (a tmpfs on NixOS) is emptied, except the testkit's own
//!    records (`activations.log`, `boot.log`, `reboots.log`);
//! 3. it gets a new **boot id**: each host has its own `H/boot_id`,
//!    bind-mounted over `/proc/sys/kernel/random/boot_id` in its namespace,
//!    so the coordinator reads the same file it reads on a real machine;
//! 4. its boot generation (what `/nix/var/nix/profiles/system` points at) is
//!    activated, in the host's namespace, as NixOS's stage 2 does:
//!    `/run/booted-system` and `/run/current-system` point at it and its
//!    units come up (the system's `switch-to-configuration test` does that
//!    part; it is not recorded in `activations.log`, since no deployer ran
//!    it). `reboots.log` gets a `TIME boot PATH BOOT_ID` line;
//! 5. its sshd starts again.
//!
//! A host asks for a reboot the way the coordinator asks a NixOS machine:
//! `systemctl reboot` (the test system's `systemctl`) writes
//! `/run/testkit-reboot-request`, and [`Fleet::serve_reboots`] (called by a
//! test while the coordinator runs) carries it out. Nothing in here can
//! reboot the machine the tests run on.

use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::fleet::Fleet;
use crate::sys::*;

/// What survives a test host's reboot in its `/run`: the testkit's records.
const KEPT: [&str; 3] = ["activations.log", "boot.log", "reboots.log"];

/// The file a host asks for a reboot with (in its `/run`).
const REQUEST: &str = "testkit-reboot-request";

fn new_boot_id() -> String {
    let (a, b) = (random_u64(), random_u64());
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        ((b >> 48) & 0x3fff) | 0x8000,
        b & 0xffff_ffff_ffff
    )
}

/// Gives a host directory its machine id (`H/machine-id`, bind-mounted over
/// `/etc/machine-id`: 32 hex digits, kept for the host's life), if it has
/// none yet.
pub(crate) fn ensure_machine_id(dir: &Path) -> Result<()> {
    let path = dir.join("machine-id");
    if !path.exists() {
        let id = format!("{:016x}{:016x}", random_u64(), random_u64());
        write_atomic(&path, &format!("{id}\n"))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Gives a host directory its boot id file, if it has none yet.
pub(crate) fn ensure_boot_id(dir: &Path) -> Result<()> {
    let path = dir.join("boot_id");
    if !path.exists() {
        write_atomic(&path, &format!("{}\n", new_boot_id()))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

impl Fleet {
    /// The host's machine id (what its `/etc/machine-id` says).
    pub fn machine_id(&self, name: &str) -> Option<String> {
        fs::read_to_string(self.host_dir(name).join("machine-id"))
            .ok()
            .map(|id| id.trim().to_string())
    }

    /// The host's current boot id (what its `/proc/sys/kernel/random/boot_id` says).
    pub fn boot_id(&self, name: &str) -> Option<String> {
        fs::read_to_string(self.host_dir(name).join("boot_id"))
            .ok()
            .map(|id| id.trim().to_string())
    }

    /// Systems the host booted, oldest first (`reboots.log`).
    pub fn reboots(&self, name: &str) -> Vec<String> {
        let log =
            fs::read_to_string(self.host_dir(name).join("run/reboots.log")).unwrap_or_default();
        log.lines()
            .filter_map(|l| l.split_whitespace().nth(2))
            .map(str::to_string)
            .collect()
    }

    /// The system the host's `/run/booted-system` points at, if any.
    pub fn booted_system(&self, name: &str) -> Option<String> {
        let link = fs::read_link(self.host_dir(name).join("run/booted-system")).ok()?;
        Some(link.to_string_lossy().into_owned())
    }

    /// Whether the host asked for a reboot (`systemctl reboot`) not yet done.
    pub fn reboot_requested(&self, name: &str) -> bool {
        self.host_dir(name).join("run").join(REQUEST).exists()
    }

    /// Carries out the reboots hosts asked for; returns their names.
    pub fn serve_reboots(&mut self) -> Result<Vec<String>> {
        let asked: Vec<String> = self
            .host_names()
            .into_iter()
            .filter(|name| self.reboot_requested(name))
            .collect();
        for name in &asked {
            self.reboot_host(name)?;
        }
        Ok(asked)
    }

    /// Reboots the host for real (see the module documentation): all its
    /// processes stopped, `/run` emptied, a new boot id, its boot generation
    /// activated, its sshd started again.
    pub fn reboot_host(&mut self, name: &str) -> Result<()> {
        let i = self.index(name);
        self.kill_hosts(&[i])
            .with_context(|| format!("rebooting host {name}: stopping it"))?;
        let dir = self.host_dir(name);
        empty_run(&dir.join("run")).with_context(|| format!("rebooting host {name}"))?;
        let boot_id = new_boot_id();
        write_atomic(&dir.join("boot_id"), &format!("{boot_id}\n"))?;
        if let Some(system) = self
            .generation(name)
            .and_then(|g| self.generation_path(name, g))
        {
            boot_into(&dir, &system).with_context(|| format!("rebooting host {name}"))?;
            let line = format!("{} boot {system} {boot_id}\n", unix_time());
            append(&dir.join("run/reboots.log"), &line)?;
        }
        let old = self.hosts[i].addr;
        self.start_hosts(&[i])?;
        if self.hosts[i].addr != old {
            self.write_ssh_config()?;
        }
        Ok(())
    }
}

fn unix_time() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{}.{:09}", now.as_secs(), now.subsec_nanos())
}

fn append(path: &Path, line: &str) -> Result<()> {
    use std::io::Write;
    let mut file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    file.write_all(line.as_bytes())?;
    Ok(())
}

/// Empties a host's `/run`, keeping the testkit's records.
fn empty_run(run: &Path) -> Result<()> {
    for entry in fs::read_dir(run).with_context(|| format!("reading {}", run.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        if KEPT.iter().any(|k| name == *k) {
            continue;
        }
        let path = entry.path();
        let meta = fs::symlink_metadata(&path)?;
        if meta.is_dir() {
            make_removable(&path);
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        }
        .with_context(|| format!("removing {}", path.display()))?;
    }
    Ok(())
}

/// Activates `system` at boot, inside the host's own mounts (never the
/// machine's `/run`): `/run/booted-system`, then its units and
/// `/run/current-system` through its `switch-to-configuration test`, whose
/// entries in `activations.log` are dropped again (no deployer ran it); the
/// host's activation history keeps it, marked `boot`.
fn boot_into(dir: &Path, system: &str) -> Result<()> {
    const SCRIPT: &str = r#"mount --bind "$1/nix" /nix && mount --bind "$1/run" /run || exit 1
log=/run/activations.log
if [ -e "$log" ]; then cp "$log" /run/.activations.boot; else : > /run/.activations.boot; fi
ln -sfn "$2" /run/booted-system
TESTKIT_ACTIVATED_BY=boot "$2/bin/switch-to-configuration" test >/dev/null 2>&1
mv /run/.activations.boot "$log"
exit 0"#;
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        SCRIPT,
        "testkit-boot",
    ])
    .arg(dir)
    .arg(system);
    let out =
        run_with_timeout(cmd, crate::SSH_TIMEOUT).context("activating the boot generation")?;
    if !out.status.success() {
        bail!(
            "activating {system} at boot failed ({}): {}",
            describe(out.status),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_ids_look_like_the_kernels() {
        let id = new_boot_id();
        assert_eq!(id.len(), 36, "{id}");
        assert!(
            id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-'),
            "{id}"
        );
        assert_ne!(id, new_boot_id());
    }
}
