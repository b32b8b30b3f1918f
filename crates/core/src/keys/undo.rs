//! Keys follow the system: what a deployment's uploads replaced is kept on
//! the host, so that every way back can put it back.
//!
//! In each key directory, `.nix-deploy-undo/` (root's, `0700`) holds undo
//! sets. A deployment's set is `d<id>`: before its upload replaces a key, the
//! old key is hard-linked into `d<id>/old/` (same inode: contents, owner and
//! mode, nothing copied), or, when there was none, `d<id>/absent/<name>`
//! marks it; only the first replacement of a deployment counts, so a key
//! uploaded again keeps its original. The set's `system` file names what the
//! host ran before the deployment: the system those keys belong to.
//!
//! Three operations ([`undo_argv`]): the deployment's way back restores its
//! set ([`UndoAction::Restore`]); its success keeps the set as `previous`
//! ([`UndoAction::Commit`], replacing an older one), which a later
//! `rollback` on request, or the settling of a host a dead coordinator left,
//! restores when the host goes back to the system it was made for
//! ([`UndoAction::Return`]). A set a dead coordinator left behind is taken
//! over by the next upload when it was made for the same system (its
//! originals are the older ones), else kept as `previous`.
//!
//! Each prints one line per key ([`parse_undo`]); never a key's contents.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::Key;
use super::upload::WALK_FN;

/// The directory, in each key directory, that holds the undo sets.
pub const UNDO_DIR: &str = ".nix-deploy-undo";

/// What an upload keeps of the key it replaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keep<'a> {
    /// Nothing: `upload-keys` (it changes no system), and keys uploaded
    /// again after a reboot emptied their directory (there is nothing of
    /// before the deployment left to keep).
    Nothing,
    /// Deployment `deployment`'s set, for the system the host ran before it
    /// (`None` when it ran none).
    Set {
        deployment: i64,
        system: Option<&'a str>,
    },
}

impl Keep<'_> {
    /// The upload script's last two arguments: the set's name and its system.
    pub(super) fn args(&self) -> [String; 2] {
        match self {
            Keep::Nothing => ["-".into(), "-".into()],
            Keep::Set { deployment, system } => [set_name(*deployment), system_arg(*system)],
        }
    }
}

/// `d<id>`: a deployment's undo set.
fn set_name(deployment: i64) -> String {
    format!("d{}", deployment.max(0))
}

/// A system as an argument: a store path, or `-`.
fn system_arg(system: Option<&str>) -> String {
    system
        .filter(|s| crate::shell::is_valid_store_path(s))
        .unwrap_or("-")
        .to_string()
}

/// `undo_dir CREATE`: from a key directory (`$at`), into its undo directory,
/// refusing a link or one that is not root's (the key directory may be a
/// service user's: what is in it is not ours to trust); with `CREATE` 1,
/// make it. Returns 2 when there is none.
pub(super) const UNDO_DIR_FN: &str = r#"undo_dir() {
  u=.nix-deploy-undo
  if [ -L "$u" ]; then why="$at/$u is a symlink"; return 1; fi
  if [ ! -e "$u" ]; then
    [ "$1" = 1 ] || return 2
    mkdir -m 0700 -- "$u" || { why="cannot create $at/$u"; return 1; }
  fi
  [ -d "$u" ] || { why="$at/$u is not a directory"; return 1; }
  cd -P -- "$u" || { why="cannot enter $at/$u"; return 1; }
  [ "$(pwd -P)" = "$at/$u" ] || { why="$at/$u was replaced meanwhile"; return 1; }
  [ -O . ] || { why="$at/$u is not root's own"; return 1; }
}
"#;

/// `keep_old`, in the upload script, from the key's directory: keep how
/// `$name` is now in set `$undo` (made for `$system`), unless the set has it
/// already; a set a dead coordinator left is taken over when made for the
/// same system, else becomes `previous`. Back in the key's directory after.
pub(super) const KEEP_FN: &str = r#"keep_old() {
  undo_dir 1 || return 1
  if [ ! -d "$undo" ]; then
    for t in d*; do
      [ -d "$t" ] && [ ! -L "$t" ] || continue
      if [ ! -d "$undo" ] && [ "$(cat -- "$t/system" 2>/dev/null)" = "$system" ]; then
        mv -T -- "$t" "$undo" || { why="cannot take over $at/$u/$t"; return 1; }
      else
        { rm -rf -- previous && mv -T -- "$t" previous && echo "$t" > previous/set; } || { why="cannot keep $at/$u/$t"; return 1; }
      fi
    done
  fi
  if [ ! -d "$undo" ]; then
    { mkdir -m 0700 -- "$undo" "$undo/old" "$undo/absent" && echo "$system" > "$undo/system"; } || { why="cannot create $at/$u/$undo"; return 1; }
  fi
  if [ ! -e "$undo/old/$name" ] && [ ! -L "$undo/old/$name" ] && [ ! -e "$undo/absent/$name" ]; then
    if [ -e "../$name" ] || [ -L "../$name" ]; then
      ln -P -- "../$name" "$undo/old/$name" 2>/dev/null || { why="cannot keep the old key for the way back (a hard link in $at/$u)"; return 1; }
    else
      : > "$undo/absent/$name" || { why="cannot note in $at/$u that there was no key"; return 1; }
    fi
  fi
  cd -P .. && [ "$(pwd -P)" = "$at" ] || { why="$at was replaced meanwhile"; return 1; }
}
"#;

/// The undo operations, over groups of arguments `DIR "NAME NAME…"` (names
/// have no spaces: see `is_valid_key_name`), after `ACTION SET SYSTEM`:
///
/// - `restore SET`: put set `SET` back (or `previous`, once it was committed
///   as that set), then delete it;
/// - `return - SYSTEM`: put back the set made for `SYSTEM` (one a dead
///   coordinator left, else `previous`), if any (`none DIR` if not);
/// - `commit SET`: `SET` becomes `previous`, replacing an older one
///   (`kept DIR`).
///
/// Putting back: a kept key is renamed over the key (`mv -T -f`), a key that
/// was absent is removed; a key the set does not have is left (`unchanged`,
/// or `missing` when it is not there either). A set with a key that could
/// not be put back stays for another try. Lines: `restored PATH`,
/// `removed PATH`, `unchanged PATH`, `missing PATH`, `failed PATH: WHY`,
/// `kept DIR`, `none DIR`, then `end`.
const UNDO_BODY: &str = r#"action=$1; undo=$2; system=$3; shift 3
trap '' PIPE
here() {
  if [ -e "$up/$1" ] || [ -L "$up/$1" ]; then echo "unchanged $dir/$1"; else echo "missing $dir/$1"; fi
}
put_back() {
  k=$up/$2; kept=$1/old/$2
  if [ -e "$kept" ] || [ -L "$kept" ]; then
    if [ "$(stat -c %d:%i -- "$kept")" = "$(stat -c %d:%i -- "$k" 2>/dev/null)" ]; then
      rm -f -- "$kept"; echo "unchanged $dir/$2"
    elif [ -d "$k" ] && [ ! -L "$k" ]; then
      echo "failed $dir/$2: a directory is in its place"; bad=1
    elif err=$(mv -T -f -- "$kept" "$k" 2>&1); then
      echo "restored $dir/$2"
    else
      echo "failed $dir/$2: $err"; bad=1
    fi
  elif [ -e "$1/absent/$2" ]; then
    if [ -d "$k" ] && [ ! -L "$k" ]; then
      echo "failed $dir/$2: a directory is in its place"; bad=1; return
    elif [ -e "$k" ] || [ -L "$k" ]; then
      if err=$(rm -f -- "$k" 2>&1); then echo "removed $dir/$2"; else echo "failed $dir/$2: $err"; bad=1; return; fi
    else
      echo "unchanged $dir/$2"
    fi
    rm -f -- "$1/absent/$2"
  else
    here "$2"
  fi
}
one_dir() {
  walk "$dir" 0; w=$?
  if [ "$w" = 2 ]; then for n in $names; do echo "missing $dir/$n"; done; return; fi
  if [ "$w" != 0 ]; then for n in $names; do echo "failed $dir/$n: $why"; done; return; fi
  up=.
  undo_dir 0; w=$?
  if [ "$w" = 2 ]; then
    [ "$action" = commit ] && return
    [ "$action" = return ] && echo "none $dir"
    for n in $names; do here "$n"; done; return
  fi
  if [ "$w" != 0 ]; then for n in $names; do echo "failed $dir/$n: $why"; done; return; fi
  up=..
  chosen=
  case $action in
    commit)
      if [ -d "$undo" ]; then
        if rm -rf -- previous && mv -T -- "$undo" previous && echo "$undo" > previous/set; then echo "kept $dir"
        else echo "failed $dir: cannot keep $at/$u/$undo as previous"; fi
      fi
      return ;;
    restore)
      if [ -d "$undo" ] && [ ! -L "$undo" ]; then chosen=$undo
      elif [ -d previous ] && [ "$(cat previous/set 2>/dev/null)" = "$undo" ]; then chosen=previous; fi ;;
    return)
      if [ "$system" != - ]; then
        for t in d* previous; do
          [ -d "$t" ] && [ ! -L "$t" ] && [ "$(cat -- "$t/system" 2>/dev/null)" = "$system" ] || continue
          chosen=$t; break
        done
      fi
      [ -n "$chosen" ] || echo "none $dir" ;;
  esac
  if [ -z "$chosen" ]; then for n in $names; do here "$n"; done; return; fi
  bad=0
  for n in $names; do put_back "$chosen" "$n"; done
  # Keys kept that the host no longer has.
  for n in $(ls -A -- "$chosen/old") $(ls -A -- "$chosen/absent"); do
    case $n in *[!A-Za-z0-9._+@-]* | . | ..) continue ;; esac
    case " $names " in *" $n "*) continue ;; esac
    put_back "$chosen" "$n"
  done
  [ "$bad" = 0 ] && rm -rf -- "$chosen"
}
while [ "$#" -ge 2 ]; do
  dir=$1; names=$2; shift 2
  one_dir
done
echo end"#;

/// What an undo operation does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UndoAction<'a> {
    /// Deployment `deployment` goes back: its set is put back.
    Restore { deployment: i64 },
    /// The host runs `system` (again): the keys kept for it are put back.
    Return { system: &'a str },
    /// Deployment `deployment` succeeded: its set becomes `previous`.
    Commit { deployment: i64 },
}

/// The argv of `action` over `keys`' directories and names (a fixed
/// script; everything else positional arguments). `None` without keys.
pub fn undo_argv(action: UndoAction, keys: &[&Key]) -> Option<Vec<String>> {
    if keys.is_empty() {
        return None;
    }
    let (verb, set, system) = match action {
        UndoAction::Restore { deployment } => ("restore", set_name(deployment), "-".into()),
        UndoAction::Return { system } => ("return", "-".into(), system_arg(Some(system))),
        UndoAction::Commit { deployment } => ("commit", set_name(deployment), "-".into()),
    };
    let mut by_dir: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for key in keys {
        by_dir
            .entry(key.dest_dir.as_str())
            .or_default()
            .push(key.name.as_str());
    }
    let mut argv = vec![
        "sh".into(),
        "-c".into(),
        format!("{WALK_FN}{UNDO_DIR_FN}{UNDO_BODY}"),
        "nix-deploy-undo".into(),
        verb.into(),
        set,
        system,
    ];
    for (dir, names) in by_dir {
        argv.push(dir.to_string());
        argv.push(names.join(" "));
    }
    Some(argv)
}

/// What a host run did to the host's keys on its way back (or why it left
/// them): part of the host run's document.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct KeyChanges {
    /// Put back as they were before the deployment: contents, owner, mode.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub restored: Vec<String>,
    /// The deployment created them where there was none: removed again.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<String>,
    /// Uploaded again, with this deployment's contents, after a reboot
    /// emptied them: what they held before the deployment was lost with
    /// `/run`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub uploaded_again: Vec<String>,
    /// Not known to be as they were before the deployment (`PATH: why`): a
    /// kept key that could not be put back, or what was kept could not be
    /// read.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<String>,
    /// Why the keys were left as they are, when they were.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub left: Option<String>,
}

impl KeyChanges {
    /// Whether every key the way back had to put back is back.
    pub fn all_back(&self) -> bool {
        self.failed.is_empty()
    }
}

/// What an undo operation reported.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UndoReport {
    /// Restored, removed and failed keys.
    pub changes: KeyChanges,
    /// Keys the set did not have (not replaced), there as they are.
    pub unchanged: Vec<String>,
    /// Keys the set did not have and that are not there (a reboot emptied
    /// their directory).
    pub missing: Vec<String>,
    /// Directories whose set became `previous`.
    pub kept: Vec<String>,
    /// Directories with nothing kept for the system gone back to.
    pub none: Vec<String>,
}

/// Read what [`undo_argv`] printed; output without its final `end` (cut
/// short) is an error.
pub fn parse_undo(stdout: &str) -> Result<UndoReport, String> {
    let mut report = UndoReport::default();
    let mut ended = false;
    for line in stdout.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if ended {
            return Err(format!("unexpected output after its end: `{line}`"));
        }
        if line == "end" {
            ended = true;
            continue;
        }
        let (verb, rest) = line.split_once(' ').unwrap_or((line, ""));
        let rest = rest.to_string();
        match verb {
            "restored" => report.changes.restored.push(rest),
            "removed" => report.changes.removed.push(rest),
            "failed" => report.changes.failed.push(rest),
            "unchanged" => report.unchanged.push(rest),
            "missing" => report.missing.push(rest),
            "kept" => report.kept.push(rest),
            "none" => report.none.push(rest),
            _ => return Err(format!("unexpected output `{line}`")),
        }
    }
    if !ended {
        return Err("its output ended early".into());
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::tests::parse;

    const SYSTEM: &str = "/nix/store/q4zfsrsm5n0vhqjrgz2c1lc78slrrsmw-nixos-system-p620";

    fn keys() -> Vec<Key> {
        let a = parse(serde_json::json!({ "hasText": true })).unwrap();
        let mut b = a.clone();
        b.name = "b.pem".into();
        let mut c = a.clone();
        c.name = "c".into();
        c.dest_dir = "/var/lib/app".into();
        vec![a, b, c]
    }

    #[test]
    fn every_undo_takes_its_set_and_keys_as_arguments_grouped_by_directory() {
        let keys = keys();
        let refs: Vec<&Key> = keys.iter().collect();
        let argv = undo_argv(UndoAction::Restore { deployment: 7 }, &refs).unwrap();
        assert_eq!(argv[..2], ["sh", "-c"]);
        assert_eq!(
            argv[3..],
            [
                "nix-deploy-undo",
                "restore",
                "d7",
                "-",
                "/run/keys",
                "db-password b.pem",
                "/var/lib/app",
                "c"
            ]
        );
        // Fixed text: nothing of the keys or the system is in the script.
        assert!(!argv[2].contains("db-password") && !argv[2].contains("/var/lib/app"));
        let argv = undo_argv(UndoAction::Return { system: SYSTEM }, &refs).unwrap();
        assert_eq!(argv[4..7], ["return", "-", SYSTEM]);
        assert!(!argv[2].contains(SYSTEM));
        // A system that is not a store path is never passed on.
        let argv = undo_argv(
            UndoAction::Return {
                system: "/x;reboot",
            },
            &refs,
        )
        .unwrap();
        assert_eq!(argv[4..7], ["return", "-", "-"]);
        let argv = undo_argv(UndoAction::Commit { deployment: 12 }, &refs).unwrap();
        assert_eq!(argv[4..7], ["commit", "d12", "-"]);
        assert_eq!(undo_argv(UndoAction::Commit { deployment: 1 }, &[]), None);
        // The keys go back by rename; the set goes only once all are back.
        assert!(UNDO_BODY.contains(r#"mv -T -f -- "$kept" "$k""#));
        assert!(UNDO_BODY.contains(r#"[ "$bad" = 0 ] && rm -rf -- "$chosen""#));
        assert!(argv[2].starts_with(WALK_FN));
    }

    #[test]
    fn the_first_replacement_is_kept_in_a_root_only_set_beside_the_key() {
        // Only when the set has nothing for the key yet.
        assert!(KEEP_FN.contains(
            r#"if [ ! -e "$undo/old/$name" ] && [ ! -L "$undo/old/$name" ] && [ ! -e "$undo/absent/$name" ]; then"#
        ));
        // A hard link (same inode: contents, owner, mode), or a mark.
        assert!(KEEP_FN.contains(r#"ln -P -- "../$name" "$undo/old/$name""#));
        assert!(KEEP_FN.contains(r#": > "$undo/absent/$name""#));
        // Root-only, never through a link, root's own.
        assert!(UNDO_DIR_FN.contains(r#"mkdir -m 0700 -- "$u""#));
        assert!(UNDO_DIR_FN.contains(r#"if [ -L "$u" ]; then"#));
        assert!(UNDO_DIR_FN.contains("[ -O . ]"));
        assert_eq!(
            Keep::Set {
                deployment: 3,
                system: None
            }
            .args(),
            ["d3", "-"]
        );
    }

    #[test]
    fn an_undo_report_is_read_line_by_line_and_must_be_whole() {
        let out = "restored /run/keys/a\nremoved /run/keys/b\nunchanged /run/keys/c\n\
                   missing /run/keys/d\nfailed /run/keys/e: mv: cannot move\nkept /var/lib/app\n\
                   none /srv\nend\n";
        let report = parse_undo(out).unwrap();
        assert_eq!(report.changes.restored, ["/run/keys/a"]);
        assert_eq!(report.changes.removed, ["/run/keys/b"]);
        assert_eq!(report.unchanged, ["/run/keys/c"]);
        assert_eq!(report.missing, ["/run/keys/d"]);
        assert_eq!(report.changes.failed, ["/run/keys/e: mv: cannot move"]);
        assert_eq!(report.kept, ["/var/lib/app"]);
        assert_eq!(report.none, ["/srv"]);
        assert!(!report.changes.all_back());
        assert!(parse_undo("restored /run/keys/a\n").is_err());
        assert!(parse_undo("hello\nend\n").is_err());
        assert_eq!(parse_undo("end").unwrap(), UndoReport::default());
        // Only what happened is in the document.
        let json = serde_json::to_value(&report.changes).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "restored": ["/run/keys/a"], "removed": ["/run/keys/b"],
                "failed": ["/run/keys/e: mv: cannot move"]
            })
        );
    }
}
