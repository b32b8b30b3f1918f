//! Handing a deployment over to another coordinator when this one stops
//! (the daemon asks, see `Store::ask_hand_over`): its cancellation is then a
//! safe point, not an end. No host starts any more, the hosts in the middle
//! of their pipeline finish it, and instead of ending the deployment (hosts
//! not started recorded `cancelled`, staged hosts reverted) the execution
//! says so in the deployment's events and lets its lease go at once
//! ([`hand_over`]): a coordinator that takes deployments over resumes it,
//! as `resume` does, at its next heartbeat. A deployment whose policy
//! aborted it is never handed over: it ends here, rolled back as its
//! options say.

use tokio_util::sync::CancellationToken;

use super::FleetContext;
use crate::engine::EngineError;
use crate::engine::host::recorder::Recorder;

/// Whether the deployment stops here to be handed over: cancelled, and
/// asked to be handed over (which the daemon takes back when its stop
/// timeout passes: then it is cancelled as usual).
pub(crate) fn wanted(
    cx: FleetContext<'_>,
    recorder: &Recorder,
    cancel: &CancellationToken,
) -> bool {
    cancel.is_cancelled() && cx.store.hand_over_wanted(recorder.deployment_id())
}

/// Say so in the deployment's events and let it go: the error its caller
/// returns (it does not end the deployment).
pub(crate) async fn hand_over(cx: FleetContext<'_>, recorder: &Recorder) -> EngineError {
    let id = recorder.deployment_id();
    let message = format!(
        "handed over: coordinator {} (pid {}) is stopping; a coordinator that takes deployments over resumes deployment #{id}",
        cx.store.holder(),
        std::process::id()
    );
    if let Err(e) = recorder.log(None, message.clone()).await {
        return e.into();
    }
    match cx.store.hand_over(id).await {
        Ok(()) => EngineError::HandedOver(message),
        Err(e) => e.into(),
    }
}
