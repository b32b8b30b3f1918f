//! Where a flake keeps its fleet, and the Nix that reads it: three sources,
//! mapped onto the same host model ([`crate::fleet`]).
//!
//! | source | flake output | a host | its system | its metadata |
//! |---|---|---|---|---|
//! | [`FleetSource::Nixos`] | `nixosConfigurations` | `nixosConfigurations.NAME` | `config.system.build.toplevel` | `config.deployment` (our module) |
//! | [`FleetSource::Colmena`] | `colmenaHive` (colmena's `makeHive`) | `colmenaHive.nodes.NAME` | `config.system.build.toplevel` | `config.deployment` (colmena's options), `colmenaHive.metaConfig` |
//! | [`FleetSource::DeployRs`] | `deploy` | `deploy.nodes.NAME` | `profiles.system.path` | the node's and the top level's settings |
//!
//! Detected from the flake's outputs unless given (`--source`): a
//! `colmenaHive` or a `deploy` output says how the fleet is deployed today;
//! both at once is ambiguous and must be chosen; otherwise
//! `nixosConfigurations`.
//!
//! Everything here is pure: Nix expressions as text, and readers of what
//! they print. [`fleet_expr`] reads, in one evaluation, which outputs exist,
//! each source's host names (which forces no host) and colmena's `meta`;
//! [`host_expr`] reads one host: its metadata always, its system (toplevel
//! and derivation) only when asked, so that deploying k hosts evaluates k
//! systems.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::attrs::Attrs;

/// Where the fleet is read from.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum FleetSource {
    /// `nixosConfigurations.NAME.config.deployment` (`nixosModules.default`).
    #[default]
    Nixos,
    /// colmena's hive: the `colmenaHive` output of `colmena.lib.makeHive`.
    Colmena,
    /// deploy-rs: `deploy.nodes.NAME`.
    DeployRs,
}

/// The names `--source` takes.
pub const SOURCE_NAMES: [&str; 3] = ["nixos", "colmena", "deploy-rs"];

impl FleetSource {
    pub fn as_str(self) -> &'static str {
        match self {
            FleetSource::Nixos => "nixos",
            FleetSource::Colmena => "colmena",
            FleetSource::DeployRs => "deploy-rs",
        }
    }

    /// The flake output holding the fleet.
    pub fn output(self) -> &'static str {
        match self {
            FleetSource::Nixos => "nixosConfigurations",
            FleetSource::Colmena => "colmenaHive",
            FleetSource::DeployRs => "deploy",
        }
    }

    /// How people would name one host's metadata in this source, for errors.
    pub fn metadata_path(self, host: &str) -> String {
        match self {
            FleetSource::Nixos => format!("nixosConfigurations.{host}.config.deployment"),
            FleetSource::Colmena => format!("colmenaHive.nodes.{host}.config.deployment"),
            FleetSource::DeployRs => format!("deploy.nodes.{host}"),
        }
    }

    /// Where one host is in the flake, for messages.
    pub fn host_path(self, host: &str) -> String {
        match self {
            FleetSource::Nixos => format!("nixosConfigurations.{host}"),
            FleetSource::Colmena => format!("colmenaHive.nodes.{host}"),
            FleetSource::DeployRs => format!("deploy.nodes.{host}"),
        }
    }

    /// A host's system, as an attribute path below the host.
    pub fn system_attr(self) -> &'static str {
        match self {
            FleetSource::Nixos | FleetSource::Colmena => "config.system.build.toplevel",
            FleetSource::DeployRs => "profiles.system.path",
        }
    }

    /// Nix for `name: host: <its deployment options>` (a NixOS
    /// configuration's; deploy-rs nodes have none: their keys are none).
    fn deployment_of(self) -> &'static str {
        match self {
            FleetSource::Nixos | FleetSource::DeployRs => {
                "name: host: (host.config or { }).deployment or { }"
            }
            FleetSource::Colmena => {
                "name: host: if output ? deploymentConfig then output.deploymentConfig.${name} else host.config.deployment or { }"
            }
        }
    }

    /// Nix that turns the output into an attribute set of hosts, each a
    /// NixOS configuration (`config`) or a deploy-rs node.
    pub(crate) fn hosts_of(self) -> &'static str {
        match self {
            FleetSource::Nixos => "output",
            FleetSource::Colmena => "output.nodes",
            FleetSource::DeployRs => "output.nodes",
        }
    }
}

impl fmt::Display for FleetSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for FleetSource {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "nixos" | "nixosConfigurations" => Ok(FleetSource::Nixos),
            "colmena" | "colmenaHive" => Ok(FleetSource::Colmena),
            "deploy-rs" | "deploy" => Ok(FleetSource::DeployRs),
            other => Err(format!(
                "unknown fleet source `{other}` ({})",
                SOURCE_NAMES.join(", ")
            )),
        }
    }
}

/// Reads, for the flake's `outputs`, which sources exist, their host names
/// and colmena's `metaConfig` (`name`, `description`, `machinesFile`,
/// `allowApplyAll`): `{ outputs; nixos; colmena; deploy-rs; }`. Host names
/// come from the attribute names only: no host is evaluated.
pub const FLEET_EXPR: &str = r#"outputs: let
  has = name: builtins.hasAttr name outputs;
in {
  outputs = builtins.attrNames outputs;
  nixos = if has "nixosConfigurations" then builtins.attrNames outputs.nixosConfigurations else null;
  colmena = if has "colmenaHive" then {
    names = builtins.attrNames outputs.colmenaHive.nodes;
    meta = outputs.colmenaHive.metaConfig or { };
  } else null;
  deploy-rs = if has "deploy" then builtins.attrNames (outputs.deploy.nodes or { }) else null;
}"#;

/// The metadata of one host of a NixOS configuration (ours or colmena's):
/// `config.deployment` with every key's `text` replaced by `hasText`, so
/// that contents never leave the evaluation (nor reach the evaluation
/// cache); the engine reads the texts of the keys it uploads when it
/// uploads them ([`key_texts_expr`]).
macro_rules! configuration_host {
    ($deployment:literal, $toplevel:literal) => {
        concat!(
            "name: configuration: want: let\n  d = ",
            $deployment,
            ";\n  toplevel = ",
            $toplevel,
            ";\n",
            r#"in {
  deployment = if builtins.isAttrs d && d ? keys && builtins.isAttrs d.keys
    then d // { keys = builtins.mapAttrs (_: key:
      if builtins.isAttrs key
      then builtins.removeAttrs key [ "text" ] // { hasText = (key.text or null) != null; }
      else key) d.keys; }
    else d;
} // (if want then { toplevel = toplevel.outPath; drvPath = toplevel.drvPath; } else { })"#
        )
    };
}

const CONFIGURATION_HOST: &str = configuration_host!(
    "configuration.config.deployment or { }",
    "configuration.config.system.build.toplevel"
);

/// A colmena hive's node, through the interface the colmena CLI itself
/// reads (`deploymentConfig.NAME`, `toplevel.NAME`: every `makeHive`
/// output has them, and they need not evaluate the node's whole
/// configuration); the node's own `config` when a hive lacks them.
const COLMENA_HOST: &str = configuration_host!(
    "if output ? deploymentConfig then output.deploymentConfig.${name} else configuration.config.deployment or { }",
    "if output ? toplevel then output.toplevel.${name} else configuration.config.system.build.toplevel"
);

/// One deploy-rs node: its settings with the top level's (each profile's
/// without its `path`), and, when asked, its `system` profile's path. A path
/// made by deploy-rs's `activate.nixos` (a `buildEnv` named
/// `activatable-<toplevel>` whose first path is the toplevel, plus its own
/// activation scripts) deploys the toplevel it wraps, as `nixos-rebuild`
/// would: that is what the host runs (`/run/current-system`), and building
/// the wrapper builds it (`builtPath`).
const DEPLOY_RS_HOST: &str = r#"name: node: want: let
  profiles = if builtins.isAttrs node then node.profiles or { } else { };
  system = if builtins.isAttrs profiles then profiles.system or null else null;
  path = if builtins.isAttrs system then system.path or null else null;
  wrapped =
    if builtins.isAttrs path && path ? pkgs && builtins.isString path.pkgs
      && builtins.substring 0 12 (path.name or "") == "activatable-"
    then let pkgs = builtins.fromJSON (builtins.unsafeDiscardStringContext path.pkgs); in
      if pkgs != [ ] && (builtins.head pkgs).paths or [ ] != [ ]
      then builtins.head (builtins.head pkgs).paths else null
    else null;
in {
  deployment = {
    top = builtins.removeAttrs output [ "nodes" ];
    node = if builtins.isAttrs node then builtins.removeAttrs node [ "profiles" ] else node;
    profiles = if builtins.isAttrs profiles
      then builtins.mapAttrs (_: p: if builtins.isAttrs p then builtins.removeAttrs p [ "path" ] // { hasPath = p ? path; } else p) profiles
      else profiles;
  };
} // (if want && path != null then (
  if wrapped != null
  then { toplevel = wrapped; drvPath = path.drvPath; builtPath = path.outPath; }
  else { toplevel = path.outPath; drvPath = path.drvPath; }
) else { })"#;

/// The function reading one host of `source`: `name: host: want: { deployment; toplevel?; drvPath?; builtPath?; }`,
/// where `output` (the flake output) is in scope. Part of every cache key.
pub fn host_expr(source: FleetSource) -> &'static str {
    match source {
        FleetSource::Nixos => CONFIGURATION_HOST,
        FleetSource::Colmena => COLMENA_HOST,
        FleetSource::DeployRs => DEPLOY_RS_HOST,
    }
}

/// A Nix string literal for `s` (escapes `"`, `\`, `$` and control characters).
pub fn nix_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '$' => out.push_str("\\$"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The `--apply` expression over `FLAKE#<output>` that reads the given
/// hosts: each `(name, want)` is read with its system when `want`. With
/// `catch`, a host whose evaluation throws is `null` in the output instead
/// of failing the whole process.
pub fn shard_expr(source: FleetSource, hosts: &[(String, bool)], catch: bool) -> String {
    let wanted: String = hosts
        .iter()
        .map(|(h, want)| format!(" {} = {want};", nix_string(h)))
        .collect();
    let apply = if catch { "attempt" } else { "read" };
    format!(
        r#"output:
let
  host = {host};
  hosts = {hosts};
  read = name: want: host name hosts.${{name}} want;
  attempt = name: want:
    let
      value = read name want;
      result = builtins.tryEval (builtins.deepSeq value value);
    in if result.success then result.value else null;
  wanted = {{{wanted} }};
in builtins.mapAttrs {apply} (builtins.intersectAttrs hosts wanted)"#,
        host = host_expr(source),
        hosts = source.hosts_of(),
    )
}

/// The `text` of every key that has one, for the named hosts only, in one
/// evaluation over `FLAKE#<output>`: `{ HOST = { KEY = TEXT; ... }; ... }`.
/// Its output is a secret. Host names must be validated
/// ([`crate::shell::is_valid_host_name`]).
pub fn key_texts_expr(source: FleetSource, hosts: &[String]) -> String {
    let names: Vec<String> = hosts.iter().map(|h| nix_string(h)).collect();
    format!(
        r#"output: let
  hosts = {hosts};
  texts = keys: builtins.listToAttrs (builtins.concatMap (attr:
    let key = keys.${{attr}}; in
    if builtins.isAttrs key && (key.text or null) != null
    then [ {{ name = attr; value = key.text; }} ] else [ ]) (builtins.attrNames keys));
in builtins.listToAttrs (map (name: {{
  inherit name;
  value = texts ((({deployment}) name hosts.${{name}}).keys or {{ }});
}}) [ {names} ])"#,
        hosts = source.hosts_of(),
        deployment = source.deployment_of(),
        names = names.join(" ")
    )
}

/// What colmena's `meta` says for the whole fleet.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetMeta {
    /// `meta.allowApplyAll = false`: a deployment must name its hosts.
    pub allow_apply_all: bool,
    /// `meta.machinesFile`: the remote builders of this fleet's builds.
    pub machines_file: Option<String>,
}

impl FleetMeta {
    fn parse(value: serde_json::Value) -> Result<FleetMeta, String> {
        let mut meta = Attrs::new("colmenaHive.metaConfig", value)?;
        meta.accept("name");
        meta.accept("description");
        let allow_apply_all = meta.bool("allowApplyAll")?.unwrap_or(true);
        let machines_file = meta.string("machinesFile")?;
        meta.finish()?;
        if let Some(file) = &machines_file
            && (!file.starts_with('/') || file.chars().any(char::is_control))
        {
            return Err("colmenaHive.metaConfig.machinesFile must be an absolute path".into());
        }
        Ok(FleetMeta {
            allow_apply_all,
            machines_file,
        })
    }
}

/// The fleet as [`FLEET_EXPR`] finds it, its source decided.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FleetIndex {
    pub source: FleetSource,
    /// Sorted, without duplicates.
    pub names: Vec<String>,
    pub meta: FleetMeta,
}

/// Read [`FLEET_EXPR`]'s output; `forced` is `--source`.
pub fn parse_fleet(json: &str, forced: Option<FleetSource>) -> Result<FleetIndex, String> {
    let value: serde_json::Value = serde_json::from_str(json)
        .map_err(|e| format!("unexpected output of the fleet's evaluation: {e}"))?;
    let outputs: Vec<String> = value
        .get("outputs")
        .and_then(|o| serde_json::from_value(o.clone()).ok())
        .unwrap_or_default();
    let present = |source: FleetSource| {
        let key = source.as_str();
        value.get(key).is_some_and(|v| !v.is_null())
    };
    let source = match forced {
        Some(source) if present(source) => source,
        Some(source) => {
            return Err(format!(
                "--source {source}: the flake has no `{}` output (it has: {})",
                source.output(),
                outputs.join(", ")
            ));
        }
        None => match (
            present(FleetSource::Colmena),
            present(FleetSource::DeployRs),
        ) {
            (true, true) => {
                return Err(
                    "the flake has both a colmena hive (`colmenaHive`) and deploy-rs nodes (`deploy`): choose one with --source colmena or --source deploy-rs"
                        .into(),
                );
            }
            (true, false) => FleetSource::Colmena,
            (false, true) => FleetSource::DeployRs,
            (false, false) if present(FleetSource::Nixos) => FleetSource::Nixos,
            (false, false) => {
                return Err(format!(
                    "the flake has no fleet: no `nixosConfigurations`, `colmenaHive` or `deploy` output (it has: {})",
                    outputs.join(", ")
                ));
            }
        },
    };
    let entry = value[source.as_str()].clone();
    let (names, meta) = match source {
        FleetSource::Colmena => {
            let names = entry.get("names").cloned().unwrap_or_default();
            let meta = FleetMeta::parse(entry.get("meta").cloned().unwrap_or_default())?;
            (names, meta)
        }
        _ => (
            entry,
            FleetMeta {
                allow_apply_all: true,
                machines_file: None,
            },
        ),
    };
    let mut names: Vec<String> = serde_json::from_value(names).map_err(|e| {
        format!(
            "the host names of `{}` are not a list: {e}",
            source.output()
        )
    })?;
    names.sort();
    names.dedup();
    Ok(FleetIndex {
        source,
        names,
        meta,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_source_is_detected_or_chosen() {
        let doc = |nixos: &str, colmena: &str, deploy: &str| {
            format!(
                r#"{{"outputs":["a"],"nixos":{nixos},"colmena":{colmena},"deploy-rs":{deploy}}}"#
            )
        };
        let hive = r#"{"names":["b","a"],"meta":{"name":"hive","description":"x","allowApplyAll":false,"machinesFile":"/etc/nix/machines"}}"#;
        let index = parse_fleet(&doc(r#"["x"]"#, hive, "null"), None).unwrap();
        assert_eq!(index.source, FleetSource::Colmena);
        assert_eq!(index.names, ["a", "b"]);
        assert!(!index.meta.allow_apply_all);
        assert_eq!(
            index.meta.machines_file.as_deref(),
            Some("/etc/nix/machines")
        );
        let index = parse_fleet(&doc(r#"["x"]"#, "null", r#"["d"]"#), None).unwrap();
        assert_eq!(index.source, FleetSource::DeployRs);
        assert!(index.meta.allow_apply_all);
        let index = parse_fleet(&doc(r#"["x"]"#, "null", "null"), None).unwrap();
        assert_eq!(
            (index.source, index.names),
            (FleetSource::Nixos, vec!["x".to_string()])
        );
        let both = doc("null", hive, r#"["d"]"#);
        assert!(parse_fleet(&both, None).unwrap_err().contains("--source"));
        assert_eq!(
            parse_fleet(&both, Some(FleetSource::DeployRs))
                .unwrap()
                .names,
            ["d"]
        );
        assert!(
            parse_fleet(&doc(r#"["x"]"#, "null", "null"), Some(FleetSource::Colmena))
                .unwrap_err()
                .contains("no `colmenaHive` output")
        );
        assert!(
            parse_fleet(&doc("null", "null", "null"), None)
                .unwrap_err()
                .contains("no fleet")
        );
        let bad_meta = r#"{"names":[],"meta":{"allowApplyAll":"no"}}"#;
        assert!(
            parse_fleet(&doc("null", bad_meta, "null"), None)
                .unwrap_err()
                .contains("allowApplyAll must be a boolean")
        );
        assert_eq!(
            "deploy-rs".parse::<FleetSource>(),
            Ok(FleetSource::DeployRs)
        );
        assert!("nixops".parse::<FleetSource>().is_err());
    }

    #[test]
    fn shards_read_the_systems_of_the_wanted_hosts_only() {
        let expr = shard_expr(
            FleetSource::Colmena,
            &[("web1".into(), true), ("we\"b${x}".into(), false)],
            true,
        );
        assert!(
            expr.contains(r#"wanted = { "web1" = true; "we\"b\${x}" = false; };"#),
            "{expr}"
        );
        assert!(expr.contains("hosts = output.nodes;"), "{expr}");
        assert!(expr.contains("builtins.mapAttrs attempt"), "{expr}");
        assert!(expr.contains(COLMENA_HOST));
        let plain = shard_expr(FleetSource::Nixos, &[("a".into(), false)], false);
        assert!(plain.contains("builtins.mapAttrs read") && plain.contains("hosts = output;"));
        assert!(shard_expr(FleetSource::DeployRs, &[], true).contains(DEPLOY_RS_HOST));
        // Key contents never leave the evaluation.
        assert!(CONFIGURATION_HOST.contains(r#"removeAttrs key [ "text" ]"#));
        // An attribute named outPath would turn the result into a string.
        for expr in [CONFIGURATION_HOST, COLMENA_HOST, DEPLOY_RS_HOST] {
            assert!(!expr.contains("outPath ="), "{expr}");
        }
        let texts = key_texts_expr(FleetSource::Colmena, &["web1".into(), "db-2".into()]);
        assert!(
            texts.contains("hosts = output.nodes;") && texts.ends_with(r#"[ "web1" "db-2" ])"#)
        );
    }
}
