//! Deployments, host runs, events, host state, the evaluation cache: what
//! the history keeps, on both backends.

use super::*;
use nix_deploy_core::events::{DeploymentStatus, EventKind, HostStatus, Step, SystemRef};
use nix_deploy_core::run::{HostRun, StepTiming};

on_both_backends! {
    async fn deployments_runs_and_events_round_trip(db) {
        let store = db.open().await;
        let id = store.create_deployment(&new_deployment()).await.unwrap();
        let mut run = HostRun::new(id, "web1");
        run.status = HostStatus::Deployed;
        run.from = SystemRef {
            path: Some("/nix/store/a".into()),
            generation: Some(1),
        };
        run.to = SystemRef {
            path: Some("/nix/store/b".into()),
            generation: Some(2),
        };
        run.steps.push(StepTiming {
            step: Step::Build,
            started_at: 1,
            finished_at: Some(2),
            ok: Some(true),
        });
        store.save_host_run(&run).await.unwrap();
        run.error = Some("none".into());
        store.save_host_run(&run).await.unwrap();
        store.record_host_result(&run).await.unwrap();
        let first = store
            .append_event(
                id,
                None,
                EventKind::Log {
                    message: "a".into(),
                },
            )
            .await
            .unwrap();
        let second = store
            .append_event(
                id,
                Some("web1"),
                EventKind::StepStarted { step: Step::Copy },
            )
            .await
            .unwrap();
        assert!(second.id > first.id);
        store
            .finish_deployment(id, DeploymentStatus::Succeeded, None)
            .await
            .unwrap();
        store.close().await;

        // Everything is still there after reopening.
        let store = db.open().await;
        let deployment = store.deployment(id).await.unwrap().unwrap();
        assert_eq!(deployment.status, DeploymentStatus::Succeeded);
        assert_eq!(deployment.selected, ["web1", "web2"]);
        assert_eq!(deployment.hosts, vec![run.clone()]);
        assert!(deployment.time.finished_at.is_some());
        assert_eq!(store.host_runs(id).await.unwrap(), vec![run]);
        let events = store.events(id, 0).await.unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[1].kind, EventKind::StepStarted { step: Step::Copy });
        assert_eq!(store.events(id, first.id).await.unwrap().len(), 1);
        let hosts = store.host_states().await.unwrap();
        assert_eq!(hosts[0].generation, Some(2));
        assert_eq!(hosts[0].last_status.as_deref(), Some("deployed"));
        assert_eq!(store.deployments(10).await.unwrap().len(), 1);
    }

    async fn exec_runs_goals_outputs_and_reboots_round_trip(db) {
        use nix_deploy_core::exec::{CommandOutput, ExecSpec};
        use nix_deploy_core::goal::Goal;
        use nix_deploy_core::run::{RebootRecord, RunKind};
        let store = db.open().await;
        let spec = ExecSpec {
            command: vec!["uptime".into()],
            parallel_limit: 3,
            timeout: Duration::from_secs(30),
        };
        let id = store
            .create_run(&new_deployment(), RunKind::Exec, Some(&spec))
            .await
            .unwrap();
        let mut run = HostRun::new(id, "web1");
        run.status = HostStatus::Succeeded;
        run.output = Some(CommandOutput {
            exit_code: Some(0),
            stdout: "up 3 days".into(),
            stderr: String::new(),
            withheld: false,
        });
        store.save_host_run(&run).await.unwrap();
        let exec = store.deployment(id).await.unwrap().unwrap();
        assert_eq!(exec.kind, RunKind::Exec);
        assert_eq!(exec.exec, Some(spec));
        assert_eq!(exec.hosts, vec![run]);
        // Plain deployments are still deployments, and an exec is no one's
        // history for estimates.
        let deploy = store.create_deployment(&new_deployment()).await.unwrap();
        assert_eq!(
            store.deployment(deploy).await.unwrap().unwrap().kind,
            RunKind::Deploy
        );
        let mut failed = HostRun::new(id, "web2");
        failed.status = HostStatus::Failed;
        failed.time.finished_at = Some(1);
        store.save_host_run(&failed).await.unwrap();
        assert!(store.recent_host_runs("web2", 10).await.unwrap().is_empty());

        // A boot deployment: the host keeps running the old system and
        // boots the new one next: pending a reboot.
        let mut boot = HostRun::new(deploy, "db1");
        boot.status = HostStatus::Deployed;
        boot.goal = Some(Goal::Boot);
        boot.from = SystemRef {
            path: Some("/nix/store/old".into()),
            generation: Some(1),
        };
        boot.to = SystemRef {
            path: Some("/nix/store/new".into()),
            generation: Some(2),
        };
        store.save_host_run(&boot).await.unwrap();
        store.record_host_result(&boot).await.unwrap();
        let state = &store.host_states().await.unwrap()[0];
        assert_eq!(state.current_path.as_deref(), Some("/nix/store/old"));
        assert_eq!(state.generation, Some(2));
        assert_eq!(state.boot_path.as_deref(), Some("/nix/store/new"));
        assert!(state.pending_reboot);
        // Rebooted into it: nothing pending.
        boot.reboot = Some(RebootRecord {
            boot_id_before: Some("a".into()),
            boot_id_after: Some("b".into()),
            system: Some("/nix/store/new".into()),
        });
        store.save_host_run(&boot).await.unwrap();
        store.record_host_result(&boot).await.unwrap();
        let state = &store.host_states().await.unwrap()[0];
        assert_eq!(state.current_path.as_deref(), Some("/nix/store/new"));
        assert!(!state.pending_reboot);
        let back = store.host_runs(deploy).await.unwrap();
        assert_eq!(back, vec![boot]);
    }

    async fn unreachable_probe_keeps_last_known_system(db) {
        let store = db.open().await;
        let sys = SystemRef {
            path: Some("/nix/store/a".into()),
            generation: Some(3),
        };
        store.record_probe("h", &sys, None).await.unwrap();
        store
            .record_probe("h", &SystemRef::default(), Some("connection refused"))
            .await
            .unwrap();
        let state = &store.host_states().await.unwrap()[0];
        assert_eq!(state.generation, Some(3));
        assert_eq!(state.probe_error.as_deref(), Some("connection refused"));
    }

    async fn hosts_touched_since_a_moment_are_the_ones_with_runs_after_it(db) {
        let store = db.open().await;
        let id = store.create_deployment(&new_deployment()).await.unwrap();
        let mut old = HostRun::new(id, "web1");
        old.time.started_at = Some(100);
        old.time.finished_at = Some(200);
        store.save_host_run(&old).await.unwrap();
        let mut unfinished = HostRun::new(id, "web2");
        unfinished.time.started_at = Some(100);
        store.save_host_run(&unfinished).await.unwrap();
        let hosts = ["web1".to_string(), "web2".to_string(), "web3".to_string()];
        assert_eq!(
            store.hosts_touched_since(&hosts, 300).await.unwrap(),
            ["web2"]
        );
        assert_eq!(
            store.hosts_touched_since(&hosts, 150).await.unwrap(),
            ["web1", "web2"]
        );
    }

    async fn evaluations_are_found_by_key_only_and_pruned_by_use(db) {
        let store = db.open().await;
        let entry = |key: &str, value: &str| CachedEvaluation {
            key: key.into(),
            host: Some("web1".into()),
            value: value.into(),
        };
        store
            .cache_evaluations(".", &[entry("k1", "{\"a\":1}"), entry("k2", "2")])
            .await
            .unwrap();
        let keys = ["k1".to_string(), "k3".to_string()];
        let found = store.cached_evaluations(&keys).await.unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found["k1"], "{\"a\":1}");
        // Writing a key again keeps its value: a key has one value.
        store
            .cache_evaluations(".", &[entry("k1", "other")])
            .await
            .unwrap();
        assert_eq!(
            store.cached_evaluations(&keys).await.unwrap()["k1"],
            "{\"a\":1}"
        );
        // More keys than a query could bind one by one.
        let many: Vec<String> = (0..1200).map(|i| format!("m{i}")).collect();
        let entries: Vec<_> = many.iter().map(|k| entry(k, "1")).collect();
        store.cache_evaluations(".", &entries).await.unwrap();
        assert_eq!(store.cached_evaluations(&many).await.unwrap().len(), 1200);

        assert_eq!(store.eval_host_memory("f").await.unwrap(), None);
        store.record_eval_host_memory("f", 40_000).await.unwrap();
        store.record_eval_host_memory("f", 50_000).await.unwrap();
        assert_eq!(store.eval_host_memory("f").await.unwrap(), Some(50_000));
    }

    async fn hook_deliveries_are_seen_once_and_branch_heads_only_advance(db) {
        let store = db.open().await;
        assert!(store.remember_delivery("github", "d1", 60_000).await.unwrap());
        assert!(!store.remember_delivery("github", "d1", 60_000).await.unwrap());
        assert!(store.remember_delivery("slack", "d1", 60_000).await.unwrap());
        let head = |commit: &str, committed_at| BranchHead {
            commit: commit.into(),
            committed_at,
        };
        assert_eq!(store.branch_head("main").await.unwrap(), None);
        assert!(store.advance_branch_head("main", &head("b", 20)).await.unwrap());
        assert!(!store.advance_branch_head("main", &head("a", 10)).await.unwrap());
        assert!(store.advance_branch_head("main", &head("c", 30)).await.unwrap());
        assert_eq!(store.branch_head("main").await.unwrap(), Some(head("c", 30)));
    }

    async fn step_durations_are_counted_in_buckets(db) {
        let store = db.open().await;
        store.record_step_duration("copy", 0.05).await.unwrap();
        store.record_step_duration("copy", 3.0).await.unwrap();
        store.record_step_duration("build", 700.0).await.unwrap();
        let histograms = store.step_histograms().await.unwrap();
        assert_eq!(histograms.len(), 2);
        let copy = histograms.iter().find(|h| h.step == "copy").unwrap();
        assert_eq!(copy.count, 2);
        assert!((copy.sum_seconds - 3.05).abs() < 1e-9);
        assert_eq!(copy.buckets[0], 1);
        assert_eq!(copy.buckets[3], 1);
        let build = histograms.iter().find(|h| h.step == "build").unwrap();
        assert_eq!(build.buckets[STEP_BUCKETS.len()], 1);
    }
}
