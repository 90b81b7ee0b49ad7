//! `edge-agent provision-listen`, the real binary, on a pseudo-terminal
//! line: it answers a technician's client, makes the identity in the state
//! directory, stops cleanly on SIGTERM, and names the port it cannot open.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use mec_provisioning::client::{Client, ClientOptions};
use mec_provisioning::pb::{request, response, GenerateIdentity, StatusRequest};
use mec_provisioning::pty::PtyLine;

#[tokio::test(flavor = "multi_thread")]
async fn the_listener_answers_on_a_serial_line_and_stops_on_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let line = PtyLine::new().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .args(["provision-listen", "--device-id", "SN-LISTEN-1", "--port"])
        .arg(&line.box_path)
        .arg("--state-dir")
        .arg(&state)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ready = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .next()
        .unwrap()
        .unwrap();
    assert!(ready.contains("\"ready\""), "{ready}");

    let port =
        mec_provisioning::serial::open_port(line.tech_path.to_str().unwrap(), 115_200).unwrap();
    let mut client = Client::new(
        port,
        ClientOptions {
            timeout: Duration::from_secs(2),
            attempts: 5,
            port_name: "pty".into(),
        },
    );
    let hello = client.hello().await.unwrap();
    let device = hello.device.unwrap();
    assert_eq!(device.device_id, "SN-LISTEN-1");
    assert!(device.firmware_version.starts_with("edge-agent "));
    assert!(device.gpus.is_empty() && !device.gpu_note.is_empty());
    let identity = match client
        .call(request::Kind::GenerateIdentity(GenerateIdentity {}))
        .await
        .unwrap()
    {
        response::Kind::Identity(i) => i,
        other => panic!("{other:?}"),
    };
    assert!(identity.created);
    let on_disk = mec_sync::identity::NodeIdentity::load(&state.join("identity")).unwrap();
    assert_eq!(identity.public_key_pem, on_disk.public_key_pem());
    match client
        .call(request::Kind::Status(StatusRequest {}))
        .await
        .unwrap()
    {
        response::Kind::Status(s) => assert!(s.has_identity && !s.has_certificate),
        other => panic!("{other:?}"),
    }

    // SAFETY: kill with a pid this test spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

#[test]
fn a_port_that_cannot_be_opened_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .args([
            "provision-listen",
            "--device-id",
            "SN-X",
            "--port",
            "/dev/no-such-tty",
            "--state-dir",
        ])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/dev/no-such-tty"), "{err}");
}
