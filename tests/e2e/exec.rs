//! `nix-deploy exec`: one command on many real test hosts, one summary, the
//! run in the history; a host that fails, one that does not answer, argv
//! that never meets a shell, and bad input.

use std::time::{Duration, Instant};

use nix_deploy_testkit::{HostSpec, wait_with_peak_rss};
use serde_json::Value;

use crate::helpers::{Harness, host, status};

/// Says hello from the host it runs on, and fails on `e3`.
const SCRIPT: &str = r#"h=$(cat /run/testkit-host); echo "booting $h"; echo "hello from $h"; if [ "$h" = e3 ]; then echo "e3 is broken" >&2; exit 3; fi"#;

fn six() -> Vec<HostSpec> {
    (1..=6)
        .map(|i| HostSpec::new(&format!("e{i}")).tags(&["exec"]))
        .collect()
}

#[test]
fn exec_on_six_hosts_reports_each_one_while_a_frozen_host_times_out() {
    let h = Harness::start(six());
    // e6 hangs like a dead machine: it accepts TCP, nothing answers.
    h.fleet.freeze_host("e6").unwrap();
    let started = Instant::now();
    let (code, report, stderr) = h.json(&["exec", "--all", "--", "sh", "-c", SCRIPT]);
    let took = started.elapsed();
    assert_eq!(code, 1, "{report:#}\n{stderr}");
    assert_eq!(report["kind"], "exec");
    assert_eq!(report["status"], "failed");
    assert_eq!(
        report["exec"]["command"],
        serde_json::json!(["sh", "-c", SCRIPT])
    );
    for name in ["e1", "e2", "e4", "e5"] {
        assert_eq!(status(&report, name), "succeeded", "{report:#}");
        let run = host(&report, name);
        assert_eq!(run["output"]["exit_code"], 0);
        assert_eq!(
            run["output"]["stdout"],
            format!("booting {name}\nhello from {name}")
        );
        // The others finished long before the frozen host gave up.
        assert!(run["duration_ms"].as_i64().unwrap() < 5_000, "{run:#}");
    }
    let e3 = host(&report, "e3");
    assert_eq!(status(&report, "e3"), "failed");
    assert_eq!(e3["output"]["exit_code"], 3);
    assert_eq!(e3["output"]["stderr"], "e3 is broken");
    assert!(
        e3["error"].as_str().unwrap().contains("exited with code 3"),
        "{e3:#}"
    );
    let e6 = host(&report, "e6");
    assert_eq!(status(&report, "e6"), "unreachable", "{e6:#}");
    assert!(e6["output"].is_null());
    assert!(e6["error"].as_str().unwrap().contains("e6"), "{e6:#}");
    assert!(took < Duration::from_secs(40), "took {took:?}");
    // Live progress went to stderr, host by host.
    assert!(stderr.contains("e3:"), "{stderr}");
    h.fleet.thaw_host("e6").unwrap();

    // Stored before it was reported: the history has the run, its command,
    // who ran it, every host's result and output tails.
    let id = report["id"].as_i64().unwrap();
    let (code, shown, _) = h.json(&["show", &id.to_string()]);
    assert_eq!(code, 0);
    assert_eq!(shown["kind"], "exec");
    assert_eq!(shown["trigger"], "cli");
    assert!(!shown["requested_by"].as_str().unwrap().is_empty());
    assert_eq!(shown["hosts"], report["hosts"]);
    let events: Vec<&str> = shown["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(events.first(), Some(&"deployment-started"));
    assert_eq!(events.last(), Some(&"deployment-finished"));
    assert_eq!(events.iter().filter(|k| **k == "host-finished").count(), 6);
    let (_, history, _) = h.json(&["history"]);
    assert_eq!(history["deployments"][0]["id"], id);
    assert_eq!(history["deployments"][0]["kind"], "exec");
    // An exec is not a deployment: the hosts' last known state is untouched.
    let (_, fleet_status, _) = h.json(&["status"]);
    assert!(
        fleet_status["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .all(|x| x["last_status"].is_null()),
        "{fleet_status:#}"
    );
}

#[test]
fn exec_prints_one_summary_table_and_history_names_the_command() {
    let mut h = Harness::start(six());
    h.fleet.stop_host("e6").unwrap();
    let out = h.run(&["exec", "--on", "@exec", "--", "sh", "-c", SCRIPT]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let row = |name: &str| {
        stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no row for {name}:\n{stdout}"))
            .to_string()
    };
    assert!(stdout.contains("HOST"), "{stdout}");
    assert!(stdout.contains("EXIT"), "{stdout}");
    assert!(stdout.contains("OUTPUT"), "{stdout}");
    let e1 = row("e1");
    assert!(
        e1.contains("succeeded") && e1.contains("hello from e1"),
        "{e1}"
    );
    assert!(e1.contains(" 0 "), "{e1}");
    let e3 = row("e3");
    assert!(e3.contains("failed") && e3.contains(" 3 "), "{e3}");
    assert!(
        e3.contains("e3 is broken"),
        "a failure shows its stderr: {e3}"
    );
    // The failure in full: stderr's tail.
    assert!(stdout.contains("── e3 (failed) ──"), "{stdout}");
    assert!(stdout.contains("e3 is broken"), "{stdout}");
    assert!(row("e6").contains("unreachable"), "{stdout}");
    assert!(
        stdout.contains("4 succeeded, 1 failed, 1 unreachable"),
        "{stdout}"
    );

    let out = h.run(&["history"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("exec: sh -c"), "{text}");
    assert!(text.contains("4 succeeded"), "{text}");

    // Everything fine everywhere: exit 0.
    h.fleet.start_host("e6").unwrap();
    let (code, report, stderr) = h.json(&["exec", "--all", "--parallel-limit", "2", "--", "true"]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    assert_eq!(report["status"], "succeeded");
    assert_eq!(report["exec"]["parallel_limit"], 2);
}

#[test]
fn exec_passes_argv_without_a_shell_and_bounds_each_command() {
    let h = Harness::start(vec![HostSpec::new("x1")]);
    // Every word arrives as one argument: no expansion, no command chaining.
    let (code, report, stderr) = h.json(&[
        "exec",
        "x1",
        "--",
        "echo",
        "$(touch /run/pwned)",
        ";",
        "touch",
        "/run/pwned2",
        "'quoted'",
    ]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    assert_eq!(
        host(&report, "x1")["output"]["stdout"],
        "$(touch /run/pwned) ; touch /run/pwned2 'quoted'"
    );
    assert!(!h.fleet.host_dir("x1").join("run/pwned").exists());
    assert!(!h.fleet.host_dir("x1").join("run/pwned2").exists());

    // `FOO=bar` is a program name like any other, never a shell assignment:
    // there is no such command.
    let (code, report, stderr) = h.json(&["exec", "x1", "--", "FOO=bar", "true"]);
    assert_eq!(code, 1, "{report:#}\n{stderr}");
    let x1 = host(&report, "x1");
    assert_eq!(status(&report, "x1"), "failed");
    let error = x1["error"].as_str().unwrap();
    assert!(
        error.contains("not found") && error.contains("FOO=bar"),
        "{x1:#}"
    );
    // Braces, commas, `%`, `~`, `#` and non-ASCII arrive as written.
    let words = [
        "FOO=bar", "{a,b}", "%1", "~root", "#x", "héllo", "a\u{a0}b", "*",
    ];
    let mut args = vec!["exec", "x1", "--", "printf", "%s|"];
    args.extend(words);
    let (code, report, stderr) = h.json(&args);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    assert_eq!(
        host(&report, "x1")["output"]["stdout"],
        format!("{}|", words.join("|")),
        "{report:#}"
    );

    // A command that runs past its timeout fails, with what it printed.
    let (code, report, _) = h.json(&[
        "exec",
        "x1",
        "--timeout",
        "1s",
        "--",
        "sh",
        "-c",
        "echo started; sleep 30",
    ]);
    assert_eq!(code, 1);
    let x1 = host(&report, "x1");
    assert_eq!(status(&report, "x1"), "failed");
    assert!(
        x1["error"]
            .as_str()
            .unwrap()
            .contains("did not finish within 1s"),
        "{x1:#}"
    );
    assert_eq!(x1["output"]["stdout"], "started");
    assert!(x1["output"]["exit_code"].is_null());
    // Stopped on the host, not let go.
    h.until(30, "the timed-out command to be gone", || {
        h.running("x1", &["sleep", "30"]) == 0
    });
}

#[test]
fn exec_refuses_bad_input_and_records_nothing() {
    let h = Harness::start(vec![HostSpec::new("b1"), HostSpec::new("b2")]);
    for (args, needle) in [
        (
            vec!["exec", "--on", "web-*", "--", "true"],
            "`web-*` matches no host",
        ),
        (vec!["exec", "b3", "--", "true"], "unknown host `b3`"),
        (
            vec!["exec", "--exclude", "z*", "--", "true"],
            "`z*` matches no host",
        ),
        (
            vec!["exec", "--all", "--exclude", "b*", "--", "true"],
            "no host is left",
        ),
        (
            vec!["exec", "--parallel-limit", "0", "--", "true"],
            "parallel-limit",
        ),
        (vec!["exec", "--timeout", "0", "--", "true"], "at least 1s"),
        (vec!["exec", "b1"], "COMMAND"),
        (
            vec!["exec", "--on", "a;b", "--", "true"],
            "invalid selector",
        ),
    ] {
        let out = h.run(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    let (_, history, _) = h.json(&["history"]);
    assert_eq!(history["deployments"], Value::Array(Vec::new()));
}

#[test]
fn exec_output_without_newlines_keeps_the_coordinators_memory_bounded() {
    let h = Harness::start(vec![HostSpec::new("m1")]);
    // 256 MiB without a single newline, then the end of the line.
    let script = "head -c 268435456 /dev/zero | tr '\\0' a; printf END";
    let child = h.spawn("big", &["exec", "m1", "--", "sh", "-c", script]);
    let (code, peak_kib) = wait_with_peak_rss(child).unwrap();
    eprintln!("peak RSS of the coordinator: {peak_kib} KiB");
    // The coordinator held a few KiB of it, never the line: its peak is
    // what any exec costs, far below the output's size.
    assert!(peak_kib < 128 * 1024, "peak RSS {peak_kib} KiB");
    let (report, _) = h.outputs("big");
    assert_eq!(code, Some(0), "{report:#}");
    let stdout = host(&report, "m1")["output"]["stdout"].as_str().unwrap();
    // The line's beginning and its end are reported, and how long it was.
    assert!(stdout.starts_with("aaaa"), "{stdout}");
    assert!(stdout.ends_with("aaaaEND"), "{stdout}");
    assert!(
        stdout.contains("a line of 268435459 bytes, cut"),
        "{stdout}"
    );
}

#[test]
fn cancel_stops_a_running_exec_on_its_hosts_and_records_them_cancelled() {
    let h = Harness::start(vec![HostSpec::new("c1"), HostSpec::new("c2")]);
    let sleep = ["sleep", "31415"];
    let child = h.spawn(
        "long",
        &[
            "exec",
            "c1",
            "c2",
            "--",
            "sh",
            "-c",
            "sleep 31415; echo never",
        ],
    );
    h.until(30, "the command running on both hosts", || {
        h.running("c1", &sleep) == 1 && h.running("c2", &sleep) == 1
    });
    let out = h.run(&["cancel"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut child = child;
    h.until(60, "the exec to end after cancel", || {
        child.try_wait().unwrap().is_some()
    });
    let (code, report, stderr) = h.wait("long", child);
    assert_eq!(code, 3, "{report:#}\n{stderr}");
    assert_eq!(report["status"], "cancelled", "{report:#}");
    for name in ["c1", "c2"] {
        let run = host(&report, name);
        assert_eq!(status(&report, name), "cancelled", "{run:#}");
        assert!(
            run["reason"]
                .as_str()
                .unwrap()
                .contains("stopped on the host"),
            "{run:#}"
        );
        // Gone from the host: the command and everything it started.
        h.until(30, "the command to be gone", || {
            h.running(name, &sleep) == 0
        });
        assert_eq!(h.running(name, &["sh", "-c", "sleep 31415; echo never"]), 0);
    }
    let (_, shown, _) = h.json(&["show", &report["id"].to_string()]);
    assert_eq!(shown["hosts"], report["hosts"]);
}

#[test]
fn the_history_is_readable_by_its_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let h = Harness::start(vec![HostSpec::new("p1")]);
    // A state directory nix-deploy creates itself.
    let state = h.state_dir().join("fresh");
    let out = h.run_in(
        &state,
        &["exec", "p1", "--", "echo", "exec-output-marker"],
        &[],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mode = |path: &std::path::Path| {
        std::fs::symlink_metadata(path)
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    // Every directory and file below it (the database, its WAL and shared
    // memory, locks, kept masters), not the GC roots' links.
    let loose = |dir: &std::path::Path| {
        let mut loose = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(path) = stack.pop() {
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                stack.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
            }
            if !meta.file_type().is_symlink() && mode(&path) & 0o077 != 0 {
                loose.push(format!("{} {:04o}", path.display(), mode(&path)));
            }
        }
        loose
    };
    assert_eq!(mode(&state), 0o700);
    assert_eq!(loose(&state), Vec::<String>::new());
    assert_eq!(mode(&state.join("nix-deploy.db")), 0o600);

    // A state directory an older version left open to everyone is
    // tightened when it is opened, and the command says so.
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        state.join("nix-deploy.db"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let out = h.run_in(&state, &["history"], &[]);
    assert_eq!(out.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("nix-deploy.db was readable by others (0644); it is now 0600"),
        "{stderr}"
    );
    assert!(
        stderr.contains("fresh was readable by others (0755); it is now 0700"),
        "{stderr}"
    );
    assert_eq!(loose(&state), Vec::<String>::new());
}

#[test]
fn a_hosts_escape_sequences_are_shown_not_obeyed_except_in_json() {
    let h = Harness::start(vec![HostSpec::new("t1")]);
    // Retitle the terminal, clear it, overwrite a line, colour stderr; and
    // an argument that is itself an escape sequence.
    let script =
        r"printf '\033]0;pwned\007\033[2Jtitle\rover\n'; printf '\033[31merr\033[0m\n' >&2; exit 1";
    let args = ["exec", "t1", "--", "sh", "-c", script, "\u{1b}[5mblink"];
    let out = h.run(&args);
    assert_eq!(out.status.code(), Some(1));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    for (name, text) in [("stdout", &stdout), ("stderr", &stderr)] {
        for byte in ['\u{1b}', '\u{7}', '\r'] {
            assert!(!text.contains(byte), "{name} carries {byte:?}:\n{text}");
        }
    }
    // The table, the failure's output and the command are shown escaped.
    assert!(
        stdout.contains(r"\u{1b}]0;pwned\u{7}\u{1b}[2Jtitle\rover"),
        "{stdout}"
    );
    assert!(stdout.contains(r"\u{1b}[31merr\u{1b}[0m"), "{stdout}");
    assert!(stdout.contains(r"\u{1b}[5mblink"), "{stdout}");
    assert!(stderr.contains(r"\u{1b}[5mblink"), "{stderr}");
    // `--json` keeps every byte as the host printed it.
    let (code, report, _) = h.json(&args);
    assert_eq!(code, 1);
    let t1 = host(&report, "t1");
    assert_eq!(
        t1["output"]["stdout"],
        "\u{1b}]0;pwned\u{7}\u{1b}[2Jtitle\rover"
    );
    assert_eq!(t1["output"]["stderr"], "\u{1b}[31merr\u{1b}[0m");
    assert_eq!(report["exec"]["command"][3], "\u{1b}[5mblink");
}
