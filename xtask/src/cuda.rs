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

/// The CUDA release every wheel is pinned to: the oldest CUDA 13, because
/// the driver must read the PTX the toolkit writes. A 13.x toolkit writes PTX
/// ISA 9.x, and a driver reads only the ISA of its own CUDA version or older:
/// on an H200 with driver 580 (the R580 long-term branch, CUDA 13.0), a
/// build made with 13.4 (PTX ISA 9.4) failed every kernel load with
/// `CUDA_ERROR_UNSUPPORTED_PTX_VERSION`, and the same build made with 13.0 ran.
/// The agent refuses the GPU up front on a driver older than this (see
/// `mec_inference::gpu`).
pub const CUDA_VERSION: &str = "13.0.88";

/// The wheels that make the toolkit (the cccl headers and the runtime are
/// versioned apart).
pub const WHEELS: [&str; 5] = [
    "nvidia-cuda-nvcc==13.0.88",
    "nvidia-cuda-runtime==13.0.96",
    "nvidia-cuda-crt==13.0.88",
    "nvidia-nvvm==13.0.88",
    "nvidia-cuda-cccl==13.0.85",
];

/// The generations edge sites run, compiled to machine code (SASS) by the
/// release build and the GPU bundle: 7.5 (T4), 8.0 (A100, A30), 8.6 (A2,
/// A10), 8.9 (L4, L40S), 9.0 (H100, H200). With SASS for its generation a
/// GPU runs the kernels at once; from PTX alone the driver compiles every
/// kernel at the first load (15 s on the H200), and again after every driver
/// update.
pub const FLEET: [u32; 5] = [75, 80, 86, 89, 90];

/// The kernels' targets: SASS for `sass`, and PTX of `ptx` for every newer
/// generation (the driver compiles it once for the GPU it finds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Targets {
    /// Machine code for these generations; the first is the lowest and is
    /// what candle-kernels' build sees as `CUDA_COMPUTE_CAP`.
    pub sass: Vec<u32>,
    pub ptx: u32,
}

impl Targets {
    /// One generation, as SASS and PTX: what CI compiles (each further SASS
    /// target costs as much compile time again, minutes on two cores). 7.5
    /// by default, the oldest CUDA 13 supports, so the PTX runs on all of the
    /// fleet. candle leaves out its bf16 WMMA kernels below 8.0; the agent
    /// runs the model in f32 on the GPU and needs neither.
    pub fn one(compute_cap: u32) -> Targets {
        Targets {
            sass: vec![compute_cap],
            ptx: compute_cap,
        }
    }

    /// The release build's and the GPU bundle's: SASS for every generation
    /// of [`FLEET`] and PTX of the newest for what comes after.
    pub fn fleet() -> Targets {
        Targets {
            sass: FLEET.to_vec(),
            ptx: *FLEET.last().unwrap(),
        }
    }

    /// The lowest generation (candle-kernels' `CUDA_COMPUTE_CAP`).
    pub fn base(&self) -> u32 {
        self.sass[0]
    }

    /// nvcc flags for every target besides the base's SASS, which
    /// candle-kernels' build asks for itself.
    pub fn extra_nvcc_flags(&self) -> String {
        let mut flags: Vec<String> = self.sass[1..]
            .iter()
            .map(|c| format!("-gencode=arch=compute_{c},code=sm_{c}"))
            .collect();
        flags.push(format!(
            "-gencode=arch=compute_{p},code=compute_{p}",
            p = self.ptx
        ));
        flags.join(" ")
    }

    /// Says what the kernels carry, for logs.
    pub fn describe(&self) -> String {
        let sass: Vec<String> = self.sass.iter().map(|c| format!("sm_{c}")).collect();
        format!("SASS {} + PTX compute_{}", sass.join(","), self.ptx)
    }
}

/// The generation CI compiles: see [`Targets::one`].
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
    pub fn kernels_key(&self, targets: &Targets) -> String {
        format!(
            "nvcc {}\ncuda {CUDA_VERSION}\ntargets {}\n",
            self.nvcc().display(),
            targets.describe()
        )
    }

    /// The run-time stubs: a box with the CUDA libraries and no driver.
    pub fn no_driver_libs(&self) -> PathBuf {
        self.dir.join("no-driver")
    }

    /// The environment of a CUDA build for `targets`.
    pub fn apply(&self, cmd: &mut Command, targets: &Targets) -> anyhow::Result<()> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut paths = vec![self.cuda_home.join("bin")];
        paths.extend(std::env::split_paths(&path));
        cmd.env("CUDA_HOME", &self.cuda_home)
            .env("PATH", std::env::join_paths(paths).expect("PATH"))
            // cudarc binds the API of this version (and the agent compares
            // the driver's with it at start).
            .env("CUDARC_CUDA_VERSION", cudarc_version())
            .env("CUDA_COMPUTE_CAP", targets.base().to_string())
            .env("CUDAFORGE_THREADS", jobs().to_string());
        // cudaforge reruns candle-kernels' build script when NVCC changes
        // (not when CUDA_HOME does): the path names the version.
        if targets.sass.len() == 1 {
            // One generation: its PTX rides along through nvcc's own
            // variable (cudaforge asks for the SASS only).
            cmd.env("NVCC", self.nvcc())
                .env("NVCC_APPEND_FLAGS", targets.extra_nvcc_flags());
        } else {
            // Several: nvcc refuses `--ptx` with more than one architecture,
            // and candle-kernels compiles its PTX modules that way, so the
            // further targets go only to the calls that make machine code
            // (the statically linked kernels), through a wrapper.
            cmd.env("NVCC", self.nvcc_wrapper(targets)?)
                .env_remove("NVCC_APPEND_FLAGS");
        }
        Ok(())
    }

    /// `nvcc` that adds `targets`' further flags to every call but a
    /// `--ptx` one; written beside the toolchain, named by the targets.
    fn nvcc_wrapper(&self, targets: &Targets) -> anyhow::Result<PathBuf> {
        let name: Vec<String> = targets.sass.iter().map(u32::to_string).collect();
        let path = self
            .dir
            .join(format!("nvcc-sm{}-ptx{}", name.join("-"), targets.ptx));
        let script = format!(
            "#!/bin/sh\n\
             # nvcc with further targets on every call that makes machine code\n\
             # (written by cargo xtask build-cuda: {describe})\n\
             for a in \"$@\"; do\n\
             \x20   case $a in --ptx | -ptx) exec '{nvcc}' \"$@\" ;; esac\n\
             done\n\
             exec '{nvcc}' \"$@\" {flags}\n",
            describe = targets.describe(),
            nvcc = self.nvcc().display(),
            flags = targets.extra_nvcc_flags(),
        );
        std::fs::write(&path, script).with_context(|| format!("writing {}", path.display()))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        Ok(path)
    }
}

/// [`CUDA_VERSION`] as cudarc spells it: `13.0.88` is `13000`.
fn cudarc_version() -> String {
    let mut parts = CUDA_VERSION.split('.');
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(13);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    format!("{}", major * 1000 + minor * 10)
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
pub fn build(mode: Mode, targets: &Targets) -> anyhow::Result<()> {
    let toolchain = ensure_toolchain()?;
    if mode == Mode::Check {
        let started = Instant::now();
        let mut cmd = cargo();
        toolchain.apply(&mut cmd, targets)?;
        run(cmd.args([
            "check",
            "--workspace",
            "--all-targets",
            "--features",
            "edge-agent/cuda",
        ]))?;
        eprintln!(
            "xtask: cargo check --features cuda took {} s (kernels: {})",
            started.elapsed().as_secs(),
            targets.describe()
        );
        return Ok(());
    }
    let _lock = ci::lock_target()?;
    let launcher = build_agent(&toolchain, targets, false)?;
    if mode == Mode::Test {
        // The same linted release build as `cargo xtask test`, so the CPU
        // binaries the test uses (it makes its configuration with
        // `edge-agent init`) share its artifacts.
        run(ci::linted_cargo()?
            .args(["test", "--release", "--workspace", "--test", "it", "--"])
            .args(["gpu::", "--include-ignored", "--nocapture"])
            .env("MEC_CUDA_AGENT", &launcher)
            .env("MEC_CUDA_NO_DRIVER_LIBS", toolchain.no_driver_libs()))?;
        crate::gpu_bundle::check_without_driver(&launcher, &toolchain.no_driver_libs())?;
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
    targets: &Targets,
    low_priority: bool,
) -> anyhow::Result<PathBuf> {
    let started = Instant::now();
    let target = ci::target_dir();
    let stamp = target.join("release/.cuda-kernels-key");
    let key = toolchain.kernels_key(targets);
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
    toolchain.apply(&mut cmd, targets)?;
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
        "xtask: built {} in {secs} s: {:.1} MiB (kernels: {}), launcher {}",
        bin.display(),
        size as f64 / (1 << 20) as f64,
        targets.describe(),
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
        let t75 = Targets::one(75);
        assert_eq!(a.kernels_key(&t75), a.kernels_key(&t75));
        assert!(a
            .kernels_key(&t75)
            .contains("cuda-13.4.92/venv/site-packages/nvidia/cu13/bin/nvcc"));
        assert_ne!(
            a.kernels_key(&t75),
            a.kernels_key(&Targets::one(90)),
            "another target"
        );
        assert_ne!(
            a.kernels_key(&t75),
            a.kernels_key(&Targets::fleet()),
            "more targets"
        );
        assert_ne!(
            a.kernels_key(&t75),
            at("/cache/cuda-13.0.88").kernels_key(&t75),
            "another toolkit"
        );
    }

    /// nvcc refuses `--ptx` with several architectures: the fleet's
    /// wrapper passes the further targets to every other call only.
    #[test]
    fn the_fleet_wrapper_adds_targets_except_to_ptx_calls() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let home = tmp.path().join("cu13");
        std::fs::create_dir_all(home.join("bin")).unwrap();
        let nvcc = home.join("bin/nvcc");
        std::fs::write(&nvcc, "#!/bin/sh\necho \"$@\"\n").unwrap();
        std::fs::set_permissions(&nvcc, std::fs::Permissions::from_mode(0o755)).unwrap();
        let toolchain = Toolchain {
            dir: tmp.path().to_path_buf(),
            cuda_home: home,
        };
        let fleet = Targets::fleet();
        let wrapper = toolchain.nvcc_wrapper(&fleet).unwrap();
        let args = |a: &[&str]| {
            let out = Command::new(&wrapper).args(a).output().unwrap();
            assert!(out.status.success(), "{out:?}");
            String::from_utf8(out.stdout).unwrap().trim().to_string()
        };
        assert_eq!(args(&["--ptx", "a b.cu"]), "--ptx a b.cu");
        assert_eq!(
            args(&["-c", "moe.cu"]),
            format!("-c moe.cu {}", fleet.extra_nvcc_flags())
        );
        let mut one = Command::new("true");
        toolchain.apply(&mut one, &Targets::one(75)).unwrap();
        let envs: Vec<_> = one.get_envs().collect();
        assert!(envs
            .iter()
            .any(|(k, v)| *k == "NVCC" && *v == Some(toolchain.nvcc().as_os_str())));
    }

    #[test]
    fn the_fleet_gets_sass_for_each_generation_and_ptx_of_the_newest() {
        let fleet = Targets::fleet();
        assert_eq!(fleet.base(), 75);
        assert_eq!(
            fleet.extra_nvcc_flags(),
            "-gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_86,code=sm_86 \
             -gencode=arch=compute_89,code=sm_89 -gencode=arch=compute_90,code=sm_90 \
             -gencode=arch=compute_90,code=compute_90"
        );
        assert_eq!(
            Targets::one(75).extra_nvcc_flags(),
            "-gencode=arch=compute_75,code=compute_75"
        );
        assert_eq!(cudarc_version(), "13000");
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
