//! The fleet: starting, reading and stopping test hosts.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command};

use anyhow::{Context, Result, anyhow, bail};

use crate::flake::*;
use crate::spec::*;
use crate::sys::*;
use crate::*;

/// One started test host.
#[derive(Debug)]
pub(crate) struct Host {
    pub(crate) name: String,
    pub(crate) addr: Ipv4Addr,
    pub(crate) dir: PathBuf,
    /// The listening sshd while the host runs.
    pub(crate) sshd: Option<Child>,
}

/// A set of running test hosts; see the module documentation.
///
/// Methods taking a host name panic if the fleet has no such host.
#[derive(Debug)]
pub struct Fleet {
    pub(crate) tempdir: Option<tempfile::TempDir>,
    pub(crate) dir: PathBuf,
    /// Base name of `dir`; unique, so it identifies the fleet's processes.
    pub(crate) tag: String,
    /// The fleet's address block `127.A.B.0/24`.
    pub(crate) block: (u8, u8),
    pub(crate) specs: Vec<HostSpec>,
    pub(crate) hosts: Vec<Host>,
    pub(crate) reaper: Option<(Child, ChildStdin)>,
    /// Set by [`Fleet::use_nixos`]: the flake is NixOS-shaped.
    pub(crate) nixos: Option<crate::nixos::NixosShape>,
}

impl Fleet {
    /// Starts one host per spec, then writes `ssh_config`, `known_hosts` and
    /// the flake. All hosts accept ssh connections when this returns.
    pub fn start(specs: Vec<HostSpec>) -> Result<Fleet> {
        for (i, spec) in specs.iter().enumerate() {
            spec.validate()?;
            if specs[..i].iter().any(|s| s.name == spec.name) {
                bail!("host {} is specified twice", spec.name);
            }
        }
        let tempdir = tempfile::Builder::new()
            .prefix("ndfleet-")
            .tempdir_in("/tmp")
            .context("creating the fleet directory")?;
        let dir = tempdir.path().to_path_buf();
        let tag = dir
            .file_name()
            .and_then(|n| n.to_str())
            .context("fleet directory name")?
            .to_string();
        let mut fleet = Fleet {
            tempdir: Some(tempdir),
            dir,
            tag,
            block: (0, 0),
            specs: Vec::new(),
            hosts: Vec::new(),
            reaper: None,
            nixos: None,
        };
        // From here on, dropping `fleet` on an error cleans up what was started.
        fleet.spawn_reaper()?;
        fs::create_dir(fleet.dir.join("hosts"))?;
        fs::create_dir(fleet.dir.join("flake"))?;
        let mut keygens = vec![keygen(&fleet.dir.join("id"))?];
        for spec in &specs {
            let dir = fleet.dir.join("hosts").join(&spec.name);
            create_host_dirs(&dir)?;
            keygens.push(keygen(&dir.join("hostkey"))?);
        }
        for (what, child) in keygens {
            wait_ok(child, &what)?;
        }
        fleet.block = choose_block(specs.len())?;
        for (i, spec) in specs.into_iter().enumerate() {
            let host = Host {
                addr: Ipv4Addr::new(127, fleet.block.0, fleet.block.1, i as u8 + 1),
                dir: fleet.dir.join("hosts").join(&spec.name),
                name: spec.name.clone(),
                sshd: None,
            };
            fleet.hosts.push(host);
            fleet.specs.push(spec);
        }
        let all: Vec<usize> = (0..fleet.hosts.len()).collect();
        fleet.start_hosts(&all)?;
        fleet.write_ssh_config()?;
        fleet.write_flake()?;
        Ok(fleet)
    }

    /// The fleet directory (`/tmp/ndfleet-XXXXXX`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `FLEET/ssh_config`, to be passed to ssh with `-F`.
    pub fn ssh_config(&self) -> PathBuf {
        self.dir.join("ssh_config")
    }

    /// The fleet's client private key, `FLEET/id`.
    pub fn identity(&self) -> PathBuf {
        self.dir.join("id")
    }

    /// The flake reference of the fleet's flake: `path:FLEET/flake`.
    pub fn flake_ref(&self) -> String {
        format!("path:{}", self.dir.join("flake").display())
    }

    /// Environment for the coordinator and any nix it runs: `NIX_CONFIG`
    /// ([`nix_config`]) and `NIX_SSHOPTS` (`-F FLEET/ssh_config`).
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("NIX_CONFIG".to_string(), nix_config().to_string()),
            (
                "NIX_SSHOPTS".to_string(),
                format!("-F {}", self.ssh_config().display()),
            ),
        ]
    }

    /// A command for `program` with [`Fleet::env`] set.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.envs(self.env());
        cmd
    }

    /// Host names, in the order the hosts were specified.
    pub fn host_names(&self) -> Vec<String> {
        self.specs.iter().map(|s| s.name.clone()).collect()
    }

    /// The spec of a host.
    pub fn spec(&self, name: &str) -> &HostSpec {
        &self.specs[self.index(name)]
    }

    /// All specs, in host order.
    pub fn specs(&self) -> &[HostSpec] {
        &self.specs
    }

    /// The host's loopback address, e.g. `127.142.7.1` (port 22).
    pub fn address(&self, name: &str) -> String {
        self.host(name).addr.to_string()
    }

    /// The host's directory: `nix/` and `run/` are its `/nix` and `/run`,
    /// `sshd.log` is its sshd's output.
    pub fn host_dir(&self, name: &str) -> PathBuf {
        self.host(name).dir.clone()
    }

    /// The host's sshd log (empty if unreadable).
    pub fn sshd_log(&self, name: &str) -> String {
        fs::read_to_string(self.host(name).dir.join("sshd.log")).unwrap_or_default()
    }

    /// Pid of the host's listening sshd, if the host was started and not
    /// stopped (the process may have died since, e.g. by `kill_sshd`).
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.host(name).sshd.as_ref().map(|c| c.id())
    }

    /// Whether the host's listening sshd is alive.
    pub fn is_running(&self, name: &str) -> bool {
        let Some(pid) = self.pid(name) else {
            return false;
        };
        // A zombie (exited, not yet reaped) has an empty command line.
        fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty())
    }

    /// Pids of all live processes of the host: its sshd, per-connection sshd
    /// processes and whatever runs over ssh.
    pub fn host_processes(&self, name: &str) -> Vec<u32> {
        find_processes(&[self.needles(self.index(name))])
    }

    /// Pids of all live processes of all hosts of the fleet.
    pub fn processes(&self) -> Vec<u32> {
        find_processes(&[self.fleet_needles()])
    }

    /// Edits a host's spec (the name cannot change) and rewrites the flake.
    pub fn update(&mut self, name: &str, f: impl FnOnce(&mut HostSpec)) -> Result<()> {
        let i = self.index(name);
        let mut spec = self.specs[i].clone();
        f(&mut spec);
        if spec.name != name {
            bail!("host {name}: update must not rename the host");
        }
        spec.validate()?;
        self.specs[i] = spec;
        self.write_flake()
    }

    /// Starts one more host (in the fleet's address block) and rewrites
    /// `ssh_config` and the flake.
    pub fn add_host(&mut self, spec: HostSpec) -> Result<()> {
        spec.validate()?;
        if self.specs.iter().any(|s| s.name == spec.name) {
            bail!("host {} already exists", spec.name);
        }
        let dir = self.dir.join("hosts").join(&spec.name);
        create_host_dirs(&dir)?;
        let (what, child) = keygen(&dir.join("hostkey"))?;
        wait_ok(child, &what)?;
        let addr = self
            .free_address()
            .with_context(|| format!("host {}: no free address", spec.name))?;
        self.hosts.push(Host {
            name: spec.name.clone(),
            addr,
            dir,
            sshd: None,
        });
        self.specs.push(spec);
        self.start_hosts(&[self.hosts.len() - 1])?;
        self.write_ssh_config()?;
        self.write_flake()
    }

    /// Writes `FLEET/flake/flake.nix` from the current specs.
    pub fn write_flake(&self) -> Result<()> {
        if let Some(written) = self.write_nixos_flake() {
            return written;
        }
        let flake = self.dir.join("flake");
        // flake.nix comes last, so it never refers to a script not yet written.
        for (file, contents) in flake_files(&self.specs) {
            let path = flake.join(file);
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent)?;
            }
            write_atomic(&path, &contents)
                .with_context(|| format!("writing the fleet flake: {}", path.display()))?;
        }
        Ok(())
    }

    /// Stops the host like a power cut: SIGTERM to all its processes, SIGKILL
    /// after 2 s, and waits until they are gone. Its directories stay.
    pub fn stop_host(&mut self, name: &str) -> Result<()> {
        let i = self.index(name);
        self.kill_hosts(&[i])
            .with_context(|| format!("stopping host {name}"))
    }

    /// Starts a stopped host again with the same directories (its `/nix` and
    /// `/run` persist), normally on the same address. Restarts a running host.
    pub fn start_host(&mut self, name: &str) -> Result<()> {
        let i = self.index(name);
        if self.hosts[i].sshd.is_some() {
            self.kill_hosts(&[i])
                .with_context(|| format!("stopping host {name}"))?;
        }
        let old = self.hosts[i].addr;
        self.start_hosts(&[i])?;
        if self.hosts[i].addr != old {
            self.write_ssh_config()?;
        }
        Ok(())
    }

    /// Freezes the host like a hung machine: SIGSTOP to all its processes.
    /// TCP connections are still accepted by the kernel, but nothing answers.
    pub fn freeze_host(&self, name: &str) -> Result<()> {
        self.signal_host(name, libc::SIGSTOP)
    }

    /// Undoes [`Fleet::freeze_host`]: SIGCONT to all the host's processes.
    pub fn thaw_host(&self, name: &str) -> Result<()> {
        self.signal_host(name, libc::SIGCONT)
    }

    /// Stops the host's listening sshd only (SIGSTOP): new connections are
    /// accepted by the kernel but never answered, while established ones
    /// (kept ssh masters) go on working.
    pub fn pause_listener(&self, name: &str) -> Result<()> {
        let pid = self
            .pid(name)
            .with_context(|| format!("host {name} has no listening sshd"))?;
        send_signal(pid as i32, libc::SIGSTOP);
        Ok(())
    }

    /// Undoes [`Fleet::pause_listener`].
    pub fn resume_listener(&self, name: &str) -> Result<()> {
        let pid = self
            .pid(name)
            .with_context(|| format!("host {name} has no listening sshd"))?;
        send_signal(pid as i32, libc::SIGCONT);
        Ok(())
    }

    /// Kills the host's established ssh connections (and what runs over
    /// them, including ssh control masters' sessions) but not its listening
    /// sshd: a network blip.
    pub fn drop_connections(&self, name: &str) -> Result<()> {
        let listener = self.pid(name);
        for pid in self.host_processes(name) {
            if Some(pid) != listener {
                send_signal(pid as i32, libc::SIGKILL);
            }
        }
        Ok(())
    }

    /// Runs `ssh -F FLEET/ssh_config NAME -- script` (with a 30 s timeout) and
    /// returns its stdout; fails with its stderr if it exits non-zero.
    pub fn ssh(&self, name: &str, script: &str) -> Result<String> {
        self.assert_host(name);
        let mut cmd = Command::new("ssh");
        cmd.arg("-F")
            .arg(self.ssh_config())
            .args([name, "--", script]);
        let out = run_with_timeout(cmd, SSH_TIMEOUT)
            .with_context(|| format!("host {name}: ssh {script:?}"))?;
        checked_stdout(out).with_context(|| format!("host {name}: ssh {script:?}"))
    }

    /// The system the host's `/run/current-system` points at, if any.
    pub fn current_system(&self, name: &str) -> Option<String> {
        let link = fs::read_link(self.host(name).dir.join("run/current-system")).ok()?;
        Some(link.to_string_lossy().into_owned())
    }

    /// The current generation number N of the host's system profile
    /// (`/nix/var/nix/profiles/system -> system-N-link`), if any.
    pub fn generation(&self, name: &str) -> Option<u32> {
        let link = fs::read_link(self.profiles_dir(name).join("system")).ok()?;
        parse_generation(link.file_name()?.to_str()?)
    }

    /// All generation numbers of the host's system profile, ascending.
    pub fn generations(&self, name: &str) -> Vec<u32> {
        let Ok(entries) = fs::read_dir(self.profiles_dir(name)) else {
            return Vec::new();
        };
        let mut gens: Vec<u32> = entries
            .filter_map(|e| parse_generation(e.ok()?.file_name().to_str()?))
            .collect();
        gens.sort_unstable();
        gens
    }

    /// The store path generation `generation` of the host points at.
    pub fn generation_path(&self, name: &str, generation: u32) -> Option<String> {
        let link = self
            .profiles_dir(name)
            .join(format!("system-{generation}-link"));
        Some(fs::read_link(link).ok()?.to_string_lossy().into_owned())
    }

    /// The host's activations, oldest first.
    pub fn activations(&self, name: &str) -> Vec<Activation> {
        let log =
            fs::read_to_string(self.host(name).dir.join("run/activations.log")).unwrap_or_default();
        parse_activations(&log)
    }

    /// Every activation the host ever ran, oldest first, from its history on
    /// its own disk: unlike [`Fleet::activations`], it survives reboots and
    /// holds the activations of the host's boots too (`by` = `boot`).
    pub fn activation_history(&self, name: &str) -> Vec<HistoryEntry> {
        let path = self
            .host(name)
            .dir
            .join(HISTORY_DIR.trim_start_matches('/'))
            .join("activations.log");
        parse_history(&fs::read_to_string(path).unwrap_or_default())
    }

    /// Systems `switch-to-configuration boot` was run with, oldest first.
    pub fn boots(&self, name: &str) -> Vec<String> {
        let log = fs::read_to_string(self.host(name).dir.join("run/boot.log")).unwrap_or_default();
        log.lines()
            .filter_map(|l| l.strip_prefix("boot "))
            .map(str::to_string)
            .collect()
    }

    /// State of a unit after the last activation: `active`, `failed` or
    /// `inactive`, as the host's `systemctl is-active` says.
    pub fn unit_state(&self, name: &str, unit: &str) -> String {
        let path = self
            .host(name)
            .dir
            .join("run/units")
            .join(unit_file_name(unit));
        fs::read_to_string(path)
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "inactive".to_string())
    }

    /// Sets a unit's state (`active`, `failed`, ...), as if the service had
    /// stopped or started on its own: the host's `systemctl is-active` (and
    /// so a `service` health check) says so until the next activation.
    pub fn set_unit_state(&self, name: &str, unit: &str, state: &str) -> Result<()> {
        let dir = self.host(name).dir.join("run/units");
        fs::create_dir_all(&dir)
            .with_context(|| format!("host {name}: creating {}", dir.display()))?;
        let path = dir.join(unit_file_name(unit));
        fs::write(&path, format!("{state}\n"))
            .with_context(|| format!("host {name}: writing {}", path.display()))
    }

    /// The host's toplevel store path as the flake evaluates it now.
    pub fn toplevel(&self, name: &str) -> Result<String> {
        self.assert_host(name);
        let attr = format!(
            "{}#nixosConfigurations.{name}.config.system.build.toplevel.outPath",
            self.flake_ref()
        );
        let mut cmd = self.command("nix");
        cmd.args(["eval", "--raw", &attr]);
        let out = run_with_timeout(cmd, NIX_TIMEOUT)
            .and_then(checked_stdout)
            .with_context(|| format!("host {name}: evaluating the toplevel"))?;
        Ok(out.trim().to_string())
    }

    /// Toplevel store paths of all hosts, by host name, in one evaluation.
    pub fn toplevels(&self) -> Result<BTreeMap<String, String>> {
        let mut cmd = self.command("nix");
        cmd.args([
            "eval",
            "--json",
            &format!("{}#nixosConfigurations", self.flake_ref()),
            "--apply",
            "cs: builtins.mapAttrs (n: c: c.config.system.build.toplevel.outPath) cs",
        ]);
        let out = run_with_timeout(cmd, NIX_TIMEOUT)
            .and_then(checked_stdout)
            .context("evaluating the toplevels")?;
        serde_json::from_str(&out).context("parsing the toplevels")
    }

    /// Builds the host's toplevel in the coordinator's store and returns its
    /// store path.
    pub fn build(&self, name: &str) -> Result<String> {
        self.assert_host(name);
        let attr = format!(
            "{}#nixosConfigurations.{name}.config.system.build.toplevel",
            self.flake_ref()
        );
        let mut cmd = self.command("nix");
        cmd.args(["build", "--no-link", "--json", &attr]);
        let out = run_with_timeout(cmd, NIX_TIMEOUT)
            .and_then(checked_stdout)
            .with_context(|| format!("host {name}: building the toplevel"))?;
        let json: serde_json::Value = serde_json::from_str(&out)
            .with_context(|| format!("host {name}: parsing nix build output {out:?}"))?;
        json[0]["outputs"]["out"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("host {name}: no out path in nix build output {out:?}"))
    }

    /// Deploys the host's current spec with plain nix and ssh, without the
    /// coordinator: build, `nix copy`, `nix-env --set` of the system profile,
    /// `switch-to-configuration switch`. Useful to set up a baseline. Returns
    /// the store path; fails if the activation fails.
    pub fn provision(&self, name: &str) -> Result<String> {
        let out = self.build(name)?;
        let mut cmd = self.command("nix");
        cmd.args(["copy", "--to", &format!("ssh://{name}"), &out]);
        run_with_timeout(cmd, NIX_TIMEOUT)
            .and_then(checked_stdout)
            .with_context(|| format!("host {name}: nix copy {out}"))?;
        self.ssh(
            name,
            &format!(
                "nix-env -p /nix/var/nix/profiles/system --set {out} && \
                 {out}/bin/switch-to-configuration switch"
            ),
        )?;
        Ok(out)
    }

    /// Stops all hosts, the reaper, and removes the fleet directory.
    /// Idempotent; errors are printed, not returned.
    pub fn stop(&mut self) {
        let all: Vec<usize> = (0..self.hosts.len()).collect();
        if let Err(e) = self.kill_hosts(&all) {
            eprintln!("testkit: stopping fleet {}: {e:#}", self.dir.display());
        }
        if let Some((mut child, mut stdin)) = self.reaper.take() {
            let _ = stdin.write_all(b"stop\n");
            drop(stdin);
            let _ = child.wait();
        }
        if let Some(tempdir) = self.tempdir.take() {
            make_removable(tempdir.path());
            if let Err(e) = tempdir.close() {
                eprintln!("testkit: removing {}: {e}", self.dir.display());
            }
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop();
    }
}
