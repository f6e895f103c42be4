//! Download tasks: who is ready (the preview), creation, stop ("manually terminated"), and the
//! remote unlock of a device that installed its key.

use serde_json::json;

use super::*;
use crate::engine::{Preview, TaskSpec};
use crate::store::TaskRow;

/// How an unlock went out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnlockSent {
    /// The device is online: the signed unlock was published.
    Now,
    /// Sent when the device next says hello.
    OnNextHello,
}

impl Service {
    /// Which devices of the target are ready for a task, and why the others are not.
    pub async fn preview(&self, org: i64, spec: &TaskSpec) -> ServiceResult<Preview> {
        Ok(self.engine.preview(org, spec).await?)
    }

    /// Creates a download task for every ready device (`task.create`, audited in the task's own
    /// transaction) and delivers it to the devices online. A repeated `request_id` returns the
    /// task it created first and creates nothing.
    pub async fn create_task(&self, org: i64, spec: &TaskSpec, actor: &Actor) -> ServiceResult<(TaskRow, Preview)> {
        Ok(self.engine.create_task(org, spec, actor).await?)
    }

    /// The store's id of the organization's task number `number` (its id in the API: task ids
    /// are numbered per organization, so that one organization cannot count another's tasks).
    pub async fn task_id(&self, org: i64, number: i64) -> ServiceResult<i64> {
        self.blocking(move |s| s.task_id_by_number(org, number)).await
    }

    /// Stops the organization's task number `number`: its open executions end "manually
    /// terminated" (`task.stop`, audited in the same transaction). Returns how many, and the task.
    pub async fn stop_task(&self, org: i64, number: i64, actor: &Actor) -> ServiceResult<(usize, TaskRow)> {
        self.stop_task_answering(org, number, actor, None).await
    }

    /// [`Service::stop_task`] for a backend's request: `answering` is remembered in the stop's
    /// own transaction (`docs/PROTOCOL.md` §12.5).
    pub async fn stop_task_answering(
        &self,
        org: i64,
        number: i64,
        actor: &Actor,
        answering: Option<crate::store::channel::Answering>,
    ) -> ServiceResult<(usize, TaskRow)> {
        let id = self.task_id(org, number).await?;
        let mut audit = self.audit(actor, Some(org), "task.stop", format!("task:{number}"), json!({}));
        if let Some(answering) = answering {
            audit = audit.answering(answering);
        }
        let terminated = self.engine.stop_task(org, id, &audit).await?;
        let task = self.blocking(move |s| s.task(org, id)).await?;
        Ok((terminated, task))
    }

    /// Asks a device to unlock (`device.unlock`, audited with the flag that keeps asking): now
    /// if it is online, else at its next hello. The device confirms by reporting itself unlocked.
    pub async fn unlock(&self, org: i64, sn: &str, actor: &Actor) -> ServiceResult<UnlockSent> {
        self.unlock_answering(org, sn, actor, None).await
    }

    /// [`Service::unlock`] for a backend's request: `answering` is remembered in the unlock's own
    /// transaction (`docs/PROTOCOL.md` §12.5).
    pub async fn unlock_answering(
        &self,
        org: i64,
        sn: &str,
        actor: &Actor,
        answering: Option<crate::store::channel::Answering>,
    ) -> ServiceResult<UnlockSent> {
        let mut audit = self.audit(actor, Some(org), "device.unlock", format!("device:{sn}"), json!({}));
        if let Some(answering) = answering {
            audit = audit.answering(answering);
        }
        let online = self.engine.unlock(org, sn, &audit).await?;
        Ok(if online { UnlockSent::Now } else { UnlockSent::OnNextHello })
    }
}
