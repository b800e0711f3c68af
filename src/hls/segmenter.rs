//! Cuts a stream of frames into MPEG-TS segments.
//!
//! Rules:
//! - with video, everything (audio too) is skipped until the first video
//!   keyframe, and a segment is cut at the first video keyframe whose PTS is
//!   at least the segment start plus the target duration;
//! - audio-only streams cut at the first audio frame past the target;
//! - a change of [`CodecParams`] on a track cuts at the next keyframe and marks
//!   the new segment as a discontinuity, and so does a timestamp going back;
//! - a video segment that reaches [`SegmenterConfig::max_duration`] without a
//!   keyframe is cut at the next video frame anyway (`starts_with_keyframe`
//!   false), so memory stays bounded when keyframe requests go unanswered.
//!
//! Durations come from timestamps, never from the wall clock. The wall clock
//! (`now_unix_ms`) is only read for the program date time of the first
//! segment after a start or a discontinuity; later segments derive theirs
//! from the timeline, so dates and durations always agree.

use std::sync::Arc;
use std::time::Duration;

use crate::media::frame::{CLOCK_HZ, CodecParams, Frame, TrackKind};

use super::ts::{TsError, TsMuxer};

/// Frame duration assumed for the last frame of a segment when nothing better
/// is known (one frame at 30 fps).
const DEFAULT_FRAME_TICKS: i64 = CLOCK_HZ / 30;
/// Samples in one AAC frame.
const AAC_FRAME_SAMPLES: i64 = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmenterConfig {
    /// Shortest segment that is cut on a keyframe.
    pub target_duration: Duration,
    /// Longest video segment before it is cut without a keyframe.
    pub max_duration: Duration,
}

impl Default for SegmenterConfig {
    fn default() -> Self {
        Self {
            target_duration: Duration::from_secs(2),
            max_duration: Duration::from_secs(10),
        }
    }
}

/// One complete segment.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    /// Media sequence number, from 0, one more for each segment.
    pub sequence: u64,
    /// Seconds, from the timestamps.
    pub duration: f64,
    /// Complete MPEG-TS bytes, starting with PAT and PMT.
    pub data: Vec<u8>,
    /// The segment follows a break (new publisher, new codec parameters).
    pub discontinuity: bool,
    /// Unix time of the segment's first frame, in milliseconds.
    pub program_date_time_ms: i64,
    /// Starts with a video keyframe (always true for audio-only streams).
    pub starts_with_keyframe: bool,
}

/// Sans-IO segmenter: frames in, complete segments out.
#[derive(Debug)]
pub struct Segmenter {
    target_ticks: i64,
    max_ticks: i64,
    has_video: bool,
    muxer: TsMuxer,
    next_sequence: u64,
    current: Option<Building>,
    video_params: Option<Arc<CodecParams>>,
    audio_params: Option<Arc<CodecParams>>,
    /// Codec parameters changed: cut at the next keyframe.
    cut_pending: bool,
    /// The next segment gets `discontinuity = true`.
    discontinuity_pending: bool,
    /// (stream ticks, unix ms) pair the program date times are derived from.
    anchor: Option<(i64, i64)>,
    /// Reused buffer for the frame being muxed.
    scratch: Vec<u8>,
}

/// The segment being filled.
#[derive(Debug)]
struct Building {
    sequence: u64,
    start_pts: i64,
    data: Vec<u8>,
    discontinuity: bool,
    program_date_time_ms: i64,
    starts_with_keyframe: bool,
    /// Highest PTS seen on the leading track.
    last_lead_pts: i64,
    last_lead_dts: Option<i64>,
    /// Duration of the latest leading-track frame, in ticks.
    lead_frame_ticks: i64,
}

impl Building {
    /// Where the segment ends judging by its own frames.
    fn estimated_end(&self) -> i64 {
        self.last_lead_pts.saturating_add(self.lead_frame_ticks)
    }

    fn into_segment(self, end: i64) -> Segment {
        let ticks = end.saturating_sub(self.start_pts).max(0);
        Segment {
            sequence: self.sequence,
            duration: ticks as f64 / CLOCK_HZ as f64,
            data: self.data,
            discontinuity: self.discontinuity,
            program_date_time_ms: self.program_date_time_ms,
            starts_with_keyframe: self.starts_with_keyframe,
        }
    }
}

/// How a frame relates to the open segment.
enum Cut {
    /// No segment is open: the frame starts the first one.
    First,
    /// The frame joins the open segment.
    No,
    /// The frame starts a new segment on the same timeline.
    Continuous,
    /// The frame starts a new segment after a break in the timeline.
    Break,
}

impl Segmenter {
    /// A segmenter for a stream with the given tracks.
    pub fn new(config: SegmenterConfig, has_video: bool, has_audio: bool) -> Self {
        let ticks = |d: Duration| {
            i64::try_from(d.as_millis())
                .unwrap_or(i64::MAX)
                .saturating_mul(CLOCK_HZ / 1000)
        };
        let target_ticks = ticks(config.target_duration);
        Self {
            target_ticks,
            max_ticks: ticks(config.max_duration).max(target_ticks),
            has_video,
            muxer: TsMuxer::new(has_video, has_audio),
            next_sequence: 0,
            current: None,
            video_params: None,
            audio_params: None,
            cut_pending: false,
            discontinuity_pending: false,
            anchor: None,
            scratch: Vec::new(),
        }
    }

    /// Adds one frame; returns the segment it completed, if any.
    ///
    /// A frame the muxer refuses (undeclared track, codec other than H264 or
    /// AAC, broken data) is dropped with an error and changes nothing.
    pub fn push(
        &mut self,
        kind: TrackKind,
        frame: &Frame,
        now_unix_ms: i64,
    ) -> Result<Option<Segment>, TsError> {
        let starts_segment = match kind {
            TrackKind::Video => frame.key,
            TrackKind::Audio => !self.has_video,
        };
        if self.current.is_none() && !starts_segment {
            return Ok(None);
        }
        self.scratch.clear();
        self.muxer.write_frame(kind, frame, &mut self.scratch)?;

        self.note_params(kind, frame);
        let cut = match &self.current {
            None => Cut::First,
            Some(building) => self.cut_for(building, kind, frame, starts_segment),
        };
        let finished = match cut {
            Cut::No => None,
            Cut::First | Cut::Continuous => self.start_segment(frame, now_unix_ms, frame.pts),
            Cut::Break => {
                let end = self.current.as_ref().map(Building::estimated_end);
                self.anchor = None;
                self.discontinuity_pending = true;
                self.start_segment(frame, now_unix_ms, end.unwrap_or(frame.pts))
            }
        };
        if let Some(building) = self.current.as_mut() {
            building.data.extend_from_slice(&self.scratch);
            let leads = match kind {
                TrackKind::Video => true,
                TrackKind::Audio => !self.has_video,
            };
            if leads {
                note_lead_frame(building, frame);
            }
        }
        Ok(finished)
    }

    /// True while the stream has video and a keyframe is overdue: none yet,
    /// the open segment has reached its target duration, or a cut is waiting
    /// for one. The caller sends a PLI (and rate-limits it).
    pub fn wants_keyframe(&self) -> bool {
        if !self.has_video {
            return false;
        }
        match &self.current {
            None => true,
            Some(building) => {
                self.cut_pending
                    || building.last_lead_pts.saturating_sub(building.start_pts)
                        >= self.target_ticks
            }
        }
    }

    /// Flushes the partial last segment. The segmenter can go on afterwards:
    /// it waits for a new keyframe, and the sequence numbers continue.
    #[must_use]
    pub fn finish(&mut self) -> Option<Segment> {
        self.cut_pending = false;
        self.anchor = None;
        let building = self.current.take()?;
        let end = building.estimated_end();
        Some(building.into_segment(end))
    }

    /// For a publisher coming back on the same stream: flushes the open
    /// segment (as [`Segmenter::finish`]) and marks the next one as a
    /// discontinuity.
    #[must_use]
    pub fn mark_discontinuity(&mut self) -> Option<Segment> {
        let flushed = self.finish();
        self.discontinuity_pending = true;
        flushed
    }

    /// Remembers the frame's codec parameters; a change while a segment is
    /// open asks for a cut with a discontinuity.
    fn note_params(&mut self, kind: TrackKind, frame: &Frame) {
        let slot = match kind {
            TrackKind::Video => &mut self.video_params,
            TrackKind::Audio => &mut self.audio_params,
        };
        let changed = slot
            .as_ref()
            .is_some_and(|old| !Arc::ptr_eq(old, &frame.params) && **old != *frame.params);
        if changed && self.current.is_some() {
            self.cut_pending = true;
            self.discontinuity_pending = true;
        }
        *slot = Some(Arc::clone(&frame.params));
    }

    fn cut_for(&self, building: &Building, kind: TrackKind, frame: &Frame, key: bool) -> Cut {
        let elapsed = frame.pts.saturating_sub(building.start_pts);
        if key && elapsed < 0 {
            // The timeline went back without notice: treat it as a break.
            return Cut::Break;
        }
        if key && (self.cut_pending || elapsed >= self.target_ticks) {
            return Cut::Continuous;
        }
        let overdue = kind == TrackKind::Video && self.has_video && elapsed >= self.max_ticks;
        if overdue { Cut::Continuous } else { Cut::No }
    }

    /// Closes the open segment at `end` (if any) and opens a new one at `frame`.
    fn start_segment(&mut self, frame: &Frame, now_unix_ms: i64, end: i64) -> Option<Segment> {
        let finished = self.current.take().map(|b| b.into_segment(end));
        let (anchor_ticks, anchor_ms) = *self.anchor.get_or_insert((frame.pts, now_unix_ms));
        let offset_ms = frame.pts.saturating_sub(anchor_ticks) / (CLOCK_HZ / 1000);
        let discontinuity = std::mem::take(&mut self.discontinuity_pending);
        self.cut_pending = false;

        let mut data = Vec::with_capacity(finished.as_ref().map_or(0, |s| s.data.len()));
        self.muxer.write_tables(&mut data);
        self.current = Some(Building {
            sequence: self.next_sequence,
            start_pts: frame.pts,
            data,
            discontinuity,
            program_date_time_ms: anchor_ms.saturating_add(offset_ms),
            starts_with_keyframe: frame.key,
            last_lead_pts: frame.pts,
            last_lead_dts: None,
            lead_frame_ticks: DEFAULT_FRAME_TICKS,
        });
        self.next_sequence += 1;
        finished
    }
}

/// Tracks where the leading track has got to, for the duration of a segment
/// that ends without a successor.
fn note_lead_frame(building: &mut Building, frame: &Frame) {
    let aac_rate = match &*frame.params {
        CodecParams::Aac { sample_rate, .. } if *sample_rate > 0 => Some(i64::from(*sample_rate)),
        _ => None,
    };
    let step = building
        .last_lead_dts
        .map(|previous| frame.dts.saturating_sub(previous));
    match (aac_rate, step) {
        (Some(rate), _) => building.lead_frame_ticks = AAC_FRAME_SAMPLES * CLOCK_HZ / rate,
        (None, Some(step)) if step > 0 => building.lead_frame_ticks = step,
        _ => {}
    }
    building.last_lead_dts = Some(frame.dts);
    building.last_lead_pts = building.last_lead_pts.max(frame.pts);
}
