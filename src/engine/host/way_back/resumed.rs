//! Where the way back of a resumed deployment leads, for a host an earlier
//! attempt of it had touched (set its profile or activated it).
//!
//! The way back restores what the host ran and booted just before this
//! deployment touched it. Between attempts anything may have happened to
//! the host: the earlier attempt went back already, a watchdog or the
//! settling of a dead coordinator's activation switched it back, an
//! operator rolled it back or switched it by hand. So the host as the
//! resume probed it (after settling) is where it goes back to, except for
//! what still carries the earlier attempt's work:
//!
//! - an activation of this deployment still in flight (settling could not
//!   decide it): the host is half-way, and only the earlier attempt knows
//!   what it had;
//! - the host still runs the system this deployment planned (activated by
//!   the earlier attempt and never taken back): going back, when a failure
//!   or the policy says so, leads to what it ran before that activation;
//! - its boot default is still the system this deployment planned (the
//!   earlier attempt set the profile, e.g. killed before activating): it
//!   goes back to the boot default it had before.

use nix_deploy_core::remote::{Before, HostSystems};

use crate::engine::host::observe::Assessment;

/// What an earlier attempt of a resumed deployment left on record for a
/// host it touched.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Touched {
    /// What the host ran and booted before that attempt touched it.
    pub before: Before,
    /// The token of its last activation of the host, when it got that far.
    pub token: Option<String>,
}

/// What the way back of `assessment`'s host restores in a resumed
/// deployment whose earlier attempt had `touched` it (see the module's
/// documentation). A host that could not be probed keeps the earlier
/// attempt's: nothing is known against it.
pub(crate) fn before_resumed(touched: &Touched, assessment: &Assessment) -> Before {
    match &assessment.probe {
        Some(probe) => before_of(
            touched,
            assessment.host.toplevel(),
            &probe.systems(),
            &probe.pending,
        ),
        None => touched.before.clone(),
    }
}

/// [`before_resumed`] for a host that runs and boots `now`, with the
/// activations `pending` still undecided, and `planned` the system this
/// deployment deploys to it.
fn before_of(touched: &Touched, planned: &str, now: &HostSystems, pending: &[String]) -> Before {
    let in_flight = touched
        .token
        .as_ref()
        .is_some_and(|token| pending.contains(token));
    if in_flight {
        return touched.before.clone();
    }
    let ours = |system: &Option<String>| system.as_deref() == Some(planned);
    Before {
        running: if ours(&now.running) {
            touched.before.running.clone()
        } else {
            now.running.clone()
        },
        boot_generation: if ours(&now.boot) {
            touched.before.boot_generation
        } else {
            now.boot_generation
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G1: &str = "/nix/store/g1";
    const G2: &str = "/nix/store/g2";
    const G3: &str = "/nix/store/g3";

    fn systems(running: &str, boot_generation: u32, boot: &str) -> HostSystems {
        HostSystems {
            running: Some(running.into()),
            boot_generation: Some(boot_generation),
            boot: Some(boot.into()),
        }
    }

    /// The earlier attempt found the host running and booting g2
    /// (generation 2) and planned g3, activation token `t`.
    fn touched() -> Touched {
        Touched {
            before: Before {
                running: Some(G2.into()),
                boot_generation: Some(2),
            },
            token: Some("t".into()),
        }
    }

    #[test]
    fn a_host_changed_since_the_earlier_attempt_goes_back_to_what_it_has_now() {
        // Rolled back on request to generation 1 between the attempts.
        let now = systems(G1, 1, G1);
        assert_eq!(
            before_of(&touched(), G3, &now, &[]),
            Before {
                running: Some(G1.into()),
                boot_generation: Some(1),
            }
        );
    }

    #[test]
    fn a_host_the_earlier_attempt_left_as_it_was_goes_back_to_the_same() {
        // Its way back (or its watchdog) already restored generation 2.
        let now = systems(G2, 2, G2);
        assert_eq!(before_of(&touched(), G3, &now, &[]), touched().before);
    }

    #[test]
    fn a_profile_the_earlier_attempt_set_goes_back_to_the_boot_default_before_it() {
        // Killed after set-profile (generation 3 is g3), before activating.
        let now = systems(G2, 3, G3);
        assert_eq!(before_of(&touched(), G3, &now, &[]), touched().before);
        // Switched by hand to g1 since, the profile still g3's.
        let now = systems(G1, 3, G3);
        assert_eq!(
            before_of(&touched(), G3, &now, &[]),
            Before {
                running: Some(G1.into()),
                boot_generation: Some(2),
            }
        );
    }

    #[test]
    fn a_host_still_running_what_the_earlier_attempt_activated_goes_back_to_before_it() {
        // Switched and confirmed, then killed before it was recorded.
        let now = systems(G3, 3, G3);
        assert_eq!(before_of(&touched(), G3, &now, &[]), touched().before);
        // Staged with `test` (blue-green): runs g3, boots generation 2.
        let now = systems(G3, 2, G2);
        assert_eq!(before_of(&touched(), G3, &now, &[]), touched().before);
    }

    #[test]
    fn an_activation_of_this_deployment_still_in_flight_goes_back_to_before_it() {
        let now = systems(G1, 1, G1);
        assert_eq!(
            before_of(&touched(), G3, &now, &["t".to_string()]),
            touched().before
        );
        // Another activation's token is not this deployment's.
        assert_eq!(
            before_of(&touched(), G3, &now, &["u".to_string()]).boot_generation,
            Some(1)
        );
    }

    #[test]
    fn a_host_that_already_ran_the_planned_system_keeps_running_it() {
        // The earlier attempt found g3 running already (staged to boot g2).
        let touched = Touched {
            before: Before {
                running: Some(G3.into()),
                boot_generation: Some(2),
            },
            token: None,
        };
        let now = systems(G3, 2, G2);
        assert_eq!(before_of(&touched, G3, &now, &[]), touched.before);
    }
}
