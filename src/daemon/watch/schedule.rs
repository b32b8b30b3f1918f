//! When each host is probed and when its health checks run: a host's first
//! probe falls somewhere in the first interval (hosts spread out, not all at
//! once), then every interval give or take a tenth (jitter, so hosts that
//! started together drift apart). Health checks ride along with a probe
//! once their own interval passed. Times are Unix milliseconds.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, RandomState};
use std::time::Duration;

pub(super) struct Schedule {
    interval: i64,
    health_interval: i64,
    hosts: BTreeMap<String, Slot>,
    /// This process's randomness for jitter.
    random: RandomState,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Slot {
    probe_at: i64,
    health_at: i64,
    /// Probes started, to vary the jitter.
    count: u64,
}

impl Schedule {
    pub fn new(interval: Duration, health_interval: Duration) -> Self {
        Schedule {
            interval: interval.as_millis() as i64,
            health_interval: health_interval.as_millis() as i64,
            hosts: BTreeMap::new(),
            random: RandomState::new(),
        }
    }

    /// A number from 0 to `below` (exclusive) for `name`'s `count`th probe.
    fn draw(&self, name: &str, count: u64, below: i64) -> i64 {
        (self.random.hash_one((name, count)) % below.max(1) as u64) as i64
    }

    /// `period`, give or take a tenth.
    fn jittered(&self, name: &str, count: u64, period: i64) -> i64 {
        let tenth = period / 10;
        period - tenth + self.draw(name, count, 2 * tenth + 1)
    }

    /// Keep exactly these hosts; a new one gets its first probe (with its
    /// health checks) somewhere in the first interval from `now`.
    pub fn hosts(&mut self, names: &[&str], now: i64) {
        self.hosts.retain(|name, _| names.contains(&name.as_str()));
        for name in names {
            if !self.hosts.contains_key(*name) {
                let first = now + self.draw(name, 0, self.interval);
                self.hosts.insert(
                    name.to_string(),
                    Slot {
                        probe_at: first,
                        health_at: first,
                        count: 0,
                    },
                );
            }
        }
    }

    /// Whether `name` is due for a probe at `now`, and if so whether its
    /// health checks are too.
    pub fn due(&self, name: &str, now: i64) -> Option<bool> {
        let slot = self.hosts.get(name)?;
        (slot.probe_at <= now).then_some(slot.health_at <= now)
    }

    /// A probe of `name` started at `now` (with its health checks, or not).
    pub fn started(&mut self, name: &str, now: i64, health: bool) {
        let Some(slot) = self.hosts.get(name).copied() else {
            return;
        };
        let count = slot.count + 1;
        let probe_at = now + self.jittered(name, count, self.interval);
        let health_at = if health {
            now + self.jittered(name, count, self.health_interval)
        } else {
            slot.health_at
        };
        self.hosts.insert(
            name.to_string(),
            Slot {
                probe_at,
                health_at,
                count,
            },
        );
    }

    /// Probe `name` (and check it, with `health`) at the next chance: a
    /// deployment ended, or what it should run changed.
    pub fn soon(&mut self, name: &str, now: i64, health: bool) {
        if let Some(slot) = self.hosts.get_mut(name) {
            slot.probe_at = slot.probe_at.min(now);
            if health {
                slot.health_at = slot.health_at.min(now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_spread_over_the_first_interval_then_come_back_with_jitter() {
        let mut s = Schedule::new(Duration::from_secs(60), Duration::from_secs(300));
        let names: Vec<String> = (0..200).map(|i| format!("web{i}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        s.hosts(&refs, 0);
        let firsts: Vec<i64> = names.iter().map(|n| s.hosts[n].probe_at).collect();
        assert!(firsts.iter().all(|t| (0..60_000).contains(t)));
        // Spread, not bunched: every tenth of the interval gets some.
        for tenth in 0..10 {
            let range = tenth * 6_000..(tenth + 1) * 6_000;
            assert!(firsts.iter().any(|t| range.contains(t)), "{tenth}");
        }
        // Due with health checks at first.
        let first = firsts[0];
        assert_eq!(s.due("web0", first - 1), None);
        assert_eq!(s.due("web0", first), Some(true));
        s.started("web0", first, true);
        let next = s.hosts["web0"];
        assert!((first + 54_000..=first + 66_000).contains(&next.probe_at));
        assert!((first + 270_000..=first + 330_000).contains(&next.health_at));
        // The next probe comes without health checks until they are due.
        assert_eq!(s.due("web0", next.probe_at), Some(false));
        s.started("web0", next.probe_at, false);
        assert_eq!(s.hosts["web0"].health_at, next.health_at);
        // Soon means now.
        s.soon("web0", next.probe_at + 1, true);
        assert_eq!(s.due("web0", next.probe_at + 1), Some(true));
        // Hosts that leave the flake leave the schedule.
        s.hosts(&["web1"], 0);
        assert_eq!(s.due("web0", i64::MAX), None);
        assert!(s.due("web1", i64::MAX).is_some());
    }
}
