//! Backend credentials (`docs/PROTOCOL.md` §12.1): created by an organization's admin, shown
//! once, listed and revoked, each step audited in its own transaction.
//!
//! The gateway keeps no copy of the secret: only the frame MAC key derived from it, sealed under
//! the master key (`KeyService::seal_backend_mac_key`), and a salted PBKDF2 hash of the MQTT
//! password derived from it.

use rki_protocol::backend::{BackendId, BackendSecret};
use serde_json::json;
use zeroize::Zeroizing;

use super::*;
use crate::store::channel::{BackendRow, NewBackend};

/// A backend as created: its row and its secret's text form, shown once.
pub struct NewBackendCredential {
    pub backend: BackendRow,
    /// `backend@{org}~{name}`.
    pub client_id: String,
    /// 64 lower-case hex digits. Never stored, never logged.
    pub secret: Zeroizing<String>,
}

impl std::fmt::Debug for NewBackendCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewBackendCredential").field("client_id", &self.client_id).finish_non_exhaustive()
    }
}

impl Service {
    /// Creates a backend credential named `name` for the organization (`backend.create`).
    pub async fn create_backend(&self, org: i64, name: &str, actor: &Actor) -> ServiceResult<NewBackendCredential> {
        let org_row = self.blocking(move |s| s.org(org)).await?;
        let id = BackendId::new(&org_row.name, name)
            .map_err(|e| ServiceError::invalid("invalid_name", format!("backend name: {e}")))?;
        let secret = BackendSecret::random().map_err(|e| ServiceError::internal(e.to_string()))?;
        let sealed_mac_key = self
            .engine
            .keys
            .seal_backend_mac_key(&secret.mac_key(&id))
            .map_err(|e| ServiceError::internal(e.to_string()))?;
        let password = secret.mqtt_password(&id);
        let password_hash =
            crate::mosquitto::password_hash(password.expose_secret()).map_err(ServiceError::internal)?;
        let new = NewBackend {
            org_id: org,
            name: name.to_string(),
            sealed_mac_key,
            password_hash,
            created_by: actor.label.clone(),
            at: self.now(),
        };
        let audit = self.audit(actor, Some(org), "backend.create", format!("backend:{name}"), json!({}));
        let backend = self.blocking(move |s| s.create_backend(&new, &audit)).await?;
        // Committed and audited: now the broker learns it (an external one; the embedded
        // endpoint reads the store at CONNECT).
        self.engine.backend_created(&id, password).await;
        Ok(NewBackendCredential { backend, client_id: id.client_id(), secret: secret.expose_text() })
    }

    /// The organization's backends, by name.
    pub async fn list_backends(&self, org: i64) -> ServiceResult<Vec<BackendRow>> {
        self.blocking(move |s| s.list_backends(org)).await
    }

    /// Revokes a backend (`backend.revoke`): it can no longer connect, its live connection is
    /// closed (the embedded endpoint at once; an external broker as its mode allows), and its
    /// requests are dropped as from an unknown backend.
    pub async fn revoke_backend(&self, org: i64, name: &str, actor: &Actor) -> ServiceResult<BackendRow> {
        let org_row = self.blocking(move |s| s.org(org)).await?;
        // Not a name: no such backend (nothing was ever created under it).
        let id =
            BackendId::new(&org_row.name, name).map_err(|_| ServiceError::not_found(format!("backend {name:?}")))?;
        let audit = self.audit(actor, Some(org), "backend.revoke", format!("backend:{name}"), json!({}));
        let (name, at) = (name.to_string(), self.now());
        let row = self.blocking(move |s| s.revoke_backend(org, &name, at, &audit)).await?;
        self.engine.backend_revoked(&id).await;
        Ok(row)
    }
}
