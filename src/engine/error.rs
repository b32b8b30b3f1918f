//! How an engine command fails, in one enum: bad input (nothing was
//! touched, exit code 2), a busy or unreachable host, the history, or a bug.

use nix_deploy_core::eval::EvalFailure;
use nix_deploy_core::fleet::InventoryError;
use nix_deploy_core::options::OptionsError;
use nix_deploy_core::plan::PlanError;

use crate::nix::NixError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The request cannot be carried out as given; nothing was touched.
    #[error(transparent)]
    Inventory(#[from] InventoryError),
    #[error(transparent)]
    Eval(NixError),
    /// Hosts whose configuration Nix could not evaluate (each with Nix's error).
    #[error("{}", describe_failures(.0))]
    EvalFailed(Vec<EvalFailure>),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Options(#[from] OptionsError),
    #[error("invalid option: {0}")]
    BadOption(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{host} is busy: {holder} is deploying it (use --wait to queue)")]
    Busy { host: String, holder: String },
    #[error("{0}")]
    Unreachable(String),
    /// Hosts outside the caller's reach (a token limited to some hosts).
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// `--no-wait` outside a maintenance window; nothing was recorded.
    #[error("outside the maintenance window (--no-wait): {0}")]
    OutsideWindow(String),
    /// A promotion that cannot be made as asked (mapping, source hosts
    /// unhealthy, unreachable or not in sync); nothing was recorded.
    #[error("promotion refused: {0}")]
    PromotionRefused(String),
    /// A queued deployment that will never start: a newer one of the same
    /// source came first.
    #[error("{0}")]
    Superseded(String),
    /// This coordinator is stopping and handed the deployment over at a
    /// safe point: another coordinator takes it over and resumes it.
    #[error("{0}")]
    HandedOver(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl EngineError {
    /// Whether the caller gave us something we cannot use (exit code 2).
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            EngineError::Inventory(_)
                | EngineError::Eval(_)
                | EngineError::EvalFailed(_)
                | EngineError::Plan(_)
                | EngineError::Options(_)
                | EngineError::BadOption(_)
                | EngineError::Busy { .. }
                | EngineError::Forbidden(_)
                | EngineError::OutsideWindow(_)
                | EngineError::PromotionRefused(_)
        )
    }
}

fn describe_failures(failures: &[EvalFailure]) -> String {
    let mut text = format!(
        "{} host(s) could not be evaluated; nothing was touched",
        failures.len()
    );
    for failure in failures {
        text.push_str(&format!("\n{}: {}", failure.host, failure.error));
    }
    text
}
