//! The admin API, on its own loopback listener: grant and revoke token
//! packages, read a subscriber's balance and recent usage. `edge-agent
//! admin` wraps it.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use mec_metering::{BucketKind, Imsi};
use serde::Deserialize;
use serde_json::json;

use super::error::ApiError;
use super::AppState;
use mec_billing::unix_now;

/// The admin API's credential in `path`: read, or made (32 random bytes,
/// hex, mode 0600, created exclusively) at the first start.
pub fn load_or_create_token(path: &std::path::Path) -> anyhow::Result<String> {
    use anyhow::Context;
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    match std::fs::read_to_string(path) {
        Ok(t) if t.trim().len() >= 32 => {
            let mode = std::fs::metadata(path)?.permissions().mode();
            if mode & 0o077 != 0 {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                    .with_context(|| format!("restricting {}", path.display()))?;
                tracing::warn!(path = %path.display(), "the admin token was readable by others; now 0600");
            }
            return Ok(t.trim().to_string());
        }
        Ok(_) => anyhow::bail!(
            "{}: not an admin token (at least 32 characters); remove it to make a new one",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("random bytes: {e}"))?;
    let token = hex::encode(bytes);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(token.as_bytes())?;
    f.sync_all()?;
    Ok(token)
}

/// 401 unless the request carries the admin token as a bearer credential.
async fn require_token(
    State(token): State<Arc<String>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    use subtle::ConstantTimeEq;
    let given = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if given.as_bytes().ct_eq(token.as_bytes()).into() {
        next.run(req).await
    } else {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            ..ApiError::unauthorized(
                "the admin API needs the agent's admin token (state_dir/admin.token) as a bearer credential",
            )
        }
        .into_response()
    }
}

/// The admin routes, behind the admin token.
pub fn router(state: Arc<AppState>, token: Arc<String>) -> Router {
    Router::new()
        .route("/admin/v1/grants", post(grant))
        .route("/admin/v1/buckets/{id}", delete(revoke))
        .route("/admin/v1/subscribers/{imsi}", get(balance))
        .route("/admin/v1/subscribers/{imsi}/usage", get(usage))
        .route("/admin/v1/sync", get(sync_status))
        .route("/admin/v1/update", get(update_status).post(update_apply))
        .route("/admin/v1/models", get(models))
        .route("/admin/v1/rates", get(rates).put(install_rates))
        .route("/admin/v1/models/{id}/load", post(load_model))
        .route("/admin/v1/models/{id}/unload", post(unload_model))
        .route("/admin/v1/models/{id}/pin", post(pin_model))
        .route("/admin/v1/models/{id}/unpin", post(unpin_model))
        .layer(axum::middleware::from_fn_with_state(token, require_token))
        .with_state(state)
}

/// `POST /admin/v1/grants`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantRequest {
    /// Subscriber.
    pub imsi: String,
    /// Tokens (per month for monthly).
    pub tokens: u64,
    /// monthly, topup (default) or trial.
    #[serde(default)]
    pub kind: Option<String>,
    /// Days of validity from `valid_from` (default 30; monthly 365).
    #[serde(default)]
    pub valid_days: Option<u32>,
    /// Unix seconds; default now.
    #[serde(default)]
    pub valid_from: Option<i64>,
    /// The models (ids) or tiers (of the rate table) it may be spent on;
    /// absent or empty: every model.
    #[serde(default)]
    pub models: Vec<String>,
}

fn imsi_of(s: &str) -> Result<Imsi, ApiError> {
    Imsi::parse(s).map_err(|e| ApiError::invalid("invalid_imsi", format!("imsi: {e}")))
}

async fn grant(State(state): State<Arc<AppState>>, body: axum::body::Bytes) -> Response {
    let run = async {
        let req: GrantRequest = serde_json::from_slice(&body)
            .map_err(|e| ApiError::invalid("invalid_request", format!("grant: {e}")))?;
        let imsi = imsi_of(&req.imsi)?;
        let kind = match req.kind.as_deref() {
            None => BucketKind::Topup,
            Some(k) => BucketKind::parse(k).ok_or_else(|| {
                ApiError::invalid_param("kind", format!("{k:?}: monthly, topup or trial"))
            })?,
        };
        if req.tokens == 0 || req.tokens > i64::MAX as u64 {
            return Err(ApiError::invalid_param(
                "tokens",
                "tokens must be at least 1",
            ));
        }
        let days = req
            .valid_days
            .unwrap_or(if kind == BucketKind::Monthly { 365 } else { 30 });
        if days == 0 || days > 36_500 {
            return Err(ApiError::invalid_param("valid_days", "1 to 36500 days"));
        }
        let now = unix_now();
        let from = req.valid_from.unwrap_or(now);
        let until = from + i64::from(days) * 86_400;
        let billing = state.billing.clone();
        if req
            .models
            .iter()
            .any(|m| m.is_empty() || m.len() > 128 || m.chars().any(char::is_control))
        {
            return Err(ApiError::invalid_param(
                "models",
                "each model or tier: 1 to 128 bytes, no control characters",
            ));
        }
        let bucket = tokio::task::spawn_blocking(move || {
            billing.grant_for(&imsi, kind, req.tokens, (from, until), &req.models)
        })
        .await
        .map_err(|e| ApiError::internal(e.to_string()))??;
        let id = bucket.id;
        let imsi = bucket.imsi.clone();
        tracing::info!(imsi = %imsi, bucket = id, units = req.tokens, kind = kind.as_str(), models = ?bucket.models, "granted");
        let balance = state.billing.balance(&imsi);
        Ok((
            StatusCode::CREATED,
            Json(json!({ "bucket_id": id, "balance": balance })),
        ))
    };
    match run.await {
        Ok(r) => r.into_response(),
        Err(e) => e.into_response(),
    }
}

async fn revoke(State(state): State<Arc<AppState>>, Path(id): Path<u64>) -> Response {
    let billing = state.billing.clone();
    match tokio::task::spawn_blocking(move || billing.revoke(id)).await {
        Ok(Ok(())) => Json(json!({ "bucket_id": id, "revoked": true })).into_response(),
        Ok(Err(e)) => ApiError::from(e).into_response(),
        Err(e) => ApiError::internal(e.to_string()).into_response(),
    }
}

async fn balance(State(state): State<Arc<AppState>>, Path(imsi): Path<String>) -> Response {
    match imsi_of(&imsi) {
        Ok(imsi) => Json(state.billing.balance(&imsi)).into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Debug, Deserialize)]
struct UsageQuery {
    limit: Option<usize>,
}

async fn usage(
    State(state): State<Arc<AppState>>,
    Path(imsi): Path<String>,
    Query(q): Query<UsageQuery>,
) -> Response {
    let imsi = match imsi_of(&imsi) {
        Ok(i) => i,
        Err(e) => return e.into_response(),
    };
    let billing = state.billing.clone();
    let limit = q.limit.unwrap_or(20);
    let rows = tokio::task::spawn_blocking(move || billing.recent_usage(&imsi, limit)).await;
    match rows {
        Ok(Ok(rows)) => Json(json!({ "usage": rows })).into_response(),
        Ok(Err(e)) => ApiError::from(e).into_response(),
        Err(e) => ApiError::internal(e.to_string()).into_response(),
    }
}

/// `GET /admin/v1/rates`: the rate table in force.
async fn rates(State(state): State<Arc<AppState>>) -> Response {
    Json(state.rates.view()).into_response()
}

/// `PUT /admin/v1/rates`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstallRates {
    /// The table file's text, exactly as signed.
    pub table: String,
    /// Its detached Ed25519 signature, base64.
    pub signature: String,
}

/// `PUT /admin/v1/rates`: installs a signed rate table, newer than the one
/// in force (409 otherwise, or for a bad signature; the old one stays).
async fn install_rates(State(state): State<Arc<AppState>>, body: axum::body::Bytes) -> Response {
    let req: InstallRates = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return ApiError::invalid("invalid_request", format!("rates: {e}")).into_response()
        }
    };
    let installed = {
        let state = state.clone();
        tokio::task::spawn_blocking(move || {
            state
                .rates
                .install(req.table.as_bytes(), &req.signature)
                .map(|_| ())
        })
        .await
    };
    match installed {
        Ok(Ok(())) => Json(state.rates.view()).into_response(),
        Ok(Err(e @ super::rates::InstallError::Io { .. })) => {
            ApiError::internal(e.to_string()).into_response()
        }
        Ok(Err(e)) => conflict("rates_refused", e.to_string()),
        Err(e) => ApiError::internal(e.to_string()).into_response(),
    }
}

/// `GET /admin/v1/models`: every model and its state.
async fn models(State(state): State<Arc<AppState>>) -> Response {
    Json(json!({ "models": state.models.views() })).into_response()
}

/// The view of one model (after an admin action).
fn model_view(state: &AppState, id: &str) -> serde_json::Value {
    let view = state.models.views().into_iter().find(|v| v.id == id);
    serde_json::to_value(view).unwrap_or_default()
}

fn model_id(state: &AppState, name: &str) -> Result<String, ApiError> {
    state
        .models
        .resolve(name)
        .map(|s| s.id.clone())
        .ok_or_else(|| ApiError::model_not_found(name))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LoadQuery {
    /// Answer once the load ended (default), or at once (202).
    wait: Option<bool>,
}

/// `POST /admin/v1/models/{id}/load[?wait=false]`: loads a model (evicting
/// the least recently used idle models its memory needs); a failed model
/// is tried again. By default the answer waits for the load's end.
async fn load_model(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    Query(q): Query<LoadQuery>,
) -> Response {
    let id = match model_id(&state, &name) {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    if q.wait == Some(false) {
        return match state.models.load(&id) {
            Ok(()) => (StatusCode::ACCEPTED, Json(model_view(&state, &id))).into_response(),
            Err(e) => conflict("model_not_loadable", e.to_string()),
        };
    }
    let models = state.models.clone();
    let waited = {
        let id = id.clone();
        tokio::task::spawn_blocking(move || models.load_and_wait(&id)).await
    };
    match waited {
        Ok(Ok(())) => Json(model_view(&state, &id)).into_response(),
        Ok(Err(reason)) => conflict("model_not_loadable", reason),
        Err(e) => ApiError::internal(e.to_string()).into_response(),
    }
}

fn conflict(code: &'static str, message: String) -> Response {
    ApiError {
        status: StatusCode::CONFLICT,
        ..ApiError::invalid(code, message)
    }
    .into_response()
}

/// `POST /admin/v1/models/{id}/unload`: at once when idle; else it takes no
/// new requests and unloads when its last one ends. A pinned model: 409.
async fn unload_model(State(state): State<Arc<AppState>>, Path(name): Path<String>) -> Response {
    let id = match model_id(&state, &name) {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    let models = state.models.clone();
    let unloaded = {
        let id = id.clone();
        // Dropping an engine joins its scheduler thread.
        tokio::task::spawn_blocking(move || models.unload(&id)).await
    };
    match unloaded {
        Ok(Ok(now)) => {
            Json(json!({ "unloaded": now, "model": model_view(&state, &id) })).into_response()
        }
        Ok(Err(reason)) => conflict("model_not_unloadable", reason),
        Err(e) => ApiError::internal(e.to_string()).into_response(),
    }
}

async fn pin_model(State(state): State<Arc<AppState>>, Path(name): Path<String>) -> Response {
    set_pin(&state, &name, true)
}

async fn unpin_model(State(state): State<Arc<AppState>>, Path(name): Path<String>) -> Response {
    set_pin(&state, &name, false)
}

/// `POST /admin/v1/models/{id}/pin` and `/unpin`: a pinned model is never
/// evicted nor unloaded for idleness (until the agent restarts: the
/// configuration's `pin` holds from then on).
fn set_pin(state: &AppState, name: &str, pinned: bool) -> Response {
    let id = match model_id(state, name) {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    match state.models.pin(&id, pinned) {
        Ok(()) => Json(model_view(state, &id)).into_response(),
        Err(reason) => conflict("model_not_pinnable", reason),
    }
}

/// `GET /admin/v1/sync`: the upload to the core.
async fn sync_status(State(state): State<Arc<AppState>>) -> Response {
    let log = state.log.stats();
    let view = {
        let state = state.clone();
        tokio::task::spawn_blocking(move || state.sync_view())
            .await
            .unwrap_or(None)
    };
    Json(json!({
        "configured": state.config.core.is_some(),
        "core": state.config.core.as_ref().map(|c| c.address.clone()),
        "status": view,
        "log_durable_seq": log.durable_seq,
        "log_acked_seq": log.acked_seq,
        "backlog_records": log.backlog_records,
        "backlog_bytes": log.backlog_bytes,
    }))
    .into_response()
}

/// `POST /admin/v1/update`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateApplyRequest {
    /// The bundle's path on the box (a file, or a USB stick's device).
    pub bundle: std::path::PathBuf,
    /// Install a version not newer than the running one.
    #[serde(default)]
    pub allow_downgrade: bool,
    /// Install a version that failed its boot tries here before.
    #[serde(default)]
    pub retry_failed: bool,
}

/// Sends one request to the root update service and returns its reply
/// lines as they come. The agent runs unprivileged: the service (socket
/// activated, open to the agent's group only) does the writing.
async fn update_service(
    state: &AppState,
    request: &mec_update::service::Request,
) -> Result<tokio::io::Lines<tokio::io::BufReader<tokio::net::UnixStream>>, ApiError> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let path = &state.config.admin.update_socket;
    let mut stream = tokio::net::UnixStream::connect(path).await.map_err(|e| {
        ApiError::unavailable(
            "update_service_unavailable",
            format!(
                "the update service's socket {}: {e} (edge-update.socket runs on the appliance only)",
                path.display()
            ),
        )
    })?;
    let line = serde_json::to_string(request).expect("a request serialises") + "\n";
    stream.write_all(line.as_bytes()).await.map_err(|e| {
        ApiError::unavailable(
            "update_service_unavailable",
            format!("writing to the update service: {e}"),
        )
    })?;
    Ok(tokio::io::BufReader::new(stream).lines())
}

/// `GET /admin/v1/update`: the slots, as `edge-agent update status` prints them.
async fn update_status(State(state): State<Arc<AppState>>) -> Response {
    let run = async {
        let mut lines = update_service(&state, &mec_update::service::Request::Status {}).await?;
        let broken = |e: String| ApiError::internal(format!("the update service: {e}"));
        let line = lines
            .next_line()
            .await
            .map_err(|e| broken(e.to_string()))?
            .ok_or_else(|| broken("no answer".into()))?;
        let v: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| broken(e.to_string()))?;
        match v["event"].as_str() {
            Some("status") => Ok(Json(v["status"].clone()).into_response()),
            _ => Err(broken(v["message"].as_str().unwrap_or(&line).to_string())),
        }
    };
    run.await.unwrap_or_else(|e: ApiError| e.into_response())
}

/// `POST /admin/v1/update`: applies a bundle on the box. The answer streams
/// the service's JSON lines (`application/x-ndjson`) as the apply goes:
/// progress, then one of `applied`, `refused` (nothing written) or `error`.
async fn update_apply(State(state): State<Arc<AppState>>, body: axum::body::Bytes) -> Response {
    let run = async {
        let req: UpdateApplyRequest = serde_json::from_slice(&body)
            .map_err(|e| ApiError::invalid("invalid_request", format!("update: {e}")))?;
        let lines = update_service(
            &state,
            &mec_update::service::Request::Apply {
                bundle: req.bundle,
                allow_downgrade: req.allow_downgrade,
                retry_failed: req.retry_failed,
            },
        )
        .await?;
        let stream = futures_util::stream::unfold(lines, |mut lines| async move {
            match lines.next_line().await {
                Ok(Some(line)) => Some((Ok::<_, std::io::Error>(line + "\n"), lines)),
                Ok(None) => None,
                Err(e) => Some((Err(e), lines)),
            }
        });
        Ok::<_, ApiError>(
            (
                [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
                axum::body::Body::from_stream(stream),
            )
                .into_response(),
        )
    };
    run.await.unwrap_or_else(|e| e.into_response())
}
