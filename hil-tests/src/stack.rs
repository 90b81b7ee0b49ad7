//! The stack's parts as the tests drive them: core-ingest, the box's
//! provisioning listener and `edgeprov`, and the edge agent, as real
//! processes (or, for hardware in the loop, a real box behind the same
//! calls).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::procs::{bin, model_path, run_json_lines, run_json_ok, Proc};

/// How long a service may take to print its ready line.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// core-ingest: its directory (also the operator CA directory `edgeprov`
/// issues from), configuration and process.
pub struct Core {
    /// `core-ingest init`'s directory.
    pub dir: PathBuf,
    /// Its configuration file.
    pub config: PathBuf,
    /// Its UDP address.
    pub listen: SocketAddr,
    proc: Option<Proc>,
    /// Times started.
    pub starts: u32,
}

impl Core {
    /// `core-ingest init --dir DIR --listen ADDR [--san NAME]...`.
    pub fn init(dir: &Path, listen: SocketAddr, sans: &[String]) -> Core {
        Core::init_on(dir, listen, sans, None)
    }

    /// [`Core::init`] with `--store STORE` (a PostgreSQL URL) when given.
    pub fn init_on(dir: &Path, listen: SocketAddr, sans: &[String], store: Option<&str>) -> Core {
        let mut cmd = Command::new(bin("core-ingest"));
        cmd.args(["init", "--dir"])
            .arg(dir)
            .args(["--listen", &listen.to_string()]);
        for s in sans {
            cmd.args(["--san", s]);
        }
        if let Some(store) = store {
            cmd.args(["--store", store]);
        }
        let v = run_json_ok(&mut cmd);
        Core {
            dir: dir.to_path_buf(),
            config: PathBuf::from(v["config"].as_str().expect("init prints config")),
            listen,
            proc: None,
            starts: 0,
        }
    }

    /// `core-ingest serve`, waiting for its ready line.
    pub fn start(&mut self) {
        assert!(self.proc.is_none(), "core-ingest already runs");
        let mut cmd = Command::new(bin("core-ingest"));
        cmd.args(["serve", "--config"]).arg(&self.config);
        let (proc, ready) = Proc::start_ready(
            "core-ingest",
            cmd,
            &self.dir.join("serve.log"),
            READY_TIMEOUT,
        );
        assert_eq!(ready["listen"], self.listen.to_string(), "{ready}");
        self.proc = Some(proc);
        self.starts += 1;
    }

    /// SIGKILL: no goodbye to the edge, no flush beyond what SQLite committed.
    pub fn kill9(&mut self) {
        self.proc.take().expect("core-ingest runs").kill9();
    }

    /// `core-ingest audit`.
    pub fn audit(&self) -> Value {
        run_json_ok(
            Command::new(bin("core-ingest"))
                .args(["audit", "--config"])
                .arg(&self.config),
        )
    }

    /// `core-ingest export --format jsonl`.
    pub fn export(&self) -> Vec<Value> {
        run_json_lines(
            Command::new(bin("core-ingest"))
                .args(["export", "--format", "jsonl", "--config"])
                .arg(&self.config),
        )
    }

    /// `core-ingest package sell`: a top-up of `tokens`, valid 30 days,
    /// sold under the operator's `id`.
    pub fn sell(&self, id: &str, imsi: &str, tokens: u64) -> Value {
        run_json_ok(
            Command::new(bin("core-ingest"))
                .args(["package", "sell", "--config"])
                .arg(&self.config)
                .args(["--id", id, "--imsi", imsi, "--tokens", &tokens.to_string()]),
        )
    }

    /// `core-ingest package revoke`.
    pub fn revoke(&self, id: &str) -> Value {
        run_json_ok(
            Command::new(bin("core-ingest"))
                .args(["package", "revoke", "--config"])
                .arg(&self.config)
                .args(["--id", id]),
        )
    }

    /// `core-ingest issue-node-cert` for a box `edge-agent init` made in
    /// `state_dir` (its key's certificate written beside it).
    pub fn enroll(&self, node_id: &str, state_dir: &Path) {
        run_json_ok(
            Command::new(bin("core-ingest"))
                .args(["issue-node-cert", "--config"])
                .arg(&self.config)
                .args(["--node-id", node_id, "--public-key"])
                .arg(state_dir.join("identity/node.pub"))
                .arg("--out")
                .arg(state_dir.join("identity/node.crt")),
        );
    }

    /// Appends `toml` to its configuration (before it starts).
    pub fn configure(&self, toml: &str) {
        let mut text = std::fs::read_to_string(&self.config).expect("the core's configuration");
        text.push_str(toml);
        std::fs::write(&self.config, text).expect("the core's configuration written");
    }

    /// `core-ingest package balance`: the subscriber's account at the core.
    pub fn balance(&self, imsi: &str) -> Value {
        run_json_ok(
            Command::new(bin("core-ingest"))
                .args(["package", "balance", "--config"])
                .arg(&self.config)
                .args(["--imsi", imsi]),
        )
    }

    /// The tail of its log.
    pub fn log_tail(&self) -> String {
        crate::procs::log_tail(&self.dir.join("serve.log"), 30)
    }
}

/// What `edgeprov provision` is given.
pub struct SiteSpec {
    /// Site id.
    pub site: String,
    /// Node id.
    pub node_id: String,
    /// The core as the box reaches it (host:port).
    pub core: String,
    /// The name on the core's certificate.
    pub core_server_name: String,
    /// The box's MEC API address, if the test sets it.
    pub api_listen: Option<String>,
}

/// `edgeprov provision --json` over `port`; its JSON.
pub fn edgeprov_provision(port: &Path, site: &SiteSpec, ca_dir: &Path) -> Value {
    let mut cmd = Command::new(bin("edgeprov"));
    cmd.args(["provision", "--json", "--port"])
        .arg(port)
        .args(["--site", &site.site, "--node-id", &site.node_id])
        .args(["--core", &site.core])
        .args(["--core-server-name", &site.core_server_name])
        .arg("--ca-dir")
        .arg(ca_dir);
    if let Some(a) = &site.api_listen {
        cmd.args(["--api-listen", a]);
    }
    run_json_ok(&mut cmd)
}

/// `edgeprov status --json` over `port`.
pub fn edgeprov_status(port: &Path) -> Value {
    run_json_ok(
        Command::new(bin("edgeprov"))
            .args(["status", "--json", "--port"])
            .arg(port),
    )
}

/// `edge-agent provision-listen` on the box's end of a line.
pub fn provision_listener(port: &Path, state_dir: &Path, log: &Path) -> Proc {
    let mut cmd = Command::new(bin("edge-agent"));
    cmd.args(["provision-listen", "--device-id", "SN-E2E-0001", "--port"])
        .arg(port)
        .arg("--state-dir")
        .arg(state_dir);
    Proc::start_ready("provision-listen", cmd, log, READY_TIMEOUT).0
}

/// An edge agent on this machine, as `edge-agent init` made it.
pub struct LocalAgent {
    /// Its directory.
    pub dir: PathBuf,
    /// Its configuration.
    pub config: PathBuf,
    /// Its state directory.
    pub state_dir: PathBuf,
    /// The dev app's key.
    pub app_key: String,
    proc: Option<Proc>,
    /// Times started.
    pub starts: u32,
}

impl LocalAgent {
    /// `edge-agent init` with the default model and fixed loopback ports (a
    /// restarted agent comes back where its clients look); `extra_toml` is
    /// appended to the configuration.
    pub fn init(dir: &Path, api: SocketAddr, admin: SocketAddr, extra_toml: &str) -> LocalAgent {
        LocalAgent::init_with(dir, api, admin, extra_toml, &[])
    }

    /// [`LocalAgent::init`] with more `edge-agent init` arguments (`--core`,
    /// `--core-ca`, `--node-id`).
    pub fn init_with(
        dir: &Path,
        api: SocketAddr,
        admin: SocketAddr,
        extra_toml: &str,
        args: &[&str],
    ) -> LocalAgent {
        let v = run_json_ok(
            Command::new(bin("edge-agent"))
                .args(["init", "--dir"])
                .arg(dir)
                .arg("--model")
                .arg(model_path())
                .args(["--api-listen", &api.to_string()])
                .args(["--admin-listen", &admin.to_string()])
                .args(args),
        );
        let config = PathBuf::from(v["config"].as_str().unwrap());
        if !extra_toml.is_empty() {
            let mut text = std::fs::read_to_string(&config).unwrap();
            text.push_str(extra_toml);
            std::fs::write(&config, text).unwrap();
        }
        LocalAgent {
            dir: dir.to_path_buf(),
            config,
            state_dir: dir.join("state"),
            app_key: v["app_key"].as_str().unwrap().to_string(),
            proc: None,
            starts: 0,
        }
    }

    /// `edge-agent serve`, waiting for its ready line; the ready line.
    pub fn start(&mut self) -> Value {
        assert!(self.proc.is_none(), "the agent already runs");
        let mut cmd = Command::new(bin("edge-agent"));
        cmd.args(["serve", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info");
        let (proc, ready) = Proc::start_ready(
            "edge-agent",
            cmd,
            &self.dir.join("serve.log"),
            READY_TIMEOUT,
        );
        self.proc = Some(proc);
        self.starts += 1;
        ready
    }

    /// SIGKILL.
    pub fn kill9(&mut self) {
        self.proc.take().expect("the agent runs").kill9();
    }

    /// SIGTERM, waiting for the drain.
    pub fn stop(&mut self) {
        if let Some(p) = self.proc.take() {
            p.terminate(Duration::from_secs(60));
        }
    }

    /// The tail of its log.
    pub fn log_tail(&self) -> String {
        crate::procs::log_tail(&self.dir.join("serve.log"), 40)
    }
}

/// The agent's admin API (a real box's, or one on this machine).
#[derive(Clone)]
pub struct Admin {
    /// `http://host:port`.
    pub url: String,
    http: reqwest::Client,
}

impl Admin {
    /// The admin API at `url`, with the agent's admin `token`.
    pub fn new(url: &str, token: &str) -> Admin {
        let mut auth = reqwest::header::HeaderValue::from_str(&format!("Bearer {}", token.trim()))
            .expect("an admin token is a header value");
        auth.set_sensitive(true);
        Admin {
            url: url.trim_end_matches('/').to_string(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .default_headers(reqwest::header::HeaderMap::from_iter([(
                    reqwest::header::AUTHORIZATION,
                    auth,
                )]))
                .build()
                .unwrap(),
        }
    }

    /// The admin API of a local agent, from its ready line.
    pub fn of_ready(ready: &Value) -> Admin {
        let token = std::fs::read_to_string(
            ready["admin_token_file"]
                .as_str()
                .expect("the ready line names the admin token file"),
        )
        .expect("the admin token is readable");
        Admin::new(ready["admin_url"].as_str().unwrap_or_default(), &token)
    }

    /// Grants `tokens` to `imsi` (a top-up valid 30 days).
    pub async fn grant(&self, imsi: &str, tokens: u64) -> Value {
        let r = self
            .http
            .post(format!("{}/admin/v1/grants", self.url))
            .json(&json!({ "imsi": imsi, "tokens": tokens, "kind": "topup", "valid_days": 30 }))
            .send()
            .await
            .expect("the admin API answers");
        let status = r.status();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        assert_eq!(status, 201, "grant {imsi}: {v}");
        v
    }

    /// A subscriber's balance.
    pub async fn balance(&self, imsi: &str) -> Value {
        self.get(&format!("/admin/v1/subscribers/{imsi}")).await
    }

    /// The upload's state.
    pub async fn sync(&self) -> Value {
        self.get("/admin/v1/sync").await
    }

    async fn get(&self, path: &str) -> Value {
        let r = self
            .http
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        r.json().await.unwrap_or(Value::Null)
    }

    /// Waits (up to `limit`) until the core has acknowledged every record
    /// of the log; the time it took, or the last sync state seen.
    pub async fn wait_drained(&self, limit: Duration) -> Result<Duration, Value> {
        let started = Instant::now();
        let mut last = Value::Null;
        while started.elapsed() < limit {
            if let Ok(Ok(r)) = tokio::time::timeout(
                Duration::from_secs(5),
                self.http.get(format!("{}/admin/v1/sync", self.url)).send(),
            )
            .await
            {
                if let Ok(v) = r.json::<Value>().await {
                    let durable = v["log_durable_seq"].as_u64();
                    if durable.is_some()
                        && v["log_acked_seq"].as_u64() == durable
                        && v["status"]["acked_seq"].as_u64() == durable
                        && v["backlog_records"] == 0
                    {
                        return Ok(started.elapsed());
                    }
                    last = v;
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Err(last)
    }
}
