//! `edgeprov`: the field technician's tool. Provisions a box over its serial
//! console, keeps the offline operator CA, and flashes disk images with
//! read-back verification. Human output by default, `--json` for scripts.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use mec_provisioning::ca::OperatorCa;
use mec_provisioning::client::{Client, ClientOptions};
use mec_provisioning::pb::{
    request, response, ApplySiteConfig, DefaultPackage, DeviceInfo, FactoryReset, GenerateIdentity,
    InstallCertificate, ResetChallengeRequest, StatusReply, StatusRequest,
};
use serde_json::{json, Value};

/// Provision MEC edge boxes over a serial console, keep the operator CA, and
/// flash disk images with verification.
#[derive(Debug, Parser)]
#[command(name = "edgeprov", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Print one JSON object instead of text.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Ask a box what it is and how far it is provisioned.
    Status(LineArgs),
    /// Provision a box: identity made on the box, node certificate issued by
    /// the operator CA and installed, site configuration applied.
    Provision(ProvisionArgs),
    /// Factory-reset a box, authorised by the operator CA's key (the box's
    /// identity, site configuration and usage log are retired, not deleted).
    Reset(ResetArgs),
    /// Write a disk image to a device, then read it back and compare SHA-256
    /// (against the image's manifest when it has one). Refuses a mounted
    /// device and the disk the system runs from.
    Flash(FlashArgs),
    /// Compare what a device holds with an image (and its manifest).
    Verify(FlashArgs),
    /// The offline operator CA.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Make a serial line of two pseudo-terminals (for trying provisioning
    /// without a cable): the box opens BOX, the technician TECH; runs until
    /// stopped.
    PtyLine {
        /// A symlink to make to the box's end.
        #[arg(long = "box", value_name = "BOX")]
        box_link: PathBuf,
        /// A symlink to make to the technician's end.
        #[arg(long = "tech", value_name = "TECH")]
        tech_link: PathBuf,
    },
}

#[derive(Debug, Args, Clone)]
struct LineArgs {
    /// The serial port the box's console is on (e.g. /dev/ttyUSB0).
    #[arg(long)]
    port: String,
    /// Line speed.
    #[arg(long, default_value_t = 115_200)]
    baud: u32,
    /// Wait this long for each answer.
    #[arg(long, default_value_t = 2000, value_name = "MS")]
    timeout_ms: u64,
    /// Attempts per request before giving up.
    #[arg(long, default_value_t = 5)]
    attempts: u32,
}

#[derive(Debug, Args)]
struct ProvisionArgs {
    #[command(flatten)]
    line: LineArgs,
    /// Site id.
    #[arg(long)]
    site: String,
    /// Node id the certificate will carry.
    #[arg(long)]
    node_id: String,
    /// core-ingest, host:port (UDP).
    #[arg(long)]
    core: String,
    /// The name on the core's certificate [default: the host of --core].
    #[arg(long)]
    core_server_name: Option<String>,
    /// Where the box's MEC API listens (ip:port) [default: the image's].
    #[arg(long)]
    api_listen: Option<String>,
    /// A package each new subscriber gets: KIND:TOKENS:DAYS (kind monthly,
    /// topup or trial); repeat for several.
    #[arg(long = "package", value_name = "KIND:TOKENS:DAYS")]
    packages: Vec<String>,
    /// The operator CA directory (ca.crt, ca.key).
    #[arg(long, value_name = "DIR")]
    ca_dir: PathBuf,
    /// The operator's image-signing public key (PEM, as `cargo xtask image`
    /// writes it): the box takes update bundles signed by it only. Without
    /// it the box refuses every update.
    #[arg(long, value_name = "PUB")]
    image_key: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct ResetArgs {
    #[command(flatten)]
    line: LineArgs,
    /// The operator CA directory whose key authorises the reset.
    #[arg(long, value_name = "DIR")]
    ca_dir: PathBuf,
}

#[derive(Debug, Args)]
struct FlashArgs {
    /// The disk image.
    #[arg(long, value_name = "FILE")]
    image: PathBuf,
    /// The target: a block device (e.g. /dev/sdb) or an image file.
    #[arg(long, value_name = "DEV")]
    device: PathBuf,
    /// The operator's image-signing public key (SPKI PEM): the image's
    /// manifest must be signed by it (IMAGE.manifest.json.sig), or nothing
    /// is written or trusted.
    #[arg(long, value_name = "PEM")]
    image_key: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Make a new operator CA in DIR (ca.crt, ca.key mode 0600).
    Init {
        /// Directory (created).
        #[arg(long)]
        dir: PathBuf,
        /// The CA's name.
        #[arg(long, default_value = "MEC operator CA")]
        name: String,
    },
    /// Issue a node certificate for a public key (SPKI PEM) made on a box.
    Issue {
        /// The CA directory.
        #[arg(long)]
        dir: PathBuf,
        /// Node id.
        #[arg(long)]
        node_id: String,
        /// The box's public key (PEM file).
        #[arg(long, value_name = "PEM")]
        public_key: PathBuf,
        /// Where to write the certificate.
        #[arg(long, value_name = "CERT")]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EDGEPROV_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let json = cli.json;
    match run(cli) {
        Ok(out) => {
            print(json, &out);
            ExitCode::SUCCESS
        }
        Err(e) => {
            if json {
                println!("{}", json!({ "ok": false, "error": format!("{e:#}") }));
            } else {
                eprintln!("edgeprov: {e:#}");
            }
            ExitCode::from(1)
        }
    }
}

/// Output: a JSON object, with `text` lines for humans.
struct Output {
    value: Value,
    text: Vec<String>,
}

fn print(json: bool, out: &Output) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&out.value).unwrap_or_default()
        );
    } else {
        for line in &out.text {
            println!("{line}");
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<Output> {
    match cli.command {
        Command::Ca(CaCommand::Init { dir, name }) => {
            let ca = OperatorCa::init(&dir, &name)?;
            Ok(Output {
                value: json!({"ok": true, "ca_cert": dir.join("ca.crt"), "ca_key": dir.join("ca.key")}),
                text: vec![
                    format!("operator CA {name:?} made in {}", ca.dir.display()),
                    format!("  certificate: {}", dir.join("ca.crt").display()),
                    format!(
                        "  key:         {} (mode 0600; keep it offline)",
                        dir.join("ca.key").display()
                    ),
                ],
            })
        }
        Command::Ca(CaCommand::Issue {
            dir,
            node_id,
            public_key,
            out,
        }) => {
            let ca = OperatorCa::load(&dir)?;
            let pem = std::fs::read_to_string(&public_key)
                .with_context(|| format!("reading {}", public_key.display()))?;
            let cert = ca.issue(&node_id, &pem)?;
            mec_provisioning::device::write_atomically(&out, cert.as_bytes())
                .with_context(|| format!("writing {}", out.display()))?;
            Ok(Output {
                value: json!({"ok": true, "node_id": node_id, "cert": out}),
                text: vec![format!(
                    "node certificate for {node_id} written to {}",
                    out.display()
                )],
            })
        }
        Command::PtyLine {
            box_link,
            tech_link,
        } => pty_line(&box_link, &tech_link),
        Command::Flash(a) => flash_or_verify(&a, true, cli.json),
        Command::Verify(a) => flash_or_verify(&a, false, cli.json),
        Command::Status(line) => block_on(status(line)),
        Command::Provision(args) => block_on(provision(args)),
        Command::Reset(args) => block_on(reset(args)),
    }
}

fn block_on<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

type SerialClient = Client<tokio_serial::SerialStream>;

async fn connect(line: &LineArgs) -> anyhow::Result<(SerialClient, DeviceInfo)> {
    let port = mec_provisioning::serial::open_port(&line.port, line.baud)?;
    let mut client = Client::new(
        port,
        ClientOptions {
            timeout: Duration::from_millis(line.timeout_ms),
            attempts: line.attempts.max(1),
            port_name: line.port.clone(),
        },
    );
    let hello = client.hello().await?;
    let device = hello.device.unwrap_or_default();
    Ok((client, device))
}

fn device_json(d: &DeviceInfo) -> Value {
    json!({
        "device_id": d.device_id,
        "firmware_version": d.firmware_version,
        "gpus": d.gpus.iter().map(|g| json!({"index": g.index, "name": g.name, "memory_bytes": g.memory_bytes})).collect::<Vec<_>>(),
        "gpu_note": d.gpu_note,
        "provisioned": d.provisioned,
        "node_id": d.node_id,
        "site_id": d.site_id,
    })
}

fn device_text(d: &DeviceInfo) -> Vec<String> {
    let gpus = if d.gpus.is_empty() {
        format!("none ({})", d.gpu_note)
    } else {
        d.gpus
            .iter()
            .map(|g| format!("#{} {} ({} MiB)", g.index, g.name, g.memory_bytes >> 20))
            .collect::<Vec<_>>()
            .join(", ")
    };
    vec![
        format!("box:         {}", d.device_id),
        format!("software:    {}", d.firmware_version),
        format!("GPUs:        {gpus}"),
        if d.provisioned {
            format!("provisioned: yes, node {} at site {}", d.node_id, d.site_id)
        } else {
            "provisioned: no".to_string()
        },
    ]
}

async fn read_status(client: &mut SerialClient) -> anyhow::Result<StatusReply> {
    match client.call(request::Kind::Status(StatusRequest {})).await? {
        response::Kind::Status(s) => Ok(s),
        other => anyhow::bail!("unexpected answer to Status: {other:?}"),
    }
}

fn status_output(s: &StatusReply, retries: u64) -> Output {
    let d = s.device.clone().unwrap_or_default();
    let mut text = device_text(&d);
    text.push(format!(
        "identity:    {}",
        if s.has_identity {
            format!("yes (key id {})", s.key_id)
        } else {
            "no".into()
        }
    ));
    text.push(format!(
        "certificate: {}",
        if s.has_certificate {
            format!("yes (valid until {})", s.certificate_not_after)
        } else {
            "no".into()
        }
    ));
    text.push(format!(
        "site config: {}",
        if s.has_site_config {
            format!("yes (core {})", s.core_address)
        } else {
            "no".into()
        }
    ));
    if s.slots.is_empty() {
        text.push(format!("slots:       none ({})", s.slots_note));
    } else {
        text.push(format!("running:     image {}", s.running_version));
        for slot in &s.slots {
            let mut marks = Vec::new();
            if slot.booted {
                marks.push("booted".to_string());
            }
            if slot.next_boot {
                marks.push("boots next".to_string());
            }
            if slot.state == "trying" {
                marks.push(format!("{} tries left", slot.tries_left));
            }
            text.push(format!(
                "slot {}:      {} {}{}",
                slot.slot.to_uppercase(),
                slot.state,
                if slot.version.is_empty() {
                    "-"
                } else {
                    &slot.version
                },
                if marks.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", marks.join(", "))
                }
            ));
        }
    }
    Output {
        value: json!({
            "ok": true,
            "device": device_json(&d),
            "running_version": s.running_version,
            "slots": s.slots.iter().map(|x| json!({
                "slot": x.slot,
                "state": x.state,
                "version": x.version,
                "booted": x.booted,
                "next_boot": x.next_boot,
                "tries_left": x.tries_left,
            })).collect::<Vec<_>>(),
            "slots_note": s.slots_note,
            "has_identity": s.has_identity,
            "has_certificate": s.has_certificate,
            "has_site_config": s.has_site_config,
            "key_id": s.key_id,
            "public_key_pem": s.public_key_pem,
            "certificate_not_after": s.certificate_not_after,
            "core_address": s.core_address,
            "retries": retries,
        }),
        text,
    }
}

async fn status(line: LineArgs) -> anyhow::Result<Output> {
    let (mut client, _) = connect(&line).await?;
    let s = read_status(&mut client).await?;
    Ok(status_output(&s, client.stats().0))
}

fn parse_package(spec: &str) -> anyhow::Result<DefaultPackage> {
    let parts: Vec<&str> = spec.split(':').collect();
    let [kind, tokens, days] = parts[..] else {
        anyhow::bail!("--package {spec:?}: expected KIND:TOKENS:DAYS, e.g. trial:5000:7");
    };
    Ok(DefaultPackage {
        kind: kind.to_string(),
        tokens: tokens
            .parse()
            .with_context(|| format!("--package {spec:?}: tokens"))?,
        valid_days: days
            .parse()
            .with_context(|| format!("--package {spec:?}: days"))?,
    })
}

async fn provision(args: ProvisionArgs) -> anyhow::Result<Output> {
    // Everything that can be checked here is checked before the box is touched.
    let ca = OperatorCa::load(&args.ca_dir)?;
    let packages = args
        .packages
        .iter()
        .map(|p| parse_package(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let site = ApplySiteConfig {
        site_id: args.site.clone(),
        node_id: args.node_id.clone(),
        core_address: args.core.clone(),
        core_server_name: args.core_server_name.clone().unwrap_or_default(),
        api_listen: args.api_listen.clone().unwrap_or_default(),
        default_packages: packages,
        image_signing_key: match &args.image_key {
            Some(p) => std::fs::read_to_string(p)
                .with_context(|| format!("reading the image key {}", p.display()))?,
            None => String::new(),
        },
    };
    mec_provisioning::site::SiteConfig::from_request(&site)
        .map_err(|e| anyhow::anyhow!("site configuration: {e}"))?;

    let (mut client, device) = connect(&args.line).await?;
    if device.provisioned {
        anyhow::bail!(
            "box {} is already provisioned as node {} at site {}; `edgeprov reset` (authorised by the operator CA) comes first",
            device.device_id,
            device.node_id,
            device.site_id
        );
    }
    let identity = match client
        .call(request::Kind::GenerateIdentity(GenerateIdentity {}))
        .await
        .context("making the box's identity")?
    {
        response::Kind::Identity(i) => i,
        other => anyhow::bail!("unexpected answer to GenerateIdentity: {other:?}"),
    };
    let cert = ca.issue(&args.node_id, &identity.public_key_pem)?;
    client
        .call(request::Kind::InstallCertificate(InstallCertificate {
            node_cert_pem: cert,
            operator_ca_pem: ca.pair.cert_pem.clone(),
        }))
        .await
        .context("installing the node certificate")?;
    client
        .call(request::Kind::ApplySiteConfig(site))
        .await
        .context("applying the site configuration")?;
    let s = read_status(&mut client).await?;
    let provisioned = s.device.as_ref().is_some_and(|d| d.provisioned);
    anyhow::ensure!(
        provisioned,
        "the box does not report itself provisioned after the steps: {s:?}"
    );
    let mut out = status_output(&s, client.stats().0);
    out.value["key_created"] = json!(identity.created);
    out.text.insert(
        0,
        format!(
            "provisioned {} as node {} at site {} (key id {}, made on the box)",
            device.device_id, args.node_id, args.site, identity.key_id
        ),
    );
    Ok(out)
}

async fn reset(args: ResetArgs) -> anyhow::Result<Output> {
    let ca = OperatorCa::load(&args.ca_dir)?;
    let (mut client, device) = connect(&args.line).await?;
    let challenge = match client
        .call(request::Kind::ResetChallenge(ResetChallengeRequest {}))
        .await?
    {
        response::Kind::ResetChallenge(c) => c,
        other => anyhow::bail!("unexpected answer to ResetChallenge: {other:?}"),
    };
    let signature = ca.sign_reset(&challenge.device_id, &challenge.nonce)?;
    let done = match client
        .call(request::Kind::FactoryReset(FactoryReset {
            nonce: challenge.nonce,
            signature,
        }))
        .await
        .context("factory reset")?
    {
        response::Kind::Done(d) => d.detail,
        other => anyhow::bail!("unexpected answer to FactoryReset: {other:?}"),
    };
    Ok(Output {
        value: json!({"ok": true, "device_id": device.device_id, "detail": done}),
        text: vec![format!("{}: {done}", device.device_id)],
    })
}

fn pty_line(box_link: &std::path::Path, tech_link: &std::path::Path) -> anyhow::Result<Output> {
    let line = mec_provisioning::pty::PtyLine::new().context("making pseudo-terminals")?;
    for (link, target) in [(box_link, &line.box_path), (tech_link, &line.tech_path)] {
        match std::fs::symlink_metadata(link) {
            Ok(m) if m.file_type().is_symlink() => std::fs::remove_file(link)?,
            Ok(_) => anyhow::bail!(
                "{} exists and is not a symlink; not replacing it",
                link.display()
            ),
            Err(_) => {}
        }
        std::os::unix::fs::symlink(target, link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    println!(
        "{}",
        json!({"event": "ready", "box": box_link, "tech": tech_link, "box_pty": line.box_path, "tech_pty": line.tech_path})
    );
    block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        anyhow::Ok(())
    })?;
    for link in [box_link, tech_link] {
        let _ = std::fs::remove_file(link);
    }
    Ok(Output {
        value: json!({"ok": true, "counts": format!("{:?}", line.counts())}),
        text: vec![],
    })
}

fn flash_or_verify(a: &FlashArgs, write: bool, json_out: bool) -> anyhow::Result<Output> {
    use std::io::IsTerminal;
    let bar = if json_out || !std::io::stderr().is_terminal() {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(0).with_style(
            indicatif::ProgressStyle::with_template(
                "{msg:>10} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        )
    };
    let mut progress = |phase: &str, done: u64, total: u64| {
        if bar.message() != phase {
            bar.set_message(phase.to_string());
            bar.set_length(total);
        }
        bar.set_position(done);
    };
    let key = match &a.image_key {
        Some(p) => Some(mec_image::manifest::read_verifying_key(p)?),
        None => None,
    };
    let report = if write {
        mec_provisioning::flash::flash(&a.image, key.as_ref(), &a.device, &mut progress)?
    } else {
        mec_provisioning::flash::verify(&a.image, key.as_ref(), &a.device, &mut progress)?
    };
    bar.finish_and_clear();
    let verdict = if report.ok {
        format!(
            "{} {} bytes of {} on {}: SHA-256 {} matches the {}",
            if write {
                "wrote and verified"
            } else {
                "verified"
            },
            report.bytes,
            a.image.display(),
            a.device.display(),
            report.device_sha256,
            report.expected_from
        )
    } else {
        format!(
            "MISMATCH: {} holds SHA-256 {} over the image's {} bytes, the {} says {}{}",
            a.device.display(),
            report.device_sha256,
            report.bytes,
            report.expected_from,
            report.expected_sha256,
            report
                .first_difference
                .map(|o| format!("; first difference at byte {o}"))
                .unwrap_or_default()
        )
    };
    anyhow::ensure!(report.ok, "{verdict}");
    Ok(Output {
        value: json!({"ok": true, "report": report}),
        text: vec![verdict],
    })
}
