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
    let token = find_token(tokens, presented.as_bytes())
        .ok_or_else(|| ApiError::Unauthorized("invalid token".into()))?;
    permit(token, needed)
}

/// The token whose secret is `presented`, compared with every token (all of
/// them, so timing does not tell which one nearly matched). The API's bearer
/// header and the web login both find tokens here.
pub fn find_token<'a>(tokens: &'a [Token], presented: &[u8]) -> Option<&'a Token> {
    let mut found: Option<&Token> = None;
    for token in tokens {
        let equal: bool = token.secret.expose().ct_eq(presented).into();
        if equal {
            found = Some(token);
        }
    }
    found
}

/// The token named `name` (a web session holds its token's name, not its secret).
pub fn token_named<'a>(tokens: &'a [Token], name: &str) -> Option<&'a Token> {
    tokens.iter().find(|t| t.name == name)
}

/// Whether `token` may do what needs `needed`: the one scope check of every
/// request, whether it came with a bearer token or a web session.
pub fn permit(token: &Token, needed: Scope) -> Result<Caller, ApiError> {
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
