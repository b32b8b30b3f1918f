# nix-deploy's NixOS module.
#
# - `deployment.*`: per-host options that `nix-deploy` reads from each
#   nixosConfiguration (one evaluation for the whole fleet). Defaults are the
#   ones nix-deploy assumes when an option is absent.
# - `services.nix-deploy`: the coordinator daemon (`nix-deploy serve`) as a
#   hardened systemd service, for the machine that deploys the fleet.
{ config, lib, pkgs, ... }:

let
  inherit (lib) mkOption mkEnableOption mkIf types;

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

  # deployment.keys.<name>: colmena's shape and defaults. Contents never go
  # into the Nix store through nix-deploy: it reads `text` only when it
  # uploads the key, `keyFile` from the coordinator's file system and runs
  # `keyCommand` there; all three reach the host on stdin over SSH.
  key = types.submodule ({ name, config, ... }: {
    options = {
      name = mkOption {
        type = types.str;
        default = name;
        description = "File name of the key on the host.";
      };
      text = mkOption {
        type = types.nullOr types.str;
        default = null;
        description = ''
          The key's contents. Being part of the flake, they are in the
          coordinator's Nix store (flake sources are copied there); use
          `keyFile` or `keyCommand` for secrets that must never be in any store.
        '';
      };
      keyFile = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "/home/me/secrets/db-password";
        description = ''
          A file on the coordinator holding the key. A string, not a Nix path
          (`./secret` would copy the file into the store; nix-deploy refuses
          store paths).
        '';
      };
      keyCommand = mkOption {
        type = types.nullOr (types.listOf types.str);
        default = null;
        example = [ "pass" "show" "db-password" ];
        description = "A command (argument vector, no shell) run on the coordinator; its stdout is the key.";
      };
      destDir = mkOption {
        type = types.str;
        default = "/run/keys";
        description = "Directory on the host (absolute, outside /nix). /run is emptied at boot; nix-deploy uploads keys again after the reboots it makes.";
      };
      path = mkOption {
        type = types.str;
        readOnly = true;
        default = "${config.destDir}/${config.name}";
        defaultText = lib.literalExpression ''"''${destDir}/''${name}"'';
        description = "Where the key lands on the host.";
      };
      user = mkOption {
        type = types.str;
        default = "root";
        description = "Owner of the key file.";
      };
      group = mkOption {
        type = types.str;
        default = "root";
        description = "Group of the key file.";
      };
      permissions = mkOption {
        type = types.str;
        default = "0600";
        example = "0640";
        description = "Octal mode of the key file.";
      };
      uploadAt = mkOption {
        type = types.enum [ "pre-activation" "post-activation" ];
        default = "pre-activation";
        description = ''
          When the key is uploaded: before the new system is activated
          (services find it when they start), or after (its user may be
          created by the new system).
        '';
      };
    };
  });

  cfg = config.services.nix-deploy;
  toml = pkgs.formats.toml { };
  configFile = toml.generate "nix-deploy.toml" (lib.filterAttrsRecursive (_: v: v != null) ({
    listen = cfg.listen;
    flake = cfg.flake;
    state-dir = "/var/lib/nix-deploy";
    ssh-config = cfg.sshConfig;
    strategy = cfg.strategy;
    parallel-limit = cfg.parallelLimit;
    health-check-timeout = cfg.healthCheckTimeout;
    auto-rollback = cfg.autoRollback;
    eval-workers = cfg.evalWorkers;
    eval-cache = cfg.evalCache;
    tokens = lib.mapAttrsToList (name: t: { inherit name; file = t.file; scope = t.scope; }) cfg.tokens;
    notifications = {
      slack-webhooks = cfg.notifications.slackWebhooks;
      json-webhooks = cfg.notifications.jsonWebhooks;
    };
  } // lib.optionalAttrs (cfg.slack.signingSecretFile != null) {
    slack = { signing-secret-file = cfg.slack.signingSecretFile; };
  } // lib.optionalAttrs (cfg.github.secretFile != null) {
    github = { secret-file = cfg.github.secretFile; branch = cfg.github.branch; };
  }));
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
    keys = mkOption {
      type = types.attrsOf key;
      default = { };
      example = lib.literalExpression ''
        {
          "db-password" = { keyCommand = [ "pass" "show" "db" ]; user = "postgres"; group = "postgres"; permissions = "0640"; };
          "api.token" = { keyFile = "/home/me/secrets/api.token"; uploadAt = "post-activation"; };
        }
      '';
      description = ''
        Secrets uploaded outside the Nix store (colmena's `deployment.keys`):
        over SSH, on stdin, written atomically with their owner and mode,
        never on a command line, in the history or in logs.
        `nix-deploy upload-keys` uploads them again without deploying.
      '';
    };
  };

  options.services.nix-deploy = {
    enable = mkEnableOption "the nix-deploy coordinator daemon";
    package = mkOption {
      type = types.package;
      description = "The nix-deploy package (the flake's `packages.<system>.default`).";
    };
    listen = mkOption {
      type = types.str;
      default = "127.0.0.1:7480";
      description = "Address of the HTTP API. Put a TLS-terminating proxy in front to expose it.";
    };
    flake = mkOption {
      type = types.str;
      example = "github:me/fleet";
      description = "The flake whose nixosConfigurations make the fleet.";
    };
    sshKeyFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      description = "Private key the daemon uses for SSH (made available as a credential).";
    };
    sshConfig = mkOption {
      type = types.nullOr types.path;
      default = null;
      description = "An ssh config file used instead of the service user's.";
    };
    strategy = mkOption {
      type = types.enum [ "smart" "parallel" "rolling" "sequential" "canary" "blue-green" ];
      default = "smart";
      description = "Default deployment strategy.";
    };
    parallelLimit = mkOption {
      type = types.ints.positive;
      default = 4;
      description = "Maximum hosts deployed at once.";
    };
    healthCheckTimeout = mkOption {
      type = types.ints.positive;
      default = 120;
      description = "Seconds to wait for a host's health checks.";
    };
    evalWorkers = mkOption {
      type = types.nullOr (types.ints.between 1 256);
      default = null;
      description = "`nix eval` processes evaluating the fleet at once; null: one per core, as memory allows.";
    };
    evalCache = mkOption {
      type = types.bool;
      default = true;
      description = "Reuse evaluations of a flake whose locked identity was evaluated before (kept in the history).";
    };
    autoRollback = mkOption {
      type = types.bool;
      default = true;
      description = "Roll back every host a deployment changed when it aborts.";
    };
    tokens = mkOption {
      type = types.attrsOf (types.submodule {
        options = {
          file = mkOption { type = types.str; description = "File holding the token (never in the store)."; };
          scope = mkOption { type = types.enum [ "read" "deploy" "admin" ]; default = "read"; };
        };
      });
      default = { };
      example = { ci = { file = "/run/secrets/nix-deploy-ci"; scope = "deploy"; }; };
      description = "Bearer tokens by name; the name is recorded with every request.";
    };
    slack.signingSecretFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      description = "File with the Slack signing secret; enables `/hooks/slack`.";
    };
    github.secretFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      description = "File with the GitHub webhook secret; enables `/hooks/github`.";
    };
    github.branch = mkOption {
      type = types.str;
      default = "main";
      description = "Pushes to this branch deploy.";
    };
    notifications.slackWebhooks = mkOption {
      type = types.listOf types.str;
      default = [ ];
      description = "Slack incoming webhook URLs for start/finish/failure/rollback notices.";
    };
    notifications.jsonWebhooks = mkOption {
      type = types.listOf types.str;
      default = [ ];
      description = "Generic JSON webhook URLs for the same notices.";
    };
    grafanaDashboard = {
      enable = mkEnableOption ''
        provisioning nix-deploy's Grafana dashboard (deployments by status,
        success ratio, durations, MTTR, hosts by last result) into this
        machine's Grafana (`services.grafana`). It reads any Prometheus data
        source that scrapes the daemon's `/metrics`; it does not need the
        daemon on this machine
      '';
      folder = mkOption {
        type = types.str;
        default = "nix-deploy";
        description = "The Grafana folder the dashboard is provisioned into.";
      };
    };
  };

  config = lib.mkMerge [ (mkIf cfg.enable {
    systemd.services.nix-deploy = {
      description = "nix-deploy fleet deployment coordinator";
      wantedBy = [ "multi-user.target" ];
      after = [ "network-online.target" ];
      wants = [ "network-online.target" ];
      path = [ config.nix.package pkgs.openssh ];
      environment = {
        NIX_DEPLOY_LOG = "info";
        HOME = "/var/lib/nix-deploy";
      };
      serviceConfig = {
        ExecStart = "${cfg.package}/bin/nix-deploy serve --config ${configFile}";
        DynamicUser = false;
        User = "nix-deploy";
        Group = "nix-deploy";
        StateDirectory = "nix-deploy";
        StateDirectoryMode = "0700";
        RuntimeDirectory = "nix-deploy";
        # Running deployments get a graceful cancel: hosts finish or roll back.
        KillSignal = "SIGTERM";
        TimeoutStopSec = "15min";
        Restart = "on-failure";
        NoNewPrivileges = true;
        PrivateTmp = true;
        PrivateDevices = true;
        ProtectSystem = "strict";
        ProtectHome = true;
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectControlGroups = true;
        ProtectClock = true;
        RestrictSUIDSGID = true;
        RestrictNamespaces = true;
        LockPersonality = true;
        MemoryDenyWriteExecute = true;
        SystemCallArchitectures = "native";
        CapabilityBoundingSet = "";
        ReadWritePaths = [ "/var/lib/nix-deploy" ];
        LoadCredential = lib.optional (cfg.sshKeyFile != null) "ssh-key:${cfg.sshKeyFile}";
      };
    };
    users.users.nix-deploy = {
      isSystemUser = true;
      group = "nix-deploy";
      home = "/var/lib/nix-deploy";
    };
    users.groups.nix-deploy = { };
    # The daemon copies closures through the local Nix daemon.
    nix.settings.trusted-users = [ "nix-deploy" ];
  })
  (mkIf cfg.grafanaDashboard.enable {
    services.grafana.provision = {
      enable = true;
      dashboards.settings.providers = [{
        name = "nix-deploy";
        folder = cfg.grafanaDashboard.folder;
        options.path = ./grafana;
      }];
    };
  }) ];
}
