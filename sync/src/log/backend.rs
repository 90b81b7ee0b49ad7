//! The narrow storage interface the log writer needs, and its two
//! implementations: io_uring (tokio-uring) and plain `pwrite` + `fdatasync`.
//!
//! Only the hot path goes through the backend: opening the active segment,
//! one positional write per group commit, and `fdatasync`. Rare operations
//! (directory sync, rename, unlink) use `std::fs` directly.
//!
//! Both run on the log's own writer thread: tokio-uring's runtime is
//! single-threaded, and the plain backend blocks that thread, never a tokio
//! worker. The trait's futures are therefore not `Send`.

use std::io;
use std::path::Path;

/// Which backend the log writes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendChoice {
    /// Probe io_uring at open; use it when the kernel allows, else the plain backend.
    #[default]
    Auto,
    /// io_uring through tokio-uring; opening fails where io_uring is refused.
    Uring,
    /// `pwrite` + `fdatasync`.
    File,
}

impl std::str::FromStr for BackendChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(BackendChoice::Auto),
            "uring" | "io_uring" => Ok(BackendChoice::Uring),
            "file" => Ok(BackendChoice::File),
            other => Err(format!(
                "unknown log backend {other:?}: expected auto, uring or file"
            )),
        }
    }
}

/// The backend actually running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// io_uring through tokio-uring.
    Uring,
    /// `pwrite` + `fdatasync`.
    File,
    /// A backend the caller supplied ([`super::UsageLog::open_with_backend`]).
    Custom,
}

impl BackendKind {
    /// Short name for logs and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Uring => "uring",
            BackendKind::File => "file",
            BackendKind::Custom => "custom",
        }
    }
}

/// The writer's view of storage. Implementations own their files.
#[allow(async_fn_in_trait)]
pub trait SegmentBackend {
    /// An open segment.
    type File;
    /// Opens an existing segment for writing.
    async fn open(&mut self, path: &Path) -> io::Result<Self::File>;
    /// Creates a new segment; fails if it exists.
    async fn create(&mut self, path: &Path) -> io::Result<Self::File>;
    /// Writes all of `buf` at `offset`.
    async fn write_all_at(
        &mut self,
        file: &Self::File,
        buf: Vec<u8>,
        offset: u64,
    ) -> (io::Result<()>, Vec<u8>);
    /// `fdatasync`.
    async fn sync_data(&mut self, file: &Self::File) -> io::Result<()>;
    /// `ftruncate` (used to drop bytes whose sync failed).
    async fn set_len(&mut self, file: &Self::File, len: u64) -> io::Result<()>;
}

/// `pwrite` + `fdatasync` through `std::fs`.
#[derive(Debug, Default)]
pub struct FileBackend;

impl SegmentBackend for FileBackend {
    type File = std::fs::File;

    async fn open(&mut self, path: &Path) -> io::Result<std::fs::File> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
    }

    async fn create(&mut self, path: &Path) -> io::Result<std::fs::File> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
    }

    async fn write_all_at(
        &mut self,
        file: &std::fs::File,
        buf: Vec<u8>,
        offset: u64,
    ) -> (io::Result<()>, Vec<u8>) {
        use std::os::unix::fs::FileExt;
        (file.write_all_at(&buf, offset), buf)
    }

    async fn sync_data(&mut self, file: &std::fs::File) -> io::Result<()> {
        file.sync_data()
    }

    async fn set_len(&mut self, file: &std::fs::File, len: u64) -> io::Result<()> {
        file.set_len(len)
    }
}

/// io_uring through tokio-uring. Must be used inside `tokio_uring::start` (or
/// a `tokio_uring::Runtime`).
#[cfg(target_os = "linux")]
#[derive(Debug, Default)]
pub struct UringBackend;

#[cfg(target_os = "linux")]
impl SegmentBackend for UringBackend {
    type File = tokio_uring::fs::File;

    async fn open(&mut self, path: &Path) -> io::Result<tokio_uring::fs::File> {
        tokio_uring::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .await
    }

    async fn create(&mut self, path: &Path) -> io::Result<tokio_uring::fs::File> {
        tokio_uring::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .await
    }

    async fn write_all_at(
        &mut self,
        file: &tokio_uring::fs::File,
        buf: Vec<u8>,
        offset: u64,
    ) -> (io::Result<()>, Vec<u8>) {
        file.write_all_at(buf, offset).await
    }

    async fn sync_data(&mut self, file: &tokio_uring::fs::File) -> io::Result<()> {
        file.sync_data().await
    }

    async fn set_len(&mut self, file: &tokio_uring::fs::File, len: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        // tokio-uring has no ftruncate; it is rare (error recovery only).
        let rc = unsafe { libc::ftruncate(file.as_raw_fd(), len as libc::off_t) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}
