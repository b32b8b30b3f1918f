//! Many hosts at once: everything between a validated request and each
//! host's own pipeline.
//!
//! - [`evaluate`]: the fleet's evaluation (every host's metadata, the
//!   selected hosts' systems), from the cache when it can, streamed host by
//!   host; [`shards`]: its rounds of bounded `nix eval` shards;
//! - [`prepare`]: a request validated against the evaluation (selection,
//!   dependency graph, options) before anything is recorded or touched;
//! - [`leases`]: one run per host, all or none, renewed by one heartbeat;
//! - [`probe`]: every selected host probed in parallel (bounded), what the
//!   planner needs to know of each;
//! - [`schedule`]: when each host may start (pure); [`execution`] drives it
//!   with real hosts, asking [`gates`] (maintenance windows, approval gates,
//!   pauses) before each start, and [`blue_green`] commits or reverts staged
//!   hosts together;
//! - [`promotion`]: promotion between environments: the fleet's metadata
//!   without its systems, source hosts vouched for, targets prepared to
//!   receive what their sources run;
//! - [`handoff`]: a deployment stopped at a safe point and let go for
//!   another coordinator to resume (this one is stopping);
//! - [`runner`]: `exec`-like runs, one command on every selected host.
//!
//! Nothing here switches a host itself: that is [`super::host`]'s.

pub(super) mod blue_green;
pub(super) mod evaluate;
pub(super) mod execution;
pub(super) mod gates;
pub(super) mod handoff;
pub(super) mod leases;
pub(super) mod prepare;
pub(super) mod probe;
pub(super) mod promotion;
pub(super) mod runner;
pub(super) mod schedule;
pub(super) mod shards;

use super::EngineConfig;
use crate::store::Store;

/// What the fleet layer works with: this process's configuration and the
/// history.
#[derive(Clone, Copy)]
pub(crate) struct FleetContext<'a> {
    pub config: &'a EngineConfig,
    pub store: &'a Store,
}
