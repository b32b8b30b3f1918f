//! The local Nix commands, as pure builders and parsers: one evaluation of the
//! whole fleet, builds, closures, copies. Nix 2.8 (Debian's `nix-bin`) must
//! work, so the experimental features are passed here and no flag newer than
//! 2.8 is used (`--json` instead of `--print-out-paths`).

use serde::Deserialize;

use crate::command::Cmd;

/// Flags every `nix` invocation gets: flakes without touching the user's config.
const FEATURE_FLAGS: [&str; 2] = ["--extra-experimental-features", "nix-command flakes"];

/// Reads, for every `nixosConfigurations.<name>`, the toplevel's out and drv paths
/// and `config.deployment`, in one evaluation.
///
/// The result must not contain an attribute named `outPath`: Nix would turn such
/// an attribute set into a plain string when printing JSON.
///
/// The contents of `deployment.keys.*.text` never leave this evaluation: each
/// key's `text` is replaced by `hasText` (the engine reads the texts of the
/// keys it uploads, when it uploads them, with [`key_texts_command`]). So the
/// fleet's JSON, wherever it goes, holds no secret.
pub const FLEET_APPLY_EXPR: &str = r#"configurations: builtins.mapAttrs (name: configuration:
  let toplevel = configuration.config.system.build.toplevel; in {
    toplevel = toplevel.outPath;
    drvPath = toplevel.drvPath;
    deployment = let d = configuration.config.deployment or { }; in
      if builtins.isAttrs d && d ? keys && builtins.isAttrs d.keys
      then d // { keys = builtins.mapAttrs (_: key:
        if builtins.isAttrs key
        then builtins.removeAttrs key [ "text" ] // { hasText = (key.text or null) != null; }
        else key) d.keys; }
      else d;
  }) configurations"#;

/// What is read of one host when its system is not wanted (`nix-deploy
/// promote` deploys systems it never evaluates): its `config.deployment`,
/// keys' `text` dropped as in [`FLEET_APPLY_EXPR`].
pub const DEPLOYMENT_EXPR: &str = r#"name: configuration: {
    deployment = let d = configuration.config.deployment or { }; in
      if builtins.isAttrs d && d ? keys && builtins.isAttrs d.keys
      then d // { keys = builtins.mapAttrs (_: key:
        if builtins.isAttrs key
        then builtins.removeAttrs key [ "text" ] // { hasText = (key.text or null) != null; }
        else key) d.keys; }
      else d;
  }"#;

/// `nix eval --json FLAKE#nixosConfigurations --apply …`: [`DEPLOYMENT_EXPR`]
/// for `hosts` (validated names: no quote, backslash or `$`), each in
/// `tryEval`, so a host whose metadata throws is `null` instead of failing
/// the others.
pub fn deployment_command(flake: &str, hosts: &[String]) -> Result<Cmd, String> {
    if let Some(bad) = hosts.iter().find(|h| !crate::shell::is_valid_host_name(h)) {
        return Err(format!("`{bad}` is not a host name"));
    }
    let wanted: String = hosts.iter().map(|h| format!(" \"{h}\" = null;")).collect();
    let apply = format!(
        r#"configurations:
let
  metadata = {DEPLOYMENT_EXPR};
  attempt = name: configuration:
    let
      value = metadata name configuration;
      result = builtins.tryEval (builtins.deepSeq value value);
    in if result.success then result.value else null;
  wanted = {{{wanted} }};
in builtins.mapAttrs attempt (builtins.intersectAttrs wanted configurations)"#
    );
    Ok(Cmd::new("nix")
        .args(FEATURE_FLAGS)
        .args(["eval", "--json"])
        .arg(format!("{flake}#nixosConfigurations"))
        .args(["--apply", &apply]))
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

pub fn eval_command(flake: &str) -> Cmd {
    Cmd::new("nix")
        .args(FEATURE_FLAGS)
        .args(["eval", "--json"])
        .arg(format!("{flake}#nixosConfigurations"))
        .args(["--apply", FLEET_APPLY_EXPR])
}

pub fn metadata_command(flake: &str) -> Cmd {
    Cmd::new("nix")
        .args(FEATURE_FLAGS)
        .args(["flake", "metadata", "--json"])
        .arg(flake)
}

pub fn build_command(drv: &str) -> Cmd {
    Cmd::new("nix")
        .args(FEATURE_FLAGS)
        .args(["build", "--no-link", "--json"])
        .arg(drv)
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
/// evaluation: `{ HOST = { KEY = TEXT; ... }; ... }`. Its output is a
/// secret: the caller turns it into [`crate::keys::Secret`]s at once.
///
/// Host names are validated ([`crate::shell::is_valid_host_name`]: no quote,
/// backslash or `$`), so they can be Nix string literals.
pub fn key_texts_command(flake: &str, hosts: &[String]) -> Result<Cmd, String> {
    if let Some(bad) = hosts.iter().find(|h| !crate::shell::is_valid_host_name(h)) {
        return Err(format!("`{bad}` is not a host name"));
    }
    let names: Vec<String> = hosts.iter().map(|h| format!("\"{h}\"")).collect();
    let apply = format!(
        r#"configurations: let
  texts = keys: builtins.listToAttrs (builtins.concatMap (attr:
    let key = keys.${{attr}}; in
    if builtins.isAttrs key && (key.text or null) != null
    then [ {{ name = attr; value = key.text; }} ] else [ ]) (builtins.attrNames keys));
in builtins.listToAttrs (map (name: {{
  inherit name;
  value = texts (configurations.${{name}}.config.deployment.keys or {{ }});
}}) [ {} ])"#,
        names.join(" ")
    );
    Ok(Cmd::new("nix")
        .args(FEATURE_FLAGS)
        .args(["eval", "--json"])
        .arg(format!("{flake}#nixosConfigurations"))
        .arg("--apply")
        .arg(apply))
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
        assert!(!FLEET_APPLY_EXPR.contains("outPath ="));
    }

    #[test]
    fn build_and_copy_commands() {
        assert_eq!(
            argv(&build_command("/nix/store/abc-x.drv"))[3..],
            ["build", "--no-link", "--json", "/nix/store/abc-x.drv"]
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
        let metadata = argv(&deployment_command("path:/srv/fleet", &["web1".into()]).unwrap());
        assert_eq!(
            metadata[3..7],
            [
                "eval",
                "--json",
                "path:/srv/fleet#nixosConfigurations",
                "--apply"
            ]
        );
        assert!(
            metadata[7].contains(r#"wanted = { "web1" = null; };"#),
            "{}",
            metadata[7]
        );
        assert!(deployment_command(".", &["a\"b".into()]).is_err());
    }

    #[test]
    fn key_texts_are_read_for_the_named_hosts_only() {
        let cmd = key_texts_command("path:/srv/fleet", &["web1".into(), "db-2".into()]).unwrap();
        let args = argv(&cmd);
        assert_eq!(
            args[3..6],
            ["eval", "--json", "path:/srv/fleet#nixosConfigurations"]
        );
        assert!(args[7].ends_with(r#"[ "web1" "db-2" ])"#), "{}", args[7]);
        assert!(key_texts_command(".", &["a\"b".into()]).is_err());
        // The fleet's own evaluation drops the texts.
        assert!(FLEET_APPLY_EXPR.contains(r#"removeAttrs key [ "text" ]"#));
        // The metadata alone drops the texts the same way, and evaluates no system.
        assert!(DEPLOYMENT_EXPR.contains(
            r#"removeAttrs key [ "text" ] // { hasText = (key.text or null) != null; }"#
        ));
        assert!(!DEPLOYMENT_EXPR.contains("toplevel"));
        assert!(!DEPLOYMENT_EXPR.contains("system.build"));
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
    fn rejects_bad_flake_refs() {
        assert!(check_flake_ref(".").is_ok());
        assert!(check_flake_ref("github:me/fleet").is_ok());
        assert!(check_flake_ref(".#web1").is_err());
        assert!(check_flake_ref("--impure").is_err());
        assert!(check_flake_ref("").is_err());
    }
}
