//! The site configuration provisioning writes (`state_dir/site.toml`):
//! the agent takes its node id, core and API address from it, and a
//! subscriber new to the box gets the site's default packages once.

use crate::common;

use common::*;
use mec_provisioning::pb::{ApplySiteConfig, DefaultPackage};
use mec_provisioning::site::SiteConfig;

const NEW_IMSI: &str = "001010000000777";

fn write_site(dir: &std::path::Path, core: &str) {
    let site = SiteConfig::from_request(&ApplySiteConfig {
        site_id: "cell-042".into(),
        node_id: "edge-site-1".into(),
        core_address: core.into(),
        core_server_name: "localhost".into(),
        api_listen: "127.0.0.1:0".into(),
        default_packages: vec![DefaultPackage {
            kind: "trial".into(),
            tokens: 120,
            valid_days: 7,
        }],
        image_signing_key: String::new(),
    });
    let site = site.unwrap();
    std::fs::write(dir.join("state/site.toml"), site.to_toml()).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_site_configuration_names_the_node_and_welcomes_new_subscribers_once() {
    let tmp = tempfile::tempdir().unwrap();
    let (config, key) = init(tmp.path());
    write_site(tmp.path(), "127.0.0.1:9");
    let mut agent = Agent::serve(tmp.path(), &config, &key);

    let sync = agent
        .get_json(format!("{}/admin/v1/sync", agent.admin))
        .await;
    assert_eq!(sync["core"], "127.0.0.1:9", "{sync}");
    // No grant: the first request of a new subscriber is served from the
    // welcome package.
    let r = agent.chat(NEW_IMSI, "Hello?", 4, false).await;
    assert_eq!(r.status(), 200);
    let balance = agent.balance(NEW_IMSI).await;
    let buckets = balance["buckets"].as_array().unwrap();
    assert_eq!(buckets.len(), 1, "{balance}");
    assert_eq!(
        (
            buckets[0]["kind"].as_str(),
            buckets[0]["allowance"].as_u64()
        ),
        (Some("trial"), Some(120))
    );
    let records = agent.dump();
    assert_eq!(records.last().unwrap()["node_id"], "edge-site-1");
    // Spent, and no second welcome.
    let mut refused = false;
    for _ in 0..10 {
        let r = agent
            .chat(NEW_IMSI, "Tell me more about it.", 64, false)
            .await;
        // Spent: more can only come from the core, which this box cannot
        // reach (no certificate): 503, retry later.
        if r.status() == 503 {
            let v: serde_json::Value = r.json().await.unwrap();
            assert_eq!(v["error"]["code"], "quota_unavailable", "{v}");
            refused = true;
            break;
        }
    }
    assert!(refused, "the welcome package ran out");
    assert_eq!(
        agent.balance(NEW_IMSI).await["buckets"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // After a restart the box still knows the subscriber.
    agent.signal(libc::SIGTERM);
    assert!(agent.wait(std::time::Duration::from_secs(60)).success());
    let agent = Agent::serve(tmp.path(), &config, &key);
    let r = agent.chat(NEW_IMSI, "Hello again?", 4, false).await;
    assert_eq!(r.status(), 503);
    assert_eq!(
        agent.balance(NEW_IMSI).await["buckets"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn a_bad_site_configuration_stops_the_agent_with_the_file_named() {
    let tmp = tempfile::tempdir().unwrap();
    let (config, _) = init(tmp.path());
    std::fs::write(
        tmp.path().join("state/site.toml"),
        "site_id = \"x\"\nnode_id = \"\"\ncore_address = \"c:1\"\ncore_server_name = \"c\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(bin())
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("site.toml") && err.contains("node.id"),
        "{err}"
    );
}
