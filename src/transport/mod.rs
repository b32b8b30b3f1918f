//! How the coordinator reaches hosts: SSH (one multiplexed master connection
//! per host, through the system `ssh`, reading a host's own ssh options from
//! [`host_config`]; or local processes for the host that is this machine,
//! `apply-local`) for everything that runs on them, and HTTP for health
//! checks fetched from the coordinator.

pub mod host_config;
pub mod http;
pub mod ssh;
