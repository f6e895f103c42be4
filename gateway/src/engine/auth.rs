//! CONNECT authentication for the MQTT endpoint: a device identity against its cached password
//! hash, the bootstrap identity `init@{SN}` against the live GUDIDs' bootstrap hashes.

use super::*;

impl Engine {
    /// CONNECT check: `client_id == username == SN` with that device's password, or the bootstrap
    /// identity `init@{SN}` with the bootstrap password of a live GUDID for that SN
    /// (`Gudid::bootstrap_password`), checked against the hash stored at provisioning. A GUDID
    /// spent by an answer the device has not yet proven still opens it (`GudidRow::awaits_proof`).
    pub fn authenticate(&self, client_id: &str, username: &str, password: &str) -> Result<(), &'static str> {
        if let Some(verdict) = self.authenticate_in_memory(client_id, username, password) {
            return verdict;
        }
        if client_id.starts_with(rki_protocol::backend::CLIENT_ID_PREFIX) {
            return self.authenticate_backend(client_id, password);
        }
        if let Some(sn) = topic::bootstrap_sn(client_id) {
            if topic::validate_name(sn).is_err() {
                return Err("bad_sn");
            }
            // An unknown SN and an SN without a live GUDID look the same from outside.
            // Live, or spent and awaiting the device's proof: a terminal whose answer came too
            // late asks again with the same GUDID.
            let now = self.clock.now_ms();
            let awaiting_proof = now.saturating_sub(crate::store::GUDID_PROOF_WINDOW_MS);
            let live = self.store.live_bootstrap_hashes(Some(sn), now, Some(awaiting_proof)).map_err(|_| "store")?;
            if live.is_empty() {
                return Err("no_live_gudid");
            }
            let proven = live.iter().any(|(_, hash)| crate::mosquitto::verify_password_hash(password.as_bytes(), hash));
            return if proven { Ok(()) } else { Err("bad_bootstrap") };
        }
        match self.store.device_org_by_sn(client_id) {
            Ok(Some(_)) => Err("not_initialised"),
            Ok(None) => Err("unknown_sn"),
            Err(_) => Err("store"),
        }
    }

    /// A backend identity `backend@{org}~{name}` against the hash of its MQTT password. An unknown
    /// organization or backend, a revoked one and a wrong password look the same from outside.
    fn authenticate_backend(&self, client_id: &str, password: &str) -> Result<(), &'static str> {
        let id = rki_protocol::backend::BackendId::parse_client_id(client_id).map_err(|_| "bad_sn")?;
        let Some(org) = self.store.org_by_name(id.org()).map_err(|_| "store")? else { return Err("bad_password") };
        let Some(backend) = self.store.backend_by_name(org.id, id.name()).map_err(|_| "store")? else {
            return Err("bad_password");
        };
        let proven = crate::mosquitto::verify_password_hash(password.as_bytes(), &backend.password_hash);
        if proven && backend.revoked_at.is_none() {
            Ok(())
        } else {
            Err("bad_password")
        }
    }

    /// The CONNECT check's verdict when memory alone decides it (a device whose password hash is
    /// cached, a malformed identity), without touching the store: the endpoint calls it on its
    /// async thread and takes a blocking thread only for `None` (a bootstrap identity, whose live
    /// GUDIDs are in the store, or an SN not cached).
    pub fn authenticate_in_memory(
        &self,
        client_id: &str,
        username: &str,
        password: &str,
    ) -> Option<Result<(), &'static str>> {
        if client_id != username {
            return Some(Err("client_id_mismatch"));
        }
        if topic::bootstrap_sn(client_id).is_some() || client_id.starts_with(rki_protocol::backend::CLIENT_ID_PREFIX) {
            return None;
        }
        if topic::validate_name(client_id).is_err() {
            return Some(Err("bad_sn"));
        }
        let expected = self.passwords.get(client_id)?;
        let given = rki_protocol::init::password_hash(password.as_bytes());
        Some(if rki_protocol::secret::ct_eq(&given, expected.value()) { Ok(()) } else { Err("bad_password") })
    }
}
