//! PostgreSQL: the registry (organizations, tokens, devices, groups) and the audit log.

use super::*;

impl Registry for PostgresStore {
    fn create_org(&self, name: &str, at: Millis, audit: &Audit) -> StoreResult<OrgRow> {
        self.write(|s| {
            let row = s
                .query_one("INSERT INTO organizations (name, created_at) VALUES ($1, $2) RETURNING id", &[&name, &at])
                .map_err(conflict_as(format!("organization {name:?} exists")))?;
            let id = row.try_get(0)?;
            audit_in(s, &audit.entry(None, Some(id), &[]))?;
            Ok(OrgRow { id, name: name.to_string(), created_at: at })
        })
    }

    fn org_by_name(&self, name: &str) -> StoreResult<Option<OrgRow>> {
        self.read(|s| {
            s.query_opt(concat!("SELECT ", org_columns!(), " FROM organizations WHERE name = $1"), &[&name])?
                .map(|r| org_row(&r).map_err(Failure::from))
                .transpose()
        })
    }

    fn org(&self, id: i64) -> StoreResult<OrgRow> {
        self.read(|s| {
            let row = s.query_one(concat!("SELECT ", org_columns!(), " FROM organizations WHERE id = $1"), &[&id])?;
            Ok(org_row(&row)?)
        })
    }

    fn list_orgs(&self) -> StoreResult<Vec<OrgRow>> {
        self.read(|s| {
            rows(s.query(concat!("SELECT ", org_columns!(), " FROM organizations ORDER BY id"), &[])?, org_row)
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
        self.write(|s| {
            let row = s.query_one(
                "INSERT INTO tokens (org_id, role, label, token_hash, created_at) VALUES ($1, $2, $3, $4, $5) RETURNING id",
                &[&org_id, &role.as_str(), &label, &hash, &at],
            )?;
            let id: i64 = row.try_get(0)?;
            audit_in(s, &audit.entry(None, org_id, &[("token_id", id.into())]))?;
            Ok(TokenRow { id, org_id, role, label: label.to_string() })
        })
    }

    fn token_by_hash(&self, hash: &[u8]) -> StoreResult<Option<TokenRow>> {
        self.read(|s| {
            s.query_opt(concat!("SELECT ", token_columns!(), " FROM tokens WHERE token_hash = $1"), &[&hash])?
                .map(|r| token_row(&r).map_err(Failure::from))
                .transpose()
        })
    }

    fn has_key_owner(&self) -> StoreResult<bool> {
        self.read(|s| {
            Ok(s.query_one("SELECT EXISTS (SELECT 1 FROM tokens WHERE role = 'key_owner')", &[])?.try_get(0)?)
        })
    }

    fn import_devices(&self, org_id: i64, rows: &[ImportRow], at: Millis, audit: &Audit) -> StoreResult<usize> {
        let sns: Vec<&str> = rows.iter().map(|r| r.sn.as_str()).collect();
        let models: Vec<Option<&str>> = rows.iter().map(|r| r.model.as_deref()).collect();
        self.write(|s| {
            // Insert first, then look for SNs owned by another organization: ON CONFLICT waits
            // for a concurrent import of the same SN to finish, so the check after it sees every
            // owner, and a conflict rolls the whole import back.
            let added = s.execute(
                "INSERT INTO devices (org_id, sn, model, created_at)
                 SELECT $1, i.sn, i.model, $4 FROM unnest($2::text[], $3::text[]) WITH ORDINALITY AS i(sn, model, ord)
                 ORDER BY i.ord
                 ON CONFLICT (sn) DO NOTHING",
                &[&org_id, &sns, &models, &at],
            )?;
            let foreign: HashSet<String> = s
                .query("SELECT sn FROM devices WHERE sn = ANY ($1) AND org_id <> $2", &[&sns, &org_id])?
                .iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, _>>()?;
            if !foreign.is_empty() {
                let conflicts: Vec<String> = rows
                    .iter()
                    .filter(|row| foreign.contains(&row.sn))
                    .map(|row| format!("line {}: SN {} is registered to another organization", row.line, row.sn))
                    .collect();
                return Err(StoreError::Conflict(conflicts.join("; ")).into());
            }
            audit_in(s, &audit.entry(None, None, &[("imported", added.into())]))?;
            Ok(added as usize)
        })
    }

    fn list_devices(&self, org_id: i64, f: &DeviceFilter) -> StoreResult<Vec<DeviceRow>> {
        // ILIKE: SQLite's LIKE ignores ASCII case. COLLATE "C": SQLite orders by bytes.
        let pattern = f.sn_contains.as_ref().map(|s| format!("%{}%", s.replace('%', "").replace('_', "\\_")));
        let limit = (f.limit > 0).then_some(f.limit);
        let offset = f.offset.max(0);
        self.read(|s| {
            let found = s.query(
                concat!(
                    "SELECT ",
                    device_columns!(),
                    " FROM devices WHERE org_id = $1
                      AND ($2::text IS NULL OR sn ILIKE $2 ESCAPE '\\')
                      AND ($3::bigint IS NULL OR id IN (SELECT device_id FROM group_members WHERE group_id = $3))
                      AND ($6::text IS NULL OR sn COLLATE \"C\" > $6)
                      ORDER BY sn COLLATE \"C\" LIMIT $4 OFFSET $5"
                ),
                &[&org_id, &pattern, &f.group, &limit, &offset, &f.after_sn],
            )?;
            rows(found, device_row)
        })
    }

    fn count_devices(&self, org_id: i64) -> StoreResult<i64> {
        self.read(|s| Ok(s.query_one("SELECT count(*) FROM devices WHERE org_id = $1", &[&org_id])?.try_get(0)?))
    }

    fn device(&self, org_id: i64, sn: &str) -> StoreResult<DeviceRow> {
        self.read(|s| {
            s.query_opt(
                concat!("SELECT ", device_columns!(), " FROM devices WHERE org_id = $1 AND sn = $2"),
                &[&org_id, &sn],
            )?
            .map(|r| device_row(&r).map_err(Failure::from))
            .unwrap_or_else(|| Err(not_found(format!("device {sn}"))))
        })
    }

    fn device_by_id(&self, id: i64) -> StoreResult<DeviceRow> {
        self.read(|s| {
            s.query_opt(concat!("SELECT ", device_columns!(), " FROM devices WHERE id = $1"), &[&id])?
                .map(|r| device_row(&r).map_err(Failure::from))
                .unwrap_or_else(|| Err(not_found(format!("device #{id}"))))
        })
    }

    fn devices_by_ids(&self, ids: &[i64]) -> StoreResult<Vec<DeviceRow>> {
        self.read(|s| {
            let found = s.query(
                concat!("SELECT ", device_columns!(), " FROM devices WHERE id = ANY ($1) ORDER BY id"),
                &[&ids],
            )?;
            rows(found, device_row)
        })
    }

    fn device_org_by_sn(&self, sn: &str) -> StoreResult<Option<(i64, i64)>> {
        self.read(|s| {
            s.query_opt("SELECT id, org_id FROM devices WHERE sn = $1", &[&sn])?
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                .transpose()
        })
    }

    fn sn_owners(&self, sns: &[String]) -> StoreResult<Vec<(String, i64)>> {
        self.read(|s| {
            let found = s.query("SELECT sn, org_id FROM devices WHERE sn = ANY ($1)", &[&sns])?;
            rows(found, pair_row)
        })
    }

    fn credentials(&self, sn: &str) -> StoreResult<Option<DeviceCredentials>> {
        self.read(|s| {
            s.query_opt(concat!(select_credentials!(), " WHERE d.sn = $1"), &[&sn])?
                .map(|r| credentials_row(&r).map_err(Failure::from))
                .transpose()
        })
    }

    fn credentials_for(&self, ids: &[i64]) -> StoreResult<Vec<DeviceCredentials>> {
        self.read(|s| {
            let found = s.query(concat!(select_credentials!(), " WHERE d.id = ANY ($1) ORDER BY d.id"), &[&ids])?;
            rows(found, credentials_row)
        })
    }

    fn all_password_hashes(&self) -> StoreResult<Vec<(String, Vec<u8>)>> {
        self.read(|s| {
            let found = s.query(
                "SELECT d.sn, c.password_hash FROM devices d JOIN device_credentials c ON c.device_id = d.id
                 WHERE c.password_hash IS NOT NULL",
                &[],
            )?;
            rows(found, pair_row)
        })
    }

    fn broker_devices(&self) -> StoreResult<Vec<(String, Option<String>)>> {
        self.read(|s| {
            let found = s.query(
                "SELECT d.sn, c.broker_password_hash FROM devices d LEFT JOIN device_credentials c ON c.device_id = d.id
                 ORDER BY d.sn COLLATE \"C\"",
                &[],
            )?;
            rows(found, pair_row)
        })
    }

    fn assign(&self, org_id: i64, ids: &[i64], key_source_id: Option<i64>, audit: &Audit) -> StoreResult<usize> {
        self.write(|s| {
            // Counted per id given, repeats included, as SQLite's one UPDATE per id counts.
            let row = s.query_one(
                "WITH updated AS (
                     UPDATE devices SET assigned_key_source = $3 WHERE org_id = $1 AND id = ANY ($2) RETURNING id
                 )
                 SELECT count(*) FROM unnest($2::bigint[]) AS i(id) JOIN updated u ON u.id = i.id",
                &[&org_id, &ids, &key_source_id],
            )?;
            audit_in(s, &audit.entry(None, None, &[]))?;
            Ok(row.try_get::<_, i64>(0)? as usize)
        })
    }

    fn set_unlock_pending(&self, device_id: i64, pending: bool, audit: Option<&Audit>) -> StoreResult<()> {
        self.write(|s| {
            s.execute("UPDATE devices SET unlock_pending = $2 WHERE id = $1", &[&device_id, &pending])?;
            if let Some(audit) = audit {
                audit_in(s, &audit.entry(None, None, &[]))?;
                crate::store::postgres_channel::on_answered(s, audit, 0)?;
            }
            Ok(())
        })
    }

    fn create_group(&self, org_id: i64, name: &str, description: &str, audit: &Audit) -> StoreResult<GroupRow> {
        self.write(|s| {
            let id = s
                .query_one(
                    "INSERT INTO groups (org_id, name, description) VALUES ($1, $2, $3) RETURNING id",
                    &[&org_id, &name, &description],
                )
                .map_err(conflict_as(format!("group {name:?} exists")))?
                .try_get(0)?;
            audit_in(s, &audit.entry(None, None, &[]))?;
            Ok(GroupRow { id, org_id, name: name.into(), description: description.into(), members: 0 })
        })
    }

    fn list_groups(&self, org_id: i64) -> StoreResult<Vec<GroupRow>> {
        self.read(|s| {
            let found = s.query(
                concat!(
                    "SELECT ",
                    group_columns!(),
                    " FROM groups g WHERE g.org_id = $1 ORDER BY g.name COLLATE \"C\""
                ),
                &[&org_id],
            )?;
            rows(found, group_row)
        })
    }

    fn group_by_name(&self, org_id: i64, name: &str) -> StoreResult<GroupRow> {
        self.read(|s| {
            s.query_opt(
                concat!("SELECT ", group_columns!(), " FROM groups g WHERE g.org_id = $1 AND g.name = $2"),
                &[&org_id, &name],
            )?
            .map(|r| group_row(&r).map_err(Failure::from))
            .unwrap_or_else(|| Err(not_found(format!("group {name:?}"))))
        })
    }

    fn add_group_members(&self, group_id: i64, ids: &[i64], audit: &Audit) -> StoreResult<usize> {
        self.write(|s| {
            let added = s.execute(
                "INSERT INTO group_members (group_id, device_id)
                 SELECT $1, i.id FROM unnest($2::bigint[]) WITH ORDINALITY AS i(id, ord) ORDER BY i.ord
                 ON CONFLICT DO NOTHING",
                &[&group_id, &ids],
            )?;
            audit_in(s, &audit.entry(None, None, &[("added", added.into())]))?;
            Ok(added as usize)
        })
    }

    fn group_member_ids(&self, group_id: i64) -> StoreResult<Vec<i64>> {
        self.read(|s| {
            let found =
                s.query("SELECT device_id FROM group_members WHERE group_id = $1 ORDER BY device_id", &[&group_id])?;
            rows(found, first)
        })
    }

    fn device_ids_by_sn(&self, org_id: i64, sns: &[String]) -> StoreResult<Vec<(String, Option<i64>)>> {
        self.read(|s| {
            let found = s.query(
                "SELECT i.sn, d.id FROM unnest($2::text[]) WITH ORDINALITY AS i(sn, ord)
                 LEFT JOIN devices d ON d.org_id = $1 AND d.sn = i.sn
                 ORDER BY i.ord",
                &[&org_id, &sns],
            )?;
            rows(found, pair_row)
        })
    }
}

impl AuditLog for PostgresStore {
    fn append_audit(&self, e: &AuditEntry) -> StoreResult<()> {
        self.write(|s| audit_in(s, e))
    }

    fn list_audit(&self, org_id: Option<i64>, limit: i64, before: Option<i64>) -> StoreResult<Vec<AuditEntry>> {
        self.read(|s| {
            let found = s.query(
                concat!(
                    "SELECT ",
                    audit_columns!(),
                    " FROM audit
                 WHERE ($1::bigint IS NULL OR org_id = $1) AND ($3::bigint IS NULL OR id < $3) ORDER BY id DESC LIMIT $2"
                ),
                &[&org_id, &limit_or_all(limit), &before],
            )?;
            rows(found, audit_row)
        })
    }
}
