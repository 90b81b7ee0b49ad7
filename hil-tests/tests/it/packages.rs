//! Packages sold at the core, spent at three boxes (issue 23), over real
//! processes: one core-ingest, three edge agents serving the real model,
//! each behind its own fault relay to the core. Thirty subscribers buy
//! packages at the core; their traffic moves between the boxes; one box is
//! cut off for a while and keeps serving within its grants and their
//! offline allowance; a top-up sold during the cut reaches that box after
//! it; a revocation stops admission at every box. At the end, for every
//! subscriber, the packages sold minus the tokens on the bill is the core's
//! balance, and what was served beyond a balance is within the offline
//! allowance and reported by the core as overage.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use hil_tests::procs::free_port;
use hil_tests::relay::{LinkMode, UdpRelay};
use hil_tests::stack::{Admin, Core, LocalAgent};
use serde_json::{json, Value};

/// Subscribers.
const SUBSCRIBERS: usize = 30;
/// What most of them buy.
const PACKAGE: u64 = 4_000;
/// What the two subscribers whose packages the cut exhausts buy.
const THIN_PACKAGE: u64 = 700;
/// The top-up sold during the cut.
const TOP_UP: u64 = 2_000;
/// How grants are cut: small slices, so boxes come back for more.
const GRANTS: &str = "\n[grants]\nslice = 600\nthreshold_percent = 25\noffline_allowance = 200\n";
const OFFLINE_ALLOWANCE: u64 = 200;
/// Completion tokens per request.
const MAX_TOKENS: u64 = 12;

fn imsi(i: usize) -> String {
    format!("0010100000003{i:02}")
}

/// One box: its agent, its relay to the core, its API.
struct Box_ {
    agent: LocalAgent,
    relay: UdpRelay,
    admin: Admin,
    api: String,
    model: String,
    node_id: String,
}

/// One answer, as a client saw it.
#[derive(Debug, Clone)]
struct Reply {
    status: u16,
    code: String,
    total_tokens: u64,
    request_id: Option<String>,
}

async fn ask(http: &reqwest::Client, b: &Box_, imsi: &str, n: usize) -> Reply {
    let r = http
        .post(format!("{}/v1/chat/completions", b.api))
        .bearer_auth(&b.agent.app_key)
        .header("X-Subscriber-Imsi", imsi)
        .json(&json!({
            "model": b.model,
            "messages": [{"role": "user", "content": format!("Say something about the number {n}.")}],
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
        }))
        .send()
        .await
        .expect("the box's API answers");
    let status = r.status().as_u16();
    let request_id = r
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let v: Value = r.json().await.unwrap_or(Value::Null);
    Reply {
        status,
        code: v["error"]["code"].as_str().unwrap_or("").to_string(),
        total_tokens: v["usage"]["total_tokens"].as_u64().unwrap_or(0),
        request_id: request_id.filter(|_| status == 200),
    }
}

/// Polls `check` every 200 ms until it holds, at most `limit` (a bound: a
/// message that never arrives fails the test instead of hanging it).
async fn until<F: std::future::Future<Output = bool>>(
    what: &str,
    limit: Duration,
    mut check: impl FnMut() -> F,
) {
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn downlink_up(admin: &Admin) -> bool {
    admin.sync().await["status"]["grants"]["downlink"]["connected"] == true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_boxes_spend_packages_sold_at_the_core() {
    let _turn = crate::e2e::ONE_AT_A_TIME.lock().await;
    story(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_boxes_spend_packages_sold_at_the_core_on_postgresql() {
    let _turn = crate::e2e::ONE_AT_A_TIME.lock().await;
    let url = tokio::task::spawn_blocking(|| mec_pg_throwaway::fresh_database("packages"))
        .await
        .unwrap()
        .unwrap();
    story(Some(url)).await;
}

async fn start_box(i: usize, dir: &Path, core: &Core) -> Box_ {
    let relay = UdpRelay::start("127.0.0.1:0".parse().unwrap(), core.listen)
        .await
        .unwrap();
    let port = |_| -> SocketAddr { format!("127.0.0.1:{}", free_port(false)).parse().unwrap() };
    let node_id = format!("edge-pkg-{i}");
    let ca = core.dir.join("operator-ca.crt");
    let mut agent = LocalAgent::init_with(
        &dir.join(&node_id),
        port(0),
        port(1),
        "",
        &[
            "--node-id",
            &node_id,
            "--core",
            &relay.addr.to_string(),
            "--core-ca",
            ca.to_str().unwrap(),
        ],
    );
    // Cut off, the box knows within 6 s (QUIC's idle timeout).
    let config = std::fs::read_to_string(&agent.config).unwrap();
    std::fs::write(
        &agent.config,
        config.replacen("[core]\n", "[core]\nidle_timeout_s = 6\n", 1),
    )
    .unwrap();
    core.enroll(&node_id, &agent.state_dir);
    let ready = tokio::task::block_in_place(|| agent.start());
    let admin = Admin::of_ready(&ready);
    Box_ {
        api: ready["api_url"].as_str().unwrap().to_string(),
        model: ready["model"].as_str().unwrap().to_string(),
        agent,
        relay,
        admin,
        node_id,
    }
}

async fn story(store: Option<String>) {
    let tmp = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    let core_addr: SocketAddr = format!("127.0.0.1:{}", free_port(true)).parse().unwrap();
    let mut core = Core::init_on(&tmp.path().join("core"), core_addr, &[], store.as_deref());
    core.configure(GRANTS);
    core.start();
    let mut boxes = Vec::new();
    for i in 0..3 {
        boxes.push(start_box(i, tmp.path(), &core).await);
    }
    for b in &boxes {
        until("the downlink is up", Duration::from_secs(60), || {
            downlink_up(&b.admin)
        })
        .await;
    }
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();

    // Thirty subscribers buy at the core. Two of them (T: topped up during
    // the cut, O: served offline beyond its package) buy thin packages and
    // use only the box that will be cut; R's package is revoked at the end.
    let imsis: Vec<String> = (0..SUBSCRIBERS).map(imsi).collect();
    let (t_sub, o_sub, r_sub) = (imsis[0].clone(), imsis[1].clone(), imsis[2].clone());
    let mut sold: BTreeMap<String, u64> = BTreeMap::new();
    for s in &imsis {
        let tokens = if *s == t_sub || *s == o_sub {
            THIN_PACKAGE
        } else {
            PACKAGE
        };
        core.sell(&format!("pkg-{s}"), s, tokens);
        sold.insert(s.clone(), tokens);
    }
    let mut replies: Vec<(usize, Reply)> = Vec::new();

    // Traffic moves between the boxes: each subscriber visits all three
    // (T and O only box 0), six requests at a time.
    let mut plan = Vec::new();
    for round in 0..3 {
        for (i, s) in imsis.iter().enumerate() {
            let b = if *s == t_sub || *s == o_sub {
                0
            } else {
                (i + round) % 3
            };
            plan.push((b, s.clone(), round * SUBSCRIBERS + i));
        }
    }
    for chunk in plan.chunks(6) {
        let answers = futures_util::future::join_all(chunk.iter().map(|(b, s, n)| {
            let (http, bx) = (&http, &boxes[*b]);
            async move { (*b, ask(http, bx, s, *n).await) }
        }))
        .await;
        replies.extend(answers);
    }
    let phase_a = replies.len();
    for (b, r) in &replies {
        assert_eq!(r.status, 200, "box {b}: {r:?}");
    }
    println!(
        "{:6.1} s  {phase_a} requests over three boxes",
        t0.elapsed().as_secs_f64()
    );

    // Box 0 is cut off from the core; once it knows, it serves T and O
    // from their grants, then from the offline allowance, then refuses.
    boxes[0].relay.set(LinkMode::Cut);
    until(
        "box 0 sees the core gone",
        Duration::from_secs(90),
        || async { !downlink_up(&boxes[0].admin).await },
    )
    .await;
    let cut_at = Instant::now();
    core.sell("topup-t", &t_sub, TOP_UP);
    *sold.get_mut(&t_sub).unwrap() += TOP_UP;
    for s in [&t_sub, &o_sub] {
        let mut n = 0;
        loop {
            let r = ask(&http, &boxes[0], s, 1_000 + n).await;
            n += 1;
            let served = r.status == 200;
            if !served {
                assert_eq!(
                    (r.status, r.code.as_str()),
                    (503, "quota_unavailable"),
                    "{r:?}"
                );
            }
            replies.push((0, r));
            if !served {
                break;
            }
            assert!(n < 60, "box 0 served {s} beyond its grant and allowance");
        }
    }
    // A subscriber the cut box never saw is not served there.
    let stranger = imsi(99);
    let r = ask(&http, &boxes[0], &stranger, 0).await;
    assert_eq!(
        (r.status, r.code.as_str()),
        (503, "quota_unavailable"),
        "{r:?}"
    );
    println!(
        "{:6.1} s  box 0 cut off: served T and O within their grants and allowance",
        t0.elapsed().as_secs_f64()
    );

    // Back: the top-up reaches box 0 (T is served again); O, whose
    // package is spent, is refused by the core.
    boxes[0].relay.set(LinkMode::Up);
    until("box 0 reconnects", Duration::from_secs(90), || {
        downlink_up(&boxes[0].admin)
    })
    .await;
    let cut_for = cut_at.elapsed();
    // O's offline records settle at the core once uploaded: then its
    // package is spent there (asked before, the core would still see the
    // unsettled part of its grant).
    if let Err(last) = boxes[0].admin.wait_drained(Duration::from_secs(60)).await {
        panic!("box 0 did not drain after the cut: {last}");
    }
    until(
        "O's offline records settled",
        Duration::from_secs(60),
        || async {
            let a = tokio::task::block_in_place(|| core.balance(&o_sub));
            a["overage"].as_u64().unwrap_or(0) > 0
        },
    )
    .await;
    let r = ask(&http, &boxes[0], &t_sub, 2_000).await;
    assert_eq!(r.status, 200, "the top-up did not reach box 0: {r:?}");
    replies.push((0, r));
    let r = ask(&http, &boxes[0], &o_sub, 2_001).await;
    assert_eq!(
        (r.status, r.code.as_str()),
        (429, "insufficient_quota"),
        "{r:?}"
    );
    replies.push((0, r));

    // R's package is revoked: every box stops admitting R.
    let revoked_at = Instant::now();
    core.revoke(&format!("pkg-{r_sub}"));
    let mut stopped_after = Vec::new();
    for (b, bx) in boxes.iter().enumerate() {
        let mut n = 3_000;
        loop {
            let r = ask(&http, bx, &r_sub, n).await;
            n += 1;
            let refused = r.status == 429;
            replies.push((b, r.clone()));
            if refused {
                stopped_after.push(revoked_at.elapsed());
                break;
            }
            assert_eq!(r.status, 200, "{r:?}");
            assert!(
                revoked_at.elapsed() < Duration::from_secs(30),
                "box {b} still admits R 30 s after the revocation"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    println!(
        "{:6.1} s  the revocation stopped R at the three boxes after {stopped_after:?}",
        t0.elapsed().as_secs_f64()
    );

    // Drain, then the bill.
    for b in &boxes {
        if let Err(last) = b.admin.wait_drained(Duration::from_secs(120)).await {
            panic!("box {} did not drain: {last}", b.node_id);
        }
    }
    let rows = core.export();
    let mut by_id: BTreeMap<String, &Value> = BTreeMap::new();
    for row in &rows {
        let id = row["record_id"].as_str().unwrap().to_string();
        assert!(by_id.insert(id, row).is_none(), "a record twice: {row}");
    }
    let mut problems = Vec::new();
    let served: Vec<&(usize, Reply)> = replies.iter().filter(|(_, r)| r.status == 200).collect();
    for (b, r) in &served {
        let id = r.request_id.as_ref().expect("a 200 names its request");
        match by_id.get(id.as_str()) {
            None => problems.push(format!("box {b}: {r:?} is not on the bill")),
            Some(row) => {
                if row["billed_tokens"].as_u64() != Some(r.total_tokens)
                    || row["node_id"] != boxes[*b].node_id
                {
                    problems.push(format!("box {b}: told {r:?}, billed {row}"));
                }
            }
        }
    }
    if rows.len() != served.len() {
        problems.push(format!(
            "{} records for {} answers",
            rows.len(),
            served.len()
        ));
    }
    let offline: Vec<&&Value> = by_id.values().filter(|r| r["offline"] == 1).collect();
    if offline.is_empty() || offline.iter().any(|r| r["node_id"] != boxes[0].node_id) {
        problems.push(format!(
            "offline records should all be box 0's, and some: {offline:?}"
        ));
    }
    let mut billed: BTreeMap<&str, u64> = BTreeMap::new();
    for row in &rows {
        *billed.entry(row["imsi"].as_str().unwrap()).or_default() +=
            row["billed_tokens"].as_u64().unwrap();
    }
    let o_grants_at_box_0 = boxes[0].admin.balance(&o_sub).await["buckets"]
        .as_array()
        .map_or(0, |b| b.iter().filter(|b| b["kind"] == "grant").count())
        as u64;
    // Each subscriber's account at the core, once it settled the bill.
    let deadline = Instant::now() + Duration::from_secs(60);
    for (s, sold) in &sold {
        let bill = billed.get(s.as_str()).copied().unwrap_or(0);
        let account = loop {
            let a = tokio::task::block_in_place(|| core.balance(s));
            let settled = a["used"].as_u64().unwrap_or(0) + a["overage"].as_u64().unwrap_or(0);
            if settled >= bill || Instant::now() >= deadline {
                break a;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let n = |k: &str| account[k].as_u64().unwrap_or(u64::MAX);
        let (used, overage) = (n("used"), n("overage"));
        // R's revoked package leaves nothing; every other subscriber's
        // balance (free or held by boxes) is what was sold minus what the
        // bill paid from it.
        // (R's revoked package gives nothing: what its boxes' grants still
        // hold is theirs to settle, never to spend.)
        let left = if *s == r_sub {
            n("remaining")
        } else {
            n("remaining").saturating_add(n("granted"))
        };
        let expected_left = if *s == r_sub { 0 } else { sold - used };
        if used + overage != bill || left != expected_left {
            problems.push(format!(
                "{s}: sold {sold}, billed {bill}; the core says used {used}, overage {overage}, left {left} (expected {expected_left})"
            ));
        }
        // Served beyond the balance: only offline, only O, and at most the
        // offline allowance of each grant box 0 held for O.
        let allowed = if *s == o_sub {
            OFFLINE_ALLOWANCE * o_grants_at_box_0
        } else {
            0
        };
        if overage > allowed {
            problems.push(format!(
                "{s}: overage {overage} beyond the offline allowance {allowed}"
            ));
        }
        if *s == o_sub && (overage == 0 || bill != sold + overage) {
            problems.push(format!(
                "O was served beyond its package offline: the core should report it ({account})"
            ));
        }
    }
    println!(
        "{:6.1} s  {} records; box 0 cut for {cut_for:?}; {} offline records; R stopped after {stopped_after:?}",
        t0.elapsed().as_secs_f64(),
        rows.len(),
        offline.len()
    );
    for mut b in boxes {
        b.agent.stop();
    }
    assert!(
        problems.is_empty(),
        "{} problem(s):\n{}\ncore log:\n{}",
        problems.len(),
        problems.join("\n"),
        core.log_tail()
    );
}
