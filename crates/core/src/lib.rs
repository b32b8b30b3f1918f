//! # nix-deploy-core
//!
//! The pure core of nix-deploy: what a fleet, a deployment and a plan *are*,
//! and every decision that needs no IO. It depends on no async runtime,
//! database, HTTP or SSH library and spawns nothing; the product crate
//! (`nix-deploy`: engine, transport, store, daemon, CLI) does the IO around it.
//!
//! ## Layout
//! - [`fleet`]: hosts and their `config.deployment` (parsed from the one
//!   evaluation), health-check definitions, selection.
//! - [`options`]: the request callers send and the resolved options of a
//!   deployment (one document each).
//! - [`events`]: steps, statuses, events, health-check results.
//! - [`run`]: host runs and deployments as recorded and reported.
//! - [`reports`]: the other documents: plan, status, a host's health.
//! - [`plan`]: the planner (dependency graph, strategies, estimates, risk).
//! - [`summary`]: change summaries from two closures.
//! - [`remote`]: what runs on hosts, as argument vectors and parsers.
//! - [`nix`], [`command`]: local Nix command lines as data.
//! - [`doctor`]: `nix-deploy doctor`'s verdicts and fixes.
//! - [`eval`]: evaluation at fleet scale: shards, workers, the cache key.
//! - [`introspect`]: `nix-deploy eval`, an expression against the fleet.
//! - [`shell`]: the one quoting helper and name validation.
//! - [`duration`]: durations as people write them.
//! - [`render`]: plain-text rendering shared by the CLI, reports and chat.
//! - [`select`]: selection as people write it (globs, tags, exclusions).
//! - [`goal`]: deployment goals (switch, boot, test, dry-activate) and
//!   reboots: what each does, how it is validated and undone.
//! - [`keys`]: secrets uploaded outside the store (`deployment.keys`).
//! - [`exec`]: commands run on many hosts (`nix-deploy exec`).
//! - [`drift`]: how a host stands against the flake and our history
//!   (in sync, behind, manually switched, unhealthy, ...), and which
//!   changes are alerted.
//! - [`watch`]: the fleet as the daemon's watch sees it, its events and
//!   alerts; [`pull`]: following a branch of the flake's git remote.
//! - [`window`]: maintenance windows (cron, time zones, allow and deny).
//! - [`approval`]: approval rules, gates and pauses: who may say yes.
//! - [`audit`]: the audit trail's entries and its hash chain.
//! - [`grammar`]: the deploy flags (one clap parser for the CLI and chat)
//!   and the chat command's verbs.
//! - [`scheduled`]: scheduled deployments: when each `[[schedule]]` is due.
//! - [`promote`]: promotion between environments: pairing by key, the
//!   verdict on a source host, what is recorded.
//! - [`suggest`]: "did you mean" for mistyped names.
//! - [`cluster`]: the coordinators sharing one history, their leases and leader.

pub mod approval;
pub mod attrs;
pub mod audit;
pub mod cluster;
pub mod command;
pub mod doctor;
pub mod drift;
pub mod duration;
pub mod eval;
pub mod events;
pub mod exec;
pub mod fleet;
pub mod goal;
pub mod grammar;
pub mod introspect;
pub mod keys;
pub mod nix;
pub mod options;
pub mod plan;
pub mod promote;
pub mod pull;
pub mod remote;
pub mod render;
pub mod reports;
pub mod run;
pub mod scheduled;
pub mod select;
pub mod shell;
pub mod source;
pub mod sshopts;
pub mod suggest;
pub mod summary;
pub mod watch;
pub mod window;
