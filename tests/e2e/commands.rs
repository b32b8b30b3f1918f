//! The commands a colmena user types, against real test hosts: `apply` with
//! its goals (`build`, `push`, `boot`, `switch`, `keys`), `build` touching no
//! host, `eval` printing the right JSON, the Nix flags reaching Nix, and the
//! errors of a mistyped host, tag, goal or limit.

use std::path::{Path, PathBuf};

use nix_deploy_testkit::{HostSpec, NixosShape};

use crate::helpers::{Harness, git, host, status};

/// Where a store path of `name` would be in the host's own store.
fn on_host(h: &Harness, name: &str, path: &str) -> PathBuf {
    h.fleet.host_dir(name).join(path.trim_start_matches('/'))
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn apply_goals_as_colmena_names_them_and_build_touches_no_host() {
    let h = Harness::start(vec![
        HostSpec::new("a")
            .tags(&["web"])
            .deployment_extra(r#"keys."k" = { text = "apply-keys-secret"; };"#),
        HostSpec::new("b").tags(&["db"]),
        HostSpec::new("c").tags(&["web"]).user("deploy"),
    ]);
    let toplevels = h.fleet.toplevels().unwrap();

    // build: every system built and kept as a GC root; no host touched.
    let (code, built, stderr) = h.json(&["build", "--keep-result"]);
    assert_eq!(code, 0, "{stderr}");
    for (name, toplevel) in &toplevels {
        let entry = host(&built, name);
        assert_eq!(entry["toplevel"], toplevel.as_str());
        assert!(entry.get("error").is_none(), "{entry}");
        let link = h.state_dir().join("results").join(name);
        assert_eq!(entry["result"], link.display().to_string());
        assert_eq!(std::fs::read_link(&link).unwrap(), Path::new(toplevel));
        assert!(Path::new(toplevel).exists(), "built in this store");
        assert!(
            !on_host(&h, name, toplevel).exists(),
            "{name} received nothing"
        );
        assert_eq!(h.fleet.generation(name), None);
        assert_eq!(h.fleet.current_system(name), None);
    }
    let history = h.json(&["history"]).1;
    assert_eq!(
        history["deployments"],
        serde_json::json!([]),
        "nothing recorded"
    );

    // apply push: the closure is on the host, nothing else changed.
    let (code, pushed, stderr) = h.json(&["apply", "push", "--on", "a"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(status(&pushed, "a"), "succeeded");
    assert!(on_host(&h, "a", &toplevels["a"]).exists());
    assert_eq!(h.fleet.generation("a"), None);
    assert_eq!(h.fleet.current_system("a"), None);
    assert!(h.fleet.activations("a").is_empty());
    assert!(
        !h.fleet.host_dir("a").join("run/keys/k").exists(),
        "push uploads no keys"
    );
    assert!(!on_host(&h, "b", &toplevels["b"]).exists());

    // apply boot HOST --no-keys: the boot default, not running, no keys.
    let (code, booted, stderr) = h.json(&["apply", "boot", "a", "--no-keys"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(status(&booted, "a"), "deployed");
    assert_eq!(h.fleet.generation("a"), Some(1));
    assert_eq!(h.fleet.current_system("a"), None);
    assert_eq!(h.fleet.boots("a"), [toplevels["a"].clone()]);
    assert!(
        !h.fleet.host_dir("a").join("run/keys/k").exists(),
        "--no-keys"
    );

    // apply -p N: switch (the default goal) everywhere, a limit not a
    // strategy; --keep-result roots what it built, as build does.
    let results = h.state_dir().join("results");
    std::fs::remove_dir_all(&results).unwrap();
    let (code, switched, stderr) = h.json(&["apply", "-p", "2", "--keep-result"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(switched["options"]["parallel_limit"], 2);
    assert_eq!(switched["options"]["strategy"], "smart");
    for (name, toplevel) in &toplevels {
        assert_eq!(
            h.fleet.current_system(name).as_deref(),
            Some(toplevel.as_str())
        );
        assert_eq!(
            std::fs::read_link(results.join(name)).unwrap(),
            Path::new(toplevel)
        );
    }
    let key = h.fleet.host_dir("a").join("run/keys/k");
    assert_eq!(std::fs::read_to_string(&key).unwrap(), "apply-keys-secret");
    let generation = h.fleet.generation("a");

    // Logs on stderr (here: not a terminal, as in the journal) carry no
    // ANSI colour codes.
    let out = h.run(&["-v", "plan", "a"]);
    let stderr = stderr_of(&out);
    assert!(stderr.contains("reusing a kept ssh master"), "{stderr}");
    assert!(!stderr.contains('\u{1b}'), "{stderr}");

    // apply keys: the keys again, nothing deployed.
    std::fs::remove_file(&key).unwrap();
    let (code, keys, stderr) = h.json(&["apply", "keys", "--on", "@web"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(keys["kind"], "upload-keys");
    assert_eq!(std::fs::read_to_string(&key).unwrap(), "apply-keys-secret");
    assert_eq!(h.fleet.generation("a"), generation, "nothing deployed");

    // Words where they do not belong: one line that says what to write.
    for (args, expected) in [
        (
            vec!["deploy", "boot"],
            "`boot` is a goal, not a host: use `--goal boot`",
        ),
        (
            vec!["deploy", "--parallel", "20"],
            "write `--parallel-limit 20` (or `-p 20`)",
        ),
        (vec!["deploy", "bb"], "unknown host `bb`; did you mean `b`?"),
        (
            vec!["deploy", "--on", "@wbe"],
            "no host has tag `wbe`; did you mean `@web`?",
        ),
        (vec!["apply", "--on", "@dbb"], "did you mean `@db`?"),
        (vec!["apply", "swtich"], "a similar value exists: 'switch'"),
        (
            vec!["deploy", "--paralel-limit", "2"],
            "a similar argument exists: '--parallel-limit'",
        ),
        (vec!["aply"], "'apply'"),
    ] {
        let out = h.run(&args);
        let stderr = stderr_of(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        let errors = stderr.lines().filter(|l| l.starts_with("error:")).count();
        assert_eq!(errors, 1, "{args:?}: one error line: {stderr}");
    }
    assert_eq!(
        h.fleet.generation("a"),
        generation,
        "bad input changes nothing"
    );
}

#[test]
fn eval_calls_the_expression_with_nodes_pkgs_and_lib() {
    let mut h = Harness::start(vec![
        HostSpec::new("e1").tags(&["edge"]),
        HostSpec::new("e2"),
    ]);
    let (code, value, stderr) = h.json(&[
        "eval",
        "-E",
        "{ nodes, pkgs, lib, ... }: { names = builtins.attrNames nodes; \
         tags = nodes.e1.config.deployment.tags; inherit pkgs lib; }",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        value,
        serde_json::json!({ "names": ["e1", "e2"], "tags": ["edge"], "pkgs": null, "lib": null })
    );

    // A NixOS-shaped fleet: `pkgs` is the first host's package set, `lib`
    // nixpkgs' own; only what the expression touches is evaluated.
    h.fleet.use_nixos(NixosShape::small()).unwrap();
    let (code, value, stderr) = h.json(&[
        "eval",
        "-E",
        "{ nodes, pkgs, lib, ... }: { host = nodes.e2.config.networking.hostName; \
         release = lib.trivial.release; p0 = pkgs.p0.pname; \
         sorted = lib.sort (a: b: a > b) (builtins.attrNames nodes); }",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(value["host"], "e2");
    assert_eq!(value["p0"], "p0");
    assert_eq!(value["sorted"], serde_json::json!(["e2", "e1"]));
    assert!(
        value["release"].as_str().is_some_and(|r| r.contains('.')),
        "{value}"
    );

    // A value that is not a function is itself; a broken one is Nix's error.
    let (code, value, _) = h.json(&["eval", "-E", "1 + 1"]);
    assert_eq!((code, value), (0, serde_json::json!(2)));
    let out = h.run(&["eval", "-E", "{ nodes, ... }: nodes.nope"]);
    let stderr = stderr_of(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("the expression did not evaluate"),
        "{stderr}"
    );
    assert!(stderr.contains("nope"), "{stderr}");
}

#[test]
fn nix_flags_reach_nix() {
    // A package no earlier run built: the system must really be built.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let h = Harness::start(vec![
        HostSpec::new("n1").package(&format!("fresh{nanos}-1")),
    ]);
    // Pure by default; --impure lets the evaluation read the environment.
    let env_of = |args: &[&str]| {
        let out = h.run_with_env(args, &[("ND_TEST_VALUE", "from-env")]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let read_env = r#"{ nodes, ... }: builtins.getEnv "ND_TEST_VALUE""#;
    assert_eq!(env_of(&["eval", "-E", read_env]), r#""""#);
    assert_eq!(
        env_of(&["--impure", "eval", "-E", read_env]),
        r#""from-env""#
    );

    // --show-trace: Nix's trace of where an error comes from.
    let broken = "{ nodes, ... }: builtins.map (x: x.nope) [ { } ]";
    let plain = stderr_of(&h.run(&["eval", "-E", broken]));
    let traced = stderr_of(&h.run(&["--show-trace", "eval", "-E", broken]));
    assert!(!plain.contains("while evaluating"), "{plain}");
    assert!(traced.contains("while evaluating"), "{traced}");

    // --nix-option: checked against this Nix, then passed to every command:
    // builds too (no build may run with max-jobs 0 and no builders).
    let out = h.run(&["--nix-option", "max-jbos", "0", "plan"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr_of(&out).contains("did you mean `max-jobs`"),
        "{}",
        stderr_of(&out)
    );
    let out = h.run(&["--nix-option", "max-jobs", "0", "build"]);
    let stderr = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("max-jobs"), "{stderr}");
    let out = h.run(&["--nix-option", "max-jobs", "1", "build"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
}

/// The findings of `doctor --json` about `host` (or this machine: `None`).
fn findings<'a>(report: &'a serde_json::Value, host: Option<&str>) -> Vec<&'a serde_json::Value> {
    report["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .filter(|f| f["host"].as_str() == host)
        .collect()
}

fn verdict(report: &serde_json::Value, host: &str, check: &str) -> (String, String) {
    let found = findings(report, Some(host))
        .into_iter()
        .find(|f| f["check"] == check)
        .unwrap_or_else(|| panic!("no {check} finding for {host}: {report:#}"));
    (
        found["verdict"].as_str().unwrap_or_default().to_string(),
        found["fix"].as_str().unwrap_or_default().to_string(),
    )
}

#[test]
fn doctor_reports_broken_hosts_with_their_fix() {
    let mut h = Harness::start(vec![
        HostSpec::new("d1"),
        HostSpec::new("d2").user("deploy"),
        HostSpec::new("d3"),
    ]);
    h.fleet.stop_host("d3").unwrap();

    let (code, report, stderr) = h.json(&["doctor"]);
    assert_eq!(code, 1, "a host is down: {stderr}");
    let local: Vec<&str> = findings(&report, None)
        .iter()
        .map(|f| f["check"].as_str().unwrap())
        .collect();
    assert_eq!(local, ["nix", "flakes", "ssh-keys", "flake"]);
    assert_eq!(findings(&report, None)[0]["verdict"], "ok", "{report:#}");
    assert_eq!(findings(&report, None)[3]["verdict"], "ok", "{report:#}");
    for host in ["d1", "d2"] {
        for check in ["reachable", "privileges", "copy"] {
            assert_eq!(
                verdict(&report, host, check).0,
                "ok",
                "{host} {check}: {report:#}"
            );
        }
    }
    let (down, fix) = verdict(&report, "d3", "reachable");
    assert_eq!(down, "fail");
    assert!(fix.contains("targetHost"), "{fix}");
    assert_eq!(
        verdict(&report, "d3", "privileges").0,
        "warn",
        "not checked"
    );

    // d2's deploy user loses passwordless sudo: that is what doctor says,
    // with the fix; copies still work (they go through its nix-daemon).
    let sudoers = h.fleet.host_dir("d2").join("etc/sudoers");
    std::fs::write(
        &sudoers,
        "root ALL=(ALL:ALL) ALL\ndeploy ALL=(ALL:ALL) ALL\n",
    )
    .unwrap();
    let (code, report, _) = h.json(&["doctor", "d1", "d2"]);
    assert_eq!(code, 1);
    let (sudo, fix) = verdict(&report, "d2", "privileges");
    assert_eq!(sudo, "fail", "{report:#}");
    assert!(fix.contains("NOPASSWD"), "{fix}");
    assert_eq!(verdict(&report, "d2", "copy").0, "ok");
    assert!(
        findings(&report, Some("d3")).is_empty(),
        "only the selection"
    );

    // The human form: each failure with its fix; exit 0 when nothing fails.
    let out = h.run(&["doctor", "d2"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("d2 privileges (FAIL): let deploy use sudo"),
        "{text}"
    );
    let (code, report, _) = h.json(&["doctor", "d1"]);
    assert_eq!(code, 0, "{report:#}");
}

#[test]
fn plan_revision_plans_the_commit_deploy_revision_deploys() {
    let mut h = Harness::start(vec![HostSpec::new("r1")]);
    let dir = h.fleet.dir().join("flake");
    git(&dir, &["init", "-q", "-b", "main"]);
    git(&dir, &["add", "-A"]);
    git(&dir, &["commit", "-q", "-m", "one"]);
    let first = git(&dir, &["rev-parse", "HEAD"]);
    let first_path = h.fleet.toplevel("r1").unwrap();
    h.fleet.update("r1", |s| s.bump()).unwrap();
    git(&dir, &["commit", "-q", "-a", "-m", "two"]);
    // The fleet's flake as a git repository, at its tip unless pinned.
    let run = |args: &[&str]| {
        let mut cmd = std::process::Command::new(crate::helpers::binary());
        cmd.arg("--flake")
            .arg(format!("git+file://{}", dir.display()))
            .arg("--ssh-config")
            .arg(h.fleet.ssh_config())
            .arg("--state-dir")
            .arg(h.state_dir())
            .arg("--json")
            .args(args)
            .envs(h.fleet.env());
        let out = cmd.output().unwrap();
        let json = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        (out.status.code(), json, stderr_of(&out))
    };
    let (code, plan, stderr) = run(&["plan", "--no-build", "--revision", &first]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(plan["hosts"][0]["target_path"], first_path.as_str());
    let (code, _, stderr) = run(&["plan", "--no-build"]);
    assert_eq!(code, Some(0), "{stderr}");
    let (code, _, stderr) = run(&["deploy", "--revision", &first]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(h.fleet.current_system("r1"), Some(first_path));
    let (_, plan, _) = run(&["plan", "--no-build", "--revision", &first]);
    assert_eq!(plan["skipped"], serde_json::json!(["r1"]));
    let (_, plan, _) = run(&["plan", "--no-build"]);
    assert_eq!(
        plan["to_deploy"],
        serde_json::json!(["r1"]),
        "the tip changed"
    );
    let (code, _, stderr) = run(&["plan", "--revision", "main"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--revision"), "{stderr}");
}
