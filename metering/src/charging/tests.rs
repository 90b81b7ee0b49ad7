use super::*;

const DAY: i64 = 86_400;
/// 2026-01-15T00:00:00Z.
const T0: i64 = 1_768_435_200;

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
        models: vec![],
    }
}

/// 2026-01-01T00:00:00Z and 2026-02-01T00:00:00Z.
const JAN_1: i64 = 1_767_225_600;
const FEB_1: i64 = 1_769_904_000;

/// A monthly package valid a year from Jan 1 (January's tokens end Feb 1).
fn monthly_from_jan_1(allowance: u64) -> PackageSpec {
    PackageSpec {
        kind: BucketKind::Monthly,
        allowance,
        valid_from: JAN_1,
        expires_at: JAN_1 + 365 * DAY,
        tier: "pro".into(),
        models: vec![],
    }
}

fn usage(node: &str, seq: u64, who: &Imsi, grant: Option<u64>, tokens: u64) -> Usage {
    Usage {
        node_id: node.into(),
        seq,
        imsi: who.clone(),
        grants: grant.map(|g| vec![(g, tokens)]).unwrap_or_default(),
        model: None,
        tokens,
        ended_ms: 0,
    }
}

/// A sale whose request is its spec (as a BSS sending explicit times).
fn sold(c: &mut Charging, id: &str, who: &Imsi, spec: PackageSpec) -> Result<bool, ChargingError> {
    let request = format!("{spec:?}");
    c.sell(id, who, spec, &request)
}

#[test]
fn a_sale_is_idempotent_by_its_id_and_an_id_reused_for_another_package_is_refused() {
    let mut c = Charging::new();
    let a = imsi(1);
    assert_eq!(sold(&mut c, "bss-1", &a, topup(1_000)), Ok(true));
    assert_eq!(sold(&mut c, "bss-1", &a, topup(1_000)), Ok(false));
    assert_eq!(c.account(&a, T0).remaining, 1_000, "sold once");
    assert_eq!(
        sold(&mut c, "bss-1", &a, topup(2_000)),
        Err(ChargingError::IdConflict("bss-1".into()))
    );
    assert_eq!(
        sold(&mut c, "bss-1", &imsi(2), topup(1_000)),
        Err(ChargingError::IdConflict("bss-1".into()))
    );
    assert!(matches!(
        sold(&mut c, "bss-2", &a, topup(0)),
        Err(ChargingError::BadPackage(_))
    ));
}

#[test]
fn two_boxes_asking_at_once_never_hold_more_than_the_balance() {
    let mut c = Charging::new();
    let a = imsi(1);
    sold(&mut c, "p", &a, topup(1_000)).unwrap();
    let policy = GrantPolicy {
        slice: 700,
        ..GrantPolicy::default()
    };
    let g1 = c.grant("box-1", &a, None, 0, &policy, T0).unwrap();
    let g2 = c.grant("box-2", &a, None, 0, &policy, T0).unwrap();
    assert_eq!((g1.tokens, g2.tokens), (700, 300));
    assert_eq!(
        c.grant("box-3", &a, None, 0, &policy, T0),
        Err(ChargingError::InsufficientQuota {
            imsi: a.to_string(),
            model: None
        })
    );
    let acct = c.account(&a, T0);
    assert_eq!((acct.remaining, acct.granted), (0, 1_000));
    assert_eq!(g1.threshold, 140);
    assert_eq!(g1.expires_at, T0 + 3_600);
    assert!(matches!(
        c.grant("box-1", &imsi(9), None, 0, &policy, T0),
        Err(ChargingError::UnknownSubscriber(_))
    ));
}

#[test]
fn usage_settles_once_from_its_grant_then_the_balance_then_as_overage() {
    let mut c = Charging::new();
    let a = imsi(1);
    sold(&mut c, "p", &a, topup(1_000)).unwrap();
    let policy = GrantPolicy {
        slice: 400,
        offline_allowance: 500,
        ..GrantPolicy::default()
    };
    let g = c.grant("box-1", &a, None, 0, &policy, T0).unwrap();
    let first = usage("box-1", 1, &a, Some(g.id), 300);
    assert_eq!(
        c.settle(&first, T0),
        Some(Settlement {
            from_grant: 300,
            from_balance: 0,
            overage: 0
        })
    );
    assert_eq!(c.settle(&first, T0), None, "a resent record settles once");
    // Offline beyond the grant: 100 from it, 600 from the balance, 300 over.
    assert_eq!(
        c.settle(&usage("box-1", 2, &a, Some(g.id), 1_000), T0),
        Some(Settlement {
            from_grant: 100,
            from_balance: 600,
            overage: 300
        })
    );
    let acct = c.account(&a, T0);
    assert_eq!(
        (acct.remaining, acct.granted, acct.used, acct.overage),
        (0, 0, 1_000, 300)
    );
    assert_eq!(c.open_grant(g.id).unwrap().used, 400);
    // The same seq from another box is another record.
    assert_eq!(
        c.settle(&usage("box-2", 1, &a, None, 5), T0),
        Some(Settlement {
            from_grant: 0,
            from_balance: 0,
            overage: 5
        })
    );
}

#[test]
fn a_record_naming_another_boxs_grant_is_settled_from_the_balance() {
    let mut c = Charging::new();
    let a = imsi(1);
    sold(&mut c, "p", &a, topup(1_000)).unwrap();
    let g = c
        .grant("box-1", &a, None, 100, &GrantPolicy::default(), T0)
        .unwrap();
    assert_eq!(
        c.settle(&usage("box-2", 1, &a, Some(g.id), 50), T0),
        Some(Settlement {
            from_grant: 0,
            from_balance: 50,
            overage: 0
        })
    );
    assert_eq!(c.open_grant(g.id).unwrap().used, 0);
}

#[test]
fn a_returned_or_long_expired_grant_gives_back_what_it_held() {
    let mut c = Charging::new();
    let a = imsi(1);
    sold(&mut c, "p", &a, topup(1_000)).unwrap();
    let policy = GrantPolicy {
        slice: 300,
        validity_s: 600,
        return_grace_s: 3_600,
        ..GrantPolicy::default()
    };
    let g1 = c.grant("box-1", &a, None, 0, &policy, T0).unwrap();
    let g2 = c.grant("box-2", &a, None, 0, &policy, T0).unwrap();
    c.settle(&usage("box-1", 1, &a, Some(g1.id), 100), T0)
        .unwrap();
    assert!(c.return_grant("box-2", g1.id).is_err(), "not box-2's grant");
    assert_eq!(c.return_grant("box-1", g1.id), Ok(200));
    assert_eq!(c.account(&a, T0).remaining, 1_000 - 100 - 300);
    // Expired, but within the grace: still held.
    assert!(c.expire(&policy, T0 + 600 + 3_599).is_empty());
    let ended = c.expire(&policy, T0 + 600 + 3_600);
    assert_eq!(ended.iter().map(|g| g.id).collect::<Vec<_>>(), vec![g2.id]);
    let acct = c.account(&a, T0 + 600 + 3_600);
    assert_eq!((acct.remaining, acct.granted, acct.used), (900, 0, 100));
    // A late record of the ended grant settles from the balance.
    assert_eq!(
        c.settle(&usage("box-2", 1, &a, Some(g2.id), 50), T0 + 5_000),
        Some(Settlement {
            from_grant: 0,
            from_balance: 50,
            overage: 0
        })
    );
}

#[test]
fn a_monthly_packages_grant_ends_with_the_month() {
    let mut c = Charging::new();
    let a = imsi(1);
    sold(&mut c, "m", &a, monthly_from_jan_1(10_000)).unwrap();
    let policy = GrantPolicy {
        validity_s: 7 * DAY,
        ..GrantPolicy::default()
    };
    let g = c
        .grant("box-1", &a, None, 4_000, &policy, FEB_1 - 3_600)
        .unwrap();
    assert_eq!(g.expires_at, FEB_1);
    let g = c.grant("box-1", &a, None, 4_000, &policy, FEB_1).unwrap();
    assert_eq!(g.expires_at, FEB_1 + 7 * DAY);
}

#[test]
fn revoking_a_package_names_the_grants_holding_it_and_stops_new_ones() {
    let mut c = Charging::new();
    let a = imsi(1);
    sold(&mut c, "p1", &a, topup(500)).unwrap();
    sold(&mut c, "p2", &a, topup(500)).unwrap();
    let policy = GrantPolicy::default();
    let g1 = c.grant("box-1", &a, None, 400, &policy, T0).unwrap();
    let g2 = c.grant("box-2", &a, None, 100, &policy, T0).unwrap();
    let hit = c.revoke("p1").unwrap();
    let mut named: Vec<u64> = hit.iter().map(|g| g.id).collect();
    named.sort();
    assert_eq!(named, vec![g1.id, g2.id], "both hold p1's tokens");
    assert!(c.open_grant(g1.id).unwrap().revoked);
    // Running requests still settle against the revoked grant.
    assert_eq!(
        c.settle(&usage("box-1", 1, &a, Some(g1.id), 50), T0),
        Some(Settlement {
            from_grant: 50,
            from_balance: 0,
            overage: 0
        })
    );
    // New grants come only from p2.
    let g3 = c.grant("box-3", &a, None, 1_000, &policy, T0).unwrap();
    assert_eq!(g3.tokens, 500);
    assert!(!c.revoke("p2").unwrap().is_empty());
    assert!(matches!(
        c.grant("box-3", &a, None, 0, &policy, T0),
        Err(ChargingError::InsufficientQuota { .. })
    ));
    assert_eq!(
        c.revoke("nope"),
        Err(ChargingError::UnknownPackage("nope".into()))
    );
}

#[test]
fn a_grant_for_a_model_takes_only_the_packages_that_allow_it() {
    let mut c = Charging::new();
    let a = imsi(1);
    sold(
        &mut c,
        "flagship-only",
        &a,
        PackageSpec {
            models: vec!["big".into()],
            ..topup(300)
        },
    )
    .unwrap();
    sold(&mut c, "any", &a, topup(200)).unwrap();
    let policy = GrantPolicy::default();
    assert_eq!(
        c.grant("b", &a, Some("big"), 1_000, &policy, T0)
            .unwrap()
            .tokens,
        500
    );
    sold(&mut c, "any-2", &a, topup(100)).unwrap();
    sold(
        &mut c,
        "big-2",
        &a,
        PackageSpec {
            models: vec!["big".into()],
            ..topup(100)
        },
    )
    .unwrap();
    // A model-less grant never takes a package that names models.
    assert_eq!(
        c.grant("b", &a, None, 1_000, &policy, T0).unwrap().tokens,
        100
    );
    assert_eq!(
        c.grant("b", &a, Some("small"), 1_000, &policy, T0),
        Err(ChargingError::InsufficientQuota {
            imsi: a.to_string(),
            model: Some("small".into())
        })
    );
}

#[test]
fn last_months_open_grant_takes_nothing_from_the_new_month() {
    let mut c = Charging::new();
    let a = imsi(1);
    sold(&mut c, "m", &a, monthly_from_jan_1(10_000)).unwrap();
    let policy = GrantPolicy::default();
    // All of January's tokens, granted a minute before the month ends and
    // not yet returned (the box may upload its records later).
    let jan = c
        .grant("box-1", &a, None, 10_000, &policy, FEB_1 - 60)
        .unwrap();
    assert_eq!((jan.tokens, jan.expires_at), (10_000, FEB_1));
    let acct = c.account(&a, FEB_1);
    assert_eq!(acct.remaining, 10_000, "February's allowance is whole");
    let feb = c.grant("box-1", &a, None, 10_000, &policy, FEB_1).unwrap();
    assert_eq!(feb.tokens, 10_000);
    // January's record settles against January's grant, in January's month.
    let s = c
        .settle(&usage("box-1", 1, &a, Some(jan.id), 4_000), FEB_1 + 60)
        .unwrap();
    assert_eq!((s.from_grant, s.overage), (4_000, 0));
    assert_eq!(
        c.account(&a, FEB_1 + 60).remaining,
        0,
        "February is all granted"
    );
}

#[test]
fn usage_beyond_a_grant_is_taken_only_from_packages_for_its_model() {
    let mut c = Charging::new();
    let a = imsi(1);
    sold(
        &mut c,
        "big-only",
        &a,
        PackageSpec {
            models: vec!["big".into()],
            ..topup(500)
        },
    )
    .unwrap();
    let small = Usage {
        model: Some("small".into()),
        ..usage("box-1", 1, &a, None, 100)
    };
    assert_eq!(
        c.settle(&small, T0),
        Some(Settlement {
            from_grant: 0,
            from_balance: 0,
            overage: 100
        })
    );
    let big = Usage {
        model: Some("big".into()),
        ..usage("box-1", 2, &a, None, 100)
    };
    assert_eq!(
        c.settle(&big, T0),
        Some(Settlement {
            from_grant: 0,
            from_balance: 100,
            overage: 0
        })
    );
    assert_eq!(c.account(&a, T0).remaining, 400);
}

#[test]
fn a_revoked_packages_holds_take_nothing_from_the_balance_shown() {
    let mut c = Charging::new();
    let a = imsi(1);
    sold(&mut c, "p1", &a, topup(300)).unwrap();
    sold(&mut c, "p2", &a, topup(300)).unwrap();
    let policy = GrantPolicy::default();
    c.grant("box-1", &a, None, 300, &policy, T0).unwrap();
    c.revoke("p1").unwrap();
    let acct = c.account(&a, T0);
    assert_eq!((acct.remaining, acct.granted), (300, 300));
    let shown: Vec<(&str, bool, u64, u64)> = acct
        .packages
        .iter()
        .map(|p| (p.id.as_str(), p.active, p.remaining, p.granted))
        .collect();
    assert_eq!(shown, vec![("p1", false, 0, 300), ("p2", true, 300, 0)]);
    assert_eq!(
        c.grant("box-2", &a, None, 1_000, &policy, T0)
            .unwrap()
            .tokens,
        300
    );
}

#[test]
fn a_retried_sale_is_judged_by_its_request_not_the_times_it_was_given() {
    let mut c = Charging::new();
    let a = imsi(1);
    let request = r#"{"kind":"topup","tokens":1000,"days":30,"from":null}"#;
    let first = PackageSpec {
        valid_from: T0,
        expires_at: T0 + 30 * DAY,
        ..topup(1_000)
    };
    // The retry a second later: "from now" is another second.
    let retry = PackageSpec {
        valid_from: T0 + 1,
        expires_at: T0 + 1 + 30 * DAY,
        ..topup(1_000)
    };
    assert_eq!(c.sell("bss-1", &a, first, request), Ok(true));
    assert_eq!(c.sell("bss-1", &a, retry.clone(), request), Ok(false));
    assert_eq!(c.account(&a, T0 + 1).remaining, 1_000);
    assert_eq!(
        c.sell("bss-1", &a, retry, r#"{"kind":"topup","tokens":2000}"#),
        Err(ChargingError::IdConflict("bss-1".into()))
    );
    assert!(matches!(
        sold(&mut c, "bss-2", &a, topup(u64::MAX)),
        Err(ChargingError::BadPackage(_))
    ));
}

mod model {
    //! The charging function against a simple model of the balance: per
    //! subscriber, what was sold, what is used, what open grants hold and
    //! what went over. Top-ups only (no month changes), no revocation: the
    //! arithmetic of grants and settlements on its own.
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Sell {
            sub: u8,
            id: u8,
            allowance: u64,
        },
        Grant {
            node: u8,
            sub: u8,
            wanted: u64,
        },
        Use {
            grant: u8,
            tokens: u64,
            resend: bool,
        },
        Return {
            grant: u8,
        },
        Expire,
        /// The store's round trip: each subscriber's state saved and
        /// loaded into a new `Charging`, as every operation of the core does.
        Reload,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..3, 0u8..6, 1u64..2_000).prop_map(|(sub, id, allowance)| Op::Sell {
                sub,
                id,
                allowance
            }),
            (0u8..3, 0u8..3, 0u64..900).prop_map(|(node, sub, wanted)| Op::Grant {
                node,
                sub,
                wanted
            }),
            (0u8..12, 0u64..700, any::<bool>()).prop_map(|(grant, tokens, resend)| Op::Use {
                grant,
                tokens,
                resend
            }),
            (0u8..12).prop_map(|grant| Op::Return { grant }),
            Just(Op::Expire),
            Just(Op::Reload),
        ]
    }

    #[derive(Default, Debug)]
    struct Sub {
        sold: u64,
        used: u64,
        over: u64,
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn grants_and_settlements_keep_the_balance(ops in proptest::collection::vec(op(), 1..80)) {
            let mut c = Charging::new();
            let policy = GrantPolicy { slice: 250, validity_s: 600, return_grace_s: 600, ..GrantPolicy::default() };
            let mut subs: HashMap<u8, Sub> = HashMap::new();
            // Model of each grant: (node, sub, tokens left, open).
            let mut grants: Vec<(u64, String, u8, u64, bool)> = Vec::new();
            let mut sales: HashMap<u8, (u8, u64)> = HashMap::new();
            let mut last_seq: HashMap<String, u64> = HashMap::new();
            let mut now = T0;
            for op in ops {
                match op {
                    Op::Sell { sub, id, allowance } => {
                        let r = sold(&mut c, &format!("p{id}"), &imsi(sub.into()), topup(allowance));
                        match sales.get(&id) {
                            None => {
                                prop_assert_eq!(r, Ok(true));
                                sales.insert(id, (sub, allowance));
                                subs.entry(sub).or_default().sold += allowance;
                            }
                            Some(&(s, a)) if s == sub && a == allowance => prop_assert_eq!(r, Ok(false)),
                            Some(_) => prop_assert!(matches!(r, Err(ChargingError::IdConflict(_)))),
                        }
                    }
                    Op::Grant { node, sub, wanted } => {
                        let node = format!("box-{node}");
                        let r = c.grant(&node, &imsi(sub.into()), None, wanted, &policy, now);
                        let s = subs.entry(sub).or_default();
                        let held: u64 = grants.iter().filter(|g| g.2 == sub && g.4).map(|g| g.3).sum();
                        let free = s.sold.saturating_sub(s.used + held);
                        let want = if wanted == 0 { policy.slice } else { wanted };
                        match r {
                            Ok(g) => {
                                prop_assert_eq!(g.tokens, want.min(free));
                                grants.push((g.id, node, sub, g.tokens, true));
                            }
                            Err(ChargingError::UnknownSubscriber(_)) => prop_assert_eq!(s.sold, 0),
                            Err(e) => {
                                prop_assert!(s.sold > 0 && free == 0, "{e}");
                            }
                        }
                    }
                    Op::Use { grant, tokens, resend } => {
                        let Some(g) = grants.get_mut(grant as usize) else { continue };
                        let seq = last_seq.entry(g.1.clone()).or_default();
                        if !resend || *seq == 0 {
                            *seq += 1;
                        }
                        let u = usage(&g.1, *seq, &imsi(g.2.into()), Some(g.0), tokens);
                        let r = c.settle(&u, now);
                        if resend && r.is_none() {
                            continue;
                        }
                        let r = r.expect("a new seq settles");
                        let from_grant = if g.4 { tokens.min(g.3) } else { 0 };
                        if g.4 {
                            g.3 -= from_grant;
                        }
                        let sub = g.2;
                        let held: u64 = grants.iter().filter(|g| g.2 == sub && g.4).map(|g| g.3).sum();
                        let s = subs.entry(sub).or_default();
                        let free = s.sold.saturating_sub(s.used + from_grant + held);
                        let from_balance = (tokens - from_grant).min(free);
                        prop_assert_eq!(r, Settlement { from_grant, from_balance, overage: tokens - from_grant - from_balance });
                        s.used += from_grant + from_balance;
                        s.over += tokens - from_grant - from_balance;
                    }
                    Op::Return { grant } => {
                        let Some(g) = grants.get_mut(grant as usize) else { continue };
                        let r = c.return_grant(&g.1, g.0);
                        if g.4 {
                            prop_assert_eq!(r, Ok(g.3));
                            g.4 = false;
                        } else {
                            prop_assert!(r.is_err());
                        }
                    }
                    Op::Reload => {
                        let mut fresh = Charging::new();
                        fresh.reserve_ids(c.next_bucket + 1, c.next_grant + 1);
                        for sub in 0u8..3 {
                            let who = imsi(sub.into());
                            let state = c.state(&who);
                            fresh.restore(&who, state.clone()).unwrap();
                            prop_assert_eq!(fresh.state(&who), state);
                        }
                        // What was settled is the store's unique key.
                        fresh.settled = c.settled.clone();
                        c = fresh;
                    }
                    Op::Expire => {
                        now += 1_200;
                        // Every open grant was made at least 1,200 s ago:
                        // past its 600 s validity and 600 s of grace.
                        let ended: HashSet<u64> = c.expire(&policy, now).iter().map(|g| g.id).collect();
                        let open: HashSet<u64> = grants.iter().filter(|g| g.4).map(|g| g.0).collect();
                        prop_assert_eq!(ended, open);
                        for g in grants.iter_mut() {
                            g.4 = false;
                        }
                    }
                }
                for (&sub, s) in &subs {
                    let held: u64 = grants.iter().filter(|g| g.2 == sub && g.4).map(|g| g.3).sum();
                    let a = c.account(&imsi(sub.into()), now);
                    prop_assert!(s.used + held <= s.sold, "held beyond the balance");
                    prop_assert_eq!(
                        (a.remaining, a.granted, a.used, a.overage),
                        (s.sold - s.used - held, held, s.used, s.over)
                    );
                }
            }
        }
    }
}

mod months {
    //! A monthly package across month ends: whatever boxes ask, use and
    //! give back, and whenever the month turns, no month's tokens are
    //! held or used beyond its allowance, and a month starts whole but for
    //! what its own grants hold.
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Grant { node: u8, wanted: u64 },
        Use { grant: u8, percent: u8 },
        Return { grant: u8 },
        Later { hours: u16 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..3, 1u64..6_000).prop_map(|(node, wanted)| Op::Grant { node, wanted }),
            (0u8..10, 0u8..=100).prop_map(|(grant, percent)| Op::Use { grant, percent }),
            (0u8..10).prop_map(|grant| Op::Return { grant }),
            (1u16..400).prop_map(|hours| Op::Later { hours }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn no_month_is_held_or_used_beyond_its_allowance(ops in proptest::collection::vec(op(), 1..60)) {
            const ALLOWANCE: u64 = 10_000;
            let mut c = Charging::new();
            let a = imsi(1);
            sold(&mut c, "m", &a, monthly_from_jan_1(ALLOWANCE)).unwrap();
            let bucket = c.package("m").unwrap().bucket_id;
            let policy = GrantPolicy { validity_s: 30 * DAY, return_grace_s: 10 * DAY, ..GrantPolicy::default() };
            let mut now = JAN_1 + 20 * DAY;
            let mut grants: Vec<Grant> = Vec::new();
            let mut seq = 0;
            for op in ops {
                match op {
                    Op::Grant { node, wanted } => {
                        if let Ok(g) = c.grant(&format!("box-{node}"), &a, None, wanted, &policy, now) {
                            grants.push(g);
                        }
                    }
                    Op::Use { grant, percent } => {
                        let Some(g) = grants.get(grant as usize) else { continue };
                        let Some(open) = c.open_grant(g.id) else { continue };
                        let tokens = (open.tokens - open.used) * u64::from(percent) / 100;
                        seq += 1;
                        let u = usage(&g.node_id, seq, &a, Some(g.id), tokens);
                        let s = c.settle(&u, now).unwrap();
                        prop_assert_eq!((s.from_grant, s.overage), (tokens, 0));
                    }
                    Op::Return { grant } => {
                        if let Some(g) = grants.get(grant as usize) {
                            let _ = c.return_grant(&g.node_id, g.id);
                        }
                    }
                    Op::Later { hours } => {
                        now += i64::from(hours) * 3_600;
                        c.expire(&policy, now);
                    }
                }
                let b = c.ledger.bucket(bucket).unwrap();
                let Some(month) = b.period(now) else { continue };
                let held = c.ledger.held_in(bucket, month);
                prop_assert!(b.remaining(now) >= held, "month {month}: {held} held, {} left", b.remaining(now));
                if b.used_period == month {
                    prop_assert!(b.used <= ALLOWANCE, "month {month}: {} used", b.used);
                }
                for g in c.open_grants() {
                    prop_assert!(g.expires_at <= b.expiry_at(g.granted_at), "grant {} outlives its month", g.id);
                }
            }
        }
    }
}
