//! The operator's packages at the core (issue 23), over the core's store:
//! sell (a monthly plan, a top-up, a trial), revoke, and a subscriber's
//! balance; for `core-ingest package ...` and the operator API
//! (`/operator/v1/...`, [`operator_routes`]). Every sale carries the
//! operator's id: the same sale sent again is one sale.
//!
//! Boxes spend them through grants on the downlink ([`crate::downlink`]),
//! and the records they upload settle them
//! ([`crate::charging_store::settle_uploaded`]).

use std::sync::Arc;

use mec_metering::charging::{ChargingError, PackageSpec};
use mec_metering::{BucketKind, Imsi};
use serde_json::{json, Value};

use crate::charging_store::{ChargingStore, ChargingStoreError};
use crate::core_ingest::parse_time;

/// What a sale asks for (the CLI's flags, the API's body).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sale {
    /// The operator's id for the sale (its idempotency key).
    pub id: String,
    /// The subscriber.
    pub imsi: String,
    /// monthly, topup or trial.
    #[serde(default = "topup")]
    pub kind: String,
    /// Tokens (a month's, for monthly).
    pub tokens: u64,
    /// Valid from (RFC 3339, YYYY-MM-DD or Unix seconds; None: now).
    #[serde(default)]
    pub from: Option<String>,
    /// Valid for this many days.
    #[serde(default = "thirty")]
    pub days: u32,
    /// The tier's name, for the bill.
    #[serde(default)]
    pub tier: String,
    /// The models it may be spent on (none: any).
    #[serde(default)]
    pub models: Vec<String>,
}

fn topup() -> String {
    "topup".into()
}

fn thirty() -> u32 {
    30
}

/// Why an operation on packages failed, by whose fault.
#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    /// The request is malformed (a bad IMSI, kind, count or time).
    #[error("{0}")]
    Invalid(String),
    /// The rules refused it.
    #[error(transparent)]
    Refused(ChargingError),
    /// The store failed.
    #[error(transparent)]
    Store(crate::ingest_store::IngestStoreError),
}

impl From<ChargingStoreError> for PackageError {
    fn from(e: ChargingStoreError) -> Self {
        match e {
            ChargingStoreError::Refused(e) => PackageError::Refused(e),
            ChargingStoreError::Store(e) => PackageError::Store(e),
        }
    }
}

fn now_s() -> i64 {
    chrono::Utc::now().timestamp()
}

fn imsi(text: &str) -> Result<Imsi, PackageError> {
    Imsi::parse(text).map_err(|e| PackageError::Invalid(format!("IMSI {text:?}: {e}")))
}

/// Sells `sale`; the JSON says whether it is new.
pub fn sell(store: &dyn ChargingStore, sale: &Sale) -> Result<Value, PackageError> {
    let who = imsi(&sale.imsi)?;
    let invalid = |m: String| Err(PackageError::Invalid(m));
    if sale.id.is_empty() || sale.id.chars().count() > 200 {
        return invalid("id: 1 to 200 characters, your system's id for the sale".into());
    }
    let Some(kind) = BucketKind::parse(&sale.kind) else {
        return invalid(format!("kind {:?}: monthly, topup or trial", sale.kind));
    };
    if sale.tokens == 0 {
        return invalid("tokens: a package of 0 tokens sells nothing".into());
    }
    if sale.days == 0 {
        return invalid("days: a package valid for 0 days is never valid".into());
    }
    let now = now_s();
    let valid_from = match &sale.from {
        Some(t) => parse_time(t).map_err(|e| PackageError::Invalid(format!("from: {e}")))? / 1000,
        None => now,
    };
    let spec = PackageSpec {
        kind,
        allowance: sale.tokens,
        valid_from,
        expires_at: valid_from + i64::from(sale.days) * 86_400,
        tier: sale.tier.clone(),
        models: sale.models.clone(),
    };
    // The sale as asked, not as made: a retry that leaves out `from` (the
    // package starts at the sale) is the same sale a second later.
    let request = json!({
        "imsi": who,
        "kind": kind.as_str(),
        "tokens": sale.tokens,
        "from": sale.from,
        "days": sale.days,
        "tier": sale.tier,
        "models": sale.models,
    })
    .to_string();
    let new = store.sell(&sale.id, &who, &spec, &request, now)?;
    let mut out = json!({
        "package": sale.id,
        "imsi": who,
        "new": new,
        "kind": kind.as_str(),
        "tokens": spec.allowance,
        "tier": spec.tier,
        "models": spec.models,
        "balance": store.account(&who, now)?,
    });
    if new {
        // A retry's times would be the retry's, not the sale's: only the
        // sale that made the package says them.
        out["valid_from"] = json!(spec.valid_from);
        out["expires_at"] = json!(spec.expires_at);
    }
    Ok(out)
}

/// Revokes package `id`: the JSON names the open grants it touched (their
/// boxes stop admitting on them when the downlink tells them).
pub fn revoke(store: &dyn ChargingStore, id: &str) -> Result<Value, PackageError> {
    let grants = store.revoke(id, now_s())?;
    Ok(json!({
        "package": id,
        "revoked": true,
        "grants": grants.iter().map(|g| json!({ "grant": g.id, "node_id": g.node_id })).collect::<Vec<_>>(),
    }))
}

/// `imsi`'s balance at the core.
pub fn balance(store: &dyn ChargingStore, text: &str) -> Result<Value, PackageError> {
    let account = store.account(&imsi(text)?, now_s())?;
    Ok(serde_json::to_value(account).unwrap_or_default())
}

/// The month `text` names (`YYYY-MM`; None: this month, UTC) as Unix ms
/// `[from, to)`.
pub fn month(text: Option<&str>) -> Result<(i64, i64), PackageError> {
    use chrono::{Datelike, NaiveDate};
    let first = match text {
        None => {
            let today = chrono::Utc::now().date_naive();
            NaiveDate::from_ymd_opt(today.year(), today.month(), 1)
        }
        Some(t) => NaiveDate::parse_from_str(&format!("{t}-01"), "%Y-%m-%d").ok(),
    }
    .ok_or_else(|| PackageError::Invalid(format!("month {text:?}: YYYY-MM")))?;
    let next = first
        .checked_add_months(chrono::Months::new(1))
        .ok_or_else(|| PackageError::Invalid(format!("month {text:?}: out of range")))?;
    let ms = |d: NaiveDate| {
        d.and_hms_opt(0, 0, 0)
            .map(|t| t.and_utc().timestamp_millis())
    };
    Ok((ms(first).unwrap_or(0), ms(next).unwrap_or(i64::MAX)))
}

/// `imsi`'s bill for `month` (`YYYY-MM`, None: this month): packages
/// bought, tokens granted per box, tokens used per box and model,
/// overage, what is left.
pub fn bill(
    store: &dyn ChargingStore,
    text: &str,
    month_text: Option<&str>,
) -> Result<Value, PackageError> {
    let (from_ms, to_ms) = month(month_text)?;
    let bill = store.bill(&imsi(text)?, from_ms, to_ms, now_s())?;
    Ok(serde_json::to_value(bill).unwrap_or_default())
}

/// The operator API, for the BSS, on the core's `http` listener, each
/// request with `Authorization: Bearer TOKEN` (the configured token file's
/// first line): `POST /operator/v1/packages` (a [`Sale`]: 201 when new, 200
/// when the same sale was made before, 409 for an id sold for another
/// package), `POST /operator/v1/packages/{id}/revoke` and `GET
/// /operator/v1/subscribers/{imsi}/balance`. Errors are JSON, `{"error":
/// {"message", "type", "code"}}`, as everywhere in the product. The
/// contract is `docs/operator-api.json` (OpenAPI 3.1).
pub fn operator_routes(store: Arc<dyn ChargingStore>, token: String) -> axum::Router {
    use axum::extract::rejection::PathRejection;
    use axum::extract::{Path, State};
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::{IntoResponse, Response};
    use axum::routing::{get, post};
    use sha2::{Digest, Sha256};
    use subtle::ConstantTimeEq;

    #[derive(Clone)]
    struct Api {
        store: Arc<dyn ChargingStore>,
        token_hash: [u8; 32],
    }

    fn error(status: StatusCode, kind: &str, code: &str, message: String) -> Response {
        let body = json!({ "error": { "message": message, "type": kind, "code": code } });
        (status, axum::Json(body)).into_response()
    }

    /// What axum's extractors refuse (a body over the limit, a path that
    /// does not read), in the same JSON shape as every other error.
    fn rejected(status: StatusCode, message: String) -> Response {
        error(status, "invalid_request_error", "invalid_request", message)
    }

    fn failure(e: PackageError) -> Response {
        use ChargingError::*;
        match e {
            PackageError::Invalid(m) => error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_value",
                m,
            ),
            PackageError::Refused(e @ IdConflict(_)) => error(
                StatusCode::CONFLICT,
                "invalid_request_error",
                "id_conflict",
                e.to_string(),
            ),
            PackageError::Refused(e @ (UnknownPackage(_) | UnknownSubscriber(_))) => error(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "not_found",
                e.to_string(),
            ),
            PackageError::Refused(e) => error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "refused",
                e.to_string(),
            ),
            PackageError::Store(e) => {
                // The detail (addresses, users, the engine's words) is for
                // the operator's log, not for the caller.
                tracing::error!(error = %e, "operator API: the store failed");
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    "store_unavailable",
                    "the core's store is unavailable; try again".into(),
                )
            }
        }
    }

    /// The bearer token, compared in constant time (as digests: equal
    /// lengths whatever was sent).
    fn authorized(api: &Api, headers: &HeaderMap) -> Result<(), Box<Response>> {
        let sent = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            // The scheme's name is case-insensitive (RFC 9110).
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map_or("", |(_, token)| token.trim());
        let sent: [u8; 32] = Sha256::digest(sent.as_bytes()).into();
        if bool::from(sent.ct_eq(&api.token_hash)) {
            Ok(())
        } else {
            Err(Box::new(error(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "invalid_token",
                "Authorization: Bearer TOKEN, the operator token of this core, is missing or wrong"
                    .into(),
            )))
        }
    }

    async fn blocking(
        work: impl FnOnce() -> Result<Value, PackageError> + Send + 'static,
    ) -> Result<Value, Response> {
        tokio::task::spawn_blocking(work)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "operator API: the operation's thread failed");
                error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    "internal",
                    "the operation failed inside the core; see its log".into(),
                )
            })?
            .map_err(failure)
    }

    async fn sell_route(
        State(api): State<Api>,
        headers: HeaderMap,
        body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
    ) -> Response {
        if let Err(r) = authorized(&api, &headers) {
            return *r;
        }
        let body = match body {
            Ok(b) => b,
            Err(e) => return rejected(e.status(), e.body_text()),
        };
        let sale: Sale = match serde_json::from_slice(&body) {
            Ok(s) => s,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    "invalid_json",
                    format!("the body is not a sale: {e}"),
                )
            }
        };
        match blocking(move || sell(&*api.store, &sale)).await {
            Ok(v) if v["new"] == json!(true) => {
                (StatusCode::CREATED, axum::Json(v)).into_response()
            }
            Ok(v) => (StatusCode::OK, axum::Json(v)).into_response(),
            Err(r) => r,
        }
    }

    async fn revoke_route(
        State(api): State<Api>,
        headers: HeaderMap,
        id: Result<Path<String>, PathRejection>,
    ) -> Response {
        if let Err(r) = authorized(&api, &headers) {
            return *r;
        }
        let Path(id) = match id {
            Ok(p) => p,
            Err(e) => return rejected(e.status(), e.body_text()),
        };
        match blocking(move || revoke(&*api.store, &id)).await {
            Ok(v) => axum::Json(v).into_response(),
            Err(r) => r,
        }
    }

    async fn balance_route(
        State(api): State<Api>,
        headers: HeaderMap,
        imsi: Result<Path<String>, PathRejection>,
    ) -> Response {
        if let Err(r) = authorized(&api, &headers) {
            return *r;
        }
        let Path(imsi) = match imsi {
            Ok(p) => p,
            Err(e) => return rejected(e.status(), e.body_text()),
        };
        match blocking(move || balance(&*api.store, &imsi)).await {
            Ok(v) => axum::Json(v).into_response(),
            Err(r) => r,
        }
    }

    let api = Api {
        store,
        token_hash: Sha256::digest(token.as_bytes()).into(),
    };
    axum::Router::new()
        .route("/operator/v1/packages", post(sell_route))
        .route("/operator/v1/packages/{id}/revoke", post(revoke_route))
        .route(
            "/operator/v1/subscribers/{imsi}/balance",
            get(balance_route),
        )
        .layer(axum::extract::DefaultBodyLimit::max(64 * 1024))
        .with_state(api)
}
