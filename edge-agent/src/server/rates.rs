//! The rate table in force on this box, and every table it accepted.
//!
//! Tables are signed by the operator (Ed25519 over the file's exact bytes,
//! `mec_metering::rating`) and kept in `state_dir/rates/` as
//! `v<version>.toml` with its signature beside it (`.sig`); none is ever
//! deleted, so a bill can be re-rated against the table its record names,
//! and a stream a crash interrupted is billed with its table's digest. The
//! table in force is the newest kept. A table is installed from
//! `[rating] table` at start or through the admin API, and only when its
//! signature verifies with the operator key and its version is newer than
//! the one in force; otherwise it is refused and the old one stays.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use ed25519_dalek::VerifyingKey;
use mec_metering::rating::{rate_for, AppliedRate, RateError, RateTable, Unrated};

/// The tables of this box.
pub struct RateBook {
    dir: PathBuf,
    key: Option<VerifyingKey>,
    /// Every table kept, by version (the last is in force).
    tables: RwLock<BTreeMap<u64, Arc<RateTable>>>,
}

/// Why a table could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// Refused: a bad signature, not a table, not newer.
    #[error(transparent)]
    Refused(#[from] RateError),
    /// The box has no operator key to check tables with.
    #[error("this box has no operator key for rate tables: set [rating] key, or provision the site's image key")]
    NoKey,
    /// Keeping it failed.
    #[error("keeping the rate table in {path}: {error}")]
    Io {
        /// Where.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
}

impl RateBook {
    /// The tables kept in `dir`, each checked again with `key`. One that no
    /// longer verifies, or kept tables and no key to check them with, stop
    /// the start: serving at another price than the operator's (one unit a
    /// token, or an older table) is not an option.
    pub fn open(dir: &Path, key: Option<VerifyingKey>) -> anyhow::Result<RateBook> {
        let mut tables = BTreeMap::new();
        let kept: Vec<PathBuf> = match std::fs::read_dir(dir) {
            Ok(entries) => entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("toml"))
                .collect(),
            Err(_) => Vec::new(),
        };
        if !kept.is_empty() && key.is_none() {
            anyhow::bail!(
                "{} holds rate tables and this box has no operator key to check them with: \
                 set [rating] key, or provision the site's image key",
                dir.display()
            );
        }
        for path in kept {
            let key = key.as_ref().expect("checked above");
            let t = read_signed(&path, key).map_err(|e| {
                anyhow::anyhow!(
                    "a kept rate table does not verify (move it aside to start without it): {e}"
                )
            })?;
            tables.insert(t.version, Arc::new(t));
        }
        Ok(RateBook {
            dir: dir.to_path_buf(),
            key,
            tables: RwLock::new(tables),
        })
    }

    /// The table in force, if any.
    pub fn current(&self) -> Option<Arc<RateTable>> {
        self.tables.read().unwrap().values().next_back().cloned()
    }

    /// The rate `model` is served at now.
    pub fn rate_for(&self, model: &str) -> Result<AppliedRate, Unrated> {
        rate_for(self.current().as_deref(), model)
    }

    /// Every kept table's digest, by version.
    pub fn digests(&self) -> BTreeMap<u64, Vec<u8>> {
        self.tables
            .read()
            .unwrap()
            .iter()
            .map(|(v, t)| (*v, t.digest.to_vec()))
            .collect()
    }

    /// Every kept table's tiers (model id to tier), by version.
    pub fn tiers(&self) -> BTreeMap<u64, BTreeMap<String, String>> {
        self.tables
            .read()
            .unwrap()
            .iter()
            .map(|(v, t)| {
                let tiers = t
                    .models
                    .iter()
                    .filter_map(|(id, m)| Some((id.clone(), m.tier.clone()?)))
                    .collect();
                (*v, tiers)
            })
            .collect()
    }

    /// Installs a table: verified with the operator key, newer than the one
    /// in force, kept durably, then in force. Blocking (files).
    pub fn install(&self, bytes: &[u8], signature: &str) -> Result<Arc<RateTable>, InstallError> {
        let key = self.key.as_ref().ok_or(InstallError::NoKey)?;
        let table = RateTable::verify(bytes, signature, key)?;
        let mut tables = self.tables.write().unwrap();
        table.replaces(tables.values().next_back().map(|t| t.as_ref()))?;
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |error| InstallError::Io { path, error }
        };
        std::fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let path = self.dir.join(format!("v{}.toml", table.version));
        let sig = signature_path(&path);
        // The signature first: a table without its signature beside it is
        // never read back.
        mec_provisioning::device::write_atomically(&sig, signature.trim().as_bytes())
            .map_err(io(&sig))?;
        mec_provisioning::device::write_atomically(&path, bytes).map_err(io(&path))?;
        let table = Arc::new(table);
        tables.insert(table.version, table.clone());
        tracing::info!(version = table.version, digest = %hex::encode(table.digest), "rate table in force");
        Ok(table)
    }

    /// The table in force as the admin API shows it.
    pub fn view(&self) -> serde_json::Value {
        match self.current() {
            None => serde_json::json!({
                "version": 0,
                "note": "no rate table: every model costs one unit per token",
                "kept": [],
            }),
            Some(t) => serde_json::json!({
                "version": t.version,
                "digest": hex::encode(t.digest),
                "models": t.models.iter().map(|(id, m)| serde_json::json!({
                    "id": id,
                    "tier": m.tier,
                    "prompt": m.rate.prompt_milli as f64 / 1000.0,
                    "cached": m.rate.cached_milli as f64 / 1000.0,
                    "completion": m.rate.completion_milli as f64 / 1000.0,
                })).collect::<Vec<_>>(),
                "kept": self.tables.read().unwrap().keys().collect::<Vec<_>>(),
            }),
        }
    }
}

/// `F.toml` → `F.toml.sig`.
pub fn signature_path(table: &Path) -> PathBuf {
    let mut s = table.as_os_str().to_owned();
    s.push(".sig");
    PathBuf::from(s)
}

/// A table file and its signature beside it, verified.
pub fn read_signed(path: &Path, key: &VerifyingKey) -> anyhow::Result<RateTable> {
    let bytes = std::fs::read(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let sig_path = signature_path(path);
    let sig = std::fs::read_to_string(&sig_path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", sig_path.display()))?;
    Ok(RateTable::verify(&bytes, &sig, key)?)
}
