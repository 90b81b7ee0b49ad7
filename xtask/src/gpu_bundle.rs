//! `cargo xtask gpu-bundle`: one directory a technician copies to a box with
//! an NVIDIA driver to learn whether the GPU path works there, how well it
//! agrees with the CPU, and how fast it is, with no network and nothing
//! installed (see `xtask/gpu-bundle/check.sh`).
//!
//! `target/gpu-bundle/mec-gpu-check/`:
//! - `edge-agent-cuda` (the launcher) and `edge-agent-cuda.bin` (the CUDA
//!   build of `--compute-cap` or `--fleet`, line tables stripped);
//! - `model.gguf` (the default model);
//! - `check.sh`, `README.txt`, `SHA256SUMS`.
//!
//! With `--split-mib N`, also `mec-gpu-check.tar.part-000 ...` of at most N
//! MiB each, `PARTS.sha256` and `join.sh`, which checks, joins, unpacks and
//! runs the check.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use sha2::{Digest, Sha256};

use crate::cuda::{self, Targets};
use crate::{ci, root, run};

const CHECK_SH: &str = include_str!("../gpu-bundle/check.sh");
const JOIN_SH: &str = include_str!("../gpu-bundle/join.sh");
const NAME: &str = "mec-gpu-check";

const README: &str = "\
The GPU check of an edge box (written by `cargo xtask gpu-bundle`).

On a Linux box with the NVIDIA driver (nothing else to install, no network):

    ./check.sh [OUT_DIR]

It finds the CUDA 13 libraries (the toolkit's directories, the nvidia-*
Python packages' lib folders, or MEC_CUDA_LIBS=DIR:DIR), reports the driver
and the GPUs, then runs the agreement check (a fixed text teacher-forced on
the GPU against the CPU path and llama.cpp: top-1 agreement, largest logit
difference, perplexity) and the speed figures (time to first token for 200-
and 800-token prompts; decode tokens/s at 1, 16 and 64 streams;
MEC_SPEED=none skips them). Results: OUT_DIR/results.json and results.txt.
Exit 0: passed; 1: a figure outside its tolerance; 69: the build cannot
start here (a library missing: the output names it).
";

/// Builds the CUDA agent (unless `agent` names a launcher already built)
/// and writes the bundle under `out` (default `target/gpu-bundle`); returns
/// the bundle's directory.
pub fn bundle(
    out: Option<PathBuf>,
    split_mib: Option<u64>,
    targets: &Targets,
    agent: Option<PathBuf>,
) -> anyhow::Result<PathBuf> {
    let root = root();
    let model = crate::model::ensure(&root)?;
    let kernels = match &agent {
        Some(a) => format!("as {} was built", a.display()),
        None => targets.describe(),
    };
    let launcher = match agent {
        Some(a) => a,
        None => {
            let toolchain = cuda::ensure_toolchain()?;
            let _lock = ci::lock_target()?;
            cuda::build_agent(&toolchain, targets, false)?
        }
    };
    let bin = launcher.with_file_name("edge-agent-cuda.bin");
    anyhow::ensure!(
        bin.exists(),
        "{} is missing: the launcher's binary sits beside it (cargo xtask build-cuda)",
        bin.display()
    );
    let out = out.unwrap_or_else(|| root.join("target/gpu-bundle"));
    let dir = out.join(NAME);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir)?;
    copy_exec(&launcher, &dir.join("edge-agent-cuda"))?;
    // Line tables make up most of the binary and help no technician.
    let stripped = dir.join("edge-agent-cuda.bin");
    let strip = Command::new("strip")
        .arg("--strip-debug")
        .arg(&bin)
        .arg("-o")
        .arg(&stripped)
        .status();
    if !matches!(strip, Ok(s) if s.success()) {
        eprintln!("xtask: `strip` is not here: the binary goes in with its line tables");
        copy_exec(&bin, &stripped)?;
    }
    std::fs::copy(&model, dir.join("model.gguf"))?;
    write_exec(&dir.join("check.sh"), CHECK_SH)?;
    std::fs::write(dir.join("README.txt"), README)?;
    let mut sums = String::new();
    for f in [
        "edge-agent-cuda",
        "edge-agent-cuda.bin",
        "model.gguf",
        "check.sh",
        "README.txt",
    ] {
        sums.push_str(&format!(
            "{}  {f}\n",
            crate::model::sha256_file(&dir.join(f))?
        ));
    }
    std::fs::write(dir.join("SHA256SUMS"), sums)?;
    let size: u64 = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    eprintln!(
        "xtask: the GPU check bundle is {} ({:.1} MiB; kernels: {kernels}): run its check.sh on the box",
        dir.display(),
        size as f64 / (1 << 20) as f64,
    );
    if let Some(mib) = split_mib {
        let tar = out.join(format!("{NAME}.tar"));
        run(Command::new("tar")
            .arg("-C")
            .arg(&out)
            .arg("-cf")
            .arg(&tar)
            .arg(NAME))?;
        let parts = split(&tar, mib << 20)?;
        std::fs::remove_file(&tar)?;
        write_exec(&out.join("join.sh"), JOIN_SH)?;
        eprintln!(
            "xtask: and in {} parts of at most {mib} MiB in {}: copy the parts, PARTS.sha256 and join.sh, then run `sh join.sh`",
            parts.len(),
            out.display()
        );
    }
    Ok(dir)
}

/// What CI checks of the bundle: made from the CUDA build `launcher`, its
/// check.sh runs on a box with the CUDA libraries `libs` and no driver
/// (the stubs), where the check falls back to the CPU, says why, passes,
/// and writes both reports.
pub fn check_without_driver(launcher: &Path, libs: &Path) -> anyhow::Result<()> {
    let targets = Targets::one(cuda::COMPUTE_CAP); // unused: the launcher is built
                                                   // Its own directory: a technician's bundle in target/gpu-bundle stays.
    let out = root().join("target/gpu-bundle-ci");
    let dir = bundle(Some(out), None, &targets, Some(launcher.to_path_buf()))?;
    let results = dir.with_file_name("results-no-driver");
    let status = Command::new("sh")
        .arg(dir.join("check.sh"))
        .arg(&results)
        .env("MEC_CUDA_LIBS", libs)
        .env("MEC_SPEED", "200:1,2:8")
        .env("MEC_SYNTH", "tiny")
        .env("MEC_SYNTH_SPEED", "16:1:4")
        .status()
        .context("running check.sh")?;
    let json = std::fs::read_to_string(results.join("results.json"))
        .context("check.sh wrote no results.json")?;
    let report: serde_json::Value =
        serde_json::from_str(&json).with_context(|| format!("results.json is not JSON: {json}"))?;
    let check = &report["gpu_check"];
    anyhow::ensure!(
        status.success() && report["exit_code"] == 0 && check["pass"] == true,
        "check.sh failed ({status}): {report}"
    );
    anyhow::ensure!(
        check["device"]["kind"] == "cpu" && check["device"]["reason"].is_string(),
        "without a driver the check must run on the CPU and say why: {}",
        check["device"]
    );
    anyhow::ensure!(
        report["libraries"]["libcuda.so.1"].is_string(),
        "check.sh did not report the libraries it used: {report}"
    );
    anyhow::ensure!(
        check["speed"]["decode"]["decode_tokens_per_s_2_streams"].as_f64() > Some(0.0),
        "no speed figures: {check}"
    );
    anyhow::ensure!(
        report["synthetic_speed"]["speed"]["decode"]["decode_tokens_per_s_1_streams"].as_f64()
            > Some(0.0),
        "no speed figures of the synthetic model: {report}"
    );
    let text = std::fs::read_to_string(results.join("results.txt"))?;
    anyhow::ensure!(text.contains("PASS"), "results.txt says no PASS:\n{text}");
    eprintln!("xtask: the bundle's check.sh passed without a driver (its report is above)");
    Ok(())
}

/// Cuts `file` into `file.part-000`, `-001`, ... of at most `part_bytes`
/// each beside it, and writes their SHA-256 to `PARTS.sha256` in the same
/// directory (in order: `join.sh` joins them in that order). Removes older
/// parts of the same name first.
pub fn split(file: &Path, part_bytes: u64) -> anyhow::Result<Vec<PathBuf>> {
    anyhow::ensure!(part_bytes > 0, "a part must hold at least one byte");
    let dir = file.parent().context("the file has a directory")?;
    let name = file
        .file_name()
        .and_then(|n| n.to_str())
        .context("the file's name is UTF-8")?;
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        let stale = p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(&format!("{name}.part-")));
        if stale {
            std::fs::remove_file(&p)?;
        }
    }
    let mut src =
        std::fs::File::open(file).with_context(|| format!("reading {}", file.display()))?;
    let mut parts = Vec::new();
    let mut sums = String::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let path = dir.join(format!("{name}.part-{:03}", parts.len()));
        let mut hash = Sha256::new();
        let mut written = 0u64;
        let mut dst: Option<std::fs::File> = None;
        while written < part_bytes {
            let want = (part_bytes - written).min(buf.len() as u64) as usize;
            let n = src.read(&mut buf[..want])?;
            if n == 0 {
                break;
            }
            let f = match &mut dst {
                Some(f) => f,
                None => dst.insert(
                    std::fs::File::create(&path)
                        .with_context(|| format!("writing {}", path.display()))?,
                ),
            };
            f.write_all(&buf[..n])?;
            hash.update(&buf[..n]);
            written += n as u64;
        }
        let Some(f) = dst else { break };
        f.sync_all()?;
        sums.push_str(&format!(
            "{}  {}\n",
            hex::encode(hash.finalize()),
            path.file_name().unwrap().to_string_lossy()
        ));
        parts.push(path);
    }
    std::fs::write(dir.join("PARTS.sha256"), sums)?;
    Ok(parts)
}

fn copy_exec(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    set_exec(to)
}

fn write_exec(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    set_exec(path)
}

fn set_exec(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `--split-mib` writes, joined by the bundle's own join.sh, is
    /// the bundle again; a damaged part is refused before anything is
    /// unpacked.
    #[test]
    fn split_parts_are_joined_by_join_sh_and_a_damaged_one_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path();
        let src = out.join(NAME);
        std::fs::create_dir_all(&src).unwrap();
        let data: Vec<u8> = (0..2_500_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(src.join("model.gguf"), &data).unwrap();
        write_exec(&src.join("check.sh"), "#!/bin/sh\necho ran \"$@\"\n").unwrap();
        let tar = out.join(format!("{NAME}.tar"));
        run(Command::new("tar")
            .arg("-C")
            .arg(out)
            .arg("-cf")
            .arg(&tar)
            .arg(NAME))
        .unwrap();
        let parts = split(&tar, 1 << 20).unwrap();
        assert_eq!(parts.len(), 3, "2.5 MB and a tar header in 1 MiB parts");
        assert!(parts
            .iter()
            .all(|p| std::fs::metadata(p).unwrap().len() <= 1 << 20));
        std::fs::remove_file(&tar).unwrap();
        std::fs::remove_dir_all(&src).unwrap();
        write_exec(&out.join("join.sh"), JOIN_SH).unwrap();

        let joined = Command::new("sh")
            .arg(out.join("join.sh"))
            .arg("x")
            .output()
            .unwrap();
        assert!(joined.status.success(), "{joined:?}");
        assert_eq!(
            String::from_utf8_lossy(&joined.stdout).lines().last(),
            Some("ran x")
        );
        assert_eq!(std::fs::read(src.join("model.gguf")).unwrap(), data);

        // One byte flipped in the middle part.
        std::fs::remove_dir_all(&src).unwrap();
        let mut bytes = std::fs::read(&parts[1]).unwrap();
        bytes[1000] ^= 1;
        std::fs::write(&parts[1], bytes).unwrap();
        let refused = Command::new("sh")
            .arg(out.join("join.sh"))
            .output()
            .unwrap();
        assert_eq!(refused.status.code(), Some(65), "{refused:?}");
        assert!(String::from_utf8_lossy(&refused.stderr).contains("damaged"));
        assert!(!src.exists(), "nothing unpacked");
    }
}
