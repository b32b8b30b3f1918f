//! Approval gates and pause steps: who must say yes before a deployment
//! goes on, as GitHub environments' required reviewers and Spinnaker's
//! manual judgment decide it.
//!
//! - An **approval rule** (`[[approval]]`) is about hosts (selectors); a
//!   deployment that would change one of them stops before it, with status
//!   `awaiting-approval`, until `count` of the rule's `approvers` said yes
//!   (by default, the requester's own yes does not count), or someone
//!   rejected it, or `timeout` passed (then it is cancelled, saying why).
//! - A **pause** (`--pause-after-canary`, `--pause-after-batch`) stops a
//!   rollout after its canaries or a batch until someone who may deploy
//!   those hosts promotes it: the same gate, one yes from anyone allowed,
//!   the requester included (as `kubectl argo rollouts promote`).
//!
//! People are **identities**: `token:NAME` (an API token), `slack:USERID`
//! (Slack's stable user id, never the display name), `user:NAME` (a user of
//! the machine running the CLI), `github:NAME`, `schedule:NAME`; `group:NAME`
//! names a `[groups]` entry of them. Only the decisions are here; the store
//! keeps gates and the engine waits on them.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::select::HostFilter;

/// The kinds of identity, as written before the colon.
pub const IDENTITY_KINDS: [&str; 5] = ["token", "slack", "user", "github", "schedule"];

/// Check an identity (`token:ci`, `slack:U024BE7LH`, `user:alice`).
pub fn check_identity(text: &str) -> Result<(), String> {
    let Some((kind, name)) = text.split_once(':') else {
        return Err(format!(
            "`{text}` is not an identity: write KIND:NAME with KIND one of {}, or group:NAME",
            IDENTITY_KINDS.join(", ")
        ));
    };
    if !IDENTITY_KINDS.contains(&kind) {
        return Err(format!(
            "`{text}`: unknown kind `{kind}` ({}, or group)",
            IDENTITY_KINDS.join(", ")
        ));
    }
    if name.is_empty()
        || name.len() > 128
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
    {
        return Err(format!(
            "`{text}`: a name is 1 to 128 letters, digits, `-`, `_`, `.` or `@`"
        ));
    }
    Ok(())
}

/// The identity of whoever requested a deployment, from its `requested_by`
/// (`token:ci`, `slack:U1`, `github:bob`, `schedule:nightly`, or
/// `user@machine` for the CLI).
pub fn requester_identity(requested_by: &str) -> String {
    match requested_by.split_once(':') {
        Some((kind, _)) if IDENTITY_KINDS.contains(&kind) => requested_by.to_string(),
        _ => {
            let user = requested_by.split('@').next().unwrap_or(requested_by);
            format!("user:{user}")
        }
    }
}

/// `[groups]`: names for sets of identities.
pub type Groups = BTreeMap<String, Vec<String>>;

/// An approval rule as written (`[[approval]]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ApprovalSpec {
    /// A name for messages (default: `approval N`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Selectors of the gated hosts (names, globs, `@tags`).
    pub hosts: Vec<String>,
    /// Who may approve: identities or `group:NAME`.
    pub approvers: Vec<String>,
    /// How many different approvers must say yes (default 1).
    #[serde(default = "one")]
    pub count: u32,
    /// How long the deployment waits for them (default 1h); then it is
    /// cancelled.
    #[serde(default = "hour")]
    pub timeout: String,
    /// Whether the requester's own yes counts (default false).
    #[serde(default)]
    pub self_approval: bool,
}

fn one() -> u32 {
    1
}

fn hour() -> String {
    "1h".into()
}

/// A rule, checked, with its groups expanded.
#[derive(Clone, Debug, PartialEq)]
pub struct ApprovalRule {
    pub name: String,
    pub hosts: HostFilter,
    pub approvers: Vec<String>,
    pub count: u32,
    pub timeout: Duration,
    pub self_approval: bool,
}

impl ApprovalRule {
    /// Check `[[approval]]` number `index`; errors say `approval[N].key = value: why`.
    pub fn new(spec: &ApprovalSpec, index: usize, groups: &Groups) -> Result<ApprovalRule, String> {
        let key = format!("approval[{index}]");
        let hosts = HostFilter::parse(&spec.hosts)
            .map_err(|e| format!("{key}.hosts = `{}`: {e}", spec.hosts.join(", ")))?;
        if spec.hosts.is_empty() {
            return Err(format!(
                "{key}.hosts = `[]`: name the gated hosts (e.g. [\"@prod\"], or [\"*\"] for all)"
            ));
        }
        let mut approvers = Vec::new();
        for approver in &spec.approvers {
            match approver.strip_prefix("group:") {
                Some(group) => {
                    let members = groups.get(group).ok_or_else(|| {
                        format!("{key}.approvers = `{approver}`: no such group in [groups]")
                    })?;
                    approvers.extend(members.iter().cloned());
                }
                None => {
                    check_identity(approver)
                        .map_err(|e| format!("{key}.approvers = `{approver}`: {e}"))?;
                    approvers.push(approver.clone());
                }
            }
        }
        approvers.sort();
        approvers.dedup();
        if spec.count == 0 || spec.count as usize > approvers.len() {
            return Err(format!(
                "{key}.count = `{}`: must be from 1 to the {} approver(s) listed",
                spec.count,
                approvers.len()
            ));
        }
        let timeout = crate::duration::parse_timeout(&spec.timeout)
            .map_err(|e| format!("{key}.timeout = `{}`: {e}", spec.timeout))?;
        Ok(ApprovalRule {
            name: spec.name.clone().unwrap_or(key),
            hosts,
            approvers,
            count: spec.count,
            timeout,
            self_approval: spec.self_approval,
        })
    }

    /// What a gate needs from this rule.
    pub fn requirement(&self) -> Requirement {
        Requirement {
            rule: self.name.clone(),
            approvers: self.approvers.clone(),
            count: self.count,
            self_approval: self.self_approval,
        }
    }
}

/// Check `[groups]`: every member an identity.
pub fn check_groups(groups: &Groups) -> Result<(), String> {
    for (name, members) in groups {
        for member in members {
            check_identity(member).map_err(|e| format!("groups.{name} = `{member}`: {e}"))?;
        }
    }
    Ok(())
}

/// Why a deployment stopped and waits for people.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GateKind {
    /// Hosts an approval rule gates.
    Approval,
    /// `--pause-after-canary` / `--pause-after-batch`.
    Pause,
}

/// Where a gate stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GateState {
    Open,
    Approved,
    Rejected,
    /// Its timeout passed before enough approvals came.
    Expired,
    /// The deployment ended (cancelled, failed) while it was open.
    Closed,
}

impl GateState {
    pub fn as_str(self) -> &'static str {
        match self {
            GateState::Open => "open",
            GateState::Approved => "approved",
            GateState::Rejected => "rejected",
            GateState::Expired => "expired",
            GateState::Closed => "closed",
        }
    }

    pub fn parse(text: &str) -> Option<GateState> {
        serde_json::from_value(serde_json::Value::String(text.into())).ok()
    }
}

/// What one rule asks of a gate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requirement {
    pub rule: String,
    pub approvers: Vec<String>,
    pub count: u32,
    pub self_approval: bool,
}

/// One yes, as recorded: who, when, through what, and what they saw.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    /// An identity.
    pub by: String,
    /// Unix ms.
    pub at: i64,
    /// `api`, `cli`, `slack`.
    pub via: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// The gate as it was shown when they approved: its hosts and what
    /// each would run (see [`Gate::describe`]).
    pub seen: String,
}

/// A gate of a deployment: the hosts held behind it and who said what.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gate {
    /// 1, 2, … within the deployment.
    pub number: u32,
    pub kind: GateKind,
    /// Why, for people (`approval rule prod`, `after canary p620`).
    pub title: String,
    /// The hosts that wait for it.
    pub hosts: Vec<String>,
    /// Their tags (a caller's reach is checked against them).
    #[serde(default)]
    pub host_tags: BTreeMap<String, Vec<String>>,
    /// Approval gates: what each matching rule needs. Pauses: none.
    #[serde(default)]
    pub requirements: Vec<Requirement>,
    pub state: GateState,
    /// Unix ms.
    pub opened_at: i64,
    /// When it expires (Unix ms).
    pub deadline: Option<i64>,
    #[serde(default)]
    pub approvals: Vec<Approval>,
    /// Who rejected it, or why it closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What an approver is shown: the held hosts and what each would run.
    #[serde(default)]
    pub summary: String,
}

/// Why a yes or a no is refused; nothing changed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// 409: nothing to decide.
    #[error("deployment #{id} is not awaiting approval{detail}")]
    NotAwaiting { id: i64, detail: String },
    /// 409
    #[error("{who} already approved gate {gate} of deployment #{id}")]
    Already { id: i64, gate: u32, who: String },
    /// 403
    #[error(
        "{who} requested deployment #{id} and may not approve it (self-approval is off for {rules})"
    )]
    SelfApproval { id: i64, who: String, rules: String },
    /// 403
    #[error("{who} is not an approver of deployment #{id} (approvers: {approvers})")]
    NotAnApprover {
        id: i64,
        who: String,
        approvers: String,
    },
}

impl Refusal {
    /// Whether it is about the caller's rights (403) rather than the
    /// deployment's state (409).
    pub fn is_forbidden(&self) -> bool {
        matches!(
            self,
            Refusal::SelfApproval { .. } | Refusal::NotAnApprover { .. }
        )
    }
}

impl Gate {
    /// Whether every requirement has its count (pauses: one yes).
    pub fn satisfied(&self) -> bool {
        match self.kind {
            GateKind::Pause => !self.approvals.is_empty(),
            GateKind::Approval => self.requirements.iter().all(|r| self.counted(r) >= r.count),
        }
    }

    /// The approvals that count for `requirement`.
    fn counted(&self, requirement: &Requirement) -> u32 {
        self.approvals
            .iter()
            .filter(|a| requirement.approvers.contains(&a.by))
            .count() as u32
    }

    /// Whether `who` may say yes now (deployment `id`, requested by
    /// `requester`, at `now`). Rights to the hosts are checked by the caller.
    pub fn check_approval(
        &self,
        id: i64,
        who: &str,
        requester: &str,
        now: i64,
    ) -> Result<(), Refusal> {
        self.check_open(id, now)?;
        if self.approvals.iter().any(|a| a.by == who) {
            return Err(Refusal::Already {
                id,
                gate: self.number,
                who: who.to_string(),
            });
        }
        if self.kind == GateKind::Pause {
            return Ok(());
        }
        let listed: Vec<&Requirement> = self
            .requirements
            .iter()
            .filter(|r| r.approvers.iter().any(|a| a == who))
            .collect();
        if listed.is_empty() {
            let mut approvers: Vec<&str> = self
                .requirements
                .iter()
                .flat_map(|r| r.approvers.iter().map(String::as_str))
                .collect();
            approvers.sort();
            approvers.dedup();
            return Err(Refusal::NotAnApprover {
                id,
                who: who.to_string(),
                approvers: approvers.join(", "),
            });
        }
        if who == requester && listed.iter().all(|r| !r.self_approval) {
            return Err(Refusal::SelfApproval {
                id,
                who: who.to_string(),
                rules: listed
                    .iter()
                    .map(|r| r.rule.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        Ok(())
    }

    /// Whether a no is possible now (anyone who may deploy the hosts, or
    /// an approver, may reject).
    pub fn check_open(&self, id: i64, now: i64) -> Result<(), Refusal> {
        if self.state != GateState::Open {
            return Err(Refusal::NotAwaiting {
                id,
                detail: format!(" (gate {} is {})", self.number, self.state.as_str()),
            });
        }
        if self.deadline.is_some_and(|d| now >= d) {
            return Err(Refusal::NotAwaiting {
                id,
                detail: format!(" (gate {} timed out)", self.number),
            });
        }
        Ok(())
    }

    /// Whether the gate's timeout passed at `now`.
    pub fn expired(&self, now: i64) -> bool {
        self.state == GateState::Open && self.deadline.is_some_and(|d| now >= d)
    }

    /// What is still missing, for messages.
    pub fn missing(&self) -> String {
        match self.kind {
            GateKind::Pause => "a promotion".into(),
            GateKind::Approval => self
                .requirements
                .iter()
                .filter(|r| self.counted(r) < r.count)
                .map(|r| {
                    format!(
                        "{} more from {} ({})",
                        r.count - self.counted(r),
                        r.approvers.join(", "),
                        r.rule
                    )
                })
                .collect::<Vec<_>>()
                .join("; "),
        }
    }
}

/// The rules that gate one host.
pub fn rules_for<'a>(
    rules: &'a [ApprovalRule],
    name: &str,
    tags: &[String],
) -> Vec<&'a ApprovalRule> {
    rules
        .iter()
        .filter(|r| r.hosts.matches(name, tags))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(approvers: &[&str], count: u32, self_approval: bool) -> ApprovalSpec {
        ApprovalSpec {
            name: Some("prod".into()),
            hosts: vec!["@prod".into()],
            approvers: approvers.iter().map(|s| s.to_string()).collect(),
            count,
            timeout: "10m".into(),
            self_approval,
        }
    }

    fn gate(rules: &[ApprovalRule]) -> Gate {
        Gate {
            number: 1,
            kind: GateKind::Approval,
            title: "approval".into(),
            hosts: vec!["p1".into()],
            host_tags: BTreeMap::new(),
            requirements: rules.iter().map(ApprovalRule::requirement).collect(),
            state: GateState::Open,
            opened_at: 0,
            deadline: Some(1000),
            approvals: Vec::new(),
            decided_by: None,
            decided_at: None,
            reason: None,
            summary: String::new(),
        }
    }

    fn yes(by: &str) -> Approval {
        Approval {
            by: by.into(),
            at: 1,
            via: "api".into(),
            comment: None,
            seen: String::new(),
        }
    }

    #[test]
    fn identities_and_requesters() {
        assert!(check_identity("token:ci").is_ok());
        assert!(check_identity("slack:U024BE7LH").is_ok());
        assert!(check_identity("ci").is_err());
        assert!(check_identity("email:a@b").is_err());
        assert!(check_identity("user:a b").is_err());
        assert_eq!(requester_identity("token:ci"), "token:ci");
        assert_eq!(requester_identity("alice@laptop"), "user:alice");
        assert_eq!(requester_identity("slack:U1"), "slack:U1");
    }

    #[test]
    fn rules_expand_groups_and_are_checked() {
        let groups: Groups = [(
            "sre".to_string(),
            vec!["token:alice".into(), "slack:U2".into()],
        )]
        .into();
        let rule =
            ApprovalRule::new(&spec(&["group:sre", "user:root"], 2, false), 0, &groups).unwrap();
        assert_eq!(rule.approvers, ["slack:U2", "token:alice", "user:root"]);
        assert_eq!(rule.timeout, Duration::from_secs(600));
        let bad = |s: ApprovalSpec| ApprovalRule::new(&s, 3, &groups).unwrap_err();
        assert!(
            bad(spec(&["group:dba"], 1, false)).starts_with("approval[3].approvers = `group:dba`")
        );
        assert!(bad(spec(&["token:a"], 2, false)).starts_with("approval[3].count = `2`"));
        assert!(bad(spec(&["token:a"], 0, false)).contains("count"));
        assert!(bad(spec(&["alice"], 1, false)).contains("approvers = `alice`"));
        let mut s = spec(&["token:a"], 1, false);
        s.timeout = "0s".into();
        assert!(bad(s).starts_with("approval[3].timeout = `0s`"));
        let mut s = spec(&["token:a"], 1, false);
        s.hosts = vec![];
        assert!(bad(s).contains("hosts"));
    }

    #[test]
    fn who_may_approve_how_many_and_until_when() {
        let groups = Groups::new();
        let rule = ApprovalRule::new(
            &spec(&["token:alice", "token:bob", "token:ci"], 2, false),
            0,
            &groups,
        )
        .unwrap();
        let mut g = gate(std::slice::from_ref(&rule));
        // The requester may not approve their own deployment.
        assert!(matches!(
            g.check_approval(7, "token:ci", "token:ci", 10),
            Err(Refusal::SelfApproval { .. })
        ));
        assert!(matches!(
            g.check_approval(7, "token:eve", "token:ci", 10),
            Err(Refusal::NotAnApprover { .. })
        ));
        assert!(g.check_approval(7, "token:alice", "token:ci", 10).is_ok());
        g.approvals.push(yes("token:alice"));
        assert!(!g.satisfied(), "two are needed");
        assert!(g.missing().contains("1 more"), "{}", g.missing());
        let twice = g
            .check_approval(7, "token:alice", "token:ci", 10)
            .unwrap_err();
        assert!(matches!(twice, Refusal::Already { .. }) && !twice.is_forbidden());
        g.approvals.push(yes("token:bob"));
        assert!(g.satisfied());
        // Too late: not awaiting approval any more.
        let late = gate(std::slice::from_ref(&rule));
        assert!(late.expired(1000));
        assert!(matches!(
            late.check_approval(7, "token:bob", "token:ci", 1000),
            Err(Refusal::NotAwaiting { .. })
        ));
        let mut decided = gate(std::slice::from_ref(&rule));
        decided.state = GateState::Rejected;
        assert!(
            decided
                .check_approval(7, "token:bob", "token:ci", 1)
                .is_err()
        );
        // With self-approval on, the requester's yes counts.
        let own = ApprovalRule::new(&spec(&["token:ci"], 1, true), 0, &groups).unwrap();
        assert!(
            gate(&[own])
                .check_approval(7, "token:ci", "token:ci", 1)
                .is_ok()
        );
    }

    #[test]
    fn every_matching_rule_must_be_satisfied_and_a_pause_needs_one_yes() {
        let groups = Groups::new();
        let a = ApprovalRule::new(&spec(&["token:a"], 1, false), 0, &groups).unwrap();
        let b = ApprovalRule::new(&spec(&["token:b"], 1, false), 1, &groups).unwrap();
        let mut g = gate(&[a, b]);
        g.approvals.push(yes("token:a"));
        assert!(!g.satisfied());
        g.approvals.push(yes("token:b"));
        assert!(g.satisfied());
        let mut pause = gate(&[]);
        pause.kind = GateKind::Pause;
        assert!(pause.check_approval(1, "token:ci", "token:ci", 1).is_ok());
        assert!(!pause.satisfied());
        pause.approvals.push(yes("token:ci"));
        assert!(pause.satisfied());
    }
}
