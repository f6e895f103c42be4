//! Download tasks: preview, creation, lists, detail, stop; device unlock.

use super::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TaskRequest {
    sns: Option<Vec<String>>,
    group: Option<String>,
    key_source: Option<String>,
    slot: Option<u16>,
    expiry_days: Option<u16>,
    request_id: Option<i64>,
}

pub(super) fn task_spec(req: TaskRequest) -> ApiResult<TaskSpec> {
    Ok(TaskSpec {
        target: target_of(req.sns, req.group)?,
        key_source: req.key_source,
        slot: req.slot.unwrap_or(1),
        expiry_days: req.expiry_days,
        request_id: req.request_id,
    })
}

pub(super) async fn preview_task(State(state): St, caller: Caller, body: Bytes) -> ApiResult<Json<Value>> {
    let org = caller.org()?;
    let _permit = state.expensive()?;
    let spec = task_spec(json_body(&body)?)?;
    let preview = state.service.preview(org, &spec).await?;
    Ok(Json(json!({ "preview": preview })))
}

pub(super) async fn create_task(State(state): St, caller: Caller, body: Bytes) -> ApiResult<Response> {
    let org = caller.org()?;
    let _permit = state.expensive()?;
    let spec = task_spec(json_body(&body)?)?;
    let (task, preview) = state.service.create_task(org, &spec, &caller.actor()).await?;
    Ok((StatusCode::CREATED, Json(json!({ "task": task, "preview": preview }))).into_response())
}

#[derive(Deserialize, Default)]
pub(super) struct TaskQuery {
    status: Option<String>,
    limit: Option<i64>,
    /// The previous page's `next_cursor`: tasks numbered below it.
    cursor: Option<i64>,
}

pub(super) async fn list_tasks(State(state): St, caller: Caller, Query(q): Query<TaskQuery>) -> ApiResult<Json<Value>> {
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
    let mut summary =
        json!({"unfinished": 0, "done": 0, "succeeded": 0, "failed": 0, "expired": 0, "terminated": 0, "open": 0});
    let all = blocking(&state, move |s| s.list_tasks(org, None, i64::MAX, None)).await?;
    for t in &all {
        let key = if t.counts.open() > 0 { "unfinished" } else { "done" };
        summary[key] = json!(summary[key].as_i64().unwrap_or(0) + 1);
        for (k, v) in [
            ("succeeded", t.counts.succeeded),
            ("failed", t.counts.failed),
            ("expired", t.counts.expired),
            ("terminated", t.counts.terminated),
            ("open", t.counts.open()),
        ] {
            summary[k] = json!(summary[k].as_i64().unwrap_or(0) + v);
        }
    }
    let tasks: Vec<Value> = tasks.iter().map(task_json).collect();
    Ok(Json(json!({ "tasks": tasks, "summary": summary, "next_cursor": next_cursor })))
}

/// The store's id of the caller's task number `number`.
pub(super) async fn task_id(state: &Arc<AppState>, org: i64, number: i64) -> ApiResult<i64> {
    Ok(state.service.task_id(org, number).await?)
}

pub(super) fn task_json(t: &TaskRow) -> Value {
    let status = if t.counts.open() > 0 { "unfinished" } else { "done" };
    let outcome = if t.counts.open() > 0 {
        "in progress"
    } else if t.stopped_at.is_some() {
        "manually terminated"
    } else if t.counts.succeeded == t.counts.total {
        "succeeded"
    } else {
        "finished with failures"
    };
    let mut v = serde_json::to_value(t).unwrap_or(Value::Null);
    v["status"] = json!(status);
    v["outcome"] = json!(outcome);
    v
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
) -> ApiResult<Json<Value>> {
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
    let total = task.counts.total;
    let executions: Vec<Value> = executions
        .iter()
        .map(|e| {
            let mut v = serde_json::to_value(e).unwrap_or(Value::Null);
            v["task_id"] = json!(task.number);
            v["result_meaning"] = json!(e.result.map(rki_protocol::terminal::result_meaning));
            v["error_remedy"] =
                json!(e.result.and_then(rki_protocol::terminal::TerminalError::from_code).map(|t| t.remedy()));
            v["online"] = json!(state.engine.is_online(&e.sn));
            // Why a delivery does not end: the terminal's latest signed refusal, if any.
            v["last_refusal"] = json!(state.engine.last_refusal(e.id));
            v
        })
        .collect();
    Ok(Json(json!({
        "task": task_json(&task),
        "executions": executions,
        "executions_total": total,
        "executions_offset": offset,
    })))
}

pub(super) async fn stop_task(State(state): St, caller: Caller, Path(number): Path<i64>) -> ApiResult<Json<Value>> {
    let org = caller.org()?;
    let (terminated, task) = state.service.stop_task(org, number, &caller.actor()).await?;
    Ok(Json(json!({ "terminated": terminated, "task": task_json(&task) })))
}

pub(super) async fn unlock_device(State(state): St, caller: Caller, Path(sn): Path<String>) -> ApiResult<Json<Value>> {
    let org = caller.org()?;
    let unlock = match state.service.unlock(org, &sn, &caller.actor()).await? {
        UnlockSent::Now => "sent",
        UnlockSent::OnNextHello => "pending until the device connects",
    };
    Ok(Json(json!({ "sn": sn, "unlock": unlock })))
}
