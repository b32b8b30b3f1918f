//! Several steps' remote work in one call, so a changed host costs fewer
//! round trips (each one a new session on the host: sshd, sudo, sh) on its
//! critical path, with every step still done and told apart:
//!
//! - [`activate_argv`]: set the system profile, start the activator and wait
//!   for it, then read what the host runs and boots ([`ActivationAnswer`]).
//!   A failed profile set exits [`PROFILE_NOT_SET`] before anything starts,
//!   so it stays a failure that changed nothing, and a failed start exits
//!   [`STARTER_FAILED`] (the profile was set: the way back restores it);
//! - [`confirm_argv`]: decide the activation, then read what the host runs
//!   and boots now (the record of the run).

use super::activator::{DECIDE_SCRIPT, WAIT_SCRIPT};
use super::fence::{FENCE_FN, Fence};
use super::observe::SYSTEMS_SCRIPT;
use super::{HostSystems, SYSTEM_PROFILE, parse_generation_link, parse_systems};

/// The exit code of [`activate_argv`] when the system profile could not be
/// set: nothing was started, the host is untouched.
pub const PROFILE_NOT_SET: &str = "86";

/// The exit code of [`activate_argv`] when the activator did not start
/// (after the profile was set, when asked).
pub const STARTER_FAILED: &str = "87";

/// Start the activator (`launch`, from [`super::activator_argv`]) and wait
/// at most `secs` for it, in one call, behind the deployment's `fence`
/// (checked first: a superseded coordinator changes nothing, not even the
/// profile; held until the activator has written its pid, so a successor's
/// probe sees this activation). With `profile`, the system profile is
/// set to it first (exit [`PROFILE_NOT_SET`] when that fails; nothing else
/// runs then) and the new link is printed with how long `nix-env` took on
/// the host, in milliseconds (`profile system-N-link MS`). When the
/// activation has ended, its exit code follows, then what the host runs and
/// boots now (the three lines of [`super::systems_argv`]).
pub fn activate_argv(
    profile: Option<&str>,
    launch: Vec<String>,
    token: &str,
    secs: u64,
    fence: &Fence,
) -> Vec<String> {
    let script = format!(
        r#"{FENCE_FN}t=$1; w=$2; p=$3; fence "$4" "$5" "$6"; shift 6
if [ -n "$p" ]; then
  a=$(date +%s%N 2>/dev/null)
  nix-env -p {SYSTEM_PROFILE} --set "$p" >&2 || exit {PROFILE_NOT_SET}
  b=$(date +%s%N 2>/dev/null)
  case "$a$b" in ''|*[!0-9]*) ms=0 ;; *) ms=$(( (b - a) / 1000000 )) ;; esac
  echo "profile $(readlink {SYSTEM_PROFILE}) $ms"
fi
"$@" 9>&- || exit {STARTER_FAILED}
i=0
while [ ! -e "/run/nix-deploy/$t.pid" ] && [ ! -e "/run/nix-deploy/$t.activated" ] && [ "$i" -lt 100 ]; do
  sleep 0.1 2>/dev/null || sleep 1; i=$((i+1))
done
exec 9>&-
set -- "$t" "$w"
{WAIT_SCRIPT}
if [ -e "$f" ]; then
{SYSTEMS_SCRIPT}fi"#
    );
    let mut argv = vec![
        "sh".into(),
        "-c".into(),
        script,
        "nix-deploy-activate".into(),
        token.into(),
        secs.to_string(),
        profile.unwrap_or_default().into(),
    ];
    argv.extend(fence.args());
    argv.extend(launch);
    argv
}

/// What [`activate_argv`] printed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ActivationAnswer {
    /// The profile was set: its new generation (when the link could be
    /// read) and how long that took on the host.
    pub profile: Option<(Option<u32>, u64)>,
    /// The activation's exit code, once it has ended.
    pub status: Option<i32>,
    /// What the host ran and booted right after the activation ended.
    pub systems: Option<HostSystems>,
}

/// Read [`activate_argv`]'s answer.
pub fn parse_activation_answer(stdout: &str) -> Result<ActivationAnswer, String> {
    let mut answer = ActivationAnswer::default();
    let mut lines = stdout.lines().peekable();
    if let Some(rest) = lines.peek().and_then(|l| l.strip_prefix("profile ")) {
        let mut words = rest.split_whitespace();
        let generation = words.next().and_then(parse_generation_link);
        let ms = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
        answer.profile = Some((generation, ms));
        lines.next();
    }
    let Some(code) = lines.next().map(str::trim).filter(|l| !l.is_empty()) else {
        return Ok(answer);
    };
    answer.status = Some(
        code.parse()
            .map_err(|_| format!("unexpected activation status `{code}`"))?,
    );
    let rest: Vec<&str> = lines.collect();
    if !rest.is_empty() {
        answer.systems = Some(parse_systems(&rest.join("\n"))?);
    }
    Ok(answer)
}

/// Confirm activation `token` (as [`super::decide_argv`] does, with the same
/// exit codes, behind the same `fence`) and, once it is ours, print what
/// the host runs and boots (read with [`parse_systems`]).
pub fn confirm_argv(token: &str, fence: &Fence) -> Vec<String> {
    let mut argv = vec![
        "sh".into(),
        "-c".into(),
        format!("{FENCE_FN}( {DECIDE_SCRIPT}\n) || exit $?\n{SYSTEMS_SCRIPT}"),
        "nix-deploy-confirm".into(),
        token.into(),
        "confirmed".into(),
    ];
    argv.extend(fence.args());
    argv
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::{Activation, Before, activator_argv};

    const P: &str = "/nix/store/q4zfsrsm5n0vhqjrgz2c1lc78slrrsmw-nixos-system-p620";

    #[test]
    fn one_call_sets_the_profile_starts_and_waits_with_every_word_an_argument() {
        let launch = activator_argv(P, Activation::Switch, &Before::default(), 30, "tok", true);
        let fence = Fence::new(7, 1_700_000_000_000, 3).unwrap();
        let argv = activate_argv(Some(P), launch.clone(), "tok", 25, &fence);
        assert_eq!(argv[..2], ["sh", "-c"]);
        assert!(argv[2].contains(WAIT_SCRIPT) && argv[2].contains(SYSTEMS_SCRIPT));
        assert!(argv[2].contains(&format!("exit {PROFILE_NOT_SET}")));
        assert!(argv[2].contains(&format!(r#""$@" 9>&- || exit {STARTER_FAILED}"#)));
        assert!(!argv[2].contains(P), "the path is never pasted");
        // The fence is checked before anything else.
        assert!(argv[2].starts_with(FENCE_FN));
        let fenced = argv[2].find(r#"fence "$4" "$5" "$6""#).unwrap();
        assert!(fenced < argv[2].find("nix-env").unwrap());
        assert_eq!(argv[3..7], ["nix-deploy-activate", "tok", "25", P]);
        assert_eq!(argv[7..10], fence.args()[..]);
        assert_eq!(argv[10..], launch[..]);
        // No profile: an empty argument, and the script sets nothing.
        assert_eq!(activate_argv(None, launch, "tok", 5, &fence)[6], "");
    }

    #[test]
    fn the_answer_tells_profile_status_and_systems_apart() {
        let answer = parse_activation_answer(&format!(
            "profile system-7-link 42\n0\n{P}\nsystem-7-link\n{P}\n"
        ))
        .unwrap();
        assert_eq!(answer.profile, Some((Some(7), 42)));
        assert_eq!(answer.status, Some(0));
        let systems = answer.systems.unwrap();
        assert_eq!(systems.running.as_deref(), Some(P));
        assert_eq!(systems.boot_generation, Some(7));
        // Still running: the profile only.
        let answer = parse_activation_answer("profile system-7-link 0\n").unwrap();
        assert_eq!((answer.profile, answer.status), (Some((Some(7), 0)), None));
        assert_eq!(
            parse_activation_answer("").unwrap(),
            ActivationAnswer::default()
        );
        let answer = parse_activation_answer("3\n").unwrap();
        assert_eq!((answer.status, answer.systems), (Some(3), None));
        assert!(parse_activation_answer("running\n").is_err());
    }

    #[test]
    fn confirming_decides_first_and_reads_systems_after() {
        let fence = Fence::new(7, 1_700_000_000_000, 3).unwrap();
        let argv = confirm_argv("tok", &fence);
        assert_eq!(argv[3..6], ["nix-deploy-confirm", "tok", "confirmed"]);
        assert_eq!(argv[6..], fence.args()[..]);
        let decide = argv[2].find(DECIDE_SCRIPT).unwrap();
        assert!(argv[2][decide..].contains(") || exit $?\n"));
        assert!(argv[2].ends_with(SYSTEMS_SCRIPT));
    }
}
