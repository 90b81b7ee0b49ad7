//! TLS to the database, asked for as libpq asks: `sslmode`, `sslrootcert`,
//! `sslcert` and `sslkey` in the URL's query, or the `PGSSLMODE`,
//! `PGSSLROOTCERT`, `PGSSLCERT` and `PGSSLKEY` variables for what the URL
//! leaves out. tokio-postgres reads none of the files and knows no
//! `verify-*` mode, so these parameters are taken out of the URL here and
//! become a rustls client configuration.
//!
//! The modes:
//! - `disable` (the default, absent any setting): no TLS, as on the Unix
//!   socket or loopback a core usually shares with its database;
//! - `verify-full`: TLS, the server's chain checked against `sslrootcert`
//!   and its name against the host connected to;
//! - `verify-ca`: TLS, the chain checked, the name not (a database reached
//!   by an address its certificate does not name);
//! - `allow`, `prefer`, `require`: refused. They encrypt without checking
//!   who answers, and the password then goes to whoever does.
//!
//! `sslrootcert` is a PEM file of CA certificates, or `system` for the
//! system's store; absent, libpq's default `~/.postgresql/root.crt`.
//! `sslcert` and `sslkey` (PEM, both or neither) authenticate the client
//! with a certificate.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};

/// The TLS parameters this module reads.
const TLS_PARAMS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// Whether and how to check the database server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// TLS; the chain checked, not the name.
    VerifyCa,
    /// TLS; the chain and the name checked.
    VerifyFull,
}

/// What the URL and the variables ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsRequest {
    /// The mode.
    pub mode: SslMode,
    /// `sslrootcert`: a PEM file, or `system`.
    pub root_cert: Option<String>,
    /// `sslcert` and `sslkey`.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// Takes the TLS parameters out of `url`'s query (the rest of the URL as
/// it was, byte for byte), the variables filling in what it leaves out.
/// `env` reads a variable (the process's, or a test's).
pub fn split(
    url: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(String, TlsRequest), String> {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, query),
        None => (url, ""),
    };
    let mut found = std::collections::HashMap::<String, String>::new();
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .map(|v| v.into_owned())
                .map_err(|_| format!("{key}: not UTF-8 once decoded"))
        };
        let key_text = decode(key)?;
        if TLS_PARAMS.contains(&key_text.as_str()) {
            found.insert(key_text, decode(value)?);
        } else {
            kept.push(pair);
        }
    }
    let in_url: HashSet<String> = found.keys().cloned().collect();
    let mut param = |name: &str, var: &str| found.remove(name).or_else(|| env(var));
    let mode = match param("sslmode", "PGSSLMODE").as_deref() {
        None | Some("disable") => SslMode::Disable,
        Some("verify-ca") => SslMode::VerifyCa,
        Some("verify-full") => SslMode::VerifyFull,
        Some(m @ ("allow" | "prefer" | "require")) => {
            return Err(format!(
                "sslmode={m} encrypts without checking the server's certificate, so the \
                 password goes to whoever answers: use sslmode=verify-full with \
                 sslrootcert=PATH (the CA of the server's certificate) or sslrootcert=system"
            ))
        }
        Some(m) => {
            return Err(format!(
                "sslmode={m:?} is not one of disable, verify-ca, verify-full"
            ))
        }
    };
    let root_cert = param("sslrootcert", "PGSSLROOTCERT");
    let client_cert = match (param("sslcert", "PGSSLCERT"), param("sslkey", "PGSSLKEY")) {
        (Some(cert), Some(key)) => Some((PathBuf::from(cert), PathBuf::from(key))),
        (None, None) => None,
        (Some(_), None) => return Err("sslcert without sslkey: give both or neither".into()),
        (None, Some(_)) => return Err("sslkey without sslcert: give both or neither".into()),
    };
    if mode == SslMode::Disable {
        // Files named in the URL with TLS off are a mistake to point out;
        // the same variables exported for psql are not (libpq ignores them).
        if ["sslrootcert", "sslcert", "sslkey"]
            .iter()
            .any(|k| in_url.contains(*k))
        {
            return Err(
                "sslrootcert, sslcert or sslkey given with TLS off: add sslmode=verify-full".into(),
            );
        }
        return Ok((
            rebuilt(base, &kept),
            TlsRequest {
                mode,
                root_cert: None,
                client_cert: None,
            },
        ));
    }
    if mode == SslMode::VerifyCa && root_cert.as_deref() == Some("system") {
        // Any publicly trusted certificate chains to the system's store:
        // without the name check, anyone holding one for any domain could
        // answer for the database.
        return Err(
            "sslmode=verify-ca with sslrootcert=system would accept any publicly trusted \
             certificate: use sslmode=verify-full (the name checked), or a CA file of your own"
                .into(),
        );
    }
    Ok((
        rebuilt(base, &kept),
        TlsRequest {
            mode,
            root_cert,
            client_cert,
        },
    ))
}

/// The URL again with the query parameters kept.
fn rebuilt(base: &str, kept: &[&str]) -> String {
    if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    }
}

/// The rustls client configuration for `request` (None: TLS off). `home`
/// is where libpq's default `~/.postgresql/root.crt` is looked for.
pub fn client_config(
    request: &TlsRequest,
    home: Option<&Path>,
) -> Result<Option<rustls::ClientConfig>, String> {
    if request.mode == SslMode::Disable {
        return Ok(None);
    }
    let mut roots = rustls::RootCertStore::empty();
    match request.root_cert.as_deref() {
        Some("system") => {
            let found = rustls_native_certs::load_native_certs();
            if found.certs.is_empty() {
                return Err(format!(
                    "sslrootcert=system: no CA certificates in the system's store ({:?})",
                    found.errors
                ));
            }
            let (_added, _unusable) = roots.add_parsable_certificates(found.certs);
        }
        Some(path) => add_pem_roots(&mut roots, Path::new(path))?,
        None => {
            let default = home.map(|h| h.join(".postgresql/root.crt"));
            match default.filter(|p| p.exists()) {
                Some(path) => add_pem_roots(&mut roots, &path)?,
                None => {
                    return Err(
                        "TLS to the database needs the CA of the server's certificate: \
                         sslrootcert=PATH, or sslrootcert=system for the system's store \
                         (libpq's default ~/.postgresql/root.crt does not exist)"
                            .into(),
                    )
                }
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| format!("sslrootcert: {e}"))?;
    let verifier: Arc<dyn ServerCertVerifier> = match request.mode {
        SslMode::VerifyCa => Arc::new(ChainOnly(webpki)),
        _ => webpki,
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let config = match &request.client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                .and_then(|i| i.collect::<Result<_, _>>())
                .map_err(|e| format!("sslcert {}: {e}", cert.display()))?;
            if chain.is_empty() {
                return Err(format!("sslcert {}: no certificate in it", cert.display()));
            }
            let key_der = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("sslkey {}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| format!("sslcert and sslkey: {e}"))?
        }
    };
    Ok(Some(config))
}

fn add_pem_roots(roots: &mut rustls::RootCertStore, path: &Path) -> Result<(), String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|i| i.collect::<Result<_, _>>())
        .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "sslrootcert {}: no certificate in it",
            path.display()
        ));
    }
    for c in certs {
        roots
            .add(c)
            .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
    }
    Ok(())
}

/// `verify-ca`: the chain is checked as for `verify-full`, and a name the
/// certificate does not hold is the only failure forgiven.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn the_tls_parameters_leave_the_url_and_the_rest_stays_as_written() {
        let (url, tls) = split(
            "postgres://core@db:5432/core?application_name=a%20b&sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&options=-c%20x",
            &no_env,
        )
        .unwrap();
        assert_eq!(
            url,
            "postgres://core@db:5432/core?application_name=a%20b&options=-c%20x"
        );
        assert_eq!(tls.mode, SslMode::VerifyFull);
        assert_eq!(tls.root_cert.as_deref(), Some("/etc/ca.pem"));
        let (url, tls) = split("postgres://core@db/core", &no_env).unwrap();
        assert_eq!(
            (url.as_str(), tls.mode),
            ("postgres://core@db/core", SslMode::Disable)
        );
    }

    #[test]
    fn the_variables_fill_in_what_the_url_leaves_out() {
        let env = |k: &str| match k {
            "PGSSLMODE" => Some("verify-ca".to_string()),
            "PGSSLROOTCERT" => Some("/from/env.pem".to_string()),
            _ => None,
        };
        let (_, tls) = split("postgres://core@db/core?sslrootcert=/from/url.pem", &env).unwrap();
        assert_eq!(tls.mode, SslMode::VerifyCa);
        assert_eq!(tls.root_cert.as_deref(), Some("/from/url.pem"));
    }

    #[test]
    fn unchecked_encryption_and_half_a_client_certificate_are_refused_with_the_way_out() {
        for mode in ["require", "prefer", "allow"] {
            let e = split(&format!("postgres://db/core?sslmode={mode}"), &no_env).unwrap_err();
            assert!(e.contains("verify-full"), "{e}");
        }
        let e = split("postgres://db/core?sslmode=verify", &no_env).unwrap_err();
        assert!(e.contains("not one of"), "{e}");
        let e = split(
            "postgres://db/core?sslmode=verify-full&sslcert=/c.pem",
            &no_env,
        )
        .unwrap_err();
        assert!(e.contains("without sslkey"), "{e}");
        let e = split("postgres://db/core?sslrootcert=/ca.pem", &no_env).unwrap_err();
        assert!(e.contains("TLS off"), "{e}");
    }

    #[test]
    fn certificate_variables_for_psql_do_not_stop_a_core_without_tls() {
        let env = |k: &str| (k == "PGSSLROOTCERT").then(|| "/etc/psql/root.crt".to_string());
        let (_, tls) = split("postgres://db/core", &env).unwrap();
        assert_eq!((tls.mode, tls.root_cert), (SslMode::Disable, None));
    }

    #[test]
    fn verify_ca_against_the_system_store_is_refused() {
        let e = split(
            "postgres://db/core?sslmode=verify-ca&sslrootcert=system",
            &no_env,
        )
        .unwrap_err();
        assert!(e.contains("verify-full"), "{e}");
        assert!(split(
            "postgres://db/core?sslmode=verify-full&sslrootcert=system",
            &no_env
        )
        .is_ok());
    }

    #[test]
    fn a_verifying_mode_without_a_ca_names_where_to_give_one() {
        let (_, tls) = split("postgres://db/core?sslmode=verify-full", &no_env).unwrap();
        let home = tempfile::tempdir().unwrap();
        let e = client_config(&tls, Some(home.path())).unwrap_err();
        assert!(e.contains("sslrootcert=PATH"), "{e}");
        let (_, tls) = split(
            "postgres://db/core?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
            &no_env,
        )
        .unwrap();
        let e = client_config(&tls, None).unwrap_err();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
    }
}
