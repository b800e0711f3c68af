//! WebRTC sessions. The only module that knows str0m: the rest of the server
//! sees [`RtcHandle`] (create, close, ask for a keyframe) and frames arriving
//! on stream hubs.

pub mod crypto;
mod driver;
pub mod ingest;
pub mod offer;
pub mod tcp;
pub mod trickle;
mod udp;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::RngCore;
use tokio::sync::{mpsc, oneshot};

use crate::hub::{Hub, Publication};
use driver::{Command, Driver, TcpSide};
pub use offer::Accepted;

#[derive(Debug, thiserror::Error)]
pub enum RtcError {
    #[error("malformed SDP offer: {0}")]
    Sdp(String),
    #[error("cannot negotiate the offer: {0}")]
    Negotiation(String),
    #[error("the WebRTC driver is not running")]
    Gone,
    #[error("no such session")]
    UnknownSession,
}

/// Lines every `step` from a fixed start. Deadlines moved up to a line fall
/// together, so many sessions' timers take one wake-up instead of one each.
#[derive(Debug, Clone, Copy)]
pub struct TimerGrid {
    epoch: Instant,
    step: Duration,
}

impl TimerGrid {
    pub fn new(step: Duration) -> Self {
        Self {
            epoch: Instant::now(),
            step,
        }
    }

    /// `t` moved up to the next line; a deadline that is already due stays
    /// as it is.
    pub fn place(&self, t: Instant, now: Instant) -> Instant {
        if t <= now {
            return t;
        }
        let step = self.step.as_nanos();
        let lines = t
            .saturating_duration_since(self.epoch)
            .as_nanos()
            .div_ceil(step);
        self.epoch + Duration::from_nanos(u64::try_from(lines * step).unwrap_or(u64::MAX))
    }
}

/// What a new session answers.
#[derive(Debug, Clone)]
pub struct Created {
    pub answer: String,
    pub etag: String,
}

/// Where a session's media goes.
pub struct Hubs {
    /// The stream's hub: the video (a simulcast publication's first layer)
    /// and the audio.
    pub hub: Arc<Hub>,
    /// The simulcast layers the stream takes as renditions, by RID.
    pub layers: Vec<(String, Arc<Hub>)>,
}

/// A cheap, cloneable handle to the driver task.
#[derive(Clone)]
pub struct RtcHandle {
    tx: mpsc::Sender<Command>,
    local_addr: SocketAddr,
}

impl RtcHandle {
    /// Binds the UDP socket (and the ICE-TCP port, when asked) and starts
    /// the driver task.
    pub async fn start(
        listen: SocketAddr,
        tcp_listen: Option<SocketAddr>,
        candidate_ips: Vec<IpAddr>,
        idle_timeout: Duration,
    ) -> std::io::Result<Self> {
        str0m::config::CryptoProvider::clone(crypto::provider()).install_process_default();
        let socket = bind_udp(listen)?;
        let local_addr = socket.local_addr()?;
        let tcp = match tcp_listen {
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr).await?;
                let port = listener.local_addr()?.port();
                let (events_tx, events) = mpsc::channel(4096);
                tcp::spawn_listener(listener, events_tx);
                Some(TcpSide { port, events })
            }
            None => None,
        };
        let (tx, rx) = mpsc::channel(1024);
        let weak = tx.downgrade();
        // The driver has a thread and a single-threaded runtime of its own:
        // it wakes every few milliseconds under load, and on the shared
        // runtime each wake-up also woke a second worker to steal work that
        // was not there. Everything it hands off goes through channels.
        let (ready_tx, ready) = oneshot::channel();
        std::thread::Builder::new()
            .name("webrtc-driver".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let driver = Driver::new(socket, tcp, candidate_ips, idle_timeout, rx, weak);
                    match driver {
                        Ok(driver) => {
                            let _ = ready_tx.send(Ok(()));
                            driver.run().await;
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                });
            })?;
        ready
            .await
            .map_err(|_| std::io::Error::other("the WebRTC driver thread ended"))??;
        Ok(Self { tx, local_addr })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The driver task runs and takes commands.
    pub fn is_running(&self) -> bool {
        !self.tx.is_closed()
    }

    /// Negotiates a new publishing session. `on_close` runs once when the
    /// session ends for any reason.
    pub async fn create(
        &self,
        id: String,
        offer: String,
        accepted: Accepted,
        Hubs { hub, layers }: Hubs,
        publication: Publication,
        on_close: Box<dyn FnOnce() + Send>,
    ) -> Result<Created, RtcError> {
        self.ask(|reply| Command::Create {
            id,
            offer,
            accepted,
            hub,
            layers,
            publication,
            on_close,
            reply,
        })
        .await
    }

    /// Hands trickled remote candidates (canonical `candidate:` values from
    /// [`trickle::parse`]) to a session's ICE agent; returns how many it
    /// took. Nothing is added unless every candidate parses.
    pub async fn add_remote_candidates(
        &self,
        id: &str,
        candidates: Vec<String>,
        end_of_candidates: bool,
    ) -> Result<usize, RtcError> {
        self.ask(|reply| Command::Trickle {
            id: id.to_owned(),
            candidates,
            end_of_candidates,
            reply,
        })
        .await
    }

    /// Restarts ICE on a session with the client's new credentials and
    /// candidates; returns the server's `trickle-ice-sdpfrag`.
    pub async fn ice_restart(
        &self,
        id: &str,
        ufrag: String,
        pwd: String,
        candidates: Vec<String>,
    ) -> Result<String, RtcError> {
        self.ask(|reply| Command::IceRestart {
            id: id.to_owned(),
            ufrag,
            pwd,
            candidates,
            reply,
        })
        .await
    }

    /// Sends the driver a command and waits for its reply.
    async fn ask<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<T, RtcError>>) -> Command,
    ) -> Result<T, RtcError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(command(reply))
            .await
            .map_err(|_| RtcError::Gone)?;
        rx.await.map_err(|_| RtcError::Gone)?
    }

    pub async fn close(&self, id: &str) {
        let _ = self.tx.send(Command::Close { id: id.to_owned() }).await;
    }

    /// Closes every session and stops the driver.
    pub async fn shutdown(&self) {
        let (done, rx) = oneshot::channel();
        if self.tx.send(Command::Shutdown { done }).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// Socket buffers of the shared WebRTC socket: every session's media goes
/// through it, so the kernel's defaults (about 200 KiB) overflow in bursts
/// (keyframes of many publishers at once). The kernel caps them at
/// `net.core.rmem_max`/`wmem_max`; raise those for hundreds of publishers.
const UDP_BUFFER_BYTES: usize = 8 * 1024 * 1024;

fn bind_udp(listen: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(listen),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    for (what, r) in [
        ("receive", socket.set_recv_buffer_size(UDP_BUFFER_BYTES)),
        ("send", socket.set_send_buffer_size(UDP_BUFFER_BYTES)),
    ] {
        if let Err(e) = r {
            tracing::warn!(error = %e, "cannot enlarge the UDP {what} buffer");
        }
    }
    socket.set_nonblocking(true)?;
    socket.bind(&listen.into())?;
    let received = socket.recv_buffer_size().unwrap_or(0);
    tracing::debug!(bytes = received, "UDP receive buffer");
    Ok(socket.into())
}

/// A random identifier of `bytes` bytes from a CSPRNG (ChaCha seeded by the
/// OS), hex encoded.
pub fn random_id(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timers_move_up_to_the_grid_and_due_ones_stay() {
        let grid = TimerGrid::new(Duration::from_millis(20));
        let epoch = grid.epoch;
        let now = epoch + Duration::from_millis(1000);
        let ms = |n| epoch + Duration::from_millis(n);
        assert_eq!(grid.place(ms(1001), now), ms(1020));
        assert_eq!(grid.place(ms(1033), now), ms(1040));
        assert_eq!(grid.place(ms(1040), now), ms(1040), "on a line already");
        assert_eq!(grid.place(ms(995), now), ms(995), "due: not delayed");
        assert_eq!(grid.place(now, now), now);
        // Never more than one step late.
        for n in 1001..1200 {
            let t = grid.place(ms(n), now);
            assert!(t >= ms(n) && t - ms(n) < grid.step, "{n}");
        }
    }
}
