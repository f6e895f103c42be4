//! Bearer-token authentication: who the caller is, and the role checks every handler makes.

use super::*;

/// The authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    pub token_id: i64,
    pub org_id: Option<i64>,
    pub role: Role,
    pub label: String,
}

impl Caller {
    pub(super) fn org(&self) -> ApiResult<i64> {
        match (self.role, self.org_id) {
            (Role::Admin, Some(org)) => Ok(org),
            _ => Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", "this call needs an organization's token")),
        }
    }

    /// The caller as the audit log names it.
    pub(super) fn actor(&self) -> Actor {
        Actor { label: self.label.clone(), token_id: Some(self.token_id) }
    }

    pub(super) fn key_owner(&self) -> ApiResult<()> {
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
