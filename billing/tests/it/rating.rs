//! Rating in billing: a request's reservation and its bill are in package
//! units at its model's rate, its record carries the units, the rate and the
//! table's version and digest, and a stream a dead process left is billed at
//! the rate it started with.

use crate::common::*;
use mec_billing::tally::{Entry, RateEntry, Tally};
use mec_billing::{Admit, AppliedRate, Rate, RequestInfo};
use mec_sync::record::SignedRecord;

/// A flagship: a prompt token 4 units, a cached one 0.25, a completion
/// token 16.
fn flagship() -> AppliedRate {
    AppliedRate {
        rate: Rate {
            prompt_milli: 4000,
            cached_milli: 250,
            completion_milli: 16_000,
        },
        version: 3,
        digest: vec![0xab; 32],
        tier: Some("flagship".into()),
    }
}

fn rated_info() -> RequestInfo {
    RequestInfo {
        model: "flagship".into(),
        rate: flagship(),
        ..info()
    }
}

fn last_record(bx: &Box_) -> mec_sync::record::UsageRecord {
    let seq = bx.log.stats().durable_seq;
    let (_, bytes) = bx.log.read_from(seq, 1, 1 << 20).unwrap().remove(0);
    SignedRecord::from_bytes(&bytes).unwrap().record().unwrap()
}

#[tokio::test]
async fn a_rated_request_reserves_and_debits_units_and_its_record_says_how() {
    let dir = tempfile::tempdir().unwrap();
    let bx = open_box(dir.path(), 1 << 20, 10_000);
    let info = rated_info();
    let a = bx
        .billing
        .admit(Admit {
            info: &info,
            prompt_tokens: 10,
            max_completion: 100,
            min_completion: 1,
            stream: false,
        })
        .unwrap();
    // Every prompt token at the higher price, every completion token: 40 + 1600.
    assert_eq!(a.granted(), 1640);
    assert_eq!(remaining(&bx.billing), 10_000 - 1640);
    assert_eq!(a.completion_cap(), 100);
    let usage = a
        .settle(&mec_billing::Settled {
            prompt_tokens: 10,
            cached_prompt_tokens: 4,
            completion_tokens: 7,
            outcome: mec_sync::record::Outcome::Completed,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (10, 7));
    // 6 × 4 + 4 × 0.25 + 7 × 16 = 24 + 1 + 112.
    let units = 137;
    assert_eq!(remaining(&bx.billing), 10_000 - units);
    let r = last_record(&bx);
    assert_eq!((r.billed_tokens, r.billed_units), (17, units));
    assert_eq!(r.debits.iter().map(|d| d.tokens).sum::<u64>(), units);
    assert_eq!(
        (r.rate_version, r.rate_digest.as_slice()),
        (3, &[0xab; 32][..])
    );
    let rate = r.rate.unwrap();
    assert_eq!(
        (rate.prompt_milli, rate.cached_milli, rate.completion_milli),
        (4000, 250, 16_000)
    );
    assert_eq!(r.reserved_tokens, 1640, "units reserved");
}

#[tokio::test]
async fn a_reservation_short_of_units_caps_the_completion_it_pays_for() {
    let dir = tempfile::tempdir().unwrap();
    // 500 units: the 10-token prompt takes 40, leaving 460 = 28 completion
    // tokens at 16 (448), not the 100 asked.
    let bx = open_box(dir.path(), 1 << 20, 500);
    let info = rated_info();
    let a = bx
        .billing
        .admit(Admit {
            info: &info,
            prompt_tokens: 10,
            max_completion: 100,
            min_completion: 1,
            stream: false,
        })
        .unwrap();
    assert_eq!(a.granted(), 500);
    assert_eq!(a.completion_cap(), 28);
    drop(a);
    // Fewer units than one completion token needs beside the prompt: refused.
    let bx2_dir = tempfile::tempdir().unwrap();
    let bx2 = open_box(bx2_dir.path(), 1 << 20, 50);
    let refused = bx2.billing.admit(Admit {
        info: &info,
        prompt_tokens: 10,
        max_completion: 100,
        min_completion: 1,
        stream: false,
    });
    assert!(
        matches!(
            refused,
            Err(mec_billing::BillingError::InsufficientQuota {
                available: 50,
                needed: 56
            })
        ),
        "{refused:?}"
    );
}

/// What a dead process left: a flagship stream of 10 prompt and 5
/// completion tokens at [`flagship`]'s rate (120 units), in `dir`'s tally.
fn leave_a_flagship_stream(dir: &std::path::Path, id: uuid::Uuid, log_seq: u64) {
    let (tally, _) = Tally::open(&dir.join("inflight.tally")).unwrap();
    let now = mec_billing::unix_now() * 1000;
    let mut c = std::sync::Arc::new(tally)
        .begin(Entry {
            request_id: id.simple().to_string(),
            imsi: imsi().to_string(),
            app: "app".into(),
            model: "flagship".into(),
            started_ms: now,
            updated_ms: now,
            prompt_tokens: 10,
            completion_tokens: 0,
            reserved_tokens: 1640,
            client_left: true,
            log_seq,
            end_user: String::new(),
            choices: 1,
            constraint: String::new(),
            rate: RateEntry::of(&flagship()),
        })
        .unwrap();
    c.count(5).unwrap();
    drop(c); // the process dies: the slot is never released
}

#[tokio::test]
async fn a_stream_left_short_by_its_tiers_package_is_paid_by_the_others_without_overdraft() {
    let dir = tempfile::tempdir().unwrap();
    let bx = open_box(dir.path(), 1 << 20, 0);
    let far = mec_billing::unix_now() + 86_400;
    let kind = mec_metering::BucketKind::Topup;
    // The flagship tier's package holds 50 units; the stream costs 120.
    let tiers = bx
        .billing
        .grant_for(&imsi(), kind, 50, (0, far), &["flagship".to_string()])
        .unwrap();
    let general = bx
        .billing
        .grant_for(&imsi(), kind, 1_000, (0, far), &[])
        .unwrap();
    let durable = bx.log.stats().durable_seq;
    bx.billing.shutdown();
    drop(bx);
    leave_a_flagship_stream(dir.path(), uuid::Uuid::now_v7(), durable);
    let bx = open_box(dir.path(), 1 << 20, 0);
    assert_eq!(bx.billing.recover_streams(bx.left.clone()).await.billed, 1);
    let balance = bx.billing.balance(&imsi());
    let left = |id: u64| {
        balance
            .buckets
            .iter()
            .find(|b| b.id == id)
            .unwrap()
            .remaining
    };
    assert_eq!(left(tiers.id) + left(general.id), 1_050 - 120);
    assert!(
        left(tiers.id) <= 50 && left(general.id) <= 1_000,
        "{balance:?}"
    );
    let r = last_record(&bx);
    assert_eq!(r.debits.iter().map(|d| d.tokens).sum::<u64>(), 120);
}

#[tokio::test]
async fn a_stream_left_by_a_dead_process_is_billed_at_the_rate_it_started_with() {
    let dir = tempfile::tempdir().unwrap();
    let bx = open_box(dir.path(), 1 << 20, 10_000);
    let durable = bx.log.stats().durable_seq;
    bx.billing.shutdown();
    drop(bx);
    let id = uuid::Uuid::now_v7();
    leave_a_flagship_stream(dir.path(), id, durable);
    let bx = open_box(dir.path(), 1 << 20, 10_000);
    let recovered = bx.billing.recover_streams(bx.left.clone()).await;
    assert_eq!(recovered.billed, 1, "{recovered:?}");
    let r = last_record(&bx);
    assert_eq!(r.record_id, id.as_bytes().to_vec());
    // 10 × 4 + 5 × 16 (the tally does not know what the cache served: the
    // prompt at its full price).
    assert_eq!(
        (r.billed_tokens, r.billed_units, r.rate_version),
        (15, 120, 3)
    );
    assert_eq!(remaining(&bx.billing), 10_000 - 120);
}

#[tokio::test]
async fn a_package_for_other_models_refuses_this_one_naming_its_rule() {
    let dir = tempfile::tempdir().unwrap();
    let bx = open_box(dir.path(), 1 << 20, 0);
    let far = mec_billing::unix_now() + 86_400;
    let entry = bx
        .billing
        .grant_for(
            &imsi(),
            mec_metering::BucketKind::Topup,
            5_000,
            (0, far),
            &["entry".to_string(), "small".to_string()],
        )
        .unwrap();
    let admit = |info: &RequestInfo| {
        bx.billing.admit(Admit {
            info,
            prompt_tokens: 10,
            max_completion: 10,
            min_completion: 1,
            stream: false,
        })
    };
    // The flagship (tier "flagship"): the package is for "entry" and "small".
    let e = admit(&rated_info()).unwrap_err();
    assert!(
        matches!(&e, mec_billing::BillingError::ModelNotCovered { model, packages, .. }
            if model == "flagship" && packages == &vec![(entry.id, vec!["entry".to_string(), "small".to_string()])]),
        "{e:?}"
    );
    let message = e.to_string();
    assert!(
        message.contains(&format!("package {} is for entry, small", entry.id))
            && message
                .contains("a package for the model flagship or the tier flagship would allow it"),
        "{message}"
    );
    assert_eq!(remaining(&bx.billing), 5_000, "nothing held");
    // By the model's id, and by its tier.
    let small = RequestInfo {
        model: "small".into(),
        ..info()
    };
    assert_eq!(admit(&small).unwrap().granted(), 20);
    let entry_tier = RequestInfo {
        model: "tiny-v2".into(),
        rate: AppliedRate {
            tier: Some("entry".into()),
            ..Default::default()
        },
        ..info()
    };
    assert_eq!(admit(&entry_tier).unwrap().granted(), 20);
    // A package for every model covers the flagship, beside the other.
    bx.billing
        .grant_for(
            &imsi(),
            mec_metering::BucketKind::Topup,
            1_000,
            (0, far),
            &[],
        )
        .unwrap();
    let a = admit(&rated_info()).unwrap();
    assert_eq!(
        a.granted(),
        200,
        "10 × 4 + 10 × 16, from the package for every model"
    );
}
