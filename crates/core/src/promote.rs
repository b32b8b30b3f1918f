//! Promotion between environments (`nix-deploy promote --from @staging --to
//! @prod`): the target hosts get exactly the systems their source hosts
//! run, read from the source hosts and copied from them, never evaluated
//! or built again.
//!
//! Pairs are made by a declared key: `deployment.promotionKey`. Each target
//! host takes the system of the one source host with the same key (one
//! source may serve several targets: one staging web server for three
//! production ones). The request is refused, with every reason at once and
//! nothing changed, when:
//!
//! - the mapping is incomplete (a target without a key, or no source with
//!   its key) or ambiguous (two source hosts with one key), or a host is
//!   both source and target;
//! - a source host that would be copied from is unreachable, runs nothing,
//!   is unhealthy now, or is not in sync: it runs something else than what
//!   its last successful deployment put there (or nothing recorded vouches
//!   for what it runs).
//!
//! The pure part is here (the request, pairing, the verdict on a source
//! host, what is recorded); the engine reads the hosts.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::fleet::{HostMeta, Selection};
use crate::options::{OptionsError, Request};

/// `POST /api/v1/promote`, and the CLI's `promote` (in process or through
/// the daemon).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromoteRequest {
    /// Selectors of the source hosts (`@staging`).
    pub from: Vec<String>,
    /// Selectors of the target hosts (`@prod`).
    pub to: Vec<String>,
    /// Queue behind busy target hosts instead of refusing them.
    #[serde(default, skip_serializing_if = "is_false")]
    pub wait: bool,
    /// How the targets are deployed (strategy, timeouts, windows): a
    /// deployment request without hosts.
    #[serde(default)]
    pub options: Request,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn bad(message: impl Into<String>) -> OptionsError {
    OptionsError(message.into())
}

impl PromoteRequest {
    /// Both sides named, in the selection syntax, and options that say how,
    /// not which hosts (those are `from` and `to`).
    pub fn check(&self) -> Result<(), OptionsError> {
        if self.from.is_empty() || self.to.is_empty() {
            return Err(bad(
                "a promotion needs source hosts (`from`, --from) and target hosts (`to`, --to)",
            ));
        }
        crate::select::check(&[self.from.clone(), self.to.clone()].concat())
            .map_err(|e| bad(e.to_string()))?;
        let o = &self.options;
        if !o.hosts.is_empty() || !o.on.is_empty() || o.all || !o.exclude.is_empty() {
            return Err(bad(
                "a promotion's hosts are `from` and `to`; `options` takes no hosts, on, all or exclude",
            ));
        }
        if o.wait || o.revision.is_some() || o.summaries.is_some() {
            return Err(bad(
                "a promotion deploys what the source hosts run: `options` takes no wait (use `wait`), revision or summaries",
            ));
        }
        Ok(())
    }

    pub fn from_selection(&self) -> Selection {
        selection(&self.from)
    }

    pub fn to_selection(&self) -> Selection {
        selection(&self.to)
    }
}

fn selection(selectors: &[String]) -> Selection {
    Selection {
        names: selectors.to_vec(),
        ..Selection::default()
    }
}

/// A target host and the source host whose system it gets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pair {
    pub target: String,
    pub source: String,
    /// The `deployment.promotionKey` they share.
    pub key: String,
}

/// Why hosts cannot be paired; nothing was touched.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("promotion refused: {}", .problems.join("; "))]
pub struct PairingError {
    pub problems: Vec<String>,
}

/// Pair every target with the one source of its key. Sources nobody needs
/// are left alone (staging may have hosts production does not).
pub fn pair(sources: &[HostMeta], targets: &[HostMeta]) -> Result<Vec<Pair>, PairingError> {
    let mut problems = Vec::new();
    for target in targets {
        if sources.iter().any(|s| s.name == target.name) {
            problems.push(format!("{} is both a source and a target", target.name));
        }
    }
    let mut by_key: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for source in sources {
        if let Some(key) = &source.promotion_key {
            by_key.entry(key).or_default().push(&source.name);
        }
    }
    let mut pairs = Vec::new();
    for target in targets {
        let Some(key) = &target.promotion_key else {
            problems.push(format!(
                "target {} has no deployment.promotionKey to pair it by",
                target.name
            ));
            continue;
        };
        match by_key.get(key.as_str()).map(Vec::as_slice) {
            None | Some([]) => problems.push(format!(
                "no source host has promotionKey `{key}` (wanted by target {})",
                target.name
            )),
            Some([source]) => pairs.push(Pair {
                target: target.name.clone(),
                source: source.to_string(),
                key: key.clone(),
            }),
            Some(several) => problems.push(format!(
                "promotionKey `{key}` is ambiguous: source hosts {} all have it (wanted by target {})",
                several.join(", "),
                target.name
            )),
        }
    }
    problems.dedup();
    if problems.is_empty() {
        Ok(pairs)
    } else {
        Err(PairingError { problems })
    }
}

/// What the coordinator found out about a source host it would copy from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceFindings {
    /// Why it could not be probed.
    pub unreachable: Option<String>,
    /// `/run/current-system`.
    pub running: Option<String>,
    /// The system its last successful deployment put there, and which one.
    pub last_deployed: Option<(i64, String)>,
    /// Why its health checks fail now.
    pub unhealthy: Option<String>,
}

/// The system a source host vouches for, or why it does not: reachable,
/// running what its last successful deployment put there, and healthy now.
pub fn vouch(host: &str, found: &SourceFindings) -> Result<String, String> {
    if let Some(why) = &found.unreachable {
        return Err(format!("source {host} is unreachable: {why}"));
    }
    let Some(running) = &found.running else {
        return Err(format!("source {host} runs no system"));
    };
    match &found.last_deployed {
        None => {
            return Err(format!(
                "source {host} is not in sync: no successful deployment recorded vouches for what it runs ({running})"
            ));
        }
        Some((id, deployed)) if deployed != running => {
            return Err(format!(
                "source {host} is not in sync: it runs {running}, but its last successful deployment (#{id}) put {deployed} there"
            ));
        }
        Some(_) => {}
    }
    if let Some(why) = &found.unhealthy {
        return Err(format!("source {host} is unhealthy: {why}"));
    }
    Ok(running.clone())
}

/// A promotion as recorded with its deployment (in its pin): what each
/// target got, from where.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Promotion {
    pub from: Vec<String>,
    pub to: Vec<String>,
    pub pairs: Vec<PromotedPair>,
}

/// One target's system and where it came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromotedPair {
    pub target: String,
    pub source: String,
    pub key: String,
    /// The source's running system: what the target gets.
    pub system: String,
    /// The source's last successful deployment, which put it there.
    pub source_deployment: Option<i64>,
}

impl Promotion {
    /// The source host of `target`.
    pub fn source_of(&self, target: &str) -> Option<&PromotedPair> {
        self.pairs.iter().find(|p| p.target == target)
    }

    /// `s1 → p1, p2; s2 → p3`, for messages.
    pub fn describe(&self) -> String {
        let mut by_source: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for pair in &self.pairs {
            by_source
                .entry(&pair.source)
                .or_default()
                .push(&pair.target);
        }
        by_source
            .into_iter()
            .map(|(source, targets)| format!("{source} → {}", targets.join(", ")))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::FleetSource;

    fn host(name: &str, key: Option<&str>) -> HostMeta {
        let mut deployment = serde_json::json!({ "tags": [] });
        if let Some(key) = key {
            deployment["promotionKey"] = serde_json::json!(key);
        }
        crate::fleet::parse_host(
            FleetSource::Nixos,
            name,
            serde_json::json!({ "deployment": deployment }),
        )
        .unwrap()
        .meta
    }

    #[test]
    fn targets_pair_with_the_one_source_of_their_key() {
        let sources = [
            host("s-web", Some("web")),
            host("s-db", Some("db")),
            host("s-mon", None),
        ];
        let targets = [
            host("p-web1", Some("web")),
            host("p-web2", Some("web")),
            host("p-db", Some("db")),
        ];
        let pairs = pair(&sources, &targets).unwrap();
        let got: Vec<(&str, &str)> = pairs
            .iter()
            .map(|p| (p.target.as_str(), p.source.as_str()))
            .collect();
        assert_eq!(
            got,
            [("p-web1", "s-web"), ("p-web2", "s-web"), ("p-db", "s-db")]
        );
    }

    #[test]
    fn an_incomplete_or_ambiguous_mapping_is_refused_with_every_reason() {
        let sources = [
            host("s1", Some("web")),
            host("s2", Some("web")),
            host("s3", Some("db")),
        ];
        let targets = [
            host("p1", Some("web")),
            host("p2", None),
            host("p3", Some("cache")),
            host("s3", Some("db")),
        ];
        let e = pair(&sources, &targets).unwrap_err().to_string();
        for needle in [
            "s3 is both a source and a target",
            "target p2 has no deployment.promotionKey",
            "no source host has promotionKey `cache` (wanted by target p3)",
            "`web` is ambiguous: source hosts s1, s2",
        ] {
            assert!(e.contains(needle), "{needle} not in {e}");
        }
    }

    #[test]
    fn a_source_vouches_only_when_reachable_in_sync_and_healthy() {
        let system = "/nix/store/aaa-nixos-system-s1".to_string();
        let good = SourceFindings {
            unreachable: None,
            running: Some(system.clone()),
            last_deployed: Some((4, system.clone())),
            unhealthy: None,
        };
        assert_eq!(vouch("s1", &good), Ok(system.clone()));
        let e = vouch(
            "s1",
            &SourceFindings {
                unreachable: Some("connection refused".into()),
                ..good.clone()
            },
        )
        .unwrap_err();
        assert!(e.contains("unreachable: connection refused"), "{e}");
        let e = vouch(
            "s1",
            &SourceFindings {
                last_deployed: Some((3, "/nix/store/bbb-older".into())),
                ..good.clone()
            },
        )
        .unwrap_err();
        assert!(e.contains("not in sync") && e.contains("#3"), "{e}");
        let e = vouch(
            "s1",
            &SourceFindings {
                last_deployed: None,
                ..good.clone()
            },
        )
        .unwrap_err();
        assert!(e.contains("no successful deployment"), "{e}");
        let e = vouch(
            "s1",
            &SourceFindings {
                unhealthy: Some("service nginx: failed".into()),
                ..good.clone()
            },
        )
        .unwrap_err();
        assert!(e.contains("unhealthy: service nginx"), "{e}");
        let e = vouch(
            "s1",
            &SourceFindings {
                running: None,
                ..good
            },
        )
        .unwrap_err();
        assert!(e.contains("runs no system"), "{e}");
    }

    #[test]
    fn requests_name_both_sides_and_no_other_hosts() {
        let request = |json: serde_json::Value| serde_json::from_value::<PromoteRequest>(json);
        let ok = request(serde_json::json!({
            "from": ["@staging"], "to": ["@prod"], "options": { "strategy": "rolling" }
        }))
        .unwrap();
        ok.check().unwrap();
        assert_eq!(ok.to_selection().names, ["@prod"]);
        let e = request(serde_json::json!({ "from": ["@staging"], "to": [] }))
            .unwrap()
            .check()
            .unwrap_err();
        assert!(e.0.contains("target hosts"), "{e}");
        let e = request(serde_json::json!({
            "from": ["@staging"], "to": ["@prod"], "options": { "hosts": ["x"] }
        }))
        .unwrap()
        .check()
        .unwrap_err();
        assert!(e.0.contains("takes no hosts"), "{e}");
        assert!(request(serde_json::json!({ "from": ["a"], "to": ["b"], "nope": 1 })).is_err());
        let e = request(serde_json::json!({ "from": ["a,,b"], "to": ["c"] }))
            .unwrap()
            .check()
            .unwrap_err();
        assert!(!e.0.is_empty());
    }
}
