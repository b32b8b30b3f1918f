//! What we run on a host, as pure functions: argument vectors for each step and
//! parsers for what comes back. No IO here; [`crate::ssh`] runs them and
//! [`crate::engine`] decides when.

use serde::{Deserialize, Serialize};

use crate::goal::BootFiles;

/// The system profile whose generations NixOS boots from.
pub const SYSTEM_PROFILE: &str = "/nix/var/nix/profiles/system";

/// One round trip tells us what a host runs. Fixed text: nothing from the
/// flake or the user is pasted into it.
const PROBE_SCRIPT: &str = r#"if [ -e /run/current-system ]; then readlink -f /run/current-system; else echo; fi
readlink /nix/var/nix/profiles/system 2>/dev/null || echo
{ df -Pk /nix/store 2>/dev/null || df -Pk /nix 2>/dev/null || df -Pk /; } | tail -n 1
if command -v systemd-run >/dev/null 2>&1 && [ -d /run/systemd/system ]; then echo systemd; else echo nosystemd; fi
readlink -f /nix/var/nix/profiles/system 2>/dev/null || echo
cat /proc/sys/kernel/random/boot_id 2>/dev/null || echo
b=/run/booted-system; [ -e "$b" ] || b=/run/current-system
for f in kernel initrd kernel-modules; do readlink "$b/$f" 2>/dev/null || echo; done"#;

/// What a probe found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeResult {
    /// `readlink -f /run/current-system`, `None` when there is no system yet.
    pub current_system: Option<String>,
    /// The generation `/nix/var/nix/profiles/system` points at.
    pub generation: Option<u32>,
    /// Free space of the file system holding `/nix/store`, in KiB.
    pub free_kib: Option<u64>,
    /// Whether systemd runs the host (so `systemd-run` can detach activation).
    pub systemd: bool,
    /// The system the host boots next: `readlink -f` of the system profile.
    #[serde(default)]
    pub boot_default: Option<String>,
    /// `/proc/sys/kernel/random/boot_id`: changes with every boot.
    #[serde(default)]
    pub boot_id: Option<String>,
    /// Kernel, initrd and modules of the booted system
    /// (`/run/booted-system`, or what runs when the host has none).
    #[serde(default)]
    pub booted: BootFiles,
}

pub fn probe_argv() -> Vec<String> {
    vec!["sh".into(), "-c".into(), PROBE_SCRIPT.into()]
}

/// `system-42-link` → 42.
pub fn parse_generation_link(link: &str) -> Option<u32> {
    let name = link.trim().rsplit('/').next()?;
    name.strip_prefix("system-")?
        .strip_suffix("-link")?
        .parse()
        .ok()
}

pub fn parse_probe(stdout: &str) -> Result<ProbeResult, String> {
    let mut lines = stdout.lines();
    let current = lines
        .next()
        .ok_or_else(|| "empty probe output".to_string())?
        .trim();
    let generation_line = lines.next().unwrap_or("").trim();
    let df_line = lines.next().unwrap_or("").trim();
    let systemd = lines.next().unwrap_or("").trim() == "systemd";
    let mut next = || {
        Some(lines.next().unwrap_or("").trim())
            .filter(|l| !l.is_empty())
            .map(str::to_string)
    };
    let boot_default = next().filter(|p| crate::shell::is_valid_store_path(p));
    let boot_id = next().filter(|id| is_valid_boot_id(id));
    let booted = BootFiles {
        kernel: next(),
        initrd: next(),
        kernel_modules: next(),
    };
    let current_system = if current.is_empty() {
        None
    } else if crate::shell::is_valid_store_path(current) {
        Some(current.to_string())
    } else {
        return Err(format!(
            "/run/current-system points at `{current}`, which is not a store path"
        ));
    };
    let generation = if generation_line.is_empty() {
        None
    } else {
        Some(parse_generation_link(generation_line).ok_or_else(|| {
            format!("cannot read the generation from the system profile link `{generation_line}`")
        })?)
    };
    // POSIX df: Filesystem 1024-blocks Used Available Capacity Mounted-on
    let free_kib = df_line
        .split_whitespace()
        .nth(3)
        .and_then(|v| v.parse().ok());
    Ok(ProbeResult {
        current_system,
        generation,
        free_kib,
        systemd,
        boot_default,
        boot_id,
        booted,
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

/// Reboot the host. The running system's own `systemctl`, by absolute path
/// (every NixOS system has it there), never whatever `PATH` finds.
pub fn reboot_argv() -> Vec<String> {
    vec![
        "/run/current-system/sw/bin/systemctl".into(),
        "reboot".into(),
    ]
}

/// `readlink -f /nix/var/nix/profiles/system`: the system the host boots next.
pub fn boot_default_argv() -> Vec<String> {
    ["readlink", "-f", SYSTEM_PROFILE]
        .map(String::from)
        .to_vec()
}

/// `<path>/bin/switch-to-configuration dry-activate`: what would change.
pub fn dry_activate_argv(system: &str) -> Vec<String> {
    vec![
        format!("{system}/bin/switch-to-configuration"),
        "dry-activate".into(),
    ]
}

/// `readlink -f /run/current-system`
pub fn current_system_argv() -> Vec<String> {
    ["readlink", "-f", "/run/current-system"]
        .map(String::from)
        .to_vec()
}

/// `readlink /nix/var/nix/profiles/system`
pub fn profile_link_argv() -> Vec<String> {
    ["readlink", SYSTEM_PROFILE].map(String::from).to_vec()
}

/// The closure of a system: every store path it needs.
pub fn closure_argv(path: &str) -> Vec<String> {
    vec![
        "nix-store".into(),
        "--query".into(),
        "--requisites".into(),
        path.into(),
    ]
}

/// Make `path` the new generation of the system profile.
pub fn set_profile_argv(path: &str) -> Vec<String> {
    vec![
        "nix-env".into(),
        "-p".into(),
        SYSTEM_PROFILE.into(),
        "--set".into(),
        path.into(),
    ]
}

/// Point the system profile back at an existing generation.
pub fn switch_generation_argv(generation: u32) -> Vec<String> {
    vec![
        "nix-env".into(),
        "-p".into(),
        SYSTEM_PROFILE.into(),
        "--switch-generation".into(),
        generation.to_string(),
    ]
}

/// The store path of generation `n` of the system profile.
pub fn generation_link(generation: u32) -> String {
    format!("{SYSTEM_PROFILE}-{generation}-link")
}

/// How to activate: `switch` (now and at boot), `test` (now only), `boot` (next boot).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Switch,
    Test,
    Boot,
}

impl Activation {
    pub fn as_str(self) -> &'static str {
        match self {
            Activation::Switch => "switch",
            Activation::Test => "test",
            Activation::Boot => "boot",
        }
    }
}

/// `<path>/bin/switch-to-configuration <action>`.
pub fn switch_argv(system: &str, action: Activation) -> Vec<String> {
    vec![
        format!("{system}/bin/switch-to-configuration"),
        action.as_str().into(),
    ]
}

/// Where the activator keeps its state on a host (a tmpfs on NixOS).
pub const STATE_DIR: &str = "/run/nix-deploy";

/// The activator: runs `switch-to-configuration` detached from our SSH session,
/// records its exit code, then waits for a confirmation file. Without one
/// within the confirm timeout it switches back to the old generation by
/// itself (magic rollback). Fixed text: the system path, action, old
/// generation, timeout and token arrive as positional arguments (validated
/// before they get here), never pasted in.
///
/// Files, per token: `.log` (activation output), `.activated` (exit code),
/// `.confirm` (written by the coordinator), `.result` (what the watchdog did).
const ACTIVATOR_SCRIPT: &str = r#"system=$1; action=$2; old=$3; timeout=$4; token=$5
dir=/run/nix-deploy; base="$dir/$token"
mkdir -p "$dir"
echo $$ > "$base.pid"
"$system/bin/switch-to-configuration" "$action" > "$base.log" 2>&1
echo $? > "$base.activated.tmp" && mv "$base.activated.tmp" "$base.activated"
i=0
while [ "$i" -lt "$timeout" ]; do
  if [ -e "$base.confirm" ]; then echo confirmed > "$base.result"; exit 0; fi
  sleep 1; i=$((i+1))
done
if [ -e "$base.confirm" ]; then echo confirmed > "$base.result"; exit 0; fi
if [ -z "$old" ]; then echo "unconfirmed, no old generation" > "$base.result"; exit 1; fi
echo reverting > "$base.result"
if [ "$action" = test ]; then
  /nix/var/nix/profiles/system-$old-link/bin/switch-to-configuration test >> "$base.log" 2>&1
else
  nix-env -p /nix/var/nix/profiles/system --switch-generation "$old" >> "$base.log" 2>&1 &&
  /nix/var/nix/profiles/system-$old-link/bin/switch-to-configuration switch >> "$base.log" 2>&1
fi
echo "reverted $?" > "$base.result""#;

/// Start the activator so that a dropped connection cannot kill it: as a
/// transient systemd unit when the host runs systemd, else in a new session.
pub fn activator_argv(
    system: &str,
    action: Activation,
    old_generation: Option<u32>,
    confirm_timeout_secs: u64,
    token: &str,
    systemd: bool,
) -> Vec<String> {
    let args = [
        system.to_string(),
        action.as_str().to_string(),
        old_generation.map(|g| g.to_string()).unwrap_or_default(),
        confirm_timeout_secs.to_string(),
        token.to_string(),
    ];
    let mut argv: Vec<String> = if systemd {
        vec![
            "systemd-run".into(),
            format!("--unit=nix-deploy-{token}"),
            "--collect".into(),
            "--quiet".into(),
            "sh".into(),
            "-c".into(),
            ACTIVATOR_SCRIPT.into(),
            "nix-deploy-activator".into(),
        ]
    } else {
        // `$0` is the activator script, `$@` its arguments.
        vec![
            "sh".into(),
            "-c".into(),
            r#"setsid sh -c "$0" nix-deploy-activator "$@" </dev/null >/dev/null 2>&1 &"#.into(),
            ACTIVATOR_SCRIPT.into(),
        ]
    };
    argv.extend(args);
    argv
}

/// One round trip: has the activation finished, and with what exit code?
pub fn activation_status_argv(token: &str) -> Vec<String> {
    vec!["cat".into(), format!("{STATE_DIR}/{token}.activated")]
}

/// The activation's output.
pub fn activation_log_argv(token: &str) -> Vec<String> {
    vec!["cat".into(), format!("{STATE_DIR}/{token}.log")]
}

/// Confirm (disarm) the watchdog.
pub fn confirm_argv(token: &str) -> Vec<String> {
    vec!["touch".into(), format!("{STATE_DIR}/{token}.confirm")]
}

/// What the watchdog did: `confirmed`, `reverting`, `reverted 0`.
pub fn watchdog_result_argv(token: &str) -> Vec<String> {
    vec!["cat".into(), format!("{STATE_DIR}/{token}.result")]
}

/// A token naming one activation: letters and digits only.
pub fn is_valid_token(token: &str) -> bool {
    !token.is_empty() && token.len() <= 64 && token.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// List the system profile's generations: `ls` of the profiles directory.
pub fn list_generations_argv() -> Vec<String> {
    vec!["ls".into(), "/nix/var/nix/profiles".into()]
}

/// Generation numbers from a listing of the profiles directory, ascending.
pub fn parse_generations(listing: &str) -> Vec<u32> {
    let mut generations: Vec<u32> = listing
        .split_whitespace()
        .filter_map(parse_generation_link)
        .collect();
    generations.sort_unstable();
    generations.dedup();
    generations
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/nix/store/q4zfsrsm5n0vhqjrgz2c1lc78slrrsmw-nixos-system-p620";

    #[test]
    fn parses_a_running_host() {
        let out =
            format!("{P}\nsystem-7-link\n/dev/vda 263112772 11193208 241512136 5% /\nsystemd\n");
        let probe = parse_probe(&out).unwrap();
        assert_eq!(probe.current_system.as_deref(), Some(P));
        assert_eq!(probe.generation, Some(7));
        assert_eq!(probe.free_kib, Some(241512136));
        assert!(probe.systemd);
    }

    #[test]
    fn parses_boot_state_when_the_host_reports_it() {
        let boot = "6cf3d0d6-27f9-4991-bd81-372f1da13493";
        let out = format!(
            "{P}\nsystem-7-link\n/dev/vda 1 2 3 5% /\nsystemd\n{P}-2\n{boot}\n/nix/store/k-linux/bzImage\n/nix/store/i-initrd/initrd\n\n"
        );
        let probe = parse_probe(&out).unwrap();
        assert_eq!(probe.boot_default, Some(format!("{P}-2")));
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
        assert_eq!(reboot_argv()[0], "/run/current-system/sw/bin/systemctl");
        assert_eq!(dry_activate_argv(P)[1], "dry-activate");
    }

    #[test]
    fn parses_a_fresh_host() {
        let probe = parse_probe("\n\n\nnosystemd\n").unwrap();
        assert_eq!(probe, ProbeResult::default());
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse_probe("").is_err());
        assert!(parse_probe("/etc/passwd\n\n\n").is_err());
        assert!(parse_probe(&format!("{P}\nsomething-else\n\n")).is_err());
    }

    #[test]
    fn generation_links() {
        assert_eq!(parse_generation_link("system-245-link"), Some(245));
        assert_eq!(
            parse_generation_link("/nix/var/nix/profiles/system-3-link\n"),
            Some(3)
        );
        assert_eq!(parse_generation_link("system-x-link"), None);
        assert_eq!(parse_generation_link("foo"), None);
        assert_eq!(generation_link(12), "/nix/var/nix/profiles/system-12-link");
    }

    #[test]
    fn activator_takes_everything_as_arguments() {
        let argv = activator_argv(P, Activation::Switch, Some(4), 30, "abc123", false);
        assert_eq!(argv[0..2], ["sh", "-c"]);
        assert_eq!(argv[3], ACTIVATOR_SCRIPT);
        assert_eq!(argv[4..], [P, "switch", "4", "30", "abc123"]);
        // The script itself carries no per-deployment text.
        assert!(!ACTIVATOR_SCRIPT.contains(P));
        let argv = activator_argv(P, Activation::Test, None, 5, "t", true);
        assert_eq!(argv[0], "systemd-run");
        assert_eq!(argv[1], "--unit=nix-deploy-t");
        assert_eq!(argv[argv.len() - 5..], [P, "test", "", "5", "t"]);
        assert!(is_valid_token("a1B2"));
        assert!(!is_valid_token("a;b"));
        assert!(!is_valid_token(""));
    }

    #[test]
    fn lists_generations() {
        let listing = "per-user\nsystem\nsystem-1-link\nsystem-12-link\nsystem-3-link\n";
        assert_eq!(parse_generations(listing), [1, 3, 12]);
    }

    #[test]
    fn step_command_lines() {
        assert_eq!(
            set_profile_argv(P),
            ["nix-env", "-p", SYSTEM_PROFILE, "--set", P]
        );
        assert_eq!(
            switch_generation_argv(4),
            ["nix-env", "-p", SYSTEM_PROFILE, "--switch-generation", "4"]
        );
        assert_eq!(
            switch_argv(P, Activation::Switch),
            [format!("{P}/bin/switch-to-configuration"), "switch".into()]
        );
        assert_eq!(switch_argv(P, Activation::Test)[1], "test");
    }
}
