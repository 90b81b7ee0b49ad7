//! One suite, two stores: every test here runs on SQLite (the embedded
//! default) and on PostgreSQL (a throw-away server of this test binary,
//! `mec_sync::pg_server`, a database per test). A test `name` is
//! `store_suite::name::sqlite` and `store_suite::name::postgres`.

use std::sync::Arc;

use ed25519_dalek::SigningKey;
use mec_sync::ingest::check_records;
use mec_sync::ingest_store::{
    ExportQuery, ExportValue, IngestStore, IngestStoreError, PgOptions, PgStore, SqliteStore,
};
use mec_sync::record::{body_hash, encode_record, SignedRecord, UsageRecord, GENESIS_HASH};
use mec_sync::wire::pb::Batch;
use prost::Message;

use crate::common::stores::{on_both_stores, Backend};

on_both_stores!(
    "":
    batches_commit_once_and_survive_reopening,
    a_resend_of_a_record_kept_aside_is_kept_once,
    a_fork_is_kept_aside_and_audited,
    two_instances_racing_on_one_node_store_each_record_once,
    exports_stream_records_and_daily_sums,
);

/// Records 1..=n of `node`, chained, signed with `k`; record `seq` ends at
/// `end_ms(seq)`.
fn chain(node: &str, k: &SigningKey, n: u64, end_ms: impl Fn(u64) -> i64) -> Vec<Vec<u8>> {
    let mut prev = GENESIS_HASH;
    (1..=n)
        .map(|seq| {
            let r = UsageRecord {
                node_id: node.into(),
                seq,
                prev_hash: prev.to_vec(),
                imsi: format!("00101000000000{}", seq % 3),
                prompt_tokens: 7,
                completion_tokens: seq,
                billed_tokens: 7 + seq,
                end_time_unix_ms: end_ms(seq),
                start_time_unix_ms: end_ms(seq) - 100,
                choices: (seq % 3) as u32,
                constraint: if seq == 2 {
                    "json_schema".into()
                } else {
                    String::new()
                },
                end_user: format!("user-{seq}"),
                // Seq 5 is rated (issue 25): 40 units at table version 3.
                billed_units: if seq == 5 { 40 } else { 0 },
                rate_version: if seq == 5 { 3 } else { 0 },
                rate_digest: if seq == 5 { vec![0xab; 32] } else { vec![] },
                ..Default::default()
            };
            let body = encode_record(&r);
            prev = body_hash(&body);
            SignedRecord::sign(body, k).encode_to_vec()
        })
        .collect()
}

fn batch(records: &[Vec<u8>]) -> Batch {
    Batch {
        batch_id: 1,
        records: records.to_vec(),
        lost: vec![],
    }
}

fn ingest(store: &dyn IngestStore, node: &str, k: &SigningKey, records: &[Vec<u8>]) {
    let checked = check_records(node, &k.verifying_key(), batch(records));
    store.ingest(node, checked, 0).unwrap();
}

/// 2026-11-30T12:00Z.
const NOV_30: i64 = 1_796_040_000_000;
const DAY: i64 = 86_400_000;

fn batches_commit_once_and_survive_reopening(b: Backend) {
    let k = SigningKey::from_bytes(&[3; 32]);
    let recs = chain("edge-1", &k, 6, |_| NOV_30);
    let s = b.open();
    for part in [&recs[..4], &recs[2..6], &recs[..6]] {
        ingest(&*s, "edge-1", &k, part);
    }
    drop(s);
    let s = b.open();
    let (cursor, at) = s.position("edge-1").unwrap();
    assert_eq!(cursor.contiguous_seq, 6);
    assert!(at.is_some(), "the hash of the record at the cursor");
    let audit = s.audit().unwrap();
    assert_eq!(audit.len(), 1);
    let a = &audit[0];
    assert_eq!((a.records, a.contiguous_seq, a.duplicates), (6, 6, 2 + 6));
    assert_eq!(a.chain, "ok");
    assert!(a.gaps.is_empty());
    let (_, fresh) = s.position("never-seen").unwrap();
    assert_eq!(fresh, None);
}

fn a_resend_of_a_record_kept_aside_is_kept_once(b: Backend) {
    let k = SigningKey::from_bytes(&[4; 32]);
    let s = b.open();
    for _ in 0..5 {
        ingest(&*s, "n1", &k, &[b"not a record".to_vec()]);
    }
    let audit = s.audit().unwrap();
    assert_eq!(audit[0].quarantined, 1);
    assert_eq!(audit[0].records, 0);
}

/// A box restored from a snapshot sends another record at a stored seq:
/// both are kept (the other aside), the audit names the seq, and the
/// records that chain to the fork are taken.
fn a_fork_is_kept_aside_and_audited(b: Backend) {
    let k = SigningKey::from_bytes(&[5; 32]);
    let s = b.open();
    let first = chain("edge-f", &k, 3, |_| NOV_30);
    ingest(&*s, "edge-f", &k, &first);
    // The same node, other bodies from seq 3 on (the snapshot's future).
    let other = chain("edge-f", &k, 4, |_| NOV_30 + 1);
    ingest(&*s, "edge-f", &k, &other[2..]);
    let a = s.audit().unwrap().remove(0);
    assert_eq!(a.forks, vec![3], "{a:?}");
    assert_eq!(a.contiguous_seq, 4, "{a:?}");
    assert_eq!(a.chain, "ok", "{a:?}");
}

/// Two handles on one store (two core-ingest instances) take the same
/// node's batches at once, overlapping, from two threads: every record is
/// stored once, the cursor is dense, the chain holds.
fn two_instances_racing_on_one_node_store_each_record_once(b: Backend) {
    let k = SigningKey::from_bytes(&[6; 32]);
    let n = 120u64;
    let recs = Arc::new(chain("edge-r", &k, n, |_| NOV_30));
    let instances = [b.open(), b.open()];
    std::thread::scope(|scope| {
        for (i, store) in instances.iter().enumerate() {
            let (recs, k) = (recs.clone(), k.clone());
            scope.spawn(move || {
                // Each sends every record, in batches of different sizes.
                let size = if i == 0 { 7 } else { 11 };
                let mut from = 0;
                while from < recs.len() {
                    let to = (from + size).min(recs.len());
                    ingest(&**store, "edge-r", &k, &recs[from..to]);
                    from = to;
                }
            });
        }
    });
    let a = instances[0].audit().unwrap().remove(0);
    assert_eq!(
        (a.records, a.contiguous_seq, a.quarantined),
        (n, n, 0),
        "{a:?}"
    );
    assert_eq!(a.duplicates, n, "each record arrived twice");
    assert_eq!(a.chain, "ok");
}

/// Export rows come in (node, seq) order with every column, and the daily
/// sums per IMSI add up; a range selects by end time.
fn exports_stream_records_and_daily_sums(b: Backend) {
    let k = SigningKey::from_bytes(&[7; 32]);
    let s = b.open();
    // Two days: seqs 1..=4 on Nov 30, 5..=6 on Dec 1.
    let recs = chain("edge-x", &k, 6, |seq| {
        if seq <= 4 {
            NOV_30
        } else {
            NOV_30 + DAY
        }
    });
    ingest(&*s, "edge-x", &k, &recs);
    let all = ExportQuery {
        from_ms: i64::MIN,
        to_ms: i64::MAX,
        by_imsi_day: false,
    };
    let mut rows: Vec<Vec<ExportValue>> = Vec::new();
    let n = s
        .export(&all, &mut |v| {
            rows.push(v.to_vec());
            Ok(())
        })
        .unwrap();
    assert_eq!(n, 6);
    let seqs: Vec<i64> = rows
        .iter()
        .map(|r| match r[1] {
            ExportValue::Int(s) => s,
            ref other => panic!("seq {other:?}"),
        })
        .collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5, 6]);
    assert_eq!(rows[0][0], ExportValue::Text("edge-x".into()));
    assert_eq!(rows[0].len(), mec_sync::ingest_store::RECORD_COLUMNS.len());
    // What the request asked (issue 24).
    assert_eq!(
        rows[1][16..19],
        [
            ExportValue::Int(2),
            ExportValue::Text("json_schema".into()),
            ExportValue::Text("user-2".into())
        ]
    );
    // Rating (issue 25): units, the table's version and digest; a record
    // without units is read as one unit a token.
    assert_eq!(
        rows[1][19..],
        [
            ExportValue::Int(9),
            ExportValue::Int(0),
            ExportValue::Text(String::new())
        ]
    );
    assert_eq!(
        rows[4][19..],
        [
            ExportValue::Int(40),
            ExportValue::Int(3),
            ExportValue::Text("ab".repeat(32))
        ]
    );
    let dec1 = ExportQuery {
        from_ms: NOV_30 + DAY / 2,
        to_ms: NOV_30 + 2 * DAY,
        by_imsi_day: true,
    };
    let mut days: Vec<Vec<ExportValue>> = Vec::new();
    s.export(&dec1, &mut |v| {
        days.push(v.to_vec());
        Ok(())
    })
    .unwrap();
    // Seq 5 and 6 (IMSIs ...2 and ...0): one row each, billed 12 and 13
    // tokens, 40 and 13 units.
    assert_eq!(
        days,
        vec![
            vec![
                ExportValue::Text("001010000000000".into()),
                ExportValue::Text("2026-12-01".into()),
                ExportValue::Int(1),
                ExportValue::Int(7),
                ExportValue::Int(0),
                ExportValue::Int(6),
                ExportValue::Int(13),
                ExportValue::Int(13),
            ],
            vec![
                ExportValue::Text("001010000000002".into()),
                ExportValue::Text("2026-12-01".into()),
                ExportValue::Int(1),
                ExportValue::Int(7),
                ExportValue::Int(0),
                ExportValue::Int(5),
                ExportValue::Int(12),
                ExportValue::Int(40),
            ],
        ]
    );
}

/// A database whose schema is newer than this binary knows is refused at
/// start, naming both versions; nothing is changed.
#[test]
fn postgres_refuses_a_newer_schema() {
    let url = mec_pg_throwaway::fresh_database("newer_schema").unwrap();
    drop(PgStore::connect(&url, &PgOptions::default()).unwrap());
    let server = mec_pg_throwaway::shared().unwrap();
    let db = format!("newer_schema_{}", std::process::id());
    server
        .sql(&db, "INSERT INTO schema_migrations (version) VALUES (99)")
        .unwrap();
    let e = PgStore::connect(&url, &PgOptions::default()).err().unwrap();
    assert!(
        matches!(e, IngestStoreError::NewerSchema { found: 99, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("version 99"), "{e}");
}

/// A database user without the right to create the tables gets an error
/// that says which right is missing, not a bare SQL failure.
#[test]
fn postgres_names_a_missing_right() {
    let server = mec_pg_throwaway::shared().unwrap();
    let db = format!("no_rights_{}", std::process::id());
    server.create_database(&db).unwrap();
    server
        .sql(
            &db,
            "CREATE ROLE reader LOGIN; REVOKE CREATE ON SCHEMA public FROM PUBLIC",
        )
        .unwrap();
    let url = server.url(&db).replacen("mec@", "reader@", 1);
    let e = PgStore::connect(&url, &PgOptions::default()).err().unwrap();
    assert!(matches!(e, IngestStoreError::Privilege { .. }), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("\"reader\"") && text.contains("permission denied"),
        "{text}"
    );
}

/// A database that cannot be reached is a clear error at start.
#[test]
fn postgres_unreachable_is_a_clear_error() {
    let e = PgStore::connect(
        "postgresql://mec@%2Fnonexistent%2Fsocket/none",
        &PgOptions::default(),
    )
    .err()
    .unwrap();
    let text = e.to_string();
    assert!(
        text.contains("PostgreSQL") && text.contains("/nonexistent/socket"),
        "{text}"
    );
}

/// A SQLite store with what a real core accumulates: chains of two nodes,
/// a record whose signature was broken in transit (kept aside at its seq),
/// an unreadable record, a fork, and a range the edge declared lost.
fn a_lived_in_sqlite_store(dir: &std::path::Path) -> Arc<dyn IngestStore> {
    let s: Arc<dyn IngestStore> = Arc::new(SqliteStore::open(&dir.join("core.sqlite")).unwrap());
    let k = SigningKey::from_bytes(&[11; 32]);
    let mut recs = chain("edge-c", &k, 12, |seq| NOV_30 + seq as i64 * DAY);
    // Seq 3 arrives with a broken signature.
    let mut broken = SignedRecord::from_bytes(&recs[2]).unwrap();
    broken.signature[0] ^= 1;
    recs[2] = broken.encode_to_vec();
    ingest(&*s, "edge-c", &k, &recs[..6]);
    ingest(&*s, "edge-c", &k, &[b"unreadable".to_vec()]);
    // Seqs 7..=8 lost at the edge; 9..=12 follow.
    let checked = check_records(
        "edge-c",
        &k.verifying_key(),
        Batch {
            batch_id: 2,
            records: recs[8..].to_vec(),
            lost: vec![mec_sync::wire::pb::LostRange {
                first: 7,
                last: 8,
                reason: 0,
            }],
        },
    );
    s.ingest("edge-c", checked, NOV_30 + 5).unwrap();
    let k2 = SigningKey::from_bytes(&[12; 32]);
    ingest(&*s, "edge-f", &k2, &chain("edge-f", &k2, 3, |_| NOV_30));
    ingest(
        &*s,
        "edge-f",
        &k2,
        &chain("edge-f", &k2, 4, |_| NOV_30 + 1)[2..],
    );
    s
}

/// `copy_store` moves a lived-in SQLite core to PostgreSQL: every record
/// goes through the checks again, faults and forks stay kept aside, the gap
/// stays declared, and both audits agree.
#[test]
fn a_sqlite_core_is_copied_to_postgresql_and_verified() {
    let dir = tempfile::tempdir().unwrap();
    let from = a_lived_in_sqlite_store(dir.path());
    let source = from.audit().unwrap();
    assert_eq!(source[0].quarantined, 2, "{source:?}");
    assert_eq!(source[0].gaps, vec![(7, 8)], "{source:?}");
    assert_eq!(source[1].forks, vec![3], "{source:?}");
    let to = Backend::postgres("copy_ok").open();
    let report = mec_sync::core_ingest::copy_store(&*from, &*to).unwrap();
    assert_eq!(report["verified"], true, "{report}");
    assert_eq!(report["records"], 9 + 4, "{report}");
    let mut copy = to.audit().unwrap();
    let mut want = source.clone();
    for a in copy.iter_mut().chain(want.iter_mut()) {
        a.duplicates = 0; // history, not copied
    }
    assert_eq!(copy, want);
    // Into a store that is not empty: refused.
    let again = mec_sync::core_ingest::copy_store(&*from, &*to).unwrap_err();
    assert!(
        format!("{again:#}").contains("already holds nodes"),
        "{again:#}"
    );
}

/// A record altered in the source store (its signed bytes) stops the copy
/// with the node and the seq: nothing is copied on trust.
#[test]
fn a_record_altered_in_the_source_stops_the_copy() {
    let dir = tempfile::tempdir().unwrap();
    let from = a_lived_in_sqlite_store(dir.path());
    let sqlite = SqliteStore::open(&dir.path().join("core.sqlite")).unwrap();
    let signed: Vec<u8> = sqlite
        .connection()
        .query_row(
            "SELECT signed FROM records WHERE node_id = 'edge-c' AND seq = 5",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let mut altered = SignedRecord::from_bytes(&signed).unwrap();
    altered.body[3] ^= 0x20;
    sqlite
        .connection()
        .execute(
            "UPDATE records SET signed = ?1 WHERE node_id = 'edge-c' AND seq = 5",
            [altered.encode_to_vec()],
        )
        .unwrap();
    let to = Backend::postgres("copy_altered").open();
    let e = mec_sync::core_ingest::copy_store(&*from, &*to).unwrap_err();
    let text = format!("{e:#}");
    assert!(text.contains("edge-c") && text.contains("seq 5"), "{text}");
}

/// A CA and a server certificate it signed for `localhost` (by name only),
/// as an operator's database would present; the CA's PEM is written to
/// `dir/ca.pem`.
fn database_certificates(dir: &std::path::Path) -> mec_pg_throwaway::ServerTls {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "operator database CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    mec_pg_throwaway::ServerTls {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// Whether the store's own connections to `db` use TLS, as the server
/// sees them (`pg_stat_ssl`).
fn server_sees_tls(server: &mec_pg_throwaway::PgServer, db: &str) -> String {
    server
        .sql(
            db,
            "SELECT string_agg(DISTINCT s.ssl::text, ',') FROM pg_stat_ssl s \
             JOIN pg_stat_activity a USING (pid) WHERE a.application_name = 'core-ingest'",
        )
        .unwrap()
}

/// TLS to the database, libpq's way: `sslmode=verify-full` with the CA of
/// the server's certificate stores over TLS (the server says so); a name
/// the certificate does not hold fails `verify-full` and passes
/// `verify-ca`; a server signed by another CA is refused before anything
/// is written; `require` is refused with the way out.
#[test]
fn postgres_over_tls_checks_the_server_as_asked() {
    let dir = tempfile::tempdir().unwrap();
    let server = mec_pg_throwaway::PgServer::start_tls(&database_certificates(dir.path())).unwrap();
    let ca = dir.path().join("ca.pem");
    let k = SigningKey::from_bytes(&[21; 32]);

    server.create_database("verified").unwrap();
    let params = format!("sslmode=verify-full&sslrootcert={}", ca.display());
    let url = server.tcp_url("localhost", "verified", &params);
    let store = PgStore::connect(&url, &PgOptions::default()).unwrap();
    assert!(
        store.describe().contains("TLS, verify-full"),
        "{}",
        store.describe()
    );
    ingest(
        &store,
        "tls-node",
        &k,
        &chain("tls-node", &k, 5, |_| 1_700_000_000_000),
    );
    assert_eq!(store.audit().unwrap()[0].records, 5);
    assert_eq!(server_sees_tls(&server, "verified"), "true");
    drop(store);

    // The certificate names localhost, not 127.0.0.1.
    server.create_database("by_address").unwrap();
    let url = server.tcp_url("127.0.0.1", "by_address", &params);
    let e = PgStore::connect(&url, &PgOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("certificate") && e.contains("127.0.0.1"), "{e}");
    let params_ca = format!("sslmode=verify-ca&sslrootcert={}", ca.display());
    let url = server.tcp_url("127.0.0.1", "by_address", &params_ca);
    let store = PgStore::connect(&url, &PgOptions::default()).unwrap();
    store.check_ready().unwrap();
    assert_eq!(server_sees_tls(&server, "by_address"), "true");
    drop(store);

    // Another CA: refused, and nothing was created in the database.
    let other = tempfile::tempdir().unwrap();
    database_certificates(other.path());
    server.create_database("other_ca").unwrap();
    let url = server.tcp_url(
        "localhost",
        "other_ca",
        &format!(
            "sslmode=verify-full&sslrootcert={}",
            other.path().join("ca.pem").display()
        ),
    );
    let e = PgStore::connect(&url, &PgOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("certificate"), "{e}");
    // verify-ca forgives a name, never a chain.
    let url = server.tcp_url(
        "127.0.0.1",
        "other_ca",
        &format!(
            "sslmode=verify-ca&sslrootcert={}",
            other.path().join("ca.pem").display()
        ),
    );
    let e = PgStore::connect(&url, &PgOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("invalid peer certificate"), "{e}");
    assert_eq!(
        server
            .sql(
                "other_ca",
                "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
            )
            .unwrap(),
        "0"
    );

    let url = server.tcp_url("localhost", "verified", "sslmode=require");
    let e = PgStore::connect(&url, &PgOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("sslmode=verify-full"), "{e}");
}

/// A record dated months ahead (a box's clock) waits in the default
/// partition; when its month's partition is made, the month's records move
/// into it in that transaction, and the audit and the export still see
/// every record once.
#[test]
fn postgres_moves_a_months_records_out_of_the_default_partition_as_it_is_made() {
    let url = mec_pg_throwaway::fresh_database("default_partition").unwrap();
    let db = format!("default_partition_{}", std::process::id());
    let server = mec_pg_throwaway::shared().unwrap();
    let store = PgStore::connect(&url, &PgOptions::default()).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let ahead = now + 200 * DAY;
    let k = SigningKey::from_bytes(&[23; 32]);
    let recs = chain(
        "clock-ahead",
        &k,
        3,
        |seq| if seq == 1 { now } else { ahead },
    );
    ingest(&store, "clock-ahead", &k, &recs);
    let count = |table: &str| {
        server
            .sql(&db, &format!("SELECT count(*) FROM {table}"))
            .unwrap()
    };
    assert_eq!(count("records_default"), "2");

    let made = store.ensure_partitions(ahead).unwrap();
    assert_eq!(count("records_default"), "0");
    let home = server
        .sql(
            &db,
            "SELECT DISTINCT tableoid::regclass FROM records WHERE seq >= 2",
        )
        .unwrap();
    assert!(made.contains(&home), "{home} not in {made:?}");
    assert_eq!(count("records"), "3");
    let audit = store.audit().unwrap();
    assert_eq!((audit[0].records, audit[0].chain.as_str()), (3, "ok"));
    let all = ExportQuery {
        from_ms: i64::MIN,
        to_ms: i64::MAX,
        by_imsi_day: false,
    };
    assert_eq!(store.export(&all, &mut |_| Ok(())).unwrap(), 3);
}

/// A right taken away while the core runs: the batch fails with an error
/// naming the user and the right, the node's cursor does not move (nothing
/// is acknowledged), and once the right is back the same batch lands once.
/// The user owns nothing: it was granted what "What the user needs" in
/// docs/core-postgres.md lists for after the first start.
#[test]
fn postgres_a_right_lost_while_serving_fails_the_batch_and_loses_nothing() {
    let url = mec_pg_throwaway::fresh_database("rights_lost").unwrap();
    let db = format!("rights_lost_{}", std::process::id());
    let server = mec_pg_throwaway::shared().unwrap();
    drop(PgStore::connect(&url, &PgOptions::default()).unwrap());
    server
        .sql(
            &db,
            "CREATE ROLE ingester LOGIN; \
             GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO ingester; \
             GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO ingester",
        )
        .unwrap();
    let store =
        PgStore::connect(&url.replacen("mec@", "ingester@", 1), &PgOptions::default()).unwrap();
    let k = SigningKey::from_bytes(&[29; 32]);
    let recs = chain("rights", &k, 6, |_| NOV_30);
    ingest(&store, "rights", &k, &recs[..3]);

    server
        .sql(&db, "REVOKE INSERT ON records FROM ingester")
        .unwrap();
    let second = || check_records("rights", &k.verifying_key(), batch(&recs[3..]));
    let e = store.ingest("rights", second(), 0).err().unwrap();
    assert!(matches!(e, IngestStoreError::Privilege { .. }), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("\"ingester\"") && text.contains("permission denied for table records"),
        "{text}"
    );
    assert_eq!(store.position("rights").unwrap().0.contiguous_seq, 3);

    server
        .sql(&db, "GRANT INSERT ON records TO ingester")
        .unwrap();
    store.ingest("rights", second(), 0).unwrap();
    let audit = store.audit().unwrap();
    assert_eq!(
        (
            audit[0].records,
            audit[0].contiguous_seq,
            audit[0].chain.as_str()
        ),
        (6, 6, "ok")
    );
}

/// A database an older core made (schema version 1, with a record kept
/// aside) is brought to this binary's version at start, its rows kept.
#[test]
fn postgres_migrates_a_version_1_database_and_keeps_its_rows() {
    let server = mec_pg_throwaway::shared().unwrap();
    let db = format!("from_v1_{}", std::process::id());
    let url = server.create_database(&db).unwrap();
    server
        .sql(
            &db,
            &format!(
                "{}; CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, \
                 applied_at TIMESTAMPTZ NOT NULL DEFAULT now()); \
                 INSERT INTO schema_migrations (version) VALUES (1); \
                 INSERT INTO quarantine (node_id, seq, reason, signed, received_ms, kind, signed_hash) \
                 VALUES ('old-box', 3, 'signature does not verify', '\\x00', 1, 'fault', '\\x01'); \
                 INSERT INTO nodes (node_id, contiguous_seq, first_seen_ms, last_seen_ms) \
                 VALUES ('old-box', 7, 1, 1)",
                mec_sync::ingest_store::postgres::MIGRATIONS[0]
            ),
        )
        .unwrap();
    let store = PgStore::connect(&url, &PgOptions::default()).unwrap();
    assert_eq!(
        store.schema_version().unwrap(),
        mec_sync::ingest_store::postgres::SCHEMA_VERSION
    );
    store.check_ready().unwrap();
    assert_eq!(
        server
            .sql(&db, "SELECT node_id || ':' || seq FROM quarantine")
            .unwrap(),
        "old-box:3"
    );
    assert_eq!(
        server
            .sql(
                &db,
                "SELECT string_agg(a.attname, ',' ORDER BY k.ord) FROM pg_index i \
                 JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) ON true \
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
                 WHERE i.indrelid = 'quarantine'::regclass AND i.indisprimary"
            )
            .unwrap(),
        "node_id,id"
    );
    // What the box uploaded before settlement existed is not settled
    // against packages: its cursor starts where the node is.
    assert_eq!(
        server
            .sql(
                &db,
                "SELECT seq FROM charging_settled_through WHERE node_id = 'old-box'"
            )
            .unwrap(),
        "7"
    );
}

/// The same for a SQLite store made before settlement existed.
#[test]
fn sqlite_an_older_store_settles_only_what_comes_after_it() {
    use mec_sync::charging_store::ChargingStore;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("core.sqlite");
    {
        let store = mec_sync::ingest_store::SqliteStore::open(&path).unwrap();
        let conn = store.connection();
        conn.execute_batch(
            "DROP TABLE charging_settled_through;
             INSERT INTO nodes (node_id, contiguous_seq, first_seen_ms, last_seen_ms)
             VALUES ('old-box', 7, 1, 1);",
        )
        .unwrap();
    }
    let store = mec_sync::ingest_store::SqliteStore::open(&path).unwrap();
    assert_eq!(store.settled_through("old-box").unwrap(), 7);
    assert!(store.nodes_unsettled().unwrap().is_empty());
    // A node first seen now settles from its first record.
    assert_eq!(store.settled_through("new-box").unwrap(), 0);
}
