//! CSRF tokens: every state-changing request of a session carries its
//! session's token in a form field, compared in constant time; the login
//! form carries one it was given in a short-lived cookie (double submit), so
//! another site cannot log a browser in either. Tokens are 256 random bits.

use subtle::ConstantTimeEq;

/// The form field every POST carries.
pub const FIELD: &str = "csrf";

/// The cookie that holds the login form's token.
pub const LOGIN_COOKIE: &str = "nix_deploy_login";

/// 32 random bytes, hex: session ids and CSRF tokens.
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    // The operating system's generator; without it no session is safe.
    getrandom::fill(&mut bytes).expect("the operating system's random number generator");
    hex::encode(bytes)
}

/// Whether `presented` is `expected` (constant time; an empty token never
/// matches).
pub fn matches(expected: &str, presented: &str) -> bool {
    !expected.is_empty() && bool::from(expected.as_bytes().ct_eq(presented.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_same_token_matches() {
        let token = random_token();
        assert!(matches(&token, &token.clone()));
        assert!(!matches(&token, ""));
        assert!(!matches(&token, &random_token()));
        assert!(!matches("", ""));
        assert!(!matches(&token, &token[..63]));
    }
}
