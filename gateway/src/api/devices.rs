//! Devices (list, detail, the key owner's upload), groups and key-source assignments.

use super::*;

#[derive(Deserialize, Default)]
pub(super) struct DeviceQuery {
    sn: Option<String>,
    group: Option<String>,
    limit: Option<i64>,
    offset: Option<i64>,
    /// The `next_cursor` of the previous page.
    cursor: Option<String>,
}

pub(super) fn device_json(state: &AppState, d: &DeviceRow, pending: bool) -> Value {
    let online = state.engine.is_online(&d.sn);
    let slots: Value = serde_json::from_str(&d.slots_json).unwrap_or(Value::Array(vec![]));
    json!({
        "sn": d.sn,
        "model": d.model,
        "rom_version": d.rom_version,
        "app_version": d.app_version,
        "region": d.region,
        "online": online,
        "last_seen": d.last_seen,
        "locked": d.locked,
        "lock": if d.locked { "locked" } else { "ready" },
        "unlock_pending": d.unlock_pending,
        "last_unlock_refusal": state.engine.last_unlock_refusal(&d.sn),
        "debug_mode": d.debug_mode,
        "debug_key_present": d.debug_key_present,
        "assigned_key_source": d.assigned_key_source,
        "initialised": d.initialised,
        "task": if pending { "pending" } else { "none" },
        "slots": slots,
    })
}

/// A page's size: `default` without `limit`, else 1 to [`PAGE_MAX`].
pub(super) fn page_limit(limit: Option<i64>, default: i64) -> ApiResult<i64> {
    let limit = limit.unwrap_or(default);
    if !(1..=PAGE_MAX).contains(&limit) {
        return Err(ApiError::bad("bad_limit", format!("limit must be 1 to {PAGE_MAX}; page with next_cursor")));
    }
    Ok(limit)
}

/// `GET /v1/devices`: one page of at most [`PAGE_MAX`] devices by SN, with `next_cursor` when
/// there may be more (pass it as `cursor`).
pub(super) async fn list_devices(
    State(state): St,
    caller: Caller,
    Query(q): Query<DeviceQuery>,
) -> ApiResult<Json<Value>> {
    let org = caller.org()?;
    let _permit = state.expensive()?;
    let limit = page_limit(q.limit, PAGE_MAX)?;
    let after_sn = match q.cursor {
        Some(c) => Some(
            hex::decode(&c)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| ApiError::bad("bad_cursor", "cursor: pass the next_cursor of the previous page"))?,
        ),
        None => None,
    };
    let group = match q.group {
        Some(name) => Some(blocking(&state, move |s| s.group_by_name(org, &name)).await?.id),
        None => None,
    };
    let filter = DeviceFilter { sn_contains: q.sn, group, limit, offset: q.offset.unwrap_or(0).max(0), after_sn };
    let rows = blocking(&state, move |s| s.list_devices(org, &filter)).await?;
    let pending: std::collections::HashSet<i64> =
        blocking(&state, move |s| s.open_execution_device_ids(org)).await?.into_iter().collect();
    let total = blocking(&state, move |s| s.count_devices(org)).await?;
    let key_sources: std::collections::HashMap<i64, String> =
        blocking(&state, move |s| s.list_key_sources(org)).await?.into_iter().map(|k| (k.id, k.name)).collect();
    let devices: Vec<Value> = rows
        .iter()
        .map(|d| {
            let mut v = device_json(&state, d, pending.contains(&d.id));
            v["assigned_key_source"] = json!(d.assigned_key_source.and_then(|id| key_sources.get(&id).cloned()));
            v
        })
        .collect();
    let next_cursor = (rows.len() as i64 == limit).then(|| rows.last().map(|d| hex::encode(&d.sn))).flatten();
    Ok(Json(json!({ "devices": devices, "total": total, "next_cursor": next_cursor })))
}

pub(super) async fn get_device(State(state): St, caller: Caller, Path(sn): Path<String>) -> ApiResult<Json<Value>> {
    let org = caller.org()?;
    let d = state.engine.device(org, &sn).await?;
    let pending = blocking(&state, move |s| s.open_execution_device_ids(org)).await?.contains(&d.id);
    Ok(Json(json!({ "device": device_json(&state, &d, pending) })))
}

/// `POST /v1/devices/import`, kept only to say where devices come from. An organization cannot
/// register SNs itself: otherwise any organization could claim another's terminals before they
/// arrive, and learn from a refusal that an SN exists elsewhere.
pub(super) async fn org_import_refused(caller: Caller) -> ApiError {
    let detail = match caller.role {
        Role::KeyOwner => format!("devices are uploaded to an organization: {UPLOAD_ROUTE}"),
        Role::Admin => format!("devices are uploaded by the key owner: {UPLOAD_ROUTE}"),
    };
    ApiError::new(StatusCode::FORBIDDEN, "uploaded_by_key_owner", detail)
}

#[derive(Deserialize, Default)]
pub(super) struct UploadQuery {
    /// Only check and report; upload nothing.
    dry_run: Option<bool>,
    /// Refused with a reason: groups are the organization's.
    group: Option<String>,
}

/// `POST /v1/orgs/{org}/devices/import` (key owner): uploads a CSV of SNs to the organization,
/// all or nothing ([`Service::upload_devices`]).
pub(super) async fn upload_devices(
    State(state): St,
    caller: Caller,
    Path(org_name): Path<String>,
    Query(q): Query<UploadQuery>,
    body: Bytes,
) -> ApiResult<Response> {
    caller.key_owner()?;
    if q.group.is_some() {
        return Err(ApiError::bad(
            "bad_query",
            "group: groups are the organization's; it adds the devices it was given with POST /v1/groups/{name}/devices",
        ));
    }
    let _permit = state.expensive()?;
    let text = std::str::from_utf8(&body).map_err(|_| ApiError::bad("bad_csv", "the CSV is not UTF-8"))?;
    let report = state.service.upload_devices(&org_name, text, q.dry_run.unwrap_or(false), &caller.actor()).await?;
    Ok(Json(report).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateGroup {
    name: String,
    #[serde(default)]
    description: String,
}

pub(super) async fn create_group(State(state): St, caller: Caller, body: Bytes) -> ApiResult<Response> {
    let org = caller.org()?;
    let req: CreateGroup = json_body(&body)?;
    let group = state.service.create_group(org, &req.name, &req.description, &caller.actor()).await?;
    Ok((StatusCode::CREATED, Json(json!({ "group": group }))).into_response())
}

pub(super) async fn list_groups(State(state): St, caller: Caller) -> ApiResult<Json<Value>> {
    let org = caller.org()?;
    let groups = blocking(&state, move |s| s.list_groups(org)).await?;
    Ok(Json(json!({ "groups": groups })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Sns {
    sns: Vec<String>,
}

pub(super) async fn add_group_devices(
    State(state): St,
    caller: Caller,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let org = caller.org()?;
    let req: Sns = json_body(&body)?;
    let added = state.service.add_group_devices(org, &name, req.sns, &caller.actor()).await?;
    Ok(Json(json!({ "added": added })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AssignRequest {
    key_source: Option<String>,
    sns: Option<Vec<String>>,
    group: Option<String>,
}

pub(super) fn target_of(sns: Option<Vec<String>>, group: Option<String>) -> ApiResult<Target> {
    match (sns, group) {
        (Some(sns), None) => Ok(Target::Devices(sns)),
        (None, Some(group)) => Ok(Target::Group(group)),
        _ => Err(ApiError::bad("bad_target", "name either `sns` or `group`")),
    }
}

pub(super) async fn assign(State(state): St, caller: Caller, body: Bytes) -> ApiResult<Json<Value>> {
    let org = caller.org()?;
    let req: AssignRequest = json_body(&body)?;
    let target = target_of(req.sns, req.group)?;
    let n = state.service.assign(org, target, req.key_source.clone(), &caller.actor()).await?;
    Ok(Json(json!({ "assigned": n, "key_source": req.key_source })))
}
