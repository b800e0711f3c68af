//! The driver's UDP socket, read without waiting, many datagrams to a system
//! call (`recvmmsg`): each datagram comes with the time the kernel received it
//! (`SO_TIMESTAMPNS`), so the driver may read in batches every few
//! milliseconds and still give str0m every packet's true arrival time (TWCC
//! feedback reports them to the publisher's bandwidth estimator).

use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant, SystemTime};

use nix::sys::socket::{
    ControlMessageOwned, MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, setsockopt, sockopt,
};
use nix::sys::time::TimeSpec;

use crate::telemetry::{self, PacketDrop};

/// Oldest arrival time taken from a kernel timestamp; anything older (a
/// wall-clock step) counts as arrived now.
const MAX_AGE: Duration = Duration::from_secs(1);

/// Datagrams read by one system call at most.
pub(super) const BATCH: usize = 32;
/// Bytes of a datagram read at most (a longer one is dropped: WebRTC keeps
/// its datagrams under the path MTU).
const DATAGRAM: usize = 2048;

pub(super) struct Udp {
    socket: UdpSocket,
    timestamps: bool,
}

/// Room for a batch of datagrams, reused from read to read.
pub(super) struct RecvBatch {
    bufs: Box<[[u8; DATAGRAM]]>,
    /// The system call's message headers, with room for each datagram's
    /// source address and timestamp.
    headers: MultiHeaders<SockaddrStorage>,
    /// What the last read returned: each datagram's buffer and metadata.
    got: Vec<(usize, Received)>,
}

impl RecvBatch {
    /// The datagrams the last read returned, each with its bytes.
    pub fn datagrams(&self) -> impl Iterator<Item = (&[u8], &Received)> {
        self.got.iter().map(|(i, r)| (&self.bufs[*i][..r.len], r))
    }
}

/// A datagram's source, length and arrival time.
pub(super) struct Received {
    pub len: usize,
    pub source: SocketAddr,
    pub at: Instant,
}

/// The clocks read once per batch: a kernel timestamp (wall clock) becomes
/// an `Instant` by its age.
#[derive(Clone, Copy)]
pub(super) struct Clocks {
    pub now: Instant,
    pub wall: SystemTime,
}

impl Clocks {
    pub fn read() -> Self {
        Self {
            now: Instant::now(),
            wall: SystemTime::now(),
        }
    }

    /// The `Instant` of a kernel timestamp `since_epoch` (wall clock).
    pub fn arrival(&self, since_epoch: Duration) -> Instant {
        let wall = SystemTime::UNIX_EPOCH + since_epoch;
        match self.wall.duration_since(wall) {
            Ok(age) if age <= MAX_AGE => self.now.checked_sub(age).unwrap_or(self.now),
            _ => self.now,
        }
    }
}

impl Udp {
    /// Takes a non-blocking socket and asks for receive timestamps; without
    /// them (an error is logged) datagrams count as arrived when read.
    pub fn new(socket: UdpSocket) -> io::Result<Self> {
        socket.set_nonblocking(true)?;
        let timestamps = match setsockopt(&socket, sockopt::ReceiveTimestampns, &true) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "no receive timestamps on the UDP socket: arrival times are read times");
                false
            }
        };
        Ok(Self { socket, timestamps })
    }

    /// Room for reading batches from this socket.
    pub fn batch(&self) -> RecvBatch {
        RecvBatch {
            bufs: vec![[0; DATAGRAM]; BATCH].into_boxed_slice(),
            headers: self.headers(),
            got: Vec::with_capacity(BATCH),
        }
    }

    /// Message headers for a batch, with room for an address and a
    /// timestamp each.
    fn headers(&self) -> MultiHeaders<SockaddrStorage> {
        let cmsg = self.timestamps.then(|| nix::cmsg_space!(TimeSpec));
        MultiHeaders::preallocate(BATCH, cmsg)
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Reads the datagrams queued, up to [`BATCH`], into `batch`; returns
    /// how many (`WouldBlock` when none is). A datagram longer than
    /// [`DATAGRAM`] is dropped and counted; one without an IP source address
    /// (none arrive on an IP socket) is skipped.
    pub fn recv(&self, batch: &mut RecvBatch, clocks: &Clocks) -> io::Result<usize> {
        batch.got.clear();
        let mut bufs = batch.bufs.iter_mut();
        let mut iovs: [[IoSliceMut; 1]; BATCH] = std::array::from_fn(|_| {
            [IoSliceMut::new(
                bufs.next().expect("the batch has BATCH buffers"),
            )]
        });
        let msgs = recvmmsg(
            self.socket.as_raw_fd(),
            &mut batch.headers,
            iovs.iter_mut(),
            MsgFlags::MSG_DONTWAIT,
            None,
        )?;
        let (mut read, mut cut_control) = (0, false);
        for (i, msg) in msgs.enumerate() {
            read += 1;
            // The kernel shrinks a header's control length to what it wrote,
            // and the headers are reused: a datagram that came without a
            // timestamp would leave its slot without room for the next.
            cut_control |= msg.flags.contains(MsgFlags::MSG_CTRUNC);
            if msg.flags.contains(MsgFlags::MSG_TRUNC) {
                telemetry::packet_dropped(PacketDrop::Unparsable);
                continue;
            }
            let Some(source) = msg.address.as_ref().and_then(socket_addr) else {
                continue;
            };
            let mut at = clocks.now;
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    if let ControlMessageOwned::ScmTimestampns(ts) = c {
                        at = clocks.arrival(Duration::from(ts));
                    }
                }
            }
            let len = msg.bytes;
            batch.got.push((i, Received { len, source, at }));
        }
        if cut_control {
            batch.headers = self.headers();
        }
        Ok(read)
    }

    /// Sends without waiting; a full send buffer is an error (`WouldBlock`).
    pub fn send_to(&self, data: &[u8], dest: SocketAddr) -> io::Result<usize> {
        self.socket.send_to(data, dest)
    }

    /// A registration of the socket with the runtime, to wait until a
    /// datagram is queued. It holds a duplicate of the descriptor: dropping
    /// it takes the socket out of the runtime's poll set again, so that
    /// datagrams wake nobody while the driver reads on a timer.
    pub fn watch(&self) -> io::Result<tokio::net::UdpSocket> {
        tokio::net::UdpSocket::from_std(self.socket.try_clone()?)
    }
}

fn socket_addr(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    a.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_timestamps_become_instants_by_their_age() {
        let clocks = Clocks::read();
        let wall = clocks.wall.duration_since(SystemTime::UNIX_EPOCH).unwrap();
        let ms = Duration::from_millis;
        assert_eq!(clocks.arrival(wall - ms(3)), clocks.now - ms(3));
        assert_eq!(clocks.arrival(wall), clocks.now);
        // From the future (clock skew), or older than a second (a wall-clock
        // step): now.
        assert_eq!(clocks.arrival(wall + ms(5)), clocks.now);
        assert_eq!(clocks.arrival(wall - ms(1500)), clocks.now);
    }

    #[test]
    fn datagrams_arrive_in_batches_with_their_source_and_a_timestamp_from_before_the_read() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = rx.local_addr().unwrap();
        let rx = Udp::new(rx).unwrap();
        let mut batch = rx.batch();
        // The kernel turns arrival stamping on in deferred work after the
        // first socket asks for it (until then a datagram is stamped when it
        // is read); a server's socket asks once, at start.
        std::thread::sleep(Duration::from_millis(200));
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        assert_eq!(
            rx.recv(&mut batch, &Clocks::read()).err().map(|e| e.kind()),
            Some(io::ErrorKind::WouldBlock)
        );
        // More than a batch: the first read takes BATCH, the next the rest.
        let sent: Vec<Vec<u8>> = (0..BATCH + 3)
            .map(|i| format!("datagram {i}").into_bytes())
            .collect();
        for d in &sent {
            tx.send_to(d, to).unwrap();
        }
        std::thread::sleep(Duration::from_millis(30));
        let clocks = Clocks::read();
        assert_eq!(rx.recv(&mut batch, &clocks).unwrap(), BATCH);
        let first: Vec<(Vec<u8>, SocketAddr, Instant)> = batch
            .datagrams()
            .map(|(d, r)| (d.to_vec(), r.source, r.at))
            .collect();
        assert_eq!(rx.recv(&mut batch, &clocks).unwrap(), 3);
        let rest: Vec<Vec<u8>> = batch.datagrams().map(|(d, _)| d.to_vec()).collect();
        let got: Vec<Vec<u8>> = first.iter().map(|(d, ..)| d.clone()).chain(rest).collect();
        assert_eq!(got, sent);
        assert!(first.iter().all(|(_, s, _)| *s == tx.local_addr().unwrap()));
        // Stamped when they arrived, about 30 ms before this read, in order.
        let age = clocks.now - first[0].2;
        assert!(age >= Duration::from_millis(20), "{age:?}");
        assert!(first.windows(2).all(|w| w[1].2 >= w[0].2));
        assert_eq!(
            rx.recv(&mut batch, &clocks).err().map(|e| e.kind()),
            Some(io::ErrorKind::WouldBlock)
        );
    }

    #[test]
    fn a_datagram_longer_than_the_buffer_is_dropped_not_cut() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = rx.local_addr().unwrap();
        let rx = Udp::new(rx).unwrap();
        let mut batch = rx.batch();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.send_to(&[1; DATAGRAM + 500], to).unwrap();
        tx.send_to(b"small", to).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(rx.recv(&mut batch, &Clocks::read()).unwrap(), 2);
        let got: Vec<&[u8]> = batch.datagrams().map(|(d, _)| d).collect();
        assert_eq!(got, vec![&b"small"[..]]);
    }
}
