//! `GET /metrics`: the history as Prometheus text exposition — deployments and
//! host runs by result, rollbacks, deployment and step durations (histograms),
//! hosts by last result, running deployments, and the mean time to recovery.
//! Computed from SQLite on each scrape, so it is always what the history says.

use std::collections::BTreeMap;
use std::fmt::Write;

use sqlx::Row;

use nix_deploy_core::run::StepTiming;

use crate::store::{Store, StoreError};

const DURATION_BUCKETS: [f64; 10] = [
    1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];
const STEP_BUCKETS: [f64; 9] = [0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0];
/// Step durations come from this many recent host runs at most.
const STEP_HISTORY: i64 = 10_000;

/// Escape a label value: backslash, double quote and newline.
pub fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn query_error(context: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |source| StoreError::Query { context, source }
}

/// A cumulative histogram.
#[derive(Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(buckets: usize) -> Self {
        Histogram {
            counts: vec![0; buckets],
            ..Histogram::default()
        }
    }

    fn observe(&mut self, buckets: &[f64], value: f64) {
        for (i, bound) in buckets.iter().enumerate() {
            if value <= *bound {
                self.counts[i] += 1;
            }
        }
        self.sum += value;
        self.count += 1;
    }

    fn write(&self, out: &mut String, name: &str, labels: &str, buckets: &[f64]) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (bound, count) in buckets.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
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

pub async fn render(store: &Store) -> Result<String, StoreError> {
    let mut out = String::new();

    header(
        &mut out,
        "nix_deploy_deployments_total",
        "counter",
        "Deployments by status.",
    );
    for (status, n) in counts(
        store,
        "SELECT status, COUNT(*) FROM deployments GROUP BY status ORDER BY status",
    )
    .await?
    {
        let _ = writeln!(
            out,
            "nix_deploy_deployments_total{{status=\"{}\"}} {n}",
            escape_label(&status)
        );
    }
    header(
        &mut out,
        "nix_deploy_host_runs_total",
        "counter",
        "Host runs by result.",
    );
    let host_runs = counts(
        store,
        "SELECT status, COUNT(*) FROM host_runs GROUP BY status ORDER BY status",
    )
    .await?;
    for (status, n) in &host_runs {
        let _ = writeln!(
            out,
            "nix_deploy_host_runs_total{{status=\"{}\"}} {n}",
            escape_label(status)
        );
    }
    header(
        &mut out,
        "nix_deploy_rollbacks_total",
        "counter",
        "Hosts rolled back (automatically or by the watchdog).",
    );
    let rollbacks: i64 = host_runs
        .iter()
        .filter(|(s, _)| s == "rolled-back")
        .map(|(_, n)| n)
        .sum();
    let _ = writeln!(out, "nix_deploy_rollbacks_total {rollbacks}");

    header(
        &mut out,
        "nix_deploy_running_deployments",
        "gauge",
        "Deployments running now.",
    );
    let running: i64 = sqlx::query("SELECT COUNT(*) FROM deployments WHERE status = 'running'")
        .fetch_one(store.pool())
        .await
        .map_err(query_error("reading metrics"))?
        .get(0);
    let _ = writeln!(out, "nix_deploy_running_deployments {running}");

    header(
        &mut out,
        "nix_deploy_hosts",
        "gauge",
        "Hosts by the result of their last deployment.",
    );
    for (status, n) in counts(
        store,
        "SELECT COALESCE(last_status, 'unknown'), COUNT(*) FROM hosts GROUP BY 1 ORDER BY 1",
    )
    .await?
    {
        let _ = writeln!(
            out,
            "nix_deploy_hosts{{state=\"{}\"}} {n}",
            escape_label(&status)
        );
    }

    header(
        &mut out,
        "nix_deploy_deployment_duration_seconds",
        "histogram",
        "Duration of finished deployments.",
    );
    let rows = sqlx::query(
        "SELECT finished_at - created_at FROM deployments WHERE finished_at IS NOT NULL",
    )
    .fetch_all(store.pool())
    .await
    .map_err(query_error("reading metrics"))?;
    let mut deployments = Histogram::new(DURATION_BUCKETS.len());
    for row in rows {
        deployments.observe(
            &DURATION_BUCKETS,
            row.get::<i64, _>(0).max(0) as f64 / 1000.0,
        );
    }
    deployments.write(
        &mut out,
        "nix_deploy_deployment_duration_seconds",
        "",
        &DURATION_BUCKETS,
    );

    header(
        &mut out,
        "nix_deploy_step_duration_seconds",
        "histogram",
        "Duration of each pipeline step.",
    );
    let rows = sqlx::query("SELECT steps FROM host_runs ORDER BY rowid DESC LIMIT ?")
        .bind(STEP_HISTORY)
        .fetch_all(store.pool())
        .await
        .map_err(query_error("reading metrics"))?;
    let mut steps: BTreeMap<String, Histogram> = BTreeMap::new();
    for row in rows {
        let text: String = row.get(0);
        let Ok(timings) = serde_json::from_str::<Vec<StepTiming>>(&text) else {
            continue;
        };
        for t in timings {
            if let Some(end) = t.finished_at {
                steps
                    .entry(t.step.as_str().to_string())
                    .or_insert_with(|| Histogram::new(STEP_BUCKETS.len()))
                    .observe(&STEP_BUCKETS, (end - t.started_at).max(0) as f64 / 1000.0);
            }
        }
    }
    for (step, histogram) in &steps {
        histogram.write(
            &mut out,
            "nix_deploy_step_duration_seconds",
            &format!("step=\"{}\"", escape_label(step)),
            &STEP_BUCKETS,
        );
    }

    header(
        &mut out,
        "nix_deploy_mttr_seconds",
        "gauge",
        "Mean time from a host's failure to its next successful deployment.",
    );
    let rows = sqlx::query(
        "SELECT host, status, finished_at FROM host_runs WHERE finished_at IS NOT NULL ORDER BY host, finished_at",
    )
    .fetch_all(store.pool())
    .await
    .map_err(query_error("reading metrics"))?;
    let runs: Vec<(String, String, i64)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    if let Some(mttr) = mean_time_to_recovery(&runs) {
        let _ = writeln!(out, "nix_deploy_mttr_seconds {mttr}");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::NewDeployment;
    use nix_deploy_core::events::{DeploymentStatus, HostStatus, Step};
    use nix_deploy_core::options::DeployOptions;
    use nix_deploy_core::run::HostRun;

    #[test]
    fn escapes_labels() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn mttr_measures_failure_to_next_success() {
        let runs = vec![
            ("a".to_string(), "deployed".to_string(), 0),
            ("a".into(), "rolled-back".into(), 10_000),
            ("a".into(), "failed".into(), 20_000),
            ("a".into(), "deployed".into(), 40_000),
            ("b".into(), "failed".into(), 5_000),
            ("b".into(), "deployed".into(), 15_000),
            ("c".into(), "failed".into(), 0),
        ];
        // a: 30 s (from its first failure), b: 10 s; c never recovered.
        assert_eq!(mean_time_to_recovery(&runs), Some(20.0));
        assert_eq!(mean_time_to_recovery(&runs[..1]), None);
    }

    #[tokio::test]
    async fn renders_the_history() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        let new = NewDeployment {
            trigger: "cli".into(),
            requested_by: "t".into(),
            flake: ".".into(),
            flake_rev: None,
            strategy: "smart".into(),
            options: DeployOptions::default(),
            hosts: vec!["a".into()],
        };
        for (status, host_status) in [
            (DeploymentStatus::Failed, HostStatus::RolledBack),
            (DeploymentStatus::Succeeded, HostStatus::Deployed),
        ] {
            let id = store.create_deployment(&new).await.unwrap();
            let mut run = HostRun::new(id, "a");
            run.status = host_status;
            run.time.started_at = Some(1_000);
            run.time.finished_at = Some(3_500);
            run.steps.push(StepTiming {
                step: Step::Build,
                started_at: 1_000,
                finished_at: Some(1_400),
                ok: Some(true),
            });
            store.save_host_run(&run).await.unwrap();
            store.record_host_result(&run).await.unwrap();
            store.finish_deployment(id, status, None).await.unwrap();
        }
        let text = render(&store).await.unwrap();
        assert!(
            text.contains("nix_deploy_deployments_total{status=\"failed\"} 1"),
            "{text}"
        );
        assert!(text.contains("nix_deploy_deployments_total{status=\"succeeded\"} 1"));
        assert!(text.contains("nix_deploy_host_runs_total{status=\"rolled-back\"} 1"));
        assert!(text.contains("nix_deploy_rollbacks_total 1"));
        assert!(text.contains("nix_deploy_hosts{state=\"deployed\"} 1"));
        assert!(
            text.contains("nix_deploy_step_duration_seconds_bucket{step=\"build\",le=\"0.5\"} 2")
        );
        assert!(
            text.contains("nix_deploy_step_duration_seconds_bucket{step=\"build\",le=\"0.1\"} 0")
        );
        assert!(text.contains("nix_deploy_step_duration_seconds_count{step=\"build\"} 2"));
        assert!(text.contains("nix_deploy_deployment_duration_seconds_count 2"));
        assert!(text.contains("nix_deploy_running_deployments 0"));
        // Both runs finished at the same instant: recovery took 0 s.
        assert!(text.contains("nix_deploy_mttr_seconds 0"), "{text}");
        assert!(text.contains("# TYPE nix_deploy_step_duration_seconds histogram"));
    }
}
