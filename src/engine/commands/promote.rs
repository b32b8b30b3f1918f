//! `promote`: deploy to the target hosts exactly the systems their source
//! hosts run (paired by `deployment.promotionKey`), read from the source
//! hosts and fetched from them, never evaluated or built; refused before
//! anything is recorded when the pairing or a source host is not right
//! (see `fleet::promotion`). Recorded as a deployment whose strategy is
//! `promote` and whose pin names each target's source and system, so
//! `resume` deploys the same closures.

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use nix_deploy_core::events::Event;
use nix_deploy_core::fleet::Selection;
use nix_deploy_core::options::DeployOptions;
use nix_deploy_core::promote::PromoteRequest;
use nix_deploy_core::run::Deployment;

use super::{DeployRequest, Engine};
use crate::engine::EngineError;
use crate::engine::fleet::promotion;

/// How a promotion is recorded.
pub const PROMOTE: &str = "promote";

/// One promotion request.
#[derive(Clone, Debug)]
pub struct PromoteJob {
    pub request: PromoteRequest,
    /// How the targets are deployed, resolved.
    pub options: DeployOptions,
    pub trigger: String,
    pub requested_by: String,
}

impl Engine {
    /// Run a promotion to the end (as [`Engine::deploy`] runs a deployment).
    pub async fn promote(
        &self,
        job: PromoteJob,
        sink: Option<mpsc::UnboundedSender<Event>>,
        cancel: CancellationToken,
    ) -> Result<Deployment, EngineError> {
        self.preamble().await?;
        job.request.check()?;
        let prepared = promotion::prepare(self.fleet(), &job.request, &job.options).await?;
        let request = DeployRequest {
            selection: Selection {
                names: prepared.host_names(),
                ..Selection::default()
            },
            wait: job.request.wait,
            options: job.options,
            trigger: job.trigger,
            requested_by: job.requested_by,
            source: None,
        };
        self.run_prepared(None, &request, prepared, PROMOTE.into(), sink, cancel)
            .await
    }
}
