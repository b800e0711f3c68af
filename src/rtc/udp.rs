//! The driver's UDP socket, read without waiting: each datagram comes with
//! the time the kernel received it (`SO_TIMESTAMPNS`), so the driver may read
//! in batches every few milliseconds and still give str0m every packet's true
//! arrival time (TWCC feedback reports them to the publisher's bandwidth
//! estimator).

use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant, SystemTime};

use nix::sys::socket::{
    ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg, setsockopt, sockopt,
};
use nix::sys::time::TimeSpec;

/// Oldest arrival time taken from a kernel timestamp; anything older (a
/// wall-clock step) counts as arrived now.
const MAX_AGE: Duration = Duration::from_secs(1);

pub(super) struct Udp {
    socket: UdpSocket,
    /// Space for the timestamp control message.
    cmsg: Vec<u8>,
    timestamps: bool,
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
        Ok(Self {
            socket,
            cmsg: nix::cmsg_space!(TimeSpec),
            timestamps,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// The next datagram, if one is queued (`WouldBlock` when none is).
    pub fn recv(&mut self, buf: &mut [u8], clocks: &Clocks) -> io::Result<Received> {
        let mut iov = [IoSliceMut::new(buf)];
        let cmsg = self.timestamps.then_some(self.cmsg.as_mut_slice());
        let msg = recvmsg::<SockaddrStorage>(
            self.socket.as_raw_fd(),
            &mut iov,
            cmsg,
            MsgFlags::MSG_DONTWAIT,
        )?;
        let source = msg
            .address
            .as_ref()
            .and_then(socket_addr)
            .ok_or_else(|| io::Error::other("datagram without an IP source address"))?;
        let mut at = clocks.now;
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmTimestampns(ts) = c {
                    at = clocks.arrival(Duration::from(ts));
                }
            }
        }
        Ok(Received {
            len: msg.bytes,
            source,
            at,
        })
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
    fn datagrams_arrive_with_their_source_and_a_timestamp_from_before_the_read() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = rx.local_addr().unwrap();
        let mut rx = Udp::new(rx).unwrap();
        // The kernel turns arrival stamping on in deferred work after the
        // first socket asks for it (until then a datagram is stamped when it
        // is read); a server's socket asks once, at start.
        std::thread::sleep(Duration::from_millis(200));
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut buf = [0u8; 1500];
        assert_eq!(
            rx.recv(&mut buf, &Clocks::read()).err().map(|e| e.kind()),
            Some(io::ErrorKind::WouldBlock)
        );
        tx.send_to(b"first", to).unwrap();
        tx.send_to(b"second", to).unwrap();
        std::thread::sleep(Duration::from_millis(30));
        let clocks = Clocks::read();
        let a = rx.recv(&mut buf, &clocks).unwrap();
        assert_eq!(&buf[..a.len], b"first");
        assert_eq!(a.source, tx.local_addr().unwrap());
        let b = rx.recv(&mut buf, &clocks).unwrap();
        assert_eq!(&buf[..b.len], b"second");
        // Stamped when they arrived, about 30 ms before this read.
        let age = clocks.now - a.at;
        assert!(age >= Duration::from_millis(20), "{age:?}");
        assert!(b.at >= a.at);
    }
}
