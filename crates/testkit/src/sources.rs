//! The same test fleet written the way colmena's and deploy-rs's users
//! write theirs, so that nix-deploy is tested against fleets it must take
//! unchanged ([`Layout`]; chosen with [`crate::NixosShape::colmena`] and
//! [`crate::NixosShape::deploy_rs`] on a NixOS-shaped flake).
//!
//! - **colmena**: the flake has a raw hive `colmena = { meta; defaults;
//!   NAME = module; }` and `colmenaHive = makeHive self.outputs.colmena`,
//!   as colmena's documentation has it. colmena itself cannot be fetched
//!   here, so `colmena/make-hive.nix` reproduces its `lib.makeHive` (its
//!   `src/nix/hive/eval.nix`: the attributes `__schema`, `nodes`,
//!   `toplevel`, `deploymentConfig`, `deploymentConfigSelected`,
//!   `evalSelected`, `evalSelectedDrvPaths`, `metaConfig`, `introspect`,
//!   each node a module-system evaluation with `name` and `nodes` as special
//!   arguments) and `colmena/options.nix` its `deploymentOptions`,
//!   `keyType` and `metaOptions` (types and defaults as colmena declares
//!   them: `targetHost` defaults to the node's name and may be `null`,
//!   `keyFile` is a path turned into a string, ...). colmena's key and
//!   assertion modules, which act only on the host's own units, are not
//!   reproduced. Nodes do not import nix-deploy's module: colmena has no
//!   roles, dependencies or health checks, so a spec's are left out.
//! - **deploy-rs**: `nixosConfigurations` (without nix-deploy's module) and
//!   `deploy = { nodes.NAME = { hostname; profiles.system = { user = "root";
//!   path = activate.nixos self.nixosConfigurations.NAME; }; }; }`, where
//!   `deploy-rs/activate.nix` reproduces deploy-rs's `lib.activate.nixos`:
//!   a `buildEnv`-like derivation `activatable-<toplevel>` holding the
//!   toplevel's files and deploy-rs's `deploy-rs-activate` and
//!   `activate-rs` scripts, with `buildEnv`'s `pkgs` attribute (the JSON of
//!   its paths, the toplevel first).
//!
//! A spec's `deployment_extra` is written into the node as is: colmena's
//! `deployment = { ... }` block, or the deploy-rs node's attributes.

use std::fmt::Write as _;
use std::path::Path;

use crate::flake::{nix_list, nix_string};
use crate::spec::HostSpec;

/// How the fleet is written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Layout {
    /// `nixosConfigurations` with nix-deploy's module.
    #[default]
    Nixos,
    /// A colmena hive (`colmenaHive`).
    Colmena,
    /// deploy-rs nodes (`deploy`).
    DeployRs,
}

/// colmena's `src/nix/hive/options.nix`, reproduced (see the module docs).
const COLMENA_OPTIONS: &str = r#"# colmena's deployment, key and meta options (src/nix/hive/options.nix),
# reproduced for the nix-deploy testkit: the same names, types and defaults.
with builtins; rec {
  keyType = { lib, name, config, ... }: let inherit (lib) types; in {
    options = {
      name = lib.mkOption { default = name; type = types.str; };
      text = lib.mkOption { default = null; type = types.nullOr types.str; };
      keyFile = lib.mkOption {
        default = null;
        apply = value: if value == null then null else toString value;
        type = types.nullOr types.path;
      };
      keyCommand = lib.mkOption {
        default = null;
        type = types.nullOr (types.addCheck (types.listOf types.str) (l: length l > 0));
      };
      destDir = lib.mkOption { default = "/run/keys"; type = types.path; };
      path = lib.mkOption { default = "${config.destDir}/${config.name}"; type = types.path; internal = true; };
      user = lib.mkOption { default = "root"; type = types.str; };
      group = lib.mkOption { default = "root"; type = types.str; };
      permissions = lib.mkOption { default = "0600"; type = types.str; };
      uploadAt = lib.mkOption { default = "pre-activation"; type = types.enum [ "pre-activation" "post-activation" ]; };
    };
  };
  deploymentOptions = { name, lib, ... }: let inherit (lib) types; in {
    options.deployment = {
      targetHost = lib.mkOption { type = types.nullOr types.str; default = name; };
      targetPort = lib.mkOption { type = types.nullOr types.ints.unsigned; default = null; };
      targetUser = lib.mkOption { type = types.nullOr types.str; default = "root"; };
      allowLocalDeployment = lib.mkOption { type = types.bool; default = false; };
      buildOnTarget = lib.mkOption { type = types.bool; default = false; };
      tags = lib.mkOption { type = types.listOf types.str; default = [ ]; };
      keys = lib.mkOption { type = types.attrsOf (types.submodule keyType); default = { }; };
      replaceUnknownProfiles = lib.mkOption { type = types.bool; default = true; };
      privilegeEscalationCommand = lib.mkOption { type = types.listOf types.str; default = [ "sudo" "-H" "--" ]; };
      sshOptions = lib.mkOption { type = types.listOf types.str; default = [ ]; };
    };
  };
  metaOptions = { lib, ... }: let inherit (lib) types; in {
    options = {
      name = lib.mkOption { type = types.str; default = "hive"; };
      description = lib.mkOption { type = types.str; default = "A Colmena Hive"; };
      nixpkgs = lib.mkOption { type = types.unspecified; default = null; };
      nodeNixpkgs = lib.mkOption { type = types.attrsOf types.unspecified; default = { }; };
      nodeSpecialArgs = lib.mkOption { type = types.attrsOf types.unspecified; default = { }; };
      machinesFile = lib.mkOption {
        default = null;
        apply = value: if value == null then null else toString value;
        type = types.nullOr types.path;
      };
      specialArgs = lib.mkOption { default = { }; type = types.attrsOf types.unspecified; };
      allowApplyAll = lib.mkOption { default = true; type = types.bool; };
    };
  };
}
"#;

/// colmena's `lib.makeHive` (`src/nix/hive/eval.nix`), reproduced over the
/// testkit's module system (see the module docs).
const COLMENA_MAKE_HIVE: &str = r#"# colmena's lib.makeHive (src/nix/hive/eval.nix), reproduced for the
# nix-deploy testkit: the same exported attributes, nodes evaluated by the
# testkit's module system (./../nixos/eval-config.nix) instead of nixpkgs'.
{ lib, evalConfig, colmenaOptions }:
rawHive:
with builtins;
let
  uncheckedHive =
    if typeOf rawHive == "lambda" || rawHive ? __functor then rawHive { }
    else if typeOf rawHive == "set" then rawHive
    else throw "The config must evaluate to an attribute set.";
  uncheckedUserMeta =
    if uncheckedHive ? meta && uncheckedHive ? network then
      throw "Only one of `network` and `meta` may be specified."
    else uncheckedHive.meta or uncheckedHive.network or { };
  hive = let
    userMeta = (lib.evalModules { modules = [ colmenaOptions.metaOptions uncheckedUserMeta ]; }).config;
    mergedHive =
      assert lib.assertMsg (!(uncheckedHive ? __schema)) "You cannot pass in an already-evaluated Hive into the evaluator.";
      removeAttrs ({ meta = { }; defaults = { }; } // uncheckedHive) [ "meta" "network" ];
  in mergedHive // { meta = userMeta; };
  reservedNames = [ "defaults" "network" "meta" ];
  configsFor = node: let nodeConfig = hive.${node}; in
    assert lib.assertMsg (!elem node reservedNames) "\"${node}\" is a reserved name and cannot be used as the name of a node";
    if typeOf nodeConfig == "list" then nodeConfig else [ nodeConfig ];
  evalNode = name: configs: evalConfig {
    modules = [ colmenaOptions.deploymentOptions hive.defaults ] ++ configs;
    specialArgs = {
      inherit name;
      nodes = uncheckedNodes;
    } // hive.meta.specialArgs // (hive.meta.nodeSpecialArgs.${name} or { });
  };
  nodeNames = filter (name: ! elem name reservedNames) (attrNames hive);
  uncheckedNodes = listToAttrs (map (name: {
    inherit name;
    value = evalNode name ([ { _module.check = false; } ] ++ configsFor name);
  }) nodeNames);
  metaConfigKeys = [ "name" "description" "machinesFile" "allowApplyAll" ];
in rec {
  __schema = "v0";
  nodes = listToAttrs (map (name: { inherit name; value = evalNode name (configsFor name); }) nodeNames);
  toplevel = lib.mapAttrs (_: v: v.config.system.build.toplevel) nodes;
  deploymentConfig = lib.mapAttrs (_: v: v.config.deployment) nodes;
  deploymentConfigSelected = names: lib.filterAttrs (name: _: elem name names) deploymentConfig;
  evalSelected = names: lib.filterAttrs (name: _: elem name names) toplevel;
  evalSelectedDrvPaths = names: lib.mapAttrs (_: v: v.drvPath) (evalSelected names);
  metaConfig = lib.filterAttrs (n: v: elem n metaConfigKeys) hive.meta;
  introspect = f: f { inherit lib; nodes = uncheckedNodes; };
}
"#;

/// deploy-rs's `lib.activate.nixos`, reproduced (see the module docs).
fn deploy_rs_activate(system: &str) -> String {
    format!(
        r##"# deploy-rs's lib.activate.nixos (its flake.nix), reproduced for the
# nix-deploy testkit: like nixpkgs' buildEnv, a tree of the toplevel's files
# and deploy-rs's activation scripts, named activatable-<toplevel>, with the
# JSON of its paths (the toplevel first) as `pkgs`.
let
  system = {system};
  script = name: text: builtins.derivation {{
    inherit name system text;
    builder = "/bin/sh";
    args = [ "-c" "/bin/mkdir -p $out && printf '%s\n' \"$text\" > $out/$name && /bin/chmod 0555 $out/$name" ];
  }};
  custom = base: activate: let
    activatePath = script "deploy-rs-activate" "#!/bin/sh\nset -eu\n${{activate}}";
    activateRs = script "activate-rs" "#!/bin/sh\nexec deploy-rs-activate \"$@\"";
    paths = [ base activatePath activateRs ];
  in builtins.derivation {{
    name = "activatable-" + base.name;
    inherit system paths;
    pkgs = builtins.toJSON (map (drv: {{ paths = [ drv ]; priority = 5; }}) paths);
    builder = "/bin/sh";
    args = [ "-c" ''
      /bin/mkdir -p $out
      for p in $paths; do
        for f in $p/* $p/.[!.]*; do
          [ -e "$f" ] || continue
          [ -e "$out/''${{f##*/}}" ] || /bin/ln -s "$f" "$out/''${{f##*/}}"
        done
      done
    '' ];
  }};
in {{
  nixos = base: custom base.config.system.build.toplevel ''
    cd /tmp
    $PROFILE/bin/switch-to-configuration switch
  '';
}}
"##,
        system = nix_string(system),
    )
}

/// The `deployment` block of a colmena node (colmena's options only).
pub(crate) fn colmena_deployment(spec: &HostSpec) -> String {
    let mut deployment = String::new();
    if !spec.tags.is_empty() {
        let _ = writeln!(deployment, "    tags = {};", nix_list(&spec.tags));
    }
    if let Some(user) = &spec.user {
        let _ = writeln!(deployment, "    targetUser = {};", nix_string(user));
    }
    if let Some(extra) = &spec.deployment_extra {
        let _ = writeln!(deployment, "    {extra}");
    }
    deployment
}

/// The extra files of `layout` (relative to `R/flake`).
pub(crate) fn files(layout: Layout) -> Vec<(String, String)> {
    match layout {
        Layout::Nixos => Vec::new(),
        Layout::Colmena => vec![
            ("colmena/options.nix".into(), COLMENA_OPTIONS.into()),
            ("colmena/make-hive.nix".into(), COLMENA_MAKE_HIVE.into()),
        ],
        Layout::DeployRs => vec![(
            "deploy-rs/activate.nix".into(),
            deploy_rs_activate(&crate::nix_system()),
        )],
    }
}

/// `flake.nix` of `layout` (not [`Layout::Nixos`], which `nixos` writes).
pub(crate) fn flake_nix(layout: Layout, lib_dir: &Path, specs: &[HostSpec]) -> String {
    let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
    let lib = nix_string(&format!("path:{}", lib_dir.display()));
    match layout {
        Layout::Nixos => unreachable!("the NixOS layout's flake.nix is written by `nixos`"),
        Layout::Colmena => {
            let mut nodes = String::new();
            for name in &names {
                let _ = writeln!(
                    nodes,
                    "        {} = {{ imports = [ ./shared.nix ./machines/{name}.nix ]; }};",
                    nix_string(name)
                );
            }
            format!(
                r#"# Generated by the nix-deploy testkit (sources.rs); do not edit.
# A colmena hive, as colmena's documentation writes one for flakes.
{{
  inputs.nixpkgs.url = {lib};
  outputs = {{ self, nixpkgs }}:
    let
      lib = nixpkgs.lib;
      makeHive = import ./colmena/make-hive.nix {{
        inherit lib;
        evalConfig = import ./nixos/eval-config.nix {{ inherit lib; }};
        colmenaOptions = import ./colmena/options.nix;
      }};
    in {{
      colmena = {{
        meta = {{
          nixpkgs = nixpkgs;
          description = "the nix-deploy testkit's fleet";
        }} // (import ./colmena/meta.nix);
        defaults = {{ name, ... }}: {{ networking.hostName = lib.mkDefault name; }};
{nodes}      }};
      colmenaHive = makeHive self.outputs.colmena;
    }};
}}
"#
            )
        }
        Layout::DeployRs => {
            let mut nodes = String::new();
            for spec in specs {
                let ssh_user = spec
                    .user
                    .as_deref()
                    .map(|u| format!(" sshUser = {};", nix_string(u)))
                    .unwrap_or_default();
                let _ = writeln!(
                    nodes,
                    "          {name} = {{\n            hostname = {name};{ssh_user}\n            profiles.system = {{ user = \"root\"; path = activate.nixos self.nixosConfigurations.{name}; }};\n            {extra}\n          }};",
                    name = nix_string(&spec.name),
                    extra = spec.deployment_extra.as_deref().unwrap_or_default(),
                );
            }
            format!(
                r#"# Generated by the nix-deploy testkit (sources.rs); do not edit.
# deploy-rs nodes, as deploy-rs's documentation writes them.
{{
  inputs.nixpkgs.url = {lib};
  outputs = {{ self, nixpkgs }}:
    let
      lib = nixpkgs.lib;
      nixosSystem = import ./nixos/eval-config.nix {{ inherit lib; }};
      host = name: nixosSystem {{
        modules = [ ./shared.nix (./machines + "/${{name}}.nix") ];
      }};
      activate = import ./deploy-rs/activate.nix;
    in {{
      nixosConfigurations = lib.genAttrs {names} host;
      deploy = {{
        magicRollback = true;
        autoRollback = true;
        nodes = {{
{nodes}        }};
      }} // (import ./deploy-rs/settings.nix);
    }};
}}
"#,
                names = nix_list(&names),
            )
        }
    }
}
