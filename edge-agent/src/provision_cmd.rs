//! `edge-agent provision-listen`: the box's end of serial provisioning. The
//! protocol and the state changes live in `mec_provisioning`; this wires a
//! serial port, the box's facts (id, software, GPUs) and signals.

use std::process::ExitCode;

use anyhow::Context;
use mec_provisioning::device::{Device, DeviceFacts};
use mec_provisioning::pb::Gpu;

use crate::cli::ProvisionListenArgs;

/// The box's id: the DMI product serial when it reads (it is root's
/// alone), or the copy a privileged `ExecStartPre=+` of the unit left in the
/// runtime directory (the image's `edge-provision.service` does), else the
/// machine id.
fn device_id() -> anyhow::Result<String> {
    let runtime_copy = std::env::var_os("RUNTIME_DIRECTORY")
        .map(|d| std::path::Path::new(&d).join("product_serial"))
        .unwrap_or_default();
    for path in [
        std::path::Path::new("/sys/class/dmi/id/product_serial"),
        runtime_copy.as_path(),
        std::path::Path::new("/etc/machine-id"),
    ] {
        if path.as_os_str().is_empty() {
            continue;
        }
        if let Ok(s) = std::fs::read_to_string(path) {
            let s = s.trim();
            let placeholder = s.is_empty()
                || s.eq_ignore_ascii_case("To be filled by O.E.M.")
                || s.eq_ignore_ascii_case("Not Specified")
                || s.chars().all(|c| c == '0');
            if !placeholder {
                return Ok(s.to_string());
            }
        }
    }
    anyhow::bail!(
        "no device id: neither a DMI product serial nor /etc/machine-id; pass --device-id"
    )
}

fn facts(args: &ProvisionListenArgs) -> anyhow::Result<DeviceFacts> {
    let gpus = mec_inference::gpu::discover(None);
    Ok(DeviceFacts {
        device_id: match &args.device_id {
            Some(id) => id.clone(),
            None => device_id()?,
        },
        firmware_version: format!("edge-agent {}", env!("CARGO_PKG_VERSION")),
        gpus: gpus
            .gpus
            .iter()
            .map(|g| Gpu {
                index: g.index,
                name: g.name.clone(),
                memory_bytes: g.memory_total_bytes,
            })
            .collect(),
        gpu_note: gpus.reason.unwrap_or_default(),
    })
}

/// Runs the listener until SIGTERM or SIGINT.
pub fn listen(args: &ProvisionListenArgs) -> anyhow::Result<ExitCode> {
    let facts = facts(args)?;
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating {}", args.state_dir.display()))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let port = mec_provisioning::serial::open_port(&args.port, args.baud)?;
        tracing::info!(port = %args.port, device_id = %facts.device_id, state_dir = %args.state_dir.display(), "provisioning listener ready");
        // A ready line on stdout for scripts and tests.
        println!(
            "{}",
            serde_json::json!({"event": "ready", "port": args.port, "device_id": facts.device_id})
        );
        let mut device = Device::new(&args.state_dir, facts);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        let stats = mec_provisioning::serial::serve_device(port, &mut device, shutdown)
            .await
            .with_context(|| format!("serial port {}", args.port))?;
        tracing::info!(?stats, "provisioning listener stopped");
        anyhow::Ok(ExitCode::SUCCESS)
    })
}
