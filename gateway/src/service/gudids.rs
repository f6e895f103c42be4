//! GUDIDs: the single-use secrets (72 h) that authenticate a terminal's initialisation. Each is
//! shown once, when provisioned; the gateway keeps only its sealed MAC key and a salted hash of
//! its bootstrap password.

use std::collections::HashSet;

use serde_json::json;
use zeroize::Zeroizing;

use super::*;
use crate::store::{GudidRow, ProvisionedGudid};

/// Most GUDIDs one provisioning makes: GUDIDs are made as terminals need them, a site's or a
/// shipment's worth at a time, never as bulk spares (a larger fleet takes several calls).
pub const GUDIDS_PER_REQUEST_MAX: usize = 1000;

impl Service {
    /// Provisions one GUDID per SN (never spares), all or nothing: an SN that is not one of the
    /// organization's devices is refused with every such SN named, and nothing is provisioned. A
    /// new GUDID revokes the SN's live one. Each provisioning and each revocation is audited in
    /// the same transaction. Returns each GUDID's text (shown once) with its row.
    pub async fn provision_gudids(
        &self,
        org: i64,
        sns: Vec<String>,
        actor: &Actor,
    ) -> ServiceResult<Vec<(Zeroizing<String>, ProvisionedGudid)>> {
        if sns.is_empty() || sns.len() > GUDIDS_PER_REQUEST_MAX {
            return Err(ServiceError::invalid(
                "bad_target",
                format!(
                    "name `sn`, or `sns` with 1 to {GUDIDS_PER_REQUEST_MAX} SNs (a larger fleet takes several calls)"
                ),
            ));
        }
        let mut seen = HashSet::with_capacity(sns.len());
        let duplicates: Vec<&String> = sns.iter().filter(|sn| !seen.insert(sn.as_str())).collect();
        if !duplicates.is_empty() {
            return Err(ServiceError::invalid("duplicate_sn", "each SN at most once: one live GUDID per SN")
                .with(json!({"duplicates": duplicates})));
        }
        // Unknown SNs answer before any GUDID is made; the store checks again inside its
        // transaction, so a device removed meanwhile still leaves nothing behind.
        let wanted = sns.clone();
        let found = self.blocking(move |s| s.device_ids_by_sn(org, &wanted)).await?;
        let unknown: Vec<String> = found.into_iter().filter(|(_, id)| id.is_none()).map(|(sn, _)| sn).collect();
        if !unknown.is_empty() {
            return Err(ServiceError::not_found(format!(
                "{} unknown device(s); no GUDID was provisioned",
                unknown.len()
            ))
            .with(json!({"unknown": unknown})));
        }
        Ok(self.engine.provision_gudids(org, &sns, actor.clone()).await?)
    }

    /// Revokes a live GUDID: it no longer opens the bootstrap identity nor initialises a
    /// terminal. Audited in the same transaction.
    pub async fn revoke_gudid(&self, org: i64, id: i64, actor: &Actor) -> ServiceResult<GudidRow> {
        Ok(self.engine.revoke_gudid(org, id, actor.clone()).await?)
    }
}
