//! The site configuration a technician applies: who the box is at this
//! site, where its core is, where its API listens, and the packages a new
//! subscriber gets. Stored as `state_dir/site.toml`; the agent lays it over
//! its own configuration at start.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::pb::ApplySiteConfig;

/// A package granted to a subscriber the first time the box sees them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DefaultPackage {
    /// "monthly", "topup" or "trial".
    pub kind: String,
    /// Tokens.
    pub tokens: u64,
    /// Days it stays valid.
    pub valid_days: u32,
}

/// `site.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    /// The site.
    pub site_id: String,
    /// The node (its certificate's node id).
    pub node_id: String,
    /// core-ingest, host:port (UDP).
    pub core_address: String,
    /// The name on the core's certificate.
    pub core_server_name: String,
    /// Where the MEC API listens, when the site says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_listen: Option<String>,
    /// Packages for new subscribers.
    #[serde(default)]
    pub default_packages: Vec<DefaultPackage>,
    /// The operator's image-signing key (SPKI PEM): update bundles are
    /// checked against it and nothing else. None: updates are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_signing_key: Option<String>,
}

fn check_id(what: &str, id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 64 {
        return Err(format!(
            "{what} must be 1 to 64 characters, got {}",
            id.len()
        ));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return Err(format!(
            "{what} {id:?} may hold only letters, digits, '-', '_' and '.'"
        ));
    }
    Ok(())
}

/// Splits `host:port` (`[v6]:port` for IPv6), checking both parts.
pub fn parse_endpoint(endpoint: &str) -> Result<(String, u16), String> {
    let bad = |why: &str| format!("core address {endpoint:?}: {why} (expected host:port)");
    let (host, port) = endpoint.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    let port: u16 = port.parse().map_err(|_| bad("the port is not a number"))?;
    if port == 0 {
        return Err(bad("port 0"));
    }
    let host = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => {
            v6.parse::<std::net::Ipv6Addr>()
                .map_err(|_| bad("not an IPv6 address in brackets"))?;
            v6.to_string()
        }
        None => {
            let dns_ok = !host.is_empty()
                && host.len() <= 253
                && host.split('.').all(|label| {
                    !label.is_empty()
                        && label.len() <= 63
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                        && !label.starts_with('-')
                        && !label.ends_with('-')
                });
            if !dns_ok {
                return Err(bad("the host is neither an IPv4 address nor a DNS name"));
            }
            host.to_string()
        }
    };
    Ok((host, port))
}

impl SiteConfig {
    /// Checks a request's fields.
    pub fn from_request(c: &ApplySiteConfig) -> Result<SiteConfig, String> {
        check_id("site_id", &c.site_id)?;
        check_id("node_id", &c.node_id)?;
        let (host, _) = parse_endpoint(&c.core_address)?;
        let core_server_name = if c.core_server_name.is_empty() {
            host
        } else {
            c.core_server_name.clone()
        };
        let api_listen = if c.api_listen.is_empty() {
            None
        } else {
            c.api_listen
                .parse::<std::net::SocketAddr>()
                .map_err(|_| format!("api_listen {:?} is not ip:port", c.api_listen))?;
            Some(c.api_listen.clone())
        };
        let mut default_packages = Vec::new();
        for p in &c.default_packages {
            if !matches!(p.kind.as_str(), "monthly" | "topup" | "trial") {
                return Err(format!(
                    "default package kind {:?}: expected monthly, topup or trial",
                    p.kind
                ));
            }
            if p.tokens == 0 || !(1..=3660).contains(&p.valid_days) {
                return Err(format!(
                    "default package {}: tokens must be above 0 and valid_days 1 to 3660",
                    p.kind
                ));
            }
            default_packages.push(DefaultPackage {
                kind: p.kind.clone(),
                tokens: p.tokens,
                valid_days: p.valid_days,
            });
        }
        let image_signing_key = if c.image_signing_key.trim().is_empty() {
            None
        } else {
            mec_image::manifest::parse_verifying_key(&c.image_signing_key)
                .map_err(|e| format!("image_signing_key: {e}"))?;
            Some(c.image_signing_key.clone())
        };
        Ok(SiteConfig {
            site_id: c.site_id.clone(),
            node_id: c.node_id.clone(),
            core_address: c.core_address.clone(),
            core_server_name,
            api_listen,
            default_packages,
            image_signing_key,
        })
    }

    /// The TOML written to `site.toml`.
    pub fn to_toml(&self) -> String {
        format!(
            "# Written by provisioning (edgeprov over the serial console). Do not edit by hand:\n# a technician re-applies it.\n{}",
            toml::to_string(self).expect("a site configuration always serialises")
        )
    }

    /// Reads `site.toml`; `None` when there is none.
    pub fn load(path: &Path) -> Result<Option<SiteConfig>, String> {
        match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text)
                .map(Some)
                .map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_checked() {
        assert_eq!(
            parse_endpoint("core.example.net:7443").unwrap(),
            ("core.example.net".into(), 7443)
        );
        assert_eq!(parse_endpoint("127.0.0.1:7443").unwrap().1, 7443);
        assert_eq!(parse_endpoint("[::1]:7443").unwrap().0, "::1");
        for bad in [
            "core",
            "core:",
            ":7443",
            "core:0",
            "core:99999",
            "bad host:1",
            "[zz]:1",
            "-a.b:1",
            "a..b:1",
        ] {
            assert!(parse_endpoint(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_site_config_round_trips_through_toml() {
        let req = ApplySiteConfig {
            site_id: "cell-042".into(),
            node_id: "edge-0001".into(),
            core_address: "core.example.net:7443".into(),
            api_listen: "0.0.0.0:8080".into(),
            default_packages: vec![crate::pb::DefaultPackage {
                kind: "trial".into(),
                tokens: 5000,
                valid_days: 7,
            }],
            ..Default::default()
        };
        let site = SiteConfig::from_request(&req).unwrap();
        assert_eq!(site.core_server_name, "core.example.net");
        let back: SiteConfig = toml::from_str(&site.to_toml()).unwrap();
        assert_eq!(back, site);
        let mut bad = req.clone();
        bad.default_packages[0].kind = "forever".into();
        assert!(SiteConfig::from_request(&bad).is_err());
        let mut bad = req.clone();
        bad.api_listen = "everywhere".into();
        assert!(SiteConfig::from_request(&bad).is_err());

        // The operator's image key: kept as given when it is an Ed25519
        // key, refused when it is not.
        let key = ed25519_dalek::SigningKey::from_bytes(&[3u8; 32]);
        use ed25519_dalek::pkcs8::EncodePublicKey;
        let pem = key
            .verifying_key()
            .to_public_key_pem(Default::default())
            .unwrap();
        let mut with_key = req.clone();
        with_key.image_signing_key = pem.clone();
        let site = SiteConfig::from_request(&with_key).unwrap();
        assert_eq!(site.image_signing_key.as_deref(), Some(pem.as_str()));
        let back: SiteConfig = toml::from_str(&site.to_toml()).unwrap();
        assert_eq!(back, site);
        let mut bad = req;
        bad.image_signing_key =
            "-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n".into();
        let e = SiteConfig::from_request(&bad).unwrap_err();
        assert!(e.contains("image_signing_key"), "{e}");
    }
}
