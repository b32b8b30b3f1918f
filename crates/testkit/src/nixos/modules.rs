//! The NixOS-shaped texts every test flake shares: `eval-config.nix` (like
//! nixpkgs'), a package set instantiated per host, the core modules and the
//! services' option modules.

use crate::{nix_string, nix_system};

pub(super) const EVAL_CONFIG: &str = r#"# Like nixpkgs' nixos/lib/eval-config.nix: the module list, and a package
# set instantiated for this host.
{ lib }:
{ modules, specialArgs ? { } }:
lib.evalModules {
  specialArgs = { modulesPath = ./modules; } // specialArgs;
  modules = import ./modules/module-list.nix ++ modules ++ [
    ({ config, ... }: {
      _module.args.pkgs = import ./pkgs.nix {
        inherit lib;
        inherit (config.nixpkgs) system config;
      };
    })
  ];
}
"#;

pub(super) fn pkgs_nix(packages: usize) -> String {
    format!(
        r#"# A package set instantiated per host, as nixpkgs is by nixosSystem: a
# fixed point of {packages} derivations over a bootstrap chain, with an overlay.
{{ lib, system, config }}:
let
  mkDerivation = {{ pname, version, deps ? [ ], stdenv }}:
    builtins.derivation {{
      name = "${{pname}}-${{version}}";
      inherit system pname version stdenv;
      builder = "/bin/sh";
      args = [ "-c" "/bin/mkdir -p $out/bin && echo $pname > $out/name" ];
      buildInputs = deps;
    }};
  bootstrap = builtins.foldl'
    (previous: stage: mkDerivation {{
      pname = "stdenv-stage${{toString stage}}";
      version = "1";
      stdenv = if previous == null then "" else previous;
      deps = lib.optional (previous != null) previous;
    }})
    null
    (lib.range 0 5);
  base = self: lib.listToAttrs (builtins.genList (i: lib.nameValuePair "p${{toString i}}" (mkDerivation {{
    pname = "p${{toString i}}";
    version = "1.${{toString (lib.mod i 7)}}";
    stdenv = bootstrap;
    deps = lib.optional (i >= 10) self."p${{toString (i / 10)}}"
      ++ lib.optional (i >= 100) self."p${{toString (i / 100)}}";
  }})) {packages});
  overlay = final: previous: {{
    inherit config lib;
    nix = previous.p0;
  }};
in lib.fix (lib.extends overlay base)
"#
    )
}

/// The NixOS options the service modules and `nix-deploy.nix` touch, and the
/// toplevel.
pub(super) fn core_nix() -> String {
    format!(
        r#"{{ config, lib, pkgs, ... }}:
let
  inherit (lib) mkOption types;
  read = path: builtins.unsafeDiscardStringContext (builtins.readFile path);
  unit = name: service: builtins.derivation {{
    name = "unit-${{name}}.service";
    system = config.nixpkgs.system;
    builder = "/bin/sh";
    args = [ "-c" "echo \"$text\" > $out" ];
    text = service.unitText;
    path = service.path;
  }};
in {{
  options = {{
    networking.hostName = mkOption {{ type = types.str; }};
    networking.firewall.allowedTCPPorts = mkOption {{ type = types.listOf types.port; default = [ ]; }};
    time.timeZone = mkOption {{ type = types.str; default = "UTC"; }};
    nixpkgs.system = mkOption {{ type = types.str; default = {system}; }};
    nixpkgs.config = mkOption {{ type = types.attrs; default = {{ }}; }};
    environment.systemPackages = mkOption {{ type = types.listOf types.package; default = [ ]; }};
    environment.etc = mkOption {{
      type = types.attrsOf (types.submodule ({{ name, ... }}: {{
        options = {{
          text = mkOption {{ type = types.lines; }};
          target = mkOption {{ type = types.str; default = name; }};
          mode = mkOption {{ type = types.str; default = "0444"; }};
        }};
      }}));
      default = {{ }};
    }};
    systemd.services = mkOption {{
      type = types.attrsOf (types.submodule ({{ name, config, ... }}: {{
        options = {{
          description = mkOption {{ type = types.str; default = ""; }};
          wantedBy = mkOption {{ type = types.listOf types.str; default = [ ]; }};
          after = mkOption {{ type = types.listOf types.str; default = [ ]; }};
          wants = mkOption {{ type = types.listOf types.str; default = [ ]; }};
          requires = mkOption {{ type = types.listOf types.str; default = [ ]; }};
          path = mkOption {{ type = types.listOf types.package; default = [ ]; }};
          environment = mkOption {{ type = types.attrsOf types.str; default = {{ }}; }};
          serviceConfig = mkOption {{
            type = types.attrsOf (types.oneOf [ types.str types.int types.bool (types.listOf types.str) ]);
            default = {{ }};
          }};
          script = mkOption {{ type = types.lines; default = ""; }};
          unitText = mkOption {{ type = types.str; internal = true; }};
        }};
        config.unitText = ''
          [Unit]
          Description=${{config.description}}
          After=${{lib.concatStringsSep " " config.after}}
          [Service]
          ${{lib.concatStrings (lib.mapAttrsToList (k: v: "${{k}}=${{toString v}}\n") config.serviceConfig)}}
          ${{lib.concatStrings (lib.mapAttrsToList (k: v: "Environment=${{k}}=${{v}}\n") config.environment)}}
        '';
      }}));
      default = {{ }};
    }};
    users.users = mkOption {{ type = types.attrsOf (types.attrsOf types.anything); default = {{ }}; }};
    services.postgresql = mkOption {{ type = types.attrsOf types.anything; default = {{ }}; }};
    users.groups = mkOption {{ type = types.attrsOf (types.attrsOf types.anything); default = {{ }}; }};
    nix.package = mkOption {{ type = types.package; default = pkgs.nix; }};
    nix.settings = mkOption {{ type = types.attrsOf types.anything; default = {{ }}; }};
    services.grafana.provision = mkOption {{ type = types.attrsOf types.anything; default = {{ }}; }};
    system.build = mkOption {{ type = types.attrsOf types.unspecified; default = {{ }}; }};
    # Declared by NixOS; the project's module defines them (renamed and
    # removed options, its own checks).
    assertions = mkOption {{ type = types.listOf types.unspecified; default = [ ]; internal = true; }};
    warnings = mkOption {{ type = types.listOf types.str; default = [ ]; internal = true; }};
    testkit.version = mkOption {{ type = types.str; description = "Bumping it makes a new toplevel."; }};
    testkit.switchScript = mkOption {{ type = types.lines; }};
  }};
  config = {{
    environment.etc.timezone.text = config.time.timeZone;
    system.build.toplevel = builtins.derivation {{
      name = "nixos-system-${{config.networking.hostName}}-${{config.testkit.version}}";
      system = config.nixpkgs.system;
      builder = "/bin/sh";
      args = [ "-c" (read ../builder.sh) ];
      systemctlScript = read ../systemctl.sh;
      switchScript = config.testkit.switchScript;
      # nixpkgs' release comes from the locked input: a new lock, a new system.
      nixosVersion = "${{lib.trivial.release}}-${{config.testkit.version}}";
      packages = config.environment.systemPackages;
      units = lib.mapAttrsToList unit config.systemd.services;
      etc = builtins.toJSON (lib.mapAttrs (name: file: file.text) config.environment.etc);
      ports = map toString config.networking.firewall.allowedTCPPorts;
    }};
  }};
}}
"#,
        system = nix_string(&nix_system()),
    )
}

pub(super) fn service_module(i: usize, packages: usize) -> String {
    format!(
        r#"{{ config, lib, pkgs, ... }}:
let
  inherit (lib) mkOption mkEnableOption mkIf types;
  cfg = config.services.s{i};
in {{
  options.services.s{i} = {{
    enable = mkEnableOption "service s{i}";
    package = mkOption {{ type = types.package; default = pkgs.p{package}; }};
    port = mkOption {{ type = types.port; default = {port}; }};
    openFirewall = mkOption {{ type = types.bool; default = false; }};
    settings = mkOption {{ type = types.attrsOf (types.oneOf [ types.str types.int types.bool ]); default = {{ }}; }};
    extraConfig = mkOption {{ type = types.lines; default = ""; }};
  }};
  config = mkIf cfg.enable {{
    systemd.services.s{i} = {{
      description = "service s{i}";
      wantedBy = [ "multi-user.target" ];
      after = [ "network.target" ];
      environment.PORT = toString cfg.port;
      serviceConfig = {{
        ExecStart = "${{cfg.package}}/bin/s{i} --port ${{toString cfg.port}}";
        Restart = "always";
        DynamicUser = true;
      }} // lib.mapAttrs (name: value: toString value) cfg.settings;
    }};
    environment.etc."s{i}.conf".text =
      lib.concatStrings (lib.mapAttrsToList (k: v: "${{k}} = ${{toString v}}\n") cfg.settings)
      + cfg.extraConfig;
    environment.systemPackages = [ cfg.package ];
    networking.firewall.allowedTCPPorts = lib.optional cfg.openFirewall cfg.port;
  }};
}}
"#,
        package = (i * 7) % packages.max(1),
        port = 1024 + i,
    )
}
