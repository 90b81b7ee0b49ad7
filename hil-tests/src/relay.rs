//! A UDP relay standing in for the backhaul between a box and the core: the
//! box sends to the relay, the relay forwards to the core and back. The test
//! cuts the link (every datagram dropped, both ways), makes it lossy (a share
//! of datagrams dropped, deterministically), or restores it.
//!
//! The relay keeps one socket facing the core, so the core sees one stable
//! client address while the link is up; the box's address is learnt from the
//! last datagram it sent (a box that rebinds is followed).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::UdpSocket;

/// What the link does to datagrams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkMode {
    /// Everything passes.
    Up,
    /// Nothing passes, either way.
    Cut,
    /// This percentage of datagrams is dropped, each way.
    Lossy(u8),
}

impl LinkMode {
    fn encode(self) -> u8 {
        match self {
            LinkMode::Up => 0,
            LinkMode::Cut => 255,
            LinkMode::Lossy(p) => p.clamp(1, 100),
        }
    }

    fn decode(v: u8) -> LinkMode {
        match v {
            0 => LinkMode::Up,
            255 => LinkMode::Cut,
            p => LinkMode::Lossy(p),
        }
    }
}

/// Datagram counts since the relay started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Datagrams forwarded (both ways).
    pub forwarded: u64,
    /// Datagrams dropped by a cut or loss (both ways).
    pub dropped: u64,
}

#[derive(Default)]
struct Counters {
    forwarded: AtomicU64,
    dropped: AtomicU64,
}

/// A running relay; dropping it stops forwarding.
pub struct UdpRelay {
    /// Where the box sends.
    pub addr: SocketAddr,
    mode: Arc<AtomicU8>,
    counters: Arc<Counters>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// A deterministic coin (xorshift), one per direction, so a run's losses
/// repeat.
struct Coin(u64);

impl Coin {
    fn drop(&mut self, mode: LinkMode) -> bool {
        match mode {
            LinkMode::Up => false,
            LinkMode::Cut => true,
            LinkMode::Lossy(p) => {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                (self.0 % 100) < u64::from(p)
            }
        }
    }
}

impl UdpRelay {
    /// Listens on `listen` (port 0: the kernel's choice) and forwards to
    /// `upstream`.
    pub async fn start(listen: SocketAddr, upstream: SocketAddr) -> std::io::Result<UdpRelay> {
        let front = Arc::new(UdpSocket::bind(listen).await?);
        let back_bind: SocketAddr = if upstream.is_ipv6() {
            "[::]:0".parse().unwrap()
        } else {
            "0.0.0.0:0".parse().unwrap()
        };
        let back = Arc::new(UdpSocket::bind(back_bind).await?);
        back.connect(upstream).await?;
        let addr = front.local_addr()?;
        let mode = Arc::new(AtomicU8::new(LinkMode::Up.encode()));
        let counters = Arc::new(Counters::default());
        let boxed_addr: Arc<Mutex<Option<SocketAddr>>> = Arc::default();

        let to_core = {
            let (front, back, mode, counters, boxed_addr) = (
                front.clone(),
                back.clone(),
                mode.clone(),
                counters.clone(),
                boxed_addr.clone(),
            );
            tokio::spawn(async move {
                let (mut buf, mut coin) = (vec![0u8; 65536], Coin(0x9e37_79b9));
                while let Ok((n, from)) = front.recv_from(&mut buf).await {
                    *boxed_addr.lock().unwrap() = Some(from);
                    if coin.drop(LinkMode::decode(mode.load(Ordering::Relaxed))) {
                        counters.dropped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    // A send error (the core not listening: ICMP refused)
                    // is what a real link does too: the datagram is gone.
                    if back.send(&buf[..n]).await.is_ok() {
                        counters.forwarded.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        };
        let to_box = {
            let (mode, counters) = (mode.clone(), counters.clone());
            tokio::spawn(async move {
                let (mut buf, mut coin) = (vec![0u8; 65536], Coin(0x51f1_5eed));
                loop {
                    let n = match back.recv(&mut buf).await {
                        Ok(n) => n,
                        // ECONNREFUSED from a core that is down: keep going.
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
                        Err(_) => break,
                    };
                    let Some(to) = *boxed_addr.lock().unwrap() else {
                        continue;
                    };
                    if coin.drop(LinkMode::decode(mode.load(Ordering::Relaxed))) {
                        counters.dropped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    if front.send_to(&buf[..n], to).await.is_ok() {
                        counters.forwarded.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        };
        Ok(UdpRelay {
            addr,
            mode,
            counters,
            tasks: vec![to_core, to_box],
        })
    }

    /// From now on the link does `mode`.
    pub fn set(&self, mode: LinkMode) {
        self.mode.store(mode.encode(), Ordering::Relaxed);
    }

    /// What the link does now.
    pub fn mode(&self) -> LinkMode {
        LinkMode::decode(self.mode.load(Ordering::Relaxed))
    }

    /// Counts so far.
    pub fn stats(&self) -> RelayStats {
        RelayStats {
            forwarded: self.counters.forwarded.load(Ordering::Relaxed),
            dropped: self.counters.dropped.load(Ordering::Relaxed),
        }
    }
}

impl Drop for UdpRelay {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn echo_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = s.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = s.recv_from(&mut buf).await {
                let _ = s.send_to(&buf[..n], from).await;
            }
        });
        (addr, task)
    }

    /// Sends `count` datagrams through the relay; how many echoes come back.
    async fn echoes(relay: &UdpRelay, count: usize) -> usize {
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(relay.addr).await.unwrap();
        for i in 0..count {
            client.send(&(i as u32).to_le_bytes()).await.unwrap();
            if i % 8 == 7 {
                // Paced, so no socket buffer overflows: every loss is the relay's.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        let mut got = 0;
        let mut buf = [0u8; 16];
        while let Ok(Ok(_)) =
            tokio::time::timeout(Duration::from_millis(300), client.recv(&mut buf)).await
        {
            got += 1;
        }
        got
    }

    #[tokio::test]
    async fn up_passes_cut_drops_everything_lossy_drops_a_share() {
        let (server, _task) = echo_server().await;
        let relay = UdpRelay::start("127.0.0.1:0".parse().unwrap(), server)
            .await
            .unwrap();
        assert_eq!(echoes(&relay, 50).await, 50);
        relay.set(LinkMode::Cut);
        assert_eq!(echoes(&relay, 50).await, 0);
        relay.set(LinkMode::Lossy(30));
        // Two independent 30% coins: about half the round trips survive.
        let got = echoes(&relay, 400).await;
        assert!((120..=280).contains(&got), "{got} of 400 came back");
        relay.set(LinkMode::Up);
        assert_eq!(echoes(&relay, 20).await, 20);
        let s = relay.stats();
        // Every echo lost was dropped once, on one of the two ways.
        assert_eq!(s.dropped, 50 + 400 - got as u64, "{s:?}");
        assert!(s.forwarded >= 2 * (50 + got as u64 + 20), "{s:?}");
    }
}
