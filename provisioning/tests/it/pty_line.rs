//! Provisioning over real pseudo-terminals: the box's listener (the same
//! `serve_device` that `edge-agent provision-listen` runs) on one pty, the
//! real `edgeprov` binary on the other, a relay between them that can drop,
//! flip and add bytes.

use crate::common;

use std::path::Path;
use std::time::Duration;

use common::snapshot;
use mec_provisioning::device::{Device, DeviceFacts};
use mec_provisioning::pty::{PtyLine, Spoil};
use serde_json::Value;

const DEVICE_ID: &str = "SN-PTY-0001";

/// The box's listener on `line`, until the returned sender is dropped.
fn start_box(line: &PtyLine, state: &Path) -> tokio::sync::oneshot::Sender<()> {
    let port = mec_provisioning::serial::open_port(line.box_path.to_str().unwrap(), 115_200)
        .expect("open the box's pty");
    let mut device = Device::new(
        state,
        DeviceFacts {
            device_id: DEVICE_ID.into(),
            firmware_version: "edge-agent test".into(),
            gpus: vec![],
            gpu_note: "no GPU in CI".into(),
            slots: None,
        },
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = mec_provisioning::serial::serve_device(port, &mut device, async {
            let _ = stopped.await;
        })
        .await;
    });
    stop
}

/// Runs `edgeprov ARGS --json`; returns (exit code, JSON output).
async fn edgeprov(args: &[&str]) -> (i32, Value) {
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_edgeprov"))
            .args(args)
            .arg("--json")
            .output(),
    )
    .await
    .expect("edgeprov finishes")
    .expect("edgeprov runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "edgeprov {args:?} printed no JSON ({e}): {stdout} / {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), value)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn provision_args<'a>(tech: &'a str, ca: &'a str, node: &'a str) -> Vec<&'a str> {
    vec![
        "provision",
        "--port",
        tech,
        "--site",
        "cell-042",
        "--node-id",
        node,
        "--core",
        "127.0.0.1:7443",
        "--core-server-name",
        "localhost",
        "--package",
        "trial:5000:7",
        "--ca-dir",
        ca,
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn a_box_is_provisioned_refuses_a_second_time_and_resets_only_for_its_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let (ca, rogue, state) = (
        tmp.path().join("ca"),
        tmp.path().join("rogue"),
        tmp.path().join("state"),
    );
    for dir in [&ca, &rogue] {
        let (code, v) = edgeprov(&["ca", "init", "--dir", s(dir)]).await;
        assert_eq!(code, 0, "{v}");
    }
    let line = PtyLine::new().unwrap();
    let _box = start_box(&line, &state);
    let tech = s(&line.tech_path);

    let (code, v) = edgeprov(&["status", "--port", tech]).await;
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["device"]["device_id"], DEVICE_ID);
    assert_eq!(v["device"]["provisioned"], false);
    assert_eq!(v["device"]["gpu_note"], "no GPU in CI");

    let (code, v) = edgeprov(&provision_args(tech, s(&ca), "edge-0001")).await;
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["device"]["provisioned"], true, "{v}");
    assert_eq!(v["device"]["node_id"], "edge-0001");
    assert_eq!(v["key_created"], true);
    // The certificate on the box binds the node id to the key made there.
    let cert = std::fs::read_to_string(state.join("identity/node.crt")).unwrap();
    let cert = mec_provisioning::cert::NodeCert::parse(&cert).unwrap();
    let key = mec_node::identity::NodeIdentity::load(&state.join("identity")).unwrap();
    assert_eq!(cert.public_key, key.verifying_key());
    assert_eq!(cert.node_id, "edge-0001");
    assert_eq!(v["key_id"], key.key_id());
    let site = mec_provisioning::site::SiteConfig::load(&state.join("site.toml"))
        .unwrap()
        .unwrap();
    assert_eq!(
        (site.site_id.as_str(), site.default_packages.len()),
        ("cell-042", 1)
    );

    // Provisioned: a second provisioning is refused and changes nothing.
    let before = snapshot(&state);
    let (code, v) = edgeprov(&provision_args(tech, s(&ca), "edge-0002")).await;
    assert_eq!(code, 1);
    assert!(
        v["error"].as_str().unwrap().contains("already provisioned"),
        "{v}"
    );
    // A reset signed by another CA is refused.
    let (code, v) = edgeprov(&["reset", "--port", tech, "--ca-dir", s(&rogue)]).await;
    assert_eq!(code, 1);
    assert!(v["error"].as_str().unwrap().contains("not signed"), "{v}");
    assert_eq!(snapshot(&state), before, "refusals changed nothing");

    // The operator's reset, then a new provisioning with a new key.
    let (code, v) = edgeprov(&["reset", "--port", tech, "--ca-dir", s(&ca)]).await;
    assert_eq!(code, 0, "{v}");
    let (code, v) = edgeprov(&["status", "--port", tech]).await;
    assert_eq!(
        (code, &v["device"]["provisioned"]),
        (0, &Value::Bool(false))
    );
    let (code, v) = edgeprov(&provision_args(tech, s(&ca), "edge-0002")).await;
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["device"]["node_id"], "edge-0002");
    assert_ne!(v["key_id"], key.key_id(), "a new key");
}

#[tokio::test(flavor = "multi_thread")]
async fn provisioning_gets_through_a_line_that_drops_flips_and_adds_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let (ca, state) = (tmp.path().join("ca"), tmp.path().join("state"));
    assert_eq!(edgeprov(&["ca", "init", "--dir", s(&ca)]).await.0, 0);
    let line = PtyLine::spoiled(
        Spoil {
            drop_every: 3,
            garbage_every: 2,
            flip_every: 0,
        },
        Spoil {
            drop_every: 0,
            garbage_every: 3,
            flip_every: 2,
        },
    )
    .unwrap();
    let _box = start_box(&line, &state);
    let tech = s(&line.tech_path);
    let mut args = provision_args(tech, s(&ca), "edge-0001");
    args.extend(["--timeout-ms", "300", "--attempts", "10"]);
    let (code, v) = edgeprov(&args).await;
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["device"]["provisioned"], true, "{v}");
    let [to_box, to_tech] = line.counts();
    assert!(to_box.dropped > 0 && to_box.garbage > 0, "{to_box:?}");
    assert!(to_tech.flipped > 0 && to_tech.garbage > 0, "{to_tech:?}");
    assert!(v["retries"].as_u64().unwrap() > 0, "{v}");
    // Exactly one identity, and the certificate is for it: repeats were
    // answered from memory, not carried out twice.
    let cert = std::fs::read_to_string(state.join("identity/node.crt")).unwrap();
    let cert = mec_provisioning::cert::NodeCert::parse(&cert).unwrap();
    let key = mec_node::identity::NodeIdentity::load(&state.join("identity")).unwrap();
    assert_eq!(cert.public_key, key.verifying_key());
    assert!(state.join("site.toml").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn noise_on_the_line_changes_nothing_and_the_box_still_answers() {
    let tmp = tempfile::tempdir().unwrap();
    let (ca, state) = (tmp.path().join("ca"), tmp.path().join("state"));
    assert_eq!(edgeprov(&["ca", "init", "--dir", s(&ca)]).await.0, 0);
    let line = PtyLine::new().unwrap();
    let _box = start_box(&line, &state);
    let tech = s(&line.tech_path).to_string();
    let (code, v) = edgeprov(&provision_args(&tech, s(&ca), "edge-0001")).await;
    assert_eq!(code, 0, "{v}");
    let before = snapshot(&state);
    // Random bytes (zeros among them), an oversize run with no delimiter,
    // a truncated frame, and a well-framed payload that is no request.
    let mut noise = Vec::new();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..20_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        noise.push((x >> 24) as u8);
    }
    noise.extend(std::iter::repeat_n(0x55, 40_000));
    noise.push(0);
    let frame = mec_provisioning::frame::encode_frame(b"\xff\xff\xff not protobuf").unwrap();
    noise.extend_from_slice(&frame[..frame.len() / 2]);
    noise.extend_from_slice(&frame);
    let path = tech.clone();
    tokio::task::spawn_blocking(move || {
        let mut port = mec_provisioning::serial::open_port_blocking(&path).unwrap();
        std::io::Write::write_all(&mut port, &noise).unwrap();
    })
    .await
    .unwrap();
    let (code, v) = edgeprov(&["status", "--port", &tech]).await;
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["device"]["provisioned"], true);
    assert_eq!(snapshot(&state), before, "noise changed nothing");
}
