//! `cargo xtask run`: the main job. Fetches the model, builds in release,
//! writes a configuration under `state/agent/` the first time (`edge-agent
//! init`), starts `edge-agent serve`, gives a demo subscriber a trial package,
//! and prints the curl command to call it. Ctrl-C drains and stops it.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};
use serde_json::Value;

use crate::{output, release_agent, root};

/// The demo subscriber (test PLMN 001-01).
const DEMO_IMSI: &str = "001010000000001";
const DEMO_TOKENS: &str = "100000";

pub fn run() -> anyhow::Result<()> {
    let root = root();
    crate::model::ensure(&root)?;
    let agent = release_agent()?;
    let dir = root.join("state/agent");
    let config = dir.join("edge-agent.toml");
    // The dev key is printed once by init; the demo keeps it beside the
    // configuration (mode 0600) so a second run can print it again.
    let key_file = dir.join("dev-app-key");
    if !config.exists() {
        let out = output(Command::new(&agent).args(["init", "--dir"]).arg(&dir))?;
        let v: Value = serde_json::from_str(&out).context("init's JSON")?;
        let key = v["app_key"].as_str().context("init printed no app_key")?;
        write_private(&key_file, key)?;
    }
    let key = std::fs::read_to_string(&key_file).with_context(|| {
        format!(
            "{} (remove {} to start over)",
            key_file.display(),
            dir.display()
        )
    })?;
    let mut child = Command::new(&agent)
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .spawn()
        .context("starting edge-agent serve")?;
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready: Value = match lines.next() {
        Some(Ok(line)) => serde_json::from_str(&line).context("the ready line")?,
        _ => {
            let status = child.wait()?;
            bail!("edge-agent serve exited before it was ready: {status}");
        }
    };
    let admin = |args: &[&str]| -> anyhow::Result<Value> {
        let out = output(
            Command::new(&agent)
                .arg("admin")
                .arg("--config")
                .arg(&config)
                .args(args),
        )?;
        Ok(serde_json::from_str(&out)?)
    };
    let balance = admin(&["balance", "--imsi", DEMO_IMSI])?;
    if balance["remaining_tokens"].as_u64() == Some(0) {
        admin(&[
            "grant",
            "--imsi",
            DEMO_IMSI,
            "--tokens",
            DEMO_TOKENS,
            "--kind",
            "trial",
        ])?;
    }
    let api = ready["api_url"].as_str().unwrap_or_default();
    let model = ready["model"].as_str().unwrap_or_default();
    println!(
        r#"
The edge agent is serving {model} at {api} (admin API at {admin}).
Subscriber {DEMO_IMSI} has a trial package. Try:

  curl -s {api}/v1/chat/completions \
    -H "Authorization: Bearer {key}" \
    -H "X-Subscriber-Imsi: {DEMO_IMSI}" \
    -H "Content-Type: application/json" \
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "What is MEC?"}}], "max_tokens": 64}}'

  {agent} admin --config {config} balance --imsi {DEMO_IMSI}
  {agent} log dump --config {config}

Ctrl-C stops it (in-flight requests finish and are billed).
"#,
        admin = ready["admin_url"].as_str().unwrap_or_default(),
        key = key.trim(),
        agent = agent.display(),
        config = config.display(),
    );
    let status = child.wait()?;
    if !status.success() {
        bail!("edge-agent serve: {status}");
    }
    Ok(())
}

fn write_private(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}
