//! Fencing on the host. Every operation of a deployment that changes or
//! settles a host — starting an activation or a switch back, deciding an
//! activation, pushing its watchdog's deadline, settling what a stopped
//! coordinator left, and the probe before any of them — carries the
//! deployment and the epoch its coordinator holds it at ([`Fence`]) as
//! positional arguments. The host keeps the highest epoch it has seen per
//! deployment in [`FENCE_DIR`]`/<deployment>` and refuses an older one with
//! [`FENCED_OUT`], naming both epochs; a newer one raises it. So a
//! coordinator that was paused past its lease and wakes up after a successor
//! took the deployment over (a higher epoch, recorded on the host by the
//! successor's first probe) cannot undo what the successor did.
//!
//! The check and the start of the operation hold one lock ([`FENCE_LOCK`],
//! `flock`): an operation that passed the check has started (an activation
//! has written its `.pid`) before anyone can raise the epoch, so the
//! successor's probe, which raises it first, then sees that activation and
//! settles it. A host's own watchdog is not fenced: it acts for its own
//! activation only.

/// Where a host keeps the highest epoch it has seen of each deployment (a
/// tmpfs on NixOS: a reboot forgets it, with every activation's state).
pub const FENCE_DIR: &str = "/run/nix-deploy/fence";

/// The lock held across a fence check and the start of its operation.
pub const FENCE_LOCK: &str = "/run/nix-deploy/fence.lock";

/// The exit code of a fenced script when the host refuses the epoch.
pub const FENCED_OUT: &str = "10";

/// What the host's refusal says first (on stderr), with both epochs after it.
pub const FENCED_OUT_MESSAGE: &str = "this host refuses deployment";

/// One deployment at one epoch, as a host checks it. The deployment is its
/// id and its creation time (Unix ms): ids start again at 1 in every
/// history, and a host may be deployed from more than one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fence {
    deployment: i64,
    created_at: i64,
    epoch: i64,
}

impl Fence {
    /// Deployment `deployment` (positive), created at `created_at` (Unix
    /// ms), held at `epoch` (neither negative).
    pub fn new(deployment: i64, created_at: i64, epoch: i64) -> Result<Fence, String> {
        if deployment < 1 || created_at < 0 || epoch < 0 {
            return Err(format!(
                "cannot fence deployment #{deployment} (created at {created_at}) at epoch {epoch}"
            ));
        }
        Ok(Fence {
            deployment,
            created_at,
            epoch,
        })
    }

    pub fn deployment(&self) -> i64 {
        self.deployment
    }

    pub fn epoch(&self) -> i64 {
        self.epoch
    }

    /// The three positional arguments [`FENCE_FN`] takes.
    pub(super) fn args(&self) -> [String; 3] {
        [
            self.deployment.to_string(),
            self.created_at.to_string(),
            self.epoch.to_string(),
        ]
    }

    /// The arguments of an optional fence: three empty words for none.
    pub(super) fn args_of(fence: Option<&Fence>) -> [String; 3] {
        fence.map(Fence::args).unwrap_or_default()
    }
}

/// `fence ID CREATED EPOCH`: take [`FENCE_LOCK`] (on descriptor 9, held
/// until the script closes it or ends), refuse an epoch older than the one
/// recorded for the deployment (exit [`FENCED_OUT`], both epochs on stderr,
/// a line appended to `<deployment>.refused` for whoever investigates),
/// record a newer one. Three empty words: no deployment (a command that
/// is none), nothing to check. Anything else that is not three numbers is
/// refused (exit 2); a recorded epoch that is not a number too, rather than
/// taken for none.
pub(super) const FENCE_FN: &str = r#"fence() {
  if [ -z "$1$2$3" ]; then return 0; fi
  for n in "$1" "$2" "$3"; do
    case "$n" in ''|*[!0-9]*) echo "nix-deploy: invalid fence arguments: '$1' '$2' '$3'" >&2; exit 2;; esac
  done
  fd=/run/nix-deploy/fence; f="$fd/$1-$2"
  mkdir -p "$fd" || exit 1
  exec 9>>/run/nix-deploy/fence.lock || exit 1
  if ! flock -w 60 9; then echo "nix-deploy: cannot lock /run/nix-deploy/fence.lock" >&2; exit 1; fi
  seen=$(cat "$f" 2>/dev/null) || seen=0
  case "$seen" in ''|*[!0-9]*) echo "nix-deploy: $f holds '$seen', not an epoch" >&2; exit 1;; esac
  if [ "$3" -lt "$seen" ]; then
    echo "nix-deploy: this host refuses deployment #$1 at epoch $3: it has seen epoch $seen (another coordinator took the deployment over)" >&2
    echo "$(date +%s) refused epoch $3, seen $seen: $0" >> "$f.refused"
    exit 10
  fi
  if [ "$3" -gt "$seen" ]; then
    echo "$3" > "$f.tmp" && mv -f "$f.tmp" "$f" || exit 1
  fi
}
"#;

/// Raise the host's fence of a deployment to its epoch (refused, exit
/// [`FENCED_OUT`], when the host has seen a newer one) and nothing else: a
/// successor fences out the hosts an earlier holder finished, which it does
/// not probe, so that holder cannot switch them back either.
pub fn fence_argv(fence: &Fence) -> Vec<String> {
    let mut argv = vec![
        "sh".into(),
        "-c".into(),
        format!(r#"{FENCE_FN}fence "$1" "$2" "$3""#),
        "nix-deploy-fence".into(),
    ];
    argv.extend(fence.args());
    argv
}

/// Whether a fenced command's exit `code` and `stderr` are the host refusing
/// the epoch.
pub fn is_fenced_out(code: &str, stderr: &str) -> bool {
    code == FENCED_OUT && stderr.contains(FENCED_OUT_MESSAGE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fence_is_three_numbers_passed_as_arguments() {
        let fence = Fence::new(42, 1_700_000_000_000, 3).unwrap();
        assert_eq!(fence.args(), ["42", "1700000000000", "3"]);
        assert_eq!(Fence::args_of(None), ["", "", ""]);
        assert_eq!((fence.deployment(), fence.epoch()), (42, 3));
        for (id, created, epoch) in [(0, 1, 1), (1, -1, 1), (1, 1, -1), (-4, 1, 1)] {
            assert!(Fence::new(id, created, epoch).is_err());
        }
        let argv = fence_argv(&fence);
        assert_eq!(argv[..2], ["sh", "-c"]);
        assert!(argv[2].starts_with(FENCE_FN));
        assert_eq!(argv[3..], ["nix-deploy-fence", "42", "1700000000000", "3"]);
        assert!(!argv[2].contains("42"), "nothing is pasted into the script");
    }

    #[test]
    fn the_script_and_the_constants_agree() {
        assert!(FENCE_FN.contains(&format!("exit {FENCED_OUT}\n")));
        assert!(FENCE_FN.contains(FENCED_OUT_MESSAGE));
        assert!(FENCE_FN.contains(FENCE_DIR));
        assert!(FENCE_FN.contains(FENCE_LOCK));
        assert!(is_fenced_out(
            "10",
            "nix-deploy: this host refuses deployment #4 at epoch 1: it has seen epoch 3"
        ));
        assert!(!is_fenced_out("10", "something else"));
        assert!(!is_fenced_out("3", FENCED_OUT_MESSAGE));
    }
}
