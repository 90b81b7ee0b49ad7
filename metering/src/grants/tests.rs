use super::*;
use crate::Ledger;

/// The wall clock at the tests' start.
const NOW: Timestamp = 1_780_000_000;
/// The monotonic clock then (seconds since boot).
const MONO: i64 = 5_000;

fn imsi() -> Imsi {
    Imsi::parse("001010000000001").unwrap()
}

/// Both clocks `s` seconds after the start.
fn at(s: i64) -> Now {
    Now {
        wall: NOW + s,
        mono: MONO + s,
    }
}

fn terms(grant_id: u64, model: Option<&str>, tokens: u64, offline: u64) -> GrantTerms {
    GrantTerms {
        grant_id,
        imsi: imsi(),
        model: model.map(str::to_string),
        tokens,
        threshold: tokens / 5,
        offline_allowance: offline,
        final_unit_models: vec![],
        valid_for_s: 3600,
    }
}

/// Applies a planned grant as the store and the agent do: ids for its
/// buckets, the buckets in the ledger, the grant in the cache.
fn apply(c: &mut GrantCache, l: &mut Ledger, seq: u64, t: GrantTerms, now: Now) -> HeldGrant {
    let Some(GrantChange::Grant {
        terms,
        expires_at,
        deadline,
    }) = c.plan(seq, Received::Grant(t), now)
    else {
        panic!("a new grant");
    };
    let id = terms.grant_id * 10;
    let held = HeldGrant {
        offline_bucket_id: (terms.offline_allowance > 0).then_some(id + 1),
        terms,
        bucket_id: id,
        expires_at,
        deadline,
        revoked: false,
    };
    for b in held.buckets() {
        l.insert(b).unwrap();
    }
    c.applied_message(seq, Some(held.clone()));
    held
}

fn take(
    c: &GrantCache,
    l: &mut Ledger,
    model: &str,
    connected: bool,
    tokens: u64,
    now: Now,
) -> Option<u64> {
    l.reserve_from(&imsi(), tokens, tokens, now.wall, &|b| {
        c.admits(b, model, connected, now.mono)
    })
    .ok()
    .map(|r| r.id)
}

#[test]
fn validity_is_the_cores_counted_on_the_monotonic_clock() {
    let (mut c, mut l) = (GrantCache::default(), Ledger::new());
    // The box's wall clock is 5 hours behind the core's: the grant still
    // lasts the hour the core meant, from its arrival.
    let behind = Now {
        wall: NOW - 5 * 3600,
        mono: MONO,
    };
    let g = apply(&mut c, &mut l, 1, terms(7, None, 100, 0), behind);
    assert_eq!(
        (g.expires_at, g.deadline),
        (NOW - 5 * 3600 + 3600, MONO + 3600)
    );
    // NTP steps the wall clock 5 hours forward while the grant is held:
    // nothing moves (the monotonic clock judges).
    let stepped = |s: i64| Now {
        wall: NOW + s,
        mono: MONO + s,
    };
    assert!(take(&c, &mut l, "m", true, 10, stepped(3599)).is_some());
    assert!(take(&c, &mut l, "m", true, 10, stepped(3600)).is_none());
    assert!(c.in_balance(l.bucket(70).unwrap(), MONO + 3599));
    assert!(!c.in_balance(l.bucket(70).unwrap(), MONO + 3600));
}

#[test]
fn a_message_is_applied_once_and_an_old_one_is_refused_by_its_seq() {
    let (mut c, mut l) = (GrantCache::default(), Ledger::new());
    apply(&mut c, &mut l, 1, terms(7, None, 100, 0), at(0));
    assert_eq!(
        c.plan(1, Received::Grant(terms(7, None, 100, 0)), at(0)),
        None
    );
    // A replay under a new seq of a grant held changes nothing either.
    assert_eq!(
        c.plan(2, Received::Grant(terms(7, None, 100, 0)), at(0)),
        Some(GrantChange::Nothing)
    );
    assert_eq!(
        c.plan(2, Received::Unknown, at(0)),
        Some(GrantChange::Nothing)
    );
    c.applied_message(2, None);
    assert_eq!(c.applied(), 2);
    assert_eq!(c.plan(2, Received::Revoked { grant_id: 7 }, at(0)), None);
}

#[test]
fn a_grant_for_one_model_is_not_spent_on_another() {
    let (mut c, mut l) = (GrantCache::default(), Ledger::new());
    apply(&mut c, &mut l, 1, terms(7, Some("a"), 100, 0), at(0));
    assert!(take(&c, &mut l, "b", true, 10, at(0)).is_none());
    assert!(take(&c, &mut l, "a", true, 10, at(0)).is_some());
    assert_eq!(c.grant_of(70), Some(7));
}

#[test]
fn the_offline_allowance_is_spent_only_while_the_core_cannot_be_reached() {
    let (mut c, mut l) = (GrantCache::default(), Ledger::new());
    apply(&mut c, &mut l, 1, terms(7, None, 100, 50), at(0));
    assert!(take(&c, &mut l, "m", true, 100, at(0)).is_some());
    // Connected: the grant is spent, the allowance is not offered.
    assert!(take(&c, &mut l, "m", true, 1, at(0)).is_none());
    // Cut off: 50 more, and no more than that.
    assert!(take(&c, &mut l, "m", false, 50, at(0)).is_some());
    assert!(take(&c, &mut l, "m", false, 1, at(0)).is_none());
    assert_eq!(c.grant_of(71), Some(7));
    assert!(!c.in_balance(l.bucket(71).unwrap(), MONO), "not balance");
}

#[test]
fn a_revoked_grant_admits_nothing_new_and_running_holds_stay() {
    let (mut c, mut l) = (GrantCache::default(), Ledger::new());
    apply(&mut c, &mut l, 1, terms(7, None, 100, 50), at(0));
    let running = take(&c, &mut l, "m", true, 30, at(0)).unwrap();
    let Some(GrantChange::Revoke { grant_id }) =
        c.plan(2, Received::Revoked { grant_id: 7 }, at(0))
    else {
        panic!("a revocation");
    };
    for b in c.revoke(grant_id) {
        l.revoke(b).unwrap();
    }
    c.applied_message(2, None);
    assert!(take(&c, &mut l, "m", true, 1, at(0)).is_none());
    assert!(
        take(&c, &mut l, "m", false, 1, at(0)).is_none(),
        "nor offline"
    );
    // The running request still settles against its hold.
    assert_eq!(l.settle(running, 30).unwrap()[0].bucket_id, 70);
    assert_eq!(c.live(MONO).count(), 0);
    assert_eq!(c.counters().revoked, 1);
    assert!(c.revoke(99).is_empty(), "an unknown grant changes nothing");
}

#[test]
fn the_box_asks_at_the_threshold_once_and_waits_after_a_refusal() {
    let (mut c, mut l) = (GrantCache::default(), Ledger::new());
    // Nothing held: ask.
    assert!(c.should_ask(&imsi(), "m", 0, MONO));
    assert!(
        !c.should_ask(&imsi(), "m", 0, MONO),
        "one question at a time"
    );
    assert!(
        !c.ask_now(&imsi(), "m"),
        "a request waits for the question out"
    );
    apply(&mut c, &mut l, 1, terms(7, None, 100, 0), at(0));
    // The grant answered it; above the threshold (20), no question.
    assert!(!c.should_ask(&imsi(), "m", 21, MONO));
    assert!(c.should_ask(&imsi(), "m", 20, MONO));
    c.answered(&imsi(), "m", true, MONO);
    assert!(!c.should_ask(&imsi(), "m", 0, MONO + ASK_AGAIN_AFTER_REFUSAL_S - 1));
    // A request with nothing to take from asks all the same.
    assert!(c.ask_now(&imsi(), "m"));
    c.answered(&imsi(), "m", false, MONO);
    assert!(c.should_ask(&imsi(), "m", 0, MONO + ASK_AGAIN_AFTER_REFUSAL_S));
    let n = c.counters();
    assert_eq!((n.asked, n.granted, n.refused), (4, 1, 1));
}

#[test]
fn the_boxs_own_packages_are_always_usable() {
    let (c, mut l) = (GrantCache::default(), Ledger::new());
    l.insert(Bucket {
        id: 1,
        imsi: imsi(),
        kind: BucketKind::Trial,
        allowance: 10,
        valid_from: NOW,
        expires_at: NOW + 10,
        used: 0,
        used_period: 0,
        revoked: false,
        models: Vec::new(),
    })
    .unwrap();
    assert!(take(&c, &mut l, "m", true, 10, at(0)).is_some());
    assert!(!c.is_granted(1));
}

#[test]
fn an_offline_allowance_pays_only_for_what_no_grant_can() {
    let (mut c, mut l) = (GrantCache::default(), Ledger::new());
    // A arrived before B (the top-up asked at the threshold comes later).
    apply(&mut c, &mut l, 1, terms(7, None, 100, 50), at(0));
    apply(&mut c, &mut l, 2, terms(8, None, 100, 50), at(60));
    let r = l
        .reserve_from(&imsi(), 150, 150, NOW + 60, &|b| {
            c.admits(b, "m", false, MONO + 60)
        })
        .unwrap();
    assert_eq!(
        r.holds
            .iter()
            .map(|h| (h.bucket_id, h.tokens))
            .collect::<Vec<_>>(),
        vec![(70, 100), (80, 50)],
        "B's tokens before A's offline allowance"
    );
}
