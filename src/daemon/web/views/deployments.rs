//! Deployments: the list, one deployment with its phases and each host's
//! step timeline (advanced live by the page's script over this module's
//! event stream), change summary, log tail and error in full; Cancel and
//! Rollback where they apply.

use std::collections::BTreeMap;

use askama::Template;
use axum::Form;
use axum::extract::rejection::FormRejection;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::sse::Event as SseEvent;
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;

use nix_deploy_core::events::{Event, HostStatus};
use nix_deploy_core::render::{event_text, generation, run_label, short_path};
use nix_deploy_core::run::{Deployment, HostRun, StepTiming};
use nix_deploy_core::summary::ChangeSummary;

use super::login::CsrfForm;
use super::{Page, deployment_class, host_class, render, took, when};
use crate::daemon::AppState;
use crate::daemon::config::Scope;
use crate::daemon::routes::deployments::{cancel_deployment, event_stream, last_event_id};
use crate::daemon::routes::parse_id;
use crate::daemon::web::{Viewer, WebError, form_body};

/// Lines of each host's log tail.
const LOG_TAIL: usize = 30;

/// One row of the list.
pub struct ListRow {
    pub id: i64,
    pub label: String,
    pub status: String,
    pub class: &'static str,
    pub trigger: String,
    pub requested_by: String,
    pub created: String,
    pub duration: String,
    pub hosts: String,
}

#[derive(Template)]
#[template(path = "deployments.html")]
struct ListPage {
    page: Page,
    rows: Vec<ListRow>,
    limit: i64,
}

#[derive(Deserialize)]
pub struct ListQuery {
    limit: Option<i64>,
}

pub async fn list(
    State(state): State<AppState>,
    viewer: Viewer,
    Query(query): Query<ListQuery>,
) -> Result<Response, WebError> {
    viewer.permit(&state, Scope::Read)?;
    let limit = query.limit.unwrap_or(50).clamp(1, 1000);
    let rows = state
        .store()
        .deployments(limit)
        .await?
        .iter()
        .map(|d| ListRow {
            id: d.id,
            label: run_label(d),
            status: d.status.to_string(),
            class: deployment_class(d.status),
            trigger: d.trigger.clone(),
            requested_by: d.requested_by.clone(),
            created: when(Some(d.created_at)),
            duration: took(d.duration_ms()),
            hosts: nix_deploy_core::render::hosts_summary(&d.hosts),
        })
        .collect();
    Ok(render(&ListPage {
        page: Page::new("Deployments", "/deployments", Some(&viewer)),
        rows,
        limit,
    }))
}

/// One step of a host's timeline.
pub struct StepView {
    pub step: String,
    pub class: &'static str,
    pub took: String,
}

/// One host of a deployment.
pub struct HostView {
    pub name: String,
    pub status: String,
    pub class: &'static str,
    /// The step in progress, or why it was skipped.
    pub doing: String,
    pub generations: String,
    pub from: String,
    pub to: String,
    pub took: String,
    pub steps: Vec<StepView>,
    pub summary: Option<String>,
    pub summary_lines: Vec<String>,
    pub error: Option<String>,
    pub log: Vec<String>,
    pub can_roll_back: bool,
}

pub struct PhaseView {
    pub hosts: String,
    pub note: String,
}

#[derive(Template)]
#[template(path = "deployment.html")]
struct ShowPage {
    page: Page,
    id: i64,
    label: String,
    status: String,
    class: &'static str,
    trigger: String,
    requested_by: String,
    flake: String,
    created: String,
    started: String,
    finished: String,
    duration: String,
    error: Option<String>,
    plan: Option<String>,
    phases: Vec<PhaseView>,
    hosts: Vec<HostView>,
    live: bool,
}

pub async fn show(
    State(state): State<AppState>,
    viewer: Viewer,
    Path(id): Path<String>,
) -> Result<Response, WebError> {
    viewer.permit(&state, Scope::Read)?;
    let id = parse_id(&id)?;
    let deployment = state.deployment(id).await?;
    let events = state.store().events(id, 0).await?;
    // Held at a gate or waiting for a window: still live (it goes on when
    // someone approves or the window opens).
    let live = deployment.status.is_active();
    let mut page = Page::new(format!("#{id}"), "/deployments", Some(&viewer));
    if live {
        let after = events.last().map(|e| e.id).unwrap_or(0);
        page.live = Some(format!("/deployments/{id}/events?after={after}"));
    }
    let can_roll_back = viewer.can_deploy() && !live;
    Ok(render(&show_page(
        page,
        &deployment,
        &events,
        can_roll_back,
    )))
}

fn show_page(page: Page, d: &Deployment, events: &[Event], can_roll_back: bool) -> ShowPage {
    let mut logs: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for event in events {
        if let Some(host) = event.host.as_deref() {
            logs.entry(host).or_default().push(log_line(event));
        }
    }
    let plan = d.plan.as_ref();
    ShowPage {
        id: d.id,
        label: run_label(d),
        status: d.status.to_string(),
        class: deployment_class(d.status),
        trigger: d.trigger.clone(),
        requested_by: d.requested_by.clone(),
        flake: match &d.flake_rev {
            Some(rev) => format!("{} @ {rev}", d.flake),
            None => d.flake.clone(),
        },
        created: when(Some(d.created_at)),
        started: when(d.time.started_at),
        finished: when(d.time.finished_at),
        duration: took(d.duration_ms()),
        error: d.error.clone(),
        plan: plan.map(|p| {
            format!(
                "{}; ETA {}; risk {}",
                p.strategy_reason,
                nix_deploy_core::render::seconds(p.eta_seconds),
                p.risk.as_str()
            )
        }),
        phases: plan
            .map(|p| {
                p.phases
                    .iter()
                    .map(|phase| PhaseView {
                        hosts: phase.hosts.join(", "),
                        note: phase.note.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default(),
        hosts: d
            .hosts
            .iter()
            .map(|run| {
                let log = logs.remove(run.host.as_str()).unwrap_or_default();
                host_view(run, log, can_roll_back)
            })
            .collect(),
        live: page.live.is_some(),
        page,
    }
}

fn log_line(event: &Event) -> String {
    format!(
        "{} {}",
        nix_deploy_core::render::timestamp(event.at)
            .split(' ')
            .nth(1)
            .unwrap_or_default(),
        event_text(event)
    )
}

fn host_view(run: &HostRun, mut log: Vec<String>, can_roll_back: bool) -> HostView {
    let skip = log.len().saturating_sub(LOG_TAIL);
    log.drain(..skip);
    HostView {
        name: run.host.clone(),
        status: run.status.to_string(),
        class: host_class(run.status),
        doing: match (run.status, &run.step, &run.reason) {
            (HostStatus::Running, Some(step), _) => step.clone(),
            (_, _, Some(reason)) => reason.clone(),
            _ => String::new(),
        },
        generations: format!(
            "{} → {}",
            generation(run.from.generation),
            generation(run.to.generation)
        ),
        from: short_path(run.from.path.as_deref()),
        to: short_path(run.to.path.as_deref()),
        took: took(run.duration_ms()),
        steps: run.steps.iter().map(step_view).collect(),
        summary: run.summary.as_ref().map(ChangeSummary::one_line),
        summary_lines: run.summary.as_ref().map(summary_lines).unwrap_or_default(),
        error: run.error.clone(),
        log,
        can_roll_back: can_roll_back && run.status == HostStatus::Deployed,
    }
}

fn step_view(step: &StepTiming) -> StepView {
    StepView {
        step: step.step.to_string(),
        class: match step.ok {
            Some(true) => "ok",
            Some(false) => "bad",
            None => "running",
        },
        took: step
            .finished_at
            .map(|end| nix_deploy_core::render::duration_ms(end - step.started_at))
            .unwrap_or_default(),
    }
}

/// A change summary in full: packages, kernel, units.
fn summary_lines(s: &ChangeSummary) -> Vec<String> {
    let mut lines = Vec::new();
    let list = |label: &str, items: &[String]| {
        (!items.is_empty()).then(|| format!("{label}: {}", items.join(", ")))
    };
    lines.extend(list("added", &s.added));
    lines.extend(list("removed", &s.removed));
    if !s.upgraded.is_empty() {
        let upgraded: Vec<String> = s
            .upgraded
            .iter()
            .map(|u| format!("{} {} → {}", u.name, u.from, u.to))
            .collect();
        lines.push(format!("upgraded: {}", upgraded.join(", ")));
    }
    if let Some(k) = &s.kernel {
        lines.push(format!("kernel: {} → {}", k.from, k.to));
    } else if s.kernel_changed {
        lines.push("kernel: rebuilt".into());
    }
    lines.extend(list("units added", &s.units_added));
    lines.extend(list("units removed", &s.units_removed));
    lines.extend(list("units changed", &s.units_changed));
    if s.rebuilt > 0 {
        lines.push(format!("{} package(s) rebuilt", s.rebuilt));
    }
    lines
}

#[derive(Deserialize)]
pub struct EventsQuery {
    after: Option<i64>,
}

/// The deployment's events for the page's script: the API's stream, each
/// event with its one line of text (the core's wording) added as `text`.
pub async fn events(
    State(state): State<AppState>,
    viewer: Viewer,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(query): Query<EventsQuery>,
) -> Result<Response, WebError> {
    viewer.permit(&state, Scope::Read)?;
    let id = parse_id(&id)?;
    // A reconnecting browser says where it was; a fresh page says what it showed.
    let after = last_event_id(&headers).or(query.after).unwrap_or(0);
    Ok(event_stream(&state, id, after, page_event).await?)
}

fn page_event(event: &Event) -> SseEvent {
    let mut value = serde_json::to_value(event).unwrap_or_default();
    value["text"] = serde_json::Value::String(log_line(event));
    SseEvent::default()
        .id(event.id.to_string())
        .event(event.kind.name())
        .data(value.to_string())
}

pub async fn cancel(
    State(state): State<AppState>,
    viewer: Viewer,
    Path(id): Path<String>,
    form: Result<Form<CsrfForm>, FormRejection>,
) -> Result<Response, WebError> {
    let form = form_body(form)?;
    let caller = viewer.authorize_action(&state, &form.csrf, Scope::Deploy)?;
    let id = parse_id(&id)?;
    cancel_deployment(&state, id, "web", &caller).await?;
    Ok(Redirect::to(&format!("/deployments/{id}")).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix_deploy_core::events::EventKind;
    use nix_deploy_core::options::DeployOptions;
    use nix_deploy_core::run::{RunKind, Span};

    #[test]
    fn markup_from_callers_and_hosts_is_escaped() {
        let mut run = HostRun::new(1, "web-1");
        run.status = HostStatus::RolledBack;
        run.error = Some("check said <img src=x onerror=alert(2)>".into());
        let deployment = Deployment {
            id: 1,
            kind: RunKind::Deploy,
            created_at: 0,
            time: Span::default(),
            status: nix_deploy_core::events::DeploymentStatus::Failed,
            trigger: "slack".into(),
            requested_by: "slack:<script>alert(1)</script>".into(),
            flake: "github:me/<b>fleet</b>".into(),
            flake_rev: None,
            strategy: "smart".into(),
            options: DeployOptions::default(),
            selected: vec!["web-1".into()],
            plan: None,
            pinned: None,
            gates: Vec::new(),
            waiting: None,
            error: None,
            pid: None,
            exec: None,
            hosts: vec![run],
            events: None,
        };
        let events = vec![Event {
            id: 1,
            deployment_id: 1,
            at: 0,
            host: Some("web-1".into()),
            kind: EventKind::Log {
                message: "<script>alert(3)</script>".into(),
            },
        }];
        let page = show_page(
            Page::new("#1", "/deployments", None),
            &deployment,
            &events,
            true,
        );
        let html = page.render().unwrap();
        for raw in [
            "<script>alert(1)",
            "<img src=x",
            "<script>alert(3)",
            "<b>fleet",
        ] {
            assert!(!html.contains(raw), "`{raw}` is escaped:\n{html}");
        }
        for text in ["alert(1)", "onerror=alert(2)", "alert(3)", "fleet"] {
            assert!(html.contains(text), "`{text}` is shown");
        }
    }
}
