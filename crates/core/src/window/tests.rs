//! Unit tests of [`super`].

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
