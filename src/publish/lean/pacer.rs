//! The media of every connected lean session, sent by a few pacer tasks instead of one timer
//! per session.
//!
//! A session hands its [`Lane`] (socket, SRTP keys, RTP streams, its place in the clip) to a
//! pacer once DTLS is up. Every [`PACE`] the pacer sends each lane's due frames, and its
//! sender reports once a second, with one `sendmmsg` per lane. A hundred sessions are then two
//! hundred wake-ups a second instead of several thousand. A frame leaves at most one step
//! late. The session keeps ICE (consent checks) and learns how its media went from the lane's
//! [`LaneReport`].

use std::io::IoSlice;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use nix::errno::Errno;
use nix::sys::socket::{ControlMessage, MsgFlags, MultiHeaders, SockaddrIn, sendmmsg};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use super::DATAGRAM;
use super::rtp::{RtpStream, ntp_time};
use super::srtp::{SrtpError, SrtpSender};
use crate::publish::load::Live;
use crate::publish::source::{ClipCursor, FrameKind, MediaFrame};

/// How often a pacer sends what is due.
pub(super) const PACE: Duration = Duration::from_millis(5);
/// Time between sender reports of an SSRC.
const SENDER_REPORT_EVERY: Duration = Duration::from_secs(1);
/// Sessions one pacer task sends for (about 20% of a core at 1 Mbit/s each).
const LANES_PER_PACER: usize = 250;
/// Datagrams one `sendmmsg` takes at most.
const BATCH: usize = 32;

/// One connected session's media.
pub(super) struct Lane {
    /// Connected to the server's address.
    pub(super) socket: Arc<UdpSocket>,
    pub(super) srtp: SrtpSender,
    pub(super) video: Option<RtpStream>,
    pub(super) audio: Option<RtpStream>,
    pub(super) cursor: ClipCursor,
    pub(super) live: Option<Arc<Live>>,
    /// When the POST was sent (for POST→media).
    pub(super) posted: Instant,
}

/// What a lane sent, when it ends.
#[derive(Debug, Default, Clone)]
pub(super) struct LaneReport {
    pub(super) video_frames: u64,
    pub(super) keyframes: u64,
    pub(super) audio_frames: u64,
    /// Media payload bytes.
    pub(super) bytes: u64,
    pub(super) loops: u64,
    /// The whole clip went out (no `--loop`).
    pub(super) finished: bool,
    pub(super) media_time: Duration,
    pub(super) post_to_media: Option<Duration>,
    pub(super) packets: u64,
    pub(super) packet_bytes: u64,
    /// Datagrams the socket would not take (full send buffer) or refused.
    pub(super) send_failures: u64,
    /// Why the lane stopped early, if it did.
    pub(super) error: Option<String>,
}

/// A lane on its pacer.
struct Running {
    lane: Lane,
    start: Instant,
    pending: Option<MediaFrame>,
    next_report: Instant,
    /// The next transport-wide sequence number (TWCC), shared by the streams.
    twcc_seq: u16,
    /// This round's datagrams, back to back, and their lengths.
    out: Vec<u8>,
    lens: Vec<usize>,
    report: LaneReport,
    stop: Arc<AtomicBool>,
    done: Option<oneshot::Sender<LaneReport>>,
}

/// The pacer tasks of a run; lanes go to them in turn.
#[derive(Clone)]
pub(crate) struct Pacers {
    queues: Arc<[mpsc::UnboundedSender<Running>]>,
    next: Arc<AtomicUsize>,
}

/// A session's hold on its lane: stop it, or learn that it ended.
pub(super) struct LaneHandle {
    stop: Arc<AtomicBool>,
    pub(super) done: oneshot::Receiver<LaneReport>,
}

impl LaneHandle {
    /// Asks the pacer to stop the lane; its report follows on `done`.
    pub(super) fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Pacers {
    /// Starts the pacer tasks for `sessions` on the current runtime: one per
    /// `LANES_PER_PACER`, at most one per core. They end when the last `Pacers` clone is
    /// dropped and their lanes have ended.
    pub(crate) fn start(sessions: u32) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let n = (sessions as usize)
            .div_ceil(LANES_PER_PACER)
            .clamp(1, cores);
        let queues: Vec<_> = (0..n)
            .map(|_| {
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(pace(rx));
                tx
            })
            .collect();
        Self {
            queues: queues.into(),
            next: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Starts sending `lane`'s clip now.
    pub(super) fn add(&self, lane: Lane) -> LaneHandle {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, done) = oneshot::channel();
        let start = Instant::now();
        let running = Running {
            lane,
            start,
            pending: None,
            next_report: start,
            twcc_seq: 0,
            out: Vec::with_capacity(8 * DATAGRAM),
            lens: Vec::new(),
            report: LaneReport::default(),
            stop: stop.clone(),
            done: Some(tx),
        };
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.queues.len();
        if let Err(mpsc::error::SendError(mut r)) = self.queues[i].send(running) {
            r.end(Some("the pacer stopped".to_owned()));
        }
        LaneHandle { stop, done }
    }
}

async fn pace(mut queue: mpsc::UnboundedReceiver<Running>) {
    let mut lanes: Vec<Running> = Vec::new();
    let mut tick = tokio::time::interval(PACE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        if lanes.is_empty() {
            match queue.recv().await {
                Some(lane) => lanes.push(lane),
                None => return,
            }
        }
        tick.tick().await;
        while let Ok(lane) = queue.try_recv() {
            lanes.push(lane);
        }
        let now = Instant::now();
        lanes.retain_mut(|lane| lane.step(now));
    }
}

impl Running {
    /// Sends what is due; false once the lane has ended (and reported).
    fn step(&mut self, now: Instant) -> bool {
        let closed = self.done.as_ref().is_none_or(|d| d.is_closed());
        if closed || self.stop.load(Ordering::Relaxed) {
            self.end(None);
            return false;
        }
        let result = self.send_due(now);
        self.flush();
        match result {
            Ok(true) => true,
            Ok(false) => {
                self.report.finished = true;
                self.end(None);
                false
            }
            Err(e) => {
                self.end(Some(format!("encrypting media: {e}")));
                false
            }
        }
    }

    /// Packetizes the frames that are due, and the sender reports; false at the end of the clip.
    fn send_due(&mut self, now: Instant) -> Result<bool, SrtpError> {
        loop {
            if self.pending.is_none() {
                self.pending = self.lane.cursor.next();
                if self.pending.is_none() {
                    return Ok(false);
                }
            }
            let start = self.start;
            let Some(frame) = self.pending.take_if(|f| start + f.send_at <= now) else {
                break;
            };
            self.send_frame(&frame)?;
        }
        if now >= self.next_report {
            self.next_report = now + SENDER_REPORT_EVERY;
            self.sender_reports(now - self.start)?;
        }
        Ok(true)
    }

    /// Packetizes and encrypts one frame into the send buffer.
    fn send_frame(&mut self, frame: &MediaFrame) -> Result<(), SrtpError> {
        let (stream, h264) = match frame.kind {
            FrameKind::Video => (self.lane.video.as_mut(), true),
            FrameKind::Audio => (self.lane.audio.as_mut(), false),
        };
        let Some(stream) = stream else {
            return Ok(());
        };
        let mut plain = [0u8; DATAGRAM];
        let (out, lens, srtp) = (&mut self.out, &mut self.lens, &mut self.lane.srtp);
        stream.packetize(
            &frame.data,
            frame.pts_us,
            h264,
            &mut self.twcc_seq,
            &mut plain,
            |packet, header, roc| {
                let at = out.len();
                out.resize(at + DATAGRAM, 0);
                let n = srtp.protect_rtp(packet, header, roc, &mut out[at..])?;
                out.truncate(at + n);
                lens.push(n);
                Ok::<_, SrtpError>(())
            },
        )?;
        let report = &mut self.report;
        if report.post_to_media.is_none() {
            let t = self.lane.posted.elapsed();
            report.post_to_media = Some(t);
            if let Some(live) = &self.lane.live {
                live.media_flowing(t);
            }
        }
        report.bytes += frame.data.len() as u64;
        report.loops = report.loops.max(frame.pass);
        match frame.kind {
            FrameKind::Video => {
                report.video_frames += 1;
                report.keyframes += u64::from(frame.key);
            }
            FrameKind::Audio => report.audio_frames += 1,
        }
        Ok(())
    }

    /// One SRTCP sender report per SSRC that has sent.
    fn sender_reports(&mut self, media_time: Duration) -> Result<(), SrtpError> {
        let ntp = ntp_time(SystemTime::now());
        let now_us = media_time.as_micros() as u64;
        let streams = [self.lane.video.as_ref(), self.lane.audio.as_ref()];
        for report in streams
            .into_iter()
            .flatten()
            .filter_map(|s| s.sender_report(now_us, ntp))
        {
            let at = self.out.len();
            self.out.resize(at + DATAGRAM, 0);
            let n = self.lane.srtp.protect_rtcp(&report, &mut self.out[at..])?;
            self.out.truncate(at + n);
            self.lens.push(n);
        }
        Ok(())
    }

    /// Sends the round's datagrams, `BATCH` per `sendmmsg`. What the socket does not take now
    /// (a full send buffer) is dropped and counted: a pacer never waits for one session.
    fn flush(&mut self) {
        let mut done = 0;
        while done < self.lens.len() {
            let socket = &self.lane.socket;
            let sent = socket.try_io(tokio::io::Interest::WRITABLE, || {
                send_many(socket, &self.out, &self.lens, done)
            });
            match sent {
                Ok((packets, bytes)) => {
                    done += packets;
                    self.report.packets += packets as u64;
                    self.report.packet_bytes += bytes as u64;
                    if let Some(live) = &self.lane.live {
                        live.sent(packets as u64, bytes as u64);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let dropped = self.lens.len() - done;
                    if self.report.send_failures == 0 {
                        warn!("UDP send failed, {dropped} datagrams dropped: {e}");
                    } else {
                        debug!("UDP send failed, {dropped} datagrams dropped: {e}");
                    }
                    self.report.send_failures += dropped as u64;
                    break;
                }
            }
        }
        self.out.clear();
        self.lens.clear();
    }

    /// Hands the report to the session.
    fn end(&mut self, error: Option<String>) {
        self.report.media_time = self.start.elapsed();
        self.report.error = error;
        if let Some(done) = self.done.take() {
            let _ = done.send(std::mem::take(&mut self.report));
        }
    }
}

/// False once the kernel refused UDP segmentation offload (GSO) on a socket: then every
/// datagram is a message of its own.
static GSO: AtomicBool = AtomicBool::new(true);
/// Segments one GSO message carries at most (the kernel's limit is 64).
const MAX_SEGMENTS: usize = 32;

/// Sends the datagrams from the `first`th on (back to back in `out`, lengths in `lens`) on the
/// connected `socket` with one `sendmmsg`; returns how many went and their bytes.
///
/// With GSO, a run of datagrams of the largest size (a frame's full FU-A packets), and the
/// shorter one after it, is one message the kernel splits: the IP layer runs once for the run.
/// A datagram not longer than the segment size goes out as it is.
fn send_many(
    socket: &UdpSocket,
    out: &[u8],
    lens: &[usize],
    first: usize,
) -> std::io::Result<(usize, usize)> {
    const NO_ADDRESS: [Option<SockaddrIn>; BATCH] = [None; BATCH];
    let gso = GSO.load(Ordering::Relaxed);
    let segment = lens[first..].iter().copied().max().unwrap_or(0);
    let mut at: usize = lens[..first].iter().sum();
    let mut i = first;
    let mut slices: Vec<[IoSlice<'_>; 1]> = Vec::new();
    let mut counts: Vec<usize> = Vec::new();
    while i < lens.len() && slices.len() < BATCH {
        // A run of full segments and at most one shorter datagram at its end.
        let mut k = 1;
        if gso && lens[i] == segment {
            while i + k < lens.len() && k < MAX_SEGMENTS {
                let n = lens[i + k];
                k += 1;
                if n != segment {
                    break;
                }
            }
        }
        let bytes: usize = lens[i..i + k].iter().sum();
        slices.push([IoSlice::new(&out[at..at + bytes])]);
        counts.push(k);
        at += bytes;
        i += k;
    }
    let size = u16::try_from(segment).unwrap_or(u16::MAX);
    let cmsg = [ControlMessage::UdpGsoSegments(&size)];
    let cmsgs: &[ControlMessage<'_>] = if gso { &cmsg } else { &[] };
    let space = gso.then(|| nix::cmsg_space!(u16));
    // The headers hold raw pointers (not `Send`): made per call, not kept across awaits.
    let mut headers = MultiHeaders::<SockaddrIn>::preallocate(slices.len(), space);
    let results = match sendmmsg(
        socket.as_raw_fd(),
        &mut headers,
        &slices,
        &NO_ADDRESS[..slices.len()],
        cmsgs,
        MsgFlags::empty(),
    ) {
        Err(Errno::EIO | Errno::EINVAL) if gso => {
            warn!("the kernel refused UDP GSO; sending datagram by datagram");
            GSO.store(false, Ordering::Relaxed);
            // Not `WouldBlock`: that would clear the socket's readiness. The caller retries.
            return Err(std::io::ErrorKind::Interrupted.into());
        }
        r => r?,
    };
    Ok(results
        .zip(&counts)
        .fold((0, 0), |(packets, bytes), (r, k)| {
            (packets + k, bytes + r.bytes)
        }))
}
