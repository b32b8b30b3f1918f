//! The dashboard's reads: a host's history with who asked, and every host's
//! newest evaluation.

use super::*;
use crate::store::CachedEvaluation;
use nix_deploy_core::events::{DeploymentStatus, HostStatus};
use nix_deploy_core::run::HostRun;

on_both_backends! {
    async fn a_hosts_history_says_who_and_the_newest_evaluation_wins(db) {
        let store = db.open().await;
        for (who, status) in [
            ("token:ci", HostStatus::Deployed),
            ("slack:ann", HostStatus::Skipped),
            ("slack:bob", HostStatus::RolledBack),
        ] {
            let id = store
                .create_deployment(&NewDeployment {
                    trigger: "api".into(),
                    requested_by: who.into(),
                    flake: ".".into(),
                    flake_rev: None,
                    strategy: "smart".into(),
                    options: DeployOptions::default(),
                    hosts: vec!["a".into()],
                    queued: false,
                    source: None,
                })
                .await
                .unwrap();
            let mut run = HostRun::new(id, "a");
            run.status = status;
            run.time.started_at = Some(id * 1000);
            store.save_host_run(&run).await.unwrap();
            store
                .finish_deployment(id, DeploymentStatus::Succeeded, None)
                .await
                .unwrap();
        }
        let history = store.host_history("a", 10).await.unwrap();
        let who: Vec<&str> = history.iter().map(|e| e.requested_by.as_str()).collect();
        // Newest first; the skipped run left out.
        assert_eq!(who, ["slack:bob", "token:ci"]);
        assert_eq!(history[0].run.status, HostStatus::RolledBack);
        assert_eq!(store.host_history("a", 1).await.unwrap().len(), 1);
        assert!(store.host_history("b", 10).await.unwrap().is_empty());

        let entry = |key: &str, host: &str| CachedEvaluation {
            key: key.into(),
            host: Some(host.into()),
            value: format!("\"{key}\""),
        };
        store
            .cache_evaluations(".", &[entry("old", "a"), entry("b1", "b")])
            .await
            .unwrap();
        db.sql(
            &store,
            "UPDATE eval_cache SET created_at = created_at - 1000 WHERE key = 'old'",
        )
        .await;
        store
            .cache_evaluations(".", &[entry("new", "a")])
            .await
            .unwrap();
        let latest = store.latest_evaluations().await.unwrap();
        let found: Vec<(&str, &str)> = latest
            .iter()
            .map(|e| (e.host.as_str(), e.value.as_str()))
            .collect();
        assert_eq!(found, [("a", "\"new\""), ("b", "\"b1\"")]);
    }
}
