//! Maintenance windows: when hosts may be deployed, as Argo CD's sync
//! windows decide it.
//!
//! A window opens at every occurrence of its cron `schedule` (in its
//! `timezone`) and stays open for `duration`. For one host, among the
//! windows whose `hosts` select it:
//!
//! - no window → the host may be deployed at any time;
//! - allow windows → only while one of them is open;
//! - a deny window that is open → never, whatever the allow windows say
//!   (deny wins).
//!
//! Daylight-saving changes follow cron's own rules (Vixie cron, as croner
//! implements them): a window whose start falls in the hour that is skipped
//! in spring opens at the first instant after the gap; a start in the hour
//! that happens twice in autumn opens once, at the first of the two. A
//! duration is elapsed time, so a window across a change lasts as long as
//! any other.
//!
//! Nothing here reads a clock: every question takes "now" (Unix
//! milliseconds), so tests shape time as they like.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;
use serde::{Deserialize, Serialize};

use crate::select::HostFilter;

/// Allow or deny.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WindowKind {
    Allow,
    Deny,
}

impl WindowKind {
    pub fn as_str(self) -> &'static str {
        match self {
            WindowKind::Allow => "allow",
            WindowKind::Deny => "deny",
        }
    }
}

/// A window as written (`[[window]]` in the config, the NixOS module).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct WindowSpec {
    /// A name for messages (default: `window N`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub kind: WindowKind,
    /// When it opens: a cron pattern (5 fields, minutes; or 6, seconds
    /// first), e.g. `0 22 * * 1-5`, or `@daily`.
    pub schedule: String,
    /// How long it stays open after each opening: `2h`, `30m`, `90` (seconds).
    pub duration: String,
    /// An IANA time zone (`Europe/Berlin`); default UTC.
    #[serde(default = "utc")]
    pub timezone: String,
    /// Selectors of the hosts it is about (names, globs, `@tags`); none:
    /// every host.
    #[serde(default)]
    pub hosts: Vec<String>,
}

fn utc() -> String {
    "UTC".into()
}

/// A window that cannot be used; `key` and `value` name what is wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{key} = `{value}`: {reason}")]
pub struct WindowError {
    pub key: String,
    pub value: String,
    pub reason: String,
}

/// The longest window: a cron schedule repeats at least yearly, and a
/// window longer than the longest duration anything takes would be a
/// permanent state, better written as one.
pub const MAX_DURATION: Duration = crate::duration::MAX;

/// A cron pattern, parsed and checked (seconds optional).
#[derive(Clone, Debug)]
pub struct Schedule {
    cron: Cron,
    text: String,
}

impl PartialEq for Schedule {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Schedule {
    pub fn parse(text: &str) -> Result<Schedule, String> {
        let cron = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Optional)
            .build()
            .parse(text.trim())
            .map_err(|e| format!("not a cron pattern ({e}); e.g. `0 22 * * 1-5`, `@daily`"))?;
        Ok(Schedule {
            cron,
            text: text.trim().to_string(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The first occurrence at or after `from` (`inclusive`) or strictly after it.
    pub fn next(&self, zone: Tz, from: DateTime<Utc>, inclusive: bool) -> Option<DateTime<Utc>> {
        self.cron
            .find_next_occurrence(&from.with_timezone(&zone), inclusive)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }

    /// The last occurrence at or before `at`.
    pub fn previous(&self, zone: Tz, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_previous_occurrence(&at.with_timezone(&zone), true)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }
}

/// An IANA time zone name, checked.
pub fn parse_zone(text: &str) -> Result<Tz, String> {
    Tz::from_str(text.trim())
        .map_err(|_| "not a time zone; use an IANA name such as `UTC` or `Europe/Berlin`".into())
}

/// A window, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct Window {
    pub name: String,
    pub kind: WindowKind,
    pub schedule: Schedule,
    pub duration: Duration,
    pub zone: Tz,
    pub hosts: HostFilter,
    /// As written, for the API.
    pub spec: WindowSpec,
}

/// Unix milliseconds as a UTC time (the earliest time for one out of range).
pub(crate) fn at(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms)
        .single()
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// A UTC time as Unix milliseconds.
pub(crate) fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

/// How many openings an answer may look at: a window that opens every
/// minute and never closes in between must not hang the question.
const MAX_STEPS: usize = 10_000;

/// How far ahead the next opening is looked for.
const HORIZON_MS: i64 = 400 * 24 * 3600 * 1000;

impl Window {
    /// Check a window as written; `key` is where it was written
    /// (`window[2]`), for errors.
    pub fn new(spec: &WindowSpec, key: &str) -> Result<Window, WindowError> {
        let error = |field: &str, value: &str, reason: String| WindowError {
            key: format!("{key}.{field}"),
            value: value.to_string(),
            reason,
        };
        let schedule =
            Schedule::parse(&spec.schedule).map_err(|e| error("schedule", &spec.schedule, e))?;
        let duration = crate::duration::parse(&spec.duration)
            .map_err(|e| error("duration", &spec.duration, e))?;
        if duration < Duration::from_secs(1) {
            return Err(error(
                "duration",
                &spec.duration,
                "a window must stay open at least 1s".into(),
            ));
        }
        let zone = parse_zone(&spec.timezone).map_err(|e| error("timezone", &spec.timezone, e))?;
        let hosts = HostFilter::parse(&spec.hosts)
            .map_err(|e| error("hosts", &spec.hosts.join(", "), e.to_string()))?;
        if let Some(name) = &spec.name
            && (name.is_empty() || name.len() > 64 || name.chars().any(char::is_control))
        {
            return Err(error(
                "name",
                name,
                "a name is 1 to 64 printable characters".into(),
            ));
        }
        Ok(Window {
            name: spec.name.clone().unwrap_or_else(|| key.to_string()),
            kind: spec.kind,
            schedule,
            duration,
            zone,
            hosts,
            spec: spec.clone(),
        })
    }

    fn duration_ms(&self) -> i64 {
        self.duration.as_millis() as i64
    }

    /// When the window is open at `now`: when it closes (later openings
    /// that overlap extend it).
    pub fn open_until(&self, now: i64) -> Option<i64> {
        let last = self.schedule.previous(self.zone, at(now))?;
        let mut end = ms(last) + self.duration_ms();
        if end <= now {
            return None;
        }
        let mut cursor = last;
        for _ in 0..MAX_STEPS {
            match self.schedule.next(self.zone, cursor, false) {
                Some(next) if ms(next) < end => {
                    end = end.max(ms(next) + self.duration_ms());
                    cursor = next;
                }
                _ => break,
            }
        }
        Some(end)
    }

    /// The next opening strictly after `now`.
    pub fn next_opening(&self, now: i64) -> Option<i64> {
        self.schedule.next(self.zone, at(now), false).map(ms)
    }

    /// What the window says now, for the API.
    pub fn state(&self, now: i64) -> WindowState {
        let open_until = self.open_until(now);
        WindowState {
            name: self.name.clone(),
            kind: self.kind,
            schedule: self.schedule.as_str().to_string(),
            duration: crate::duration::format(self.duration),
            timezone: self.zone.name().to_string(),
            hosts: self.spec.hosts.clone(),
            open: open_until.is_some(),
            closes_at: open_until,
            next_opening: self.next_opening(open_until.unwrap_or(now)),
        }
    }
}

/// Whether a host may be deployed now, and if not, why and until when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed; `until` is when that stops being so, if it will (an allow
    /// window closing, a deny window opening).
    Open { until: Option<i64> },
    Closed {
        reason: String,
        /// The first moment the host may be deployed again (`None`: not
        /// within the next 400 days).
        opens_at: Option<i64>,
    },
}

impl Verdict {
    pub fn is_open(&self) -> bool {
        matches!(self, Verdict::Open { .. })
    }
}

/// Every window of the configuration.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Windows {
    pub windows: Vec<Window>,
}

impl Windows {
    /// Check every `[[window]]`; errors name `window[N].field`.
    pub fn new(specs: &[WindowSpec]) -> Result<Windows, WindowError> {
        let windows = specs
            .iter()
            .enumerate()
            .map(|(index, spec)| Window::new(spec, &format!("window[{index}]")))
            .collect::<Result<_, _>>()?;
        Ok(Windows { windows })
    }

    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }

    fn about<'a>(&'a self, name: &'a str, tags: &'a [String]) -> impl Iterator<Item = &'a Window> {
        self.windows
            .iter()
            .filter(move |w| w.hosts.matches(name, tags))
    }

    /// Whether the host may be deployed at `now` (without looking ahead).
    fn allowed_at(&self, name: &str, tags: &[String], now: i64) -> Result<(), String> {
        let mut allows = Vec::new();
        let mut any_allow_open = false;
        for window in self.about(name, tags) {
            let open = window.open_until(now);
            match window.kind {
                WindowKind::Deny => {
                    if let Some(end) = open {
                        return Err(format!(
                            "deny window `{}` is open until {}",
                            window.name,
                            crate::render::timestamp(end)
                        ));
                    }
                }
                WindowKind::Allow => {
                    allows.push(window.name.as_str());
                    any_allow_open |= open.is_some();
                }
            }
        }
        if !allows.is_empty() && !any_allow_open {
            return Err(format!(
                "outside its allow window{} `{}`",
                if allows.len() > 1 { "s" } else { "" },
                allows.join("`, `")
            ));
        }
        Ok(())
    }

    /// The next moment after `now` at which any window about the host opens
    /// or closes.
    fn next_change(&self, name: &str, tags: &[String], now: i64) -> Option<i64> {
        self.about(name, tags)
            .filter_map(|w| match w.open_until(now) {
                Some(end) => Some(end),
                None => w.next_opening(now),
            })
            .filter(|t| *t > now)
            .min()
    }

    /// Whether `name` (with `tags`) may be deployed at `now`; if not, why
    /// and when it may next.
    pub fn verdict(&self, name: &str, tags: &[String], now: i64) -> Verdict {
        match self.allowed_at(name, tags, now) {
            Ok(()) => Verdict::Open {
                until: self.next_closing(name, tags, now),
            },
            Err(reason) => Verdict::Closed {
                reason,
                opens_at: self.next_allowed(name, tags, now),
            },
        }
    }

    /// The first moment at or after `now` at which the host may be deployed.
    pub fn next_allowed(&self, name: &str, tags: &[String], now: i64) -> Option<i64> {
        let mut t = now;
        for _ in 0..MAX_STEPS {
            if self.allowed_at(name, tags, t).is_ok() {
                return Some(t);
            }
            t = self.next_change(name, tags, t)?;
            if t > now + HORIZON_MS {
                return None;
            }
        }
        None
    }

    /// When an allowed host stops being allowed, if it will.
    fn next_closing(&self, name: &str, tags: &[String], now: i64) -> Option<i64> {
        let mut t = now;
        for _ in 0..MAX_STEPS {
            t = self.next_change(name, tags, t)?;
            if t > now + HORIZON_MS {
                return None;
            }
            if self.allowed_at(name, tags, t).is_err() {
                return Some(t);
            }
        }
        None
    }

    /// Every window's state now (`GET /api/v1/windows`).
    pub fn states(&self, now: i64) -> WindowsReport {
        WindowsReport {
            now,
            windows: self.windows.iter().map(|w| w.state(now)).collect(),
        }
    }
}

/// One window as the API shows it: open or not, until when, and its next
/// opening.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowState {
    pub name: String,
    pub kind: WindowKind,
    pub schedule: String,
    pub duration: String,
    pub timezone: String,
    pub hosts: Vec<String>,
    pub open: bool,
    /// While open: when it closes (Unix ms).
    pub closes_at: Option<i64>,
    /// The next opening after the current one (Unix ms).
    pub next_opening: Option<i64>,
}

/// `GET /api/v1/windows`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowsReport {
    /// The daemon's clock when it answered (Unix ms).
    pub now: i64,
    pub windows: Vec<WindowState>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc_ms(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> i64 {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0)
            .unwrap()
            .timestamp_millis()
    }

    fn window(
        kind: WindowKind,
        schedule: &str,
        duration: &str,
        zone: &str,
        hosts: &[&str],
    ) -> WindowSpec {
        WindowSpec {
            name: None,
            kind,
            schedule: schedule.into(),
            duration: duration.into(),
            timezone: zone.into(),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
        }
    }

    fn tags(t: &[&str]) -> Vec<String> {
        t.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn no_window_allows_allow_windows_restrict_deny_wins() {
        let windows = Windows::new(&[
            // Weekdays 22:00-02:00 UTC for production.
            window(WindowKind::Allow, "0 22 * * 1-5", "4h", "UTC", &["@prod"]),
            // Never during the Friday freeze, for everyone.
            window(WindowKind::Deny, "0 23 * * 5", "1h", "UTC", &[]),
        ])
        .unwrap();
        let staging = tags(&["staging"]);
        let prod = tags(&["prod"]);
        // Wednesday 2026-03-04 12:00 UTC.
        let noon = utc_ms(2026, 3, 4, 12, 0);
        assert_eq!(
            windows.verdict("s1", &staging, noon),
            Verdict::Open {
                until: Some(utc_ms(2026, 3, 6, 23, 0))
            },
            "only the Friday freeze is about staging"
        );
        match windows.verdict("p1", &prod, noon) {
            Verdict::Closed { reason, opens_at } => {
                assert!(reason.contains("outside its allow window"), "{reason}");
                assert_eq!(opens_at, Some(utc_ms(2026, 3, 4, 22, 0)));
            }
            other => panic!("{other:?}"),
        }
        // Open at 23:30, until 02:00.
        assert_eq!(
            windows.verdict("p1", &prod, utc_ms(2026, 3, 4, 23, 30)),
            Verdict::Open {
                until: Some(utc_ms(2026, 3, 5, 2, 0))
            }
        );
        // Friday 23:30: the allow window is open, the deny window wins; the
        // host may go again at midnight, when the deny window closes.
        match windows.verdict("p1", &prod, utc_ms(2026, 3, 6, 23, 30)) {
            Verdict::Closed { reason, opens_at } => {
                assert!(reason.contains("deny window `window[1]`"), "{reason}");
                assert_eq!(opens_at, Some(utc_ms(2026, 3, 7, 0, 0)));
            }
            other => panic!("{other:?}"),
        }
        // Staging, Friday 23:30: denied too, open again at midnight.
        assert!(
            !windows
                .verdict("s1", &staging, utc_ms(2026, 3, 6, 23, 30))
                .is_open()
        );
        // An allowed prod host on Friday 22:30 is allowed until the freeze.
        assert_eq!(
            windows.verdict("p1", &prod, utc_ms(2026, 3, 6, 22, 30)),
            Verdict::Open {
                until: Some(utc_ms(2026, 3, 6, 23, 0))
            }
        );
    }

    #[test]
    fn overlapping_openings_extend_a_window() {
        let w = Window::new(
            &window(WindowKind::Allow, "0 * * * *", "90m", "UTC", &[]),
            "w",
        )
        .unwrap();
        let now = utc_ms(2026, 1, 1, 10, 15);
        // Opens every hour for 90 minutes: never closes.
        assert!(w.open_until(now).unwrap() > now + 3600 * 1000);
    }

    #[test]
    fn spring_forward_opens_a_window_in_the_skipped_hour_after_the_gap() {
        // Europe/Berlin skips 02:00-03:00 on 2026-03-29 (01:00 UTC).
        let w = Window::new(
            &window(WindowKind::Allow, "30 2 * * *", "1h", "Europe/Berlin", &[]),
            "w",
        )
        .unwrap();
        // The day before: 02:30 CET = 01:30 UTC.
        assert_eq!(
            w.next_opening(utc_ms(2026, 3, 28, 0, 0)),
            Some(utc_ms(2026, 3, 28, 1, 30))
        );
        // On the day, 02:30 does not exist: it opens at 03:00 CEST (01:00
        // UTC) and lasts its hour.
        let opening = w.next_opening(utc_ms(2026, 3, 28, 12, 0)).unwrap();
        assert_eq!(opening, utc_ms(2026, 3, 29, 1, 0));
        assert_eq!(
            w.open_until(opening + 60_000),
            Some(utc_ms(2026, 3, 29, 2, 0))
        );
        // The day after: 02:30 CEST = 00:30 UTC.
        assert_eq!(
            w.next_opening(utc_ms(2026, 3, 29, 12, 0)),
            Some(utc_ms(2026, 3, 30, 0, 30))
        );
    }

    #[test]
    fn fall_back_opens_a_window_in_the_repeated_hour_once() {
        // Europe/Berlin repeats 02:00-03:00 on 2026-10-25 (00:00-01:00 UTC
        // as CEST, 01:00-02:00 UTC as CET).
        let w = Window::new(
            &window(WindowKind::Allow, "30 2 * * *", "20m", "Europe/Berlin", &[]),
            "w",
        )
        .unwrap();
        let first = w.next_opening(utc_ms(2026, 10, 24, 12, 0)).unwrap();
        assert_eq!(first, utc_ms(2026, 10, 25, 0, 30), "the first 02:30 (CEST)");
        assert_eq!(
            w.open_until(first + 1000),
            Some(utc_ms(2026, 10, 25, 0, 50))
        );
        // The second 02:30 (CET, 01:30 UTC) is not another opening.
        assert_eq!(w.open_until(utc_ms(2026, 10, 25, 1, 35)), None);
        assert_eq!(
            w.next_opening(first),
            Some(utc_ms(2026, 10, 26, 1, 30)),
            "next: 02:30 CET the day after"
        );
        // A deny window across the change lasts its elapsed duration.
        let deny = Windows::new(&[window(
            WindowKind::Deny,
            "0 2 * * *",
            "2h",
            "Europe/Berlin",
            &[],
        )])
        .unwrap();
        match deny.verdict("h", &[], utc_ms(2026, 10, 25, 0, 30)) {
            Verdict::Closed { opens_at, .. } => {
                assert_eq!(opens_at, Some(utc_ms(2026, 10, 25, 2, 0)))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_windows_name_the_key_and_the_value() {
        let bad = |spec: WindowSpec| Windows::new(&[spec]).unwrap_err().to_string();
        let e = bad(window(WindowKind::Allow, "61 * * * *", "1h", "UTC", &[]));
        assert!(e.starts_with("window[0].schedule = `61 * * * *`"), "{e}");
        let e = bad(window(WindowKind::Allow, "0 * * * *", "1x", "UTC", &[]));
        assert!(e.starts_with("window[0].duration = `1x`"), "{e}");
        let e = bad(window(WindowKind::Allow, "0 * * * *", "0", "UTC", &[]));
        assert!(e.contains("at least 1s"), "{e}");
        let e = bad(window(
            WindowKind::Allow,
            "0 * * * *",
            "1h",
            "Mars/Olympus",
            &[],
        ));
        assert!(e.starts_with("window[0].timezone = `Mars/Olympus`"), "{e}");
        let e = bad(window(
            WindowKind::Allow,
            "0 * * * *",
            "1h",
            "UTC",
            &["a;b"],
        ));
        assert!(e.starts_with("window[0].hosts = `a;b`"), "{e}");
    }

    #[test]
    fn a_window_that_never_opens_has_no_next_opening() {
        // February 30th never comes.
        let windows = Windows::new(&[window(WindowKind::Allow, "0 0 30 2 *", "1h", "UTC", &[])]);
        if let Ok(windows) = windows {
            assert!(matches!(
                windows.verdict("h", &[], utc_ms(2026, 1, 1, 0, 0)),
                Verdict::Closed { opens_at: None, .. }
            ));
        }
    }
}
