# nix-deploy's NixOS module: the per-host `deployment.*` options that
# `nix-deploy` reads from each nixosConfiguration (one evaluation for the whole
# fleet). Defaults are the ones nix-deploy assumes when an option is absent.
{ config, lib, ... }:

let
  inherit (lib) mkOption types;

  healthCheck = types.submodule {
    options = {
      service = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "nginx";
        description = "A systemd unit that must be active (`systemctl is-active`).";
      };
      http = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "http://p620:9090/-/healthy";
        description = "A URL the coordinator GETs.";
      };
      status = mkOption {
        type = types.int;
        default = 200;
        description = "The HTTP status an `http` check expects.";
      };
      body = mkOption {
        type = types.nullOr types.str;
        default = null;
        description = "A substring the body of an `http` check must contain.";
      };
      command = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "test -e /run/ok";
        description = "A command run on the host (`sh -c`); passes on exit code 0.";
      };
      timeout = mkOption {
        type = types.nullOr types.ints.positive;
        default = null;
        description = "Seconds one attempt may take (nix-deploy's default: 10).";
      };
      period = mkOption {
        type = types.nullOr types.ints.positive;
        default = null;
        description = "Seconds between attempts (nix-deploy's default: 2).";
      };
    };
  };

  # Only set fields are passed on, so nix-deploy sees exactly one check kind.
  cleanCheck = check: lib.filterAttrs (_: v: v != null) check;
in
{
  options.deployment = {
    targetHost = mkOption {
      type = types.str;
      default = config.networking.hostName;
      defaultText = lib.literalExpression "config.networking.hostName";
      description = "SSH destination: a host name, address or alias from the ssh config.";
    };
    targetUser = mkOption {
      type = types.str;
      default = "root";
      description = "SSH user; a non-root user runs the privileged steps through sudo.";
    };
    targetPort = mkOption {
      type = types.nullOr types.port;
      default = null;
      description = "SSH port; null lets the ssh config decide.";
    };
    role = mkOption {
      type = types.str;
      default = "client";
      example = "infrastructure";
      description = ''Free text. "infrastructure" hosts go first when nothing else orders them.'';
    };
    dependencies = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "p620" "@monitoring" ];
      description = "Hosts (or @tags) that must be deployed and healthy before this host activates.";
    };
    tags = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "web" "laptop" ];
      description = "Tags for selection: `nix-deploy deploy --on @web`.";
    };
    healthChecks = mkOption {
      type = types.listOf healthCheck;
      default = [ ];
      apply = map cleanCheck;
      description = "Checks that prove the host healthy after activation (and before, in pre-flight).";
    };
    rollbackOnFailure = mkOption {
      type = types.bool;
      default = true;
      description = "Switch back to the previous generation when activation or validation fails.";
    };
  };
}
