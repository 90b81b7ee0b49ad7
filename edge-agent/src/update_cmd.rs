//! `edge-agent update status | apply`: the appliance's A/B slots. The
//! decisions and the order of writes live in `mec_update`; this finds the
//! operator's key and prints JSON.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use mec_update::apply::{self, BoxPaths};
use mec_update::health::{HealthGate, Verdict};
use mec_update::service::{self, Outcome, Request};
use serde_json::json;

use crate::cli::{BootHealthArgs, UpdateApplyArgs, UpdateServeArgs};

/// Prints the slots as JSON.
pub fn status() -> anyhow::Result<ExitCode> {
    let s = apply::status(&BoxPaths::system())
        .context("reading the slots (is the ESP mounted at /efi?)")?;
    println!("{}", serde_json::to_string_pretty(&s)?);
    Ok(ExitCode::SUCCESS)
}

/// The operator's image key from the provisioned `site.toml`: the only key
/// bundles are checked with.
fn operator_key(config: &std::path::Path) -> Result<ed25519_dalek::VerifyingKey, String> {
    let config = crate::config::Config::load(config).map_err(|e| e.to_string())?;
    let site_path = config.node.state_dir.join("site.toml");
    let site = mec_provisioning::site::SiteConfig::load(&site_path)
        .map_err(|e| format!("{}: {e}", site_path.display()))?
        .ok_or_else(|| {
            format!(
                "{} is missing: the box is not provisioned, so it has no operator image key and takes no update",
                site_path.display()
            )
        })?;
    let pem = site.image_signing_key.ok_or_else(|| {
        "the site configuration has no operator image key: re-provision with `edgeprov provision --image-key`; until then the box takes no update".to_string()
    })?;
    mec_image::manifest::parse_verifying_key(&pem).map_err(|e| format!("the site's image key: {e}"))
}

/// Applies a bundle through the update service's own code, printing its
/// JSON lines (progress, then `applied`, `refused` or `error`). Exit code 0
/// applied, 3 refused (nothing written), 2 an error.
pub fn apply(args: &UpdateApplyArgs) -> anyhow::Result<ExitCode> {
    let request = Request::Apply {
        bundle: args.bundle.clone(),
        allow_downgrade: args.allow_downgrade,
        retry_failed: args.retry_failed,
    };
    let stdout = std::io::stdout();
    let outcome = service::run(
        &BoxPaths::system(),
        || operator_key(&args.config),
        request,
        &mut stdout.lock(),
    )?;
    Ok(exit_code(outcome))
}

/// 0 done, 3 refused (nothing written), 2 an error.
fn exit_code(outcome: Outcome) -> ExitCode {
    match outcome {
        Outcome::Done => ExitCode::SUCCESS,
        Outcome::Refused => ExitCode::from(3),
        Outcome::Error => ExitCode::from(2),
    }
}

/// One request of the update service's protocol, on stdin and stdout.
/// Exit code as `apply`: 0 done, 3 refused, 2 an error.
pub fn serve_stdio(args: &UpdateServeArgs) -> anyhow::Result<ExitCode> {
    let stdout = std::io::stdout();
    let outcome = service::serve_one(
        &BoxPaths::system(),
        || operator_key(&args.config),
        std::io::stdin().lock(),
        &mut stdout.lock(),
    )?;
    Ok(exit_code(outcome))
}

/// `systemctl VERB -q UNIT` succeeded (`is-active`, `is-failed`).
fn systemctl_says(verb: &str, unit: &str) -> bool {
    std::process::Command::new("systemctl")
        .args([verb, "-q", unit])
        .status()
        .is_ok_and(|s| s.success())
}

/// systemd-boot's variable naming the entry file of a counted boot: present
/// only when this boot is one of an entry's tries.
pub const BOOT_COUNT_VAR: &str =
    "/sys/firmware/efi/efivars/LoaderBootCountPath-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f";

/// `boot-health`: see the command's help for the exit codes.
pub fn boot_health(args: &BootHealthArgs) -> anyhow::Result<ExitCode> {
    let on_trial = std::path::Path::new(BOOT_COUNT_VAR).exists();
    let verdict = match check_health(args) {
        Ok(()) => {
            tracing::info!(on_trial, "this boot is good");
            println!("{}", json!({ "boot": "good", "on_trial": on_trial }));
            return Ok(ExitCode::SUCCESS);
        }
        Err(e) => e,
    };
    println!(
        "{}",
        json!({ "boot": "bad", "on_trial": on_trial, "reason": format!("{verdict:#}") })
    );
    if on_trial {
        tracing::error!(reason = %format!("{verdict:#}"), "this boot is bad: rebooting, so systemd-boot counts the try");
        Ok(ExitCode::from(1))
    } else {
        tracing::error!(reason = %format!("{verdict:#}"), "this boot is bad, but it is not on trial: no slot to fall back to, no reboot");
        Ok(ExitCode::from(3))
    }
}

fn check_health(args: &BootHealthArgs) -> anyhow::Result<()> {
    let config = crate::config::Config::load(&args.config)
        .context("the agent's configuration does not load")?;
    let started = Instant::now();
    if !config.node.state_dir.join("site.toml").exists() {
        // Not provisioned: the box is waiting for its technician, which is
        // a good boot once the listener is up.
        loop {
            let up = systemctl_says("is-active", "edge-provision.service");
            if up {
                return Ok(());
            }
            if started.elapsed() >= Duration::from_secs(args.timeout) {
                anyhow::bail!("not provisioned, and the provisioning listener is not running");
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    let mut api: std::net::SocketAddr = config
        .api
        .listen
        .parse()
        .with_context(|| format!("api.listen {:?}", config.api.listen))?;
    if api.ip().is_unspecified() {
        api.set_ip(if api.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let url = format!("http://{api}/readyz");
    let mut gate = HealthGate::new(
        Duration::from_secs(args.ready_for),
        Duration::from_secs(args.timeout),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    loop {
        // An agent that gave up (its unit's start limit) will not become
        // ready: no point waiting out the timeout.
        if systemctl_says("is-failed", "edge-agent.service") {
            anyhow::bail!("edge-agent.service failed (it stopped restarting)");
        }
        let ready = rt.block_on(async {
            http.get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        });
        match gate.observe(started.elapsed(), ready) {
            Verdict::Good => break,
            Verdict::TimedOut { longest_ready } => anyhow::bail!(
                "the agent was not ready for {} s without a break within {} s (longest: {:.0} s)",
                args.ready_for,
                args.timeout,
                longest_ready.as_secs_f64()
            ),
            Verdict::Pending => std::thread::sleep(Duration::from_secs(2)),
        }
    }
    // The usage log, read-only, while the agent appends: a torn tail is not
    // a problem; segments released under the reader are, so a failure is
    // checked again before it counts.
    let key = mec_sync::identity::load_public_key(&config.state().node_pub())
        .context("the node's public key")?;
    let mut last = None;
    for _ in 0..3 {
        let report = mec_sync::log::verify::verify_log(&config.log_dir(), &key);
        if report.ok() {
            tracing::info!(records = report.records, "usage log verified");
            return Ok(());
        }
        last = Some(report.problems.join("; "));
        std::thread::sleep(Duration::from_secs(2));
    }
    anyhow::bail!(
        "the usage log does not verify: {}",
        last.unwrap_or_default()
    )
}
