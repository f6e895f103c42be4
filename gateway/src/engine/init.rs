//! Device initialisation (docs/PROTOCOL.md §7): the GUDID-authenticated `CreateKey` exchange
//! that gives a terminal its own secrets, and the provisioning and revocation of GUDIDs.

use super::*;

impl Engine {
    pub(super) async fn handle_init(&self, sn: &str, payload: &[u8]) {
        let unverified = match frame::open(payload) {
            Ok(u) => u,
            Err(e) => {
                metrics::counter!(m::GUDID_REFUSALS_TOTAL, "reason" => e.reason()).increment(1);
                return reject("create_key", Rejection::Frame(e.reason()));
            }
        };
        let counter = unverified.peek().counter;
        // The refusal sent names the code; the metric may be more precise (a GUDID of another
        // organization is, to the terminal, a GUDID for another device).
        let refuse_as = |code: RefusalCode, reason: &'static str| {
            metrics::counter!(m::GUDID_REFUSALS_TOTAL, "reason" => reason).increment(1);
            metrics::counter!(m::REJECTED_MESSAGES_TOTAL, "kind" => "create_key", "reason" => reason).increment(1);
            info!(sn, reason, "CreateKey refused");
            self.publish_refusal(sn, counter, code);
        };
        let refuse = |code: RefusalCode| refuse_as(code, code.as_str());
        if unverified.peek().party != sn {
            return refuse(RefusalCode::Malformed);
        }
        let Message::CreateKey(request) = unverified.peek().message.clone() else {
            return refuse(RefusalCode::Malformed);
        };
        let gudid_id = request.gudid_id.to_vec();
        let gudid = match self.blocking(move |s| s.gudid_by_id(&gudid_id)).await {
            Ok(Some(g)) => g,
            Ok(None) => return refuse(RefusalCode::UnknownGudid),
            Err(_) => return refuse(RefusalCode::UnknownGudid),
        };
        // The MAC key is kept sealed under the master key: a copy of the store cannot tag a
        // CreateKey. A row that does not open (a tampered store) is as good as unknown.
        let mac_key = match self.keys.open_gudid_mac_key(&gudid.sealed_mac_key) {
            Ok(key) => key,
            Err(e) => {
                warn!(sn, error = %e, "a GUDID's sealed MAC key does not open");
                return refuse_as(RefusalCode::UnknownGudid, "gudid_unsealable");
            }
        };
        let create_key_body = unverified.body_bytes().to_vec();
        if unverified.verify(&mac_key).is_err() {
            return refuse(RefusalCode::BadTag);
        }
        // The GUDID's row names its device's SN: when it is the sender's, the device is the
        // GUDID's and so is its organization, without a second store read. Otherwise the
        // sender's SN is looked up, to refuse with the code that says why.
        if gudid.sn != sn {
            let owned = sn.to_string();
            let device = match self.blocking(move |s| s.device_org_by_sn(&owned)).await {
                Ok(Some(d)) => d,
                _ => return refuse(RefusalCode::UnknownDevice),
            };
            if gudid.org_id != device.1 {
                return refuse_as(RefusalCode::GudidWrongDevice, "gudid_foreign_org");
            }
            return refuse(RefusalCode::GudidWrongDevice);
        }
        // Spent: refused, unless the device never proved the secrets of that answer and asks
        // again within the proof window (its answer came too late, or was lost): answered anew.
        let now = self.clock.now_ms();
        if gudid.used_at.is_some() && !gudid.awaits_proof(now) {
            return refuse(RefusalCode::GudidUsed);
        }
        // A revoked GUDID is, to the terminal, no longer valid: the same code as an expired one
        // (PROTOCOL.md §7.3); the metric says which.
        if gudid.revoked_at.is_some() {
            return refuse_as(RefusalCode::GudidExpired, "gudid_revoked");
        }
        if now >= gudid.expires_at {
            return refuse(RefusalCode::GudidExpired);
        }
        if let Err(code) =
            self.answer_create_key(sn, &gudid, gudid.device_id, &mac_key, &request, counter, &create_key_body).await
        {
            refuse(code)
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) async fn answer_create_key(
        &self,
        sn: &str,
        gudid: &GudidRow,
        device_id: i64,
        mac_key: &MacKey,
        request: &CreateKey,
        counter: u64,
        create_key_body: &[u8],
    ) -> Result<(), RefusalCode> {
        let ephemeral = Ephemeral::random().map_err(|_| RefusalCode::Malformed)?;
        let answer = Body {
            party: sn.to_string(),
            counter: self.next_down_counter().ok_or(RefusalCode::Malformed)?,
            message: Message::CreateKeyAnswer(message::CreateKeyAnswer {
                gudid_id: request.gudid_id,
                // Names the CreateKey answered: a terminal that retried holds several ephemeral
                // keys, and must agree these secrets with this request's (PROTOCOL.md §7.3).
                request_counter: counter,
                gateway_public: ephemeral.public(),
            }),
        };
        let answer_frame = frame::seal(mac_key, &answer).map_err(|_| RefusalCode::Malformed)?;
        let answer_body = frame::body_bytes_of(&answer_frame).ok_or(RefusalCode::Malformed)?.to_vec();
        let secrets = rki_protocol::init::derive_device_secrets(
            ephemeral,
            &request.device_public,
            mac_key,
            create_key_body,
            &answer_body,
        )
        .map_err(|_| RefusalCode::Malformed)?;
        let sealed = self.keys.seal_device_secrets(&secrets).map_err(|_| RefusalCode::Malformed)?;
        let password_hash = rki_protocol::init::password_hash(secrets.mqtt_password.expose_secret());
        let broker_password_hash = crate::mosquitto::password_hash(secrets.mqtt_password.expose_secret())
            .map_err(|_| RefusalCode::Malformed)?;
        let creds = NewCredentials {
            broker_password_hash,
            signing_key: sealed.signing_key,
            kbpk_aes: sealed.kbpk_aes,
            kbpk_tdes: sealed.kbpk_tdes,
            password_hash: password_hash.to_vec(),
            counter,
            x_pos_device_id: request.x_pos_device_id.clone(),
        };
        let now = self.clock.now_ms();
        let row_id = gudid.id;
        // Through the committer, so a storm of initialisations shares fsyncs.
        let outcome = self
            .write_durably(vec![Write::Initialise { gudid_row: row_id, device_id, creds, at: now }])
            .await
            .map_err(|_| RefusalCode::Malformed)?;
        let stored = outcome
            .initialised
            .iter()
            .find(|(row, _)| *row == row_id)
            .and_then(|(_, creds)| creds.clone())
            .ok_or(RefusalCode::GudidUsed)?;
        // The old signing key is invalid from here on.
        let hot = Arc::new(Mutex::new(DeviceHot::from_credentials(&stored)));
        let previous = self.devices.insert(sn.to_string(), hot.clone());
        if let Some(previous) = previous {
            let previous = lock(&previous);
            let mut h = lock(&hot);
            h.open = previous.open.clone();
            h.open_loaded = previous.open_loaded;
            h.online = previous.online;
            if previous.online {
                // Keep the online count: the device reconnects under its new identity.
            }
        } else {
            // Executions created before this device ever initialised (or while it was not hot)
            // wait in the store.
            self.load_open(sn, &hot).await;
        }
        {
            let mut h = lock(&hot);
            h.signing_key = Some(secrets.signing_key.clone_secret());
        }
        self.passwords.insert(sn.to_string(), password_hash);
        // An external broker learns the new credentials through the registry sync; a device that
        // reconnects before the broker reloaded is refused once and retries.
        self.notify_registry_changed();
        // The broker knows the new password before the answer that lets the device use it.
        let identity = crate::dynsec::BrokerIdentity::Device(sn.to_string());
        self.outbound.broker_passwords(vec![(identity, secrets.mqtt_password.clone_secret())]).await;
        self.outbound.publish(topic::device_down(sn), answer_frame);
        metrics::counter!(m::INITIALISATIONS_TOTAL).increment(1);
        info!(sn, "device initialised");
        Ok(())
    }

    pub(super) fn publish_refusal(&self, sn: &str, request_counter: u64, code: RefusalCode) {
        let Some(counter) = self.next_down_counter() else { return };
        let body = Body {
            party: sn.to_string(),
            counter,
            message: Message::Refusal(message::Refusal { request_counter, code }),
        };
        if let Ok(bytes) = frame::seal(&MacKey::public_refusal_key(), &body) {
            self.outbound.publish(topic::device_down(sn), bytes);
        }
    }

    /// GUDID provisioning: one fresh GUDID per SN, each shown once (the text returned), all or
    /// nothing. Each GUDID's MAC key is sealed under the master key and its bootstrap password
    /// kept only as a salted hash; the GUDID itself is never stored. A new GUDID revokes the
    /// SN's live one. Audited by the store in the same transaction.
    pub async fn provision_gudids(
        &self,
        org_id: i64,
        sns: &[String],
        actor: Actor,
    ) -> EngineResult<Vec<(Zeroizing<String>, ProvisionedGudid)>> {
        let now = self.clock.now_ms();
        let expires_at = now + (GUDID_VALIDITY_SECONDS as i64) * 1000;
        let mut texts = Vec::with_capacity(sns.len());
        let mut rows = Vec::with_capacity(sns.len());
        let mut bootstrap_passwords = Vec::with_capacity(sns.len());
        for sn in sns {
            let gudid =
                rki_protocol::init::Gudid::random().map_err(|_| EngineError::Internal("no randomness".into()))?;
            bootstrap_passwords
                .push((crate::dynsec::BrokerIdentity::Bootstrap(sn.clone()), gudid.bootstrap_password(sn)));
            let bootstrap_hash = crate::mosquitto::password_hash(gudid.bootstrap_password(sn).expose_secret())
                .map_err(EngineError::Internal)?;
            let sealed_mac_key = self
                .keys
                .seal_gudid_mac_key(&gudid.mac_key())
                .map_err(|e| EngineError::Internal(format!("sealing a GUDID: {e}")))?;
            rows.push(NewGudid {
                sn: sn.clone(),
                gudid_id: gudid.id().to_vec(),
                sealed_mac_key,
                bootstrap_hash,
                expires_at,
            });
            texts.push(gudid.expose_text());
        }
        let provisioned = self.blocking(move |s| s.provision_gudids(org_id, &rows, now, &actor)).await?;
        // Not awaited: a large import would hold the API call while the broker saves each change.
        tokio::spawn(self.outbound.broker_passwords(bootstrap_passwords));
        // An external broker's password file gains the SNs' bootstrap identities now (and loses
        // those of the GUDIDs revoked).
        self.notify_registry_changed();
        Ok(texts.into_iter().zip(provisioned).collect())
    }

    /// Revokes a live GUDID: it no longer opens `init@{SN}` nor initialises. Audited by the
    /// store in the same transaction.
    pub async fn revoke_gudid(&self, org_id: i64, id: i64, actor: Actor) -> EngineResult<GudidRow> {
        let now = self.clock.now_ms();
        let row = self.blocking(move |s| s.revoke_gudid(org_id, id, now, &actor)).await?;
        self.notify_registry_changed();
        info!(sn = %row.sn, gudid = id, "GUDID revoked");
        Ok(row)
    }
}
