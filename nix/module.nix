# nix-deploy's NixOS module.
#
# - `deployment.*`: per-host options that `nix-deploy` reads from each
#   nixosConfiguration (one evaluation for the whole fleet). Defaults are the
#   ones nix-deploy assumes when an option is absent.
# - `services.nix-deploy`: the coordinator daemon (`nix-deploy serve`) as a
#   hardened systemd service, for the machine that deploys the fleet: its
#   TOML config is `settings` (freeform, RFC 42); every secret (SSH key,
#   tokens, hook secrets, webhook URLs) reaches it as a systemd credential
#   (`LoadCredential`), read from its file when the service starts and never
#   copied into the Nix store.
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
        type = types.nullOr (types.either types.str types.path);
        default = null;
        apply = value: if value == null then null else toString value;
        example = "/home/me/secrets/db-password";
        description = ''
          A file on the coordinator holding the key. Best a string: a Nix path
          (`./secret`, as colmena accepts) is read from the flake's source in
          the Nix store, readable by every local user (nix-deploy warns).
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

  # ---- services.nix-deploy ------------------------------------------------
  cfg = config.services.nix-deploy;
  settingsFormat = pkgs.formats.toml { };

  # A file holding a secret: an absolute path written as a string (a Nix path
  # such as ./key would be copied into the world-readable store), outside
  # the store.
  secretFile = types.addCheck types.str (p: lib.hasPrefix "/" p && !lib.hasPrefix builtins.storeDir p) // {
    description = "absolute path of a secret file, as a string, outside the Nix store";
  };

  # Every secret as a systemd credential: `name` is how the daemon's config
  # refers to it (a relative path: the credential of that name), `file`
  # where systemd reads it when the service starts.
  credentials =
    lib.optional (cfg.sshKeyFile != null) { name = "ssh-key"; file = cfg.sshKeyFile; }
    ++ lib.mapAttrsToList (name: token: { name = "token-${name}"; inherit (token) file; }) cfg.tokens
    ++ lib.optional (cfg.slack.signingSecretFile != null) { name = "slack-signing-secret"; file = cfg.slack.signingSecretFile; }
    ++ lib.optional (cfg.github.secretFile != null) { name = "github-secret"; file = cfg.github.secretFile; }
    ++ lib.optional (cfg.database.passwordFile != null) { name = "db-password"; file = cfg.database.passwordFile; }
    ++ lib.imap0 (i: file: { name = "slack-webhook-${toString i}"; inherit file; }) cfg.notifications.slackWebhookFiles
    ++ lib.imap0 (i: file: { name = "json-webhook-${toString i}"; inherit file; }) cfg.notifications.jsonWebhookFiles
    ++ lib.optional (cfg.notifications.webhookSecretFile != null) { name = "webhook-secret"; file = cfg.notifications.webhookSecretFile; }
    ++ lib.optional (cfg.smtp.passwordFile != null) { name = "smtp-password"; file = cfg.smtp.passwordFile; };
  credentialNames = prefix: map (c: c.name) (lib.filter (c: lib.hasPrefix prefix c.name) credentials);

  # The port of `settings.listen` (`ADDRESS:PORT`, `[V6]:PORT`).
  listenPort = lib.toInt (lib.last (lib.splitString ":" cfg.settings.listen));
  listensOnLoopback = lib.hasPrefix "127." cfg.settings.listen || lib.hasPrefix "[::1]" cfg.settings.listen
    || lib.hasPrefix "localhost:" cfg.settings.listen;

  # The history: a local PostgreSQL over its socket (peer authentication as
  # the service's user, no password), a shared one by URL (its password from
  # a credential), or SQLite in the state directory.
  databaseUrl =
    if cfg.database.createLocally then "postgresql://localhost/nix-deploy?host=/run/postgresql"
    else cfg.database.url;

  configFile = settingsFormat.generate "nix-deploy.toml"
    (lib.filterAttrsRecursive (_: v: v != null) cfg.settings);

  renamed = from: to: lib.mkRenamedOptionModule ([ "services" "nix-deploy" ] ++ from) ([ "services" "nix-deploy" "settings" ] ++ to);
in
{
  imports = [
    (renamed [ "listen" ] [ "listen" ])
    (renamed [ "flake" ] [ "flake" ])
    (renamed [ "strategy" ] [ "strategy" ])
    (renamed [ "parallelLimit" ] [ "parallel-limit" ])
    (renamed [ "healthCheckTimeout" ] [ "health-check-timeout" ])
    (renamed [ "evalWorkers" ] [ "eval-workers" ])
    (renamed [ "evalCache" ] [ "eval-cache" ])
    (renamed [ "autoRollback" ] [ "auto-rollback" ])
    (renamed [ "sshConfig" ] [ "ssh-config" ])
    (renamed [ "github" "branch" ] [ "github" "branch" ])
    (lib.mkRemovedOptionModule [ "services" "nix-deploy" "notifications" "slackWebhooks" ]
      "A webhook URL is a secret: put each in a file and list the files in services.nix-deploy.notifications.slackWebhookFiles.")
    (lib.mkRemovedOptionModule [ "services" "nix-deploy" "notifications" "jsonWebhooks" ]
      "A webhook URL is a secret: put each in a file and list the files in services.nix-deploy.notifications.jsonWebhookFiles.")
  ];
  options.deployment = {
    targetHost = mkOption {
      type = types.nullOr types.str;
      default = config.networking.hostName;
      defaultText = lib.literalExpression "config.networking.hostName";
      description = ''
        SSH destination: a host name, address or alias from the ssh config.
        `null`: the host is not deployed over SSH, only by `nix-deploy
        apply-local` on itself (with `allowLocalDeployment`).
      '';
    };
    targetUser = mkOption {
      type = types.nullOr types.str;
      default = "root";
      description = ''
        SSH user; a non-root user runs the privileged steps through
        `privilegeEscalationCommand`. `null`: the ssh config decides.
      '';
    };
    targetPort = mkOption {
      type = types.nullOr types.port;
      default = null;
      description = "SSH port; null lets the ssh config decide.";
    };
    sshOptions = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "-o" "ProxyJump=bastion" "-i" "/keys/deploy" ];
      description = "Extra ssh options for this host, as ssh's arguments (each must have an ssh configuration keyword).";
    };
    privilegeEscalationCommand = mkOption {
      type = types.listOf types.str;
      default = [ "sudo" "-n" "--" ];
      description = "Runs the privileged steps when `targetUser` is not root (an argument vector; must not ask for a password).";
    };
    allowLocalDeployment = mkOption {
      type = types.bool;
      default = false;
      description = "`nix-deploy apply-local` may deploy this host on itself (the machine the coordinator runs on).";
    };
    buildOnTarget = mkOption {
      type = types.bool;
      default = false;
      description = "The host builds its own system from the derivation, with its own substituters; the coordinator builds nothing.";
    };
    substituteOnDestination = mkOption {
      type = types.nullOr types.bool;
      default = null;
      description = "Whether the host fetches what its substituters have (the coordinator sends the rest); null: the deployment's setting (on unless `--no-substitute`).";
    };
    replaceUnknownProfiles = mkOption {
      type = types.bool;
      default = true;
      description = "Deploy over a system nix-deploy never deployed to this host (false: such a host is refused).";
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
    promotionKey = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "web";
      description = ''
        Pairs this host with its counterparts in other environments for
        `nix-deploy promote --from @staging --to @prod`: each target host
        gets exactly the system that the one source host with the same key
        runs (read from that host, never evaluated). A target without a key,
        or a key two source hosts share, refuses the promotion. null: the
        host takes no part in promotions.
      '';
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
    settings = mkOption {
      description = ''
        The daemon's config file (TOML), as `nix-deploy serve --config` reads
        it: every key of the README's daemon section (`confirm-timeout`,
        `max-failures`, `notifications.retries`, `slack.response-url-prefixes`,
        `github.flake`, the fleet watch's `watch.*`, `smtp.*`,
        `notifications.email-to`, ...). An unknown key stops the daemon at start with
        its name. Secrets do not go here: use the `*File` options, which pass
        them as systemd credentials.
      '';
      default = { };
      example = lib.literalExpression ''
        {
          flake = "github:me/fleet";
          listen = "0.0.0.0:7480";
          strategy = "canary";
          confirm-timeout = "1m";
          max-failures = "10%";
          watch = { interval = "1m"; on-drift = "report"; rules = [ { on = "@web"; on-drift = "redeploy"; } ]; };
          smtp = { server = "smtp.example.org"; username = "nix-deploy"; from = "nix-deploy <nix-deploy@example.org>"; };
          notifications.email-to = [ "ops@example.org" ];
        }
      '';
      type = types.submodule {
        freeformType = settingsFormat.type;
        options = {
          flake = mkOption {
            type = types.str;
            example = "github:me/fleet";
            description = "The flake whose nixosConfigurations make the fleet.";
          };
          listen = mkOption {
            type = types.str;
            default = "127.0.0.1:7480";
            description = "Address of the HTTP API (`ADDRESS:PORT`). Put a TLS-terminating proxy in front to expose it.";
          };
          strategy = mkOption {
            type = types.enum [ "smart" "parallel" "rolling" "sequential" "canary" "blue-green" ];
            default = "smart";
            description = "Default deployment strategy.";
          };
          parallel-limit = mkOption {
            type = types.ints.positive;
            default = 4;
            description = "Maximum hosts deployed at once.";
          };
          state-dir = mkOption {
            type = types.str;
            default = "/var/lib/nix-deploy";
            readOnly = true;
            description = "The history database and SSH state (the service's StateDirectory).";
          };
        };
      };
    };
    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Open the TCP port of `settings.listen` in the firewall.";
    };
    sshKeyFile = mkOption {
      type = types.nullOr secretFile;
      default = null;
      example = "/var/lib/secrets/nix-deploy/id_ed25519";
      description = ''
        Private key the daemon logs in to hosts with (and `nix copy` uses).
        A string, not a Nix path: it is passed as a systemd credential, never
        copied into the store.
      '';
    };
    tokens = mkOption {
      type = types.attrsOf (types.submodule {
        options = {
          file = mkOption { type = secretFile; description = "File holding the token (passed as a systemd credential)."; };
          scope = mkOption { type = types.enum [ "read" "deploy" "admin" ]; default = "read"; };
          hosts = mkOption {
            type = types.listOf types.str;
            default = [ ];
            example = [ "@staging" ];
            description = "Selectors of the hosts this token may touch; none: every host.";
          };
        };
      });
      default = { };
      example = { ci = { file = "/run/secrets/nix-deploy-ci"; scope = "deploy"; }; };
      description = "Bearer tokens by name; the name is recorded with every request.";
    };
    # --- Operating with other people: windows, approvals, schedules, chat ---
    windows = mkOption {
      type = types.listOf types.attrs;
      default = [ ];
      example = [{ kind = "deny"; schedule = "0 17 * * 5"; duration = "64h"; timezone = "Europe/Berlin"; hosts = [ "@prod" ]; }];
      description = "Maintenance windows (`[[window]]`): kind allow|deny, a cron schedule, a duration, a time zone, host selectors.";
    };
    approvals = mkOption {
      type = types.listOf types.attrs;
      default = [ ];
      example = [{ hosts = [ "@prod" ]; approvers = [ "group:sre" ]; count = 1; timeout = "1h"; self-approval = false; }];
      description = "Approval rules (`[[approval]]`): deployments touching these hosts wait for approvers.";
    };
    groups = mkOption {
      type = types.attrsOf (types.listOf types.str);
      default = { };
      example = { sre = [ "token:alice" "slack:U024BE7LH" ]; };
      description = "Named sets of identities (token:NAME, slack:USERID, user:NAME) for approvers.";
    };
    schedules = mkOption {
      type = types.listOf types.attrs;
      default = [ ];
      example = [{ name = "nightly"; cron = "0 3 * * *"; request = { on = [ "@staging" ]; strategy = "rolling"; }; }];
      description = ''
        Scheduled deployments (`[[schedule]]`): name, cron (seconds first,
        optionally), timezone, and the request as the API takes it. They obey
        windows and approvals; occurrences missed while the daemon was down
        run once when it starts again, not in a burst.
      '';
    };
    chat = {
      confirmAbove = mkOption {
        type = types.ints.unsigned;
        default = 1;
        description = "A chat deployment touching more hosts than this is planned first and posted with Confirm and Cancel buttons (point the Slack app's Interactivity URL at /hooks/slack/interactive).";
      };
      users = mkOption {
        type = types.listOf types.attrs;
        default = [ ];
        example = [{ id = "U024BE7LH"; scope = "deploy"; hosts = [ "@staging" ]; }];
        description = "Slack users allowed to use /nix-deploy (by user id), each with a scope and host selectors; nobody else may.";
      };
      channels = mkOption {
        type = types.listOf types.attrs;
        default = [ ];
        description = "Slack channels it may be used in (by id), each with a scope and host selectors; none listed: any.";
      };
    };
    slack.signingSecretFile = mkOption {
      type = types.nullOr secretFile;
      default = null;
      description = "File with the Slack signing secret (a systemd credential); enables `/hooks/slack` (the command) and `/hooks/slack/interactive` (its buttons).";
    };
    github.secretFile = mkOption {
      type = types.nullOr secretFile;
      default = null;
      description = "File with the GitHub webhook secret (a systemd credential); enables `/hooks/github` (settings.github.branch: the branch that deploys, default main).";
    };
    database = {
      createLocally = mkOption {
        type = types.bool;
        default = false;
        description = ''
          Keep the history in a local `services.postgresql`: a database and a
          role `nix-deploy`, reached over `/run/postgresql` with peer
          authentication (no password anywhere).
        '';
      };
      url = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "postgresql://nix-deploy@db.internal/nix-deploy";
        description = ''
          A PostgreSQL shared by several coordinators (without its password:
          see `passwordFile`). Unset (and `createLocally` off): SQLite in the
          state directory.
        '';
      };
      passwordFile = mkOption {
        type = types.nullOr secretFile;
        default = null;
        description = ''
          File holding the database's password, handed to the service as a
          systemd credential: never in the Nix store or the configuration.
        '';
      };
    };
    notifications.slackWebhookFiles = mkOption {
      type = types.listOf secretFile;
      default = [ ];
      description = "Files each holding a Slack incoming webhook URL (a secret: whoever has it may post), for start/finish/failure/rollback notices, and for deployments that wait (a gate with Approve and Reject buttons, or a window).";
    };
    notifications.jsonWebhookFiles = mkOption {
      type = types.listOf secretFile;
      default = [ ];
      description = "Files each holding a generic JSON webhook URL, for the same notices.";
    };
    notifications.webhookSecretFile = mkOption {
      type = types.nullOr secretFile;
      default = null;
      description = ''
        File with the secret JSON webhooks are signed with
        (`X-Nix-Deploy-Signature-256: sha256=<HMAC-SHA256 of the body>`),
        passed as a systemd credential.
      '';
    };
    smtp.passwordFile = mkOption {
      type = types.nullOr secretFile;
      default = null;
      description = ''
        File holding the SMTP password (a systemd credential) for the server
        in `settings.smtp` (`server`, `port`, `security`, `username`, `from`);
        e-mail goes to `settings.notifications.email-to`.
      '';
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
    assertions = [
      {
        assertion = (cfg.settings.notifications.slack-webhooks or [ ]) == [ ] && (cfg.settings.notifications.json-webhooks or [ ]) == [ ];
        message = "services.nix-deploy.settings.notifications: webhook URLs are secrets and would be in the Nix store; put each in a file and use services.nix-deploy.notifications.slackWebhookFiles / jsonWebhookFiles.";
      }
      {
        assertion = !(cfg.database.createLocally && cfg.database.url != null);
        message = "services.nix-deploy.database: set either createLocally or url, not both";
      }
      {
        assertion = cfg.smtp.passwordFile == null || (cfg.settings.smtp.server or null) != null;
        message = "services.nix-deploy.smtp.passwordFile needs settings.smtp (server, from) to send e-mail through";
      }
      {
        assertion = cfg.database.passwordFile == null || cfg.database.url != null;
        message = "services.nix-deploy.database.passwordFile needs database.url (a local database uses peer authentication)";
      }
    ];
    warnings = lib.optional (cfg.openFirewall && listensOnLoopback)
      "services.nix-deploy.openFirewall: settings.listen (${cfg.settings.listen}) is a loopback address; the open port reaches nothing.";

    services.nix-deploy.settings = {
      ssh-identity-file = mkIf (cfg.sshKeyFile != null) "ssh-key";
      database = mkIf (databaseUrl != null) databaseUrl;
      database-password-file = mkIf (cfg.database.passwordFile != null) "db-password";
      tokens = lib.mapAttrsToList (name: token: { inherit name; inherit (token) scope; file = "token-${name}"; }
        // lib.optionalAttrs (token.hosts != [ ]) { inherit (token) hosts; }) cfg.tokens;
      # Operating with other people: checked by the daemon at start.
      window = mkIf (cfg.windows != [ ]) cfg.windows;
      approval = mkIf (cfg.approvals != [ ]) cfg.approvals;
      groups = mkIf (cfg.groups != { }) cfg.groups;
      schedule = mkIf (cfg.schedules != [ ]) cfg.schedules;
      chat = {
        confirm-above = cfg.chat.confirmAbove;
        users = cfg.chat.users;
        channels = cfg.chat.channels;
      };
      slack = mkIf (cfg.slack.signingSecretFile != null) { signing-secret-file = "slack-signing-secret"; };
      github = mkIf (cfg.github.secretFile != null) { secret-file = "github-secret"; };
      notifications = {
        slack-webhook-files = credentialNames "slack-webhook-";
        json-webhook-files = credentialNames "json-webhook-";
        webhook-secret-file = mkIf (cfg.notifications.webhookSecretFile != null) "webhook-secret";
      };
      smtp = mkIf (cfg.smtp.passwordFile != null) { password-file = "smtp-password"; };
    };

    networking.firewall.allowedTCPPorts = lib.optional cfg.openFirewall listenPort;

    services.postgresql = mkIf cfg.database.createLocally {
      enable = true;
      ensureDatabases = [ "nix-deploy" ];
      ensureUsers = [ { name = "nix-deploy"; ensureDBOwnership = true; } ];
    };
    systemd.services.nix-deploy = {
      description = "nix-deploy fleet deployment coordinator";
      wantedBy = [ "multi-user.target" ];
      after = [ "network-online.target" ] ++ lib.optional cfg.database.createLocally "postgresql.service";
      requires = lib.optional cfg.database.createLocally "postgresql.service";
      wants = [ "network-online.target" ];
      # Nix evaluates, builds and copies; ssh reaches the hosts; git fetches
      # git+ flakes and asks a remote where a branch points (pull mode).
      path = [ config.nix.package pkgs.openssh pkgs.git ];
      environment = {
        NIX_DEPLOY_LOG = "info";
        HOME = "/var/lib/nix-deploy";
      };
      serviceConfig = {
        ExecStart = "${cfg.package}/bin/nix-deploy serve --config ${configFile}";
        User = "nix-deploy";
        Group = "nix-deploy";
        StateDirectory = "nix-deploy";
        StateDirectoryMode = "0700";
        RuntimeDirectory = "nix-deploy";
        # Secrets: read by systemd from their files at start, visible to this
        # service only (in $CREDENTIALS_DIRECTORY), never in the store.
        LoadCredential = map (c: "${c.name}:${c.file}") credentials;
        # Running deployments get a graceful cancel: hosts finish or roll back.
        KillSignal = "SIGTERM";
        TimeoutStopSec = "15min";
        Restart = "on-failure";
        UMask = "0077";
        NoNewPrivileges = true;
        PrivateTmp = true;
        PrivateDevices = true;
        ProtectSystem = "strict";
        ProtectHome = true;
        ProtectHostname = true;
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectKernelLogs = true;
        ProtectControlGroups = true;
        ProtectClock = true;
        ProtectProc = "invisible";
        RestrictSUIDSGID = true;
        RestrictNamespaces = true;
        RestrictRealtime = true;
        # The API and hosts (IPv4, IPv6), nix-daemon and ssh control sockets.
        RestrictAddressFamilies = [ "AF_UNIX" "AF_INET" "AF_INET6" ];
        LockPersonality = true;
        MemoryDenyWriteExecute = true;
        RemoveIPC = true;
        SystemCallArchitectures = "native";
        SystemCallFilter = [ "@system-service" "~@privileged" ];
        SystemCallErrorNumber = "EPERM";
        CapabilityBoundingSet = "";
        AmbientCapabilities = "";
        ReadWritePaths = [ "/var/lib/nix-deploy" ];
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
