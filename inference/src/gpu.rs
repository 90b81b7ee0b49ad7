//! GPU discovery and telemetry through NVML, and the choice of device.
//!
//! NVML (`libnvidia-ml.so`) is loaded at run time by nvml-wrapper, so the
//! same binary runs on boxes with and without NVIDIA drivers: no library, no
//! device, or a build without the `cuda` feature all mean CPU, said once in
//! the log with the reason.
//!
//! The choice is a plain function of what was found ([`choose_device`]), so
//! it is tested without hardware.

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::Nvml;

/// One GPU as NVML reports it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct GpuInfo {
    /// NVML index (the CUDA ordinal on ordinary systems).
    pub index: u32,
    /// Product name.
    pub name: String,
    /// Memory in all, bytes.
    pub memory_total_bytes: u64,
    /// Memory free, bytes.
    pub memory_free_bytes: u64,
    /// GPU utilisation, percent.
    pub utilization_percent: Option<u32>,
    /// Core temperature, °C.
    pub temperature_c: Option<u32>,
    /// Power draw, milliwatts.
    pub power_mw: Option<u32>,
}

/// What discovery found.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Discovery {
    /// GPUs found (empty without NVML).
    pub gpus: Vec<GpuInfo>,
    /// Why there are none, when there are none.
    pub reason: Option<String>,
    /// The newest CUDA version the installed driver runs, as CUDA writes
    /// it (13000 = 13.0), when NVML says.
    pub cuda_driver_version: Option<u32>,
}

impl Discovery {
    /// Only GPU `index` (an operator pinning the model to one GPU); when it
    /// is not there, no GPU, with the reason naming what was found.
    pub fn only(self, index: u32) -> Discovery {
        if let Some(g) = self.gpus.iter().find(|g| g.index == index) {
            return Discovery {
                gpus: vec![g.clone()],
                reason: None,
                cuda_driver_version: self.cuda_driver_version,
            };
        }
        let found = if self.gpus.is_empty() {
            self.reason.unwrap_or_else(|| "no GPU".into())
        } else {
            let indexes: Vec<String> = self.gpus.iter().map(|g| g.index.to_string()).collect();
            format!("GPUs found: {}", indexes.join(", "))
        };
        Discovery {
            gpus: Vec::new(),
            reason: Some(format!(
                "GPU {index} was asked for and is not there ({found})"
            )),
            cuda_driver_version: self.cuda_driver_version,
        }
    }
}

/// Queries NVML; loads `lib_path` instead of the system library when given.
pub fn discover(lib_path: Option<&Path>) -> Discovery {
    let nvml = match lib_path {
        Some(p) => Nvml::builder().lib_path(p.as_os_str()).init(),
        None => Nvml::init(),
    };
    let nvml = match nvml {
        Ok(n) => n,
        Err(e) => {
            return Discovery {
                gpus: Vec::new(),
                reason: Some(format!("NVML is not available: {e}")),
                cuda_driver_version: None,
            }
        }
    };
    let cuda_driver_version = nvml
        .sys_cuda_driver_version()
        .ok()
        .and_then(|v| u32::try_from(v).ok());
    match read_all(&nvml) {
        Ok(gpus) if gpus.is_empty() => Discovery {
            gpus,
            reason: Some("NVML reports no GPU".into()),
            cuda_driver_version,
        },
        Ok(gpus) => Discovery {
            gpus,
            reason: None,
            cuda_driver_version,
        },
        Err(e) => Discovery {
            gpus: Vec::new(),
            reason: Some(format!("NVML failed: {e}")),
            cuda_driver_version,
        },
    }
}

fn read_all(nvml: &Nvml) -> Result<Vec<GpuInfo>, nvml_wrapper::error::NvmlError> {
    let mut out = Vec::new();
    for index in 0..nvml.device_count()? {
        let d = nvml.device_by_index(index)?;
        let mem = d.memory_info()?;
        out.push(GpuInfo {
            index,
            name: d.name().unwrap_or_else(|_| "unknown".into()),
            memory_total_bytes: mem.total,
            memory_free_bytes: mem.free,
            utilization_percent: d.utilization_rates().ok().map(|u| u.gpu),
            temperature_c: d.temperature(TemperatureSensor::Gpu).ok(),
            power_mw: d.power_usage().ok(),
        });
    }
    Ok(out)
}

/// Where the model runs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DeviceChoice {
    /// On the CPU, and why.
    Cpu {
        /// Why not a GPU.
        reason: String,
    },
    /// On CUDA device `index`.
    Cuda {
        /// NVML/CUDA index.
        index: u32,
    },
}

/// The policy: the GPU with the most free memory among those with room for
/// `needed_bytes` (weights plus KV cache), lowest index on a tie; CPU when the
/// build has no CUDA, when NVML found nothing, when the driver is older than
/// the CUDA version the build needs (`build`, see [`CUDA_BUILD`]), or when no
/// GPU has room.
pub fn choose_device(found: &Discovery, build: Option<u32>, needed_bytes: u64) -> DeviceChoice {
    let Some(needs) = build else {
        let seen = if found.gpus.is_empty() {
            String::new()
        } else {
            format!(" ({} GPU(s) present)", found.gpus.len())
        };
        return DeviceChoice::Cpu {
            reason: format!("built without the cuda feature{seen}"),
        };
    };
    if found.gpus.is_empty() {
        return DeviceChoice::Cpu {
            reason: found.reason.clone().unwrap_or_else(|| "no GPU".into()),
        };
    }
    if let Err(reason) = driver_runs(found.cuda_driver_version, needs) {
        return DeviceChoice::Cpu { reason };
    }
    found
        .gpus
        .iter()
        .filter(|g| g.memory_free_bytes >= needed_bytes)
        .max_by(|a, b| {
            a.memory_free_bytes
                .cmp(&b.memory_free_bytes)
                .then(b.index.cmp(&a.index))
        })
        .map(|g| DeviceChoice::Cuda { index: g.index })
        .unwrap_or_else(|| DeviceChoice::Cpu {
            reason: format!("no GPU has {} MiB free", needed_bytes >> 20),
        })
}

/// The KV pool's budget for `sequences` running at once, each up to the
/// context, and `extra_positions` more (the prefix cache), on the device
/// `choice` names: on a GPU, within half of the free memory `found` saw
/// there once the weights have room (three times the model file: the
/// weights, their dequantised copies, activations); unbounded on the CPU,
/// where the native path's caches grow in host memory.
pub fn kv_budget(
    found: &Discovery,
    choice: &DeviceChoice,
    model_bytes: u64,
    sequences: usize,
    extra_positions: usize,
) -> crate::model::KvBudget {
    let free = match choice {
        DeviceChoice::Cuda { index } => found
            .gpus
            .iter()
            .find(|g| g.index == *index)
            .map(|g| g.memory_free_bytes),
        DeviceChoice::Cpu { .. } => None,
    };
    crate::model::KvBudget {
        sequences,
        extra_positions,
        max_bytes: free.map(|f| f.saturating_sub(model_bytes * 3) / 2),
    }
}

/// Whether this build carries the CUDA backend.
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

/// The CUDA version this build's kernels and API were compiled for (13000 =
/// 13.0), which the driver must run; `None` without the `cuda` feature. A
/// driver reads PTX only up to its own CUDA version: an older one fails
/// every kernel load (`CUDA_ERROR_UNSUPPORTED_PTX_VERSION`), so the agent
/// refuses it up front instead.
#[cfg(feature = "cuda")]
pub const CUDA_BUILD: Option<u32> =
    Some(candle_core::cuda_backend::cudarc::driver::sys::CUDA_VERSION);
/// See the `cuda` build's definition.
#[cfg(not(feature = "cuda"))]
pub const CUDA_BUILD: Option<u32> = None;

/// `13000` as `13.0`.
pub fn cuda_version_text(v: u32) -> String {
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

/// Whether a driver that runs CUDA `driver` (unknown: `None`, let the device
/// open decide) runs a build that needs `needs`; the reason when not.
pub fn driver_runs(driver: Option<u32>, needs: u32) -> Result<(), String> {
    match driver {
        Some(d) if d < needs => Err(format!(
            "the NVIDIA driver runs CUDA up to {} and this build needs CUDA {} \
             (driver 580 or newer for 13.0): update the driver, or use the CPU build",
            cuda_version_text(d),
            cuda_version_text(needs)
        )),
        _ => Ok(()),
    }
}

/// The driver's CUDA version as the driver itself says (`cuDriverGetVersion`,
/// which needs no `cuInit`); `None` when no driver answers (a stub, none
/// installed) or the build has no CUDA.
pub fn cuda_driver_version() -> Option<u32> {
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let mut v: std::ffi::c_int = 0;
        // SAFETY: the driver writes one int through the pointer, which
        // outlives the call.
        let r = unsafe { sys::cuDriverGetVersion(&mut v) };
        if r == sys::CUresult::CUDA_SUCCESS {
            return u32::try_from(v).ok();
        }
    }
    None
}

/// Opens the chosen device. When the CUDA device cannot be opened (no
/// driver, a stub library, a device gone), the model runs on the CPU: the
/// returned choice is then `Cpu` with the reason, and a warning is logged.
/// candle's `cuda_if_available` would not fall back once the feature is
/// compiled in; this does.
pub fn open_device(choice: &DeviceChoice) -> (candle_core::Device, DeviceChoice) {
    match choice {
        DeviceChoice::Cpu { reason } => {
            tracing::info!(%reason, "inference runs on the CPU");
            (candle_core::Device::Cpu, choice.clone())
        }
        DeviceChoice::Cuda { index } => {
            if let Some(needs) = CUDA_BUILD {
                if let Err(why) = driver_runs(cuda_driver_version(), needs) {
                    return fall_back(*index, &why);
                }
            }
            open_cuda(*index)
        }
    }
}

fn open_cuda(index: u32) -> (candle_core::Device, DeviceChoice) {
    match candle_core::Device::new_cuda(index as usize) {
        Ok(d) => {
            tracing::info!(index, "inference runs on CUDA");
            (d, DeviceChoice::Cuda { index })
        }
        Err(e) => fall_back(index, &format!("cannot open the CUDA device: {e}")),
    }
}

/// The CPU, with a warning that CUDA device `index` failed for `why`.
pub fn fall_back(index: u32, why: &str) -> (candle_core::Device, DeviceChoice) {
    let reason = format!("GPU {index}: {}", one_line(why));
    tracing::warn!(%reason, "inference falls back to the CPU");
    (candle_core::Device::Cpu, DeviceChoice::Cpu { reason })
}

/// candle's errors can carry a backtrace over several lines; the first says it.
fn one_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s).trim()
}

/// The latest telemetry, for metrics.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TelemetrySnapshot {
    /// When it was taken.
    pub taken_at: SystemTime,
    /// What was found.
    pub discovery: Discovery,
}

/// Refreshes a [`TelemetrySnapshot`] every `period` on a thread of its own
/// until dropped. Without NVML it keeps an empty snapshot with the reason.
pub struct TelemetryPoller {
    latest: Arc<RwLock<TelemetrySnapshot>>,
    stop: Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TelemetryPoller {
    /// Starts polling.
    pub fn start(period: Duration, lib_path: Option<std::path::PathBuf>) -> TelemetryPoller {
        let first = TelemetrySnapshot {
            taken_at: SystemTime::now(),
            discovery: discover(lib_path.as_deref()),
        };
        let latest = Arc::new(RwLock::new(first));
        let stop = Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
        let (l, s) = (latest.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("gpu-telemetry".into())
            .spawn(move || loop {
                let (lock, cv) = &*s;
                let guard = cv.wait_timeout(lock.lock().unwrap(), period).unwrap().0;
                if *guard {
                    return;
                }
                drop(guard);
                let snap = TelemetrySnapshot {
                    taken_at: SystemTime::now(),
                    discovery: discover(lib_path.as_deref()),
                };
                *l.write().unwrap() = snap;
            })
            .ok();
        TelemetryPoller {
            latest,
            stop,
            thread,
        }
    }

    /// The latest snapshot.
    pub fn snapshot(&self) -> TelemetrySnapshot {
        self.latest.read().unwrap().clone()
    }
}

impl Drop for TelemetryPoller {
    fn drop(&mut self) {
        *self.stop.0.lock().unwrap() = true;
        self.stop.1.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(index: u32, free_gib: u64) -> GpuInfo {
        GpuInfo {
            index,
            name: format!("test-gpu-{index}"),
            memory_total_bytes: 24 << 30,
            memory_free_bytes: free_gib << 30,
            utilization_percent: Some(0),
            temperature_c: Some(40),
            power_mw: Some(50_000),
        }
    }

    fn found(gpus: Vec<GpuInfo>) -> Discovery {
        Discovery {
            gpus,
            reason: None,
            cuda_driver_version: Some(13000),
        }
    }

    #[test]
    fn policy_table() {
        let check = |d: Discovery, cuda: Option<u32>, need_gib: u64, want: DeviceChoice| {
            assert_eq!(choose_device(&d, cuda, need_gib << 30), want);
        };
        let cpu = |r: &str| DeviceChoice::Cpu { reason: r.into() };
        check(
            found(vec![gpu(0, 10)]),
            None,
            1,
            cpu("built without the cuda feature (1 GPU(s) present)"),
        );
        check(
            Discovery {
                gpus: vec![],
                reason: Some("NVML is not available: x".into()),
                cuda_driver_version: None,
            },
            Some(13000),
            1,
            cpu("NVML is not available: x"),
        );
        check(
            found(vec![gpu(0, 4), gpu(1, 10), gpu(2, 8)]),
            Some(13000),
            1,
            DeviceChoice::Cuda { index: 1 },
        );
        check(
            found(vec![gpu(0, 10), gpu(1, 10)]),
            Some(13000),
            1,
            DeviceChoice::Cuda { index: 0 },
        );
        check(
            found(vec![gpu(0, 2), gpu(1, 3)]),
            Some(13000),
            4,
            cpu("no GPU has 4096 MiB free"),
        );
    }

    #[test]
    fn the_kv_budget_is_half_of_what_the_chosen_gpu_leaves_after_the_weights() {
        let found = Discovery {
            gpus: vec![gpu(0, 1), gpu(1, 10)],
            reason: None,
            cuda_driver_version: Some(13000),
        };
        let model = 100 << 20;
        let b = kv_budget(&found, &DeviceChoice::Cuda { index: 1 }, model, 64, 4096);
        assert_eq!((b.sequences, b.extra_positions), (64, 4096));
        assert_eq!(b.max_bytes, Some(((10u64 << 30) - 3 * model) / 2));
        let cpu = DeviceChoice::Cpu { reason: "x".into() };
        assert_eq!(kv_budget(&found, &cpu, model, 4, 0).max_bytes, None);
    }

    #[test]
    fn a_driver_older_than_the_build_means_the_cpu_with_both_versions() {
        // The H200 box's 580 driver runs CUDA 13.0: a 13.4 build's PTX fails
        // there, a 13.0 build's runs; a 12.8 driver runs neither.
        let mut d = found(vec![gpu(0, 10)]);
        d.cuda_driver_version = Some(13000);
        assert_eq!(
            choose_device(&d, Some(13000), 1),
            DeviceChoice::Cuda { index: 0 }
        );
        let reason = match choose_device(&d, Some(13040), 1) {
            DeviceChoice::Cpu { reason } => reason,
            other => panic!("{other:?}"),
        };
        assert!(
            reason.starts_with(
                "the NVIDIA driver runs CUDA up to 13.0 and this build needs CUDA 13.4"
            ),
            "{reason}"
        );
        d.cuda_driver_version = Some(12080);
        assert!(matches!(
            choose_device(&d, Some(13000), 1),
            DeviceChoice::Cpu { reason } if reason.contains("up to 12.8") && reason.contains("needs CUDA 13.0")
        ));
        // A driver that does not say is left to the device open to decide.
        d.cuda_driver_version = None;
        assert_eq!(
            choose_device(&d, Some(13000), 1),
            DeviceChoice::Cuda { index: 0 }
        );
        assert_eq!(cuda_version_text(13000), "13.0");
        assert_eq!(cuda_version_text(12080), "12.8");
    }

    #[test]
    fn a_pinned_gpu_is_the_only_candidate_and_a_missing_one_says_so() {
        let three = found(vec![gpu(0, 4), gpu(1, 10), gpu(2, 8)]);
        assert_eq!(
            choose_device(&three.clone().only(2), Some(13000), 1),
            DeviceChoice::Cuda { index: 2 }
        );
        assert_eq!(
            choose_device(&three.only(7), Some(13000), 1),
            DeviceChoice::Cpu {
                reason: "GPU 7 was asked for and is not there (GPUs found: 0, 1, 2)".into()
            }
        );
        let none = Discovery {
            gpus: vec![],
            reason: Some("NVML is not available: x".into()),
            cuda_driver_version: None,
        };
        assert_eq!(
            choose_device(&none.only(0), Some(13000), 1),
            DeviceChoice::Cpu {
                reason: "GPU 0 was asked for and is not there (NVML is not available: x)".into()
            }
        );
    }

    #[test]
    fn missing_nvml_library_means_cpu_with_the_reason() {
        let d = discover(Some(Path::new("/nonexistent/libnvidia-ml.so.1")));
        assert!(d.gpus.is_empty());
        assert!(
            d.reason
                .as_deref()
                .unwrap()
                .contains("NVML is not available"),
            "{d:?}"
        );
        let choice = choose_device(&d, Some(13000), 1);
        assert!(
            matches!(choice, DeviceChoice::Cpu { ref reason } if reason.contains("NVML")),
            "{choice:?}"
        );
        assert!(open_device(&choice).0.is_cpu());
    }

    #[test]
    fn a_cuda_device_that_cannot_open_falls_back_to_the_cpu_with_the_reason() {
        // Without the cuda feature candle refuses every CUDA device; with it
        // and no driver (the stub libraries in CI), cuInit fails: either way
        // this machine cannot open GPU 0, and the choice says why.
        let (device, used) = open_device(&DeviceChoice::Cuda { index: 0 });
        assert!(device.is_cpu());
        match used {
            DeviceChoice::Cpu { reason } => {
                assert!(
                    reason.starts_with("GPU 0: cannot open the CUDA device"),
                    "{reason}"
                );
                assert!(!reason.contains('\n'), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn poller_without_nvml_keeps_an_empty_snapshot_and_stops() {
        let p = TelemetryPoller::start(
            Duration::from_millis(20),
            Some("/nonexistent/libnvidia-ml.so.1".into()),
        );
        std::thread::sleep(Duration::from_millis(60));
        let s = p.snapshot();
        assert!(s.discovery.gpus.is_empty());
        assert!(s.discovery.reason.is_some());
        drop(p);
    }
}
