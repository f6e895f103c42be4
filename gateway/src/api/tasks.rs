//! Download tasks: preview, creation, lists, detail, stop; device unlock.

use super::*;
use crate::api::types::{
    Execution, Preview, PreviewAnswer, Refusal, Task, TaskCreated, TaskDetail, TaskList, TaskRequest, TaskStopped,
    TaskSummary,
};

pub(super) fn task_spec(req: TaskRequest) -> ApiResult<TaskSpec> {
    Ok(TaskSpec {
        target: target_of(req.sns, req.group)?,
        key_source: req.key_source,
        slot: req.slot.unwrap_or(1),
        expiry_days: req.expiry_days,
        request_id: req.request_id,
    })
}

pub(super) async fn preview_task(State(state): St, caller: Caller, body: Bytes) -> ApiResult<Json<PreviewAnswer>> {
    let org = caller.org()?;
    let _permit = state.expensive()?;
    let spec = task_spec(json_body(&body)?)?;
    let preview = state.service.preview(org, &spec).await?;
    Ok(Json(PreviewAnswer { preview: Preview::from(&preview) }))
}

pub(super) async fn create_task(State(state): St, caller: Caller, body: Bytes) -> ApiResult<Response> {
    let org = caller.org()?;
    let _permit = state.expensive()?;
    let spec = task_spec(json_body(&body)?)?;
    let (task, preview) = state.service.create_task(org, &spec, &caller.actor()).await?;
    let created = TaskCreated { task: Task::from_row(&task), preview: Preview::from(&preview) };
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

#[derive(Deserialize, Default)]
pub(super) struct TaskQuery {
    status: Option<String>,
    limit: Option<i64>,
    /// The previous page's `next_cursor`: tasks numbered below it.
    cursor: Option<i64>,
}

pub(super) async fn list_tasks(
    State(state): St,
    caller: Caller,
    Query(q): Query<TaskQuery>,
) -> ApiResult<Json<TaskList>> {
    let org = caller.org()?;
    let unfinished = match q.status.as_deref() {
        None | Some("all") => None,
        Some("unfinished") => Some(true),
        Some("done") => Some(false),
        Some(other) => {
            return Err(ApiError::bad("bad_status", format!("status {other:?}: use unfinished, done or all")))
        }
    };
    let limit = page_limit(q.limit, 100)?;
    let cursor = q.cursor;
    let tasks = blocking(&state, move |s| s.list_tasks(org, unfinished, limit, cursor)).await?;
    let next_cursor = (tasks.len() as i64 == limit).then(|| tasks.last().map(|t| t.number)).flatten();
    let mut summary = TaskSummary::default();
    let all = blocking(&state, move |s| s.list_tasks(org, None, i64::MAX, None)).await?;
    for t in &all {
        if t.counts.open() > 0 {
            summary.unfinished += 1;
        } else {
            summary.done += 1;
        }
        summary.succeeded += t.counts.succeeded;
        summary.failed += t.counts.failed;
        summary.expired += t.counts.expired;
        summary.terminated += t.counts.terminated;
        summary.open += t.counts.open();
    }
    Ok(Json(TaskList { tasks: tasks.iter().map(Task::from_row).collect(), summary, next_cursor }))
}

/// The store's id of the caller's task number `number`.
pub(super) async fn task_id(state: &Arc<AppState>, org: i64, number: i64) -> ApiResult<i64> {
    Ok(state.service.task_id(org, number).await?)
}

/// `GET /v1/tasks/{id}`: `limit` executions from `offset` (by execution ID); without `limit`,
/// every one. `limit=0` is the task and its counts alone: what a poller of a large task needs.
#[derive(Deserialize, Default)]
pub(super) struct TaskDetailQuery {
    limit: Option<usize>,
    offset: Option<usize>,
}

pub(super) async fn get_task(
    State(state): St,
    caller: Caller,
    Path(number): Path<i64>,
    Query(q): Query<TaskDetailQuery>,
) -> ApiResult<Json<TaskDetail>> {
    let org = caller.org()?;
    let id = task_id(&state, org, number).await?;
    let task = blocking(&state, move |s| s.task(org, id)).await?;
    let offset = q.offset.unwrap_or(0);
    let executions = match q.limit {
        Some(0) => Vec::new(),
        // The page is read from the store, not cut from every execution of a fleet-wide task.
        limit => {
            let (offset, limit) =
                (offset.min(i64::MAX as usize) as i64, limit.map(|l| l.min(i64::MAX as usize) as i64));
            blocking(&state, move |s| s.task_executions_page(id, offset, limit)).await?
        }
    };
    let executions = executions
        .iter()
        .map(|e| {
            let refusal = state.engine.last_refusal(e.id).map(Refusal::from);
            Execution::from_row(e, task.number, state.engine.is_online(&e.sn), refusal)
        })
        .collect();
    Ok(Json(TaskDetail {
        executions_total: task.counts.total,
        task: Task::from_row(&task),
        executions,
        executions_offset: offset,
    }))
}

pub(super) async fn stop_task(
    State(state): St,
    caller: Caller,
    Path(number): Path<i64>,
) -> ApiResult<Json<TaskStopped>> {
    let org = caller.org()?;
    let (terminated, task) = state.service.stop_task(org, number, &caller.actor()).await?;
    Ok(Json(TaskStopped { terminated, task: Task::from_row(&task) }))
}

pub(super) async fn unlock_device(State(state): St, caller: Caller, Path(sn): Path<String>) -> ApiResult<Json<Value>> {
    let org = caller.org()?;
    let unlock = match state.service.unlock(org, &sn, &caller.actor()).await? {
        UnlockSent::Now => "sent",
        UnlockSent::OnNextHello => "pending until the device connects",
    };
    Ok(Json(json!({ "sn": sn, "unlock": unlock })))
}
