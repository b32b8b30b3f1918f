//! The watch's state: a change with its event and alerts, stored together,
//! written by the leader only, read by every coordinator; alerts claimed by
//! one sender at a time.

use super::*;
use nix_deploy_core::drift::{AlertKind, Drift, DriftKind};
use nix_deploy_core::watch::{FleetReport, HostWatch};

fn row(name: &str, kind: DriftKind) -> WatchRow {
    WatchRow {
        state: HostWatch {
            name: name.into(),
            drift: vec![Drift { kind, since: 5 }],
            last_seen: Some(7),
            ..HostWatch::default()
        },
        unreachable_alerted: false,
    }
}

fn unhealthy(host: &str) -> NewAlert {
    NewAlert {
        kind: AlertKind::Unhealthy,
        host: Some(host.into()),
        drift: Vec::new(),
        detail: Some("service nginx (failed)".into()),
    }
}

/// Heartbeats fast enough for a test to see a leader change.
fn quick(db: &mut Db) {
    db.leases = LeaseTiming {
        heartbeat: Duration::from_millis(200),
        ttl: Duration::from_millis(900),
    };
}

on_both_backends! {
    async fn a_change_its_event_and_its_alerts_are_stored_together_and_survive_a_reopen(db) {
        let store = db.open().await;
        let beat = store.start_heartbeat(Role::Daemon { takeover: false }).await.unwrap();
        assert!(beat.is_leader());
        let sick = row("web1", DriftKind::Unhealthy);
        let (event, alerts) = store
            .record_watch(&WatchChange {
                row: &sick,
                drift: Some((vec![DriftKind::Unhealthy], vec![DriftKind::InSync])),
                alerts: vec![unhealthy("web1")],
            })
            .await
            .unwrap();
        let event = event.unwrap();
        assert!(event.id > 0);
        assert_eq!(event.state, sick.state);
        assert_eq!(alerts.len(), 1);
        // A second change: only the state, no event, no alert.
        let mut seen = sick.clone();
        seen.state.last_seen = Some(9);
        seen.unreachable_alerted = true;
        store
            .record_watch(&WatchChange { row: &seen, drift: None, alerts: Vec::new() })
            .await
            .unwrap();
        let header = FleetReport {
            watching: true,
            interval_seconds: Some(60),
            flake: "path:/fleet".into(),
            revision: Some("abc".into()),
            ..FleetReport::default()
        };
        store.save_watch_fleet(&header).await.unwrap();
        beat.stop().await;
        store.close().await;

        let store = db.open().await;
        assert_eq!(store.watch_hosts().await.unwrap(), vec![seen.clone()]);
        assert_eq!(store.watch_events(0, 10).await.unwrap(), vec![event.clone()]);
        assert!(store.watch_events(event.id, 10).await.unwrap().is_empty());
        assert_eq!(store.watch_event_ids().await.unwrap(), (event.id, event.id));
        // Read back as the fleet: the header as saved, the hosts as stored,
        // and not watched any more (its watcher no longer leads).
        let stored = store.stored_fleet().await.unwrap();
        assert_eq!(stored.revision.as_deref(), Some("abc"));
        assert_eq!(stored.interval_seconds, Some(60));
        assert_eq!(stored.hosts, vec![seen.state.clone()]);
        assert!(stored.watched_by.is_some());
        assert!(!stored.watching, "{stored:?}");
        // The alert waits until sent, also across the reopen.
        assert_eq!(store.unsent_alerts().await.unwrap(), alerts);
        let beat = store.start_heartbeat(Role::Daemon { takeover: false }).await.unwrap();
        assert!(store.claim_alert(alerts[0].id).await.unwrap());
        store.mark_alert_sent(alerts[0].id).await.unwrap();
        assert!(store.unsent_alerts().await.unwrap().is_empty());
        // The fleet's own alerts have no host: the newest says whether the
        // flake was last said to evaluate.
        let fleet = store
            .record_alert(&NewAlert {
                kind: AlertKind::EvaluationFailed,
                host: None,
                drift: Vec::new(),
                detail: Some("error: syntax error".into()),
            })
            .await
            .unwrap();
        assert!(fleet.id > alerts[0].id);
        assert_eq!(store.last_fleet_alert().await.unwrap(), Some(fleet.clone()));
        store
            .record_watch(&WatchChange {
                row: &sick,
                drift: None,
                alerts: vec![unhealthy("web1")],
            })
            .await
            .unwrap();
        assert_eq!(
            store.last_fleet_alert().await.unwrap(),
            Some(fleet.clone()),
            "a host's alert is not the fleet's"
        );
        // Flushing many hosts at once; forgetting one.
        store
            .save_watch_hosts(&[row("a", DriftKind::InSync), row("b", DriftKind::Behind)])
            .await
            .unwrap();
        assert_eq!(store.watch_hosts().await.unwrap().len(), 3);
        store.forget_watch_host("a").await.unwrap();
        assert_eq!(store.watch_hosts().await.unwrap().len(), 2);
        beat.stop().await;
    }

    async fn only_the_leader_writes_the_watch_and_the_next_one_takes_it_over(db) {
        quick(&mut db);
        let a = db.open().await;
        let b = db.open().await;
        let beat_a = a.start_heartbeat(Role::Daemon { takeover: false }).await.unwrap();
        let beat_b = b.start_heartbeat(Role::Daemon { takeover: false }).await.unwrap();
        assert!(beat_a.is_leader() && !beat_b.is_leader());
        let sick = row("web1", DriftKind::Unhealthy);
        let change = WatchChange {
            row: &sick,
            drift: Some((vec![DriftKind::Unhealthy], Vec::new())),
            alerts: vec![unhealthy("web1")],
        };
        // A follower's writes are refused, whole: no state, event or alert.
        for refused in [
            b.record_watch(&change).await.map(|_| ()),
            b.save_watch_hosts(std::slice::from_ref(&sick)).await,
            b.save_watch_fleet(&FleetReport::default()).await,
            b.record_alert(&unhealthy("web1")).await.map(|_| ()),
            b.forget_watch_host("web1").await,
        ] {
            assert!(matches!(refused, Err(StoreError::NotLeader)), "{refused:?}");
        }
        assert!(b.watch_hosts().await.unwrap().is_empty());
        assert_eq!(b.watch_event_ids().await.unwrap(), (0, 0));
        assert!(b.unsent_alerts().await.unwrap().is_empty());
        // The leader's are stored, and every coordinator reads them.
        a.record_watch(&change).await.unwrap();
        a.save_watch_fleet(&FleetReport { watching: true, ..FleetReport::default() })
            .await
            .unwrap();
        let seen_by_b = b.stored_fleet().await.unwrap();
        assert!(seen_by_b.watching);
        assert_eq!(seen_by_b.watched_by.as_deref(), Some(a.holder()));
        assert_eq!(seen_by_b.hosts, vec![sick.state.clone()]);
        // A goes: B is elected, writes, and is the one watching.
        beat_a.stop().await;
        until("B to be elected", async || beat_b.is_leader()).await;
        assert!(matches!(
            a.record_watch(&change).await,
            Err(StoreError::NotLeader)
        ));
        let healthy = row("web1", DriftKind::InSync);
        b.record_watch(&WatchChange {
            row: &healthy,
            drift: Some((vec![DriftKind::InSync], vec![DriftKind::Unhealthy])),
            alerts: Vec::new(),
        })
        .await
        .unwrap();
        assert!(!b.stored_fleet().await.unwrap().watching, "until B says it watches");
        b.save_watch_fleet(&FleetReport { watching: true, ..FleetReport::default() })
            .await
            .unwrap();
        let now = a.stored_fleet().await.unwrap();
        assert!(now.watching);
        assert_eq!(now.watched_by.as_deref(), Some(b.holder()));
        assert_eq!(now.hosts, vec![healthy.state]);
        assert_eq!(a.watch_events(0, 10).await.unwrap().len(), 2);
        beat_b.stop().await;
    }

    async fn each_alert_is_claimed_by_one_sender_and_a_dead_ones_is_taken_over(db) {
        quick(&mut db);
        let a = db.open().await;
        let b = db.open().await;
        let beat_a = a.start_heartbeat(Role::Daemon { takeover: false }).await.unwrap();
        let beat_b = b.start_heartbeat(Role::Daemon { takeover: false }).await.unwrap();
        let first = a.record_alert(&unhealthy("web1")).await.unwrap();
        let second = a.record_alert(&unhealthy("web2")).await.unwrap();
        // Racing for the same alert: exactly one wins.
        let (claimed_a, claimed_b) = tokio::join!(a.claim_alert(first.id), b.claim_alert(first.id));
        assert!(claimed_a.unwrap() ^ claimed_b.unwrap());
        let (winner, loser) = if a.claim_alert(first.id).await.unwrap() { (&a, &b) } else { (&b, &a) };
        assert!(!loser.claim_alert(first.id).await.unwrap(), "claimed by a live sender");
        // Only its claimant marks it sent; then nobody claims it again.
        loser.mark_alert_sent(first.id).await.unwrap();
        assert_eq!(a.unsent_alerts().await.unwrap().len(), 2);
        winner.mark_alert_sent(first.id).await.unwrap();
        assert!(!a.claim_alert(first.id).await.unwrap() && !b.claim_alert(first.id).await.unwrap());
        assert_eq!(a.unsent_alerts().await.unwrap(), vec![second.clone()]);
        // A claims the second and dies before sending it: B takes it over.
        assert!(a.claim_alert(second.id).await.unwrap());
        assert!(!b.claim_alert(second.id).await.unwrap());
        beat_a.stop().await;
        assert!(b.claim_alert(second.id).await.unwrap());
        b.mark_alert_sent(second.id).await.unwrap();
        assert!(b.unsent_alerts().await.unwrap().is_empty());
        beat_b.stop().await;
    }
}

on_both_backends! {
    async fn a_hosts_reconcile_failures_since_its_last_success_are_counted(db) {
        use nix_deploy_core::events::HostStatus;
        use nix_deploy_core::run::HostRun;
        let store = db.open().await;
        assert_eq!(store.reconcile_failures("web1").await.unwrap(), (0, None));
        let mut reconcile = new_deployment();
        reconcile.trigger = "reconcile".into();
        // Oldest first: failed, deployed, failed, rolled back; and a
        // deployment of another trigger, which does not count.
        let outcomes = [
            ("reconcile", HostStatus::Failed, 10),
            ("reconcile", HostStatus::Deployed, 20),
            ("reconcile", HostStatus::Failed, 30),
            ("reconcile", HostStatus::RolledBack, 40),
            ("cli", HostStatus::Failed, 50),
        ];
        for (trigger, status, at) in outcomes {
            let mut new = reconcile.clone();
            new.trigger = trigger.into();
            let id = store.create_deployment(&new).await.unwrap();
            let mut run = HostRun::new(id, "web1");
            run.status = status;
            run.time.started_at = Some(at - 1);
            run.time.finished_at = Some(at);
            store.save_host_run(&run).await.unwrap();
        }
        assert_eq!(store.reconcile_failures("web1").await.unwrap(), (2, Some(40)));
        assert_eq!(store.reconcile_failures("web2").await.unwrap(), (0, None));
    }
}
