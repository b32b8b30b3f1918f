//! The command-line grammar of a deployment, shared by the CLI and the chat
//! command (one parser, so the chat takes exactly the CLI's flags), and the
//! chat command's verbs.
//!
//! clap here is a pure parser: nothing reads the environment or prints; the
//! CLI adds what comes from its environment (`NIX_DEPLOY_STRATEGY`), and
//! the chat renders errors and help as messages.

use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::duration;
use crate::options::{Amount, Request};

/// Timeouts and checks of a run that touches hosts. Unset ones take the
/// defaults (locally) or the daemon's configured defaults (with --server).
#[derive(Args, Debug, Clone, Default)]
pub struct RuntimeArgs {
    /// Overall deadline of a host's health validation [default: 2m].
    #[arg(long, value_name = "DURATION", value_parser = duration::parse_timeout)]
    pub health_timeout: Option<Duration>,
    /// How long the watchdog on a host waits for confirmation (over a new SSH
    /// connection) before switching back to the previous generation by
    /// itself [default: 30s].
    #[arg(long, value_name = "DURATION", value_parser = duration::parse_timeout)]
    pub confirm_timeout: Option<Duration>,
    /// Pre-flight: free space /nix/store must have on the host, in MiB [default: 1024].
    #[arg(long, value_name = "MIB")]
    pub min_free_space: Option<u64>,
    /// Emergency deploy: skip pre-flight and health checks (the host must
    /// still run the new system afterwards).
    #[arg(long)]
    pub skip_validation: bool,
    /// Timeout of `switch-to-configuration` [default: 10m].
    #[arg(long, value_name = "DURATION", value_parser = duration::parse_timeout)]
    pub activation_timeout: Option<Duration>,
}

impl RuntimeArgs {
    /// Whether any of these flags was given.
    pub fn is_set(&self) -> bool {
        self.health_timeout.is_some()
            || self.confirm_timeout.is_some()
            || self.min_free_space.is_some()
            || self.skip_validation
            || self.activation_timeout.is_some()
    }

    pub fn apply(&self, request: &mut Request) {
        request.health_timeout = self.health_timeout;
        request.confirm_timeout = self.confirm_timeout;
        request.min_free_space_mib = self.min_free_space;
        request.skip_validation = self.skip_validation;
        request.activation_timeout = self.activation_timeout;
    }
}

/// Which hosts: names and globs (`web-*`), tags and tag globs (`@edge-*`),
/// several (the union), comma lists, exclusions. Every selector must match a
/// host: a typo exits 2.
#[derive(Args, Debug, Clone, Default)]
pub struct SelectArgs {
    /// Hosts by name or glob (`web-*`), or `@tag` / `@tag-glob`. None means every host.
    pub hosts: Vec<String>,
    /// Every host of the fleet.
    #[arg(long)]
    pub all: bool,
    /// Hosts by name or glob (`'web-*'`), or `@tag` / `@tag-glob`; repeatable,
    /// or comma-separated (the union).
    #[arg(long, value_name = "SEL")]
    pub on: Vec<String>,
    /// Leave out the hosts this selects (same syntax); repeatable.
    #[arg(long, value_name = "SEL")]
    pub exclude: Vec<String>,
}

impl SelectArgs {
    pub fn apply(&self, request: &mut Request) {
        request.hosts = self.hosts.clone();
        request.on = self.on.clone();
        request.all = self.all;
        request.exclude = self.exclude.clone();
    }

    /// The selection, checked for syntax.
    pub fn selection(&self) -> crate::fleet::Selection {
        crate::fleet::Selection {
            names: self.hosts.clone(),
            tags: self.on.clone(),
            all: self.all,
            exclude: self.exclude.clone(),
        }
    }
}

/// How the deployment is ordered and gated. Unset options take
/// the defaults (locally) or the daemon's configured defaults (with --server).
#[derive(Args, Debug, Clone)]
pub struct StrategyArgs {
    /// smart (default), parallel, rolling, sequential (rolling, batches of 1), canary or blue-green.
    /// (`NIX_DEPLOY_STRATEGY` on the command line.)
    #[arg(long)]
    pub strategy: Option<String>,
    /// Shorthand for --strategy parallel.
    #[arg(long, conflicts_with_all = ["sequential"])]
    pub parallel: bool,
    /// Shorthand for --strategy sequential.
    #[arg(long)]
    pub sequential: bool,
    /// Rolling batch size: N hosts or N% of the hosts to deploy [default: 1].
    #[arg(long, value_name = "N|N%", value_parser = amount)]
    pub batch_size: Option<Amount>,
    /// Canary host(s) for --strategy canary [default: the first changed host by name].
    #[arg(long, value_name = "HOST")]
    pub canary: Vec<String>,
    /// How long a canary is held and re-validated before the rest follow (e.g. 30s, 5m) [default: 5m].
    #[arg(long, value_name = "DURATION", value_parser = duration::parse)]
    pub canary_soak: Option<Duration>,
    /// Abort when more than N hosts (or N% of the hosts to deploy) fail [default: 0].
    #[arg(long, value_name = "N|N%", value_parser = amount)]
    pub max_failures: Option<Amount>,
    /// Never abort on failures; only the dependents of a failed host are skipped.
    #[arg(long)]
    pub continue_on_failure: bool,
    /// On abort, roll back every host this deployment changed [default: true].
    #[arg(long, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub rollback_all_on_abort: Option<bool>,
    /// Deploy (re-activate) unchanged hosts too.
    #[arg(long)]
    pub force: bool,
    /// Hosts deployed at once [default: 4].
    #[arg(long, short = 'p', value_name = "N")]
    pub parallel_limit: Option<usize>,
}

fn amount(text: &str) -> Result<Amount, String> {
    Amount::parse(text).map_err(|e| e.0)
}

impl StrategyArgs {
    pub fn apply(&self, request: &mut Request) {
        request.strategy = self.strategy.clone();
        request.parallel = self.parallel;
        request.sequential = self.sequential;
        request.batch_size = self.batch_size;
        request.canary = self.canary.clone();
        request.canary_soak = self.canary_soak;
        request.max_failures = self.max_failures;
        request.continue_on_failure = self.continue_on_failure;
        request.rollback_all_on_abort = self.rollback_all_on_abort;
        request.force = self.force;
        request.parallel_limit = self.parallel_limit;
    }
}

#[derive(Args, Debug, Clone)]
pub struct DeployArgs {
    #[command(flatten)]
    pub select: SelectArgs,
    #[command(flatten)]
    pub strategy: StrategyArgs,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    /// Wait for hosts another deployment holds instead of refusing.
    #[arg(long)]
    pub wait: bool,
    /// Deploy the flake pinned to this commit (as CI does after a push).
    #[arg(long, value_name = "SHA")]
    pub revision: Option<String>,
    /// Hosts fetch what their substituters have (the default; kept for
    /// older scripts).
    #[arg(long, hide = true, conflicts_with = "no_substitute")]
    pub substitute_on_destination: bool,
    #[command(flatten)]
    pub closure: ClosureArgs,
    /// switch (default: activate now and at boot), boot (the boot default
    /// only: activated at the next boot), test (activate now, not at boot),
    /// dry-activate (say what would start, stop, restart; change nothing).
    #[arg(long, value_name = "GOAL")]
    pub goal: Option<String>,
    /// Reboot after the activation and wait for the host to come back on the
    /// new system (switch and boot goals). `--reboot=auto`: only the hosts
    /// whose kernel or initrd changed.
    #[arg(long, value_name = "WHEN", num_args = 0..=1, require_equals = true, default_missing_value = "always")]
    pub reboot: Option<String>,
    /// How long a rebooting host may take to come back [default: 10m].
    #[arg(long, value_name = "DURATION", value_parser = duration::parse_timeout)]
    pub reboot_timeout: Option<Duration>,
    #[command(flatten)]
    pub gates: GateArgs,
    #[command(flatten)]
    pub results: ResultArgs,
}

/// Pauses and maintenance windows: what may hold a deployment, and the way
/// past a window (deployments and promotions take them alike).
#[derive(Args, Debug, Clone, Default)]
pub struct GateArgs {
    /// Stop after the canaries' soak until someone promotes the deployment
    /// (`nix-deploy approve ID`).
    #[arg(long)]
    pub pause_after_canary: bool,
    /// Rolling: stop after each batch until someone promotes the deployment.
    #[arg(long)]
    pub pause_after_batch: bool,
    /// Outside a maintenance window, refuse instead of waiting for it.
    #[arg(long)]
    pub no_wait: bool,
    /// Deploy outside the maintenance windows (admin; needs --reason; recorded).
    #[arg(long, requires = "reason")]
    pub override_window: bool,
    /// Why the windows are overridden (recorded in the audit trail).
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,
}

/// How a host gets its system's closure: built where, and whether it
/// substitutes what its binary caches have.
#[derive(Args, Debug, Clone, Default)]
pub struct ClosureArgs {
    /// Send every path from the coordinator: hosts do not substitute (by
    /// default they fetch what their binary caches have).
    #[arg(long)]
    pub no_substitute: bool,
    /// Every host builds its own system from the derivation (with its own
    /// substituters); the coordinator builds nothing.
    #[arg(long)]
    pub build_on_target: bool,
}

impl ClosureArgs {
    /// `substitute_on_destination`: the hidden `--substitute-on-destination`
    /// of older scripts says what is now the default.
    pub fn apply(&self, request: &mut Request, substitute_on_destination: bool) {
        request.substitute_on_destination = if self.no_substitute {
            Some(false)
        } else {
            substitute_on_destination.then_some(true)
        };
        request.build_on_target = self.build_on_target;
    }
}

/// What happens to keys and built systems, as colmena's flags say it.
#[derive(Args, Debug, Clone, Default)]
pub struct ResultArgs {
    /// Do not upload `deployment.keys` (`upload-keys` does it alone).
    #[arg(long)]
    pub no_keys: bool,
    /// Keep each built system as a GC root, `STATE/results/HOST`, until the
    /// next kept result of that host (deployments also root what they deploy
    /// under `STATE/gcroots`, three per host).
    #[arg(long)]
    pub keep_result: bool,
}

impl ResultArgs {
    pub fn apply(&self, request: &mut Request) {
        request.no_keys = self.no_keys;
        request.keep_result = self.keep_result;
    }
}

impl GateArgs {
    pub fn apply(&self, request: &mut Request) -> Result<(), crate::options::OptionsError> {
        if self.reason.is_some() && !self.override_window {
            return Err(crate::options::OptionsError(
                "--reason goes with --override-window".into(),
            ));
        }
        request.pause_after_canary = self.pause_after_canary;
        request.pause_after_batch = self.pause_after_batch;
        request.no_wait = self.no_wait;
        request.override_window = self
            .override_window
            .then(|| self.reason.clone().unwrap_or_default());
        Ok(())
    }
}

/// `promote`: the systems the source hosts run, deployed to the hosts
/// paired with them by `deployment.promotionKey`.
#[derive(Args, Debug, Clone)]
pub struct PromoteArgs {
    /// The source hosts (selectors, e.g. `@staging`; repeatable, or comma
    /// lists).
    #[arg(long, value_name = "SEL", required = true)]
    pub from: Vec<String>,
    /// The target hosts (selectors, e.g. `@prod`; repeatable, or comma lists).
    #[arg(long, value_name = "SEL", required = true)]
    pub to: Vec<String>,
    #[command(flatten)]
    pub strategy: StrategyArgs,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    #[command(flatten)]
    pub gates: GateArgs,
    /// Wait for target hosts another deployment holds instead of refusing.
    #[arg(long)]
    pub wait: bool,
}

impl PromoteArgs {
    /// The request this command line makes.
    pub fn request(&self) -> Result<crate::promote::PromoteRequest, crate::options::OptionsError> {
        let mut options = Request::default();
        self.strategy.apply(&mut options);
        self.runtime.apply(&mut options);
        self.gates.apply(&mut options)?;
        let request = crate::promote::PromoteRequest {
            from: self.from.clone(),
            to: self.to.clone(),
            wait: self.wait,
            options,
        };
        request.check()?;
        Ok(request)
    }
}

impl DeployArgs {
    /// The request this command line makes.
    pub fn request(&self) -> Result<Request, crate::options::OptionsError> {
        let mut request = Request {
            wait: self.wait,
            revision: self.revision.clone(),
            goal: self.goal.clone(),
            reboot: self
                .reboot
                .as_deref()
                .map(crate::goal::RebootPolicy::parse)
                .transpose()?,
            reboot_timeout: self.reboot_timeout,
            ..Request::default()
        };
        self.gates.apply(&mut request)?;
        self.select.apply(&mut request);
        self.strategy.apply(&mut request);
        self.runtime.apply(&mut request);
        self.results.apply(&mut request);
        self.closure
            .apply(&mut request, self.substitute_on_destination);
        Ok(request)
    }
}

/// The request of `plan`.
pub fn plan_request(
    select: &SelectArgs,
    strategy: &StrategyArgs,
    no_build: bool,
    revision: Option<&str>,
) -> Request {
    let mut request = Request {
        summaries: no_build.then_some(false),
        revision: revision.map(str::to_string),
        ..Request::default()
    };
    select.apply(&mut request);
    strategy.apply(&mut request);
    request
}

/// The options of `rollback`.
pub fn runtime_request(runtime: &RuntimeArgs) -> Request {
    let mut request = Request::default();
    runtime.apply(&mut request);
    request
}

/// `/nix-deploy VERB ...`: what a chat message may ask.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "/nix-deploy",
    no_binary_name = true,
    disable_version_flag = true,
    disable_help_subcommand = true,
    about = "Deploy and watch the fleet from chat"
)]
pub struct Chat {
    #[command(subcommand)]
    pub verb: ChatVerb,
}

/// The chat verbs: explicit, so that no word is ever taken for a host by
/// accident.
#[derive(Subcommand, Debug, Clone)]
pub enum ChatVerb {
    /// Deploy, with the CLI's flags (a deployment touching more hosts than
    /// the configured limit asks for confirmation first).
    Deploy(Box<DeployArgs>),
    /// Show what a deployment would do. Changes nothing.
    Plan {
        #[command(flatten)]
        select: SelectArgs,
        #[command(flatten)]
        strategy: StrategyArgs,
    },
    /// Every host's last known state.
    Status,
    /// Recent deployments.
    History {
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(i64).range(1..=50))]
        limit: i64,
    },
    /// One deployment.
    Show { id: i64 },
    /// Switch a host back to an earlier generation.
    Rollback {
        host: String,
        #[arg(long, value_name = "N")]
        to_generation: Option<u32>,
    },
    /// Stop a running deployment from starting more hosts.
    Cancel { id: Option<i64> },
    /// Approve (or promote) a deployment that waits for it.
    Approve {
        id: i64,
        #[arg(long, value_name = "TEXT")]
        comment: Option<String>,
    },
    /// Reject a deployment that waits for approval.
    Reject {
        id: i64,
        #[arg(long, value_name = "TEXT", required = true)]
        reason: String,
    },
    /// This help.
    Help,
}

/// Words of a chat message, as a shell would split plain words: quotes
/// around a word (straight or typographic, as chat clients send them) are
/// dropped.
fn words(text: &str) -> Vec<String> {
    const QUOTES: &[char] = &['\'', '"', '\u{2018}', '\u{2019}', '\u{201c}', '\u{201d}'];
    text.split_whitespace()
        .map(|w| w.trim_matches(QUOTES).to_string())
        .filter(|w| !w.is_empty())
        .collect()
}

/// Parse the text after `/nix-deploy`. Nothing at all is `help`; flags
/// without a verb (`--strategy=canary`) are `deploy`, as the first chat
/// command was written; anything else needs its verb. An error comes back
/// as clap renders it, usage included.
pub fn parse_chat(text: &str) -> Result<ChatVerb, String> {
    let mut words = words(text);
    match words.first() {
        None => return Ok(ChatVerb::Help),
        Some(first) if first.starts_with("--") && first != "--help" => {
            words.insert(0, "deploy".into())
        }
        _ => {}
    }
    Chat::try_parse_from(&words)
        .map(|chat| chat.verb)
        .map_err(|e| e.render().to_string())
}

/// The chat's help text.
pub fn chat_help() -> String {
    use clap::CommandFactory;
    Chat::command().render_long_help().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deploy(text: &str) -> Request {
        match parse_chat(text).unwrap() {
            ChatVerb::Deploy(args) => args.request().unwrap(),
            other => panic!("{text}: {other:?}"),
        }
    }

    #[test]
    fn a_bare_command_is_help_and_words_never_become_hosts_by_accident() {
        assert!(matches!(parse_chat("").unwrap(), ChatVerb::Help));
        assert!(matches!(parse_chat("   ").unwrap(), ChatVerb::Help));
        assert!(matches!(parse_chat("help").unwrap(), ChatVerb::Help));
        assert!(matches!(parse_chat("plan").unwrap(), ChatVerb::Plan { .. }));
        assert!(matches!(
            parse_chat("rollback p620").unwrap(),
            ChatVerb::Rollback { host, to_generation: None } if host == "p620"
        ));
        // A host name without a verb is not a deployment.
        let e = parse_chat("p620 razer").unwrap_err();
        assert!(e.contains("p620"), "{e}");
        assert!(parse_chat("stauts").is_err());
    }

    #[test]
    fn flags_without_a_verb_deploy_with_every_flag_of_the_cli() {
        let r = deploy("--strategy=canary");
        assert_eq!(r.strategy.as_deref(), Some("canary"));
        assert!(r.hosts.is_empty());
        let r = deploy(
            "deploy 'web-*' --on @edge --exclude web-3 --reboot --parallel-limit 2 --skip-validation --goal boot",
        );
        assert_eq!(r.hosts, ["web-*"]);
        assert_eq!(r.on, ["@edge"]);
        assert_eq!(r.exclude, ["web-3"]);
        assert_eq!(r.reboot, Some(crate::goal::RebootPolicy::Always));
        assert_eq!(r.parallel_limit, Some(2));
        assert!(r.skip_validation);
        assert_eq!(r.goal.as_deref(), Some("boot"));
        let r = deploy("deploy p620 --strategy canary --pause-after-canary --canary-soak 1s");
        assert!(r.pause_after_canary);
        assert_eq!(r.canary_soak, Some(Duration::from_secs(1)));
        let r = deploy("deploy --override-window --reason “hotfix”");
        assert_eq!(r.override_window.as_deref(), Some("hotfix"));
        assert!(
            parse_chat("deploy --override-window").is_err(),
            "a reason is needed"
        );
        assert!(parse_chat("deploy --strategy").is_err());
        assert!(parse_chat("deploy --nope").is_err());
        assert!(parse_chat("deploy --parallel --sequential").is_err());
        assert!(parse_chat("deploy --canary-soak=10x").is_err());
    }

    #[test]
    fn approvals_and_rejections_need_their_arguments() {
        assert!(matches!(
            parse_chat("approve 12").unwrap(),
            ChatVerb::Approve {
                id: 12,
                comment: None
            }
        ));
        assert!(parse_chat("approve").is_err());
        assert!(parse_chat("reject 12").is_err(), "a reason is needed");
        assert!(matches!(
            parse_chat("reject 12 --reason broken").unwrap(),
            ChatVerb::Reject { id: 12, reason } if reason == "broken"
        ));
        assert!(matches!(
            parse_chat("cancel").unwrap(),
            ChatVerb::Cancel { id: None }
        ));
        assert!(chat_help().contains("approve"));
    }

    #[derive(Parser, Debug)]
    struct PromoteLine {
        #[command(flatten)]
        args: PromoteArgs,
    }

    #[test]
    fn promote_takes_both_sides_and_the_deployment_flags() {
        let parse = |line: &str| PromoteLine::try_parse_from(line.split_whitespace());
        let args = parse("x --from @staging --to @prod,p9 --strategy rolling --pause-after-batch")
            .unwrap()
            .args;
        let request = args.request().unwrap();
        assert_eq!(request.from, ["@staging"]);
        assert_eq!(request.to, ["@prod,p9"]);
        assert_eq!(request.options.strategy.as_deref(), Some("rolling"));
        assert!(request.options.pause_after_batch);
        assert!(parse("x --from @staging").is_err(), "--to is needed");
        assert!(parse("x --from @s --to @p --override-window").is_err());
        assert!(
            parse("x --from @s --to @p --reason why")
                .unwrap()
                .args
                .request()
                .is_err(),
            "--reason without --override-window"
        );
    }
}
