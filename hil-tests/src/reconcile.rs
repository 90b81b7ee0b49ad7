//! The bill against what the clients saw: pure checks over the core's
//! export and audit, the clients' outcomes and the edge's balances. Every
//! broken promise becomes one line in `problems`; an empty list is a clean
//! bill.
//!
//! The promises:
//! - every answer a client received with its usage is on the bill once, with
//!   exactly that usage;
//! - every stream a client dropped is on the bill once, marked as cut short,
//!   with its prompt and at least the chunks the client got;
//! - every stream whose connection broke (the agent killed) after content
//!   reached the client is on the bill once, with at least the chunks the
//!   client got (the agent's in-flight tally bills it at the restart);
//! - a request refused as malformed or over quota is not on the bill;
//! - a record no client can account for belongs to a request whose
//!   connection broke (the agent killed), at most one per such request, of the
//!   same subscriber;
//! - the core holds a dense, verified chain from the node, nothing
//!   quarantined, no declared gap, as far as the edge's log goes;
//! - each subscriber's balance is the packages sold minus the bill (the
//!   core's account, which the uploaded records settled), with nothing
//!   reserved at the edge.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Deserialize;
use serde_json::Value;

use crate::load::{Done, Outcome};

/// A record row of `core-ingest export --format jsonl`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct CoreRow {
    /// The node.
    pub node_id: String,
    /// Its seq.
    pub seq: u64,
    /// The request id, lowercase hex.
    pub record_id: String,
    /// The subscriber.
    pub imsi: String,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Of which cached.
    pub cached_prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// Tokens debited.
    pub billed_tokens: u64,
    /// completed, length, cancelled, failed.
    pub outcome: String,
    /// The model that served it.
    #[serde(default)]
    pub model_id: String,
}

/// One node in `core-ingest audit`: the core's own type.
pub use mec_sync::ingest_store::NodeAudit as AuditRow;

/// A subscriber's balance: the core's account, and what the edge holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EdgeBalance {
    /// Tokens left: the core's account (neither settled nor served beyond
    /// the balance), whether a box holds them in a grant or not.
    pub remaining: u64,
    /// Tokens reserved at the edge by requests in flight.
    pub reserved: u64,
    /// Tokens the core counted as served beyond the balance.
    pub overage: u64,
}

/// Everything the checks look at.
pub struct Evidence<'a> {
    /// The node the box was provisioned as.
    pub node_id: &'a str,
    /// The highest seq in the edge's log.
    pub edge_last_seq: u64,
    /// Tokens granted per IMSI.
    pub grants: &'a BTreeMap<String, u64>,
    /// What the clients saw.
    pub done: &'a [Done],
    /// The core's records.
    pub rows: &'a [CoreRow],
    /// The core's audit.
    pub audit: &'a [AuditRow],
    /// The edge's balances per IMSI.
    pub balances: &'a BTreeMap<String, EdgeBalance>,
    /// The models the load asked for, by [`crate::load::Planned::model`]:
    /// each record must name the one its request asked for (empty: not
    /// checked).
    pub models: &'a [String],
}

/// Per subscriber: what the clients were told, and the bill.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImsiTotals {
    /// Tokens granted.
    pub granted: u64,
    /// Tokens told to clients in completed answers.
    pub told: u64,
    /// Tokens billed for dropped streams.
    pub cancelled: u64,
    /// Tokens billed for requests whose connection broke.
    pub interrupted: u64,
    /// The core's total.
    pub billed: u64,
    /// Records at the core.
    pub records: u64,
}

/// The verdict.
#[derive(Debug, Default)]
pub struct Reconciliation {
    /// Every broken promise, one line each.
    pub problems: Vec<String>,
    /// Per IMSI totals.
    pub per_imsi: BTreeMap<String, ImsiTotals>,
}

/// Checks everything; see the module's promises.
pub fn reconcile(e: &Evidence) -> Reconciliation {
    let mut out = Reconciliation::default();
    let problems = &mut out.problems;
    for (imsi, granted) in e.grants {
        out.per_imsi.entry(imsi.clone()).or_default().granted = *granted;
    }

    // The core's view of the node.
    match e.audit {
        [a] => {
            if a.node_id != e.node_id {
                problems.push(format!(
                    "the core knows node {:?}, not {:?}",
                    a.node_id, e.node_id
                ));
            }
            if a.contiguous_seq != e.edge_last_seq || a.records != e.edge_last_seq {
                problems.push(format!(
                    "the core holds {} records contiguous to seq {}; the edge's log ends at seq {}",
                    a.records, a.contiguous_seq, e.edge_last_seq
                ));
            }
            if !a.gaps.is_empty() {
                problems.push(format!("declared gaps at the core: {:?}", a.gaps));
            }
            if !a.lost_by_core.is_empty() {
                problems.push(format!(
                    "records the core acknowledged and lost: {:?}",
                    a.lost_by_core
                ));
            }
            if !a.forks.is_empty() {
                problems.push(format!("forks at seqs {:?}", a.forks));
            }
            if a.quarantined != 0 {
                problems.push(format!("{} records quarantined", a.quarantined));
            }
            if a.chain != "ok" {
                problems.push(format!("the chain does not verify: {}", a.chain));
            }
        }
        other => problems.push(format!(
            "the core's audit has {} nodes, expected one",
            other.len()
        )),
    }

    // Rows: unique by seq (the store's key) and by request.
    let mut by_id: HashMap<&str, &CoreRow> = HashMap::new();
    let mut seqs = HashSet::new();
    for r in e.rows {
        if !seqs.insert((r.node_id.as_str(), r.seq)) {
            problems.push(format!(
                "seq {} of {} twice in the export",
                r.seq, r.node_id
            ));
        }
        if let Some(first) = by_id.insert(r.record_id.as_str(), r) {
            problems.push(format!(
                "request {} billed twice: seqs {} and {}",
                r.record_id, first.seq, r.seq
            ));
        }
        if r.billed_tokens != r.prompt_tokens + r.completion_tokens {
            problems.push(format!(
                "record seq {} bills {} for {} prompt + {} completion tokens",
                r.seq, r.billed_tokens, r.prompt_tokens, r.completion_tokens
            ));
        }
        let t = out.per_imsi.entry(r.imsi.clone()).or_default();
        t.billed += r.billed_tokens;
        t.records += 1;
    }

    // The prompt token count of each prompt text, from the answers.
    let mut prompt_tokens: HashMap<&str, u64> = HashMap::new();
    for d in e.done {
        if let Outcome::Completed { usage, .. } = &d.outcome {
            prompt_tokens.insert(d.planned.prompt_text(), usage.prompt_tokens);
        }
    }

    // Each client outcome against the bill.
    let mut accounted: HashSet<&str> = HashSet::new();
    let mut broken_without_id: HashMap<&str, u64> = HashMap::new();
    for d in e.done {
        let p = &d.planned;
        let totals = out.per_imsi.entry(p.imsi.clone()).or_default();
        match &d.outcome {
            Outcome::Completed { request_id, usage } => {
                accounted.insert(request_id);
                let told = usage.prompt_tokens + usage.completion_tokens;
                totals.told += told;
                match by_id.get(request_id.as_str()) {
                    None => problems.push(format!(
                        "request #{} ({}, {:?}) was answered with {told} tokens and is not on the bill",
                        p.index, p.imsi, p.kind
                    )),
                    Some(r) => {
                        if let Some(m) = e.models.get(p.model) {
                            if r.model_id != *m {
                                problems.push(format!(
                                    "request #{} asked for {m}; its record names {}",
                                    p.index, r.model_id
                                ));
                            }
                        }
                        if r.imsi != p.imsi
                            || r.prompt_tokens != usage.prompt_tokens
                            || r.cached_prompt_tokens != usage.cached_prompt_tokens
                            || r.completion_tokens != usage.completion_tokens
                        {
                            problems.push(format!(
                                "request #{} was told {usage:?} for {}; the bill says {r:?}",
                                p.index, p.imsi
                            ));
                        }
                    }
                }
            }
            Outcome::Cancelled { request_id, chunks } => {
                accounted.insert(request_id);
                match by_id.get(request_id.as_str()) {
                    None => problems.push(format!(
                        "request #{} ({}) streamed {chunks} chunks before the client left and is not on the bill",
                        p.index, p.imsi
                    )),
                    Some(r) => {
                        totals.cancelled += r.billed_tokens;
                        if let Some(m) = e.models.get(p.model) {
                            if r.model_id != *m {
                                problems.push(format!(
                                    "request #{} asked for {m}; its record names {}",
                                    p.index, r.model_id
                                ));
                            }
                        }
                        let prompt_ok = prompt_tokens
                            .get(p.prompt_text())
                            .is_none_or(|&n| n == r.prompt_tokens);
                        if r.imsi != p.imsi
                            || !prompt_ok
                            || r.completion_tokens < *chunks
                            || r.completion_tokens > p.max_tokens
                            || r.outcome == "failed"
                        {
                            problems.push(format!(
                                "request #{} ({}) was dropped after {chunks} chunks of at most {}; the bill says {r:?}",
                                p.index, p.imsi, p.max_tokens
                            ));
                        }
                    }
                }
            }
            Outcome::Refused { status, code } => {
                let expected = p.kind.malformed_status();
                let fine = match expected {
                    Some(s) => s == *status,
                    None => *status == 429,
                };
                if !fine {
                    problems.push(format!(
                        "request #{} ({:?}) was refused with {status} {code}; expected {}",
                        p.index,
                        p.kind,
                        expected.map_or("an answer or 429".to_string(), |s| s.to_string())
                    ));
                }
            }
            Outcome::Interrupted {
                request_id, chunks, ..
            } => match request_id {
                Some(id) => {
                    accounted.insert(id);
                    match by_id.get(id.as_str()) {
                        Some(r) => {
                            totals.interrupted += r.billed_tokens;
                            if r.imsi != p.imsi {
                                problems.push(format!(
                                    "interrupted request #{} of {} billed to {}",
                                    p.index, p.imsi, r.imsi
                                ));
                            }
                            if r.completion_tokens < *chunks {
                                problems.push(format!(
                                    "request #{} ({}) streamed {chunks} chunks before its connection broke; the bill says {r:?}",
                                    p.index, p.imsi
                                ));
                            }
                        }
                        None if *chunks > 0 => problems.push(format!(
                            "request #{} ({}) streamed {chunks} chunks before its connection broke and is not on the bill",
                            p.index, p.imsi
                        )),
                        None => {}
                    }
                }
                None => *broken_without_id.entry(p.imsi.as_str()).or_default() += 1,
            },
            Outcome::Unexpected { detail } => problems.push(format!(
                "request #{} ({}, {:?}): {detail}",
                p.index, p.imsi, p.kind
            )),
        }
    }

    // Records no client accounts for: at most one per broken connection of
    // the same subscriber whose id the client never saw.
    let mut unaccounted: BTreeMap<&str, Vec<&CoreRow>> = BTreeMap::new();
    for r in e.rows {
        if !accounted.contains(r.record_id.as_str()) {
            unaccounted.entry(r.imsi.as_str()).or_default().push(r);
        }
    }
    for (imsi, rows) in unaccounted {
        let allowed = broken_without_id.get(imsi).copied().unwrap_or(0);
        if rows.len() as u64 > allowed {
            problems.push(format!(
                "{} records of {imsi} match no request a client made ({allowed} connections of theirs broke): seqs {:?}",
                rows.len(),
                rows.iter().map(|r| r.seq).collect::<Vec<_>>()
            ));
        }
        let t = out.per_imsi.entry(imsi.to_string()).or_default();
        t.interrupted += rows.iter().map(|r| r.billed_tokens).sum::<u64>();
    }

    // The edge's balances.
    for (imsi, t) in &out.per_imsi {
        if t.billed > t.granted {
            problems.push(format!(
                "{imsi} billed {} beyond the {} granted",
                t.billed, t.granted
            ));
        }
        let expected = t.granted.saturating_sub(t.billed);
        match e.balances.get(imsi) {
            None => problems.push(format!("no balance for {imsi}")),
            Some(b) if b.remaining != expected || b.reserved != 0 || b.overage != 0 => {
                problems.push(format!(
                    "{imsi} has {} left ({} reserved at the edge, {} of overage); sold {} − billed {} = {expected}",
                    b.remaining, b.reserved, b.overage, t.granted, t.billed
                ))
            }
            Some(_) => {}
        }
    }
    out
}

/// Parses `core-ingest export --format jsonl` lines.
pub fn rows_from_json(lines: &[Value]) -> Vec<CoreRow> {
    lines
        .iter()
        .map(|l| serde_json::from_value(l.clone()).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Parses `core-ingest audit` output (an array, or an object with `nodes`).
pub fn audit_from_json(v: &Value) -> Vec<AuditRow> {
    let nodes = v.get("nodes").unwrap_or(v);
    serde_json::from_value(nodes.clone()).unwrap_or_else(|e| panic!("{e}: {v}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::{Kind, Planned, ToldUsage};

    const IMSI: &str = "001010000000100";

    fn planned(index: usize, kind: Kind) -> Planned {
        Planned {
            index,
            imsi: IMSI.into(),
            kind,
            prompt: 0,
            max_tokens: 16,
            model: 0,
        }
    }

    fn row(seq: u64, id: &str, prompt: u64, completion: u64, outcome: &str) -> CoreRow {
        CoreRow {
            node_id: "edge-e2e".into(),
            seq,
            record_id: id.into(),
            imsi: IMSI.into(),
            prompt_tokens: prompt,
            cached_prompt_tokens: 0,
            completion_tokens: completion,
            billed_tokens: prompt + completion,
            outcome: outcome.into(),
            model_id: String::new(),
        }
    }

    fn audit(records: u64) -> Vec<AuditRow> {
        vec![AuditRow {
            node_id: "edge-e2e".into(),
            records,
            contiguous_seq: records,
            gaps: vec![],
            lost_by_core: vec![],
            forks: vec![],
            quarantined: 0,
            duplicates: 0,
            chain: "ok".into(),
        }]
    }

    /// A clean story: one answer, one dropped stream, one refusal, one
    /// broken connection whose record landed.
    fn story() -> (Vec<Done>, Vec<CoreRow>) {
        let done = vec![
            Done {
                planned: planned(0, Kind::Chat { stream: false }),
                outcome: Outcome::Completed {
                    request_id: "a".into(),
                    usage: ToldUsage {
                        prompt_tokens: 30,
                        cached_prompt_tokens: 0,
                        completion_tokens: 5,
                    },
                },
                unreachable: 0,
            },
            Done {
                planned: Planned {
                    prompt: 0,
                    ..planned(1, Kind::Cancel { after: 2 })
                },
                outcome: Outcome::Cancelled {
                    request_id: "b".into(),
                    chunks: 2,
                },
                unreachable: 0,
            },
            Done {
                planned: planned(2, Kind::BadJson),
                outcome: Outcome::Refused {
                    status: 400,
                    code: "invalid_json".into(),
                },
                unreachable: 0,
            },
            Done {
                planned: planned(3, Kind::Chat { stream: false }),
                outcome: Outcome::Interrupted {
                    request_id: None,
                    chunks: 0,
                    error: "reset".into(),
                },
                unreachable: 1,
            },
        ];
        let rows = vec![
            row(1, "a", 30, 5, "completed"),
            row(2, "b", 40, 4, "cancelled"),
            row(3, "c", 30, 7, "length"),
        ];
        (done, rows)
    }

    fn check(done: &[Done], rows: &[CoreRow], audit: &[AuditRow], remaining: u64) -> Vec<String> {
        let grants = BTreeMap::from([(IMSI.to_string(), 1000)]);
        let balances = BTreeMap::from([(
            IMSI.to_string(),
            EdgeBalance {
                remaining,
                reserved: 0,
                overage: 0,
            },
        )]);
        reconcile(&Evidence {
            node_id: "edge-e2e",
            edge_last_seq: audit.first().map_or(0, |a| a.records),
            grants: &grants,
            done,
            rows,
            audit,
            balances: &balances,
            models: &[],
        })
        .problems
    }

    #[test]
    fn a_clean_story_has_no_problem() {
        let (done, rows) = story();
        let problems = check(&done, &rows, &audit(3), 1000 - 35 - 44 - 37);
        assert!(problems.is_empty(), "{problems:#?}");
    }

    #[test]
    fn each_broken_promise_is_caught() {
        let (done, rows) = story();
        let ok = 1000 - 35 - 44 - 37;
        let expect = |problems: Vec<String>, needle: &str| {
            assert!(
                problems.iter().any(|p| p.contains(needle)),
                "{needle:?} not in {problems:#?}"
            );
        };
        // A lost record (an uploader that skipped a batch).
        expect(
            check(&done, &rows[1..], &audit(3), ok),
            "is not on the bill",
        );
        // A double bill.
        let mut twice = rows.clone();
        twice.push(CoreRow {
            seq: 4,
            ..rows[0].clone()
        });
        expect(check(&done, &twice, &audit(4), ok), "billed twice");
        // Told one thing, billed another.
        let mut other = rows.clone();
        other[0].completion_tokens = 6;
        other[0].billed_tokens = 36;
        expect(check(&done, &other, &audit(3), ok - 1), "the bill says");
        // A dropped stream billed below what the client got.
        let mut short = rows.clone();
        short[1].completion_tokens = 1;
        short[1].billed_tokens = 41;
        expect(check(&done, &short, &audit(3), ok + 3), "dropped after");
        // A stream cut by the agent's death after 3 chunks, not billed; and
        // billed below what the client got.
        let mut cut = done.clone();
        cut.push(Done {
            planned: planned(4, Kind::Chat { stream: true }),
            outcome: Outcome::Interrupted {
                request_id: Some("e".into()),
                chunks: 3,
                error: "reset".into(),
            },
            unreachable: 0,
        });
        expect(
            check(&cut, &rows, &audit(3), ok),
            "streamed 3 chunks before its connection broke and is not on the bill",
        );
        let mut cut_short = rows.clone();
        cut_short.push(row(4, "e", 10, 2, "failed"));
        expect(
            check(&cut, &cut_short, &audit(4), ok - 12),
            "streamed 3 chunks before its connection broke; the bill says",
        );
        let mut cut_billed = rows.clone();
        cut_billed.push(row(4, "e", 10, 3, "failed"));
        let problems = check(&cut, &cut_billed, &audit(4), ok - 13);
        assert!(problems.is_empty(), "{problems:#?}");
        // A record nobody can account for.
        let mut extra = rows.clone();
        extra.push(row(4, "d", 10, 1, "completed"));
        expect(check(&done, &extra, &audit(4), ok - 11), "match no request");
        // A malformed request that was served.
        let mut served = done.clone();
        served[2].outcome = Outcome::Refused {
            status: 429,
            code: "insufficient_quota".into(),
        };
        expect(check(&served, &rows, &audit(3), ok), "expected 400");
        // The balance and the bill disagree.
        expect(
            check(&done, &rows, &audit(3), ok + 1),
            "sold 1000 − billed 116",
        );
        // The core is short of the edge's log, or its chain is broken.
        let mut behind = audit(3);
        behind[0].contiguous_seq = 2;
        expect(check(&done, &rows, &behind, ok), "contiguous to seq 2");
        let mut broken = audit(3);
        broken[0].chain = "break at seq 2".into();
        expect(check(&done, &rows, &broken, ok), "does not verify");
    }
}
