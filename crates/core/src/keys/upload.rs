//! The upload of one key to a host: a fixed script ([`upload_argv`]) whose
//! parameters are positional arguments and whose stdin is the key, with its
//! length and SHA-256 ([`upload_input`]).

use super::undo::{KEEP_FN, Keep, UNDO_DIR_FN};
use super::{Key, Secret};

/// `walk DIR CREATE`: go to `DIR` one directory at a time from `/`, refusing
/// symlinks (a directory owned by a service user must not lead root into
/// another one), creating what is missing (mode 0755) when `CREATE` is 1;
/// each step is checked against the physical working directory, so a
/// directory swapped for a link meanwhile is caught, and everything after
/// works relative to it. Sets `at` (where it is); on failure says why in
/// `why` and returns 1, or 2 when a directory is missing and not created.
/// Shared by the upload and the undo scripts.
pub(super) const WALK_FN: &str = r#"walk() {
  cd / || { why="cannot enter /"; return 1; }
  at=; rest=${1#/}
  while [ -n "$rest" ]; do
    part=${rest%%/*}
    case $rest in */*) rest=${rest#*/} ;; *) rest= ;; esac
    at=$at/$part
    if [ -L "$part" ]; then why="$at is a symlink: keys are written only into real directories, never through a link"; return 1; fi
    if [ ! -e "$part" ]; then
      if [ "$2" != 1 ]; then why="$at does not exist"; return 2; fi
      mkdir -m 0755 -- "$part" 2>/dev/null || [ -d "$part" ] || { why="cannot create $at"; return 1; }
    fi
    [ -d "$part" ] || { why="$at is not a directory"; return 1; }
    cd -P -- "$part" || { why="cannot enter $at"; return 1; }
    [ "$(pwd -P)" = "$at" ] || { why="$at was replaced while the key was written"; return 1; }
  done
}
"#;

/// Writes a key to `DIR/NAME` on a host, all or nothing.
///
/// Its stdin is [`upload_input`]: a header line with the key's length and
/// SHA-256, then the key. The key is written into a fresh root-only
/// directory (`mktemp -d`, umask 077) next to its destination and checked
/// there: an upload cut off mid-transfer (the connection dropped, the
/// coordinator killed) ends the input early, and a short or different key is
/// refused, leaving the old key as it was. Only a whole key gets its owner
/// and mode and is renamed over the old one (`mv -T`: a directory at the
/// key's path is an error, never a place to drop the key into).
///
/// The destination is reached by `walk` ([`WALK_FN`]). Before anything is
/// replaced, a deployment's upload keeps what was there in its undo set
/// (`keep_old`, [`KEEP_FN`]; not `upload-keys`, whose set is `-`); a key
/// whose old state cannot be kept is not replaced. When the owner does not
/// exist yet (a pre-activation key whose user the new system creates), the
/// key stays root's with a warning, unless the ownership is required
/// (post-activation, re-uploads), which fails.
///
/// Fixed text: directory, name, owner, group, mode, the flag, the undo set
/// and the system it is for arrive as positional arguments, validated in
/// this module; the length and hash on stdin, never on a command line (a
/// hash of a short password is as good as the password to whoever can read
/// `ps` or sudo's log).
const UPLOAD_BODY: &str = r#"set -eu
dir=$1; name=$2; user=$3; group=$4; mode=$5; require=$6; undo=$7; system=$8
fail() { echo "$dir/$name: $*" >&2; exit 1; }
# A closed stderr must not kill us before the cleanup below.
trap '' PIPE
trap 'exit 1' HUP INT TERM
IFS=' ' read -r magic size sha || fail "the upload ended before its header"
[ "$magic" = nix-deploy-key ] || fail "the upload's header is malformed"
case $size in '' | *[!0-9]*) fail "the upload's header is malformed" ;; esac
case $sha in *[!0-9a-f]*) fail "the upload's header is malformed" ;; esac
[ "${#sha}" -eq 64 ] || fail "the upload's header is malformed"
walk "$dir" 1 || fail "$why"
[ -d "$name" ] && [ ! -L "$name" ] && fail "is a directory: the key was not written"
[ "$undo" = - ] || keep_old || fail "$why: the key on the host is left as it was"
umask 077
staging=$(mktemp -d ".$name.XXXXXXXX")
cd -P -- "$staging"
trap 'rm -f key; cd .. && rmdir -- "$staging"' EXIT
cat > key
got=$(wc -c < key)
got=$((got + 0))
[ "$got" = "$size" ] || fail "received $got of $size bytes (the upload was cut short): the key on the host is left as it was"
sum=$(sha256sum < key)
[ "${sum%% *}" = "$sha" ] || fail "the received bytes do not match their SHA-256: the key on the host is left as it was"
if ! chown -- "$user:$group" key 2>/dev/null; then
  if [ "$require" = 1 ]; then
    fail "cannot make it owned by $user:$group (does the user or group exist?)"
  fi
  echo "warning: $user:$group does not exist yet; $dir/$name stays owned by root" >&2
fi
chmod -- "$mode" key
mv -T -f -- key "../$name""#;

/// The whole upload script: its functions, then its body.
fn upload_script() -> String {
    format!("{WALK_FN}{UNDO_DIR_FN}{KEEP_FN}{UPLOAD_BODY}")
}

/// The argv that uploads `key` (its contents go on stdin, as
/// [`upload_input`]), keeping what it replaces as `keep` says.
pub fn upload_argv(key: &Key, require_ownership: bool, keep: &Keep) -> Vec<String> {
    let [set, system] = keep.args();
    vec![
        "sh".into(),
        "-c".into(),
        upload_script(),
        "nix-deploy-key".into(),
        key.dest_dir.clone(),
        key.name.clone(),
        key.user.clone(),
        key.group.clone(),
        key.permissions.clone(),
        if require_ownership { "1" } else { "0" }.into(),
        set,
        system,
    ]
}

/// What the upload script reads: `nix-deploy-key LENGTH SHA256\n`, then
/// the key's bytes.
pub fn upload_input(secret: &Secret) -> Secret {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(secret.expose());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    let mut input = format!("nix-deploy-key {} {hex}\n", secret.len()).into_bytes();
    input.extend_from_slice(secret.expose());
    Secret::new(input)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::tests::parse;

    const SYSTEM: &str = "/nix/store/q4zfsrsm5n0vhqjrgz2c1lc78slrrsmw-nixos-system-p620";

    #[test]
    fn the_upload_takes_everything_as_arguments_and_the_contents_on_stdin() {
        let key = parse(
            serde_json::json!({ "keyFile": "/etc/secret", "user": "nobody",
            "group": "nogroup", "permissions": "0640" }),
        )
        .unwrap();
        let keep = Keep::Set {
            deployment: 42,
            system: Some(SYSTEM),
        };
        let argv = upload_argv(&key, true, &keep);
        assert_eq!(argv[..2], ["sh", "-c"]);
        assert_eq!(
            argv[3..],
            [
                "nix-deploy-key",
                "/run/keys",
                "db-password",
                "nobody",
                "nogroup",
                "0640",
                "1",
                "d42",
                SYSTEM
            ]
        );
        let script = &argv[2];
        assert!(!script.contains("/etc/secret") && !script.contains(SYSTEM));
        let argv = upload_argv(&key, false, &Keep::Nothing);
        assert_eq!(argv[9..], ["0", "-", "-"]);
        // Length and hash travel with the contents, on stdin.
        let input = upload_input(&Secret::new(b"hunter2".to_vec()));
        assert_eq!(
            input.expose(),
            b"nix-deploy-key 7 f52fbd32b2b3b86ff88ef6c490628285f482af15ddcb29541f94bcf526a3f6c7\nhunter2"
        );
        assert_eq!(format!("{input:?}"), "Secret(<redacted>)");
        // The rename never drops a key into a directory; links are refused.
        assert!(script.contains(r#"mv -T -f -- key "../$name""#));
        assert!(script.contains(r#"if [ -L "$part" ]; then why="$at is a symlink"#));
        // What is replaced is kept first, unless there is no set.
        let keep_at = script.find(r#"|| keep_old ||"#).unwrap();
        assert!(keep_at < script.find("mv -T -f -- key").unwrap());
        assert!(script.contains(r#"[ "$undo" = - ] || keep_old"#));
    }
}
