//! `edge-agent init --dir DIR`: a working configuration in one step: the
//! node identity, a dev app key (allowed every IMSI and every model; real
//! keys are narrower), and `DIR/edge-agent.toml`. Prints one JSON object.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use base64::Engine as _;
use mec_sync::identity::NodeIdentity;

use crate::cli::InitArgs;
use crate::config::Config;

/// The configuration file name inside DIR.
pub const CONFIG_FILE: &str = "edge-agent.toml";

fn toml_string(s: &str) -> String {
    // A TOML basic string: JSON's escaping is a subset TOML accepts.
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// Writes the configuration, identity and dev key; prints them.
pub fn init(args: &InitArgs) -> anyhow::Result<ExitCode> {
    let dir = &args.dir;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let config_path = dir.join(CONFIG_FILE);
    if config_path.exists() && !args.force {
        anyhow::bail!(
            "{} exists; use --force to replace it (the identity and the state are kept)",
            config_path.display()
        );
    }
    let model = args
        .model
        .clone()
        .unwrap_or_else(mec_inference::default_model_path);
    let model = if model.is_relative() {
        std::env::current_dir()?.join(model)
    } else {
        model
    };
    if !model.exists() {
        eprintln!(
            "edge-agent: warning: the model {} does not exist yet (cargo xtask setup fetches the default)",
            model.display()
        );
    }
    let node_id = match &args.node_id {
        Some(id) => id.clone(),
        None => {
            let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
            format!(
                "edge-{}",
                host.trim()
                    .replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "")
            )
        }
    };
    let state_dir = dir.join("state");
    let identity_dir = mec_node::state::StateDir::new(&state_dir).identity_dir();
    let identity = NodeIdentity::load_or_create(&identity_dir)
        .with_context(|| format!("node identity in {}", identity_dir.display()))?;
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| anyhow::anyhow!("random key: {e}"))?;
    let app_key = format!(
        "sk-edge-{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
    );
    let model_id = model
        .file_stem()
        .map(|s| s.to_string_lossy().to_lowercase())
        .unwrap_or_else(|| "model".into());
    let text = format!(
        r#"# Written by `edge-agent init`. Every option is documented in
# edge-agent/edge-agent.example.toml in the repository.

[node]
id = {node_id}
state_dir = "state"

[api]
listen = {api}

[admin]
listen = {admin}

[model]
path = {model}
id = {model_id}

# The dev key printed by `edge-agent init`: every IMSI, every model.
[[apps]]
id = "dev"
key_sha256 = "{digest}"
imsi_prefixes = [""]
models = ["*"]
"#,
        node_id = toml_string(&node_id),
        api = toml_string(&args.api_listen),
        admin = toml_string(&args.admin_listen),
        model = toml_string(&model.to_string_lossy()),
        model_id = toml_string(&model_id),
        digest = crate::server::key_digest_hex(&app_key),
    );
    let text = match (&args.core, &args.core_ca) {
        (Some(core), Some(ca)) => {
            let pem =
                std::fs::read_to_string(ca).with_context(|| format!("reading {}", ca.display()))?;
            anyhow::ensure!(
                pem.contains("BEGIN CERTIFICATE"),
                "{} is not a PEM certificate",
                ca.display()
            );
            std::fs::write(state_dir.join("identity/operator-ca.crt"), pem)?;
            format!("{text}\n# Usage records go to core-ingest once identity/node.crt is there.\n[core]\naddress = {}\n", toml_string(core))
        }
        _ => text,
    };
    // Validate before writing: init never leaves a configuration serve refuses.
    Config::parse(&text, &config_path)?;
    write_private(&config_path, &text)?;
    let out = serde_json::json!({
        "config": config_path,
        "api_url": format!("http://{}", args.api_listen),
        "admin_url": format!("http://{}", args.admin_listen),
        "app_key": app_key,
        "node_id": node_id,
        "node_public_key": identity.public_key_pem(),
        "key_id": identity.key_id(),
        "node_public_key_path": state_dir.join("identity/node.pub"),
        "node_cert_path": state_dir.join("identity/node.crt"),
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(ExitCode::SUCCESS)
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("toml.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
