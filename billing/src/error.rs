//! What billing refuses, and why. The agent maps each to an HTTP status;
//! billing itself knows nothing of HTTP.

use mec_sync::log::LogError;

/// Errors of [`crate::Billing`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BillingError {
    /// A rate limit refuses: `what` names it.
    #[error("rate limit exceeded: {what}; retry in {retry_after_s:.1} s")]
    RateLimited {
        /// Which limit.
        what: &'static str,
        /// Seconds until the request would pass.
        retry_after_s: f64,
    },
    /// The subscriber's packages cannot cover the prompt and one token.
    #[error(
        "the subscriber's packages have {available} units available for this model; this request \
         needs at least {needed} (its prompt and one completion token at the model's rate)"
    )]
    InsufficientQuota {
        /// Tokens available.
        available: u64,
        /// Tokens needed at least.
        needed: u64,
    },
    /// The core refused a grant for the subscriber (no package there, or
    /// nothing left of it): its words.
    #[error("{message}")]
    GrantRefused {
        /// `sync.proto`'s code: insufficient_quota, unknown_subscriber,
        /// invalid_request.
        code: String,
        /// Why, as the core says it.
        message: String,
    },
    /// The box holds no grant that covers the request and cannot get one
    /// now (the core cannot be reached, or did not answer in time).
    #[error("no grant covers this request and {0}; retry shortly")]
    NoGrant(String),
    /// The operation is the core's on a box that takes its packages from
    /// a core (`admin grant`, revoking a grant).
    #[error("{0}")]
    CoreManaged(String),
    /// The usage log cannot take a record now: nothing billable is served.
    #[error("not serving: {0}")]
    LogUnavailable(LogError),
    /// A stream's in-flight slot could not be written: its tokens could not
    /// be billed after a crash, so it is not served.
    #[error("not streaming: {0}")]
    TallyUnavailable(String),
    /// The request's record could not be made durable.
    #[error("the usage of this request could not be recorded: {0}")]
    NotRecorded(LogError),
    /// Tokens that no package covers: no record is written with billed
    /// tokens and no debits. Alarmed at error level; the stream's slot (if
    /// any) keeps the tokens until a package covers them.
    #[error("{tokens} tokens of subscriber {imsi} are covered by no package")]
    Unfunded {
        /// The subscriber.
        imsi: String,
        /// Tokens made.
        tokens: u64,
    },
    /// The ledger store (SQLite) failed.
    #[error("ledger store: {0}")]
    Store(String),
    /// No such package.
    /// The subscriber's packages that have units left may not be spent on
    /// this model.
    #[error("{}", not_covered(model, tier.as_deref(), packages))]
    ModelNotCovered {
        /// The model asked for.
        model: String,
        /// Its tier, when the rate table gives one.
        tier: Option<String>,
        /// The packages with units left, and the models or tiers each is for.
        packages: Vec<(u64, Vec<String>)>,
    },
    #[error("no package {0}")]
    UnknownPackage(u64),
    /// A bug: a state billing never leaves.
    #[error("billing: {0}")]
    Internal(String),
}

impl From<mec_metering::store::StoreError> for BillingError {
    fn from(e: mec_metering::store::StoreError) -> Self {
        BillingError::Store(e.to_string())
    }
}

/// "no package covers...": names each package's rule and what would allow
/// the model.
fn not_covered(model: &str, tier: Option<&str>, packages: &[(u64, Vec<String>)]) -> String {
    let rules: Vec<String> = packages
        .iter()
        .map(|(id, models)| format!("package {id} is for {}", models.join(", ")))
        .collect();
    let allow = match tier {
        Some(t) => format!("a package for the model {model} or the tier {t}"),
        None => format!("a package for the model {model}"),
    };
    format!(
        "no package of this subscriber may be spent on the model {model}: {}; {allow} would allow it",
        rules.join("; ")
    )
}
