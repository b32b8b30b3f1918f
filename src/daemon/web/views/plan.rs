//! Plan and deploy: a selector, an exclusion, a strategy and a goal; the
//! plan is shown first (the API's plan), then a Deploy button that starts
//! the same request (the API's start). Both need the deploy scope.

use askama::Template;
use axum::Form;
use axum::extract::State;
use axum::extract::rejection::FormRejection;
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;

use nix_deploy_core::goal::GOAL_NAMES;
use nix_deploy_core::options::{Amount, Request, STRATEGY_NAMES};
use nix_deploy_core::plan::Action;
use nix_deploy_core::render::{generation, seconds, short_path};
use nix_deploy_core::reports::PlanReport;

use super::{Page, render};
use crate::daemon::AppState;
use crate::daemon::config::Scope;
use crate::daemon::routes::deployments::start;
use crate::daemon::routes::fleet::plan_report;
use crate::daemon::web::{Viewer, WebError, form_body};

/// The plan form's fields, as sent (everything a string; checked by
/// [`PlanForm::request`] and then by the same validation as the API's).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct PlanForm {
    pub csrf: String,
    /// Selectors as people write them: `web-*`, `@edge`, `a,b`; empty: all.
    pub selector: String,
    pub exclude: String,
    pub strategy: String,
    pub goal: String,
    pub max_failures: String,
    pub parallel_limit: String,
    /// A checkbox: present when ticked.
    pub continue_on_failure: Option<String>,
}

fn words(text: &str) -> Vec<String> {
    text.split(|c: char| c.is_whitespace() || c == ',')
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

impl PlanForm {
    /// The API's request document for this form.
    pub fn request(&self) -> Result<Request, String> {
        let nonempty = |s: &str| Some(s.trim().to_string()).filter(|s| !s.is_empty());
        Ok(Request {
            on: words(&self.selector),
            exclude: words(&self.exclude),
            strategy: nonempty(&self.strategy),
            goal: nonempty(&self.goal),
            max_failures: nonempty(&self.max_failures)
                .map(|m| Amount::parse(&m).map_err(|e| format!("max failures: {}", e.0)))
                .transpose()?,
            parallel_limit: nonempty(&self.parallel_limit)
                .map(|p| {
                    p.parse::<usize>()
                        .map_err(|_| format!("parallel limit: `{p}` is not a number"))
                })
                .transpose()?,
            continue_on_failure: self.continue_on_failure.is_some(),
            ..Request::default()
        })
    }
}

#[derive(Template)]
#[template(path = "plan.html")]
struct PlanPage {
    page: Page,
    form: PlanForm,
    strategies: &'static [&'static str],
    goals: &'static [&'static str],
    result: Option<PlanView>,
    error: Option<String>,
}

/// One host of the plan.
pub struct PlannedRow {
    pub name: String,
    pub action: String,
    pub class: &'static str,
    pub phase: String,
    pub current: String,
    pub target: String,
    pub summary: String,
    pub reason: String,
    pub risk: String,
    pub estimate: String,
}

pub struct PlanView {
    pub headline: String,
    pub rows: Vec<PlannedRow>,
    pub phases: Vec<String>,
    pub warnings: Vec<String>,
    pub eval_failures: Vec<(String, String)>,
    pub to_deploy: usize,
}

fn plan_view(report: &PlanReport) -> PlanView {
    let plan = &report.plan;
    PlanView {
        headline: format!(
            "{} of {} host(s) to deploy; {}; ETA {}; risk {}",
            report.to_deploy.len(),
            report.fleet_size,
            plan.strategy_reason,
            seconds(plan.eta_seconds),
            plan.risk.as_str()
        ),
        rows: plan
            .hosts
            .iter()
            .map(|h| PlannedRow {
                name: h.name.clone(),
                action: h.action.as_str().to_uppercase(),
                class: match h.action {
                    Action::Deploy => "running",
                    Action::Skip => "muted",
                    Action::Unreachable => "bad",
                },
                phase: h.phase.map(|p| (p + 1).to_string()).unwrap_or_default(),
                current: format!(
                    "{} (gen {})",
                    short_path(h.current.path.as_deref()),
                    generation(h.current.generation)
                ),
                target: short_path(Some(&h.target_path)),
                summary: h.summary.as_ref().map(|s| s.one_line()).unwrap_or_default(),
                reason: h.reason.clone().or(h.error.clone()).unwrap_or_default(),
                risk: h.risk.as_str().to_string(),
                estimate: seconds(h.estimate_seconds),
            })
            .collect(),
        phases: plan
            .phases
            .iter()
            .map(|p| format!("{} — {}", p.hosts.join(", "), p.note))
            .collect(),
        warnings: plan.warnings.clone(),
        eval_failures: report
            .evaluation
            .failed
            .iter()
            .map(|f| (f.host.clone(), f.error.clone()))
            .collect(),
        to_deploy: report.to_deploy.len(),
    }
}

fn plan_page(viewer: &Viewer, form: PlanForm) -> PlanPage {
    PlanPage {
        page: Page::new("Plan & deploy", "/plan", Some(viewer)),
        form,
        strategies: &STRATEGY_NAMES,
        goals: &GOAL_NAMES,
        result: None,
        error: None,
    }
}

pub async fn form(State(state): State<AppState>, viewer: Viewer) -> Result<Response, WebError> {
    viewer.permit(&state, Scope::Read)?;
    Ok(render(&plan_page(&viewer, PlanForm::default())))
}

pub async fn plan(
    State(state): State<AppState>,
    viewer: Viewer,
    form: Result<Form<PlanForm>, FormRejection>,
) -> Result<Response, WebError> {
    let form = form_body(form)?;
    let caller = viewer.authorize_action(&state, &form.csrf, Scope::Deploy)?;
    let mut page = plan_page(&viewer, form.clone());
    let planned = match form.request() {
        Ok(request) => plan_report(&state, &request, &caller)
            .await
            .map_err(WebError::from),
        Err(e) => Err(WebError::BadRequest(e)),
    };
    match planned {
        Ok(report) => page.result = Some(plan_view(&report)),
        // Bad input is shown on the form, to be corrected.
        Err(WebError::BadRequest(message)) => page.error = Some(message),
        Err(WebError::Api(e)) if e.status_and_code().0.is_client_error() => {
            page.error = Some(e.public_message());
        }
        Err(e) => return Err(e),
    }
    let mut response = render(&page);
    if page.error.is_some() {
        *response.status_mut() = axum::http::StatusCode::BAD_REQUEST;
    }
    Ok(response)
}

pub async fn deploy(
    State(state): State<AppState>,
    viewer: Viewer,
    form: Result<Form<PlanForm>, FormRejection>,
) -> Result<Response, WebError> {
    let form = form_body(form)?;
    let caller = viewer.authorize_action(&state, &form.csrf, Scope::Deploy)?;
    let request = form.request().map_err(WebError::BadRequest)?;
    let (id, _) = start(&state, &request, "web", &caller).await?;
    Ok(Redirect::to(&format!("/deployments/{id}")).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_form_becomes_the_apis_request() {
        let form = PlanForm {
            selector: "web-*, @edge  db1".into(),
            exclude: "web-3".into(),
            strategy: "canary".into(),
            max_failures: "25%".into(),
            parallel_limit: "8".into(),
            continue_on_failure: Some("on".into()),
            ..PlanForm::default()
        };
        let request = form.request().unwrap();
        assert_eq!(request.on, ["web-*", "@edge", "db1"]);
        assert_eq!(request.exclude, ["web-3"]);
        assert_eq!(request.strategy.as_deref(), Some("canary"));
        assert_eq!(request.parallel_limit, Some(8));
        assert!(request.continue_on_failure);
        assert!(request.goal.is_none());
        // Empty: every host, the daemon's defaults.
        assert_eq!(PlanForm::default().request().unwrap(), Request::default());
        let bad = PlanForm {
            parallel_limit: "lots".into(),
            ..PlanForm::default()
        };
        assert!(bad.request().unwrap_err().contains("parallel limit"));
    }
}
