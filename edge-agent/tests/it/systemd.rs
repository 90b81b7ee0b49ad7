//! systemd integration as systemd sees it: notifications on `$NOTIFY_SOCKET`
//! (a real datagram socket this test binds): READY=1 once serving, WATCHDOG=1
//! pings when `$WATCHDOG_USEC` is set, STOPPING=1 on SIGTERM, then exit 0.

use crate::common;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::{init, Agent};

fn messages_until(sock: &UnixDatagram, want: &str, timeout: Duration) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = msg.lines().any(|l| l == want);
            seen.push(msg);
            if done {
                return seen;
            }
        }
    }
    panic!("no {want} within {timeout:?}; saw {seen:?}");
}

#[test]
fn readiness_watchdog_and_stopping_are_notified() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&socket_path).unwrap();
    let (config, key) = init(dir.path());
    let env = [
        ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
        ("WATCHDOG_USEC", "400000"),
    ];
    let mut agent = Agent::serve_with_env(dir.path(), &config, &key, &env);
    let seen = messages_until(&sock, "READY=1", Duration::from_secs(10));
    assert!(seen.iter().all(|m| !m.contains("STOPPING")), "{seen:?}");
    // Pings every WATCHDOG_USEC / 2.
    messages_until(&sock, "WATCHDOG=1", Duration::from_secs(5));
    messages_until(&sock, "WATCHDOG=1", Duration::from_secs(5));
    agent.signal(libc::SIGTERM);
    messages_until(&sock, "STOPPING=1", Duration::from_secs(10));
    assert!(agent.wait(Duration::from_secs(60)).success());
}
