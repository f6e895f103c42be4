//! Liveness, readiness (`/healthz`), `/metrics` and `/v1/whoami`.

use super::*;

/// Liveness: the process answers. Restarting it would not mend a store outage, so the store is
/// not part of it.
pub(super) async fn livez() -> Response {
    (StatusCode::OK, Json(json!({"status": "ok"}))).into_response()
}

/// Readiness (`/healthz`, `/readyz`): the store can be read (a probe, bounded by
/// [`HEALTH_PROBE_TIMEOUT`]) and has neither failed a write since the last that succeeded, nor
/// run short of space, nor committed slowly. 503 with the fault's code and detail otherwise;
/// `rki_store_up` says the same.
pub(super) async fn healthz(State(state): St) -> Response {
    let store = state.engine.store.clone();
    let probe = tokio::time::timeout(HEALTH_PROBE_TIMEOUT, tokio::task::spawn_blocking(move || store.list_orgs()));
    let fault = match probe.await {
        Err(_) => Some(StoreFault::Unavailable(format!("a read took over {HEALTH_PROBE_TIMEOUT:?}"))),
        Ok(Err(e)) => Some(StoreFault::Unavailable(format!("read probe: {e}"))),
        Ok(Ok(Err(e))) => Some(StoreFault::Unavailable(format!("read probe: {e}"))),
        Ok(Ok(Ok(_))) => state.engine.health.fault(),
    };
    metrics::gauge!(m::STORE_UP).set(if fault.is_none() { 1.0 } else { 0.0 });
    match fault {
        None => (StatusCode::OK, Json(json!({"status": "ok"}))).into_response(),
        Some(fault) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": fault.code(), "store": fault.code(), "detail": fault.detail()})),
        )
            .into_response(),
    }
}

pub(super) async fn metrics_page(State(state): St) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.prometheus.render()).into_response()
}

/// Who the token belongs to: role, organization and label.
pub(super) async fn whoami(State(state): St, caller: Caller) -> ApiResult<Json<Value>> {
    let org = match caller.org_id {
        Some(id) => {
            let org = blocking(&state, move |s| s.org(id)).await?;
            json!({"id": org.id, "name": org.name})
        }
        None => Value::Null,
    };
    Ok(Json(json!({"role": caller.role.as_str(), "org": org, "label": caller.label})))
}
