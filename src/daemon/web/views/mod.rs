//! The pages, one file per group, each a function from a request to a
//! template filled with plain strings (formatting happens here, in Rust,
//! with the core's wording; templates only place and escape).
//!
//! The navigation is [`NAV`].

pub mod approvals;
pub mod deployments;
pub mod fleet;
pub mod hosts;
pub mod login;
pub mod plan;

use askama::Template;
use axum::http::StatusCode;
use axum::response::Response;

use nix_deploy_core::events::{DeploymentStatus, HostStatus};

use super::{ASSET_VERSION, Viewer};

/// The navigation: path and label.
pub const NAV: &[(&str, &str)] = &[
    ("/", "Fleet"),
    ("/deployments", "Deployments"),
    ("/plan", "Plan & deploy"),
    ("/approvals", "Approvals & windows"),
];

/// What every page's frame needs.
pub struct Page {
    pub title: String,
    /// The navigation entry this page belongs to.
    pub section: &'static str,
    /// Who is logged in, and with which scope (none on the login page).
    pub user: Option<(String, String)>,
    pub csrf: String,
    pub can_deploy: bool,
    pub assets: String,
    /// The live event stream the page follows, if any.
    pub live: Option<String>,
    pub nav: &'static [(&'static str, &'static str)],
}

impl Page {
    pub fn new(title: impl Into<String>, section: &'static str, viewer: Option<&Viewer>) -> Self {
        Page {
            title: title.into(),
            section,
            user: viewer.map(|v| (v.token.clone(), format!("{:?}", v.scope).to_lowercase())),
            csrf: viewer.map(|v| v.csrf.clone()).unwrap_or_default(),
            can_deploy: viewer.is_some_and(Viewer::can_deploy),
            assets: ASSET_VERSION.clone(),
            live: None,
            nav: NAV,
        }
    }
}

#[derive(Template)]
#[template(path = "error.html")]
pub struct ErrorPage {
    pub page: Page,
    pub status: String,
    pub message: String,
}

impl ErrorPage {
    pub fn new(status: StatusCode, message: String) -> Self {
        ErrorPage {
            page: Page::new(status.to_string(), "", None),
            status: status.to_string(),
            message,
        }
    }
}

/// A page as a response.
pub fn render<T: Template>(template: &T) -> Response {
    super::html(template.render())
}

/// The CSS class of a deployment's status.
pub fn deployment_class(status: DeploymentStatus) -> &'static str {
    match status {
        DeploymentStatus::Succeeded => "ok",
        DeploymentStatus::Running | DeploymentStatus::Queued => "running",
        DeploymentStatus::WaitingForWindow | DeploymentStatus::AwaitingApproval => "warn",
        DeploymentStatus::Cancelled | DeploymentStatus::Superseded => "muted",
        DeploymentStatus::Failed | DeploymentStatus::Interrupted => "bad",
    }
}

/// The CSS class of a host run's status.
pub fn host_class(status: HostStatus) -> &'static str {
    match status {
        HostStatus::Deployed | HostStatus::Succeeded => "ok",
        HostStatus::Pending | HostStatus::Skipped | HostStatus::Cancelled => "muted",
        HostStatus::Running => "running",
        HostStatus::RolledBack => "warn",
        HostStatus::Failed
        | HostStatus::RollbackFailed
        | HostStatus::Unreachable
        | HostStatus::Unhealthy
        | HostStatus::Interrupted => "bad",
    }
}

/// The CSS class of a last result as the hosts table stores it.
pub fn result_class(status: Option<&str>) -> &'static str {
    status
        .and_then(HostStatus::parse)
        .map(host_class)
        .unwrap_or("muted")
}

/// A time for people, or `-`.
pub fn when(ms: Option<i64>) -> String {
    ms.map(nix_deploy_core::render::timestamp)
        .unwrap_or_else(|| "-".into())
}

/// A duration for people, or `-`.
pub fn took(ms: Option<i64>) -> String {
    ms.map(nix_deploy_core::render::duration_ms)
        .unwrap_or_else(|| "-".into())
}
