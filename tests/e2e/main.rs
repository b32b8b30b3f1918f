//! Integration tests: the real `nix-deploy` binary against real test hosts
//! (sshd in their own mount namespaces with their own /nix and /run, on
//! loopback addresses; see `nix_deploy_testkit`). Needs root.

// The test fleet and the programs that drive the real binary spawn processes
// themselves; the product does it only in `nix_deploy::process`.
#![allow(clippy::disallowed_methods)]

mod cli;
mod connections;
mod daemon;
mod deploy;
mod evaluation;
mod exec;
mod faults;
mod goals;
mod grafana;
mod helpers;
mod keys;
mod recovery;
mod safety;
mod selection;
mod strategies;
mod web;
mod web_login;
