//! The async shells on a serial line (tokio-serial on a real port, any
//! `AsyncRead + AsyncWrite` in tests): the box's listener loop, and opening
//! a port.

use std::time::Instant;

use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::device::Device;
use crate::frame::{encode_frame, FrameDecoder, FrameEvent, FrameStats};

/// Opens a serial port (a pseudo-terminal works too) in raw mode, 8N1.
pub fn open_port(path: &str, baud: u32) -> std::io::Result<tokio_serial::SerialStream> {
    use tokio_serial::SerialPortBuilderExt;
    tokio_serial::new(path, baud)
        .data_bits(tokio_serial::DataBits::Eight)
        .parity(tokio_serial::Parity::None)
        .stop_bits(tokio_serial::StopBits::One)
        .flow_control(tokio_serial::FlowControl::None)
        .open_native_async()
        .map_err(|e| std::io::Error::other(format!("opening {path}: {e}")))
}

/// Opens a serial port for blocking I/O (tools and tests that only write).
pub fn open_port_blocking(path: &str) -> std::io::Result<Box<dyn tokio_serial::SerialPort>> {
    tokio_serial::new(path, 115_200)
        .open()
        .map_err(|e| std::io::Error::other(format!("opening {path}: {e}")))
}

/// Answers requests arriving on `port` until the line ends (an error or
/// end of file, returned) or `shutdown` resolves. Bad frames are counted
/// and skipped; the technician's side resends.
pub async fn serve_device<S>(
    mut port: S,
    device: &mut Device,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<FrameStats>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut dec = FrameDecoder::new();
    let mut buf = vec![0u8; 4096];
    tokio::pin!(shutdown);
    loop {
        let n = tokio::select! {
            r = port.read(&mut buf) => r?,
            _ = &mut shutdown => return Ok(dec.stats()),
        };
        if n == 0 {
            return Ok(dec.stats());
        }
        dec.push(&buf[..n]);
        while let Some(event) = dec.next_event() {
            match event {
                FrameEvent::Frame(payload) => {
                    let answer = device.handle_payload(&payload, Instant::now());
                    let frame =
                        encode_frame(&answer.encode_to_vec()).map_err(std::io::Error::other)?;
                    port.write_all(&frame).await?;
                    port.flush().await?;
                }
                other => tracing::debug!(?other, "line noise skipped"),
            }
        }
    }
}
