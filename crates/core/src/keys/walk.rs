//! The shell function that reaches a key's directory without following a
//! link, shared by the upload and the undo scripts.

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
