//! Packages sold at the core, spent at a box: a real core-ingest on
//! loopback QUIC (its SQLite store holding the packages), a box's billing
//! over a real usage log and ledger store, and the uploader serving the
//! downlink between them.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mec_billing::{
    unix_now, Admit, AppliedWatermark, Billing, BillingConfig, BillingError, RateLimits,
};
use mec_metering::charging::{GrantPolicy, PackageSpec};
use mec_metering::store::Store;
use mec_metering::{BucketKind, Imsi};
use mec_sync::charging_store::ChargingStore;
use mec_sync::core_server::LoopbackCore;
use mec_sync::downlink::GrantAsker;
use mec_sync::identity::NodeIdentity;
use mec_sync::log::UsageLog;
use mec_sync::pki::issue_node_cert;
use mec_sync::record::SignedRecord;
use mec_sync::uploader::{Downlink, UploaderConfig, UploaderStatus};

use crate::common::{info, log_options, settled};

fn subscriber(n: u32) -> Imsi {
    Imsi::parse(&format!("0010100000002{n:02}")).unwrap()
}

fn package(tokens: u64) -> PackageSpec {
    let now = unix_now();
    PackageSpec {
        kind: BucketKind::Topup,
        allowance: tokens,
        valid_from: now - 60,
        expires_at: now + 30 * 86_400,
        tier: "basic".into(),
        models: vec![],
    }
}

/// A box whose packages come from `core`, uploading to it.
struct CoreBox {
    billing: Billing,
    log: Arc<UsageLog>,
    asker: GrantAsker,
    config: UploaderConfig,
    stop: tokio::sync::watch::Sender<bool>,
    uploader: tokio::task::JoinHandle<()>,
}

impl CoreBox {
    /// Stops the uploader (and the downlink with it): the box is cut off.
    async fn cut(&mut self) {
        let _ = self.stop.send(true);
        (&mut self.uploader).await.unwrap();
    }

    /// Starts the uploader again.
    fn reconnect(&mut self) {
        let (stop, rx) = tokio::sync::watch::channel(false);
        self.stop = stop;
        self.uploader = tokio::spawn(mec_sync::uploader::run(
            self.log.clone(),
            self.config.clone(),
            Arc::new(Mutex::new(UploaderStatus::default())),
            rx,
        ));
    }
}

fn start_box(dir: &Path, core: &LoopbackCore) -> CoreBox {
    start_box_with(dir, core, RateLimits::default())
}

fn start_box_with(dir: &Path, core: &LoopbackCore, limits: RateLimits) -> CoreBox {
    let identity = NodeIdentity::generate().unwrap();
    identity.write_to(&dir.join("identity")).unwrap();
    let key_pem = std::fs::read_to_string(dir.join("identity/node.key")).unwrap();
    let cert = issue_node_cert(&core.ca, "box-1", &identity.public_key_pem()).unwrap();
    let log = Arc::new(
        UsageLog::open(&dir.join("log"), identity, "box-1", log_options(1 << 30)).unwrap(),
    );
    let store = Store::open(&dir.join("ledger.sqlite")).unwrap();
    let asker = GrantAsker::new();
    let billing = Billing::start(
        BillingConfig {
            enabled: true,
            limits,
            welcome: Vec::new(),
            core: Some(asker.clone()),
            ..Default::default()
        },
        log.clone(),
        store,
        None,
        AppliedWatermark::default(),
    )
    .unwrap();
    let (stop, rx) = tokio::sync::watch::channel(false);
    let config = UploaderConfig {
        core: core.addr,
        server_name: "localhost".into(),
        ca_pem: core.ca.cert_pem.clone(),
        cert_pem: cert,
        key_pem,
        limits: Default::default(),
        transport: Default::default(),
        poll: Duration::from_millis(20),
        ack_limit: None,
        downlink: Some(Downlink {
            sink: billing.downlink_sink(),
            asker: asker.clone(),
        }),
    };
    let uploader = tokio::spawn(mec_sync::uploader::run(
        log.clone(),
        config.clone(),
        Arc::new(Mutex::new(UploaderStatus::default())),
        rx,
    ));
    CoreBox {
        billing,
        log,
        asker,
        config,
        stop,
        uploader,
    }
}

/// Polls `what` every 20 ms until it holds, at most 30 s (a bound, not a
/// timing: a lost message fails instead of hanging).
async fn until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn serve(
    b: &Billing,
    imsi: &Imsi,
    prompt: u64,
    completion: u64,
) -> Result<u64, BillingError> {
    let mut i = info();
    i.imsi = imsi.clone();
    let admission = b
        .admit_or_ask(Admit {
            info: &i,
            prompt_tokens: prompt,
            max_completion: completion,
            min_completion: 1,
            stream: false,
        })
        .await?;
    Ok(admission.settle(&settled(prompt, completion)).await?.seq)
}

fn record(log: &UsageLog, seq: u64) -> mec_sync::record::UsageRecord {
    let (_, bytes) = log.read_from(seq, 1, 1 << 20).unwrap().remove(0);
    SignedRecord::from_bytes(&bytes).unwrap().record().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_package_sold_at_the_core_is_spent_at_a_box_and_settled_there_once() {
    let dir = tempfile::tempdir().unwrap();
    let policy = GrantPolicy {
        slice: 400,
        ..GrantPolicy::default()
    };
    let core = LoopbackCore::start_with_policy(&dir.path().join("core.sqlite"), policy).unwrap();
    let (alice, bob) = (subscriber(1), subscriber(2));
    core.store
        .sell("shop-1", &alice, &package(1000), "shop-1", unix_now())
        .unwrap();
    let b = start_box(&dir.path().join("box"), &core);
    until("the downlink is up", || b.asker.connected()).await;

    // Alice's first request asks the core: a slice of 400 arrives, durably,
    // and pays for it; the record names the grant.
    let seq = serve(&b.billing, &alice, 10, 20).await.unwrap();
    let r = record(&b.log, seq);
    assert_eq!(r.billed_tokens, 30);
    assert!(r.debits.iter().all(|d| d.grant_id != 0), "{r:?}");
    assert!(!r.offline);
    let view = b.billing.grants_view();
    assert_eq!((view.held, view.counters.granted), (1, 1));
    // Spend past the threshold (20% of 400): the box asks for more itself.
    for _ in 0..10 {
        serve(&b.billing, &alice, 10, 20).await.unwrap();
    }
    until("a second grant, asked at the threshold", || {
        b.billing.grants_view().counters.granted == 2
    })
    .await;

    // The core settles the uploaded records once each: 330 used, and what
    // the box holds and what is left make up the rest.
    until("the core settled 11 records", || {
        core.store.account(&alice, unix_now()).unwrap().used == 330
    })
    .await;
    let account = core.store.account(&alice, unix_now()).unwrap();
    assert_eq!(account.overage, 0);
    assert_eq!(
        account.used + account.granted + account.remaining,
        1000,
        "{account:?}"
    );
    assert_eq!(
        account.granted,
        800 - 330,
        "two slices of 400 held, 330 of them used"
    );

    // Bob has no package at the core: refused with the core's words.
    match serve(&b.billing, &bob, 10, 20).await {
        Err(BillingError::GrantRefused { code, message }) => {
            assert_eq!(code, "unknown_subscriber");
            assert!(message.contains(bob.as_str()), "{message}");
        }
        other => panic!("bob served: {other:?}"),
    }
    // A box with a core takes no local grants.
    assert!(matches!(
        b.billing
            .grant(&bob, BucketKind::Topup, 100, 0, i64::MAX / 2),
        Err(BillingError::CoreManaged(_))
    ));

    // Revoked at the core: the box stops admitting once the revocation
    // arrives, and the core grants no more.
    core.store.revoke("shop-1", unix_now()).unwrap();
    until("the revocations reached the box", || {
        b.billing.grants_view().counters.revoked == 2
    })
    .await;
    assert_eq!(b.billing.grants_view().held, 0);
    match serve(&b.billing, &alice, 10, 20).await {
        Err(BillingError::GrantRefused { code, .. }) => assert_eq!(code, "insufficient_quota"),
        other => panic!("served after the revocation: {other:?}"),
    }

    let mut b = b;
    b.cut().await;
    core.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cut_off_the_box_serves_within_its_grants_and_the_core_settles_on_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let policy = GrantPolicy {
        slice: 100,
        offline_allowance: 50,
        ..GrantPolicy::default()
    };
    let core = LoopbackCore::start_with_policy(&dir.path().join("core.sqlite"), policy).unwrap();
    let (alice, carol) = (subscriber(1), subscriber(3));
    for (id, who) in [("p-a", &alice), ("p-c", &carol)] {
        core.store
            .sell(id, who, &package(120), id, unix_now())
            .unwrap();
    }
    let mut b = start_box(&dir.path().join("box"), &core);
    until("the downlink is up", || b.asker.connected()).await;
    serve(&b.billing, &alice, 5, 5).await.unwrap();
    until("the first record settled", || {
        core.store.account(&alice, unix_now()).unwrap().used == 10
    })
    .await;

    // The link goes.
    b.cut().await;
    assert!(!b.asker.connected());
    // Alice is served from her grant (90 left), then from its offline
    // allowance (50), and no further; each record says it was offline.
    let mut served = 0;
    loop {
        match serve(&b.billing, &alice, 5, 5).await {
            Ok(seq) => {
                assert!(record(&b.log, seq).offline);
                served += 10;
            }
            Err(BillingError::InsufficientQuota { .. }) | Err(BillingError::NoGrant(_)) => break,
            Err(e) => panic!("{e}"),
        }
        assert!(served <= 140, "served beyond the grant and the allowance");
    }
    assert_eq!(served, 140);
    // Carol was never granted anything here: not served.
    assert!(matches!(
        serve(&b.billing, &carol, 5, 5).await,
        Err(BillingError::NoGrant(_))
    ));

    // Back: the core settles the offline records. Alice used 150 of a
    // 120 package: 30 of overage, reported, not hidden.
    b.reconnect();
    until("the offline records settled", || {
        let a = core.store.account(&alice, unix_now()).unwrap();
        a.used + a.overage == 150
    })
    .await;
    let a = core.store.account(&alice, unix_now()).unwrap();
    assert_eq!((a.used, a.overage, a.remaining), (120, 30, 0), "{a:?}");

    b.cut().await;
    core.stop().await;
}

/// A request that waits for its subscriber's first grant is admitted once
/// it arrives: its rate limits were taken by its first try, not again by
/// each try after (one request a second is the limit here).
#[tokio::test(flavor = "multi_thread")]
async fn a_request_waiting_for_a_grant_takes_its_rate_limits_once() {
    let dir = tempfile::tempdir().unwrap();
    let core = LoopbackCore::start(&dir.path().join("core.sqlite")).unwrap();
    let alice = subscriber(1);
    core.store
        .sell("shop-1", &alice, &package(1000), "shop-1", unix_now())
        .unwrap();
    let limits = RateLimits {
        imsi_requests_per_second: 1.0,
        ..RateLimits::default()
    };
    let mut b = start_box_with(&dir.path().join("box"), &core, limits);
    until("the downlink is up", || b.asker.connected()).await;
    serve(&b.billing, &alice, 10, 20).await.unwrap();
    b.cut().await;
    core.stop().await;
}
