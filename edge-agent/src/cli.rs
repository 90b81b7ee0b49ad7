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
    /// Benchmark the inference engine; prints one JSON object
    /// (`cargo xtask bench-inference` runs it beside llama.cpp).
    BenchInference(BenchInferenceArgs),
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
}

/// Where a log lives: `DIR/identity/` holds the node keys, `DIR/log/` the segments.
#[derive(Debug, Args, Clone)]
pub struct DirArg {
    /// The node's state directory (identity/ and log/ inside).
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
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
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("EDGE_AGENT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Parses the command line, runs it, and maps the outcome to an exit code:
/// 0 success, 1 a check found problems, 2 an error (bad input, I/O).
pub fn main() -> ExitCode {
    init_tracing();
    let cli = Cli::parse();
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
        Command::Log(LogCommand::Verify(a)) => crate::log_cmd::verify(&a.dir),
        Command::Log(LogCommand::Dump(a)) => crate::log_cmd::dump(&a.dir),
        Command::Log(LogCommand::Bench(a)) => crate::log_cmd::bench(&a),
        Command::Log(LogCommand::Salvage(a)) => crate::log_cmd::salvage(&a.dir),
        Command::Generate(a) => crate::generate_cmd::generate(&a),
        Command::BenchInference(a) => crate::bench_inference_cmd::bench(&a),
    }
}
