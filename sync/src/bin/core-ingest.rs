//! `core-ingest`: the operator core's side of the usage upload. A thin
//! main over `mec_sync::core_ingest`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mec_sync::core_ingest::{self, CoreConfig, Format};
use mec_sync::core_packages;

/// Receives signed usage records from edge nodes over QUIC (mutual TLS),
/// stores each exactly once, and exports them for billing.
#[derive(Debug, Parser)]
#[command(name = "core-ingest", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write a dev operator CA, a server certificate and a configuration in DIR.
    Init {
        /// Directory (created).
        #[arg(long)]
        dir: PathBuf,
        /// UDP address to listen on.
        #[arg(long, default_value = "127.0.0.1:7443")]
        listen: String,
        /// More names for the server certificate (DNS names or IPs).
        #[arg(long)]
        san: Vec<String>,
        /// The store: a path or sqlite:PATH (default: core.sqlite in DIR),
        /// or postgres://USER@HOST[:PORT]/DB (the password from PGPASSWORD,
        /// ~/.pgpass or [postgres] password_file, never on the command line).
        #[arg(long)]
        store: Option<String>,
    },
    /// Receive records until SIGTERM.
    Serve {
        /// Configuration file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Issue a node certificate (dev and test enrollment).
    IssueNodeCert {
        /// Configuration file.
        #[arg(long)]
        config: PathBuf,
        /// The node's id (its usage records must name it).
        #[arg(long)]
        node_id: String,
        /// The node's public key, SPKI PEM (its identity/node.pub).
        #[arg(long)]
        public_key: PathBuf,
        /// Where to write the certificate (PEM).
        #[arg(long)]
        out: PathBuf,
    },
    /// Revoke a node certificate (a stolen box): its serial number goes on
    /// the operator's CRL; a running core refuses the node's next handshake.
    RevokeNodeCert {
        /// Configuration file.
        #[arg(long)]
        config: PathBuf,
        /// The certificate to revoke (PEM).
        #[arg(long)]
        cert: PathBuf,
    },
    /// Copy the configured store into another, empty one (SQLite into
    /// PostgreSQL), checking every signature and link again, and verify the
    /// copy; then point `store` at the new one.
    /// Benchmark (for `cargo xtask bench-grants`): simulated boxes against
    /// the core serving at --core, measuring the grants (JSON out).
    #[command(hide = true)]
    BenchGrants {
        /// The serving core's configuration file.
        #[arg(long)]
        config: PathBuf,
        /// Its UDP address.
        #[arg(long)]
        core: std::net::SocketAddr,
        /// Boxes asking at once.
        #[arg(long, default_value_t = 100)]
        boxes: usize,
        /// Grants each box asks for.
        #[arg(long, default_value_t = 20)]
        grants_per_box: usize,
        /// Round trips measured.
        #[arg(long, default_value_t = 200)]
        round_trips: usize,
        /// Revocations measured.
        #[arg(long, default_value_t = 20)]
        revocations: usize,
        /// A new directory for the boxes' keys and stores.
        #[arg(long)]
        dir: PathBuf,
    },
    CopyStore {
        /// Configuration file (its store is the source).
        #[arg(long)]
        config: PathBuf,
        /// The destination: postgres://USER@HOST[:PORT]/DB or a path.
        #[arg(long)]
        to: String,
    },
    /// Per node: records, highest contiguous seq, gaps, quarantine, chain (JSON).
    Audit {
        /// Configuration file.
        #[arg(long)]
        config: PathBuf,
    },
    /// The operator's token packages at the core: sell, revoke, balance.
    Package {
        #[command(subcommand)]
        action: PackageAction,
    },
    /// Records for billing, one row each or summed per IMSI per day.
    Export {
        /// Configuration file.
        #[arg(long)]
        config: PathBuf,
        /// csv or jsonl.
        #[arg(long, value_enum, default_value = "csv")]
        format: Format,
        /// Records ending at or after this (RFC 3339, YYYY-MM-DD or Unix seconds).
        #[arg(long)]
        from: Option<String>,
        /// Records ending before this.
        #[arg(long)]
        to: Option<String>,
        /// `imsi-day`: sums per IMSI per UTC day.
        #[arg(long, value_parser = ["imsi-day"])]
        group_by: Option<String>,
        /// Also write the subscribers' bills for the period (packages bought,
        /// tokens granted, used, overage, left) to this file, in the same
        /// format: one line per subscriber.
        #[arg(long)]
        summary: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum PackageAction {
    /// Sell a package to a subscriber (JSON out). The same --id sent again
    /// is the same sale; an --id used for another package is refused.
    Sell {
        /// Configuration file.
        #[arg(long)]
        config: PathBuf,
        /// Your id for this sale (from the BSS): the idempotency key.
        #[arg(long)]
        id: String,
        /// The subscriber.
        #[arg(long)]
        imsi: String,
        /// monthly (renews each month), topup or trial.
        #[arg(long, default_value = "topup")]
        kind: String,
        /// Tokens (a month's, for monthly).
        #[arg(long)]
        tokens: u64,
        /// Valid from (RFC 3339, YYYY-MM-DD or Unix seconds; default: now).
        #[arg(long)]
        from: Option<String>,
        /// Valid for this many days.
        #[arg(long, default_value_t = 30)]
        days: u32,
        /// The tier's name, for the bill.
        #[arg(long, default_value = "")]
        tier: String,
        /// A model it may be spent on (repeat; none: any model).
        #[arg(long = "model")]
        models: Vec<String>,
    },
    /// Revoke a package: no more grants from it (JSON names the open grants it touched).
    Revoke {
        /// Configuration file.
        #[arg(long)]
        config: PathBuf,
        /// The sale's id.
        #[arg(long)]
        id: String,
    },
    /// A subscriber's bill for a month (JSON): packages bought, tokens
    /// granted per box, tokens used per box and model, overage, what is left.
    Bill {
        /// Configuration file.
        #[arg(long)]
        config: PathBuf,
        /// The subscriber.
        #[arg(long)]
        imsi: String,
        /// The month, YYYY-MM (UTC; default: this month).
        #[arg(long)]
        month: Option<String>,
    },
    /// A subscriber's balance at the core (JSON).
    Balance {
        /// Configuration file.
        #[arg(long)]
        config: PathBuf,
        /// The subscriber.
        #[arg(long)]
        imsi: String,
    },
}

fn package(action: PackageAction) -> anyhow::Result<serde_json::Value> {
    let open = |config: &PathBuf| -> anyhow::Result<_> {
        let config = CoreConfig::load(config)?;
        Ok(config.location()?.open_charging(&config.postgres)?)
    };
    Ok(match action {
        PackageAction::Sell {
            config,
            id,
            imsi,
            kind,
            tokens,
            from,
            days,
            tier,
            models,
        } => core_packages::sell(
            &*open(&config)?,
            &core_packages::Sale {
                id,
                imsi,
                kind,
                tokens,
                from,
                days,
                tier,
                models,
            },
        )?,
        PackageAction::Revoke { config, id } => core_packages::revoke(&*open(&config)?, &id)?,
        PackageAction::Balance { config, imsi } => core_packages::balance(&*open(&config)?, &imsi)?,
        PackageAction::Bill {
            config,
            imsi,
            month,
        } => core_packages::bill(&*open(&config)?, &imsi, month.as_deref())?,
    })
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Init {
            dir,
            listen,
            san,
            store,
        } => {
            let made = core_ingest::init(&dir, &listen, &san, store.as_deref())?;
            println!("{}", serde_json::to_string_pretty(&made)?);
        }
        Command::Serve { config } => {
            let config = CoreConfig::load(&config)?;
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(core_ingest::serve(config))?;
        }
        Command::RevokeNodeCert { config, cert } => {
            let config = CoreConfig::load(&config)?;
            let pem = std::fs::read_to_string(&cert)
                .map_err(|e| anyhow::anyhow!("{}: {e}", cert.display()))?;
            let revoked = core_ingest::revoke_node_cert(&config, &pem)
                .map_err(|e| anyhow::anyhow!("{}: {e:#}", cert.display()))?;
            println!("{revoked}");
        }
        Command::IssueNodeCert {
            config,
            node_id,
            public_key,
            out,
        } => {
            let config = CoreConfig::load(&config)?;
            let pem = std::fs::read_to_string(&public_key)
                .map_err(|e| anyhow::anyhow!("{}: {e}", public_key.display()))?;
            std::fs::write(&out, core_ingest::issue(&config, &node_id, &pem)?)?;
            println!("{}", serde_json::json!({ "node_id": node_id, "cert": out }));
        }
        Command::BenchGrants {
            config,
            core,
            boxes,
            grants_per_box,
            round_trips,
            revocations,
            dir,
        } => {
            let config = CoreConfig::load(&config)?;
            let rt = tokio::runtime::Runtime::new()?;
            let figures = rt.block_on(mec_sync::bench_grants::bench(
                &config,
                &mec_sync::bench_grants::BenchOptions {
                    core,
                    boxes,
                    grants_per_box,
                    round_trips,
                    revocations,
                    dir,
                },
            ))?;
            println!("{}", serde_json::to_string_pretty(&figures)?);
        }
        Command::CopyStore { config, to } => {
            let config = CoreConfig::load(&config)?;
            let from = config.open_store()?;
            let base = std::env::current_dir()?;
            let to =
                mec_sync::ingest_store::StoreLocation::parse(&to, &base)?.open(&config.postgres)?;
            let report = core_ingest::copy_store(&*from, &*to)?;
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Command::Package { action } => {
            println!("{}", serde_json::to_string_pretty(&package(action)?)?);
        }
        Command::Audit { config } => {
            let config = CoreConfig::load(&config)?;
            println!(
                "{}",
                serde_json::to_string_pretty(&core_ingest::audit(&config)?)?
            );
        }
        Command::Export {
            config,
            format,
            from,
            to,
            group_by,
            summary,
        } => {
            let config = CoreConfig::load(&config)?;
            let from = from.as_deref().map(core_ingest::parse_time).transpose()?;
            let to = to.as_deref().map(core_ingest::parse_time).transpose()?;
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            core_ingest::export(&config, format, from, to, group_by.is_some(), &mut out)?;
            if let Some(path) = summary {
                let mut file = std::io::BufWriter::new(
                    std::fs::File::create(&path)
                        .map_err(|e| anyhow::anyhow!("creating {}: {e}", path.display()))?,
                );
                core_ingest::export_bills(&config, format, from, to, &mut file)?;
                std::io::Write::flush(&mut file)?;
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CORE_INGEST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("core-ingest: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
