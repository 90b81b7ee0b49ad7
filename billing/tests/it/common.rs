//! A box's billing on a temporary directory.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use mec_billing::tally::{Slot, Tally};
use mec_billing::{AppliedWatermark, Billing, BillingConfig, RateLimits, RequestInfo, Settled};
use mec_metering::store::Store;
use mec_metering::{BucketKind, Imsi};
use mec_sync::identity::NodeIdentity;
use mec_sync::log::{BackendChoice, LogOptions, UsageLog};
use mec_sync::record::Outcome;

pub fn imsi() -> Imsi {
    Imsi::parse("001010000000001").unwrap()
}

pub fn info() -> RequestInfo {
    RequestInfo {
        request_id: uuid::Uuid::now_v7(),
        imsi: imsi(),
        app: "app".into(),
        model: "m".into(),
        started: SystemTime::now(),
        started_at: Instant::now(),
        detail: Default::default(),
        rate: Default::default(),
    }
}

pub fn settled(prompt: u64, completion: u64) -> Settled {
    Settled {
        prompt_tokens: prompt,
        completion_tokens: completion,
        outcome: Outcome::Completed,
        ..Default::default()
    }
}

/// A box: its state directory and what billing runs over.
pub struct Box_ {
    pub dir: PathBuf,
    pub log: Arc<UsageLog>,
    pub billing: Billing,
    pub applied: AppliedWatermark,
    pub left: Vec<(u32, Slot)>,
}

pub fn log_options(budget: u64) -> LogOptions {
    LogOptions {
        backend: BackendChoice::File,
        budget_bytes: budget,
        segment_bytes: 4096,
        ..LogOptions::default()
    }
}

fn key() -> NodeIdentity {
    NodeIdentity::from_signing_key(ed25519_dalek::SigningKey::from_bytes(&[3; 32]))
}

/// Opens (or reopens, after a "crash") billing in `dir`, with a log of
/// `budget` bytes. A first open grants `tokens` to [`imsi`].
pub fn open_box(dir: &Path, budget: u64, tokens: u64) -> Box_ {
    let fresh = !dir.join("ledger.sqlite").exists();
    let log = Arc::new(UsageLog::open(&dir.join("log"), key(), "n", log_options(budget)).unwrap());
    let mut store = Store::open(&dir.join("ledger.sqlite")).unwrap();
    if fresh && tokens > 0 {
        store
            .grant(&imsi(), BucketKind::Topup, tokens, 0, i64::MAX / 2, 0)
            .unwrap();
    }
    let (tally, left) = Tally::open(&dir.join("inflight.tally")).unwrap();
    let applied = AppliedWatermark::default();
    let billing = Billing::start(
        BillingConfig {
            enabled: true,
            limits: RateLimits::default(),
            welcome: Vec::new(),
            core: None,
            rate_digests: [(3, vec![0xab; 32])].into(),
            rate_tiers: [(3, [("flagship".to_string(), "flagship".to_string())].into())].into(),
        },
        log.clone(),
        store,
        Some(Arc::new(tally)),
        applied.clone(),
    )
    .unwrap();
    Box_ {
        dir: dir.to_path_buf(),
        log,
        billing,
        applied,
        left,
    }
}

pub fn remaining(b: &Billing) -> u64 {
    b.balance(&imsi()).remaining_tokens
}
