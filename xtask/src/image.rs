//! `cargo xtask image`: the appliance disk, in one command. Installs the
//! Debian tools it needs (see [`crate::debian`]), builds the release agent,
//! fetches the model, then runs `mec_image::build` (see that crate for the
//! steps and the layout).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use mec_image::build::BuildOptions;
use mec_image::layout::Sizes;
use serde_json::json;

use crate::{cargo, debian, model, output, root, run};

/// The Debian suite of the image.
pub const SUITE: &str = "bookworm";

/// The Debian mirror this machine's apt uses (so the image comes from the
/// same place as the machine's own packages).
pub fn debian_mirror() -> anyhow::Result<String> {
    let deb822 =
        std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources").unwrap_or_default();
    for stanza in deb822.split("\n\n") {
        let field = |name: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
        };
        if let (Some(uris), Some(suites)) = (field("URIs:"), field("Suites:")) {
            if suites.split_whitespace().any(|s| s == SUITE) {
                if let Some(uri) = uris.split_whitespace().next() {
                    return Ok(uri.to_string());
                }
            }
        }
    }
    let list = std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    for l in list.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() >= 3 && f[0] == "deb" && f[2] == SUITE {
            return Ok(f[1].to_string());
        }
    }
    anyhow::bail!("no apt source for Debian {SUITE} in /etc/apt: set MEC_DEBIAN_MIRROR")
}

/// `cargo xtask image`: builds the release agent, then the image into `out`
/// (default `target/image`).
pub fn image(
    signing_key: Option<PathBuf>,
    version: Option<String>,
    out: Option<PathBuf>,
    test_bundles: bool,
) -> anyhow::Result<()> {
    run(cargo().args(["build", "--release", "-p", "edge-agent"]))?;
    let agent = root().join("target/release/edge-agent");
    build_image(&agent, signing_key, version, out, test_bundles)
}

/// Builds the image around the release agent binary `agent` (`cargo xtask
/// test` passes the one its test build made, so nothing is compiled again).
pub fn build_image(
    agent: &Path,
    signing_key: Option<PathBuf>,
    version: Option<String>,
    out: Option<PathBuf>,
    test_bundles: bool,
) -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_writer(std::io::stderr)
        .try_init();
    debian::ensure(&[&debian::IMAGE])?;
    let root = root();
    let model = model::ensure(&root)?;
    let out = out.unwrap_or_else(|| root.join("target/image"));
    std::fs::create_dir_all(&out)?;

    // The image-signing key: given, or a development key made once and
    // named as such in the manifest.
    let (signing_key, signing_pub, dev) = match signing_key {
        Some(k) => {
            let public = k.with_extension("pub");
            (k, public, false)
        }
        None => {
            let k = out.join("dev-image-signing.key");
            let p = out.join("dev-image-signing.pub");
            if !k.exists() {
                mec_image::manifest::generate_signing_key(&k, &p)?;
                eprintln!("made a DEVELOPMENT image-signing key: {}", k.display());
            }
            (k, p, true)
        }
    };
    if !signing_pub.exists() {
        let key = mec_image::manifest::read_signing_key(&signing_key)?;
        use ed25519_dalek::pkcs8::EncodePublicKey;
        std::fs::write(
            &signing_pub,
            key.verifying_key()
                .to_public_key_pem(Default::default())
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        )?;
    }
    // The app key the image's configuration accepts (a dev one, kept
    // beside the image).
    let app_key_path = out.join("dev-app-key");
    let app_key = match std::fs::read_to_string(&app_key_path) {
        Ok(k) => k.trim().to_string(),
        Err(_) => {
            let mut b = [0u8; 24];
            getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("{e}"))?;
            let k = format!("sk-image-{}", hex::encode(b));
            std::fs::write(&app_key_path, format!("{k}\n"))?;
            k
        }
    };
    let app_key_sha256 = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(app_key.as_bytes()))
    };
    let epoch = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) => v.parse().context("SOURCE_DATE_EPOCH")?,
        Err(_) => output(
            Command::new("git")
                .args(["log", "-1", "--format=%ct"])
                .current_dir(&root),
        )?
        .trim()
        .parse()
        .context("the commit time")?,
    };
    let mirror = match std::env::var("MEC_DEBIAN_MIRROR") {
        Ok(m) => m,
        Err(_) => debian_mirror()?,
    };
    let cache_dir = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .map(|d| d.join("mec-image"));
    let version = version.unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_string());
    let started = std::time::Instant::now();
    let options = BuildOptions {
        out_dir: out.clone(),
        work_dir: root.join("target/image-work"),
        cache_dir,
        mirror,
        suite: SUITE.into(),
        agent_binary: agent.to_path_buf(),
        model,
        model_id: "smollm2-135m-instruct".into(),
        version,
        epoch,
        app_key_sha256,
        signing_key: signing_key.clone(),
        dev_signing_key: dev,
        sizes: Sizes::default(),
    };
    let built = mec_image::build::build(&options)?;
    // The update bundle of the same build: slot A's root filesystem, kernel
    // and initrd, signed with the same key.
    let bundle_started = std::time::Instant::now();
    let bundle = out.join(format!("edge-{}.bundle", built.manifest.image_version));
    let key = mec_image::manifest::read_signing_key(&signing_key)?;
    let bundle_manifest = mec_update::bundle::write(
        &bundle,
        &mec_update::bundle::BundleInputs {
            version: &built.manifest.image_version,
            epoch,
            rootfs: &built.rootfs,
            kernel: &built.kernel,
            initrd: &built.initrd,
            key: &key,
            dev_signing_key: dev,
        },
    )?;
    let bundle_s = bundle_started.elapsed().as_secs_f64();
    let tests = if test_bundles {
        make_test_bundles(&options, &built, &out.join("test-bundles"))?
    } else {
        serde_json::Value::Null
    };
    let allocated = |p: &Path| -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0)
    };
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({
            "disk": built.disk,
            "disk_size": built.manifest.size,
            "disk_allocated": allocated(&built.disk),
            "qcow2": built.qcow2,
            "qcow2_size": std::fs::metadata(&built.qcow2).map(|m| m.len()).unwrap_or(0),
            "manifest": mec_image::manifest::manifest_path(&built.disk),
            "signing_public_key": signing_pub,
            "dev_signing_key": dev,
            "app_key_file": app_key_path,
            "sha256": built.manifest.sha256,
            "bundle": bundle,
            "bundle_size": std::fs::metadata(&bundle).map(|m| m.len()).unwrap_or(0),
            "bundle_rootfs_sha256": bundle_manifest.component("rootfs").map(|c| c.content_sha256.clone()),
            "bundle_s": (bundle_s * 10.0).round() / 10.0,
            "test_bundles": tests,
            "steps_s": built.steps.iter().map(|(n, s)| json!({ n.clone(): (s * 10.0).round() / 10.0 })).collect::<Vec<_>>(),
            "total_s": (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        }))?
    );
    Ok(())
}

/// The update tests' bundles, in `dir`: a newer good release (`next`), a
/// newer one whose agent never becomes ready (`never-ready`), an older one
/// (`older`), `next` signed by a key that is not the operator's
/// (`other-key`) and `next` with one byte of its kernel flipped
/// (`bad-hash`). Versions: the build's patch + 1 (`next`), + 2
/// (`never-ready`), and the release before the build's (`older`).
fn make_test_bundles(
    o: &BuildOptions,
    built: &mec_image::build::BuildOutput,
    dir: &Path,
) -> anyhow::Result<serde_json::Value> {
    use mec_image::build::{variant_rootfs, Variant};
    let started = std::time::Instant::now();
    std::fs::create_dir_all(dir)?;
    let key = mec_image::manifest::read_signing_key(&o.signing_key)?;
    let mut other = [0u8; 32];
    getrandom::fill(&mut other).map_err(|e| anyhow::anyhow!("{e}"))?;
    let other_key = ed25519_dalek::SigningKey::from_bytes(&other);
    let v = semver::Version::parse(&built.manifest.image_version)
        .context("the image version is not a semantic version")?;
    let bump = |n: u64| semver::Version::new(v.major, v.minor, v.patch + n).to_string();
    let older_v = if v.patch > 0 {
        semver::Version::new(v.major, v.minor, v.patch - 1)
    } else if v.minor > 0 {
        semver::Version::new(v.major, v.minor - 1, 0)
    } else if v.major > 0 {
        semver::Version::new(v.major - 1, 0, 0)
    } else {
        anyhow::bail!("the image version {v} has no older release to test with")
    }
    .to_string();
    let write = |name: &str, version: &str, rootfs: &Path, key: &ed25519_dalek::SigningKey| {
        let path = dir.join(format!("{name}.bundle"));
        mec_update::bundle::write(
            &path,
            &mec_update::bundle::BundleInputs {
                version,
                epoch: o.epoch,
                rootfs,
                kernel: &built.kernel,
                initrd: &built.initrd,
                key,
                dev_signing_key: o.dev_signing_key,
            },
        )
        .with_context(|| format!("writing {}", path.display()))?;
        anyhow::Ok(json!({ "bundle": path, "version": version }))
    };
    let next_v = bump(1);
    let next_root = variant_rootfs(o, &next_v, Variant::Good)?;
    let next = write("next", &next_v, &next_root, &key)?;
    let other_signed = write("other-key", &next_v, &next_root, &other_key)?;
    let _ = std::fs::remove_file(&next_root);
    let never_v = bump(2);
    let never_root = variant_rootfs(o, &never_v, Variant::AgentNeverReady)?;
    let never = write("never-ready", &never_v, &never_root, &key)?;
    let _ = std::fs::remove_file(&never_root);
    let older_root = variant_rootfs(o, &older_v, Variant::Good)?;
    let older = write("older", &older_v, &older_root, &key)?;
    let _ = std::fs::remove_file(&older_root);
    // One byte of the kernel flipped: the signature still holds (it covers
    // the manifest), the kernel's hash does not.
    let bad = dir.join("bad-hash.bundle");
    std::fs::copy(dir.join("next.bundle"), &bad)?;
    let offset = {
        let mut archive = tar::Archive::new(std::fs::File::open(&bad)?);
        let mut found = None;
        for e in archive.entries()? {
            let e = e?;
            if e.path()?.as_os_str() == "vmlinuz" {
                found = Some(e.raw_file_position() + e.size() / 2);
                break;
            }
        }
        found.context("no vmlinuz in the bundle")?
    };
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&bad)?;
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, offset)?;
        f.write_all_at(&[b[0] ^ 0x01], offset)?;
    }
    Ok(json!({
        "next": next,
        "never_ready": never,
        "older": older,
        "other_key": other_signed,
        "bad_hash": { "bundle": bad, "version": next_v, "flipped_offset": offset },
        "seconds": (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
    }))
}
