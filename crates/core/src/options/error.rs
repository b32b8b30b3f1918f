//! The error of a request's option: below every module that checks
//! options (goals, exec, keys), so none of them imports the options.

/// A request's option that cannot be used; nothing was touched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid option: {0}")]
pub struct OptionsError(pub String);

pub(crate) fn bad(message: impl Into<String>) -> OptionsError {
    OptionsError(message.into())
}
