//! ICE over TCP (RFC 6544) as a fallback for networks that block UDP: one
//! listening port, a passive host candidate per address, and RFC 4571
//! framing (a 16-bit length before each STUN, DTLS, RTP or RTCP packet).
//! Each connection is a reader task that hands frames to the driver and a
//! writer task the driver hands frames to; the driver treats them like
//! datagrams with `Protocol::Tcp`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// Connections open at once; more are closed at accept.
const MAX_CONNECTIONS: usize = 2048;
/// A connection that brings no complete frame for this long is closed (a
/// client must start with a STUN check, then consent checks keep it busy).
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a client waits for a connection to a passive candidate.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Frames waiting for one connection's writer; beyond, new ones are dropped
/// as a congested UDP path would drop them.
const WRITE_QUEUE: usize = 512;

pub(super) enum TcpEvent {
    Opened {
        peer: SocketAddr,
        writer: mpsc::Sender<Vec<u8>>,
    },
    Frame {
        peer: SocketAddr,
        data: Vec<u8>,
    },
    Closed {
        peer: SocketAddr,
    },
}

/// RFC 4571 deframing, sans-IO: bytes in, whole frames out.
#[derive(Default)]
pub struct Deframer {
    buf: Vec<u8>,
}

impl Deframer {
    /// Adds received bytes; returns the frames they complete (empty frames
    /// are skipped).
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Vec<u8>> {
        self.buf.extend_from_slice(bytes);
        let mut frames = Vec::new();
        let mut at = 0;
        while self.buf.len() - at >= 2 {
            let len = u16::from_be_bytes([self.buf[at], self.buf[at + 1]]) as usize;
            if self.buf.len() - at - 2 < len {
                break;
            }
            if len > 0 {
                frames.push(self.buf[at + 2..at + 2 + len].to_vec());
            }
            at += 2 + len;
        }
        self.buf.drain(..at);
        frames
    }
}

/// One RFC 4571 frame: length, then data. `None` when too long to frame.
pub fn frame(data: &[u8]) -> Option<Vec<u8>> {
    let len = u16::try_from(data.len()).ok()?;
    let mut out = Vec::with_capacity(data.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(data);
    Some(out)
}

/// Accepts connections until the driver goes away.
pub(super) fn spawn_listener(listener: TcpListener, events: mpsc::Sender<TcpEvent>) {
    let open = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "ICE-TCP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if events.is_closed() {
                return;
            }
            if open.fetch_add(1, Ordering::Relaxed) >= MAX_CONNECTIONS {
                open.fetch_sub(1, Ordering::Relaxed);
                tracing::warn!(%peer, "too many ICE-TCP connections; closing this one");
                continue;
            }
            let (events, open) = (events.clone(), open.clone());
            tokio::spawn(async move {
                let (writer, queue) = mpsc::channel(WRITE_QUEUE);
                if events.send(TcpEvent::Opened { peer, writer }).await.is_ok() {
                    connection(stream, peer, events, queue).await;
                }
                open.fetch_sub(1, Ordering::Relaxed);
            });
        }
    });
}

/// Runs one connection: frames read go to `events`, frames queued on
/// `queue` are written, until either side ends.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    events: mpsc::Sender<TcpEvent>,
    mut queue: mpsc::Receiver<Vec<u8>>,
) {
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    let writing = tokio::spawn(async move {
        while let Some(data) = queue.recv().await {
            let Some(framed) = frame(&data) else { continue };
            if wr.write_all(&framed).await.is_err() {
                return;
            }
        }
    });
    let mut deframer = Deframer::default();
    let mut buf = vec![0u8; 4096];
    loop {
        let n = match tokio::time::timeout(READ_TIMEOUT, rd.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => n,
        };
        for data in deframer.push(&buf[..n]) {
            if events.send(TcpEvent::Frame { peer, data }).await.is_err() {
                writing.abort();
                return;
            }
        }
    }
    writing.abort();
    let _ = events.send(TcpEvent::Closed { peer }).await;
}

/// The client's side (`whipgate publish --ice-tcp`): a connection to each
/// remote passive candidate, opened on the first packet for it.
pub struct TcpLinks {
    writers: HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>,
    events_tx: mpsc::Sender<TcpEvent>,
    events: mpsc::Receiver<TcpEvent>,
}

impl Default for TcpLinks {
    fn default() -> Self {
        let (events_tx, events) = mpsc::channel(4096);
        Self {
            writers: HashMap::new(),
            events_tx,
            events,
        }
    }
}

impl TcpLinks {
    /// Sends one packet to `to`, connecting first if needed.
    pub async fn send(&mut self, to: SocketAddr, data: Vec<u8>) -> std::io::Result<()> {
        if !self.writers.contains_key(&to) {
            let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(to))
                .await
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
            let (writer, queue) = mpsc::channel(WRITE_QUEUE);
            tokio::spawn(connection(stream, to, self.events_tx.clone(), queue));
            self.writers.insert(to, writer);
        }
        if let Some(w) = self.writers.get(&to) {
            // A full queue drops the packet, as a congested path would.
            let _ = w.try_send(data);
        }
        Ok(())
    }

    /// The next packet received on any connection, with its sender.
    pub async fn recv(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        loop {
            match self.events.recv().await? {
                TcpEvent::Frame { peer, data } => return Some((peer, data)),
                TcpEvent::Closed { peer } => {
                    self.writers.remove(&peer);
                }
                TcpEvent::Opened { .. } => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_anywhere_come_out_whole() {
        let a = frame(b"hello").unwrap();
        let b = frame(&[7u8; 1200]).unwrap();
        let stream: Vec<u8> = [a.clone(), frame(b"").unwrap(), b.clone()].concat();
        for cut in 0..stream.len() {
            let mut d = Deframer::default();
            let mut got = d.push(&stream[..cut]);
            got.extend(d.push(&stream[cut..]));
            assert_eq!(got, vec![b"hello".to_vec(), vec![7u8; 1200]], "cut {cut}");
        }
        assert!(frame(&vec![0u8; 70_000]).is_none());
    }
}
