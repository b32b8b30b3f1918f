//! Deployment goals, as `nixos-rebuild`, colmena and deploy-rs name them, and
//! reboots: what each goal does to a host, how it is validated and how it
//! is undone. Pure decisions, used by the engine's pipeline.
//!
//! | goal | profile | running system | validated by | way back |
//! |---|---|---|---|---|
//! | `switch` | new generation | new | runs the new system, health checks, new SSH connection | profile to the old generation, `switch` it |
//! | `boot` | new generation (boot default) | unchanged | the boot default is the new system, the running one is unchanged | profile to the old generation, `boot` it |
//! | `test` | unchanged | new (until the next boot) | as `switch` | `test`-activate the old system |
//! | `dry-activate` | unchanged | unchanged | nothing to validate; the output is kept | nothing to undo |
//! | `push` | unchanged | unchanged | nothing to validate: the closure is on the host | nothing to undo |
//!
//! With a reboot (`switch` and `boot` only), the host must come back with a
//! new boot id running the new system and pass its health checks; if not, it
//! goes back through the boot generation: old generation as the boot
//! default, then another reboot.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

use crate::options::OptionsError;
use crate::remote::Activation;

/// What a deployment does to each host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Goal {
    /// New generation, activated now and at boot.
    #[default]
    Switch,
    /// New generation made the boot default; activated at the next boot.
    Boot,
    /// Activated now, the profile untouched: gone after a reboot.
    Test,
    /// What would be started, stopped, restarted; nothing changes.
    DryActivate,
    /// colmena's `push`: build and copy the closure to the host, nothing
    /// else (no keys, no profile, no activation).
    Push,
}

pub const GOAL_NAMES: [&str; 5] = ["switch", "boot", "test", "dry-activate", "push"];

/// The goals of colmena's `apply [GOAL]`: the deployment goals, `build`
/// (build, touch no host) and `keys` (upload `deployment.keys` only).
pub const APPLY_GOALS: [&str; 7] = [
    "switch",
    "boot",
    "test",
    "dry-activate",
    "build",
    "push",
    "keys",
];

impl Goal {
    pub fn as_str(self) -> &'static str {
        match self {
            Goal::Switch => "switch",
            Goal::Boot => "boot",
            Goal::Test => "test",
            Goal::DryActivate => "dry-activate",
            Goal::Push => "push",
        }
    }

    pub fn parse(text: &str) -> Result<Goal, OptionsError> {
        match text {
            "switch" => Ok(Goal::Switch),
            "boot" => Ok(Goal::Boot),
            "test" => Ok(Goal::Test),
            "dry-activate" | "dry" => Ok(Goal::DryActivate),
            "push" => Ok(Goal::Push),
            other => Err(OptionsError(format!(
                "unknown goal `{other}` ({})",
                GOAL_NAMES.join(", ")
            ))),
        }
    }

    /// Whether the system profile gets a new generation.
    pub fn sets_profile(self) -> bool {
        matches!(self, Goal::Switch | Goal::Boot)
    }

    /// Whether the new system runs right after the activation.
    pub fn runs_new_system(self) -> bool {
        matches!(self, Goal::Switch | Goal::Test)
    }

    /// Whether the host changes at all (keys are uploaded, things can fail
    /// half-way and need undoing).
    pub fn changes_host(self) -> bool {
        !matches!(self, Goal::DryActivate | Goal::Push)
    }

    /// Whether the host run ends once the closure is on the host.
    pub fn stops_after_copy(self) -> bool {
        self == Goal::Push
    }

    /// How the activator runs `switch-to-configuration` (dry-activate runs
    /// it directly: there is nothing for a watchdog to revert).
    pub fn activation(self) -> Option<Activation> {
        match self {
            Goal::Switch => Some(Activation::Switch),
            Goal::Boot => Some(Activation::Boot),
            Goal::Test => Some(Activation::Test),
            Goal::DryActivate | Goal::Push => None,
        }
    }

    /// Whether a reboot can follow this goal (a reboot would throw a test
    /// activation away, and a dry run changed nothing to boot into).
    pub fn can_reboot(self) -> bool {
        matches!(self, Goal::Switch | Goal::Boot)
    }

    /// What validation checks after the goal's activation.
    pub fn validation(self) -> Validation {
        match self {
            Goal::Switch | Goal::Test => Validation::RunsNewSystem,
            Goal::Boot => Validation::BootsNewSystem,
            Goal::DryActivate | Goal::Push => Validation::Unchanged,
        }
    }

    /// How a host that failed after activation goes back.
    pub fn way_back(self) -> WayBack {
        match self {
            Goal::Switch => WayBack::Switch,
            Goal::Boot => WayBack::Boot,
            Goal::Test => WayBack::Test,
            Goal::DryActivate | Goal::Push => WayBack::Nothing,
        }
    }
}

impl fmt::Display for Goal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What "the activation worked" means for a goal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Validation {
    /// `/run/current-system` is the new system and its health checks pass.
    RunsNewSystem,
    /// The profile (the boot default) is the new system and the running
    /// system is still the old one; health checks run after a reboot only.
    BootsNewSystem,
    /// The running system is unchanged.
    Unchanged,
}

/// How a host goes back after a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WayBack {
    /// Profile to the old generation, `switch-to-configuration switch` it.
    Switch,
    /// Profile to the old generation, `switch-to-configuration boot` it (the
    /// running system never changed).
    Boot,
    /// `switch-to-configuration test` of the old system (the profile never
    /// changed).
    Test,
    /// Nothing changed.
    Nothing,
}

/// When a deployment reboots its hosts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RebootPolicy {
    #[default]
    Never,
    /// `--reboot`: every host, after its activation.
    Always,
    /// `--reboot=auto`: the hosts whose kernel or initrd changed.
    Auto,
}

impl RebootPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            RebootPolicy::Never => "never",
            RebootPolicy::Always => "always",
            RebootPolicy::Auto => "auto",
        }
    }

    pub fn parse(text: &str) -> Result<RebootPolicy, OptionsError> {
        match text {
            "never" | "no" | "false" => Ok(RebootPolicy::Never),
            "always" | "yes" | "true" | "" => Ok(RebootPolicy::Always),
            "auto" => Ok(RebootPolicy::Auto),
            other => Err(OptionsError(format!(
                "--reboot takes always, auto or never, not `{other}`"
            ))),
        }
    }

    /// Whether a host reboots, given whether its kernel or initrd changed
    /// (`None`: unknown, which `auto` treats as changed: a reboot too many
    /// is safer than a host left on an old kernel).
    pub fn reboots(self, boot_changed: Option<bool>) -> bool {
        match self {
            RebootPolicy::Never => false,
            RebootPolicy::Always => true,
            RebootPolicy::Auto => boot_changed.unwrap_or(true),
        }
    }
}

/// Read from `"auto"`, `"always"`, `"never"` or a boolean.
impl<'de> Deserialize<'de> for RebootPolicy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Flag(bool),
            Text(String),
        }
        match Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom("expected \"always\", \"auto\", \"never\" or a boolean")
        })? {
            Raw::Flag(true) => Ok(RebootPolicy::Always),
            Raw::Flag(false) => Ok(RebootPolicy::Never),
            Raw::Text(t) => RebootPolicy::parse(&t).map_err(|e| serde::de::Error::custom(e.0)),
        }
    }
}

/// What a system boots: `readlink` of its `kernel`, `initrd` and
/// `kernel-modules` (NixOS's own test in `system.autoUpgrade`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootFiles {
    pub kernel: Option<String>,
    pub initrd: Option<String>,
    pub kernel_modules: Option<String>,
}

impl BootFiles {
    pub fn is_known(&self) -> bool {
        self.kernel.is_some() || self.initrd.is_some()
    }
}

/// Whether booting `new` needs a reboot on a host that booted `booted`:
/// `None` when either side is unknown.
pub fn boot_changed(booted: &BootFiles, new: &BootFiles) -> Option<bool> {
    if !booted.is_known() || !new.is_known() {
        return None;
    }
    Some(
        booted.kernel != new.kernel
            || booted.initrd != new.initrd
            || booted.kernel_modules != new.kernel_modules,
    )
}

/// Whether a host whose boot default is `boot_default` and that runs
/// `current` will run something else after its next boot.
pub fn pending_reboot(current: Option<&str>, boot_default: Option<&str>) -> bool {
    matches!((current, boot_default), (Some(c), Some(b)) if c != b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_goal_says_what_it_does_and_how_it_is_undone() {
        assert_eq!(Goal::default(), Goal::Switch);
        for (goal, profile, runs, back, validation) in [
            (
                Goal::Switch,
                true,
                true,
                WayBack::Switch,
                Validation::RunsNewSystem,
            ),
            (
                Goal::Boot,
                true,
                false,
                WayBack::Boot,
                Validation::BootsNewSystem,
            ),
            (
                Goal::Test,
                false,
                true,
                WayBack::Test,
                Validation::RunsNewSystem,
            ),
            (
                Goal::DryActivate,
                false,
                false,
                WayBack::Nothing,
                Validation::Unchanged,
            ),
        ] {
            assert_eq!(goal.sets_profile(), profile, "{goal}");
            assert_eq!(goal.runs_new_system(), runs, "{goal}");
            assert_eq!(goal.way_back(), back, "{goal}");
            assert_eq!(goal.validation(), validation, "{goal}");
            assert_eq!(Goal::parse(goal.as_str()).unwrap(), goal);
            let json = serde_json::to_value(goal).unwrap();
            assert_eq!(json, goal.as_str());
        }
        assert_eq!(Goal::DryActivate.activation(), None);
        assert_eq!(Goal::Boot.activation(), Some(Activation::Boot));
        assert!(Goal::Boot.can_reboot() && Goal::Switch.can_reboot());
        assert!(!Goal::Test.can_reboot() && !Goal::DryActivate.can_reboot());
        assert!(!Goal::DryActivate.changes_host());
        let e = Goal::parse("reboot").unwrap_err().to_string();
        assert!(e.contains("switch, boot, test, dry-activate"), "{e}");
    }

    #[test]
    fn reboot_policies() {
        assert!(!RebootPolicy::Never.reboots(Some(true)));
        assert!(RebootPolicy::Always.reboots(Some(false)));
        assert!(RebootPolicy::Auto.reboots(Some(true)));
        assert!(!RebootPolicy::Auto.reboots(Some(false)));
        assert!(RebootPolicy::Auto.reboots(None));
        assert_eq!(RebootPolicy::parse("").unwrap(), RebootPolicy::Always);
        assert!(RebootPolicy::parse("sometimes").is_err());
        let parse = |json: &str| serde_json::from_str::<RebootPolicy>(json);
        assert_eq!(parse("true").unwrap(), RebootPolicy::Always);
        assert_eq!(parse("false").unwrap(), RebootPolicy::Never);
        assert_eq!(parse("\"auto\"").unwrap(), RebootPolicy::Auto);
        assert!(parse("3").is_err());
    }

    #[test]
    fn a_changed_kernel_or_initrd_needs_a_reboot() {
        let files = |k: &str, i: &str| BootFiles {
            kernel: Some(format!("/nix/store/{k}-linux/bzImage")),
            initrd: Some(format!("/nix/store/{i}-initrd/initrd")),
            kernel_modules: None,
        };
        assert_eq!(
            boot_changed(&files("a", "b"), &files("a", "b")),
            Some(false)
        );
        assert_eq!(boot_changed(&files("a", "b"), &files("c", "b")), Some(true));
        assert_eq!(boot_changed(&files("a", "b"), &files("a", "c")), Some(true));
        assert_eq!(boot_changed(&BootFiles::default(), &files("a", "b")), None);
        assert!(pending_reboot(Some("/nix/store/a"), Some("/nix/store/b")));
        assert!(!pending_reboot(Some("/nix/store/a"), Some("/nix/store/a")));
        assert!(!pending_reboot(None, Some("/nix/store/a")));
    }
}
