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

    fn into_segment(mut self, end: i64) -> Segment {
        let ticks = end.saturating_sub(self.start_pts).max(0);
        // The segment is kept in memory for the whole playlist window: a
        // buffer that doubled when it outgrew its estimate would hold up to
        // twice its size for that long.
        if self.data.capacity() - self.data.len() > self.data.len() / 8 {
            self.data.shrink_to_fit();
        }
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
    /// it waits for a new keyframe, the sequence numbers continue, and the
    /// next segment is marked as a discontinuity (what follows is on a
    /// timeline of its own).
    #[must_use]
    pub fn finish(&mut self) -> Option<Segment> {
        self.cut_pending = false;
        self.anchor = None;
        self.discontinuity_pending |= self.next_sequence > 0;
        let building = self.current.take()?;
        let end = building.estimated_end();
        Some(building.into_segment(end))
    }

    /// For a publisher coming back on the same stream: flushes the open
    /// segment (as [`Segmenter::finish`]) and marks the next one as a
    /// discontinuity, even when no segment has been made yet.
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

        // Room for a segment a quarter larger than the last, so the buffer
        // seldom has to grow (and copy) while it fills.
        let estimate = finished
            .as_ref()
            .map_or(0, |s| s.data.len() + s.data.len() / 4);
        let mut data = Vec::with_capacity(estimate);
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

#[cfg(test)]
mod tests {
    use std::process::Command;

    use bytes::Bytes;

    use super::*;
    use crate::hls::ts::tests::{
        aac_params, audio_frame, h264_params, parse_packets, parse_pes, video_frame,
    };
    use crate::hls::ts::{AUDIO_PID, PMT_PID, TIMESTAMP_OFFSET, VIDEO_PID};
    use crate::media::h264::{NAL_AUD, NAL_IDR, NAL_PPS, NAL_SPS, is_vcl, nal_type, split_annexb};

    const BASE_MS: i64 = 1_700_000_000_000;
    const SECOND: i64 = CLOCK_HZ;

    type Input = (TrackKind, Frame);

    /// 30 fps video with a keyframe every `gop` frames (from `first_key`) and
    /// 48 kHz AAC, interleaved by DTS.
    fn av(seconds: i64, gop: i64, first_key: i64) -> Vec<Input> {
        let (video, audio) = (h264_params(), aac_params());
        let mut frames: Vec<Input> = (0..seconds * 30)
            .map(|i| {
                let key = i >= first_key && (i - first_key) % gop == 0;
                (TrackKind::Video, video_frame(i * 3000, key, &video))
            })
            .chain(
                (0..seconds * SECOND / 1920)
                    .map(|i| (TrackKind::Audio, audio_frame(i * 1920, &audio))),
            )
            .collect();
        frames.sort_by_key(|(_, f)| f.dts);
        frames
    }

    fn audio_only(seconds: i64) -> Vec<Input> {
        let audio = aac_params();
        (0..seconds * SECOND / 1920)
            .map(|i| (TrackKind::Audio, audio_frame(i * 1920, &audio)))
            .collect()
    }

    /// Feeds everything (wall clock in step with the timeline), then finishes.
    fn run(segmenter: &mut Segmenter, frames: &[Input], base_ms: i64) -> Vec<Segment> {
        let mut segments: Vec<Segment> = frames
            .iter()
            .filter_map(|(kind, frame)| {
                let now = base_ms + frame.pts / 90;
                segmenter.push(*kind, frame, now).expect("frame accepted")
            })
            .collect();
        segments.extend(segmenter.finish());
        segments
    }

    fn durations(segments: &[Segment]) -> Vec<f64> {
        segments.iter().map(|s| s.duration).collect()
    }

    fn av_segmenter() -> Segmenter {
        Segmenter::new(SegmenterConfig::default(), true, true)
    }

    #[test]
    fn keyframe_every_second_gives_two_second_segments() {
        let segments = run(&mut av_segmenter(), &av(10, 30, 0), BASE_MS);
        assert_eq!(durations(&segments), [2.0; 5]);
        for (index, segment) in segments.iter().enumerate() {
            let start = index as i64 * 2 * SECOND;
            assert_eq!(segment.sequence, index as u64);
            assert!(segment.starts_with_keyframe && !segment.discontinuity);
            assert_eq!(segment.program_date_time_ms, BASE_MS + start / 90);

            let packets = parse_packets(&segment.data);
            assert_eq!((packets[0].pid, packets[1].pid), (0, PMT_PID));
            let pes = parse_pes(&segment.data);
            assert_eq!(pes[0].pid, VIDEO_PID);
            assert!(pes[0].random_access);
            assert_eq!(pes[0].pts as i64, start + TIMESTAMP_OFFSET);
            assert_eq!(pes.iter().filter(|p| p.pid == VIDEO_PID).count(), 60);
            assert!(pes.iter().any(|p| p.pid == AUDIO_PID));
        }
    }

    #[test]
    fn keyframe_every_three_seconds_gives_three_second_segments() {
        let segments = run(&mut av_segmenter(), &av(10, 90, 0), BASE_MS);
        assert_eq!(durations(&segments), [3.0, 3.0, 3.0, 1.0]);
        assert!(segments.iter().all(|s| s.starts_with_keyframe));
    }

    #[test]
    fn everything_before_the_first_keyframe_is_skipped() {
        let mut segmenter = av_segmenter();
        assert!(segmenter.wants_keyframe());
        let segments = run(&mut segmenter, &av(5, 30, 15), BASE_MS);
        assert_eq!(durations(&segments), [2.0, 2.0, 0.5]);
        assert_eq!(segments[0].program_date_time_ms, BASE_MS + 500);
        let first = parse_pes(&segments[0].data);
        assert_eq!(first[0].pid, VIDEO_PID);
        assert!(
            first
                .iter()
                .all(|p| p.pts as i64 >= SECOND / 2 + TIMESTAMP_OFFSET)
        );
    }

    #[test]
    fn audio_only_cuts_on_time() {
        let mut segmenter = Segmenter::new(SegmenterConfig::default(), false, true);
        let frames = audio_only(7);
        let segments = run(&mut segmenter, &frames, BASE_MS);
        assert_eq!(segments.len(), 4);
        let frame = 1920.0 / CLOCK_HZ as f64;
        for segment in &segments[..3] {
            assert!(segment.duration >= 2.0 && segment.duration < 2.0 + frame);
            assert!(segment.starts_with_keyframe);
            let packets = parse_packets(&segment.data);
            assert!(packets.iter().all(|p| p.pid != VIDEO_PID));
        }
        let total: f64 = durations(&segments).iter().sum();
        assert!((total - frames.len() as f64 * frame).abs() < 1e-9);
        assert!(!segmenter.wants_keyframe());
    }

    #[test]
    fn codec_change_cuts_at_next_keyframe_with_discontinuity() {
        let changed = Arc::new(CodecParams::H264 {
            sps: Bytes::from_static(&[0x67, 0x64, 0x00, 0x1F]),
            pps: Bytes::from_static(&[0x68, 0xEE]),
            width: 640,
            height: 480,
        });
        let mut frames = av(10, 30, 0);
        for (kind, frame) in &mut frames {
            if *kind == TrackKind::Video && frame.pts >= 135 * 3000 {
                frame.params = Arc::clone(&changed);
            }
        }
        let mut segmenter = av_segmenter();
        let segments = run(&mut segmenter, &frames, BASE_MS);
        assert_eq!(durations(&segments), [2.0, 2.0, 1.0, 2.0, 2.0, 1.0]);
        let breaks: Vec<bool> = segments.iter().map(|s| s.discontinuity).collect();
        assert_eq!(breaks, [false, false, false, true, false, false]);
        // Same timeline: the dates keep following the timestamps.
        assert_eq!(segments[3].program_date_time_ms, BASE_MS + 5000);

        // An equal value in a new Arc is no change.
        let mut frames = av(6, 30, 0);
        for (_, frame) in &mut frames {
            frame.params = Arc::new((*frame.params).clone());
        }
        let segments = run(&mut av_segmenter(), &frames, BASE_MS);
        assert!(segments.iter().all(|s| !s.discontinuity));
        assert_eq!(durations(&segments), [2.0; 3]);
    }

    #[test]
    fn audio_only_codec_change_cuts_at_once() {
        let other = Arc::new(CodecParams::Aac {
            asc: Bytes::from_static(&[0x12, 0x10]),
            sample_rate: 44100,
            channels: 2,
        });
        let mut frames = audio_only(3);
        for (_, frame) in frames.iter_mut().skip(30) {
            frame.params = Arc::clone(&other);
        }
        let segmenter = &mut Segmenter::new(SegmenterConfig::default(), false, true);
        let segments = run(segmenter, &frames, BASE_MS);
        assert_eq!(segments[0].duration, 30.0 * 1920.0 / 90000.0);
        assert!(segments[1].discontinuity);
    }

    #[test]
    fn segments_do_not_hold_spare_capacity() {
        // The first segment's buffer grows from nothing (doubling); every
        // segment handed out is within an eighth of its size.
        let segments = run(&mut av_segmenter(), &av(9, 30, 0), BASE_MS);
        assert!(segments.len() >= 3);
        for s in &segments {
            let (len, capacity) = (s.data.len(), s.data.capacity());
            assert!(capacity <= len + len / 8, "{capacity} bytes for {len}");
        }
    }

    #[test]
    fn overdue_keyframe_is_wanted_and_bounded() {
        let mut segmenter = av_segmenter();
        let frames = av(25, 1000, 0);
        let mut wanted_at = None;
        let mut segments = Vec::new();
        for (kind, frame) in &frames {
            segments.extend(segmenter.push(*kind, frame, BASE_MS).expect("frame"));
            if wanted_at.is_none() && segmenter.wants_keyframe() {
                wanted_at = Some(frame.pts);
            }
        }
        assert_eq!(wanted_at, Some(2 * SECOND));
        segments.extend(segmenter.finish());
        assert_eq!(durations(&segments), [10.0, 10.0, 5.0]);
        let keyed: Vec<bool> = segments.iter().map(|s| s.starts_with_keyframe).collect();
        assert_eq!(keyed, [true, false, false]);
    }

    #[test]
    fn returning_publisher_gets_a_discontinuity() {
        let mut segmenter = av_segmenter();
        let mut segments = run(&mut segmenter, &av(3, 30, 0)[..], BASE_MS);
        // `run` finished the partial segment: [0, 2) and [2, 3).
        assert_eq!(durations(&segments), [2.0, 1.0]);
        assert!(segmenter.mark_discontinuity().is_none());
        // The publisher comes back a minute later with a new timeline that
        // starts on a delta frame.
        let later = BASE_MS + 60_000;
        segments.extend(run(&mut segmenter, &av(4, 30, 10), later));
        let sequences: Vec<u64> = segments.iter().map(|s| s.sequence).collect();
        assert_eq!(sequences, [0, 1, 2, 3]);
        assert!(segments[2].discontinuity && !segments[3].discontinuity);
        assert_eq!(segments[2].program_date_time_ms, later + 333);
        assert_eq!(durations(&segments[2..]), [2.0, 4.0 - 2.0 - 1.0 / 3.0]);

        // Without a finish, marking flushes the open segment itself.
        let mut segmenter = av_segmenter();
        for (kind, frame) in &av(1, 30, 0) {
            let _ = segmenter.push(*kind, frame, BASE_MS);
        }
        let flushed = segmenter.mark_discontinuity().expect("open segment");
        assert_eq!(flushed.duration, 1.0);
    }

    #[test]
    fn timestamps_going_back_count_as_a_break() {
        let mut segmenter = av_segmenter();
        let mut segments = run(&mut segmenter, &av(3, 30, 0), BASE_MS);
        // Same segmenter, no mark: a new timeline from 0.
        let restarted = run(&mut segmenter, &av(2, 30, 0), BASE_MS + 10_000);
        segments.extend(restarted);
        let breaks: Vec<bool> = segments.iter().map(|s| s.discontinuity).collect();
        assert_eq!(breaks, [false, false, true]);
        assert_eq!(segments[2].program_date_time_ms, BASE_MS + 10_000);

        // Mid-segment this time.
        let mut segmenter = av_segmenter();
        for (kind, frame) in &av(3, 30, 0) {
            let _ = segmenter.push(*kind, frame, BASE_MS);
        }
        let mut segments = Vec::new();
        for (kind, frame) in &av(2, 30, 0) {
            segments.extend(
                segmenter
                    .push(*kind, frame, BASE_MS + 10_000)
                    .expect("frame"),
            );
        }
        segments.extend(segmenter.finish());
        // The open [2 s, 3 s) segment ends on its own frames.
        assert_eq!(durations(&segments), [1.0, 2.0]);
        let breaks: Vec<bool> = segments.iter().map(|s| s.discontinuity).collect();
        assert_eq!(breaks, [false, true]);
        assert_eq!(segments[1].program_date_time_ms, BASE_MS + 10_000);
    }

    #[test]
    fn refused_frame_leaves_the_segment_alone() {
        let mut segmenter = av_segmenter();
        let video = h264_params();
        segmenter
            .push(TrackKind::Video, &video_frame(0, true, &video), BASE_MS)
            .expect("keyframe");
        let opus = Arc::new(CodecParams::Opus {
            sample_rate: 48000,
            channels: 2,
        });
        let result = segmenter.push(TrackKind::Audio, &audio_frame(0, &opus), BASE_MS);
        assert_eq!(
            result,
            Err(TsError::UnsupportedCodec(crate::media::frame::Codec::Opus))
        );
        let segment = segmenter.finish().expect("segment");
        assert_eq!(parse_pes(&segment.data).len(), 1);
        // No undeclared track sneaks in either.
        let mut video_only = Segmenter::new(SegmenterConfig::default(), true, false);
        let audio = audio_frame(0, &aac_params());
        let _ = video_only.push(TrackKind::Video, &video_frame(0, true, &video), BASE_MS);
        assert!(video_only.push(TrackKind::Audio, &audio, BASE_MS).is_err());
    }

    /// Runs a tool; `None` when it is not installed.
    fn tool(program: &str, args: &[&str]) -> Option<std::process::Output> {
        match Command::new(program).args(args).output() {
            Ok(output) => Some(output),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
            Err(error) => panic!("{program}: {error}"),
        }
    }

    /// Real x264 access units (SPS/PPS taken out, so the muxer must put them
    /// back) and their codec parameters.
    fn x264_access_units(annex_b: &[u8]) -> (Vec<Vec<u8>>, Bytes, Bytes) {
        let (mut sps, mut pps) = (Bytes::new(), Bytes::new());
        let mut units = Vec::new();
        let mut pending = Vec::new();
        for nal in split_annexb(annex_b) {
            match nal_type(nal) {
                NAL_SPS => sps = Bytes::copy_from_slice(nal),
                NAL_PPS => pps = Bytes::copy_from_slice(nal),
                NAL_AUD => {}
                nal_type => {
                    pending.extend_from_slice(&[0, 0, 0, 1]);
                    pending.extend_from_slice(nal);
                    // One slice per picture: each slice ends an access unit.
                    if is_vcl(nal_type) {
                        units.push(std::mem::take(&mut pending));
                    }
                }
            }
        }
        (units, sps, pps)
    }

    /// Raw AAC frames out of an ADTS stream.
    fn strip_adts(mut adts: &[u8]) -> Vec<Bytes> {
        let mut frames = Vec::new();
        while adts.len() >= 7 && adts[0] == 0xFF && adts[1] & 0xF0 == 0xF0 {
            let header = if adts[1] & 1 == 1 { 7 } else { 9 };
            let len = usize::from(adts[3] & 3) << 11
                | usize::from(adts[4]) << 3
                | usize::from(adts[5] >> 5);
            assert!(len > header && len <= adts.len());
            frames.push(Bytes::copy_from_slice(&adts[header..len]));
            adts = &adts[len..];
        }
        frames
    }

    #[test]
    fn real_h264_and_aac_segments_probe_and_decode_cleanly() {
        let lavfi = |source: &str, codec: &[&str], format: &str| {
            let mut args = vec!["-v", "error", "-f", "lavfi", "-i", source, "-t", "4"];
            args.extend_from_slice(codec);
            args.extend_from_slice(&["-f", format, "-"]);
            tool("ffmpeg", &args)
        };
        let video = lavfi(
            "testsrc=size=320x240:rate=30",
            &[
                "-c:v",
                "libx264",
                "-bf",
                "0",
                "-g",
                "30",
                "-sc_threshold",
                "0",
                "-pix_fmt",
                "yuv420p",
                "-bsf:v",
                "h264_mp4toannexb",
            ],
            "h264",
        );
        let Some(video) = video else {
            eprintln!("skipping: ffmpeg is not installed");
            return;
        };
        let audio = lavfi(
            "sine=frequency=440:sample_rate=48000",
            &["-ac", "2", "-c:a", "aac"],
            "adts",
        )
        .expect("ffmpeg ran once already");
        assert!(video.status.success() && audio.status.success());

        let (units, sps, pps) = x264_access_units(&video.stdout);
        assert_eq!(units.len(), 120);
        let video_params = Arc::new(CodecParams::H264 {
            sps,
            pps,
            width: 320,
            height: 240,
        });
        let audio_params = aac_params();
        let mut frames: Vec<Input> = units
            .into_iter()
            .enumerate()
            .map(|(i, data)| {
                let key = split_annexb(&data).any(|nal| nal_type(nal) == NAL_IDR);
                let frame = Frame {
                    pts: i as i64 * 3000,
                    dts: i as i64 * 3000,
                    key,
                    data: Bytes::from(data),
                    params: Arc::clone(&video_params),
                };
                (TrackKind::Video, frame)
            })
            .chain(
                strip_adts(&audio.stdout)
                    .into_iter()
                    .enumerate()
                    .map(|(i, data)| {
                        let frame = Frame {
                            pts: i as i64 * 1920,
                            dts: i as i64 * 1920,
                            key: true,
                            data,
                            params: Arc::clone(&audio_params),
                        };
                        (TrackKind::Audio, frame)
                    }),
            )
            .collect();
        frames.sort_by_key(|(_, f)| f.dts);
        let segments = run(&mut av_segmenter(), &frames, BASE_MS);
        assert_eq!(durations(&segments), [2.0, 2.0]);

        let dir = tempfile::tempdir().expect("temp dir");
        let mut files = Vec::new();
        for segment in &segments {
            let path = dir.path().join(format!("seg{}.ts", segment.sequence));
            std::fs::write(&path, &segment.data).expect("write segment");
            files.push(path);
        }
        let all = dir.path().join("all.ts");
        let joined: Vec<u8> = segments.iter().flat_map(|s| s.data.clone()).collect();
        std::fs::write(&all, joined).expect("write stream");
        files.push(all.clone());

        let all = all.to_string_lossy().into_owned();
        let probe = tool(
            "ffprobe",
            &[
                "-v",
                "error",
                "-count_frames",
                "-show_entries",
                "stream=codec_name,codec_type,nb_read_frames",
                "-of",
                "csv=p=0",
                &all,
            ],
        )
        .expect("ffprobe comes with ffmpeg");
        assert_eq!(String::from_utf8_lossy(&probe.stderr), "");
        // Streams are listed once per program and once on their own.
        let mut streams: Vec<String> = String::from_utf8_lossy(&probe.stdout)
            .lines()
            .filter(|line| !line.is_empty())
            .map(str::to_owned)
            .collect();
        streams.sort();
        streams.dedup();
        let audio_frames = frames.len() - 120;
        let expected = [
            format!("aac,audio,{audio_frames}"),
            "h264,video,120".to_owned(),
        ];
        assert_eq!(streams, expected);

        // Each segment decodes on its own, and so does the whole stream.
        for file in &files {
            let file = file.to_string_lossy().into_owned();
            let decode =
                tool("ffmpeg", &["-v", "error", "-i", &file, "-f", "null", "-"]).expect("ffmpeg");
            assert!(decode.status.success());
            assert_eq!(String::from_utf8_lossy(&decode.stderr), "", "{file}");
        }
    }
}
