//! The appliance image, booted in QEMU under TCG: the box waits for its
//! technician (the provisioning listener answers, the API stays closed), is
//! provisioned over the emulated second serial port with `edgeprov`, starts
//! its agent, serves a completion through a forwarded port billed to the
//! site's trial package, and uploads the record to core-ingest on the host.
//! The raw disk verifies against its signed manifest; a tampered manifest or
//! disk is refused. Each stage's time is printed.
//!
//! Needs the image (`cargo xtask image`; `cargo xtask test` builds it).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use hil_tests::procs::{bin, free_port, run_json};
use hil_tests::qemu::{built_image, console_has_line, wait_for as wait, Vm};
use hil_tests::stack::Core;
use serde_json::{json, Value};

const IMSI: &str = "001010000000042";

fn edgeprov(args: &[&str]) -> (i32, Value) {
    run_json(Command::new(bin("edgeprov")).args(args).arg("--json"))
}

#[test]
#[ignore = "needs the appliance image and minutes of QEMU: `cargo xtask test` builds the image and runs this test (by hand: `cargo xtask image`, then `cargo test -p hil-tests --test it -- image_boot:: --ignored --nocapture`)"]
fn the_image_boots_waits_for_provisioning_then_serves_and_bills() {
    let image = built_image();
    let tmp = tempfile::tempdir().unwrap();
    let mut since = Instant::now();
    let stage = |name: &str, since: &mut Instant| {
        println!("   {:7.1} s  {name}", since.elapsed().as_secs_f64());
        *since = Instant::now();
    };

    // The signed manifest: the disk verifies; a tampered manifest or disk
    // does not.
    verify_and_tamper(&image.disk, &image.signing_pub, tmp.path());
    stage(
        "verify the disk against its signed manifest, refuse tampered copies",
        &mut since,
    );

    // The core on the host; the guest reaches the host's loopback at 10.0.2.2.
    let core_port = free_port(true);
    let mut core = Core::init(
        &tmp.path().join("core"),
        format!("127.0.0.1:{core_port}").parse().unwrap(),
        &["10.0.2.2".to_string()],
    );
    core.start();

    let mut vm = Vm::boot(&image, tmp.path());
    let pty = vm.provisioning_pty.clone();
    let pty_s = pty.to_str().unwrap().to_string();

    // First boot: the listener answers; the box is not provisioned; the API
    // is closed.
    let status = vm.provisioning_status();
    stage("boot to the provisioning listener (TCG)", &mut since);
    // A box waiting for its technician is a good boot: the health check
    // passes once the listener runs, and systemd-bless-boot drops slot A's
    // try counter (else three waiting boots would count as failures).
    let console = vm.console.clone();
    wait(
        "the first boot marked good",
        &mut vm,
        Duration::from_secs(300),
        Duration::from_secs(1),
        || console_has_line(&console, &[mec_image::files::BOOT_BLESSED_LINE]).then_some(()),
    );
    stage("first boot marked good (systemd-bless-boot)", &mut since);
    assert_eq!(status["device"]["provisioned"], false, "{status}");
    assert_eq!(status["device"]["device_id"], "SN-QEMU-0001", "{status}");
    let closed = reqwest::blocking::Client::new()
        .get(format!("{}/readyz", vm.api))
        .timeout(Duration::from_secs(5))
        .send();
    assert!(
        closed.as_ref().map(|r| r.status() != 200).unwrap_or(true),
        "the API answered before provisioning: {closed:?}"
    );

    // Provision over the emulated serial port.
    let (code, v) = edgeprov(&[
        "provision",
        "--port",
        &pty_s,
        "--timeout-ms",
        "10000",
        "--site",
        "cell-qemu",
        "--node-id",
        "edge-qemu-0001",
        "--core",
        &format!("10.0.2.2:{core_port}"),
        "--package",
        "trial:5000:7",
        "--ca-dir",
        core.dir.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "provision: {v}");
    stage("provision over the serial port", &mut since);

    // The agent starts by itself (edge-agent.path) and becomes ready.
    let ready = vm.wait_ready(Duration::from_secs(900));
    stage(
        "agent ready after provisioning (model load under TCG)",
        &mut since,
    );
    // The unit's system call filter lets io_uring through: the usage log
    // did not fall back to pwrite + fdatasync.
    assert_eq!(ready["log_backend"], "uring", "{ready}");

    // A completion for a subscriber new to the box: served from the site's
    // trial package.
    let (record_id, told) = vm.completion(&image.app_key, IMSI);
    stage("one text completion (2 tokens, TCG)", &mut since);

    // The record reaches the core, billed to the trial package.
    let row = wait(
        "the record at the core",
        &mut vm,
        Duration::from_secs(300),
        Duration::from_secs(2),
        || {
            core.export()
                .into_iter()
                .find(|r| r["record_id"] == record_id.as_str())
        },
    );
    stage("record uploaded to core-ingest", &mut since);
    assert_eq!(row["imsi"], IMSI, "{row}");
    assert_eq!(row["node_id"], "edge-qemu-0001", "{row}");
    assert_eq!(row["billed_tokens"], told, "{row}");
    assert_eq!(
        row["package_ids"].as_array().map(|a| a.len()),
        Some(1),
        "one trial package: {row}"
    );
    let audit = core.audit();
    assert_eq!(audit[0]["chain"], "ok", "{audit}");
    println!(
        "   {:7.1} s  in all since QEMU started",
        vm.started.elapsed().as_secs_f64()
    );
}

/// `edgeprov verify` of the raw disk with the image key passes; a copy with
/// one flipped byte in root A, and a manifest edited after signing, fail.
fn verify_and_tamper(disk: &Path, key: &Path, tmp: &Path) {
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (code, v) = edgeprov(&[
        "verify",
        "--image",
        &s(disk),
        "--device",
        &s(disk),
        "--image-key",
        &s(key),
    ]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["report"]["expected_from"], "signed manifest", "{v}");

    // A device whose root A differs by one byte.
    let copy = tmp.join("copy.img");
    let out = Command::new("cp")
        .args(["--sparse=always"])
        .arg(disk)
        .arg(&copy)
        .output()
        .unwrap();
    assert!(out.status.success());
    let manifest: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{}.manifest.json", disk.display())).unwrap(),
    )
    .unwrap();
    let root_a = manifest["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "root-a")
        .unwrap();
    let at = root_a["offset"].as_u64().unwrap() + 1024 + 56; // the ext4 superblock's magic
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&copy)
            .unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0x01], at).unwrap();
    }
    let (code, v) = edgeprov(&[
        "verify",
        "--image",
        &s(disk),
        "--device",
        &s(&copy),
        "--image-key",
        &s(key),
    ]);
    assert_eq!(code, 1, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains(&format!("first difference at byte {at}")),
        "{v}"
    );
    std::fs::remove_file(&copy).unwrap();

    // A manifest edited after signing (beside a link to the real disk).
    let linked = tmp.join("edge-linked.img");
    std::os::unix::fs::symlink(disk, &linked).unwrap();
    let mut edited = manifest.clone();
    edited["image_version"] = json!("9.9.9");
    std::fs::write(
        format!("{}.manifest.json", linked.display()),
        serde_json::to_vec_pretty(&edited).unwrap(),
    )
    .unwrap();
    std::fs::copy(
        format!("{}.manifest.json.sig", disk.display()),
        format!("{}.manifest.json.sig", linked.display()),
    )
    .unwrap();
    let (code, v) = edgeprov(&[
        "verify",
        "--image",
        &s(&linked),
        "--device",
        &s(disk),
        "--image-key",
        &s(key),
    ]);
    assert_eq!(code, 1, "{v}");
    assert!(v["error"].as_str().unwrap().contains("signature"), "{v}");
}
