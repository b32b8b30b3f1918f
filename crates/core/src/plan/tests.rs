//! The planner's unit tests.

use super::*;
use crate::options::Amount;

fn gh(name: &str, tags: &[&str], deps: &[&str]) -> GraphHost {
    GraphHost {
        name: name.into(),
        tags: tags.iter().map(|s| s.to_string()).collect(),
        dependencies: deps.iter().map(|s| s.to_string()).collect(),
    }
}

fn facts(name: &str, role: &str, state: HostState) -> HostFacts {
    HostFacts {
        name: name.into(),
        role: role.into(),
        state,
        current: SystemRef {
            path: Some("/nix/store/old".into()),
            generation: Some(1),
        },
        target_path: "/nix/store/new".into(),
        probe_error: None,
        summary: None,
        history: HostHistory::default(),
    }
}

fn seed_fleet() -> (Vec<HostFacts>, DependencyGraph) {
    let graph = DependencyGraph::build(&[
        gh("p620", &["monitoring"], &[]),
        gh("p510", &[], &["p620"]),
        gh("razer", &["laptop"], &["@monitoring"]),
        gh("samsung", &["laptop"], &["p620"]),
    ])
    .unwrap();
    let facts = vec![
        facts("p620", "infrastructure", HostState::Changed),
        facts("p510", "media", HostState::Unchanged),
        facts("razer", "mobile", HostState::Changed),
        facts("samsung", "mobile", HostState::Changed),
    ];
    (facts, graph)
}

fn phases(plan: &Plan) -> Vec<Vec<&str>> {
    plan.phases
        .iter()
        .map(|p| p.hosts.iter().map(String::as_str).collect())
        .collect()
}

#[test]
fn rejects_cycles_naming_every_host() {
    let err = DependencyGraph::build(&[
        gh("a", &[], &["b"]),
        gh("b", &[], &["c"]),
        gh("c", &[], &["a"]),
        gh("d", &[], &[]),
    ])
    .unwrap_err();
    assert_eq!(
        err,
        PlanError::Cycle {
            hosts: vec!["a".into(), "b".into(), "c".into(), "a".into()]
        }
    );
    assert!(err.to_string().contains("a → b → c → a"));
    let err = DependencyGraph::build(&[gh("a", &[], &["a"])]).unwrap_err();
    assert!(matches!(err, PlanError::Cycle { .. }));
}

#[test]
fn rejects_unknown_dependencies() {
    let err = DependencyGraph::build(&[gh("a", &[], &["ghost"])]).unwrap_err();
    assert!(err.to_string().contains("`ghost`"), "{err}");
    let err = DependencyGraph::build(&[gh("a", &[], &["@ghosts"])]).unwrap_err();
    assert!(matches!(err, PlanError::UnknownTag { .. }));
}

#[test]
fn smart_follows_dependencies_and_skips_unchanged() {
    let (facts, graph) = seed_fleet();
    let plan = plan(&facts, &graph, 4, &DeployOptions::default()).unwrap();
    assert_eq!(phases(&plan), vec![vec!["p620"], vec!["razer", "samsung"]]);
    assert_eq!(plan.get("p510").unwrap().action, Action::Skip);
    assert_eq!(plan.get("razer").unwrap().waits_for, ["p620"]);
    assert_eq!(plan.get("razer").unwrap().depends_on, ["p620"]);
    assert!(plan.strategy_reason.starts_with("smart"));
}

#[test]
fn smart_puts_a_canary_first_in_a_role_of_three() {
    let graph = DependencyGraph::build(&[
        gh("w1", &[], &[]),
        gh("w2", &[], &[]),
        gh("w3", &[], &[]),
        gh("d1", &[], &[]),
        gh("d2", &[], &[]),
    ])
    .unwrap();
    let facts = vec![
        facts("w2", "web", HostState::Changed),
        facts("w1", "web", HostState::Changed),
        facts("w3", "web", HostState::Changed),
        facts("d1", "db", HostState::Changed),
        facts("d2", "db", HostState::Changed),
    ];
    let plan = plan(&facts, &graph, 5, &DeployOptions::default()).unwrap();
    assert!(plan.get("w1").unwrap().canary);
    assert_eq!(plan.get("w2").unwrap().waits_for, ["w1"]);
    assert_eq!(plan.get("w3").unwrap().waits_for, ["w1"]);
    // A role of 2 gets no canary.
    assert!(plan.get("d1").unwrap().waits_for.is_empty());
    assert!(!plan.get("d1").unwrap().canary);
    assert_eq!(
        phases(&plan),
        vec![vec!["d1", "d2", "w1"], vec!["w2", "w3"]]
    );
}

#[test]
fn unreachable_dependencies_skip_their_dependents() {
    let (mut facts, graph) = seed_fleet();
    facts[0].state = HostState::Unreachable;
    let plan = plan(&facts, &graph, 4, &DeployOptions::default()).unwrap();
    assert_eq!(plan.get("p620").unwrap().action, Action::Unreachable);
    let razer = plan.get("razer").unwrap();
    assert_eq!(razer.action, Action::Skip);
    assert!(razer.reason.as_deref().unwrap().contains("p620"));
}

#[test]
fn parallel_ignores_edges_and_warns() {
    let (facts, graph) = seed_fleet();
    let options = DeployOptions {
        strategy: Strategy::Parallel,
        ..DeployOptions::default()
    };
    let plan = plan(&facts, &graph, 4, &options).unwrap();
    assert_eq!(phases(&plan), vec![vec!["p620", "razer", "samsung"]]);
    assert_eq!(plan.warnings.len(), 2);
    assert!(plan.warnings[0].contains("razer → p620"));
}

#[test]
fn rolling_batches_wait_for_the_previous_batch() {
    let names = ["a", "b", "c", "d", "e"];
    let graph = DependencyGraph::build(&names.map(|n| gh(n, &[], &[]))).unwrap();
    let facts: Vec<HostFacts> = names
        .iter()
        .map(|n| facts(n, "client", HostState::Changed))
        .collect();
    let options = DeployOptions {
        strategy: Strategy::Rolling,
        batch_size: Amount::Count(2),
        ..DeployOptions::default()
    };
    let plan = plan(&facts, &graph, 5, &options).unwrap();
    assert_eq!(
        phases(&plan),
        vec![vec!["a", "b"], vec!["c", "d"], vec!["e"]]
    );
    assert_eq!(plan.get("c").unwrap().waits_for, ["a", "b"]);
    assert_eq!(plan.get("e").unwrap().batch, Some(3));
    let options = DeployOptions {
        batch_size: Amount::Percent(40),
        ..options
    };
    let plan = super::plan(&facts, &graph, 5, &options).unwrap();
    assert_eq!(plan.phases.len(), 3);
}

#[test]
fn canary_goes_first_and_soaks() {
    let (mut facts, graph) = seed_fleet();
    for f in &mut facts {
        f.history.fleet_median_ms = Some(20_000);
    }
    let options = DeployOptions {
        strategy: Strategy::Canary,
        canaries: vec!["samsung".into()],
        canary_soak: Duration::from_secs(10),
        ..DeployOptions::default()
    };
    let plan = plan(&facts, &graph, 4, &options).unwrap();
    // samsung depends on p620, so p620 goes before the canary.
    assert_eq!(
        phases(&plan),
        vec![vec!["p620"], vec!["samsung"], vec!["razer"]]
    );
    assert!(plan.get("samsung").unwrap().canary);
    assert_eq!(plan.get("samsung").unwrap().estimate_seconds, 30.0);
    assert_eq!(plan.eta_seconds, 70.0);
    let options = DeployOptions {
        canaries: vec!["nope".into()],
        ..options
    };
    assert!(super::plan(&facts, &graph, 4, &options).is_err());
}

#[test]
fn estimates_use_history_medians_and_eta_simulates_the_limit() {
    let graph = DependencyGraph::build(&["a", "b", "c"].map(|n| gh(n, &[], &[]))).unwrap();
    let mut f: Vec<HostFacts> = ["a", "b", "c"]
        .iter()
        .map(|n| facts(n, "client", HostState::Changed))
        .collect();
    f[0].history.successful_ms = vec![10_000, 30_000, 20_000];
    let options = DeployOptions {
        parallel_limit: 2,
        ..DeployOptions::default()
    };
    let plan = plan(&f, &graph, 3, &options).unwrap();
    let a = plan.get("a").unwrap();
    assert_eq!(a.estimate_seconds, 20.0);
    assert!(a.estimate_from_history);
    assert_eq!(plan.get("b").unwrap().estimate_seconds, 60.0);
    assert_eq!(
        plan.get("b").unwrap().estimate_source,
        EstimateSource::Default
    );
    // a (20) and b (60) start; c starts when a ends at 20 and ends at 80.
    assert_eq!(plan.eta_seconds, 80.0);

    // With fleet history, a host without its own takes the fleet's median.
    for facts in &mut f {
        facts.history.fleet_median_ms = Some(4_000);
    }
    let with_fleet = super::plan(&f, &graph, 3, &options).unwrap();
    assert_eq!(with_fleet.get("a").unwrap().estimate_seconds, 20.0);
    let b = with_fleet.get("b").unwrap();
    assert_eq!(b.estimate_seconds, 4.0);
    assert_eq!(b.estimate_source, EstimateSource::Fleet);
    assert!(!b.estimate_from_history);
}

#[test]
fn risk_reasons() {
    let (mut facts, graph) = seed_fleet();
    for f in &mut facts {
        f.history.successful_ms = vec![1000];
    }
    facts[2].summary = Some(ChangeSummary {
        kernel_changed: true,
        compared: true,
        ..ChangeSummary::default()
    });
    facts[3].history.recent_failures = 1;
    let plan = plan(&facts, &graph, 4, &DeployOptions::default()).unwrap();
    assert_eq!(plan.get("razer").unwrap().risk, Risk::High);
    assert_eq!(plan.get("samsung").unwrap().risk, Risk::Medium);
    assert_eq!(plan.get("p620").unwrap().risk, Risk::Medium);
    assert_eq!(plan.risk, Risk::High);
    assert!(plan.risk_reasons.iter().any(|r| r.contains("kernel")));
    assert!(
        plan.risk_reasons
            .iter()
            .any(|r| r.contains("75% of the fleet"))
    );
}
