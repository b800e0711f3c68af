//! The lean sender: a WHIP session whose media path costs little per packet, for load runs.
//!
//! str0m's `Rtc` is a whole WebRTC endpoint: its send path queues, paces and packetizes each
//! session's frames and runs congestion control on the feedback. A load generator sending
//! hundreds of sessions needs none of that, and in profiles it cost about as much CPU per
//! packet as the server receiving the packets. The lean sender keeps the parts a server checks
//! and drops the rest:
//!
//! - the offer is its own ([`sdp`]): H264 (packetization-mode 1) and/or Opus, BUNDLE,
//!   rtcp-mux, SSRCs signalled, the `mid` and transport-wide sequence number header
//!   extensions (a server runs its congestion control feedback as for a browser);
//! - ICE is str0m's agent (`str0m::ice::IceAgent`, controlling, with consent checks);
//! - DTLS is str0m's crypto provider's DTLS 1.2 (OpenSSL), and the server's certificate is
//!   checked against the answer's fingerprint;
//! - RTP packetizing ([`rtp`]) and SRTP/SRTCP ([`srtp`]) are here: a frame becomes packets in
//!   one pass, straight into the session's send buffer, AES-GCM sealed with ring;
//! - an RTCP sender report per SSRC every second (servers use them for lip sync);
//! - once DTLS is up, the session's media goes to a pacer task ([`pacer`]) that sends every
//!   lane's due frames each 5 ms, a frame's full-size packets as one UDP GSO message.
//!
//! It does not retransmit on NACK, honour keyframe requests (the file has its own keyframes)
//! or act on the server's TWCC feedback (it reads and drops all RTCP): on a load run the path
//! is loopback or a LAN.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::pin;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use str0m::Candidate;
use str0m::IceConnectionState;
use str0m::config::{CryptoProvider, DtlsCert, DtlsVersion};
use str0m::crypto::dtls::{DtlsInstance, DtlsOutput};
use str0m::format::Codec;
use str0m::ice::{IceAgent, IceAgentEvent, IceCreds, StunMessage, StunPacket};
use str0m::net::Protocol;
use tokio::net::UdpSocket;
use tracing::{debug, warn};
use url::Url;

use super::candidates::LocalAddrs;
use super::load::{Failure, FailureKind, Live};
use super::source::{Clip, ClipCursor, MediaInfo};
use super::whip::{delete_session, post_offer, remote_candidate_ips, resolve_host};
use super::{PublishOptions, PublishStats};
pub(crate) use pacer::Pacers;
use pacer::{Lane, LaneHandle, LaneReport};
use rtp::RtpStream;
use sdp::{Answer, H264_PT, OPUS_PT, Offer, OfferMedia};
use srtp::SrtpSender;

mod pacer;
mod rtp;
mod sdp;
mod srtp;

/// The largest datagram a session sends or expects.
const DATAGRAM: usize = 1500;

/// Whether the lean sender can publish this file with these options: H264 and/or Opus, over
/// UDP, without ICE restarts or simulcast.
pub(super) fn supports(info: &MediaInfo, opts: &PublishOptions) -> bool {
    (!info.video || info.video_codec == Codec::H264)
        && !opts.ice_tcp
        && opts.ice_restart_after.is_none()
        && opts.simulcast.is_empty()
}

/// The crypto provider and one DTLS certificate for every session of the process (a browser
/// also reuses its certificate across connections; each handshake has its own keys).
fn crypto() -> anyhow::Result<&'static (CryptoProvider, DtlsCert, String)> {
    static CRYPTO: OnceLock<Option<(CryptoProvider, DtlsCert, String)>> = OnceLock::new();
    CRYPTO
        .get_or_init(|| {
            let provider = CryptoProvider::clone(crate::rtc::crypto::provider());
            let cert = provider.dtls_provider.generate_certificate()?;
            let digest = provider.sha256_provider.sha256(&cert.certificate);
            let fingerprint = digest
                .iter()
                .map(|b| format!("{b:02X}"))
                .collect::<Vec<_>>()
                .join(":");
            Some((provider, cert, fingerprint))
        })
        .as_ref()
        .ok_or_else(|| anyhow!("the crypto provider cannot make a DTLS certificate"))
}

/// One lean WHIP session.
pub(super) struct LeanSession<'a> {
    pub(super) opts: &'a PublishOptions,
    pub(super) url: &'a Url,
    pub(super) http: &'a reqwest::Client,
    pub(super) live: Option<Arc<Live>>,
    pub(super) pacers: &'a Pacers,
}

impl LeanSession<'_> {
    /// POSTs the offer, connects, sends `clip` until its end (unless looping) or `shutdown`,
    /// then DELETEs the session.
    pub(super) async fn run(
        &self,
        clip: Arc<Clip>,
        shutdown: impl Future,
        stats: &mut PublishStats,
    ) -> anyhow::Result<()> {
        let (provider, cert, fingerprint) = crypto()?;
        let mut shutdown = pin!(shutdown);
        let socket = UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))
            .await
            .context("binding a UDP socket")?;
        let port = socket.local_addr().context("UDP socket address")?.port();
        let mut locals = LocalAddrs::new(port);
        for ip in resolve_host(self.url).await? {
            locals.route_to(ip);
        }

        let creds = IceCreds::new();
        let mut ice = IceAgent::with_hmac(creds.clone(), provider.sha1_hmac_provider);
        ice.set_controlling(true);
        let mut candidates = Vec::new();
        for addr in locals.candidates() {
            add_candidate(&mut ice, addr, &mut candidates);
        }

        let info = clip.info;
        let mut media = Vec::new();
        if info.video {
            media.push(OfferMedia {
                mid: "0",
                ssrc: rand::random(),
                h264_profile: Some(info.h264_profile.unwrap_or(0x42e01f)),
            });
        }
        if info.audio {
            media.push(OfferMedia {
                mid: if info.video { "1" } else { "0" },
                ssrc: rand::random(),
                h264_profile: None,
            });
        }
        let cname = format!("{:08x}", rand::random::<u32>());
        let offer = Offer {
            ufrag: &creds.ufrag,
            pwd: &creds.pass,
            fingerprint,
            candidates: &candidates,
            cname: &cname,
            media: &media,
        }
        .to_sdp();

        let posted = Instant::now();
        let session = tokio::select! {
            r = post_offer(self.http, self.url, self.opts.token.as_deref(), offer) => r?,
            _ = &mut shutdown => return Ok(()),
        };
        let setup = posted.elapsed();
        stats.post_to_201 = Some(setup);
        stats.location = Some(session.location.clone());
        if let Some(live) = &self.live {
            live.answered(setup);
        }

        let result = async {
            let answer = Answer::parse(&session.answer)?;
            for ip in remote_candidate_ips(&session.answer) {
                if let Some(addr) = locals.route_to(ip) {
                    add_candidate(&mut ice, addr, &mut Vec::new());
                }
            }
            ice.set_remote_credentials(IceCreds {
                ufrag: answer.ufrag.clone(),
                pass: answer.pwd.clone(),
            });
            for c in &answer.candidates {
                match Candidate::from_sdp_string(c) {
                    Ok(c) => ice.add_remote_candidate(c),
                    Err(e) => debug!("skipping the server's candidate {c}: {e}"),
                }
            }
            let mut video = None;
            let mut audio = None;
            for m in &media {
                let (pt, clock) = match m.h264_profile {
                    Some(_) => (H264_PT, 90_000),
                    None => (OPUS_PT, 48_000),
                };
                let Some(accepted) = answer.accepted(m.mid, pt) else {
                    debug!(mid = m.mid, "the WHIP server did not accept this media");
                    continue;
                };
                let mid = accepted.mid_ext.map(|id| (id, m.mid));
                let stream = RtpStream::new(m.ssrc, pt, clock, mid, accepted.twcc_ext);
                match m.h264_profile {
                    Some(_) => video = Some(stream),
                    None => audio = Some(stream),
                }
            }
            if video.is_none() && audio.is_none() {
                bail!("the WHIP server accepted neither H264 video nor Opus audio");
            }
            let dtls = provider
                .dtls_provider
                .new_dtls(cert, Instant::now(), DtlsVersion::Dtls12, None)
                .map_err(|e| anyhow!("creating the DTLS endpoint: {e}"))?;
            let sender = Sender {
                socket: Arc::new(socket),
                locals,
                ice,
                dtls,
                dtls_client: !answer.answerer_active,
                dtls_received: false,
                fingerprint: answer.fingerprint,
                provider,
                destination: None,
                media: Some((video, audio, ClipCursor::new(clip, self.opts.loop_))),
                pacers: self.pacers,
                stats: &mut *stats,
                live: self.live.clone(),
                posted,
                connect_timeout: self.opts.connect_timeout,
                out: Vec::with_capacity(4 * DATAGRAM),
                lens: Vec::new(),
            };
            sender.run(shutdown.as_mut()).await
        }
        .await;
        delete_session(
            self.http,
            &session.location,
            self.opts.token.as_deref(),
            false,
        )
        .await;
        result
    }
}

fn add_candidate(ice: &mut IceAgent, addr: SocketAddr, lines: &mut Vec<String>) {
    match Candidate::host(addr, "udp") {
        Ok(c) => {
            lines.push(c.to_sdp_string());
            ice.add_local_candidate(c);
        }
        Err(e) => debug!("skipping local address {addr}: {e}"),
    }
}

/// A session after the answer: ICE, then DTLS, then media on a pacer.
struct Sender<'a> {
    socket: Arc<UdpSocket>,
    locals: LocalAddrs,
    ice: IceAgent,
    dtls: Box<dyn DtlsInstance>,
    /// We are the DTLS client (the answer said `a=setup:passive`).
    dtls_client: bool,
    /// A DTLS record came from the server.
    dtls_received: bool,
    /// The server certificate's SHA-256, from the answer.
    fingerprint: Vec<u8>,
    provider: &'static CryptoProvider,
    /// The nominated pair's remote address (the socket is connected to it).
    destination: Option<SocketAddr>,
    /// The RTP streams and the clip, until they go to a pacer.
    media: Option<(Option<RtpStream>, Option<RtpStream>, ClipCursor)>,
    pacers: &'a Pacers,
    stats: &'a mut PublishStats,
    live: Option<Arc<Live>>,
    posted: Instant,
    connect_timeout: Duration,
    /// ICE and DTLS datagrams to send, back to back, and their lengths.
    out: Vec<u8>,
    lens: Vec<usize>,
}

impl Sender<'_> {
    async fn run(mut self, mut shutdown: std::pin::Pin<&mut impl Future>) -> anyhow::Result<()> {
        let mut buf = vec![0u8; DATAGRAM];
        let now = Instant::now();
        let connect_deadline = now + self.connect_timeout;
        self.ice.handle_timeout(now);
        self.dtls.set_active(self.dtls_client);
        let mut dtls_started = false;
        let mut dtls_timeout: Option<Instant> = None;
        let mut lane: Option<LaneHandle> = None;
        let mut disconnected_since: Option<Instant> = None;
        let wake = tokio::time::sleep_until(tokio::time::Instant::now());
        tokio::pin!(wake);

        let outcome = loop {
            let now = Instant::now();
            // ICE: checks, consent, events.
            while let Some(t) = self.ice.poll_transmit() {
                self.out.extend_from_slice(&t.contents);
                self.lens.push(t.contents.len());
                self.flush(Some(t.destination)).await;
            }
            while let Some(event) = self.ice.poll_event() {
                match event {
                    IceAgentEvent::NominatedSend { destination, .. } => {
                        // Connected: the kernel keeps the route, media needs no address.
                        self.socket
                            .connect(destination)
                            .await
                            .context("connecting the UDP socket to the nominated pair")?;
                        self.destination = Some(destination);
                        if !dtls_started {
                            dtls_started = true;
                            self.dtls
                                .handle_timeout(now)
                                .map_err(|e| anyhow!("DTLS: {e}"))?;
                            if self.dtls_client {
                                // An empty input makes the client send its ClientHello.
                                let _ = self.dtls.handle_packet(&[]);
                            }
                        }
                    }
                    IceAgentEvent::IceConnectionStateChange(state) => {
                        debug!("ICE state {state:?}");
                        if state == IceConnectionState::Disconnected {
                            disconnected_since.get_or_insert(now);
                        } else {
                            disconnected_since = None;
                        }
                    }
                    _ => {}
                }
            }
            // As the DTLS server, the client's first flight starts it.
            dtls_started |= self.dtls_received;
            if dtls_started && lane.is_none() {
                let (timeout, srtp) = self.poll_dtls().await?;
                dtls_timeout = timeout;
                if let Some(srtp) = srtp
                    && let Some((video, audio, cursor)) = self.media.take()
                {
                    self.stats.connected = true;
                    lane = Some(self.pacers.add(Lane {
                        socket: self.socket.clone(),
                        srtp,
                        video,
                        audio,
                        cursor,
                        live: self.live.clone(),
                        posted: self.posted,
                    }));
                }
            }
            if let Some(since) = disconnected_since
                && now >= since + super::driver::DISCONNECT_GRACE
            {
                break Err(Failure::err(
                    FailureKind::IceFailed,
                    "ICE connection to the WHIP server failed (consent lost)".to_owned(),
                ));
            }
            if lane.is_none() && now >= connect_deadline {
                return Err(Failure::err(
                    FailureKind::ConnectTimeout,
                    format!(
                        "no ICE/DTLS connection to the WHIP server after {:?}",
                        self.connect_timeout
                    ),
                ));
            }

            let ice_timeout = self.ice.poll_timeout();
            let mut next = connect_deadline;
            if lane.is_some() {
                next = now + DRAIN_EVERY;
            }
            for t in [ice_timeout, dtls_timeout].into_iter().flatten() {
                next = next.min(t);
            }
            let at = super::driver::wake_grid().place(next, now);
            let at = tokio::time::Instant::from_std(at);
            if wake.deadline() != at {
                wake.as_mut().reset(at);
            }

            tokio::select! {
                biased;
                _ = &mut shutdown => break Ok(()),
                report = lane_done(&mut lane) => {
                    // The clip ended (without --loop), or sending failed.
                    return self.take_report(report);
                }
                r = self.socket.recv_from(&mut buf), if lane.is_none() => match r {
                    Ok((n, source)) => self.receive(&buf[..n], source),
                    Err(e) => debug!("UDP receive error: {e}"),
                },
                _ = &mut wake => {
                    if lane.is_some() {
                        self.drain(&mut buf);
                    }
                    let now = Instant::now();
                    if ice_timeout.is_some_and(|t| t <= now) {
                        self.ice.handle_timeout(now);
                    }
                    if dtls_timeout.is_some_and(|t| t <= now) && lane.is_none() {
                        self.dtls.handle_timeout(now).map_err(|e| anyhow!("DTLS: {e}"))?;
                    }
                }
            }
        };
        if let Some(handle) = lane.as_mut() {
            handle.stop();
            let report = lane_done(&mut lane).await;
            self.take_report(report)?;
        }
        outcome
    }

    /// Adds a lane's report to the session's figures; its error, if it had one.
    fn take_report(&mut self, report: LaneReport) -> anyhow::Result<()> {
        let stats = &mut *self.stats;
        stats.video_frames = report.video_frames;
        stats.keyframes = report.keyframes;
        stats.audio_frames = report.audio_frames;
        stats.bytes = report.bytes;
        stats.loops = report.loops;
        stats.finished = report.finished;
        stats.media_time = report.media_time;
        stats.post_to_media = report.post_to_media;
        stats.packets_sent += report.packets;
        stats.packet_bytes_sent += report.packet_bytes;
        if report.send_failures > 0 {
            warn!(
                dropped = report.send_failures,
                "datagrams the UDP socket did not take (send buffer full or an error)"
            );
        }
        match report.error {
            Some(e) => bail!("{e}"),
            None => Ok(()),
        }
    }

    /// Reads what has arrived, without waiting.
    fn drain(&mut self, buf: &mut [u8]) {
        loop {
            match self.socket.try_recv_from(buf) {
                Ok((n, source)) => self.receive(&buf[..n], source),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    debug!("UDP receive error: {e}");
                    return;
                }
            }
        }
    }

    /// Demultiplexes a datagram (RFC 7983): STUN to ICE, DTLS to DTLS; SRTCP from the server
    /// (receiver reports, feedback) is not needed and dropped.
    fn receive(&mut self, data: &[u8], source: SocketAddr) {
        match data.first() {
            Some(0..=3) => {
                let Ok(message) = StunMessage::parse(data) else {
                    debug!("ignoring a bad STUN message from {source}");
                    return;
                };
                let packet = StunPacket {
                    proto: Protocol::Udp,
                    source,
                    destination: self.locals.destination_for(source),
                    message,
                };
                if self.ice.accepts_message(&packet.message) {
                    self.ice.handle_packet(Instant::now(), packet);
                }
            }
            Some(20..=63) => {
                self.dtls_received = true;
                self.destination.get_or_insert(source);
                if let Err(e) = self.dtls.handle_packet(data) {
                    debug!("DTLS packet from {source}: {e}");
                }
            }
            _ => {}
        }
    }

    /// Sends what DTLS has to send; returns its next timeout, and the SRTP keys once the
    /// handshake exported them and the server's certificate matched the answer's fingerprint.
    async fn poll_dtls(&mut self) -> anyhow::Result<(Option<Instant>, Option<SrtpSender>)> {
        let mut buf = vec![0u8; DATAGRAM * 2];
        let mut cert_ok = false;
        let mut srtp = None;
        loop {
            match self.dtls.poll_output(&mut buf) {
                DtlsOutput::Packet(p) => {
                    self.out.extend_from_slice(p);
                    self.lens.push(p.len());
                }
                DtlsOutput::BufferTooSmall { needed } => buf.resize(needed, 0),
                DtlsOutput::Timeout(t) => {
                    self.flush(None).await;
                    return Ok((Some(t), srtp));
                }
                DtlsOutput::PeerCert(der) => {
                    let digest = self.provider.sha256_provider.sha256(der);
                    if digest[..] != self.fingerprint[..] {
                        bail!(
                            "the WHIP server's DTLS certificate does not match its SDP fingerprint"
                        );
                    }
                    cert_ok = true;
                }
                DtlsOutput::KeyingMaterial(material, profile) => {
                    if !cert_ok {
                        bail!("DTLS finished without the server's certificate");
                    }
                    debug!(?profile, "DTLS connected");
                    srtp = Some(SrtpSender::new(
                        self.provider,
                        profile,
                        &material,
                        self.dtls_client,
                    )?);
                }
                DtlsOutput::CloseNotify => {
                    return Err(Failure::err(
                        FailureKind::Closed,
                        "the WHIP server closed DTLS".to_owned(),
                    ));
                }
                _ => {}
            }
        }
    }

    /// Sends the buffered ICE and DTLS datagrams to `to`, or to the nominated address.
    async fn flush(&mut self, to: Option<SocketAddr>) {
        if let Some(to) = to.or(self.destination) {
            let mut at = 0;
            for &n in &self.lens {
                match self.socket.send_to(&self.out[at..at + n], to).await {
                    Ok(sent) => {
                        self.stats.packets_sent += 1;
                        self.stats.packet_bytes_sent += sent as u64;
                        if let Some(live) = &self.live {
                            live.sent(1, sent as u64);
                        }
                    }
                    Err(e) => debug!("UDP send to {to} failed: {e}"),
                }
                at += n;
            }
        }
        self.out.clear();
        self.lens.clear();
    }
}

/// How often a session with media on a pacer reads its socket. The server's RTCP (TWCC
/// feedback every few tens of milliseconds) and STUN answers wait for it: read one by one,
/// they woke a hundred sessions' tasks thousands of times a second.
const DRAIN_EVERY: Duration = Duration::from_millis(200);

/// The report of the session's lane; never without one.
async fn lane_done(lane: &mut Option<LaneHandle>) -> LaneReport {
    let Some(handle) = lane.as_mut() else {
        return std::future::pending().await;
    };
    let report = (&mut handle.done).await.unwrap_or_else(|_| LaneReport {
        error: Some("the pacer stopped".to_owned()),
        ..LaneReport::default()
    });
    *lane = None;
    report
}
