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

#[test]
fn the_engine_layers_import_downwards() {
    // commands → fleet → host; `error` and `config` are below all three.
    for (layer, higher) in [
        (
            "src/engine/host",
            &[
                "engine::fleet",
                "engine::commands",
                "super::fleet",
                "super::commands",
                "super::super::fleet",
                "super::super::commands",
            ][..],
        ),
        (
            "src/engine/fleet",
            &[
                "engine::commands",
                "super::commands",
                "super::super::commands",
            ][..],
        ),
    ] {
        let found = offenders(layer, higher);
        assert!(found.is_empty(), "{layer}: {found:#?}");
    }
    for foundation in ["src/engine/error.rs", "src/engine/config.rs"] {
        let text = std::fs::read_to_string(root().join(foundation)).unwrap();
        for higher in ["commands", "fleet", "host"] {
            assert!(
                !text.contains(&format!("engine::{higher}"))
                    && !text.contains(&format!("super::{higher}")),
                "{foundation} imports {higher}"
            );
        }
    }
}

/// Every `impl` in `dir`, as (file, implemented type's name, line).
fn impls(dir: &str) -> Vec<(PathBuf, String, String)> {
    let mut found = Vec::new();
    for (path, text) in sources(&root().join(dir)) {
        for line in text.lines() {
            let code = line.trim_start();
            let Some(rest) = code.strip_prefix("impl") else {
                continue;
            };
            if !(rest.starts_with(' ') || rest.starts_with('<')) || !code.contains('{') {
                continue;
            }
            // `impl<'a> Trait for Type<'a> {` → `Type`.
            let head = rest.split('{').next().unwrap_or_default().trim();
            let head = head.rsplit(" for ").next().unwrap_or(head);
            let head = if head.starts_with('<') {
                head.split_once("> ").map(|(_, t)| t).unwrap_or(head)
            } else {
                head
            };
            let name: String = head
                .trim()
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.push((path.clone(), name, code.to_string()));
            }
        }
    }
    found
}

/// No `impl T` outside `T`'s module: a reader looking for a method finds it
/// next to its type.
#[test]
fn every_impl_is_next_to_its_type() {
    let sources = sources(&root().join("src"));
    let defined_in = |name: &str| -> Vec<&PathBuf> {
        sources
            .iter()
            .filter(|(_, text)| {
                text.lines().any(|l| {
                    let l = l.trim_start();
                    let l = l
                        .strip_prefix("pub(crate) ")
                        .or_else(|| l.strip_prefix("pub(super) "))
                        .or_else(|| l.strip_prefix("pub "))
                        .unwrap_or(l);
                    ["struct ", "enum ", "trait ", "type "].iter().any(|kind| {
                        l.strip_prefix(kind).is_some_and(|r| {
                            r.starts_with(name)
                                && !r[name.len()..]
                                    .starts_with(|c: char| c.is_alphanumeric() || c == '_')
                        })
                    })
                })
            })
            .map(|(path, _)| path)
            .collect()
    };
    let mut misplaced = Vec::new();
    for (path, name, line) in impls("src") {
        let homes = defined_in(&name);
        // Types of other crates (`impl From<X> for Y` is checked by Y).
        if homes.is_empty() {
            continue;
        }
        // A type's module is the file defining it and that module's
        // submodules (`x/mod.rs`: all of `x/`; `x/y.rs`: `x/y/`).
        let inside = |home: &&PathBuf| {
            let module = if home.ends_with("mod.rs") {
                home.parent().map(Path::to_path_buf)
            } else {
                Some(home.with_extension(""))
            };
            **home == path || module.is_some_and(|m| path.starts_with(m))
        };
        if !homes.iter().any(inside) {
            misplaced.push(format!("{}: {line} (defined in {homes:?})", path.display()));
        }
    }
    assert!(misplaced.is_empty(), "{misplaced:#?}");
}

#[test]
fn only_commands_implement_the_engine() {
    let outside: Vec<String> = impls("src")
        .into_iter()
        .filter(|(path, name, _)| {
            name == "Engine" && !path.starts_with(root().join("src/engine/commands"))
        })
        .map(|(path, _, line)| format!("{}: {line}", path.display()))
        .collect();
    assert!(outside.is_empty(), "{outside:#?}");
}
