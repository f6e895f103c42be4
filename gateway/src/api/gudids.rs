//! GUDID provisioning, lists and revocation.

use super::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct GudidRequest {
    sn: Option<String>,
    sns: Option<Vec<String>>,
}

/// A GUDID row as the API shows it: no hash, no sealed key; its `status` at `now`.
pub(super) fn gudid_json(g: &GudidRow, now: Millis) -> Value {
    let mut v = serde_json::to_value(g).unwrap_or(Value::Null);
    v["status"] = json!(g.status(now));
    v
}

/// Provisions one GUDID per named SN (never spares), all or nothing: an SN that is not one of the
/// organization's devices answers 404 naming every such SN, and nothing is provisioned. A new
/// GUDID revokes the SN's live one (at most one live GUDID per SN). Each GUDID is shown once,
/// here; each provisioning and each revocation is audited in the same transaction.
pub(super) async fn provision_gudids(State(state): St, caller: Caller, body: Bytes) -> ApiResult<Response> {
    let org = caller.org()?;
    let req: GudidRequest = json_body(&body)?;
    let sns = match (req.sn, req.sns) {
        (Some(sn), None) => vec![sn],
        (None, Some(sns)) => sns,
        _ => {
            return Err(ApiError::bad(
                "bad_target",
                format!(
                    "name `sn`, or `sns` with 1 to {GUDIDS_PER_REQUEST_MAX} SNs (a larger fleet takes several calls)"
                ),
            ))
        }
    };
    let _permit = if sns.len() > 10 { Some(state.expensive()?) } else { None };
    let provisioned = state.service.provision_gudids(org, sns, &caller.actor()).await?;
    let out: Vec<Value> = provisioned
        .iter()
        .map(|(text, p)| {
            json!({
                "id": p.row.id,
                "sn": p.row.sn,
                "gudid": text.as_str(),
                "expires_at": p.row.expires_at,
                "revoked": p.revoked,
            })
        })
        .collect();
    Ok((StatusCode::CREATED, Json(json!({ "gudids": out }))).into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct GudidQuery {
    sn: Option<String>,
    /// `true`: only the live GUDIDs (unspent, unrevoked, unexpired).
    live: Option<bool>,
    limit: Option<i64>,
}

/// The organization's GUDIDs, newest first, at most `limit` (default and most [`PAGE_MAX`]):
/// of one SN with `sn`, only the live ones with `live=true`.
pub(super) async fn list_gudids(
    State(state): St,
    caller: Caller,
    Query(q): Query<GudidQuery>,
) -> ApiResult<Json<Value>> {
    let org = caller.org()?;
    let now = state.engine.clock.now_ms();
    let filter = GudidFilter {
        sn: q.sn,
        live_at: q.live.unwrap_or(false).then_some(now),
        limit: q.limit.unwrap_or(PAGE_MAX).clamp(1, PAGE_MAX),
    };
    let rows = blocking(&state, move |s| s.list_gudids(org, &filter)).await?;
    let out: Vec<Value> = rows.iter().map(|g| gudid_json(g, now)).collect();
    Ok(Json(json!({ "gudids": out })))
}

/// Revokes a live GUDID of the organization: it no longer opens the bootstrap identity nor
/// initialises a terminal. 404 for an unknown (or another organization's) GUDID, 409 for one
/// already used, revoked or expired. Audited in the same transaction.
pub(super) async fn revoke_gudid(State(state): St, caller: Caller, Path(id): Path<i64>) -> ApiResult<Json<Value>> {
    let org = caller.org()?;
    let row = state.service.revoke_gudid(org, id, &caller.actor()).await?;
    Ok(Json(json!({ "gudid": gudid_json(&row, state.engine.clock.now_ms()) })))
}
