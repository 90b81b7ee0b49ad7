//! The stack's programs as child processes: where their binaries are, a
//! child that prints a JSON ready line, one-shot commands that print JSON,
//! SIGKILL and SIGTERM.
//!
//! The binaries are the workspace's own (`edge-agent`, `core-ingest`,
//! `edgeprov`), found next to the test binary (`target/<profile>/`) or in
//! `$MEC_BIN_DIR`. `cargo test --workspace` builds them all before any test
//! runs (each package's integration tests need its binaries), and so does
//! `cargo xtask test`, which runs it. `cargo test -p hil-tests` alone does
//! not: build them first (`cargo build --workspace --bins`).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The workspace's root directory.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("hil-tests sits in the workspace")
        .to_path_buf()
}

/// The default model, as `cargo xtask setup` places it (or `$MEC_MODEL`).
pub fn model_path() -> PathBuf {
    if let Some(p) = std::env::var_os("MEC_MODEL") {
        return PathBuf::from(p);
    }
    let p = workspace().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.exists(),
        "{} is missing: run `cargo xtask setup` (or `cargo xtask test`, which fetches it)",
        p.display()
    );
    p
}

/// The path of the workspace binary `name`.
pub fn bin(name: &str) -> PathBuf {
    let dir = match std::env::var_os("MEC_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            // target/<profile>/deps/<test binary>
            let exe = std::env::current_exe().expect("the test binary's path");
            exe.parent()
                .and_then(Path::parent)
                .expect("the test binary sits in target/<profile>/deps")
                .to_path_buf()
        }
    };
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace's binaries first (`cargo build --workspace --bins`; \
         `cargo xtask test` does), or point MEC_BIN_DIR at them",
        path.display()
    );
    path
}

/// Runs a one-shot command that prints one JSON object; its exit code and
/// the object. A command that prints no JSON is a test failure that shows
/// its stderr.
pub fn run_json(cmd: &mut Command) -> (i32, Value) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "{cmd:?} printed no JSON ({e}), exit {:?}:\n{stdout}\n{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), value)
}

/// [`run_json`] that must succeed.
pub fn run_json_ok(cmd: &mut Command) -> Value {
    let (code, v) = run_json(cmd);
    assert_eq!(code, 0, "{cmd:?} failed: {v}");
    v
}

/// Runs a command that prints JSON lines; the lines, parsed.
pub fn run_json_lines(cmd: &mut Command) -> Vec<Value> {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// A long-running child: its stdout after the ready line and its stderr go
/// to `log`. Killed when dropped.
pub struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Starts `cmd` and waits (up to `timeout`) for the first stdout line,
    /// which must be JSON with `"event": "ready"`; returns it.
    pub fn start_ready(
        name: &str,
        mut cmd: Command,
        log: &Path,
        timeout: Duration,
    ) -> (Proc, Value) {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("{}: {e}", log.display()));
        let mut stdout_log = log_file.try_clone().unwrap();
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut first = true;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if first {
                    first = false;
                    let _ = tx.send(line);
                } else {
                    let _ = writeln!(stdout_log, "{line}");
                }
            }
        });
        let mut proc = Proc {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
        };
        let line = match rx.recv_timeout(timeout) {
            Ok(line) => line,
            Err(_) => {
                let status = proc.child.try_wait().ok().flatten();
                panic!(
                    "{name} printed no ready line within {timeout:?} (exit: {status:?}); its log:\n{}",
                    proc.log_tail(40)
                );
            }
        };
        let v: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("{name}'s ready line is not JSON ({e}): {line}"));
        assert_eq!(v["event"], "ready", "{name}: {line}");
        (proc, v)
    }

    /// Starts `cmd` with no ready line (stdout and stderr to `log`).
    pub fn start(name: &str, mut cmd: Command, log: &Path) -> Proc {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("{}: {e}", log.display()));
        let child = cmd
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it still runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL, and reap it.
    pub fn kill9(mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }

    /// SIGTERM; waits up to `timeout` for the exit, then SIGKILL.
    pub fn terminate(mut self, timeout: Duration) -> Option<ExitStatus> {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
        None
    }

    fn signal(&mut self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid, which we have not reaped.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        log_tail(&self.log, n)
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last `n` lines of a file.
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A loopback port free now (TCP or UDP), for a service that must come back
/// on the same port after a restart.
pub fn free_port(udp: bool) -> u16 {
    if udp {
        std::net::UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .map(|a| a.port())
            .expect("a free UDP port")
    } else {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .map(|a| a.port())
            .expect("a free TCP port")
    }
}
