//! `edge-agent admin --config FILE …`: the admin API from the command line
//! (the agent must be running). Prints the API's JSON; exit 2 on an error.

use std::process::ExitCode;

use anyhow::Context;
use serde_json::json;

use crate::cli::{AdminArgs, AdminCommand};
use crate::config::Config;

/// Runs one admin command against the running agent.
pub fn admin(args: &AdminArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(&args.config)?;
    let base = format!("http://{}", config.admin.listen);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let token = std::fs::read_to_string(config.admin_token_path()).map_err(|e| {
            anyhow::anyhow!(
                "reading the admin token {}: {e} (run as the agent's user or root)",
                config.admin_token_path().display()
            )
        })?;
        let client = crate::admin_client(token.trim())?;
        let req = match &args.command {
            AdminCommand::Grant {
                imsi,
                tokens,
                kind,
                valid_days,
                models,
            } => client.post(format!("{base}/admin/v1/grants")).json(&json!({
                "imsi": imsi,
                "tokens": tokens,
                "kind": kind,
                "valid_days": valid_days,
                "models": models,
            })),
            AdminCommand::Revoke { bucket } => {
                client.delete(format!("{base}/admin/v1/buckets/{bucket}"))
            }
            AdminCommand::Balance { imsi } => {
                client.get(format!("{base}/admin/v1/subscribers/{imsi}"))
            }
            AdminCommand::Usage { imsi, limit } => client.get(format!(
                "{base}/admin/v1/subscribers/{imsi}/usage?limit={limit}"
            )),
            AdminCommand::Models => client.get(format!("{base}/admin/v1/models")),
            AdminCommand::Rates => client.get(format!("{base}/admin/v1/rates")),
            AdminCommand::InstallRates { table } => {
                let text = std::fs::read_to_string(table)
                    .with_context(|| format!("{}", table.display()))?;
                let sig_path = crate::server::rates::signature_path(table);
                let signature = std::fs::read_to_string(&sig_path).with_context(|| {
                    format!(
                        "{} (sign it with `edge-agent sign-rates`)",
                        sig_path.display()
                    )
                })?;
                client
                    .put(format!("{base}/admin/v1/rates"))
                    .json(&json!({ "table": text, "signature": signature }))
            }
            AdminCommand::Load { model } => client.post(model_url(&base, model, "load")?),
            AdminCommand::Unload { model } => client.post(model_url(&base, model, "unload")?),
            AdminCommand::Pin { model } => client.post(model_url(&base, model, "pin")?),
            AdminCommand::Unpin { model } => client.post(model_url(&base, model, "unpin")?),
        };
        let resp = req.send().await.with_context(|| {
            format!("the agent's admin API at {base} (is `edge-agent serve` running?)")
        })?;
        let status = resp.status();
        let body: serde_json::Value = resp.json().await.context("the admin API's answer")?;
        println!("{}", serde_json::to_string_pretty(&body)?);
        if status.is_success() {
            Ok(ExitCode::SUCCESS)
        } else {
            Ok(ExitCode::from(2))
        }
    })
}

/// `/admin/v1/models/{model}/{action}`, the id escaped as one path segment
/// (a model id may hold a `/`).
fn model_url(base: &str, model: &str, action: &str) -> anyhow::Result<reqwest::Url> {
    let mut url = reqwest::Url::parse(base)?;
    url.path_segments_mut()
        .map_err(|()| anyhow::anyhow!("{base} cannot take a path"))?
        .extend(["admin", "v1", "models", model, action]);
    Ok(url)
}
