//! Several coordinators on one history: host leases, deployment leases and
//! their epochs (fencing), heartbeats, the election, takeovers, and the
//! schema checks, on both backends (each store handle is a coordinator of
//! its own, as another process is).

use super::*;
use nix_deploy_core::events::{DeploymentStatus, EventKind, HostStatus};
use nix_deploy_core::run::HostRun;

/// The log lines of deployment `id`, as `store` reads them.
async fn log_messages(store: &Store, id: i64) -> Vec<String> {
    store
        .events(id, 0)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|e| match e.kind {
            EventKind::Log { message } => Some(message),
            _ => None,
        })
        .collect()
}

fn log(message: &str) -> EventKind {
    EventKind::Log {
        message: message.into(),
    }
}

on_both_backends! {
    async fn leases_refuse_a_live_holder_and_take_over_a_dead_ones(db) {
        let store = db.open().await;
        assert_eq!(store.try_lease("h", "one", Some(1)).await.unwrap(), Ok(()));
        // Same owner: renewal.
        assert_eq!(store.try_lease("h", "one", Some(1)).await.unwrap(), Ok(()));
        // Another owner while the holder lives: refused, naming the holder.
        let held = store.try_lease("h", "two", Some(2)).await.unwrap().unwrap_err();
        assert_eq!(held.deployment_id, Some(1));
        assert!(held.to_string().contains("deployment #1"));
        // Another coordinator sees the same.
        let other = db.open().await;
        assert!(other.try_lease("h", "three", None).await.unwrap().is_err());
        // Its holder is gone: on SQLite its flock is free, on PostgreSQL its
        // lease expired unrenewed. Either way it is taken over.
        match db.backend() {
            Backend::Sqlite => db.sql(&store, "UPDATE leases SET holder = 'deadbeef'").await,
            Backend::Postgres => db.sql(&store, "UPDATE leases SET expires_at = 0").await,
        }
        assert_eq!(other.try_lease("h", "two", Some(2)).await.unwrap(), Ok(()));
        assert_eq!(store.lease("h").await.unwrap().unwrap().owner, "two");
        other.release_leases("two").await.unwrap();
        assert_eq!(store.lease("h").await.unwrap(), None);
    }

    async fn a_dead_coordinators_deployment_becomes_interrupted(db) {
        let store = db.open().await;
        let id = store.create_deployment(&new_deployment()).await.unwrap();
        let mut run = HostRun::new(id, "web1");
        run.status = HostStatus::Running;
        store.save_host_run(&run).await.unwrap();
        // Its coordinator (this one) is alive: nothing happens.
        assert!(store.mark_interrupted().await.unwrap().is_empty());
        let other = db.open().await;
        assert!(other.mark_interrupted().await.unwrap().is_empty());
        match db.backend() {
            Backend::Sqlite => {
                db.sql(&store, "UPDATE deployments SET pid = 999999999, holder = 'deadbeef'").await
            }
            Backend::Postgres => db.sql(&store, "UPDATE deployments SET lease_expires_at = 0").await,
        }
        assert_eq!(other.mark_interrupted().await.unwrap(), vec![id]);
        let d = other.deployment(id).await.unwrap().unwrap();
        assert_eq!(d.status, DeploymentStatus::Interrupted);
        assert_eq!(other.host_runs(id).await.unwrap()[0].status, HostStatus::Interrupted);
        let events = other.events(id, 0).await.unwrap();
        assert!(matches!(
            events.last().unwrap().kind,
            EventKind::DeploymentFinished { status: DeploymentStatus::Interrupted }
        ));
        assert!(!other.request_cancel(id, "tester").await.unwrap(), "not running any more");
        // Its old holder was superseded: what it writes now is refused.
        let refused = store.append_event(id, None, log("late")).await.unwrap_err();
        assert!(refused.is_superseded(), "{refused}");
    }

    async fn a_superseded_holder_cannot_write_and_is_told_so(db) {
        let a = db.open().await;
        let b = db.open().await;
        let id = a.create_deployment(&new_deployment()).await.unwrap();
        assert_eq!(a.epoch(id).unwrap(), 1);
        let lost = a.lost_signal(id).unwrap();
        a.append_event(id, None, log("by a")).await.unwrap();
        // B may neither write it nor take it while A's lease runs.
        assert!(matches!(
            b.append_event(id, None, log("by b")).await,
            Err(StoreError::NotHeld { .. })
        ));
        assert!(b.expired_deployments().await.unwrap().is_empty());
        assert!(!b.take_over(id, 1).await.unwrap());
        db.sql(&a, "UPDATE deployments SET lease_expires_at = 0").await;
        assert_eq!(b.expired_deployments().await.unwrap(), [(id, 1)]);
        assert!(b.take_over(id, 1).await.unwrap());
        assert_eq!(b.epoch(id).unwrap(), 2);
        // A second taker loses the race.
        let c = db.open().await;
        assert!(!c.take_over(id, 1).await.unwrap());
        // Every write of A's is refused from now on, with a distinct error,
        // and A's workers are told to stop.
        let mut run = HostRun::new(id, "web1");
        run.status = HostStatus::Running;
        let refused = a.save_host_run(&run).await.unwrap_err();
        assert!(refused.is_superseded(), "{refused}");
        assert!(refused.to_string().contains("taken over"), "{refused}");
        assert!(lost.is_cancelled());
        assert!(a.append_event(id, None, log("late")).await.unwrap_err().is_superseded());
        assert!(a
            .finish_deployment(id, DeploymentStatus::Succeeded, None)
            .await
            .unwrap_err()
            .is_superseded());
        // B resumes it: running again at a new epoch, and writes.
        b.reopen_deployment(id).await.unwrap();
        assert_eq!(b.epoch(id).unwrap(), 3);
        b.save_host_run(&run).await.unwrap();
        b.finish_deployment(id, DeploymentStatus::Succeeded, None).await.unwrap();
        let d = b.deployment(id).await.unwrap().unwrap();
        assert_eq!(d.status, DeploymentStatus::Succeeded);
        let messages = log_messages(&b, id).await;
        assert_eq!(messages.len(), 2, "{messages:?}");
        assert!(messages[1].contains("taken over"), "{messages:?}");
        // A resume elsewhere meanwhile is refused: one holder at a time.
        assert!(a.reopen_deployment(id).await.is_ok(), "finished: may be resumed");
        assert!(b.reopen_deployment(id).await.unwrap_err().is_superseded());
    }

    async fn heartbeats_keep_leases_and_a_silent_holder_is_taken_over(db) {
        db.leases = LeaseTiming {
            heartbeat: Duration::from_millis(200),
            ttl: Duration::from_millis(900),
        };
        let a = db.open().await;
        let b = db.open().await;
        let beat = a.start_heartbeat(Role::Daemon { takeover: true }).await.unwrap();
        let id = a.create_deployment(&new_deployment()).await.unwrap();
        assert_eq!(a.try_lease("web1", "run-a", Some(id)).await.unwrap(), Ok(()));
        // Renewed across several TTLs: never up for takeover.
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_millis(2000) {
            assert!(b.expired_deployments().await.unwrap().is_empty());
            assert!(b.try_lease("web1", "run-b", None).await.unwrap().is_err());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let cluster = b.cluster().await.unwrap();
        let me = cluster.coordinators.iter().find(|c| c.id == a.holder()).unwrap();
        assert!(me.alive && me.takeover && me.kind == "daemon");
        assert_eq!(cluster.deployments[0].holder.as_deref(), Some(a.holder()));
        assert_eq!(cluster.deployments[0].epoch, 1);
        // A stops renewing (its process froze): the lease expires.
        drop(beat);
        until("the lease to expire", async || !b.expired_deployments().await.unwrap().is_empty()).await;
        assert!(b.take_over(id, 1).await.unwrap());
        if db.backend() == Backend::Postgres {
            // The host's lease expired too (on SQLite, A's flock still holds it).
            assert_eq!(b.try_lease("web1", "run-b", Some(id)).await.unwrap(), Ok(()));
            assert_eq!(b.lease("web1").await.unwrap().unwrap().epoch, 2);
        }
        // A's next heartbeat finds it superseded and tells its workers.
        let lost = a.lost_signal(id).unwrap();
        let _beat = a.start_heartbeat(Role::Daemon { takeover: true }).await.unwrap();
        until("A to be told", async || lost.is_cancelled()).await;
        assert!(a.epoch(id).unwrap_err().is_superseded());
    }

    async fn one_leader_at_a_time_and_the_next_after_it_resigns(db) {
        db.leases = LeaseTiming {
            heartbeat: Duration::from_millis(200),
            ttl: Duration::from_millis(900),
        };
        let a = db.open().await;
        let b = db.open().await;
        let cli = db.open().await;
        let beat_a = a.start_heartbeat(Role::Daemon { takeover: true }).await.unwrap();
        let beat_b = b.start_heartbeat(Role::Daemon { takeover: true }).await.unwrap();
        let _beat_cli = cli.start_heartbeat(Role::Cli).await.unwrap();
        assert!(beat_a.is_leader(), "the first daemon is elected");
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(beat_a.is_leader() && !beat_b.is_leader());
        let cluster = cli.cluster().await.unwrap();
        assert_eq!(cluster.leader.as_deref(), Some(a.holder()));
        assert_eq!(cluster.coordinators.len(), 3);
        assert_eq!(cluster.coordinators.iter().filter(|c| c.leader).count(), 1);
        beat_a.stop().await;
        until("B to be elected", async || beat_b.is_leader()).await;
        let cluster = cli.cluster().await.unwrap();
        assert_eq!(cluster.leader.as_deref(), Some(b.holder()));
        assert!(!cluster.coordinators.iter().any(|c| c.id == a.holder()), "A left");
    }

    async fn a_newer_schema_is_refused_and_an_older_one_only_when_migrating_is_off(db) {
        let store = db.open().await;
        let known = schema_version(db.backend());
        // The newest migration forgotten: the database is one version older.
        let older = super::super::database::migrator(db.backend())
            .iter()
            .map(|m| m.version)
            .filter(|v| *v < known)
            .max()
            .unwrap();
        db.sql(&store, &format!("DELETE FROM _sqlx_migrations WHERE version = {known}")).await;
        let mut options = db.options();
        options.migrate = false;
        let refused = Store::connect(&options).await.unwrap_err().to_string();
        assert!(
            refused.contains(&format!("schema version {older},")) && refused.contains(&known.to_string()),
            "{refused}"
        );
        db.sql(&store, &format!("INSERT INTO _sqlx_migrations (version, description, installed_on, success, checksum, execution_time)
                        SELECT {known}, description, installed_on, success, checksum, execution_time FROM _sqlx_migrations WHERE version = {older}")).await;
        db.sql(&store, &format!("INSERT INTO _sqlx_migrations (version, description, installed_on, success, checksum, execution_time)
                        SELECT 9999, description, installed_on, success, checksum, execution_time FROM _sqlx_migrations WHERE version = {older}")).await;
        let refused = Store::connect(&db.options()).await.unwrap_err().to_string();
        assert!(refused.contains("schema version 9999") && refused.contains(&format!("up to {known}")), "{refused}");
    }

    async fn events_of_a_deployment_are_read_in_order_by_another_coordinator(db) {
        let a = db.open().await;
        let b = db.open().await;
        let mut listener = b.listen_events().await.unwrap();
        assert_eq!(listener.is_some(), db.backend() == Backend::Postgres);
        let id = a.create_deployment(&new_deployment()).await.unwrap();
        let other = a.create_deployment(&new_deployment()).await.unwrap();
        let mut written = Vec::new();
        for i in 0..20 {
            written.push(a.append_event(id, None, log(&format!("{i}"))).await.unwrap().id);
            a.append_event(other, None, log("noise")).await.unwrap();
        }
        // A cancel request from B lands between them, in order too.
        assert!(b.request_cancel(id, "b").await.unwrap());
        let read = b.events(id, 0).await.unwrap();
        assert_eq!(read.len(), 21);
        assert!(read.windows(2).all(|w| w[0].id < w[1].id));
        assert_eq!(&read.iter().map(|e| e.id).collect::<Vec<_>>()[..20], &written[..]);
        if let Some(listener) = listener.as_mut() {
            let mut heard = Vec::new();
            while heard.len() < 21 {
                if let Notice::Event { deployment, event } = listener.next().await.unwrap()
                    && deployment == id
                {
                    heard.push(event);
                }
            }
            assert_eq!(heard, read.iter().map(|e| e.id).collect::<Vec<_>>());
        }
    }

    async fn a_stopping_daemon_hands_its_deployment_over_and_another_takes_it_at_once(db) {
        let a = db.open().await;
        let b = db.open().await;
        let _beat_a = a.start_heartbeat(Role::Daemon { takeover: true }).await.unwrap();
        let id = a.create_deployment(&new_deployment()).await.unwrap();
        let fence = a.host_fence(id).await.unwrap();
        assert_eq!((fence.deployment(), fence.epoch()), (id, 1));
        assert!(matches!(b.host_fence(id).await, Err(StoreError::NotHeld { .. })));
        // Nobody else takes deployments over yet; then B does.
        assert!(a.stop_taking_over().await.unwrap().is_empty());
        let _beat_b = b.start_heartbeat(Role::Daemon { takeover: true }).await.unwrap();
        assert_eq!(a.stop_taking_over().await.unwrap(), [b.holder().to_string()]);
        // Asked; only its holder may be.
        assert!(a.ask_hand_over(id) && a.hand_over_wanted(id));
        assert_eq!(a.handing_over(), [id]);
        assert!(!b.ask_hand_over(id));
        assert!(b.expired_deployments().await.unwrap().is_empty(), "its lease runs");
        a.hand_over(id).await.unwrap();
        assert!(matches!(a.epoch(id), Err(StoreError::NotHeld { .. })));
        assert!(a.handing_over().is_empty());
        // Let go by the database's clock at once: taken over, and said so.
        assert_eq!(b.expired_deployments().await.unwrap(), [(id, 1)]);
        assert_eq!(b.take_over_from(id, 1).await.unwrap(), Some(Released::HandedOver));
        assert_eq!(b.host_fence(id).await.unwrap().epoch(), 2);
        let report = b.cluster().await.unwrap();
        let stopping = report.coordinators.iter().find(|c| c.id == a.holder()).unwrap();
        assert!(stopping.stopping && !stopping.takeover, "{stopping:?}");
        assert_eq!(stopping.handed_over, 1);
        let taking = report.coordinators.iter().find(|c| c.id == b.holder()).unwrap();
        assert!(!taking.stopping && taking.takeover && taking.handed_over == 0);
        let lease = report.deployments.iter().find(|d| d.deployment_id == id).unwrap();
        assert_eq!((lease.holder.as_deref(), lease.epoch), (Some(b.holder()), 2));
        let messages = log_messages(&b, id).await;
        assert!(messages.iter().any(|m| m.contains("handed it over as it stopped")), "{messages:?}");
        // A host that saw a newer epoch: B has lost it too, for good.
        let lost = b.lost_signal(id).unwrap();
        b.fenced_out(id, 2);
        assert!(lost.is_cancelled());
        assert!(b.epoch(id).unwrap_err().is_superseded());
    }
}

#[tokio::test]
async fn an_unreachable_database_is_named_without_its_password() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = StoreOptions::sqlite(dir.path());
    let url =
        DatabaseUrl::parse("postgresql://deploy@localhost/fleet?host=/nonexistent/socket-dir")
            .unwrap()
            .with_password("hunter2");
    options.database = Database::Postgres(url);
    let error = format!(
        "{:#}",
        anyhow::Error::from(Store::connect(&options).await.unwrap_err())
    );
    assert!(
        error.contains("postgresql://deploy:***@localhost/fleet"),
        "{error}"
    );
    assert!(!error.contains("hunter2"), "{error}");
}

#[tokio::test]
async fn a_holder_that_cannot_renew_stops_acting_before_its_lease_can_expire() {
    let server = Postgres::start().unwrap();
    let name = server.create_database().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut options = StoreOptions::sqlite(dir.path());
    options.database = Database::Postgres(DatabaseUrl::parse(&server.url(&name)).unwrap());
    options.leases = LeaseTiming {
        heartbeat: Duration::from_millis(200),
        ttl: Duration::from_millis(1200),
    };
    let a = Store::connect(&options).await.unwrap();
    let _beat = a
        .start_heartbeat(Role::Daemon { takeover: true })
        .await
        .unwrap();
    let id = a.create_deployment(&new_deployment()).await.unwrap();
    let lost = a.lost_signal(id).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!lost.is_cancelled(), "renewed while the database answers");
    server.stop().unwrap();
    until("A to stop acting", async || lost.is_cancelled()).await;
    assert!(matches!(
        a.epoch(id),
        Err(StoreError::Superseded {
            lost: Lost::Expired,
            ..
        })
    ));
    server.run().unwrap();
    // Back: another coordinator takes the expired deployment over.
    let b_dir = tempfile::tempdir().unwrap();
    let mut b_options = options.clone();
    b_options.state_dir = b_dir.path().to_path_buf();
    let b = Store::connect(&b_options).await.unwrap();
    until("the lease to expire", async || {
        !b.expired_deployments().await.unwrap().is_empty()
    })
    .await;
    assert!(b.take_over(id, 1).await.unwrap());
}

/// Every table and view with its columns, as `table.column` lines.
async fn schema(db: &Db) -> String {
    let store = db.open().await;
    let sql = match db.backend() {
        Backend::Sqlite => {
            "SELECT m.name, p.name FROM sqlite_master m, pragma_table_info(m.name) p
             WHERE m.type IN ('table', 'view') AND m.name NOT LIKE 'sqlite_%' AND m.name NOT LIKE '_sqlx%'
             ORDER BY 1, 2"
        }
        Backend::Postgres => {
            "SELECT table_name::text, column_name::text FROM information_schema.columns
             WHERE table_schema = 'public' AND table_name NOT LIKE '_sqlx%' ORDER BY 1, 2"
        }
    };
    let columns: Vec<(String, String)> = sqlx::query_as(sql).fetch_all(store.pool()).await.unwrap();
    columns.iter().map(|(t, c)| format!("{t}.{c}\n")).collect()
}

#[tokio::test]
async fn both_backends_have_the_same_tables_and_columns() {
    let sqlite = schema(&Db::new(Backend::Sqlite).await).await;
    let postgres = schema(&Db::new(Backend::Postgres).await).await;
    assert!(sqlite.contains("deployments.epoch\n"), "{sqlite}");
    assert_eq!(
        sqlite, postgres,
        "a migration is missing its twin in migrations/sqlite or migrations/postgres"
    );
}
