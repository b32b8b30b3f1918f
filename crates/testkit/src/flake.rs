//! The test flake: one `nixosConfigurations.NAME` per host, each toplevel a
//! `/bin/sh` derivation with the scripts a NixOS system would have.

use std::fmt::Write as _;

use crate::spec::*;
use crate::*;

/// `nginx` -> `nginx.service`; names with a dot are kept.
pub(crate) fn unit_file_name(unit: &str) -> String {
    if unit.contains('.') {
        unit.to_string()
    } else {
        format!("{unit}.service")
    }
}

/// A Nix string literal for `s`.
pub fn nix_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '$' => out.push_str("\\$"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

pub(crate) fn nix_list(items: &[String]) -> String {
    if items.is_empty() {
        return "[ ]".to_string();
    }
    let quoted: Vec<String> = items.iter().map(|s| nix_string(s)).collect();
    format!("[ {} ]", quoted.join(" "))
}

/// Shell script that builds a toplevel; the builder has no PATH.
pub(crate) const BUILDER: &str = r#"set -e
/bin/mkdir -p "$out/bin" "$out/sw/bin"
printf '#!/bin/sh\nOUT=%s\n%s\n' "$out" "$switchScript" > "$out/bin/switch-to-configuration"
printf '#!/bin/sh\n%s\n' "$systemctlScript" > "$out/sw/bin/systemctl"
/bin/chmod 0555 "$out/bin/switch-to-configuration" "$out/sw/bin/systemctl"
printf '%s\n' "$nixosVersion" > "$out/nixos-version"
printf '%s\n' $packages > "$out/testkit-packages"
printf '%s\n' $units > "$out/testkit-units"
for p in $packages; do
  case "$p" in /nix/store/????????????????????????????????-linux-[0-9]*)
    /bin/ln -s "$p/bzImage" "$out/kernel"; /bin/ln -s "$p/initrd" "$out/initrd" ;;
  esac
done
"#;

/// The fake `systemctl`: `is-active`, `is-failed` and `--version`.
pub(crate) fn systemctl_script() -> String {
    format!(
        r#"quiet=0; verb=; units=
for a in "$@"; do
  case "$a" in
    --version) echo '{SYSTEMD_VERSION}'; exit 0 ;;
    -q|--quiet) quiet=1 ;;
    -*) ;;
    *) if [ -z "$verb" ]; then verb=$a; else units="$units $a"; fi ;;
  esac
done
state() {{
  case "$1" in *.*) u=$1 ;; *) u=$1.service ;; esac
  [ -f "/run/units/$u" ] || {{ echo inactive; return; }}
  set -- $(/bin/cat "/run/units/$u")
  case "$1" in
    after)
      if [ $(( $(/bin/date +%s%3N) - $2 )) -ge "$3" ]; then echo active; else echo activating; fi ;;
    flapping)
      if [ $(( ( $(/bin/date +%s%3N) - $2 ) / $3 % 2 )) = 0 ]; then echo active; else echo failed; fi ;;
    *) echo "$1" ;;
  esac
}}
case "$verb" in
  is-active)
    rc=0
    for u in $units; do s=$(state "$u"); [ $quiet = 1 ] || echo "$s"; [ "$s" = active ] || rc=3; done
    exit $rc ;;
  is-failed)
    rc=1
    for u in $units; do s=$(state "$u"); [ $quiet = 1 ] || echo "$s"; [ "$s" = failed ] && rc=0; done
    exit $rc ;;
  reboot)
    # The test fleet reboots the host (Fleet::serve_reboots), never this machine.
    echo reboot > /run/testkit-reboot-request
    exit 0 ;;
  *) exit 0 ;;
esac"#
    )
}

/// Where a host keeps its activation history: on its own disk (its `/nix`),
/// so that a reboot, which empties `/run`, keeps it.
pub(crate) const HISTORY_DIR: &str = "/nix/var/log/testkit";

/// The body of a host's `switch-to-configuration` (after `OUT=<store path>`).
pub(crate) fn switch_script(spec: &HostSpec) -> String {
    let mut units = String::new();
    for (unit, state) in &spec.units {
        let state = match state {
            UnitState::Active => "active".to_string(),
            UnitState::Failed => "failed".to_string(),
            UnitState::ActiveAfter(ms) => format!("after $(/bin/date +%s%3N) {ms}"),
            UnitState::Flapping(ms) => format!("flapping $(/bin/date +%s%3N) {}", ms.max(&1)),
        };
        let _ = writeln!(
            units,
            "    echo \"{state}\" > '/run/units/{}'",
            unit_file_name(unit)
        );
    }
    let failed: Vec<String> = spec
        .units
        .iter()
        .filter(|(_, state)| *state == UnitState::Failed)
        .map(|(u, _)| unit_file_name(u))
        .collect();
    let failed = if failed.is_empty() {
        "demo.service".to_string()
    } else {
        failed.join(", ")
    };
    let delay = if spec.activation_delay_ms > 0 {
        format!(
            "/bin/sleep {}.{:03}",
            spec.activation_delay_ms / 1000,
            spec.activation_delay_ms % 1000
        )
    } else {
        ":".to_string()
    };
    let flag = |b: bool| if b { 1 } else { 0 };
    format!(
        r#"ACTION=$1
FAIL_SWITCH={fail}
KILL_SSHD={kill}
case "$ACTION" in
  switch|boot|test|dry-activate) ;;
  *) echo "Usage: $0 [switch|boot|test|dry-activate]" >&2; exit 1 ;;
esac
log() {{ echo "$(/bin/date +%s.%N) $*" >> /run/activations.log; }}
# The host's whole activation history, on its disk (it survives a reboot):
# `TIME start ACTION PATH PID BY` and `TIME end ACTION PATH CODE PID BY`.
history() {{
  /bin/mkdir -p {HISTORY_DIR} &&
    echo "$(/bin/date +%s.%N) $1 $ACTION $OUT $2$$ ${{TESTKIT_ACTIVATED_BY:-deployer}}" >> {HISTORY_DIR}/activations.log
}}
history start ""
log start "$ACTION" "$OUT"
[ "$ACTION" = dry-activate ] || echo "activating the configuration..." >&2
code=0
if [ "$ACTION" != dry-activate ]; then {delay}; fi
case "$ACTION" in
  switch|test)
    /bin/ln -sfn "$OUT" /run/current-system
    /bin/rm -rf /run/units
    /bin/mkdir -p /run/units
{units}    if [ $KILL_SSHD = 1 ]; then /bin/kill "$(/bin/cat /run/testkit-sshd.pid)"; fi
    if [ $FAIL_SWITCH = 1 ]; then
      echo "error: the following units failed: {failed}" >&2
      code=4
    fi ;;
  boot)
    echo "boot $OUT" >> /run/boot.log ;;
  dry-activate)
    echo "would activate $OUT" >&2 ;;
esac
log end "$ACTION" "$OUT" "$code"
history end "$code "
exit $code"#,
        fail = flag(spec.fail_switch),
        kill = flag(spec.kill_sshd),
    )
}

/// Fake package names listed in `$out/testkit-packages`.
pub(crate) fn packages(spec: &HostSpec) -> Vec<String> {
    let mut pkgs = vec![
        "bash-5.2p37".to_string(),
        "coreutils-9.5".to_string(),
        "openssh-9.9p1".to_string(),
        "systemd-257.5".to_string(),
    ];
    for (unit, _) in &spec.units {
        pkgs.push(unit_package(spec, unit));
    }
    pkgs.push(format!("linux-{}", spec.kernel));
    pkgs.extend(spec.extra_packages.iter().cloned());
    pkgs
}

/// The package a unit runs: its version follows the host's version, so a bump
/// upgrades it and changes the unit.
pub(crate) fn unit_package(spec: &HostSpec, unit: &str) -> String {
    let base = unit.split('.').next().unwrap_or(unit);
    format!("{base}-1.{}.0", spec.version)
}

/// `unit-NAME.service` derivations, each referring to its package.
pub(crate) fn unit_list(spec: &HostSpec) -> String {
    let items: Vec<String> = spec
        .units
        .iter()
        .map(|(unit, _)| {
            let name = if unit.contains('.') {
                unit.clone()
            } else {
                format!("{unit}.service")
            };
            format!(
                "(mkUnit {} {})",
                nix_string(&name),
                nix_string(&unit_package(spec, unit))
            )
        })
        .collect();
    if items.is_empty() {
        "[ ]".to_string()
    } else {
        format!("[ {} ]", items.join(" "))
    }
}

/// The files of the fleet's flake, relative to `FLEET/flake`: `flake.nix`
/// and the scripts it reads (kept as files so they can be read and debugged).
pub(crate) fn flake_files(specs: &[HostSpec]) -> Vec<(String, String)> {
    let mut files = vec![
        ("builder.sh".to_string(), BUILDER.to_string()),
        ("systemctl.sh".to_string(), systemctl_script()),
    ];
    let mut configs = String::new();
    for spec in specs {
        let script = format!("hosts/{}/switch-to-configuration.sh", spec.name);
        let extra = spec
            .deployment_extra
            .as_deref()
            .map(|e| format!("              {e}\n"))
            .unwrap_or_default();
        let checks = if spec.health_checks.is_empty() {
            "[ ]".to_string()
        } else {
            format!("[ {} ]", spec.health_checks.join(" "))
        };
        let _ = write!(
            configs,
            r#"        {name} = {{
          config = {{
            system.build.toplevel = mkToplevel {{
              name = {name};
              version = {version};
              packages = {packages};
              units = {units};
              switchScript = read ./{script};
            }};
            deployment = {{
              targetHost = {name};
{user}
              role = {role};
              tags = {tags};
              dependencies = {deps};
              healthChecks = {checks};
              rollbackOnFailure = {rollback};
{extra}            }};
          }};
        }};
"#,
            name = nix_string(&spec.name),
            version = nix_string(&spec.version_string()),
            packages = nix_list(&packages(spec)),
            units = unit_list(spec),
            role = nix_string(&spec.role),
            tags = nix_list(&spec.tags),
            deps = nix_list(&spec.dependencies),
            rollback = spec.rollback_on_failure,
            user = spec
                .user
                .as_deref()
                .map(|u| format!("              targetUser = {};\n", nix_string(u)))
                .unwrap_or_default(),
        );
        files.push((script, switch_script(spec)));
    }
    let flake = format!(
        r#"# Generated by the nix-deploy testkit (Fleet::write_flake); do not edit.
{{
  outputs = {{ self }}:
    let
      # Scripts carry no store context, so the toplevels depend on their
      # contents only, not on the whole flake source (i.e. not on metadata).
      read = path: builtins.unsafeDiscardStringContext (builtins.readFile path);
      # A fake NixOS system: bin/switch-to-configuration, sw/bin/systemctl.
      # Packages and units are derivations of their own, referred to by the
      # toplevel, so a system has a real closure (as NixOS's does).
      mkPackage = name:
        builtins.derivation {{
          inherit name;
          system = {system};
          builder = "/bin/sh";
          args = [ "-c" "/bin/mkdir -p $out && echo $name > $out/name" ];
        }};
      mkUnit = name: package:
        builtins.derivation {{
          name = "unit-${{name}}";
          system = {system};
          builder = "/bin/sh";
          pkg = mkPackage package;
          args = [ "-c" "/bin/mkdir -p $out && echo ExecStart=$pkg/bin/run > $out/unit" ];
        }};
      mkToplevel = {{ name, version, packages, units, switchScript }}:
        builtins.derivation {{
          name = "nixos-system-${{name}}-${{version}}";
          system = {system};
          builder = "/bin/sh";
          args = [ "-c" (read ./builder.sh) ];
          systemctlScript = read ./systemctl.sh;
          nixosVersion = version;
          packages = map mkPackage packages;
          inherit units switchScript;
        }};
    in {{
      nixosConfigurations = {{
{configs}      }};
    }};
}}
"#,
        system = nix_string(&nix_system()),
    );
    files.push(("flake.nix".to_string(), flake));
    files
}
