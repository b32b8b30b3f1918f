//! The web dashboard, served by the daemon at `/` on the API's listener:
//! server-rendered HTML (askama templates, compiled into the binary and
//! escaped by default), one stylesheet and one small script (also compiled
//! in: nothing is fetched from elsewhere), and live updates over the same
//! Server-Sent Events as the API.
//!
//! People log in with an API token ([`session`]); the session has exactly
//! the token's scope, checked on every request by the API's own check
//! ([`crate::daemon::auth::permit`]), and every POST carries the session's
//! CSRF token ([`csrf`]). Views call the same functions as the API's
//! handlers (plan, start, cancel, roll back, approve, reject, the event
//! stream, the watched fleet), never the API over HTTP.
//!
//! - [`session`]: sessions and the login rate limit; [`csrf`]: tokens;
//! - `views/`: one file per page group (login, fleet, deployments, plan and
//!   deploy, approvals and windows, a host's history); `templates/` and
//!   `assets/`.

pub mod csrf;
pub mod session;
mod views;

use std::net::SocketAddr;
use std::sync::LazyLock;
use std::time::Duration;

use axum::Router;
use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::auth::{Caller, permit, token_named};
use super::config::Scope;
use super::{ApiError, AppState};
use session::{LoginLimiter, SESSION_COOKIE, Sessions};

/// `[web]` in the daemon's config.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct WebConfig {
    /// Serve the dashboard at `/` (the API is served either way).
    #[serde(default = "default_true")]
    pub enable: bool,
    /// Where people reach the dashboard, e.g. `https://deploy.example.org`.
    /// An `https://` URL (a TLS proxy in front of the daemon) makes the
    /// session cookie `Secure`.
    pub public_url: Option<String>,
    /// How long a login lasts.
    #[serde(
        default = "default_session_ttl",
        with = "nix_deploy_core::duration::human"
    )]
    pub session_ttl: Duration,
    /// Sessions held at once (the least recently used goes first).
    #[serde(default = "default_max_sessions")]
    pub max_sessions: usize,
    /// Login attempts per minute from one client address (ten times this
    /// from all together).
    #[serde(default = "default_login_attempts")]
    pub login_attempts_per_minute: u32,
}

fn default_true() -> bool {
    true
}
fn default_session_ttl() -> Duration {
    Duration::from_secs(8 * 3600)
}
fn default_max_sessions() -> usize {
    1000
}
fn default_login_attempts() -> u32 {
    10
}

impl Default for WebConfig {
    fn default() -> Self {
        toml::from_str("").expect("the empty [web] table is valid")
    }
}

impl WebConfig {
    /// Checked when the daemon's config is loaded.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(url) = &self.public_url
            && !(url.starts_with("https://") || url.starts_with("http://"))
        {
            return Err(format!(
                "web.public-url must start with https:// or http://, not `{url}`"
            ));
        }
        if self.session_ttl < Duration::from_secs(60) {
            return Err("web.session-ttl must be at least 1m".into());
        }
        if !(1..=100_000).contains(&self.max_sessions) {
            return Err("web.max-sessions must be from 1 to 100000".into());
        }
        if !(1..=10_000).contains(&self.login_attempts_per_minute) {
            return Err("web.login-attempts-per-minute must be from 1 to 10000".into());
        }
        Ok(())
    }

    /// Whether cookies must be `Secure`: the dashboard is served over TLS.
    pub fn behind_tls(&self) -> bool {
        self.public_url
            .as_deref()
            .is_some_and(|u| u.starts_with("https://"))
    }
}

/// The dashboard's state in the daemon.
pub struct WebState {
    pub sessions: Sessions,
    pub logins: LoginLimiter,
    pub secure_cookies: bool,
}

impl WebState {
    pub fn new(config: &WebConfig) -> Self {
        WebState {
            sessions: Sessions::new(config.session_ttl, config.max_sessions),
            logins: LoginLimiter::new(config.login_attempts_per_minute),
            secure_cookies: config.behind_tls(),
        }
    }
}

/// The client's address, added to every request by the server loop (the
/// login rate limit counts per address).
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub SocketAddr);

/// The dashboard's routes: pages (with the request timeout) and the live
/// event stream (without: it lasts as long as its deployment).
pub fn router(timeout: Duration) -> Router<AppState> {
    let pages = Router::new()
        .route("/", get(views::fleet::page))
        .route("/login", get(views::login::form).post(views::login::submit))
        .route("/logout", post(views::login::logout))
        .route("/deployments", get(views::deployments::list))
        .route("/deployments/{id}", get(views::deployments::show))
        .route("/deployments/{id}/cancel", post(views::deployments::cancel))
        .route("/approvals", get(views::approvals::page))
        .route("/deployments/{id}/approve", post(views::approvals::approve))
        .route("/deployments/{id}/reject", post(views::approvals::reject))
        .route("/plan", get(views::plan::form).post(views::plan::plan))
        .route("/deploy", post(views::plan::deploy))
        .route("/hosts/{host}", get(views::hosts::history))
        .route("/hosts/{host}/rollback", post(views::hosts::rollback))
        .route("/assets/{name}", get(asset))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            timeout,
        ));
    let streams = Router::new().route("/deployments/{id}/events", get(views::deployments::events));
    pages
        .merge(streams)
        .layer(axum::middleware::map_response(security_headers))
}

/// Every page: no framing, no inline or foreign scripts, styles or
/// connections (a second wall behind the templates' escaping), no MIME
/// sniffing, no referrer to other sites.
async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    response
}

const APP_CSS: &str = include_str!("assets/app.css");
const APP_JS: &str = include_str!("assets/app.js");

/// A digest of the assets, in their URLs: a new build is fetched anew,
/// the same one is cached.
pub(crate) static ASSET_VERSION: LazyLock<String> = LazyLock::new(|| {
    let mut digest = Sha256::new();
    digest.update(APP_CSS);
    digest.update(APP_JS);
    hex::encode(&digest.finalize()[..6])
});

async fn asset(Path(name): Path<String>) -> Response {
    let (body, kind) = match name.as_str() {
        "app.css" => (APP_CSS, "text/css; charset=utf-8"),
        "app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        _ => return WebError::NotFound("no such asset".into()).into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "private, max-age=86400"),
        ],
        body,
    )
        .into_response()
}

/// A logged-in person, from the session cookie.
#[derive(Clone, Debug)]
pub struct Viewer {
    /// The session id (from the cookie), to log out.
    session_id: String,
    pub token: String,
    pub scope: Scope,
    pub csrf: String,
}

impl Viewer {
    /// The API's own scope check, for this session's token.
    pub fn permit(&self, state: &AppState, needed: Scope) -> Result<Caller, WebError> {
        let token = token_named(&state.tokens, &self.token)
            .ok_or_else(|| WebError::Unauthorized("your token is no longer configured".into()))?;
        permit(token, needed).map_err(WebError::from)
    }

    /// Refuse a state-changing request without this session's CSRF token.
    pub fn check_csrf(&self, presented: &str) -> Result<(), WebError> {
        if csrf::matches(&self.csrf, presented) {
            Ok(())
        } else {
            Err(WebError::Forbidden(
                "the form's CSRF token is missing or wrong; reload the page and try again".into(),
            ))
        }
    }

    /// For a POST: the CSRF token, then the scope.
    pub fn authorize_action(
        &self,
        state: &AppState,
        presented_csrf: &str,
        needed: Scope,
    ) -> Result<Caller, WebError> {
        self.check_csrf(presented_csrf)?;
        self.permit(state, needed)
    }

    pub fn can_deploy(&self) -> bool {
        self.scope.allows(Scope::Deploy)
    }

    pub fn session_id(&self) -> &str {
        &self.session_id
    }
}

/// A cookie's value from the request's `Cookie` headers.
pub(crate) fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(cookie::Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|c| c.name() == name)
        .map(|c| c.value().to_string())
}

/// A `Set-Cookie` value: `HttpOnly`, `SameSite=Strict`, for the whole site,
/// `Secure` behind TLS; `max_age` zero removes it.
pub(crate) fn set_cookie(state: &AppState, name: &str, value: &str, max_age: Duration) -> String {
    cookie::Cookie::build((name, value))
        .http_only(true)
        .same_site(cookie::SameSite::Strict)
        .secure(state.web.secure_cookies)
        .path("/")
        .max_age(cookie::time::Duration::seconds(max_age.as_secs() as i64))
        .build()
        .to_string()
}

impl FromRequestParts<AppState> for Viewer {
    type Rejection = WebError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, WebError> {
        let login = || {
            if parts.method == axum::http::Method::GET {
                let next = parts
                    .uri
                    .path_and_query()
                    .map(|p| p.as_str().to_string())
                    .unwrap_or_else(|| "/".into());
                WebError::Login { next }
            } else {
                WebError::Unauthorized("you are not logged in".into())
            }
        };
        let id = cookie(&parts.headers, SESSION_COOKIE).ok_or_else(login)?;
        let session = state.web.sessions.get(&id).ok_or_else(login)?;
        let token = token_named(&state.tokens, &session.token).ok_or_else(login)?;
        Ok(Viewer {
            session_id: id,
            token: session.token,
            scope: token.scope,
            csrf: session.csrf,
        })
    }
}

impl axum::extract::OptionalFromRequestParts<AppState> for Viewer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Option<Self>, Self::Rejection> {
        Ok(
            <Viewer as FromRequestParts<AppState>>::from_request_parts(parts, state)
                .await
                .ok(),
        )
    }
}

/// What a page shows when something went wrong, with the right status.
#[derive(Debug)]
pub enum WebError {
    /// Not logged in: to the login page, then back to `next`.
    Login {
        next: String,
    },
    BadRequest(String),
    Unauthorized(String),
    Forbidden(String),
    NotFound(String),
    TooMany(String),
    /// Any of the API's errors, with its status.
    Api(ApiError),
}

impl From<ApiError> for WebError {
    fn from(e: ApiError) -> Self {
        WebError::Api(e)
    }
}

impl From<crate::store::StoreError> for WebError {
    fn from(e: crate::store::StoreError) -> Self {
        WebError::Api(e.into())
    }
}

impl IntoResponse for WebError {
    fn into_response(self) -> Response {
        let (status, message) = match self {
            WebError::Login { next } => {
                let to = format!(
                    "/login?next={}",
                    form_urlencoded::byte_serialize(next.as_bytes()).collect::<String>()
                );
                return Redirect::to(&to).into_response();
            }
            WebError::BadRequest(m) => (StatusCode::BAD_REQUEST, m),
            WebError::Unauthorized(m) => (StatusCode::UNAUTHORIZED, m),
            WebError::Forbidden(m) => (StatusCode::FORBIDDEN, m),
            WebError::NotFound(m) => (StatusCode::NOT_FOUND, m),
            WebError::TooMany(m) => (StatusCode::TOO_MANY_REQUESTS, m),
            WebError::Api(e) => (e.status_and_code().0, e.public_message()),
        };
        let page = views::ErrorPage::new(status, message);
        (status, views::render(&page)).into_response()
    }
}

/// A form's fields, or a 400 page saying what is wrong with them.
pub(crate) fn form_body<T>(
    form: Result<axum::Form<T>, axum::extract::rejection::FormRejection>,
) -> Result<T, WebError> {
    form.map(|axum::Form(fields)| fields)
        .map_err(|e| WebError::BadRequest(e.body_text()))
}

/// A rendered page, or a 500 if a template failed (logged once, here).
pub(crate) fn html(rendered: askama::Result<String>) -> Response {
    match rendered {
        Ok(body) => Html(body).into_response(),
        Err(e) => {
            tracing::error!(cause = %e, "rendering a page");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error; see the daemon's log",
            )
                .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_knows_when_it_is_behind_tls() {
        let config: WebConfig = toml::from_str("").unwrap();
        assert!(config.enable && !config.behind_tls());
        assert_eq!(config.session_ttl, Duration::from_secs(8 * 3600));
        let tls: WebConfig = toml::from_str("public-url = \"https://deploy.example.org\"").unwrap();
        assert!(tls.behind_tls());
        let bad: WebConfig = toml::from_str("public-url = \"deploy.example.org\"").unwrap();
        assert!(bad.validate().unwrap_err().contains("public-url"));
        let short: WebConfig = toml::from_str("session-ttl = \"10s\"").unwrap();
        assert!(short.validate().unwrap_err().contains("session-ttl"));
        assert!(toml::from_str::<WebConfig>("nope = 1").is_err());
    }
}
