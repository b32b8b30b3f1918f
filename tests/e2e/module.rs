//! The NixOS module's `services.nix-deploy`, evaluated for real: nixpkgs'
//! own `lib` (the testkit's vendored copy) and `lib.evalModules` over
//! `nix/module.nix`, with small stubs for the NixOS options it touches
//! (`systemd.services`, `networking.firewall`, `users`, `nix`,
//! `assertions`, `warnings`) and a `pkgs` whose `formats.toml` writes JSON
//! (what the daemon's TOML holds, readable here). The daemon's own config
//! parser then reads what the module generates.

use std::path::Path;
use std::process::Command;

use nix_deploy_testkit::nix_string;
use serde_json::Value;

/// The evaluation harness around a module of `services.nix-deploy`
/// settings (`CONFIG`).
const HARNESS: &str = r#"
let
  lib = import LIB;
  inherit (lib) mkOption types;
  fakePackage = name: { type = "derivation"; inherit name; outPath = "/nix/store/00000000000000000000000000000000-${name}"; };
  loose = mkOption { type = types.attrsOf types.anything; default = { }; };
  stubs = {
    options = {
      systemd.services = mkOption { type = types.attrsOf (types.attrsOf types.anything); default = { }; };
      networking.firewall.allowedTCPPorts = mkOption { type = types.listOf types.port; default = [ ]; };
      networking.hostName = mkOption { type = types.str; default = "coordinator"; };
      users.users = loose;
      users.groups = loose;
      nix.settings = loose;
      services.postgresql = loose;
      services.grafana = loose;
      nix.package = mkOption { type = types.package; default = fakePackage "nix"; };
      assertions = mkOption { type = types.listOf types.unspecified; default = [ ]; };
      warnings = mkOption { type = types.listOf types.str; default = [ ]; };
    };
  };
  pkgs = {
    formats.toml = { }: {
      type = types.attrsOf types.anything;
      generate = name: value: builtins.toFile name (builtins.toJSON value);
    };
    openssh = fakePackage "openssh";
    git = fakePackage "git";
  };
  eval = lib.evalModules {
    modules = [ stubs MODULE CONFIG { _module.args.pkgs = pkgs; } ];
  };
  cfg = eval.config;
  unit = cfg.systemd.services.nix-deploy or null;
  configFile = if unit == null then null else lib.last (lib.splitString " " unit.serviceConfig.ExecStart);
in {
  inherit unit configFile;
  settings = if configFile == null then null else builtins.fromJSON (builtins.readFile configFile);
  ports = cfg.networking.firewall.allowedTCPPorts;
  failedAssertions = map (a: a.message) (lib.filter (a: !a.assertion) cfg.assertions);
  warnings = cfg.warnings;
}
"#;

struct Module {
    dir: tempfile::TempDir,
    lib: std::path::PathBuf,
}

impl Module {
    fn new() -> Module {
        let dir = tempfile::tempdir().unwrap();
        let lib = nix_deploy_testkit::nixos::nixpkgs_lib(dir.path()).unwrap();
        Module { dir, lib }
    }

    /// Evaluate the module with `config` (a module's attribute set); the
    /// harness's JSON, or Nix's error.
    fn eval(&self, config: &str) -> Result<Value, String> {
        let module = Path::new(env!("CARGO_MANIFEST_DIR")).join("nix/module.nix");
        let config_file = self.dir.path().join("config.nix");
        std::fs::write(&config_file, config).unwrap();
        let harness = HARNESS
            .replace("LIB", &self.lib.join("lib").display().to_string())
            .replace("MODULE", &module.display().to_string())
            .replace("CONFIG", &config_file.display().to_string());
        let file = self.dir.path().join("harness.nix");
        std::fs::write(&file, harness).unwrap();
        let out = std::process::Command::new("nix")
            .env("NIX_CONFIG", nix_deploy_testkit::nix_config())
            .args(["eval", "--json", "--file"])
            .arg(&file)
            .output()
            .expect("running nix eval");
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(serde_json::from_slice(&out.stdout).expect("JSON from nix eval"))
    }
}

/// A file holding a secret no other run has; its path and contents.
fn secret_file(dir: &Path, name: &str) -> (String, String) {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let contents = format!("{name}-secret-{nanos}");
    let path = dir.join(name);
    std::fs::write(&path, &contents).unwrap();
    (path.display().to_string(), contents)
}

#[test]
fn the_module_passes_every_secret_as_a_credential_and_hardens_the_service() {
    let module = Module::new();
    let secrets = tempfile::tempdir().unwrap();
    let (key, key_text) = secret_file(secrets.path(), "id_ed25519");
    let (token, token_text) = secret_file(secrets.path(), "ci-token");
    let (slack, slack_text) = secret_file(secrets.path(), "slack-signing");
    let (github, github_text) = secret_file(secrets.path(), "github-secret");
    let (hook, hook_text) = secret_file(secrets.path(), "slack-url");
    let config = format!(
        r#"{{
  services.nix-deploy = {{
    enable = true;
    package = {{ type = "derivation"; name = "nix-deploy"; outPath = "/nix/store/11111111111111111111111111111111-nix-deploy"; }};
    settings = {{
      flake = "github:me/fleet";
      listen = "0.0.0.0:7490";
      confirm-timeout = "1m";
      slack.response-url-prefixes = [ "https://hooks.slack.com/" ];
      github.branch = "production";
    }};
    openFirewall = true;
    sshKeyFile = {key};
    tokens.ci = {{ file = {token}; scope = "deploy"; }};
    slack.signingSecretFile = {slack};
    github.secretFile = {github};
    notifications.slackWebhookFiles = [ {hook} ];
  }};
}}"#,
        key = nix_string(&key),
        token = nix_string(&token),
        slack = nix_string(&slack),
        github = nix_string(&github),
        hook = nix_string(&hook),
    );
    let result = module.eval(&config).unwrap_or_else(|e| panic!("{e}"));
    let unit = &result["unit"];
    let service = &unit["serviceConfig"];

    // The daemon runs with the generated config, and git, ssh and Nix.
    let config_file = result["configFile"].as_str().unwrap();
    assert_eq!(
        service["ExecStart"],
        format!(
            "/nix/store/11111111111111111111111111111111-nix-deploy/bin/nix-deploy serve --config {config_file}"
        )
    );
    assert!(config_file.starts_with("/nix/store/") && config_file.ends_with("-nix-deploy.toml"));
    let path: Vec<&str> = unit["path"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert!(path.iter().any(|p| p.ends_with("-git")), "{path:?}");
    assert!(path.iter().any(|p| p.ends_with("-openssh")), "{path:?}");

    // Every secret is a credential read from its file, named in the config.
    let mut credentials: Vec<&str> = service["LoadCredential"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    credentials.sort_unstable();
    let mut expected = vec![
        format!("github-secret:{github}"),
        format!("slack-signing-secret:{slack}"),
        format!("slack-webhook-0:{hook}"),
        format!("ssh-key:{key}"),
        format!("token-ci:{token}"),
    ];
    expected.sort_unstable();
    assert_eq!(credentials, expected);
    let settings = &result["settings"];
    assert_eq!(settings["ssh-identity-file"], "ssh-key");
    assert_eq!(
        settings["tokens"],
        serde_json::json!([{ "name": "ci", "file": "token-ci", "scope": "deploy" }])
    );
    assert_eq!(
        settings["slack"]["signing-secret-file"],
        "slack-signing-secret"
    );
    assert_eq!(settings["github"]["secret-file"], "github-secret");
    assert_eq!(settings["github"]["branch"], "production");
    assert_eq!(
        settings["notifications"]["slack-webhook-files"],
        serde_json::json!(["slack-webhook-0"])
    );
    assert_eq!(
        settings["confirm-timeout"], "1m",
        "freeform settings pass through"
    );
    assert_eq!(settings["state-dir"], "/var/lib/nix-deploy");

    // No secret in the unit, the config or the generated file in the store.
    let stored = std::fs::read_to_string(config_file).unwrap();
    for text in [
        &key_text,
        &token_text,
        &slack_text,
        &github_text,
        &hook_text,
    ] {
        assert!(
            !result.to_string().contains(text.as_str()),
            "{text} in the evaluation"
        );
        assert!(!stored.contains(text.as_str()), "{text} in {config_file}");
    }

    // The daemon reads what the module writes (unknown keys would stop it).
    let toml = toml::to_string(settings).unwrap();
    let parsed = nix_deploy::daemon::config::Config::parse(&toml, Path::new("module.toml"))
        .unwrap_or_else(|e| panic!("{e}\n{toml}"));
    assert_eq!(parsed.listen, "0.0.0.0:7490");
    assert_eq!(parsed.tokens[0].file, Path::new("token-ci"));
    let credentials_dir = Path::new("/run/credentials/nix-deploy.service");
    let token_path = nix_deploy::daemon::config::secret_path(
        "tokens.file",
        &parsed.tokens[0].file,
        Some(credentials_dir),
    )
    .unwrap();
    assert_eq!(token_path, credentials_dir.join("token-ci"));

    // Hardening.
    for (key, value) in [
        ("UMask", serde_json::json!("0077")),
        (
            "RestrictAddressFamilies",
            serde_json::json!(["AF_UNIX", "AF_INET", "AF_INET6"]),
        ),
        (
            "SystemCallFilter",
            serde_json::json!(["@system-service", "~@privileged"]),
        ),
        ("CapabilityBoundingSet", serde_json::json!("")),
        ("NoNewPrivileges", serde_json::json!(true)),
        ("ProtectSystem", serde_json::json!("strict")),
        ("User", serde_json::json!("nix-deploy")),
    ] {
        assert_eq!(service[key], value, "{key}");
    }

    // The port of `listen`, opened because openFirewall asks.
    assert_eq!(result["ports"], serde_json::json!([7490]));
    assert_eq!(result["failedAssertions"], serde_json::json!([]));
}

#[test]
fn the_module_refuses_secrets_it_would_put_in_the_store() {
    let module = Module::new();
    let minimal = |extra: &str| {
        format!(
            r#"{{
  services.nix-deploy = {{
    enable = true;
    package = {{ type = "derivation"; name = "nix-deploy"; outPath = "/nix/store/11111111111111111111111111111111-nix-deploy"; }};
    settings.flake = "github:me/fleet";
    {extra}
  }};
}}"#
        )
    };

    // Defaults: loopback, no port opened, no credentials.
    let result = module.eval(&minimal("")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(result["ports"], serde_json::json!([]));
    assert_eq!(
        result["unit"]["serviceConfig"]["LoadCredential"],
        serde_json::json!([])
    );
    assert_eq!(result["settings"]["listen"], "127.0.0.1:7480");
    assert!(result["settings"].get("ssh-identity-file").is_none());

    // A Nix path would be copied into the store: it is a type error.
    let key = module.dir.path().join("key");
    std::fs::write(&key, "not copied").unwrap();
    let e = module
        .eval(&minimal(&format!("sshKeyFile = {};", key.display())))
        .unwrap_err();
    assert!(e.contains("sshKeyFile") && e.contains("not of type"), "{e}");
    let e = module
        .eval(&minimal(
            r#"tokens.ci.file = "/nix/store/00000000000000000000000000000000-token";"#,
        ))
        .unwrap_err();
    assert!(e.contains("outside the Nix store"), "{e}");

    // Webhook URLs inline (settings, or the removed options): refused.
    let result = module
        .eval(&minimal(
            r#"settings.notifications.slack-webhooks = [ "https://hooks.slack.com/services/X" ];"#,
        ))
        .unwrap();
    let failed = result["failedAssertions"].to_string();
    assert!(failed.contains("slackWebhookFiles"), "{failed}");
    let result = module
        .eval(&minimal(
            r#"notifications.slackWebhooks = [ "https://hooks.slack.com/services/X" ];"#,
        ))
        .unwrap();
    let failed = result["failedAssertions"].to_string();
    assert!(failed.contains("slackWebhookFiles"), "{failed}");

    // The old option names still work, with a warning.
    let result = module
        .eval(&minimal(
            r#"listen = "127.0.0.1:7555"; openFirewall = true;"#,
        ))
        .unwrap();
    assert_eq!(result["settings"]["listen"], "127.0.0.1:7555");
    let warnings = result["warnings"].to_string();
    assert!(warnings.contains("settings.listen"), "{warnings}");
    assert!(warnings.contains("loopback"), "{warnings}");
}

#[test]
fn the_modules_watch_and_mail_settings_reach_the_daemon_with_their_secrets_as_credentials() {
    let module = Module::new();
    let secrets = tempfile::tempdir().unwrap();
    let (hook, hook_text) = secret_file(secrets.path(), "webhook-secret");
    let (smtp, smtp_text) = secret_file(secrets.path(), "smtp-password");
    let config = format!(
        r#"{{
  services.nix-deploy = {{
    enable = true;
    package = {{ type = "derivation"; name = "nix-deploy"; outPath = "/nix/store/11111111111111111111111111111111-nix-deploy"; }};
    settings = {{
      flake = "github:me/fleet";
      notifications.email-to = [ "ops@example.org" ];
      smtp = {{ server = "smtp.example.org"; username = "nd"; from = "nix-deploy <nd@example.org>"; }};
      watch = {{ interval = "30s"; branch = "main"; on-drift = "report";
                rules = [ {{ on = "@web"; on-drift = "redeploy"; }} ]; }};
    }};
    notifications.webhookSecretFile = {hook};
    smtp.passwordFile = {smtp};
  }};
}}"#,
        hook = nix_string(&hook),
        smtp = nix_string(&smtp),
    );
    let result = module.eval(&config).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(result["failedAssertions"], serde_json::json!([]));
    // The signing secret and the SMTP password are credentials, named in
    // the config by their credential names, never in the store.
    let mut credentials: Vec<&str> = result["unit"]["serviceConfig"]["LoadCredential"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    credentials.sort_unstable();
    assert_eq!(
        credentials,
        [
            format!("smtp-password:{smtp}"),
            format!("webhook-secret:{hook}")
        ]
    );
    let settings = &result["settings"];
    assert_eq!(
        settings["notifications"]["webhook-secret-file"],
        "webhook-secret"
    );
    assert_eq!(settings["smtp"]["password-file"], "smtp-password");
    let stored = std::fs::read_to_string(result["configFile"].as_str().unwrap()).unwrap();
    for text in [&hook_text, &smtp_text] {
        assert!(!result.to_string().contains(text.as_str()), "{text}");
        assert!(!stored.contains(text.as_str()), "{text}");
    }
    // The daemon takes what the module writes, every watch key included.
    let toml = toml::to_string(settings).unwrap();
    let parsed = nix_deploy::daemon::config::Config::parse(&toml, Path::new("module.toml"))
        .unwrap_or_else(|e| panic!("{e}\n{toml}"));
    assert_eq!(parsed.watch.interval, std::time::Duration::from_secs(30));
    assert_eq!(parsed.watch.branch.as_deref(), Some("main"));
    assert_eq!(parsed.watch.rules[0].on, "@web");
    assert_eq!(parsed.notifications.email_to, ["ops@example.org"]);
    let smtp_config = parsed.smtp.unwrap();
    assert_eq!(smtp_config.server, "smtp.example.org");
    assert_eq!(
        smtp_config.password_file.as_deref(),
        Some(Path::new("smtp-password"))
    );
    // A password file without a server to use it for is refused.
    let result = module
        .eval(&format!(
            r#"{{
  services.nix-deploy = {{
    enable = true;
    package = {{ type = "derivation"; name = "nix-deploy"; outPath = "/nix/store/11111111111111111111111111111111-nix-deploy"; }};
    settings.flake = "github:me/fleet";
    smtp.passwordFile = {smtp};
  }};
}}"#,
            smtp = nix_string(&smtp)
        ))
        .unwrap();
    let failed = result["failedAssertions"].to_string();
    assert!(failed.contains("smtp.passwordFile"), "{failed}");
}

/// The fleet's ssh config without its `IdentityFile`s: ssh then has no key
/// unless one is given (`IdentitiesOnly yes` keeps the agent out).
fn config_without_keys(h: &crate::helpers::Harness, dir: &Path) -> std::path::PathBuf {
    let text = std::fs::read_to_string(h.fleet.ssh_config()).unwrap();
    let stripped: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("IdentityFile"))
        .map(|l| format!("{l}\n"))
        .collect();
    let path = dir.join("ssh_config");
    std::fs::write(&path, stripped).unwrap();
    path
}

#[test]
fn the_daemon_logs_in_with_the_ssh_key_and_token_it_gets_as_credentials() {
    use std::io::BufRead;
    use std::os::unix::fs::PermissionsExt;

    let h = crate::helpers::Harness::start(vec![nix_deploy_testkit::HostSpec::new("c1")]);
    let dir = tempfile::tempdir().unwrap();
    let ssh_config = config_without_keys(&h, dir.path());
    let cli = |args: &[&str]| {
        let out = Command::new(crate::helpers::binary())
            .arg("--flake")
            .arg(h.fleet.flake_ref())
            .arg("--ssh-config")
            .arg(&ssh_config)
            .arg("--state-dir")
            .arg(h.state_dir())
            .args(["--connect-timeout", "5", "--json"])
            .args(args)
            .envs(h.fleet.env())
            .output()
            .unwrap();
        let json: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        (
            out.status.code(),
            json,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // Without a key the host does not let us in; with --ssh-identity it does.
    let (code, report, _) = cli(&["plan", "--no-build"]);
    assert_eq!(code, Some(1));
    assert_eq!(report["unreachable"], serde_json::json!(["c1"]));
    let identity = h.fleet.identity().display().to_string();
    let (code, report, stderr) = cli(&["--ssh-identity", &identity, "plan", "--no-build"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(report["to_deploy"], serde_json::json!(["c1"]));

    // The daemon: its key and its token are systemd credentials (relative
    // paths in its config, read from $CREDENTIALS_DIRECTORY).
    let credentials = dir.path().join("credentials");
    std::fs::create_dir(&credentials).unwrap();
    std::fs::copy(h.fleet.identity(), credentials.join("ssh-key")).unwrap();
    std::fs::set_permissions(
        credentials.join("ssh-key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::fs::write(
        credentials.join("token-ci"),
        "credential-token-0123456789\n",
    )
    .unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        "listen = \"127.0.0.1:0\"\nconfirm-timeout = 5\nssh-identity-file = \"ssh-key\"\n\n\
         [[tokens]]\nname = \"ci\"\nfile = \"token-ci\"\nscope = \"deploy\"\n",
    )
    .unwrap();
    let serve = |credentials_dir: Option<&Path>| {
        let mut cmd = Command::new(crate::helpers::binary());
        cmd.arg("--flake")
            .arg(h.fleet.flake_ref())
            .arg("--ssh-config")
            .arg(&ssh_config)
            .arg("--state-dir")
            .arg(h.state_dir())
            .args(["serve", "--config"])
            .arg(&config)
            .envs(h.fleet.env())
            .env_remove("CREDENTIALS_DIRECTORY")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        if let Some(dir) = credentials_dir {
            cmd.env("CREDENTIALS_DIRECTORY", dir);
        }
        cmd.spawn().unwrap()
    };
    // Relative paths without credentials: refused at start, saying why.
    let refused = serve(None).wait_with_output().unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("CREDENTIALS_DIRECTORY"), "{stderr}");

    let mut daemon = serve(Some(&credentials));
    let mut line = String::new();
    std::io::BufReader::new(daemon.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("nix-deploy: listening on ")
        .map(str::to_string);
    let token_file = dir.path().join("client.token");
    std::fs::write(&token_file, "credential-token-0123456789").unwrap();
    let client = |url: &str, args: &[&str]| {
        Command::new(crate::helpers::binary())
            .args(["--json", "--server", url, "--token-file"])
            .arg(&token_file)
            .args(args)
            .output()
            .unwrap()
    };
    let deployed = url.as_deref().map(|url| client(url, &["deploy"]));
    // A plan through the daemon honours --revision (it was ignored): this
    // flake is a path, which cannot be pinned to a commit.
    let pinned = url
        .as_deref()
        .map(|url| client(url, &["plan", "--no-build", "--revision", &"a".repeat(40)]));
    let _ = daemon.kill();
    let _ = daemon.wait();
    let deployed = deployed.unwrap_or_else(|| panic!("the daemon did not start: {line:?}"));
    let report: Value = serde_json::from_slice(&deployed.stdout).unwrap_or(Value::Null);
    assert_eq!(
        deployed.status.code(),
        Some(0),
        "{report:#}\n{}",
        String::from_utf8_lossy(&deployed.stderr)
    );
    assert_eq!(
        h.fleet.current_system("c1"),
        Some(h.fleet.toplevel("c1").unwrap()),
        "copied and activated with the credential's key"
    );
    let pinned = pinned.unwrap();
    let stderr = String::from_utf8_lossy(&pinned.stderr);
    assert_eq!(pinned.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("cannot pin"), "{stderr}");
}
