//! The admin HTTP API (`/v1`, JSON), `/metrics` and `/healthz`.
//!
//! Every `/v1` route needs `Authorization: Bearer <token>`. An organization's token sees and acts
//! on that organization's objects only; the key owner's token authorizes BDKs, creates
//! organizations and uploads each organization's SNs. Errors are problem+json bodies with a
//! stable `code`. Every action that changes state is written to the append-only audit log.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use serde_json::{json, Value};
use zeroize::Zeroizing;

use crate::clock::Millis;
use crate::engine::{Engine, EngineError, Target, TaskSpec};
use crate::keyservice::ceremony::Component as CeremonyComponent;
use crate::metrics as m;
use crate::service::gudids::GUDIDS_PER_REQUEST_MAX;
use crate::service::keys::{key_family, BdkMaterial, NewKek, NewKeySource};
use crate::service::orgs::token_hash;
use crate::service::registry::UPLOAD_ROUTE;
use crate::service::tasks::UnlockSent;
use crate::service::{Service, ServiceError};
use crate::store::health::StoreFault;
use crate::store::*;

pub struct AppState {
    pub engine: Arc<Engine>,
    /// Every action goes through it.
    pub service: Service,
    pub prometheus: PrometheusHandle,
    /// Permits for the expensive requests (device lists, record exports, imports, previews, task
    /// creation): over [`EXPENSIVE_MAX`] at once, the next gets 503 `busy` rather than queueing
    /// memory and store time behind the others.
    expensive: Arc<tokio::sync::Semaphore>,
}

impl AppState {
    pub fn new(engine: Arc<Engine>, prometheus: PrometheusHandle) -> Self {
        Self {
            service: Service::new(engine.clone()),
            engine,
            prometheus,
            expensive: Arc::new(tokio::sync::Semaphore::new(EXPENSIVE_MAX)),
        }
    }

    /// A permit for an expensive request, or 503 `busy`.
    fn expensive(&self) -> ApiResult<tokio::sync::OwnedSemaphorePermit> {
        self.expensive.clone().try_acquire_owned().map_err(|_| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                format!("{EXPENSIVE_MAX} expensive requests are running; try again in a second"),
            )
        })
    }
}

/// Expensive requests served at once.
pub const EXPENSIVE_MAX: usize = 4;
/// Largest page of a list; a longer list is read with the page's `next_cursor`.
pub const PAGE_MAX: i64 = 1000;
/// Records read from the store per step of a streamed export.
const EXPORT_PAGE: i64 = 2000;

type St = State<Arc<AppState>>;

/// Longest read probe of `/healthz` before the store counts as unavailable.
const HEALTH_PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// Largest request body: a CSV of 100,000 SNs fits.
pub const BODY_BYTES_MAX: usize = 4 * 1024 * 1024;

/// The admin API; `/metrics` too unless it has an address of its own ([`metrics_router`]).
pub fn router(state: Arc<AppState>, with_metrics: bool) -> Router {
    let mut router =
        Router::new().route("/healthz", get(healthz)).route("/readyz", get(healthz)).route("/livez", get(livez));
    if with_metrics {
        router = router.route("/metrics", get(metrics_page));
    }
    router
        .route("/v1/whoami", get(whoami))
        .route("/v1/orgs", post(create_org).get(list_orgs))
        .route("/v1/orgs/{org}/key-sources", post(authorize_key_source))
        .route("/v1/key-sources", get(list_key_sources))
        .route("/v1/orgs/{org}/keks", post(create_kek))
        .route("/v1/orgs/{org}/devices/import", post(upload_devices))
        .route("/v1/keks", get(list_keks))
        .route("/v1/devices", get(list_devices))
        .route("/v1/devices/import", post(org_import_refused))
        .route("/v1/devices/{sn}", get(get_device))
        .route("/v1/devices/{sn}/unlock", post(unlock_device))
        .route("/v1/groups", post(create_group).get(list_groups))
        .route("/v1/groups/{name}/devices", post(add_group_devices))
        .route("/v1/assignments", post(assign))
        .route("/v1/tasks/preview", post(preview_task))
        .route("/v1/tasks", post(create_task).get(list_tasks))
        .route("/v1/tasks/{id}", get(get_task))
        .route("/v1/tasks/{id}/stop", post(stop_task))
        .route("/v1/records", get(list_records))
        .route("/v1/billing", get(billing))
        .route("/v1/gudids", post(provision_gudids).get(list_gudids))
        .route("/v1/gudids/{id}/revoke", post(revoke_gudid))
        .route("/v1/audit", get(list_audit))
        .route("/v1/admin/clock", post(advance_clock))
        .route("/v1/admin/expire", post(expire_now))
        .merge(crate::portal::router())
        .fallback(no_such_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(BODY_BYTES_MAX))
        // Refuses a declared Content-Length over the limit at once, before any of the body is
        // read; DefaultBodyLimit alone would wait for the bytes (a chunked body still meets it).
        .layer(tower_http::limit::RequestBodyLimitLayer::new(BODY_BYTES_MAX))
        .layer(axum::middleware::from_fn_with_state(state.clone(), refuse_changes_without_space))
        .layer(axum::middleware::from_fn(problems_and_headers))
        .with_state(state)
}

/// `/metrics`, `/healthz` and `/livez` alone, for `metrics_addr`.
pub fn metrics_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_page))
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .fallback(no_such_route)
        .layer(axum::middleware::from_fn(problems_and_headers))
        .with_state(state)
}

async fn no_such_route(uri: axum::http::Uri) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no route {}", escaped_prefix(uri.path())))
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {}", escaped_prefix(uri.path())),
    )
}

/// A caller-chosen text for a message: at most 80 characters, escaped.
fn escaped_prefix(text: &str) -> String {
    let mut out: String = text.chars().take(80).flat_map(char::escape_default).collect();
    if text.chars().count() > 80 {
        out.push('…');
    }
    out
}

/// Largest error body turned into problem+json detail (axum's rejections are short texts).
const PLAIN_ERROR_BYTES_MAX: usize = 4096;

/// Every answer says `X-Content-Type-Options: nosniff`, and every API answer `Cache-Control:
/// no-store` (tokens, keys' KCVs and fleet data must not sit in caches); the portal's static
/// files keep their own caching. An error that is not problem+json yet (axum's rejections of a
/// bad query, a body over the limit, a body that timed out) becomes one, with a stable code.
async fn problems_and_headers(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let portal = request.uri().path().starts_with("/portal");
    let mut response = next.run(request).await;
    let status = response.status();
    // axum's own rejections and empty error bodies: plain text or nothing. JSON answers (a
    // problem already, or /healthz's own body) stay as they are.
    let plain = response.headers().get(header::CONTENT_TYPE).is_none_or(|v| v.as_bytes().starts_with(b"text/plain"));
    if (status.is_client_error() || status.is_server_error()) && plain {
        let body = std::mem::take(response.body_mut());
        let text = axum::body::to_bytes(body, PLAIN_ERROR_BYTES_MAX).await.unwrap_or_default();
        let code = match status {
            StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
            StatusCode::URI_TOO_LONG => "uri_too_long",
            StatusCode::REQUEST_TIMEOUT => "body_timeout",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
            StatusCode::NOT_FOUND => "not_found",
            StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
            s if s.is_server_error() => "internal",
            _ => "bad_request",
        };
        let detail = escaped_prefix(String::from_utf8_lossy(&text).trim());
        let detail = if detail.is_empty() { status.canonical_reason().unwrap_or("error").to_string() } else { detail };
        response = ApiError::new(status, code, detail).into_response();
    }
    let headers = response.headers_mut();
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, header::HeaderValue::from_static("nosniff"));
    if !portal {
        headers.insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    }
    response
}

// ------------------------------------------------------------------ errors

/// A problem+json error with a stable code.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    detail: String,
    extra: Option<Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Self { status, code, detail: detail.into(), extra: None }
    }
    fn bad(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, detail)
    }
    fn with(mut self, extra: Value) -> Self {
        self.extra = Some(extra);
        self
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::NotFound(d) => ApiError::new(StatusCode::NOT_FOUND, "not_found", d),
            EngineError::Invalid(d) => ApiError::bad("invalid", d),
            EngineError::Conflict(d) => ApiError::new(StatusCode::CONFLICT, "conflict", d),
            EngineError::Store(fault) => {
                let status = match fault.code() {
                    "storage_full" => StatusCode::INSUFFICIENT_STORAGE,
                    _ => StatusCode::SERVICE_UNAVAILABLE,
                };
                ApiError::new(status, fault.code(), fault.detail())
            }
            EngineError::Internal(d) => {
                tracing::error!(error = %d, "internal error");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error; see the gateway log")
            }
        }
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        let (error, extra) = match e {
            ServiceError::Invalid { code, detail, extra } => (ApiError::bad(code, detail), extra),
            ServiceError::NotFound { detail, extra } => {
                (ApiError::new(StatusCode::NOT_FOUND, "not_found", detail), extra)
            }
            ServiceError::Unprocessable { code, detail, extra } => {
                (ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, detail), extra)
            }
            ServiceError::Engine(e) => (e.into(), None),
        };
        match extra {
            Some(extra) => error.with(extra),
            None => error,
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        EngineError::from(e).into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        metrics::counter!(m::API_ERRORS_TOTAL, "code" => self.code).increment(1);
        let mut body = json!({
            "type": format!("https://rki-gateway/errors/{}", self.code),
            "title": self.status.canonical_reason().unwrap_or("error"),
            "status": self.status.as_u16(),
            "code": self.code,
            "detail": self.detail,
        });
        if let (Some(extra), Some(map)) = (self.extra, body.as_object_mut()) {
            if let Some(extra) = extra.as_object() {
                for (k, v) in extra {
                    map.insert(k.clone(), v.clone());
                }
            }
        }
        (self.status, [(header::CONTENT_TYPE, "application/problem+json")], body.to_string()).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

// ------------------------------------------------------------------ authentication

/// The authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    pub token_id: i64,
    pub org_id: Option<i64>,
    pub role: Role,
    pub label: String,
}

impl Caller {
    fn org(&self) -> ApiResult<i64> {
        match (self.role, self.org_id) {
            (Role::Admin, Some(org)) => Ok(org),
            _ => Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", "this call needs an organization's token")),
        }
    }

    /// The caller as the audit log names it.
    fn actor(&self) -> Actor {
        Actor { label: self.label.clone(), token_id: Some(self.token_id) }
    }

    fn key_owner(&self) -> ApiResult<()> {
        match self.role {
            Role::KeyOwner => Ok(()),
            _ => Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", "this call needs the key owner's token")),
        }
    }
}

impl FromRequestParts<Arc<AppState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        let unauthorized =
            || ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "missing or invalid bearer token");
        let value = parts.headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).ok_or_else(unauthorized)?;
        let token = value.strip_prefix("Bearer ").ok_or_else(unauthorized)?.trim();
        if token.is_empty() || token.len() > 200 {
            return Err(unauthorized());
        }
        let hash = token_hash(token);
        let store = state.engine.store.clone();
        let row = tokio::task::spawn_blocking(move || store.token_by_hash(&hash))
            .await
            .map_err(|e| ApiError::from(EngineError::Internal(e.to_string())))??;
        let row = row.ok_or_else(unauthorized)?;
        Ok(Caller { token_id: row.id, org_id: row.org_id, role: row.role, label: row.label })
    }
}

async fn blocking<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce(&dyn Store) -> StoreResult<T> + Send + 'static,
) -> ApiResult<T> {
    let store = state.engine.store.clone();
    let out = tokio::task::spawn_blocking(move || f(store.as_ref()))
        .await
        .map_err(|e| ApiError::from(EngineError::Internal(e.to_string())))?;
    state.engine.health.record(out.as_ref().map(|_| ()));
    out.map_err(ApiError::from)
}

/// Refuses every change (any method but GET and HEAD) with 507 `storage_full` while the data
/// directory's filesystem is below `store_min_free_bytes`: the space left goes to the
/// terminals' acks, which the engine keeps committing. A change that succeeds tells the store's
/// health that writes work again.
async fn refuse_changes_without_space(
    State(state): St,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let reads = matches!(*request.method(), axum::http::Method::GET | axum::http::Method::HEAD);
    if reads {
        return next.run(request).await;
    }
    if let Some(fault) = state.engine.health.space_fault() {
        return ApiError::from(EngineError::Store(fault)).into_response();
    }
    let response = next.run(request).await;
    if response.status().is_success() {
        // A change was committed: the store writes again.
        state.engine.health.write_succeeded();
    }
    response
}

fn json_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> ApiResult<T> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad("bad_json", format!("request body: {e}")))
}

// ------------------------------------------------------------------ health and metrics

/// Liveness: the process answers. Restarting it would not mend a store outage, so the store is
/// not part of it.
async fn livez() -> Response {
    (StatusCode::OK, Json(json!({"status": "ok"}))).into_response()
}

/// Readiness (`/healthz`, `/readyz`): the store can be read (a probe, bounded by
/// [`HEALTH_PROBE_TIMEOUT`]) and has neither failed a write since the last that succeeded, nor
/// run short of space, nor committed slowly. 503 with the fault's code and detail otherwise;
/// `rki_store_up` says the same.
async fn healthz(State(state): St) -> Response {
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

async fn metrics_page(State(state): St) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.prometheus.render()).into_response()
}

/// Who the token belongs to: role, organization and label.
async fn whoami(State(state): St, caller: Caller) -> ApiResult<Json<Value>> {
    let org = match caller.org_id {
        Some(id) => {
            let org = blocking(&state, move |s| s.org(id)).await?;
            json!({"id": org.id, "name": org.name})
        }
        None => Value::Null,
    };
    Ok(Json(json!({"role": caller.role.as_str(), "org": org, "label": caller.label})))
}

// ------------------------------------------------------------------ organizations and key sources

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateOrg {
    name: String,
}

async fn create_org(State(state): St, caller: Caller, body: Bytes) -> ApiResult<Response> {
    caller.key_owner()?;
    let req: CreateOrg = json_body(&body)?;
    let created = state.service.create_org(&req.name, &caller.actor()).await?;
    Ok((StatusCode::CREATED, Json(json!({"org": created.org, "admin_token": created.admin_token}))).into_response())
}

async fn list_orgs(State(state): St, caller: Caller) -> ApiResult<Json<Value>> {
    caller.key_owner()?;
    let orgs = blocking(&state, |s| s.list_orgs()).await?;
    Ok(Json(json!({ "orgs": orgs })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Component {
    /// Clear component, hex. Entered by one custodian; zeroized when the request is dropped.
    #[serde(deserialize_with = "zeroizing_string")]
    key: Zeroizing<String>,
    /// The component's own check value, hex.
    kcv: String,
}

impl Component {
    /// The request's components as the key service takes them (moved, not copied).
    fn for_ceremony(components: Vec<Component>) -> Vec<CeremonyComponent> {
        components.into_iter().map(|c| CeremonyComponent::new(c.key, c.kcv)).collect()
    }
}

fn zeroizing_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Zeroizing<String>, D::Error> {
    String::deserialize(d).map(Zeroizing::new)
}

/// A BDK for an organization: as 2 or 3 clear `components`, or as a TR-31 `key_block` under one
/// of the organization's KEKs (`kek`, by name).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthorizeKeySource {
    name: String,
    /// `tdes` or `aes`.
    algorithm: String,
    /// 2 or 3 components, XORed into the BDK.
    #[serde(default)]
    components: Vec<Component>,
    /// The KEK the key block is wrapped under.
    kek: Option<String>,
    /// The BDK as a TR-31 key block under `kek`.
    key_block: Option<String>,
    /// The KCV of the BDK, if the key owner wants it checked.
    kcv: Option<String>,
}

async fn authorize_key_source(
    State(state): St,
    caller: Caller,
    Path(org_name): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    caller.key_owner()?;
    let req: AuthorizeKeySource = json_body(&body)?;
    let family = key_family(&req.algorithm)?;
    let material = match (req.components, req.kek, req.key_block) {
        (components, None, None) => BdkMaterial::Components(Component::for_ceremony(components)),
        (components, Some(kek), Some(key_block)) if components.is_empty() => BdkMaterial::KeyBlock { kek, key_block },
        _ => {
            return Err(ApiError::bad(
                "bad_key_source",
                "a BDK comes either as components, or as a key_block under a kek (both fields)",
            ))
        }
    };
    let request = NewKeySource { name: req.name, family, material, kcv: req.kcv };
    let row = state.service.authorize_key_source(&org_name, request, &caller.actor()).await?;
    Ok((StatusCode::CREATED, Json(json!({"key_source": row}))).into_response())
}

async fn list_key_sources(State(state): St, caller: Caller) -> ApiResult<Json<Value>> {
    let org = caller.org()?;
    let rows = blocking(&state, move |s| s.list_key_sources(org)).await?;
    Ok(Json(json!({ "key_sources": rows })))
}

/// A key-encryption key for an organization, entered once as 2 or 3 clear components.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKek {
    name: String,
    /// `tdes` or `aes`.
    algorithm: String,
    components: Vec<Component>,
    /// The KCV of the combined KEK, if the key owner wants it checked.
    kcv: Option<String>,
}

async fn create_kek(
    State(state): St,
    caller: Caller,
    Path(org_name): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    caller.key_owner()?;
    let req: CreateKek = json_body(&body)?;
    let family = key_family(&req.algorithm)?;
    let request = NewKek { name: req.name, family, components: Component::for_ceremony(req.components), kcv: req.kcv };
    let (row, org) = state.service.create_kek(&org_name, request, &caller.actor()).await?;
    Ok((StatusCode::CREATED, Json(json!({"kek": kek_json(&row, &org)}))).into_response())
}

fn kek_json(k: &KekRow, org: &str) -> Value {
    json!({"org": org, "name": k.name, "algorithm": k.algorithm, "kcv": k.kcv, "created_at": k.created_at})
}

/// Every organization's KEKs, for the key owner: name, algorithm, KCV, created; never the key.
async fn list_keks(State(state): St, caller: Caller) -> ApiResult<Json<Value>> {
    caller.key_owner()?;
    let (keks, orgs) = blocking(&state, |s| Ok((s.list_keks(None)?, s.list_orgs()?))).await?;
    let orgs: std::collections::HashMap<i64, String> = orgs.into_iter().map(|o| (o.id, o.name)).collect();
    let keks: Vec<Value> =
        keks.iter().map(|k| kek_json(k, orgs.get(&k.org_id).map(String::as_str).unwrap_or_default())).collect();
    Ok(Json(json!({ "keks": keks })))
}

// ------------------------------------------------------------------ devices and groups

#[derive(Deserialize, Default)]
struct DeviceQuery {
    sn: Option<String>,
    group: Option<String>,
    limit: Option<i64>,
    offset: Option<i64>,
    /// The `next_cursor` of the previous page.
    cursor: Option<String>,
}

fn device_json(state: &AppState, d: &DeviceRow, pending: bool) -> Value {
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
fn page_limit(limit: Option<i64>, default: i64) -> ApiResult<i64> {
    let limit = limit.unwrap_or(default);
    if !(1..=PAGE_MAX).contains(&limit) {
        return Err(ApiError::bad("bad_limit", format!("limit must be 1 to {PAGE_MAX}; page with next_cursor")));
    }
    Ok(limit)
}

/// `GET /v1/devices`: one page of at most [`PAGE_MAX`] devices by SN, with `next_cursor` when
/// there may be more (pass it as `cursor`).
async fn list_devices(State(state): St, caller: Caller, Query(q): Query<DeviceQuery>) -> ApiResult<Json<Value>> {
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

async fn get_device(State(state): St, caller: Caller, Path(sn): Path<String>) -> ApiResult<Json<Value>> {
    let org = caller.org()?;
    let d = state.engine.device(org, &sn).await?;
    let pending = blocking(&state, move |s| s.open_execution_device_ids(org)).await?.contains(&d.id);
    Ok(Json(json!({ "device": device_json(&state, &d, pending) })))
}

/// `POST /v1/devices/import`, kept only to say where devices come from. An organization cannot
/// register SNs itself: otherwise any organization could claim another's terminals before they
/// arrive, and learn from a refusal that an SN exists elsewhere.
async fn org_import_refused(caller: Caller) -> ApiError {
    let detail = match caller.role {
        Role::KeyOwner => format!("devices are uploaded to an organization: {UPLOAD_ROUTE}"),
        Role::Admin => format!("devices are uploaded by the key owner: {UPLOAD_ROUTE}"),
    };
    ApiError::new(StatusCode::FORBIDDEN, "uploaded_by_key_owner", detail)
}

#[derive(Deserialize, Default)]
struct UploadQuery {
    /// Only check and report; upload nothing.
    dry_run: Option<bool>,
    /// Refused with a reason: groups are the organization's.
    group: Option<String>,
}

/// `POST /v1/orgs/{org}/devices/import` (key owner): uploads a CSV of SNs to the organization,
/// all or nothing ([`Service::upload_devices`]).
async fn upload_devices(
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
struct CreateGroup {
    name: String,
    #[serde(default)]
    description: String,
}

async fn create_group(State(state): St, caller: Caller, body: Bytes) -> ApiResult<Response> {
    let org = caller.org()?;
    let req: CreateGroup = json_body(&body)?;
    let group = state.service.create_group(org, &req.name, &req.description, &caller.actor()).await?;
    Ok((StatusCode::CREATED, Json(json!({ "group": group }))).into_response())
}

async fn list_groups(State(state): St, caller: Caller) -> ApiResult<Json<Value>> {
    let org = caller.org()?;
    let groups = blocking(&state, move |s| s.list_groups(org)).await?;
    Ok(Json(json!({ "groups": groups })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Sns {
    sns: Vec<String>,
}

async fn add_group_devices(
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
struct AssignRequest {
    key_source: Option<String>,
    sns: Option<Vec<String>>,
    group: Option<String>,
}

fn target_of(sns: Option<Vec<String>>, group: Option<String>) -> ApiResult<Target> {
    match (sns, group) {
        (Some(sns), None) => Ok(Target::Devices(sns)),
        (None, Some(group)) => Ok(Target::Group(group)),
        _ => Err(ApiError::bad("bad_target", "name either `sns` or `group`")),
    }
}

async fn assign(State(state): St, caller: Caller, body: Bytes) -> ApiResult<Json<Value>> {
    let org = caller.org()?;
    let req: AssignRequest = json_body(&body)?;
    let target = target_of(req.sns, req.group)?;
    let n = state.service.assign(org, target, req.key_source.clone(), &caller.actor()).await?;
    Ok(Json(json!({ "assigned": n, "key_source": req.key_source })))
}

// ------------------------------------------------------------------ tasks

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskRequest {
    sns: Option<Vec<String>>,
    group: Option<String>,
    key_source: Option<String>,
    slot: Option<u16>,
    expiry_days: Option<u16>,
    request_id: Option<i64>,
}

fn task_spec(req: TaskRequest) -> ApiResult<TaskSpec> {
    Ok(TaskSpec {
        target: target_of(req.sns, req.group)?,
        key_source: req.key_source,
        slot: req.slot.unwrap_or(1),
        expiry_days: req.expiry_days,
        request_id: req.request_id,
    })
}

async fn preview_task(State(state): St, caller: Caller, body: Bytes) -> ApiResult<Json<Value>> {
    let org = caller.org()?;
    let _permit = state.expensive()?;
    let spec = task_spec(json_body(&body)?)?;
    let preview = state.service.preview(org, &spec).await?;
    Ok(Json(json!({ "preview": preview })))
}

async fn create_task(State(state): St, caller: Caller, body: Bytes) -> ApiResult<Response> {
    let org = caller.org()?;
    let _permit = state.expensive()?;
    let spec = task_spec(json_body(&body)?)?;
    let (task, preview) = state.service.create_task(org, &spec, &caller.actor()).await?;
    Ok((StatusCode::CREATED, Json(json!({ "task": task, "preview": preview }))).into_response())
}

#[derive(Deserialize, Default)]
struct TaskQuery {
    status: Option<String>,
    limit: Option<i64>,
    /// The previous page's `next_cursor`: tasks numbered below it.
    cursor: Option<i64>,
}

async fn list_tasks(State(state): St, caller: Caller, Query(q): Query<TaskQuery>) -> ApiResult<Json<Value>> {
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
async fn task_id(state: &Arc<AppState>, org: i64, number: i64) -> ApiResult<i64> {
    Ok(state.service.task_id(org, number).await?)
}

fn task_json(t: &TaskRow) -> Value {
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
struct TaskDetailQuery {
    limit: Option<usize>,
    offset: Option<usize>,
}

async fn get_task(
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

async fn stop_task(State(state): St, caller: Caller, Path(number): Path<i64>) -> ApiResult<Json<Value>> {
    let org = caller.org()?;
    let (terminated, task) = state.service.stop_task(org, number, &caller.actor()).await?;
    Ok(Json(json!({ "terminated": terminated, "task": task_json(&task) })))
}

async fn unlock_device(State(state): St, caller: Caller, Path(sn): Path<String>) -> ApiResult<Json<Value>> {
    let org = caller.org()?;
    let unlock = match state.service.unlock(org, &sn, &caller.actor()).await? {
        UnlockSent::Now => "sent",
        UnlockSent::OnNextHello => "pending until the device connects",
    };
    Ok(Json(json!({ "sn": sn, "unlock": unlock })))
}

// ------------------------------------------------------------------ records, billing, GUDIDs, audit

#[derive(Deserialize, Default)]
struct RecordQuery {
    sn: Option<String>,
    task: Option<i64>,
    format: Option<String>,
    limit: Option<i64>,
    offset: Option<i64>,
    /// The `next_cursor` of the previous page.
    cursor: Option<i64>,
}

const RECORD_CSV_HEADER: &str =
    "sn,key_source,key_type,injection,result,error_code,error_meaning,time,key_id,kcv,task_id,execution_id\n";

fn record_csv_line(r: &RecordRow) -> String {
    let meaning = r.error_code.map(rki_protocol::terminal::result_meaning).unwrap_or("");
    format!(
        "{},{},{},{},{},{},{},{},{},{},{},{}\n",
        csv_field(&r.sn),
        csv_field(&r.key_source),
        csv_field(&r.key_type),
        csv_field(&r.injection),
        csv_field(&r.result),
        r.error_code.map(|c| c.to_string()).unwrap_or_default(),
        csv_field(meaning),
        r.at,
        csv_field(&r.key_id),
        csv_field(&r.kcv),
        r.task_number,
        r.execution_id
    )
}

fn record_json(r: &RecordRow) -> Value {
    let mut v = serde_json::to_value(r).unwrap_or(Value::Null);
    v["error_meaning"] = json!(r.error_code.map(rki_protocol::terminal::result_meaning));
    v["error_remedy"] =
        json!(r.error_code.and_then(rki_protocol::terminal::TerminalError::from_code).map(|t| t.remedy()));
    v
}

/// `GET /v1/records`. With `limit` (at most [`PAGE_MAX`]): one page, newest first, with
/// `next_cursor`. Without: the whole export (`format=json`, the default, or `csv`), streamed from
/// the store [`EXPORT_PAGE`] records at a time, so its memory does not grow with the history.
async fn list_records(State(state): St, caller: Caller, Query(q): Query<RecordQuery>) -> ApiResult<Response> {
    let org = caller.org()?;
    let task = match q.task {
        Some(number) => Some(task_id(&state, org, number).await?),
        None => None,
    };
    let csv = match q.format.as_deref() {
        Some("csv") => true,
        None | Some("json") => false,
        Some(other) => return Err(ApiError::bad("bad_format", format!("format {other:?}: use json or csv"))),
    };
    if let Some(limit) = q.limit {
        let limit = page_limit(Some(limit), PAGE_MAX)?;
        let filter =
            RecordFilter { sn: q.sn, task_id: task, limit, offset: q.offset.unwrap_or(0).max(0), before_id: q.cursor };
        let rows = blocking(&state, move |s| s.list_records(org, &filter)).await?;
        let next_cursor = (rows.len() as i64 == limit).then(|| rows.last().map(|r| r.id)).flatten();
        if csv {
            let body: String =
                std::iter::once(RECORD_CSV_HEADER.to_string()).chain(rows.iter().map(record_csv_line)).collect();
            return Ok(([(header::CONTENT_TYPE, "text/csv")], body).into_response());
        }
        let records: Vec<Value> = rows.iter().map(record_json).collect();
        return Ok(Json(json!({ "records": records, "next_cursor": next_cursor })).into_response());
    }
    let permit = state.expensive()?;
    let base = RecordFilter { sn: q.sn, task_id: task, limit: EXPORT_PAGE, offset: 0, before_id: None };
    let store = state.engine.store.clone();
    // (next page's cursor, whether the first line is out, done)
    let pages = futures_util::stream::unfold((None::<i64>, false, false), move |(cursor, started, done)| {
        let store = store.clone();
        let filter = RecordFilter { before_id: cursor, ..base.clone() };
        async move {
            if done {
                return None;
            }
            let read = tokio::task::spawn_blocking(move || store.list_records(org, &filter)).await;
            let rows = match read {
                Ok(Ok(rows)) => rows,
                Ok(Err(e)) => return Some((Err(std::io::Error::other(e.to_string())), (cursor, started, true))),
                Err(e) => return Some((Err(std::io::Error::other(e.to_string())), (cursor, started, true))),
            };
            let last = rows.len() < EXPORT_PAGE as usize;
            let mut chunk = String::new();
            if !started {
                chunk.push_str(if csv { RECORD_CSV_HEADER } else { "{\"records\":[" });
            }
            for (i, r) in rows.iter().enumerate() {
                if csv {
                    chunk.push_str(&record_csv_line(r));
                } else {
                    if started || i > 0 {
                        chunk.push(',');
                    }
                    chunk.push_str(&record_json(r).to_string());
                }
            }
            let started = true;
            if last && !csv {
                chunk.push_str("]}");
            }
            let next = rows.last().map(|r| r.id).or(cursor);
            Some((Ok::<_, std::io::Error>(chunk), (next, started, last)))
        }
    });
    let body = axum::body::Body::from_stream(futures_util::StreamExt::map(pages, move |chunk| {
        let _held = &permit;
        chunk
    }));
    let content_type = if csv { "text/csv" } else { "application/json" };
    Ok(([(header::CONTENT_TYPE, content_type)], body).into_response())
}

/// One CSV cell. A cell that a spreadsheet would read as a formula (it begins with `=`, `+`, `-`,
/// `@`, a tab or a carriage return) gets a leading `'`, so an attacker-chosen name cannot become a
/// live formula in an operator's spreadsheet (OWASP, "CSV injection"); then the usual quoting.
fn csv_field(s: &str) -> String {
    let neutral;
    let s = if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        neutral = format!("'{s}");
        neutral.as_str()
    } else {
        s
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

async fn billing(State(state): St, caller: Caller) -> ApiResult<Json<Value>> {
    let org = caller.org()?;
    let rows = blocking(&state, move |s| s.billing(org)).await?;
    Ok(Json(json!({ "billing": rows })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GudidRequest {
    sn: Option<String>,
    sns: Option<Vec<String>>,
}

/// A GUDID row as the API shows it: no hash, no sealed key; its `status` at `now`.
fn gudid_json(g: &GudidRow, now: Millis) -> Value {
    let mut v = serde_json::to_value(g).unwrap_or(Value::Null);
    v["status"] = json!(g.status(now));
    v
}

/// Provisions one GUDID per named SN (never spares), all or nothing: an SN that is not one of the
/// organization's devices answers 404 naming every such SN, and nothing is provisioned. A new
/// GUDID revokes the SN's live one (at most one live GUDID per SN). Each GUDID is shown once,
/// here; each provisioning and each revocation is audited in the same transaction.
async fn provision_gudids(State(state): St, caller: Caller, body: Bytes) -> ApiResult<Response> {
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
struct GudidQuery {
    sn: Option<String>,
    /// `true`: only the live GUDIDs (unspent, unrevoked, unexpired).
    live: Option<bool>,
    limit: Option<i64>,
}

/// The organization's GUDIDs, newest first, at most `limit` (default and most [`PAGE_MAX`]):
/// of one SN with `sn`, only the live ones with `live=true`.
async fn list_gudids(State(state): St, caller: Caller, Query(q): Query<GudidQuery>) -> ApiResult<Json<Value>> {
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
async fn revoke_gudid(State(state): St, caller: Caller, Path(id): Path<i64>) -> ApiResult<Json<Value>> {
    let org = caller.org()?;
    let row = state.service.revoke_gudid(org, id, &caller.actor()).await?;
    Ok(Json(json!({ "gudid": gudid_json(&row, state.engine.clock.now_ms()) })))
}

#[derive(Deserialize, Default)]
struct AuditQuery {
    limit: Option<i64>,
    /// The previous page's `next_cursor`.
    cursor: Option<i64>,
}

async fn list_audit(State(state): St, caller: Caller, Query(q): Query<AuditQuery>) -> ApiResult<Json<Value>> {
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
struct ClockRequest {
    /// Seconds to step the adjustable clock: forward, or back when negative.
    advance_seconds: i64,
}

/// Test-only: steps the adjustable clock (forward, or back with a negative amount; the offset is
/// kept across restarts), then runs the expiry sweep. A step back holds the wall reading where it
/// was until the stepped time catches up (see `clock`): this reproduces a system clock set back.
async fn advance_clock(State(state): St, caller: Caller, headers: HeaderMap, body: Bytes) -> ApiResult<Json<Value>> {
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

async fn expire_now(State(state): St, caller: Caller) -> ApiResult<Json<Value>> {
    caller.key_owner()?;
    let expired = state.engine.expire_now().await?;
    Ok(Json(json!({ "expired": expired })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_cells_that_a_spreadsheet_would_run_are_neutralised() {
        assert_eq!(csv_field("=HYPERLINK(\"x\")"), "\"'=HYPERLINK(\"\"x\"\")\"");
        assert_eq!(csv_field("+1"), "'+1");
        assert_eq!(csv_field("-11208"), "'-11208");
        assert_eq!(csv_field("@SUM(A1)"), "'@SUM(A1)");
        assert_eq!(csv_field("bdk1"), "bdk1");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
    }
}
