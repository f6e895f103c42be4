//! The audit log, and the test clock's admin routes.

use super::*;

#[derive(Deserialize, Default)]
pub(super) struct AuditQuery {
    limit: Option<i64>,
    /// The previous page's `next_cursor`.
    cursor: Option<i64>,
}

pub(super) async fn list_audit(
    State(state): St,
    caller: Caller,
    Query(q): Query<AuditQuery>,
) -> ApiResult<Json<Value>> {
    let org = match caller.role {
        Role::KeyOwner => None,
        Role::Admin => Some(caller.org()?),
    };
    let limit = page_limit(q.limit, 200)?;
    let cursor = q.cursor;
    let rows = blocking(&state, move |s| s.list_audit(org, limit, cursor)).await?;
    let next_cursor = (rows.len() as i64 == limit).then(|| rows.last().map(|r| r.id)).flatten();
    Ok(Json(json!({ "audit": rows, "next_cursor": next_cursor })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ClockRequest {
    /// Seconds to step the adjustable clock: forward, or back when negative.
    advance_seconds: i64,
}

/// Test-only: steps the adjustable clock (forward, or back with a negative amount; the offset is
/// kept across restarts), then runs the expiry sweep. A step back holds the wall reading where it
/// was until the stepped time catches up (see `clock`): this reproduces a system clock set back.
pub(super) async fn advance_clock(
    State(state): St,
    caller: Caller,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    caller.key_owner()?;
    let _ = headers;
    let req: ClockRequest = json_body(&body)?;
    if !state.engine.clock.is_adjustable() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "clock_not_adjustable",
            "the clock is not adjustable (set clock = \"adjustable\" in tests only)",
        ));
    }
    let now = state
        .engine
        .clock
        .step(req.advance_seconds.saturating_mul(1000))
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "clock_not_persisted", e))?;
    // A step forward moves the reading past the floor the store holds: write the new one now.
    state.engine.persist_clock_floor().await;
    let expired = state.engine.expire_now().await?;
    let details = json!({"seconds": req.advance_seconds});
    state.service.audit_alone(state.service.audit(&caller.actor(), None, "clock.advance", "clock", details)).await?;
    Ok(Json(json!({ "now": now, "expired": expired, "offset_ms": state.engine.clock.offset_ms() })))
}

pub(super) async fn expire_now(State(state): St, caller: Caller) -> ApiResult<Json<Value>> {
    caller.key_owner()?;
    let expired = state.engine.expire_now().await?;
    Ok(Json(json!({ "expired": expired })))
}
