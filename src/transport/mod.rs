//! How the coordinator reaches hosts: SSH (one multiplexed master connection
//! per host, through the system `ssh`) for everything that runs on them, and
//! HTTP for health checks fetched from the coordinator.

pub mod http;
pub mod ssh;
