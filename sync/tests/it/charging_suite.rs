//! The core's packages and grants (issue 23) in its store: one suite, both
//! stores, as `store_suite`. The rules themselves are tested in
//! `mec_metering::charging`; these check that the store keeps them: state
//! saved and loaded across operations and handles, settlements once, and
//! two instances judged one after the other.

use mec_metering::charging::{ChargingError, GrantPolicy, PackageSpec, Settlement, Usage};
use mec_metering::{BucketKind, Imsi};
use mec_sync::charging_store::ChargingStoreError;

/// 2026-01-15T00:00:00Z, in seconds.
const T0: i64 = 1_768_435_200;
const DAY: i64 = 86_400;

use crate::common::stores::{on_both_stores, Backend};

on_both_stores!(
    "charging_":
    a_package_sold_at_the_core_is_granted_settled_and_returned,
    a_sale_retried_is_one_sale_and_a_refused_operation_saves_nothing,
    two_instances_granting_at_once_never_hold_more_than_the_balance,
    revocation_and_expiry_are_kept,
    downlink_messages_are_numbered_per_node_without_gaps,
    a_months_bill_shows_purchases_grants_and_use_per_box_and_model,
);

fn imsi(n: u32) -> Imsi {
    Imsi::parse(&format!("00101{n:010}")).unwrap()
}

fn topup(allowance: u64) -> PackageSpec {
    PackageSpec {
        kind: BucketKind::Topup,
        allowance,
        valid_from: T0 - DAY,
        expires_at: T0 + 90 * DAY,
        tier: "basic".into(),
        models: vec!["smollm2".into()],
    }
}

fn usage(node: &str, seq: u64, who: &Imsi, grant: Option<u64>, tokens: u64) -> Usage {
    Usage {
        node_id: node.into(),
        seq,
        imsi: who.clone(),
        grants: grant.map(|g| vec![(g, tokens)]).unwrap_or_default(),
        model: Some("smollm2".into()),
        tokens,
        ended_ms: 0,
    }
}

fn a_package_sold_at_the_core_is_granted_settled_and_returned(b: Backend) {
    let a = imsi(1);
    let policy = GrantPolicy {
        slice: 600,
        ..GrantPolicy::default()
    };
    let g = {
        let s = b.open_charging();
        assert!(s
            .sell("bss-1", &a, &topup(1_000), "topup 1_000", T0)
            .unwrap());
        s.grant("box-1", &a, Some("smollm2"), 0, &policy, T0)
            .unwrap()
    };
    assert_eq!(
        (g.tokens, g.expires_at, g.threshold),
        (600, T0 + 3_600, 120)
    );
    // Reopened (a restart, or another instance): the grant holds its tokens.
    let s = b.open_charging();
    let acct = s.account(&a, T0).unwrap();
    assert_eq!((acct.remaining, acct.granted), (400, 600));
    let records = [
        usage("box-1", 1, &a, Some(g.id), 250),
        usage("box-1", 2, &a, Some(g.id), 500),
    ];
    assert_eq!(
        s.settle(&records, T0 + 60).unwrap(),
        vec![
            Some(Settlement {
                from_grant: 250,
                from_balance: 0,
                overage: 0
            }),
            Some(Settlement {
                from_grant: 350,
                from_balance: 150,
                overage: 0
            }),
        ]
    );
    // Resent by the box, or seen by another instance: settled once.
    let again = b.open_charging().settle(&records, T0 + 120).unwrap();
    assert_eq!(again, vec![None, None]);
    assert_eq!(s.return_grant("box-1", &a, g.id, T0 + 180).unwrap(), 0);
    let acct = b.open_charging().account(&a, T0 + 180).unwrap();
    assert_eq!(
        (acct.remaining, acct.granted, acct.used, acct.overage),
        (250, 0, 750, 0)
    );
    assert!(matches!(
        s.return_grant("box-1", &a, g.id, T0 + 200),
        Err(ChargingStoreError::Refused(
            ChargingError::UnknownGrant { .. }
        ))
    ));
}

fn a_sale_retried_is_one_sale_and_a_refused_operation_saves_nothing(b: Backend) {
    let s = b.open_charging();
    let (a, other) = (imsi(1), imsi(2));
    assert!(s.sell("bss-7", &a, &topup(500), "topup 500", T0).unwrap());
    assert!(
        !b.open_charging()
            .sell("bss-7", &a, &topup(500), "topup 500", T0)
            .unwrap(),
        "the retry"
    );
    for refused in [
        s.sell("bss-7", &a, &topup(900), "topup 900", T0),
        s.sell("bss-7", &other, &topup(500), "topup 500", T0),
    ] {
        assert!(
            matches!(
                refused,
                Err(ChargingStoreError::Refused(ChargingError::IdConflict(_)))
            ),
            "{refused:?}"
        );
    }
    // Two sales of one id for two subscribers racing past the owner check:
    // the second's save finds the id taken and is refused, the first's
    // package untouched.
    let mut sold_again = None;
    let raced = s.with_subscriber(&other, &[], T0, &mut |c, _| {
        sold_again = Some(c.sell("bss-7", &other, topup(500), "topup 500")?);
        Ok(())
    });
    assert_eq!(
        sold_again,
        Some(true),
        "the other subscriber's state knew no bss-7"
    );
    assert!(
        matches!(
            raced,
            Err(ChargingStoreError::Refused(ChargingError::IdConflict(_)))
        ),
        "{raced:?}"
    );
    assert_eq!(s.account(&a, T0).unwrap().remaining, 500);
    assert!(matches!(
        s.account(&other, T0),
        Err(ChargingStoreError::Refused(
            ChargingError::UnknownSubscriber(_)
        ))
    ));
    assert!(matches!(
        s.grant(
            "box-1",
            &other,
            Some("smollm2"),
            0,
            &GrantPolicy::default(),
            T0
        ),
        Err(ChargingStoreError::Refused(
            ChargingError::UnknownSubscriber(_)
        ))
    ));
    // A grant the rules refuse leaves no trace.
    let p = GrantPolicy::default();
    s.grant("box-1", &a, Some("smollm2"), 500, &p, T0).unwrap();
    assert!(matches!(
        s.grant("box-2", &a, Some("smollm2"), 1, &p, T0),
        Err(ChargingStoreError::Refused(
            ChargingError::InsufficientQuota { .. }
        ))
    ));
    let acct = b.open_charging().account(&a, T0).unwrap();
    assert_eq!((acct.remaining, acct.granted), (0, 500));
}

/// Two instances (two handles on one store) hand out grants for one
/// subscriber as fast as they can, from two threads: what they granted in
/// all never exceeds what was sold, and the store holds exactly that.
fn two_instances_granting_at_once_never_hold_more_than_the_balance(b: Backend) {
    let a = imsi(3);
    b.open_charging()
        .sell("bss-9", &a, &topup(10_000), "topup 10_000", T0)
        .unwrap();
    let policy = GrantPolicy {
        slice: 700,
        ..GrantPolicy::default()
    };
    let granted: Vec<u64> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..2)
            .map(|i| {
                let s = b.open_charging();
                let (a, policy) = (a.clone(), policy.clone());
                scope.spawn(move || {
                    let mut mine = Vec::new();
                    for _ in 0..20 {
                        match s.grant(&format!("box-{i}"), &a, Some("smollm2"), 0, &policy, T0) {
                            Ok(g) => mine.push(g.tokens),
                            Err(ChargingStoreError::Refused(
                                ChargingError::InsufficientQuota { .. },
                            )) => break,
                            Err(e) => panic!("{e}"),
                        }
                    }
                    mine
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    assert_eq!(granted.iter().sum::<u64>(), 10_000, "{granted:?}");
    assert_eq!(granted.len(), 15, "14 slices of 700 and the last 200");
    let acct = b.open_charging().account(&a, T0).unwrap();
    assert_eq!((acct.remaining, acct.granted), (0, 10_000));
}

fn revocation_and_expiry_are_kept(b: Backend) {
    let s = b.open_charging();
    let a = imsi(4);
    s.sell("p1", &a, &topup(300), "topup 300", T0).unwrap();
    s.sell("p2", &a, &topup(300), "topup 300", T0).unwrap();
    let policy = GrantPolicy {
        slice: 200,
        validity_s: 600,
        return_grace_s: 600,
        ..GrantPolicy::default()
    };
    let g1 = s
        .grant("box-1", &a, Some("smollm2"), 0, &policy, T0)
        .unwrap();
    let g2 = s
        .grant("box-2", &a, Some("smollm2"), 0, &policy, T0 + 100)
        .unwrap();
    let hit = b.open_charging().revoke("p1", T0 + 200).unwrap();
    let mut ids: Vec<u64> = hit.iter().map(|g| g.id).collect();
    ids.sort();
    assert_eq!(
        ids,
        vec![g1.id, g2.id],
        "g2 holds p1's last 100 and 100 of p2"
    );
    assert!(matches!(
        s.revoke("nope", T0),
        Err(ChargingStoreError::Refused(ChargingError::UnknownPackage(
            _
        )))
    ));
    // g1's box settles a running request, then the grace runs out for both.
    s.settle(&[usage("box-1", 1, &a, Some(g1.id), 50)], T0 + 300)
        .unwrap();
    assert!(s.expire(&policy, T0 + 1_199).unwrap().is_empty());
    let ended = b.open_charging().expire(&policy, T0 + 1_250).unwrap();
    assert_eq!(ended.iter().map(|g| g.id).collect::<Vec<_>>(), vec![g1.id]);
    let ended = s.expire(&policy, T0 + 1_300).unwrap();
    assert_eq!(ended.iter().map(|g| g.id).collect::<Vec<_>>(), vec![g2.id]);
    // p1 is revoked: only what p2 has left can be granted.
    let acct = s.account(&a, T0 + 1_400).unwrap();
    assert_eq!((acct.remaining, acct.granted, acct.used), (300, 0, 50));
    let g3 = s
        .grant("box-3", &a, Some("smollm2"), 1_000, &policy, T0 + 1_400)
        .unwrap();
    assert_eq!(g3.tokens, 300);
}

/// Grants made for a box by two instances at once, then a revocation: the
/// box's downlink holds each as one message, numbered 1, 2, ... without a
/// gap or a repeat, grants before the revocations of the same grants; read
/// from any handle, from any acknowledged seq.
fn downlink_messages_are_numbered_per_node_without_gaps(b: Backend) {
    use mec_sync::wire::pb::downlink;
    let a = imsi(5);
    b.open_charging()
        .sell("bss-5", &a, &topup(10_000), "topup 10_000", T0)
        .unwrap();
    let policy = GrantPolicy::default();
    let ids: Vec<u64> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..2)
            .map(|_| {
                let (s, a, policy) = (b.open_charging(), a.clone(), policy.clone());
                scope.spawn(move || {
                    (0..10)
                        .map(|i| {
                            s.grant_answering(i + 1, "box-1", &a, Some("smollm2"), 100, &policy, T0)
                                .unwrap()
                                .id
                        })
                        .collect::<Vec<u64>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    assert_eq!(ids.len(), 20);
    let s = b.open_charging();
    assert_eq!(s.revoke("bss-5", T0 + 1).unwrap().len(), 20);
    let all = s.downlink_after("box-1", 0, 100).unwrap();
    assert_eq!(
        all.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (1..=40).collect::<Vec<u64>>()
    );
    let granted: std::collections::BTreeSet<u64> = all[..20]
        .iter()
        .map(|m| match &m.kind {
            Some(downlink::Kind::Grant(g)) => g.grant_id,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(granted, ids.iter().copied().collect());
    assert!(all[20..]
        .iter()
        .all(|m| matches!(m.kind, Some(downlink::Kind::Revoked(_)))));
    s.downlink_applied("box-1", 35).unwrap();
    let rest = b.open_charging().downlink_after("box-1", 35, 100).unwrap();
    assert_eq!(
        rest.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![36, 37, 38, 39, 40]
    );
    // What was acknowledged is gone from the outbox; an acknowledgement
    // beyond the last made counts only up to it.
    assert_eq!(s.downlink_after("box-1", 0, 100).unwrap().len(), 5);
    s.downlink_applied("box-1", 1_000).unwrap();
    assert!(s.downlink_after("box-1", 0, 100).unwrap().is_empty());
    assert_eq!(s.downlink_last("box-1").unwrap(), 40);
    assert!(s.downlink_after("box-2", 0, 100).unwrap().is_empty());
}

fn a_months_bill_shows_purchases_grants_and_use_per_box_and_model(b: Backend) {
    let s = b.open_charging();
    let (a, stranger) = (imsi(1), imsi(9));
    let jan_1_ms = (T0 - 14 * DAY) * 1000;
    let feb_1_ms = (T0 + 17 * DAY) * 1000;
    let policy = GrantPolicy {
        slice: 300,
        ..GrantPolicy::default()
    };
    s.sell("bss-1", &a, &topup(1_000), "topup 1_000", T0)
        .unwrap();
    s.sell("bss-2", &a, &topup(500), "topup 500", T0 + DAY)
        .unwrap();
    let g1 = s
        .grant("box-1", &a, Some("smollm2"), 0, &policy, T0)
        .unwrap();
    let g2 = s
        .grant("box-2", &a, Some("smollm2"), 0, &policy, T0)
        .unwrap();
    let mut used = vec![
        usage("box-1", 1, &a, Some(g1.id), 100),
        usage("box-1", 2, &a, Some(g1.id), 50),
        usage("box-2", 1, &a, Some(g2.id), 70),
        // The stranger holds no package: all of it is overage.
        usage("box-2", 2, &stranger, None, 40),
        // Served in February: on next month's bill.
        usage("box-1", 3, &a, Some(g1.id), 10),
    ];
    for (i, u) in used.iter_mut().enumerate() {
        u.ended_ms = if i == 4 {
            feb_1_ms + 5
        } else {
            jan_1_ms + 1000 * i as i64
        };
    }
    used[1].model = Some("other".into());
    s.settle(&used, T0 + 60).unwrap();

    let bill = b
        .open_charging()
        .bill(&a, jan_1_ms, feb_1_ms, T0 + 120)
        .unwrap();
    assert_eq!(
        bill.packages
            .iter()
            .map(|p| p.id.as_str())
            .collect::<Vec<_>>(),
        ["bss-1", "bss-2"]
    );
    assert_eq!(bill.tokens_bought, 1_500);
    assert_eq!(
        bill.granted
            .iter()
            .map(|g| (g.node_id.as_str(), g.grants, g.tokens))
            .collect::<Vec<_>>(),
        [("box-1", 1, 300), ("box-2", 1, 300)]
    );
    assert_eq!(
        bill.used
            .iter()
            .map(|u| (u.node_id.as_str(), u.model.as_str(), u.records, u.tokens))
            .collect::<Vec<_>>(),
        [
            ("box-1", "other", 1, 50),
            ("box-1", "smollm2", 1, 100),
            ("box-2", "smollm2", 1, 70)
        ]
    );
    assert_eq!((bill.tokens_used, bill.overage), (220, 0));
    // What is left counts February's use too (it is left now).
    assert_eq!(bill.remaining, 1_500 - 230);

    let stranger_bill = s.bill(&stranger, jan_1_ms, feb_1_ms, T0 + 120).unwrap();
    assert_eq!(
        (
            stranger_bill.tokens_used,
            stranger_bill.overage,
            stranger_bill.remaining
        ),
        (0, 40, 0)
    );
    assert_eq!(
        s.subscribers_billed(jan_1_ms, feb_1_ms).unwrap(),
        vec![a.clone(), stranger]
    );
    assert_eq!(
        s.subscribers_billed(feb_1_ms, feb_1_ms + 30 * DAY * 1000)
            .unwrap(),
        vec![a]
    );
}
