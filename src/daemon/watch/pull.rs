//! Pull mode (`watch.branch`): poll the flake's git remote for the branch
//! (`git ls-remote`, with a timeout) and, when it moves to a commit newer
//! than the last one deployed from that branch, deploy it: the same "newest
//! push wins, never an older one" rule, and the same record of branch heads,
//! as the GitHub hook. The fleet follows the branch: with no branch head
//! recorded yet, the first commit seen is deployed too (hosts that run it
//! already are skipped).

use std::time::Duration;

use nix_deploy_core::fleet::Selection;
use nix_deploy_core::pull;

use crate::daemon::{AppState, github};
use crate::engine::{DeployRequest, PushSource};
use crate::store::BranchHead;

/// How long one `git ls-remote` (or reading the commit's time) may take.
const POLL_TIMEOUT: Duration = Duration::from_secs(60);

/// What one poll found.
pub(super) struct Polled {
    pub commit: Result<String, String>,
    /// The commit's time (Unix seconds), read when it was new to us.
    pub committed_at: Option<Result<i64, String>>,
}

pub(super) struct Puller {
    pub branch: String,
    pub remote: String,
    /// The flake as configured (not pinned).
    pub flake: String,
    /// The commit last seen on the branch.
    pub seen: Option<String>,
    pub next_poll: i64,
    pub polling: bool,
}

impl Puller {
    /// For a validated config with a branch.
    pub fn new(branch: &str, flake: &str) -> Option<Puller> {
        Some(Puller {
            branch: branch.to_string(),
            remote: pull::git_remote(flake).ok()?,
            flake: flake.to_string(),
            seen: None,
            next_poll: 0,
            polling: false,
        })
    }

    /// The flake pinned to `commit`.
    pub fn pinned(&self, commit: &str) -> Result<String, String> {
        github::flake_at_revision(&self.flake, commit).map_err(|e| e.to_string())
    }

    /// Ask the remote (in the background): the commit, and its time when it
    /// is not the one seen last.
    pub fn poll(&self, state: &AppState) -> impl Future<Output = Polled> + Send + 'static {
        let (remote, branch, seen) = (self.remote.clone(), self.branch.clone(), self.seen.clone());
        let flake = self.flake.clone();
        let nix = state.engine.nix.clone();
        async move {
            let commit = crate::git::branch_head(&remote, &branch, POLL_TIMEOUT).await;
            let committed_at = match &commit {
                Ok(commit) if seen.as_deref() != Some(commit.as_str()) => {
                    Some(match github::flake_at_revision(&flake, commit) {
                        Ok(pinned) => nix
                            .flake_metadata(&pinned)
                            .await
                            .map_err(|e| e.to_string())
                            .and_then(|json| {
                                pull::last_modified(&json).ok_or_else(|| {
                                    format!("`nix flake metadata {pinned}` has no lastModified")
                                })
                            }),
                        Err(e) => Err(e.to_string()),
                    })
                }
                _ => None,
            };
            Polled {
                commit,
                committed_at,
            }
        }
    }
}

/// What the watch does after a poll.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Decision {
    /// Nothing new.
    Unchanged,
    /// Track this pinned flake (of `commit`); deploy it when `deploy`.
    Track {
        commit: String,
        flake: String,
        deploy: bool,
    },
    /// The poll failed, or the move is refused: said in the branch's state.
    Refused(String),
}

/// Decide about a poll's commit against the branch head recorded (by this
/// watch or the GitHub hook), recording it when it is newer.
pub(super) async fn decide(state: &AppState, puller: &mut Puller, polled: Polled) -> Decision {
    let commit = match polled.commit {
        Ok(commit) => commit,
        Err(e) => return Decision::Refused(e),
    };
    if puller.seen.as_deref() == Some(commit.as_str()) {
        return Decision::Unchanged;
    }
    let committed_at = match polled.committed_at {
        Some(Ok(at)) => at,
        Some(Err(e)) => return Decision::Refused(e),
        None => return Decision::Unchanged,
    };
    let flake = match puller.pinned(&commit) {
        Ok(flake) => flake,
        Err(e) => return Decision::Refused(e),
    };
    let store = state.store();
    let recorded = match store.branch_head(&puller.branch).await {
        Ok(recorded) => recorded,
        Err(e) => return Decision::Refused(e.to_string()),
    };
    let head = BranchHead {
        commit: commit.clone(),
        committed_at,
    };
    let decision = match recorded {
        Some(r) if r.commit == commit => Decision::Track {
            commit: commit.clone(),
            flake,
            deploy: false,
        },
        recorded => match store.advance_branch_head(&puller.branch, &head).await {
            Ok(true) => Decision::Track {
                commit: commit.clone(),
                flake,
                deploy: true,
            },
            Ok(false) => Decision::Refused(format!(
                "{commit} is not newer than what was last deployed from {}{}: not deployed",
                puller.branch,
                recorded
                    .map(|r| format!(" ({})", r.commit))
                    .unwrap_or_default()
            )),
            Err(e) => return Decision::Refused(e.to_string()),
        },
    };
    // Seen, whatever was decided: an older commit is not refused again at
    // every poll.
    puller.seen = Some(commit);
    decision
}

/// Deploy the whole fleet from `flake` (the branch's new head, `commit`),
/// recorded at once with trigger `pull`: as a push of the branch, it
/// supersedes older queued ones and starts only while still the newest.
pub(super) async fn deploy(
    state: &AppState,
    branch: &str,
    commit: &str,
    flake: &str,
) -> Result<i64, String> {
    let request = DeployRequest {
        selection: Selection::default(),
        wait: true,
        options: state.default_options(),
        trigger: "pull".into(),
        requested_by: format!("watch:{branch}"),
        source: Some(PushSource {
            kind: "pull".into(),
            branch: branch.to_string(),
            commit: commit.to_string(),
        }),
    };
    state
        .launch_queued(state.engine_with_flake(flake), request, |_| {})
        .await
        .map_err(|e| e.to_string())
}
