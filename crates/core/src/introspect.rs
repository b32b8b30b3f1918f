//! `nix-deploy eval`: a Nix expression evaluated against the fleet, as
//! colmena's `eval` does it. The expression is a function called with
//! `{ nodes, pkgs, lib }` (write `{ nodes, ... }:` to take what you need):
//!
//! - `nodes`: the fleet's hosts as its source has them
//!   ([`crate::source`]): the NixOS configurations of `nixosConfigurations`
//!   or of a colmena hive (`colmenaHive.nodes`; each with `config`,
//!   `options`, `pkgs`, ...), or deploy-rs's nodes (`deploy.nodes`, each
//!   with its `profiles`), evaluated lazily: only what the expression
//!   touches is evaluated;
//! - `pkgs`: the package set of the first host (by name), as nixosSystem
//!   exposes it (`pkgs`, else `_module.args.pkgs`), or `null` (deploy-rs
//!   nodes have none);
//! - `lib`: `pkgs.lib`, or `null`.
//!
//! An expression that is not a function is its own value. The result is
//! printed as JSON (`nix eval --json`).
//!
//! The expression is the user's own code, evaluated by their own Nix on
//! their own machine, as with `nix eval --apply`: it is placed on its own
//! lines inside parentheses (so a trailing comment cannot swallow what
//! follows), never through a shell.

use crate::command::Cmd;
use crate::nix::FEATURE_FLAGS;
use crate::source::FleetSource;

/// The `--apply` function over the fleet's output around the user's
/// expression.
pub fn apply_expression(source: FleetSource, user: &str) -> String {
    format!(
        r#"output:
let
  nodes = {hosts};
  names = builtins.attrNames nodes;
  first = if names == [ ] then {{ }} else nodes.${{builtins.head names}};
  pkgs = first.pkgs or (first._module.args.pkgs or null);
  lib = if pkgs != null && builtins.isAttrs pkgs && pkgs ? lib then pkgs.lib else null;
  f = (
{user}
  );
in
if builtins.isFunction f then f {{ inherit nodes pkgs lib; }} else f
"#,
        hosts = source.hosts_of()
    )
}

/// Refuse what cannot be an expression: empty, or with a NUL byte (which no
/// argument can carry).
pub fn check_expression(user: &str) -> Result<(), String> {
    if user.trim().is_empty() {
        return Err(
            "the expression is empty (e.g. -E '{ nodes, ... }: builtins.attrNames nodes')".into(),
        );
    }
    if user.contains('\0') {
        return Err("the expression contains a NUL byte".into());
    }
    Ok(())
}

/// `nix eval --json FLAKE#OUTPUT --apply EXPR`, `OUTPUT` the source's
/// (`nixosConfigurations`, `colmenaHive`, `deploy`).
pub fn eval_command(flake: &str, source: FleetSource, user: &str) -> Cmd {
    Cmd::new("nix")
        .args(FEATURE_FLAGS)
        .args(["eval", "--json"])
        .arg(format!("{flake}#{}", source.output()))
        .arg("--apply")
        .arg(apply_expression(source, user))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_expression_is_called_with_nodes_pkgs_and_lib() {
        let expr = apply_expression(
            FleetSource::Nixos,
            "{ nodes, ... }: builtins.attrNames nodes # names",
        );
        assert!(
            expr.starts_with("output:\nlet\n  nodes = output;"),
            "{expr}"
        );
        assert!(expr.contains("\n{ nodes, ... }: builtins.attrNames nodes # names\n  );"));
        assert!(expr.contains("f { inherit nodes pkgs lib; }"));
        let hive = apply_expression(FleetSource::Colmena, "1");
        assert!(hive.contains("  nodes = output.nodes;"), "{hive}");
        let cmd = eval_command("path:/srv/fleet", FleetSource::Nixos, "1");
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args[2..5],
            ["eval", "--json", "path:/srv/fleet#nixosConfigurations"]
        );
        assert_eq!(args[5], "--apply");
        assert!(check_expression("  ").is_err());
        assert!(check_expression("a\0b").is_err());
        assert!(check_expression("1").is_ok());
    }
}
