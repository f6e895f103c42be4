//! PostgreSQL: key sources and key-encryption keys.

use super::*;

impl KeySources for PostgresStore {
    fn insert_key_source(&self, row: &KeySourceRow, audit: &Audit) -> StoreResult<KeySourceRow> {
        self.write(|s| {
            let id = s
                .query_one(
                    "INSERT INTO key_sources (org_id, name, algorithm, kcv, sealed, key_set_id, created_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
                    &[&row.org_id, &row.name, &row.algorithm, &row.kcv, &row.sealed, &row.key_set_id, &row.created_at],
                )
                .map_err(conflict_as(format!("key source {:?} exists", row.name)))?
                .try_get(0)?;
            audit_in(s, &audit.entry(None, None, &[]))?;
            Ok(KeySourceRow { id, ..row.clone() })
        })
    }

    fn list_key_sources(&self, org_id: i64) -> StoreResult<Vec<KeySourceRow>> {
        self.read(|s| {
            let found = s.query(
                concat!("SELECT ", key_source_columns!(), " FROM key_sources WHERE org_id = $1 ORDER BY id"),
                &[&org_id],
            )?;
            rows(found, key_source_row)
        })
    }

    fn key_source(&self, org_id: i64, id: i64) -> StoreResult<KeySourceRow> {
        self.read(|s| {
            s.query_opt(
                concat!("SELECT ", key_source_columns!(), " FROM key_sources WHERE org_id = $1 AND id = $2"),
                &[&org_id, &id],
            )?
            .map(|r| key_source_row(&r).map_err(Failure::from))
            .unwrap_or_else(|| Err(not_found(format!("key source {id}"))))
        })
    }

    fn key_source_by_name(&self, org_id: i64, name: &str) -> StoreResult<KeySourceRow> {
        self.read(|s| {
            s.query_opt(
                concat!("SELECT ", key_source_columns!(), " FROM key_sources WHERE org_id = $1 AND name = $2"),
                &[&org_id, &name],
            )?
            .map(|r| key_source_row(&r).map_err(Failure::from))
            .unwrap_or_else(|| Err(not_found(format!("key source {name:?}"))))
        })
    }

    fn allocate_serials(&self, key_source_id: i64, count: i64) -> StoreResult<i64> {
        // One statement: the row lock makes concurrent allocations on any node disjoint.
        self.write(|s| {
            Ok(s.query_one(
                "UPDATE key_sources SET next_serial = next_serial + $2 WHERE id = $1 RETURNING next_serial - $2",
                &[&key_source_id, &count],
            )?
            .try_get(0)?)
        })
    }

    fn insert_kek(&self, row: &KekRow, audit: &Audit) -> StoreResult<KekRow> {
        self.write(|s| {
            let id = s
                .query_one(
                    "INSERT INTO keks (org_id, name, algorithm, kcv, sealed, created_at)
                     VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
                    &[&row.org_id, &row.name, &row.algorithm, &row.kcv, &row.sealed, &row.created_at],
                )
                .map_err(conflict_as(format!("KEK {:?} exists", row.name)))?
                .try_get(0)?;
            audit_in(s, &audit.entry(None, None, &[]))?;
            Ok(KekRow { id, ..row.clone() })
        })
    }

    fn list_keks(&self, org_id: Option<i64>) -> StoreResult<Vec<KekRow>> {
        self.read(|s| {
            let found = s.query(
                concat!("SELECT ", kek_columns!(), " FROM keks WHERE $1::bigint IS NULL OR org_id = $1 ORDER BY id"),
                &[&org_id],
            )?;
            rows(found, kek_row)
        })
    }

    fn kek_by_name(&self, org_id: i64, name: &str) -> StoreResult<KekRow> {
        self.read(|s| {
            s.query_opt(
                concat!("SELECT ", kek_columns!(), " FROM keks WHERE org_id = $1 AND name = $2"),
                &[&org_id, &name],
            )?
            .map(|r| kek_row(&r).map_err(Failure::from))
            .unwrap_or_else(|| Err(not_found(format!("KEK {name:?}"))))
        })
    }
}
