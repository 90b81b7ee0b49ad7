//! The appliance image booted in QEMU under software emulation (TCG; KVM is
//! not reliable on these machines): UEFI firmware (OVMF), the console on the
//! first serial port (to a file), the provisioning link on the second as a
//! pty, the MEC API forwarded to a loopback port, the disk as a qcow2
//! overlay so the built image stays untouched.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::procs::{free_port, Proc};

/// The image `cargo xtask image` built: the raw disk, its qcow2, the
/// image-signing public key and the app key the image accepts.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    /// The raw disk.
    pub disk: PathBuf,
    /// Its qcow2.
    pub qcow2: PathBuf,
    /// The image-signing public key.
    pub signing_pub: PathBuf,
    /// The app key.
    pub app_key: String,
}

/// The image in `$MEC_IMAGE_DIR` or `target/image`; a missing one is a
/// failure that says how to build it.
pub fn built_image() -> BuiltImage {
    let dir = std::env::var_os("MEC_IMAGE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::procs::workspace().join("target/image"));
    let mut disks: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e}: build the image first: cargo xtask image",
                dir.display()
            )
        })
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|x| x == "img")
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("edge-"))
        })
        .collect();
    disks.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
    let disk = disks.pop().unwrap_or_else(|| {
        panic!(
            "no edge-*.img in {}: build it with cargo xtask image",
            dir.display()
        )
    });
    let signing_pub = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "pub"))
        .unwrap_or_else(|| panic!("no image-signing public key (*.pub) in {}", dir.display()));
    let app_key = std::fs::read_to_string(dir.join("dev-app-key"))
        .unwrap_or_else(|e| panic!("{}/dev-app-key: {e}", dir.display()))
        .trim()
        .to_string();
    BuiltImage {
        qcow2: disk.with_extension("qcow2"),
        disk,
        signing_pub,
        app_key,
    }
}

/// OVMF's code and variable store templates.
fn ovmf() -> (PathBuf, PathBuf) {
    for (code, vars) in [
        (
            "/usr/share/OVMF/OVMF_CODE_4M.fd",
            "/usr/share/OVMF/OVMF_VARS_4M.fd",
        ),
        (
            "/usr/share/OVMF/OVMF_CODE.fd",
            "/usr/share/OVMF/OVMF_VARS.fd",
        ),
    ] {
        if Path::new(code).exists() && Path::new(vars).exists() {
            return (code.into(), vars.into());
        }
    }
    panic!("no OVMF firmware: apt-get install ovmf (cargo xtask test installs it)");
}

/// A running VM.
pub struct Vm {
    proc: Proc,
    qmp: PathBuf,
    /// The console (first serial port), as a file.
    pub console: PathBuf,
    /// The pty of the provisioning link (second serial port).
    pub provisioning_pty: PathBuf,
    /// `http://127.0.0.1:PORT`: the box's MEC API.
    pub api: String,
    /// When QEMU started.
    pub started: Instant,
}

/// Waits up to `limit` for `f` to give a value, polling every `every`;
/// fails at once, with the console's tail, if QEMU ends.
pub fn wait_for<T>(
    what: &str,
    vm: &mut Vm,
    limit: Duration,
    every: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            vm.running(),
            "QEMU exited while waiting for {what}; console:\n{}",
            vm.console_tail(60)
        );
        assert!(
            Instant::now() < deadline,
            "{what}: not within {limit:?}; console:\n{}",
            vm.console_tail(80)
        );
        std::thread::sleep(every);
    }
}

/// The console's lines that hold every one of `fragments`.
pub fn console_lines(console: &Path, fragments: &[&str]) -> Vec<String> {
    std::fs::read(console)
        .map(|b| {
            String::from_utf8_lossy(&b)
                .lines()
                .filter(|l| fragments.iter().all(|f| l.contains(f)))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Whether a line of the console file `console` holds every one of
/// `fragments` (systemd shortens unit names with an ellipsis: match plain
/// fragments, such as "Finished" and the description's end).
pub fn console_has_line(console: &Path, fragments: &[&str]) -> bool {
    std::fs::read(console)
        .map(|b| {
            String::from_utf8_lossy(&b)
                .lines()
                .any(|l| fragments.iter().all(|f| l.contains(f)))
        })
        .unwrap_or(false)
}

impl Vm {
    /// Boots `image` for the first time (through a qcow2 overlay in `dir`).
    pub fn boot(image: &BuiltImage, dir: &Path) -> Vm {
        Vm::power_on(image, dir, 1)
    }

    /// Powers the box in `dir` on: its disk (the overlay) and firmware
    /// variables as the last run left them, made from `image` the first
    /// time. A guest reboot ends QEMU (`-no-reboot`), so each boot is a run
    /// of its own; `run` names its console and logs (`console-<run>.log`).
    /// The box has a USB controller (`xhci`) and a QMP socket, for plugging
    /// disks in ([`Vm::plug_usb_disk`]).
    pub fn power_on(image: &BuiltImage, dir: &Path, run: u32) -> Vm {
        let overlay = dir.join("overlay.qcow2");
        if !overlay.exists() {
            let out = Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
                .arg(&image.qcow2)
                .arg(&overlay)
                .output()
                .expect("qemu-img runs");
            assert!(
                out.status.success(),
                "qemu-img create: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let (code, vars_template) = ovmf();
        let vars = dir.join("OVMF_VARS.fd");
        if !vars.exists() {
            std::fs::copy(&vars_template, &vars).unwrap();
        }
        let console = dir.join(format!("console-{run}.log"));
        let qmp = dir.join(format!("qmp-{run}.sock"));
        let api_port = free_port(false);
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-machine", "q35", "-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "2048",
        ])
        .args(["-display", "none", "-monitor", "none", "-no-reboot"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .args(["-device", "qemu-xhci,id=xhci"])
        .arg("-drive")
        .arg(format!(
            "if=pflash,format=raw,unit=0,readonly=on,file={}",
            code.display()
        ))
        .arg("-drive")
        .arg(format!(
            "if=pflash,format=raw,unit=1,file={}",
            vars.display()
        ))
        .arg("-drive")
        .arg(format!("if=virtio,format=qcow2,file={}", overlay.display()))
        .args(["-smbios", "type=1,serial=SN-QEMU-0001"])
        .arg("-nic")
        .arg(format!(
            "user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:{api_port}-:8080"
        ))
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .args(["-chardev", "pty,id=prov", "-serial", "chardev:prov"]);
        let log = dir.join(format!("qemu-{run}.log"));
        let started = Instant::now();
        let proc = Proc::start("qemu", cmd, &log);
        // QEMU names the pty on stderr: "char device redirected to /dev/pts/N (label prov)".
        let deadline = Instant::now() + Duration::from_secs(30);
        let pty = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(line) = text.lines().find(|l| l.contains("(label prov)")) {
                let path = line
                    .split_whitespace()
                    .find(|w| w.starts_with("/dev/pts/"))
                    .expect("a pty path");
                break PathBuf::from(path);
            }
            assert!(Instant::now() < deadline, "QEMU named no pty: {text}");
            std::thread::sleep(Duration::from_millis(100));
        };
        Vm {
            proc,
            qmp,
            console,
            provisioning_pty: pty,
            api: format!("http://127.0.0.1:{api_port}"),
            started,
        }
    }

    /// Waits until the kernel runs (its command line on the console). Until
    /// then, bytes on the provisioning line reach the firmware and the boot
    /// loader as keys (OVMF reads every serial port): a technician's tool,
    /// or a test, polling during the boot menu can stop the boot in it.
    pub fn wait_kernel(&mut self, limit: Duration) {
        let console = self.console.clone();
        wait_for(
            "the kernel",
            self,
            limit,
            Duration::from_millis(500),
            || console_has_line(&console, &["Kernel command line:"]).then_some(()),
        );
    }

    /// `edgeprov status --json` over the provisioning line, once the kernel
    /// runs (see [`Vm::wait_kernel`]) and the listener answers.
    pub fn provisioning_status(&mut self) -> serde_json::Value {
        self.wait_kernel(Duration::from_secs(600));
        let pty = self.provisioning_pty.to_str().unwrap().to_string();
        wait_for(
            "the provisioning listener",
            self,
            Duration::from_secs(600),
            Duration::from_secs(2),
            || {
                let (code, v) =
                    crate::procs::run_json(Command::new(crate::procs::bin("edgeprov")).args([
                        "status",
                        "--port",
                        &pty,
                        "--timeout-ms",
                        "3000",
                        "--attempts",
                        "1",
                        "--json",
                    ]));
                (code == 0).then_some(v)
            },
        )
    }

    /// The last `n` lines of the console.
    pub fn console_tail(&self, n: usize) -> String {
        crate::procs::log_tail(&self.console, n)
    }

    /// Whether QEMU still runs.
    pub fn running(&mut self) -> bool {
        self.proc.running()
    }

    /// Waits up to `limit` for the agent's `/readyz` to answer 200; its body.
    pub fn wait_ready(&mut self, limit: Duration) -> serde_json::Value {
        let url = format!("{}/readyz", self.api);
        let http = reqwest::blocking::Client::new();
        let r = wait_for(
            "the agent's readiness",
            self,
            limit,
            Duration::from_secs(3),
            || {
                http.get(&url)
                    .timeout(Duration::from_secs(10))
                    .send()
                    .ok()
                    .filter(|r| r.status() == 200)
            },
        );
        r.json().unwrap_or_default()
    }

    /// One short text completion (2 tokens: under TCG every token is slow)
    /// for `imsi` with `app_key`: the record id and the tokens told.
    pub fn completion(&self, app_key: &str, imsi: &str) -> (String, u64) {
        let r = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(600))
            .build()
            .unwrap()
            .post(format!("{}/v1/completions", self.api))
            .bearer_auth(app_key)
            .header("X-Subscriber-Imsi", imsi)
            .json(&serde_json::json!({
                "model": "smollm2-135m-instruct",
                "prompt": "MEC is",
                "max_tokens": 2,
                "temperature": 0,
            }))
            .send()
            .expect("the API answers");
        assert_eq!(r.status(), 200, "{:?}", r.text());
        let answer: serde_json::Value = r.json().unwrap();
        let usage = &answer["usage"];
        let told =
            usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap();
        let record_id = answer["id"]
            .as_str()
            .unwrap()
            .trim_start_matches("cmpl-")
            .to_string();
        (record_id, told)
    }

    /// Pulls the power: SIGKILL to QEMU, nothing flushed by the guest.
    pub fn power_cut(self) {
        self.proc.kill9();
    }

    /// Waits up to `limit` for QEMU to end by itself (the guest rebooted or
    /// powered off); whether it did.
    pub fn wait_exit(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if !self.running() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        !self.running()
    }

    /// Plugs `file` in as a USB disk (read-only), named `id`: QMP
    /// `blockdev-add`, then `device_add` of a `usb-storage` on the xhci
    /// controller, as a technician plugs in a stick.
    pub fn plug_usb_disk(&self, file: &Path, id: &str) -> Result<(), String> {
        let mut qmp = Qmp::connect(&self.qmp)?;
        qmp.execute(serde_json::json!({
            "execute": "blockdev-add",
            "arguments": {
                "node-name": id,
                "driver": "raw",
                "read-only": true,
                "file": { "driver": "file", "filename": file, "read-only": true },
            }
        }))?;
        qmp.execute(serde_json::json!({
            "execute": "device_add",
            "arguments": { "driver": "usb-storage", "bus": "xhci.0", "drive": id, "id": id, "removable": true }
        }))?;
        Ok(())
    }

    /// Pulls the USB disk `id` out (`device_del`; the guest sees it go).
    pub fn unplug_usb_disk(&self, id: &str) -> Result<(), String> {
        let mut qmp = Qmp::connect(&self.qmp)?;
        qmp.execute(serde_json::json!({
            "execute": "device_del", "arguments": { "id": id }
        }))?;
        Ok(())
    }
}

/// A QMP session: the greeting read and capabilities negotiated.
struct Qmp {
    reader: std::io::BufReader<std::os::unix::net::UnixStream>,
    writer: std::os::unix::net::UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> Result<Qmp, String> {
        let stream = std::os::unix::net::UnixStream::connect(path)
            .map_err(|e| format!("QMP {}: {e}", path.display()))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut qmp = Qmp {
            reader: std::io::BufReader::new(stream),
            writer,
        };
        let greeting = qmp.read()?;
        if greeting.get("QMP").is_none() {
            return Err(format!("not a QMP greeting: {greeting}"));
        }
        qmp.execute(serde_json::json!({ "execute": "qmp_capabilities" }))?;
        Ok(qmp)
    }

    fn read(&mut self) -> Result<serde_json::Value, String> {
        use std::io::BufRead;
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|e| format!("reading QMP: {e}"))?;
        if n == 0 {
            return Err("QMP closed".into());
        }
        serde_json::from_str(&line).map_err(|e| format!("QMP sent {line:?}: {e}"))
    }

    /// Sends a command and reads to its answer (skipping events).
    fn execute(&mut self, cmd: serde_json::Value) -> Result<serde_json::Value, String> {
        use std::io::Write;
        writeln!(self.writer, "{cmd}").map_err(|e| format!("writing QMP: {e}"))?;
        loop {
            let v = self.read()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(format!("QMP {}: {e}", cmd["execute"]));
            }
        }
    }
}
