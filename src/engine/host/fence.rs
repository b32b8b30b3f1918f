//! The host side of fencing, for one run of a deployment: the deployment's
//! [`Fence`] (its id, its creation time and the epoch this process holds it
//! at, from `Store::host_fence`), carried by every script that changes or
//! settles a host (see `nix_deploy_core::remote::fence`), and what a host's
//! refusal means.
//!
//! A host refuses when it has seen a newer epoch of the deployment: another
//! coordinator took it over and has been there. This process has lost the
//! deployment, exactly as when the database refuses its write
//! (`StoreError::Superseded`): [`HostFence::refused`] marks it lost in the
//! store, so every later write is refused and the daemon drops the job where
//! it stands, and the host task that was refused stops without a way back
//! and without retrying (its next write fails). Its successor settles the
//! host.

use std::sync::Arc;
use std::time::Duration;

use nix_deploy_core::fleet::HostMeta;
use nix_deploy_core::remote::{self, Fence};

use crate::store::{Store, StoreError};
use crate::transport::ssh::{Connection, SshError, SshOptions};

/// The fence of one deployment as this process holds it. Small to carry
/// (every host task and probe has one): the history behind an `Arc`.
#[derive(Clone)]
pub(crate) struct HostFence {
    fence: Fence,
    store: Arc<Store>,
}

impl HostFence {
    /// Deployment `deployment_id`, at the epoch this process holds it at;
    /// refused when it holds it no more.
    pub async fn of(store: &Store, deployment_id: i64) -> Result<HostFence, StoreError> {
        Ok(HostFence {
            fence: store.host_fence(deployment_id).await?,
            store: Arc::new(store.clone()),
        })
    }

    /// What the host's scripts take.
    pub fn fence(&self) -> &Fence {
        &self.fence
    }

    /// Whether this process still holds the deployment (refused with
    /// `StoreError::Superseded` once a host or the database said otherwise).
    pub fn held(&self) -> Result<(), StoreError> {
        self.store.epoch(self.fence.deployment()).map(|_| ())
    }

    /// Whether `error` is `host` refusing our epoch. If it is, the
    /// deployment is lost here from now on (every later write is refused):
    /// the caller touches the host no more.
    pub fn refused(&self, host: &str, error: &SshError) -> bool {
        let SshError::Exit { code, stderr, .. } = error else {
            return false;
        };
        if !remote::is_fenced_out(code, stderr) {
            return false;
        }
        tracing::error!(
            host,
            deployment = self.fence.deployment(),
            epoch = self.fence.epoch(),
            "{}: another coordinator holds the deployment now: this one stops acting on it",
            stderr.trim()
        );
        self.store
            .fenced_out(self.fence.deployment(), self.fence.epoch());
        true
    }
}

impl std::fmt::Debug for HostFence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostFence")
            .field("fence", &self.fence)
            .finish()
    }
}

/// Raise `host`'s fence of the deployment to our epoch and do nothing else:
/// what a successor does on the hosts an earlier holder finished, which it
/// does not probe, so that holder, paused and woken, cannot switch them back.
/// A refusal marks the deployment lost here (see [`HostFence::refused`]).
pub(crate) async fn raise(
    host: &HostMeta,
    ssh: &SshOptions,
    fence: &HostFence,
) -> Result<(), String> {
    let connection = Connection::connect(&host.name, &host.target, ssh)
        .await
        .map_err(|e| e.to_string())?;
    let result = connection
        .run_privileged(
            "fence",
            &remote::fence_argv(fence.fence()),
            ssh.command_timeout + Duration::from_secs(60),
        )
        .await;
    connection.close().await;
    match result {
        Ok(_) => Ok(()),
        Err(e) => {
            fence.refused(&host.name, &e);
            Err(e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use nix_deploy_core::remote::{Fence, fence_argv};

    use crate::process::{self, Cmd, ExecError};

    /// Run the host's fence script with its state under `dir` instead of
    /// `/run/nix-deploy`: (exit code, stderr).
    async fn fence_on(dir: &std::path::Path, fence: &Fence) -> (i32, String) {
        let argv: Vec<String> = fence_argv(fence)
            .into_iter()
            .map(|a| a.replace("/run/nix-deploy", &dir.display().to_string()))
            .collect();
        let cmd = Cmd::new(&argv[0]).args(&argv[1..]);
        match process::run(&cmd, Duration::from_secs(30), |_, _| {}).await {
            Ok(out) => (0, out.stderr),
            // `exit status: 10`
            Err(ExecError::Exit {
                status,
                stderr_tail,
                ..
            }) => (
                status.rsplit(' ').next().unwrap().parse().unwrap(),
                stderr_tail,
            ),
            Err(e) => panic!("{e}"),
        }
    }

    #[tokio::test]
    async fn a_host_refuses_an_older_epoch_than_it_has_seen_and_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let at = |epoch| Fence::new(7, 1_700_000_000_000, epoch).unwrap();
        assert_eq!(fence_on(dir.path(), &at(2)).await.0, 0);
        let recorded = dir.path().join("fence/7-1700000000000");
        assert_eq!(std::fs::read_to_string(&recorded).unwrap().trim(), "2");
        // The same epoch goes on; an older one is refused, naming both.
        assert_eq!(fence_on(dir.path(), &at(2)).await.0, 0);
        let (code, stderr) = fence_on(dir.path(), &at(1)).await;
        assert_eq!(code.to_string(), nix_deploy_core::remote::FENCED_OUT);
        assert!(nix_deploy_core::remote::is_fenced_out(
            &code.to_string(),
            &stderr
        ));
        assert!(
            stderr.contains("#7 at epoch 1") && stderr.contains("seen epoch 2"),
            "{stderr}"
        );
        assert!(
            std::fs::read_to_string(dir.path().join("fence/7-1700000000000.refused"))
                .unwrap()
                .contains("refused epoch 1, seen 2")
        );
        // A newer one raises it.
        assert_eq!(fence_on(dir.path(), &at(5)).await.0, 0);
        assert_eq!(std::fs::read_to_string(&recorded).unwrap().trim(), "5");
        assert_eq!(fence_on(dir.path(), &at(4)).await.0, 10);
        // Another history's deployment #7 (created at another time) is
        // another deployment.
        let other = Fence::new(7, 1_800_000_000_000, 1).unwrap();
        assert_eq!(fence_on(dir.path(), &other).await.0, 0);
        // A recorded epoch that is not a number refuses everything.
        std::fs::write(&recorded, "garbage").unwrap();
        let (code, stderr) = fence_on(dir.path(), &at(9)).await;
        assert_eq!(code, 1, "{stderr}");
        assert!(stderr.contains("not an epoch"), "{stderr}");
    }
}
