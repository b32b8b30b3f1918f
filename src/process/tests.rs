//! Unit tests of [`super`]: real child processes.

use super::*;

#[tokio::test]
async fn drains_both_streams_and_reports_exit() {
    // More than a pipe buffer on stderr before stdout closes: must not deadlock.
    let cmd = Cmd::new("sh").args([
        "-c",
        "i=0; while [ $i -lt 5000 ]; do echo err$i >&2; i=$((i+1)); done; echo out; exit 3",
    ]);
    let mut lines = 0;
    let err = run(&cmd, Duration::from_secs(20), |_, _| lines += 1)
        .await
        .unwrap_err();
    assert_eq!(lines, 5001);
    match err {
        ExecError::Exit { stderr_tail, .. } => {
            assert!(stderr_tail.ends_with("err4999"), "{stderr_tail}");
            assert_eq!(stderr_tail.lines().count(), TAIL_LINES);
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn measures_the_peak_memory_of_a_child() {
    // A shell holding ~64 MiB in a variable for a moment.
    let cmd = Cmd::new("sh").args([
        "-c",
        "x=$(head -c 67108864 /dev/zero | tr '\\0' a); sleep 0.2; echo ${#x}",
    ]);
    let out = run_measured(&cmd, Duration::from_secs(30), |_, _| {})
        .await
        .unwrap();
    assert_eq!(out.stdout.trim(), "67108864");
    let peak = out.peak_rss_kib.expect("measured");
    assert!(peak > 64 * 1024, "{peak} KiB");
    let out = run(&cmd, Duration::from_secs(30), |_, _| {}).await.unwrap();
    assert_eq!(out.peak_rss_kib, None);
}

#[tokio::test]
async fn bytes_come_back_exactly() {
    let cmd = Cmd::new("printf").args(["a\\nb\\000c"]);
    let out = run_bytes(&cmd, Duration::from_secs(10), 1024)
        .await
        .unwrap();
    assert_eq!(out, b"a\nb\0c");
    // Stdout never shows up in an error.
    let cmd = Cmd::new("sh").args(["-c", "seq 424240 424242; echo oops >&2; exit 2"]);
    let err = run_bytes(&cmd, Duration::from_secs(10), 1024)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("oops"), "{err}");
    assert!(!err.to_string().contains("424241"), "{err}");
}

#[tokio::test]
async fn output_comes_back_whatever_the_status_with_the_input_on_stdin() {
    let cmd = Cmd::new("sh").args(["-c", "cat; echo err >&2; exit 3"]);
    let out = run_output(&cmd, b"hello", Duration::from_secs(10), 1024)
        .await
        .unwrap();
    assert_eq!(out.stdout, b"hello");
    assert_eq!(out.stderr, b"err\n");
    assert_eq!(out.status.code(), Some(3));
    // A command that does not read its input is judged by its exit code.
    let cmd = Cmd::new("true");
    let big = vec![b'x'; 1024 * 1024];
    let out = run_output(&cmd, &big, Duration::from_secs(10), 1024)
        .await
        .unwrap();
    assert!(out.status.success());
    // Either stream past the limit stops the child.
    let cmd = Cmd::new("sh").args(["-c", "head -c 2000 /dev/zero >&2; sleep 100"]);
    let err = run_output(&cmd, &[], Duration::from_secs(30), 1000)
        .await
        .unwrap_err();
    assert!(
        matches!(err, ExecError::TooLarge { limit: 1000, .. }),
        "{err}"
    );
}

/// Whether `pid` is gone (or a zombie: dead, not yet reaped by its new
/// parent), waiting up to 10 s for the kill to land.
async fn gone(pid: u32) -> bool {
    for _ in 0..200 {
        match std::fs::read(format!("/proc/{pid}/cmdline")) {
            Ok(cmdline) if !cmdline.is_empty() => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            _ => return true,
        }
    }
    false
}

/// `sh` that starts `sleep 1000` in the background, writes its pid to a
/// file, then runs `then`.
fn with_background_child(dir: &std::path::Path, then: &str) -> (Cmd, std::path::PathBuf) {
    let pidfile = dir.join("pid");
    let script = format!("sleep 1000 & echo $! > {}; {then}", pidfile.display());
    (Cmd::new("sh").args(["-c", &script]), pidfile)
}

/// The process whose pid `file` holds is gone.
async fn assert_gone(file: &std::path::Path) {
    let pid = std::fs::read_to_string(file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(gone(pid).await, "the background child {pid} survived");
}

#[tokio::test]
async fn a_timeout_kills_everything_the_child_started() {
    let dir = tempfile::tempdir().unwrap();
    let (cmd, pidfile) = with_background_child(dir.path(), "wait");
    let err = run(&cmd, Duration::from_secs(1), |_, _| {})
        .await
        .unwrap_err();
    assert!(matches!(err, ExecError::Timeout { .. }), "{err}");
    assert_gone(&pidfile).await;

    let (cmd, pidfile) = with_background_child(dir.path(), "echo out; wait");
    let err = run_bytes(&cmd, Duration::from_secs(1), 1024)
        .await
        .unwrap_err();
    assert!(matches!(err, ExecError::Timeout { .. }), "{err}");
    assert_gone(&pidfile).await;
}

#[tokio::test]
async fn giving_up_on_a_child_kills_everything_it_started() {
    let dir = tempfile::tempdir().unwrap();
    let (cmd, pidfile) = with_background_child(dir.path(), "wait");
    let waiting = run(&cmd, Duration::from_secs(600), |_, _| {});
    let started = async {
        while !pidfile.exists() || std::fs::read_to_string(&pidfile).unwrap().trim().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::select! {
        _ = waiting => panic!("the child ended by itself"),
        () = started => {}
    }
    // `waiting` was dropped: the caller gave up (cancel, Ctrl-C).
    assert_gone(&pidfile).await;
}

#[tokio::test]
async fn bytes_beyond_the_limit_stop_the_child_and_everything_it_started() {
    let dir = tempfile::tempdir().unwrap();
    let (cmd, pidfile) = with_background_child(dir.path(), "head -c 2000000 /dev/zero; wait");
    let err = run_bytes(&cmd, Duration::from_secs(60), 1024 * 1024)
        .await
        .unwrap_err();
    assert!(
        matches!(err, ExecError::TooLarge { limit: 1048576, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("more than 1048576 bytes"), "{err}");
    assert_gone(&pidfile).await;
    // Exactly the limit is fine; one byte more is not.
    let exactly = Cmd::new("head").args(["-c", "1024", "/dev/zero"]);
    assert_eq!(
        run_bytes(&exactly, Duration::from_secs(10), 1024)
            .await
            .unwrap()
            .len(),
        1024
    );
    let err = run_bytes(&exactly, Duration::from_secs(10), 1023)
        .await
        .unwrap_err();
    assert!(matches!(err, ExecError::TooLarge { .. }), "{err}");
}

#[tokio::test]
async fn times_out() {
    let cmd = Cmd::new("sleep").arg("5");
    let err = run(&cmd, Duration::from_millis(100), |_, _| {})
        .await
        .unwrap_err();
    assert!(matches!(err, ExecError::Timeout { .. }), "{err}");
}

#[tokio::test]
async fn spawn_failure_is_distinct() {
    let cmd = Cmd::new("/nonexistent/program");
    let err = run(&cmd, Duration::from_secs(1), |_, _| {})
        .await
        .unwrap_err();
    assert!(matches!(err, ExecError::Spawn { .. }), "{err}");
}
