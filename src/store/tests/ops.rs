//! What operating a fleet with other people keeps, on both backends: chat
//! requests waiting for Confirm, scheduled runs, a host's last successful
//! deployment, what a waiting deployment waits for; and a new history
//! opened by several processes at once.

use super::*;
use nix_deploy_core::events::{DeploymentStatus, EventKind, HostStatus, SystemRef};
use nix_deploy_core::run::{HostRun, WindowWait};

on_both_backends! {
    async fn a_chat_request_is_decided_once_and_not_after_it_expired(db) {
        let store = db.open().await;
        let new = |expires_at| NewChatRequest {
            created_at: 0,
            expires_at,
            requester: "slack:U1",
            channel: "C1",
            request: "{}",
            response_url: None,
        };
        let id = store.create_chat_request(&new(1_000)).await.unwrap();
        let ChatDecision::Done(request) = store
            .decide_chat_request(id, "confirmed", 10)
            .await
            .unwrap()
        else {
            panic!("not confirmed")
        };
        assert_eq!(request.requester, "slack:U1");
        store.chat_request_started(id, 3).await.unwrap();
        let again = store
            .decide_chat_request(id, "cancelled", 20)
            .await
            .unwrap();
        assert_eq!(
            again,
            ChatDecision::Refused(format!(
                "chat request #{id} was confirmed already (deployment #3)"
            ))
        );
        let late = store.create_chat_request(&new(1_000)).await.unwrap();
        assert_ne!(late, id);
        assert!(matches!(
            store.decide_chat_request(late, "confirmed", 1_000).await.unwrap(),
            ChatDecision::Refused(why) if why.contains("expired")
        ));
        assert_eq!(
            store.chat_request(late).await.unwrap().unwrap().state,
            "pending"
        );
        assert!(matches!(
            store.decide_chat_request(99, "confirmed", 0).await.unwrap(),
            ChatDecision::Refused(_)
        ));
        store.close().await;
    }

    async fn a_schedule_occurrence_is_claimed_once_and_a_baseline_never_moves_back(db) {
        let store = db.open().await;
        store.schedule_baseline("nightly", 1_000).await.unwrap();
        // Seen again later (a restart): the baseline stays.
        store.schedule_baseline("nightly", 9_000).await.unwrap();
        assert_eq!(
            store.schedule_runs().await.unwrap()[0].accounted_until,
            1_000
        );
        // Another coordinator of the same history claims through its own handle.
        let other = db.open().await;
        assert!(store.claim_schedule("nightly", 5_000).await.unwrap());
        assert!(!other.claim_schedule("nightly", 5_000).await.unwrap());
        assert!(!store.claim_schedule("nightly", 4_000).await.unwrap());
        store.schedule_started("nightly", 5_000, 7).await.unwrap();
        assert_eq!(
            other.schedule_runs().await.unwrap(),
            [ScheduleRun {
                name: "nightly".into(),
                accounted_until: 5_000,
                deployment_id: Some(7)
            }]
        );
        assert!(!store.claim_schedule("unknown", 5_000).await.unwrap());
        store.close().await;
        other.close().await;
    }

    async fn a_hosts_last_deployed_system_is_its_newest_deployed_run(db) {
        let store = db.open().await;
        assert_eq!(store.last_deployed_system("web1").await.unwrap(), None);
        let run = |id, status, path: &str, finished| {
            let mut run = HostRun::new(id, "web1");
            run.status = status;
            run.to = SystemRef {
                path: Some(path.into()),
                generation: Some(1),
            };
            run.time.finished_at = Some(finished);
            run
        };
        let first = store.create_deployment(&new_deployment()).await.unwrap();
        store
            .save_host_run(&run(first, HostStatus::Deployed, "/nix/store/a", 100))
            .await
            .unwrap();
        let failed = store.create_deployment(&new_deployment()).await.unwrap();
        store
            .save_host_run(&run(failed, HostStatus::Failed, "/nix/store/b", 200))
            .await
            .unwrap();
        assert_eq!(
            store.last_deployed_system("web1").await.unwrap(),
            Some((first, "/nix/store/a".to_string()))
        );
    }

    async fn a_deployment_waiting_for_its_window_says_until_when(db) {
        let store = db.open().await;
        let id = store.create_deployment(&new_deployment()).await.unwrap();
        store
            .append_event(
                id,
                None,
                EventKind::WaitingForWindow {
                    hosts: vec!["web1".into()],
                    reason: "deny window `freeze`".into(),
                    until: Some(5_000),
                },
            )
            .await
            .unwrap();
        assert_eq!(
            store.window_wait(id).await.unwrap(),
            Some(WindowWait {
                hosts: vec!["web1".into()],
                reason: "deny window `freeze`".into(),
                opens_at: Some(5_000),
            })
        );
        // Shown with the deployment only while it waits.
        assert_eq!(store.deployment(id).await.unwrap().unwrap().waiting, None);
        store.start_deployment(id, &["web1".into()], None).await.unwrap();
        store
            .set_deployment_status(id, DeploymentStatus::WaitingForWindow)
            .await
            .unwrap();
        let shown = store.deployment(id).await.unwrap().unwrap();
        assert_eq!(shown.status, DeploymentStatus::WaitingForWindow);
        assert_eq!(shown.waiting.unwrap().opens_at, Some(5_000));
    }

    async fn processes_opening_a_new_history_at_once_all_get_it_migrated(db) {
        // Each coordinator's first open of a new history migrates it; none
        // may fail because another applied a migration meanwhile.
        let opens: Vec<_> = (0..4)
            .map(|_| {
                let options = db.options();
                tokio::spawn(async move { Store::connect(&options).await.map(|s| s.holder().to_string()) })
            })
            .collect();
        for open in opens {
            open.await.unwrap().unwrap();
        }
    }
}
