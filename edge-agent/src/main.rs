//! `edge-agent`: thin main; everything lives in the library.
fn main() -> std::process::ExitCode {
    edge_agent::cli::main()
}
