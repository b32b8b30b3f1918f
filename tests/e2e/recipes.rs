//! The justfile's recipes: every argument reaches nix-deploy as one argument
//! (spaces, quotes and `$(...)` included, nothing run by a shell), inside
//! this checkout they run the binary built here, copied elsewhere the
//! `nix-deploy` on PATH. A stand-in `nix-deploy` records its arguments.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// `just`: on PATH, or where `./just` installs it.
fn just() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("just"))
        .find(|p| p.is_file());
    let installed = std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo/bin/just"));
    on_path
        .or(installed.filter(|p| p.is_file()))
        .expect("`just` is not installed: `./just test` installs it (cargo install just)")
}

fn repository() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A stand-in for nix-deploy that writes its arguments, NUL-terminated, to
/// `$ARGV_FILE`.
fn recorder(dir: &Path) -> PathBuf {
    let path = dir.join("nix-deploy");
    std::fs::write(
        &path,
        "#!/bin/sh\nfor a in \"$@\"; do printf '%s\\0' \"$a\"; done > \"$ARGV_FILE\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

struct Recipes {
    dir: tempfile::TempDir,
    bin: PathBuf,
}

impl Recipes {
    fn new() -> Recipes {
        let dir = tempfile::tempdir().unwrap();
        let bin = recorder(dir.path());
        Recipes { dir, bin }
    }

    fn argv_file(&self) -> PathBuf {
        self.dir.path().join("argv")
    }

    /// Run `just --justfile JUSTFILE ARGS` (with NIX_DEPLOY_BIN when
    /// `bin_env`, else with the recorder first on PATH); the arguments
    /// nix-deploy got.
    fn run(&self, justfile: &Path, args: &[&str], bin_env: bool) -> Vec<String> {
        let _ = std::fs::remove_file(self.argv_file());
        let mut cmd = Command::new(just());
        cmd.arg("--justfile")
            .arg(justfile)
            .args(args)
            .env("ARGV_FILE", self.argv_file())
            .env_remove("NIX_DEPLOY_BIN")
            .current_dir(self.dir.path());
        if bin_env {
            cmd.env("NIX_DEPLOY_BIN", &self.bin);
        } else {
            let path = std::env::var_os("PATH").unwrap_or_default();
            let mut dirs = vec![self.dir.path().to_path_buf()];
            dirs.extend(std::env::split_paths(&path));
            cmd.env("PATH", std::env::join_paths(dirs).unwrap());
        }
        let out = cmd.output().expect("running just");
        assert!(
            out.status.success(),
            "just {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let recorded = std::fs::read(self.argv_file()).expect("nix-deploy was run");
        recorded
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect()
    }
}

#[test]
fn every_recipe_argument_arrives_as_one_argument() {
    let r = Recipes::new();
    let justfile = repository().join("justfile");
    let canary = r.dir.path().join("canary");
    let tricky = format!(
        "web 1 \"double\" 'single' $(touch {}) `touch {}`; touch {}",
        canary.display(),
        canary.display(),
        canary.display()
    );

    assert_eq!(
        r.run(
            &justfile,
            &["quick-deploy", &tricky, "--goal", "boot"],
            true
        ),
        ["deploy", tricky.as_str(), "--goal", "boot"]
    );
    assert_eq!(
        r.run(&justfile, &["deploy-all", &tricky], true),
        ["deploy", "--all", tricky.as_str()]
    );
    assert_eq!(
        r.run(&justfile, &["emergency-deploy", &tricky, "-v"], true),
        [
            "deploy",
            tricky.as_str(),
            "--force",
            "--skip-validation",
            "-v"
        ]
    );
    assert_eq!(
        r.run(
            &justfile,
            &["fleet-exec", "@db,mon", "sh", "-c", "df -h / | tail -n 1"],
            true
        ),
        [
            "exec",
            "--on",
            "@db,mon",
            "--",
            "sh",
            "-c",
            "df -h / | tail -n 1"
        ]
    );
    assert_eq!(
        r.run(&justfile, &["deployment-history"], true),
        ["history", "--limit", "20"]
    );
    assert_eq!(
        r.run(&justfile, &["serve", &tricky], true),
        ["serve", "--config", tricky.as_str()]
    );
    assert!(!canary.exists(), "a shell ran part of an argument");
}

#[test]
fn recipes_use_nix_deploy_from_path_outside_this_checkout() {
    let r = Recipes::new();
    // Inside the checkout: the binary built here.
    let out = Command::new(just())
        .arg("--justfile")
        .arg(repository().join("justfile"))
        .args(["--evaluate", "NIX_DEPLOY_BIN"])
        .env_remove("NIX_DEPLOY_BIN")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        repository()
            .join("target/release/nix-deploy")
            .display()
            .to_string()
    );

    // Copied into a fleet's repository: nix-deploy from PATH.
    let fleet = tempfile::tempdir().unwrap();
    let copied = fleet.path().join("justfile");
    std::fs::copy(repository().join("justfile"), &copied).unwrap();
    assert_eq!(r.run(&copied, &["plan", "web 1"], false), ["plan", "web 1"]);
    assert_eq!(
        r.run(
            &copied,
            &["rollback", "web1", "--to-generation", "3"],
            false
        ),
        ["rollback", "web1", "--to-generation", "3"]
    );

    // The recipe that rolls hosts back says so in its name.
    let out = Command::new(just())
        .arg("--justfile")
        .arg(&copied)
        .arg("--summary")
        .output()
        .unwrap();
    let recipes: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect();
    assert!(recipes.iter().any(|r| r == "rollback"), "{recipes:?}");
    assert!(
        !recipes.iter().any(|r| r.starts_with("test-")),
        "{recipes:?}"
    );
}
