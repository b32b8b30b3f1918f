//! Integration tests: the real `nix-deploy` binary against real test hosts
//! (sshd in their own mount namespaces with their own /nix and /run, on
//! loopback addresses; see `nix_deploy_testkit`). Needs root.

// The test fleet and the programs that drive the real binary spawn processes
// themselves; the product does it only in `nix_deploy::process`.
#![allow(clippy::disallowed_methods)]

mod builds;
mod cli;
mod cluster;
mod cluster_fencing;
mod cluster_handoff;
mod commands;
mod connections;
mod daemon;
mod deploy;
mod evaluation;
mod exec;
mod exec_api;
mod faults;
mod found_by_chaos;
mod goals;
mod grafana;
mod helpers;
mod hooks;
mod hosts;
mod identity;
mod keys;
mod keys_undo;
mod local;
mod metadata;
mod module;
mod ops;
mod ops2;
mod promotion;
mod recipes;
mod recovery;
mod reporting;
mod safety;
mod selection;
mod smtp;
mod sources;
mod strategies;
mod watch;
mod watch_cluster;
mod watch_edges;
mod web;
mod web_login;
mod web_ops;
