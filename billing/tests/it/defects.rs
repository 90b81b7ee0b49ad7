//! One test per defect the billing review found, named after the promise
//! it broke. Each failed on the billing of before the fix (the agent's
//! `server/billing.rs` at 26efaf0).

use std::time::Duration;

use crate::common::*;
use mec_billing::tally::{decode_file, Entry, Slot, Tally};
use mec_billing::{Admit, BillingError};
use mec_sync::record::SignedRecord;

fn admit(
    b: &mec_billing::Billing,
    info: &mec_billing::RequestInfo,
    prompt: u64,
    max: u64,
    stream: bool,
) -> Result<mec_billing::Admission, BillingError> {
    b.admit(Admit {
        info,
        prompt_tokens: prompt,
        max_completion: max,
        min_completion: 1,
        stream,
    })
}

/// Admits `n` requests while the log has room, then settles them all (15
/// tokens each), as concurrent requests do: the log fills to the brim and
/// the last ones cannot be recorded. Returns the outcome of each settle.
async fn fill_to_the_brim(
    b: &mec_billing::Billing,
    n: usize,
    stream: bool,
) -> Vec<(
    mec_billing::RequestInfo,
    Result<mec_billing::Usage, BillingError>,
)> {
    let mut admitted = Vec::new();
    for _ in 0..n {
        let info = info();
        let mut a = admit(b, &info, 10, 20, stream).unwrap();
        a.count(5).unwrap();
        admitted.push((info, a));
    }
    let mut out = Vec::new();
    for (info, a) in admitted {
        out.push((info, a.settle(&settled(10, 5)).await));
    }
    assert!(out.iter().any(|(_, r)| r.is_ok()), "nothing fitted");
    assert!(out.iter().any(|(_, r)| r.is_err()), "the log never filled");
    out
}

fn record_at(log: &mec_sync::log::UsageLog, seq: u64) -> mec_sync::record::UsageRecord {
    let (s, bytes) = log.read_from(seq, 1, 1 << 20).unwrap().remove(0);
    assert_eq!(s, seq);
    SignedRecord::from_bytes(&bytes).unwrap().record().unwrap()
}

/// The core acknowledges every durable record, as the uploader would:
/// no further than the store has applied.
async fn acknowledge_all(bx: &Box_) {
    let durable = bx.log.stats().durable_seq;
    tokio::time::timeout(Duration::from_secs(10), async {
        while bx.applied.get() < durable {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the store applied every record");
    bx.log.ack(durable).unwrap();
}

fn live_slots(dir: &std::path::Path) -> Vec<Entry> {
    decode_file(&std::fs::read(dir.join("inflight.tally")).unwrap())
        .into_iter()
        .filter_map(|s| match s {
            Slot::Live(e) => Some(e),
            _ => None,
        })
        .collect()
}

/// A box (1,000 tokens) whose log is full when it stops; its last durable seq.
async fn stop_with_a_full_log(dir: &std::path::Path) -> u64 {
    let bx = open_box(dir, 1000, 1000);
    fill_to_the_brim(&bx.billing, 12, false).await;
    let durable = bx.log.stats().durable_seq;
    bx.billing.shutdown();
    durable
}

/// The state a SIGKILL mid-stream leaves: a slot in the tally, no record.
fn leave_a_slot(
    dir: &std::path::Path,
    request_id: uuid::Uuid,
    imsi: &str,
    log_seq: u64,
    tokens: u64,
) {
    let (tally, _) = Tally::open(&dir.join("inflight.tally")).unwrap();
    let now = mec_billing::unix_now() * 1000;
    let mut c = std::sync::Arc::new(tally)
        .begin(Entry {
            request_id: request_id.simple().to_string(),
            imsi: imsi.into(),
            app: "app".into(),
            model: "m".into(),
            started_ms: now,
            updated_ms: now,
            prompt_tokens: 10,
            completion_tokens: 0,
            reserved_tokens: 100,
            client_left: true,
            log_seq,
            end_user: "end-user-7".into(),
            choices: 2,
            constraint: "json_schema".into(),
            rate: Default::default(),
        })
        .unwrap();
    c.count(tokens).unwrap();
    drop(c); // the process dies: the slot is never released
}

#[tokio::test]
async fn a_reservation_held_by_a_live_request_never_expires() {
    let dir = tempfile::tempdir().unwrap();
    let bx = open_box(dir.path(), 1 << 20, 1000);
    let a_info = info();
    let a = admit(&bx.billing, &a_info, 10, 990, false).unwrap();
    assert_eq!(a.granted(), 1000);
    // Time passes under a live request (the old billing, given a 1 s
    // time-to-live, dropped the hold here; the agent's was 660 s, which a
    // test cannot wait out: the ledger's own test,
    // `a_reservation_holds_until_released_whatever_the_time`, moves its
    // clock 20 days instead, time being an argument there).
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let b_info = info();
    let b = admit(&bx.billing, &b_info, 10, 990, false);
    assert!(
        matches!(b, Err(BillingError::InsufficientQuota { available: 0, .. })),
        "a second request got {b:?} while the first still holds every token"
    );
    // A settles with debits covering every token it billed.
    let usage = a.settle(&settled(10, 990)).await.unwrap();
    let r = record_at(&bx.log, usage.seq);
    assert_eq!(r.billed_tokens, 1000);
    assert_eq!(r.debits.iter().map(|d| d.tokens).sum::<u64>(), 1000);
    assert_eq!(remaining(&bx.billing), 0);
    // A request that is gone (its admission dropped) frees its hold at once.
    bx.billing
        .grant(
            &imsi(),
            mec_metering::BucketKind::Topup,
            50,
            0,
            i64::MAX / 2,
        )
        .unwrap();
    let c = admit(&bx.billing, &info(), 10, 40, false).unwrap();
    assert_eq!(remaining(&bx.billing), 0);
    drop(c);
    assert_eq!(remaining(&bx.billing), 50);
    assert_eq!(bx.billing.open_reservations(), 0);
}

#[tokio::test]
async fn a_record_that_is_not_durable_debits_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let bx = open_box(dir.path(), 1000, 1000);
    let settles = fill_to_the_brim(&bx.billing, 12, false).await;
    let recorded = settles.iter().filter(|(_, r)| r.is_ok()).count() as u64;
    for (_, r) in &settles {
        if let Err(e) = r {
            assert!(matches!(e, BillingError::NotRecorded(_)), "{e:?}");
        }
    }
    assert_eq!(
        remaining(&bx.billing),
        1000 - 15 * recorded,
        "no record, no debit"
    );
    assert_eq!(bx.billing.open_reservations(), 0);
}

#[tokio::test]
async fn the_agent_starts_with_a_full_log_and_bills_left_streams_once_there_is_room() {
    let dir = tempfile::tempdir().unwrap();
    let durable = stop_with_a_full_log(dir.path()).await;
    let id = uuid::Uuid::now_v7();
    leave_a_slot(dir.path(), id, imsi().as_str(), durable, 7);

    let bx = open_box(dir.path(), 1000, 1000);
    let before = remaining(&bx.billing);
    let recovered = bx.billing.recover_streams(bx.left.clone()).await;
    assert_eq!(
        (recovered.billed, recovered.waiting),
        (0, 1),
        "{recovered:?}"
    );
    // Billable requests are refused meanwhile; the slot stays in the file.
    assert!(matches!(
        admit(&bx.billing, &info(), 10, 20, false),
        Err(BillingError::LogUnavailable(_))
    ));
    assert_eq!(live_slots(dir.path()).len(), 1);
    assert_eq!(
        remaining(&bx.billing),
        before - 17,
        "its tokens are held meanwhile"
    );
    // The core acknowledges: room again. The stream is billed, once.
    acknowledge_all(&bx).await;
    assert_eq!(bx.billing.bill_pending().await, 1);
    assert_eq!(bx.billing.pending(), 0);
    let r = record_at(&bx.log, durable + 1);
    assert_eq!(
        (r.record_id.as_slice(), r.billed_tokens),
        (id.as_bytes().as_slice(), 17)
    );
    // What the request asked is on its record, though its process died.
    assert_eq!(
        (r.end_user.as_str(), r.choices, r.constraint.as_str()),
        ("end-user-7", 2, "json_schema")
    );
    assert!(live_slots(dir.path()).is_empty());
    assert_eq!(remaining(&bx.billing), before - 17);
    assert_eq!(bx.billing.open_reservations(), 0);
}

#[tokio::test]
async fn a_stream_whose_record_was_acknowledged_and_deleted_is_not_billed_again() {
    let dir = tempfile::tempdir().unwrap();
    let bx = open_box(dir.path(), 1 << 20, 10_000);
    let stream = info();
    let mut a = admit(&bx.billing, &stream, 10, 20, true).unwrap();
    a.count(7).unwrap();
    let first = a.settle(&settled(10, 7)).await.unwrap();
    // More records, enough to rotate segments; the core holds them all.
    for _ in 0..40 {
        let a = admit(&bx.billing, &info(), 1, 2, false).unwrap();
        a.settle(&settled(1, 1)).await.unwrap();
    }
    bx.billing.shutdown();
    let durable = bx.log.stats().durable_seq;
    bx.log.ack(durable).unwrap();
    assert!(
        bx.log.read_from(first.seq, 1, 1 << 20).unwrap()[0].0 > first.seq,
        "the record's segment is deleted"
    );
    drop(bx);
    // The process died after the record was durable, before the slot was freed.
    leave_a_slot(
        dir.path(),
        stream.request_id,
        imsi().as_str(),
        first.seq - 1,
        7,
    );
    let bx = open_box(dir.path(), 1 << 20, 10_000);
    let before = remaining(&bx.billing);
    let recovered = bx.billing.recover_streams(bx.left.clone()).await;
    assert_eq!(
        (recovered.billed, recovered.already),
        (0, 1),
        "billed twice: {recovered:?}"
    );
    assert_eq!(remaining(&bx.billing), before);
    assert!(live_slots(dir.path()).is_empty());
}

#[tokio::test]
async fn a_store_batch_that_failed_is_retried_until_it_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    let bx = open_box(dir.path(), 1 << 20, 1000);
    // Another process holds the store's write lock past its busy timeout (5 s).
    let other = rusqlite::Connection::open(dir.path().join("ledger.sqlite")).unwrap();
    other.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let a = admit(&bx.billing, &info(), 10, 20, false).unwrap();
    let usage = a.settle(&settled(10, 5)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(bx.applied.get(), 0, "the store was locked");
    other.execute_batch("COMMIT").unwrap();
    drop(other);
    let applied = tokio::time::timeout(Duration::from_secs(15), async {
        while bx.applied.get() < usage.seq {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bx.applied.get()
    })
    .await;
    assert_eq!(applied, Ok(usage.seq), "the store never applied the record");
}

#[tokio::test]
async fn a_stream_whose_record_cannot_be_written_keeps_its_hold_and_is_billed_once_there_is_room() {
    let dir = tempfile::tempdir().unwrap();
    let bx = open_box(dir.path(), 1000, 1000);
    let settles = fill_to_the_brim(&bx.billing, 12, true).await;
    let failed: Vec<_> = settles.iter().filter(|(_, r)| r.is_err()).collect();
    for (_, r) in &failed {
        assert!(matches!(r, Err(BillingError::NotRecorded(_))), "{r:?}");
    }
    let n = failed.len();
    assert_eq!(bx.billing.pending(), n);
    assert_eq!(bx.billing.open_reservations(), n, "their holds stay");
    assert_eq!(live_slots(dir.path()).len(), n, "their slots stay");
    let before = remaining(&bx.billing);
    // The core acknowledges, round after round, until every stream is billed.
    let mut seen = bx.log.stats().durable_seq;
    let mut ids = Vec::new();
    for _round in 0..n {
        acknowledge_all(&bx).await;
        bx.billing.bill_pending().await;
        while seen < bx.log.stats().durable_seq {
            seen += 1;
            let r = record_at(&bx.log, seen);
            assert_eq!(r.billed_tokens, 15);
            ids.push(r.record_id);
        }
        if bx.billing.pending() == 0 {
            break;
        }
    }
    let want: Vec<Vec<u8>> = failed
        .iter()
        .map(|(i, _)| i.request_id.as_bytes().to_vec())
        .collect();
    assert_eq!(ids, want, "each failed stream billed once");
    assert_eq!(bx.billing.open_reservations(), 0);
    // The holds (30 each) were already out of "remaining": 15 of each is
    // debited, the rest returns.
    assert_eq!(remaining(&bx.billing), before + 15 * n as u64);
    assert!(live_slots(dir.path()).is_empty());
}

#[tokio::test]
async fn a_stream_dropped_before_it_settled_is_still_billed() {
    let dir = tempfile::tempdir().unwrap();
    let bx = open_box(dir.path(), 1 << 20, 1000);
    let info = info();
    let mut a = admit(&bx.billing, &info, 10, 20, true).unwrap();
    a.count(4).unwrap();
    drop(a); // its task ended without settling (a panic, say)
    assert_eq!(bx.billing.pending(), 1);
    assert_eq!(bx.billing.bill_pending().await, 1);
    let r = record_at(&bx.log, 1);
    assert_eq!(
        (r.record_id.as_slice(), r.billed_tokens),
        (info.request_id.as_bytes().as_slice(), 14)
    );
    assert_eq!(remaining(&bx.billing), 1000 - 14);
}

#[tokio::test]
async fn tokens_no_package_covers_are_never_recorded_free() {
    let dir = tempfile::tempdir().unwrap();
    let bx = open_box(dir.path(), 1 << 20, 1000);
    drop(bx);
    // A stream of a subscriber with no package here (it was revoked, say).
    let stranger = "001010000000099";
    leave_a_slot(dir.path(), uuid::Uuid::now_v7(), stranger, 0, 6);
    let bx = open_box(dir.path(), 1 << 20, 1000);
    let recovered = bx.billing.recover_streams(bx.left.clone()).await;
    assert_eq!(
        (recovered.billed, recovered.waiting),
        (0, 1),
        "{recovered:?}"
    );
    assert_eq!(bx.log.stats().durable_seq, 0, "no record without debits");
    assert_eq!(live_slots(dir.path()).len(), 1, "the tokens are kept");
    // Once a package valid then exists, the stream is billed from it.
    let who = mec_metering::Imsi::parse(stranger).unwrap();
    bx.billing
        .grant(&who, mec_metering::BucketKind::Topup, 100, 0, i64::MAX / 2)
        .unwrap();
    assert_eq!(bx.billing.bill_pending().await, 1);
    let r = record_at(&bx.log, 1);
    assert_eq!(r.billed_tokens, 16);
    assert_eq!(r.debits.iter().map(|d| d.tokens).sum::<u64>(), 16);
}

/// Several streams a dead process left, the log full at start: each holds
/// its tokens while it waits, so requests served meanwhile cannot spend them
/// and every one is billed once there is room.
#[tokio::test]
async fn every_stream_waiting_for_room_holds_its_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let durable = stop_with_a_full_log(dir.path()).await;
    leave_a_slot(
        dir.path(),
        uuid::Uuid::now_v7(),
        imsi().as_str(),
        durable,
        7,
    );
    leave_a_slot(
        dir.path(),
        uuid::Uuid::now_v7(),
        imsi().as_str(),
        durable,
        7,
    );

    let bx = open_box(dir.path(), 1000, 1000);
    let before = remaining(&bx.billing);
    let recovered = bx.billing.recover_streams(bx.left.clone()).await;
    assert_eq!(
        (recovered.billed, recovered.waiting),
        (0, 2),
        "{recovered:?}"
    );
    assert_eq!(
        bx.billing.open_reservations(),
        2,
        "each waiting stream holds"
    );
    assert_eq!(remaining(&bx.billing), before - 34);
    acknowledge_all(&bx).await;
    // A request served now cannot take what the streams hold.
    let a = admit(&bx.billing, &info(), 10, 5000, false).unwrap();
    assert_eq!(a.granted(), before - 34);
    drop(a);
    assert_eq!(bx.billing.bill_pending().await, 2);
    assert_eq!(bx.billing.pending(), 0);
    assert_eq!(remaining(&bx.billing), before - 34);
}
