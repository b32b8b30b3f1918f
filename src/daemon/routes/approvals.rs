//! Approvals and the rules around them: `POST /api/v1/deployments/{id}/approve`
//! and `/reject` (a deployment waiting at a gate: approval rules, or a pause
//! to promote), `GET /api/v1/windows` (every maintenance window, open or
//! not, and its next opening), `GET /api/v1/schedules` (each scheduled
//! deployment's last and next run), `GET /api/v1/audit` (the audit trail,
//! and its verification).

use std::collections::BTreeSet;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use serde::Deserialize;

use nix_deploy_core::approval::{Gate, GateState, Refusal, requester_identity};
use nix_deploy_core::audit::{AuditEntry, Verification};
use nix_deploy_core::run::Deployment;
use nix_deploy_core::scheduled::SchedulesReport;
use nix_deploy_core::window::WindowsReport;

use super::parse_body;
use crate::daemon::config::Scope;
use crate::daemon::{ApiError, AppState, Caller};
use crate::store::Decision;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApproveBody {
    #[serde(default)]
    comment: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RejectBody {
    #[serde(default)]
    reason: Option<String>,
}

/// A refusal as the API says it: 403 for the caller's rights, 409 for the
/// deployment's state.
pub(crate) fn refusal(refusal: Refusal) -> ApiError {
    if refusal.is_forbidden() {
        ApiError::Forbidden(refusal.to_string())
    } else {
        ApiError::Conflict(refusal.to_string())
    }
}

/// The open gate of deployment `id`, if `caller` may reach every host it
/// holds.
pub(crate) async fn reachable_gate(
    state: &AppState,
    caller: &Caller,
    id: i64,
) -> Result<Option<Gate>, ApiError> {
    let Some(gate) = state.store().open_gate_of(id).await? else {
        return Ok(None);
    };
    let outside: Vec<&str> = gate
        .hosts
        .iter()
        .filter(|h| {
            let tags = gate.host_tags.get(*h).map(Vec::as_slice).unwrap_or(&[]);
            !caller.reaches(h, tags)
        })
        .map(String::as_str)
        .collect();
    if !outside.is_empty() {
        return Err(ApiError::Forbidden(format!(
            "{} may not decide for {}",
            caller.identity,
            outside.join(", ")
        )));
    }
    Ok(Some(gate))
}

/// Whether `caller` may act on `deployment` (cancel it, resume it): a
/// caller limited to some hosts may only when every host it touches is
/// within reach (by the tags pinned when it started), or when they asked
/// for it themselves (their request was limited when it was made).
pub(crate) fn check_reach(caller: &Caller, deployment: &Deployment) -> Result<(), ApiError> {
    let Some(limit) = &caller.limit else {
        return Ok(());
    };
    if deployment.requested_by == caller.identity {
        return Ok(());
    }
    let tags = deployment.pinned.as_ref().map(|p| &p.tags);
    let hosts: BTreeSet<&str> = deployment
        .selected
        .iter()
        .map(String::as_str)
        .chain(deployment.hosts.iter().map(|h| h.host.as_str()))
        .collect();
    let mut outside = Vec::new();
    let mut unknown = Vec::new();
    for host in hosts {
        match tags.and_then(|t| t.get(host)) {
            Some(tags) if limit.allows(host, tags) => {}
            Some(_) => outside.push(host),
            None => unknown.push(host),
        }
    }
    if !outside.is_empty() {
        return Err(ApiError::Forbidden(format!(
            "{} may only touch {}; deployment #{} touches {}",
            limit.who,
            limit.describe(),
            deployment.id,
            outside.join(", ")
        )));
    }
    if !unknown.is_empty() {
        return Err(ApiError::Forbidden(format!(
            "{} may only touch {}, and what {} of deployment #{} are is not known (not started yet, or older): only its requester or an unlimited caller may act on it",
            limit.who,
            limit.describe(),
            unknown.join(", "),
            deployment.id
        )));
    }
    Ok(())
}

/// Approve (or promote) deployment `id` as `caller`, through `via`;
/// recorded in the audit trail either way.
pub(crate) async fn approve_as(
    state: &AppState,
    caller: &Caller,
    via: &str,
    id: i64,
    comment: Option<&str>,
) -> Result<Gate, ApiError> {
    let deployment = state.deployment(id).await?;
    let target = format!("deployment #{id}");
    if reachable_gate(state, caller, id).await?.is_none() {
        let refused = Refusal::NotAwaiting {
            id,
            detail: format!(" (it is {})", deployment.status),
        };
        state
            .audit(
                &caller.identity,
                via,
                "approve-refused",
                &target,
                serde_json::json!({ "error": refused.to_string() }),
            )
            .await?;
        return Err(refusal(refused));
    }
    let requester = requester_identity(&deployment.requested_by);
    match state
        .store()
        .approve(id, &caller.identity, &requester, via, comment)
        .await?
    {
        Decision::Done(gate) => {
            state
                .audit(
                    &caller.identity,
                    via,
                    "approve",
                    &target,
                    serde_json::json!({ "gate": gate.number, "state": gate.state, "seen": gate.summary, "comment": comment }),
                )
                .await?;
            Ok(*gate)
        }
        Decision::Refused(refused) => {
            state
                .audit(
                    &caller.identity,
                    via,
                    "approve-refused",
                    &target,
                    serde_json::json!({ "error": refused.to_string() }),
                )
                .await?;
            Err(refusal(refused))
        }
    }
}

/// Reject deployment `id`'s open gate as `caller`, with `reason`.
pub(crate) async fn reject_as(
    state: &AppState,
    caller: &Caller,
    via: &str,
    id: i64,
    reason: &str,
) -> Result<Gate, ApiError> {
    let deployment = state.deployment(id).await?;
    let target = format!("deployment #{id}");
    let decision = match reachable_gate(state, caller, id).await? {
        None => Decision::Refused(Refusal::NotAwaiting {
            id,
            detail: format!(" (it is {})", deployment.status),
        }),
        Some(_) => {
            state
                .store()
                .decide_gate(id, GateState::Rejected, &caller.identity, reason)
                .await?
        }
    };
    match decision {
        Decision::Done(gate) => {
            state
                .audit(
                    &caller.identity,
                    via,
                    "reject",
                    &target,
                    serde_json::json!({ "gate": gate.number, "reason": reason }),
                )
                .await?;
            Ok(*gate)
        }
        Decision::Refused(refused) => {
            state
                .audit(
                    &caller.identity,
                    via,
                    "reject-refused",
                    &target,
                    serde_json::json!({ "error": refused.to_string() }),
                )
                .await?;
            Err(refusal(refused))
        }
    }
}

/// A rejection's reason, checked (the API and the dashboard both ask it).
pub(crate) fn rejection_reason(reason: Option<String>) -> Result<String, ApiError> {
    reason
        .filter(|r| !r.trim().is_empty() && r.len() <= 1000)
        .ok_or_else(|| {
            ApiError::BadRequest("a rejection needs a `reason` (1 to 1000 characters)".into())
        })
}

pub async fn approve(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<Gate>, ApiError> {
    let caller = state.authorize(&headers, Scope::Deploy).await?;
    let id = super::parse_id(&id)?;
    let body: ApproveBody = parse_body(&super::bytes(body)?)?;
    let gate = approve_as(&state, &caller, "api", id, body.comment.as_deref()).await?;
    Ok(Json(gate))
}

pub async fn reject(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<Gate>, ApiError> {
    let caller = state.authorize(&headers, Scope::Deploy).await?;
    let id = super::parse_id(&id)?;
    let body: RejectBody = parse_body(&super::bytes(body)?)?;
    let reason = rejection_reason(body.reason)?;
    let gate = reject_as(&state, &caller, "api", id, &reason).await?;
    Ok(Json(gate))
}

pub async fn windows(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<WindowsReport>, ApiError> {
    state.authorize(&headers, Scope::Read).await?;
    Ok(Json(state.policy().windows.states(crate::now_ms())))
}

pub async fn schedules(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<SchedulesReport>, ApiError> {
    state.authorize(&headers, Scope::Read).await?;
    Ok(Json(crate::daemon::scheduler::report(&state).await?))
}

#[derive(Debug, Deserialize)]
pub struct AuditQuery {
    /// Unix ms.
    since: Option<i64>,
    #[serde(default)]
    verify: bool,
}

/// The audit trail (entries since a time), or its verification.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum AuditAnswer {
    Verification(Verification),
    Entries { entries: Vec<AuditEntry> },
}

pub async fn audit(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<AuditQuery>,
) -> Result<Json<AuditAnswer>, ApiError> {
    // Who did what, everywhere: for admins.
    let caller = state.authorize(&headers, Scope::Admin).await?;
    state
        .audit(
            &caller.identity,
            "api",
            "audit-read",
            "audit trail",
            serde_json::json!({ "verify": query.verify }),
        )
        .await?;
    if query.verify {
        return Ok(Json(AuditAnswer::Verification(
            state.store().verify_audit().await?,
        )));
    }
    Ok(Json(AuditAnswer::Entries {
        entries: state
            .store()
            .audit_entries(query.since.unwrap_or(0))
            .await?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::config::Scope;
    use crate::engine::Limit;
    use nix_deploy_core::select::HostFilter;

    fn deployment(requested_by: &str, tags: serde_json::Value) -> Deployment {
        serde_json::from_value(serde_json::json!({
            "id": 7, "created_at": 0, "status": "running", "trigger": "api",
            "requested_by": requested_by, "flake": ".", "flake_rev": null,
            "strategy": "smart", "options": {}, "selected": ["s1", "p1"],
            "plan": null, "error": null, "pid": null,
            "pinned": { "flake": null, "revision": null, "hosts": {}, "tags": tags },
        }))
        .unwrap()
    }

    fn staging_token() -> Caller {
        Caller {
            identity: "token:staging".into(),
            scope: Scope::Deploy,
            limit: Some(Limit {
                who: "token `staging`".into(),
                hosts: vec![HostFilter::parse(&["@staging".to_string()]).unwrap()],
            }),
        }
    }

    #[test]
    fn a_limited_caller_acts_only_on_deployments_within_reach_or_its_own() {
        let tags = serde_json::json!({ "s1": ["staging"], "p1": ["prod"] });
        let staging_only = serde_json::json!({ "s1": ["staging"], "p1": ["staging"] });
        let caller = staging_token();
        let e = check_reach(&caller, &deployment("token:ci", tags.clone())).unwrap_err();
        assert!(e.to_string().contains("touches p1"), "{e}");
        assert!(check_reach(&caller, &deployment("token:ci", staging_only)).is_ok());
        assert!(check_reach(&caller, &deployment("token:staging", tags.clone())).is_ok());
        // Hosts whose tags were not recorded (queued, or older): refused.
        let e = check_reach(&caller, &deployment("token:ci", serde_json::json!({}))).unwrap_err();
        assert!(e.to_string().contains("not known"), "{e}");
        // Unlimited callers act on anything.
        let admin = Caller {
            identity: "token:ops".into(),
            scope: Scope::Admin,
            limit: None,
        };
        assert!(check_reach(&admin, &deployment("token:ci", tags)).is_ok());
    }
}
