//! The admin API's `/admin/v1/update` in front of the root update service:
//! here the test plays systemd's socket activation (`Accept=yes`), starting
//! the real `edge-agent update serve-stdio` for each connection with the
//! connection as its stdin and stdout. The box here has no slots and no
//! operator key, so what the service says is a refusal; the slots
//! themselves are tested in `mec-update` and in QEMU (`hil-tests`).

use crate::common;

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::process::{Command, Stdio};

use common::Agent;

/// Serves `listener` as systemd would with `Accept=yes`: one helper process
/// per connection, until the listener is dropped with the test.
fn activate(listener: UnixListener, config: std::path::PathBuf) {
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { break };
            let input: OwnedFd = conn.try_clone().unwrap().into();
            let output: OwnedFd = conn.into();
            let mut child = Command::new(common::bin())
                .args(["update", "serve-stdio", "--config"])
                .arg(&config)
                .stdin(Stdio::from(input))
                .stdout(Stdio::from(output))
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            std::thread::spawn(move || child.wait());
        }
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_api_asks_the_update_service_and_streams_its_answer() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("edge-update.sock");
    let (config, key) = common::init(dir.path());
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "[admin]\n",
        &format!("[admin]\nupdate_socket = {:?}\n", socket.to_str().unwrap()),
    );
    std::fs::write(&config, text).unwrap();
    let agent = Agent::serve(dir.path(), &config, &key);
    let http = agent.admin_http.clone();
    let url = format!("{}/admin/v1/update", agent.admin);

    // No service (not an appliance): a clear 503 naming the socket.
    let r = http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("edge-update.sock"), "{body}");
    assert_eq!(
        body["error"]["code"], "update_service_unavailable",
        "{body}"
    );

    // A bad request never reaches the service.
    let r = http
        .post(&url)
        .body(r#"{"bundle": "/x", "force": true}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // Through the service: this box was never provisioned, so it has no
    // operator image key, and the apply is refused with that reason.
    activate(UnixListener::bind(&socket).unwrap(), config.clone());
    let bundle = dir.path().join("edge-9.9.9.bundle");
    std::fs::write(&bundle, b"not a bundle").unwrap();
    let r = http
        .post(&url)
        .json(&serde_json::json!({ "bundle": bundle }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/x-ndjson");
    let text = r.text().await.unwrap();
    let last: serde_json::Value =
        serde_json::from_str(text.lines().last().expect("a line")).unwrap();
    assert_eq!(last["event"], "refused", "{text}");
    assert!(
        last["reason"]
            .as_str()
            .unwrap()
            .contains("not provisioned, so it has no operator image key"),
        "{text}"
    );
}
