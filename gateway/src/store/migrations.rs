//! Schema migrations: numbered `.sql` files per backend (`gateway/migrations/sqlite/0001_….sql`,
//! `gateway/migrations/postgres/0001_….sql`), built into the binary and applied in order by one
//! runner ([`run`]), one transaction per migration, each recording its version.
//!
//! Both backends number their migrations alike: version N is the same change in each dialect, so
//! a schema version means the same tables whichever store holds them. A migration, once released,
//! is never edited: a database records that it ran and never runs it again. The statements are
//! byte for byte those the gateway ran when they were still strings in its code (SQLite keeps a
//! `CREATE` statement's text in `sqlite_master`, and the store suite compares a new store's schema
//! with one made by that older build); only the comment lines above them are new.

use super::{StoreError, StoreResult};

/// One migration: its file name (`NNNN_what.sql`, NNNN its version) and its statements.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Migration {
    pub file: &'static str,
    pub sql: &'static str,
}

/// The migrations of both backends, from their files, in order: one list of names, since
/// version N is the same change in each dialect (`migrations/{sqlite,postgres}/NNNN_what.sql`).
macro_rules! migrations {
    ($($file:literal),* $(,)?) => {
        (
            &[$(Migration { file: $file, sql: include_str!(concat!("../../migrations/sqlite/", $file)) }),*],
            &[$(Migration { file: $file, sql: include_str!(concat!("../../migrations/postgres/", $file)) }),*],
        )
    };
}

const BOTH: (&[Migration], &[Migration]) = migrations!(
    "0001_initial.sql",
    "0002_broker_password_hash.sql",
    "0003_redelivery_claims.sql",
    "0004_device_credentials.sql",
    "0005_gudid_bootstrap_hash.sql",
    "0006_keks.sql",
    "0007_gudid_custody.sql",
    "0008_task_numbers.sql",
    "0009_backend_channel.sql",
    "0010_gudid_proof.sql",
    "0011_broker_credentials.sql",
    "0012_broker_credentials_by_sn.sql",
);

pub(crate) const SQLITE: &[Migration] = BOTH.0;
pub(crate) const POSTGRES: &[Migration] = BOTH.1;

/// The next migration to run on a database at `current`, if any below `target`; a database newer
/// than this build is refused.
pub(crate) type Next<'m> = dyn Fn(i64) -> StoreResult<Option<(i64, &'m Migration)>> + 'm;

/// Where a backend records its schema version, and how it runs one migration.
pub(crate) trait Ledger {
    type Error: From<StoreError>;

    /// One transaction: reads the recorded version, asks `next` what to run after it, and if
    /// anything, runs it and records its version. Returns whether a migration ran.
    fn step(&mut self, next: &Next<'_>) -> Result<bool, Self::Error>;
}

/// Runs `migrations` after the database's recorded version, up to version `target`, one
/// transaction each.
pub(crate) fn run<L: Ledger>(ledger: &mut L, migrations: &[Migration], target: usize) -> Result<(), L::Error> {
    let known = migrations.len() as i64;
    let target = target.min(migrations.len()) as i64;
    let next = |current: i64| -> StoreResult<Option<(i64, &Migration)>> {
        if current > known {
            return Err(StoreError::Backend(format!(
                "database schema version {current} is newer than this gateway knows ({known}); upgrade the gateway"
            )));
        }
        if current >= target {
            return Ok(None);
        }
        let migration = &migrations[current as usize];
        tracing::info!(version = current + 1, file = migration.file, "running a schema migration");
        Ok(Some((current + 1, migration)))
    };
    while ledger.step(&next)? {}
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_backend_has_every_migration_file_numbered_from_one_in_order() {
        for (backend, migrations) in [("sqlite", SQLITE), ("postgres", POSTGRES)] {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations").join(backend);
            let mut files: Vec<String> = std::fs::read_dir(&dir)
                .expect("the migrations directory")
                .map(|entry| entry.expect("a directory entry").file_name().to_string_lossy().into_owned())
                .collect();
            files.sort();
            let listed: Vec<&str> = migrations.iter().map(|m| m.file).collect();
            assert_eq!(files, listed, "{backend}: every file is listed, in order");
            for (i, m) in migrations.iter().enumerate() {
                assert!(m.file.starts_with(&format!("{:04}_", i + 1)), "{backend}: {} is version {}", m.file, i + 1);
                assert!(m.file.ends_with(".sql") && !m.sql.trim().is_empty(), "{backend}: {}", m.file);
            }
        }
        assert_eq!(SQLITE.len(), POSTGRES.len(), "the two backends' versions are in step");
    }

    #[test]
    fn the_broker_credentials_view_keeps_a_spent_bootstrap_identity_for_the_proof_window() {
        // The view (migration 11) writes the window out; the gateway's rule names it once.
        let window = format!("- {}", crate::store::GUDID_PROOF_WINDOW_MS);
        for migrations in [SQLITE, POSTGRES] {
            let view = migrations.iter().find(|m| m.file == "0011_broker_credentials.sql").expect("migration 11");
            assert_eq!(view.sql.matches(&window).count(), 1, "{}", view.file);
        }
    }
}
