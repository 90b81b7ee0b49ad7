//! The body of the agent's fuzz target: the configuration, which a
//! technician or a provisioning tool writes. `edge-agent/fuzz/` runs it under
//! libFuzzer (nightly); `tests/it/fuzz_smoke.rs` on stable for a bounded
//! count, in CI.

/// Any text as the agent's configuration: a clean error or a configuration
/// that passed its checks (its listen addresses parse, the admin API's on
/// loopback), never a panic; the error names the file.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = std::path::Path::new("fuzz.toml");
    match crate::config::Config::parse(text, path) {
        Ok(c) => {
            assert!(c.api.listen.parse::<std::net::SocketAddr>().is_ok());
            let admin: std::net::SocketAddr = c.admin.listen.parse().expect("checked");
            assert!(admin.ip().is_loopback());
        }
        Err(e) => assert!(e.to_string().contains("fuzz.toml"), "{e}"),
    }
}
