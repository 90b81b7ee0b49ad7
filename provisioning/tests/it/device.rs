//! The box's end of provisioning, request by request, on a real state
//! directory: the whole flow, every refusal (and the state unchanged after
//! it), repeated requests, and factory reset with and without authorization.

use crate::common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::snapshot;
use mec_provisioning::ca::OperatorCa;
use mec_provisioning::device::{Device, DeviceFacts, CHALLENGE_TTL};
use mec_provisioning::pb::{
    request, response, ApplySiteConfig, DefaultPackage, ErrorCode, FactoryReset, GenerateIdentity,
    Hello, InstallCertificate, Request, ResetChallengeRequest, Response, StatusRequest,
};
use prost::Message;

fn facts() -> DeviceFacts {
    DeviceFacts {
        device_id: "SN-TEST-0001".into(),
        firmware_version: "edge-agent 0.1.0".into(),
        gpus: vec![],
        gpu_note: "no NVIDIA driver (NVML not found)".into(),
        slots: None,
    }
}

struct Box_ {
    device: Device,
    next_id: u64,
    now: Instant,
}

impl Box_ {
    fn new(dir: &Path) -> Box_ {
        Box_ {
            device: Device::new(dir, facts()),
            next_id: 1,
            now: Instant::now(),
        }
    }

    fn send_as(&mut self, id: u64, kind: request::Kind) -> Response {
        let payload = Request {
            id,
            kind: Some(kind),
        }
        .encode_to_vec();
        let r = self.device.handle_payload(&payload, self.now);
        assert_eq!(r.id, id);
        r
    }

    fn send(&mut self, kind: request::Kind) -> response::Kind {
        let id = self.next_id;
        self.next_id += 1;
        self.send_as(id, kind).kind.unwrap()
    }

    fn hello(&mut self) {
        let r = self.send(request::Kind::Hello(Hello {
            min_version: 1,
            max_version: 1,
            client: "test".into(),
        }));
        assert!(matches!(r, response::Kind::Hello(h) if h.version == 1));
    }

    fn identity(&mut self) -> String {
        match self.send(request::Kind::GenerateIdentity(GenerateIdentity {})) {
            response::Kind::Identity(i) => i.public_key_pem,
            other => panic!("{other:?}"),
        }
    }
}

fn refused(r: response::Kind, code: ErrorCode) -> String {
    match r {
        response::Kind::Error(e) if e.code == code as i32 => e.message,
        other => panic!("expected {code:?}, got {other:?}"),
    }
}

fn site(node_id: &str) -> ApplySiteConfig {
    ApplySiteConfig {
        site_id: "cell-042".into(),
        node_id: node_id.into(),
        core_address: "127.0.0.1:7443".into(),
        core_server_name: "localhost".into(),
        api_listen: "127.0.0.1:8080".into(),
        default_packages: vec![DefaultPackage {
            kind: "trial".into(),
            tokens: 2000,
            valid_days: 7,
        }],
        image_signing_key: String::new(),
    }
}

fn install(ca: &OperatorCa, cert: String) -> request::Kind {
    request::Kind::InstallCertificate(InstallCertificate {
        node_cert_pem: cert,
        operator_ca_pem: ca.pair.cert_pem.clone(),
    })
}

/// A box provisioned as `edge-0001` by `ca`.
fn provisioned(dir: &Path, ca: &OperatorCa) -> Box_ {
    let mut b = Box_::new(dir);
    b.hello();
    let public = b.identity();
    let cert = ca.issue("edge-0001", &public).unwrap();
    assert!(matches!(b.send(install(ca, cert)), response::Kind::Done(_)));
    assert!(matches!(
        b.send(request::Kind::ApplySiteConfig(site("edge-0001"))),
        response::Kind::Done(_)
    ));
    b
}

#[test]
fn a_box_is_provisioned_step_by_step_and_its_key_never_leaves_it() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = OperatorCa::init(&tmp.path().join("ca"), "test operator CA").unwrap();
    let state = tmp.path().join("state");
    let mut b = Box_::new(&state);
    // Nothing before Hello.
    refused(
        b.send(request::Kind::Status(StatusRequest {})),
        ErrorCode::NoSession,
    );
    b.hello();
    let public = b.identity();
    let key = std::fs::read_to_string(state.join("identity/node.key")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(state.join("identity/node.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(!public.contains("PRIVATE"));
    // Asked again before a certificate: the same key, not a new one.
    assert_eq!(b.identity(), public);
    let cert = ca.issue("edge-0001", &public).unwrap();
    assert!(matches!(
        b.send(install(&ca, cert)),
        response::Kind::Done(_)
    ));
    assert!(matches!(
        b.send(request::Kind::ApplySiteConfig(site("edge-0001"))),
        response::Kind::Done(_)
    ));
    let status = match b.send(request::Kind::Status(StatusRequest {})) {
        response::Kind::Status(s) => s,
        other => panic!("{other:?}"),
    };
    let device = status.device.unwrap();
    assert!(device.provisioned);
    assert_eq!(
        (device.node_id.as_str(), device.site_id.as_str()),
        ("edge-0001", "cell-042")
    );
    assert_eq!(device.device_id, "SN-TEST-0001");
    assert!(status.has_identity && status.has_certificate && status.has_site_config);
    assert_eq!(status.public_key_pem, public);
    assert_eq!(status.core_address, "127.0.0.1:7443");
    assert!(status.slots.is_empty());
    assert_eq!(status.slots_note, "this box has no A/B slots");
    // The files the agent reads.
    let site_toml = std::fs::read_to_string(state.join("site.toml")).unwrap();
    assert!(site_toml.contains("cell-042") && site_toml.contains("trial"));
    assert_eq!(
        std::fs::read_to_string(state.join("identity/operator-ca.crt")).unwrap(),
        ca.pair.cert_pem
    );
    // The private key is nowhere in any answer and unchanged on disk.
    assert_eq!(
        std::fs::read_to_string(state.join("identity/node.key")).unwrap(),
        key
    );
}

#[test]
fn every_bad_request_is_refused_and_leaves_the_box_as_it_was() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = OperatorCa::init(&tmp.path().join("ca"), "operator").unwrap();
    let rogue = OperatorCa::init(&tmp.path().join("rogue"), "rogue").unwrap();
    let state = tmp.path().join("state");
    let mut b = Box_::new(&state);
    refused(
        b.send(request::Kind::Hello(Hello {
            min_version: 2,
            max_version: 3,
            client: "future".into(),
        })),
        ErrorCode::UnsupportedVersion,
    );
    b.hello();
    // A certificate before any identity.
    let other = mec_node::identity::NodeIdentity::generate().unwrap();
    let foreign = ca.issue("edge-0001", &other.public_key_pem()).unwrap();
    refused(b.send(install(&ca, foreign.clone())), ErrorCode::NoIdentity);
    let public = b.identity();
    let before = snapshot(&state);
    // A certificate for another key.
    let m = refused(
        b.send(install(&ca, foreign)),
        ErrorCode::CertificateMismatch,
    );
    assert!(m.contains("another key"), "{m}");
    // A certificate from another CA, presented with ours.
    let rogue_cert = rogue.issue("edge-0001", &public).unwrap();
    let m = refused(
        b.send(install(&ca, rogue_cert)),
        ErrorCode::CertificateMismatch,
    );
    assert!(m.contains("not issued"), "{m}");
    // Not PEM at all.
    refused(
        b.send(install(&ca, "garbage".into())),
        ErrorCode::CertificateMismatch,
    );
    // A site configuration before a certificate.
    refused(
        b.send(request::Kind::ApplySiteConfig(site("edge-0001"))),
        ErrorCode::NoIdentity,
    );
    // A message this box does not know (a oneof case from a newer tool
    // decodes as no case at all).
    let r = b.device.handle_payload(
        &[0x08, 0x07, 0xfa, 0x01, 0x00], // id 7, field 31 (unknown), empty
        Instant::now(),
    );
    assert_eq!(r.id, 7);
    refused(r.kind.unwrap(), ErrorCode::UnknownMessage);
    // Bytes that are not a request.
    let r = b.device.handle_payload(&[0xff, 0xff, 0xff], Instant::now());
    refused(r.kind.unwrap(), ErrorCode::BadRequest);
    assert_eq!(snapshot(&state), before, "refusals changed nothing");

    let cert = ca.issue("edge-0001", &public).unwrap();
    assert!(matches!(
        b.send(install(&ca, cert)),
        response::Kind::Done(_)
    ));
    let before = snapshot(&state);
    // Bad site configurations.
    for (what, bad) in [
        ("endpoint", {
            let mut s = site("edge-0001");
            s.core_address = "core.example.net".into();
            s
        }),
        ("node", site("edge-0002")),
        ("listen", {
            let mut s = site("edge-0001");
            s.api_listen = "anywhere".into();
            s
        }),
        ("package", {
            let mut s = site("edge-0001");
            s.default_packages[0].tokens = 0;
            s
        }),
    ] {
        let m = refused(
            b.send(request::Kind::ApplySiteConfig(bad)),
            ErrorCode::BadConfig,
        );
        assert!(!m.is_empty(), "{what}");
    }
    // Another operator CA cannot take over the box.
    let rogue_public_cert = rogue.issue("edge-0001", &public).unwrap();
    refused(
        b.send(install(&rogue, rogue_public_cert)),
        ErrorCode::AlreadyProvisioned,
    );
    // A provisioned box makes no new identity.
    let m = refused(
        b.send(request::Kind::GenerateIdentity(GenerateIdentity {})),
        ErrorCode::AlreadyProvisioned,
    );
    assert!(m.contains("factory reset"), "{m}");
    assert_eq!(snapshot(&state), before, "refusals changed nothing");
}

#[test]
fn a_repeated_request_gets_its_first_answer_and_is_not_done_twice() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = OperatorCa::init(&tmp.path().join("ca"), "operator").unwrap();
    let mut b = provisioned(&tmp.path().join("state"), &ca);
    let challenge = b.send_as(900, request::Kind::ResetChallenge(ResetChallengeRequest {}));
    let again = b.send_as(900, request::Kind::ResetChallenge(ResetChallengeRequest {}));
    assert_eq!(
        challenge, again,
        "the same nonce: no second challenge was made"
    );
    // The same id with other content is a new request.
    let other = b.send_as(900, request::Kind::Status(StatusRequest {}));
    assert!(matches!(other.kind, Some(response::Kind::Status(_))));
}

fn challenge(b: &mut Box_) -> Vec<u8> {
    match b.send(request::Kind::ResetChallenge(ResetChallengeRequest {})) {
        response::Kind::ResetChallenge(c) => {
            assert_eq!(c.device_id, "SN-TEST-0001");
            assert_eq!(c.nonce.len(), 32);
            c.nonce
        }
        other => panic!("{other:?}"),
    }
}

fn reset(nonce: Vec<u8>, signature: Vec<u8>) -> request::Kind {
    request::Kind::FactoryReset(FactoryReset { nonce, signature })
}

#[test]
fn factory_reset_needs_the_operator_cas_signature_on_a_fresh_challenge() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = OperatorCa::init(&tmp.path().join("ca"), "operator").unwrap();
    let rogue = OperatorCa::init(&tmp.path().join("rogue"), "rogue").unwrap();
    let state = tmp.path().join("state");
    let mut b = provisioned(&state, &ca);
    std::fs::create_dir_all(state.join("log")).unwrap();
    std::fs::write(state.join("log/00000000000000000001.seg"), b"records").unwrap();
    let before = snapshot(&state);

    // No challenge asked, no signature, the wrong signer, another box's
    // challenge, a reused challenge, an expired one.
    refused(b.send(reset(vec![1; 32], vec![])), ErrorCode::Unauthorized);
    let n = challenge(&mut b);
    refused(b.send(reset(n.clone(), vec![])), ErrorCode::Unauthorized);
    let n = challenge(&mut b);
    let sig = rogue.sign_reset("SN-TEST-0001", &n).unwrap();
    refused(b.send(reset(n, sig)), ErrorCode::Unauthorized);
    let n = challenge(&mut b);
    let sig = ca.sign_reset("SN-OTHER-BOX", &n).unwrap();
    refused(b.send(reset(n.clone(), sig)), ErrorCode::Unauthorized);
    let sig = ca.sign_reset("SN-TEST-0001", &n).unwrap();
    refused(b.send(reset(n, sig)), ErrorCode::Unauthorized); // used up
    let n = challenge(&mut b);
    let sig = ca.sign_reset("SN-TEST-0001", &n).unwrap();
    b.now += CHALLENGE_TTL + Duration::from_secs(1);
    refused(b.send(reset(n, sig)), ErrorCode::Unauthorized);
    assert_eq!(snapshot(&state), before, "no reset happened");

    // The real thing.
    let n = challenge(&mut b);
    let sig = ca.sign_reset("SN-TEST-0001", &n).unwrap();
    let done = b.send(reset(n, sig));
    assert!(matches!(done, response::Kind::Done(_)), "{done:?}");
    // Nothing was deleted: the old identity and log are retired together.
    let after = snapshot(&state);
    assert!(!after.contains_key("identity/node.key"));
    assert!(!after.contains_key("site.toml"));
    for (path, bytes) in &before {
        let retired = after
            .iter()
            .find(|(p, _)| p.starts_with("retired/") && p.ends_with(path.as_str()))
            .unwrap_or_else(|| panic!("{path} was not retired: {after:?}"));
        assert_eq!(retired.1, bytes);
    }
    // And the box takes a new identity.
    let public = b.identity();
    assert_ne!(
        before["identity/node.pub"],
        public.as_bytes(),
        "a new key, not the retired one"
    );
}

#[test]
fn status_reports_the_slots_as_read_at_the_moment_of_asking() {
    use mec_provisioning::device::{SlotReport, SlotSource};
    use mec_provisioning::pb::SlotStatus;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;
    let tmp = tempfile::tempdir().unwrap();
    let reads = Arc::new(AtomicU32::new(0));
    let counter = reads.clone();
    let source = SlotSource(Arc::new(move || {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        SlotReport {
            slots: vec![
                SlotStatus {
                    slot: "a".into(),
                    state: "good".into(),
                    version: "0.1.0".into(),
                    booted: true,
                    next_boot: n == 0,
                    tries_left: 0,
                },
                SlotStatus {
                    slot: "b".into(),
                    state: if n == 0 { "empty" } else { "trying" }.into(),
                    version: if n == 0 { "" } else { "0.1.0.1" }.into(),
                    booted: false,
                    next_boot: n > 0,
                    tries_left: 3,
                },
            ],
            running_version: "0.1.0".into(),
            note: String::new(),
        }
    }));
    let mut b = Box_ {
        device: Device::new(
            tmp.path(),
            DeviceFacts {
                slots: Some(source),
                ..facts()
            },
        ),
        next_id: 1,
        now: Instant::now(),
    };
    b.hello();
    let status = |b: &mut Box_| match b.send(request::Kind::Status(StatusRequest {})) {
        response::Kind::Status(s) => s,
        other => panic!("{other:?}"),
    };
    let first = status(&mut b);
    assert_eq!(first.running_version, "0.1.0");
    assert_eq!(first.slots[1].state, "empty");
    assert!(first.slots[0].next_boot);
    // After an apply, the next status shows it: read again, not cached.
    let second = status(&mut b);
    assert_eq!(
        (
            second.slots[1].state.as_str(),
            second.slots[1].version.as_str()
        ),
        ("trying", "0.1.0.1")
    );
    assert!(second.slots[1].next_boot && !second.slots[0].next_boot);
    assert_eq!(reads.load(Ordering::SeqCst), 2);
}
