//! The fleet's dependency graph (petgraph): dependencies by host name or
//! `@tag`, resolved, with cycles found and named.

use std::collections::{BTreeMap, BTreeSet};

use petgraph::algo::tarjan_scc;
use petgraph::graph::{DiGraph, NodeIndex};

use super::PlanError;

/// A host of the whole fleet, as the dependency graph needs it.
#[derive(Clone, Debug)]
pub struct GraphHost {
    pub name: String,
    pub tags: Vec<String>,
    /// Host names or `@tag`s.
    pub dependencies: Vec<String>,
}

/// The fleet's dependency graph, resolved and checked for cycles.
#[derive(Clone, Debug)]
pub struct DependencyGraph {
    /// host → hosts it depends on (resolved names).
    pub depends_on: BTreeMap<String, BTreeSet<String>>,
}

impl DependencyGraph {
    /// Resolve names and `@tag`s and reject unknown targets and cycles. Done
    /// before anything is recorded or touched.
    pub fn build(hosts: &[GraphHost]) -> Result<Self, PlanError> {
        let names: BTreeSet<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
        let mut depends_on = BTreeMap::new();
        for host in hosts {
            let mut resolved = BTreeSet::new();
            for dep in &host.dependencies {
                if let Some(tag) = dep.strip_prefix('@') {
                    let tagged: Vec<&GraphHost> = hosts
                        .iter()
                        .filter(|h| h.tags.iter().any(|t| t == tag))
                        .collect();
                    if tagged.is_empty() {
                        let tags: BTreeSet<&str> = hosts
                            .iter()
                            .flat_map(|h| h.tags.iter().map(String::as_str))
                            .collect();
                        return Err(PlanError::UnknownTag {
                            host: host.name.clone(),
                            dependency: dep.clone(),
                            hint: crate::suggest::did_you_mean(tag, &tags, "@"),
                        });
                    }
                    // A host in its own tag group does not wait for itself.
                    resolved.extend(
                        tagged
                            .into_iter()
                            .filter(|h| h.name != host.name)
                            .map(|h| h.name.clone()),
                    );
                } else if names.contains(dep.as_str()) {
                    resolved.insert(dep.clone());
                } else {
                    return Err(PlanError::UnknownDependency {
                        host: host.name.clone(),
                        dependency: dep.clone(),
                        hint: crate::suggest::did_you_mean(dep, &names, ""),
                    });
                }
            }
            depends_on.insert(host.name.clone(), resolved);
        }
        let graph = DependencyGraph { depends_on };
        graph.check_cycles()?;
        Ok(graph)
    }

    fn check_cycles(&self) -> Result<(), PlanError> {
        let (graph, index) = self.petgraph();
        for component in tarjan_scc(&graph) {
            let self_loop = component.len() == 1 && graph.contains_edge(component[0], component[0]);
            if component.len() > 1 || self_loop {
                let mut hosts: Vec<String> = component.iter().map(|i| graph[*i].clone()).collect();
                hosts.sort();
                // Name the cycle in dependency order, closing it.
                let ordered = order_cycle(&hosts, &self.depends_on);
                let _ = &index;
                return Err(PlanError::Cycle { hosts: ordered });
            }
        }
        Ok(())
    }

    /// Edges point from a dependency to its dependent.
    fn petgraph(&self) -> (DiGraph<String, ()>, BTreeMap<String, NodeIndex>) {
        let mut graph = DiGraph::new();
        let mut index = BTreeMap::new();
        for name in self.depends_on.keys() {
            index.insert(name.clone(), graph.add_node(name.clone()));
        }
        for (host, deps) in &self.depends_on {
            for dep in deps {
                if let (Some(&from), Some(&to)) = (index.get(dep), index.get(host)) {
                    graph.add_edge(from, to, ());
                }
            }
        }
        (graph, index)
    }

    pub fn dependencies(&self, host: &str) -> Vec<String> {
        self.depends_on
            .get(host)
            .map(|d| d.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Whether `a` (transitively) depends on `b`.
    pub fn depends_transitively(&self, a: &str, b: &str) -> bool {
        let mut stack = vec![a.to_string()];
        let mut seen = BTreeSet::new();
        while let Some(h) = stack.pop() {
            for d in self.depends_on.get(&h).into_iter().flatten() {
                if d == b {
                    return true;
                }
                if seen.insert(d.clone()) {
                    stack.push(d.clone());
                }
            }
        }
        false
    }
}

/// Walk a strongly connected component along dependency edges so the error
/// reads `a → b → c → a`.
fn order_cycle(members: &[String], depends_on: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let set: BTreeSet<&String> = members.iter().collect();
    let start = &members[0];
    let mut path = vec![start.clone()];
    let mut current = start.clone();
    loop {
        let next = depends_on
            .get(&current)
            .and_then(|deps| {
                deps.iter()
                    .find(|d| set.contains(d) && (*d == start || !path.contains(d)))
            })
            .cloned();
        match next {
            Some(n) if &n == start => {
                path.push(n);
                return path;
            }
            Some(n) => {
                path.push(n.clone());
                current = n;
            }
            None => {
                path.push(start.clone());
                return path;
            }
        }
    }
}
