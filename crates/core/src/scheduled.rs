//! Scheduled deployments (`[[schedule]]`): when each one is due, decided
//! from its cron pattern, its time zone, the last occurrence it accounted
//! for and "now" (a parameter, as everywhere in the core: the daemon's loop
//! passes its clock, tests pass theirs).
//!
//! An occurrence is *accounted for* once it ran, or was passed over on
//! purpose. What the daemon does with a schedule, at any moment:
//!
//! - never seen before → it starts counting now ([`Due::Baseline`]):
//!   occurrences before the schedule existed never run;
//! - one or more occurrences passed since the last one accounted for →
//!   **one** deployment, for the newest of them ([`Due::Run`]): missed
//!   runs while the daemon was down are not replayed in a burst; at most
//!   one runs when it starts again (as systemd's `Persistent=` timers do);
//! - otherwise → wait for the next occurrence ([`Due::Wait`]).

use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

use crate::window::{Schedule, at, ms};

/// A `[[schedule]]`'s timing, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct Timer {
    pub schedule: Schedule,
    pub zone: Tz,
}

/// What a schedule wants now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Due {
    /// First seen: account for everything up to now, run nothing.
    Baseline,
    /// Start one deployment for `occurrence` (Unix ms); `missed` more
    /// occurrences between the last one accounted for and it are passed
    /// over (none when the daemon was up all along).
    Run { occurrence: i64, missed: u32 },
    /// Nothing is due; the next occurrence is at `next` (none within a
    /// year: a pattern such as February 30th).
    Wait { next: Option<i64> },
}

/// How many passed-over occurrences are counted, at most (a schedule that
/// fires every second and a daemon down for a week).
const MAX_COUNTED: u32 = 10_000;

impl Timer {
    pub fn new(schedule: Schedule, zone: Tz) -> Self {
        Timer { schedule, zone }
    }

    /// What is due at `now`, given the last occurrence accounted for.
    pub fn due(&self, accounted: Option<i64>, now: i64) -> Due {
        let Some(accounted) = accounted else {
            return Due::Baseline;
        };
        match self.schedule.previous(self.zone, at(now)).map(ms) {
            Some(latest) if latest > accounted => Due::Run {
                occurrence: latest,
                missed: self.count_between(accounted, latest),
            },
            _ => Due::Wait {
                next: self.next_after(now.max(accounted)),
            },
        }
    }

    /// The first occurrence strictly after `t`.
    pub fn next_after(&self, t: i64) -> Option<i64> {
        self.schedule.next(self.zone, at(t), false).map(ms)
    }

    /// Occurrences strictly between `after` and `before`.
    fn count_between(&self, after: i64, before: i64) -> u32 {
        let mut count = 0;
        let mut t = after;
        while count < MAX_COUNTED {
            match self.next_after(t) {
                Some(next) if next < before => {
                    count += 1;
                    t = next;
                }
                _ => break,
            }
        }
        count
    }
}

/// A schedule as `GET /api/v1/schedules` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleState {
    pub name: String,
    pub cron: String,
    pub timezone: String,
    /// The last occurrence accounted for (Unix ms): run, or passed over.
    pub accounted_until: Option<i64>,
    /// The deployment its last run started.
    pub last_deployment_id: Option<i64>,
    /// Its next occurrence (Unix ms).
    pub next_run: Option<i64>,
}

/// `GET /api/v1/schedules`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchedulesReport {
    /// The daemon's clock when it answered (Unix ms).
    pub now: i64,
    pub schedules: Vec<ScheduleState>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};

    fn utc_ms(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> i64 {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, s)
            .unwrap()
            .timestamp_millis()
    }

    fn timer(cron: &str, zone: &str) -> Timer {
        Timer::new(
            Schedule::parse(cron).unwrap(),
            crate::window::parse_zone(zone).unwrap(),
        )
    }

    #[test]
    fn a_new_schedule_counts_from_now_and_never_runs_what_came_before() {
        let nightly = timer("0 3 * * *", "UTC");
        assert_eq!(
            nightly.due(None, utc_ms(2026, 5, 1, 12, 0, 0)),
            Due::Baseline
        );
    }

    #[test]
    fn a_schedule_runs_at_each_occurrence_and_waits_in_between() {
        let nightly = timer("0 3 * * *", "UTC");
        let accounted = utc_ms(2026, 5, 1, 12, 0, 0);
        assert_eq!(
            nightly.due(Some(accounted), utc_ms(2026, 5, 1, 18, 0, 0)),
            Due::Wait {
                next: Some(utc_ms(2026, 5, 2, 3, 0, 0))
            }
        );
        // Exactly at the occurrence, and a little after it.
        for now in [utc_ms(2026, 5, 2, 3, 0, 0), utc_ms(2026, 5, 2, 3, 0, 2)] {
            assert_eq!(
                nightly.due(Some(accounted), now),
                Due::Run {
                    occurrence: utc_ms(2026, 5, 2, 3, 0, 0),
                    missed: 0
                }
            );
        }
        // Once accounted for, it waits for the next night.
        assert_eq!(
            nightly.due(
                Some(utc_ms(2026, 5, 2, 3, 0, 0)),
                utc_ms(2026, 5, 2, 3, 0, 2)
            ),
            Due::Wait {
                next: Some(utc_ms(2026, 5, 3, 3, 0, 0))
            }
        );
    }

    #[test]
    fn runs_missed_while_the_daemon_was_down_run_once_not_in_a_burst() {
        let nightly = timer("0 3 * * *", "UTC");
        // Down from the 1st to the 5th at noon: four nights missed, one run,
        // for the newest (the 5th), the three before it passed over.
        let due = nightly.due(
            Some(utc_ms(2026, 5, 1, 12, 0, 0)),
            utc_ms(2026, 5, 5, 12, 0, 0),
        );
        assert_eq!(
            due,
            Due::Run {
                occurrence: utc_ms(2026, 5, 5, 3, 0, 0),
                missed: 3
            }
        );
        // After that run, nothing more until the next night.
        assert_eq!(
            nightly.due(
                Some(utc_ms(2026, 5, 5, 3, 0, 0)),
                utc_ms(2026, 5, 5, 12, 0, 1)
            ),
            Due::Wait {
                next: Some(utc_ms(2026, 5, 6, 3, 0, 0))
            }
        );
    }

    #[test]
    fn seconds_time_zones_and_a_clock_that_went_back() {
        // Seconds first: fires at 12:00:05 and 12:00:10.
        let soon = timer("5,10 0 12 * * *", "UTC");
        let accounted = utc_ms(2026, 5, 1, 12, 0, 1);
        assert_eq!(
            soon.due(Some(accounted), utc_ms(2026, 5, 1, 12, 0, 3)),
            Due::Wait {
                next: Some(utc_ms(2026, 5, 1, 12, 0, 5))
            }
        );
        assert_eq!(
            soon.due(Some(accounted), utc_ms(2026, 5, 1, 12, 0, 7)),
            Due::Run {
                occurrence: utc_ms(2026, 5, 1, 12, 0, 5),
                missed: 0
            }
        );
        // 03:00 in Berlin is 01:00 UTC in summer.
        let berlin = timer("0 3 * * *", "Europe/Berlin");
        assert_eq!(
            berlin.due(
                Some(utc_ms(2026, 7, 1, 12, 0, 0)),
                utc_ms(2026, 7, 2, 1, 30, 0)
            ),
            Due::Run {
                occurrence: utc_ms(2026, 7, 2, 1, 0, 0),
                missed: 0
            }
        );
        // A clock set back before what was accounted for runs nothing twice.
        assert_eq!(
            soon.due(
                Some(utc_ms(2026, 5, 1, 12, 0, 10)),
                utc_ms(2026, 5, 1, 12, 0, 7)
            ),
            Due::Wait {
                next: Some(utc_ms(2026, 5, 2, 12, 0, 5))
            }
        );
    }
}
