//! The layout of a box's state directory (`node.state_dir`, on the
//! appliance `/var/lib/edge`, the edge-data partition): every name spelled
//! once, here.
//!
//! | path | what | written by |
//! |---|---|---|
//! | `identity/node.key`, `identity/node.pub` | the node's key pair ([`crate::identity`]) | the agent or provisioning, once |
//! | `identity/node.crt` | the node certificate from the operator CA | provisioning (`edgeprov provision`) |
//! | `identity/operator-ca.crt` | the operator CA | provisioning |
//! | `site.toml` | the site's configuration | provisioning |
//! | `device-id` | the box's id when it has no DMI serial | provisioning |
//! | `log/` | the usage log | the agent |
//! | `ledger.sqlite` | the ledger store | the agent |
//! | `inflight.tally` | streams in flight | the agent |
//! | `rates/` | the operator's rate tables, signed, every version kept | the agent |
//! | `admin.token` | the admin API's credential (0600) | the agent |

use std::path::{Path, PathBuf};

use crate::identity::{KEY_FILE, PUB_FILE};

/// Whether the entry `name` of a state directory belongs to the operator's
/// provisioning of the box, so that a factory reset retires it: the
/// identity, the site, and the billing state that goes with them (the log,
/// the ledger store and its SQLite side files, the in-flight tally, the
/// operator's rate tables). The box's
/// own files (`device-id`, `admin.token`) stay.
pub fn retired_by_reset(name: &str) -> bool {
    matches!(
        name,
        "identity" | "site.toml" | "log" | "inflight.tally" | "rates"
    ) || name.starts_with("ledger.sqlite")
}

/// A box's state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateDir(PathBuf);

impl StateDir {
    /// The state directory at `path`.
    pub fn new(path: impl Into<PathBuf>) -> StateDir {
        StateDir(path.into())
    }

    /// The directory itself.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// `identity/`: the key pair, the node certificate, the operator CA.
    pub fn identity_dir(&self) -> PathBuf {
        self.0.join("identity")
    }

    /// `identity/node.key`.
    pub fn node_key(&self) -> PathBuf {
        self.identity_dir().join(KEY_FILE)
    }

    /// `identity/node.pub`.
    pub fn node_pub(&self) -> PathBuf {
        self.identity_dir().join(PUB_FILE)
    }

    /// `identity/node.crt`: the node certificate for the upload.
    pub fn node_cert(&self) -> PathBuf {
        self.identity_dir().join("node.crt")
    }

    /// `identity/operator-ca.crt`.
    pub fn operator_ca(&self) -> PathBuf {
        self.identity_dir().join("operator-ca.crt")
    }

    /// `site.toml`.
    pub fn site(&self) -> PathBuf {
        self.0.join("site.toml")
    }

    /// `device-id`.
    pub fn device_id(&self) -> PathBuf {
        self.0.join("device-id")
    }

    /// `log/`.
    pub fn log_dir(&self) -> PathBuf {
        self.0.join("log")
    }

    /// `ledger.sqlite`.
    pub fn ledger(&self) -> PathBuf {
        self.0.join("ledger.sqlite")
    }

    /// `inflight.tally`.
    pub fn tally(&self) -> PathBuf {
        self.0.join("inflight.tally")
    }

    /// `rates/`: the operator's rate tables, each `v<version>.toml` with
    /// its signature (`.sig`).
    pub fn rates_dir(&self) -> PathBuf {
        self.0.join("rates")
    }

    /// `admin.token`.
    pub fn admin_token(&self) -> PathBuf {
        self.0.join("admin.token")
    }
}
