//! What we run on a host, as pure functions: argument vectors for each step and
//! parsers for what comes back. No IO here; [`crate::ssh`] runs them and
//! [`crate::engine`] decides when.

use serde::{Deserialize, Serialize};

use crate::goal::BootFiles;

/// The system profile whose generations NixOS boots from.
pub const SYSTEM_PROFILE: &str = "/nix/var/nix/profiles/system";

/// One round trip tells us what a host runs: the running system, the
/// profile's generation and the system it points at (they differ while a
/// host is staged with `test` or waits for a reboot), free space, whether
/// systemd runs it, and the activations whose watchdog has not decided yet.
/// Fixed text: nothing from the flake or the user is pasted into it.
const PROBE_SCRIPT: &str = r#"if [ -e /run/current-system ]; then readlink -f /run/current-system; else echo; fi
readlink /nix/var/nix/profiles/system 2>/dev/null || echo
{ df -Pk /nix/store 2>/dev/null || df -Pk /nix 2>/dev/null || df -Pk /; } | tail -n 1
if command -v systemd-run >/dev/null 2>&1 && [ -d /run/systemd/system ]; then echo systemd; else echo nosystemd; fi
if [ -e /nix/var/nix/profiles/system ]; then readlink -f /nix/var/nix/profiles/system; else echo; fi
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
echo "pending$pending""#;

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
    let profile_line = lines.next().unwrap_or("").trim();
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
    let current_system = store_path(current, "/run/current-system")?;
    let profile_system = store_path(profile_line, "the system profile")?;
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
        profile_system,
        free_kib,
        systemd,
        boot_id,
        booted,
        pending,
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

/// The closure of a system: every store path it needs.
pub fn closure_argv(path: &str) -> Vec<String> {
    vec![
        "nix-store".into(),
        "--query".into(),
        "--requisites".into(),
        path.into(),
    ]
}

/// Make `path` the new generation of the system profile and print the
/// profile's new link (`system-N-link`, see [`parse_generation_link`]): one
/// round trip.
pub fn set_profile_argv(path: &str) -> Vec<String> {
    vec![
        "sh".into(),
        "-c".into(),
        format!(r#"nix-env -p {SYSTEM_PROFILE} --set "$1" >&2 && readlink {SYSTEM_PROFILE}"#),
        "nix-deploy-set-profile".into(),
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

/// Switching back to generation `$old`, shared by the watchdog and the
/// settling of an abandoned activation. `test` staging never touched the
/// profile, so only the old system is activated.
const REVERT_FN: &str = r#"revert() {
  if [ "$1" = test ]; then
    "/nix/var/nix/profiles/system-$2-link/bin/switch-to-configuration" test
  else
    nix-env -p /nix/var/nix/profiles/system --switch-generation "$2" &&
    "/nix/var/nix/profiles/system-$2-link/bin/switch-to-configuration" switch
  fi
}
"#;

/// The activator: runs `switch-to-configuration` detached from our SSH session,
/// records its exit code, then waits for a decision. The coordinator decides
/// by confirming (over a new connection) or by taking the host back itself;
/// without a decision before the deadline the watchdog decides to switch back
/// to the old generation by itself (magic rollback). The deadline is the
/// window after the activation, pushed on by the coordinator while it
/// validates ([`extend_argv`]): a slow validation is never cut short, and a
/// coordinator that dies leaves the host reverting one window later. A
/// decision is the
/// directory `TOKEN.decision`, created atomically by exactly one party, so a
/// confirmation can never race the watchdog: whoever creates it first
/// decides, and the other reads `TOKEN.result`.
///
/// Fixed text: the system path, action, old generation, window and token
/// arrive as positional arguments (validated before they get here).
///
/// Files, per token: `.pid`, `.old` (generation to go back to), `.action`,
/// `.log` (activation output), `.activated` (exit code), `.deadline` (when
/// the watchdog decides, Unix seconds), `.decision/`, `.result`.
const ACTIVATOR_BODY: &str = r#"system=$1; action=$2; old=$3; window=$4; token=$5
dir=/run/nix-deploy; base="$dir/$token"
mkdir -p "$dir"
echo $$ > "$base.pid"; echo "$old" > "$base.old"; echo "$action" > "$base.action"
"$system/bin/switch-to-configuration" "$action" > "$base.log" 2>&1
echo $? > "$base.activated.tmp" && mv "$base.activated.tmp" "$base.activated"
if [ "$window" = 0 ]; then mkdir "$base.decision" 2>/dev/null && echo "no watchdog" > "$base.result"; exit 0; fi
echo $(( $(date +%s) + window )) > "$base.deadline"
while [ "$(date +%s)" -lt "$(cat "$base.deadline" 2>/dev/null || echo 0)" ]; do
  [ -e "$base.decision" ] && exit 0
  sleep 1
done
mkdir "$base.decision" 2>/dev/null || exit 0
if [ -z "$old" ]; then echo "unconfirmed, no old generation" > "$base.result"; exit 1; fi
echo reverting > "$base.result"
revert "$action" "$old" >> "$base.log" 2>&1
echo "reverted $?" > "$base.result""#;

/// Start the activator so that a dropped connection cannot kill it: as a
/// transient systemd unit when the host runs systemd, else in a new session.
/// `window` is how long the watchdog waits for a decision after the
/// activation, unless extended; 0 runs no watchdog (a switch back to a
/// known system only needs to survive us).
pub fn activator_argv(
    system: &str,
    action: Activation,
    old_generation: Option<u32>,
    window_secs: u64,
    token: &str,
    systemd: bool,
) -> Vec<String> {
    let script = format!("{REVERT_FN}{ACTIVATOR_BODY}");
    let args = [
        system.to_string(),
        action.as_str().to_string(),
        old_generation.map(|g| g.to_string()).unwrap_or_default(),
        window_secs.to_string(),
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
            script,
            "nix-deploy-activator".into(),
        ]
    } else {
        // `$0` is the activator script, `$@` its arguments.
        vec![
            "sh".into(),
            "-c".into(),
            r#"setsid sh -c "$0" nix-deploy-activator "$@" </dev/null >/dev/null 2>&1 &"#.into(),
            script,
        ]
    };
    argv.extend(args);
    argv
}

/// Wait on the host, at most `$2` seconds, for activation `$1` to end;
/// print its exit code, or nothing while it still runs. The host checks
/// every tenth of a second for the first two seconds (most activations end
/// by then), then every half second (each check forks a `sleep`: a long
/// activation should not cost the host a core); every second where `sleep`
/// takes only whole seconds. We learn the result one round trip after it
/// exists instead of polling over SSH.
const WAIT_SCRIPT: &str = r#"f=/run/nix-deploy/$1.activated
if sleep 0.01 2>/dev/null; then fine=1; else fine=0; fi
t=0; n=$(( $2 * 10 ))
while [ ! -e "$f" ] && [ "$t" -lt "$n" ]; do
  if [ "$fine" = 0 ]; then sleep 1; t=$((t+10))
  elif [ "$t" -lt 20 ]; then sleep 0.1; t=$((t+1))
  else sleep 0.5; t=$((t+5)); fi
done
if [ -e "$f" ]; then cat "$f"; fi"#;

/// What [`activation_wait_argv`] prints when the activation never started.
pub const ACTIVATION_ABSENT: &str = "absent";

/// Wait at most `secs` for activation `token` to end (see [`WAIT_SCRIPT`]);
/// [`parse_activation_status`] reads what it prints. Prints
/// [`ACTIVATION_ABSENT`] when the activator never started (a connection that
/// dropped while starting it).
pub fn activation_wait_argv(token: &str, secs: u64) -> Vec<String> {
    vec![
        "sh".into(),
        "-c".into(),
        format!(
            r#"[ -e "/run/nix-deploy/$1.pid" ] || [ -e "/run/nix-deploy/$1.activated" ] || {{ echo {ACTIVATION_ABSENT}; exit 0; }}
{WAIT_SCRIPT}"#
        ),
        "nix-deploy-wait".into(),
        token.into(),
        secs.to_string(),
    ]
}

/// Start the activator (`launch`, from [`activator_argv`]) and wait for it
/// as [`activation_wait_argv`] does, in one round trip. A failed start
/// exits with the starter's code.
pub fn activator_start_and_wait_argv(launch: Vec<String>, token: &str, secs: u64) -> Vec<String> {
    let mut argv = vec![
        "sh".into(),
        "-c".into(),
        format!(r#"t=$1; w=$2; shift 2; "$@" || exit $?; set -- "$t" "$w"; {WAIT_SCRIPT}"#),
        "nix-deploy-start".into(),
        token.into(),
        secs.to_string(),
    ];
    argv.extend(launch);
    argv
}

/// What a wait printed: `Some(exit code)` once the activation ended,
/// `None` while it runs.
pub fn parse_activation_status(stdout: &str) -> Result<Option<i32>, String> {
    let text = stdout.trim();
    if text.is_empty() {
        return Ok(None);
    }
    text.parse()
        .map(Some)
        .map_err(|_| format!("unexpected activation status `{text}`"))
}

/// The activation's output.
pub fn activation_log_argv(token: &str) -> Vec<String> {
    vec!["cat".into(), format!("{STATE_DIR}/{token}.log")]
}

/// Take the decision for activation `$1` as `$2` (`confirmed`, or
/// `taken-back` when the coordinator switches the host back itself). Exit 0:
/// ours. Exit 3: the watchdog decided first; its result is printed. Exit 4:
/// this host never had that activation (a connection that reached another
/// machine), so nothing is decided.
const DECIDE_SCRIPT: &str = r#"base=/run/nix-deploy/$1
if [ ! -e "$base.pid" ]; then echo "this host has no activation $1" >&2; exit 4; fi
if mkdir "$base.decision" 2>/dev/null; then echo "$2" > "$base.result"; exit 0; fi
cat "$base.result" >&2 2>/dev/null
exit 3"#;

/// How the coordinator decides an activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The new system passed validation and a new connection got in.
    Confirmed,
    /// The coordinator switches the host back itself.
    TakenBack,
}

/// Decide activation `token` atomically (see [`DECIDE_SCRIPT`]).
pub fn decide_argv(token: &str, decision: Decision) -> Vec<String> {
    vec![
        "sh".into(),
        "-c".into(),
        DECIDE_SCRIPT.into(),
        "nix-deploy-decide".into(),
        token.into(),
        match decision {
            Decision::Confirmed => "confirmed",
            Decision::TakenBack => "taken-back",
        }
        .into(),
    ]
}

/// Push activation `$1`'s deadline to `$2` seconds from now (the host's
/// clock). Exit 3 when it is already decided.
const EXTEND_SCRIPT: &str = r#"base=/run/nix-deploy/$1
[ -e "$base.decision" ] && exit 3
echo $(( $(date +%s) + $2 )) > "$base.deadline.tmp" && mv "$base.deadline.tmp" "$base.deadline""#;

/// Keep activation `token`'s watchdog waiting `secs` more seconds.
pub fn extend_argv(token: &str, secs: u64) -> Vec<String> {
    vec![
        "sh".into(),
        "-c".into(),
        EXTEND_SCRIPT.into(),
        "nix-deploy-extend".into(),
        token.into(),
        secs.to_string(),
    ]
}

/// The exit code of [`decide_argv`] when the watchdog had decided first.
pub const DECIDED_BY_WATCHDOG: &str = "3";

/// What the watchdog did: `confirmed`, `taken-back`, `reverting`, `reverted 0`.
pub fn watchdog_result_argv(token: &str) -> Vec<String> {
    vec!["cat".into(), format!("{STATE_DIR}/{token}.result")]
}

/// Settle every activation a dead coordinator left undecided: wait for its
/// `switch-to-configuration` to end (at most `$1` seconds), then decide it
/// ourselves and switch back to its old generation — what its watchdog would
/// do, now — or, when the watchdog decided first, wait for its result.
/// Prints one line per activation settled.
const SETTLE_BODY: &str = r#"limit=$1; dir=/run/nix-deploy
for f in "$dir"/*.pid; do
  [ -e "$f" ] || continue
  t=${f##*/}; t=${t%.pid}; base="$dir/$t"
  [ -e "$base.decision" ] && continue
  [ -d "/proc/$(cat "$f" 2>/dev/null)" ] || continue
  i=0
  while [ ! -e "$base.activated" ] && [ "$i" -lt "$limit" ]; do sleep 1; i=$((i+1)); done
  if mkdir "$base.decision" 2>/dev/null; then
    old=$(cat "$base.old"); action=$(cat "$base.action")
    if [ -z "$old" ]; then echo "unconfirmed, no old generation" > "$base.result"; echo "$t: no old generation"; continue; fi
    echo reverting > "$base.result"
    revert "$action" "$old" >> "$base.log" 2>&1
    echo "reverted $?" > "$base.result"
    echo "$t: switched back to generation $old ($(cat "$base.result"))"
  else
    i=0
    while ! grep -q -e '^reverted' -e '^confirmed' -e '^taken-back' -e '^unconfirmed' -e '^no watchdog' "$base.result" 2>/dev/null && [ "$i" -lt "$limit" ]; do sleep 1; i=$((i+1)); done
    echo "$t: decided by its watchdog: $(cat "$base.result" 2>/dev/null)"
  fi
done"#;

/// Settle the host's undecided activations (see [`SETTLE_BODY`]).
pub fn settle_argv(limit_secs: u64) -> Vec<String> {
    vec![
        "sh".into(),
        "-c".into(),
        format!("{REVERT_FN}{SETTLE_BODY}"),
        "nix-deploy-settle".into(),
        limit_secs.to_string(),
    ]
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
        let out = format!(
            "{P}\nsystem-7-link\n/dev/vda 263112772 11193208 241512136 5% /\nsystemd\n{P}\n\n\n\n\npending abc123 x;y\n"
        );
        let probe = parse_probe(&out).unwrap();
        assert_eq!(probe.current_system.as_deref(), Some(P));
        assert_eq!(probe.generation, Some(7));
        assert_eq!(probe.profile_system.as_deref(), Some(P));
        assert_eq!(probe.free_kib, Some(241512136));
        assert!(probe.systemd);
        // Only well-formed tokens: anything else is not ours.
        assert_eq!(probe.pending, ["abc123"]);
    }

    #[test]
    fn parses_boot_state_when_the_host_reports_it() {
        let boot = "6cf3d0d6-27f9-4991-bd81-372f1da13493";
        let out = format!(
            "{P}\nsystem-7-link\n/dev/vda 1 2 3 5% /\nsystemd\n{P}-2\n{boot}\n/nix/store/k-linux/bzImage\n/nix/store/i-initrd/initrd\n\npending\n"
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
        assert_eq!(reboot_argv()[0], "/run/current-system/sw/bin/systemctl");
        assert_eq!(dry_activate_argv(P)[1], "dry-activate");
    }

    #[test]
    fn parses_a_fresh_host() {
        let probe = parse_probe("\n\n\nnosystemd\n\n\n\n\n\npending\n").unwrap();
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
    fn starting_and_waiting_is_one_call_whose_words_are_arguments() {
        let launch = activator_argv(P, Activation::Switch, Some(4), 30, "abc123", true);
        let argv = activator_start_and_wait_argv(launch.clone(), "abc123", 25);
        assert_eq!(argv[..2], ["sh", "-c"]);
        assert!(argv[2].ends_with(WAIT_SCRIPT));
        assert_eq!(argv[3..6], ["nix-deploy-start", "abc123", "25"]);
        assert_eq!(
            argv[6..],
            launch[..],
            "the launch is passed on word for word"
        );
        assert!(!argv[2].contains(P));
        let wait = activation_wait_argv("abc123", 10);
        assert_eq!(wait[3..], ["nix-deploy-wait", "abc123", "10"]);
        assert!(wait[2].contains(ACTIVATION_ABSENT));
    }

    #[test]
    fn an_activation_status_is_an_exit_code_or_nothing_yet() {
        assert_eq!(parse_activation_status("0\n"), Ok(Some(0)));
        assert_eq!(parse_activation_status("4"), Ok(Some(4)));
        assert_eq!(parse_activation_status(" \n"), Ok(None));
        assert!(parse_activation_status("running").is_err());
    }

    #[test]
    fn activator_takes_everything_as_arguments() {
        let argv = activator_argv(P, Activation::Switch, Some(4), 30, "abc123", false);
        assert_eq!(argv[0..2], ["sh", "-c"]);
        assert!(argv[3].contains(ACTIVATOR_BODY) && argv[3].starts_with(REVERT_FN));
        assert_eq!(argv[4..], [P, "switch", "4", "30", "abc123"]);
        // The scripts carry no per-deployment text.
        assert!(!argv[3].contains(P));
        let decide = decide_argv("abc123", Decision::Confirmed);
        assert_eq!(decide[3..], ["nix-deploy-decide", "abc123", "confirmed"]);
        assert_eq!(settle_argv(60)[3..], ["nix-deploy-settle", "60"]);
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
        let set = set_profile_argv(P);
        assert_eq!(set[..2], ["sh", "-c"]);
        assert!(set[2].starts_with(&format!(r#"nix-env -p {SYSTEM_PROFILE} --set "$1""#)));
        assert_eq!(
            set[4], P,
            "the path is an argument, never pasted into the script"
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
