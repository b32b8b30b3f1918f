//! Requests' options: defaults, parsing and checks.

use super::*;

#[test]
fn amounts_and_strategies() {
    assert_eq!(Amount::parse("2").unwrap(), Amount::Count(2));
    assert_eq!(Amount::parse("25%").unwrap(), Amount::Percent(25));
    assert!(Amount::parse("x").is_err());
    assert!(Amount::parse("101%").is_err());
    assert!(Amount::parse("18446744073709551615").is_err());
    assert_eq!(Amount::Percent(25).allowance_of(10), 2);
    assert_eq!(Amount::Percent(25).batch_of(10), 3);
    assert_eq!(Amount::Percent(1).batch_of(10), 1);
    assert_eq!(
        Strategy::parse("sequential").unwrap(),
        (Strategy::Rolling, Some(Amount::Count(1)))
    );
    assert!(Strategy::parse("yolo").is_err());
    let json = serde_json::to_string(&Amount::Percent(25)).unwrap();
    assert_eq!(json, "\"25%\"");
    assert_eq!(
        serde_json::from_str::<Amount>("3").unwrap(),
        Amount::Count(3)
    );
    assert_eq!(
        serde_json::from_str::<Amount>("\"50%\"").unwrap(),
        Amount::Percent(50)
    );
}

#[test]
fn a_request_resolves_against_defaults_and_is_bounded() {
    let defaults = DeployOptions {
        parallel_limit: 8,
        ..DeployOptions::default()
    };
    let request: Request = serde_json::from_str(
        r#"{"hosts": ["web1"], "sequential": true, "canary_soak": "1m",
            "health_timeout": 90, "max_failures": "10%"}"#,
    )
    .unwrap();
    let options = request.resolve(&defaults).unwrap();
    assert_eq!(options.strategy, Strategy::Rolling);
    assert_eq!(options.batch_size, Amount::Count(1));
    assert_eq!(options.parallel_limit, 8);
    assert_eq!(options.canary_soak, Duration::from_secs(60));
    assert_eq!(options.health_timeout, Duration::from_secs(90));
    assert_eq!(options.max_failures, Amount::Percent(10));
    assert_eq!(request.selection().names, ["web1"]);

    let refused = |json: &str| {
        serde_json::from_str::<Request>(json)
            .map_err(|e| e.to_string())
            .and_then(|r| r.resolve(&defaults).map_err(|e| e.to_string()))
            .unwrap_err()
    };
    assert!(refused(r#"{"batch_size": 0}"#).contains("batch-size"));
    assert!(refused(r#"{"batch_size": "0%"}"#).contains("batch-size"));
    assert!(refused(r#"{"parallel_limit": 0}"#).contains("parallel-limit"));
    assert!(refused(r#"{"parallel_limit": 18446744073709551615}"#).contains("parallel-limit"));
    assert!(refused(r#"{"health_timeout": "0s"}"#).contains("health-timeout"));
    assert!(refused(r#"{"confirm_timeout": "9999999h"}"#).contains("too long"));
    assert!(refused(r#"{"strategy": "yolo"}"#).contains("unknown strategy"));
    assert!(refused(r#"{"parallel": true, "sequential": true}"#).contains("exclude"));
    assert!(refused(r#"{"stratgy": "smart"}"#).contains("unknown field"));
    assert!(refused(r#"{"canary": ["-oProxy"]}"#).contains("canary"));
    assert!(refused(r#"{"goal": "reboot"}"#).contains("unknown goal"));
    assert!(
        refused(r#"{"goal": "test", "reboot": true}"#).contains("throws a test activation away")
    );
    assert!(refused(r#"{"goal": "dry-activate", "reboot": "auto"}"#).contains("nothing new"));
    assert!(refused(r#"{"strategy": "blue-green", "goal": "boot"}"#).contains("blue-green"));
    assert!(refused(r#"{"reboot": "maybe"}"#).contains("always, auto or never"));
    assert!(refused(r#"{"reboot_timeout": "0s"}"#).contains("reboot-timeout"));
    assert!(refused(r#"{"on": ["web;*"]}"#).contains("invalid selector"));
    assert!(refused(r#"{"exclude": ["a,,b"]}"#).contains("empty selector"));
}

#[test]
fn goals_and_reboots_resolve() {
    let request: Request = serde_json::from_str(
        r#"{"on": ["web-*"], "exclude": ["@canary"], "goal": "boot", "reboot": "auto", "reboot_timeout": "5m"}"#,
    )
    .unwrap();
    let options = request.resolve(&DeployOptions::default()).unwrap();
    assert_eq!(options.goal, Goal::Boot);
    assert_eq!(options.reboot, RebootPolicy::Auto);
    assert_eq!(options.reboot_timeout, Duration::from_secs(300));
    assert_eq!(request.selection().exclude, ["@canary"]);
    let json = serde_json::to_value(&options).unwrap();
    assert_eq!(json["goal"], "boot");
    assert_eq!(json["reboot"], "auto");
    // Rows written before goals existed are switch deployments.
    let old: DeployOptions = serde_json::from_str(r#"{"strategy": "smart"}"#).unwrap();
    assert_eq!(old.goal, Goal::Switch);
    assert_eq!(old.reboot, RebootPolicy::Never);
}

#[test]
fn options_round_trip_as_stored_and_read_older_rows() {
    let options = DeployOptions {
        strategy: Strategy::BlueGreen,
        canaries: vec!["a".into()],
        skip_validation: true,
        confirm_timeout: Duration::from_secs(5),
        ..DeployOptions::default()
    };
    let json = serde_json::to_value(&options).unwrap();
    assert_eq!(json["strategy"], "blue-green");
    assert_eq!(json["confirm_timeout"], "5s");
    let back: DeployOptions = serde_json::from_value(json).unwrap();
    assert_eq!(back, options);
    // Rows written before the options were one document.
    let old: DeployOptions = serde_json::from_str(
        r#"{"strategy": "canary", "canary_soak_s": 10, "confirm_timeout_s": 7,
            "batch_size": "2", "max_failures": "0", "skip_validation": true}"#,
    )
    .unwrap();
    assert_eq!(old.canary_soak, Duration::from_secs(10));
    assert_eq!(old.confirm_timeout, Duration::from_secs(7));
    assert_eq!(old.batch_size, Amount::Count(2));
    assert!(old.skip_validation);
}

#[test]
fn a_request_serializes_only_what_was_set() {
    let request = Request {
        hosts: vec!["a".into()],
        canary_soak: Some(Duration::from_secs(90)),
        ..Request::default()
    };
    assert_eq!(
        serde_json::to_string(&request).unwrap(),
        r#"{"hosts":["a"],"canary_soak":"1m 30s"}"#
    );
    assert!(Request::default().check_for_deploy().is_ok());
    let plan_only = Request {
        summaries: Some(false),
        ..Request::default()
    };
    assert!(plan_only.check_for_deploy().is_err());
    let deploy_only = Request {
        goal: Some("boot".into()),
        ..Request::default()
    };
    assert!(deploy_only.check_for_plan().is_err());
    assert!(deploy_only.check_for_deploy().is_ok());
}
