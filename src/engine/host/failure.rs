//! Why a host's pipeline stopped, and what that means for the host: decided
//! once, here, for every step ([`At::recovery`]); carried out by
//! [`super::way_back`].

use crate::store::StoreError;

/// The step where a host's pipeline failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum At {
    Preflight,
    /// Unhealthy before we touched it: reported, not blamed on us.
    Unhealthy,
    Build,
    Copy,
    /// Pre-activation keys could not be uploaded (the system is untouched).
    Keys,
    /// `dry-activate` failed (nothing changed).
    DryActivate,
    SetProfile,
    Activate,
    /// Post-activation keys could not be uploaded: the new system runs
    /// without them.
    KeysAfterActivation,
    Validate,
    /// The new system did not let us in over a new connection.
    Confirm,
    /// The reboot did not bring the host back on the new system.
    Reboot,
    /// Back from the reboot, the host failed its keys or validation.
    AfterReboot,
    Soak,
}

/// What a failure means for the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Recovery {
    /// Nothing on the host changed: it failed, and that is all.
    Untouched,
    /// Unhealthy before we started: not deployed, not our doing.
    Unhealthy,
    /// The host runs (or may run, or boots) the new system: switch it back.
    RollBack,
    /// The new system runs but refuses new connections: its watchdog
    /// switches it back by itself; wait for that and verify.
    AwaitWatchdog,
    /// The host rebooted (or tried to): make the old generation the boot
    /// default again and reboot into it.
    RollBackThroughBoot,
}

impl At {
    /// Decided once for every step.
    pub fn recovery(self) -> Recovery {
        match self {
            At::Preflight | At::Build | At::Copy | At::SetProfile | At::Keys | At::DryActivate => {
                Recovery::Untouched
            }
            At::Unhealthy => Recovery::Unhealthy,
            At::Activate | At::Validate | At::Soak | At::KeysAfterActivation => Recovery::RollBack,
            At::Confirm => Recovery::AwaitWatchdog,
            At::Reboot | At::AfterReboot => Recovery::RollBackThroughBoot,
        }
    }
}

/// Why a host's pipeline stopped.
#[derive(Debug)]
pub(crate) enum Stop {
    /// A step failed; the message names the host and the step.
    Failed { at: At, message: String },
    /// The history could not be written.
    Store(StoreError),
}

impl Stop {
    /// For `map_err`: a failure of step `at` with the step's message.
    pub fn at(at: At) -> impl FnOnce(String) -> Stop {
        move |message| Stop::Failed { at, message }
    }
}

impl From<StoreError> for Stop {
    fn from(e: StoreError) -> Self {
        Stop::Store(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_failure_is_recovered_as_its_step_requires() {
        for (at, expected) in [
            (At::Preflight, Recovery::Untouched),
            (At::Unhealthy, Recovery::Unhealthy),
            (At::Build, Recovery::Untouched),
            (At::Copy, Recovery::Untouched),
            (At::SetProfile, Recovery::Untouched),
            (At::Activate, Recovery::RollBack),
            (At::Validate, Recovery::RollBack),
            (At::Soak, Recovery::RollBack),
            (At::Confirm, Recovery::AwaitWatchdog),
            (At::Keys, Recovery::Untouched),
            (At::DryActivate, Recovery::Untouched),
            (At::KeysAfterActivation, Recovery::RollBack),
            (At::Reboot, Recovery::RollBackThroughBoot),
            (At::AfterReboot, Recovery::RollBackThroughBoot),
        ] {
            assert_eq!(at.recovery(), expected, "{at:?}");
            let Stop::Failed { at: got, message } = Stop::at(at)("h: step: boom".into()) else {
                panic!("a step failure");
            };
            assert_eq!((got, message.as_str()), (at, "h: step: boom"));
        }
    }
}
