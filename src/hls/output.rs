//! The HLS output of one stream: a hub [`Sink`] that feeds the segmenter
//! (MPEG-TS, or fMP4 with LL-HLS parts) and keeps the stream's in-memory
//! [`Store`] (playlist, recent segments, init segments, parts) up to date for
//! the HTTP side, and stores segments, init segments and the playlist through
//! the configured [`storage`] backend (the stream's directory by default).
//! It lives as long as the stream: when the publisher
//! leaves the playlist gets `EXT-X-ENDLIST`; when one comes back the playlist
//! goes on with `EXT-X-DISCONTINUITY`.
//!
//! Files are written by a task of their own, in order (on disk each to a
//! temporary name and renamed: readers never see half a file), so slow
//! storage never delays a part: failures are retried a few times, and when
//! the queue is full an operation is dropped rather than waited for. The file
//! playlist is the plain rendering (no LL-HLS tags), written when a segment
//! is complete, after the segment itself.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use super::cmaf::{self, CmafConfig, CmafSegmenter};
use super::master::{Report, VariantMeter};
use super::playlist::{PartEntry, Playlist, PlaylistConfig, PlaylistFormat, SegmentHead};
use super::segmenter::{Segment, Segmenter, SegmenterConfig};
use super::storage::{self, Uploader};
use super::store::{self, Changes, Edge, Store};
use crate::config::{HlsConfig, HlsFormat};
use crate::hub::{Hub, HubFrame, Publication, Sink};
use crate::media::frame::{CLOCK_HZ, Codec};
use crate::telemetry;

/// File operations queued for the writer task; more are dropped.
const DISK_QUEUE: usize = 256;
/// Parts stay in memory this many target durations after they were made:
/// listed for about three and a segment, downloadable three more after
/// (RFC 8216bis §6.2.2).
const PART_RETENTION_TARGETS: u32 = 7;

/// The tracks of a publication that go into the HLS (the stream's preset
/// decides): a track left out is neither declared nor waited for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tracks {
    /// The H264 video.
    pub video: bool,
    /// The audio as AAC (the preset transcodes the Opus to it).
    pub audio: bool,
    /// The published Opus as it is (the preset copies it): fMP4 carries it,
    /// MPEG-TS does not.
    pub opus: bool,
}

impl Default for Tracks {
    fn default() -> Self {
        Tracks {
            video: true,
            audio: true,
            opus: false,
        }
    }
}

impl Tracks {
    /// The audio codec the HLS carries in this format, if any.
    fn audio_codec(&self, fmp4: bool) -> Option<Codec> {
        if self.audio {
            Some(Codec::Aac)
        } else if self.opus && fmp4 {
            Some(Codec::Opus)
        } else {
            None
        }
    }

    /// The codecs the HLS reader subscribes to.
    fn codecs(&self, fmp4: bool) -> &'static [Codec] {
        match (self.video, self.audio_codec(fmp4)) {
            (true, None) => &[Codec::H264],
            (false, Some(Codec::Opus)) => &[Codec::Opus],
            (true, Some(Codec::Opus)) => &[Codec::H264, Codec::Opus],
            (false, Some(_)) => &[Codec::Aac],
            _ => &[Codec::H264, Codec::Aac],
        }
    }
}

/// The segmenter of the current publication.
enum Muxer {
    Ts(Segmenter),
    Cmaf(CmafSegmenter),
}

impl Muxer {
    fn wants_keyframe(&self) -> bool {
        match self {
            Muxer::Ts(s) => s.wants_keyframe(),
            Muxer::Cmaf(s) => s.wants_keyframe(),
        }
    }
}

/// A file operation for the writer task.
enum DiskOp {
    Write(String, Bytes),
    Remove(String),
}

impl DiskOp {
    fn name(&self) -> &str {
        match self {
            DiskOp::Write(name, _) | DiskOp::Remove(name) => name,
        }
    }
}

/// The writer task's queue.
struct Disk {
    tx: mpsc::Sender<DiskOp>,
    /// Operations dropped on a full queue.
    dropped: metrics::Counter,
    /// Dropping since the last operation queued (one warning per run).
    dropping: AtomicBool,
}

struct Output {
    hub: Arc<Hub>,
    span: tracing::Span,
    config: HlsConfig,
    tracks: Tracks,
    playlist: Playlist,
    store: Arc<Store>,
    disk: Disk,
    /// The publication being segmented, and its segmenter.
    current: Option<(Publication, Muxer)>,
    /// When the current publication's first frame reached this output.
    first_frame_at: Instant,
    /// The last publication that ended: its late frames (the audio
    /// transcoder's flush) are ignored.
    ended: Option<u64>,
    /// Added to the current publication's timestamps so that the HLS
    /// timeline goes on across publishers (players and ffmpeg want
    /// monotonic timestamps even across a discontinuity).
    ts_offset: i64,
    /// Latest timestamp written, with the offset.
    ts_last: i64,
    /// Sequence number the current publication's segment 0 gets.
    sequence_base: u64,
    /// fMP4: the number the next init segment gets, and the current one.
    next_init: u64,
    init: Option<u64>,
    /// LL-HLS: the number the next part gets.
    next_part: u64,
    /// Segments (with the init segment they need) kept in memory and on
    /// disk, oldest first.
    kept: VecDeque<(String, Option<u64>)>,
    /// Init segments kept, oldest first.
    inits: VecDeque<u64>,
    /// LL-HLS parts kept in memory, oldest first, with when they were made.
    parts: VecDeque<(u64, Instant)>,
    /// A rendition of a ladder: what it measures for the master playlist.
    meter: Option<(VariantMeter, Report)>,
}

pub async fn run(
    hub: Arc<Hub>,
    config: HlsConfig,
    dir: PathBuf,
    tracks: Tracks,
    report: Option<Report>,
    mut shutdown: watch::Receiver<bool>,
) {
    let span = tracing::info_span!("hls", stream = %hub.name(), format = ?config.format);
    let fmp4 = config.format.is_fmp4();
    let uploader = match storage::open(&dir) {
        Ok(uploader) => uploader,
        Err(e) => {
            tracing::error!(parent: &span, dir = %dir.display(), error = %e, "cannot open the HLS storage; HLS is off for this stream");
            return;
        }
    };
    let (tx, disk_rx) = mpsc::channel(DISK_QUEUE);
    let disk = Disk {
        tx,
        dropped: telemetry::storage_dropped(uploader.kind()),
        dropping: AtomicBool::new(false),
    };
    let writer = tokio::spawn(write_files(uploader, disk_rx, span.clone()));
    let store = Arc::new(Store::new());
    store::register(&dir, store.clone());
    let playlist_config = PlaylistConfig {
        target_duration: config.target(),
        window: config.playlist_size,
    };
    let format = match config.format {
        HlsFormat::Mpegts => PlaylistFormat::MpegTs,
        HlsFormat::Fmp4 => PlaylistFormat::Fmp4,
        HlsFormat::Llhls => PlaylistFormat::LowLatency {
            part_target: config.part_target(),
        },
    };
    let out = Output {
        hub: hub.clone(),
        span: span.clone(),
        playlist: Playlist::with_format(playlist_config, format),
        store: store.clone(),
        disk,
        config,
        tracks,
        current: None,
        first_frame_at: Instant::now(),
        ended: None,
        ts_offset: 0,
        ts_last: 0,
        sequence_base: 0,
        next_init: 0,
        init: None,
        next_part: 0,
        kept: VecDeque::new(),
        inits: VecDeque::new(),
        parts: VecDeque::new(),
        meter: report.map(|r| (VariantMeter::default(), r)),
    };
    // Frames are muxed in the publisher's task (see `Sink`); this task
    // only waits for the stream to close.
    let attached = hub.attach("hls", tracks.codecs(fmp4), Box::new(out));
    let _ = shutdown.changed().await;
    // The last segment and the playlist's end are queued for the writer,
    // which finishes once the output is dropped.
    attached.detach();
    let _ = writer.await;
    store::unregister(&dir, &store);
}

impl Sink for Output {
    fn frame(&mut self, frame: HubFrame) {
        Output::frame(self, frame);
    }

    fn stopped(&mut self, _publication: Publication) {
        self.end();
    }

    fn finish(&mut self) {
        self.end();
    }
}

impl Output {
    fn fmp4(&self) -> bool {
        self.config.format.is_fmp4()
    }

    fn low_latency(&self) -> bool {
        self.config.format.is_low_latency()
    }

    fn frame(&mut self, hf: HubFrame) {
        let HubFrame {
            publication,
            mut frame,
        } = hf;
        if self.ended == Some(publication.id) {
            return;
        }
        if self.current.as_ref().map(|(p, _)| p.id) != Some(publication.id) {
            self.end();
            let video = publication.video && self.tracks.video;
            let audio = publication.audio && self.tracks.audio_codec(self.fmp4()).is_some();
            let muxer = if self.fmp4() {
                let part_duration = self.low_latency().then(|| self.config.part_target());
                Muxer::Cmaf(CmafSegmenter::new(
                    CmafConfig {
                        target_duration: self.config.target(),
                        part_duration,
                        ..Default::default()
                    },
                    video,
                    audio,
                ))
            } else {
                Muxer::Ts(Segmenter::new(
                    SegmenterConfig {
                        target_duration: self.config.target(),
                        ..Default::default()
                    },
                    video,
                    audio,
                ))
            };
            self.sequence_base = self.playlist.next_sequence();
            if self.sequence_base > 0 {
                // Start a second after the last publication's end.
                self.ts_offset = self.ts_last + CLOCK_HZ;
            }
            self.current = Some((publication, muxer));
            self.first_frame_at = Instant::now();
        }
        frame.pts += self.ts_offset;
        frame.dts += self.ts_offset;
        self.ts_last = self.ts_last.max(frame.pts);
        let Some((_, muxer)) = self.current.as_mut() else {
            return;
        };
        let kind = frame.codec().kind();
        if let Some((meter, _)) = self.meter.as_mut() {
            meter.frame(&frame.params);
        }
        match muxer {
            Muxer::Ts(segmenter) => match segmenter.push(kind, &frame, unix_ms()) {
                Ok(Some(segment)) => self.ts_segment(segment),
                Ok(None) => {}
                Err(e) => tracing::debug!(parent: &self.span, error = %e, "frame not muxed"),
            },
            Muxer::Cmaf(segmenter) => match segmenter.push(kind, &frame, unix_ms()) {
                Ok(events) => self.cmaf_events(events),
                Err(e) => tracing::debug!(parent: &self.span, error = %e, "frame not muxed"),
            },
        }
        if self
            .current
            .as_ref()
            .is_some_and(|(_, m)| m.wants_keyframe())
        {
            self.hub.request_keyframe();
        }
    }

    /// The publication ended: flush the last segment and end the playlist.
    fn end(&mut self) {
        let Some((publication, muxer)) = self.current.take() else {
            return;
        };
        self.ended = Some(publication.id);
        match muxer {
            Muxer::Ts(mut segmenter) => {
                if let Some(segment) = segmenter.finish() {
                    self.ts_segment(segment);
                }
            }
            Muxer::Cmaf(mut segmenter) => {
                let events = segmenter.finish();
                self.cmaf_events(events);
            }
        }
        self.playlist.end();
        self.publish(Changes::default(), true);
        tracing::info!(parent: &self.span, "playlist ended");
    }

    /// A new segment's head: a returning publisher's first segment follows
    /// a break.
    fn head(&self, sequence: u64, discontinuity: bool, program_date_time_ms: i64) -> SegmentHead {
        let sequence = sequence + self.sequence_base;
        SegmentHead {
            sequence,
            discontinuity: discontinuity
                || (sequence == self.sequence_base && self.sequence_base > 0),
            program_date_time_ms,
            init: self.init,
        }
    }

    fn ts_segment(&mut self, segment: Segment) {
        let head = self.head(
            segment.sequence,
            segment.discontinuity,
            segment.program_date_time_ms,
        );
        let data = Bytes::from(segment.data);
        self.segment(head, segment.duration, data);
    }

    fn cmaf_events(&mut self, events: Vec<cmaf::Event>) {
        for event in events {
            match event {
                cmaf::Event::Init(data) => {
                    let number = self.next_init;
                    self.next_init += 1;
                    self.init = Some(number);
                    self.inits.push_back(number);
                    let name = Playlist::init_uri(number);
                    let mut changes = Changes::default();
                    changes.insert.push((name.clone(), data.clone()));
                    self.store.apply(changes);
                    self.write(name, data);
                    tracing::debug!(parent: &self.span, init = number, "init segment");
                }
                cmaf::Event::Part(part) if self.low_latency() => {
                    let head =
                        self.head(part.segment, part.discontinuity, part.program_date_time_ms);
                    let number = self.next_part;
                    self.next_part += 1;
                    let entry = PartEntry {
                        number,
                        duration_ms: ticks_to_ms(part.duration),
                        independent: part.independent,
                    };
                    self.playlist.push_part(head, entry);
                    let mut changes = Changes::default();
                    changes.insert.push((Playlist::part_uri(number), part.data));
                    self.parts.push_back((number, Instant::now()));
                    let retention = self.target() * PART_RETENTION_TARGETS;
                    while let Some(&(old, made)) = self.parts.front() {
                        if made.elapsed() <= retention {
                            break;
                        }
                        self.parts.pop_front();
                        changes.remove.push(Playlist::part_uri(old));
                    }
                    self.publish(changes, false);
                }
                cmaf::Event::Part(_) => {}
                cmaf::Event::Segment(segment) => {
                    let head = self.head(
                        segment.sequence,
                        segment.discontinuity,
                        segment.program_date_time_ms,
                    );
                    self.segment(head, segment.duration, segment.data);
                }
            }
        }
    }

    /// Lists a complete segment: in memory at once, then on disk (the
    /// segment, then the playlist naming it), dropping what slid out.
    fn segment(&mut self, head: SegmentHead, duration: f64, data: Bytes) {
        let name = self.playlist.uri(head.sequence);
        let bytes = data.len();
        let _removed = self.playlist.push_segment(head, duration);
        if let Some((meter, report)) = self.meter.as_mut() {
            meter.segment(bytes, duration);
            report.send(meter.variant());
        }
        telemetry::counters().hls_segments.increment(1);
        let mut changes = Changes::default();
        changes.insert.push((name.clone(), data.clone()));
        self.kept.push_back((name.clone(), head.init));
        // Keep a few segments after they leave the playlist for late players.
        let keep = self.config.playlist_size + self.config.keep_extra;
        let mut removed = Vec::new();
        while self.kept.len() > keep {
            if let Some((old, _)) = self.kept.pop_front() {
                removed.push(old);
            }
        }
        // Init segments no kept segment (nor the open one) needs.
        let oldest_init = self
            .kept
            .iter()
            .filter_map(|(_, init)| *init)
            .chain(self.init)
            .min();
        while let Some(&old) = self.inits.front() {
            if oldest_init.is_none_or(|oldest| old >= oldest) {
                break;
            }
            self.inits.pop_front();
            removed.push(Playlist::init_uri(old));
        }
        changes.remove.extend(removed.iter().cloned());
        self.write(name, data);
        self.publish(changes, true);
        for old in removed {
            self.send(DiskOp::Remove(old));
        }
        if head.sequence == self.sequence_base {
            let ms = self.first_frame_at.elapsed().as_secs_f64() * 1000.0;
            tracing::info!(parent: &self.span, sequence = head.sequence, duration, since_first_frame_ms = ms, "first segment listed");
        }
        tracing::debug!(parent: &self.span, sequence = head.sequence, duration, bytes, "segment written");
    }

    /// The playlist's target duration, as a duration.
    fn target(&self) -> Duration {
        Duration::from_secs(self.playlist.target_duration())
    }

    /// Renders the playlist into the store with `changes` and wakes
    /// waiting requests; with `to_disk`, writes the file playlist too.
    fn publish(&mut self, mut changes: Changes, to_disk: bool) {
        if self.low_latency()
            && let Some((_, report)) = self.meter.as_ref()
        {
            let reports = report.edges(self.playlist.report_edge());
            self.playlist.set_rendition_reports(reports);
        }
        let full = Bytes::from(self.playlist.render());
        let delta = self
            .low_latency()
            .then(|| Bytes::from(self.playlist.render_delta()));
        changes.playlist = Some((full.clone(), delta));
        changes.edge = Some(Edge {
            version: 0,
            last_segment: self.playlist.last_segment(),
            last_part: self.playlist.last_part(),
            next_part: self.playlist.next_part(),
            ended: self.playlist.is_ended(),
            target_duration: self.playlist.target_duration(),
            part_target: self.low_latency().then(|| self.config.part_target()),
        });
        self.store.apply(changes);
        if to_disk {
            let plain = if self.low_latency() {
                Bytes::from(self.playlist.render_plain())
            } else {
                full
            };
            self.write("index.m3u8".to_owned(), plain);
        }
    }

    fn write(&self, name: String, data: Bytes) {
        self.send(DiskOp::Write(name, data));
    }

    /// Queues `op` for the writer without waiting: when storage is so far
    /// behind that the queue is full, the operation is dropped and counted.
    fn send(&self, op: DiskOp) {
        // The writer only stops once this output is gone.
        match self.disk.tx.try_send(op) {
            Err(mpsc::error::TrySendError::Full(op)) => {
                self.disk.dropped.increment(1);
                if !self.disk.dropping.swap(true, Ordering::Relaxed) {
                    tracing::warn!(stream = %self.hub.name(), file = op.name(), "HLS storage is behind: its queue is full, files are dropped");
                }
            }
            _ => self.disk.dropping.store(false, Ordering::Relaxed),
        }
    }
}

/// Clears what an earlier run left, then writes and removes files in the
/// order asked until the output is gone. A write that a later operation on
/// the same file makes moot (storage catching up) is skipped.
async fn write_files(storage: Uploader, mut ops: mpsc::Receiver<DiskOp>, span: tracing::Span) {
    storage.clear(&span).await;
    let mut pending = VecDeque::new();
    loop {
        while pending.len() < DISK_QUEUE {
            let Ok(op) = ops.try_recv() else { break };
            pending.push_back(op);
        }
        let op = match pending.pop_front() {
            Some(op) => op,
            None => match ops.recv().await {
                Some(op) => op,
                None => break,
            },
        };
        match op {
            DiskOp::Write(name, _) if pending.iter().any(|later| later.name() == name) => {}
            DiskOp::Write(name, data) => {
                storage.put(&name, data, &span).await;
            }
            DiskOp::Remove(name) => {
                storage.delete(&name, &span).await;
            }
        }
    }
    storage.finish(&span).await;
}

/// 90 kHz ticks in milliseconds, rounded.
fn ticks_to_ms(ticks: i64) -> u64 {
    u64::try_from((ticks.max(0) * 1000 + CLOCK_HZ / 2) / CLOCK_HZ).unwrap_or(0)
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
