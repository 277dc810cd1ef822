//! One OS thread per role instance. tch tensors are not `Sync`, so a role's model, optimizer and
//! every tensor it computes live on that thread; async handlers send it closures over a channel
//! and await the answer, never holding a tensor across an `.await`.

use std::sync::mpsc;
use std::thread::JoinHandle;

use tokio::sync::oneshot;

use crate::comm::Groups;
use crate::error::{RoleError, RoleResult};
use crate::roles::{Role, RoleInfo, RoleKind, RoleSpec};

/// What a role's thread owns: the role and its collective groups. Derefs to the role, so jobs
/// that need only the role read `h.generate(..)`.
pub struct Hosted {
    pub role: Role,
    pub groups: Groups,
}

impl std::ops::Deref for Hosted {
    type Target = Role;
    fn deref(&self) -> &Role {
        &self.role
    }
}

impl std::ops::DerefMut for Hosted {
    fn deref_mut(&mut self) -> &mut Role {
        &mut self.role
    }
}

type Job = Box<dyn FnOnce(&mut Hosted) + Send>;

/// Handle to a role's thread. Dropping it closes the channel, which ends the thread after the
/// job in progress.
pub struct RoleHandle {
    pub role_id: String,
    pub kind: RoleKind,
    tx: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl RoleHandle {
    /// Starts the thread and creates the role on it (loading the model there).
    pub async fn spawn(spec: RoleSpec) -> RoleResult<(RoleHandle, RoleInfo)> {
        let (tx, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = oneshot::channel();
        let role_id = spec.role_id.clone();
        let kind = spec.kind();
        let rt = tokio::runtime::Handle::current();
        let thread = std::thread::Builder::new()
            .name(format!("role-{role_id}"))
            .spawn(move || {
                let mut role = match Role::create(&spec) {
                    Ok((role, info)) => {
                        let _ = ready_tx.send(Ok(info));
                        Hosted {
                            role,
                            groups: Groups::new(rt),
                        }
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                while let Ok(job) = rx.recv() {
                    job(&mut role);
                }
            })
            .map_err(|e| RoleError::io(std::path::Path::new("(thread)"), e))?;
        let info = ready_rx
            .await
            .map_err(|_| RoleError::RoleStopped(role_id.clone()))??;
        Ok((
            RoleHandle {
                role_id,
                kind,
                tx: Some(tx),
                thread: Some(thread),
            },
            info,
        ))
    }

    /// Runs `f` on the role's thread and returns its result.
    pub async fn run<T, F>(&self, f: F) -> RoleResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Hosted) -> RoleResult<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |role| {
            // A panic inside tch code must not take the thread (and every later call) down
            // silently: report it as this call's error.
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(role)))
                .unwrap_or_else(|p| {
                    let msg = p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "panic".into());
                    Err(RoleError::bad("(panic)", msg))
                });
            let _ = tx.send(r);
        });
        self.tx
            .as_ref()
            .ok_or_else(|| RoleError::RoleStopped(self.role_id.clone()))?
            .send(job)
            .map_err(|_| RoleError::RoleStopped(self.role_id.clone()))?;
        rx.await
            .map_err(|_| RoleError::RoleStopped(self.role_id.clone()))?
    }
}

impl Drop for RoleHandle {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            // The thread finishes its current job and exits; joining here would block the async
            // runtime, so detach it.
            drop(t);
        }
    }
}
