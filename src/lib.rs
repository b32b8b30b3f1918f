//! # nix-deploy
//!
//! A NixOS fleet deployment coordinator: evaluates a flake's
//! `nixosConfigurations` once, asks every host what it runs, and deploys only
//! what changed, step by step, with rollback and a full history.
//!
//! ## Layout
//! - [`inventory`]: the fleet from the flake (hosts, `config.deployment`), selection.
//! - [`nix`]: local Nix: the one evaluation, builds, closure copies.
//! - [`exec`]: the one place that spawns local processes.
//! - [`ssh`]: master connections to hosts, remote commands with timeouts.
//! - [`shell`]: the one quoting helper and name validation.
//! - [`remote`]: what we run on hosts, as pure argv builders and parsers.
//! - [`plan`]: the pure planner.
//! - [`engine`]: probing and deploying, with bounded concurrency and cancellation.
//! - [`events`]: statuses, steps and events.
//! - [`store`]: SQLite history.
//! - [`cli`]: the command line.
//! - [`testkit`]: real test hosts (sshd in mount namespaces) for tests, demo and benchmarks.

pub mod api;
pub mod cli;
pub mod client;
pub mod config;
pub mod duration;
pub mod engine;
pub mod events;
pub mod exec;
pub mod github;
pub mod health;
pub mod http;
pub mod inventory;
pub mod metrics;
pub mod nix;
pub mod notify;
pub mod plan;
pub mod remote;
pub mod shell;
pub mod slack;
pub mod ssh;
pub mod store;
pub mod summary;
pub mod testkit;
