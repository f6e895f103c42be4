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

mod admin;
mod auth;
mod backends;
mod devices;
mod error;
mod gudids;
mod health;
mod orgs;
mod records;
mod tasks;
pub mod types;

use admin::*;
pub use auth::Caller;
use backends::*;
use devices::*;
pub use error::ApiError;
use error::ApiResult;
use gudids::*;
use health::*;
use orgs::*;
use records::*;
use tasks::*;

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
        .route("/v1/backends", post(create_backend).get(list_backends))
        .route("/v1/backends/{name}/revoke", post(revoke_backend))
        .route("/v1/admin/clock", post(advance_clock))
        .route("/v1/admin/expire", post(expire_now))
        .merge(crate::portal::router())
        .fallback(no_such_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(state.clone(), refuse_changes_without_space))
        .layer(axum::middleware::from_fn(whole_body))
        .layer(axum::extract::DefaultBodyLimit::max(BODY_BYTES_MAX))
        // Refuses a declared Content-Length over the limit at once, before any of the body is
        // read; DefaultBodyLimit alone would wait for the bytes (a chunked body still meets it).
        .layer(tower_http::limit::RequestBodyLimitLayer::new(BODY_BYTES_MAX))
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

/// Reads the whole request body (within [`BODY_BYTES_MAX`]) before anything answers. A refusal
/// that does not need the body (a wrong token, a route that refuses whatever it is sent, a full
/// disk) would otherwise be sent while the body is still on its way, and hyper then closes the
/// kept-alive connection rather than wait for it: the client's pool hands that connection to its
/// next request, which fails with a network error instead of an answer.
async fn whole_body(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    use axum::extract::FromRequest;
    let (parts, body) = request.into_parts();
    // Through the `Bytes` extractor, so a body over the limit or too slow is refused as any
    // handler would refuse it.
    match Bytes::from_request(axum::extract::Request::from_parts(parts.clone(), body), &()).await {
        Ok(bytes) => next.run(axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes))).await,
        Err(rejection) => rejection.into_response(),
    }
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

/// A read on a blocking thread, through the service's one helper (it records the store's health).
async fn blocking<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce(&dyn Store) -> StoreResult<T> + Send + 'static,
) -> ApiResult<T> {
    Ok(state.service.blocking(f).await?)
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
