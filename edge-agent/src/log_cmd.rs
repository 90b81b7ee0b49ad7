//! `edge-agent log ...`: the operator's tools for the usage log.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use base64::Engine;
use mec_node::state::StateDir;
use mec_sync::identity::{self, NodeIdentity};
use mec_sync::log::{verify, LogOptions, UsageLog};
use mec_sync::record::{self, ClockSync, Outcome, SignedRecord, UsageRecord};

use crate::cli::BenchArgs;

/// The log folder inside a node state directory.
pub fn log_dir(state_dir: &Path) -> PathBuf {
    StateDir::new(state_dir).log_dir()
}

/// The identity folder inside a node state directory.
pub fn identity_dir(state_dir: &Path) -> PathBuf {
    StateDir::new(state_dir).identity_dir()
}

/// `log verify`: JSON summary on stdout; exit 1 when anything is wrong.
pub fn verify(dir: &Path) -> anyhow::Result<ExitCode> {
    let pub_path = StateDir::new(dir).node_pub();
    let key = identity::load_public_key(&pub_path)
        .context("cannot check signatures without the node's public key")?;
    let log = log_dir(dir);
    anyhow::ensure!(log.is_dir(), "{}: no usage log here", log.display());
    let report = verify::verify_log(&log, &key);
    let mut json = serde_json::to_value(&report)?;
    json["ok"] = report.ok().into();
    println!("{}", serde_json::to_string_pretty(&json)?);
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `log dump`: one JSON object per record.
pub fn dump(dir: &Path) -> anyhow::Result<ExitCode> {
    let log = log_dir(dir);
    anyhow::ensure!(log.is_dir(), "{}: no usage log here", log.display());
    let b64 = base64::engine::general_purpose::STANDARD;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut write_err = None;
    verify::for_each_record(&log, |seq, signed, rec| {
        let mut obj = match rec {
            Ok(r) => record::record_to_json(&r),
            Err(e) => serde_json::json!({ "decode_error": e }),
        };
        obj["seq"] = seq.into();
        obj["body"] = b64.encode(&signed.body).into();
        obj["signature"] = b64.encode(&signed.signature).into();
        if write_err.is_none() {
            if let Err(e) = writeln!(out, "{obj}") {
                write_err = Some(e);
            }
        }
    })?;
    match write_err {
        // A closed pipe (`| head`) is not an error.
        Some(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(e.into()),
        _ => {}
    }
    let _ = out.flush();
    Ok(ExitCode::SUCCESS)
}

/// `log salvage`.
pub fn salvage(dir: &Path) -> anyhow::Result<ExitCode> {
    let log = log_dir(dir);
    match mec_sync::log::salvage::salvage(&log)? {
        Some(report) => println!("{}", serde_json::to_string_pretty(&report)?),
        None => println!(
            "{}",
            serde_json::json!({ "salvaged": null, "message": "no damaged segment" })
        ),
    }
    Ok(ExitCode::SUCCESS)
}

/// A record shaped like the ones the agent will write.
pub fn sample_record(i: u64) -> UsageRecord {
    UsageRecord {
        record_id: uuid::Uuid::new_v4().as_bytes().to_vec(),
        imsi: format!("00101{:010}", i % 1_000_000),
        app_id: "bench-app".into(),
        model_id: "smollm2-135m-instruct-q4_1".into(),
        prompt_tokens: 180 + i % 50,
        cached_prompt_tokens: 120,
        completion_tokens: 64 + i % 200,
        reserved_tokens: 512,
        billed_tokens: 244 + i % 250,
        package_ids: vec!["monthly-2026-11".into()],
        outcome: Outcome::Completed as i32,
        start_time_unix_ms: 1_795_000_000_000 + i as i64,
        end_time_unix_ms: 1_795_000_000_900 + i as i64,
        clock_sync: ClockSync::Synchronized as i32,
        duration_us: 900_000,
        ttft_us: 45_000,
        offline: false,
        ..Default::default()
    }
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// `log bench`.
pub fn bench(args: &BenchArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        args.records > 0 && args.concurrency > 0,
        "--records and --concurrency must be at least 1"
    );
    let identity = NodeIdentity::load_or_create(&identity_dir(&args.dir))?;
    let options = LogOptions {
        backend: args.backend,
        commit_delay: Duration::from_micros(args.commit_delay_us),
        ..LogOptions::default()
    };
    let log = Arc::new(UsageLog::open(
        &log_dir(&args.dir),
        identity.clone(),
        &args.node_id,
        options,
    )?);
    let backend = log.backend();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (elapsed, mut latencies) = rt.block_on(async {
        let start = Instant::now();
        let mut tasks = Vec::new();
        for t in 0..args.concurrency {
            let n =
                args.records / args.concurrency + u64::from(t < args.records % args.concurrency);
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::with_capacity(n as usize);
                for i in 0..n {
                    let t0 = Instant::now();
                    log.append(sample_record(t * 1_000_003 + i)).await?;
                    lat.push(t0.elapsed().as_micros().min(u32::MAX as u128) as u32);
                }
                Ok::<_, mec_sync::log::LogError>(lat)
            }));
        }
        let mut all = Vec::with_capacity(args.records as usize);
        for t in tasks {
            all.extend(t.await??);
        }
        Ok::<_, anyhow::Error>((start.elapsed(), all))
    })?;
    drop(rt);
    latencies.sort_unstable();
    let stats = log.stats();
    let mut out = serde_json::json!({
        "backend": backend.as_str(),
        "records": args.records,
        "concurrency": args.concurrency,
        "commit_delay_us": args.commit_delay_us,
        "seconds": elapsed.as_secs_f64(),
        "records_per_s": args.records as f64 / elapsed.as_secs_f64(),
        "append_latency_us_p50": percentile(&latencies, 0.50),
        "append_latency_us_p99": percentile(&latencies, 0.99),
        "durable_seq": stats.durable_seq,
    });
    if let Ok(log) = Arc::try_unwrap(log) {
        log.close();
    }
    if args.baselines {
        out["fdatasync_per_s"] = fdatasync_rate(&args.dir, Duration::from_secs(2))?.into();
        out["sign_per_s_one_core"] = sign_rate(&identity, Duration::from_secs(2)).into();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let all: f64 = std::thread::scope(|s| {
            let handles: Vec<_> = (0..cores)
                .map(|_| s.spawn(|| sign_rate(&identity, Duration::from_secs(2))))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
        });
        out["sign_per_s_all_cores"] = all.into();
    }
    println!("{out}");
    Ok(ExitCode::SUCCESS)
}

/// The disk's limit for one sync per append: append 300 bytes, fdatasync, repeat.
fn fdatasync_rate(dir: &Path, d: Duration) -> anyhow::Result<f64> {
    use std::os::unix::fs::FileExt;
    let path = dir.join("fdatasync-probe.tmp");
    let f = std::fs::File::create(&path)?;
    let buf = [0x5au8; 300];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < d {
        f.write_all_at(&buf, n * 300)?;
        f.sync_data()?;
        n += 1;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    std::fs::remove_file(&path)?;
    Ok(rate)
}

/// Signing alone, on one core, for a body the size of a real record.
fn sign_rate(identity: &NodeIdentity, d: Duration) -> f64 {
    let body = record::encode_record(&sample_record(1));
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < d {
        for _ in 0..100 {
            std::hint::black_box(SignedRecord::sign(body.clone(), identity.signing_key()));
        }
        n += 100;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// `edge-agent log upload`: sends the log to core-ingest until every record
/// durable at the start is acknowledged; prints records/s.
pub fn upload(args: &crate::cli::UploadArgs) -> anyhow::Result<ExitCode> {
    let identity = NodeIdentity::load(&identity_dir(&args.dir))?;
    let read = |p: PathBuf| {
        std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
    };
    let config = mec_sync::uploader::UploaderConfig {
        core: args
            .core
            .parse()
            .with_context(|| format!("--core {:?}", args.core))?,
        server_name: args.server_name.clone(),
        ca_pem: read(args.core_ca.clone())?,
        cert_pem: read(StateDir::new(&args.dir).node_cert())?,
        key_pem: read(StateDir::new(&args.dir).node_key())?,
        limits: mec_sync::upload::WindowLimits {
            batch_records: args.batch_records,
            batch_bytes: 4 << 20,
            in_flight: 4,
        },
        transport: mec_sync::quic::TransportOptions::default(),
        poll: Duration::from_millis(20),
        ack_limit: None,
        downlink: None,
    };
    let log = Arc::new(UsageLog::open(
        &log_dir(&args.dir),
        identity,
        &args.node_id,
        LogOptions::default(),
    )?);
    let start = log.stats();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (elapsed, acked) = rt.block_on(async {
        let status = Arc::new(std::sync::Mutex::new(
            mec_sync::uploader::UploaderStatus::default(),
        ));
        let (stop, rx) = tokio::sync::watch::channel(false);
        let t0 = Instant::now();
        let task = tokio::spawn(mec_sync::uploader::run(
            log.clone(),
            config,
            status.clone(),
            rx,
        ));
        let deadline = t0 + Duration::from_secs(args.timeout_s);
        while log.stats().acked_seq < start.durable_seq && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let elapsed = t0.elapsed();
        let _ = stop.send(true);
        let _ = task.await;
        (elapsed, log.stats().acked_seq)
    });
    let records = acked.saturating_sub(start.acked_seq);
    println!(
        "{}",
        serde_json::json!({
            "records": records,
            "acked_seq": acked,
            "durable_seq": start.durable_seq,
            "seconds": elapsed.as_secs_f64(),
            "records_per_s": records as f64 / elapsed.as_secs_f64(),
        })
    );
    if acked < start.durable_seq {
        anyhow::bail!(
            "acknowledged {acked} of {} within {} s",
            start.durable_seq,
            args.timeout_s
        );
    }
    Ok(ExitCode::SUCCESS)
}
