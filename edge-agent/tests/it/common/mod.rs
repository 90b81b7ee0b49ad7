//! A real agent for tests: `edge-agent init` into a temporary directory,
//! `edge-agent serve` as a child process on loopback ports chosen by the
//! kernel, the real model, HTTP through reqwest.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub const IMSI: &str = "001010000000001";

/// A second app, limited to the PLMN 00101, appended to the configuration.
pub const NARROW_KEY: &str = "sk-narrow-test-key";

pub struct Agent {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub key: String,
    pub api: String,
    pub admin: String,
    pub model: String,
    pub child: Child,
    pub http: reqwest::Client,
    /// A client carrying the admin token.
    pub admin_http: reqwest::Client,
    /// Where the agent keeps its admin token.
    pub admin_token_file: PathBuf,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_edge-agent")
}

/// `edge-agent init` in `dir` with kernel-chosen ports, `extra` arguments;
/// its JSON.
pub fn init_json(dir: &Path, node_id: &str, extra: &[&str]) -> Value {
    let out = Command::new(bin())
        .args(["init", "--dir"])
        .arg(dir)
        .args([
            "--api-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--node-id",
            node_id,
        ])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `edge-agent init` in `dir` with kernel-chosen ports and the narrow app.
pub fn init(dir: &Path) -> (PathBuf, String) {
    let v = init_json(dir, "test-node", &[]);
    let config = PathBuf::from(v["config"].as_str().unwrap());
    let digest = {
        use std::io::Write;
        let mut p = Command::new("sha256sum")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        p.stdin
            .take()
            .unwrap()
            .write_all(NARROW_KEY.as_bytes())
            .unwrap();
        let o = p.wait_with_output().unwrap();
        String::from_utf8(o.stdout).unwrap()[..64].to_string()
    };
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "\n[[apps]]\nid = \"narrow\"\nkey_sha256 = \"{digest}\"\nimsi_prefixes = [\"00101\"]\nmodels = [\"*\"]\n"
    ));
    std::fs::write(&config, text).unwrap();
    (config, v["app_key"].as_str().unwrap().to_string())
}

impl Agent {
    /// A new agent in `dir`.
    pub fn new(dir: &Path) -> Agent {
        Agent::with_extra(dir, "")
    }

    /// A new agent with `extra` TOML appended to its configuration.
    pub fn with_extra(dir: &Path, extra: &str) -> Agent {
        let (config, key) = init(dir);
        let mut text = std::fs::read_to_string(&config).unwrap();
        text.push_str(extra);
        std::fs::write(&config, text).unwrap();
        Agent::serve(dir, &config, &key)
    }

    /// `edge-agent serve --config`, waiting for its ready line.
    pub fn serve(dir: &Path, config: &Path, key: &str) -> Agent {
        Agent::serve_with_env(dir, config, key, &[])
    }

    /// `serve` with extra environment variables.
    pub fn serve_with_env(dir: &Path, config: &Path, key: &str, env: &[(&str, &str)]) -> Agent {
        let stderr =
            std::fs::File::create(dir.join(format!("serve-{}.log", std::process::id()))).unwrap();
        let mut child = Command::new(bin())
            .args(["serve", "--config"])
            .arg(config)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("the agent printed no ready line");
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["event"], "ready", "{line}");
        Agent {
            dir: dir.to_path_buf(),
            config: config.to_path_buf(),
            key: key.to_string(),
            api: v["api_url"].as_str().unwrap().to_string(),
            admin: v["admin_url"].as_str().unwrap().to_string(),
            model: v["model"].as_str().unwrap().to_string(),
            child,
            http: reqwest::Client::new(),
            admin_token_file: PathBuf::from(v["admin_token_file"].as_str().unwrap()),
            admin_http: edge_agent::admin_client(
                std::fs::read_to_string(v["admin_token_file"].as_str().unwrap())
                    .unwrap()
                    .trim(),
            )
            .unwrap(),
        }
    }

    pub async fn grant(&self, imsi: &str, tokens: u64) -> Value {
        let r = self
            .admin_http
            .post(format!("{}/admin/v1/grants", self.admin))
            .json(&json!({ "imsi": imsi, "tokens": tokens, "kind": "topup" }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        r.json().await.unwrap()
    }

    pub async fn balance(&self, imsi: &str) -> Value {
        self.get_json(format!("{}/admin/v1/subscribers/{imsi}", self.admin))
            .await
    }

    pub async fn remaining(&self, imsi: &str) -> u64 {
        self.balance(imsi).await["remaining_tokens"]
            .as_u64()
            .unwrap()
    }

    /// Recent usage rows, waiting until at least `n` are there (the store
    /// applies settlements behind the response).
    pub async fn usage(&self, imsi: &str, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let url = format!(
                "{}/admin/v1/subscribers/{imsi}/usage?limit=1000",
                self.admin
            );
            let v = self.get_json(url).await;
            let rows = v["usage"].as_array().unwrap().clone();
            if rows.len() >= n || Instant::now() > deadline {
                return rows;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn chat_body(&self, content: &str, max_tokens: u64, stream: bool) -> Value {
        json!({
            "model": self.model,
            "messages": [{ "role": "user", "content": content }],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": stream,
            "stream_options": { "include_usage": true },
        })
    }

    /// A chat completion request of `imsi`, sent.
    pub async fn chat(
        &self,
        imsi: &str,
        content: &str,
        max_tokens: u64,
        stream: bool,
    ) -> reqwest::Response {
        self.post("/v1/chat/completions", imsi)
            .json(&self.chat_body(content, max_tokens, stream))
            .send()
            .await
            .unwrap()
    }

    /// GET `url` as JSON: with the admin token on the admin API, else
    /// with the app key.
    pub async fn get_json(&self, url: String) -> Value {
        let request = if url.starts_with(&self.admin) {
            self.admin_http.get(url)
        } else {
            self.http.get(url).bearer_auth(&self.key)
        };
        request.send().await.unwrap().json().await.unwrap()
    }

    pub fn post(&self, path: &str, imsi: &str) -> reqwest::RequestBuilder {
        self.http
            .post(format!("{}{path}", self.api))
            .bearer_auth(&self.key)
            .header("X-Subscriber-Imsi", imsi)
    }

    pub fn signal(&mut self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    pub fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "the agent did not exit");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every record of the agent's log (`edge-agent log dump --config`).
    pub fn dump(&self) -> Vec<Value> {
        let out = Command::new(bin())
            .args(["log", "dump", "--config"])
            .arg(&self.config)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "dump: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `data:` payloads of a server-sent-event body.
pub fn sse_data(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
        .map(|s| s.trim().to_string())
        .collect()
}
