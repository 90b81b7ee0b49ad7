//! Where a store-suite test's core store lives: one suite, two stores
//! (`store_suite`, `charging_suite`). `open` gives a new handle on it: a
//! reopen, or a second core-ingest instance.

use std::sync::Arc;

use mec_sync::charging_store::ChargingStore;
use mec_sync::ingest_store::{IngestStore, PgOptions, PgStore, SqliteStore};

pub enum Backend {
    Sqlite(tempfile::TempDir),
    Postgres(String),
}

impl Backend {
    pub fn sqlite() -> Backend {
        Backend::Sqlite(tempfile::tempdir().unwrap())
    }

    /// A fresh database on this test binary's throw-away server.
    pub fn postgres(test: &str) -> Backend {
        Backend::Postgres(mec_pg_throwaway::fresh_database(test).unwrap())
    }

    fn sqlite_store(dir: &tempfile::TempDir) -> SqliteStore {
        SqliteStore::open(&dir.path().join("core.sqlite")).unwrap()
    }

    fn pg_store(url: &str) -> PgStore {
        PgStore::connect(url, &PgOptions::default()).unwrap()
    }

    pub fn open(&self) -> Arc<dyn IngestStore> {
        match self {
            Backend::Sqlite(dir) => Arc::new(Backend::sqlite_store(dir)),
            Backend::Postgres(url) => Arc::new(Backend::pg_store(url)),
        }
    }

    pub fn open_charging(&self) -> Arc<dyn ChargingStore> {
        match self {
            Backend::Sqlite(dir) => Arc::new(Backend::sqlite_store(dir)),
            Backend::Postgres(url) => Arc::new(Backend::pg_store(url)),
        }
    }
}

/// Each named test of the calling module once per store: `name::sqlite`
/// and `name::postgres` (its database named `prefix` + `name`).
macro_rules! on_both_stores {
    ($prefix:literal: $($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn sqlite() {
                super::$name($crate::common::stores::Backend::sqlite());
            }
            #[test]
            fn postgres() {
                super::$name($crate::common::stores::Backend::postgres(concat!($prefix, stringify!($name))));
            }
        }
    )*};
}
pub(crate) use on_both_stores;
