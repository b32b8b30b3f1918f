//! Bearer tokens with scopes (`read` ⊂ `deploy` ⊂ `admin`), loaded from files
//! and compared in constant time.

use axum::http::HeaderMap;
use subtle::ConstantTimeEq;

use nix_deploy_core::run::{Deployment, RunKind};
use nix_deploy_core::select::HostFilter;

use super::config::{Scope, Secret};
use super::error::ApiError;
use crate::engine::Limit;

#[derive(Clone, Debug)]
pub struct Token {
    pub name: String,
    pub secret: Secret,
    pub scope: Scope,
    /// The hosts it may touch.
    pub hosts: HostFilter,
}

/// Who made a request, as recorded in history, and what they may touch.
#[derive(Clone, Debug)]
pub struct Caller {
    /// An identity (`token:ci`, `slack:U1`).
    pub identity: String,
    pub scope: Scope,
    /// Where they may reach, when not everywhere.
    pub limit: Option<Limit>,
}

impl Caller {
    pub fn requested_by(&self) -> String {
        self.identity.clone()
    }

    /// Whether they may touch the host `name` with `tags`.
    pub fn reaches(&self, name: &str, tags: &[String]) -> bool {
        self.limit.as_ref().is_none_or(|l| l.allows(name, tags))
    }

    /// `deployment` as this caller may see it: what `exec` commands
    /// printed only for callers who may run them (scope `admin`), since a
    /// command prints whatever it can read on a host. Everyone else gets
    /// each host's exit code with its output marked withheld.
    pub fn visible(&self, mut deployment: Deployment) -> Deployment {
        if deployment.kind == RunKind::Exec && !self.scope.allows(Scope::Admin) {
            for output in deployment
                .hosts
                .iter_mut()
                .filter_map(|h| h.output.as_mut())
            {
                output.withhold();
            }
        }
        deployment
    }
}

/// Check the `Authorization: Bearer` header against every token (all of them,
/// so timing does not tell which one nearly matched).
pub fn authorize(headers: &HeaderMap, tokens: &[Token], needed: Scope) -> Result<Caller, ApiError> {
    let header = headers
        .get(axum::http::header::AUTHORIZATION)
        .ok_or_else(|| {
            ApiError::Unauthorized("missing bearer token (Authorization: Bearer …)".into())
        })?;
    let presented = header
        .to_str()
        .ok()
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            ApiError::Unauthorized("malformed Authorization header; expected `Bearer TOKEN`".into())
        })?;
    let mut found: Option<&Token> = None;
    for token in tokens {
        let equal: bool = token.secret.expose().ct_eq(presented.as_bytes()).into();
        if equal {
            found = Some(token);
        }
    }
    let token = found.ok_or_else(|| ApiError::Unauthorized("invalid token".into()))?;
    if !token.scope.allows(needed) {
        return Err(ApiError::Forbidden(format!(
            "token `{}` has scope {:?}; this needs {:?}",
            token.name, token.scope, needed
        )));
    }
    Ok(Caller {
        identity: format!("token:{}", token.name),
        scope: token.scope,
        limit: (!token.hosts.is_everything()).then(|| Limit {
            who: format!("token `{}`", token.name),
            hosts: vec![token.hosts.clone()],
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> Vec<Token> {
        vec![
            Token {
                name: "viewer".into(),
                secret: Secret::new("r3ad"),
                scope: Scope::Read,
                hosts: HostFilter::everything(),
            },
            Token {
                name: "ci".into(),
                secret: Secret::new("d3pl0y"),
                scope: Scope::Deploy,
                hosts: HostFilter::everything(),
            },
        ]
    }

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(axum::http::header::AUTHORIZATION, value.parse().unwrap());
        h
    }

    #[test]
    fn checks_token_and_scope() {
        let t = tokens();
        assert_eq!(
            authorize(&headers("Bearer d3pl0y"), &t, Scope::Deploy)
                .unwrap()
                .identity,
            "token:ci"
        );
        assert_eq!(
            authorize(&headers("Bearer d3pl0y"), &t, Scope::Read)
                .unwrap()
                .identity,
            "token:ci"
        );
        assert!(matches!(
            authorize(&headers("Bearer r3ad"), &t, Scope::Deploy),
            Err(ApiError::Forbidden(_))
        ));
        assert!(matches!(
            authorize(&headers("Bearer nope"), &t, Scope::Read),
            Err(ApiError::Unauthorized(_))
        ));
        assert!(matches!(
            authorize(&headers("Basic abc"), &t, Scope::Read),
            Err(ApiError::Unauthorized(_))
        ));
        assert!(matches!(
            authorize(&HeaderMap::new(), &t, Scope::Read),
            Err(ApiError::Unauthorized(_))
        ));
    }
}
