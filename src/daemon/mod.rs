//! The daemon: `nix-deploy serve`. An axum server over the same engine and
//! history the CLI uses, with a registry of running deployments whose events
//! are broadcast to Server-Sent-Event streams and notifications.
//!
//! Only this module knows HTTP; the documents it sends and accepts are the
//! core's types. It never imports the CLI. [`app`] builds the router so tests
//! can drive it; [`run`] serves it on a listener until the shutdown future
//! resolves, then cancels running deployments safely and waits for them.
//!
//! - `routes/`: one file per group of endpoints (cluster, deployments, fleet, hooks);
//! - [`feed`]: event streams fed from the history (every daemon streams
//!   every deployment); `takeover`: failover of deployments whose holder's
//!   lease expired; `handoff`: a stopping daemon's deployments handed over
//!   to the others;
//! - [`auth`]: bearer tokens with scopes; [`error`]: one JSON error shape;
//! - [`config`]: the TOML file; [`notify`]: outgoing notifications (and
//!   [`mail`]: e-mail); `scheduler`: the loop that starts `[[schedule]]`
//!   deployments; [`metrics`]: Prometheus; [`slack`], [`github`]: the hooks'
//!   signatures and parsing; `buttons`: Slack's interactive messages;
//!   `report`: the Markdown report;
//! - [`watch`]: the watch loop (drift, health on a schedule, alerts,
//!   reconciliation, pull mode) and the fleet it keeps.
//! - [`web`]: the dashboard for people at `/` (sessions, pages, assets).

mod auth;
mod buttons;
pub mod config;
mod error;
pub mod feed;
pub mod github;
mod handoff;
pub mod mail;
pub mod metrics;
pub mod notify;
mod report;
mod routes;
mod scheduler;
pub mod slack;
mod takeover;
pub mod watch;
pub mod web;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use tokio::sync::{Notify, broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use auth::{Caller, Token};
pub use error::ApiError;

use nix_deploy_core::events::{Event, EventKind};
use nix_deploy_core::options::{DeployOptions, OptionsError, Request};
use nix_deploy_core::run::Deployment;

use crate::engine::{
    DeployRequest, Engine, EngineConfig, EngineError, ExecJob, PromoteJob, RollbackRequest,
    UploadKeysRequest,
};
use crate::store::{Backend, Leader, Store};
use config::{Config, Secret};
use feed::EventFeed;
use notify::Notifier;

/// A deployment this daemon is running.
struct Running {
    cancel: CancellationToken,
    events: broadcast::Sender<Event>,
}

pub struct Inner {
    pub config: Config,
    engine: EngineConfig,
    store: Store,
    tokens: Vec<Token>,
    slack_secret: Option<Secret>,
    github_secret: Option<Secret>,
    notifier: Notifier,
    /// Running deployments by id. A std mutex: held only for map updates, never across `.await`.
    running: Mutex<HashMap<i64, Running>>,
    /// Owns every deployment task, so shutdown can wait for all of them.
    tasks: TaskTracker,
    /// Cancelled on shutdown; every deployment's token is a child of it.
    shutdown: CancellationToken,
    http: reqwest::Client,
    /// The fleet as the watch last observed it.
    pub fleet: watch::Fleet,
    /// Woken when alerts were stored, for the task that sends them.
    alerts_ready: Notify,
    /// The dashboard's sessions and login limit.
    web: web::WebState,
    /// Wake-ups for event streams.
    feed: EventFeed,
    /// Whether this daemon leads the coordinators sharing the history.
    leader: Leader,
    /// Deployments this daemon took over since it started.
    takeovers: AtomicU64,
    /// Of those, the ones their holder handed over as it stopped.
    handoffs_received: AtomicU64,
}

#[derive(Clone)]
pub struct AppState(pub Arc<Inner>);

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

/// What a background job runs.
pub(crate) enum Job {
    Deploy(DeployRequest),
    /// Recorded already (see `Engine::enqueue`).
    Queued {
        id: i64,
        request: DeployRequest,
    },
    Resume {
        id: Option<i64>,
        wait: bool,
    },
    Rollback(RollbackRequest),
    Exec(ExecJob),
    UploadKeys(UploadKeysRequest),
    Promote(Box<PromoteJob>),
}

/// What the daemon was given to authenticate requests and hooks, read from
/// their files at start.
pub struct Credentials {
    pub tokens: Vec<Token>,
    pub slack_secret: Option<Secret>,
    pub github_secret: Option<Secret>,
}

impl AppState {
    pub fn new(
        config: Config,
        engine: EngineConfig,
        store: Store,
        credentials: Credentials,
        notifier: Notifier,
        leader: Leader,
    ) -> Self {
        let Credentials {
            tokens,
            slack_secret,
            github_secret,
        } = credentials;
        let fleet = watch::Fleet::new(&config.watch, &config.flake);
        let web = web::WebState::new(&config.web);
        let feed = EventFeed::start(&store);
        AppState(Arc::new(Inner {
            config,
            engine,
            store,
            tokens,
            slack_secret,
            github_secret,
            notifier,
            running: Mutex::new(HashMap::new()),
            tasks: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap_or_default(),
            fleet,
            alerts_ready: Notify::new(),
            web,
            feed,
            leader,
            takeovers: AtomicU64::new(0),
            handoffs_received: AtomicU64::new(0),
        }))
    }

    pub(crate) fn feed(&self) -> &EventFeed {
        &self.feed
    }

    /// Whether this daemon is the elected leader: what runs once per fleet
    /// (the watch loop, schedules) runs where this is true.
    pub fn is_leader(&self) -> bool {
        self.leader.is_leader()
    }

    /// What the metrics say about this daemon in the cluster.
    pub(crate) fn node(&self) -> metrics::Node {
        metrics::Node {
            leader: self.is_leader(),
            takeovers: self.takeovers.load(Ordering::SeqCst),
            handoffs_received: self.handoffs_received.load(Ordering::SeqCst),
        }
    }

    pub(crate) fn engine(&self) -> Engine {
        Engine::new(self.engine.clone(), self.store.clone())
    }

    /// The engine for `caller`: it touches only the hosts they may reach.
    pub(crate) fn engine_for(&self, caller: &Caller) -> Engine {
        let mut config = self.engine.clone();
        config.limit = caller.limit.clone();
        Engine::new(config, self.store.clone())
    }

    /// Check a request's token; a failure is recorded in the audit trail.
    pub(crate) async fn authorize(
        &self,
        headers: &axum::http::HeaderMap,
        needed: config::Scope,
    ) -> Result<Caller, ApiError> {
        match auth::authorize(headers, &self.tokens, needed) {
            Ok(caller) => Ok(caller),
            Err(e) => {
                self.audit(
                    "unknown",
                    "api",
                    "auth-failed",
                    "api",
                    serde_json::json!({ "error": e.to_string() }),
                )
                .await?;
                Err(e)
            }
        }
    }

    /// Append to the audit trail (who, from where, what, about what).
    pub(crate) async fn audit(
        &self,
        actor: &str,
        origin: &str,
        action: &str,
        target: &str,
        detail: serde_json::Value,
    ) -> Result<(), ApiError> {
        self.store
            .audit(&nix_deploy_core::audit::AuditRecord {
                actor: actor.to_string(),
                origin: origin.to_string(),
                action: action.to_string(),
                target: target.to_string(),
                detail,
            })
            .await?;
        Ok(())
    }

    /// The windows and approval rules in force.
    pub(crate) fn policy(&self) -> &crate::engine::Policy {
        &self.engine.policy
    }

    pub(crate) fn engine_with_flake(&self, flake: &str) -> Engine {
        let mut config = self.engine.clone();
        config.flake = flake.to_string();
        Engine::new(config, self.store.clone())
    }

    /// The engine for `caller`'s request: the configured flake, or pinned
    /// to the request's `revision` (deployments and plans); it touches only
    /// the hosts they may reach.
    pub(crate) fn engine_at(
        &self,
        revision: Option<&str>,
        caller: &Caller,
    ) -> Result<Engine, ApiError> {
        match revision {
            Some(rev) => {
                let pinned = github::flake_at_revision(&self.config.flake, rev)
                    .map_err(|e| ApiError::BadRequest(e.to_string()))?;
                Ok(self.engine_with_flake_for(&pinned, caller))
            }
            None => Ok(self.engine_for(caller)),
        }
    }

    /// [`AppState::engine_for`], on another flake (a pinned revision, a
    /// deployment's own).
    pub(crate) fn engine_with_flake_for(&self, flake: &str, caller: &Caller) -> Engine {
        let mut config = self.engine.clone();
        config.flake = flake.to_string();
        config.limit = caller.limit.clone();
        Engine::new(config, self.store.clone())
    }

    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    /// The daemon's defaults for options a request leaves out.
    pub(crate) fn default_options(&self) -> DeployOptions {
        // Checked when the config was loaded.
        self.config.default_options().unwrap_or_default()
    }

    /// A request's options, with the daemon's defaults for what it leaves out.
    pub(crate) fn resolve(&self, request: &Request) -> Result<DeployOptions, ApiError> {
        request
            .resolve(&self.default_options())
            .map_err(|e: OptionsError| ApiError::BadRequest(e.to_string()))
    }

    /// A deployment and its host runs, or 404.
    pub(crate) async fn deployment(&self, id: i64) -> Result<Deployment, ApiError> {
        self.store
            .deployment(id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("no deployment #{id}")))
    }

    /// Ask deployment `id` to stop starting hosts: through the store (a CLI
    /// may run it) and directly when this daemon runs it.
    pub(crate) async fn cancel(&self, id: i64, by: &str) -> Result<bool, ApiError> {
        if !self.store.request_cancel(id, by).await? {
            return Ok(false);
        }
        self.cancel_running(id);
        Ok(true)
    }

    /// Subscribe to a running deployment's live events.
    pub(crate) fn subscribe(&self, id: i64) -> Option<broadcast::Receiver<Event>> {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        running.get(&id).map(|r| r.events.subscribe())
    }

    pub(crate) fn cancel_running(&self, id: i64) -> bool {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        match running.get(&id) {
            Some(r) => {
                r.cancel.cancel();
                true
            }
            None => false,
        }
    }

    /// Start a job in the background and return its deployment id as soon as
    /// it has one, or the error that stopped it before it got one (bad input,
    /// busy host). A queued job has its id at once. `on_done` runs with the
    /// final report.
    pub(crate) async fn launch(
        &self,
        engine: Engine,
        job: Job,
        on_done: impl FnOnce(Result<Deployment, EngineError>) + Send + 'static,
    ) -> Result<i64, ApiError> {
        if self.shutdown.is_cancelled() {
            return Err(ApiError::Unavailable("the daemon is shutting down".into()));
        }
        let (sink, mut events) = mpsc::unbounded_channel::<Event>();
        let cancel = self.shutdown.child_token();
        let (live, _) = broadcast::channel::<Event>(4096);
        let known = match &job {
            Job::Queued { id, .. } => {
                self.register(*id, &cancel, &live);
                Some(*id)
            }
            _ => None,
        };
        let (first_tx, first_rx) = oneshot::channel::<Result<i64, ApiError>>();
        let first = Arc::new(Mutex::new(Some(first_tx)));
        // The deployment's id, once known: the job stops at once if this
        // daemon loses it (another coordinator took it over).
        let (id_tx, mut id_rx) = tokio::sync::watch::channel(known);

        // The forwarder: registers the deployment on its first event (unless
        // queued), then fans events out to streams and notifications.
        let state = self.clone();
        let forward_first = first.clone();
        let forward_cancel = cancel.clone();
        self.tasks.spawn(async move {
            let mut id = known;
            let mut waits = notify::Waits::default();
            while let Some(event) = events.recv().await {
                state.feed.announce(event.deployment_id);
                if id.is_none() {
                    id = Some(event.deployment_id);
                    let _ = id_tx.send(id);
                    state.register(event.deployment_id, &forward_cancel, &live);
                    if let Some(tx) = forward_first
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .take()
                    {
                        let _ = tx.send(Ok(event.deployment_id));
                    }
                }
                if let Some(notice) = notify::notice_from_event(&event)
                    && waits.is_news(&notice)
                {
                    state.notifier.send(state.with_gate_summary(notice).await);
                }
                let finished = matches!(event.kind, EventKind::DeploymentFinished { .. });
                let _ = live.send(event);
                if finished {
                    break;
                }
            }
            if let Some(id) = id {
                state
                    .running
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
            }
            // Drain the rest so the engine never blocks on us.
            while events.recv().await.is_some() {}
        });

        let job_first = first;
        let store = self.store.clone();
        self.tasks.spawn(async move {
            let run = async {
                match job {
                    Job::Deploy(request) => engine.deploy(request, Some(sink), cancel).await,
                    Job::Queued { id, request } => {
                        engine.deploy_queued(id, request, Some(sink), cancel).await
                    }
                    Job::Resume { id, wait } => engine.resume(id, wait, Some(sink), cancel).await,
                    Job::Rollback(request) => engine.rollback(request, Some(sink)).await,
                    Job::Exec(job) => engine.exec(job, Some(sink), cancel).await,
                    Job::UploadKeys(request) => {
                        engine.upload_keys(request, Some(sink), cancel).await
                    }
                    Job::Promote(job) => engine.promote(*job, Some(sink), cancel).await,
                }
            };
            // Lost (superseded, or not renewed in time): dropped where it
            // stands, touching no host again; its successor settles them.
            let lost = async {
                let id = loop {
                    if let Some(id) = *id_rx.borrow_and_update() {
                        break id;
                    }
                    if id_rx.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                };
                match store.lost_signal(id) {
                    Some(signal) => signal.cancelled().await,
                    None => std::future::pending::<()>().await,
                }
                id
            };
            let result = tokio::select! {
                result = run => result,
                id = lost => Err(EngineError::Store(store.epoch(id).err().unwrap_or(
                    crate::store::StoreError::NotHeld { deployment_id: id },
                ))),
            };
            match &result {
                Err(EngineError::HandedOver(message)) => tracing::info!("{message}"),
                // Lost, whether the heartbeat found out first or a refused
                // write (or a host's fence) did: one message either way.
                Err(EngineError::Store(
                    e @ (crate::store::StoreError::Superseded { .. }
                    | crate::store::StoreError::NotHeld { .. }),
                )) => tracing::error!(
                    cause = %e,
                    "this daemon lost the deployment: stopped working on it"
                ),
                Err(e) => tracing::warn!(cause = %e, "deployment job ended with an error"),
                Ok(_) => {}
            }
            // Failed before it had an id: tell the request.
            if known.is_none()
                && let Some(tx) = job_first.lock().unwrap_or_else(|p| p.into_inner()).take()
            {
                let _ = tx.send(Err(match result {
                    Err(e) => ApiError::from(e),
                    Ok(_) => ApiError::Internal(anyhow::anyhow!("the job ended without events")),
                }));
                return;
            }
            on_done(result);
        });
        if let Some(id) = known {
            return Ok(id);
        }
        first_rx
            .await
            .map_err(|_| ApiError::Internal(anyhow::anyhow!("the deployment task went away")))?
    }

    /// Record a request at once and run it in the background: its id comes
    /// back within the caller's deadline, whatever the hosts do.
    pub(crate) async fn launch_queued(
        &self,
        engine: Engine,
        request: DeployRequest,
        on_done: impl FnOnce(Result<Deployment, EngineError>) + Send + 'static,
    ) -> Result<i64, ApiError> {
        if self.shutdown.is_cancelled() {
            return Err(ApiError::Unavailable("the daemon is shutting down".into()));
        }
        let id = engine.enqueue(&request).await?;
        self.launch(engine, Job::Queued { id, request }, on_done)
            .await
    }

    /// A gate's notice with what an approver is shown (the held hosts and
    /// what each would run), read from the store; other notices as they are.
    pub(crate) async fn with_gate_summary(&self, notice: notify::Notice) -> notify::Notice {
        let notify::Notice::AwaitingApproval(mut gate) = notice else {
            return notice;
        };
        match self.store.gates(gate.id).await {
            Ok(gates) => {
                if let Some(stored) = gates.into_iter().find(|g| g.number == gate.gate) {
                    gate.summary = stored.summary;
                }
            }
            Err(e) => tracing::warn!(cause = %e, "reading a gate for its notice"),
        }
        notify::Notice::AwaitingApproval(gate)
    }

    /// Deployment `id` runs here: its cancel token and live events.
    fn register(&self, id: i64, cancel: &CancellationToken, live: &broadcast::Sender<Event>) {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                id,
                Running {
                    cancel: cancel.clone(),
                    events: live.clone(),
                },
            );
    }
}

/// The router, with body size limits and request timeouts (event streams are
/// exempt from the timeout: they last as long as the deployment).
pub fn app(state: AppState) -> Router {
    let timeout = state.config.request_timeout;
    let api = Router::new()
        .route("/api/v1/status", get(routes::fleet::status))
        .route("/api/v1/fleet", get(routes::watch::fleet))
        .route("/api/v1/cluster", get(routes::cluster::cluster))
        .route("/api/v1/plan", post(routes::fleet::plan))
        .route(
            "/api/v1/deployments",
            get(routes::deployments::list).post(routes::deployments::create),
        )
        .route("/api/v1/deployments/{id}", get(routes::deployments::show))
        .route(
            "/api/v1/deployments/{id}/cancel",
            post(routes::deployments::cancel),
        )
        .route(
            "/api/v1/deployments/{id}/resume",
            post(routes::deployments::resume),
        )
        .route(
            "/api/v1/deployments/{id}/report",
            get(routes::deployments::report),
        )
        .route(
            "/api/v1/hosts/{host}/rollback",
            post(routes::fleet::rollback),
        )
        .route("/api/v1/hosts/{host}/health", post(routes::fleet::health))
        .route(
            "/api/v1/deployments/{id}/approve",
            post(routes::approvals::approve),
        )
        .route(
            "/api/v1/deployments/{id}/reject",
            post(routes::approvals::reject),
        )
        .route("/api/v1/windows", get(routes::approvals::windows))
        .route("/api/v1/schedules", get(routes::approvals::schedules))
        .route("/api/v1/audit", get(routes::approvals::audit))
        .route("/api/v1/promote", post(routes::promote::promote))
        .route("/api/v1/exec", post(routes::exec::exec))
        .route("/api/v1/upload-keys", post(routes::exec::upload_keys))
        .route("/hooks/slack", post(routes::hooks::slack))
        .route(
            "/hooks/slack/interactive",
            post(routes::interactive::interactive),
        )
        .route("/hooks/github", post(routes::hooks::github))
        .route("/metrics", get(routes::fleet::metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            timeout,
        ));
    let streams = Router::new()
        .route(
            "/api/v1/deployments/{id}/events",
            get(routes::deployments::events),
        )
        .route("/api/v1/fleet/events", get(routes::watch::events));
    let routes = api.merge(streams);
    let routes = if state.config.web.enable {
        routes.merge(web::router(timeout))
    } else {
        routes
    };
    routes
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        .method_not_allowed_fallback(|| async {
            ApiError::MethodNotAllowed("this endpoint does not take that method".into())
        })
        .layer(DefaultBodyLimit::max(1024 * 1024))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

/// Serve until `shutdown` resolves; then hand running deployments over to
/// another daemon that takes deployments over, or, without one, cancel them
/// (no new hosts start, running ones finish or roll back), and wait for
/// them. The caller closes the history.
///
/// Connections are HTTP/1 with a deadline for every request's headers (an
/// idle or slow client is dropped, not held), and at most
/// `max-connections` at once: a flood of clients cannot exhaust the daemon's
/// file descriptors.
pub async fn run(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::server::graceful::GracefulShutdown;
    use hyper_util::service::TowerToHyperService;

    let stop = state.shutdown.clone();
    let trigger = {
        let stop = stop.clone();
        let state = state.clone();
        tokio::spawn(async move {
            shutdown.await;
            // Asked before they are cancelled: their cancellation is then a
            // safe point to hand them over at.
            if handoff::begin(&state).await == 0 {
                tracing::info!("shutting down: cancelling running deployments");
            }
            stop.cancel();
        })
    };
    // `[[schedule]]` deployments, until shutdown.
    scheduler::spawn(&state);
    // Deployments whose coordinator died (a CLI killed with -9) become
    // interrupted within seconds: status, metrics and their streams end.
    let reconciler = {
        let store = state.store.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                if let Err(e) = store.mark_interrupted().await {
                    tracing::warn!(cause = %e, "looking for interrupted deployments");
                }
            }
        })
    };
    // The watch (on the leader, with the sender of its alerts) is owned
    // like a deployment: shutdown stops it and waits for it.
    state.tasks.spawn(watch::run(state.clone(), stop.clone()));
    let takeover = (state.config.cluster.takeover && state.store.backend() == Backend::Postgres)
        .then(|| takeover::spawn(state.clone()));
    let router = app(state.clone());
    let slots = Arc::new(tokio::sync::Semaphore::new(state.config.max_connections));
    let graceful = GracefulShutdown::new();
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot?,
            _ = stop.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors or a reset before accept: keep serving.
                    tracing::warn!(cause = %e, "accepting a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(state.config.header_timeout);
        // Each request knows its client's address (the login rate limit).
        let service = tower::Layer::layer(&axum::Extension(web::Peer(peer)), router.clone());
        let connection =
            http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let _ = connection.await;
            drop(slot);
        });
    }
    trigger.abort();
    reconciler.abort();
    if let Some(takeover) = takeover {
        takeover.abort();
    }
    // Deployments are cancelled or handed over; wait for them, then for
    // open responses (event streams end with their deployments).
    state.tasks.close();
    handoff::wait(&state).await;
    let _ = tokio::time::timeout(Duration::from_secs(30), graceful.shutdown()).await;
    state.notifier.flush(Duration::from_secs(30)).await;
    // The history stays open: the caller leaves the coordinators with it
    // (`Heartbeat::stop`), then closes it.
    Ok(())
}
