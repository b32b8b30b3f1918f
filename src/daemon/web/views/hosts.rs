//! A host's history: what it runs now, and every deployment run that
//! touched it (generations, when, who, what changed, how it ended), with a
//! Rollback button (the API's rollback).

use askama::Template;
use axum::Form;
use axum::extract::rejection::FormRejection;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;

use nix_deploy_core::render::{first_line, generation, short_path};
use nix_deploy_core::shell;
use nix_deploy_core::summary::ChangeSummary;

use super::fleet::{FleetRow, fleet_rows};
use super::{Page, host_class, render, took, when};
use crate::daemon::AppState;
use crate::daemon::config::Scope;
use crate::daemon::routes::fleet::start_rollback;
use crate::daemon::web::{Viewer, WebError, form_body};

/// Runs shown.
const HISTORY: i64 = 100;

pub struct HistoryRow {
    pub deployment: i64,
    pub when: String,
    pub who: String,
    pub trigger: String,
    pub strategy: String,
    pub status: String,
    pub class: &'static str,
    pub generations: String,
    pub to: String,
    pub took: String,
    pub summary: String,
    pub error: Option<String>,
}

#[derive(Template)]
#[template(path = "host.html")]
struct HostPage {
    page: Page,
    host: FleetRow,
    rows: Vec<HistoryRow>,
}

fn valid_host(host: &str) -> Result<(), WebError> {
    if shell::is_valid_host_name(host) {
        Ok(())
    } else {
        Err(WebError::BadRequest(format!(
            "`{host}` is not a valid host name"
        )))
    }
}

pub async fn history(
    State(state): State<AppState>,
    viewer: Viewer,
    Path(host): Path<String>,
) -> Result<Response, WebError> {
    viewer.permit(&state, Scope::Read)?;
    valid_host(&host)?;
    let store = state.store();
    let records = store
        .host_states()
        .await?
        .into_iter()
        .filter(|r| r.name == host)
        .collect();
    let evaluations = store
        .latest_evaluations()
        .await?
        .into_iter()
        .filter(|e| e.host == host)
        .collect();
    let Some(row) = fleet_rows(records, evaluations).pop() else {
        return Err(WebError::NotFound(format!(
            "no host `{host}` in the history"
        )));
    };
    let rows = store
        .host_history(&host, HISTORY)
        .await?
        .into_iter()
        .map(|entry| {
            let run = &entry.run;
            HistoryRow {
                deployment: run.deployment_id,
                when: when(run.time.started_at.or(run.time.finished_at)),
                who: entry.requested_by,
                trigger: entry.trigger,
                strategy: entry.strategy,
                status: run.status.to_string(),
                class: host_class(run.status),
                generations: format!(
                    "{} → {}",
                    generation(run.from.generation),
                    generation(run.to.generation)
                ),
                to: short_path(run.to.path.as_deref()),
                took: took(run.duration_ms()),
                summary: run
                    .summary
                    .as_ref()
                    .map(ChangeSummary::one_line)
                    .unwrap_or_default(),
                error: run.error.as_deref().map(|e| first_line(e).to_string()),
            }
        })
        .collect();
    Ok(render(&HostPage {
        page: Page::new(host, "/", Some(&viewer)),
        host: row,
        rows,
    }))
}

#[derive(Deserialize)]
pub struct RollbackForm {
    #[serde(default)]
    csrf: String,
    /// Empty: the previous generation.
    #[serde(default)]
    to_generation: String,
}

pub async fn rollback(
    State(state): State<AppState>,
    viewer: Viewer,
    Path(host): Path<String>,
    form: Result<Form<RollbackForm>, FormRejection>,
) -> Result<Response, WebError> {
    let form = form_body(form)?;
    let caller = viewer.authorize_action(&state, &form.csrf, Scope::Deploy)?;
    valid_host(&host)?;
    let to = form.to_generation.trim();
    let to_generation = if to.is_empty() {
        None
    } else {
        Some(
            to.parse::<u32>()
                .map_err(|_| WebError::BadRequest(format!("`{to}` is not a generation number")))?,
        )
    };
    let id = start_rollback(&state, host, to_generation, "web", &caller).await?;
    Ok(Redirect::to(&format!("/deployments/{id}")).into_response())
}
