//! The engine: evaluate, probe, plan and deploy, recording everything.
//!
//! Three layers, each importing only the ones below it (checked by
//! `layering::the_engine_layers_import_downwards`):
//!
//! - [`commands`]: what a caller asks for (`deploy`, `plan`, `build`, `doctor`, `resume`,
//!   `rollback`, `exec`, `upload-keys`, `health`, `promote`, and the watch's
//!   reads: the fleet the flake wants and what each host runs). The only `impl Engine`
//!   blocks; every command that records a run starts with the same preamble
//!   and ends in the same finish.
//! - [`fleet`]: many hosts at once: the evaluation, validation of a request,
//!   leases, probing, the schedule that decides when each host starts,
//!   blue-green's commit or revert, and the runner of `exec`-like runs.
//! - [`host`]: one host: its pipeline top to bottom, the one way back, the
//!   activator, the one reading of what a host runs, health checks, keys,
//!   GC roots, and the recorder every layer reports through.
//!
//! [`EngineError`] and [`EngineConfig`] are below all three.

mod commands;
mod config;
mod error;
mod fleet;
mod host;

pub use commands::{
    BuildRequest, DeployRequest, DesiredFleet, Engine, ExecJob, PROMOTE, PromoteJob, PushSource,
    RollbackRequest, UploadKeysRequest,
};
pub use config::{EngineConfig, Limit, Policy};
pub use error::EngineError;
