//! The box's end of provisioning: answers requests by acting on the agent's
//! state directory. No serial I/O here (the shell in [`crate::serial`] feeds
//! it frames); file I/O only, on the real directory, so tests use real files.
//!
//! State directory (the agent's `node.state_dir`):
//!
//! | path | written by |
//! |---|---|
//! | `identity/node.key`, `identity/node.pub` | `GenerateIdentity` (key made here, 0600, never sent) |
//! | `identity/node.crt`, `identity/operator-ca.crt` | `InstallCertificate` |
//! | `site.toml` | `ApplySiteConfig` (temp file, fsync, rename, fsync of the directory) |
//! | `retired/<unix ms>/` | `FactoryReset` moves the above, `log/`, `ledger.sqlite*` and `inflight.tally` here (`mec_node::state::retired_by_reset`) |
//!
//! Rules that keep a box safe from whoever holds the cable:
//! * a provisioned box (certificate installed) makes no new identity;
//! * once an operator CA is installed, only a certificate from that CA is
//!   accepted, and only a reset authorised by that CA's key (a signed
//!   one-time challenge) clears the box;
//! * nothing is deleted: a reset retires the identity and the log together,
//!   so records not yet sent can still be uploaded with the key that signed
//!   them;
//! * every request either fully happens or leaves the state as it was, and
//!   a request repeated with the same id gets the first answer again.

use std::collections::VecDeque;
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mec_node::identity::NodeIdentity;
use mec_node::state::StateDir;
use prost::Message;
use sha2::{Digest, Sha256};

use crate::pb::{
    request, response, ApplySiteConfig, DeviceInfo, Done, Error, ErrorCode, FactoryReset, Gpu,
    HelloReply, IdentityReply, InstallCertificate, Request, ResetChallengeReply, Response,
    SlotStatus, StatusReply,
};
use crate::site::SiteConfig;
use crate::{reset_message, PROTOCOL_VERSION};

/// How long a reset challenge stays valid.
pub const CHALLENGE_TTL: Duration = Duration::from_secs(300);

/// Answers remembered for repeated requests.
const REMEMBERED: usize = 32;

/// What the box says about itself.
#[derive(Debug, Clone, Default)]
pub struct DeviceFacts {
    /// Serial number or machine id.
    pub device_id: String,
    /// The software it runs.
    pub firmware_version: String,
    /// GPUs found.
    pub gpus: Vec<Gpu>,
    /// Why none, when none.
    pub gpu_note: String,
    /// Reads the appliance's A/B slots when a status is asked (`None`: the
    /// box has none, as on a development machine).
    pub slots: Option<SlotSource>,
}

/// The A/B slots at the moment of a status request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SlotReport {
    /// Each slot.
    pub slots: Vec<SlotStatus>,
    /// The running root's image version.
    pub running_version: String,
    /// Why `slots` is empty, when it is.
    pub note: String,
}

/// Reads the slots (the agent's reads the ESP: see `mec_update`).
#[derive(Clone)]
pub struct SlotSource(pub std::sync::Arc<dyn Fn() -> SlotReport + Send + Sync>);

impl std::fmt::Debug for SlotSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SlotSource")
    }
}

/// A failed request: an error code and a message for the technician.
#[derive(Debug)]
struct Refusal(ErrorCode, String);

type Answer = Result<response::Kind, Refusal>;

fn refuse<T>(code: ErrorCode, message: impl Into<String>) -> Result<T, Refusal> {
    Err(Refusal(code, message.into()))
}

fn internal(what: &str) -> impl Fn(std::io::Error) -> Refusal + '_ {
    move |e| Refusal(ErrorCode::Internal, format!("{what}: {e}"))
}

/// The box's provisioning state machine.
pub struct Device {
    state_dir: PathBuf,
    facts: DeviceFacts,
    session: Option<u32>,
    answered: VecDeque<(u64, [u8; 32], Response)>,
    challenge: Option<(Vec<u8>, Instant)>,
}

impl Device {
    /// A device acting on `state_dir`.
    pub fn new(state_dir: &Path, facts: DeviceFacts) -> Device {
        Device {
            state_dir: state_dir.to_path_buf(),
            facts,
            session: None,
            answered: VecDeque::new(),
            challenge: None,
        }
    }

    fn state(&self) -> StateDir {
        StateDir::new(&self.state_dir)
    }

    fn identity_dir(&self) -> PathBuf {
        self.state().identity_dir()
    }

    fn cert_path(&self) -> PathBuf {
        self.state().node_cert()
    }

    fn ca_path(&self) -> PathBuf {
        self.state().operator_ca()
    }

    fn site_path(&self) -> PathBuf {
        self.state().site()
    }

    /// Answers one frame's payload. A payload that is not a request gets a
    /// `BAD_REQUEST` with id 0.
    pub fn handle_payload(&mut self, payload: &[u8], now: Instant) -> Response {
        match Request::decode(payload) {
            Ok(req) => {
                let digest: [u8; 32] = Sha256::digest(payload).into();
                if let Some((_, _, answer)) = self
                    .answered
                    .iter()
                    .find(|(id, d, _)| *id == req.id && *d == digest)
                {
                    return answer.clone();
                }
                let id = req.id;
                let answer = self.handle(req, now);
                // A refusal for want of a session is not remembered: the
                // same request after a Hello must be carried out.
                let no_session = matches!(
                    &answer.kind,
                    Some(response::Kind::Error(e)) if e.code == ErrorCode::NoSession as i32
                );
                if !no_session {
                    if self.answered.len() == REMEMBERED {
                        self.answered.pop_front();
                    }
                    self.answered.push_back((id, digest, answer.clone()));
                }
                answer
            }
            Err(e) => Response {
                id: 0,
                kind: Some(response::Kind::Error(Error {
                    code: ErrorCode::BadRequest as i32,
                    message: format!("not a provisioning request: {e}"),
                })),
            },
        }
    }

    /// Answers one request.
    pub fn handle(&mut self, req: Request, now: Instant) -> Response {
        let answer = match req.kind {
            None => refuse(
                ErrorCode::UnknownMessage,
                "a request this box does not know; update the box or use an older edgeprov",
            ),
            Some(request::Kind::Hello(h)) => self.hello(h.min_version, h.max_version),
            Some(_) if self.session.is_none() => refuse(ErrorCode::NoSession, "send Hello first"),
            Some(request::Kind::GenerateIdentity(_)) => self.generate_identity(),
            Some(request::Kind::InstallCertificate(c)) => self.install_certificate(&c),
            Some(request::Kind::ApplySiteConfig(c)) => self.apply_site_config(&c),
            Some(request::Kind::Status(_)) => self.status().map(response::Kind::Status),
            Some(request::Kind::ResetChallenge(_)) => Ok(self.reset_challenge(now)),
            Some(request::Kind::FactoryReset(r)) => self.factory_reset(&r, now),
        };
        let kind = match answer {
            Ok(kind) => kind,
            Err(Refusal(code, message)) => {
                tracing::warn!(code = ?code, %message, "provisioning request refused");
                response::Kind::Error(Error {
                    code: code as i32,
                    message,
                })
            }
        };
        Response {
            id: req.id,
            kind: Some(kind),
        }
    }

    fn hello(&mut self, min: u32, max: u32) -> Answer {
        if min > PROTOCOL_VERSION || max < PROTOCOL_VERSION {
            return refuse(
                ErrorCode::UnsupportedVersion,
                format!(
                    "this box speaks protocol version {PROTOCOL_VERSION}; the technician asked for {min} to {max}"
                ),
            );
        }
        self.session = Some(PROTOCOL_VERSION);
        Ok(response::Kind::Hello(HelloReply {
            version: PROTOCOL_VERSION,
            device: Some(self.device_info()),
        }))
    }

    fn device_info(&self) -> DeviceInfo {
        let cert = self.installed_cert().ok().flatten();
        let site = SiteConfig::load(&self.site_path()).ok().flatten();
        DeviceInfo {
            device_id: self.facts.device_id.clone(),
            firmware_version: self.facts.firmware_version.clone(),
            gpus: self.facts.gpus.clone(),
            gpu_note: self.facts.gpu_note.clone(),
            provisioned: cert.is_some() && site.is_some(),
            node_id: cert.map(|c| c.node_id).unwrap_or_default(),
            site_id: site.map(|s| s.site_id).unwrap_or_default(),
        }
    }

    fn identity(&self) -> Result<Option<NodeIdentity>, Refusal> {
        let dir = self.identity_dir();
        if !self.state().node_key().exists() {
            return Ok(None);
        }
        NodeIdentity::load(&dir)
            .map(Some)
            .map_err(|e| Refusal(ErrorCode::Internal, format!("the box's identity: {e}")))
    }

    fn installed_cert(&self) -> Result<Option<crate::cert::NodeCert>, Refusal> {
        let path = self.cert_path();
        if !path.exists() {
            return Ok(None);
        }
        let pem = fs::read_to_string(&path).map_err(internal("reading node.crt"))?;
        crate::cert::NodeCert::parse(&pem)
            .map(Some)
            .map_err(|e| Refusal(ErrorCode::Internal, format!("the installed node.crt: {e}")))
    }

    fn generate_identity(&mut self) -> Answer {
        if let Some(cert) = self.installed_cert()? {
            return refuse(
                ErrorCode::AlreadyProvisioned,
                format!(
                    "this box is provisioned as node {}; a factory reset authorised by the operator CA comes first",
                    cert.node_id
                ),
            );
        }
        let (identity, created) = match self.identity()? {
            Some(identity) => (identity, false),
            None => (
                NodeIdentity::create(&self.identity_dir()).map_err(|e| {
                    Refusal(ErrorCode::Internal, format!("making the identity: {e}"))
                })?,
                true,
            ),
        };
        tracing::info!(key_id = identity.key_id(), created, "node identity");
        Ok(response::Kind::Identity(IdentityReply {
            public_key_pem: identity.public_key_pem(),
            key_id: identity.key_id().to_string(),
            created,
        }))
    }

    fn install_certificate(&mut self, c: &InstallCertificate) -> Answer {
        let Some(identity) = self.identity()? else {
            return refuse(
                ErrorCode::NoIdentity,
                "no identity yet: GenerateIdentity first",
            );
        };
        let ca = crate::cert::CaCert::parse(&c.operator_ca_pem)
            .map_err(|e| Refusal(ErrorCode::CertificateMismatch, format!("operator CA: {e}")))?;
        if self.ca_path().exists() {
            let installed =
                fs::read_to_string(self.ca_path()).map_err(internal("reading operator-ca.crt"))?;
            let installed = crate::cert::CaCert::parse(&installed).map_err(|e| {
                Refusal(
                    ErrorCode::Internal,
                    format!("the installed operator CA: {e}"),
                )
            })?;
            if installed.der != ca.der {
                return refuse(
                    ErrorCode::AlreadyProvisioned,
                    "this box trusts another operator CA; a factory reset authorised by that CA comes first",
                );
            }
        }
        let cert = crate::cert::NodeCert::parse(&c.node_cert_pem).map_err(|e| {
            Refusal(
                ErrorCode::CertificateMismatch,
                format!("node certificate: {e}"),
            )
        })?;
        if cert.public_key != identity.verifying_key() {
            return refuse(
                ErrorCode::CertificateMismatch,
                format!(
                    "the certificate is for another key (key id {}), not this box's (key id {})",
                    mec_node::identity::key_id(&cert.public_key),
                    identity.key_id()
                ),
            );
        }
        ca.check_issued(&cert)
            .map_err(|e| Refusal(ErrorCode::CertificateMismatch, e))?;
        if let Some(site) =
            SiteConfig::load(&self.site_path()).map_err(|e| Refusal(ErrorCode::Internal, e))?
        {
            if site.node_id != cert.node_id {
                return refuse(
                    ErrorCode::CertificateMismatch,
                    format!(
                        "the certificate names node {}, the site configuration node {}",
                        cert.node_id, site.node_id
                    ),
                );
            }
        }
        // The CA first: a certificate is never in place without its CA.
        write_atomically(&self.ca_path(), c.operator_ca_pem.as_bytes())
            .map_err(internal("writing operator-ca.crt"))?;
        write_atomically(&self.cert_path(), c.node_cert_pem.as_bytes())
            .map_err(internal("writing node.crt"))?;
        tracing::info!(node_id = %cert.node_id, "node certificate installed");
        Ok(response::Kind::Done(Done {
            detail: format!(
                "node certificate for {} installed (valid until {})",
                cert.node_id, cert.not_after
            ),
        }))
    }

    fn apply_site_config(&mut self, c: &ApplySiteConfig) -> Answer {
        let site = SiteConfig::from_request(c).map_err(|e| Refusal(ErrorCode::BadConfig, e))?;
        let Some(cert) = self.installed_cert()? else {
            return refuse(
                ErrorCode::NoIdentity,
                "no node certificate yet: InstallCertificate first",
            );
        };
        if cert.node_id != site.node_id {
            return refuse(
                ErrorCode::BadConfig,
                format!(
                    "node_id {:?} is not the certificate's node id {:?}",
                    site.node_id, cert.node_id
                ),
            );
        }
        write_atomically(&self.site_path(), site.to_toml().as_bytes())
            .map_err(internal("writing site.toml"))?;
        tracing::info!(site_id = %site.site_id, node_id = %site.node_id, "site configuration applied");
        Ok(response::Kind::Done(Done {
            detail: format!("site {} applied; restart the agent to use it", site.site_id),
        }))
    }

    fn status(&self) -> Result<StatusReply, Refusal> {
        let identity = self.identity()?;
        let cert = self.installed_cert()?;
        let site =
            SiteConfig::load(&self.site_path()).map_err(|e| Refusal(ErrorCode::Internal, e))?;
        let slots = match &self.facts.slots {
            Some(read) => (read.0)(),
            None => SlotReport {
                note: "this box has no A/B slots".into(),
                ..SlotReport::default()
            },
        };
        Ok(StatusReply {
            slots: slots.slots,
            running_version: slots.running_version,
            slots_note: slots.note,
            device: Some(self.device_info()),
            has_identity: identity.is_some(),
            has_certificate: cert.is_some(),
            has_site_config: site.is_some(),
            public_key_pem: identity
                .as_ref()
                .map(|i| i.public_key_pem())
                .unwrap_or_default(),
            key_id: identity.map(|i| i.key_id().to_string()).unwrap_or_default(),
            certificate_not_after: cert.map(|c| c.not_after).unwrap_or_default(),
            core_address: site.map(|s| s.core_address).unwrap_or_default(),
        })
    }

    fn reset_challenge(&mut self, now: Instant) -> response::Kind {
        let mut nonce = vec![0u8; 32];
        if getrandom::fill(&mut nonce).is_err() {
            // Without randomness no challenge can be trusted: an empty
            // nonce is refused by factory_reset.
            nonce.clear();
        }
        self.challenge = Some((nonce.clone(), now));
        response::Kind::ResetChallenge(ResetChallengeReply {
            nonce,
            device_id: self.facts.device_id.clone(),
        })
    }

    fn factory_reset(&mut self, r: &FactoryReset, now: Instant) -> Answer {
        if self.ca_path().exists() {
            // One use per challenge, whatever the outcome.
            let Some((nonce, issued)) = self.challenge.take() else {
                return refuse(ErrorCode::Unauthorized, "ask for a reset challenge first");
            };
            if nonce.is_empty() || nonce != r.nonce || now.duration_since(issued) > CHALLENGE_TTL {
                return refuse(
                    ErrorCode::Unauthorized,
                    "the authorization is not for this box's current challenge (or it expired); ask for a new one",
                );
            }
            let ca_pem =
                fs::read_to_string(self.ca_path()).map_err(internal("reading operator-ca.crt"))?;
            let ca = crate::cert::CaCert::parse(&ca_pem).map_err(|e| {
                Refusal(
                    ErrorCode::Internal,
                    format!("the installed operator CA: {e}"),
                )
            })?;
            let message = reset_message(&self.facts.device_id, &r.nonce);
            if !ca.verify_signature(&message, &r.signature) {
                return refuse(
                    ErrorCode::Unauthorized,
                    "the reset authorization is not signed by this box's operator CA",
                );
            }
        }
        let retired = self.retire().map_err(internal("retiring the old state"))?;
        self.answered.clear();
        tracing::warn!(retired = %retired.display(), "factory reset");
        Ok(response::Kind::Done(Done {
            detail: format!(
                "factory reset: the identity, certificate, site configuration and usage log moved to {}",
                retired.display()
            ),
        }))
    }

    /// Moves every provisioned thing into `retired/<unix ms>/` (renames on
    /// one filesystem; the directory is synced after).
    fn retire(&self) -> std::io::Result<PathBuf> {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let retired = self.state_dir.join("retired").join(stamp.to_string());
        fs::create_dir_all(&retired)?;
        for entry in fs::read_dir(&self.state_dir)? {
            let name = entry?.file_name();
            let n = name.to_string_lossy();
            if mec_node::state::retired_by_reset(&n) {
                fs::rename(self.state_dir.join(&name), retired.join(&name))?;
            }
        }
        fs::File::open(&self.state_dir)?.sync_all()?;
        Ok(retired)
    }
}

/// Writes `bytes` to `path` so that a crash leaves either the old file or
/// the new one: temp file, fsync, rename, fsync of the directory.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().unwrap_or_default().to_string_lossy()
    ));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    fs::File::open(dir)?.sync_all()
}
