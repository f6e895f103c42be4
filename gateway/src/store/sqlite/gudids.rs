//! SQLite: GUDIDs, from provisioning to the initialisation that spends one.

use super::*;

impl Gudids for SqliteStore {
    fn insert_gudid(&self, row: &GudidRow) -> StoreResult<GudidRow> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO gudids (org_id, device_id, gudid_id, mac_key, sealed_mac_key, provisioned_by, provisioned_at,
                                     expires_at, used_at, bootstrap_hash, revoked_at, revoked_by, proven_at)
                 VALUES (?1, ?2, ?3, X'', ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                params![
                    row.org_id,
                    row.device_id,
                    row.gudid_id,
                    row.sealed_mac_key,
                    row.provisioned_by,
                    row.provisioned_at,
                    row.expires_at,
                    row.used_at,
                    row.bootstrap_hash,
                    row.revoked_at,
                    row.revoked_by,
                    row.proven_at
                ],
            )
            .map_err(backend)?;
            Ok(GudidRow { id: tx.last_insert_rowid(), ..row.clone() })
        })
    }

    fn provision_gudids(
        &self,
        org_id: i64,
        gudids: &[NewGudid],
        at: Millis,
        actor: &Actor,
    ) -> StoreResult<Vec<ProvisionedGudid>> {
        self.write(|tx| {
            let mut devices = Vec::with_capacity(gudids.len());
            let mut unknown = Vec::new();
            {
                let mut find =
                    tx.prepare_cached("SELECT id FROM devices WHERE org_id = ?1 AND sn = ?2").map_err(backend)?;
                for g in gudids {
                    match find.query_row(params![org_id, g.sn], |r| r.get::<_, i64>(0)).optional().map_err(backend)? {
                        Some(id) => devices.push(id),
                        None => unknown.push(g.sn.clone()),
                    }
                }
            }
            if !unknown.is_empty() {
                return Err(unknown_sns_error(&unknown));
            }
            let mut out = Vec::with_capacity(gudids.len());
            for (g, device_id) in gudids.iter().zip(devices) {
                tx.prepare_cached(
                    "INSERT INTO gudids (org_id, device_id, gudid_id, mac_key, sealed_mac_key, provisioned_by,
                                         provisioned_at, expires_at, bootstrap_hash)
                     VALUES (?1, ?2, ?3, X'', ?4, ?5, ?6, ?7, ?8)",
                )
                .map_err(backend)?
                .execute(params![
                    org_id,
                    device_id,
                    g.gudid_id,
                    g.sealed_mac_key,
                    actor.label,
                    at,
                    g.expires_at,
                    g.bootstrap_hash
                ])
                .map_err(backend)?;
                let id = tx.last_insert_rowid();
                let revoked: Vec<i64> = {
                    let mut stmt = tx
                        .prepare_cached(
                            "UPDATE gudids SET revoked_at = ?2, revoked_by = ?3
                             WHERE device_id = ?1 AND id <> ?4 AND used_at IS NULL AND revoked_at IS NULL
                               AND expires_at > ?2
                             RETURNING id",
                        )
                        .map_err(backend)?;
                    let rows =
                        stmt.query_map(params![device_id, at, actor.label, id], |r| r.get(0)).map_err(backend)?;
                    rows.collect::<Result<Vec<_>, _>>().map_err(backend)?
                };
                for entry in provision_audits(org_id, actor, at, g, id, &revoked) {
                    audit_in(tx, &entry)?;
                }
                out.push(ProvisionedGudid { row: g.provisioned(id, org_id, device_id, actor, at), revoked });
            }
            Ok(out)
        })
    }

    fn revoke_gudid(&self, org_id: i64, id: i64, at: Millis, actor: &Actor) -> StoreResult<GudidRow> {
        self.write(|tx| {
            let row = tx
                .query_row(
                    &format!(
                        "SELECT {GUDID_COLUMNS} FROM gudids g JOIN devices d ON d.id = g.device_id
                         WHERE g.id = ?1 AND g.org_id = ?2"
                    ),
                    params![id, org_id],
                    |r| mapped(r, gudid_row),
                )
                .optional()
                .map_err(backend)?
                .ok_or_else(|| StoreError::NotFound(format!("no GUDID {id}")))?;
            if !row.is_live(at) {
                return Err(StoreError::Conflict(format!(
                    "GUDID {id} is {}: only a live GUDID can be revoked",
                    row.status(at)
                )));
            }
            let changed = tx
                .execute(
                    "UPDATE gudids SET revoked_at = ?2, revoked_by = ?3
                     WHERE id = ?1 AND used_at IS NULL AND revoked_at IS NULL",
                    params![id, at, actor.label],
                )
                .map_err(backend)?;
            if changed != 1 {
                return Err(StoreError::Conflict(format!("GUDID {id} was spent or revoked meanwhile")));
            }
            let details = serde_json::json!({"gudid": id, "reason": "revoked"});
            audit_in(tx, &gudid_audit(org_id, actor, at, "gudid.revoke", &row.sn, details))?;
            Ok(GudidRow { revoked_at: Some(at), revoked_by: Some(actor.label.clone()), ..row })
        })
    }

    fn live_bootstrap_hashes(
        &self,
        sn: Option<&str>,
        now: Millis,
        spent_after: Option<Millis>,
    ) -> StoreResult<Vec<(String, String)>> {
        // One SN (every bootstrap CONNECT) is two index searches: the device by its SN, its GUDIDs
        // by (org, device). `(?1 IS NULL OR d.sn = ?1)` in one statement made SQLite scan every
        // GUDID for every CONNECT, a connect phase quadratic in the fleet.
        let sql = match sn {
            Some(_) => {
                "SELECT d.sn, g.bootstrap_hash FROM devices d
                 JOIN gudids g ON g.org_id = d.org_id AND g.device_id = d.id
                 WHERE d.sn = ?1"
            }
            None => {
                "SELECT d.sn, g.bootstrap_hash FROM gudids g JOIN devices d ON d.id = g.device_id
                 WHERE ?1 IS NULL"
            }
        };
        self.read(|c| {
            // Live: not expired, unspent (or spent after `spent_after`), not revoked.
            let sql = format!(
                "{sql} AND g.expires_at > ?2 AND (g.used_at IS NULL OR (g.used_at > ?3 AND g.proven_at IS NULL))
                   AND g.revoked_at IS NULL AND g.bootstrap_hash IS NOT NULL
                 ORDER BY g.id DESC"
            );
            let mut stmt = c.prepare_cached(&sql).map_err(backend)?;
            let spent_after = spent_after.unwrap_or(Millis::MAX);
            let rows =
                stmt.query_map(params![sn, now, spent_after], |r| Ok((r.get(0)?, r.get(1)?))).map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
    }

    fn gudid_by_id(&self, gudid_id: &[u8]) -> StoreResult<Option<GudidRow>> {
        self.read(|c| {
            cached_row(
                c,
                &format!(
                    "SELECT {GUDID_COLUMNS} FROM gudids g JOIN devices d ON d.id = g.device_id WHERE g.gudid_id = ?1"
                ),
                [gudid_id],
                |r| mapped(r, gudid_row),
            )
            .optional()
            .map_err(backend)
        })
    }

    fn list_gudids(&self, org_id: i64, filter: &GudidFilter) -> StoreResult<Vec<GudidRow>> {
        self.read(|c| {
            let mut stmt = c
                .prepare(&format!(
                    "SELECT {GUDID_COLUMNS} FROM gudids g JOIN devices d ON d.id = g.device_id
                     WHERE g.org_id = ?1 AND (?2 IS NULL OR d.sn = ?2)
                       AND (?3 IS NULL OR (g.used_at IS NULL AND g.revoked_at IS NULL AND g.expires_at > ?3))
                     ORDER BY g.id DESC LIMIT ?4"
                ))
                .map_err(backend)?;
            let limit = if filter.limit > 0 { filter.limit } else { -1 };
            let rows = stmt
                .query_map(params![org_id, filter.sn, filter.live_at, limit], |r| mapped(r, gudid_row))
                .map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
    }

    fn spend_gudid(
        &self,
        gudid_row_id: i64,
        device_id: i64,
        creds: &NewCredentials,
        at: Millis,
    ) -> StoreResult<DeviceCredentials> {
        self.write(|tx| {
            spend_gudid_in(tx, gudid_row_id, device_id, creds, at)?
                .ok_or_else(|| StoreError::Conflict("GUDID already used".into()))
        })
    }
}
