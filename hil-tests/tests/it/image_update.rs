//! Updates of the appliance, in QEMU under TCG, on one box through its life.
//! Bundles arrive as a technician brings them: a USB stick plugged in (QMP
//! hot-plug of a `usb-storage` disk), which the image's udev rule hands to
//! `edge-update-media@.service`. The box is read over its serial console
//! with `edgeprov status`, as a technician reads it.
//!
//! 1. First boot, provisioning (with the operator's image key), one billed
//!    completion.
//! 2. Refused without writing anything: a bundle signed by another key, one
//!    with a flipped byte in its kernel, an older release. Checked on the
//!    disk itself: slot B's partition still hashes as built, and the ESP
//!    holds no slot B entry or directory.
//! 3. Power cut (QEMU killed) while a good bundle is being written: the
//!    box boots slot A again.
//! 4. The good bundle: the box reboots into slot B, on trial, which is
//!    marked good once the agent was ready for 60 s.
//! 5. A release whose agent never becomes ready: three boots on trial, each
//!    failing its health check, then systemd-boot boots slot B again, which
//!    reports the failed version and refuses to take it again.
//!
//! After each case the box bills one more completion and the core verifies
//! the node's chain, dense from the first record: what the box logged before
//! survived. Each stage's time is printed.
//!
//! Needs the image and its test bundles (`cargo xtask image
//! --test-bundles`; `cargo xtask test` makes both).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use hil_tests::procs::{bin, free_port, run_json};
use hil_tests::qemu::{built_image, console_has_line, console_lines, wait_for, BuiltImage, Vm};
use hil_tests::stack::Core;
use serde_json::Value;

const IMSI: &str = "001010000000043";
const NODE_ID: &str = "edge-qemu-update";

fn edgeprov(args: &[&str]) -> (i32, Value) {
    run_json(Command::new(bin("edgeprov")).args(args).arg("--json"))
}

/// The box across its boots: each boot is a QEMU run of its own.
struct TheBox {
    image: BuiltImage,
    dir: PathBuf,
    run: u32,
    vm: Option<Vm>,
    since: Instant,
    stages: Vec<(String, f64)>,
}

impl TheBox {
    fn vm(&mut self) -> &mut Vm {
        self.vm.as_mut().expect("the box is on")
    }

    fn stage(&mut self, name: &str) {
        let s = self.since.elapsed().as_secs_f64();
        println!("   {s:7.1} s  {name}");
        self.stages.push((name.to_string(), s));
        self.since = Instant::now();
    }

    fn power_on(&mut self) {
        assert!(self.vm.is_none(), "the box is already on");
        self.run += 1;
        self.vm = Some(Vm::power_on(&self.image, &self.dir, self.run));
    }

    /// Waits for QEMU to end by itself (a reboot); the box is off after.
    fn wait_reboot(&mut self, what: &str, limit: Duration) {
        let vm = self.vm.as_mut().expect("the box is on");
        assert!(
            vm.wait_exit(limit),
            "{what}: the box did not reboot within {limit:?}; console:\n{}",
            vm.console_tail(80)
        );
        self.vm = None;
    }

    fn power_cut(&mut self) {
        self.vm.take().expect("the box is on").power_cut();
    }

    /// `edgeprov status` over the provisioning line.
    fn status(&mut self) -> Value {
        self.vm().provisioning_status()
    }

    fn console(&mut self) -> PathBuf {
        self.vm().console.clone()
    }

    /// Waits for a console line holding every one of `fragments`; the
    /// `nth` such line (0: the first).
    fn wait_console(
        &mut self,
        what: &str,
        fragments: &[&str],
        nth: usize,
        limit: Duration,
    ) -> String {
        let console = self.console();
        wait_for(what, self.vm(), limit, Duration::from_secs(1), || {
            console_lines(&console, fragments).into_iter().nth(nth)
        })
    }

    /// Waits until `slot` is marked good, as `edgeprov status` shows it
    /// (systemd stops printing to the console once the boot is up, so
    /// systemd-bless-boot's line is not there to watch).
    fn wait_good(&mut self, slot_name: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(900);
        loop {
            let s = self.status();
            if slot(&s, slot_name)["state"] == "good" {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "slot {slot_name} not marked good within 900 s: {s}"
            );
            std::thread::sleep(Duration::from_secs(5));
        }
    }

    fn wait_ready(&mut self) {
        self.vm().wait_ready(Duration::from_secs(900));
    }

    /// One short completion; its record id.
    fn completion(&mut self) -> String {
        let key = self.image.app_key.clone();
        self.vm().completion(&key, IMSI).0
    }

    /// Plugs `bundle` in as USB stick number `n`.
    fn plug(&mut self, bundle: &Path, n: u32) {
        self.vm()
            .plug_usb_disk(bundle, &format!("stick{n}"))
            .unwrap_or_else(|e| panic!("plugging {}: {e}", bundle.display()));
    }

    fn unplug(&mut self, n: u32) {
        self.vm()
            .unplug_usb_disk(&format!("stick{n}"))
            .unwrap_or_else(|e| panic!("unplugging stick{n}: {e}"));
    }
}

/// The slot `name` ("a", "b") of an `edgeprov status`.
fn slot<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["slots"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["slot"] == name))
        .unwrap_or_else(|| panic!("no slot {name} in {status}"))
}

/// Asserts slot `name`'s state, version and flags.
fn expect_slot(status: &Value, name: &str, state: &str, version: &str, booted: bool, next: bool) {
    let s = slot(status, name);
    assert_eq!(
        (
            s["state"].as_str().unwrap(),
            s["version"].as_str().unwrap(),
            s["booted"].as_bool().unwrap(),
            s["next_boot"].as_bool().unwrap()
        ),
        (state, version, booted, next),
        "slot {name}: {status}"
    );
}

/// The test bundles `cargo xtask image --test-bundles` wrote.
struct Bundles {
    next: (PathBuf, String),
    never_ready: (PathBuf, String),
    older: PathBuf,
    other_key: PathBuf,
    bad_hash: PathBuf,
}

fn bundles(image: &BuiltImage) -> Bundles {
    let dir = image.disk.parent().unwrap().join("test-bundles");
    let path = |name: &str| {
        let p = dir.join(format!("{name}.bundle"));
        assert!(
            p.exists(),
            "{} is missing: cargo xtask image --test-bundles",
            p.display()
        );
        p
    };
    // Each bundle's version is in its signed manifest, the tar's first member.
    let version = |p: &Path| -> String {
        let mut archive = tar::Archive::new(std::fs::File::open(p).unwrap());
        let mut first = archive.entries().unwrap().next().unwrap().unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut first, &mut text).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        v["version"].as_str().unwrap().to_string()
    };
    let next = path("next");
    let never = path("never-ready");
    Bundles {
        next: (next.clone(), version(&next)),
        never_ready: (never.clone(), version(&never)),
        older: path("older"),
        other_key: path("other-key"),
        bad_hash: path("bad-hash"),
    }
}

/// The built image's version (its manifest) and its partitions.
fn image_manifest(image: &BuiltImage) -> Value {
    let mut p = image.disk.clone().into_os_string();
    p.push(".manifest.json");
    serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap()
}

/// Reads the box's disk as it stands (the overlay, QEMU still running):
/// slot B's partition hash, and the ESP's top directory and loader
/// entries (mtools on a raw copy).
fn disk_facts(overlay: &Path, manifest: &Value, tmp: &Path) -> (String, String, String) {
    let raw = tmp.join("disk-now.raw");
    let out = Command::new("qemu-img")
        .args(["convert", "-U", "-q", "-f", "qcow2", "-O", "raw"])
        .arg(overlay)
        .arg(&raw)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img convert: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let part = |name: &str| -> (u64, u64) {
        let p = manifest["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("no {name} in the manifest"));
        (p["offset"].as_u64().unwrap(), p["size"].as_u64().unwrap())
    };
    let (b_off, b_size) = part("root-b");
    let b_hash = mec_image::build::sha256_range(&raw, b_off, b_size).unwrap();
    let (esp_off, _) = part("esp");
    let mdir = |dir: &str| -> String {
        let out = Command::new("mdir")
            .arg("-b")
            .arg("-i")
            .arg(format!("{}@@{esp_off}", raw.display()))
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mdir {dir}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let (top, entries) = (mdir("::/"), mdir("::/loader/entries"));
    let _ = std::fs::remove_file(&raw);
    (b_hash, top, entries)
}

#[test]
#[ignore = "needs the appliance image, its test bundles and many minutes of QEMU: `cargo xtask test` runs it (by hand: `cargo xtask image --test-bundles`, then `cargo test -p hil-tests --test it -- image_update:: --ignored --nocapture`)"]
fn updates_go_in_only_signed_newer_and_whole_and_a_bad_release_rolls_back() {
    let image = built_image();
    let manifest = image_manifest(&image);
    let base_version = manifest["image_version"].as_str().unwrap().to_string();
    let bundles = bundles(&image);
    let tmp = tempfile::tempdir().unwrap();
    let core_port = free_port(true);
    let mut core = Core::init(
        &tmp.path().join("core"),
        format!("127.0.0.1:{core_port}").parse().unwrap(),
        &["10.0.2.2".to_string()],
    );
    core.start();
    let mut b = TheBox {
        image: image.clone(),
        dir: tmp.path().to_path_buf(),
        run: 0,
        vm: None,
        since: Instant::now(),
        stages: Vec::new(),
    };
    let mut billed: Vec<String> = Vec::new();
    // One more completion, and the core holds every record so far, dense
    // and chained: the box's log kept what it had.
    let bill_one = |b: &mut TheBox, billed: &mut Vec<String>, after: &str| {
        b.wait_ready();
        let id = b.completion();
        billed.push(id.clone());
        let want = billed.len() as u64;
        let vm = b.vm.as_mut().unwrap();
        wait_for(
            "the record at the core",
            vm,
            Duration::from_secs(300),
            Duration::from_secs(2),
            || {
                let rows = core.export();
                billed
                    .iter()
                    .all(|id| rows.iter().any(|r| r["record_id"] == id.as_str()))
                    .then_some(())
            },
        );
        let audit = core.audit();
        let node = audit
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node_id"] == NODE_ID)
            .unwrap_or_else(|| panic!("{audit}"));
        assert_eq!(node["chain"], "ok", "after {after}: {audit}");
        assert_eq!(node["records"], want, "after {after}: {audit}");
        assert_eq!(node["contiguous_seq"], want, "after {after}: {audit}");
        b.stage(&format!("one more record billed and at the core ({after})"));
    };

    // 1. First boot, provisioning with the operator's image key.
    b.power_on();
    let s = b.status();
    b.stage("boot 1 to the provisioning listener");
    assert_eq!(s["running_version"], base_version.as_str(), "{s}");
    b.wait_good("a");
    let pty = b.vm().provisioning_pty.to_str().unwrap().to_string();
    let (code, v) = edgeprov(&[
        "provision",
        "--port",
        &pty,
        "--timeout-ms",
        "10000",
        "--site",
        "cell-qemu",
        "--node-id",
        NODE_ID,
        "--core",
        &format!("10.0.2.2:{core_port}"),
        "--package",
        "trial:5000:7",
        "--ca-dir",
        core.dir.to_str().unwrap(),
        "--image-key",
        image.signing_pub.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "provision: {v}");
    b.stage("first boot marked good, provisioned");
    bill_one(&mut b, &mut billed, "provisioning");
    let s = b.status();
    expect_slot(&s, "a", "good", &base_version, true, true);
    expect_slot(&s, "b", "empty", "", false, false);

    // 2. Refusals: nothing written.
    let b_built = manifest["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "root-b")
        .unwrap()["sha256"]
        .as_str()
        .unwrap()
        .to_string();
    let refusals = [
        (&bundles.other_key, "signature does not verify"),
        (
            &bundles.bad_hash,
            "kernel: SHA-256 differs from the signed manifest",
        ),
        (&bundles.older, "is not newer than the running"),
    ];
    for (i, (bundle, why)) in refusals.iter().enumerate() {
        let n = i as u32 + 1;
        b.plug(bundle, n);
        let line = b.wait_console(
            "the stick's refusal",
            &["\"event\":\"refused\""],
            i,
            Duration::from_secs(600),
        );
        assert!(line.contains(why), "{}: {line}", bundle.display());
        b.unplug(n);
        b.stage(&format!(
            "{} refused: {why}",
            bundle.file_name().unwrap().to_string_lossy()
        ));
    }
    let (b_now, esp_top, entries) = disk_facts(&b.dir.join("overlay.qcow2"), &manifest, tmp.path());
    assert_eq!(b_now, b_built, "slot B's partition was written");
    assert!(
        !esp_top.contains("edge-b"),
        "the ESP has slot B's directory: {esp_top}"
    );
    assert!(
        !entries.contains("edge-b"),
        "the ESP has an entry for slot B: {entries}"
    );
    let s = b.status();
    expect_slot(&s, "a", "good", &base_version, true, true);
    expect_slot(&s, "b", "empty", "", false, false);
    b.stage("the disk checked: slot B and the ESP as built");

    // 3. Power cut while the good bundle is written.
    let (next, next_v) = bundles.next.clone();
    b.plug(&next, 4);
    b.wait_console(
        "the root filesystem being written",
        &["\"event\":\"progress\"", "\"stage\":\"rootfs\""],
        0,
        Duration::from_secs(1800),
    );
    b.stage("stick 4 (next): verified, writing the root filesystem");
    b.power_cut();
    b.power_on();
    let s = b.status();
    b.stage("power cut during the write; boot 2 to the listener");
    expect_slot(&s, "a", "good", &base_version, true, true);
    expect_slot(&s, "b", "empty", "", false, false);
    bill_one(&mut b, &mut billed, "the power cut");

    // 4. The good update.
    b.plug(&next, 5);
    let applied = b.wait_console(
        "the bundle applied",
        &["\"event\":\"applied\""],
        0,
        Duration::from_secs(1800),
    );
    b.stage("stick 5 (next) applied");
    println!("          {applied}");
    b.wait_reboot("after the apply", Duration::from_secs(300));
    b.power_on();
    let s = b.status();
    b.stage("boot 3 (slot B, on trial) to the listener");
    assert_eq!(s["running_version"], next_v.as_str(), "{s}");
    expect_slot(&s, "b", "trying", &next_v, true, true);
    expect_slot(&s, "a", "good", &base_version, false, false);
    let s = b.wait_good("b");
    b.stage("slot B marked good (agent ready for 60 s, log verified)");
    expect_slot(&s, "b", "good", &next_v, true, true);
    bill_one(&mut b, &mut billed, "the update");

    // 5. A release whose agent never becomes ready.
    let (never, never_v) = bundles.never_ready.clone();
    b.plug(&never, 6);
    b.wait_console(
        "the bundle applied",
        &["\"event\":\"applied\""],
        0,
        Duration::from_secs(1800),
    );
    b.stage("stick 6 (never-ready) applied to slot A");
    b.wait_reboot("after the apply", Duration::from_secs(300));
    let mut tries = 0;
    loop {
        b.power_on();
        let s = b.status();
        if slot(&s, "b")["booted"] == true {
            b.stage(&format!("boot {} (slot B again) to the listener", b.run));
            break;
        }
        tries += 1;
        assert!(tries <= 3, "a fourth boot of the failing slot: {s}");
        assert_eq!(s["running_version"], never_v.as_str(), "{s}");
        b.wait_reboot("the failing boot's health check", Duration::from_secs(900));
        let console = b.dir.join(format!("console-{}.log", b.run));
        assert!(
            console_has_line(&console, &["\"boot\":\"bad\"", "\"on_trial\":true"]),
            "boot {} rebooted without its health check failing:\n{}",
            b.run,
            hil_tests::procs::log_tail(&console, 60)
        );
        b.stage(&format!(
            "boot {} (slot A, try {tries}): health check failed, rebooted",
            b.run
        ));
    }
    assert_eq!(tries, 3, "systemd-boot gives a new slot three tries");
    let s = b.status();
    expect_slot(&s, "b", "good", &next_v, true, true);
    expect_slot(&s, "a", "failed", &never_v, false, false);
    bill_one(&mut b, &mut billed, "the rollback");
    // The failed version is not taken again.
    b.plug(&never, 7);
    let line = b.wait_console(
        "the stick's refusal",
        &["\"event\":\"refused\""],
        0,
        Duration::from_secs(600),
    );
    assert!(line.contains("failed"), "{line}");
    b.stage("stick 7 (never-ready again) refused: it failed here");

    // What a technician reads at the end (printed for the README).
    let pty = b.vm().provisioning_pty.to_str().unwrap().to_string();
    let out = Command::new(bin("edgeprov"))
        .args(["status", "--port", &pty, "--timeout-ms", "3000"])
        .output()
        .unwrap();
    println!(
        "   == edgeprov status, at the end:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    println!("   == stages:");
    for (name, s) in &b.stages {
        println!("   {s:7.1} s  {name}");
    }
    let total: f64 = b.stages.iter().map(|(_, s)| s).sum();
    println!("   {total:7.1} s  in all");
}
