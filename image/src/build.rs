//! Building the disk, step by step, with Debian's tools and no loop device
//! and no mount (both fail in containers):
//!
//! 1. the Debian base: `debootstrap --variant=minbase` into a directory
//!    (cached as a tarball keyed by the suite and package list, so a second
//!    build skips the download; the cache is named in the log);
//! 2. our files added: the agent binary (its DWARF split off into
//!    `edge-agent.debug` beside the image; the CPU build, the right one for
//!    a disk with no NVIDIA driver: the CUDA build, `cargo xtask
//!    build-cuda`, would need the driver's libraries to start at all), the
//!    model, the configuration,
//!    the units, mounts and users (the user made with `useradd` in a chroot; units
//!    enabled with `systemctl --root`);
//! 3. every timestamp set to the build's fixed time;
//! 4. filesystems made from directories: `mke2fs -d` (root A, the empty data
//!    partition) with fixed UUIDs, hash seeds and time
//!    (`E2FSPROGS_FAKE_TIME`), then every inode's ctime and atime pinned
//!    with `debugfs` (mke2fs copies them from the build tree); the ESP with
//!    `mkfs.fat --invariant` and `mcopy -m` (systemd-boot, slot A's kernel,
//!    initrd and loader entry);
//! 5. the disk: a sparse file, the GPT written by `sfdisk`, the partitions
//!    placed with `dd conv=notrunc,sparse`;
//! 6. the manifest (hashes of the disk, each partition, our files, the
//!    package list), signed; a qcow2 for QEMU (`qemu-img convert`).
//!
//! Two builds from the same inputs (the cached Debian base, the agent
//! binary, the model, the keys, the epoch) give the same disk, byte for
//! byte. A fresh `debootstrap` is a new input: the mirror moves.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use sha2::Digest;

use crate::files;
use crate::layout::{Layout, Partition, Sizes, MIB};
use crate::manifest::{self, FileEntry, Manifest, ManifestError, Package, PartitionEntry};

/// A build error: which step, and why.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A tool failed.
    #[error("{cmd} failed ({status}): {stderr}")]
    Tool {
        /// The command line.
        cmd: String,
        /// Its exit status.
        status: String,
        /// The end of its stderr.
        stderr: String,
    },
    /// A tool is not installed.
    #[error("{0} is not installed (cargo xtask image installs the build's Debian packages)")]
    MissingTool(String),
    /// A file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Something the build needs is not where it should be.
    #[error("{0}")]
    Missing(String),
    /// The manifest.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BuildError + '_ {
    move |source| BuildError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What to build from.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Where the outputs go (`edge-<version>.img`, its manifest and
    /// signature, `.qcow2`).
    pub out_dir: PathBuf,
    /// Scratch space (the root directory, filesystem images).
    pub work_dir: PathBuf,
    /// Where the Debian base is cached between builds, if anywhere.
    pub cache_dir: Option<PathBuf>,
    /// The Debian mirror (the machine's own apt source).
    pub mirror: String,
    /// The Debian suite.
    pub suite: String,
    /// The release `edge-agent` binary.
    pub agent_binary: PathBuf,
    /// The GGUF model.
    pub model: PathBuf,
    /// The model id clients use.
    pub model_id: String,
    /// The image's version.
    pub version: String,
    /// The build's fixed time (Unix seconds; `SOURCE_DATE_EPOCH`).
    pub epoch: i64,
    /// SHA-256 (hex) of the app key the image's configuration accepts.
    pub app_key_sha256: String,
    /// The image-signing key (PKCS#8 PEM).
    pub signing_key: PathBuf,
    /// Whether `signing_key` is a development key made by the build.
    pub dev_signing_key: bool,
    /// Partition sizes.
    pub sizes: Sizes,
}

/// What the build made.
#[derive(Debug, Clone)]
pub struct BuildOutput {
    /// The raw disk.
    pub disk: PathBuf,
    /// The qcow2 for QEMU.
    pub qcow2: PathBuf,
    /// The manifest.
    pub manifest: Manifest,
    /// Slot A's root filesystem (ext4), kernel and initrd, as placed on the
    /// disk: what an update bundle of this build carries.
    pub rootfs: PathBuf,
    /// The kernel.
    pub kernel: PathBuf,
    /// The initrd.
    pub initrd: PathBuf,
    /// Seconds per step.
    pub steps: Vec<(String, f64)>,
}

/// The Debian packages of the base.
pub const PACKAGES: [&str; 11] = [
    "systemd",
    "systemd-sysv",
    "systemd-boot",
    "udev",
    "dbus",
    "linux-image-amd64",
    "initramfs-tools",
    "kmod",
    "iproute2",
    "e2fsprogs",
    "dosfstools",
];

/// The tools the build runs.
pub const TOOLS: [&str; 11] = [
    "debootstrap",
    "mke2fs",
    "debugfs",
    "objcopy",
    "mkfs.fat",
    "mcopy",
    "mmd",
    "sfdisk",
    "qemu-img",
    "chroot",
    "tar",
];

fn run(cmd: &mut Command) -> Result<String, BuildError> {
    let out = cmd.output().map_err(|e| BuildError::Tool {
        cmd: format!("{cmd:?}"),
        status: "not started".into(),
        stderr: e.to_string(),
    })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
        return Err(BuildError::Tool {
            cmd: format!("{cmd:?}"),
            status: out.status.to_string(),
            stderr: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether `tool` is on the PATH (or in /usr/sbin, /sbin).
pub fn which(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
                .any(|d| d.join(tool).is_file())
        })
        .unwrap_or(false)
}

/// SHA-256 (hex) of `len` bytes of `path` from `offset`.
pub fn sha256_range(path: &Path, offset: u64, len: u64) -> Result<String, BuildError> {
    use std::io::Seek;
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    f.seek(std::io::SeekFrom::Start(offset)).map_err(io(path))?;
    let mut h = sha2::Sha256::new();
    let mut left = len;
    let mut buf = vec![0u8; 4 << 20];
    while left > 0 {
        let n = buf.len().min(left as usize);
        f.read_exact(&mut buf[..n]).map_err(io(path))?;
        h.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(hex::encode(h.finalize()))
}

fn sha256_file(path: &Path) -> Result<(String, u64), BuildError> {
    let len = std::fs::metadata(path).map_err(io(path))?.len();
    Ok((sha256_range(path, 0, len)?, len))
}

fn write(path: &Path, text: &str) -> Result<(), BuildError> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(io(d))?;
    }
    std::fs::write(path, text).map_err(io(path))
}

/// Builds the image.
pub fn build(o: &BuildOptions) -> Result<BuildOutput, BuildError> {
    for t in TOOLS {
        if !which(t) {
            return Err(BuildError::MissingTool(t.into()));
        }
    }
    let layout = Layout::new(o.sizes);
    let mut steps = Vec::new();
    let mut clock = Instant::now();
    let mut step = |name: &str| {
        steps.push((name.to_string(), clock.elapsed().as_secs_f64()));
        tracing::info!(
            step = name,
            seconds = clock.elapsed().as_secs_f64(),
            "image step done"
        );
        clock = Instant::now();
    };
    std::fs::create_dir_all(&o.work_dir).map_err(io(&o.work_dir))?;
    std::fs::create_dir_all(&o.out_dir).map_err(io(&o.out_dir))?;
    let root = o.work_dir.join("root");

    // 1. The Debian base.
    base(o, &root)?;
    step("debian base");

    // 2. Our files.
    let ours = customize(o, &root, &layout)?;
    step("our files");

    // 3. Fixed timestamps.
    run(Command::new("find").arg(&root).args([
        "-exec",
        "touch",
        "-h",
        "-d",
        &format!("@{}", o.epoch),
        "{}",
        "+",
    ]))?;
    let packages = run(Command::new("chroot").arg(&root).args([
        "dpkg-query",
        "-W",
        "-f",
        "${Package} ${Version}\\n",
    ]))?
    .lines()
    .filter_map(|l| l.split_once(' '))
    .map(|(n, v)| Package {
        name: n.into(),
        version: v.into(),
    })
    .collect::<Vec<_>>();

    // 4. Filesystems.
    let kernel = newest(&root.join("boot"), "vmlinuz-")?;
    let initrd = newest(&root.join("boot"), "initrd.img-")?;
    let root_img = o.work_dir.join("root-a.ext4");
    mke2fs(o, &root_img, &root, part(&layout, "root-a")?)?;
    let data_dir = o.work_dir.join("data-empty");
    let _ = std::fs::remove_dir_all(&data_dir);
    std::fs::create_dir_all(&data_dir).map_err(io(&data_dir))?;
    let data_img = o.work_dir.join("edge-data.ext4");
    mke2fs(o, &data_img, &data_dir, part(&layout, "edge-data")?)?;
    let esp_img = o.work_dir.join("esp.fat");
    esp(o, &esp_img, &layout, &root, &kernel, &initrd)?;
    step("filesystems");

    // 5. The disk.
    let disk = o.out_dir.join(format!("edge-{}.img", o.version));
    let _ = std::fs::remove_file(&disk);
    {
        let f = std::fs::File::create(&disk).map_err(io(&disk))?;
        f.set_len(layout.size).map_err(io(&disk))?;
    }
    let script = o.work_dir.join("disk.sfdisk");
    write(&script, &layout.sfdisk_script())?;
    run(Command::new("sfdisk")
        .args(["--quiet", "--no-reread", "--no-tell-kernel"])
        .arg(&disk)
        .stdin(std::fs::File::open(&script).map_err(io(&script))?))?;
    for (name, img) in [
        ("esp", &esp_img),
        ("root-a", &root_img),
        ("edge-data", &data_img),
    ] {
        let p = part(&layout, name)?;
        run(Command::new("dd")
            .arg(format!("if={}", img.display()))
            .arg(format!("of={}", disk.display()))
            .args(["bs=1M", "conv=notrunc,sparse", "status=none"])
            .arg(format!("seek={}", p.offset / MIB)))?;
    }
    step("disk");

    // 6. Manifest and qcow2.
    let mut partitions = Vec::new();
    for p in &layout.partitions {
        partitions.push(PartitionEntry {
            name: p.name.into(),
            uuid: p.uuid.clone(),
            offset: p.offset,
            size: p.size,
            sha256: sha256_range(&disk, p.offset, p.size)?,
        });
    }
    let (disk_sha, disk_size) = sha256_file(&disk)?;
    let key = manifest::read_signing_key(&o.signing_key)?;
    let m = Manifest {
        format: "mec-image-manifest/1".into(),
        image_version: o.version.clone(),
        built_at: rfc3339(o.epoch),
        size: disk_size,
        sha256: disk_sha,
        partitions,
        files: ours,
        packages,
        signing_key_id: manifest::key_id(&key.verifying_key()),
        dev_signing_key: o.dev_signing_key,
    };
    manifest::write_signed(&disk, &m, &key)?;
    let qcow2 = disk.with_extension("qcow2");
    let _ = std::fs::remove_file(&qcow2);
    run(Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&disk)
        .arg(&qcow2))?;
    step("manifest and qcow2");
    Ok(BuildOutput {
        disk,
        qcow2,
        manifest: m,
        rootfs: root_img,
        kernel,
        initrd,
        steps,
    })
}

/// How a test bundle's root differs from the build's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// Only in its version: a good update.
    Good,
    /// Its agent never becomes ready: the unit starts it with a
    /// configuration file that does not exist, so it exits at every start
    /// until systemd gives up (the update tests' failing release).
    AgentNeverReady,
}

/// A root filesystem like the last build's but for `version` in its image
/// info (and the breakage `variant` names), for the update tests' bundles.
/// Works on the root tree [`build`] left in `o.work_dir` and puts it back
/// as it was; returns the ext4 image (`root-<version>.ext4` in the work
/// directory).
pub fn variant_rootfs(
    o: &BuildOptions,
    version: &str,
    variant: Variant,
) -> Result<PathBuf, BuildError> {
    let root = o.work_dir.join("root");
    let at = |p: &str| root.join(p.trim_start_matches('/'));
    let unit = format!("/etc/systemd/system/{}", "edge-agent.service");
    let changed = [files::IMAGE_INFO, unit.as_str()];
    let saved: Vec<(PathBuf, Vec<u8>)> = changed
        .iter()
        .map(|p| {
            let path = at(p);
            std::fs::read(&path)
                .map(|b| (path.clone(), b))
                .map_err(io(&path))
        })
        .collect::<Result<_, _>>()?;
    let touch = |paths: &[PathBuf]| {
        run(Command::new("touch")
            .args(["-h", "-d", &format!("@{}", o.epoch)])
            .args(paths))
    };
    let paths: Vec<PathBuf> = saved.iter().map(|(p, _)| p.clone()).collect();
    let made = (|| {
        write(
            &at(files::IMAGE_INFO),
            &format!("{}\n", serde_json::json!({ "version": version })),
        )?;
        if variant == Variant::AgentNeverReady {
            let text = files::agent_unit().replace(
                &format!("serve --config {}", files::AGENT_CONFIG),
                "serve --config /etc/edge-agent/missing-on-purpose.toml",
            );
            write(&at(&unit), &text)?;
        }
        touch(&paths)?;
        let img = o.work_dir.join(format!("root-{version}.ext4"));
        mke2fs(o, &img, &root, part(&Layout::new(o.sizes), "root-a")?)?;
        Ok(img)
    })();
    for (path, bytes) in &saved {
        std::fs::write(path, bytes).map_err(io(path))?;
    }
    touch(&paths)?;
    made
}

/// `epoch` (Unix seconds) as RFC 3339 in UTC.
pub fn rfc3339(epoch: i64) -> String {
    let days = epoch.div_euclid(86_400);
    let secs = epoch.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// The Debian base in `root`, from the cache when it holds this suite and
/// package list.
fn base(o: &BuildOptions, root: &Path) -> Result<(), BuildError> {
    if root.exists() {
        std::fs::remove_dir_all(root).map_err(io(root))?;
    }
    let key = {
        let mut h = sha2::Sha256::new();
        h.update(o.suite.as_bytes());
        for p in PACKAGES {
            h.update(b"\0");
            h.update(p.as_bytes());
        }
        hex::encode(&h.finalize()[..8])
    };
    let cached = o
        .cache_dir
        .as_ref()
        .map(|d| d.join(format!("debian-{}-{key}.tar", o.suite)));
    if let Some(tar) = cached.as_ref().filter(|t| t.exists()) {
        tracing::info!(cache = %tar.display(), "the Debian base comes from the cache");
        std::fs::create_dir_all(root).map_err(io(root))?;
        run(Command::new("tar")
            .args(["--numeric-owner", "-xpf"])
            .arg(tar)
            .arg("-C")
            .arg(root))?;
        return Ok(());
    }
    tracing::info!(suite = %o.suite, "debootstrap of the Debian base (a few minutes)");
    run(Command::new("debootstrap")
        .args(["--variant=minbase", "--components=main"])
        .arg(format!("--include={}", PACKAGES.join(",")))
        .arg(&o.suite)
        .arg(root)
        .arg(&o.mirror))?;
    // Downloaded packages are not part of the image.
    let archives = root.join("var/cache/apt/archives");
    if let Ok(entries) = std::fs::read_dir(&archives) {
        for e in entries.flatten() {
            if e.path().extension().is_some_and(|x| x == "deb") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    if let Some(tar) = cached {
        if let Some(d) = tar.parent() {
            std::fs::create_dir_all(d).map_err(io(d))?;
        }
        let partial = tar.with_extension("tar.partial");
        run(Command::new("tar")
            .args(["--numeric-owner", "-cpf"])
            .arg(&partial)
            .arg("-C")
            .arg(root)
            .arg("."))?;
        std::fs::rename(&partial, &tar).map_err(io(&tar))?;
        tracing::info!(cache = %tar.display(), "the Debian base is cached for the next build");
    }
    Ok(())
}

/// Adds our files to `root`; returns their manifest entries.
fn customize(o: &BuildOptions, root: &Path, layout: &Layout) -> Result<Vec<FileEntry>, BuildError> {
    let model_file = o
        .model
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| BuildError::Missing(format!("{}: no file name", o.model.display())))?
        .to_string();
    let place = |src: &Path, dst: &str, mode: u32| -> Result<(), BuildError> {
        use std::os::unix::fs::PermissionsExt;
        let to = root.join(dst.trim_start_matches('/'));
        if let Some(d) = to.parent() {
            std::fs::create_dir_all(d).map_err(io(d))?;
        }
        std::fs::copy(src, &to).map_err(io(src))?;
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode)).map_err(io(&to))
    };
    let at = |p: &str| root.join(p.trim_start_matches('/'));
    place(&o.agent_binary, "/usr/bin/edge-agent", 0o755)?;
    // The box gets the agent without its DWARF (144 MB with it, 23 MB
    // without; symbols stay, so a panic's backtrace still names functions);
    // the debug info stays beside the image for whoever reads a core dump.
    let debug = o.out_dir.join("edge-agent.debug");
    run(Command::new("objcopy")
        .arg("--only-keep-debug")
        .arg(&o.agent_binary)
        .arg(&debug))?;
    run(Command::new("objcopy")
        .args(["--strip-debug", "--add-gnu-debuglink"])
        .arg(&debug)
        .arg(at("/usr/bin/edge-agent")))?;
    let model_dst = format!("{}/{model_file}", files::MODEL_DIR);
    place(&o.model, &model_dst, 0o644)?;
    write(
        &at(files::AGENT_CONFIG),
        &files::agent_config(&model_file, &o.model_id, &o.app_key_sha256),
    )?;
    let units = [
        ("edge-agent.service", files::agent_unit()),
        ("edge-agent.path", files::agent_path_unit()),
        ("edge-provision.service", files::provision_unit()),
        ("edge-boot-health.service", files::health_unit()),
        ("edge-update-media@.service", files::update_media_unit()),
        ("edge-update.socket", files::update_socket_unit()),
        ("edge-update@.service", files::update_service_unit()),
    ];
    for (name, text) in &units {
        write(&at(&format!("/etc/systemd/system/{name}")), text)?;
    }
    write(
        &at("/etc/systemd/system/systemd-bless-boot.service.d/10-edge-console.conf"),
        &files::bless_boot_dropin(),
    )?;
    write(&at("/etc/fstab"), &files::fstab(layout))?;
    write(&at(files::UPDATE_MEDIA_RULE), files::update_media_rule())?;
    write(
        &at("/etc/systemd/network/80-wired.network"),
        files::network(),
    )?;
    write(
        &at("/etc/systemd/journald.conf.d/10-volatile.conf"),
        files::journald(),
    )?;
    // What `update` compares a bundle's version with.
    write(
        &at(files::IMAGE_INFO),
        &format!("{}\n", serde_json::json!({ "version": o.version })),
    )?;
    write(&at("/etc/hostname"), "edge-box\n")?;
    write(
        &at("/etc/hosts"),
        "127.0.0.1 localhost\n127.0.1.1 edge-box\n::1 localhost\n",
    )?;
    // Each box gets its own machine id at boot (the root is read-only: a
    // transient one), never the build machine's.
    write(&at("/etc/machine-id"), "")?;
    let _ = std::fs::remove_file(at("/var/lib/dbus/machine-id"));
    for d in ["/efi", files::DATA_DIR] {
        std::fs::create_dir_all(at(d)).map_err(io(&at(d)))?;
    }
    let uid = files::AGENT_UID.to_string();
    if run(Command::new("chroot")
        .arg(root)
        .args(["getent", "passwd", files::AGENT_USER]))
    .is_err()
    {
        run(Command::new("chroot").arg(root).args([
            "groupadd",
            "--system",
            "--gid",
            &uid,
            files::AGENT_USER,
        ]))?;
        run(Command::new("chroot").arg(root).args([
            "useradd",
            "--system",
            "--uid",
            &uid,
            "--gid",
            &uid,
            "--groups",
            "dialout",
            "--home-dir",
            files::DATA_DIR,
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            files::AGENT_USER,
        ]))?;
    }
    let enable: Vec<&str> = vec![
        "edge-agent.service",
        "edge-agent.path",
        "edge-provision.service",
        "edge-boot-health.service",
        "edge-update.socket",
        "systemd-networkd.service",
    ];
    run(Command::new("systemctl")
        .arg(format!("--root={}", root.display()))
        .arg("enable")
        .args(&enable))?;
    // The provisioning port carries frames, never a login prompt.
    run(Command::new("systemctl")
        .arg(format!("--root={}", root.display()))
        .args([
            "mask",
            &format!("serial-getty@{}.service", files::PROVISION_TTY),
        ]))?;

    let mut entries = Vec::new();
    for p in [
        "/usr/bin/edge-agent",
        model_dst.as_str(),
        files::AGENT_CONFIG,
    ] {
        let (sha256, size) = sha256_file(&at(p))?;
        entries.push(FileEntry {
            path: p.into(),
            sha256,
            size,
        });
    }
    for (name, _) in &units {
        let p = format!("/etc/systemd/system/{name}");
        let (sha256, size) = sha256_file(&at(&p))?;
        entries.push(FileEntry {
            path: p,
            sha256,
            size,
        });
    }
    Ok(entries)
}

/// The newest `prefix*` file in `dir` (kernel, initrd).
fn newest(dir: &Path, prefix: &str) -> Result<PathBuf, BuildError> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix))
        })
        .collect();
    found.sort();
    found
        .pop()
        .ok_or_else(|| BuildError::Missing(format!("no {prefix}* in {}", dir.display())))
}

/// The partition `name` of the layout.
fn part<'a>(layout: &'a Layout, name: &str) -> Result<&'a Partition, BuildError> {
    layout
        .get(name)
        .ok_or_else(|| BuildError::Missing(format!("no partition {name} in the layout")))
}

/// An ext4 image of `p`'s size, label and UUID, filled from `from`.
fn mke2fs(o: &BuildOptions, img: &Path, from: &Path, p: &Partition) -> Result<(), BuildError> {
    let _ = std::fs::remove_file(img);
    let uuid = p.uuid.to_lowercase();
    run(Command::new("mke2fs")
        .env("E2FSPROGS_FAKE_TIME", o.epoch.to_string())
        .args(["-q", "-F", "-t", "ext4", "-L", p.name, "-U", &uuid])
        .arg("-E")
        .arg(format!("hash_seed={uuid},root_owner=0:0"))
        .arg("-d")
        .arg(from)
        .arg(img)
        .arg(format!("{}k", p.size / 1024)))?;
    pin_times(o, img, from)
}

/// `mke2fs -d` (1.47.0, bookworm's) copies each file's ctime and atime
/// from the build tree. A ctime cannot be set there (it is the moment the
/// build wrote the file) and reading a directory moves its atime. Both are
/// set to the build's epoch afterwards, in one `debugfs` pass, so two
/// builds from the same inputs give the same bytes.
fn pin_times(o: &BuildOptions, img: &Path, from: &Path) -> Result<(), BuildError> {
    let mut script = String::new();
    let mut dirs = vec![PathBuf::new()];
    let pin = |script: &mut String, path: &str| {
        for field in ["ctime", "atime"] {
            script.push_str(&format!("sif \"{path}\" {field} @{}\n", o.epoch));
        }
    };
    pin(&mut script, "/");
    while let Some(rel) = dirs.pop() {
        let dir = from.join(&rel);
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .map_err(io(&dir))?
            .flatten()
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let rel = rel.join(e.file_name());
            let Some(path) = rel.to_str() else {
                return Err(BuildError::Missing(format!(
                    "{}: a name that is not UTF-8",
                    rel.display()
                )));
            };
            if path.contains(['"', '\n']) {
                return Err(BuildError::Missing(format!(
                    "{path:?}: a name debugfs cannot quote"
                )));
            }
            pin(&mut script, &format!("/{path}"));
            if e.file_type().map_err(io(&e.path()))?.is_dir() {
                dirs.push(rel);
            }
        }
    }
    let cmds = img.with_extension("debugfs");
    write(&cmds, &script)?;
    let out = Command::new("debugfs")
        .env("E2FSPROGS_FAKE_TIME", o.epoch.to_string())
        .arg("-w")
        .arg("-f")
        .arg(&cmds)
        .arg(img)
        .output()
        .map_err(io(Path::new("debugfs")))?;
    // debugfs reports a failed command on stderr, after its banner, and
    // still exits 0.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let failed: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("debugfs "))
        .take(5)
        .collect();
    if !out.status.success() || !failed.is_empty() {
        return Err(BuildError::Tool {
            cmd: format!("debugfs -w -f {} {}", cmds.display(), img.display()),
            status: out.status.to_string(),
            stderr: failed.join("\n"),
        });
    }
    Ok(())
}

fn esp(
    o: &BuildOptions,
    img: &Path,
    layout: &Layout,
    root: &Path,
    kernel: &Path,
    initrd: &Path,
) -> Result<(), BuildError> {
    let _ = std::fs::remove_file(img);
    let esp = part(layout, "esp")?;
    let (size_kib, volume_id) = (esp.size / 1024, &esp.uuid[..8]);
    run(Command::new("mkfs.fat")
        // `--invariant`: no creation time or random fields, so two builds
        // from the same inputs give the same ESP (`mcopy -m` keeps the
        // staged files' fixed times).
        .args([
            "-C",
            "-F",
            "32",
            "-n",
            "ESP",
            "-i",
            volume_id,
            "--invariant",
        ])
        .arg(img)
        .arg(size_kib.to_string()))?;
    let stage = o.work_dir.join("esp");
    let _ = std::fs::remove_dir_all(&stage);
    let boot_efi = root.join("usr/lib/systemd/boot/efi/systemd-bootx64.efi");
    if !boot_efi.exists() {
        return Err(BuildError::Missing(format!(
            "{} is missing (package systemd-boot)",
            boot_efi.display()
        )));
    }
    let copy = |src: &Path, rel: &str| -> Result<(), BuildError> {
        let to = stage.join(rel);
        std::fs::create_dir_all(to.parent().unwrap()).map_err(io(&to))?;
        std::fs::copy(src, &to).map_err(io(src)).map(|_| ())
    };
    copy(&boot_efi, "EFI/BOOT/BOOTX64.EFI")?;
    copy(&boot_efi, "EFI/systemd/systemd-bootx64.efi")?;
    copy(kernel, "edge-a/vmlinuz")?;
    copy(initrd, "edge-a/initrd.img")?;
    write(&stage.join("loader/loader.conf"), files::loader_conf())?;
    let (entry, body) = files::loader_entry(layout, "a", &o.version, 1);
    write(&stage.join("loader/entries").join(entry), &body)?;
    // The slot's record (`mec-update` reads it): the image is install 1.
    write(
        &stage.join("edge-a/slot.json"),
        &format!(
            "{}\n",
            serde_json::json!({ "version": o.version, "generation": 1 })
        ),
    )?;
    run(Command::new("find").arg(&stage).args([
        "-exec",
        "touch",
        "-h",
        "-d",
        &format!("@{}", o.epoch),
        "{}",
        "+",
    ]))?;
    let mut cmd = Command::new("mcopy");
    cmd.env("MTOOLS_SKIP_CHECK", "1")
        .args(["-s", "-m", "-i"])
        .arg(img);
    for e in std::fs::read_dir(&stage).map_err(io(&stage))?.flatten() {
        cmd.arg(e.path());
    }
    cmd.arg("::/");
    run(&mut cmd).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_of_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_392_000), "2026-11-23T00:00:00Z");
        assert_eq!(rfc3339(951_782_400 + 3661), "2000-02-29T01:01:01Z");
    }

    #[test]
    fn a_range_hash_is_the_hash_of_those_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"0123456789").unwrap();
        assert_eq!(
            sha256_range(&p, 2, 3).unwrap(),
            hex::encode(sha2::Sha256::digest(b"234"))
        );
    }
}
