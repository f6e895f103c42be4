//! Organizations and API tokens. Tokens are random, shown once, and stored only as hashes.

use serde_json::json;
use sha2::{Digest, Sha256};

use super::*;
use crate::store::{OrgRow, Role};

/// An organization with its first admin token (shown once).
#[derive(Debug)]
pub struct NewOrg {
    pub org: OrgRow,
    pub admin_token: String,
}

/// The hash under which a token is stored and looked up.
pub fn token_hash(token: &str) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(b"rki/v1 api token");
    h.update(token.as_bytes());
    h.finalize().to_vec()
}

/// A new random API token (256 bits, hex).
pub fn new_token(prefix: &str) -> Result<String, String> {
    let secret = rki_protocol::SecretBytes::random(32).map_err(|e| e.to_string())?;
    Ok(format!("{prefix}_{}", secret.to_hex_upper().to_lowercase()))
}

/// Creates an organization (`org.create`) and its first admin token (`token.create`), each
/// audited in its own transaction. On the store directly, so that `rki-gateway init-org` can run
/// it with the gateway stopped.
pub fn create_org(store: &dyn Store, name: &str, actor: &Actor, now: Millis) -> ServiceResult<NewOrg> {
    check_name("name", name)?;
    rki_protocol::topic::validate_name(name)
        .map_err(|e| ServiceError::invalid("invalid_name", format!("organization name: {e}")))?;
    let audit = Audit::new(actor, None, "org.create", format!("org:{name}"), json!({}), now);
    let org = store.create_org(name, now, &audit)?;
    let admin_token = new_token("rki_org").map_err(ServiceError::internal)?;
    let label = format!("{name}-admin");
    let audit =
        Audit::new(actor, Some(org.id), "token.create", format!("token:{label}"), json!({"role": "admin"}), now);
    store.insert_token(Some(org.id), Role::Admin, &label, &token_hash(&admin_token), now, &audit)?;
    Ok(NewOrg { org, admin_token })
}

/// Creates a key-owner token (`token.create`, audited). Returns the token (shown once).
pub fn create_key_owner_token(store: &dyn Store, label: &str, actor: &Actor, now: Millis) -> ServiceResult<String> {
    let token = new_token("rki_keyowner").map_err(ServiceError::internal)?;
    let audit = Audit::new(actor, None, "token.create", format!("token:{label}"), json!({"role": "key_owner"}), now);
    store.insert_token(None, Role::KeyOwner, label, &token_hash(&token), now, &audit)?;
    Ok(token)
}

impl Service {
    /// [`create_org`] on the running gateway.
    pub async fn create_org(&self, name: &str, actor: &Actor) -> ServiceResult<NewOrg> {
        let (name, actor, now) = (name.to_string(), actor.clone(), self.now());
        let store = self.engine.store.clone();
        let created = tokio::task::spawn_blocking(move || create_org(store.as_ref(), &name, &actor, now))
            .await
            .map_err(|e| ServiceError::internal(e.to_string()))??;
        Ok(created)
    }

    /// The organization named `name`, or `NotFound`.
    pub async fn org_named(&self, name: &str) -> ServiceResult<OrgRow> {
        let owned = name.to_string();
        self.blocking(move |s| s.org_by_name(&owned))
            .await?
            .ok_or_else(|| ServiceError::not_found(format!("organization {name:?}")))
    }
}
