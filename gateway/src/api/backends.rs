//! RKI backend credentials (`docs/PROTOCOL.md` §12.1): create (the secret is shown once), list,
//! revoke. An organization's admin token only.

use super::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateBackend {
    name: String,
}

/// Creates a backend credential. The answer carries the secret, once; the gateway keeps only the
/// MAC key sealed and a hash of the MQTT password. Audited (`backend.create`).
pub(super) async fn create_backend(State(state): St, caller: Caller, body: Bytes) -> ApiResult<Response> {
    let org = caller.org()?;
    let req: CreateBackend = json_body(&body)?;
    let created = state.service.create_backend(org, &req.name, &caller.actor()).await?;
    let body = json!({
        "backend": created.backend,
        "client_id": created.client_id,
        "secret": created.secret.as_str(),
    });
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// The organization's backends, by name (never a secret, key or hash).
pub(super) async fn list_backends(State(state): St, caller: Caller) -> ApiResult<Json<Value>> {
    let org = caller.org()?;
    let backends = state.service.list_backends(org).await?;
    Ok(Json(json!({ "backends": backends })))
}

/// Revokes a backend: it can no longer connect, and its requests are dropped. 404 for an unknown
/// name, 409 if revoked already. Audited (`backend.revoke`).
pub(super) async fn revoke_backend(
    State(state): St,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    let org = caller.org()?;
    let backend = state.service.revoke_backend(org, &name, &caller.actor()).await?;
    Ok(Json(json!({ "backend": backend })))
}
