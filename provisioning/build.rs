//! Compiles `proto/provision.proto` with protox (pure Rust), so the build
//! needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/provision.proto");
    let file_descriptors = protox::compile(["proto/provision.proto"], ["proto"])?;
    prost_build::Config::new().compile_fds(file_descriptors)?;
    Ok(())
}
