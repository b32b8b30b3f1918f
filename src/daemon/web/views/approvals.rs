//! Approvals and windows: the deployments held at a gate (an approval rule
//! or a pause to promote) with who must still say yes, the deadline, the
//! hosts and what each would run, and Approve / Reject buttons; the
//! deployments waiting for a maintenance window with its next opening; and
//! every configured window, open now or not, with its next opening.
//!
//! The buttons act as the session's caller through the API's own functions
//! ([`approve_as`], [`reject_as`]): the same self-approval and approver
//! rules, the same reach over the gate's hosts, the same audit trail (with
//! `web` as the channel). Deploy scope and the CSRF token first.

use askama::Template;
use axum::Form;
use axum::extract::rejection::FormRejection;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;

use nix_deploy_core::approval::{Gate, GateKind, GateState};
use nix_deploy_core::events::DeploymentStatus;
use nix_deploy_core::run::Deployment;
use nix_deploy_core::window::WindowState;

use super::{Page, render, when};
use crate::daemon::AppState;
use crate::daemon::config::Scope;
use crate::daemon::routes::approvals::{approve_as, reject_as, rejection_reason};
use crate::daemon::routes::parse_id;
use crate::daemon::web::{Viewer, WebError, form_body};

/// A deployment held at its open gate.
pub struct Held {
    pub id: i64,
    pub requested_by: String,
    pub requested_at: String,
    pub title: String,
    /// `approval` or `pause`: the button says Approve or Promote.
    pub promote: bool,
    pub hosts: String,
    /// Who may approve, per rule: `2 of token:ops, slack:U1 (production)`.
    pub needs: Vec<String>,
    pub missing: String,
    pub approvals: Vec<String>,
    pub deadline: String,
    /// The hosts and what each would run, as approvers are shown it.
    pub summary: String,
}

/// A deployment waiting for a maintenance window.
pub struct Waiting {
    pub id: i64,
    pub requested_by: String,
    pub hosts: String,
    pub reason: String,
    pub opens: String,
}

/// A configured window.
pub struct WindowRow {
    pub name: String,
    pub kind: &'static str,
    pub schedule: String,
    pub hosts: String,
    pub open: bool,
    /// `until …` while open.
    pub closes: String,
    pub next: String,
}

#[derive(Template)]
#[template(path = "approvals.html")]
struct ApprovalsPage {
    page: Page,
    held: Vec<Held>,
    waiting: Vec<Waiting>,
    windows: Vec<WindowRow>,
    now: String,
}

fn held(deployment: &Deployment, gate: &Gate) -> Held {
    Held {
        id: deployment.id,
        requested_by: deployment.requested_by.clone(),
        requested_at: when(Some(deployment.created_at)),
        title: gate.title.clone(),
        promote: gate.kind == GateKind::Pause,
        hosts: gate.hosts.join(", "),
        needs: gate
            .requirements
            .iter()
            .map(|r| {
                format!(
                    "{} of {} ({}{})",
                    r.count,
                    r.approvers.join(", "),
                    r.rule,
                    if r.self_approval {
                        ""
                    } else {
                        "; not the requester"
                    }
                )
            })
            .collect(),
        missing: gate.missing(),
        approvals: gate
            .approvals
            .iter()
            .map(|a| {
                let comment = a
                    .comment
                    .as_deref()
                    .map(|c| format!(": {c}"))
                    .unwrap_or_default();
                format!("{} via {} at {}{comment}", a.by, a.via, when(Some(a.at)))
            })
            .collect(),
        deadline: gate
            .deadline
            .map(|d| when(Some(d)))
            .unwrap_or_else(|| "none".into()),
        summary: gate.summary.clone(),
    }
}

fn waiting(deployment: &Deployment) -> Option<Waiting> {
    let wait = deployment.waiting.as_ref()?;
    Some(Waiting {
        id: deployment.id,
        requested_by: deployment.requested_by.clone(),
        hosts: wait.hosts.join(", "),
        reason: wait.reason.clone(),
        opens: wait
            .opens_at
            .map(|t| when(Some(t)))
            .unwrap_or_else(|| "none within 400 days".into()),
    })
}

fn window_row(window: WindowState) -> WindowRow {
    WindowRow {
        kind: window.kind.as_str(),
        schedule: format!(
            "{} for {} ({})",
            window.schedule, window.duration, window.timezone
        ),
        hosts: if window.hosts.is_empty() {
            "every host".into()
        } else {
            window.hosts.join(", ")
        },
        open: window.open,
        closes: window
            .closes_at
            .map(|t| format!("until {}", when(Some(t))))
            .unwrap_or_default(),
        next: when(window.next_opening),
        name: window.name,
    }
}

pub async fn page(State(state): State<AppState>, viewer: Viewer) -> Result<Response, WebError> {
    viewer.permit(&state, Scope::Read)?;
    let store = state.store();
    let mut held_rows = Vec::new();
    let mut waiting_rows = Vec::new();
    // The unfinished deployments are few: each is read whole.
    for id in store.running_deployments().await? {
        let Some(deployment) = store.deployment(id).await? else {
            continue;
        };
        match deployment.status {
            DeploymentStatus::AwaitingApproval => {
                if let Some(gate) = deployment.gates.iter().find(|g| g.state == GateState::Open) {
                    held_rows.push(held(&deployment, gate));
                }
            }
            DeploymentStatus::WaitingForWindow => waiting_rows.extend(waiting(&deployment)),
            _ => {}
        }
    }
    let now = crate::now_ms();
    let report = state.policy().windows.states(now);
    Ok(render(&ApprovalsPage {
        page: Page::new("Approvals & windows", "/approvals", Some(&viewer)),
        held: held_rows,
        waiting: waiting_rows,
        windows: report.windows.into_iter().map(window_row).collect(),
        now: when(Some(now)),
    }))
}

/// Approve's form: the CSRF token and an optional comment.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ApproveForm {
    pub csrf: String,
    pub comment: String,
}

/// Reject's form: the CSRF token and the reason (required).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RejectForm {
    pub csrf: String,
    pub reason: String,
}

pub async fn approve(
    State(state): State<AppState>,
    viewer: Viewer,
    Path(id): Path<String>,
    form: Result<Form<ApproveForm>, FormRejection>,
) -> Result<Response, WebError> {
    let form = form_body(form)?;
    let caller = viewer.authorize_action(&state, &form.csrf, Scope::Deploy)?;
    let id = parse_id(&id)?;
    let comment = Some(form.comment.trim()).filter(|c| !c.is_empty());
    if comment.is_some_and(|c| c.len() > 1000) {
        return Err(WebError::BadRequest(
            "a comment is at most 1000 characters".into(),
        ));
    }
    approve_as(&state, &caller, "web", id, comment).await?;
    Ok(Redirect::to(&format!("/deployments/{id}")).into_response())
}

pub async fn reject(
    State(state): State<AppState>,
    viewer: Viewer,
    Path(id): Path<String>,
    form: Result<Form<RejectForm>, FormRejection>,
) -> Result<Response, WebError> {
    let form = form_body(form)?;
    let caller = viewer.authorize_action(&state, &form.csrf, Scope::Deploy)?;
    let id = parse_id(&id)?;
    let reason = rejection_reason(Some(form.reason))?;
    reject_as(&state, &caller, "web", id, &reason).await?;
    Ok(Redirect::to(&format!("/deployments/{id}")).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix_deploy_core::approval::{Approval, Requirement};

    #[test]
    fn a_held_deployment_says_who_must_still_approve_and_what_they_approve() {
        let deployment: Deployment = serde_json::from_value(serde_json::json!({
            "id": 9, "created_at": 0, "status": "awaiting-approval", "trigger": "web",
            "requested_by": "token:ci", "flake": ".", "flake_rev": null,
            "strategy": "smart", "options": {}, "selected": ["p1"],
            "plan": null, "error": null, "pid": null,
        }))
        .unwrap();
        let gate = Gate {
            number: 1,
            kind: GateKind::Approval,
            title: "approval rule production".into(),
            hosts: vec!["p1".into(), "p2".into()],
            host_tags: Default::default(),
            requirements: vec![Requirement {
                rule: "production".into(),
                approvers: vec!["token:ops".into(), "token:ci".into()],
                count: 2,
                self_approval: false,
            }],
            state: GateState::Open,
            opened_at: 0,
            deadline: None,
            approvals: vec![Approval {
                by: "token:ops".into(),
                at: 0,
                via: "web".into(),
                comment: Some("<b>ok</b>".into()),
                seen: String::new(),
            }],
            decided_by: None,
            decided_at: None,
            reason: None,
            summary: "p1: a → b".into(),
        };
        let row = held(&deployment, &gate);
        assert!(!row.promote);
        assert_eq!(row.hosts, "p1, p2");
        assert_eq!(
            row.needs,
            ["2 of token:ops, token:ci (production; not the requester)"]
        );
        assert_eq!(row.missing, "1 more from token:ops, token:ci (production)");
        assert!(row.approvals[0].starts_with("token:ops via web"));
        assert_eq!(row.deadline, "none");
        // Rendered, the comment's markup is text.
        let page = ApprovalsPage {
            page: Page::new("Approvals", "/approvals", None),
            held: vec![row],
            waiting: Vec::new(),
            windows: Vec::new(),
            now: String::new(),
        };
        let html = page.render().unwrap();
        assert!(!html.contains("<b>ok"), "{html}");
        assert!(html.contains("b&#62;ok"), "{html}");
    }
}
