//! The one way a deployment tells anyone anything: every event, step and
//! host result is written to the store first, then sent to whoever watches
//! (the CLI's progress display, the daemon's streams).

use std::fmt::Display;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use tokio::sync::{Mutex, mpsc};

use nix_deploy_core::events::{CheckResult, Event, EventKind, Step};
use nix_deploy_core::run::{HostRun, StepTiming};

use crate::now_ms;
use crate::store::{Store, StoreError};

/// How long a write waits for a database that is locked, full or failing
/// before the deployment gives up on recording: the hosts are not left
/// waiting forever, and a short outage loses nothing.
const STORE_PATIENCE: Duration = Duration::from_secs(120);

/// Writes events to the store, then hands them to whoever watches.
#[derive(Clone)]
pub(crate) struct Recorder {
    store: Store,
    deployment_id: i64,
    sink: Option<mpsc::UnboundedSender<Event>>,
    /// Held from an event's insert to its send: watchers get events in the
    /// order of their ids, whichever host task emits them.
    order: Arc<Mutex<()>>,
}

/// Run a store write, again while the database is only temporarily unable
/// (locked, disk full), for up to [`STORE_PATIENCE`].
pub(crate) async fn durably<T, F, Fut>(write: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    write
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(100))
                .with_max_delay(Duration::from_secs(5))
                .with_total_delay(Some(STORE_PATIENCE))
                .without_max_times(),
        )
        .when(StoreError::is_transient)
        .notify(|e, wait| {
            tracing::warn!(cause = %e, ?wait, "the history cannot be written yet; retrying");
        })
        .await
}

impl Recorder {
    pub fn new(
        store: Store,
        deployment_id: i64,
        sink: Option<mpsc::UnboundedSender<Event>>,
    ) -> Self {
        Recorder {
            store,
            deployment_id,
            sink,
            order: Arc::new(Mutex::new(())),
        }
    }

    pub fn deployment_id(&self) -> i64 {
        self.deployment_id
    }

    /// The history this recorder writes to.
    pub fn store(&self) -> &Store {
        &self.store
    }

    pub async fn emit(&self, host: Option<&str>, kind: EventKind) -> Result<(), StoreError> {
        let _order = self.order.lock().await;
        let event = durably(|| {
            self.store
                .append_event(self.deployment_id, host, kind.clone())
        })
        .await?;
        if let Some(sink) = &self.sink {
            // A watcher that went away does not stop the deployment.
            let _ = sink.send(event);
        }
        Ok(())
    }

    pub async fn log(&self, host: Option<&str>, message: String) -> Result<(), StoreError> {
        self.emit(host, EventKind::Log { message }).await
    }

    /// Every health check's last result, for the record.
    pub async fn health_checked(
        &self,
        host: &str,
        phase: &str,
        results: Vec<CheckResult>,
    ) -> Result<(), StoreError> {
        if results.is_empty() {
            return Ok(());
        }
        let phase = phase.to_string();
        self.emit(Some(host), EventKind::HealthChecked { phase, results })
            .await
    }

    /// Save a host run as it is now.
    pub async fn save(&self, run: &HostRun) -> Result<(), StoreError> {
        durably(|| self.store.save_host_run(run)).await
    }

    /// Run one step of a host: record its start, run it, record its end. The
    /// error comes back phrased for the operator, naming host and step.
    pub async fn step<T, E: Display>(
        &self,
        run: &mut HostRun,
        step: Step,
        work: impl Future<Output = Result<T, E>>,
    ) -> Result<Result<T, String>, StoreError> {
        self.begin(run, step, None).await?;
        let result = work.await;
        self.end(run, result, None).await
    }

    /// Record that `step` of a host started, at `at` (Unix milliseconds)
    /// when it is known better than now: work done inside one remote call
    /// with the step before it ([`super::steps::activate`]).
    pub async fn begin(
        &self,
        run: &mut HostRun,
        step: Step,
        at: Option<i64>,
    ) -> Result<(), StoreError> {
        run.step = Some(step.as_str().into());
        run.steps.push(StepTiming {
            step,
            started_at: at.unwrap_or_else(now_ms),
            finished_at: None,
            ok: None,
        });
        self.save_with_event(run, EventKind::StepStarted { step }, None)
            .await
    }

    /// Record how the step begun last ([`Self::begin`]) ended, at `at` when
    /// it is known better than now. The error comes back phrased for the
    /// operator, naming host and step.
    pub async fn end<T, E: Display>(
        &self,
        run: &mut HostRun,
        result: Result<T, E>,
        at: Option<i64>,
    ) -> Result<Result<T, String>, StoreError> {
        let Some(timing) = run.steps.last_mut() else {
            return Ok(result.map_err(|e| e.to_string()));
        };
        let step = timing.step;
        let finished = at.unwrap_or_else(now_ms).max(timing.started_at);
        timing.finished_at = Some(finished);
        timing.ok = Some(result.is_ok());
        let elapsed = Duration::from_millis((finished - timing.started_at) as u64);
        let message = result.as_ref().err().map(|e| {
            let text = e.to_string();
            // Errors from ssh already name host and step; others get them here.
            if text.starts_with(&format!("{}: ", run.host)) {
                text
            } else {
                format!("{}: {step}: {text}", run.host)
            }
        });
        self.save_with_event(
            run,
            EventKind::StepFinished {
                step,
                ok: result.is_ok(),
                duration_ms: elapsed.as_millis() as u64,
                message: message.clone(),
            },
            Some((step.as_str(), elapsed.as_secs_f64())),
        )
        .await?;
        Ok(result.map_err(|_| message.unwrap_or_default()))
    }

    /// Save `run` and record `kind` about it (and count a finished step's
    /// duration) in one durable write, then tell the watchers.
    async fn save_with_event(
        &self,
        run: &HostRun,
        kind: EventKind,
        finished_step: Option<(&str, f64)>,
    ) -> Result<(), StoreError> {
        let _order = self.order.lock().await;
        let event = durably(|| {
            self.store
                .save_host_run_with_event(run, kind.clone(), finished_step)
        })
        .await?;
        if let Some(sink) = &self.sink {
            let _ = sink.send(event);
        }
        Ok(())
    }

    /// A host's part is over: store the run, remember what the host runs,
    /// then tell.
    pub async fn finish_host(&self, run: &mut HostRun) -> Result<(), StoreError> {
        if run.time.finished_at.is_none() {
            run.time.finished_at = Some(now_ms());
        }
        run.step = None;
        self.save(run).await?;
        durably(|| self.store.record_host_result(run)).await?;
        self.emit(
            Some(&run.host),
            EventKind::HostFinished {
                status: run.status,
                from: run.from.clone(),
                to: run.to.clone(),
                duration_ms: run.duration_ms().unwrap_or(0).max(0) as u64,
                error: run.error.clone(),
                after: run.after.clone(),
            },
        )
        .await
    }
}
