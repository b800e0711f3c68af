//! The stream timeline, sans-IO: RTP timestamps of the tracks of one
//! publication become 90 kHz ticks ([`CLOCK_HZ`]) from the stream's first frame.
//!
//! Time is never read here; arrival instants come in as arguments.
//!
//! # Mapping
//!
//! Each track's RTP timestamp is unwrapped ([`RtpUnwrapper`]) and mapped
//! linearly from an anchor: `ticks = anchor.ticks + (rtp - anchor.rtp) * 90000 / clock_rate`
//! (exact integer arithmetic on the whole distance, so no drift: 960 samples of
//! 48 kHz Opus are always 1800 ticks).
//!
//! - The first frame of the stream (any track) is tick 0; its arrival instant
//!   is the epoch.
//! - Each track is anchored on its first frame at its arrival time relative
//!   to the epoch (audio arriving 30 ms after video starts at 2700 ticks). That
//!   is all we have when the publisher sends no RTCP sender report (OBS), and
//!   we never wait for one before emitting.
//! - When both tracks have had a sender report (NTP ↔ RTP pair on a common
//!   wall clock), the timeline corrects the anchors once so that audio and
//!   video agree on the wall clock ("lip sync"). The correction is applied
//!   by moving audio, never video once video has output (shifting video
//!   mid-GOP would reorder B-frames against their references). Audio moved
//!   later leaves a one-time gap, audio moved earlier is clamped to stay
//!   increasing (the AAC transcoder drops the overlap): a one-time glitch of
//!   the correction's size, typically tens of ms. Corrections larger than
//!   [`MAX_SYNC_CORRECTION`] ticks are rejected as bogus and counted. Later
//!   sender reports are stored but not applied (clock drift between the two
//!   RTP clocks is ignored).
//!
//! # Guarantees
//!
//! - Never a negative output: a frame mapping before tick 0 is dropped
//!   (`None`) and counted.
//! - Audio timestamps (PTS = DTS) are strictly increasing: a frame that would
//!   not be is clamped to the previous value + 1 and counted.
//! - Video timestamps are PTS and are not made monotonic here, since
//!   B-frames legitimately go back; the H.264 DTS extractor
//!   ([`crate::media::h264::DtsExtractor`]) guarantees monotonic DTS for video.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::media::frame::{CLOCK_HZ, TrackKind};

/// Largest lip-sync correction accepted from sender reports, in ticks (1 s).
/// Arrival anchoring errs by network and jitter-buffer delay differences,
/// well under this; more means the reports are not on a common clock.
pub const MAX_SYNC_CORRECTION: i64 = CLOCK_HZ;

const NANOS_PER_SEC: i128 = 1_000_000_000;

/// Extends 32-bit RTP timestamps to `i64`, handling wrap-around both ways.
///
/// Each timestamp is placed within ±2^31 of the highest one seen so far, so
/// packets reordered across the wrap land before it (possibly below zero for
/// the very first packets).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RtpUnwrapper {
    highest: Option<i64>,
}

/// The `i64` congruent to `ts` modulo 2^32 nearest to `reference`.
fn extend_near(reference: i64, ts: u32) -> i64 {
    let delta = ts.wrapping_sub(reference as u32) as i32;
    reference.saturating_add(i64::from(delta))
}

impl RtpUnwrapper {
    pub fn new() -> Self {
        Self::default()
    }

    /// Extends `ts` and remembers it when it is the highest so far.
    pub fn unwrap(&mut self, ts: u32) -> i64 {
        let ext = self.extend(ts);
        if self.highest.is_none_or(|h| ext > h) {
            self.highest = Some(ext);
        }
        ext
    }

    /// Extends `ts` without updating the state (the first one maps to itself).
    pub fn extend(&self, ts: u32) -> i64 {
        match self.highest {
            Some(h) => extend_near(h, ts),
            None => i64::from(ts),
        }
    }

    pub fn highest(&self) -> Option<i64> {
        self.highest
    }
}

/// One RTCP sender report: this RTP time was sampled at this wall-clock time.
/// With str0m: `SenderReport { ntp_time: info.ntp_time, rtp_time: info.rtp_time.numer() as u32 }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SenderReport {
    pub ntp_time: SystemTime,
    pub rtp_time: u32,
}

/// Counters of a [`Timeline`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TimelineStats {
    /// Audio timestamps raised to stay strictly increasing.
    pub clamped: u64,
    /// Frames that mapped before tick 0 and were dropped.
    pub dropped_before_start: u64,
    /// Sender-report corrections rejected as too large.
    pub sync_rejected: u64,
    /// The lip-sync correction applied (ticks added to audio relative to
    /// video), once sender reports allowed it.
    pub sync_correction: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Anchor {
    rtp: i64,
    ticks: i64,
}

#[derive(Debug, Clone, Default)]
struct Track {
    clock_rate: u32,
    unwrap: RtpUnwrapper,
    anchor: Option<Anchor>,
    sr: Option<SenderReport>,
    last_out: Option<i64>,
}

impl Track {
    fn ticks_of(&self, anchor: Anchor, rtp: i64) -> i64 {
        let dist = i128::from(rtp) - i128::from(anchor.rtp);
        let scaled = (dist * i128::from(CLOCK_HZ)).div_euclid(i128::from(self.clock_rate.max(1)));
        saturate(i128::from(anchor.ticks) + scaled)
    }

    /// Wall-clock time (ns since the Unix epoch) of stream tick 0 according to
    /// this track's anchor and sender report.
    fn tick_zero_wall_ns(&self) -> Option<i128> {
        let anchor = self.anchor?;
        let sr = self.sr?;
        if self.clock_rate == 0 {
            return None;
        }
        let sr_rtp = extend_near(anchor.rtp, sr.rtp_time);
        let anchor_wall = system_time_ns(sr.ntp_time)
            + (i128::from(anchor.rtp) - i128::from(sr_rtp)) * NANOS_PER_SEC
                / i128::from(self.clock_rate);
        Some(anchor_wall - i128::from(anchor.ticks) * NANOS_PER_SEC / i128::from(CLOCK_HZ))
    }
}

fn saturate(v: i128) -> i64 {
    i64::try_from(v).unwrap_or(if v < 0 { i64::MIN } else { i64::MAX })
}

fn system_time_ns(t: SystemTime) -> i128 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i128::try_from(d.as_nanos()).unwrap_or(i128::MAX),
        Err(e) => -i128::try_from(e.duration().as_nanos()).unwrap_or(i128::MAX),
    }
}

/// Ticks from `epoch` to `t`, negative when `t` is earlier.
fn ticks_between(epoch: Instant, t: Instant) -> i64 {
    let ns = match t.checked_duration_since(epoch) {
        Some(d) => i128::try_from(d.as_nanos()).unwrap_or(i128::MAX),
        None => -i128::try_from(epoch.duration_since(t).as_nanos()).unwrap_or(i128::MAX),
    };
    saturate(ns * i128::from(CLOCK_HZ) / NANOS_PER_SEC)
}

/// The timeline of one publication, shared by its audio and video track.
///
/// Per frame: first, when the depacketizer has sender-report info for the
/// track (str0m's `last_sender_info`), `timeline.sender_report(kind, sr)`
/// (repeating the same report is free; calling it before `map` lets a track
/// that has not output yet be aligned without a gap); then
/// `timeline.map(kind, clock_rate, rtp_time, arrival)`. See the module
/// documentation for the rules.
#[derive(Debug, Clone, Default)]
pub struct Timeline {
    epoch: Option<Instant>,
    video: Track,
    audio: Track,
    synced: bool,
    stats: TimelineStats,
}

impl Timeline {
    pub fn new() -> Self {
        Self::default()
    }

    /// A timeline whose tick 0 is `epoch` (another timeline's, so that
    /// simulcast layers share the publication's clock).
    pub fn with_epoch(epoch: Option<Instant>) -> Self {
        Self {
            epoch,
            ..Self::default()
        }
    }

    /// The arrival instant of tick 0, once a frame came.
    pub fn epoch(&self) -> Option<Instant> {
        self.epoch
    }

    /// Maps a frame's RTP timestamp (track clock) to stream ticks. `None`
    /// when it falls before the start of the stream (drop the frame) or the
    /// clock rate is 0. Audio results are strictly increasing; video results
    /// are PTS (see the module documentation).
    pub fn map(
        &mut self,
        kind: TrackKind,
        clock_rate: u32,
        rtp_time: u32,
        arrival: Instant,
    ) -> Option<i64> {
        if clock_rate == 0 {
            return None;
        }
        let epoch = *self.epoch.get_or_insert(arrival);
        let track = self.track_mut(kind);
        if track.clock_rate != clock_rate {
            // First frame, or the codec changed: anchor anew at arrival.
            track.clock_rate = clock_rate;
            track.anchor = None;
        }
        let rtp = track.unwrap.unwrap(rtp_time);
        let mut anchored = false;
        let anchor = match track.anchor {
            Some(a) => a,
            None => {
                let mut a = Anchor {
                    rtp,
                    ticks: ticks_between(epoch, arrival),
                };
                if let Some(last) = track.last_out {
                    // Re-anchoring an active track: never behind its last output.
                    a.ticks = a.ticks.max(last.saturating_add(1));
                }
                track.anchor = Some(a);
                anchored = true;
                a
            }
        };
        if anchored {
            self.try_sync();
        }
        let track = self.track_mut(kind);
        let anchor = track.anchor.unwrap_or(anchor);
        let mut ticks = track.ticks_of(anchor, rtp);
        if ticks < 0 {
            self.stats.dropped_before_start += 1;
            return None;
        }
        let floor = match (kind, track.last_out) {
            (TrackKind::Audio, Some(last)) => Some(last.saturating_add(1)),
            _ => None,
        };
        let clamped = floor.is_some_and(|f| ticks < f);
        if let Some(f) = floor.filter(|_| clamped) {
            ticks = f;
        }
        track.last_out = Some(track.last_out.map_or(ticks, |l| l.max(ticks)));
        if clamped {
            self.stats.clamped += 1;
        }
        Some(ticks)
    }

    /// Records a sender report of a track; may trigger the one-time lip-sync
    /// correction (see the module documentation).
    pub fn sender_report(&mut self, kind: TrackKind, sr: SenderReport) {
        let track = self.track_mut(kind);
        if track.sr == Some(sr) {
            return;
        }
        track.sr = Some(sr);
        self.try_sync();
    }

    /// True once audio and video were aligned with sender reports.
    pub fn is_synced(&self) -> bool {
        self.synced
    }

    pub fn stats(&self) -> TimelineStats {
        self.stats
    }

    fn track_mut(&mut self, kind: TrackKind) -> &mut Track {
        match kind {
            TrackKind::Video => &mut self.video,
            TrackKind::Audio => &mut self.audio,
        }
    }

    fn try_sync(&mut self) {
        if self.synced {
            return;
        }
        let (Some(zero_v), Some(zero_a)) = (
            self.video.tick_zero_wall_ns(),
            self.audio.tick_zero_wall_ns(),
        ) else {
            return;
        };
        // Ticks to add to audio so both tracks agree on the wall clock.
        let correction = saturate((zero_a - zero_v) * i128::from(CLOCK_HZ) / NANOS_PER_SEC);
        if correction.unsigned_abs() > MAX_SYNC_CORRECTION.unsigned_abs() {
            self.stats.sync_rejected += 1;
            return;
        }
        let shift = |track: &mut Track, by: i64| {
            if let Some(a) = track.anchor.as_mut() {
                a.ticks = a.ticks.saturating_add(by);
            }
        };
        // Video is never moved once it has output: shifting it mid-GOP would
        // put B-frames after the reference frames they display before.
        // Audio moved earlier is clamped here (and the transcoder drops the
        // overlap), a one-time skip of at most the correction.
        if self.video.last_out.is_none() && self.audio.last_out.is_some() {
            shift(&mut self.video, -correction);
        } else {
            shift(&mut self.audio, correction);
        }
        self.synced = true;
        self.stats.sync_correction = Some(correction);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const WRAP: i64 = 1 << 32;

    #[test]
    fn unwrap_forward_across_wrap() {
        let mut u = RtpUnwrapper::new();
        assert_eq!(u.unwrap(0xffff_ff00), 0xffff_ff00);
        assert_eq!(u.unwrap(0xffff_ffff), 0xffff_ffff);
        assert_eq!(u.unwrap(0), WRAP);
        assert_eq!(u.unwrap(0x100), WRAP + 0x100);
        // Many wraps in big steps.
        let mut u = RtpUnwrapper::new();
        let mut ts: u32 = 0xf000_0000;
        let mut expect = i64::from(ts);
        for _ in 0..40 {
            assert_eq!(u.unwrap(ts), expect);
            ts = ts.wrapping_add(0x4000_0000);
            expect += 0x4000_0000;
        }
    }

    #[test]
    fn unwrap_reordering_across_wrap() {
        let mut u = RtpUnwrapper::new();
        assert_eq!(u.unwrap(0xffff_fff0), 0xffff_fff0);
        assert_eq!(u.unwrap(0x10), WRAP + 0x10);
        // Late packet from before the wrap.
        assert_eq!(u.unwrap(0xffff_fff8), 0xffff_fff8);
        assert_eq!(u.unwrap(0x20), WRAP + 0x20);
        assert_eq!(u.highest(), Some(WRAP + 0x20));
        // Backwards across the wrap at the very start.
        let mut u = RtpUnwrapper::new();
        assert_eq!(u.unwrap(0x10), 0x10);
        assert_eq!(u.unwrap(0xffff_fff0), -0x10);
        assert_eq!(u.unwrap(0x30), 0x30);
        assert_eq!(u.extend(0xffff_fff0), -0x10);
    }

    #[test]
    fn opus_48k_to_90k_is_exact_across_wrap() {
        let t0 = Instant::now();
        let mut tl = Timeline::new();
        let start: u32 = u32::MAX - 960 * 5;
        // One hour of 20 ms packets.
        for i in 0..180_000u32 {
            let rtp = start.wrapping_add(i * 960);
            let at = t0 + Duration::from_millis(u64::from(i) * 20);
            let ticks = tl.map(TrackKind::Audio, 48_000, rtp, at).unwrap();
            assert_eq!(ticks, i64::from(i) * 1800);
        }
        assert_eq!(tl.stats(), TimelineStats::default());
    }

    #[test]
    fn fallback_without_sr_anchors_on_arrival() {
        let t0 = Instant::now();
        let mut tl = Timeline::new();
        // Video first, audio 30 ms later; unrelated RTP bases.
        assert_eq!(tl.map(TrackKind::Video, 90_000, 1_000_000, t0), Some(0));
        let a0 = t0 + Duration::from_millis(30);
        assert_eq!(tl.map(TrackKind::Audio, 48_000, 77, a0), Some(2700));
        // Later frames follow their RTP clocks, not their arrival.
        let late = t0 + Duration::from_millis(500);
        assert_eq!(
            tl.map(TrackKind::Video, 90_000, 1_003_000, late),
            Some(3000)
        );
        assert_eq!(tl.map(TrackKind::Audio, 48_000, 77 + 960, late), Some(4500));
        // B-frame: video PTS may go back, not clamped.
        assert_eq!(
            tl.map(TrackKind::Video, 90_000, 1_001_500, late),
            Some(1500)
        );
        assert!(!tl.is_synced());
        assert_eq!(tl.stats(), TimelineStats::default());
    }

    /// Wall clock of the publisher: video RTP 90k base `vb`, audio 48k base
    /// `ab`, both sampled at wall time `w0`.
    fn sr(w0: SystemTime, secs_after: f64, rtp_base: u32, rate: u32) -> SenderReport {
        SenderReport {
            ntp_time: w0 + Duration::from_secs_f64(secs_after),
            rtp_time: rtp_base.wrapping_add((secs_after * f64::from(rate)) as u32),
        }
    }

    #[test]
    fn sr_aligns_before_audio_output() {
        let t0 = Instant::now();
        let w0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let (vb, ab) = (0xffff_0000u32, 12_345u32);
        let mut tl = Timeline::new();
        // Video captured at w0 arrives at t0.
        assert_eq!(tl.map(TrackKind::Video, 90_000, vb, t0), Some(0));
        tl.sender_report(TrackKind::Video, sr(w0, 0.5, vb, 90_000));
        // Audio captured at w0 + 100 ms, but it arrives 150 ms after t0
        // (50 ms more network/jitter delay than video).
        tl.sender_report(TrackKind::Audio, sr(w0, 1.0, ab, 48_000));
        let a_rtp = ab.wrapping_add(4800);
        let at = t0 + Duration::from_millis(150);
        assert_eq!(tl.map(TrackKind::Audio, 48_000, a_rtp, at), Some(9000));
        assert!(tl.is_synced());
        assert_eq!(tl.stats().sync_correction, Some(-4500));
        // A video frame captured at the same instant has the same timestamp.
        let v = tl.map(TrackKind::Video, 90_000, vb.wrapping_add(9000), at);
        assert_eq!(v, Some(9000));
    }

    #[test]
    fn sr_after_output_never_goes_back() {
        let t0 = Instant::now();
        let w0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let (vb, ab) = (500u32, 0xffff_fff0u32);
        for audio_extra_delay_ms in [40u64, 0] {
            // Video captured at w0 + i/30 s arrives at t0 + i/30 s; audio
            // packet i captured at w0 + 100 ms + i*20 ms arrives at t0 + the
            // same + `audio_extra_delay_ms` (0 in the second run, where video
            // gets 40 ms of extra delay instead).
            let video_extra_ms = 40 - audio_extra_delay_ms;
            let mut tl = Timeline::new();
            let mut video = Vec::new();
            let mut audio = Vec::new();
            for i in 0..100u32 {
                let v_at =
                    t0 + Duration::from_micros(u64::from(i) * 33_333 + video_extra_ms * 1000);
                let v = tl.map(TrackKind::Video, 90_000, vb.wrapping_add(i * 3000), v_at);
                let a_at_ms = 100 + u64::from(i) * 20 + audio_extra_delay_ms;
                let a_at = t0 + Duration::from_millis(a_at_ms);
                let a = tl.map(
                    TrackKind::Audio,
                    48_000,
                    ab.wrapping_add(4800 + i * 960),
                    a_at,
                );
                video.push(v.unwrap());
                audio.push(a.unwrap());
                if i == 50 {
                    assert_eq!(tl.stats().sync_correction, None);
                    tl.sender_report(TrackKind::Video, sr(w0, 1.0, vb, 90_000));
                    tl.sender_report(TrackKind::Audio, sr(w0, 1.2, ab, 48_000));
                    assert!(tl.is_synced());
                }
            }
            assert!(video.windows(2).all(|w| w[1] > w[0]));
            assert!(audio.windows(2).all(|w| w[1] > w[0]));
            assert_eq!(tl.stats().sync_correction.map(i64::abs), Some(3600));
            // Audio moved 40 ms earlier: the two packets that would overlap
            // what was already output are clamped (a one-time glitch).
            let expect_clamped = if audio_extra_delay_ms > 0 { 2 } else { 0 };
            assert_eq!(tl.stats().clamped, expect_clamped);
            // Before the reports: off by the 40 ms delay difference.
            // After: video frame 3k and audio packet 5k-5 (both captured at
            // k * 100 ms) have the same timestamp.
            assert_eq!((video[30] - audio[45]).abs(), 3600);
            for k in 17..20 {
                assert_eq!(video[3 * k], audio[5 * k - 5], "k={k}");
            }
        }
    }

    #[test]
    fn sr_rejected_when_absurd() {
        let t0 = Instant::now();
        let w0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let mut tl = Timeline::new();
        tl.map(TrackKind::Video, 90_000, 0, t0);
        tl.map(TrackKind::Audio, 48_000, 0, t0);
        tl.sender_report(TrackKind::Video, sr(w0, 1.0, 0, 90_000));
        // Audio claims its RTP 0 was sampled 10 s after video's.
        let bogus = SenderReport {
            ntp_time: w0 + Duration::from_secs(11),
            rtp_time: 48_000,
        };
        tl.sender_report(TrackKind::Audio, bogus);
        // Same report again: not counted twice.
        tl.sender_report(TrackKind::Audio, bogus);
        assert!(!tl.is_synced());
        assert_eq!(tl.stats().sync_rejected, 1);
        assert_eq!(tl.map(TrackKind::Audio, 48_000, 960, t0), Some(1800));
    }

    #[test]
    fn drops_before_start_and_clamps_audio() {
        let t0 = Instant::now();
        let mut tl = Timeline::new();
        assert_eq!(tl.map(TrackKind::Video, 90_000, 3000, t0), Some(0));
        // A B-frame before the first frame: before the stream start.
        assert_eq!(tl.map(TrackKind::Video, 90_000, 1000, t0), None);
        assert_eq!(tl.stats().dropped_before_start, 1);
        // Audio whose arrival instant is before the epoch (reported late).
        let early = t0.checked_sub(Duration::from_millis(10)).unwrap_or(t0);
        if early < t0 {
            assert_eq!(tl.map(TrackKind::Audio, 48_000, 0, early), None);
            assert_eq!(tl.map(TrackKind::Audio, 48_000, 960, early), Some(900));
        } else {
            tl.map(TrackKind::Audio, 48_000, 0, early);
        }
        // Duplicate and backwards audio timestamps are clamped.
        let a = tl.map(TrackKind::Audio, 48_000, 1920, t0).unwrap();
        assert_eq!(tl.map(TrackKind::Audio, 48_000, 1920, t0), Some(a + 1));
        assert_eq!(tl.map(TrackKind::Audio, 48_000, 1000, t0), Some(a + 2));
        assert_eq!(tl.stats().clamped, 2);
        assert_eq!(tl.map(TrackKind::Audio, 0, 1000, t0), None);
    }
}
