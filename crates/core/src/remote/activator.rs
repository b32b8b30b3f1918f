//! The activator and the way back on a host, as scripts with positional
//! arguments: `switch-to-configuration` run detached from our SSH session
//! with a magic-rollback watchdog ([`activator_argv`]), the coordinator's
//! own way back ([`restorer_argv`]), waits, decisions, deadlines and the
//! settling of what a dead coordinator left. State in [`STATE_DIR`]. What
//! starts, decides, extends or settles an activation carries the
//! deployment's fence ([`super::fence`]); the watchdog does not.

use super::fence::{FENCE_FN, Fence};
use super::{Activation, HostSystems};

/// Where the activator keeps its state on a host (a tmpfs on NixOS).
pub const STATE_DIR: &str = "/run/nix-deploy";

/// The way back on the host, shared by the watchdog, the settling of an
/// abandoned activation and the coordinator's own switch back: undo an
/// activation of kind `$1` by restoring both things the host had, the boot
/// default (generation `$2` of the system profile, made the bootloader's
/// default again) and the running system (`$3`, activated with `test` when
/// it is not what runs). When the two were the same system, one `switch`
/// does both; `test` staging never touched the profile, and undoing `boot`
/// never touches what runs. Without `$3` (an activation started by an older
/// coordinator) the generation is switched to, as before.
const REVERT_FN: &str = r#"revert() {
  p=/nix/var/nix/profiles/system
  now=$(readlink -f /run/current-system 2>/dev/null)
  if [ "$1" = test ]; then
    if [ -n "$3" ]; then [ "$now" = "$3" ] || "$3/bin/switch-to-configuration" test; return $?; fi
    "$p-$2-link/bin/switch-to-configuration" test; return $?
  fi
  nix-env -p "$p" --switch-generation "$2" || return $?
  b=$(readlink -f "$p-$2-link")
  if [ "$1" = boot ] && { [ -z "$3" ] || [ "$now" = "$3" ]; }; then
    "$p-$2-link/bin/switch-to-configuration" boot; return $?
  fi
  if [ -z "$3" ] || [ "$b" = "$3" ]; then
    "$p-$2-link/bin/switch-to-configuration" switch; return $?
  fi
  "$p-$2-link/bin/switch-to-configuration" boot || return $?
  [ "$now" = "$3" ] || "$3/bin/switch-to-configuration" test
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
/// Fixed text: the system path, action, old generation, window, token and
/// the system that ran before arrive as positional arguments (validated
/// before they get here).
///
/// Files, per token: `.pid`, `.old` (generation to go back to), `.running`
/// (the system to run again), `.action`, `.log` (activation output),
/// `.activated` (exit code), `.deadline` (when the watchdog decides, Unix
/// seconds), `.decision/`, `.result`.
const ACTIVATOR_BODY: &str = r#"system=$1; action=$2; old=$3; window=$4; token=$5; running=$6
dir=/run/nix-deploy; base="$dir/$token"
mkdir -p "$dir"
echo $$ > "$base.pid"; echo "$old" > "$base.old"; echo "$running" > "$base.running"; echo "$action" > "$base.action"
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
revert "$action" "$old" "$running" >> "$base.log" 2>&1
echo "reverted $?" > "$base.result""#;

/// The coordinator's own way back, detached like an activation: [`REVERT_FN`]
/// (restoring generation `$2` as the boot default and `$3` as the running
/// system, undoing an activation of kind `$1`), with its exit code in
/// `.activated` for the waits, and no watchdog: it is decided when it ends.
/// A settling coordinator waits for a restore still running and leaves it
/// be (`.action` is `restore`).
const RESTORER_BODY: &str = r#"action=$1; old=$2; running=$3; token=$4
dir=/run/nix-deploy; base="$dir/$token"
mkdir -p "$dir"
echo $$ > "$base.pid"; echo restore > "$base.action"
revert "$action" "$old" "$running" > "$base.log" 2>&1
echo $? > "$base.activated.tmp" && mv "$base.activated.tmp" "$base.activated"
mkdir "$base.decision" 2>/dev/null && echo "restored $(cat "$base.activated")" > "$base.result"
exit 0"#;

/// Start the activator so that a dropped connection cannot kill it: as a
/// transient systemd unit when the host runs systemd, else in a new session.
/// `window` is how long the watchdog waits for a decision after the
/// activation, unless extended; 0 runs no watchdog (a switch back to a
/// known system only needs to survive us).
pub fn activator_argv(
    system: &str,
    action: Activation,
    before: &Before,
    window_secs: u64,
    token: &str,
    systemd: bool,
) -> Vec<String> {
    let args = [
        system.to_string(),
        action.as_str().to_string(),
        before
            .boot_generation
            .map(|g| g.to_string())
            .unwrap_or_default(),
        window_secs.to_string(),
        token.to_string(),
        before.running.clone().unwrap_or_default(),
    ];
    detached(
        &format!("{REVERT_FN}{ACTIVATOR_BODY}"),
        token,
        systemd,
        args,
    )
}

/// What a host ran and booted before an activation: what the way back
/// restores.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Before {
    /// The system it ran (`/run/current-system`).
    pub running: Option<String>,
    /// The system profile's generation it booted.
    pub boot_generation: Option<u32>,
}

impl Before {
    /// What `systems` says the host runs and boots.
    pub fn of(systems: &HostSystems) -> Before {
        Before {
            running: systems.running.clone(),
            boot_generation: systems.boot_generation,
        }
    }

    /// Whether the host is back: it runs and boots what it did before.
    pub fn restored_in(&self, systems: &HostSystems) -> bool {
        systems.running == self.running && systems.boot_generation == self.boot_generation
    }
}

/// Start the coordinator's way back for an activation of kind `undone`
/// (see [`RESTORER_BODY`]), detached like an activation; waited for like
/// one ([`super::activate_argv`]).
pub fn restorer_argv(
    undone: Activation,
    before: &Before,
    token: &str,
    systemd: bool,
) -> Vec<String> {
    let args = [
        undone.as_str().to_string(),
        before
            .boot_generation
            .map(|g| g.to_string())
            .unwrap_or_default(),
        before.running.clone().unwrap_or_default(),
        token.to_string(),
    ];
    detached(&format!("{REVERT_FN}{RESTORER_BODY}"), token, systemd, args)
}

/// Run `script` with `args` so that a dropped connection cannot kill it: as
/// a transient systemd unit when the host runs systemd, else in a new
/// session.
fn detached<const N: usize>(
    script: &str,
    token: &str,
    systemd: bool,
    args: [String; N],
) -> Vec<String> {
    let script = script.to_string();
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
pub(super) const WAIT_SCRIPT: &str = r#"f=/run/nix-deploy/$1.activated
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
/// `taken-back` when the coordinator switches the host back itself), behind
/// the deployment's fence (`$3`–`$5`, its lock held throughout). Exit 0:
/// ours. Exit 3: the watchdog decided first; its result is printed. Exit 4:
/// this host never had that activation (a connection that reached another
/// machine), so nothing is decided. Exit [`super::FENCED_OUT`]: a newer
/// holder of the deployment has been here.
pub(super) const DECIDE_SCRIPT: &str = r#"fence "$3" "$4" "$5"
base=/run/nix-deploy/$1
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

/// Decide activation `token` atomically (see [`DECIDE_SCRIPT`]), as the
/// holder of `fence`.
pub fn decide_argv(token: &str, decision: Decision, fence: &Fence) -> Vec<String> {
    let mut argv = vec![
        "sh".into(),
        "-c".into(),
        format!("{FENCE_FN}{DECIDE_SCRIPT}"),
        "nix-deploy-decide".into(),
        token.into(),
        match decision {
            Decision::Confirmed => "confirmed",
            Decision::TakenBack => "taken-back",
        }
        .into(),
    ];
    argv.extend(fence.args());
    argv
}

/// Push activation `$1`'s deadline to `$2` seconds from now (the host's
/// clock), behind the deployment's fence (`$3`–`$5`). Exit 3 when it is
/// already decided.
const EXTEND_SCRIPT: &str = r#"fence "$3" "$4" "$5"
base=/run/nix-deploy/$1
[ -e "$base.decision" ] && exit 3
echo $(( $(date +%s) + $2 )) > "$base.deadline.tmp" && mv "$base.deadline.tmp" "$base.deadline""#;

/// Keep activation `token`'s watchdog waiting `secs` more seconds, as the
/// holder of `fence`.
pub fn extend_argv(token: &str, secs: u64, fence: &Fence) -> Vec<String> {
    let mut argv = vec![
        "sh".into(),
        "-c".into(),
        format!("{FENCE_FN}{EXTEND_SCRIPT}"),
        "nix-deploy-extend".into(),
        token.into(),
        secs.to_string(),
    ];
    argv.extend(fence.args());
    argv
}

/// The exit code of [`decide_argv`] when the watchdog had decided first.
pub const DECIDED_BY_WATCHDOG: &str = "3";

/// The result of an activation run without a watchdog (magic rollback off):
/// decided as it ended; only the coordinator switches it back.
pub const NO_WATCHDOG: &str = "no watchdog";

/// What the watchdog did: `confirmed`, `taken-back`, `reverting`, `reverted 0`.
pub fn watchdog_result_argv(token: &str) -> Vec<String> {
    vec!["cat".into(), format!("{STATE_DIR}/{token}.result")]
}

/// Settle every activation a dead coordinator left undecided: wait for its
/// `switch-to-configuration` to end (at most `$1` seconds), then decide it
/// ourselves and restore what the host ran and booted before — what its
/// watchdog would do, now — or, when the watchdog decided first, wait for
/// its result. A switch back a dead coordinator left running is waited for.
/// Prints one line per activation settled. Behind the deployment's fence
/// (`$2`–`$4`, none for a command that is no deployment), whose lock is
/// let go before the waits.
const SETTLE_BODY: &str = r#"fence "$2" "$3" "$4"; exec 9>&-
limit=$1; dir=/run/nix-deploy
for f in "$dir"/*.pid; do
  [ -e "$f" ] || continue
  t=${f##*/}; t=${t%.pid}; base="$dir/$t"
  [ -e "$base.decision" ] && continue
  [ -d "/proc/$(cat "$f" 2>/dev/null)" ] || continue
  i=0
  while [ ! -e "$base.activated" ] && [ "$i" -lt "$limit" ]; do sleep 1; i=$((i+1)); done
  if [ "$(cat "$base.action" 2>/dev/null)" = restore ]; then
    echo "$t: a switch back ended ($(cat "$base.activated" 2>/dev/null || echo 'still running'))"; continue
  fi
  if mkdir "$base.decision" 2>/dev/null; then
    old=$(cat "$base.old"); action=$(cat "$base.action"); running=$(cat "$base.running" 2>/dev/null)
    if [ -z "$old" ]; then echo "unconfirmed, no old generation" > "$base.result"; echo "$t: no old generation"; continue; fi
    echo reverting > "$base.result"
    revert "$action" "$old" "$running" >> "$base.log" 2>&1
    echo "reverted $?" > "$base.result"
    echo "$t: switched back to generation $old ($(cat "$base.result"))"
  else
    i=0
    while ! grep -q -e '^reverted' -e '^confirmed' -e '^taken-back' -e '^unconfirmed' -e '^no watchdog' "$base.result" 2>/dev/null && [ "$i" -lt "$limit" ]; do sleep 1; i=$((i+1)); done
    echo "$t: decided by its watchdog: $(cat "$base.result" 2>/dev/null)"
  fi
done"#;

/// Settle the host's undecided activations (see [`SETTLE_BODY`]), as the
/// holder of `fence` when it is a deployment's.
pub fn settle_argv(limit_secs: u64, fence: Option<&Fence>) -> Vec<String> {
    let mut argv = vec![
        "sh".into(),
        "-c".into(),
        format!("{FENCE_FN}{REVERT_FN}{SETTLE_BODY}"),
        "nix-deploy-settle".into(),
        limit_secs.to_string(),
    ];
    argv.extend(Fence::args_of(fence));
    argv
}

/// A token naming one activation: letters and digits only.
pub fn is_valid_token(token: &str) -> bool {
    !token.is_empty() && token.len() <= 64 && token.bytes().all(|b| b.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/nix/store/q4zfsrsm5n0vhqjrgz2c1lc78slrrsmw-nixos-system-p620";
    const R: &str = "/nix/store/r4zfsrsm5n0vhqjrgz2c1lc78slrrsmw-nixos-system-p620";

    fn before(generation: Option<u32>) -> Before {
        Before {
            running: Some(R.into()),
            boot_generation: generation,
        }
    }

    fn fence() -> Fence {
        Fence::new(7, 1_700_000_000_123, 2).unwrap()
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
        let argv = activator_argv(P, Activation::Switch, &before(Some(4)), 30, "abc123", false);
        assert_eq!(argv[0..2], ["sh", "-c"]);
        assert!(argv[3].contains(ACTIVATOR_BODY) && argv[3].starts_with(REVERT_FN));
        assert_eq!(argv[4..], [P, "switch", "4", "30", "abc123", R]);
        // The scripts carry no per-deployment text.
        assert!(!argv[3].contains(P) && !argv[3].contains(R));
        let decide = decide_argv("abc123", Decision::Confirmed, &fence());
        assert!(decide[2].starts_with(FENCE_FN) && decide[2].contains(DECIDE_SCRIPT));
        assert_eq!(
            decide[3..],
            [
                "nix-deploy-decide",
                "abc123",
                "confirmed",
                "7",
                "1700000000123",
                "2"
            ]
        );
        let extend = extend_argv("abc123", 30, &fence());
        assert!(extend[2].starts_with(FENCE_FN) && extend[2].ends_with(EXTEND_SCRIPT));
        assert_eq!(
            extend[3..],
            [
                "nix-deploy-extend",
                "abc123",
                "30",
                "7",
                "1700000000123",
                "2"
            ]
        );
        assert_eq!(
            settle_argv(60, Some(&fence()))[3..],
            ["nix-deploy-settle", "60", "7", "1700000000123", "2"]
        );
        // A command that is no deployment settles unfenced: three empty words.
        assert_eq!(
            settle_argv(60, None)[3..],
            ["nix-deploy-settle", "60", "", "", ""]
        );
        let argv = activator_argv(P, Activation::Test, &Before::default(), 5, "t", true);
        assert_eq!(argv[0], "systemd-run");
        assert_eq!(argv[1], "--unit=nix-deploy-t");
        assert_eq!(argv[argv.len() - 6..], [P, "test", "", "5", "t", ""]);
        assert!(is_valid_token("a1B2"));
        assert!(!is_valid_token("a;b"));
        assert!(!is_valid_token(""));
    }

    #[test]
    fn the_way_back_restores_what_ran_and_what_booted_with_the_watchdogs_script() {
        let argv = restorer_argv(Activation::Switch, &before(Some(4)), "tok1", false);
        assert!(argv[3].starts_with(REVERT_FN) && argv[3].contains(RESTORER_BODY));
        assert_eq!(argv[4..], ["switch", "4", R, "tok1"]);
        assert!(!argv[3].contains(R));
        let argv = restorer_argv(Activation::Boot, &before(Some(2)), "tok2", true);
        assert_eq!(argv[0], "systemd-run");
        assert_eq!(argv[argv.len() - 4..], ["boot", "2", R, "tok2"]);
        // The watchdog, the settling and the restorer share one way back.
        assert!(SETTLE_BODY.contains(r#"revert "$action" "$old" "$running""#));
        assert!(ACTIVATOR_BODY.contains(r#"revert "$action" "$old" "$running""#));
    }
}
