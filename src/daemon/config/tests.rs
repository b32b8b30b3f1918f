//! Unit tests of [`super`].

use super::*;

#[test]
fn empty_config_has_the_documented_defaults() {
    let c = Config::default();
    assert_eq!(c.listen, "127.0.0.1:7480");
    assert_eq!(c.strategy, "smart");
    assert_eq!(c.parallel_limit, 4);
    assert_eq!(c.health_check_timeout, Duration::from_secs(120));
    assert!(c.auto_rollback);
    assert!(c.tokens.is_empty());
    assert_eq!(c.eval_workers, None);
    assert!(c.eval_cache);
    assert_eq!(c.database, None);
    assert!(c.migrate);
    assert_eq!(c.lease_timing(), LeaseTiming::default());
    assert!(c.cluster.takeover);
    assert_eq!(c.cluster.stop_timeout, Duration::from_secs(300));
}

#[test]
fn the_database_is_a_postgresql_url_without_a_password() {
    let c = Config::parse(
        r#"
        database = "postgresql://deploy@db.internal/fleet"
        database-password-file = "/run/credentials/nix-deploy.service/db"
        migrate = false
        [cluster]
        heartbeat = "2s"
        lease-ttl = "10s"
        takeover = false
        stop-timeout = "2min"
    "#,
        Path::new("t.toml"),
    )
    .unwrap();
    assert_eq!(
        c.database_url().unwrap().unwrap().to_string(),
        "postgresql://deploy@db.internal/fleet"
    );
    assert!(!c.migrate);
    assert_eq!(c.lease_timing().ttl, Duration::from_secs(10));
    assert_eq!(c.cluster.stop_timeout, Duration::from_secs(120));
    let bad = |t: &str| {
        Config::parse(t, Path::new("t.toml"))
            .unwrap_err()
            .to_string()
    };
    let e = bad(r#"database = "postgresql://deploy:hunter2@db/fleet""#);
    assert!(
        e.contains("database-password-file") && !e.contains("hunter2"),
        "{e}"
    );
    assert!(bad(r#"database = "mysql://db/fleet""#).contains("mysql"));
    for stop in ["0s", "2h"] {
        let e = bad(&format!("[cluster]\nstop-timeout = \"{stop}\""));
        assert!(e.contains("cluster.stop-timeout"), "{e}");
    }
    assert!(bad(r#"database-password-file = "/x""#).contains("database is not"));
    let e = bad("[cluster]\nheartbeat = \"5s\"\nlease-ttl = \"6s\"");
    assert!(e.contains("three heartbeats"), "{e}");
}

#[test]
fn parses_a_full_config() {
    let text = r#"
        listen = "127.0.0.1:9000"
        flake = "github:me/fleet"
        strategy = "canary"
        parallel-limit = 8
        health-check-timeout = 60
        confirm-timeout = "2m"
        activation-timeout = "1h30m"
        auto-rollback = false
        eval-workers = 3
        eval-cache = false

        [[tokens]]
        name = "ci"
        file = "/run/secrets/ci"
        scope = "deploy"

        [slack]
        signing-secret-file = "/run/secrets/slack"

        [github]
        secret-file = "/run/secrets/gh"

        [notifications]
        slack-webhooks = ["https://hooks.slack.com/services/x"]
    "#;
    let c = Config::parse(text, Path::new("t.toml")).unwrap();
    assert_eq!(c.parallel_limit, 8);
    assert_eq!(c.eval_workers, Some(3));
    assert!(!c.eval_cache);
    assert_eq!(c.health_check_timeout, Duration::from_secs(60));
    assert_eq!(c.confirm_timeout, Duration::from_secs(120));
    assert_eq!(c.activation_timeout, Duration::from_secs(5400));
    assert_eq!(c.tokens[0].scope, Scope::Deploy);
    assert_eq!(c.github.as_ref().unwrap().branch, "main");
    assert_eq!(
        c.slack.as_ref().unwrap().response_url_prefixes,
        ["https://hooks.slack.com/"]
    );
    assert!(Scope::Admin.allows(Scope::Read));
    assert!(!Scope::Read.allows(Scope::Deploy));
}

#[test]
fn relative_secret_paths_are_systemd_credentials() {
    let creds = Path::new("/run/credentials/nix-deploy.service");
    assert_eq!(
        secret_path("tokens.file", Path::new("token-ci"), Some(creds)).unwrap(),
        creds.join("token-ci")
    );
    assert_eq!(
        secret_path("x", Path::new("/etc/secret"), None).unwrap(),
        Path::new("/etc/secret")
    );
    let e = secret_path("ssh-identity-file", Path::new("ssh-key"), None).unwrap_err();
    assert!(e.to_string().contains("CREDENTIALS_DIRECTORY"), "{e}");
    assert!(
        e.to_string().starts_with("ssh-identity-file `ssh-key`"),
        "{e}"
    );
    assert!(secret_path("x", Path::new("../etc/shadow"), Some(creds)).is_err());
    let c = Config::parse(
        "ssh-identity-file = \"ssh-key\"\n[notifications]\nslack-webhook-files = [\"slack-0\"]",
        Path::new("t.toml"),
    )
    .unwrap();
    assert_eq!(c.ssh_identity_file.as_deref(), Some(Path::new("ssh-key")));
    assert_eq!(c.notifications.slack_webhook_files, [Path::new("slack-0")]);
}

#[test]
fn rejects_bad_configs() {
    let bad = |t: &str| {
        Config::parse(t, Path::new("t.toml"))
            .unwrap_err()
            .to_string()
    };
    assert!(bad("strategy = \"yolo\"").contains("strategy"));
    assert!(bad("parallel-limit = 0").contains("parallel-limit"));
    assert!(bad("eval-workers = 0").contains("eval-workers"));
    assert!(bad("listen = 5").contains("t.toml"));
    assert!(bad("unknown-key = 1").contains("unknown"));
    let e = bad("confirm-timeout = \"10x\"");
    assert!(e.contains("confirm-timeout") && e.contains("30s"), "{e}");
    assert!(bad("health-check-timeout = 0").contains("at least 1s"));
    assert!(bad("request-timeout = \"9d\"").contains("too long"));
    assert!(format!("{:?}", Secret::new("hunter2")) == "Secret(***)");
    assert!(bad("[watch]\ninterval = 0").contains("watch.interval"));
    assert!(bad("[notifications]\nemail-to = [\"a@b.c\"]").contains("[smtp]"));
    assert!(bad("[notifications]\nretries = 99").contains("notifications.retries"));
}

#[test]
fn windows_approvals_schedules_chat_and_token_reach_are_checked_at_load() {
    let good = r#"
        [[tokens]]
        name = "staging"
        file = "/run/secrets/s"
        scope = "deploy"
        hosts = ["@staging"]

        [[window]]
        kind = "deny"
        schedule = "0 17 * * 5"
        duration = "64h"
        timezone = "Europe/Berlin"
        hosts = ["@prod"]

        [groups]
        sre = ["token:alice", "slack:U2"]

        [[approval]]
        hosts = ["@prod"]
        approvers = ["group:sre"]
        timeout = "30m"

        [[schedule]]
        name = "nightly"
        cron = "0 3 * * *"
        request = { on = ["@staging"], strategy = "rolling", batch_size = "25%" }

        [chat]
        confirm-above = 2
        users = [{ id = "U1", scope = "deploy", hosts = ["@staging"] }]
    "#;
    let c = Config::parse(good, Path::new("t.toml")).unwrap();
    let policy = c.policy().unwrap();
    assert_eq!(policy.windows.windows.len(), 1);
    assert_eq!(policy.approvals[0].approvers, ["slack:U2", "token:alice"]);
    assert_eq!(c.chat.confirm_above, 2);
    assert_eq!(c.tokens[0].hosts, ["@staging"]);
    let bad = |t: &str| {
        Config::parse(t, Path::new("t.toml"))
            .unwrap_err()
            .to_string()
    };
    let window = |field: &str| {
        format!(
            "[[window]]\nkind = \"allow\"\nschedule = \"0 1 * * *\"\nduration = \"1h\"\n{field}\n"
        )
    };
    assert!(bad(&window("timezone = \"Mars/Base\"")).contains("window[0].timezone = `Mars/Base`"));
    assert!(
        bad("[[window]]\nkind = \"allow\"\nschedule = \"99 1 * * *\"\nduration = \"1h\"")
            .contains("window[0].schedule = `99 1 * * *`")
    );
    assert!(bad(&window("hosts = [\"a;b\"]")).contains("window[0].hosts = `a;b`"));
    assert!(
        bad("[[approval]]\nhosts = [\"@prod\"]\napprovers = [\"token:a\"]\ntimeout = \"soon\"")
            .contains("approval[0].timeout = `soon`")
    );
    assert!(
        bad("[[schedule]]\nname = \"n\"\ncron = \"every day\"")
            .contains("schedule[0].cron = `every day`")
    );
    assert!(
        bad("[[schedule]]\nname = \"n\"\ncron = \"@daily\"\nrequest = { on = [\"a,,b\"] }")
            .contains("schedule[0].request")
    );
    assert!(
        bad("[[tokens]]\nname = \"t\"\nfile = \"/x\"\nscope = \"read\"\nhosts = [\"[\"]")
            .contains("tokens[0].hosts = `[`")
    );
    assert!(
        bad("[chat]\nusers = [{ id = \"U 1\", scope = \"read\" }]").contains("chat.users[0].id")
    );
}
