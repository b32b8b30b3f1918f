//! The planner: from what each selected host runs and what the flake says it
//! should run, decide what happens to it. Pure: no IO, no clock.

use serde::Serialize;

use crate::events::{HostState, SystemRef};

/// What the plan does with a host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    Deploy,
    Skip,
    /// Cannot be deployed: the probe failed.
    Unreachable,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Deploy => "deploy",
            Action::Skip => "skip",
            Action::Unreachable => "unreachable",
        }
    }
}

/// What the planner knows about one host.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HostFacts {
    pub name: String,
    pub role: String,
    pub state: HostState,
    pub current: SystemRef,
    /// The evaluated toplevel.
    pub target_path: String,
    pub probe_error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PlannedHost {
    pub name: String,
    pub role: String,
    pub state: HostState,
    pub changed: bool,
    pub current: SystemRef,
    pub target_path: String,
    pub action: Action,
    pub reason: Option<String>,
    pub error: Option<String>,
}

/// Options that change what the plan does.
#[derive(Clone, Copy, Debug, Default)]
pub struct PlanOptions {
    /// Deploy unchanged hosts too (re-activate them).
    pub force: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Plan {
    pub hosts: Vec<PlannedHost>,
}

impl Plan {
    pub fn to_deploy(&self) -> impl Iterator<Item = &PlannedHost> {
        self.hosts.iter().filter(|h| h.action == Action::Deploy)
    }

    pub fn get(&self, name: &str) -> Option<&PlannedHost> {
        self.hosts.iter().find(|h| h.name == name)
    }
}

/// CHANGED when the running toplevel differs from the evaluated one.
pub fn classify(current: Option<&str>, target: &str) -> HostState {
    if current == Some(target) {
        HostState::Unchanged
    } else {
        HostState::Changed
    }
}

pub fn plan(facts: &[HostFacts], options: PlanOptions) -> Plan {
    let hosts = facts
        .iter()
        .map(|f| {
            let (action, reason) = match f.state {
                HostState::Unreachable => {
                    (Action::Unreachable, Some("host is unreachable".to_string()))
                }
                HostState::Unchanged if options.force => (
                    Action::Deploy,
                    Some("unchanged, deployed because of --force".to_string()),
                ),
                HostState::Unchanged => (Action::Skip, Some("no changes".to_string())),
                HostState::Changed => (
                    Action::Deploy,
                    Some(match &f.current.path {
                        None => "no system deployed yet".to_string(),
                        Some(_) => "configuration changed".to_string(),
                    }),
                ),
            };
            PlannedHost {
                name: f.name.clone(),
                role: f.role.clone(),
                state: f.state,
                changed: f.state == HostState::Changed,
                current: f.current.clone(),
                target_path: f.target_path.clone(),
                action,
                reason,
                error: f.probe_error.clone(),
            }
        })
        .collect();
    Plan { hosts }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(name: &str, state: HostState) -> HostFacts {
        HostFacts {
            name: name.into(),
            role: "client".into(),
            state,
            current: SystemRef::default(),
            target_path: "/nix/store/x".into(),
            probe_error: None,
        }
    }

    #[test]
    fn classifies_by_running_toplevel() {
        assert_eq!(
            classify(Some("/nix/store/a"), "/nix/store/a"),
            HostState::Unchanged
        );
        assert_eq!(
            classify(Some("/nix/store/a"), "/nix/store/b"),
            HostState::Changed
        );
        assert_eq!(classify(None, "/nix/store/b"), HostState::Changed);
    }

    #[test]
    fn skips_unchanged_unless_forced() {
        let input = [
            facts("a", HostState::Changed),
            facts("b", HostState::Unchanged),
            facts("c", HostState::Unreachable),
        ];
        let p = plan(&input, PlanOptions::default());
        let actions: Vec<_> = p.hosts.iter().map(|h| h.action).collect();
        assert_eq!(actions, [Action::Deploy, Action::Skip, Action::Unreachable]);
        assert_eq!(p.to_deploy().count(), 1);
        let p = plan(&input, PlanOptions { force: true });
        assert_eq!(p.get("b").unwrap().action, Action::Deploy);
        assert_eq!(p.get("c").unwrap().action, Action::Unreachable);
    }
}
