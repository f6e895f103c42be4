//! PostgreSQL: GUDIDs, from provisioning to the initialisation that spends one.

use super::*;

impl Gudids for PostgresStore {
    fn insert_gudid(&self, row: &GudidRow) -> StoreResult<GudidRow> {
        self.write(|s| {
            let id = s
                .query_one(
                    "INSERT INTO gudids (org_id, device_id, gudid_id, mac_key, sealed_mac_key, provisioned_by, provisioned_at,
                                         expires_at, used_at, bootstrap_hash, revoked_at, revoked_by, proven_at)
                     VALUES ($1, $2, $3, '\\x', $4, $5, $6, $7, $8, $9, $10, $11, $12) RETURNING id",
                    &[
                        &row.org_id,
                        &row.device_id,
                        &row.gudid_id,
                        &row.sealed_mac_key,
                        &row.provisioned_by,
                        &row.provisioned_at,
                        &row.expires_at,
                        &row.used_at,
                        &row.bootstrap_hash,
                        &row.revoked_at,
                        &row.revoked_by,
                        &row.proven_at,
                    ],
                )?
                .try_get(0)?;
            Ok(GudidRow { id, ..row.clone() })
        })
    }

    fn provision_gudids(
        &self,
        org_id: i64,
        gudids: &[NewGudid],
        at: Millis,
        actor: &Actor,
    ) -> StoreResult<Vec<ProvisionedGudid>> {
        let sns: Vec<&str> = gudids.iter().map(|g| g.sn.as_str()).collect();
        self.write(|s| {
            // The devices' rows locked (not against the foreign keys that point at them): two
            // provisionings for one SN at once run one after the other, so the second revokes
            // the first's GUDID and one stays live.
            let found = s.query(
                "SELECT id, sn FROM devices WHERE org_id = $1 AND sn = ANY($2) ORDER BY id FOR NO KEY UPDATE",
                &[&org_id, &sns],
            )?;
            let mut devices = HashMap::with_capacity(found.len());
            for row in &found {
                devices.insert(row.try_get::<_, String>(1)?, row.try_get::<_, i64>(0)?);
            }
            let unknown: Vec<String> =
                gudids.iter().filter(|g| !devices.contains_key(&g.sn)).map(|g| g.sn.clone()).collect();
            if !unknown.is_empty() {
                return Err(unknown_sns_error(&unknown).into());
            }
            let mut out = Vec::with_capacity(gudids.len());
            for g in gudids {
                let device_id = devices[&g.sn];
                let id: i64 = s
                    .query_one(
                        "INSERT INTO gudids (org_id, device_id, gudid_id, mac_key, sealed_mac_key, provisioned_by,
                                             provisioned_at, expires_at, bootstrap_hash)
                         VALUES ($1, $2, $3, '\\x', $4, $5, $6, $7, $8) RETURNING id",
                        &[
                            &org_id,
                            &device_id,
                            &g.gudid_id,
                            &g.sealed_mac_key,
                            &actor.label,
                            &at,
                            &g.expires_at,
                            &g.bootstrap_hash,
                        ],
                    )?
                    .try_get(0)?;
                let revoked: Vec<i64> = rows(
                    s.query(
                        "UPDATE gudids SET revoked_at = $2, revoked_by = $3
                         WHERE device_id = $1 AND id <> $4 AND used_at IS NULL AND revoked_at IS NULL
                           AND expires_at > $2
                         RETURNING id",
                        &[&device_id, &at, &actor.label, &id],
                    )?,
                    first,
                )?;
                for entry in provision_audits(org_id, actor, at, g, id, &revoked) {
                    audit_in(s, &entry)?;
                }
                out.push(ProvisionedGudid { row: g.provisioned(id, org_id, device_id, actor, at), revoked });
            }
            Ok(out)
        })
    }

    fn revoke_gudid(&self, org_id: i64, id: i64, at: Millis, actor: &Actor) -> StoreResult<GudidRow> {
        self.write(|s| {
            let row = s
                .query_opt(
                    concat!(gudid_select!(), " WHERE g.id = $1 AND g.org_id = $2 FOR UPDATE OF g"),
                    &[&id, &org_id],
                )?
                .map(|r| gudid_row(&r).map_err(Failure::from))
                .transpose()?
                .ok_or_else(|| Failure::from(StoreError::NotFound(format!("no GUDID {id}"))))?;
            if !row.is_live(at) {
                return Err(StoreError::Conflict(format!(
                    "GUDID {id} is {}: only a live GUDID can be revoked",
                    row.status(at)
                ))
                .into());
            }
            s.execute("UPDATE gudids SET revoked_at = $2, revoked_by = $3 WHERE id = $1", &[&id, &at, &actor.label])?;
            let details = serde_json::json!({"gudid": id, "reason": "revoked"});
            audit_in(s, &gudid_audit(org_id, actor, at, "gudid.revoke", &row.sn, details))?;
            Ok(GudidRow { revoked_at: Some(at), revoked_by: Some(actor.label.clone()), ..row })
        })
    }

    fn live_bootstrap_hashes(
        &self,
        sn: Option<&str>,
        now: Millis,
        spent_after: Option<Millis>,
    ) -> StoreResult<Vec<(String, String)>> {
        let spent_after = spent_after.unwrap_or(Millis::MAX);
        // One SN (every bootstrap CONNECT): index searches, not a plan that must also serve "all".
        let sql = match sn {
            Some(_) => {
                "SELECT d.sn, g.bootstrap_hash FROM devices d
                 JOIN gudids g ON g.org_id = d.org_id AND g.device_id = d.id
                 WHERE d.sn = $1::text AND g.expires_at > $2
                   AND (g.used_at IS NULL OR (g.used_at > $3 AND g.proven_at IS NULL))
                   AND g.revoked_at IS NULL
                   AND g.bootstrap_hash IS NOT NULL
                 ORDER BY g.id DESC"
            }
            None => {
                "SELECT d.sn, g.bootstrap_hash FROM gudids g JOIN devices d ON d.id = g.device_id
                 WHERE $1::text IS NULL AND g.expires_at > $2
                   AND (g.used_at IS NULL OR (g.used_at > $3 AND g.proven_at IS NULL))
                   AND g.revoked_at IS NULL
                   AND g.bootstrap_hash IS NOT NULL
                 ORDER BY g.id DESC"
            }
        };
        self.read(|s| {
            let found = s.query(sql, &[&sn, &now, &spent_after])?;
            rows(found, pair_row)
        })
    }

    fn gudid_by_id(&self, gudid_id: &[u8]) -> StoreResult<Option<GudidRow>> {
        self.read(|s| {
            s.query_opt(concat!(gudid_select!(), " WHERE g.gudid_id = $1"), &[&gudid_id])?
                .map(|r| gudid_row(&r).map_err(Failure::from))
                .transpose()
        })
    }

    fn list_gudids(&self, org_id: i64, filter: &GudidFilter) -> StoreResult<Vec<GudidRow>> {
        let limit = (filter.limit > 0).then_some(filter.limit);
        self.read(|s| {
            let found = s.query(
                concat!(
                    gudid_select!(),
                    " WHERE g.org_id = $1 AND ($2::text IS NULL OR d.sn = $2)
                       AND ($3::bigint IS NULL OR (g.used_at IS NULL AND g.revoked_at IS NULL AND g.expires_at > $3))
                     ORDER BY g.id DESC LIMIT $4"
                ),
                &[&org_id, &filter.sn, &filter.live_at, &limit],
            )?;
            rows(found, gudid_row)
        })
    }

    fn spend_gudid(
        &self,
        gudid_row: i64,
        device_id: i64,
        creds: &NewCredentials,
        at: Millis,
    ) -> StoreResult<DeviceCredentials> {
        self.write(|s| {
            spend_gudid_in(s, gudid_row, device_id, creds, at)?
                .ok_or_else(|| StoreError::Conflict("GUDID already used".into()).into())
        })
    }
}
