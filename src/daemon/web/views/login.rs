//! Logging in with an API token, and out.

use std::time::Duration;

use askama::Template;
use axum::Form;
use axum::extract::rejection::FormRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;

use super::{Page, render};
use crate::daemon::AppState;
use crate::daemon::auth::find_token;
use crate::daemon::web::session::SESSION_COOKIE;
use crate::daemon::web::{Peer, Viewer, WebError, cookie, csrf, form_body, set_cookie};

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    page: Page,
    next: String,
    error: Option<String>,
}

#[derive(Deserialize)]
pub struct NextQuery {
    next: Option<String>,
}

/// Where to go after logging in: a path on this site only (never
/// `//elsewhere` or a full URL), else the fleet.
fn local_path(next: Option<&str>) -> String {
    match next {
        Some(p) if p.starts_with('/') && !p.starts_with("//") && !p.contains('\\') => p.to_string(),
        _ => "/".to_string(),
    }
}

/// How long the login form's CSRF cookie lives.
const LOGIN_FORM_TTL: Duration = Duration::from_secs(3600);

/// The form, with a fresh CSRF token in a cookie and in the form.
fn login_page(
    state: &AppState,
    next: String,
    error: Option<String>,
    status: StatusCode,
) -> Response {
    let token = csrf::random_token();
    let mut page = Page::new("Log in", "", None);
    page.csrf = token.clone();
    let cookie = set_cookie(state, csrf::LOGIN_COOKIE, &token, LOGIN_FORM_TTL);
    let mut response = render(&LoginPage { page, next, error });
    *response.status_mut() = status;
    if let Ok(value) = cookie.parse() {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    response
}

pub async fn form(
    State(state): State<AppState>,
    viewer: Option<Viewer>,
    Query(query): Query<NextQuery>,
) -> Response {
    let next = local_path(query.next.as_deref());
    if viewer.is_some() {
        return Redirect::to(&next).into_response();
    }
    login_page(&state, next, None, StatusCode::OK)
}

#[derive(Deserialize)]
pub struct LoginForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    next: Option<String>,
}

pub async fn submit(
    State(state): State<AppState>,
    headers: HeaderMap,
    peer: Option<axum::Extension<Peer>>,
    form: Result<Form<LoginForm>, FormRejection>,
) -> Result<Response, WebError> {
    let form = form_body(form)?;
    let expected = cookie(&headers, csrf::LOGIN_COOKIE).unwrap_or_default();
    if !csrf::matches(&expected, &form.csrf) {
        return Err(WebError::Forbidden(
            "the login form's CSRF token is missing or wrong; open the login page again".into(),
        ));
    }
    if let Err(wait) = state.web.logins.attempt(peer.map(|p| p.0.0.ip())) {
        return Err(WebError::TooMany(format!(
            "too many login attempts; try again in {}s",
            wait.as_secs().max(1)
        )));
    }
    let next = local_path(form.next.as_deref());
    let Some(token) = find_token(&state.tokens, form.token.trim().as_bytes()) else {
        tracing::warn!("a web login with an unknown token was refused");
        return Ok(login_page(
            &state,
            next,
            Some("That token is not valid.".into()),
            StatusCode::UNAUTHORIZED,
        ));
    };
    let (id, _) = state.web.sessions.create(&token.name);
    tracing::info!(token = %token.name, "web login");
    let mut response = Redirect::to(&next).into_response();
    for value in [
        set_cookie(&state, SESSION_COOKIE, &id, state.web.sessions.ttl()),
        set_cookie(&state, csrf::LOGIN_COOKIE, "", Duration::ZERO),
    ] {
        if let Ok(value) = value.parse() {
            response.headers_mut().append(header::SET_COOKIE, value);
        }
    }
    Ok(response)
}

#[derive(Deserialize)]
pub struct CsrfForm {
    #[serde(default)]
    pub csrf: String,
}

pub async fn logout(
    State(state): State<AppState>,
    viewer: Viewer,
    form: Result<Form<CsrfForm>, FormRejection>,
) -> Result<Response, WebError> {
    let form = form_body(form)?;
    viewer.check_csrf(&form.csrf)?;
    state.web.sessions.remove(viewer.session_id());
    let mut response = Redirect::to("/login").into_response();
    if let Ok(value) = set_cookie(&state, SESSION_COOKIE, "", Duration::ZERO).parse() {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn after_login_only_paths_on_this_site() {
        assert_eq!(local_path(Some("/deployments/3")), "/deployments/3");
        assert_eq!(local_path(Some("//evil.example/x")), "/");
        assert_eq!(local_path(Some("https://evil.example/")), "/");
        assert_eq!(local_path(Some("/\\evil.example")), "/");
        assert_eq!(local_path(None), "/");
    }
}
