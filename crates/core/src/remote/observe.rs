//! What a host runs, as it says it: [`HostSystems`] (the one reading of
//! what runs and what boots, [`systems_argv`]) and the probe, which reads
//! that and more in the same round trip ([`probe_argv`]; for a deployment,
//! behind its fence: [`fenced_probe_argv`]). Fixed text: nothing from the
//! flake or the user is pasted into these scripts.

use serde::{Deserialize, Serialize};

use super::activator::is_valid_token;
use super::fence::{FENCE_FN, Fence};
use super::parse_generation_link;
use crate::goal::BootFiles;

/// What runs and what boots: `/run/current-system`, the system profile's
/// link (its generation) and the system that generation is. Three lines.
pub(super) const SYSTEMS_SCRIPT: &str = r#"if [ -e /run/current-system ]; then readlink -f /run/current-system; else echo; fi
readlink /nix/var/nix/profiles/system 2>/dev/null || echo
if [ -e /nix/var/nix/profiles/system ]; then readlink -f /nix/var/nix/profiles/system; else echo; fi
"#;

/// What the probe reads besides [`SYSTEMS_SCRIPT`]: free space, whether
/// systemd runs the host, the boot id, the booted kernel and initrd, the
/// activations whose watchdog has not decided yet, and (for the watch's
/// drift) the booted system and the running system's boot files.
const PROBE_REST: &str = r#"{ df -Pk /nix/store 2>/dev/null || df -Pk /nix 2>/dev/null || df -Pk /; } | tail -n 1
if command -v systemd-run >/dev/null 2>&1 && [ -d /run/systemd/system ]; then echo systemd; else echo nosystemd; fi
cat /proc/sys/kernel/random/boot_id 2>/dev/null || echo
b=/run/booted-system; [ -e "$b" ] || b=/run/current-system
for f in kernel initrd kernel-modules; do readlink "$b/$f" 2>/dev/null || echo; done
pending=
for f in /run/nix-deploy/*.pid; do
  [ -e "$f" ] || continue
  t=${f##*/}; t=${t%.pid}
  [ -e "/run/nix-deploy/$t.decision" ] && continue
  [ -d "/proc/$(cat "$f" 2>/dev/null)" ] || continue
  pending="$pending $t"
done
echo "pending$pending"
if [ -e /run/booted-system ]; then readlink -f /run/booted-system; else echo; fi
for f in kernel initrd kernel-modules; do readlink "/run/current-system/$f" 2>/dev/null || echo; done"#;

/// What a host runs and boots, as read from the host itself.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostSystems {
    /// `/run/current-system`: what it runs (`None`: no system yet).
    pub running: Option<String>,
    /// The system profile's generation: what it boots next.
    pub boot_generation: Option<u32>,
    /// The system that generation is.
    pub boot: Option<String>,
}

impl HostSystems {
    /// Whether its next boot runs another system than the running one.
    pub fn pending_reboot(&self) -> bool {
        crate::goal::pending_reboot(self.running.as_deref(), self.boot.as_deref())
    }
}

/// Read what a host runs and boots (see [`parse_systems`]).
pub fn systems_argv() -> Vec<String> {
    vec!["sh".into(), "-c".into(), SYSTEMS_SCRIPT.into()]
}

/// [`HostSystems`] from the first three lines of `lines`.
fn read_systems<'a>(lines: &mut impl Iterator<Item = &'a str>) -> Result<HostSystems, String> {
    let current = lines.next().ok_or_else(|| "no answer".to_string())?.trim();
    let generation_line = lines.next().unwrap_or("").trim();
    let profile_line = lines.next().unwrap_or("").trim();
    let store_path = |text: &str, what: &str| -> Result<Option<String>, String> {
        if text.is_empty() {
            Ok(None)
        } else if crate::shell::is_valid_store_path(text) {
            Ok(Some(text.to_string()))
        } else {
            Err(format!(
                "{what} points at `{text}`, which is not a store path"
            ))
        }
    };
    let running = store_path(current, "/run/current-system")?;
    let boot = store_path(profile_line, "the system profile")?;
    let boot_generation = if generation_line.is_empty() {
        None
    } else {
        Some(parse_generation_link(generation_line).ok_or_else(|| {
            format!("cannot read the generation from the system profile link `{generation_line}`")
        })?)
    };
    Ok(HostSystems {
        running,
        boot_generation,
        boot,
    })
}

/// What [`systems_argv`] printed.
pub fn parse_systems(stdout: &str) -> Result<HostSystems, String> {
    read_systems(&mut stdout.lines())
}

/// What a probe found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeResult {
    /// `readlink -f /run/current-system`, `None` when there is no system yet.
    pub current_system: Option<String>,
    /// The generation `/nix/var/nix/profiles/system` points at.
    pub generation: Option<u32>,
    /// The system that generation is: the boot default.
    #[serde(default)]
    pub profile_system: Option<String>,
    /// Free space of the file system holding `/nix/store`, in KiB.
    pub free_kib: Option<u64>,
    /// Whether systemd runs the host (so `systemd-run` can detach activation).
    pub systemd: bool,
    /// `/proc/sys/kernel/random/boot_id`: changes with every boot.
    #[serde(default)]
    pub boot_id: Option<String>,
    /// Kernel, initrd and modules of the booted system
    /// (`/run/booted-system`, or what runs when the host has none).
    #[serde(default)]
    pub booted: BootFiles,
    /// Activations whose watchdog is armed and has not decided (a
    /// coordinator died before confirming them).
    #[serde(default)]
    pub pending: Vec<String>,
    /// `readlink -f /run/booted-system`: the system the host booted.
    #[serde(default)]
    pub booted_system: Option<String>,
    /// Kernel, initrd and modules of the running system: when they differ
    /// from [`ProbeResult::booted`], the host runs a kernel it has not
    /// booted (pending a reboot).
    #[serde(default)]
    pub running_boot: BootFiles,
}

impl ProbeResult {
    /// What the host ran and booted when it was probed.
    pub fn systems(&self) -> HostSystems {
        HostSystems {
            running: self.current_system.clone(),
            boot_generation: self.generation,
            boot: self.profile_system.clone(),
        }
    }
}

/// One round trip tells us what a host runs ([`SYSTEMS_SCRIPT`]: the
/// running system, the profile's generation and the system it points at;
/// they differ while a host is staged with `test` or waits for a reboot)
/// and the rest of [`ProbeResult`].
pub fn probe_argv() -> Vec<String> {
    vec![
        "sh".into(),
        "-c".into(),
        format!("{SYSTEMS_SCRIPT}{PROBE_REST}"),
    ]
}

/// [`probe_argv`] for a deployment: the host first records `fence`'s epoch
/// (refusing an older one, see [`super::fence`]), so a successor's probe
/// alone fences out an earlier holder. Run as root (it writes the fence).
pub fn fenced_probe_argv(fence: &Fence) -> Vec<String> {
    let mut argv = vec![
        "sh".into(),
        "-c".into(),
        format!("{FENCE_FN}fence \"$1\" \"$2\" \"$3\"; exec 9>&-\n{SYSTEMS_SCRIPT}{PROBE_REST}"),
        "nix-deploy-probe".into(),
    ];
    argv.extend(fence.args());
    argv
}

pub fn parse_probe(stdout: &str) -> Result<ProbeResult, String> {
    if stdout.is_empty() {
        return Err("empty probe output".into());
    }
    let mut lines = stdout.lines();
    let systems = read_systems(&mut lines)?;
    let df_line = lines.next().unwrap_or("").trim();
    let systemd = lines.next().unwrap_or("").trim() == "systemd";
    let mut next = || {
        Some(lines.next().unwrap_or("").trim())
            .filter(|l| !l.is_empty())
            .map(str::to_string)
    };
    let boot_id = next().filter(|id| is_valid_boot_id(id));
    let booted = BootFiles {
        kernel: next(),
        initrd: next(),
        kernel_modules: next(),
    };
    let pending = next()
        .unwrap_or_default()
        .strip_prefix("pending")
        .unwrap_or("")
        .split_whitespace()
        .filter(|t| is_valid_token(t))
        .map(str::to_string)
        .collect();
    let booted_line = next().unwrap_or_default();
    let running_boot = BootFiles {
        kernel: next(),
        initrd: next(),
        kernel_modules: next(),
    };
    let booted_system = if booted_line.is_empty() {
        None
    } else if crate::shell::is_valid_store_path(&booted_line) {
        Some(booted_line)
    } else {
        return Err(format!(
            "/run/booted-system points at `{booted_line}`, which is not a store path"
        ));
    };
    // POSIX df: Filesystem 1024-blocks Used Available Capacity Mounted-on
    let free_kib = df_line
        .split_whitespace()
        .nth(3)
        .and_then(|v| v.parse().ok());
    Ok(ProbeResult {
        current_system: systems.running,
        generation: systems.boot_generation,
        profile_system: systems.boot,
        free_kib,
        systemd,
        boot_id,
        booted,
        pending,
        booted_system,
        running_boot,
    })
}

/// A boot id as the kernel writes it (a UUID): hex digits and dashes.
pub fn is_valid_boot_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

/// One round trip after a reboot: the boot id, then what runs.
const AFTER_BOOT_SCRIPT: &str =
    "cat /proc/sys/kernel/random/boot_id; readlink -f /run/current-system 2>/dev/null || echo";

/// The boot id and the running system (see [`parse_boot_state`]).
pub fn boot_state_argv() -> Vec<String> {
    vec!["sh".into(), "-c".into(), AFTER_BOOT_SCRIPT.into()]
}

/// `(boot id, running system)` from [`boot_state_argv`]'s output.
pub fn parse_boot_state(stdout: &str) -> Result<(String, Option<String>), String> {
    let mut lines = stdout.lines().map(str::trim);
    let boot_id = lines.next().unwrap_or("");
    if !is_valid_boot_id(boot_id) {
        return Err(format!("`{boot_id}` is not a boot id"));
    }
    let system = lines
        .next()
        .filter(|p| crate::shell::is_valid_store_path(p))
        .map(str::to_string);
    Ok((boot_id.to_string(), system))
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/nix/store/q4zfsrsm5n0vhqjrgz2c1lc78slrrsmw-nixos-system-p620";

    #[test]
    fn parses_a_running_host() {
        let out = format!(
            "{P}\nsystem-7-link\n{P}\n/dev/vda 263112772 11193208 241512136 5% /\nsystemd\n\n\n\n\npending abc123 x;y\n"
        );
        let probe = parse_probe(&out).unwrap();
        assert_eq!(probe.current_system.as_deref(), Some(P));
        assert_eq!(probe.generation, Some(7));
        assert_eq!(probe.profile_system.as_deref(), Some(P));
        assert_eq!(probe.free_kib, Some(241512136));
        assert!(probe.systemd);
        // Only well-formed tokens: anything else is not ours.
        assert_eq!(probe.pending, ["abc123"]);
        assert!(!probe.systems().pending_reboot());
        assert!(probe_argv()[2].starts_with(SYSTEMS_SCRIPT));
        // A deployment's probe records its epoch first, then reads the same.
        let fenced = fenced_probe_argv(&Fence::new(3, 1_700_000_000_000, 4).unwrap());
        assert!(fenced[2].starts_with(FENCE_FN));
        assert!(fenced[2].ends_with(&format!("{SYSTEMS_SCRIPT}{PROBE_REST}")));
        assert_eq!(fenced[3..], ["nix-deploy-probe", "3", "1700000000000", "4"]);
    }

    #[test]
    fn reads_what_runs_and_what_boots_apart() {
        let staged = format!("{P}\nsystem-8-link\n{P}-2\n");
        let systems = parse_systems(&staged).unwrap();
        assert_eq!(
            systems,
            HostSystems {
                running: Some(P.into()),
                boot_generation: Some(8),
                boot: Some(format!("{P}-2")),
            }
        );
        assert!(systems.pending_reboot());
        assert_eq!(parse_systems("\n\n\n").unwrap(), HostSystems::default());
        assert!(parse_systems("/etc/passwd\n\n\n").is_err());
        assert!(parse_systems("").is_err());
    }

    #[test]
    fn parses_boot_state_when_the_host_reports_it() {
        let boot = "6cf3d0d6-27f9-4991-bd81-372f1da13493";
        let out = format!(
            "{P}\nsystem-7-link\n{P}-2\n/dev/vda 1 2 3 5% /\nsystemd\n{boot}\n/nix/store/k-linux/bzImage\n/nix/store/i-initrd/initrd\n\npending\n"
        );
        let probe = parse_probe(&out).unwrap();
        assert_eq!(probe.profile_system, Some(format!("{P}-2")));
        assert!(probe.pending.is_empty());
        assert_eq!(probe.boot_id.as_deref(), Some(boot));
        assert_eq!(
            probe.booted.kernel.as_deref(),
            Some("/nix/store/k-linux/bzImage")
        );
        assert_eq!(probe.booted.kernel_modules, None);
        assert_eq!(
            parse_boot_state(&format!("{boot}\n{P}\n")).unwrap(),
            (boot.to_string(), Some(P.to_string()))
        );
        assert!(parse_boot_state("cat: no such file\n").is_err());
    }

    #[test]
    fn parses_the_booted_system_and_the_running_boot_files() {
        let boot = "6cf3d0d6-27f9-4991-bd81-372f1da13493";
        let out = format!(
            "{P}\nsystem-7-link\n{P}\n/dev/vda 1 2 3 5% /\nsystemd\n{boot}\n/nix/store/k1-linux/bzImage\n/nix/store/i1-initrd/initrd\n\npending\n{P}-old\n/nix/store/k2-linux/bzImage\n/nix/store/i1-initrd/initrd\n\n"
        );
        let probe = parse_probe(&out).unwrap();
        assert_eq!(probe.booted_system, Some(format!("{P}-old")));
        assert_eq!(
            probe.running_boot.kernel.as_deref(),
            Some("/nix/store/k2-linux/bzImage")
        );
        assert_eq!(
            crate::goal::boot_changed(&probe.booted, &probe.running_boot),
            Some(true)
        );
        // A booted system that is not a store path is garbage, not a system.
        let bad = out.replace(&format!("{P}-old"), "/tmp/evil");
        assert!(
            parse_probe(&bad)
                .unwrap_err()
                .contains("/run/booted-system")
        );
    }

    #[test]
    fn parses_a_fresh_host() {
        let probe = parse_probe("\n\n\n\nnosystemd\n\n\n\n\npending\n").unwrap();
        assert_eq!(probe, ProbeResult::default());
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse_probe("").is_err());
        assert!(parse_probe("/etc/passwd\n\n\n").is_err());
        assert!(parse_probe(&format!("{P}\nsomething-else\n\n")).is_err());
    }
}
