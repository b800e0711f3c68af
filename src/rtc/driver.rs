//! The WebRTC driver: one task owns the UDP socket and every session's str0m
//! `Rtc`. Datagrams are routed to the session that accepts them (a cache of
//! remote addresses makes that O(1) once media flows); timeouts are driven
//! from the earliest deadline of all sessions. Nothing outside `rtc/` sees
//! str0m.
//!
//! While datagrams flow, the driver reads the socket every [`RECV_TICK`]
//! instead of waking for each one: a hundred wake-ups a second instead of
//! 2,000 to 3,000 at a hundred streams, each a context switch and a
//! cross-CPU wake-up; a read takes up to 32 datagrams per system call.
//! Every datagram keeps the time the kernel received it, so str0m (and the
//! TWCC feedback it sends) sees true arrival times. After [`IDLE_TICKS`]
//! empty reads it waits for the socket again.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use str0m::change::SdpOffer;
use str0m::format::{Codec, FormatParams};
use str0m::media::{KeyframeRequestKind, MediaData, MediaKind, Mid, Rid};
use str0m::net::{Protocol, Receive, TcpType};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc, RtcConfig};
use tokio::sync::{mpsc, oneshot};

use super::ingest::Ingest;
use super::offer::{self, Accepted};
use super::tcp::TcpEvent;
use super::udp::{self, Clocks, RecvBatch, Udp};
use super::{Created, RtcError, TimerGrid};
use crate::hub::{Hub, IngressStats, KeyframeRequester, Publication};
use crate::media::frame::{Codec as FrameCodec, TrackKind};
use crate::telemetry::{self, PacketDrop};

/// The maps looked up for every datagram: foldhash (randomly seeded, so
/// still no help to an attacker choosing source addresses) instead of
/// SipHash, which was 1% of the server's time at a hundred streams.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
/// A session's key in the driver's maps.
type Key = u64;

/// A session that has not completed ICE and DTLS by then is closed: the
/// client cannot reach us, or is not trying.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often str0m reports a session's receive statistics.
const STATS_INTERVAL: Duration = Duration::from_secs(2);

/// Longest the driver sleeps without looking at a session.
const MAX_SLEEP: Duration = Duration::from_millis(500);
/// How late a session's timer may fire. Every datagram a session receives
/// also runs its str0m timers (NACK reports every 33 ms, TWCC feedback every
/// 50 ms, the reorder buffer's deadlines), so a deadline moved up to the next
/// line of this grid is mostly met by the session's next packet, without a
/// timeout of its own; the timers that do still fire are those of many
/// sessions at once, served by one wake-up. At most this much later: a NACK
/// report or TWCC feedback, never a packet's arrival time.
const TIMER_GRID: Duration = Duration::from_millis(20);

/// How often the driver reads the socket while datagrams flow: at most this
/// much later than it arrived does a packet reach its session (its arrival
/// time is the kernel's, so bandwidth estimates do not move). A wake-up costs
/// the same whatever it reads: 10 ms instead of 5 took 9% off a 25-stream
/// `copy-all` server in paired runs. A NACK or a STUN response leaves up to
/// 10 ms later, nothing an HLS or RTMP viewer can see.
const RECV_TICK: Duration = Duration::from_millis(10);
/// Reads that found nothing (100 ms) before the driver waits for the socket
/// again.
const IDLE_TICKS: u32 = 10;
/// Datagrams read per turn at most, before commands and timers get theirs.
const RECV_BATCH: usize = 4096;

pub(super) enum Command {
    Create {
        id: String,
        offer: String,
        accepted: Accepted,
        hub: Arc<Hub>,
        /// Simulcast layers the stream takes as renditions, by RID.
        layers: Vec<(String, Arc<Hub>)>,
        publication: Publication,
        on_close: Box<dyn FnOnce() + Send>,
        reply: oneshot::Sender<Result<Created, RtcError>>,
    },
    /// Remote candidates trickled in by a `PATCH`.
    Trickle {
        id: String,
        candidates: Vec<String>,
        end_of_candidates: bool,
        reply: oneshot::Sender<Result<usize, RtcError>>,
    },
    /// An ICE restart (`PATCH` with `If-Match: "*"`): the client's new
    /// credentials and candidates; the reply is the server's sdpfrag.
    IceRestart {
        id: String,
        ufrag: String,
        pwd: String,
        candidates: Vec<String>,
        reply: oneshot::Sender<Result<String, RtcError>>,
    },
    Close {
        id: String,
    },
    Keyframe {
        id: String,
        /// The simulcast layer, or the main video.
        rid: Option<String>,
    },
    Shutdown {
        done: oneshot::Sender<()>,
    },
}

/// A simulcast layer the stream takes as a rendition.
struct Layer {
    rid: String,
    hub: Arc<Hub>,
    /// Its own depacketizer, on the publication's clock, made at its first
    /// frame (unless it is the source layer, which the main one reads).
    ingest: Option<Ingest>,
    /// Its hub was started: it had video.
    started: bool,
}

struct Session {
    id: String,
    rtc: Rtc,
    /// The offer last negotiated (as given to str0m), the base of an ICE
    /// restart's offer.
    offer: String,
    hub: Arc<Hub>,
    publication: Publication,
    video_mid: Option<Mid>,
    audio_mid: Option<Mid>,
    /// NACKs are enabled on the video stream.
    nack_on: bool,
    /// NACKs counted into the metrics so far.
    nacks_seen: u64,
    /// ICE and DTLS completed.
    connected: bool,
    created: Instant,
    ingest: Ingest,
    /// Simulcast: the RID whose video goes to `hub` (the offer's first),
    /// and the layers the stream takes as renditions of their own.
    source_rid: Option<String>,
    layers: Vec<Layer>,
    video_codec: FrameCodec,
    last_input: Instant,
    /// When str0m wants its next timeout input.
    next_timeout: Instant,
    on_close: Option<Box<dyn FnOnce() + Send>>,
    commands: mpsc::WeakSender<Command>,
    span: tracing::Span,
}

impl Session {
    fn close(&mut self, reason: &str) {
        let _g = self.span.enter();
        tracing::info!(reason, "session closed");
        self.rtc.disconnect();
        self.hub.stop(self.publication.id);
        for layer in self.layers.iter().filter(|l| l.started) {
            layer.hub.stop(self.publication.id);
        }
        if let Some(f) = self.on_close.take() {
            f();
        }
    }
}

/// The ICE-TCP side: the listening port and the connections' frames.
pub(super) struct TcpSide {
    pub port: u16,
    pub events: mpsc::Receiver<TcpEvent>,
}

pub(super) struct Driver {
    socket: Udp,
    local_ips: Vec<IpAddr>,
    port: u16,
    tcp: Option<TcpSide>,
    /// Each open ICE-TCP connection's writer, by the client's address.
    tcp_writers: HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>,
    /// Sessions by a number of the driver's own (a datagram's lookups
    /// hash and copy that, not the id string).
    sessions: FastMap<Key, Session>,
    /// Session id (the WHIP resource's) → its key.
    keys: FastMap<String, Key>,
    next_key: Key,
    /// Remote transport address → session key, learnt from accepted
    /// datagrams.
    routes: FastMap<(Protocol, SocketAddr), Key>,
    cert: Option<str0m::config::DtlsCert>,
    idle_timeout: Duration,
    /// The earliest session deadline: until then only the sessions that
    /// datagrams reach are run.
    next_due: Instant,
    /// Session timers move up to its lines.
    grid: TimerGrid,
    commands: mpsc::Receiver<Command>,
    commands_tx: mpsc::WeakSender<Command>,
}

impl Driver {
    pub(super) fn new(
        socket: std::net::UdpSocket,
        tcp: Option<TcpSide>,
        local_ips: Vec<IpAddr>,
        idle_timeout: Duration,
        commands: mpsc::Receiver<Command>,
        commands_tx: mpsc::WeakSender<Command>,
    ) -> std::io::Result<Self> {
        let socket = Udp::new(socket)?;
        let port = socket.local_addr()?.port();
        let cert = super::crypto::provider()
            .dtls_provider
            .generate_certificate();
        Ok(Self {
            socket,
            local_ips,
            port,
            tcp,
            tcp_writers: HashMap::new(),
            sessions: FastMap::default(),
            keys: FastMap::default(),
            next_key: 0,
            routes: FastMap::default(),
            cert,
            idle_timeout,
            next_due: Instant::now(),
            grid: TimerGrid::new(TIMER_GRID),
            commands,
            commands_tx,
        })
    }

    pub(super) async fn run(mut self) {
        let mut batch = self.socket.batch();
        let mut out: Vec<Outgoing> = Vec::new();
        // One timer for the sessions' deadlines, moved as the earliest one
        // moves (a new one per datagram was a timer-wheel insert and
        // removal each time).
        let sleep = tokio::time::sleep_until(tokio::time::Instant::now());
        tokio::pin!(sleep);
        let mut tick = tokio::time::interval(RECV_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Waiting for the socket (`Some`: registered for readiness), or
        // reading it every tick (`None`: not registered, so arriving
        // datagrams wake nobody).
        let mut waiting = self.watch_socket();
        let mut empty_reads = 0;
        loop {
            tokio::select! {
                cmd = self.commands.recv() => {
                    match cmd {
                        Some(Command::Shutdown { done }) => {
                            for (_, mut s) in self.sessions.drain() {
                                s.close("server shutting down");
                            }
                            let _ = done.send(());
                            return;
                        }
                        Some(cmd) => {
                            self.command(cmd);
                            // A command may have made a session's work due.
                            self.wake();
                            self.run_sessions(Instant::now(), None, &mut out);
                        }
                        None => return,
                    }
                }
                r = readable(&waiting), if waiting.is_some() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "udp readiness error");
                    }
                    // Datagrams flow: read every tick from now on.
                    waiting = None;
                    empty_reads = 0;
                    tick.reset();
                    self.read_socket(&mut batch, &mut out);
                }
                _ = tick.tick(), if waiting.is_none() => {
                    if self.read_socket(&mut batch, &mut out) > 0 {
                        empty_reads = 0;
                    } else {
                        empty_reads += 1;
                        if empty_reads >= IDLE_TICKS {
                            empty_reads = 0;
                            waiting = self.watch_socket();
                        }
                    }
                    self.run_sessions(Instant::now(), None, &mut out);
                }
                Some(ev) = tcp_event(&mut self.tcp) => {
                    let touched = self.tcp_event(ev);
                    self.run_sessions(Instant::now(), touched, &mut out);
                }
                // While ticking, the tick runs the sessions that are due.
                _ = &mut sleep, if waiting.is_some() => {
                    self.run_sessions(Instant::now(), None, &mut out);
                }
            }
            self.send(&mut out);
            let deadline = tokio::time::Instant::from_std(self.next_due.max(Instant::now()));
            if sleep.deadline() != deadline {
                sleep.as_mut().reset(deadline);
            }
        }
    }

    /// Registers the socket for readiness; `None` (read every tick) when
    /// that fails.
    fn watch_socket(&self) -> Option<tokio::net::UdpSocket> {
        self.socket
            .watch()
            .inspect_err(|e| tracing::warn!(error = %e, "cannot wait for the UDP socket; reading it every tick"))
            .ok()
    }

    /// Reads what the socket holds (up to [`RECV_BATCH`] datagrams), each
    /// to its session. Returns how many it read.
    fn read_socket(&mut self, batch: &mut RecvBatch, out: &mut Vec<Outgoing>) -> usize {
        let clocks = Clocks::read();
        let (mut packets, mut bytes) = (0, 0);
        while packets < RECV_BATCH {
            match self.socket.recv(batch, &clocks) {
                Ok(read) => {
                    for (data, r) in batch.datagrams() {
                        let touched = self.datagram(data, r.source, Protocol::Udp, r.at);
                        self.run_sessions(r.at, touched, out);
                        bytes += data.len() as u64;
                    }
                    packets += read;
                    // A short batch found the socket empty: no further
                    // call just to learn so.
                    if read < udp::BATCH {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::debug!(error = %e, "udp receive error");
                    break;
                }
            }
        }
        if packets > 0 {
            let c = telemetry::counters();
            c.packets_in.increment(packets as u64);
            c.bytes_in.increment(bytes);
        }
        packets
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Create {
                id,
                offer,
                accepted,
                hub,
                layers,
                publication,
                on_close,
                reply,
            } => {
                let span = tracing::info_span!("session", stream = %hub.name(), session = %id);
                let result = span.in_scope(|| self.create(&offer, &accepted));
                let video_codec = accepted.video_codec.unwrap_or(FrameCodec::H264);
                let result = result.map(|(rtc, offer, answer)| {
                    let source_rid = offer::simulcast_rids(&offer).into_iter().next();
                    // Strong ETag, unique per ICE session.
                    let created = Created {
                        answer,
                        etag: format!("\"{}\"", super::random_id(12)),
                    };
                    let key = self.next_key;
                    self.next_key += 1;
                    self.keys.insert(id.clone(), key);
                    self.sessions.insert(
                        key,
                        Session {
                            id: id.clone(),
                            rtc,
                            offer,
                            hub,
                            publication,
                            video_mid: None,
                            audio_mid: None,
                            nack_on: false,
                            nacks_seen: 0,
                            connected: false,
                            created: Instant::now(),
                            ingest: Ingest::new(2, video_codec),
                            source_rid,
                            video_codec,
                            layers: layers
                                .into_iter()
                                .map(|(rid, hub)| Layer {
                                    rid,
                                    hub,
                                    ingest: None,
                                    started: false,
                                })
                                .collect(),
                            last_input: Instant::now(),
                            next_timeout: Instant::now(),
                            on_close: Some(on_close),
                            commands: self.commands_tx.clone(),
                            span,
                        },
                    );
                    telemetry::counters().sessions_created.increment(1);
                    created
                });
                let _ = reply.send(result);
            }
            Command::Trickle {
                id,
                candidates,
                end_of_candidates,
                reply,
            } => {
                let result = match self.session(&id) {
                    Some(s) => {
                        s.next_timeout = Instant::now();
                        add_remote_candidates(s, &candidates, end_of_candidates)
                    }
                    None => Err(RtcError::UnknownSession),
                };
                let _ = reply.send(result);
            }
            Command::IceRestart {
                id,
                ufrag,
                pwd,
                candidates,
                reply,
            } => {
                let result = match self.session(&id) {
                    Some(s) => {
                        s.next_timeout = Instant::now();
                        ice_restart(s, &ufrag, &pwd, &candidates)
                    }
                    None => Err(RtcError::UnknownSession),
                };
                let _ = reply.send(result);
            }
            Command::Close { id } => {
                if let Some(&key) = self.keys.get(&id)
                    && let Some(mut s) = self.remove(key)
                {
                    s.close("closed by client (DELETE)");
                }
            }
            Command::Keyframe { id, rid } => {
                if let Some(s) = self.session(&id) {
                    request_keyframe(s, rid.as_deref());
                    // Poll it now so the PLI leaves at once.
                    s.next_timeout = Instant::now();
                }
            }
            Command::Shutdown { .. } => {}
        }
    }

    /// The session with the WHIP resource id `id`.
    fn session(&mut self, id: &str) -> Option<&mut Session> {
        self.sessions.get_mut(self.keys.get(id)?)
    }

    /// Forgets the session `key`: its maps' entries.
    fn remove(&mut self, key: Key) -> Option<Session> {
        let s = self.sessions.remove(&key)?;
        self.keys.remove(&s.id);
        self.routes.retain(|_, v| *v != key);
        Some(s)
    }

    fn create(&self, offer: &str, accepted: &Accepted) -> Result<(Rtc, String, String), RtcError> {
        let mut candidates = Vec::new();
        for ip in &self.local_ips {
            let udp = SocketAddr::new(*ip, self.port);
            match Candidate::host(udp, "udp") {
                Ok(c) => candidates.push(c),
                Err(e) => tracing::debug!(%udp, error = %e, "skipping local candidate"),
            }
            if let Some(tcp) = &self.tcp {
                let addr = SocketAddr::new(*ip, tcp.port);
                match Candidate::builder()
                    .tcp()
                    .host(addr)
                    .tcptype(TcpType::Passive)
                    .build()
                {
                    Ok(c) => candidates.push(c),
                    Err(e) => tracing::debug!(%addr, error = %e, "skipping local candidate"),
                }
            }
        }
        negotiate(
            offer,
            accepted,
            self.cert.as_ref(),
            candidates,
            Instant::now(),
        )
    }

    /// An event of an ICE-TCP connection; a frame goes where a datagram
    /// would.
    fn tcp_event(&mut self, ev: TcpEvent) -> Option<Key> {
        match ev {
            TcpEvent::Opened { peer, writer } => {
                tracing::debug!(%peer, "ICE-TCP connection");
                self.tcp_writers.insert(peer, writer);
                None
            }
            TcpEvent::Closed { peer } => {
                self.tcp_writers.remove(&peer);
                self.routes.remove(&(Protocol::Tcp, peer));
                None
            }
            TcpEvent::Frame { peer, data } => {
                let c = telemetry::counters();
                c.packets_in.increment(1);
                c.bytes_in.increment(data.len() as u64);
                self.datagram(&data, peer, Protocol::Tcp, Instant::now())
            }
        }
    }

    /// The local address a datagram from `source` arrived on, as ICE knows
    /// it. The socket may be bound to a wildcard address, so this picks the
    /// candidate address of the same family, loopback for loopback peers.
    fn destination(&self, source: SocketAddr, proto: Protocol) -> SocketAddr {
        let ip = source.ip();
        let pick = self
            .local_ips
            .iter()
            .filter(|l| l.is_ipv4() == ip.is_ipv4())
            .find(|l| l.is_loopback() == ip.is_loopback())
            .or_else(|| self.local_ips.first())
            .copied()
            .unwrap_or(ip);
        let port = match (proto, &self.tcp) {
            (Protocol::Tcp, Some(tcp)) => tcp.port,
            _ => self.port,
        };
        SocketAddr::new(pick, port)
    }

    /// Hands a datagram (or ICE-TCP frame) to the session that accepts it;
    /// returns that session's key.
    fn datagram(
        &mut self,
        data: &[u8],
        source: SocketAddr,
        proto: Protocol,
        now: Instant,
    ) -> Option<Key> {
        let Ok(contents) = data.try_into() else {
            telemetry::packet_dropped(PacketDrop::Unparsable);
            return None; // not STUN, DTLS, RTP or RTCP
        };
        let input = Input::Receive(
            now,
            Receive {
                proto,
                source,
                destination: self.destination(source, proto),
                contents,
            },
        );
        let route = (proto, source);
        let known = self.routes.get(&route).copied();
        let key = match known {
            Some(key)
                if self
                    .sessions
                    .get(&key)
                    .is_some_and(|s| s.rtc.accepts(&input)) =>
            {
                key
            }
            _ => {
                let Some((&key, _)) = self.sessions.iter().find(|(_, s)| s.rtc.accepts(&input))
                else {
                    telemetry::packet_dropped(PacketDrop::NoSession);
                    return None;
                };
                self.routes.insert(route, key);
                key
            }
        };
        let s = self.sessions.get_mut(&key)?;
        s.last_input = now;
        if let Err(e) = s.rtc.handle_input(input) {
            telemetry::packet_dropped(PacketDrop::Rejected);
            let _g = s.span.enter();
            tracing::debug!(error = %e, "bad input");
        }
        Some(key)
    }

    /// Runs the sessions that have work: the one a datagram just reached
    /// (str0m wants its output drained after each input) and, once the
    /// earliest deadline has come, those whose timer is due. A datagram
    /// costs one session's work, not a pass over all of them. What they
    /// send is queued in `out`.
    fn run_sessions(&mut self, now: Instant, touched: Option<Key>, out: &mut Vec<Outgoing>) {
        let mut dead = Vec::new();
        let timing = (self.idle_timeout, self.grid);
        if now < self.next_due {
            if let Some(key) = touched
                && let Some(s) = self.sessions.get_mut(&key)
            {
                if step(s, now, false, timing, out) {
                    self.next_due = self.next_due.min(s.next_timeout);
                } else {
                    dead.push(key);
                }
            }
        } else {
            let mut next = now + MAX_SLEEP;
            for (&key, s) in self.sessions.iter_mut() {
                let due = s.next_timeout <= now;
                let run = due || touched == Some(key);
                if run && !step(s, now, due, timing, out) {
                    dead.push(key);
                    continue;
                }
                next = next.min(s.next_timeout);
            }
            self.next_due = next;
        }
        for key in dead {
            self.remove(key);
        }
    }

    /// Sends what the sessions queued.
    fn send(&mut self, out: &mut Vec<Outgoing>) {
        for (data, dest, proto) in out.drain(..) {
            if proto == Protocol::Tcp {
                match self.tcp_writers.get(&dest) {
                    Some(w) => {
                        if w.try_send(data).is_err() {
                            tracing::debug!(%dest, "ICE-TCP connection congested: frame dropped");
                        }
                    }
                    None => tracing::debug!(%dest, "no ICE-TCP connection to send on"),
                }
            } else if let Err(e) = self.socket.send_to(&data, dest) {
                tracing::debug!(%dest, error = %e, "udp send failed");
            }
        }
    }

    /// A command made a session's work due now.
    fn wake(&mut self) {
        self.next_due = Instant::now();
    }
}

/// One session's turn: its idle and handshake deadlines, then its state
/// machine. False when the session ended.
fn step(
    s: &mut Session,
    now: Instant,
    due: bool,
    (idle_timeout, grid): (Duration, TimerGrid),
    out: &mut Vec<Outgoing>,
) -> bool {
    if now.duration_since(s.last_input) > idle_timeout {
        s.close("client went silent (no consent checks or media)");
        return false;
    }
    if !s.connected && now.duration_since(s.created) > HANDSHAKE_TIMEOUT {
        s.close("ICE/DTLS did not complete in time");
        return false;
    }
    match poll_session(s, now, due, out) {
        // Wake up at least every MAX_SLEEP for the idle check.
        Ok(Some(t)) => {
            s.next_timeout = grid.place(t.min(now + MAX_SLEEP), now);
            true
        }
        Ok(None) => false,
        Err(reason) => {
            s.close(&reason);
            false
        }
    }
}

/// A packet for the network: data, destination, transport.
type Outgoing = (Vec<u8>, SocketAddr, Protocol);

/// Readiness of the socket; never, when not registered.
async fn readable(socket: &Option<tokio::net::UdpSocket>) -> std::io::Result<()> {
    match socket {
        Some(s) => s.readable().await,
        None => std::future::pending().await,
    }
}

/// The next ICE-TCP event; never, without ICE-TCP.
async fn tcp_event(tcp: &mut Option<TcpSide>) -> Option<TcpEvent> {
    match tcp {
        Some(t) => t.events.recv().await,
        None => std::future::pending().await,
    }
}

/// Builds the ICE-lite `Rtc` of a new session from the client's offer and
/// returns it with the offer as negotiated and the SDP answer.
fn negotiate(
    offer: &str,
    accepted: &Accepted,
    cert: Option<&str0m::config::DtlsCert>,
    candidates: Vec<Candidate>,
    now: Instant,
) -> Result<(Rtc, String, String), RtcError> {
    // We never send media: a `sendrecv` offer (Safari) is answered like a
    // `sendonly` one, with `recvonly`.
    let offer = offer.replace("a=sendrecv", "a=sendonly");
    let sdp = SdpOffer::from_sdp_string(&offer).map_err(|e| RtcError::Sdp(e.to_string()))?;
    let mut config = RtcConfig::new()
        .set_crypto_provider(Arc::clone(super::crypto::provider()))
        .set_ice_lite(true)
        .clear_codecs()
        .enable_opus(accepted.audio.is_some(), false)
        .enable_vp8(accepted.video_codec == Some(FrameCodec::Vp8))
        .enable_vp9(accepted.video_codec == Some(FrameCodec::Vp9))
        .enable_av1(accepted.video_codec == Some(FrameCodec::Av1))
        // Receive statistics (loss, NACKs) every few seconds, for the API
        // and metrics; rarely enough to stay off the hot path.
        .set_stats_interval(Some(STATS_INTERVAL));
    if let Some(cert) = cert {
        config = config.set_dtls_cert(cert.clone());
    }
    if let Some(video) = &accepted.video {
        // Mirror every H264 payload the client offers, so any profile
        // (Baseline, Main, High, hardware encoders' odd levels) matches.
        let codecs = config.codec_config();
        for (p, rtx) in video.h264_mode1() {
            codecs.add_config(
                p.pt.into(),
                rtx.map(Into::into),
                Codec::H264,
                str0m::media::Frequency::NINETY_KHZ,
                None,
                FormatParams {
                    level_asymmetry_allowed: Some(true),
                    packetization_mode: Some(1),
                    profile_level_id: p.fmtp_u32("profile-level-id", 16),
                    ..Default::default()
                },
            );
        }
    }
    let mut rtc = config.build(now);
    for c in candidates {
        rtc.add_local_candidate(c);
    }
    let answer = rtc
        .sdp_api()
        .accept_offer(sdp)
        .map_err(|e| RtcError::Negotiation(e.to_string()))?;
    Ok((rtc, offer, answer.to_sdp_string()))
}

/// An ICE restart asked by the client: str0m renegotiates the session's own
/// offer with the new credentials (which restarts its ICE agent, keeping our
/// candidates, DTLS and SRTP), then gets the new remote candidates. Media
/// goes on over the old pair until the client checks a new one. Returns the
/// server's sdpfrag. Nothing changes when the new offer does not parse.
fn ice_restart(
    s: &mut Session,
    ufrag: &str,
    pwd: &str,
    candidates: &[String],
) -> Result<String, RtcError> {
    let _g = s.span.enter();
    let offer = super::trickle::restart_offer(&s.offer, ufrag, pwd);
    let parsed = candidates
        .iter()
        .map(|c| Candidate::from_sdp_string(c).map_err(|e| RtcError::Sdp(e.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    let sdp = SdpOffer::from_sdp_string(&offer).map_err(|e| RtcError::Sdp(e.to_string()))?;
    let answer = s
        .rtc
        .sdp_api()
        .accept_offer(sdp)
        .map_err(|e| RtcError::Negotiation(e.to_string()))?;
    s.offer = offer;
    for c in parsed {
        s.rtc.add_remote_candidate(c);
    }
    tracing::info!(candidates = candidates.len(), "ICE restarted by the client");
    telemetry::counters().ice_restarts.increment(1);
    Ok(super::trickle::ice_fragment(&answer.to_sdp_string()))
}

/// Runs one session's state machine until it waits. `Ok(None)` when the
/// session ended by itself, `Err` with a reason when it failed.
fn poll_session(
    s: &mut Session,
    now: Instant,
    timer_due: bool,
    out: &mut Vec<Outgoing>,
) -> Result<Option<Instant>, String> {
    if timer_due && let Err(e) = s.rtc.handle_input(Input::Timeout(now)) {
        return Err(format!("webrtc error: {e}"));
    }
    loop {
        if !s.rtc.is_alive() {
            s.close("peer connection ended");
            return Ok(None);
        }
        let output = match s.rtc.poll_output() {
            Ok(o) => o,
            Err(e) => return Err(format!("webrtc error: {e}")),
        };
        match output {
            Output::Timeout(t) => return Ok(Some(t)),
            Output::Transmit(t) => out.push((t.contents.to_vec(), t.destination, t.proto)),
            Output::Event(e) => on_event(s, e)?,
        }
    }
}

fn on_event(s: &mut Session, event: Event) -> Result<(), String> {
    let _g = s.span.enter();
    match event {
        Event::Connected => {
            s.connected = true;
            tracing::info!(ms = s.created.elapsed().as_millis() as u64, "connected");
            let hub = s.hub.clone();
            let publication = s.publication;
            let requester = s.keyframe_requester(None);
            drop(_g);
            hub.start(publication, requester);
            request_keyframe(s, None);
        }
        Event::IceConnectionStateChange(state) => {
            tracing::debug!(?state, "ice state");
            if state == IceConnectionState::Disconnected {
                return Err("ICE disconnected".into());
            }
        }
        Event::MediaAdded(m) => {
            tracing::debug!(mid = %m.mid, kind = ?m.kind, "media added");
            match m.kind {
                MediaKind::Video => {
                    s.video_mid = Some(m.mid);
                    // str0m reports the media after `Connected`: this is the
                    // first moment a PLI can be sent at the start.
                    drop(_g);
                    request_keyframe(s, None);
                    return Ok(());
                }
                MediaKind::Audio => s.audio_mid = Some(m.mid),
            }
        }
        Event::MediaData(d) => {
            if Some(d.mid) == s.video_mid && !s.nack_on {
                // str0m only NACKs streams with an RTX payload; publishers
                // without one (webrtc-rs, some hardware encoders) retransmit
                // on the original stream, so ask for that too.
                if let Some(rx) = s.rtc.direct_api().stream_rx_by_mid(d.mid, d.rid) {
                    rx.suppress_nack(false);
                    s.nack_on = true;
                }
            }
            let kind = if Some(d.mid) == s.video_mid {
                TrackKind::Video
            } else if Some(d.mid) == s.audio_mid {
                TrackKind::Audio
            } else {
                return Ok(());
            };
            let rid = d.rid.as_ref().map(|r| r.to_string());
            drop(_g);
            on_media(s, kind, rid, &d);
        }
        // One figure per publisher: its video, or its audio when it sends
        // no video.
        Event::MediaIngressStats(st) if Some(st.mid) == s.video_mid || s.video_mid.is_none() => {
            let c = telemetry::counters();
            c.nacks_sent
                .increment(st.nacks.saturating_sub(s.nacks_seen));
            s.nacks_seen = s.nacks_seen.max(st.nacks);
            let loss = st.loss.unwrap_or(0.0).clamp(0.0, 1.0);
            telemetry::packet_loss(s.hub.name(), loss);
            s.hub.set_ingress(IngressStats {
                loss,
                packets: st.packets,
                bytes: st.bytes,
                nacks: st.nacks,
                rtt_ms: st.rtt.map(|d| d.as_secs_f64() * 1000.0),
            });
        }
        _ => {}
    }
    Ok(())
}

/// Parses every candidate first, so a bad one adds none.
fn add_remote_candidates(
    s: &mut Session,
    candidates: &[String],
    end_of_candidates: bool,
) -> Result<usize, RtcError> {
    let parsed = candidates
        .iter()
        .map(|c| Candidate::from_sdp_string(c).map_err(|e| RtcError::Sdp(e.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    let _g = s.span.enter();
    let n = parsed.len();
    for c in parsed {
        tracing::debug!(candidate = %c.to_sdp_string(), "remote candidate trickled");
        s.rtc.add_remote_candidate(c);
    }
    if end_of_candidates {
        // ICE-lite runs no checks of its own: nothing waits for more
        // candidates, so the end of them changes nothing here.
        tracing::debug!("end of remote candidates");
    }
    Ok(n)
}

/// Routes a frame: the main video (or the offer's first simulcast layer) and
/// the audio to the stream's hub; a layer the stream takes as a rendition to
/// its hub (started at its first frame); other layers nowhere.
fn on_media(s: &mut Session, kind: TrackKind, rid: Option<String>, d: &MediaData) {
    let publication = s.publication;
    if let Some(rid) = &rid {
        s.source_rid.get_or_insert_with(|| rid.clone());
    }
    let layer = match &rid {
        Some(r) => s.layers.iter().position(|l| l.rid == *r),
        // Without simulcast the one video is the first layer the stream
        // takes, so a simulcast ladder still plays.
        None if kind == TrackKind::Video && s.source_rid.is_none() && !s.layers.is_empty() => {
            Some(0)
        }
        None => None,
    };
    let to_main = kind == TrackKind::Audio || rid.is_none() || rid == s.source_rid;
    if to_main {
        let out = s.ingest.push(kind, d);
        if let Some(frame) = out.frame {
            // (The layers get the stream's output audio, AAC, from the
            // stream: see `streams::forward_audio`.)
            if let Some(i) = layer.filter(|_| kind == TrackKind::Video) {
                start_layer(s, i);
                s.layers[i].hub.publish(publication, frame.clone());
            }
            s.hub.publish(publication, frame);
        }
        if out.want_keyframe {
            s.hub.request_keyframe();
        }
        return;
    }
    let Some(i) = layer else { return };
    start_layer(s, i);
    let epoch = s.ingest.epoch();
    let codec = s.video_codec;
    let l = &mut s.layers[i];
    let ingest = l
        .ingest
        .get_or_insert_with(|| Ingest::with_epoch(2, codec, epoch));
    let out = ingest.push(kind, d);
    if let Some(frame) = out.frame {
        l.hub.publish(publication, frame);
    }
    if out.want_keyframe {
        l.hub.request_keyframe();
    }
}

/// Starts layer `i`'s hub at its first frame.
fn start_layer(s: &mut Session, i: usize) {
    if s.layers[i].started {
        return;
    }
    let requester = s.keyframe_requester(Some(s.layers[i].rid.clone()));
    let l = &mut s.layers[i];
    l.started = true;
    l.hub.start(s.publication, requester);
    tracing::info!(parent: &s.span, rid = %s.layers[i].rid, "simulcast layer started");
}

/// Asks for a keyframe of the main video (`rid` `None`: the source layer
/// of a simulcast publication) or of a simulcast layer.
fn request_keyframe(s: &mut Session, rid: Option<&str>) {
    let Some(mid) = s.video_mid else { return };
    let rid = rid.or(s.source_rid.as_deref()).map(Rid::from);
    let Some(mut w) = s.rtc.writer(mid) else {
        return;
    };
    let kind = if w.is_request_keyframe_possible(KeyframeRequestKind::Pli) {
        KeyframeRequestKind::Pli
    } else {
        KeyframeRequestKind::Fir
    };
    match w.request_keyframe(rid, kind) {
        Ok(()) => {
            telemetry::counters().keyframe_requests.increment(1);
            tracing::debug!(parent: &s.span, ?kind, "keyframe requested");
        }
        Err(e) => tracing::debug!(parent: &s.span, error = %e, "keyframe request failed"),
    }
}

impl Session {
    /// Lets the hub ask this session for a keyframe through the driver.
    fn keyframe_requester(&self, rid: Option<String>) -> KeyframeRequester {
        let id = self.id.clone();
        let tx = self.commands.clone();
        Box::new(move || {
            if let Some(tx) = tx.upgrade() {
                let _ = tx.try_send(Command::Keyframe {
                    id: id.clone(),
                    rid: rid.clone(),
                });
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rtc::offer;
    use str0m::media::Direction;

    /// A real offer from a (non-lite) str0m client sending H264 and Opus.
    fn client_offer() -> String {
        client_offer_with(|c| c.enable_h264(true))
    }

    /// A real offer from a str0m client sending Opus and the video codecs
    /// `video` enables.
    fn client_offer_with(video: impl FnOnce(RtcConfig) -> RtcConfig) -> String {
        str0m::config::CryptoProvider::clone(crate::rtc::crypto::provider())
            .install_process_default();
        let mut client = video(RtcConfig::new().clear_codecs())
            .enable_opus(true, false)
            .build(Instant::now());
        let addr: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        client.add_local_candidate(Candidate::host(addr, "udp").unwrap());
        let mut change = client.sdp_api();
        change.add_media(MediaKind::Video, Direction::SendOnly, None, None, None);
        change.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None);
        let (offer, _pending) = change.apply().unwrap();
        offer.to_sdp_string()
    }

    fn answer(offer_text: &str) -> Result<String, String> {
        answer_transcoding(offer_text, false)
    }

    fn answer_transcoding(offer_text: &str, non_h264: bool) -> Result<String, String> {
        let sections = offer::parse(offer_text).map_err(|e| e.to_string())?;
        let accepted = offer::check(sections, non_h264).map_err(|e| e.to_string())?;
        let server: SocketAddr = "127.0.0.1:8189".parse().unwrap();
        let candidates = vec![Candidate::host(server, "udp").unwrap()];
        negotiate(offer_text, &accepted, None, candidates, Instant::now())
            .map(|(_, _, a)| a)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn answer_is_ice_lite_recvonly_with_our_candidate_and_twcc() {
        let a = answer(&client_offer()).unwrap();
        assert!(a.contains("a=ice-lite"), "{a}");
        assert!(a.contains("127.0.0.1 8189 typ host"), "{a}");
        assert_eq!(a.matches("a=recvonly").count(), 2, "{a}");
        assert!(a.contains("a=rtcp-mux"), "{a}");
        assert!(a.contains("transport-wide-cc"), "{a}");
        assert!(a.contains("nack"), "{a}");
        assert!(a.contains("H264/90000") && a.contains("opus/48000"), "{a}");
    }

    #[test]
    fn any_h264_profile_offered_is_accepted() {
        let o = client_offer();
        // Keep only High profile level 5.0, as hardware encoders offer it.
        let high = o
            .replace("profile-level-id=42001f", "profile-level-id=640032")
            .replace("profile-level-id=42e01f", "profile-level-id=640032")
            .replace("profile-level-id=4d001f", "profile-level-id=640032")
            .replace("profile-level-id=64001f", "profile-level-id=640032");
        let a = answer(&high).unwrap();
        assert!(a.contains("profile-level-id=640032"), "{a}");
    }

    /// The video lines of an SDP: `m=video` to the next `m=`.
    fn video_section(sdp: &str) -> &str {
        let start = sdp.find("m=video").expect("a video section");
        let end = sdp[start + 1..]
            .find("\r\nm=")
            .map_or(sdp.len(), |e| start + e + 3);
        &sdp[start..end]
    }

    #[test]
    fn vp9_and_av1_offers_get_just_that_codec() {
        // Chrome's AV1 fmtp, which str0m's client does not write.
        let av1 = client_offer_with(|c| c.enable_av1(true));
        let pt = av1
            .lines()
            .find_map(|l| l.strip_prefix("a=rtpmap:")?.strip_suffix(" AV1/90000"))
            .expect("an AV1 rtpmap")
            .to_owned();
        let av1 = av1.replacen(
            &format!("a=rtpmap:{pt} AV1/90000\r\n"),
            &format!("a=rtpmap:{pt} AV1/90000\r\na=fmtp:{pt} level-idx=5;profile=0;tier=0\r\n"),
            1,
        );
        let vp9 = client_offer_with(|c| c.enable_vp9(true));
        let all = client_offer_with(|c| c.enable_vp9(true).enable_av1(true));
        for (offer, name, absent) in [
            (&av1, "AV1/90000", "VP9/90000"),
            (&vp9, "VP9/90000", "AV1/90000"),
            (&all, "VP9/90000", "AV1/90000"),
        ] {
            let a = answer_transcoding(offer, true).unwrap();
            let video = video_section(&a);
            assert!(video.contains(name) && !video.contains(absent), "{a}");
            assert!(video.contains("a=recvonly"), "{a}");
            // Refused without transcoding, before str0m sees it.
            let e = answer_transcoding(offer, false).unwrap_err();
            assert!(e.contains("does not transcode"), "{e}");
        }
    }

    #[test]
    fn sendrecv_offers_get_recvonly_answers() {
        let o = client_offer().replace("a=sendonly", "a=sendrecv");
        let a = answer(&o).unwrap();
        assert_eq!(a.matches("a=recvonly").count(), 2, "{a}");
    }

    #[test]
    fn mdns_candidates_do_not_break_the_offer() {
        let o = client_offer();
        let mdns = "a=candidate:1 1 udp 2113937151 8a3c9e8e-1f2b-4d3c-9e8e-1f2b4d3c9e8e.local 54321 typ host\r\n";
        let with_mdns = o.replacen("a=candidate:", &format!("{mdns}a=candidate:"), 1);
        assert!(with_mdns.contains(".local"));
        answer(&with_mdns).unwrap();
    }
}
