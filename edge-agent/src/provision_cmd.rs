//! `edge-agent provision-listen`: the box's end of serial provisioning. The
//! protocol and the state changes live in `mec_provisioning`; this wires a
//! serial port, the box's facts (id, software, GPUs) and signals.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use mec_provisioning::device::{Device, DeviceFacts, SlotReport, SlotSource};
use mec_provisioning::pb::Gpu;
use mec_provisioning::pb::SlotStatus;

use crate::cli::ProvisionListenArgs;

/// The box's id: the DMI product serial when it reads (it is root's
/// alone), or the copy a privileged `ExecStartPre=+` of the unit left in the
/// runtime directory (the image's `edge-provision.service` does), else an id
/// kept in the state directory. Not `/etc/machine-id`: on the image's
/// read-only root systemd makes a new one at every boot, and a technician
/// must see the same id before and after a reboot or an update (the state
/// directory is the data partition, which updates never touch).
fn device_id(state_dir: &Path) -> anyhow::Result<String> {
    let runtime_copy = std::env::var_os("RUNTIME_DIRECTORY")
        .map(|d| Path::new(&d).join("product_serial"))
        .unwrap_or_default();
    for path in [
        Path::new("/sys/class/dmi/id/product_serial"),
        runtime_copy.as_path(),
    ] {
        if path.as_os_str().is_empty() {
            continue;
        }
        if let Ok(s) = std::fs::read_to_string(path) {
            if let Some(serial) = real_serial(&s) {
                return Ok(serial);
            }
        }
    }
    kept_device_id(state_dir)
}

/// A DMI serial, unless it is one of the placeholders firmware vendors
/// leave in unset fields.
fn real_serial(s: &str) -> Option<String> {
    let s = s.trim();
    let placeholder = s.is_empty()
        || s.eq_ignore_ascii_case("To be filled by O.E.M.")
        || s.eq_ignore_ascii_case("Not Specified")
        || s.eq_ignore_ascii_case("Default string")
        || s.eq_ignore_ascii_case("System Serial Number")
        || s.chars().all(|c| c == '0');
    (!placeholder).then(|| s.to_string())
}

/// `<state_dir>/device-id`, made once with a random id and read after.
fn kept_device_id(state_dir: &Path) -> anyhow::Result<String> {
    let path = mec_node::state::StateDir::new(state_dir).device_id();
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("random device id: {e}"))?;
    let id = format!("edge-{}", hex::encode(bytes));
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    // Written whole then renamed, so a power cut leaves no half id.
    let tmp = state_dir.join("device-id.tmp");
    std::fs::write(&tmp, format!("{id}\n"))
        .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
        .and_then(|()| std::fs::rename(&tmp, &path))
        .and_then(|()| std::fs::File::open(state_dir)?.sync_all())
        .with_context(|| format!("writing {}", path.display()))?;
    tracing::info!(%id, path = %path.display(), "no DMI serial: made a device id");
    Ok(id)
}

fn facts(args: &ProvisionListenArgs) -> anyhow::Result<DeviceFacts> {
    let gpus = mec_inference::gpu::discover(None);
    Ok(DeviceFacts {
        device_id: match &args.device_id {
            Some(id) => id.clone(),
            None => device_id(&args.state_dir)?,
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
        // Why the model would not run on a GPU here: none found, or found
        // but unusable (a driver older than the build needs, a CPU build).
        gpu_note: match gpus.reason.clone() {
            Some(reason) => reason,
            None => {
                match mec_inference::gpu::choose_device(&gpus, mec_inference::gpu::CUDA_BUILD, 0) {
                    mec_inference::gpu::DeviceChoice::Cpu { reason } => reason,
                    mec_inference::gpu::DeviceChoice::Cuda { .. } => String::new(),
                }
            }
        },
        slots: Some(SlotSource(std::sync::Arc::new(read_slots))),
    })
}

/// The appliance's slots for `edgeprov status` (read from the ESP, which
/// the agent's group may read).
fn read_slots() -> SlotReport {
    let paths = mec_update::apply::BoxPaths::system();
    match mec_update::apply::status(&paths) {
        Ok(s) => SlotReport {
            slots: s
                .slots
                .iter()
                .map(|x| SlotStatus {
                    slot: x.slot.name().into(),
                    state: x.state.name().into(),
                    version: x.version.clone().unwrap_or_default(),
                    booted: x.booted,
                    next_boot: x.next_boot,
                    tries_left: x.tries_left.unwrap_or(0),
                })
                .collect(),
            running_version: s.running_version.unwrap_or_default(),
            note: String::new(),
        },
        Err(e) => SlotReport {
            note: format!("cannot read the slots: {e}"),
            ..SlotReport::default()
        },
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firmware_placeholders_are_not_serials() {
        for s in [
            "",
            "  \n",
            "To be filled by O.E.M.",
            "Not Specified",
            "0000000",
            "Default string",
        ] {
            assert_eq!(real_serial(s), None, "{s:?}");
        }
        assert_eq!(real_serial("SN-QEMU-0001\n"), Some("SN-QEMU-0001".into()));
    }

    #[test]
    fn the_kept_device_id_is_made_once_and_survives_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let first = kept_device_id(&state).unwrap();
        assert!(first.starts_with("edge-") && first.len() == 21, "{first}");
        assert_eq!(kept_device_id(&state).unwrap(), first);
        assert_eq!(
            std::fs::read_to_string(state.join("device-id")).unwrap(),
            format!("{first}\n")
        );
        assert!(!state.join("device-id.tmp").exists());
        // Another box's state directory gets another id.
        assert_ne!(kept_device_id(&dir.path().join("other")).unwrap(), first);
        // An empty file (a cut before the rename never leaves one, but a
        // technician might) gets a fresh id rather than an empty one.
        std::fs::write(state.join("device-id"), "").unwrap();
        assert!(kept_device_id(&state).unwrap().starts_with("edge-"));
    }
}
