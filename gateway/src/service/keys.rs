//! The key ceremonies: a BDK authorized for an organization from clear components (entered by
//! two or three custodians) or imported as a TR-31 key block under one of its KEKs, and KEKs
//! from components. Clear key material lives only inside the key service's ceremony, on a
//! blocking thread, and is zeroized there; the store gets the sealed key and its check value.

use serde_json::json;

use super::*;
use crate::keyservice::ceremony::{CeremonyError, Component, KeyFamily};
use crate::keyservice::KeyService;
use crate::store::{KekRow, KeySourceRow};

/// Where a BDK comes from.
#[derive(Debug)]
pub enum BdkMaterial {
    /// Two or three clear components, XORed into the BDK.
    Components(Vec<Component>),
    /// A TR-31 key block wrapped under the organization's KEK `kek`.
    KeyBlock { kek: String, key_block: String },
}

/// A BDK to authorize for an organization.
#[derive(Debug)]
pub struct NewKeySource {
    pub name: String,
    pub family: KeyFamily,
    pub material: BdkMaterial,
    /// The BDK's KCV, checked when given.
    pub kcv: Option<String>,
}

/// A KEK to create for an organization, from components.
#[derive(Debug)]
pub struct NewKek {
    pub name: String,
    pub family: KeyFamily,
    pub components: Vec<Component>,
    pub kcv: Option<String>,
}

impl From<CeremonyError> for ServiceError {
    fn from(e: CeremonyError) -> Self {
        match e {
            CeremonyError::Service(e) => ServiceError::internal(e.to_string()),
            refused => ServiceError::invalid(refused.code(), refused.to_string()),
        }
    }
}

/// `tdes` or `aes`.
pub fn key_family(algorithm: &str) -> ServiceResult<KeyFamily> {
    KeyFamily::parse(algorithm).ok_or_else(|| ServiceError::invalid("bad_algorithm", "algorithm must be tdes or aes"))
}

impl Service {
    /// Runs a ceremony step of the key service off the async threads: CPU work on clear keys.
    async fn ceremony<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn KeyService) -> Result<T, CeremonyError> + Send + 'static,
    ) -> ServiceResult<T> {
        let keys = self.engine.keys.clone();
        Ok(tokio::task::spawn_blocking(move || f(keys.as_ref()))
            .await
            .map_err(|e| ServiceError::internal(e.to_string()))??)
    }

    /// Authorizes a BDK for the organization (`key_source.authorize`, or `key_source.import`
    /// for a key block), audited in the same transaction as the key source's row.
    pub async fn authorize_key_source(
        &self,
        org_name: &str,
        request: NewKeySource,
        actor: &Actor,
    ) -> ServiceResult<KeySourceRow> {
        check_name("name", &request.name)?;
        let org = self.org_named(org_name).await?;
        let (family, kcv) = (request.family, request.kcv);
        let (sealed, kek) = match request.material {
            BdkMaterial::Components(components) => {
                (self.ceremony(move |k| k.bdk_from_components(family, &components, kcv.as_deref())).await?, None)
            }
            BdkMaterial::KeyBlock { kek: kek_name, key_block } => {
                let (org_id, name) = (org.id, kek_name.clone());
                let kek = self.blocking(move |s| s.kek_by_name(org_id, &name)).await?;
                let sealed_kek = kek.sealed;
                let sealed = self.ceremony(move |k| k.import_bdk(&sealed_kek, family, &key_block, kcv.as_deref()));
                (sealed.await?, Some(kek_name))
            }
        };
        let algorithm = sealed.algorithm;
        let key_set_len = if algorithm.is_tdes() { 5 } else { 4 };
        let key_set_id =
            rki_protocol::SecretBytes::random(key_set_len).map_err(|e| ServiceError::internal(e.to_string()))?;
        let row = KeySourceRow {
            id: 0,
            org_id: org.id,
            name: request.name,
            algorithm: algorithm.as_str().into(),
            kcv: sealed.kcv.to_hex(),
            sealed: sealed.sealed,
            // The key set ID is public (it is part of every KSN).
            key_set_id: hex::encode_upper(key_set_id.expose_secret()),
            created_at: self.now(),
        };
        let (action, details) = match &kek {
            None => ("key_source.authorize", json!({"algorithm": row.algorithm, "kcv": row.kcv})),
            Some(kek) => ("key_source.import", json!({"algorithm": row.algorithm, "kcv": row.kcv, "kek": kek})),
        };
        let audit = self.audit(actor, Some(org.id), action, format!("key_source:{}", row.name), details);
        self.blocking(move |s| s.insert_key_source(&row, &audit)).await
    }

    /// Creates a KEK for the organization (`kek.create`), audited in the same transaction.
    pub async fn create_kek(&self, org_name: &str, request: NewKek, actor: &Actor) -> ServiceResult<(KekRow, String)> {
        check_name("name", &request.name)?;
        let org = self.org_named(org_name).await?;
        let (family, components, kcv) = (request.family, request.components, request.kcv);
        let sealed = self.ceremony(move |k| k.kek_from_components(family, &components, kcv.as_deref())).await?;
        let row = KekRow {
            id: 0,
            org_id: org.id,
            name: request.name,
            algorithm: sealed.algorithm.as_str().into(),
            kcv: sealed.kcv.to_hex(),
            sealed: sealed.sealed,
            created_at: self.now(),
        };
        let details = json!({"algorithm": row.algorithm, "kcv": row.kcv});
        let audit = self.audit(actor, Some(org.id), "kek.create", format!("kek:{}", row.name), details);
        let row = self.blocking(move |s| s.insert_kek(&row, &audit)).await?;
        Ok((row, org.name))
    }
}
