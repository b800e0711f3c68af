//! Cuts a stream of frames into fMP4 (CMAF) segments and LL-HLS parts, with
//! the [`Fragmenter`] of `fmp4`.
//!
//! Rules, as the MPEG-TS segmenter's where they overlap:
//! - with video, everything is skipped until the first video keyframe (audio
//!   stamped before it too, even when it arrives after it), and a
//!   segment is cut at the first video keyframe whose DTS is at least the
//!   segment start plus the target duration; audio-only streams cut at the
//!   first audio frame past the target;
//! - a video segment that reaches [`CmafConfig::max_duration`] without a
//!   keyframe is cut at the next video frame anyway, so memory stays bounded;
//! - the init segment needs every track's codec parameters: muxing starts
//!   once each declared track has sent a frame, or after
//!   [`CmafConfig::track_wait`] of media without the missing one (it joins
//!   later with a new init segment);
//! - new codec parameters on a track (or a track that joins) need a new init
//!   segment: the segment is cut at the next keyframe (at once for audio
//!   only streams) with [`Event::Init`] and a discontinuity; frames of the
//!   changed track are dropped until then. A timestamp going back on a
//!   keyframe is a break too (a discontinuity, dates from the wall clock
//!   again).
//!
//! With [`CmafConfig::part_duration`] (LL-HLS), segments are made of parts
//! cut on the leading track (video when there is video): a part is cut as
//! soon as the next frame would take it past the part target (judging by the
//! shortest of the last three frame intervals), or retroactively at the
//! previous frame when a late frame took it past, so a part only exceeds the
//! target when a single frame interval does. A video keyframe starts a part
//! (`independent`) when it starts a segment, and within a segment when the
//! part before it has reached 85% of the target (RFC 8216bis §4.4.4.9: only
//! independent and last parts may be shorter); otherwise it stays inside its
//! part. A part is complete once the frame after it arrives (the fragmenter
//! needs the next DTS for the last sample's duration). Without parts a
//! segment is one fragment.
//!
//! A segment's bytes are its parts' bytes one after the other. Durations come
//! from the leading track's DTS; the wall clock (`now_unix_ms`) only anchors
//! the program date time of the first segment after a start or a break.
//! [`TIMESTAMP_OFFSET`] is added to every timestamp, as in the MPEG-TS
//! muxer, so early audio and B-frame DTS stay positive.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};

use super::fmp4::{Fmp4Error, Fragment, Fragmenter, TrackConfig};
use crate::media::frame::{CLOCK_HZ, CodecParams, Frame, TrackKind};

/// Added to every timestamp before it is muxed (1 s, as in MPEG-TS).
pub const TIMESTAMP_OFFSET: i64 = super::ts::TIMESTAMP_OFFSET;

/// Frame duration assumed for the leading track until two frames are seen
/// (one frame at 30 fps).
const DEFAULT_FRAME_TICKS: i64 = CLOCK_HZ / 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CmafConfig {
    /// Shortest segment that is cut on a keyframe.
    pub target_duration: Duration,
    /// LL-HLS part target: no part is longer (see the module docs); `None`
    /// makes a segment one fragment.
    pub part_duration: Option<Duration>,
    /// Longest video segment before it is cut without a keyframe.
    pub max_duration: Duration,
    /// Media waited for before muxing starts without a declared track that
    /// has not sent anything yet.
    pub track_wait: Duration,
}

impl Default for CmafConfig {
    fn default() -> Self {
        Self {
            target_duration: Duration::from_secs(2),
            part_duration: None,
            max_duration: Duration::from_secs(10),
            track_wait: Duration::from_secs(1),
        }
    }
}

/// What a frame (or [`CmafSegmenter::finish`]) produced, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A new init segment: the segments from here on need it.
    Init(Bytes),
    /// A part of the segment being built.
    Part(Part),
    /// The segment being built is complete.
    Segment(Segment),
}

/// One part (LL-HLS); without parts, each segment is one part.
#[derive(Debug, Clone, PartialEq)]
pub struct Part {
    /// Sequence number of the segment it belongs to.
    pub segment: u64,
    /// Index in that segment, from 0.
    pub index: u32,
    /// 90 kHz ticks.
    pub duration: i64,
    /// Starts with a video keyframe (always true without video).
    pub independent: bool,
    /// `styp` + `moof` + `mdat`.
    pub data: Bytes,
    /// The segment's: it follows a break.
    pub discontinuity: bool,
    /// The segment's: Unix time of its first frame, in milliseconds.
    pub program_date_time_ms: i64,
}

/// One complete segment.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    /// Media sequence number, from 0, one more for each segment.
    pub sequence: u64,
    /// Seconds, from the timestamps.
    pub duration: f64,
    /// Its parts' bytes, one after the other.
    pub data: Bytes,
    /// The segment follows a break (new publisher, new codec parameters).
    pub discontinuity: bool,
    /// Unix time of the segment's first frame, in milliseconds.
    pub program_date_time_ms: i64,
    /// Starts with a video keyframe (always true for audio-only streams).
    pub starts_with_keyframe: bool,
    /// Parts it was made of.
    pub parts: u32,
}

/// Sans-IO fMP4 segmenter: frames in, [`Event`]s out.
#[derive(Debug)]
pub struct CmafSegmenter {
    target_ticks: i64,
    max_ticks: i64,
    part_ticks: Option<i64>,
    wait_ticks: i64,
    has_video: bool,
    has_audio: bool,
    /// Newest codec parameters seen on each track.
    video_params: Option<Arc<CodecParams>>,
    audio_params: Option<Arc<CodecParams>>,
    /// The fragmenter and the parameters its init segment was made with.
    muxing: Option<Muxing>,
    /// Frames (with their wall clock) held until every track is known.
    waiting: Vec<(TrackKind, Frame, i64)>,
    open: Option<Open>,
    next_sequence: u64,
    /// The next segment gets `discontinuity = true`.
    discontinuity_pending: bool,
    /// Codec parameters changed: new init segment at the next keyframe.
    reinit_pending: bool,
    /// (stream ticks, unix ms) pair the program date times are derived from.
    anchor: Option<(i64, i64)>,
    /// DTS of the latest leading-track frame, and the interval before it.
    lead_last: Option<i64>,
    lead_step: i64,
    /// The last three leading-track frame intervals: the shortest is what
    /// the next one is expected to be at least (cadences such as 33, 33,
    /// 34 ms must not look longer than they are).
    recent_steps: [i64; 3],
}

#[derive(Debug)]
struct Muxing {
    fragmenter: Fragmenter,
    video: Option<Arc<CodecParams>>,
    audio: Option<Arc<CodecParams>>,
}

/// The segment being built.
#[derive(Debug)]
struct Open {
    sequence: u64,
    start: i64,
    part_start: i64,
    parts: Vec<Bytes>,
    discontinuity: bool,
    program_date_time_ms: i64,
    starts_with_keyframe: bool,
}

impl CmafSegmenter {
    /// A segmenter for a stream with the given tracks.
    pub fn new(config: CmafConfig, has_video: bool, has_audio: bool) -> Self {
        let ticks = |d: Duration| {
            i64::try_from(d.as_micros())
                .unwrap_or(i64::MAX)
                .saturating_mul(CLOCK_HZ)
                / 1_000_000
        };
        let target_ticks = ticks(config.target_duration);
        Self {
            target_ticks,
            max_ticks: ticks(config.max_duration).max(target_ticks),
            part_ticks: config.part_duration.map(|d| ticks(d).max(1)),
            wait_ticks: ticks(config.track_wait),
            has_video,
            has_audio,
            video_params: None,
            audio_params: None,
            muxing: None,
            waiting: Vec::new(),
            open: None,
            next_sequence: 0,
            discontinuity_pending: false,
            reinit_pending: false,
            anchor: None,
            lead_last: None,
            lead_step: DEFAULT_FRAME_TICKS,
            recent_steps: [DEFAULT_FRAME_TICKS; 3],
        }
    }

    /// Adds one frame; returns what it completed. A refused frame (an
    /// undeclared track, broken data, a DTS that does not move on) changes
    /// nothing.
    pub fn push(
        &mut self,
        kind: TrackKind,
        frame: &Frame,
        now_unix_ms: i64,
    ) -> Result<Vec<Event>, Fmp4Error> {
        let declared = match kind {
            TrackKind::Video => self.has_video,
            TrackKind::Audio => self.has_audio,
        };
        if !declared {
            return Err(Fmp4Error::UndeclaredTrack(kind));
        }
        let codec = frame.codec();
        if codec.kind() != kind {
            return Err(Fmp4Error::KindMismatch { kind, codec });
        }
        let mut frame = frame.clone();
        frame.pts = frame.pts.saturating_add(TIMESTAMP_OFFSET);
        frame.dts = frame.dts.saturating_add(TIMESTAMP_OFFSET);
        let mut events = Vec::new();
        if self.muxing.is_none() {
            self.wait(kind, frame, now_unix_ms, &mut events)?;
        } else {
            self.feed(kind, &frame, now_unix_ms, &mut events)?;
        }
        Ok(events)
    }

    /// True while the stream has video and a keyframe is overdue: none yet,
    /// the open segment has reached its target duration, or new codec
    /// parameters wait for one. The caller sends a PLI (and rate-limits it).
    pub fn wants_keyframe(&self) -> bool {
        if !self.has_video {
            return false;
        }
        match &self.open {
            None => self.waiting.is_empty(),
            Some(open) => {
                self.reinit_pending
                    || self.lead_last.unwrap_or(open.start) - open.start >= self.target_ticks
            }
        }
    }

    /// Flushes the open segment. The segmenter can go on afterwards: it
    /// waits for a new keyframe, starts with a new init segment, the
    /// sequence numbers continue, and the next segment is marked as a
    /// discontinuity.
    pub fn finish(&mut self) -> Vec<Event> {
        let mut events = Vec::new();
        if self.muxing.is_none() && !self.waiting.is_empty() {
            // A publication shorter than the wait: mux what came.
            let _ = self.start(&mut events);
        }
        if let Some(lead_last) = self.lead_last {
            let end = lead_last.saturating_add(self.lead_step);
            self.flush(end, &mut events);
        }
        self.muxing = None;
        self.waiting.clear();
        self.open = None;
        self.anchor = None;
        self.lead_last = None;
        self.lead_step = DEFAULT_FRAME_TICKS;
        self.recent_steps = [DEFAULT_FRAME_TICKS; 3];
        self.reinit_pending = false;
        self.discontinuity_pending |= self.next_sequence > 0;
        events
    }

    fn lead_kind(&self) -> TrackKind {
        if self.has_video {
            TrackKind::Video
        } else {
            TrackKind::Audio
        }
    }

    /// Can this frame start a segment: a video keyframe, or any frame of an
    /// audio-only stream.
    fn starts(&self, kind: TrackKind, frame: &Frame) -> bool {
        kind == self.lead_kind() && (kind == TrackKind::Audio || frame.key)
    }

    fn note_params(&mut self, kind: TrackKind, frame: &Frame) {
        let slot = match kind {
            TrackKind::Video => &mut self.video_params,
            TrackKind::Audio => &mut self.audio_params,
        };
        let same = slot
            .as_ref()
            .is_some_and(|p| Arc::ptr_eq(p, &frame.params) || **p == *frame.params);
        if !same {
            *slot = Some(Arc::clone(&frame.params));
        }
    }

    /// Before muxing: holds frames from the first keyframe until every
    /// declared track is known or the wait is over.
    fn wait(
        &mut self,
        kind: TrackKind,
        frame: Frame,
        now: i64,
        events: &mut Vec<Event>,
    ) -> Result<(), Fmp4Error> {
        if self.waiting.is_empty() && !self.starts(kind, &frame) {
            return Ok(());
        }
        if let Some((_, first, _)) = self.waiting.first()
            && frame.dts < first.dts
        {
            // Late audio from before the first keyframe: the stream
            // starts with the video (players take the earliest track's
            // start as the stream's).
            return Ok(());
        }
        if let Some((_, previous, _)) = self.waiting.iter().rev().find(|(k, _, _)| *k == kind)
            && frame.dts <= previous.dts
        {
            return Err(Fmp4Error::DtsNotIncreasing {
                kind,
                dts: frame.dts,
                previous: previous.dts,
            });
        }
        self.note_params(kind, &frame);
        self.waiting.push((kind, frame, now));
        let known = (!self.has_video || self.video_params.is_some())
            && (!self.has_audio || self.audio_params.is_some());
        let lead = self.lead_kind();
        let mut lead_dts = self
            .waiting
            .iter()
            .filter(|(k, _, _)| *k == lead)
            .map(|(_, f, _)| f.dts);
        let first = lead_dts.next().unwrap_or(0);
        let waited = lead_dts.last().unwrap_or(first) - first;
        if known || waited >= self.wait_ticks {
            self.start(events)?;
        }
        Ok(())
    }

    /// Starts muxing with the tracks known so far, then feeds the frames
    /// held back.
    fn start(&mut self, events: &mut Vec<Event>) -> Result<(), Fmp4Error> {
        let waiting = std::mem::take(&mut self.waiting);
        self.new_muxing(events)?;
        for (kind, frame, now) in waiting {
            // A frame the fragmenter refuses is dropped, as it would be live.
            let _ = self.feed(kind, &frame, now, events);
        }
        Ok(())
    }

    /// A new fragmenter (and init segment) for the newest parameters.
    fn new_muxing(&mut self, events: &mut Vec<Event>) -> Result<(), Fmp4Error> {
        let video = self.video_params.clone().filter(|_| self.has_video);
        let audio = self.audio_params.clone().filter(|_| self.has_audio);
        let tracks: Vec<TrackConfig> = [&video, &audio]
            .into_iter()
            .flatten()
            .map(|p| TrackConfig::new(Arc::clone(p)))
            .collect();
        let fragmenter = Fragmenter::new(&tracks)?;
        events.push(Event::Init(Bytes::from(fragmenter.init_segment())));
        self.muxing = Some(Muxing {
            fragmenter,
            video,
            audio,
        });
        self.reinit_pending = false;
        Ok(())
    }

    fn feed(
        &mut self,
        kind: TrackKind,
        frame: &Frame,
        now: i64,
        events: &mut Vec<Event>,
    ) -> Result<(), Fmp4Error> {
        let Some(muxing) = &self.muxing else {
            return Ok(());
        };
        let muxed = match kind {
            TrackKind::Video => &muxing.video,
            TrackKind::Audio => &muxing.audio,
        };
        let same = muxed
            .as_ref()
            .is_some_and(|p| Arc::ptr_eq(p, &frame.params) || **p == *frame.params);
        if !same {
            self.note_params(kind, frame);
            self.reinit_pending = true;
        }
        let starts = self.starts(kind, frame);
        if self.reinit_pending && starts {
            // Same timeline: the dates keep following the timestamps.
            self.flush(frame.dts, events);
            self.discontinuity_pending |= self.next_sequence > 0;
            self.new_muxing(events)?;
        } else if !same {
            // The changed track waits for the cut.
            return Ok(());
        }
        let Some(muxing) = &mut self.muxing else {
            return Ok(());
        };
        match muxing.fragmenter.push(kind, frame) {
            Ok(()) => {}
            Err(Fmp4Error::DtsNotIncreasing { .. }) if starts && kind == self.lead_kind() => {
                // The timeline went back: a break, as after a new publisher.
                let end = self.lead_last.unwrap_or(frame.dts) + self.lead_step;
                self.flush(end, events);
                self.anchor = None;
                self.discontinuity_pending = true;
                self.lead_last = None;
                self.new_muxing(events)?;
                if let Some(muxing) = &mut self.muxing {
                    muxing.fragmenter.push(kind, frame)?;
                }
            }
            Err(e) => return Err(e),
        }
        if kind == self.lead_kind() {
            self.lead_frame(kind, frame, starts, now, events);
        }
        Ok(())
    }

    /// Segment and part cuts, decided on the leading track's frames (already
    /// pushed: they end what came before them).
    fn lead_frame(
        &mut self,
        kind: TrackKind,
        frame: &Frame,
        starts: bool,
        now: i64,
        events: &mut Vec<Event>,
    ) {
        let dts = frame.dts;
        let step = self.lead_last.map_or(self.lead_step, |last| dts - last);
        let previous = self.lead_last;
        self.lead_last = Some(dts);
        if step > 0 {
            self.lead_step = step;
            self.recent_steps.rotate_left(1);
            self.recent_steps[2] = step;
        }
        let Some(open) = &self.open else {
            if starts {
                self.open_segment(frame, now);
            }
            return;
        };
        let elapsed = dts - open.start;
        let overdue = kind == TrackKind::Video && elapsed >= self.max_ticks;
        if (starts && elapsed >= self.target_ticks) || overdue {
            self.cut_part(dts, events);
            self.close_segment(dts, events);
            self.open_segment(frame, now);
            return;
        }
        let Some(part_ticks) = self.part_ticks else {
            return;
        };
        let part_start = open.part_start;
        // A keyframe starts a part of its own, unless the part before it
        // would be shorter than 85% of the target (RFC 8216bis §4.4.4.9
        // allows that only for a segment's last part).
        if kind == TrackKind::Video && frame.key && (dts - part_start) * 100 >= part_ticks * 85 {
            self.cut_part(dts, events);
            return;
        }
        if let Some(previous) = previous
            && dts - part_start > part_ticks
            && previous > part_start
        {
            // A late frame: the part ends at the frame before it.
            self.cut_part(previous, events);
        }
        let part_start = self.open.as_ref().map_or(dts, |o| o.part_start);
        let length = dts - part_start;
        let next_step = self
            .recent_steps
            .iter()
            .copied()
            .min()
            .unwrap_or(self.lead_step);
        if length > 0 && (length >= part_ticks || length + next_step > part_ticks) {
            self.cut_part(dts, events);
        }
    }

    fn open_segment(&mut self, frame: &Frame, now: i64) {
        let (anchor_ticks, anchor_ms) = *self.anchor.get_or_insert((frame.dts, now));
        let offset_ms = frame.dts.saturating_sub(anchor_ticks) / (CLOCK_HZ / 1000);
        self.open = Some(Open {
            sequence: self.next_sequence,
            start: frame.dts,
            part_start: frame.dts,
            parts: Vec::new(),
            discontinuity: std::mem::take(&mut self.discontinuity_pending),
            program_date_time_ms: anchor_ms.saturating_add(offset_ms),
            starts_with_keyframe: frame.key || !self.has_video,
        });
        self.next_sequence += 1;
    }

    /// Takes what comes before `until` as a part of the open segment.
    fn cut_part(&mut self, until: i64, events: &mut Vec<Event>) {
        let Some(muxing) = &mut self.muxing else {
            return;
        };
        if let Some(fragment) = muxing.fragmenter.take_fragment(until) {
            self.emit_part(fragment, until, events);
        }
    }

    fn emit_part(&mut self, fragment: Fragment, end: i64, events: &mut Vec<Event>) {
        let Some(open) = &mut self.open else {
            return;
        };
        let data = Bytes::from(fragment.data);
        let part = Part {
            segment: open.sequence,
            index: u32::try_from(open.parts.len()).unwrap_or(u32::MAX),
            duration: end.saturating_sub(open.part_start).max(0),
            independent: fragment.independent,
            data: data.clone(),
            discontinuity: open.discontinuity,
            program_date_time_ms: open.program_date_time_ms,
        };
        open.parts.push(data);
        open.part_start = end.max(open.part_start);
        events.push(Event::Part(part));
    }

    /// Ends everything muxed so far at `end` (the last part, then the
    /// segment) and drops the fragmenter.
    fn flush(&mut self, end: i64, events: &mut Vec<Event>) {
        let Some(mut muxing) = self.muxing.take() else {
            return;
        };
        if let Some(fragment) = muxing.fragmenter.finish(end) {
            self.emit_part(fragment, end, events);
        }
        if let Some(open) = &self.open {
            let end = open.part_start;
            self.close_segment(end, events);
        }
    }

    fn close_segment(&mut self, end: i64, events: &mut Vec<Event>) {
        let Some(open) = self.open.take() else {
            return;
        };
        if open.parts.is_empty() {
            // Nothing to list; its number is used by the next one.
            self.next_sequence = open.sequence;
            return;
        }
        let data = match open.parts.as_slice() {
            // A segment of one fragment (no LL-HLS parts) is that fragment:
            // no copy of a few hundred kilobytes.
            [only] => only.clone(),
            parts => {
                let mut data = BytesMut::with_capacity(parts.iter().map(Bytes::len).sum());
                for part in parts {
                    data.extend_from_slice(part);
                }
                data.freeze()
            }
        };
        let ticks = end.saturating_sub(open.start).max(0);
        events.push(Event::Segment(Segment {
            sequence: open.sequence,
            duration: ticks as f64 / CLOCK_HZ as f64,
            data,
            discontinuity: open.discontinuity,
            program_date_time_ms: open.program_date_time_ms,
            starts_with_keyframe: open.starts_with_keyframe,
            parts: u32::try_from(open.parts.len()).unwrap_or(u32::MAX),
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hls::ts::tests::{aac_params, audio_frame, h264_params, video_frame};

    const BASE_MS: i64 = 1_700_000_000_000;
    const SECOND: i64 = CLOCK_HZ;
    const PART: i64 = CLOCK_HZ / 5;

    type Input = (TrackKind, Frame);

    /// Video every `frame` ticks with a keyframe every `gop` frames, and
    /// 48 kHz AAC, interleaved by DTS.
    fn av(seconds: i64, frame: i64, gop: i64) -> Vec<Input> {
        let (video, audio) = (h264_params(), aac_params());
        let mut frames: Vec<Input> = (0..seconds * SECOND / frame)
            .map(|i| {
                (
                    TrackKind::Video,
                    video_frame(i * frame, i % gop == 0, &video),
                )
            })
            .chain(
                (0..seconds * SECOND / 1920)
                    .map(|i| (TrackKind::Audio, audio_frame(i * 1920, &audio))),
            )
            .collect();
        frames.sort_by_key(|(_, f)| f.dts);
        frames
    }

    fn ll() -> CmafConfig {
        CmafConfig {
            part_duration: Some(Duration::from_millis(200)),
            ..CmafConfig::default()
        }
    }

    /// Feeds everything (wall clock in step with the timeline), then finishes.
    fn run(segmenter: &mut CmafSegmenter, frames: &[Input]) -> Vec<Event> {
        let mut events = Vec::new();
        for (kind, frame) in frames {
            let now = BASE_MS + frame.dts / 90;
            events.extend(segmenter.push(*kind, frame, now).expect("frame accepted"));
        }
        events.extend(segmenter.finish());
        events
    }

    fn parts(events: &[Event]) -> Vec<&Part> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Part(p) => Some(p),
                _ => None,
            })
            .collect()
    }

    fn segments(events: &[Event]) -> Vec<&Segment> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Segment(s) => Some(s),
                _ => None,
            })
            .collect()
    }

    fn inits(events: &[Event]) -> usize {
        events
            .iter()
            .filter(|e| matches!(e, Event::Init(_)))
            .count()
    }

    /// The segments' parts, each checked against its segment: numbered from
    /// 0, durations adding up, bytes concatenated.
    fn check_parts(events: &[Event]) {
        let mut pending: Vec<&Part> = Vec::new();
        for event in events {
            match event {
                Event::Part(part) => {
                    assert_eq!(part.index as usize, pending.len());
                    pending.push(part);
                }
                Event::Segment(segment) => {
                    assert!(pending.iter().all(|p| p.segment == segment.sequence));
                    assert_eq!(segment.parts as usize, pending.len());
                    let ticks: i64 = pending.iter().map(|p| p.duration).sum();
                    assert!((ticks as f64 / CLOCK_HZ as f64 - segment.duration).abs() < 1e-9);
                    let joined: Vec<u8> = pending.iter().flat_map(|p| p.data.to_vec()).collect();
                    assert_eq!(segment.data, joined);
                    assert_eq!(pending[0].independent, segment.starts_with_keyframe);
                    pending.clear();
                }
                Event::Init(_) => assert!(pending.is_empty(), "init inside a segment"),
            }
        }
        assert!(pending.is_empty(), "parts left without a segment");
    }

    #[test]
    fn ll_segments_of_ten_parts_with_keyframe_parts_independent() {
        let mut segmenter = CmafSegmenter::new(ll(), true, true);
        assert!(segmenter.wants_keyframe());
        let events = run(&mut segmenter, &av(6, 3000, 30));
        check_parts(&events);
        assert_eq!(inits(&events), 1);
        assert!(matches!(events[0], Event::Init(_)));
        let segments = segments(&events);
        let durations: Vec<f64> = segments.iter().map(|s| s.duration).collect();
        assert_eq!(durations, [2.0, 2.0, 2.0]);
        for (i, segment) in segments.iter().enumerate() {
            assert_eq!(segment.sequence, i as u64);
            assert_eq!(segment.parts, 10);
            assert!(!segment.discontinuity && segment.starts_with_keyframe);
            assert_eq!(segment.program_date_time_ms, BASE_MS + 2000 * i as i64);
        }
        let parts = parts(&events);
        assert!(parts.iter().all(|p| p.duration == PART));
        // Keyframes every second: parts 0 and 5 of each segment.
        let independent: Vec<u32> = parts
            .iter()
            .filter(|p| p.independent)
            .map(|p| p.index)
            .collect();
        assert_eq!(independent, [0, 5, 0, 5, 0, 5]);
        assert!(parts.iter().all(|p| p.program_date_time_ms % 2000 == 0));
    }

    #[test]
    fn parts_never_exceed_the_target() {
        // 24 fps (3750 ticks): 4 frames fit in 200 ms, 5 do not.
        let events = run(&mut CmafSegmenter::new(ll(), true, true), &av(4, 3750, 48));
        check_parts(&events);
        let all = parts(&events);
        assert!(all.iter().all(|p| p.duration <= PART), "{all:?}");
        assert!(all.iter().filter(|p| p.duration == 15_000).count() >= 20);

        // 60 fps, keyframes at frames 23 and 40 inside a segment: the part
        // before 23 has 11 of 12 frames (92%), so 23 starts a part; the part
        // before 40 would have 5 (42%), so 40 stays inside its part.
        let video = h264_params();
        let frames: Vec<Input> = (0..60)
            .map(|i| {
                let key = [0, 23, 40].contains(&i);
                (TrackKind::Video, video_frame(i * 1500, key, &video))
            })
            .collect();
        let events = run(&mut CmafSegmenter::new(ll(), true, false), &frames);
        check_parts(&events);
        let cut: Vec<(i64, bool)> = parts(&events)
            .iter()
            .map(|p| (p.duration / 1500, p.independent))
            .collect();
        assert_eq!(
            cut,
            [
                (12, true),
                (11, false),
                (12, true),
                (12, false),
                (12, false),
                (1, false)
            ]
        );

        // A 33, 33, 34 ms cadence (millisecond timestamps at 30 fps): six
        // frames are exactly 200 ms, every part has six.
        let steps = [2970, 2970, 3060];
        let mut dts = 0;
        let frames: Vec<Input> = (0..90)
            .map(|i| {
                let frame = video_frame(dts, i % 30 == 0, &video);
                dts += steps[i as usize % 3];
                (TrackKind::Video, frame)
            })
            .collect();
        let mut segmenter = CmafSegmenter::new(ll(), true, false);
        let mut events = Vec::new();
        for (kind, frame) in &frames {
            events.extend(segmenter.push(*kind, frame, BASE_MS).unwrap());
        }
        assert!(
            parts(&events).iter().all(|p| p.duration == PART),
            "{:?}",
            parts(&events)
        );
        assert_eq!(parts(&events).len(), 14);

        // A frame interval growing: cut before the frame that would overflow.
        let video = h264_params();
        let mut segmenter = CmafSegmenter::new(ll(), true, false);
        let mut events = Vec::new();
        for dts in [0, 3000, 6000, 9000, 12_000, 15_500, 19_000] {
            let frame = video_frame(dts, dts == 0, &video);
            events.extend(segmenter.push(TrackKind::Video, &frame, BASE_MS).unwrap());
        }
        let durations: Vec<i64> = parts(&events).iter().map(|p| p.duration).collect();
        assert_eq!(durations, [15_500]);
        // A frame arriving late: the part ends at the frame before it; the
        // last part ends one frame interval after the last frame.
        let mut segmenter = CmafSegmenter::new(ll(), true, false);
        let mut events = Vec::new();
        for dts in [0, 3000, 6000, 9000, 12_000, 15_000, 21_000, 24_000] {
            let frame = video_frame(dts, dts == 0, &video);
            events.extend(segmenter.push(TrackKind::Video, &frame, BASE_MS).unwrap());
        }
        events.extend(segmenter.finish());
        check_parts(&events);
        let durations: Vec<i64> = parts(&events).iter().map(|p| p.duration).collect();
        assert_eq!(durations, [15_000, 12_000]);
    }

    #[test]
    fn without_parts_a_segment_is_one_fragment() {
        let events = run(
            &mut CmafSegmenter::new(CmafConfig::default(), true, true),
            &av(5, 3000, 30),
        );
        check_parts(&events);
        let segments = segments(&events);
        assert_eq!(segments.len(), 3);
        assert!(segments.iter().all(|s| s.parts == 1));
        assert_eq!(segments[2].duration, 1.0);
    }

    #[test]
    fn audio_only_parts_follow_the_audio() {
        let audio = aac_params();
        let frames: Vec<Input> = (0..5 * SECOND / 1920)
            .map(|i| (TrackKind::Audio, audio_frame(i * 1920, &audio)))
            .collect();
        let mut segmenter = CmafSegmenter::new(ll(), false, true);
        let events = run(&mut segmenter, &frames);
        check_parts(&events);
        assert!(!segmenter.wants_keyframe());
        let parts = parts(&events);
        assert!(parts.iter().all(|p| p.independent && p.duration <= PART));
        // Nine AAC frames (192 ms) make a part.
        assert_eq!(parts[0].duration, 9 * 1920);
        let segments = segments(&events);
        assert!(segments[0].duration >= 2.0 && segments[0].duration < 2.0 + 1920.0 / 90000.0);
    }

    #[test]
    fn waits_for_audio_then_starts_without_it_and_adds_it_later() {
        let (video, audio) = (h264_params(), aac_params());
        // Audio 100 ms late: still one init segment with both tracks.
        let mut frames = av(3, 3000, 30);
        frames.retain(|(k, f)| *k == TrackKind::Video || f.dts >= 9000);
        let mut segmenter = CmafSegmenter::new(ll(), true, true);
        let mut events = Vec::new();
        for (kind, frame) in &frames[..3] {
            events.extend(segmenter.push(*kind, frame, BASE_MS).unwrap());
        }
        assert!(events.is_empty(), "waiting for the audio");
        assert!(!segmenter.wants_keyframe(), "a keyframe is held");
        events.extend(run(&mut segmenter, &frames[3..]));
        check_parts(&events);
        assert_eq!(inits(&events), 1);
        assert_eq!(
            events
                .iter()
                .filter(|e| matches!(e, Event::Segment(_)))
                .count(),
            2
        );

        // No audio for 1.5 s: video alone after the 1 s wait, then a new
        // init segment with both at the next keyframe, after a discontinuity.
        let mut frames: Vec<Input> = (0..120)
            .map(|i| (TrackKind::Video, video_frame(i * 3000, i % 30 == 0, &video)))
            .chain((70..188).map(|i| (TrackKind::Audio, audio_frame(i * 1920, &audio))))
            .collect();
        frames.sort_by_key(|(_, f)| f.dts);
        let events = run(&mut CmafSegmenter::new(ll(), true, true), &frames);
        check_parts(&events);
        assert_eq!(inits(&events), 2);
        let segments = segments(&events);
        let summary: Vec<(f64, bool)> = segments
            .iter()
            .map(|s| (s.duration, s.discontinuity))
            .collect();
        assert_eq!(summary, [(2.0, false), (2.0, true)]);
        // Audio joined at 2 s: the second init comes right before segment 1.
        let init_at = events
            .iter()
            .rposition(|e| matches!(e, Event::Init(_)))
            .unwrap();
        assert!(matches!(&events[init_at - 1], Event::Segment(s) if s.sequence == 0));
    }

    #[test]
    fn codec_change_cuts_at_the_next_keyframe_with_a_new_init() {
        let changed = Arc::new(CodecParams::H264 {
            sps: Bytes::from_static(&[0x67, 0x64, 0x00, 0x1F, 0xAC]),
            pps: Bytes::from_static(&[0x68, 0xEE]),
            width: 640,
            height: 480,
        });
        let mut frames = av(6, 3000, 30);
        for (kind, frame) in &mut frames {
            if *kind == TrackKind::Video && frame.dts >= 75 * 3000 {
                frame.params = Arc::clone(&changed);
            }
        }
        let mut segmenter = CmafSegmenter::new(ll(), true, true);
        let mut wanted = false;
        let mut events = Vec::new();
        for (kind, frame) in &frames {
            events.extend(segmenter.push(*kind, frame, BASE_MS).unwrap());
            wanted |= frame.dts > 75 * 3000 && frame.dts < 90 * 3000 && segmenter.wants_keyframe();
        }
        events.extend(segmenter.finish());
        assert!(wanted, "a keyframe is asked for the new parameters");
        check_parts(&events);
        assert_eq!(inits(&events), 2);
        let summary: Vec<(f64, bool)> = segments(&events)
            .iter()
            .map(|s| (s.duration, s.discontinuity))
            .collect();
        // Frames 75..89 (new SPS, no keyframe yet) are dropped: frame 74
        // lasts until the keyframe, so the timeline has no hole.
        assert_eq!(
            summary,
            [(2.0, false), (1.0, false), (2.0, true), (1.0, false)]
        );
        let segments = segments(&events);
        // Same timeline: the dates follow the timestamps, not the wall clock
        // (it stood still here).
        assert_eq!(segments[2].program_date_time_ms, BASE_MS + 3000);
        // An equal value in a new Arc is no change.
        let mut frames = av(4, 3000, 30);
        for (_, frame) in &mut frames {
            frame.params = Arc::new((*frame.params).clone());
        }
        let events = run(&mut CmafSegmenter::new(ll(), true, true), &frames);
        assert_eq!(inits(&events), 1);
    }

    #[test]
    fn finish_then_a_new_timeline_starts_over_with_a_discontinuity() {
        let mut segmenter = CmafSegmenter::new(ll(), true, true);
        let mut events = run(&mut segmenter, &av(3, 3000, 30));
        assert!(segmenter.wants_keyframe());
        events.extend(run(&mut segmenter, &av(2, 3000, 30)));
        check_parts(&events);
        assert_eq!(inits(&events), 2);
        let summary: Vec<(u64, f64, bool)> = segments(&events)
            .iter()
            .map(|s| (s.sequence, s.duration, s.discontinuity))
            .collect();
        assert_eq!(summary, [(0, 2.0, false), (1, 1.0, false), (2, 2.0, true)]);

        // Timestamps going back without a finish: a break at the keyframe.
        let mut segmenter = CmafSegmenter::new(ll(), true, false);
        let video = h264_params();
        let mut events = Vec::new();
        for (i, dts) in [(0, 0), (1, 3000), (2, 6000), (3, 0), (4, 3000)] {
            let frame = video_frame(dts, i == 0 || i == 3, &video);
            events.extend(
                segmenter
                    .push(TrackKind::Video, &frame, BASE_MS + i)
                    .unwrap(),
            );
        }
        events.extend(segmenter.finish());
        check_parts(&events);
        let summary: Vec<(f64, bool, i64)> = segments(&events)
            .iter()
            .map(|s| (s.duration, s.discontinuity, s.program_date_time_ms))
            .collect();
        assert_eq!(
            summary,
            [(0.1, false, BASE_MS), (2.0 / 30.0, true, BASE_MS + 3)]
        );
        // Delta frames going back are refused.
        assert!(
            segmenter
                .push(TrackKind::Video, &video_frame(0, true, &video), BASE_MS)
                .unwrap()
                .len()
                == 1
        );
        assert!(matches!(
            segmenter.push(TrackKind::Video, &video_frame(0, false, &video), BASE_MS),
            Err(Fmp4Error::DtsNotIncreasing { .. })
        ));
    }

    #[test]
    fn late_audio_from_before_the_first_keyframe_is_dropped() {
        let (video, audio) = (h264_params(), aac_params());
        let run_with = |early_audio: bool| {
            let mut segmenter = CmafSegmenter::new(ll(), true, true);
            let mut frames = vec![(TrackKind::Video, video_frame(3000, true, &video))];
            if early_audio {
                // Stamped 0, arriving after the keyframe (transcoder lag).
                frames.push((TrackKind::Audio, audio_frame(0, &audio)));
            }
            let mut rest: Vec<Input> = (2..40)
                .map(|i| (TrackKind::Audio, audio_frame(i * 1920, &audio)))
                .chain((2..30).map(|i| (TrackKind::Video, video_frame(i * 3000, false, &video))))
                .collect();
            rest.sort_by_key(|(_, f)| f.dts);
            frames.extend(rest);
            run(&mut segmenter, &frames)
        };
        assert_eq!(run_with(true), run_with(false));
    }

    #[test]
    fn undeclared_and_mismatched_tracks_are_refused() {
        let mut video_only = CmafSegmenter::new(ll(), true, false);
        let audio = audio_frame(0, &aac_params());
        assert_eq!(
            video_only.push(TrackKind::Audio, &audio, BASE_MS),
            Err(Fmp4Error::UndeclaredTrack(TrackKind::Audio))
        );
        let mut both = CmafSegmenter::new(ll(), true, true);
        assert!(matches!(
            both.push(TrackKind::Video, &audio, BASE_MS),
            Err(Fmp4Error::KindMismatch { .. })
        ));
        assert!(both.finish().is_empty());
    }
}
