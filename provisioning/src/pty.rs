//! A serial line made of two pseudo-terminals, for machines without a
//! serial cable (development, tests, the README walkthrough): the box opens
//! one pty's path, the technician the other's, and a relay copies bytes
//! between the two masters, optionally spoiling them as a bad cable would.
//! `edgeprov pty-line` runs one until it is stopped.

use std::ffi::CStr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;

/// One pseudo-terminal: the master end (kept by the relay) and the path of
/// its slave end (opened by a serial program).
pub struct Pty {
    master: OwnedFd,
    /// Kept open so that the master never reads a hang-up before (or
    /// between) the serial program's opens.
    _slave: OwnedFd,
    /// The slave's path, e.g. /dev/pts/7.
    pub path: PathBuf,
}

/// Opens a pseudo-terminal in raw mode (no echo, no line editing).
pub fn open_pty() -> std::io::Result<Pty> {
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two fds; null name, termios and winsize are allowed.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both fds were just opened by openpty and are owned here.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    // SAFETY: a zeroed termios is a valid buffer for tcgetattr to fill.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: slave is a valid tty fd; t is a valid termios.
    unsafe {
        if libc::tcgetattr(slave.as_raw_fd(), &mut t) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        libc::cfmakeraw(&mut t);
        if libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &t) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: name is a writable buffer of the given length.
    let rc = unsafe { libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    // SAFETY: ptsname_r wrote a NUL-terminated string.
    let path = unsafe { CStr::from_ptr(name.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    Ok(Pty {
        master,
        _slave: slave,
        path: PathBuf::from(path),
    })
}

/// How the relay spoils bytes in one direction, by read count (so a test
/// knows what happens): the reads whose 1-based number is a multiple of
/// `drop_every` are dropped, of `flip_every` get one byte flipped, and
/// before those of `garbage_every` a burst of noise goes out.
#[derive(Debug, Clone, Copy, Default)]
pub struct Spoil {
    /// Drop every n-th read (0: never).
    pub drop_every: u64,
    /// Flip a byte in every n-th read (0: never).
    pub flip_every: u64,
    /// Noise before every n-th read (0: never).
    pub garbage_every: u64,
}

/// What a relay direction did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpoilCounts {
    /// Reads relayed.
    pub reads: u64,
    /// Reads dropped.
    pub dropped: u64,
    /// Reads with a flipped byte.
    pub flipped: u64,
    /// Noise bursts sent.
    pub garbage: u64,
}

/// Two ptys joined by a relay: the box opens `box_path`, the technician
/// `tech_path`. The relay threads end when both sides' slaves are closed
/// (the masters then read end-of-file or EIO) or the line is dropped.
pub struct PtyLine {
    /// The box's end.
    pub box_path: PathBuf,
    /// The technician's end.
    pub tech_path: PathBuf,
    counts: std::sync::Arc<std::sync::Mutex<[SpoilCounts; 2]>>,
    _ptys: [Pty; 2],
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl PtyLine {
    /// A clean line.
    pub fn new() -> std::io::Result<PtyLine> {
        PtyLine::spoiled(Spoil::default(), Spoil::default())
    }

    /// A line that spoils bytes going to the box (`to_box`) and coming back
    /// (`to_tech`).
    pub fn spoiled(to_box: Spoil, to_tech: Spoil) -> std::io::Result<PtyLine> {
        let (tech, boxe) = (open_pty()?, open_pty()?);
        let counts = std::sync::Arc::new(std::sync::Mutex::new([SpoilCounts::default(); 2]));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        for (i, (from, to, spoil)) in [
            (&tech.master, &boxe.master, to_box),
            (&boxe.master, &tech.master, to_tech),
        ]
        .into_iter()
        .enumerate()
        {
            let from = from.try_clone()?;
            let to = to.try_clone()?;
            let (counts, stop) = (counts.clone(), stop.clone());
            std::thread::Builder::new()
                .name(format!("pty-relay-{i}"))
                .spawn(move || relay(from, to, spoil, i, &counts, &stop))?;
        }
        Ok(PtyLine {
            box_path: boxe.path.clone(),
            tech_path: tech.path.clone(),
            counts,
            _ptys: [tech, boxe],
            stop,
        })
    }

    /// What each direction did: `[to the box, to the technician]`.
    pub fn counts(&self) -> [SpoilCounts; 2] {
        *self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for PtyLine {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

fn relay(
    from: OwnedFd,
    to: OwnedFd,
    spoil: Spoil,
    direction: usize,
    counts: &std::sync::Mutex<[SpoilCounts; 2]>,
    stop: &std::sync::atomic::AtomicBool,
) {
    let mut from = std::fs::File::from(from);
    let mut to = std::fs::File::from(to);
    let mut buf = [0u8; 4096];
    let mut n_read = 0u64;
    let every = |k: u64, n: u64| k != 0 && n.is_multiple_of(k);
    loop {
        // Poll with a timeout so a dropped line ends the thread.
        let mut pfd = libc::pollfd {
            fd: from.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: pfd is one valid pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, 100) };
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        if ready <= 0 {
            continue;
        }
        let n = match std::io::Read::read(&mut from, &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        n_read += 1;
        let mut c = counts.lock().unwrap_or_else(|p| p.into_inner());
        let c = &mut c[direction];
        c.reads += 1;
        if every(spoil.garbage_every, n_read) {
            c.garbage += 1;
            // Noise with a 0x00 inside and without.
            let _ = std::io::Write::write_all(&mut to, &[0x13, 0x37, 0x00, 0xde, 0xad, 0xbe, 0xef]);
        }
        if every(spoil.drop_every, n_read) {
            c.dropped += 1;
            continue;
        }
        if every(spoil.flip_every, n_read) {
            c.flipped += 1;
            buf[n / 2] ^= 0x10;
        }
        if std::io::Write::write_all(&mut to, &buf[..n]).is_err() {
            return;
        }
    }
}
