//! One session's str0m `Rtc` after the POST: its socket, its timers, the frames it sends.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use str0m::format::{Codec, PayloadParams};
use str0m::media::{Frequency, MediaTime, Mid, Pt, Rid};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::candidates::LocalAddrs;
use super::load::{Failure, FailureKind, Live};
use super::source::{ClipCursor, FrameKind, Frames, MediaFrame};
use super::whip::{Signalling, accept_answer, restart_fragment};
use super::{MAIN_RID, PublishOptions, PublishStats, Source, simulcast_rids};
use crate::rtc::tcp::TcpLinks;

pub(super) struct Track {
    mid: Mid,
    pub(super) pt: Option<Pt>,
    clock: Frequency,
}

impl Track {
    pub(super) fn new(rtc: &mut Rtc, mid: Mid, codec: Codec, h264_profile: Option<u32>) -> Self {
        let pt = rtc
            .writer(mid)
            .and_then(|w| choose_pt(w.payload_params(), codec, h264_profile));
        match pt {
            Some(pt) => debug!(%mid, ?pt, "sending {codec}"),
            None => warn!(%mid, "the WHIP server did not accept {codec}; not sending it"),
        }
        let clock = if codec == Codec::Opus {
            Frequency::FORTY_EIGHT_KHZ
        } else {
            Frequency::NINETY_KHZ
        };
        Self { mid, pt, clock }
    }
}

/// Picks the payload type for `codec`; for H264 prefers packetization-mode 1 and the file's
/// profile.
fn choose_pt<'a>(
    params: impl Iterator<Item = &'a PayloadParams>,
    codec: Codec,
    h264_profile: Option<u32>,
) -> Option<Pt> {
    params
        .filter(|p| p.spec().codec == codec)
        .enumerate()
        .max_by_key(|(i, p)| {
            let f = p.spec().format;
            let mut score = 0;
            if codec == Codec::H264 {
                if f.packetization_mode == Some(1) {
                    score += 4;
                }
                match (h264_profile, f.profile_level_id) {
                    (Some(want), Some(have)) if want >> 16 == have >> 16 => {
                        score += 2;
                        // Constrained baseline (constraint_set1) matches 42e0xx best.
                        if (want >> 8) & 0x40 == (have >> 8) & 0x40 {
                            score += 1;
                        }
                    }
                    _ => {}
                }
            }
            // Earlier entries win ties (max_by_key keeps the last maximum).
            (score, std::cmp::Reverse(*i))
        })
        .map(|(_, p)| p.pt())
}

/// The port active TCP candidates carry (they connect from any port).
pub(super) const ACTIVE_TCP_PORT: u16 = 9;

pub(super) struct Driver<'a> {
    pub(super) rtc: Rtc,
    pub(super) socket: UdpSocket,
    /// ICE over TCP instead of the UDP socket (`--ice-tcp`).
    pub(super) tcp: Option<TcpLinks>,
    pub(super) locals: LocalAddrs,
    pub(super) signalling: Signalling<'a>,
    pub(super) video: Option<Track>,
    pub(super) audio: Option<Track>,
    pub(super) opts: &'a PublishOptions,
    pub(super) stats: &'a mut PublishStats,
    /// Lone session: progress and state changes at info.
    pub(super) verbose: bool,
    /// Shared counters of a multi-session run.
    pub(super) live: Option<&'a Live>,
    /// When the POST was sent.
    pub(super) posted: Instant,
}

const FRAME_QUEUE: usize = 64;
/// Frames a session writes back to back, and rounds of due work it gives
/// str0m at once, before it lets the runtime run others.
const MAX_BURST: usize = 8;
/// Sessions' timers and frames are due on the lines of one grid with this
/// step, so a hundred sessions wake the runtime together instead of one by
/// one: a frame leaves at most this much late.
const WAKE_STEP: Duration = Duration::from_millis(5);

pub(super) fn wake_grid() -> &'static crate::rtc::TimerGrid {
    static GRID: std::sync::OnceLock<crate::rtc::TimerGrid> = std::sync::OnceLock::new();
    GRID.get_or_init(|| crate::rtc::TimerGrid::new(WAKE_STEP))
}

/// How long a lost ICE connection may take to come back.
pub(super) const DISCONNECT_GRACE: Duration = Duration::from_secs(5);

impl Driver<'_> {
    pub(super) async fn run(
        mut self,
        source: Source,
        mut shutdown: std::pin::Pin<&mut impl Future>,
    ) -> anyhow::Result<()> {
        let loop_ = self.opts.loop_;
        let (mut frames, demux_task) = match source {
            Source::Demux(demuxer) => {
                let (tx, rx) = mpsc::channel::<MediaFrame>(FRAME_QUEUE);
                let task = tokio::task::spawn_blocking(move || {
                    let mut demuxer = demuxer;
                    demuxer.pump(&tx, loop_)
                });
                (Frames::Channel(rx), Some(task))
            }
            Source::Clip(clip) => (Frames::Clip(ClipCursor::new(clip, loop_)), None),
        };

        let result = self.event_loop(&mut frames, shutdown.as_mut()).await;
        // Stop the demuxer (its next send fails) and collect its outcome.
        drop(frames);
        let demux_result = match demux_task {
            Some(task) => task.await,
            None => Ok(Ok(())),
        };
        self.rtc.disconnect();
        result?;
        match demux_result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.context("reading the media file")),
            Err(e) => Err(anyhow!("demuxer thread failed: {e}")),
        }
    }

    async fn event_loop(
        &mut self,
        frames: &mut Frames,
        mut shutdown: std::pin::Pin<&mut impl Future>,
    ) -> anyhow::Result<()> {
        let mut buf = vec![0u8; 2048];
        let connect_deadline = tokio::time::Instant::now() + self.opts.connect_timeout;
        let mut media_start: Option<Instant> = None;
        let mut pending: Option<MediaFrame> = None;
        let mut disconnected_since: Option<tokio::time::Instant> = None;
        let mut next_progress = tokio::time::Instant::now() + self.opts.progress_interval;
        let mut eof = false;
        let mut restart_after = self.opts.ice_restart_after;
        let mut burst = 0;
        // One timer for str0m's next timeout and the next frame, reset only
        // when its deadline moves.
        let wake = tokio::time::sleep_until(tokio::time::Instant::now());
        tokio::pin!(wake);

        loop {
            let timeout = self
                .drain(&mut disconnected_since, &mut media_start)
                .await?;
            if !self.rtc.is_alive() {
                return Err(Failure::err(
                    FailureKind::Closed,
                    "the WebRTC connection was closed".to_owned(),
                ));
            }
            if eof && pending.is_none() {
                self.stats.finished = true;
                note!(self.verbose, "end of file reached");
                break;
            }
            let connected = media_start.is_some();
            // A frame that is due goes out now, without a trip through the
            // runtime's timers (a few at a time, so a late session does not
            // keep its worker from the others).
            if let Some(start) = media_start
                && burst < MAX_BURST
            {
                if pending.is_none()
                    && !eof
                    && let Some(next) = frames.try_next()
                {
                    match next {
                        Some(frame) => pending = Some(frame),
                        None => {
                            eof = true;
                            continue;
                        }
                    }
                }
                if let Some(frame) = pending.take_if(|f| start + f.send_at <= Instant::now()) {
                    burst += 1;
                    self.write(frame, start)?;
                    continue;
                }
            }
            burst = 0;
            let restart_due = media_start
                .zip(restart_after)
                .map(|(start, after)| tokio::time::Instant::from_std(start + after));
            let next = match (&pending, media_start) {
                (Some(f), Some(start)) => timeout.min(start + f.send_at),
                _ => timeout,
            };
            let at = tokio::time::Instant::from_std(wake_grid().place(next, Instant::now()));
            if wake.deadline() != at {
                wake.as_mut().reset(at);
            }

            tokio::select! {
                biased;
                _ = &mut shutdown => {
                    note!(self.verbose, "stopping");
                    break;
                }
                _ = tokio::time::sleep_until(connect_deadline), if !connected => {
                    return Err(Failure::err(
                        FailureKind::ConnectTimeout,
                        format!(
                            "no ICE/DTLS connection to the WHIP server after {:?}",
                            self.opts.connect_timeout
                        ),
                    ));
                }
                _ = sleep_until_opt(disconnected_since.map(|t| t + DISCONNECT_GRACE)),
                    if disconnected_since.is_some() =>
                {
                    return Err(Failure::err(
                        FailureKind::IceFailed,
                        "ICE connection to the WHIP server failed (no working candidate pair)"
                            .to_owned(),
                    ));
                }
                r = self.socket.recv_from(&mut buf) => match r {
                    Ok((n, source)) => self.receive(&buf[..n], source, Protocol::Udp)?,
                    Err(e) => debug!("UDP receive error: {e}"),
                },
                Some((source, data)) = tcp_recv(&mut self.tcp) => {
                    self.receive(&data, source, Protocol::Tcp)?;
                }
                _ = &mut wake => {
                    // A due frame goes out at the top of the loop.
                    let now = Instant::now();
                    if timeout <= now {
                        self.rtc
                            .handle_input(Input::Timeout(now))
                            .map_err(|e| anyhow!("WebRTC error: {e}"))?;
                    }
                }
                f = frames.next(), if pending.is_none() && connected && !eof => match f {
                    Some(frame) => pending = Some(frame),
                    None => eof = true,
                },
                _ = sleep_until_opt(restart_due), if restart_due.is_some() => {
                    restart_after = None;
                    self.ice_restart().await?;
                }
                _ = tokio::time::sleep_until(next_progress), if connected && self.verbose => {
                    next_progress += self.opts.progress_interval;
                    self.log_progress(media_start);
                }
            }
        }
        if let Some(start) = media_start {
            self.stats.media_time = start.elapsed();
        }
        // Push out what the last write produced.
        let _ = self.drain(&mut disconnected_since, &mut media_start).await;
        Ok(())
    }

    /// Moves the session to a new UDP socket with an ICE restart (RFC 9725 §4.3.2): new
    /// credentials and the new socket's candidates go to the server in a `PATCH` with
    /// `If-Match: "*"`; its answer brings the server's new credentials and candidates. The old
    /// socket is closed, so media can only go on over the new path.
    async fn ice_restart(&mut self) -> anyhow::Result<()> {
        let socket = UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))
            .await
            .context("binding a UDP socket for the ICE restart")?;
        let mut locals = LocalAddrs::new(socket.local_addr()?.port());
        for ip in &self.signalling.remote_ips {
            locals.route_to(*ip);
        }
        let candidates: Vec<Candidate> = locals
            .candidates()
            .into_iter()
            .filter_map(|a| Candidate::host(a, "udp").ok())
            .collect();
        let mut api = self.rtc.sdp_api();
        api.ice_restart(false);
        let (offer, pending) = api
            .apply()
            .ok_or_else(|| anyhow!("str0m produced no ICE restart offer"))?;
        let lines: Vec<String> = candidates.iter().map(|c| c.to_sdp_string()).collect();
        let fragment = restart_fragment(&offer.to_sdp_string(), &lines);
        note!(self.verbose, "ICE restart on a new UDP socket");
        let server = self.signalling.restart(&fragment).await?;
        let (Some(ufrag), Some(pwd)) = (server.ufrag, server.pwd) else {
            bail!("the WHIP server's ICE restart answer has no ice-ufrag/ice-pwd");
        };
        let answer = crate::rtc::trickle::restart_offer(&self.signalling.answer, &ufrag, &pwd);
        accept_answer(&mut self.rtc, pending, &answer)?;
        // str0m restarted its ICE agent with the answer, without candidates.
        for c in candidates {
            self.rtc.add_local_candidate(c);
        }
        for c in &server.candidates {
            match Candidate::from_sdp_string(c) {
                Ok(c) => {
                    self.rtc.add_remote_candidate(c);
                }
                Err(e) => debug!("skipping the server's candidate {c}: {e}"),
            }
        }
        self.signalling.answer = answer;
        self.socket = socket;
        self.locals = locals;
        self.stats.ice_restarts += 1;
        Ok(())
    }

    /// Drains str0m's output: sends datagrams, handles events. Returns the next timeout.
    async fn drain(
        &mut self,
        disconnected_since: &mut Option<tokio::time::Instant>,
        media_start: &mut Option<Instant>,
    ) -> anyhow::Result<Instant> {
        let mut immediate = 0;
        loop {
            match self
                .rtc
                .poll_output()
                .map_err(|e| anyhow!("WebRTC error: {e}"))?
            {
                Output::Timeout(t) => {
                    // Work due now (a frame just written, to packetize) is
                    // done at once, not after a trip through the runtime's
                    // timers; a few rounds at most.
                    let now = Instant::now();
                    if t > now || immediate == MAX_BURST {
                        return Ok(t);
                    }
                    immediate += 1;
                    self.rtc
                        .handle_input(Input::Timeout(now))
                        .map_err(|e| anyhow!("WebRTC error: {e}"))?;
                }
                Output::Transmit(t) if t.proto == Protocol::Tcp => {
                    let n = t.contents.len();
                    let Some(tcp) = self.tcp.as_mut() else {
                        continue;
                    };
                    match tcp.send(t.destination, t.contents.to_vec()).await {
                        Ok(()) => self.count_sent(n),
                        Err(e) => debug!("ICE-TCP connection to {} failed: {e}", t.destination),
                    }
                }
                Output::Transmit(t) => {
                    match self.socket.send_to(&t.contents, t.destination).await {
                        Ok(n) => self.count_sent(n),
                        Err(e) => debug!("UDP send to {} failed: {e}", t.destination),
                    }
                }
                Output::Event(e) => match e {
                    Event::Connected => {
                        if media_start.is_none() {
                            note!(self.verbose, "connected (ICE + DTLS), sending media");
                            *media_start = Some(Instant::now());
                            self.stats.connected = true;
                        }
                    }
                    Event::IceConnectionStateChange(state) => {
                        debug!("ICE state {state:?}");
                        if state == IceConnectionState::Disconnected {
                            if disconnected_since.is_none() {
                                warn!("ICE disconnected");
                                *disconnected_since = Some(tokio::time::Instant::now());
                            }
                        } else {
                            if disconnected_since.is_some() && media_start.is_some() {
                                info!("ICE {state:?} again");
                            }
                            *disconnected_since = None;
                        }
                    }
                    Event::KeyframeRequest(req) => {
                        self.stats.keyframe_requests += 1;
                        if self.stats.keyframe_requests == 1 && self.verbose {
                            info!(
                                mid = %req.mid,
                                kind = ?req.kind,
                                "server asked for a keyframe; keyframes come from the file \
                                 (publish does not re-encode), further requests logged at debug"
                            );
                        } else {
                            debug!(mid = %req.mid, kind = ?req.kind, "keyframe request");
                        }
                    }
                    other => debug!("event {other:?}"),
                },
            }
        }
    }

    fn count_sent(&mut self, bytes: usize) {
        self.stats.packets_sent += 1;
        self.stats.packet_bytes_sent += bytes as u64;
        if let Some(live) = self.live {
            live.sent(1, bytes as u64);
        }
    }

    fn receive(&mut self, data: &[u8], source: SocketAddr, proto: Protocol) -> anyhow::Result<()> {
        let contents = match data.try_into() {
            Ok(c) => c,
            Err(e) => {
                debug!("ignoring {} bytes from {source}: {e:?}", data.len());
                return Ok(());
            }
        };
        let mut destination = self.locals.destination_for(source);
        if proto == Protocol::Tcp {
            destination.set_port(ACTIVE_TCP_PORT);
        }
        let input = Input::Receive(
            Instant::now(),
            Receive {
                proto,
                source,
                destination,
                contents,
            },
        );
        if !self.rtc.accepts(&input) {
            debug!("ignoring datagram from {source}");
            return Ok(());
        }
        self.rtc
            .handle_input(input)
            .map_err(|e| anyhow!("WebRTC error: {e}"))
    }

    fn write(&mut self, frame: MediaFrame, start: Instant) -> anyhow::Result<()> {
        let track = match frame.kind {
            FrameKind::Video => self.video.as_ref(),
            FrameKind::Audio => self.audio.as_ref(),
        };
        let Some((mid, pt, clock)) = track.and_then(|t| Some((t.mid, t.pt?, t.clock))) else {
            return Ok(());
        };
        let ticks = rescale(frame.pts_us, clock.get());
        let len = frame.data.len() as u64;
        let Some(mut writer) = self.rtc.writer(mid) else {
            return Ok(());
        };
        if frame.kind == FrameKind::Video && !self.opts.simulcast.is_empty() {
            let rid = simulcast_rids(self.opts).nth(usize::from(frame.layer));
            writer = writer.rid(Rid::from(rid.unwrap_or(MAIN_RID)));
        }
        writer
            .write(
                pt,
                start + frame.send_at,
                MediaTime::new(ticks, clock),
                frame.data,
            )
            .map_err(|e| anyhow!("writing {:?} frame: {e}", frame.kind))?;
        if self.stats.post_to_media.is_none() {
            let t = self.posted.elapsed();
            self.stats.post_to_media = Some(t);
            if let Some(live) = self.live {
                live.media_flowing(t);
            }
        }
        self.stats.bytes += len;
        self.stats.loops = self.stats.loops.max(frame.pass);
        match frame.kind {
            FrameKind::Video => {
                self.stats.video_frames += 1;
                if frame.key {
                    self.stats.keyframes += 1;
                }
            }
            FrameKind::Audio => self.stats.audio_frames += 1,
        }
        Ok(())
    }

    fn log_progress(&self, media_start: Option<Instant>) {
        let secs = media_start.map_or(0.0, |s| s.elapsed().as_secs_f64());
        let kbps = if secs > 0.0 {
            self.stats.bytes as f64 * 8.0 / secs / 1000.0
        } else {
            0.0
        };
        info!(
            video_frames = self.stats.video_frames,
            keyframes = self.stats.keyframes,
            audio_frames = self.stats.audio_frames,
            bytes = self.stats.bytes,
            keyframe_requests = self.stats.keyframe_requests,
            "{secs:.0} s sent, {kbps:.0} kbit/s"
        );
    }
}

/// The next ICE-TCP packet; never without ICE-TCP.
async fn tcp_recv(tcp: &mut Option<TcpLinks>) -> Option<(SocketAddr, Vec<u8>)> {
    match tcp {
        Some(t) => t.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Microseconds to ticks of a `clock` Hz clock, rounded to nearest.
pub(super) fn rescale(us: u64, clock: u32) -> u64 {
    let ticks = (u128::from(us) * u128::from(clock) + 500_000) / 1_000_000;
    u64::try_from(ticks).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rescale_clocks() {
        assert_eq!(rescale(1_000_000, 90_000), 90_000);
        assert_eq!(rescale(20_000, 48_000), 960);
        assert_eq!(rescale(33_333, 90_000), 3000);
    }
}
