//! `edge-agent update status | apply`: the appliance's A/B slots. The
//! decisions and the order of writes live in `mec_update`; this finds the
//! operator's key and prints JSON.

use std::process::ExitCode;

use anyhow::Context;
use mec_update::apply::{self, BoxPaths, UpdateError};
use mec_update::boot::ApplyOptions;
use serde_json::json;

use crate::cli::UpdateApplyArgs;

/// Prints the slots as JSON.
pub fn status() -> anyhow::Result<ExitCode> {
    let s = apply::status(&BoxPaths::system())
        .context("reading the slots (is the ESP mounted at /efi?)")?;
    println!("{}", serde_json::to_string_pretty(&s)?);
    Ok(ExitCode::SUCCESS)
}

/// The operator's image key from the provisioned `site.toml`: the only key
/// bundles are checked with.
fn operator_key(args: &UpdateApplyArgs) -> anyhow::Result<ed25519_dalek::VerifyingKey> {
    let config = crate::config::Config::load(&args.config)?;
    let site_path = config.node.state_dir.join("site.toml");
    let site = mec_provisioning::site::SiteConfig::load(&site_path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", site_path.display()))?
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{} is missing: the box is not provisioned, so it has no operator image key and takes no update",
                site_path.display()
            )
        })?;
    let pem = site.image_signing_key.ok_or_else(|| {
        anyhow::anyhow!(
            "the site configuration has no operator image key: re-provision with `edgeprov provision --image-key`; until then the box takes no update"
        )
    })?;
    mec_image::manifest::parse_verifying_key(&pem)
        .map_err(|e| anyhow::anyhow!("the site's image key: {e}"))
}

/// Applies a bundle; prints progress and the result as JSON lines. Exit
/// code 3 when the bundle was refused (nothing written), 2 on other errors.
pub fn apply(args: &UpdateApplyArgs) -> anyhow::Result<ExitCode> {
    let key = operator_key(args)?;
    let opts = ApplyOptions {
        allow_downgrade: args.allow_downgrade,
        retry_failed: args.retry_failed,
    };
    let mut progress = |p: apply::Progress| {
        println!(
            "{}",
            json!({ "event": "progress", "stage": p.stage, "done": p.done, "total": p.total })
        );
    };
    match apply::apply(&BoxPaths::system(), &args.bundle, &key, opts, &mut progress) {
        Ok(applied) => {
            println!("{}", json!({ "event": "applied", "applied": applied }));
            Ok(ExitCode::SUCCESS)
        }
        // A bundle whose content broke while being written left the target
        // slot unbootable, not untouched: that is an error, not a refusal.
        Err(UpdateError::Bundle(e @ mec_update::bundle::BundleError::Content { .. })) => {
            Err(anyhow::anyhow!(
                "{e}; the slot written is left unbootable, the running slot still boots"
            ))
        }
        Err(e @ (UpdateError::Refused(_) | UpdateError::Bundle(_))) => {
            tracing::warn!(error = %e, bundle = %args.bundle.display(), "update refused");
            println!("{}", json!({ "event": "refused", "reason": e.to_string() }));
            Ok(ExitCode::from(3))
        }
        Err(e) => Err(e.into()),
    }
}
