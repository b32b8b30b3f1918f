//! Durations as people write them, on every flag, config key, API field and
//! chat argument: a plain number of seconds (`90`), or `30s`, `5m`, `1h30m`,
//! `2m 30s` (parsed by `humantime`). One parser for all of them, with bounds:
//! nothing a person can type overflows a deadline or wraps a shell counter.

use std::time::Duration;

/// The longest duration anything accepts: a week. Large enough for any real
/// timeout or soak; small enough that `Instant + d` and the host-side
/// watchdog's counters can never overflow.
pub const MAX: Duration = Duration::from_secs(7 * 24 * 3600);

/// What every error shows as an accepted spelling.
pub const EXAMPLES: &str = "e.g. 90 (seconds), 30s, 5m, 1h30m";

/// Parse a duration: a plain number of seconds or a `humantime` duration.
/// Zero is allowed (a soak of nothing); see [`parse_timeout`] for timeouts.
pub fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let duration = if text.is_empty() {
        return Err(format!("an empty value is not a duration ({EXAMPLES})"));
    } else if text.bytes().all(|b| b.is_ascii_digit()) {
        text.parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|_| too_long(text))?
    } else {
        humantime::parse_duration(text)
            .map_err(|e| format!("`{text}` is not a duration: {e} ({EXAMPLES})"))?
    };
    if duration > MAX {
        return Err(too_long(text));
    }
    Ok(duration)
}

fn too_long(text: &str) -> String {
    format!("`{text}` is too long: at most {}", format(MAX))
}

/// A span of the past (`audit --since 30d`): like [`parse`], up to ten
/// years rather than a week.
pub fn parse_span(text: &str) -> Result<Duration, String> {
    const TEN_YEARS: Duration = Duration::from_secs(10 * 366 * 24 * 3600);
    let text = text.trim();
    let span = if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        text.parse::<u64>().map(Duration::from_secs).ok()
    } else {
        humantime::parse_duration(text).ok()
    }
    .ok_or_else(|| format!("`{text}` is not a duration (e.g. 7d, 12h, 30d)"))?;
    if span > TEN_YEARS {
        return Err(format!("`{text}` is more than ten years"));
    }
    Ok(span)
}

/// A timeout: like [`parse`], and at least one second (a zero timeout would
/// fail every step at once).
pub fn parse_timeout(text: &str) -> Result<Duration, String> {
    let duration = parse(text)?;
    if duration < Duration::from_secs(1) {
        return Err(format!(
            "`{}` is too short for a timeout: at least 1s",
            text.trim()
        ));
    }
    Ok(duration)
}

/// A duration as a person reads it (`2m 30s`); [`parse`] reads it back.
pub fn format(duration: Duration) -> String {
    humantime::format_duration(duration).to_string()
}

/// Serde for `Duration` fields: written as a human string (`"2m 30s"`), read
/// from a number of seconds or any string [`parse`] accepts.
pub mod human {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// A number of seconds or a string, as JSON and TOML carry them.
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Seconds(u64),
        Text(String),
    }

    pub fn serialize<S: Serializer>(duration: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format(*duration))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let raw = Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom(format!(
                "expected a duration: a number of seconds or a string ({})",
                super::EXAMPLES
            ))
        })?;
        match raw {
            Raw::Seconds(secs) => super::parse(&secs.to_string()),
            Raw::Text(text) => super::parse(&text),
        }
        .map_err(serde::de::Error::custom)
    }

    /// The same for `Option<Duration>` (absent or `null` is `None`).
    pub mod option {
        use std::time::Duration;

        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(
            duration: &Option<Duration>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match duration {
                Some(d) => super::serialize(d, s),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            #[derive(Deserialize)]
            struct Wrapped(#[serde(with = "super")] Duration);
            Ok(Option::<Wrapped>::deserialize(d)?.map(|w| w.0))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_durations_as_people_write_them() {
        assert_eq!(parse("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("2m 30s"), Ok(Duration::from_secs(150)));
        assert_eq!(parse(" 10s "), Ok(Duration::from_secs(10)));
        assert_eq!(parse("0"), Ok(Duration::ZERO));
        assert_eq!(parse("1500ms"), Ok(Duration::from_millis(1500)));
    }

    #[test]
    fn refuses_nonsense_and_huge_values_with_an_example() {
        for bad in ["", "10x", "-5", "s", "1e3", "5 minutes and a bit"] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains("30s"), "{bad}: {e}");
        }
        for huge in [
            "18446744073709551615",
            "99999999999999999999999",
            "5124095576030431h",
            "8d",
        ] {
            let e = parse(huge).unwrap_err();
            assert!(e.contains("too long"), "{huge}: {e}");
        }
        assert_eq!(parse("7d"), Ok(MAX));
        assert!(parse_timeout("0").unwrap_err().contains("at least 1s"));
        assert!(parse_timeout("500ms").is_err());
        assert_eq!(parse_timeout("1s"), Ok(Duration::from_secs(1)));
    }

    #[test]
    fn round_trips_through_serde() {
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct T {
            #[serde(with = "human")]
            a: Duration,
            #[serde(with = "human::option", default)]
            b: Option<Duration>,
        }
        let t = T {
            a: Duration::from_secs(150),
            b: Some(Duration::from_secs(3600)),
        };
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(json, r#"{"a":"2m 30s","b":"1h"}"#);
        assert_eq!(serde_json::from_str::<T>(&json).unwrap(), t);
        let t: T = serde_json::from_str(r#"{"a": 45}"#).unwrap();
        assert_eq!(t.a, Duration::from_secs(45));
        assert_eq!(t.b, None);
        let e = serde_json::from_str::<T>(r#"{"a": "10x"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a duration") && e.contains("30s"), "{e}");
        let e = serde_json::from_str::<T>(r#"{"a": -3}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("expected a duration"), "{e}");
        let t: T = toml::from_str("a = \"1h30m\"\nb = 20").unwrap();
        assert_eq!(t.a, Duration::from_secs(5400));
        assert_eq!(t.b, Some(Duration::from_secs(20)));
    }
}
