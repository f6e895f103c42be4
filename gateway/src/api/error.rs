//! problem+json errors with stable codes, and how service, engine and store errors map to them.

use super::*;

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
    pub(super) fn bad(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, detail)
    }
    pub(super) fn with(mut self, extra: Value) -> Self {
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

pub(super) type ApiResult<T> = Result<T, ApiError>;
