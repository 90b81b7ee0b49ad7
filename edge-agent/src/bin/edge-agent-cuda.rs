//! `edge-agent-cuda`: the same agent built with the `cuda` feature (candle's
//! CUDA backend). It needs the CUDA libraries to start; without a GPU or a
//! driver it serves on the CPU and says why (see `mec_inference::gpu`).
fn main() -> std::process::ExitCode {
    edge_agent::cli::main()
}
