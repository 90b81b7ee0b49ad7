//! The edge agent of a MEC appliance.
//!
//! `edge-agent init` writes a configuration; `edge-agent serve` runs the MEC
//! API (`server`) over the inference engine, the quota ledger and the usage
//! log; `edge-agent admin` manages token packages; `edge-agent log …` and
//! `edge-agent generate` are the operator's tools; `edge-agent
//! provision-listen` is the box's end of serial provisioning; `edge-agent
//! update …` applies signed A/B update bundles (`mec-update`).
#![warn(missing_docs)]

pub mod admin_cmd;
pub mod bench_constraint_cmd;
pub mod bench_inference_cmd;
pub mod cli;
pub mod config;
#[doc(hidden)]
pub mod fuzz_targets;
pub mod generate_cmd;
pub mod gpu_check_cmd;
pub mod init_cmd;
pub mod log_cmd;
pub mod provision_cmd;
pub mod server;
pub mod update_cmd;

/// An HTTP client for the admin API: every request carries `token` (the
/// agent's `state_dir/admin.token`) as its bearer credential.
pub fn admin_client(token: &str) -> anyhow::Result<reqwest::Client> {
    let mut auth = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| anyhow::anyhow!("the admin token is not a header value"))?;
    auth.set_sensitive(true);
    let headers = reqwest::header::HeaderMap::from_iter([(reqwest::header::AUTHORIZATION, auth)]);
    Ok(reqwest::Client::builder()
        .default_headers(headers)
        .build()?)
}
