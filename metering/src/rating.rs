//! Rating, sans IO: the operator's rate table (what a token of each model
//! costs in package units), its signature and version, and the arithmetic
//! that turns tokens into units.
//!
//! # The table
//!
//! A TOML file the operator writes and signs (Ed25519, a detached signature
//! over the file's exact bytes, base64, as the image manifest is signed):
//!
//! ```toml
//! version = 2                      # only ever increases
//! [[models]]
//! id = "smollm2-q4"                # a model id as the boxes serve it
//! tier = "small"                   # optional: packages may name tiers
//! prompt = 1                       # units per prompt token
//! cached = 1                       # units per prompt token from the prefix cache
//! completion = 1                   # units per completion token
//! [[models]]
//! id = "smollm2-q8"
//! tier = "flagship"
//! prompt = 4
//! cached = 0.25
//! completion = 16
//! ```
//!
//! Prices have at most three decimals and are kept as thousandths of a unit
//! ([`Rate`]), so rating is exact integer arithmetic; at least 0.001 (a
//! model that costs nothing would give records with no debits behind them).
//!
//! # The arithmetic
//!
//! A request's units are `ceil((uncached × prompt + cached × cached_price +
//! completion × completion_price) / 1000)`: rounded up once per request,
//! never per token. A reservation prices every prompt token at the higher
//! of the prompt and cached prices (which tokens the cache serves is known
//! only after the prefill), so what is settled never exceeds what was held.
//! Without a table every model costs one unit per token ([`Rate::UNIT`]),
//! and units are tokens, as before rating.

use std::collections::BTreeMap;

use base64::Engine;
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// A model's prices, in thousandths of a unit per token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rate {
    /// Per prompt token the prefix cache did not serve.
    pub prompt_milli: u64,
    /// Per prompt token served from the prefix cache.
    pub cached_milli: u64,
    /// Per completion token.
    pub completion_milli: u64,
}

impl Rate {
    /// One unit per token, whatever kind: the rate without a table.
    pub const UNIT: Rate = Rate {
        prompt_milli: 1000,
        cached_milli: 1000,
        completion_milli: 1000,
    };

    /// Units for what a request used: rounded up, once.
    pub fn units(&self, prompt_tokens: u64, cached_tokens: u64, completion_tokens: u64) -> u64 {
        let cached = cached_tokens.min(prompt_tokens);
        let milli = u128::from(prompt_tokens - cached) * u128::from(self.prompt_milli)
            + u128::from(cached) * u128::from(self.cached_milli)
            + u128::from(completion_tokens) * u128::from(self.completion_milli);
        u64::try_from(milli.div_ceil(1000)).unwrap_or(u64::MAX)
    }

    /// The most a prompt token can cost (cached or not).
    fn prompt_max(&self) -> u64 {
        self.prompt_milli.max(self.cached_milli)
    }

    /// Units to hold for `prompt_tokens` and up to `completion_tokens`:
    /// never less than [`Rate::units`] of any outcome within them.
    pub fn reserve_units(&self, prompt_tokens: u64, completion_tokens: u64) -> u64 {
        let milli = u128::from(prompt_tokens) * u128::from(self.prompt_max())
            + u128::from(completion_tokens) * u128::from(self.completion_milli);
        u64::try_from(milli.div_ceil(1000)).unwrap_or(u64::MAX)
    }

    /// The most completion tokens `units` held pay for, beside
    /// `prompt_tokens` (what a reservation that got fewer units than asked
    /// lets the request generate).
    pub fn completion_within(&self, units: u64, prompt_tokens: u64) -> u64 {
        let budget = u128::from(units) * 1000;
        let prompt = u128::from(prompt_tokens) * u128::from(self.prompt_max());
        let left = budget.saturating_sub(prompt);
        u64::try_from(left / u128::from(self.completion_milli.max(1))).unwrap_or(u64::MAX)
    }
}

/// One model's line in the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRate {
    /// Its tier, if the table names one.
    pub tier: Option<String>,
    /// Its prices.
    pub rate: Rate,
}

/// A verified rate table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateTable {
    /// Its version (only ever increases).
    pub version: u64,
    /// SHA-256 of the file's bytes, as signed.
    pub digest: [u8; 32],
    /// Each model's line, by model id.
    pub models: BTreeMap<String, ModelRate>,
    /// The file's bytes (kept to store them and show them).
    pub text: String,
}

/// Why a rate table is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateError {
    /// The signature is missing, malformed or does not verify.
    #[error("the rate table's signature does not verify with the operator key: {0}")]
    Signature(String),
    /// Not a rate table.
    #[error("the rate table is not valid: {0}")]
    Format(String),
    /// Not newer than the table in force.
    #[error("the rate table's version {offered} is not newer than version {in_force}, in force")]
    NotNewer {
        /// The version offered.
        offered: u64,
        /// The version in force.
        in_force: u64,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    version: u64,
    #[serde(default)]
    models: Vec<Line>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    id: String,
    #[serde(default)]
    tier: Option<String>,
    prompt: f64,
    cached: f64,
    completion: f64,
}

/// A price in units (at most three decimals, at least 0.001) as thousandths.
fn milli(what: &str, id: &str, price: f64) -> Result<u64, RateError> {
    let m = price * 1000.0;
    // Three decimals: what is billed is what was signed (the tolerance is
    // only binary floating point's, relative).
    if !m.is_finite() || !(1.0..=1e15).contains(&m) || (m - m.round()).abs() > m * 1e-12 {
        return Err(RateError::Format(format!(
            "models {id:?}: {what} = {price}: a price in units per token, at least 0.001, \
             with at most three decimals"
        )));
    }
    Ok(m.round() as u64)
}

impl RateTable {
    /// Verifies `signature` (base64 of 64 bytes) over `bytes` with `key`,
    /// then parses the table.
    pub fn verify(
        bytes: &[u8],
        signature: &str,
        key: &VerifyingKey,
    ) -> Result<RateTable, RateError> {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(signature.trim())
            .map_err(|e| RateError::Signature(format!("not base64: {e}")))?;
        let sig = Signature::from_slice(&raw)
            .map_err(|_| RateError::Signature(format!("{} bytes, not 64", raw.len())))?;
        key.verify(bytes, &sig).map_err(|_| {
            RateError::Signature("it was not made by this key over these bytes".into())
        })?;
        RateTable::parse(bytes)
    }

    /// Parses a table whose signature was checked (or that needs none: a
    /// test's).
    fn parse(bytes: &[u8]) -> Result<RateTable, RateError> {
        let text = std::str::from_utf8(bytes)
            .map_err(|_| RateError::Format("not UTF-8".into()))?
            .to_string();
        let file: File = toml::from_str(&text).map_err(|e| RateError::Format(e.to_string()))?;
        if file.version == 0 {
            return Err(RateError::Format("version must be at least 1".into()));
        }
        let mut models = BTreeMap::new();
        for line in file.models {
            if line.id.is_empty() || line.tier.as_deref() == Some("") {
                return Err(RateError::Format("a model id or tier is empty".into()));
            }
            let rate = Rate {
                prompt_milli: milli("prompt", &line.id, line.prompt)?,
                cached_milli: milli("cached", &line.id, line.cached)?,
                completion_milli: milli("completion", &line.id, line.completion)?,
            };
            let model = ModelRate {
                tier: line.tier,
                rate,
            };
            if models.insert(line.id.clone(), model).is_some() {
                return Err(RateError::Format(format!(
                    "models {:?} is priced twice",
                    line.id
                )));
            }
        }
        // A package names models and tiers in one list: a tier that is also
        // a model's id would make it cover both.
        for m in models.values() {
            if let Some(tier) = m.tier.as_deref().filter(|t| models.contains_key(*t)) {
                return Err(RateError::Format(format!(
                    "the tier {tier:?} is also a model's id"
                )));
            }
        }
        Ok(RateTable {
            version: file.version,
            digest: Sha256::digest(bytes).into(),
            models,
            text,
        })
    }

    /// This table replacing `in_force`: refused unless its version is newer.
    pub fn replaces(&self, in_force: Option<&RateTable>) -> Result<(), RateError> {
        match in_force {
            Some(old) if self.version <= old.version => Err(RateError::NotNewer {
                offered: self.version,
                in_force: old.version,
            }),
            _ => Ok(()),
        }
    }

    /// `model`'s line.
    pub fn model(&self, model: &str) -> Option<&ModelRate> {
        self.models.get(model)
    }
}

/// The rate applied to one request, as its record carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedRate {
    /// The prices.
    pub rate: Rate,
    /// The table's version (0: no table, [`Rate::UNIT`]).
    pub version: u64,
    /// The table's digest (empty: no table).
    pub digest: Vec<u8>,
    /// The model's tier in the table, if it names one (packages may be
    /// for a tier).
    pub tier: Option<String>,
}

impl Default for AppliedRate {
    fn default() -> AppliedRate {
        AppliedRate {
            rate: Rate::UNIT,
            version: 0,
            digest: Vec::new(),
            tier: None,
        }
    }
}

/// Why a model cannot be rated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the rate table (version {version}) has no price for the model {model:?}")]
pub struct Unrated {
    /// The model.
    pub model: String,
    /// The table's version.
    pub version: u64,
}

/// The rate `model` is served at under `table` (none: one unit per token).
pub fn rate_for(table: Option<&RateTable>, model: &str) -> Result<AppliedRate, Unrated> {
    let Some(table) = table else {
        return Ok(AppliedRate::default());
    };
    let line = table.model(model).ok_or_else(|| Unrated {
        model: model.to_string(),
        version: table.version,
    })?;
    Ok(AppliedRate {
        rate: line.rate,
        version: table.version,
        digest: table.digest.to_vec(),
        tier: line.tier.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    const TABLE: &str = r#"
version = 2
[[models]]
id = "small"
tier = "entry"
prompt = 1
cached = 1
completion = 1
[[models]]
id = "flagship"
tier = "premium"
prompt = 4
cached = 0.25
completion = 16
"#;

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[7; 32])
    }

    fn sign(bytes: &[u8], k: &SigningKey) -> String {
        base64::engine::general_purpose::STANDARD.encode(k.sign(bytes).to_bytes())
    }

    #[test]
    fn a_signed_table_verifies_and_prices_each_model() {
        let k = key();
        let t = RateTable::verify(
            TABLE.as_bytes(),
            &sign(TABLE.as_bytes(), &k),
            &k.verifying_key(),
        )
        .unwrap();
        assert_eq!(t.version, 2);
        assert_eq!(t.digest, <[u8; 32]>::from(Sha256::digest(TABLE.as_bytes())));
        let f = t.model("flagship").unwrap();
        assert_eq!(f.tier.as_deref(), Some("premium"));
        assert_eq!(
            f.rate,
            Rate {
                prompt_milli: 4000,
                cached_milli: 250,
                completion_milli: 16_000
            }
        );
        let applied = rate_for(Some(&t), "small").unwrap();
        assert_eq!((applied.rate, applied.version), (Rate::UNIT, 2));
        assert_eq!(
            rate_for(Some(&t), "other"),
            Err(Unrated {
                model: "other".into(),
                version: 2
            })
        );
        assert_eq!(rate_for(None, "other").unwrap(), AppliedRate::default());
    }

    #[test]
    fn a_bad_signature_or_table_is_refused() {
        let k = key();
        let other = SigningKey::from_bytes(&[8; 32]);
        let bytes = TABLE.as_bytes();
        let good = sign(bytes, &k);
        assert!(matches!(
            RateTable::verify(bytes, &sign(bytes, &other), &k.verifying_key()),
            Err(RateError::Signature(_))
        ));
        let mut changed = bytes.to_vec();
        changed[20] ^= 1;
        assert!(matches!(
            RateTable::verify(&changed, &good, &k.verifying_key()),
            Err(RateError::Signature(_))
        ));
        assert!(matches!(
            RateTable::verify(bytes, "not base64!", &k.verifying_key()),
            Err(RateError::Signature(_))
        ));
        for (bad, says) in [
            ("version = 1\n[[models]]\nid = \"m\"\nprompt = 0\ncached = 1\ncompletion = 1\n", "at least 0.001"),
            ("version = 1\n[[models]]\nid = \"m\"\nprompt = 0.0005\ncached = 1\ncompletion = 1\n", "three decimals"),
            ("version = 1\n[[models]]\nid = \"m\"\nprompt = -1\ncached = 1\ncompletion = 1\n", "prompt"),
            ("version = 0\n", "at least 1"),
            ("version = 1\n[[models]]\nid = \"m\"\nprompt = 1\ncached = 1\ncompletion = 1\n[[models]]\nid = \"m\"\nprompt = 1\ncached = 1\ncompletion = 1\n", "twice"),
            ("version = 1\nprice = 3\n", "price"),
            ("version = 1\n[[models]]\nid = \"m\"\nprompt = 0.0010000001\ncached = 1\ncompletion = 1\n", "three decimals"),
            ("version = 1\n[[models]]\nid = \"m\"\ntier = \"n\"\nprompt = 1\ncached = 1\ncompletion = 1\n[[models]]\nid = \"n\"\nprompt = 1\ncached = 1\ncompletion = 1\n", "also a model"),
        ] {
            let e = RateTable::verify(bad.as_bytes(), &sign(bad.as_bytes(), &k), &k.verifying_key())
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn only_a_newer_version_replaces_the_table_in_force() {
        let t2 = RateTable::parse(TABLE.as_bytes()).unwrap();
        let t3 = RateTable::parse(TABLE.replace("version = 2", "version = 3").as_bytes()).unwrap();
        assert_eq!(t3.replaces(Some(&t2)), Ok(()));
        assert_eq!(t3.replaces(None), Ok(()));
        assert_eq!(
            t2.replaces(Some(&t3)),
            Err(RateError::NotNewer {
                offered: 2,
                in_force: 3
            })
        );
        assert!(t2.replaces(Some(&t2)).is_err(), "the same version again");
    }

    #[test]
    fn units_round_up_once_per_request() {
        let f = Rate {
            prompt_milli: 4000,
            cached_milli: 250,
            completion_milli: 16_000,
        };
        // 10 uncached × 4 + 3 cached × 0.25 + 5 × 16 = 40 + 0.75 + 80.
        assert_eq!(f.units(13, 3, 5), 121);
        assert_eq!(
            Rate::UNIT.units(13, 3, 5),
            18,
            "units are tokens without a table"
        );
        let tiny = Rate {
            prompt_milli: 1,
            cached_milli: 1,
            completion_milli: 1,
        };
        assert_eq!(tiny.units(1, 0, 0), 1, "rounded up: never free");
        assert_eq!(tiny.units(1000, 0, 0), 1);
        assert_eq!(tiny.units(1001, 0, 0), 2);
        assert_eq!(f.units(u64::MAX, 0, u64::MAX), u64::MAX, "saturates");
    }

    proptest::proptest! {
        /// What a request settles never exceeds what it held, and what was
        /// held pays for the completion it was allowed.
        #[test]
        fn the_reservation_covers_every_outcome(
            p in 1u64..20_000, c in 1u64..20_000, k in 1u64..50_000,
            prompt in 0u64..10_000, cached_part in 0u64..10_000,
            max_completion in 0u64..10_000, used in 0u64..10_000,
        ) {
            let rate = Rate { prompt_milli: p, cached_milli: c, completion_milli: k };
            let cached = cached_part.min(prompt);
            let used = used.min(max_completion);
            let held = rate.reserve_units(prompt, max_completion);
            proptest::prop_assert!(rate.units(prompt, cached, used) <= held);
            let allowed = rate.completion_within(held, prompt);
            proptest::prop_assert!(allowed >= max_completion);
            proptest::prop_assert!(rate.units(prompt, cached, allowed) <= held);
        }
    }
}
