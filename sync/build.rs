//! Compiles `proto/usage.proto` and `proto/sync.proto` with protox (pure
//! Rust), so the build needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/usage.proto");
    println!("cargo:rerun-if-changed=proto/sync.proto");
    let file_descriptors = protox::compile(["proto/usage.proto", "proto/sync.proto"], ["proto"])?;
    prost_build::Config::new().compile_fds(file_descriptors)?;
    Ok(())
}
