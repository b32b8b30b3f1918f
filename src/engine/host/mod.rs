//! One host: everything that happens to a single machine during a run.
//!
//! - [`pipeline`]: the host's steps top to bottom, in one short function,
//!   and what a failure leads to; [`steps`] (up to the activation) and
//!   [`prove`] (validation, confirmation, soak) are its steps, [`reboot`]
//!   its reboots, [`failure`] where it failed and what that means;
//! - [`way_back`]: every switch back, in one module;
//! - [`activator`]: `switch-to-configuration` run detached on the host and
//!   waited for (activations and every switch back);
//! - [`observe`]: what a host runs (the probe), and settling what a dead
//!   coordinator left;
//! - [`fence`]: the deployment's epoch every host-changing script carries,
//!   and what a host refusing it means;
//! - [`health`]: health checks; [`keys`]: `deployment.keys`, and
//!   [`keys_back`]: keys follow the system on every way back; [`summary`]:
//!   change summaries; [`gcroots`]: the coordinator's GC roots;
//!   [`on_target`]: a system built on its host (`buildOnTarget`);
//! - [`recorder`]: how every layer reports, stored before anyone is told;
//! - [`context`]: what a host's steps work with.
//!
//! Nothing here knows about other hosts or about commands.

pub(crate) mod activator;
pub(crate) mod context;
pub(crate) mod failure;
pub(crate) mod fence;
pub(crate) mod gcroots;
pub(crate) mod health;
pub(crate) mod keys;
pub(crate) mod keys_back;
pub(crate) mod observe;
pub(crate) mod on_target;
pub(crate) mod pipeline;
pub(crate) mod prove;
pub(crate) mod reboot;
pub(crate) mod recorder;
pub(crate) mod steps;
pub(crate) mod summary;
pub(crate) mod way_back;
