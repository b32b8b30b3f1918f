//! The local Nix commands, as pure builders and parsers: one evaluation of the
//! whole fleet (for comparison; the engine evaluates in shards, [`crate::eval`]), builds, closures, copies. Nix 2.8 (Debian's `nix-bin`) must
//! work, so the experimental features are passed here and no flag newer than
//! 2.8 is used (`--json` instead of `--print-out-paths`).

use serde::Deserialize;

use crate::command::Cmd;
use crate::source::FleetSource;

/// Flags every `nix` invocation gets: flakes without touching the user's config.
pub const FEATURE_FLAGS: [&str; 2] = ["--extra-experimental-features", "nix-command flakes"];

/// What the user adds to every local Nix invocation: `--show-trace`,
/// `--impure` (evaluations and builds only) and `--option NAME VALUE`
/// (`--nix-option` on our command line).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NixFlags {
    pub show_trace: bool,
    pub impure: bool,
    /// Settings, in the order given.
    pub options: Vec<(String, String)>,
}

/// Settings nix-deploy decides itself: set through `--nix-option`, they
/// would silently change what nix-deploy relies on.
const RESERVED_SETTINGS: [&str; 2] = ["experimental-features", "extra-experimental-features"];

impl NixFlags {
    /// Names and values as Nix settings are written: a name of letters,
    /// digits and `-` (as `nix show-config` lists them), a value of one line.
    pub fn check(&self) -> Result<(), String> {
        for (name, value) in &self.options {
            let well_formed = !name.is_empty()
                && name.len() <= 100
                && !name.starts_with('-')
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
            if !well_formed {
                return Err(format!(
                    "--nix-option `{name}`: not a Nix setting name (letters, digits and `-`, e.g. `eval-cache`)"
                ));
            }
            if RESERVED_SETTINGS.contains(&name.as_str()) {
                return Err(format!(
                    "--nix-option {name}: nix-deploy enables the features it needs itself; set it in nix.conf instead"
                ));
            }
            if value.chars().any(char::is_control) {
                return Err(format!(
                    "--nix-option {name}: the value must be one line without control characters"
                ));
            }
        }
        Ok(())
    }

    /// Refuse a setting this Nix does not know (it would only warn, and the
    /// option would do nothing), given `nix show-config --json`.
    pub fn check_known(&self, show_config_json: &str) -> Result<(), String> {
        if self.options.is_empty() {
            return Ok(());
        }
        let settings: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(show_config_json)
                .map_err(|e| format!("unexpected `nix show-config --json` output: {e}"))?;
        let mut known: Vec<String> = Vec::new();
        for (name, setting) in &settings {
            known.push(name.clone());
            known.push(format!("extra-{name}"));
            if let Some(aliases) = setting.get("aliases").and_then(|a| a.as_array()) {
                known.extend(
                    aliases
                        .iter()
                        .filter_map(|a| a.as_str())
                        .map(str::to_string),
                );
            }
        }
        for (name, _) in &self.options {
            if !known.contains(name) {
                return Err(format!(
                    "--nix-option {name}: this Nix has no such setting{} (`nix show-config` lists them)",
                    crate::suggest::did_you_mean(name, &known, "")
                ));
            }
        }
        Ok(())
    }

    /// For commands that only read or copy store paths (`nix-store`, `nix copy`,
    /// `nix flake metadata`).
    pub fn store_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if self.show_trace {
            args.push("--show-trace".to_string());
        }
        for (name, value) in &self.options {
            args.extend(["--option".to_string(), name.clone(), value.clone()]);
        }
        args
    }

    /// For evaluations and builds: [`NixFlags::store_args`] and `--impure`.
    pub fn eval_args(&self) -> Vec<String> {
        let mut args = self.store_args();
        if self.impure {
            args.push("--impure".to_string());
        }
        args
    }

    /// What of these flags can change an evaluation's result (everything but
    /// `--show-trace`), for cache keys: empty without such flags.
    pub fn evaluation_tag(&self) -> String {
        let flags = NixFlags {
            show_trace: false,
            ..self.clone()
        };
        crate::shell::join(&flags.eval_args())
    }
}

/// `nix show-config --json`: every setting this Nix knows (Nix 2.8 has no
/// `nix config show`).
pub fn show_config_command() -> Cmd {
    Cmd::new("nix")
        .args(FEATURE_FLAGS)
        .args(["show-config", "--json"])
}

/// `nix copy --from ssh://[user@]source --no-check-sigs PATH`: a closure
/// from a host's store into the coordinator's (a promotion's source host:
/// trusted as the coordinator trusts the hosts it deploys, whose stores it
/// writes unsigned paths into).
pub fn copy_from_command(source_uri: &str, path: &str, ssh_opts: &str) -> Cmd {
    Cmd::new("nix")
        .args(FEATURE_FLAGS)
        .args(["copy", "--from", source_uri, "--no-check-sigs"])
        .arg(path)
        .env("NIX_SSHOPTS", ssh_opts)
}

/// Reject flake references we cannot append `#nixosConfigurations` to.
pub fn check_flake_ref(flake: &str) -> Result<(), &'static str> {
    let bad = Err;
    if flake.is_empty() {
        return bad("it is empty");
    }
    if flake.contains('#') {
        return bad(
            "give the flake without a `#` attribute; nix-deploy reads `#nixosConfigurations` itself",
        );
    }
    if flake.starts_with('-') {
        return bad("it starts with `-`");
    }
    if flake.chars().any(char::is_control) {
        return bad("it contains control characters");
    }
    Ok(())
}

/// The whole fleet of `nixosConfigurations` in one evaluation, every host
/// with its system (as [`crate::source::host_expr`] reads one): the
/// baseline the benchmarks compare sharded evaluation with.
pub fn eval_command(flake: &str) -> Cmd {
    let apply = format!(
        "output: let host = {}; in builtins.mapAttrs (name: configuration: host name configuration true) output",
        crate::source::host_expr(FleetSource::Nixos)
    );
    Cmd::new("nix")
        .args(FEATURE_FLAGS)
        .args(["eval", "--json"])
        .arg(format!("{flake}#nixosConfigurations"))
        .args(["--apply", &apply])
}

pub fn metadata_command(flake: &str) -> Cmd {
    Cmd::new("nix")
        .args(FEATURE_FLAGS)
        .args(["flake", "metadata", "--json"])
        .arg(flake)
}

/// `nix build --no-link --json DRV`, with `--builders SPEC` (remote
/// builders: a machines specification or `@FILE`) when given.
pub fn build_command(drv: &str, builders: Option<&str>) -> Cmd {
    let mut cmd = Cmd::new("nix")
        .args(FEATURE_FLAGS)
        .args(["build", "--no-link", "--json"]);
    if let Some(builders) = builders {
        cmd = cmd.args(["--builders", builders]);
    }
    cmd.arg(drv)
}

/// `nix copy --derivation --to ssh://[user@]dest DRV`: the derivation and
/// the derivations and sources it needs, for the host to build.
pub fn copy_derivation_command(destination_uri: &str, drv: &str, ssh_opts: &str) -> Cmd {
    Cmd::new("nix")
        .args(FEATURE_FLAGS)
        .args(["copy", "--derivation", "--to", destination_uri])
        .arg(drv)
        .env("NIX_SSHOPTS", ssh_opts)
}

/// `nix-store --query --requisites PATH`: the closure of a built path.
pub fn closure_command(path: &str) -> Cmd {
    Cmd::new("nix-store")
        .args(["--query", "--requisites"])
        .arg(path)
}

/// `nix copy --to ssh://[user@]dest PATH`, with our ssh options in `NIX_SSHOPTS`.
pub fn copy_command(destination_uri: &str, path: &str, ssh_opts: &str, substitute: bool) -> Cmd {
    let mut cmd = Cmd::new("nix")
        .args(FEATURE_FLAGS)
        .args(["copy", "--to", destination_uri]);
    if substitute {
        cmd = cmd.arg("--substitute-on-destination");
    }
    cmd.arg(path).env("NIX_SSHOPTS", ssh_opts)
}

/// The `text` of every key that has one, for the named hosts only, in one
/// evaluation: `{ HOST = { KEY = TEXT; ... }; ... }`
/// ([`crate::source::key_texts_expr`]). Its output is a secret: the caller
/// turns it into [`crate::keys::Secret`]s at once.
///
/// Host names are validated ([`crate::shell::is_valid_host_name`]: no quote,
/// backslash or `$`), so they can be Nix string literals.
pub fn key_texts_command(
    flake: &str,
    source: FleetSource,
    hosts: &[String],
) -> Result<Cmd, String> {
    if let Some(bad) = hosts.iter().find(|h| !crate::shell::is_valid_host_name(h)) {
        return Err(format!("`{bad}` is not a host name"));
    }
    Ok(Cmd::new("nix")
        .args(FEATURE_FLAGS)
        .args(["eval", "--json"])
        .arg(format!("{flake}#{}", source.output()))
        .arg("--apply")
        .arg(crate::source::key_texts_expr(source, hosts)))
}

/// `doctor`'s copy check: build a tiny input-addressed path (a copy of one
/// needs the destination's trust, as a system's closure does; a
/// content-addressed path would not), unique per `nonce` so that copying it
/// is never a no-op. `--impure` for `builtins.currentSystem`.
pub fn probe_path_command(nonce: u64) -> Cmd {
    let expr = format!(
        r#"derivation {{ name = "nix-deploy-doctor"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo ok > $out" ]; nonce = "{nonce}"; }}"#
    );
    Cmd::new("nix")
        .args(FEATURE_FLAGS)
        .args(["build", "--no-link", "--json", "--impure", "--expr"])
        .arg(expr)
}

/// `nix eval --expr 'builtins ? getFlake'` *without* our feature flags:
/// whether the user's own Nix has `nix-command` and flakes on.
pub fn flakes_probe_command() -> Cmd {
    Cmd::new("nix").args(["eval", "--expr", "builtins ? getFlake"])
}

/// `nix-store --realise PATH --add-root LINK`: make `LINK` (a symlink to an
/// existing store path) a garbage-collector root, registered indirectly in
/// `/nix/var/nix/gcroots/auto`. Nothing is built: `PATH` is already valid.
pub fn add_root_command(path: &str, link: &str) -> Cmd {
    Cmd::new("nix-store").args(["--realise", path, "--add-root", link])
}

#[derive(Deserialize)]
struct BuildResult {
    outputs: std::collections::BTreeMap<String, String>,
}

/// The `out` path from `nix build --json`.
pub fn parse_build_output(json: &str) -> Result<String, String> {
    let results: Vec<BuildResult> =
        serde_json::from_str(json).map_err(|e| format!("not the expected JSON: {e}"))?;
    results
        .into_iter()
        .next()
        .and_then(|mut r| r.outputs.remove("out"))
        .ok_or_else(|| "no `out` output in the build result".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(cmd: &Cmd) -> Vec<String> {
        std::iter::once(cmd.program().to_string())
            .chain(cmd.get_args().map(|a| a.to_string_lossy().into_owned()))
            .collect()
    }

    #[test]
    fn eval_is_one_command_with_features_and_no_new_flags() {
        let cmd = eval_command("path:/srv/fleet");
        let args = argv(&cmd);
        assert_eq!(
            args[..6],
            [
                "nix",
                "--extra-experimental-features",
                "nix-command flakes",
                "eval",
                "--json",
                "path:/srv/fleet#nixosConfigurations"
            ]
        );
        assert_eq!(args[6], "--apply");
        assert!(!args.iter().any(|a| a == "--print-out-paths"));
        assert!(args[7].contains(crate::source::host_expr(FleetSource::Nixos)));
    }

    #[test]
    fn build_and_copy_commands() {
        assert_eq!(
            argv(&build_command("/nix/store/abc-x.drv", None))[3..],
            ["build", "--no-link", "--json", "/nix/store/abc-x.drv"]
        );
        assert_eq!(
            argv(&build_command(
                "/nix/store/abc-x.drv",
                Some("@/etc/nix/machines")
            ))[3..],
            [
                "build",
                "--no-link",
                "--json",
                "--builders",
                "@/etc/nix/machines",
                "/nix/store/abc-x.drv"
            ]
        );
        let drv = copy_derivation_command("ssh://web1", "/nix/store/abc-x.drv", "-p 22");
        assert_eq!(
            argv(&drv)[3..],
            [
                "copy",
                "--derivation",
                "--to",
                "ssh://web1",
                "/nix/store/abc-x.drv"
            ]
        );
        let copy = copy_command(
            "ssh://root@web1",
            "/nix/store/abc-x",
            "-F /etc/ssh_cfg",
            false,
        );
        assert_eq!(
            argv(&copy)[3..],
            ["copy", "--to", "ssh://root@web1", "/nix/store/abc-x"]
        );
        assert_eq!(copy.get_env("NIX_SSHOPTS"), Some("-F /etc/ssh_cfg"));
        assert_eq!(
            argv(&closure_command("/nix/store/abc-x")),
            ["nix-store", "--query", "--requisites", "/nix/store/abc-x"]
        );
        let copy = copy_command("ssh://web1", "/nix/store/abc-x", "", true);
        assert!(argv(&copy).contains(&"--substitute-on-destination".to_string()));
        let fetch = copy_from_command(
            "ssh://root@staging1",
            "/nix/store/abc-x",
            "-o BatchMode=yes",
        );
        assert_eq!(
            argv(&fetch)[3..],
            [
                "copy",
                "--from",
                "ssh://root@staging1",
                "--no-check-sigs",
                "/nix/store/abc-x"
            ]
        );
    }

    #[test]
    fn key_texts_are_read_for_the_named_hosts_only() {
        let cmd = key_texts_command(
            "path:/srv/fleet",
            FleetSource::Nixos,
            &["web1".into(), "db-2".into()],
        )
        .unwrap();
        let args = argv(&cmd);
        assert_eq!(
            args[3..6],
            ["eval", "--json", "path:/srv/fleet#nixosConfigurations"]
        );
        assert!(args[7].ends_with(r#"[ "web1" "db-2" ])"#), "{}", args[7]);
        assert!(key_texts_command(".", FleetSource::Nixos, &["a\"b".into()]).is_err());
        assert_eq!(
            argv(&add_root_command(
                "/nix/store/abc-x",
                "/var/lib/nd/gcroots/web1/abc-x"
            )),
            [
                "nix-store",
                "--realise",
                "/nix/store/abc-x",
                "--add-root",
                "/var/lib/nd/gcroots/web1/abc-x"
            ]
        );
    }

    #[test]
    fn parses_build_json() {
        let json = r#"[{"drvPath":"/nix/store/c7-h1.drv","outputs":{"out":"/nix/store/q4-h1"}}]"#;
        assert_eq!(parse_build_output(json).unwrap(), "/nix/store/q4-h1");
        assert!(parse_build_output("[]").is_err());
        assert!(parse_build_output("nope").is_err());
    }

    #[test]
    fn nix_flags_are_checked_and_placed() {
        let flags = NixFlags {
            show_trace: true,
            impure: true,
            options: vec![("eval-cache".into(), "false".into())],
        };
        assert!(flags.check().is_ok());
        assert_eq!(
            flags.store_args(),
            ["--show-trace", "--option", "eval-cache", "false"]
        );
        assert_eq!(flags.eval_args().last().unwrap(), "--impure");
        assert_eq!(flags.evaluation_tag(), "--option eval-cache false --impure");
        assert_eq!(NixFlags::default().evaluation_tag(), "");
        let traced = NixFlags {
            show_trace: true,
            ..NixFlags::default()
        };
        assert_eq!(traced.evaluation_tag(), "", "a trace changes no result");

        let bad = |name: &str, value: &str| {
            NixFlags {
                options: vec![(name.into(), value.into())],
                ..NixFlags::default()
            }
            .check()
            .unwrap_err()
        };
        assert!(bad("--impure", "x").contains("not a Nix setting name"));
        assert!(bad("a b", "x").contains("not a Nix setting name"));
        assert!(bad("cores", "1\n2").contains("one line"));
        assert!(bad("experimental-features", "flakes").contains("nix.conf"));

        let config =
            r#"{"eval-cache": {"aliases": []}, "substituters": {"aliases": ["binary-caches"]}}"#;
        let known = |name: &str| {
            NixFlags {
                options: vec![(name.into(), "x".into())],
                ..NixFlags::default()
            }
            .check_known(config)
        };
        assert!(known("eval-cache").is_ok());
        assert!(known("binary-caches").is_ok());
        assert!(known("extra-substituters").is_ok());
        let e = known("eval-cahce").unwrap_err();
        assert!(e.contains("did you mean `eval-cache`"), "{e}");
    }

    #[test]
    fn rejects_bad_flake_refs() {
        assert!(check_flake_ref(".").is_ok());
        assert!(check_flake_ref("github:me/fleet").is_ok());
        assert!(check_flake_ref(".#web1").is_err());
        assert!(check_flake_ref("--impure").is_err());
        assert!(check_flake_ref("").is_err());
    }
}
