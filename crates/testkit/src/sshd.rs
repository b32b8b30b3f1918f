//! Each host's sshd in its own mount namespace: starting, stopping, finding
//! its processes, the fleet's ssh config and the reaper.

use std::fmt::Write as _;
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::fleet::*;
use crate::sys::*;
use crate::*;

impl Fleet {
    /// Panics unless the fleet has a host `name`.
    pub(crate) fn assert_host(&self, name: &str) {
        self.index(name);
    }

    pub(crate) fn index(&self, name: &str) -> usize {
        self.specs
            .iter()
            .position(|s| s.name == name)
            .unwrap_or_else(|| panic!("testkit: the fleet has no host named {name:?}"))
    }

    pub(crate) fn host(&self, name: &str) -> &Host {
        &self.hosts[self.index(name)]
    }

    pub(crate) fn profiles_dir(&self, name: &str) -> PathBuf {
        self.host(name).dir.join("nix/var/nix/profiles")
    }

    /// (mountinfo needle, cmdline needle) identifying the processes of host `i`.
    pub(crate) fn needles(&self, i: usize) -> (String, String) {
        let name = &self.hosts[i].name;
        (
            format!("/{}/hosts/{name}/nix ", self.tag),
            format!("{}/hosts/{name}/sshd_config", self.tag),
        )
    }

    /// Needles identifying the processes of all hosts of the fleet.
    pub(crate) fn fleet_needles(&self) -> (String, String) {
        (
            format!("/{}/hosts/", self.tag),
            format!("{}/hosts/", self.tag),
        )
    }

    pub(crate) fn signal_host(&self, name: &str, signal: i32) -> Result<()> {
        let pids = self.host_processes(name);
        if pids.is_empty() {
            bail!("host {name} has no running processes");
        }
        for pid in pids {
            send_signal(pid as i32, signal);
        }
        Ok(())
    }

    /// The lowest address of the fleet's block that no host uses and that is
    /// free.
    pub(crate) fn free_address(&self) -> Result<Ipv4Addr> {
        let (a, b) = self.block;
        (1..=254)
            .map(|x| Ipv4Addr::new(127, a, b, x))
            .find(|addr| !self.hosts.iter().any(|h| h.addr == *addr) && address_free(*addr))
            .ok_or_else(|| anyhow!("no free address left in 127.{a}.{b}.0/24"))
    }

    /// Starts the sshd of each host in `idxs`, in parallel, and waits until
    /// each answers with its own banner. A host whose address turns out to
    /// be taken moves to another address of the block.
    pub(crate) fn start_hosts(&mut self, idxs: &[usize]) -> Result<()> {
        let mut pending: Vec<(usize, u32, Instant)> = Vec::new();
        for &i in idxs {
            self.spawn_sshd(i)?;
            pending.push((i, 1, Instant::now() + START_TIMEOUT));
        }
        while !pending.is_empty() {
            let mut still = Vec::new();
            for (i, attempt, deadline) in pending {
                let exited = {
                    let host = &mut self.hosts[i];
                    let child = host.sshd.as_mut().expect("spawned");
                    child
                        .try_wait()
                        .with_context(|| format!("host {}: waiting for sshd", host.name))?
                };
                if let Some(status) = exited {
                    self.hosts[i].sshd = None;
                    let log = self.sshd_log(&self.hosts[i].name.clone());
                    let taken = log.contains("Address already in use")
                        || log.contains("Cannot bind any address");
                    if taken && attempt < BIND_ATTEMPTS {
                        self.hosts[i].addr = self.free_address().with_context(|| {
                            format!("host {}: its address was taken", self.hosts[i].name)
                        })?;
                        self.spawn_sshd(i)?;
                        still.push((i, attempt + 1, Instant::now() + START_TIMEOUT));
                        continue;
                    }
                    bail!(
                        "host {}: sshd exited ({status}) instead of listening on {}:{SSH_PORT}; \
                         {}:\n{}",
                        self.hosts[i].name,
                        self.hosts[i].addr,
                        self.hosts[i].dir.join("sshd.log").display(),
                        tail(&log, 30)
                    );
                }
                let host = &self.hosts[i];
                if banner_is(host.addr, &self.banner_token(&host.name)) {
                    continue;
                }
                if Instant::now() > deadline {
                    bail!(
                        "host {}: sshd did not accept connections on {}:{SSH_PORT} within {:?}; \
                         {}:\n{}",
                        host.name,
                        host.addr,
                        START_TIMEOUT,
                        host.dir.join("sshd.log").display(),
                        tail(&self.sshd_log(&host.name), 30)
                    );
                }
                still.push((i, attempt, deadline));
            }
            pending = still;
            if !pending.is_empty() {
                std::thread::sleep(POLL);
            }
        }
        Ok(())
    }

    pub(crate) fn banner_token(&self, name: &str) -> String {
        format!("{}-{name}", self.tag)
    }

    /// Writes host `i`'s sshd_config and spawns its sshd in a new mount
    /// namespace (see the module documentation).
    pub(crate) fn spawn_sshd(&mut self, i: usize) -> Result<()> {
        let token = self.banner_token(&self.hosts[i].name);
        let authorized = fs::read(self.dir.join("id.pub")).context("reading FLEET/id.pub")?;
        let host = &mut self.hosts[i];
        let dir = host.dir.clone();
        fs::write(dir.join("authorized_keys"), authorized)
            .with_context(|| format!("host {}: writing authorized_keys", host.name))?;
        // The host's own boot id, new with each reboot (crate::reboot), and
        // its own machine id, as every machine has.
        crate::reboot::ensure_boot_id(&dir)?;
        crate::reboot::ensure_machine_id(&dir)?;
        // Lets tests check over ssh which host they reached.
        fs::write(dir.join("run/testkit-host"), format!("{}\n", host.name))
            .with_context(|| format!("host {}: writing run/testkit-host", host.name))?;
        // The host's Nix: no build users (none exist), no sandbox (builders
        // are /bin/sh), and only the substituters its spec names: it builds
        // (buildOnTarget) and substitutes as a NixOS host with a cache would.
        let nix_conf = format!(
            "substituters = {}\nbuild-users-group =\nsandbox = false\n",
            self.specs[i].substituters.as_deref().unwrap_or("")
        );
        write_atomic(&dir.join("nix.conf"), &nix_conf)
            .with_context(|| format!("host {}: writing nix.conf", host.name))?;
        let config = format!(
            "ListenAddress {addr}\n\
             Port {SSH_PORT}\n\
             HostKey {dir}/hostkey\n\
             AuthorizedKeysFile {dir}/authorized_keys\n\
             PermitRootLogin prohibit-password\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             UsePAM no\n\
             StrictModes no\n\
             PidFile none\n\
             MaxStartups 100:30:200\n\
             MaxSessions 100\n\
             VersionAddendum {token}\n\
             SetEnv PATH=/run/current-system/sw/bin:/usr/local/bin:/usr/bin:/bin \
             NIX_USER_CONF_FILES={dir}/nix.conf\n",
            addr = host.addr,
            dir = dir.display(),
        );
        write_atomic(&dir.join("sshd_config"), &config)
            .with_context(|| format!("host {}: writing sshd_config", host.name))?;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("sshd.log"))
            .with_context(|| format!("host {}: opening sshd.log", host.name))?;
        let user_setup = match self.specs[i].user.clone() {
            Some(user) => prepare_user(&self.dir, &dir, &user)
                .with_context(|| format!("host {}: preparing user {user}", self.hosts[i].name))?,
            None => String::new(),
        };
        let host = &mut self.hosts[i];
        let script = format!(
            "mount --bind \"$1/nix\" /nix && mount --bind \"$1/run\" /run && \
             mount --bind \"$1/root\" /root && \
             mount --bind \"$1/boot_id\" /proc/sys/kernel/random/boot_id && \
             mount --bind \"$1/machine-id\" /etc/machine-id && {user_setup}\
             mkdir -p /run/sshd && echo $$ > /run/testkit-sshd.pid && \
             exec {SSHD} -D -e -f \"$1/sshd_config\""
        );
        let child = Command::new("setsid")
            .args(["unshare", "--mount", "--propagation", "private"])
            .args(["sh", "-c", &script, "testkit-host"])
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("host {}: spawning sshd", host.name))?;
        host.sshd = Some(child);
        Ok(())
    }

    /// Kills all processes of the hosts `idxs` (TERM, then KILL after
    /// [`TERM_GRACE`]) and reaps their sshd.
    pub(crate) fn kill_hosts(&mut self, idxs: &[usize]) -> Result<()> {
        let needles: Vec<(String, String)> = if idxs.len() == self.hosts.len() {
            vec![self.fleet_needles()]
        } else {
            idxs.iter().map(|&i| self.needles(i)).collect()
        };
        let start = Instant::now();
        let mut signal = libc::SIGTERM;
        loop {
            let mut alive = 0;
            for &i in idxs {
                let Some(child) = self.hosts[i].sshd.as_mut() else {
                    continue;
                };
                if child.try_wait()?.is_some() {
                    self.hosts[i].sshd = None;
                    continue;
                }
                // Not reaped yet, so the pid (and process group) is still ours.
                alive += 1;
                let pgid = child.id() as i32;
                send_signal(-pgid, signal);
                send_signal(-pgid, libc::SIGCONT);
            }
            let stray = find_processes(&needles);
            for &pid in &stray {
                send_signal(pid as i32, signal);
                send_signal(pid as i32, libc::SIGCONT);
            }
            if alive == 0 && stray.is_empty() {
                return Ok(());
            }
            let elapsed = start.elapsed();
            if elapsed > TERM_GRACE {
                signal = libc::SIGKILL;
            }
            if elapsed > TERM_GRACE + Duration::from_secs(5) {
                bail!("{alive} sshd listener(s) and processes {stray:?} survived SIGKILL");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Spawns the fleet's reaper (see the module documentation).
    pub(crate) fn spawn_reaper(&mut self) -> Result<()> {
        const SCRIPT: &str = r#"trap '' HUP INT PIPE
IFS= read -r line
[ "$line" = stop ] && exit 0
n=0
while [ $n -lt 50 ]; do
  pids=$(/bin/grep -lF -- "$2" /proc/[0-9]*/mountinfo 2>/dev/null | /bin/sed -n 's|^/proc/\([0-9]*\)/mountinfo$|\1|p')
  [ -z "$pids" ] && break
  /bin/kill -9 $pids 2>/dev/null
  n=$((n+1))
  /bin/sleep 0.1
done
/bin/chmod -R u+w -- "$1" 2>/dev/null
/bin/rm -rf -- "$1"
"#;
        let mut child = Command::new("setsid")
            .args(["sh", "-c", SCRIPT, "testkit-reaper"])
            .arg(&self.dir)
            .arg(format!("/{}/hosts/", self.tag))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning the fleet reaper")?;
        let stdin = child.stdin.take().context("reaper stdin")?;
        self.reaper = Some((child, stdin));
        Ok(())
    }

    /// Writes `FLEET/ssh_config` and `FLEET/known_hosts` for the current hosts.
    pub(crate) fn write_ssh_config(&self) -> Result<()> {
        self.write_ssh_config_swapping(None)
    }

    /// An operator's mistake in the ssh config: `a`'s entry names `b`'s
    /// address and `b`'s names `a`'s (`known_hosts` stays right: each
    /// address keeps its own host key, so ssh notices nothing).
    /// [`Fleet::correct_ssh_config`] undoes it.
    pub fn swap_ssh_addresses(&self, a: &str, b: &str) -> Result<()> {
        let (a, b) = (self.index(a), self.index(b));
        self.write_ssh_config_swapping(Some((a, b)))
    }

    /// Writes `FLEET/ssh_config` as it should be again (after
    /// [`Fleet::swap_ssh_addresses`]).
    pub fn correct_ssh_config(&self) -> Result<()> {
        self.write_ssh_config()
    }

    fn write_ssh_config_swapping(&self, swap: Option<(usize, usize)>) -> Result<()> {
        let mut config = String::new();
        let mut known = String::new();
        for (i, host) in self.hosts.iter().enumerate() {
            let addr = match swap {
                Some((a, b)) if i == a => self.hosts[b].addr,
                Some((a, b)) if i == b => self.hosts[a].addr,
                _ => host.addr,
            };
            let _ = write!(
                config,
                "Host {name}\n  HostName {addr}\n  User root\n  Port {SSH_PORT}\n  \
                 IdentityFile {id}\n  IdentitiesOnly yes\n  UserKnownHostsFile {known}\n  \
                 StrictHostKeyChecking accept-new\n  BatchMode yes\n  ConnectTimeout 5\n  \
                 LogLevel ERROR\n\n",
                name = host.name,
                id = self.identity().display(),
                known = self.dir.join("known_hosts").display(),
            );
            let key = fs::read_to_string(host.dir.join("hostkey.pub"))
                .with_context(|| format!("host {}: reading hostkey.pub", host.name))?;
            let mut fields = key.split_whitespace();
            if let (Some(kind), Some(blob)) = (fields.next(), fields.next()) {
                let _ = writeln!(known, "{} {kind} {blob}", host.addr);
            }
        }
        write_atomic(&self.dir.join("known_hosts"), &known)?;
        write_atomic(&self.ssh_config(), &config)
    }
}

/// The uid and gid of a host's non-root deploy user.
const USER_ID: u32 = 64_000;

/// Gives a host a non-root deploy user, as NixOS hosts deployed by a
/// `deploy` user have: the user exists only inside the host (private
/// `/etc/passwd`, `/etc/group`, `/etc/shadow` bind-mounted over the
/// machine's), may run anything as root through `sudo -n` (a private
/// `/etc/sudoers`), and is trusted by a `nix-daemon` running in the host
/// (its socket is in the host's own `/nix`), so `nix copy` as that user works
/// as on NixOS. Nothing of the machine's own configuration changes. Returns
/// the shell commands that mount these files and start the daemon, run in the
/// host's namespace before sshd.
fn prepare_user(fleet_dir: &Path, dir: &Path, user: &str) -> Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let etc = dir.join("etc");
    fs::create_dir_all(&etc)?;
    let machine = |file: &str| fs::read_to_string(Path::new("/etc").join(file)).unwrap_or_default();
    let with_line = |text: String, line: String| {
        let mut text = text;
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&line);
        text.push('\n');
        text
    };
    let home = format!("/run/home/{user}");
    write_atomic(
        &etc.join("passwd"),
        &with_line(
            machine("passwd"),
            format!("{user}:x:{USER_ID}:{USER_ID}:nix-deploy test user:{home}:/bin/sh"),
        ),
    )?;
    write_atomic(
        &etc.join("group"),
        &with_line(machine("group"), format!("{user}:x:{USER_ID}:")),
    )?;
    // `*`: no password, but not locked (sshd without PAM refuses locked accounts).
    write_atomic(
        &etc.join("shadow"),
        &with_line(machine("shadow"), format!("{user}:*:19000:0:99999:7:::")),
    )?;
    write_atomic(
        &etc.join("sudoers"),
        &format!(
            "Defaults secure_path=\"/run/current-system/sw/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\"\n\
             root ALL=(ALL:ALL) ALL\n\
             {user} ALL=(ALL:ALL) NOPASSWD: ALL\n"
        ),
    )?;
    fs::set_permissions(etc.join("sudoers"), fs::Permissions::from_mode(0o440))?;
    fs::set_permissions(etc.join("shadow"), fs::Permissions::from_mode(0o640))?;
    let home_dir = dir.join("run/home").join(user);
    fs::create_dir_all(&home_dir)?;
    std::os::unix::fs::chown(&home_dir, Some(USER_ID), Some(USER_ID))?;
    // sshd reads the authorized keys as the user: they, and the way to them,
    // must be readable by it.
    for traversed in [fleet_dir, &fleet_dir.join("hosts"), dir] {
        fs::set_permissions(traversed, fs::Permissions::from_mode(0o711))?;
    }
    fs::set_permissions(
        dir.join("authorized_keys"),
        fs::Permissions::from_mode(0o644),
    )?;
    Ok(format!(
        "for f in passwd group shadow sudoers; do mount --bind \"$1/etc/$f\" /etc/$f || exit 1; done && \
         {{ NIX_CONFIG=\"$(printf 'trusted-users = root {user}\\nbuild-users-group =\\nsandbox = false')\" \
         NIX_USER_CONF_FILES=\"$1/nix.conf\" \
         setsid nix-daemon </dev/null >>\"$1/nix-daemon.log\" 2>&1 & }} && "
    ))
}
