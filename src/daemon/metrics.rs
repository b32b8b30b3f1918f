//! `GET /metrics`: the history as Prometheus/OpenMetrics text (encoded by
//! `prometheus-client`): deployments and host runs by result, rollbacks,
//! deployment and step durations (histograms), hosts by last result, running
//! deployments, and the mean time to recovery; and the cluster: this daemon's
//! leadership and takeovers, each coordinator's heartbeat lag. Computed from
//! the history on each scrape, so it is always what the history says,
//! whichever process (daemon or CLI) deployed.
//!
//! Per host, from the watch: up, in sync, each drift kind (0 or 1), healthy,
//! running generation, last sight and last successful deployment; whether
//! the tracked flake evaluates; and `nix_deploy_build_info`.

use std::collections::BTreeMap;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use sqlx::Row;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

use nix_deploy_core::drift::DriftKind;
use nix_deploy_core::watch::FleetReport;

use crate::store::{STEP_BUCKETS, StepHistogram, Store, StoreError};

/// A histogram kept by the store (counted as steps finish), encoded as is.
#[derive(Debug, Default)]
struct StoredHistogram(std::sync::Mutex<Option<StepHistogram>>);

impl StoredHistogram {
    fn set(&self, histogram: StepHistogram) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(histogram);
    }
}

impl TypedMetric for StoredHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for StoredHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let stored = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let Some(h) = stored.as_ref() else {
            return Ok(());
        };
        // Per-bucket counts with their upper bounds; the last is +Inf.
        let buckets: Vec<(f64, u64)> = STEP_BUCKETS
            .iter()
            .copied()
            .chain(std::iter::once(f64::MAX))
            .zip(h.buckets.iter().copied())
            .collect();
        encoder.encode_histogram::<NoLabelSet>(h.sum_seconds, h.count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

const DURATION_BUCKETS: [f64; 10] = [
    1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];

type Labels = Vec<(String, String)>;

fn query_error(context: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |source| StoreError::Query { context, source }
}

async fn counts(store: &Store, sql: &'static str) -> Result<Vec<(String, i64)>, StoreError> {
    let rows = sqlx::query(sql)
        .fetch_all(store.pool())
        .await
        .map_err(query_error("reading metrics"))?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get::<Option<String>, _>(0).unwrap_or_default(),
                r.get::<i64, _>(1),
            )
        })
        .collect())
}

/// A family of counters or gauges, one per label value, from `(value, n)` rows.
fn by_label<M: Default + Clone + prometheus_client::metrics::TypedMetric>(
    label: &str,
    rows: &[(String, i64)],
    set: impl Fn(&M, i64),
) -> Family<Labels, M> {
    let family = Family::<Labels, M>::default();
    for (value, n) in rows {
        set(
            &family.get_or_create(&vec![(label.to_string(), value.clone())]),
            *n,
        );
    }
    family
}

/// Leadership, takeovers, and how long ago each coordinator's heartbeat was
/// (by the database's clock).
async fn register_cluster(
    registry: &mut Registry,
    store: &Store,
    node: Node,
) -> Result<(), StoreError> {
    let leader = Gauge::<i64>::default();
    leader.set(i64::from(node.leader));
    registry.register(
        "cluster_leader",
        "Whether this daemon is the elected leader (1) or not (0)",
        leader,
    );
    let takeovers = Counter::<u64>::default();
    takeovers.inc_by(node.takeovers);
    registry.register(
        "cluster_takeovers",
        "Deployments this daemon took over from a coordinator whose lease expired or that handed them over",
        takeovers,
    );
    let received = Counter::<u64>::default();
    received.inc_by(node.handoffs_received);
    registry.register(
        "cluster_handoffs_received",
        "Deployments this daemon took over because their holder handed them over as it stopped",
        received,
    );
    let cluster = store.cluster().await?;
    let lag = Family::<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    for c in &cluster.coordinators {
        lag.get_or_create(&vec![
            ("coordinator".to_string(), c.id.clone()),
            ("kind".to_string(), c.kind.clone()),
            ("hostname".to_string(), c.hostname.clone()),
        ])
        .set((cluster.now - c.heartbeat_at).max(0) as f64 / 1000.0);
    }
    registry.register(
        "cluster_heartbeat_lag_seconds",
        "Time since each coordinator's last heartbeat (the lease TTL is nix_deploy_cluster_lease_ttl_seconds)",
        lag,
    );
    let alive = Gauge::<i64>::default();
    alive.set(cluster.coordinators.iter().filter(|c| c.alive).count() as i64);
    registry.register(
        "cluster_coordinators_alive",
        "Coordinators whose last heartbeat is younger than the lease TTL",
        alive,
    );
    let stopping = Gauge::<i64>::default();
    stopping.set(cluster.coordinators.iter().filter(|c| c.stopping).count() as i64);
    registry.register(
        "cluster_coordinators_stopping",
        "Daemons stopping, handing their deployments over to the others",
        stopping,
    );
    // A gauge: a stopped daemon leaves the coordinators, and its count with it.
    let handed = Gauge::<i64>::default();
    handed.set(cluster.coordinators.iter().map(|c| c.handed_over).sum());
    registry.register(
        "cluster_handed_over",
        "Deployments handed over so far by the daemons still registered (stopping ones), as they stop",
        handed,
    );
    let ttl = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
    ttl.set(cluster.lease_ttl_ms as f64 / 1000.0);
    registry.register(
        "cluster_lease_ttl_seconds",
        "How long a lease lasts unrenewed",
        ttl,
    );
    Ok(())
}

/// Mean time from a host's failure to its next successful deployment, over
/// every such recovery in the history; `None` without any.
pub fn mean_time_to_recovery(runs: &[(String, String, i64)]) -> Option<f64> {
    // (host, status, finished_at), ordered by host then time.
    let mut failed_since: BTreeMap<&str, i64> = BTreeMap::new();
    let mut recoveries = Vec::new();
    for (host, status, finished) in runs {
        match status.as_str() {
            "failed" | "rolled-back" | "rollback-failed" => {
                failed_since.entry(host).or_insert(*finished);
            }
            "deployed" => {
                if let Some(since) = failed_since.remove(host.as_str()) {
                    recoveries.push((finished - since) as f64 / 1000.0);
                }
            }
            _ => {}
        }
    }
    (!recoveries.is_empty()).then(|| recoveries.iter().sum::<f64>() / recoveries.len() as f64)
}

/// What only this daemon knows about itself in the cluster.
#[derive(Clone, Copy, Debug, Default)]
pub struct Node {
    pub leader: bool,
    /// Deployments this daemon took over since it started.
    pub takeovers: u64,
    /// Of those, the ones their holder handed over as it stopped.
    pub handoffs_received: u64,
}

/// A gauge family keyed by host (and more labels).
type Gauges<N> = Family<Labels, Gauge<N, <N as GaugeNumber>::Atomic>>;

/// The numbers our gauges hold, with their atomics.
trait GaugeNumber {
    type Atomic: Default + std::fmt::Debug;
}
impl GaugeNumber for i64 {
    type Atomic = std::sync::atomic::AtomicI64;
}
impl GaugeNumber for f64 {
    type Atomic = std::sync::atomic::AtomicU64;
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The watch's per-host gauges and the last successful deployment per host.
async fn register_hosts(
    registry: &mut Registry,
    store: &Store,
    fleet: &FleetReport,
) -> Result<(), StoreError> {
    let up = Gauges::<i64>::default();
    let in_sync = Gauges::<i64>::default();
    let drift = Gauges::<i64>::default();
    let healthy = Gauges::<i64>::default();
    let generation = Gauges::<i64>::default();
    let last_seen = Gauges::<f64>::default();
    for host in &fleet.hosts {
        let name = host.name.as_str();
        let one = labels(&[("host", name)]);
        if let Some(reachable) = host.reachable {
            up.get_or_create(&one).set(i64::from(reachable));
        }
        in_sync
            .get_or_create(&one)
            .set(i64::from(host.has(DriftKind::InSync)));
        for kind in DriftKind::ALL {
            drift
                .get_or_create(&labels(&[("host", name), ("kind", kind.as_str())]))
                .set(i64::from(host.has(kind)));
        }
        if let Some(ok) = host.healthy {
            healthy.get_or_create(&one).set(i64::from(ok));
        }
        if let Some(g) = host.generation {
            generation.get_or_create(&one).set(i64::from(g));
        }
        if let Some(seen) = host.last_seen {
            last_seen.get_or_create(&one).set(seen as f64 / 1000.0);
        }
    }
    registry.register("host_up", "Whether the host's last probe reached it", up);
    registry.register(
        "host_in_sync",
        "Whether the host runs what the flake evaluates to, healthy, with nothing else to say",
        in_sync,
    );
    registry.register(
        "host_drift",
        "Whether the host is in each drift kind (in-sync, behind, pending-reboot, boot-mismatch, manual-switch, manual-rollback, unhealthy, unreachable, desired-unknown)",
        drift,
    );
    registry.register(
        "host_healthy",
        "Whether the host's last health checks passed",
        healthy,
    );
    registry.register(
        "host_generation",
        "The generation of the host's system profile",
        generation,
    );
    registry.register(
        "host_last_seen_timestamp_seconds",
        "When a probe last reached the host",
        last_seen,
    );
    let deployed = Gauges::<f64>::default();
    for (host, at) in store.last_deployed().await? {
        deployed
            .get_or_create(&labels(&[("host", &host)]))
            .set(at as f64 / 1000.0);
    }
    registry.register(
        "host_last_successful_deployment_timestamp_seconds",
        "When the host's last successful deployment ended",
        deployed,
    );
    if fleet.watching {
        let evaluates = Gauge::<i64>::default();
        evaluates.set(i64::from(fleet.evaluation_error.is_none()));
        registry.register(
            "fleet_evaluates",
            "Whether the tracked flake evaluates (1) or every host's desired system is unknown (0)",
            evaluates,
        );
    }
    Ok(())
}

/// The history as metrics; with `fleet` (the daemon's watch, when it
/// watches), per host too.
pub async fn render(
    store: &Store,
    node: Node,
    fleet: Option<&FleetReport>,
) -> Result<String, StoreError> {
    let mut registry = Registry::with_prefix("nix_deploy");
    register_cluster(&mut registry, store, node).await?;
    registry.register(
        "build",
        "The nix-deploy build",
        prometheus_client::metrics::info::Info::new(vec![(
            "version".to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        )]),
    );
    // A daemon not watching exports no per-host state: stored states are
    // not what the hosts do now.
    if let Some(fleet) = fleet.filter(|f| f.watching) {
        register_hosts(&mut registry, store, fleet).await?;
    }
    let count = |c: &Counter, n: i64| {
        c.inc_by(n.max(0) as u64);
    };

    let deployments = counts(
        store,
        "SELECT status, COUNT(*) FROM deployments WHERE kind = 'deploy' GROUP BY status ORDER BY status",
    )
    .await?;
    registry.register(
        "deployments",
        "Deployments by status",
        by_label::<Counter>("status", &deployments, count),
    );
    let host_runs = counts(
        store,
        "SELECT status, COUNT(*) FROM host_runs WHERE deployment_id IN (SELECT id FROM deployments WHERE kind = 'deploy') GROUP BY status ORDER BY status",
    )
    .await?;
    registry.register(
        "host_runs",
        "Host runs by result",
        by_label::<Counter>("status", &host_runs, count),
    );
    let rollbacks = Counter::<u64>::default();
    rollbacks.inc_by(
        host_runs
            .iter()
            .filter(|(s, _)| s == "rolled-back")
            .map(|(_, n)| n.max(&0).unsigned_abs())
            .sum(),
    );
    registry.register(
        "rollbacks",
        "Hosts rolled back (automatically or by the watchdog)",
        rollbacks,
    );

    let running: i64 = sqlx::query("SELECT COUNT(*) FROM deployments WHERE status = 'running'")
        .fetch_one(store.pool())
        .await
        .map_err(query_error("reading metrics"))?
        .get(0);
    let running_gauge = Gauge::<i64>::default();
    running_gauge.set(running);
    registry.register(
        "running_deployments",
        "Deployments running now",
        running_gauge,
    );

    let hosts = counts(
        store,
        "SELECT COALESCE(last_status, 'unknown'), COUNT(*) FROM hosts GROUP BY 1 ORDER BY 1",
    )
    .await?;
    registry.register(
        "hosts",
        "Hosts by the result of their last deployment",
        by_label::<Gauge>("state", &hosts, |g: &Gauge, n| {
            g.set(n);
        }),
    );

    let durations = Histogram::new(DURATION_BUCKETS);
    for row in sqlx::query(
        "SELECT finished_at - created_at FROM deployments WHERE finished_at IS NOT NULL AND kind = 'deploy'",
    )
    .fetch_all(store.pool())
    .await
    .map_err(query_error("reading metrics"))?
    {
        durations.observe(row.get::<i64, _>(0).max(0) as f64 / 1000.0);
    }
    registry.register(
        "deployment_duration_seconds",
        "Duration of finished deployments",
        durations,
    );

    let steps = Family::<Labels, StoredHistogram>::default();
    for h in store.step_histograms().await? {
        steps
            .get_or_create(&vec![("step".to_string(), h.step.clone())])
            .set(h);
    }
    registry.register(
        "step_duration_seconds",
        "Duration of each pipeline step",
        steps,
    );

    let rows = sqlx::query(
        "SELECT host, status, finished_at FROM host_runs WHERE finished_at IS NOT NULL AND deployment_id IN (SELECT id FROM deployments WHERE kind = 'deploy') ORDER BY host, finished_at",
    )
    .fetch_all(store.pool())
    .await
    .map_err(query_error("reading metrics"))?;
    let runs: Vec<(String, String, i64)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    if let Some(mttr) = mean_time_to_recovery(&runs) {
        let gauge = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        gauge.set(mttr);
        registry.register(
            "mttr_seconds",
            "Mean time from a host's failure to its next successful deployment",
            gauge,
        );
    }

    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = encode(&mut out, &registry);
    Ok(out)
}

#[cfg(test)]
mod tests;
