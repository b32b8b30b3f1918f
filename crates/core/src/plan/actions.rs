//! The first step of planning: what the plan does with each host (deploy,
//! skip, unreachable), and the skip of dependents of hosts that cannot be
//! deployed or verified.

use std::collections::BTreeMap;

use super::{Action, DependencyGraph, HostFacts};
use crate::events::HostState;
use crate::options::{DeployOptions, Strategy};

/// Each host's action and why.
pub(super) type Actions = BTreeMap<String, (Action, Option<String>)>;

/// What the plan does with each host: changed hosts deploy, unchanged ones
/// are skipped (unless forced), unreachable ones cannot be; outside
/// `parallel`, a host whose dependency cannot be deployed or verified is
/// skipped too, down the graph.
pub(super) fn actions(
    facts: &[HostFacts],
    graph: &DependencyGraph,
    options: &DeployOptions,
) -> Actions {
    let mut action: BTreeMap<String, (Action, Option<String>)> = BTreeMap::new();
    for f in facts {
        let decided = match f.state {
            HostState::Unreachable => {
                (Action::Unreachable, Some("host is unreachable".to_string()))
            }
            HostState::Unchanged if options.force => (
                Action::Deploy,
                Some("unchanged, re-activated because of --force".to_string()),
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
        action.insert(f.name.clone(), decided);
    }
    if options.strategy != Strategy::Parallel {
        // In dependency order, so a skip propagates down the graph.
        let mut changed = true;
        while changed {
            changed = false;
            for f in facts {
                if action[&f.name].0 != Action::Deploy {
                    continue;
                }
                let blocked = graph.dependencies(&f.name).into_iter().find(|d| {
                    matches!(action.get(d), Some((Action::Unreachable, _)))
                        || matches!(action.get(d), Some((Action::Skip, Some(r))) if r.starts_with("dependency"))
                });
                if let Some(dep) = blocked {
                    action.insert(
                        f.name.clone(),
                        (
                            Action::Skip,
                            Some(format!("dependency {dep} cannot be deployed or verified")),
                        ),
                    );
                    changed = true;
                }
            }
        }
    }
    action
}
