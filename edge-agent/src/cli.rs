//! Command-line interface: a closed set of subcommands, parsed by clap, each
//! mapped to one function. Errors become a message on stderr and an exit code.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use mec_sync::log::BackendChoice;

/// Edge agent of a 5G MEC appliance: serves tokens, meters them, logs signed usage.
#[derive(Debug, Parser)]
#[command(name = "edge-agent", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Inspect, check and benchmark the durable usage log.
    #[command(subcommand)]
    Log(LogCommand),
    /// Generate text with a local model (for technicians and benchmarks).
    Generate(GenerateArgs),
    /// Check the GPU path on this box: the driver's and the build's CUDA
    /// versions, the GPUs, and a fixed text teacher-forced on the tensor
    /// path (on the GPU, or on the CPU where none can run) against the CPU
    /// path and llama.cpp's figures. Exit 1 when outside the tolerance.
    GpuCheck(GpuCheckArgs),
    /// Write a synthetic model for speed figures: llama-shaped (1.5b or 7b),
    /// random Q4_1 weights, the default model's tokenizer. Its text is
    /// noise. Prints one JSON object (parameters, bytes read per token).
    SynthModel(SynthModelArgs),
    /// Write a GGUF model again with its quantised weights in another block
    /// format (q8_0, q4_1, q4_0): the same weights, a different file (a
    /// second model for tests). Prints one JSON object.
    Requantize(RequantizeArgs),
    /// Sign a rate table with the operator's private key (PKCS#8 PEM):
    /// writes TABLE.sig beside it, the detached signature boxes check.
    SignRates(SignRatesArgs),
    /// Write a working configuration, a node identity and a dev app key into
    /// DIR; print them as one JSON object.
    Init(InitArgs),
    /// Run the agent: the MEC API and the admin API (until SIGTERM).
    Serve(ServeArgs),
    /// Manage token packages through the running agent's admin API.
    Admin(AdminArgs),
    /// Benchmark the inference engine; prints one JSON object
    /// (`cargo xtask bench-inference` runs it beside llama.cpp).
    BenchInference(BenchInferenceArgs),
    /// Benchmark structured output (decode with and without a JSON Schema,
    /// time to the first token with a large one); prints one JSON object
    /// (`cargo xtask bench-structured` runs it beside llama.cpp).
    #[command(hide = true)]
    BenchConstraint(BenchConstraintArgs),
    /// Answer a technician's `edgeprov` on a serial port: identity made on
    /// this box, node certificate, site configuration (until SIGTERM).
    ProvisionListen(ProvisionListenArgs),
    /// A/B updates of the appliance: the slots' state, applying a signed
    /// bundle to the slot not running.
    #[command(subcommand)]
    Update(UpdateCommand),
    /// Decide whether this boot is good (the image's edge-boot-health.service
    /// runs it before boot-complete.target): the agent ready for a while
    /// and the usage log verified, or, on a box not provisioned yet, the
    /// provisioning listener up. Exit 0: good; 1: bad on a boot being tried
    /// (the unit reboots, and systemd-boot counts the try); 3: bad, but
    /// this boot is not on trial (nothing to fall back to: no reboot).
    BootHealth(BootHealthArgs),
}

/// Arguments of `edge-agent boot-health`.
#[derive(Debug, Args, Clone)]
pub struct BootHealthArgs {
    /// The agent's configuration.
    #[arg(
        long,
        value_name = "FILE",
        default_value = "/etc/edge-agent/edge-agent.toml"
    )]
    pub config: PathBuf,
    /// How long the agent must answer ready without a break.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    pub ready_for: u64,
    /// How long to wait for that in all.
    #[arg(long, value_name = "SECONDS", default_value_t = 600)]
    pub timeout: u64,
}

/// `edge-agent update ...`.
#[derive(Debug, Subcommand)]
pub enum UpdateCommand {
    /// The slots, their versions and states, the slot that boots next (JSON).
    Status,
    /// Check a bundle against the operator's image key installed at
    /// provisioning, then write it to the slot not running and make that
    /// slot the next boot, with 3 tries (needs root: it writes a partition
    /// and the ESP). Prints JSON lines: progress, then the result.
    Apply(UpdateApplyArgs),
    /// Serve one request of the update service's protocol on stdin and
    /// stdout (the image's socket-activated `edge-update@.service` runs it,
    /// as root, for the agent's admin API).
    ServeStdio(UpdateServeArgs),
}

/// Arguments of `edge-agent update serve-stdio`.
#[derive(Debug, Args, Clone)]
pub struct UpdateServeArgs {
    /// The agent's configuration (its state directory holds `site.toml`,
    /// with the operator's image key).
    #[arg(
        long,
        value_name = "FILE",
        default_value = "/etc/edge-agent/edge-agent.toml"
    )]
    pub config: PathBuf,
}

/// Arguments of `edge-agent update apply`.
#[derive(Debug, Args, Clone)]
pub struct UpdateApplyArgs {
    /// The bundle: a file, or a block device holding one (a USB stick).
    #[arg(long, value_name = "FILE")]
    pub bundle: PathBuf,
    /// The agent's configuration (its state directory holds `site.toml`,
    /// with the operator's image key).
    #[arg(
        long,
        value_name = "FILE",
        default_value = "/etc/edge-agent/edge-agent.toml"
    )]
    pub config: PathBuf,
    /// Install a version older than, or the same as, the running one.
    #[arg(long)]
    pub allow_downgrade: bool,
    /// Install a version that failed its boot tries on this box before.
    #[arg(long)]
    pub retry_failed: bool,
}

/// Arguments of `edge-agent provision-listen`.
#[derive(Debug, Args, Clone)]
pub struct ProvisionListenArgs {
    /// The serial device (a USB-serial adapter, a console UART, a pty).
    #[arg(long, value_name = "DEV")]
    pub port: String,
    /// Line speed.
    #[arg(long, default_value_t = 115_200)]
    pub baud: u32,
    /// The agent's state directory (`node.state_dir`).
    #[arg(long, value_name = "DIR")]
    pub state_dir: PathBuf,
    /// The box's id as technicians see it [default: the DMI product serial
    /// when readable, or $RUNTIME_DIRECTORY/product_serial, else an id
    /// made once and kept in STATE_DIR/device-id].
    #[arg(long)]
    pub device_id: Option<String>,
}

/// Arguments of `edge-agent init`.
#[derive(Debug, Args, Clone)]
pub struct InitArgs {
    /// Directory for the configuration and the node's state (created).
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// GGUF model [default: models/SmolLM2-135M-Instruct.Q4_1.gguf, or $MEC_MODEL].
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// Node id [default: edge-<hostname>].
    #[arg(long)]
    pub node_id: Option<String>,
    /// Address of the MEC API.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub api_listen: String,
    /// Address of the admin API (loopback).
    #[arg(long, default_value = "127.0.0.1:8081")]
    pub admin_listen: String,
    /// Replace an existing configuration (the identity and the state are kept).
    #[arg(long)]
    pub force: bool,
    /// core-ingest's UDP address (host:port): usage records are uploaded there.
    #[arg(long, requires = "core_ca")]
    pub core: Option<String>,
    /// The operator CA (PEM) that issued core-ingest's certificate; copied to
    /// the identity directory.
    #[arg(long, requires = "core")]
    pub core_ca: Option<PathBuf>,
}

/// Arguments of `edge-agent serve`.
#[derive(Debug, Args, Clone)]
pub struct ServeArgs {
    /// The configuration file.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
}

/// Arguments of `edge-agent admin`.
#[derive(Debug, Args, Clone)]
pub struct AdminArgs {
    /// The agent's configuration file (for the admin address).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// What to do.
    #[command(subcommand)]
    pub command: AdminCommand,
}

/// `edge-agent admin ...`
#[derive(Debug, Subcommand, Clone)]
pub enum AdminCommand {
    /// Grant a package of tokens to a subscriber.
    Grant {
        /// Subscriber IMSI.
        #[arg(long)]
        imsi: String,
        /// Tokens (per month for monthly).
        #[arg(long)]
        tokens: u64,
        /// monthly, topup or trial.
        #[arg(long, default_value = "topup")]
        kind: String,
        /// Days of validity [default: 30; 365 for monthly].
        #[arg(long)]
        valid_days: Option<u32>,
        /// A model id or a tier of the rate table it may be spent on
        /// (repeat for several); absent: every model.
        #[arg(long = "model")]
        models: Vec<String>,
    },
    /// Revoke a package.
    Revoke {
        /// Bucket id (from grant or balance).
        #[arg(long)]
        bucket: u64,
    },
    /// A subscriber's balance and packages, as JSON.
    Balance {
        /// Subscriber IMSI.
        #[arg(long)]
        imsi: String,
    },
    /// A subscriber's recent requests, as JSON.
    Usage {
        /// Subscriber IMSI.
        #[arg(long)]
        imsi: String,
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Every model and its state (loaded, loading, unloaded, failed).
    Models,
    /// The rate table in force.
    Rates,
    /// Install a signed rate table (its signature in TABLE.sig): refused
    /// unless it verifies with the operator key and is newer.
    InstallRates {
        /// The rate table (TOML).
        #[arg(long)]
        table: PathBuf,
    },
    /// Load a model now (evicting the least recently used idle models its
    /// memory needs); waits for the load's end.
    Load {
        /// Model id or alias.
        #[arg(long)]
        model: String,
    },
    /// Unload a model (at once when idle, else when its requests end).
    Unload {
        /// Model id or alias.
        #[arg(long)]
        model: String,
    },
    /// Pin a model: never evicted nor unloaded for idleness.
    Pin {
        /// Model id or alias.
        #[arg(long)]
        model: String,
    },
    /// Unpin a model.
    Unpin {
        /// Model id or alias.
        #[arg(long)]
        model: String,
    },
}

/// Arguments of `edge-agent bench-inference`.
#[derive(Debug, Args, Clone)]
pub struct BenchInferenceArgs {
    /// GGUF model file [default: models/SmolLM2-135M-Instruct.Q4_1.gguf, or $MEC_MODEL].
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// Kernel threads.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(usize))]
    pub threads: usize,
    /// Least prompt tokens of the long prompt (after the chat template).
    #[arg(long, default_value_t = 200)]
    pub prompt_tokens: usize,
    /// Most tokens decoded per stream.
    #[arg(long, default_value_t = 128)]
    pub decode_tokens: usize,
    /// Write the prompt token ids used here (for the peer's run) to this file.
    #[arg(long, value_name = "PATH")]
    pub prompts_out: Option<PathBuf>,
}

/// Arguments of `edge-agent bench-constraint`.
#[derive(Debug, Args, Clone)]
pub struct BenchConstraintArgs {
    /// GGUF model file [default: models/SmolLM2-135M-Instruct.Q4_1.gguf, or $MEC_MODEL].
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// Kernel threads.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(usize))]
    pub threads: usize,
    /// Tokens decoded per run, with and without the schema.
    #[arg(long, default_value_t = 128)]
    pub decode_tokens: usize,
    /// Rounds (each figure is the median).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Write the prompt ids, stop ids and schemas used here (for the peer's run).
    #[arg(long, value_name = "PATH")]
    pub inputs_out: Option<PathBuf>,
}

/// Arguments of `edge-agent generate`.
#[derive(Debug, Args, Clone)]
pub struct GenerateArgs {
    /// GGUF model file [default: models/SmolLM2-135M-Instruct.Q4_1.gguf, or $MEC_MODEL].
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// The prompt: one user message through the chat template, unless --raw.
    #[arg(long)]
    pub prompt: String,
    /// Most completion tokens.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Seed for reproducible sampling.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Send the prompt as is, without the chat template.
    #[arg(long)]
    pub raw: bool,
    /// Print one JSON object with the text and the counts instead of streaming.
    #[arg(long)]
    pub json: bool,
    /// Where to run: `auto` (the GPU with the most free memory, else the
    /// CPU), `cpu`, or a GPU index; a GPU that cannot run the model falls
    /// back to the CPU, and the JSON says so.
    #[arg(long, default_value = "auto", value_parser = parse_device)]
    pub device: DeviceArg,
}

/// Arguments of `edge-agent gpu-check`.
#[derive(Debug, Args, Clone)]
pub struct GpuCheckArgs {
    /// GGUF model file [default: models/SmolLM2-135M-Instruct.Q4_1.gguf, or $MEC_MODEL].
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// Where the tensor path runs: `auto`, `cpu` or a GPU index (as
    /// `generate --device`).
    #[arg(long, default_value = "auto", value_parser = parse_device)]
    pub device: DeviceArg,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Also write the JSON object to this file.
    #[arg(long, value_name = "FILE")]
    pub json_out: Option<PathBuf>,
    /// Only the speed (needs --speed): for a synthetic model, whose
    /// random weights make agreement figures meaningless.
    #[arg(long, requires = "speed")]
    pub speed_only: bool,
    /// Also measure speed on the tensor path: time to first token for
    /// prompts of these lengths, then decode tokens/s with this many
    /// concurrent streams, this many tokens each, through the engine the
    /// agent serves with; e.g. `200,800:1,16,64:128`.
    #[arg(long, value_name = "PROMPTS:STREAMS:TOKENS", value_parser = parse_speed_plan)]
    pub speed: Option<SpeedPlan>,
}

/// Arguments of `edge-agent sign-rates`.
#[derive(Debug, Args, Clone)]
pub struct SignRatesArgs {
    /// The operator's private key (PKCS#8 PEM, as `cargo xtask image` or
    /// `edgeprov` make the image key).
    #[arg(long, value_name = "PATH")]
    pub key: PathBuf,
    /// The rate table (TOML).
    #[arg(long, value_name = "PATH")]
    pub table: PathBuf,
}

/// Arguments of `edge-agent requantize`.
#[derive(Debug, Args, Clone)]
pub struct RequantizeArgs {
    /// The model to read [default: the default model].
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// The file to write.
    #[arg(long, value_name = "PATH")]
    pub out: PathBuf,
    /// The block format: q8_0, q4_1 or q4_0.
    #[arg(long, default_value = "q8_0", value_parser = parse_block_format)]
    pub to: mec_inference::GgmlDType,
}

fn parse_block_format(s: &str) -> Result<mec_inference::GgmlDType, String> {
    use mec_inference::GgmlDType;
    match s.to_ascii_lowercase().as_str() {
        "q8_0" => Ok(GgmlDType::Q8_0),
        "q4_1" => Ok(GgmlDType::Q4_1),
        "q4_0" => Ok(GgmlDType::Q4_0),
        other => Err(format!("{other:?} is not one of q8_0, q4_1, q4_0")),
    }
}

/// Arguments of `edge-agent synth-model`.
#[derive(Debug, Args, Clone)]
pub struct SynthModelArgs {
    /// The shape: 1.5b, 7b (or tiny, for tests).
    #[arg(long, value_parser = parse_shape)]
    pub shape: mec_inference::synthetic::Shape,
    /// The file to write.
    #[arg(long, value_name = "PATH")]
    pub out: PathBuf,
    /// Where the tokenizer comes from [default: the default model].
    #[arg(long, value_name = "PATH")]
    pub tokenizer_from: Option<PathBuf>,
    /// Seed of the weights.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

fn parse_shape(s: &str) -> Result<mec_inference::synthetic::Shape, String> {
    mec_inference::synthetic::shape(s).ok_or_else(|| {
        let names: Vec<&str> = mec_inference::synthetic::SHAPES
            .iter()
            .map(|s| s.name)
            .collect();
        format!("{s:?} is not one of {}", names.join(", "))
    })
}

/// `gpu-check --speed`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpeedPlan {
    /// Prompt lengths for time to first token.
    pub prompt_tokens: Vec<usize>,
    /// Concurrent streams for decode rates.
    pub streams: Vec<usize>,
    /// Most tokens per stream.
    pub decode_tokens: usize,
}

fn parse_speed_plan(s: &str) -> Result<SpeedPlan, String> {
    let list = |part: &str, what: &str, max: usize| -> Result<Vec<usize>, String> {
        part.split(',')
            .map(|n| match n.trim().parse::<usize>() {
                Ok(v) if (1..=max).contains(&v) => Ok(v),
                _ => Err(format!("{what}: {n:?} is not a number from 1 to {max}")),
            })
            .collect()
    };
    let parts: Vec<&str> = s.split(':').collect();
    let [prompts, streams, tokens] = parts[..] else {
        return Err(format!(
            "{s:?} is not PROMPTS:STREAMS:TOKENS (e.g. 200,800:1,16,64:128)"
        ));
    };
    let decode_tokens = match tokens.trim().parse::<usize>() {
        Ok(v) if (1..=4096).contains(&v) => v,
        _ => {
            return Err(format!(
                "tokens per stream: {tokens:?} is not one number from 1 to 4096"
            ))
        }
    };
    Ok(SpeedPlan {
        prompt_tokens: list(prompts, "prompt tokens", 4096)?,
        streams: list(streams, "streams", 256)?,
        decode_tokens,
    })
}

/// `generate --device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceArg {
    /// Let discovery choose.
    Auto,
    /// The CPU.
    Cpu,
    /// This GPU.
    Gpu(u32),
}

fn parse_device(s: &str) -> Result<DeviceArg, String> {
    match s {
        "auto" => Ok(DeviceArg::Auto),
        "cpu" => Ok(DeviceArg::Cpu),
        n => n
            .parse()
            .map(DeviceArg::Gpu)
            .map_err(|_| format!("{n:?} is not auto, cpu or a GPU index")),
    }
}

/// Where a log lives: `DIR/identity/` holds the node keys, `DIR/log/` the
/// segments; `--config` reads the agent's own (its `node.state_dir`).
#[derive(Debug, Args, Clone)]
pub struct DirArg {
    /// The node's state directory (identity/ and log/ inside).
    #[arg(
        long,
        value_name = "DIR",
        required_unless_present = "config",
        conflicts_with = "config"
    )]
    pub dir: Option<PathBuf>,
    /// The agent's configuration file (the log of `node.state_dir`).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

impl DirArg {
    /// The state directory named by `--dir` or by the configuration.
    pub fn state_dir(&self) -> anyhow::Result<PathBuf> {
        match (&self.dir, &self.config) {
            (Some(d), _) => Ok(d.clone()),
            (None, Some(c)) => Ok(crate::config::Config::load(c)?.node.state_dir),
            (None, None) => anyhow::bail!("give --dir or --config"),
        }
    }
}

/// `edge-agent log ...`
#[derive(Debug, Subcommand)]
pub enum LogCommand {
    /// Check every frame, seq density, the hash chain and every signature
    /// against DIR/identity/node.pub; print a JSON summary; exit 1 on any problem.
    Verify(DirArg),
    /// Print every record as one JSON object per line.
    Dump(DirArg),
    /// Append N signed records from C concurrent tasks; print one JSON line.
    Bench(BenchArgs),
    /// Move the first damaged segment aside (into log/damaged/), keep its intact
    /// records, and record the lost seq range, so the log opens again.
    Salvage(DirArg),
    /// Upload the log to core-ingest until everything durable is acknowledged
    /// (a technician's catch-up, and the sync benchmark); print one JSON line.
    Upload(UploadArgs),
}

/// Arguments of `edge-agent log bench`.
#[derive(Debug, Args, Clone)]
pub struct BenchArgs {
    /// State directory; DIR/identity/ is created when missing.
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// Records to append.
    #[arg(long, default_value_t = 100_000)]
    pub records: u64,
    /// Concurrent appending tasks.
    #[arg(long, default_value_t = 256)]
    pub concurrency: u64,
    /// Backend: auto, uring or file.
    #[arg(long, default_value = "auto")]
    pub backend: BackendChoice,
    /// Group-commit delay in microseconds (see LogOptions::commit_delay).
    #[arg(long, default_value_t = 200)]
    pub commit_delay_us: u64,
    /// Also measure the disk's raw fdatasync rate and the signing rate, in the same run.
    #[arg(long)]
    pub baselines: bool,
    /// The node id the records carry (a node certificate for it uploads them).
    #[arg(long, default_value = "bench-node")]
    pub node_id: String,
}

/// Arguments of `edge-agent log upload`.
#[derive(Debug, Args, Clone)]
pub struct UploadArgs {
    /// State directory (identity/ with node.key and node.crt, log/).
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// The node id the log's records carry.
    #[arg(long)]
    pub node_id: String,
    /// core-ingest's UDP address.
    #[arg(long)]
    pub core: String,
    /// The operator CA (PEM).
    #[arg(long, value_name = "PEM")]
    pub core_ca: PathBuf,
    /// The name on the core's certificate.
    #[arg(long, default_value = "localhost")]
    pub server_name: String,
    /// Records per batch.
    #[arg(long, default_value_t = 2048)]
    pub batch_records: usize,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_s: u64,
}

/// Logs to journald when systemd connected stderr to the journal
/// (`JOURNAL_STREAM`), else to stderr, filtered by `EDGE_AGENT_LOG`
/// (default `info` for `serve`, `warn` otherwise).
fn init_tracing(serving: bool) {
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        // tracing's events reach the `log` facade (tracing's "log" feature),
        // and systemd-journal-logger writes them with their fields.
        if let Ok(journal) = systemd_journal_logger::JournalLog::new() {
            if journal.install().is_ok() {
                log::set_max_level(if serving {
                    log::LevelFilter::Info
                } else {
                    log::LevelFilter::Warn
                });
                return;
            }
        }
    }
    let default = if serving { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("EDGE_AGENT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Parses the command line, runs it, and maps the outcome to an exit code:
/// 0 success, 1 a check found problems, 2 an error (bad input, I/O).
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(matches!(
        cli.command,
        Command::Serve(_) | Command::ProvisionListen(_) | Command::BootHealth(_)
    ));
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("edge-agent: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Runs a parsed command.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Log(LogCommand::Verify(a)) => crate::log_cmd::verify(&a.state_dir()?),
        Command::Log(LogCommand::Dump(a)) => crate::log_cmd::dump(&a.state_dir()?),
        Command::Log(LogCommand::Bench(a)) => crate::log_cmd::bench(&a),
        Command::Log(LogCommand::Salvage(a)) => crate::log_cmd::salvage(&a.state_dir()?),
        Command::Log(LogCommand::Upload(a)) => crate::log_cmd::upload(&a),
        Command::Generate(a) => crate::generate_cmd::generate(&a),
        Command::BenchInference(a) => crate::bench_inference_cmd::bench(&a),
        Command::BenchConstraint(a) => crate::bench_constraint_cmd::bench(&a),
        Command::GpuCheck(a) => crate::gpu_check_cmd::check(&a),
        Command::SynthModel(a) => crate::gpu_check_cmd::synth_model(&a),
        Command::Requantize(a) => crate::gpu_check_cmd::requantize(&a),
        Command::SignRates(a) => sign_rates(&a),
        Command::Init(a) => crate::init_cmd::init(&a),
        Command::Serve(a) => {
            let config = crate::config::Config::load(&a.config)?;
            crate::server::serve(config)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Admin(a) => crate::admin_cmd::admin(&a),
        Command::ProvisionListen(a) => crate::provision_cmd::listen(&a),
        Command::Update(UpdateCommand::Status) => crate::update_cmd::status(),
        Command::Update(UpdateCommand::Apply(a)) => crate::update_cmd::apply(&a),
        Command::Update(UpdateCommand::ServeStdio(a)) => crate::update_cmd::serve_stdio(&a),
        Command::BootHealth(a) => crate::update_cmd::boot_health(&a),
    }
}

/// `edge-agent sign-rates`: checks the table parses, signs its bytes.
fn sign_rates(a: &SignRatesArgs) -> anyhow::Result<ExitCode> {
    let bytes =
        std::fs::read(&a.table).map_err(|e| anyhow::anyhow!("{}: {e}", a.table.display()))?;
    let key = mec_image::manifest::read_signing_key(&a.key)?;
    let signature = mec_image::manifest::sign_bytes(&bytes, &key);
    // What boxes will do with it, before it leaves this machine.
    let table = mec_metering::rating::RateTable::verify(&bytes, &signature, &key.verifying_key())?;
    let sig_path = crate::server::rates::signature_path(&a.table);
    std::fs::write(&sig_path, &signature)
        .map_err(|e| anyhow::anyhow!("{}: {e}", sig_path.display()))?;
    println!(
        "{}",
        serde_json::json!({
            "table": a.table,
            "signature": sig_path,
            "version": table.version,
            "digest": hex::encode(table.digest),
            "models": table.models.keys().collect::<Vec<_>>(),
        })
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_speed_plan_reads_three_lists_and_a_bad_one_says_which_part() {
        assert_eq!(
            parse_speed_plan("200,800:1,16,64:128"),
            Ok(SpeedPlan {
                prompt_tokens: vec![200, 800],
                streams: vec![1, 16, 64],
                decode_tokens: 128,
            })
        );
        let e = parse_speed_plan("200:0:8").unwrap_err();
        assert!(e.contains("streams: \"0\""), "{e}");
        let e = parse_speed_plan("200:1:8,16").unwrap_err();
        assert!(e.contains("tokens per stream: \"8,16\""), "{e}");
        let e = parse_speed_plan("200:1").unwrap_err();
        assert!(e.contains("PROMPTS:STREAMS:TOKENS"), "{e}");
    }
}
