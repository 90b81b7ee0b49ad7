//! Billing against a trivially correct model: random sequences of admit,
//! settle, drop (the request is gone), grant, revoke and restart, over a
//! real log and store. After every step each package's balance and holds
//! equal the model's; at the end the records' debits equal what the model
//! debited, no package is overspent, and grants minus debits equal the
//! balance.

use crate::common::*;
use mec_billing::{Admission, Admit};
use mec_metering::BucketKind;
use mec_sync::record::SignedRecord;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Admit { prompt: u64, max: u64, stream: bool },
    Settle { which: usize, share: u64 },
    Drop { which: usize },
    Grant { tokens: u64 },
    Revoke { which: usize },
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1u64..60, 1u64..200, any::<bool>()).prop_map(|(prompt, max, stream)| Op::Admit { prompt, max, stream }),
        3 => (any::<usize>(), 0u64..=100).prop_map(|(which, share)| Op::Settle { which, share }),
        1 => any::<usize>().prop_map(|which| Op::Drop { which }),
        1 => (1u64..300).prop_map(|tokens| Op::Grant { tokens }),
        1 => any::<usize>().prop_map(|which| Op::Revoke { which }),
        1 => Just(Op::Restart),
    ]
}

/// The model: packages in grant order (all top-ups of one validity, so
/// nearest expiry first is grant order), holds per open request.
#[derive(Debug, Default)]
struct Model {
    buckets: Vec<(u64, u64, u64, u64, bool)>, // (id, allowance, debited, held, revoked)
    debited_total: u64,
}

impl Model {
    fn free(&self, b: &(u64, u64, u64, u64, bool)) -> u64 {
        if b.4 {
            0
        } else {
            b.1 - b.2 - b.3
        }
    }

    fn reserve(&mut self, needed: u64, wanted: u64) -> Option<Vec<(usize, u64)>> {
        let total: u64 = self.buckets.iter().map(|b| self.free(b)).sum();
        if total < needed {
            return None;
        }
        let mut left = wanted.max(needed);
        let mut holds = Vec::new();
        for i in 0..self.buckets.len() {
            let take = self.free(&self.buckets[i]).min(left);
            if take > 0 {
                self.buckets[i].3 += take;
                holds.push((i, take));
                left -= take;
            }
        }
        Some(holds)
    }

    fn drop_holds(&mut self, holds: &[(usize, u64)]) {
        for &(i, t) in holds {
            self.buckets[i].3 -= t;
        }
    }

    fn settle(&mut self, holds: &[(usize, u64)], used: u64) {
        self.drop_holds(holds);
        let mut left = used;
        for &(i, t) in holds {
            let take = t.min(left);
            self.buckets[i].2 += take;
            left -= take;
        }
        assert_eq!(left, 0, "the model settles within the grant");
        self.debited_total += used;
    }
}

struct Open {
    admission: Admission,
    holds: Vec<(usize, u64)>,
    prompt: u64,
    stream: bool,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn billing_agrees_with_a_trivially_correct_model(ops in proptest::collection::vec(op(), 1..40)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut bx = open_box(dir.path(), 1 << 22, 500);
        let mut model = Model { buckets: vec![(1, 500, 0, 0, false)], debited_total: 0 };
        let mut open: Vec<Open> = Vec::new();
        for op in ops {
            match op {
                Op::Admit { prompt, max, stream } => {
                    let info = info();
                    let got = bx.billing.admit(Admit { info: &info, prompt_tokens: prompt, max_completion: max, min_completion: 1, stream });
                    let want = model.reserve(prompt + 1, prompt + max);
                    match (got, want) {
                        (Ok(admission), Some(holds)) => {
                            prop_assert_eq!(admission.granted(), holds.iter().map(|h| h.1).sum::<u64>());
                            open.push(Open { admission, holds, prompt, stream });
                        }
                        (Err(e), None) => prop_assert!(matches!(e, mec_billing::BillingError::InsufficientQuota { .. }), "{}", e),
                        (got, want) => prop_assert!(false, "billing {:?}, model {:?}", got.map(|a| a.granted()), want),
                    }
                }
                Op::Settle { which, share } if !open.is_empty() => {
                    let mut o = open.remove(which % open.len());
                    let cap = o.admission.completion_cap();
                    let completion = cap * share / 100;
                    if o.stream {
                        o.admission.count(completion).unwrap();
                    }
                    let usage = rt.block_on(o.admission.settle(&settled(o.prompt, completion))).unwrap();
                    if completion == 0 {
                        prop_assert_eq!(usage.seq, 0);
                        model.drop_holds(&o.holds);
                    } else {
                        prop_assert!(usage.seq > 0);
                        model.settle(&o.holds, o.prompt + completion);
                    }
                }
                Op::Drop { which } if !open.is_empty() => {
                    let o = open.remove(which % open.len());
                    drop(o.admission);
                    model.drop_holds(&o.holds);
                }
                Op::Grant { tokens } => {
                    let b = bx.billing.grant(&imsi(), BucketKind::Topup, tokens, 0, i64::MAX / 2).unwrap();
                    model.buckets.push((b.id, tokens, 0, 0, false));
                }
                Op::Revoke { which } => {
                    let i = which % model.buckets.len();
                    bx.billing.revoke(model.buckets[i].0).unwrap();
                    model.buckets[i].4 = true;
                }
                Op::Restart => {
                    for o in open.drain(..) {
                        drop(o.admission);
                        model.drop_holds(&o.holds);
                    }
                    bx.billing.shutdown();
                    drop(bx);
                    bx = open_box(dir.path(), 1 << 22, 0);
                    let recovered = rt.block_on(bx.billing.recover_streams(bx.left.clone()));
                    prop_assert_eq!(recovered, mec_billing::Recovered::default());
                }
                _ => {}
            }
            let balance = bx.billing.balance(&imsi());
            for view in &balance.buckets {
                let m = model.buckets.iter().find(|b| b.0 == view.id).unwrap();
                let remaining = if m.4 { 0 } else { m.1 - m.2 };
                prop_assert_eq!((view.remaining, view.reserved), (remaining, m.3), "package {}", view.id);
            }
        }
        drop(open);
        bx.billing.shutdown();
        // The log's records: every billed token carried by a debit, the
        // debits equal to what the model debited, no package overspent.
        let mut from = 1;
        let (mut billed, mut debited) = (0u64, std::collections::HashMap::<u64, u64>::new());
        loop {
            let batch = bx.log.read_from(from, 256, 1 << 20).unwrap();
            if batch.is_empty() { break; }
            for (seq, bytes) in batch {
                from = seq + 1;
                let r = SignedRecord::from_bytes(&bytes).unwrap().record().unwrap();
                billed += r.billed_tokens;
                prop_assert_eq!(r.debits.iter().map(|d| d.tokens).sum::<u64>(), r.billed_tokens);
                for d in r.debits {
                    *debited.entry(d.package_id.parse().unwrap()).or_default() += d.tokens;
                }
            }
        }
        prop_assert_eq!(billed, model.debited_total);
        for b in &model.buckets {
            let d = debited.get(&b.0).copied().unwrap_or(0);
            prop_assert_eq!(d, b.2);
            prop_assert!(d <= b.1, "package {} overspent: {} of {}", b.0, d, b.1);
        }
        let balance = bx.billing.balance(&imsi());
        let granted: u64 = model.buckets.iter().filter(|b| !b.4).map(|b| b.1).sum();
        let spent: u64 = model.buckets.iter().filter(|b| !b.4).map(|b| b.2).sum();
        prop_assert_eq!(balance.remaining_tokens + balance.reserved_tokens, granted - spent);
    }
}
