//! What we run on a host, as pure functions: argument vectors for each step and
//! parsers for what comes back. No IO here; the product's ssh transport runs
//! them and its engine decides when.
//!
//! - [`observe`]: what a host runs and boots, and the probe;
//! - [`activator`]: activations detached with their watchdog, the way back,
//!   decisions and settling;
//! - [`fence`]: what every one of those carries for a deployment (its epoch),
//!   so a host refuses a coordinator that was superseded;
//! - [`round_trips`]: several steps' remote work in one call (the profile,
//!   the activation and what runs after it; the confirmation and what runs
//!   after it);
//! - here: the profile, generations, `switch-to-configuration`, closures.

mod activator;
mod fence;
mod observe;
mod round_trips;

pub use activator::*;
pub use fence::*;
pub use observe::*;
pub use round_trips::*;

/// The system profile whose generations NixOS boots from.
pub const SYSTEM_PROFILE: &str = "/nix/var/nix/profiles/system";

/// `system-42-link` → 42.
pub fn parse_generation_link(link: &str) -> Option<u32> {
    let name = link.trim().rsplit('/').next()?;
    name.strip_prefix("system-")?
        .strip_suffix("-link")?
        .parse()
        .ok()
}

/// Reboot the host, behind the deployment's fence (see [`fence`]): a host
/// that has seen a newer holder of the deployment refuses. The running
/// system's own `systemctl`, by absolute path (every NixOS system has it
/// there), never whatever `PATH` finds.
pub fn reboot_argv(fence: &Fence) -> Vec<String> {
    let mut argv = vec![
        "sh".into(),
        "-c".into(),
        format!(
            r#"{}fence "$1" "$2" "$3"; exec 9>&-; exec /run/current-system/sw/bin/systemctl reboot"#,
            fence::FENCE_FN
        ),
        "nix-deploy-reboot".into(),
    ];
    argv.extend(fence.args());
    argv
}

/// `<path>/bin/switch-to-configuration dry-activate`: what would change.
pub fn dry_activate_argv(system: &str) -> Vec<String> {
    vec![
        format!("{system}/bin/switch-to-configuration"),
        "dry-activate".into(),
    ]
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

/// Build derivation `drv` on the host (`buildOnTarget`), with the host's own
/// substituters and builders; prints the output paths.
pub fn realise_argv(drv: &str) -> Vec<String> {
    vec!["nix-store".into(), "--realise".into(), drv.into()]
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
        let reboot = reboot_argv(&Fence::new(4, 1_700_000_000_000, 2).unwrap());
        assert!(reboot[2].starts_with(fence::FENCE_FN));
        assert!(reboot[2].ends_with("exec /run/current-system/sw/bin/systemctl reboot"));
        assert_eq!(
            reboot[3..],
            ["nix-deploy-reboot", "4", "1700000000000", "2"]
        );
    }
}
