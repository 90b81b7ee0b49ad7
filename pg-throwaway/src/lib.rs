//! A throw-away PostgreSQL server for tests and benchmarks (the core's
//! PostgreSQL store, `mec_sync::ingest_store::PgStore`): `initdb` in a
//! temporary directory, `postgres` listening on a Unix socket there only (no
//! TCP port, no password: `trust` for the socket), stopped when dropped and
//! killed with the process that started it (so a test binary that ends
//! never leaves one behind). [`PgServer::start_tls`] also listens on a
//! loopback TCP port with TLS on, for the tests of TLS to the database.
//!
//! PostgreSQL refuses to run as root: as root, the server runs as the
//! `postgres` user (the Debian package makes it), which owns the directory.
//! The binaries are found in `$MEC_PG_BIN`, the newest
//! `/usr/lib/postgresql/*/bin` (Debian's `postgresql` package; `cargo
//! xtask test` installs it when missing), or on `PATH`.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running throw-away server. Its `postgres` process belongs to a thread
/// of its own (the keeper), which starts, restarts and stops it: the
/// process is started with "die with the thread that started me"
/// (`PR_SET_PDEATHSIG`), and the keeper lives as long as this handle.
pub struct PgServer {
    dir: PathBuf,
    bin: PathBuf,
    /// The port: of the socket's name, and of the TCP listener if any.
    port: u16,
    keeper: Option<std::thread::JoinHandle<()>>,
    orders: std::sync::Mutex<std::sync::mpsc::Sender<Order>>,
}

/// What the keeper is told.
enum Order {
    /// Kill it as a crash would and start it again; reply when started.
    RestartImmediate(std::sync::mpsc::Sender<Result<(), String>>),
    /// Kill it and end.
    Stop,
}

/// The keeper: owns the `postgres` process.
fn keep(
    bin: PathBuf,
    dir: PathBuf,
    owner: Option<(u32, u32)>,
    started: std::sync::mpsc::Sender<Result<(), String>>,
    orders: std::sync::mpsc::Receiver<Order>,
) {
    let kill = |child: &mut Child| {
        // SIGQUIT is PostgreSQL's immediate shutdown.
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGQUIT) };
        let _ = child.wait();
    };
    let mut child = match PgServer::spawn(&bin, &dir, owner) {
        Ok(c) => c,
        Err(e) => {
            let _ = started.send(Err(e));
            return;
        }
    };
    let _ = started.send(Ok(()));
    loop {
        match orders.recv() {
            Ok(Order::RestartImmediate(reply)) => {
                kill(&mut child);
                match PgServer::spawn(&bin, &dir, owner) {
                    Ok(c) => {
                        child = c;
                        let _ = reply.send(Ok(()));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        return;
                    }
                }
            }
            Ok(Order::Stop) | Err(_) => {
                kill(&mut child);
                return;
            }
        }
    }
}

/// The superuser `initdb` makes.
pub const SUPERUSER: &str = "mec";

/// Where `initdb` and `postgres` are.
pub fn bin_dir() -> Result<PathBuf, String> {
    if let Some(d) = std::env::var_os("MEC_PG_BIN") {
        return Ok(PathBuf::from(d));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .find(|d| d.join("initdb").exists() && d.join("postgres").exists())
        .ok_or_else(|| {
            "PostgreSQL's initdb and postgres are not installed (apt-get install postgresql; \
             `cargo xtask test` does), or set MEC_PG_BIN"
                .to_string()
        })
}

/// The uid and gid of `user`.
fn user_ids(user: &str) -> Option<(u32, u32)> {
    let name = std::ffi::CString::new(user).ok()?;
    // SAFETY: getpwnam returns a pointer to static storage or null; it is
    // read at once, on this thread.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        return None;
    }
    // SAFETY: non-null, as checked.
    Some(unsafe { ((*pw).pw_uid, (*pw).pw_gid) })
}

/// A certificate and its key, PEM, for the server's TLS.
pub struct ServerTls {
    /// The server's certificate (and its chain), PEM.
    pub cert_pem: String,
    /// Its private key, PEM.
    pub key_pem: String,
}

impl PgServer {
    /// Makes a cluster in a new temporary directory and starts it, on its
    /// Unix socket only.
    pub fn start() -> Result<PgServer, String> {
        PgServer::start_with(None)
    }

    /// [`PgServer::start`], also listening on 127.0.0.1 at [`PgServer::port`]
    /// with TLS on (`ssl = on`, `tls`'s certificate); connections there are
    /// trusted like the socket's, with or without TLS.
    pub fn start_tls(tls: &ServerTls) -> Result<PgServer, String> {
        PgServer::start_with(Some(tls))
    }

    fn start_with(tls: Option<&ServerTls>) -> Result<PgServer, String> {
        let bin = bin_dir()?;
        // SAFETY: geteuid has no preconditions.
        let owner = if unsafe { libc::geteuid() } == 0 {
            Some(user_ids("postgres").ok_or(
                "running as root, PostgreSQL needs the `postgres` user to run as \
                 (apt-get install postgresql makes it)",
            )?)
        } else {
            None
        };
        let dir = tempfile::Builder::new()
            .prefix("mec-pg-")
            .tempdir()
            .map_err(|e| format!("a directory for PostgreSQL: {e}"))?
            .keep();
        let as_owner = |cmd: &mut Command| {
            if let Some((uid, gid)) = owner {
                cmd.uid(uid).gid(gid);
            }
        };
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
                .map_err(|e| format!("chown {}: {e}", dir.display()))?;
        }
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(dir.join("data"))
            .args(["-U", SUPERUSER, "--auth=trust", "--no-sync", "-E", "UTF8"])
            .args(["--locale=C"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        as_owner(&mut initdb);
        let out = initdb
            .output()
            .map_err(|e| format!("{}: {e}", bin.join("initdb").display()))?;
        if !out.status.success() {
            return Err(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let data = dir.join("data");
        let mut conf = String::from("\n# mec-pg-throwaway\nfsync = off\n");
        let port = match tls {
            None => {
                conf.push_str("listen_addresses = ''\n");
                5432
            }
            Some(tls) => {
                let port = std::net::TcpListener::bind("127.0.0.1:0")
                    .and_then(|l| l.local_addr())
                    .map_err(|e| format!("a free loopback port: {e}"))?
                    .port();
                for (name, pem) in [("server.crt", &tls.cert_pem), ("server.key", &tls.key_pem)] {
                    std::fs::write(data.join(name), pem).map_err(|e| format!("{name}: {e}"))?;
                    // PostgreSQL refuses a key others can read.
                    std::fs::set_permissions(
                        data.join(name),
                        std::fs::Permissions::from_mode(0o600),
                    )
                    .map_err(|e| format!("{name}: {e}"))?;
                    if let Some((uid, gid)) = owner {
                        std::os::unix::fs::chown(data.join(name), Some(uid), Some(gid))
                            .map_err(|e| format!("chown {name}: {e}"))?;
                    }
                }
                conf.push_str(&format!(
                    "listen_addresses = '127.0.0.1'\nport = {port}\nssl = on\n"
                ));
                port
            }
        };
        std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .and_then(|mut f| std::io::Write::write_all(&mut f, conf.as_bytes()))
            .map_err(|e| format!("postgresql.conf: {e}"))?;
        std::fs::File::create(dir.join("postgres.log"))
            .map_err(|e| format!("the server log: {e}"))?;
        if let Some((uid, gid)) = owner {
            let _ = std::os::unix::fs::chown(dir.join("postgres.log"), Some(uid), Some(gid));
        }
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (orders, orders_rx) = std::sync::mpsc::channel();
        let keeper = {
            let (bin, dir) = (bin.clone(), dir.clone());
            std::thread::Builder::new()
                .name("pg-keeper".into())
                .spawn(move || keep(bin, dir, owner, started_tx, orders_rx))
                .map_err(|e| e.to_string())?
        };
        started_rx
            .recv()
            .map_err(|_| "the keeper thread ended".to_string())??;
        let server = PgServer {
            dir,
            bin,
            port,
            keeper: Some(keeper),
            orders: std::sync::Mutex::new(orders),
        };
        server.wait_ready()?;
        Ok(server)
    }

    fn wait_ready(&self) -> Result<(), String> {
        let started = Instant::now();
        loop {
            let ready = Command::new(self.bin.join("pg_isready"))
                .arg("-h")
                .arg(&self.dir)
                .args(["-p", &self.port.to_string()])
                .args(["-U", SUPERUSER, "-q"])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(60) {
                return Err(format!(
                    "postgres did not accept connections within 60 s: {}",
                    std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The directory of its Unix socket.
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    /// The port: of the socket's name, and of the loopback TCP listener
    /// of [`PgServer::start_tls`].
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A store URL for database `db` as the superuser, over TCP to `host`
    /// (`localhost`, `127.0.0.1`) at [`PgServer::port`]; `params` follow
    /// the `?` (`sslmode=verify-full&sslrootcert=...`), empty for none.
    pub fn tcp_url(&self, host: &str, db: &str, params: &str) -> String {
        let query = if params.is_empty() {
            String::new()
        } else {
            format!("?{params}")
        };
        format!("postgresql://{SUPERUSER}@{host}:{}/{db}{query}", self.port)
    }

    /// A store URL for database `db` as the superuser.
    pub fn url(&self, db: &str) -> String {
        let host: String = self
            .dir
            .to_string_lossy()
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    (b as char).to_string()
                }
                b => format!("%{b:02X}"),
            })
            .collect();
        match self.port {
            5432 => format!("postgresql://{SUPERUSER}@{host}/{db}"),
            port => format!("postgresql://{SUPERUSER}@{host}:{port}/{db}"),
        }
    }

    /// Creates database `db` (a fresh one for each test) and returns its URL.
    pub fn create_database(&self, db: &str) -> Result<String, String> {
        self.sql("postgres", &format!("CREATE DATABASE \"{db}\""))?;
        Ok(self.url(db))
    }

    /// Runs `sql` in database `db` as the superuser (psql, so it works
    /// outside any async runtime).
    pub fn sql(&self, db: &str, sql: &str) -> Result<String, String> {
        let psql = Some(self.bin.join("psql"))
            .filter(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("psql"));
        let out = Command::new(psql)
            .arg("-h")
            .arg(&self.dir)
            .args(["-p", &self.port.to_string()])
            .args([
                "-U",
                SUPERUSER,
                "-d",
                db,
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ])
            .output()
            .map_err(|e| format!("psql: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "psql: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Restarts the server at once, as a crash would (`pg_ctl restart -m
    /// immediate`): connections break, nothing uncommitted survives.
    pub fn restart_immediate(&self) -> Result<(), String> {
        let (reply, answer) = std::sync::mpsc::channel();
        self.orders
            .lock()
            .map_err(|e| e.to_string())?
            .send(Order::RestartImmediate(reply))
            .map_err(|_| "the keeper thread ended".to_string())?;
        answer
            .recv()
            .map_err(|_| "the keeper thread ended".to_string())??;
        self.wait_ready()
    }

    /// Starts `postgres` on the cluster in `dir`, its output appended to
    /// the log there, its socket in `dir` (where it listens is in its
    /// `postgresql.conf`, written by `start_with`).
    fn spawn(bin: &Path, dir: &Path, owner: Option<(u32, u32)>) -> Result<Child, String> {
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.join("postgres.log"))
            .map_err(|e| e.to_string())?;
        let mut postgres = Command::new(bin.join("postgres"));
        postgres
            .arg("-D")
            .arg(dir.join("data"))
            .arg("-k")
            .arg(dir)
            .args(["-c", "max_connections=200", "-c", "shared_buffers=64MB"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log);
        if let Some((uid, gid)) = owner {
            postgres.uid(uid).gid(gid);
        }
        // SAFETY: prctl is async-signal-safe; it runs in the child before
        // exec (after the uid change, which would clear it).
        unsafe {
            postgres.pre_exec(|| {
                // Dies with the thread that started it (see `shared`): no
                // server outlives its test binary.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT);
                Ok(())
            });
        }
        postgres
            .spawn()
            .map_err(|e| format!("{}: {e}", bin.join("postgres").display()))
    }
}

/// One server for the whole process (a test binary's tests each make their
/// own database on it), never dropped: it ends with the process. Directories
/// left by servers of earlier processes are removed first.
pub fn shared() -> Result<&'static PgServer, String> {
    static SERVER: std::sync::OnceLock<Result<PgServer, String>> = std::sync::OnceLock::new();
    SERVER
        .get_or_init(|| {
            remove_stale_dirs();
            PgServer::start()
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// A database of its own on the shared server, named after `name` and this
/// process, and its URL.
pub fn fresh_database(name: &str) -> Result<String, String> {
    let db = format!("{name}_{}", std::process::id());
    shared()?.create_database(&db)
}

/// Removes `mec-pg-*` directories whose server is no longer running.
fn remove_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        if !name.to_string_lossy().starts_with("mec-pg-") {
            continue;
        }
        let pid: Option<i32> = std::fs::read_to_string(e.path().join("data/postmaster.pid"))
            .ok()
            .and_then(|t| t.lines().next()?.trim().parse().ok());
        // SAFETY: signal 0 only checks that the process exists.
        let alive = pid.is_some_and(|p| unsafe { libc::kill(p, 0) } == 0);
        // Without a pid file it may be another process's server still in
        // initdb or starting: only an old one is left over.
        let young = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_none_or(|age| age < Duration::from_secs(3600));
        if !alive && (pid.is_some() || !young) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Ok(orders) = self.orders.lock() {
            let _ = orders.send(Order::Stop);
        }
        if let Some(k) = self.keeper.take() {
            let _ = k.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
