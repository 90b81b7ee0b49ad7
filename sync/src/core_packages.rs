//! `core-ingest package ...`: the operator's packages at the core (issue
//! 23), over the core's store: sell (a monthly plan, a top-up, a trial),
//! revoke, and a subscriber's balance. Every sale carries the operator's
//! id: the same sale sent again is one sale.
//!
//! Boxes do not spend these yet: grants reach them with the downlink,
//! which is still to come (see ARCHITECTURE.md).

use mec_metering::charging::PackageSpec;
use mec_metering::{BucketKind, Imsi};
use serde_json::{json, Value};

use crate::charging_store::ChargingStore;
use crate::core_ingest::parse_time;

/// What `package sell` sells.
#[derive(Debug, Clone)]
pub struct Sale {
    /// The operator's id for the sale (its idempotency key).
    pub id: String,
    /// The subscriber.
    pub imsi: String,
    /// monthly, topup or trial.
    pub kind: String,
    /// Tokens (a month's, for monthly).
    pub tokens: u64,
    /// Valid from (RFC 3339, YYYY-MM-DD or Unix seconds; None: now).
    pub from: Option<String>,
    /// Valid for this many days.
    pub days: u32,
    /// The tier's name, for the bill.
    pub tier: String,
    /// The models it may be spent on (none: any).
    pub models: Vec<String>,
}

fn now_s() -> i64 {
    chrono::Utc::now().timestamp()
}

fn imsi(text: &str) -> anyhow::Result<Imsi> {
    Imsi::parse(text).map_err(|e| anyhow::anyhow!("IMSI {text:?}: {e}"))
}

/// Sells `sale`; the JSON says whether it is new.
pub fn sell(store: &dyn ChargingStore, sale: &Sale) -> anyhow::Result<Value> {
    let who = imsi(&sale.imsi)?;
    let kind = BucketKind::parse(&sale.kind)
        .ok_or_else(|| anyhow::anyhow!("kind {:?}: monthly, topup or trial", sale.kind))?;
    anyhow::ensure!(
        sale.tokens > 0,
        "--tokens: a package of 0 tokens sells nothing"
    );
    anyhow::ensure!(
        sale.days > 0,
        "--days: a package valid for 0 days is never valid"
    );
    let now = now_s();
    let valid_from = match &sale.from {
        Some(t) => parse_time(t)? / 1000,
        None => now,
    };
    let spec = PackageSpec {
        kind,
        allowance: sale.tokens,
        valid_from,
        expires_at: valid_from + i64::from(sale.days) * 86_400,
        tier: sale.tier.clone(),
        models: sale.models.clone(),
    };
    // The sale as asked, not as made: a retry that leaves out --from (the
    // package starts at the sale) is the same sale a second later.
    let request = json!({
        "imsi": who,
        "kind": kind.as_str(),
        "tokens": sale.tokens,
        "from": sale.from,
        "days": sale.days,
        "tier": sale.tier,
        "models": sale.models,
    })
    .to_string();
    let new = store.sell(&sale.id, &who, &spec, &request, now)?;
    let mut out = json!({
        "package": sale.id,
        "imsi": who,
        "new": new,
        "kind": kind.as_str(),
        "tokens": spec.allowance,
        "tier": spec.tier,
        "models": spec.models,
        "balance": store.account(&who, now)?,
    });
    if new {
        // A retry's times would be the retry's, not the sale's: only the
        // sale that made the package says them.
        out["valid_from"] = json!(spec.valid_from);
        out["expires_at"] = json!(spec.expires_at);
    }
    Ok(out)
}

/// Revokes package `id`: the JSON names the open grants it touched (their
/// boxes stop admitting on them when the downlink tells them).
pub fn revoke(store: &dyn ChargingStore, id: &str) -> anyhow::Result<Value> {
    let grants = store.revoke(id, now_s())?;
    Ok(json!({
        "package": id,
        "revoked": true,
        "grants": grants.iter().map(|g| json!({ "grant": g.id, "node_id": g.node_id })).collect::<Vec<_>>(),
    }))
}

/// `imsi`'s balance at the core.
pub fn balance(store: &dyn ChargingStore, text: &str) -> anyhow::Result<Value> {
    Ok(serde_json::to_value(store.account(&imsi(text)?, now_s())?)?)
}
