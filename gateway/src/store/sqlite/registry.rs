//! SQLite: the registry (organizations, tokens, devices, groups) and the audit log.

use super::*;

impl Registry for SqliteStore {
    fn create_org(&self, name: &str, at: Millis, audit: &Audit) -> StoreResult<OrgRow> {
        self.write(|tx| {
            tx.execute("INSERT INTO organizations (name, created_at) VALUES (?1, ?2)", params![name, at]).map_err(
                |e| match backend(e) {
                    StoreError::Conflict(_) => StoreError::Conflict(format!("organization {name:?} exists")),
                    other => other,
                },
            )?;
            let id = tx.last_insert_rowid();
            audit_in(tx, &audit.entry(None, Some(id), &[]))?;
            Ok(OrgRow { id, name: name.to_string(), created_at: at })
        })
    }

    fn org_by_name(&self, name: &str) -> StoreResult<Option<OrgRow>> {
        self.read(|c| {
            c.query_row(concat!("SELECT ", org_columns!(), " FROM organizations WHERE name = ?1"), [name], |r| {
                mapped(r, org_row)
            })
            .optional()
            .map_err(backend)
        })
    }

    fn org(&self, id: i64) -> StoreResult<OrgRow> {
        self.read(|c| {
            cached_row(c, concat!("SELECT ", org_columns!(), " FROM organizations WHERE id = ?1"), [id], |r| {
                mapped(r, org_row)
            })
            .map_err(backend)
        })
    }

    fn list_orgs(&self) -> StoreResult<Vec<OrgRow>> {
        self.read(|c| {
            let mut stmt =
                c.prepare(concat!("SELECT ", org_columns!(), " FROM organizations ORDER BY id")).map_err(backend)?;
            let rows = stmt.query_map([], |r| mapped(r, org_row)).map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
    }

    fn insert_token(
        &self,
        org_id: Option<i64>,
        role: Role,
        label: &str,
        hash: &[u8],
        at: Millis,
        audit: &Audit,
    ) -> StoreResult<TokenRow> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO tokens (org_id, role, label, token_hash, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![org_id, role.as_str(), label, hash, at],
            )
            .map_err(backend)?;
            let id = tx.last_insert_rowid();
            audit_in(tx, &audit.entry(None, org_id, &[("token_id", id.into())]))?;
            Ok(TokenRow { id, org_id, role, label: label.to_string() })
        })
    }

    fn token_by_hash(&self, hash: &[u8]) -> StoreResult<Option<TokenRow>> {
        self.read(|c| {
            cached_row(c, concat!("SELECT ", token_columns!(), " FROM tokens WHERE token_hash = ?1"), [hash], |r| {
                mapped(r, token_row)
            })
            .optional()
            .map_err(backend)
        })
    }

    fn has_key_owner(&self) -> StoreResult<bool> {
        self.read(|c| {
            c.query_row("SELECT COUNT(*) FROM tokens WHERE role = 'key_owner'", [], |r| r.get::<_, i64>(0))
                .map(|n| n > 0)
                .map_err(backend)
        })
    }

    fn import_devices(&self, org_id: i64, rows: &[ImportRow], at: Millis, audit: &Audit) -> StoreResult<usize> {
        self.write(|tx| {
            let mut conflicts = Vec::new();
            {
                let mut owner = tx.prepare_cached("SELECT org_id FROM devices WHERE sn = ?1").map_err(backend)?;
                for row in rows {
                    let existing: Option<i64> = owner.query_row([&row.sn], |r| r.get(0)).optional().map_err(backend)?;
                    if let Some(existing) = existing {
                        if existing != org_id {
                            conflicts.push(format!("line {}: SN {} is registered to another organization", row.line, row.sn));
                        }
                    }
                }
            }
            if !conflicts.is_empty() {
                return Err(StoreError::Conflict(conflicts.join("; ")));
            }
            let mut insert = tx
                .prepare_cached("INSERT INTO devices (org_id, sn, model, created_at) VALUES (?1, ?2, ?3, ?4) ON CONFLICT(sn) DO NOTHING")
                .map_err(backend)?;
            let mut added = 0;
            for row in rows {
                added += insert.execute(params![org_id, row.sn, row.model, at]).map_err(backend)?;
            }
            audit_in(tx, &audit.entry(None, None, &[("imported", added.into())]))?;
            Ok(added)
        })
    }

    fn list_devices(&self, org_id: i64, f: &DeviceFilter) -> StoreResult<Vec<DeviceRow>> {
        self.read(|c| {
            let pattern = f.sn_contains.as_ref().map(|s| format!("%{}%", s.replace('%', "").replace('_', "\\_")));
            let sql = format!(
                "SELECT {DEVICE_COLUMNS} FROM devices WHERE org_id = ?1
                 AND (?2 IS NULL OR sn LIKE ?2 ESCAPE '\\')
                 AND (?3 IS NULL OR id IN (SELECT device_id FROM group_members WHERE group_id = ?3))
                 AND (?6 IS NULL OR sn > ?6)
                 ORDER BY sn LIMIT ?4 OFFSET ?5"
            );
            let mut stmt = c.prepare_cached(&sql).map_err(backend)?;
            let limit = if f.limit <= 0 { i64::MAX } else { f.limit };
            let rows = stmt
                .query_map(params![org_id, pattern, f.group, limit, f.offset, f.after_sn], |r| mapped(r, device_row))
                .map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
    }

    fn count_devices(&self, org_id: i64) -> StoreResult<i64> {
        self.read(|c| {
            c.query_row("SELECT COUNT(*) FROM devices WHERE org_id = ?1", [org_id], |r| r.get(0)).map_err(backend)
        })
    }

    fn device(&self, org_id: i64, sn: &str) -> StoreResult<DeviceRow> {
        self.read(|c| {
            cached_row(
                c,
                &format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE org_id = ?1 AND sn = ?2"),
                params![org_id, sn],
                |r| mapped(r, device_row),
            )
            .map_err(or_not_found(format!("device {sn}")))
        })
    }

    fn device_by_id(&self, id: i64) -> StoreResult<DeviceRow> {
        self.read(|c| {
            cached_row(c, &format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE id = ?1"), [id], |r| {
                mapped(r, device_row)
            })
            .map_err(or_not_found(format!("device #{id}")))
        })
    }

    fn devices_by_ids(&self, ids: &[i64]) -> StoreResult<Vec<DeviceRow>> {
        self.read(|c| {
            let mut out = Vec::with_capacity(ids.len());
            for chunk in ids.chunks(IDS_PER_STATEMENT) {
                let sql = format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE id IN ({})", in_list(chunk.len()));
                let mut stmt = c.prepare_cached(&sql).map_err(backend)?;
                let rows = stmt
                    .query_map(rusqlite::params_from_iter(chunk.iter()), |r| mapped(r, device_row))
                    .map_err(backend)?;
                for row in rows {
                    out.push(row.map_err(backend)?);
                }
            }
            Ok(out)
        })
    }

    fn device_org_by_sn(&self, sn: &str) -> StoreResult<Option<(i64, i64)>> {
        self.read(|c| {
            cached_row(c, "SELECT id, org_id FROM devices WHERE sn = ?1", [sn], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
                .map_err(backend)
        })
    }

    fn sn_owners(&self, sns: &[String]) -> StoreResult<Vec<(String, i64)>> {
        self.read(|c| {
            let mut stmt = c.prepare_cached("SELECT org_id FROM devices WHERE sn = ?1").map_err(backend)?;
            let mut out = Vec::new();
            for sn in sns {
                let org: Option<i64> = stmt.query_row([sn], |r| r.get(0)).optional().map_err(backend)?;
                if let Some(org) = org {
                    out.push((sn.clone(), org));
                }
            }
            Ok(out)
        })
    }

    fn credentials(&self, sn: &str) -> StoreResult<Option<DeviceCredentials>> {
        self.read(|c| {
            cached_row(c, &format!("{SELECT_CREDENTIALS} WHERE d.sn = ?1"), [sn], |r| mapped(r, credentials_row))
                .optional()
                .map_err(backend)
        })
    }

    fn credentials_for(&self, ids: &[i64]) -> StoreResult<Vec<DeviceCredentials>> {
        self.read(|c| credentials_in(c, ids))
    }

    fn all_password_hashes(&self) -> StoreResult<Vec<(String, Vec<u8>)>> {
        self.read(|c| {
            let mut stmt = c
                .prepare(
                    "SELECT d.sn, c.password_hash FROM devices d JOIN device_credentials c ON c.device_id = d.id
                     WHERE c.password_hash IS NOT NULL",
                )
                .map_err(backend)?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
    }

    fn broker_devices(&self) -> StoreResult<Vec<(String, Option<String>)>> {
        self.read(|c| {
            let mut stmt = c
                .prepare(
                    "SELECT d.sn, c.broker_password_hash FROM devices d LEFT JOIN device_credentials c ON c.device_id = d.id
                     ORDER BY d.sn",
                )
                .map_err(backend)?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
    }

    fn assign(&self, org_id: i64, ids: &[i64], key_source_id: Option<i64>, audit: &Audit) -> StoreResult<usize> {
        self.write(|tx| {
            let mut stmt = tx
                .prepare_cached("UPDATE devices SET assigned_key_source = ?3 WHERE org_id = ?1 AND id = ?2")
                .map_err(backend)?;
            let mut n = 0;
            for id in ids {
                n += stmt.execute(params![org_id, id, key_source_id]).map_err(backend)?;
            }
            audit_in(tx, &audit.entry(None, None, &[]))?;
            Ok(n)
        })
    }

    fn set_unlock_pending(&self, device_id: i64, pending: bool, audit: Option<&Audit>) -> StoreResult<()> {
        self.write(|tx| {
            tx.execute("UPDATE devices SET unlock_pending = ?2 WHERE id = ?1", params![device_id, pending])
                .map_err(backend)?;
            if let Some(audit) = audit {
                audit_in(tx, &audit.entry(None, None, &[]))?;
                crate::store::sqlite_channel::on_answered(tx, audit, 0)?;
            }
            Ok(())
        })
    }

    fn create_group(&self, org_id: i64, name: &str, description: &str, audit: &Audit) -> StoreResult<GroupRow> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO groups (org_id, name, description) VALUES (?1, ?2, ?3)",
                params![org_id, name, description],
            )
            .map_err(|e| match backend(e) {
                StoreError::Conflict(_) => StoreError::Conflict(format!("group {name:?} exists")),
                other => other,
            })?;
            let id = tx.last_insert_rowid();
            audit_in(tx, &audit.entry(None, None, &[]))?;
            Ok(GroupRow { id, org_id, name: name.into(), description: description.into(), members: 0 })
        })
    }

    fn list_groups(&self, org_id: i64) -> StoreResult<Vec<GroupRow>> {
        self.read(|c| {
            let mut stmt = c
                .prepare(concat!("SELECT ", group_columns!(), " FROM groups g WHERE g.org_id = ?1 ORDER BY g.name"))
                .map_err(backend)?;
            let rows = stmt.query_map([org_id], |r| mapped(r, group_row)).map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
    }

    fn group_by_name(&self, org_id: i64, name: &str) -> StoreResult<GroupRow> {
        self.read(|c| {
            c.query_row(
                concat!("SELECT ", group_columns!(), " FROM groups g WHERE g.org_id = ?1 AND g.name = ?2"),
                params![org_id, name],
                |r| mapped(r, group_row),
            )
            .map_err(or_not_found(format!("group {name:?}")))
        })
    }

    fn add_group_members(&self, group_id: i64, ids: &[i64], audit: &Audit) -> StoreResult<usize> {
        self.write(|tx| {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO group_members (group_id, device_id) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
                )
                .map_err(backend)?;
            let mut n = 0;
            for id in ids {
                n += stmt.execute(params![group_id, id]).map_err(backend)?;
            }
            audit_in(tx, &audit.entry(None, None, &[("added", n.into())]))?;
            Ok(n)
        })
    }

    fn group_member_ids(&self, group_id: i64) -> StoreResult<Vec<i64>> {
        self.read(|c| {
            let mut stmt = c
                .prepare_cached("SELECT device_id FROM group_members WHERE group_id = ?1 ORDER BY device_id")
                .map_err(backend)?;
            let rows = stmt.query_map([group_id], |r| r.get(0)).map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
    }

    fn device_ids_by_sn(&self, org_id: i64, sns: &[String]) -> StoreResult<Vec<(String, Option<i64>)>> {
        self.read(|c| {
            let mut stmt = c.prepare_cached("SELECT id FROM devices WHERE org_id = ?1 AND sn = ?2").map_err(backend)?;
            sns.iter()
                .map(|sn| {
                    let id: Option<i64> =
                        stmt.query_row(params![org_id, sn], |r| r.get(0)).optional().map_err(backend)?;
                    Ok((sn.clone(), id))
                })
                .collect()
        })
    }
}

impl AuditLog for SqliteStore {
    fn append_audit(&self, e: &AuditEntry) -> StoreResult<()> {
        self.write(|tx| audit_in(tx, e))
    }

    fn list_audit(&self, org_id: Option<i64>, limit: i64, before: Option<i64>) -> StoreResult<Vec<AuditEntry>> {
        self.read(|c| {
            let sql = concat!(
                "SELECT ",
                audit_columns!(),
                " FROM audit
                       WHERE (?1 IS NULL OR org_id = ?1) AND (?3 IS NULL OR id < ?3) ORDER BY id DESC LIMIT ?2"
            );
            let mut stmt = c.prepare(sql).map_err(backend)?;
            let rows = stmt.query_map(params![org_id, limit, before], |r| mapped(r, audit_row)).map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
    }
}
