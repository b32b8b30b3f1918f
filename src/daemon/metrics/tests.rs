//! Unit tests of [`super`].

use super::*;
use crate::store::NewDeployment;
use nix_deploy_core::events::{DeploymentStatus, HostStatus, Step};
use nix_deploy_core::options::DeployOptions;
use nix_deploy_core::run::{HostRun, StepTiming};

#[test]
fn mttr_measures_failure_to_next_success() {
    let runs = vec![
        ("a".to_string(), "deployed".to_string(), 0),
        ("a".into(), "rolled-back".into(), 10_000),
        ("a".into(), "failed".into(), 20_000),
        ("a".into(), "deployed".into(), 40_000),
        ("b".into(), "failed".into(), 5_000),
        ("b".into(), "deployed".into(), 15_000),
        ("c".into(), "failed".into(), 0),
    ];
    // a: 30 s (from its first failure), b: 10 s; c never recovered.
    assert_eq!(mean_time_to_recovery(&runs), Some(20.0));
    assert_eq!(mean_time_to_recovery(&runs[..1]), None);
}

#[tokio::test]
async fn renders_the_history() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).await.unwrap();
    let new = NewDeployment {
        trigger: "cli".into(),
        requested_by: "t".into(),
        flake: ".".into(),
        flake_rev: None,
        strategy: "smart".into(),
        options: DeployOptions::default(),
        hosts: vec!["a".into()],
        queued: false,
        source: None,
    };
    for (status, host_status) in [
        (DeploymentStatus::Failed, HostStatus::RolledBack),
        (DeploymentStatus::Succeeded, HostStatus::Deployed),
    ] {
        let id = store.create_deployment(&new).await.unwrap();
        let mut run = HostRun::new(id, "a");
        run.status = host_status;
        run.time.started_at = Some(1_000);
        run.time.finished_at = Some(3_500);
        run.steps.push(StepTiming {
            step: Step::Build,
            started_at: 1_000,
            finished_at: Some(1_400),
            ok: Some(true),
        });
        store.save_host_run(&run).await.unwrap();
        store.record_host_result(&run).await.unwrap();
        // Counted as the step finished (the recorder does this).
        store.record_step_duration("build", 0.4).await.unwrap();
        store.finish_deployment(id, status, None).await.unwrap();
    }
    let fleet = FleetReport {
        watching: true,
        hosts: vec![nix_deploy_core::watch::HostWatch {
            name: "a".into(),
            reachable: Some(true),
            healthy: Some(false),
            generation: Some(4),
            last_seen: Some(1_500),
            drift: vec![nix_deploy_core::drift::Drift {
                kind: DriftKind::Unhealthy,
                since: 1,
            }],
            ..Default::default()
        }],
        ..FleetReport::default()
    };
    let _beat = store
        .start_heartbeat(crate::store::Role::Daemon { takeover: false })
        .await
        .unwrap();
    let node = Node {
        leader: true,
        takeovers: 2,
        handoffs_received: 1,
    };
    let text = render(&store, node, Some(&fleet)).await.unwrap();
    assert!(text.contains("nix_deploy_build_info{version=\""), "{text}");
    assert!(text.contains("nix_deploy_host_up{host=\"a\"} 1"), "{text}");
    assert!(text.contains("nix_deploy_host_in_sync{host=\"a\"} 0"));
    assert!(text.contains("nix_deploy_host_drift{host=\"a\",kind=\"unhealthy\"} 1"));
    assert!(text.contains("nix_deploy_host_drift{host=\"a\",kind=\"manual-switch\"} 0"));
    assert!(text.contains("nix_deploy_host_healthy{host=\"a\"} 0"));
    assert!(text.contains("nix_deploy_host_generation{host=\"a\"} 4"));
    assert!(text.contains("nix_deploy_host_last_seen_timestamp_seconds{host=\"a\"} 1.5"));
    assert!(
        text.contains(
            "nix_deploy_host_last_successful_deployment_timestamp_seconds{host=\"a\"} 3.5"
        )
    );
    assert!(text.contains("nix_deploy_fleet_evaluates 1"));
    assert!(
        text.contains("nix_deploy_deployments_total{status=\"failed\"} 1"),
        "{text}"
    );
    assert!(text.contains("nix_deploy_deployments_total{status=\"succeeded\"} 1"));
    assert!(text.contains("nix_deploy_host_runs_total{status=\"rolled-back\"} 1"));
    assert!(text.contains("nix_deploy_rollbacks_total 1"));
    assert!(text.contains("nix_deploy_hosts{state=\"deployed\"} 1"));
    assert!(text.contains("nix_deploy_step_duration_seconds_bucket{le=\"0.5\",step=\"build\"} 2"));
    assert!(text.contains("nix_deploy_step_duration_seconds_bucket{le=\"0.1\",step=\"build\"} 0"));
    assert!(text.contains("nix_deploy_step_duration_seconds_count{step=\"build\"} 2"));
    assert!(text.contains("nix_deploy_deployment_duration_seconds_count 2"));
    assert!(text.contains("nix_deploy_running_deployments 0"));
    // Both runs finished at the same instant: recovery took 0 s.
    assert!(text.contains("nix_deploy_mttr_seconds 0.0"), "{text}");
    assert!(text.contains("# TYPE nix_deploy_step_duration_seconds histogram"));
    assert!(text.contains("nix_deploy_cluster_leader 1"), "{text}");
    assert!(
        text.contains("nix_deploy_cluster_takeovers_total 2"),
        "{text}"
    );
    assert!(
        text.contains("nix_deploy_cluster_handoffs_received_total 1"),
        "{text}"
    );
    assert!(
        text.contains("nix_deploy_cluster_coordinators_stopping 0"),
        "{text}"
    );
    assert!(
        text.contains("nix_deploy_cluster_coordinators_alive 1"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "nix_deploy_cluster_heartbeat_lag_seconds{{coordinator=\"{}\"",
            store.holder()
        )),
        "{text}"
    );
}
