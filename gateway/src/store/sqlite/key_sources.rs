//! SQLite: key sources and key-encryption keys.

use super::*;

impl KeySources for SqliteStore {
    fn insert_key_source(&self, row: &KeySourceRow, audit: &Audit) -> StoreResult<KeySourceRow> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO key_sources (org_id, name, algorithm, kcv, sealed, key_set_id, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![row.org_id, row.name, row.algorithm, row.kcv, row.sealed, row.key_set_id, row.created_at],
            )
            .map_err(|e| match backend(e) {
                StoreError::Conflict(_) => StoreError::Conflict(format!("key source {:?} exists", row.name)),
                other => other,
            })?;
            let id = tx.last_insert_rowid();
            audit_in(tx, &audit.entry(None, None, &[]))?;
            Ok(KeySourceRow { id, ..row.clone() })
        })
    }

    fn list_key_sources(&self, org_id: i64) -> StoreResult<Vec<KeySourceRow>> {
        self.read(|c| {
            let mut stmt = c
                .prepare(&format!("SELECT {KEY_SOURCE_COLUMNS} FROM key_sources WHERE org_id = ?1 ORDER BY id"))
                .map_err(backend)?;
            let rows = stmt.query_map([org_id], |r| mapped(r, key_source_row)).map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
    }

    fn key_source(&self, org_id: i64, id: i64) -> StoreResult<KeySourceRow> {
        self.read(|c| {
            c.query_row(
                &format!("SELECT {KEY_SOURCE_COLUMNS} FROM key_sources WHERE org_id = ?1 AND id = ?2"),
                params![org_id, id],
                |r| mapped(r, key_source_row),
            )
            .map_err(or_not_found(format!("key source {id}")))
        })
    }

    fn key_source_by_name(&self, org_id: i64, name: &str) -> StoreResult<KeySourceRow> {
        self.read(|c| {
            c.query_row(
                &format!("SELECT {KEY_SOURCE_COLUMNS} FROM key_sources WHERE org_id = ?1 AND name = ?2"),
                params![org_id, name],
                |r| mapped(r, key_source_row),
            )
            .map_err(or_not_found(format!("key source {name:?}")))
        })
    }

    fn allocate_serials(&self, key_source_id: i64, count: i64) -> StoreResult<i64> {
        self.write(|tx| {
            let first: i64 = tx
                .query_row("SELECT next_serial FROM key_sources WHERE id = ?1", [key_source_id], |r| r.get(0))
                .map_err(backend)?;
            tx.execute(
                "UPDATE key_sources SET next_serial = next_serial + ?2 WHERE id = ?1",
                params![key_source_id, count],
            )
            .map_err(backend)?;
            Ok(first)
        })
    }

    fn insert_kek(&self, row: &KekRow, audit: &Audit) -> StoreResult<KekRow> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO keks (org_id, name, algorithm, kcv, sealed, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![row.org_id, row.name, row.algorithm, row.kcv, row.sealed, row.created_at],
            )
            .map_err(|e| match backend(e) {
                StoreError::Conflict(_) => StoreError::Conflict(format!("KEK {:?} exists", row.name)),
                other => other,
            })?;
            let id = tx.last_insert_rowid();
            audit_in(tx, &audit.entry(None, None, &[]))?;
            Ok(KekRow { id, ..row.clone() })
        })
    }

    fn list_keks(&self, org_id: Option<i64>) -> StoreResult<Vec<KekRow>> {
        self.read(|c| {
            let mut stmt = c
                .prepare(&format!("SELECT {KEK_COLUMNS} FROM keks WHERE ?1 IS NULL OR org_id = ?1 ORDER BY id"))
                .map_err(backend)?;
            let rows = stmt.query_map([org_id], |r| mapped(r, kek_row)).map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
    }

    fn kek_by_name(&self, org_id: i64, name: &str) -> StoreResult<KekRow> {
        self.read(|c| {
            c.query_row(
                &format!("SELECT {KEK_COLUMNS} FROM keks WHERE org_id = ?1 AND name = ?2"),
                params![org_id, name],
                |r| mapped(r, kek_row),
            )
            .map_err(or_not_found(format!("KEK {name:?}")))
        })
    }
}
