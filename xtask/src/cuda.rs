//! `cargo xtask build-cuda`: the GPU build of the agent, with a toolchain it
//! installs itself.
//!
//! **Toolchain.** The CUDA 13 compiler comes from NVIDIA's PyPI wheels
//! ([`WHEELS`], one pinned version) installed into a virtual environment under
//! the user's cache (`~/.cache/mec-edge/cuda-<version>`), so every checkout
//! and every CI run on the machine shares one copy. The wheels lay out a
//! toolkit under `site-packages/nvidia/cu13` (`bin/nvcc`, `include`, `lib`,
//! `nvvm`), which becomes `CUDA_HOME`.
//!
//! **Linking without a driver.** candle links cudarc dynamically: the binary
//! needs `libcuda.so.1` (the driver), `libcublas`, `libcublasLt`, `libcurand`
//! and `libnvrtc` (which no wheel here carries) and `libcudart` (which the
//! runtime wheel does). For every library but `libcudart` we generate a stub
//! exporting every function cudarc declares for it, each returning that
//! library's "not available" status (`CUDA_ERROR_STUB_LIBRARY` for the driver),
//! as NVIDIA's own `lib64/stubs` do. The link names (`libcuda.so`…) sit in
//! `CUDA_HOME/lib/stubs`, where cudarc's build script looks; the run-time names
//! (`libcuda.so.1`…) in `<toolchain>/no-driver`, which only the no-driver test
//! puts on `LD_LIBRARY_PATH`: a box without a driver, as the binary sees it.
//!
//! **Targets.** See [`COMPUTE_CAP`].
//!
//! **Caching.** The kernels take minutes on two cores and do not depend on
//! our code. The release build shares the target directory of `cargo xtask
//! test` ([`ci::target_dir`], under the same cache): every dependency the CPU
//! build compiled is reused, and every checkout on the machine (and every CI
//! run in a fresh clone) reuses the kernels. A change of toolkit or targets
//! cleans them ([`build_agent`]). `cargo check` uses the checkout's `target/`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};

use crate::{cache_dir, cargo, ci, output, root, run};

/// The CUDA release every wheel is pinned to. cudarc 0.19 knows CUDA up to 13.4.
pub const CUDA_VERSION: &str = "13.4.92";

/// The wheels that make the toolkit (the cccl headers are versioned apart).
pub const WHEELS: [&str; 5] = [
    "nvidia-cuda-nvcc==13.4.92",
    "nvidia-cuda-runtime==13.4.92",
    "nvidia-cuda-crt==13.4.92",
    "nvidia-nvvm==13.4.92",
    "nvidia-cuda-cccl==13.3.5.0.6",
];

/// The GPU generation the kernels are compiled for: 7.5 (Turing, the T4),
/// the oldest that CUDA 13 supports, as machine code (SASS), plus its PTX.
///
/// Why: edge sites run T4 and A2 as often as L4, L40S or H100. SASS runs only
/// on its own generation, but PTX is compiled by the driver for the GPU it
/// finds (once, then cached), so `sm_75` + `compute_75` PTX runs on all of
/// them: T4 (7.5) natively, A2 (8.6), L4 and L40S (8.9), H100 (9.0) through
/// the driver's JIT. Each further SASS target would add as much compile time
/// again (minutes on two cores). The price: no kernel uses instructions newer
/// than Turing's, and candle leaves out its bf16 WMMA kernels below 8.0; the
/// agent runs the model in f32 on the GPU, which needs neither. A fleet of one
/// generation gets native code with `--compute-cap 89` (L4/L40S) or `90`.
pub const COMPUTE_CAP: u32 = 75;

/// The CUDA libraries the binary links, with the prefix of their functions,
/// cudarc's module that declares them, and the status a stub returns.
struct StubLib {
    /// Link name, without `lib` and `.so`.
    name: &'static str,
    /// The SONAME the binary records.
    soname: &'static str,
    /// cudarc's `src/<module>/sys/mod.rs`.
    module: &'static str,
    /// Functions of this library start so (and not with any `exclude`).
    prefix: &'static str,
    exclude: &'static [&'static str],
    /// The library's status for "not available".
    status: u32,
}

const STUB_LIBS: [StubLib; 5] = [
    StubLib {
        name: "cuda",
        soname: "libcuda.so.1",
        module: "driver",
        prefix: "cu",
        exclude: &["cuda", "cublas", "curand"],
        status: 34, // CUDA_ERROR_STUB_LIBRARY
    },
    StubLib {
        name: "cublas",
        soname: "libcublas.so.13",
        module: "cublas",
        prefix: "cublas",
        exclude: &["cublasLt"],
        status: 1, // CUBLAS_STATUS_NOT_INITIALIZED
    },
    StubLib {
        name: "cublasLt",
        soname: "libcublasLt.so.13",
        module: "cublaslt",
        prefix: "cublasLt",
        exclude: &[],
        status: 1, // CUBLAS_STATUS_NOT_INITIALIZED
    },
    StubLib {
        name: "curand",
        soname: "libcurand.so.10",
        module: "curand",
        prefix: "curand",
        exclude: &[],
        status: 203, // CURAND_STATUS_INITIALIZATION_FAILED
    },
    StubLib {
        name: "nvrtc",
        soname: "libnvrtc.so.13",
        module: "nvrtc",
        prefix: "nvrtc",
        exclude: &[],
        status: 7, // NVRTC_ERROR_BUILTIN_OPERATION_FAILURE
    },
];

/// An installed toolchain.
pub struct Toolchain {
    /// The venv and the stubs live here.
    pub dir: PathBuf,
    /// `site-packages/nvidia/cu13`: nvcc, headers, libcudart.
    pub cuda_home: PathBuf,
}

impl Toolchain {
    /// The toolkit's compiler.
    pub fn nvcc(&self) -> PathBuf {
        self.cuda_home.join("bin/nvcc")
    }

    /// What the compiled kernels depend on besides their sources: the
    /// compiler (its path names the CUDA version) and the targets. Kept
    /// beside them; a change cleans them (see [`build_agent`]).
    pub fn kernels_key(&self, compute_cap: u32) -> String {
        format!(
            "nvcc {}\ncuda {CUDA_VERSION}\ncompute_cap {compute_cap}\n",
            self.nvcc().display()
        )
    }

    /// The run-time stubs: a box with the CUDA libraries and no driver.
    pub fn no_driver_libs(&self) -> PathBuf {
        self.dir.join("no-driver")
    }

    /// The environment of a CUDA build for GPUs of generation `compute_cap`.
    pub fn apply(&self, cmd: &mut Command, compute_cap: u32) {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut paths = vec![self.cuda_home.join("bin")];
        paths.extend(std::env::split_paths(&path));
        cmd.env("CUDA_HOME", &self.cuda_home)
            // cudaforge reruns candle-kernels' build script when NVCC
            // changes (not when CUDA_HOME does): the path names the version.
            .env("NVCC", self.nvcc())
            .env("PATH", std::env::join_paths(paths).expect("PATH"))
            .env("CUDA_COMPUTE_CAP", compute_cap.to_string())
            // cudaforge asks for SASS only; the PTX beside it is what lets
            // newer GPUs run the statically linked kernels (see COMPUTE_CAP).
            .env(
                "NVCC_APPEND_FLAGS",
                format!("-gencode=arch=compute_{compute_cap},code=compute_{compute_cap}"),
            )
            .env("CUDAFORGE_THREADS", jobs().to_string());
    }
}

fn jobs() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// Installs the toolkit wheels and makes the stubs, once per machine.
pub fn ensure_toolchain() -> anyhow::Result<Toolchain> {
    let dir = cache_dir().join(format!("cuda-{CUDA_VERSION}"));
    let venv = dir.join("venv");
    let done = dir.join("installed");
    let wanted = WHEELS.join("\n");
    if std::fs::read_to_string(&done).ok().as_deref() != Some(wanted.as_str()) {
        eprintln!(
            "xtask: installing the CUDA {CUDA_VERSION} compiler from PyPI into {} (about 130 MB)",
            venv.display()
        );
        std::fs::create_dir_all(&dir)?;
        if !venv.join("bin/python").exists() {
            run(Command::new("python3").args(["-m", "venv"]).arg(&venv))
                .context("python3 -m venv failed (apt-get install python3-venv)")?;
        }
        run(Command::new(venv.join("bin/python"))
            .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
            .args(WHEELS))?;
        std::fs::write(&done, &wanted)?;
    }
    let site = std::fs::read_dir(venv.join("lib"))?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("site-packages/nvidia/cu13"))
        .find(|p| p.join("bin/nvcc").exists())
        .with_context(|| format!("no nvidia/cu13/bin/nvcc under {}", venv.display()))?;
    let version = output(Command::new(site.join("bin/nvcc")).arg("--version"))?;
    let release = CUDA_VERSION.rsplit_once('.').map_or(CUDA_VERSION, |p| p.0);
    if !version.contains(&format!("release {release}")) {
        bail!("{} is not CUDA {release}:\n{version}", site.display());
    }
    let toolchain = Toolchain {
        dir,
        cuda_home: site,
    };
    make_stubs(&toolchain)?;
    Ok(toolchain)
}

/// cudarc's source directory, as cargo resolved it.
fn cudarc_src() -> anyhow::Result<PathBuf> {
    let meta = output(cargo().args([
        "metadata",
        "--format-version",
        "1",
        "--all-features",
        "--filter-platform",
        "x86_64-unknown-linux-gnu",
    ]))?;
    let meta: serde_json::Value = serde_json::from_str(&meta)?;
    let manifest = meta["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "cudarc")
        .and_then(|p| p["manifest_path"].as_str())
        .context("cudarc is not in the dependency graph")?;
    Ok(Path::new(manifest).parent().unwrap().to_path_buf())
}

/// The functions a cudarc `sys` module declares with `prefix`.
fn declared_functions(source: &str, lib: &StubLib) -> Vec<String> {
    let mut names: Vec<String> = source
        .split("fn ")
        .skip(1)
        .filter_map(|rest| {
            let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))?;
            (rest[end..].starts_with('(')).then(|| rest[..end].to_string())
        })
        .filter(|n| n.starts_with(lib.prefix) && !lib.exclude.iter().any(|x| n.starts_with(x)))
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The C source of a stub: every function returns the library's status,
/// except the few that return a message (`...GetErrorString` and the like
/// return a string in some libraries).
fn stub_source(lib: &StubLib, functions: &[String]) -> String {
    let mut c = format!(
        "/* Generated by `cargo xtask build-cuda`: a stand-in for {} on a machine\n   \
         without it. Every function fails with status {}. */\n\
         static const char message[] = \"{} is a stub: no NVIDIA driver or CUDA library here\";\n",
        lib.soname, lib.status, lib.soname
    );
    for f in functions {
        if lib.name == "cuda" && (f == "cuGetErrorString" || f == "cuGetErrorName") {
            // cudarc names a driver error through these: let it say "stub".
            c.push_str(&format!(
                "int {f}(int error, const char **text) {{ *text = message; return 0; }}\n"
            ));
        } else if f.ends_with("GetErrorString")
            || f.ends_with("GetStatusString")
            || f.ends_with("GetStatusName")
        {
            c.push_str(&format!("const char *{f}(void) {{ return message; }}\n"));
        } else {
            c.push_str(&format!("long {f}(void) {{ return {}; }}\n", lib.status));
        }
    }
    c
}

fn make_stubs(toolchain: &Toolchain) -> anyhow::Result<()> {
    let link_dir = toolchain.cuda_home.join("lib/stubs");
    let run_dir = toolchain.no_driver_libs();
    let marker = toolchain.dir.join("stubs-made");
    let src = cudarc_src()?;
    // Made again when cudarc or this generator changes.
    let key = format!("{} generator 2", src.display());
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(key.as_str()) {
        return Ok(());
    }
    std::fs::create_dir_all(&link_dir)?;
    std::fs::create_dir_all(&run_dir)?;
    for lib in &STUB_LIBS {
        let sys = src.join("src").join(lib.module).join("sys/mod.rs");
        let source = std::fs::read_to_string(&sys).with_context(|| format!("{}", sys.display()))?;
        let functions = declared_functions(&source, lib);
        if functions.is_empty() {
            bail!("no {}* function found in {}", lib.prefix, sys.display());
        }
        let c_file = toolchain.dir.join(format!("stub-{}.c", lib.name));
        std::fs::write(&c_file, stub_source(lib, &functions))?;
        let so = run_dir.join(lib.soname);
        run(Command::new("cc")
            .args(["-shared", "-fPIC", "-O1", "-o"])
            .arg(&so)
            .arg(format!("-Wl,-soname,{}", lib.soname))
            .arg(&c_file))?;
        replace_link(&so, &link_dir.join(format!("lib{}.so", lib.name)))?;
    }
    // The real runtime, under the link name the kernels' build asks for, and
    // under its SONAME beside the stubs.
    let cudart = toolchain.cuda_home.join("lib/libcudart.so.13");
    replace_link(&cudart, &link_dir.join("libcudart.so"))?;
    replace_link(&cudart, &run_dir.join("libcudart.so.13"))?;
    std::fs::write(&marker, key)?;
    Ok(())
}

fn replace_link(target: &Path, link: &Path) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(link);
    std::os::unix::fs::symlink(target, link).with_context(|| format!("symlink {}", link.display()))
}

/// What `build-cuda` does.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `cargo check` of the workspace with the feature (kernels included).
    Check,
    /// The release binary, installed with its launcher in `target/cuda/`.
    Build,
    /// [`Mode::Build`], then the no-driver test against it.
    Test,
}

/// Where the build puts the launcher (`edge-agent-cuda`) and the binary
/// (`edge-agent-cuda.bin`), laid out as they are installed.
fn out_dir() -> PathBuf {
    root().join("target/cuda")
}

/// `cargo xtask build-cuda`: checks, builds or builds and tests.
pub fn build(mode: Mode, compute_cap: u32) -> anyhow::Result<()> {
    let toolchain = ensure_toolchain()?;
    if mode == Mode::Check {
        let started = Instant::now();
        let mut cmd = cargo();
        toolchain.apply(&mut cmd, compute_cap);
        run(cmd.args([
            "check",
            "--workspace",
            "--all-targets",
            "--features",
            "edge-agent/cuda",
        ]))?;
        eprintln!(
            "xtask: cargo check --features cuda took {} s (kernels for sm_{compute_cap})",
            started.elapsed().as_secs()
        );
        return Ok(());
    }
    let _lock = ci::lock_target()?;
    let launcher = build_agent(&toolchain, compute_cap, false)?;
    if mode == Mode::Test {
        // The same linted release build as `cargo xtask test`, so the CPU
        // binaries the test uses (it makes its configuration with
        // `edge-agent init`) share its artifacts.
        run(ci::linted_cargo()?
            .args(["test", "--release", "--workspace", "--test", "it", "--"])
            .args(["gpu::", "--include-ignored", "--nocapture"])
            .env("MEC_CUDA_AGENT", &launcher)
            .env("MEC_CUDA_NO_DRIVER_LIBS", toolchain.no_driver_libs()))?;
    }
    Ok(())
}

/// The release build of `edge-agent-cuda`, in the shared target directory
/// of `cargo xtask test` (so it shares every dependency the CPU build
/// compiled; the CUDA kernels are compiled once per machine and kept),
/// linted by clippy like the rest, at a lower CPU priority when asked
/// (beside the QEMU tests). Installs it with its launcher in `target/cuda/`;
/// returns the launcher's path.
///
/// candle-kernels' build script does not rerun when the toolkit changes,
/// and cudaforge's own cache of compiled objects does not know the compiler
/// either: when the toolkit or the targets differ from those the kernels
/// were compiled with ([`Toolchain::kernels_key`], stamped beside them),
/// they are cleaned first.
pub fn build_agent(
    toolchain: &Toolchain,
    compute_cap: u32,
    low_priority: bool,
) -> anyhow::Result<PathBuf> {
    let started = Instant::now();
    let target = ci::target_dir();
    let stamp = target.join("release/.cuda-kernels-key");
    let key = toolchain.kernels_key(compute_cap);
    let previous = std::fs::read_to_string(&stamp).ok();
    if previous.as_deref() != Some(key.as_str()) {
        if let Some(previous) = previous {
            eprintln!(
                "xtask: the CUDA kernels were compiled with\n{previous}and are wanted with\n{key}cleaning them"
            );
        }
        run(cargo()
            .args(["clean", "--release", "-q", "-p", "candle-kernels"])
            .env("CARGO_TARGET_DIR", &target))?;
    }
    let mut cmd = ci::linted_cargo()?;
    toolchain.apply(&mut cmd, compute_cap);
    if low_priority {
        ci::at_low_priority(&mut cmd);
    }
    // `--workspace`: the features unify as in the test build, so only what
    // the `cuda` feature changes is compiled here.
    run(cmd.args([
        "build",
        "--release",
        "--workspace",
        "--features",
        "edge-agent/cuda",
        "--bin",
        "edge-agent-cuda",
    ]))?;
    std::fs::create_dir_all(stamp.parent().unwrap())?;
    std::fs::write(&stamp, &key)?;
    let secs = started.elapsed().as_secs();
    let out = out_dir();
    std::fs::create_dir_all(&out)?;
    let bin = out.join("edge-agent-cuda.bin");
    std::fs::copy(target.join("release/edge-agent-cuda"), &bin)?;
    let launcher = out.join("edge-agent-cuda");
    std::fs::copy(root().join("edge-agent/edge-agent-cuda.sh"), &launcher)?;
    let size = std::fs::metadata(&bin)?.len();
    eprintln!(
        "xtask: built {} in {secs} s: {:.1} MiB (kernels for sm_{compute_cap} + PTX), launcher {}",
        bin.display(),
        size as f64 / (1 << 20) as f64,
        launcher.display()
    );
    Ok(launcher)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernels_key_changes_with_the_compiler_and_the_target() {
        let at = |dir: &str| Toolchain {
            dir: PathBuf::from(dir),
            cuda_home: PathBuf::from(dir).join("venv/site-packages/nvidia/cu13"),
        };
        let a = at("/cache/cuda-13.4.92");
        assert_eq!(a.kernels_key(75), a.kernels_key(75));
        assert!(a
            .kernels_key(75)
            .contains("cuda-13.4.92/venv/site-packages/nvidia/cu13/bin/nvcc"));
        assert_ne!(a.kernels_key(75), a.kernels_key(90), "another target");
        assert_ne!(
            a.kernels_key(75),
            at("/cache/cuda-13.0.88").kernels_key(75),
            "another toolkit"
        );
    }

    #[test]
    fn declared_functions_are_the_prefix_s_and_not_the_excluded() {
        let src = "extern \"C\" { pub fn cuInit(flags: u32) -> CUresult; \
                   pub fn cudaMalloc(p: *mut u8) -> u32; pub fn cublasCreate_v2(); }\n\
                   impl Lib { pub unsafe fn cuInit(&self) {} fn culib() -> &'static Lib {} \
                   pub fn cuMemAlloc_v2 (x: u8) {} }";
        let driver = &STUB_LIBS[0];
        assert_eq!(declared_functions(src, driver), vec!["cuInit", "culib"]);
        assert_eq!(
            declared_functions(src, &STUB_LIBS[1]),
            vec!["cublasCreate_v2"]
        );
    }

    #[test]
    fn stub_functions_return_the_library_status_or_a_message() {
        let c = stub_source(
            &STUB_LIBS[4],
            &["nvrtcVersion".into(), "nvrtcGetErrorString".into()],
        );
        assert!(c.contains("long nvrtcVersion(void) { return 7; }"), "{c}");
        assert!(c.contains("const char *nvrtcGetErrorString(void) { return message; }"));
        let c = stub_source(&STUB_LIBS[0], &["cuInit".into(), "cuGetErrorString".into()]);
        assert!(c.contains("long cuInit(void) { return 34; }"), "{c}");
        assert!(
            c.contains(
                "int cuGetErrorString(int error, const char **text) { *text = message; return 0; }"
            ),
            "{c}"
        );
    }
}
