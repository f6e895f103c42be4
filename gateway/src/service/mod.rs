//! Every operator and key-owner action, in one place. Each action validates its input, acts, and
//! has its audit entry written by the store in the action's own transaction: after a crash, an
//! action and its entry are both there, or neither is.
//!
//! The callers stay thin: the HTTP API (and so the portal and `rkictl`) parses a request, checks
//! the caller's role, calls one function here and maps the result; the backend channel does the
//! same with its MQTT requests. Nothing here knows HTTP or MQTT.
//!
//! - `orgs`: organizations and their admin tokens.
//! - `keys`: the key ceremonies (BDKs from components or a TR-31 block under a KEK; KEKs).
//! - `registry`: the key owner's device uploads, groups and key-source assignments.
//! - `tasks`: preview, creation, stop, unlock.
//! - `gudids`: provisioning and revocation of initialisation secrets.
//! - `backends`: the RKI backends' credentials (the backend channel, `crate::channel`).

use std::sync::Arc;

use serde_json::Value;

use crate::clock::Millis;
use crate::engine::{Engine, EngineError};
use crate::store::{Actor, Audit, Store, StoreError, StoreResult};

pub mod backends;
pub mod gudids;
pub mod keys;
pub mod orgs;
pub mod registry;
pub mod tasks;

/// Longest names of organizations, groups, key sources and KEKs.
pub const NAME_LEN_MAX: usize = 64;

/// Why an action was refused or failed. Each refusal carries a stable code for its callers (an
/// HTTP problem's `code`, a backend answer's refusal).
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The request cannot be valid as it is: a stable code and what is wrong, with details.
    #[error("{detail}")]
    Invalid { code: &'static str, detail: String, extra: Option<Value> },
    /// A named object does not exist (for this organization).
    #[error("{detail}")]
    NotFound { detail: String, extra: Option<Value> },
    /// The request is well formed but its content is refused as a whole (a CSV with bad lines):
    /// nothing was changed.
    #[error("{detail}")]
    Unprocessable { code: &'static str, detail: String, extra: Option<Value> },
    /// The engine's or the store's answer: not found, conflict, an outage, an internal error.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl ServiceError {
    pub fn invalid(code: &'static str, detail: impl Into<String>) -> Self {
        ServiceError::Invalid { code, detail: detail.into(), extra: None }
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        ServiceError::NotFound { detail: detail.into(), extra: None }
    }

    pub fn internal(detail: impl Into<String>) -> Self {
        ServiceError::Engine(EngineError::Internal(detail.into()))
    }

    /// Adds details to a refusal (the bad lines of a CSV, the unknown SNs).
    pub fn with(mut self, details: Value) -> Self {
        match &mut self {
            ServiceError::Invalid { extra, .. }
            | ServiceError::NotFound { extra, .. }
            | ServiceError::Unprocessable { extra, .. } => *extra = Some(details),
            ServiceError::Engine(_) => {}
        }
        self
    }
}

impl From<StoreError> for ServiceError {
    fn from(e: StoreError) -> Self {
        ServiceError::Engine(EngineError::from(e))
    }
}

pub type ServiceResult<T> = Result<T, ServiceError>;

/// The actions, over the running engine (its store, key service and clock).
#[derive(Clone)]
pub struct Service {
    pub engine: Arc<Engine>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service").finish_non_exhaustive()
    }
}

impl Service {
    pub fn new(engine: Arc<Engine>) -> Self {
        Self { engine }
    }

    pub fn now(&self) -> Millis {
        self.engine.clock.now_ms()
    }

    /// Runs store work on a blocking thread (PostgreSQL's client and SQLite both block), and
    /// tells the store's health how it went.
    pub async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Store) -> StoreResult<T> + Send + 'static,
    ) -> ServiceResult<T> {
        let store = self.engine.store.clone();
        let out = tokio::task::spawn_blocking(move || f(store.as_ref()))
            .await
            .map_err(|e| ServiceError::internal(format!("store task: {e}")))?;
        self.engine.health.record(out.as_ref().map(|_| ()));
        Ok(out?)
    }

    /// The audit entry of an action of `actor` on the organization, now.
    pub fn audit(
        &self,
        actor: &Actor,
        org_id: Option<i64>,
        action: &'static str,
        object: impl Into<String>,
        details: Value,
    ) -> Audit {
        Audit::new(actor, org_id, action, object, details, self.now())
    }
}

impl Service {
    /// Audits an action that changes nothing in the store (a step of the test clock): its entry
    /// is the only write.
    pub async fn audit_alone(&self, audit: Audit) -> ServiceResult<()> {
        let entry = audit.entry(None, None, &[]);
        self.blocking(move |s| s.append_audit(&entry)).await
    }
}

/// Checks a name given to an organization, a group, a key source or a KEK.
pub fn check_name(field: &str, name: &str) -> ServiceResult<()> {
    name_problem(name).map_or(Ok(()), |why| Err(ServiceError::invalid("invalid_name", format!("{field}: {why}"))))
}

/// Why `name` cannot name an organization, a group or a key source, or `None`. A name must
/// round-trip through a URL path segment (`/v1/groups/{name}/devices`) and read the same to
/// every operator: no `.` or `..`, no `/`, no leading or trailing space, no control, bidi or
/// zero-width character (a name that displays as another one).
pub fn name_problem(name: &str) -> Option<String> {
    if name.is_empty() || name.len() > NAME_LEN_MAX {
        return Some(format!("must be 1 to {NAME_LEN_MAX} bytes"));
    }
    if name == "." || name == ".." {
        return Some("cannot be \".\" or \"..\" (not addressable in a URL path)".into());
    }
    if name.contains('/') || name.contains('\\') {
        return Some("cannot contain \"/\" or \"\\\"".into());
    }
    if name.trim() != name {
        return Some("cannot begin or end with a space".into());
    }
    if let Some(c) = name.chars().find(|&c| is_invisible_or_control(c)) {
        return Some(format!("cannot contain the control, bidi or zero-width character U+{:04X}", u32::from(c)));
    }
    None
}

/// Control characters, the bidirectional overrides and isolates, and zero-width characters.
fn is_invisible_or_control(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}' | '\u{061C}' | '\u{00AD}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_cannot_round_trip_through_a_url_or_read_as_another_are_refused() {
        for good in ["shop", "Shop 12", "caf\u{e9}-north", "a.b", "x".repeat(NAME_LEN_MAX).as_str()] {
            assert_eq!(name_problem(good), None, "{good:?}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a\\b",
            " lead",
            "trail ",
            "tab\there",
            "bidi\u{202E}txt",
            "zero\u{200B}width",
            "bom\u{FEFF}",
            &"x".repeat(NAME_LEN_MAX + 1),
        ] {
            assert!(name_problem(bad).is_some(), "{bad:?} accepted");
        }
    }
}
