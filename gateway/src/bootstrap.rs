//! First-run actions that work with the gateway stopped or running: creating an organization with
//! its admin token, and the key owner's token. Tokens are printed once and stored only as hashes.

use crate::api::{new_token, token_hash};
use crate::clock::Millis;
use crate::store::{OrgRow, Role, Store, StoreError};

/// Creates an organization and its first admin token. Returns the token (shown once).
pub fn create_org(store: &dyn Store, name: &str, now: Millis) -> Result<(OrgRow, String), StoreError> {
    rki_protocol::topic::validate_name(name).map_err(|e| StoreError::Invalid(format!("organization name: {e}")))?;
    let org = store.create_org(name, now)?;
    let token = new_token("rki_org").map_err(StoreError::Backend)?;
    store.insert_token(Some(org.id), Role::Admin, &format!("{name}-admin"), &token_hash(&token), now)?;
    Ok((org, token))
}

/// Creates a key-owner token. Returns the token (shown once).
pub fn create_key_owner_token(store: &dyn Store, label: &str, now: Millis) -> Result<String, StoreError> {
    let token = new_token("rki_keyowner").map_err(StoreError::Backend)?;
    store.insert_token(None, Role::KeyOwner, label, &token_hash(&token), now)?;
    Ok(token)
}
