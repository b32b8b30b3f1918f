//! The import rules of `ARCHITECTURE.md`, checked: a layering mistake fails
//! a test instead of waiting for a review. (The compiler already keeps the
//! core free of IO crates it does not depend on, and clippy's
//! `disallowed-methods` keeps process spawning in `process`.)

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `.rs` file below `dir`, with its text.
fn sources(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                out.push((path, text));
            }
        }
    }
    assert!(!out.is_empty(), "no sources below {}", dir.display());
    out
}

/// Lines of code (not comments) in `dir` that mention any of `needles`.
fn offenders(dir: &str, needles: &[&str]) -> Vec<String> {
    sources(&root().join(dir))
        .into_iter()
        .flat_map(|(path, text)| {
            text.lines()
                .enumerate()
                .filter(|(_, line)| {
                    let code = line.trim_start();
                    !code.starts_with("//") && needles.iter().any(|n| code.contains(n))
                })
                .map(|(i, line)| format!("{}:{}: {}", path.display(), i + 1, line.trim()))
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn the_daemon_never_imports_the_cli() {
    let found = offenders("src/daemon", &["crate::cli", "super::cli", "cli::"]);
    assert!(found.is_empty(), "{found:#?}");
}

#[test]
fn lower_layers_never_import_higher_ones() {
    for (layer, higher) in [
        (
            "src/transport",
            &[
                "crate::engine",
                "crate::store",
                "crate::daemon",
                "crate::cli",
            ][..],
        ),
        (
            "src/store",
            &[
                "crate::engine",
                "crate::daemon",
                "crate::cli",
                "crate::transport",
            ][..],
        ),
        ("src/engine", &["crate::daemon", "crate::cli"][..]),
    ] {
        let found = offenders(layer, higher);
        assert!(found.is_empty(), "{layer}: {found:#?}");
    }
}

#[test]
fn the_core_does_no_io() {
    // Its manifest names no runtime, database, HTTP or SSH crate...
    let manifest = std::fs::read_to_string(root().join("crates/core/Cargo.toml")).unwrap();
    let dependencies = manifest
        .split("[dependencies]")
        .nth(1)
        .and_then(|rest| rest.split("\n[").next())
        .unwrap_or_default();
    for io in [
        "tokio",
        "sqlx",
        "reqwest",
        "openssh",
        "axum",
        "hyper",
        "libc",
        "nix-deploy",
    ] {
        assert!(
            !dependencies.lines().any(|l| l.trim_start().starts_with(io)),
            "the core depends on {io}:\n{dependencies}"
        );
    }
    // ...and its code touches no files, sockets, processes or clocks.
    let found = offenders(
        "crates/core/src",
        &[
            "std::fs",
            "std::net",
            "std::process",
            "std::env",
            "SystemTime",
            "Instant::now",
        ],
    );
    assert!(found.is_empty(), "{found:#?}");
}

#[test]
fn only_the_process_module_spawns_processes() {
    let found: Vec<String> = offenders("src", &["Command::new", "process::Command"])
        .into_iter()
        .filter(|line| !line.contains("src/process.rs") && !line.contains("src/layering.rs"))
        .collect();
    assert!(found.is_empty(), "{found:#?}");
}
