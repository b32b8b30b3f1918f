//! What we run on a host, as pure functions: argument vectors for each step and
//! parsers for what comes back. No IO here; [`crate::ssh`] runs them and
//! [`crate::engine`] decides when.

use serde::{Deserialize, Serialize};

/// The system profile whose generations NixOS boots from.
pub const SYSTEM_PROFILE: &str = "/nix/var/nix/profiles/system";

/// One round trip tells us what a host runs. Fixed text: nothing from the
/// flake or the user is pasted into it.
const PROBE_SCRIPT: &str = r#"if [ -e /run/current-system ]; then readlink -f /run/current-system; else echo; fi
readlink /nix/var/nix/profiles/system 2>/dev/null || echo
df -Pk /nix/store 2>/dev/null | tail -n 1 || echo
if command -v systemd-run >/dev/null 2>&1 && [ -d /run/systemd/system ]; then echo systemd; else echo nosystemd; fi"#;

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
    })
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
