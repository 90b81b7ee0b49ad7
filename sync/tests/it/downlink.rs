//! The downlink (`sync.proto`, version 3) on loopback, driven by hand as a
//! box will drive it: a grant asked for on the box's connection comes back
//! numbered; what the box has not acknowledged comes again on its next
//! connection, what it has does not; a refusal says why; a package revoked
//! at the core reaches the connected box without its asking; the upload
//! stream of the same connection is unaffected.

use std::time::Duration;

use mec_metering::charging::PackageSpec;
use mec_metering::{BucketKind, Imsi};
use mec_sync::charging_store::ChargingStore;
use mec_sync::core_server::{read_frame, LoopbackCore};
use mec_sync::identity::NodeIdentity;
use mec_sync::pki::issue_node_cert;
use mec_sync::wire::pb::{
    core_frame, downlink, edge_frame, CoreFrame, DownlinkAck, DownlinkHello, EdgeFrame,
    GrantRequest, Hello,
};
use mec_sync::wire::{encode_frame, FrameDecoder};

const IMSI: &str = "001010123456789";

/// A box's connection with its downlink stream open.
struct Box_ {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    dec: FrameDecoder,
    buf: Vec<u8>,
    conn: quinn::Connection,
    _endpoint: quinn::Endpoint,
}

impl Box_ {
    async fn connect(core: &LoopbackCore, cert: &str, key: &str, applied: u64) -> Box_ {
        let (endpoint, conn) = crate::common::connect_node(core, cert, key).await;
        let (send, recv) = conn.open_bi().await.unwrap();
        let mut b = Box_ {
            send,
            recv,
            dec: FrameDecoder::new(),
            buf: vec![0u8; 64 << 10],
            conn,
            _endpoint: endpoint,
        };
        b.send(edge_frame::Kind::DownlinkHello(DownlinkHello { applied }))
            .await;
        b
    }

    async fn send(&mut self, kind: edge_frame::Kind) {
        let frame = EdgeFrame { kind: Some(kind) };
        self.send.write_all(&encode_frame(&frame)).await.unwrap();
    }

    /// The next frame, or None after `wait`.
    async fn next(&mut self, wait: Duration) -> Option<core_frame::Kind> {
        tokio::time::timeout(
            wait,
            read_frame::<CoreFrame>(&mut self.recv, &mut self.dec, &mut self.buf),
        )
        .await
        .ok()
        .map(|f| f.unwrap().unwrap().kind.unwrap())
    }

    async fn ask(&mut self, request_id: u64, imsi: &str, tokens: u64) {
        self.send(edge_frame::Kind::GrantRequest(GrantRequest {
            request_id,
            imsi: imsi.into(),
            model: "smollm2".into(),
            tokens,
        }))
        .await;
    }
}

fn package(tokens: u64) -> PackageSpec {
    let now = chrono::Utc::now().timestamp();
    PackageSpec {
        kind: BucketKind::Topup,
        allowance: tokens,
        valid_from: now - 60,
        expires_at: now + 30 * 86_400,
        tier: "basic".into(),
        models: vec![],
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn grants_arrive_numbered_are_resent_until_acknowledged_and_revocations_follow() {
    let dir = tempfile::tempdir().unwrap();
    let core = LoopbackCore::start(&dir.path().join("core.sqlite")).unwrap();
    let identity = NodeIdentity::generate().unwrap();
    identity.write_to(&dir.path().join("identity")).unwrap();
    let key = std::fs::read_to_string(dir.path().join("identity/node.key")).unwrap();
    let cert = issue_node_cert(&core.ca, "box-1", &identity.public_key_pem()).unwrap();
    let imsi = Imsi::parse(IMSI).unwrap();
    let now = chrono::Utc::now().timestamp();
    core.store
        .sell("bss-1", &imsi, &package(1_000), "p", now)
        .unwrap();

    let mut b = Box_::connect(&core, &cert, &key, 0).await;
    b.ask(7, IMSI, 600).await;
    let Some(core_frame::Kind::Downlink(first)) = b.next(Duration::from_secs(10)).await else {
        panic!("no downlink message")
    };
    let Some(downlink::Kind::Grant(grant)) = first.kind.clone() else {
        panic!("{first:?}")
    };
    assert_eq!(first.seq, 1);
    assert_eq!(
        (grant.request_id, grant.tokens, grant.imsi.as_str()),
        (7, 600, IMSI)
    );
    assert!(
        grant.expires_at_unix_s > first.core_time_unix_s,
        "{first:?}"
    );
    assert!(
        (first.core_time_unix_s - now).abs() < 60,
        "the core's clock"
    );
    // Refusals come at once, unnumbered, and say why.
    b.ask(8, IMSI, 500).await;
    let Some(core_frame::Kind::Downlink(second)) = b.next(Duration::from_secs(10)).await else {
        panic!("no second grant")
    };
    assert_eq!(
        (second.seq, grant_tokens(&second)),
        (2, 400),
        "what is left"
    );
    b.ask(9, IMSI, 1).await;
    match b.next(Duration::from_secs(10)).await {
        Some(core_frame::Kind::GrantRefused(r)) => {
            assert_eq!(
                (r.request_id, r.code.as_str()),
                (9, "insufficient_quota"),
                "{r:?}"
            )
        }
        other => panic!("{other:?}"),
    }
    b.ask(10, "001019999999999", 1).await;
    match b.next(Duration::from_secs(10)).await {
        Some(core_frame::Kind::GrantRefused(r)) => {
            assert_eq!(r.code, "unknown_subscriber", "{r:?}");
            assert!(r.message.contains("001019999999999"), "{r:?}");
        }
        other => panic!("{other:?}"),
    }
    // The box applies seq 1 durably and acknowledges it, then loses the
    // connection before it acknowledges seq 2.
    b.send(edge_frame::Kind::DownlinkAck(DownlinkAck { seq: 1 }))
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    b.conn.close(0u32.into(), b"gone");

    // Its next connection gets seq 2 again, not 1: the core recorded the
    // acknowledgement (even a box reporting nothing applied, restored from
    // an old snapshot, gets only what it never acknowledged).
    let mut b = Box_::connect(&core, &cert, &key, 0).await;
    let Some(core_frame::Kind::Downlink(again)) = b.next(Duration::from_secs(10)).await else {
        panic!("seq 2 not sent again")
    };
    assert_eq!((again.seq, grant_tokens(&again)), (2, 400));
    assert!(
        b.next(Duration::from_millis(1_500)).await.is_none(),
        "nothing else pending"
    );

    // Revoked at the core (another instance, the operator API): the
    // connected box hears of both grants without asking (the core looks at
    // its outbox every 250 ms; the bound below only turns a lost
    // revocation into a failure instead of a hang).
    let hit = core
        .store
        .revoke("bss-1", chrono::Utc::now().timestamp())
        .unwrap();
    assert_eq!(hit.len(), 2);
    let mut revoked = Vec::new();
    while revoked.len() < 2 {
        match b.next(Duration::from_secs(60)).await {
            Some(core_frame::Kind::Downlink(m)) => match m.kind {
                Some(downlink::Kind::Revoked(r)) => revoked.push((m.seq, r.grant_id)),
                other => panic!("{other:?}"),
            },
            other => panic!("revocation not received: {other:?}"),
        }
    }
    assert_eq!(revoked.iter().map(|r| r.0).collect::<Vec<_>>(), vec![3, 4]);

    // The same connection still uploads.
    let (mut send, mut recv) = b.conn.open_bi().await.unwrap();
    let hello = EdgeFrame {
        kind: Some(edge_frame::Kind::Hello(Hello { log_acked_seq: 0 })),
    };
    send.write_all(&encode_frame(&hello)).await.unwrap();
    let (mut dec, mut buf) = (FrameDecoder::new(), vec![0u8; 4096]);
    let answer = read_frame::<CoreFrame>(&mut recv, &mut dec, &mut buf)
        .await
        .unwrap();
    assert!(matches!(
        answer.and_then(|f| f.kind),
        Some(core_frame::Kind::Hello(_))
    ));
    core.stop().await;
}

/// A core restored from a backup older than what a box applied: the box
/// says it applied seq 5, the store made nothing for it; the next grant
/// is numbered 6, not 1 (which the box would take for one it applied, and
/// drop).
#[tokio::test(flavor = "multi_thread")]
async fn a_core_behind_what_a_box_applied_numbers_on_after_the_box() {
    let dir = tempfile::tempdir().unwrap();
    let core = LoopbackCore::start(&dir.path().join("core.sqlite")).unwrap();
    let identity = NodeIdentity::generate().unwrap();
    identity.write_to(&dir.path().join("identity")).unwrap();
    let key = std::fs::read_to_string(dir.path().join("identity/node.key")).unwrap();
    let cert = issue_node_cert(&core.ca, "box-1", &identity.public_key_pem()).unwrap();
    let imsi = Imsi::parse(IMSI).unwrap();
    core.store
        .sell(
            "bss-1",
            &imsi,
            &package(1_000),
            "p",
            chrono::Utc::now().timestamp(),
        )
        .unwrap();
    let mut b = Box_::connect(&core, &cert, &key, 5).await;
    b.ask(1, IMSI, 100).await;
    match b.next(Duration::from_secs(10)).await {
        Some(core_frame::Kind::Downlink(m)) => assert_eq!(m.seq, 6, "{m:?}"),
        other => panic!("{other:?}"),
    }
    core.stop().await;
}

fn grant_tokens(m: &mec_sync::wire::pb::Downlink) -> u64 {
    match &m.kind {
        Some(downlink::Kind::Grant(g)) => g.tokens,
        other => panic!("{other:?}"),
    }
}
