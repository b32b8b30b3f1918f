//! The coordinators sharing one history (`GET /api/v1/cluster`): who they
//! are, when each last renewed its leases, who leads, and who holds which
//! running deployment at which epoch.

use serde::{Deserialize, Serialize};

/// The whole cluster, as the database sees it now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterReport {
    /// `sqlite` or `postgresql`.
    pub backend: String,
    /// The database's clock (Unix ms), which every lease and heartbeat is
    /// measured by.
    pub now: i64,
    /// How long a lease or a leadership lasts unrenewed, in ms.
    pub lease_ttl_ms: i64,
    /// The elected leader's coordinator id, while its term lasts.
    pub leader: Option<String>,
    pub coordinators: Vec<Coordinator>,
    /// Deployments running (or being taken over), with their holders (none
    /// for one handed over and not yet taken).
    pub deployments: Vec<DeploymentLease>,
}

/// One coordinator process (a daemon, or a CLI working in-process).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Coordinator {
    pub id: String,
    /// `daemon` or `cli`.
    pub kind: String,
    pub hostname: String,
    pub pid: i64,
    pub version: String,
    /// Whether it takes over deployments whose holder's lease expired (a
    /// stopping daemon takes nothing over any more).
    pub takeover: bool,
    /// A daemon stopping: it hands its deployments over to the daemons
    /// that take deployments over (or, without any, cancels them).
    #[serde(default)]
    pub stopping: bool,
    /// Deployments it handed over to another coordinator as it stopped.
    #[serde(default)]
    pub handed_over: i64,
    pub started_at: i64,
    pub heartbeat_at: i64,
    /// Its last heartbeat is younger than the lease TTL.
    pub alive: bool,
    pub leader: bool,
}

/// A deployment's lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentLease {
    pub deployment_id: i64,
    pub status: String,
    /// The coordinator holding it.
    pub holder: Option<String>,
    /// Raised by every taking (creation, resume, takeover).
    pub epoch: i64,
    pub lease_expires_at: Option<i64>,
}
