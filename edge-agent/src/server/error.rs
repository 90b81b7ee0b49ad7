//! Errors of the MEC API, shaped as OpenAI's: `{"error": {"message", "type",
//! "param", "code"}}` with the matching HTTP status.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// An error answered to a client.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// OpenAI's `type`.
    pub kind: &'static str,
    /// OpenAI's `code`.
    pub code: &'static str,
    /// For the human.
    pub message: String,
    /// The request field at fault.
    pub param: Option<&'static str>,
    /// Seconds, for 429 and 503.
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: String,
    ) -> ApiError {
        ApiError {
            status,
            kind,
            code,
            message,
            param: None,
            retry_after: None,
        }
    }

    /// 400: the request is malformed or a parameter is out of range.
    pub fn invalid(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            code,
            message.into(),
        )
    }

    /// 400 naming the parameter.
    pub fn invalid_param(param: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            param: Some(param),
            ..ApiError::invalid("invalid_value", message)
        }
    }

    /// 401.
    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid_api_key",
            message.into(),
        )
    }

    /// 403.
    pub fn forbidden(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "permission_error",
            code,
            message.into(),
        )
    }

    /// 404 for an unknown model.
    pub fn model_not_found(model: &str) -> ApiError {
        ApiError {
            param: Some("model"),
            ..ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "model_not_found",
                format!("the model {model:?} does not exist on this node"),
            )
        }
    }

    /// 413.
    pub fn too_large(limit: usize) -> ApiError {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request_too_large",
            format!("the request body exceeds {limit} bytes"),
        )
    }

    /// 429 for an exhausted package.
    pub fn insufficient_quota(message: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "insufficient_quota",
            "insufficient_quota",
            message.into(),
        )
    }

    /// 429 for a rate limit.
    pub fn rate_limited(message: impl Into<String>, retry_after_s: u64) -> ApiError {
        ApiError {
            retry_after: Some(retry_after_s.max(1)),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "rate_limit_exceeded",
                message.into(),
            )
        }
    }

    /// 503.
    pub fn unavailable(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            retry_after: Some(1),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                code,
                message.into(),
            )
        }
    }

    /// 500.
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "internal_error",
            message.into(),
        )
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        r
    }
}

/// Billing's refusals as the MEC API answers them.
impl From<mec_billing::BillingError> for ApiError {
    fn from(e: mec_billing::BillingError) -> ApiError {
        use mec_billing::BillingError as B;
        let message = e.to_string();
        match e {
            B::RateLimited { retry_after_s, .. } => {
                ApiError::rate_limited(message, retry_after_s.ceil() as u64)
            }
            B::InsufficientQuota { .. } => ApiError::insufficient_quota(message),
            B::ModelNotCovered { .. } => ApiError {
                param: Some("model"),
                ..ApiError::forbidden("model_not_covered", message)
            },
            B::GrantRefused { code, .. } if code == "invalid_request" => {
                ApiError::invalid("invalid_request", message)
            }
            B::GrantRefused { .. } => ApiError::insufficient_quota(message),
            B::NoGrant(_) => ApiError::unavailable("quota_unavailable", message),
            B::CoreManaged(_) => ApiError {
                status: StatusCode::CONFLICT,
                ..ApiError::invalid("packages_at_the_core", message)
            },
            B::LogUnavailable(_) => ApiError::unavailable("usage_log_unavailable", message),
            B::TallyUnavailable(_) | B::NotRecorded(_) | B::Unfunded { .. } => {
                ApiError::unavailable("usage_not_recorded", message)
            }
            B::UnknownPackage(_) => ApiError {
                status: StatusCode::NOT_FOUND,
                ..ApiError::invalid("bucket_not_found", message)
            },
            B::Store(_) | B::Internal(_) => ApiError::internal(message),
        }
    }
}
