//! The usage record a settlement becomes, and the store's view of a record:
//! one builder each, whichever path bills (a live request, a stream the
//! previous process left, a record replayed from the log).

use std::time::{SystemTime, UNIX_EPOCH};

use mec_metering::ledger::Debit;
use mec_metering::rating::AppliedRate;
use mec_metering::store::{Applied, UsageRow};
use mec_sync::record::pb::{ClockSync, Outcome, PackageDebit, UsageRecord};

/// Unix milliseconds of `t`.
pub(crate) fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Debits that cover exactly the package units billed. The only way to a usage
/// record ([`Settlement::record`]), so a record carrying billed tokens
/// without the debits that pay for them cannot be made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    billed: u64,
    debits: Vec<Debit>,
}

impl Settlement {
    /// `None` unless `debits` is not empty and sums to `billed` (> 0).
    pub fn new(billed: u64, debits: Vec<Debit>) -> Option<Settlement> {
        let sum = debits
            .iter()
            .try_fold(0u64, |a, d| a.checked_add(d.tokens))?;
        (billed > 0 && !debits.is_empty() && sum == billed).then_some(Settlement { billed, debits })
    }

    /// The debits.
    pub fn debits(&self) -> &[Debit] {
        &self.debits
    }

    /// The usage record of `bill` paid by these debits; `grant_of` names
    /// the core's grant a bucket holds, if any.
    pub fn record(&self, bill: &Bill, grant_of: &dyn Fn(u64) -> Option<u64>) -> UsageRecord {
        UsageRecord {
            record_id: bill.request_id.to_vec(),
            imsi: bill.imsi.clone(),
            app_id: bill.app.clone(),
            model_id: bill.model.clone(),
            prompt_tokens: bill.prompt_tokens,
            cached_prompt_tokens: bill.cached_tokens,
            completion_tokens: bill.completion_tokens,
            reserved_tokens: bill.reserved_tokens,
            package_ids: self
                .debits
                .iter()
                .map(|d| d.bucket_id.to_string())
                .collect(),
            debits: self
                .debits
                .iter()
                .map(|d| PackageDebit {
                    package_id: d.bucket_id.to_string(),
                    tokens: d.tokens,
                    period: d.period,
                    grant_id: grant_of(d.bucket_id).unwrap_or(0),
                })
                .collect(),
            outcome: bill.outcome as i32,
            start_time_unix_ms: bill.start_ms,
            end_time_unix_ms: bill.end_ms,
            clock_sync: ClockSync::Unknown as i32,
            duration_us: bill.duration_us,
            ttft_us: bill.ttft_us,
            offline: false,
            billed_tokens: bill.billed(),
            billed_units: self.billed,
            rate_version: bill.rate.version,
            rate_digest: bill.rate.digest.clone(),
            rate: Some(mec_sync::record::pb::Rate {
                prompt_milli: bill.rate.rate.prompt_milli,
                cached_milli: bill.rate.rate.cached_milli,
                completion_milli: bill.rate.rate.completion_milli,
            }),
            failure_reason: bill.failure_reason.clone(),
            end_user: bill.detail.end_user.clone(),
            choices: bill.detail.choices,
            constraint: bill.detail.constraint.clone(),
            ..Default::default()
        }
    }
}

/// Everything a usage record says but its debits.
#[derive(Debug, Clone, PartialEq)]
pub struct Bill {
    /// The request id (the record's `record_id`).
    pub request_id: [u8; 16],
    /// The subscriber.
    pub imsi: String,
    /// The app.
    pub app: String,
    /// The model.
    pub model: String,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Of them, from the prefix cache.
    pub cached_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// Tokens the request had reserved.
    pub reserved_tokens: u64,
    /// How it ended.
    pub outcome: Outcome,
    /// Arrival, Unix ms.
    pub start_ms: i64,
    /// End, Unix ms.
    pub end_ms: i64,
    /// Duration, µs.
    pub duration_us: u64,
    /// Time to the first token, µs.
    pub ttft_us: u64,
    /// Why it failed, when it did.
    pub failure_reason: String,
    /// The end user, the choices and the constraint.
    pub detail: RequestDetail,
    /// The rate it is billed at.
    pub rate: AppliedRate,
}

/// What a request asked that a bill explains itself with.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RequestDetail {
    /// The app's end-user id (`user`); empty when none.
    pub end_user: String,
    /// Choices generated (`n`; 0 when unknown, read as 1).
    pub choices: u32,
    /// The output constraint: empty, `json_object`, `json_schema` or `tool_calls`.
    pub constraint: String,
}

impl Bill {
    /// Tokens billed: prompt and completion.
    pub fn billed(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }

    /// Package units billed: the tokens at the bill's rate.
    pub fn units(&self) -> u64 {
        self.rate.rate.units(
            self.prompt_tokens,
            self.cached_tokens,
            self.completion_tokens,
        )
    }
}

/// The store's update for a durable record: its debits, its id, its row
/// in the recent-usage view.
pub fn applied(seq: u64, r: &UsageRecord) -> Applied {
    let debits = r
        .debits
        .iter()
        .filter_map(|d| {
            Some(Debit {
                bucket_id: d.package_id.parse().ok()?,
                tokens: d.tokens,
                period: d.period,
            })
        })
        .collect();
    Applied {
        seq,
        record_id: r.record_id.clone(),
        debits,
        usage: UsageRow {
            seq,
            imsi: r.imsi.clone(),
            at_ms: r.end_time_unix_ms,
            app: r.app_id.clone(),
            model: r.model_id.clone(),
            prompt_tokens: r.prompt_tokens,
            completion_tokens: r.completion_tokens,
            billed_tokens: r.billed_tokens,
            billed_units: mec_sync::record::units_charged(r),
            outcome: outcome_name(r.outcome()).into(),
        },
    }
}

fn outcome_name(o: Outcome) -> &'static str {
    match o {
        Outcome::Completed => "completed",
        Outcome::Length => "length",
        Outcome::Cancelled => "cancelled",
        Outcome::Failed => "failed",
        Outcome::Unspecified => "unspecified",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(bucket_id: u64, tokens: u64) -> Debit {
        Debit {
            bucket_id,
            tokens,
            period: 0,
        }
    }

    #[test]
    fn a_settlement_exists_only_with_debits_covering_every_billed_token() {
        assert!(Settlement::new(10, vec![]).is_none());
        assert!(Settlement::new(10, vec![d(1, 9)]).is_none());
        assert!(Settlement::new(10, vec![d(1, 4), d(2, 7)]).is_none());
        assert!(Settlement::new(0, vec![d(1, 0)]).is_none());
        assert!(Settlement::new(u64::MAX, vec![d(1, u64::MAX), d(2, 1)]).is_none());
        let s = Settlement::new(10, vec![d(1, 4), d(2, 6)]).unwrap();
        let bill = Bill {
            request_id: [7; 16],
            imsi: "001010000000001".into(),
            app: "a".into(),
            model: "m".into(),
            prompt_tokens: 6,
            cached_tokens: 0,
            completion_tokens: 4,
            reserved_tokens: 20,
            outcome: Outcome::Completed,
            start_ms: 1,
            end_ms: 2,
            duration_us: 3,
            ttft_us: 4,
            failure_reason: String::new(),
            detail: RequestDetail {
                end_user: "u-1".into(),
                choices: 3,
                constraint: "json_schema".into(),
            },
            rate: AppliedRate::default(),
        };
        let r = s.record(&bill, &|b| (b == 2).then_some(9));
        assert_eq!(
            (r.end_user.as_str(), r.choices, r.constraint.as_str()),
            ("u-1", 3, "json_schema")
        );
        assert_eq!(
            r.debits.iter().map(|d| d.grant_id).collect::<Vec<_>>(),
            vec![0, 9]
        );
        assert_eq!(r.billed_tokens, 10);
        assert_eq!(r.debits.iter().map(|d| d.tokens).sum::<u64>(), 10);
        let a = applied(5, &r);
        assert_eq!((a.seq, a.debits.len(), a.record_id.len()), (5, 2, 16));
        assert_eq!(a.usage.outcome, "completed");
    }
}
