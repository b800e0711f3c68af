//! Bodies of the cargo-fuzz targets (`fuzz/fuzz_targets/`), one function per
//! target taking the raw fuzz input. They live in the library so that the fuzz
//! targets are one-liners and `tests/fuzz_regressions.rs` replays saved inputs
//! through exactly the same code in the normal `cargo test`.
//!
//! Each body feeds the input to our own parsers and writers and asserts the
//! guarantees they document (monotonic DTS, whole TS packets with continuous
//! counters, well-formed FLV tags, candidates that parse again...), so a
//! fuzzer finds broken promises as well as panics. None of them does any I/O.
//!
//! Inputs are decoded with [`Input`], a reader that never fails: past the end
//! it yields zeros and empty slices.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::hls::playlist::{Playlist, PlaylistConfig};
use crate::hls::segmenter::{Segment, Segmenter, SegmenterConfig};
use crate::hls::ts::{PACKET_SIZE, PMT_PID};
use crate::media::frame::{Codec, CodecParams, Frame, TrackKind};
use crate::media::h264::{
    self, NAL_AUD, NAL_FILLER, NAL_IDR, NAL_PPS, NAL_SPS, Pps, SliceHeader, Sps, access_units,
    nal_type, split_annexb,
};
use crate::media::time::SenderReport;
use crate::media::{av1, vp8, vp9};
use crate::rtc::ingest::{Depacketized, Ingest};
use crate::rtc::{offer, trickle};
use crate::rtmp::flv::{self, FlvFile, Metadata, TagKind};

/// The body of a fuzz target: any input, must not panic.
pub type Body = fn(&[u8]);

/// Every target: its name (the directory of its corpus, seeds and
/// regressions) and its body.
pub const TARGETS: &[(&str, Body)] = &[
    ("sdp_offer", sdp_offer),
    ("trickle_fragment", trickle_fragment),
    ("h264_depacketize", h264_depacketize),
    ("video_depacketize", video_depacketize),
    ("ts_mux", ts_mux),
    ("flv_tag", flv_tag),
];

/// The body of the target called `name`.
pub fn target(name: &str) -> Option<Body> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}

/// A reader of fuzz input that never fails: numbers are big-endian and read
/// as zero past the end, slices are cut short.
#[derive(Debug, Clone)]
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// What has not been read yet (and consumes it).
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }

    /// The next `n` bytes, or fewer at the end.
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.data.split_at(n.min(self.data.len()));
        self.data = tail;
        head
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0; N];
        let b = self.bytes(N);
        out[..b.len()].copy_from_slice(b);
        out
    }

    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    pub fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.array())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.array())
    }

    pub fn i32(&mut self) -> i32 {
        i32::from_be_bytes(self.array())
    }

    pub fn i64(&mut self) -> i64 {
        i64::from_be_bytes(self.array())
    }

    /// A slice behind a 16-bit length (cut short at the end).
    pub fn chunk(&mut self) -> &'a [u8] {
        let len = usize::from(self.u16());
        self.bytes(len)
    }
}

// ---------------------------------------------------------------------------
// WHIP offer and trickle fragment
// ---------------------------------------------------------------------------

/// `sdp_offer`: the offer checks of `POST /whip/{stream}` ([`offer::parse`]
/// then [`offer::check`]) on any text.
pub fn sdp_offer(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let Ok(sections) = offer::parse(&text) else {
        return;
    };
    assert!(text.lines().count() <= offer::MAX_LINES, "too many lines");
    for s in &sections {
        for (p, rtx) in s.h264_mode1() {
            assert_eq!(p.codec, "h264");
            if let Some(rtx) = rtx {
                assert!(s.payloads.iter().any(|r| r.pt == rtx && r.codec == "rtx"));
            }
        }
        // One entry per payload type.
        for (i, p) in s.payloads.iter().enumerate() {
            assert!(s.payloads[i + 1..].iter().all(|q| q.pt != p.pt));
        }
    }
    let accept_non_h264 = data.first().is_some_and(|b| b & 1 == 1);
    if let Ok(accepted) = offer::check(sections, accept_non_h264) {
        assert!(accepted.video.is_some() || accepted.audio.is_some());
        for s in accepted.video.iter().chain(&accepted.audio) {
            assert!(!s.port_zero);
            assert!(s.direction == "sendonly" || s.direction == "sendrecv");
        }
        if let Some(v) = &accepted.video {
            match accepted.video_codec {
                Some(Codec::H264) => assert!(!v.h264_mode1().is_empty()),
                Some(c @ (Codec::Vp8 | Codec::Vp9 | Codec::Av1)) => {
                    assert!(accept_non_h264 && v.transcoded_video(c).is_some());
                }
                other => panic!("video accepted as {other:?}"),
            }
        }
        if let Some(a) = &accepted.audio {
            assert!(a.opus().is_some());
        }
    }
}

/// `trickle_fragment`: the `PATCH` body parser ([`trickle::parse`]) on any
/// text. Every candidate it hands to ICE must parse again, unchanged.
pub fn trickle_fragment(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let Ok(fragment) = trickle::parse(&text) else {
        return;
    };
    for c in &fragment.candidates {
        assert!(c.starts_with("candidate:"), "{c:?}");
        let again = trickle::parse(&format!("a={c}\r\n"))
            .unwrap_or_else(|e| panic!("{c:?} does not parse again: {e}"));
        assert_eq!(again.candidates, [c.as_str()], "{c:?} changed");
        assert_eq!(again.dropped, 0);
    }
}

// ---------------------------------------------------------------------------
// H264 / Opus ingest
// ---------------------------------------------------------------------------

/// The media half of `rtc::ingest::Ingest::push` (what the WebRTC driver runs
/// on every frame str0m depacketizes), with the guarantees of its output
/// checked. `rtc::ingest` itself is private to `rtc` and takes str0m's
/// `MediaData`, so this mirrors its few lines of glue over the same media
/// code: [`Timeline`] then [`H264Assembler`] (video) or the Opus packet as a
/// frame (audio).
struct IngestCheck {
    ingest: Ingest,
    video: Codec,
    last_video_dts: Option<i64>,
    last_audio: Option<i64>,
    frames: Vec<(TrackKind, Frame)>,
}

impl IngestCheck {
    fn new() -> Self {
        Self::with_video(Codec::H264)
    }

    fn with_video(video: Codec) -> Self {
        Self {
            ingest: Ingest::new(2, video),
            video,
            last_video_dts: None,
            last_audio: None,
            frames: Vec::new(),
        }
    }

    fn push(&mut self, d: Depacketized<'_>) {
        let kind = d.kind;
        let out = self.ingest.push_depacketized(d);
        assert!(!(out.frame.is_some() && out.want_keyframe));
        let Some(frame) = out.frame else { return };
        assert!(frame.pts >= 0, "negative timeline output {}", frame.pts);
        match kind {
            TrackKind::Video => {
                if self.video == Codec::H264 {
                    check_video_frame(&frame, self.last_video_dts);
                } else {
                    check_whole_frame(&frame, self.video, self.last_video_dts);
                }
                self.last_video_dts = Some(frame.dts);
            }
            TrackKind::Audio => {
                if let Some(last) = self.last_audio {
                    assert!(frame.pts > last, "audio went from {last} to {}", frame.pts);
                }
                self.last_audio = Some(frame.pts);
            }
        }
        self.frames.push((kind, frame));
    }
}

/// What [`H264Assembler`] promises about each frame it outputs.
fn check_video_frame(frame: &Frame, previous_dts: Option<i64>) {
    assert!(frame.dts >= 0, "negative DTS {}", frame.dts);
    assert!(
        frame.dts <= frame.pts,
        "DTS {} > PTS {}",
        frame.dts,
        frame.pts
    );
    if let Some(prev) = previous_dts {
        assert!(frame.dts > prev, "DTS went from {prev} to {}", frame.dts);
    }
    match &*frame.params {
        CodecParams::H264 {
            sps,
            pps,
            width,
            height,
        } => {
            assert!(*width > 0 && *height > 0);
            assert_eq!(nal_type(sps), NAL_SPS);
            assert_eq!(nal_type(pps), NAL_PPS);
        }
        other => panic!("video frame with {other:?}"),
    }
    let nals: Vec<&[u8]> = split_annexb(&frame.data).collect();
    assert!(nals.iter().any(|n| h264::is_vcl(nal_type(n))), "no slice");
    assert!(
        nals.iter()
            .all(|n| !matches!(nal_type(n), NAL_AUD | NAL_FILLER)),
        "AUD or filler left in"
    );
    assert_eq!(
        frame.key,
        nals.iter().any(|n| nal_type(n) == NAL_IDR),
        "key flag"
    );
    if frame.key {
        assert_eq!(nals.first().map(|n| nal_type(n)), Some(NAL_SPS));
        let first_pps = nals.iter().position(|n| nal_type(n) == NAL_PPS);
        let first_slice = nals.iter().position(|n| h264::is_vcl(nal_type(n)));
        assert!(first_pps < first_slice, "IDR without PPS in front");
    }
}

/// What ingest promises about each VP8, VP9 or AV1 frame: the negotiated
/// codec, increasing times, a size, and the key flag on exactly the frames
/// the bitstream parser calls keyframes (of the size the params give).
fn check_whole_frame(frame: &Frame, codec: Codec, previous_dts: Option<i64>) {
    assert_eq!(frame.codec(), codec);
    assert_eq!(frame.dts, frame.pts);
    if let Some(prev) = previous_dts {
        assert!(frame.dts > prev, "DTS went from {prev} to {}", frame.dts);
    }
    let size = frame.params.picture_size().expect("a video size");
    assert!(size.0 > 0 && size.1 > 0);
    let keyframe_size = match codec {
        Codec::Vp8 => vp8::keyframe_size,
        Codec::Vp9 => vp9::keyframe_size,
        _ => av1::keyframe_size,
    };
    let key = keyframe_size(&frame.data);
    assert_eq!(frame.key, key.is_some(), "key flag");
    if let Some(key) = key {
        assert_eq!(key, size);
    }
}

/// The H264 parsers on their own, on every NAL unit of `data`.
fn parse_nal_units(data: &[u8]) {
    let mut sps: Option<Sps> = None;
    let mut pps: Option<Pps> = None;
    let mut poc = h264::PocCounter::new();
    for nal in split_annexb(data) {
        match nal_type(nal) {
            NAL_SPS => {
                if let Ok(s) = Sps::parse(nal) {
                    assert!(s.width > 0 && s.height > 0);
                    let _ = s.reorder_hint();
                    let _ = s.frame_duration_ticks();
                    sps = Some(s);
                }
            }
            NAL_PPS => pps = Pps::parse(nal).ok().or(pps),
            t if t == h264::NAL_SLICE || t == NAL_IDR => {
                let _ = SliceHeader::pps_id(nal);
                if let (Some(s), Some(p)) = (&sps, &pps)
                    && let Ok(header) = SliceHeader::parse(nal, s, p)
                {
                    let _ = poc.next(s, &header);
                }
            }
            _ => {}
        }
    }
    let _ = access_units(data);
}

/// Feeds an Annex B elementary stream, one access unit (AUD delimited) per
/// frame at 30 fps, as video, with an audio packet after each when `audio`.
fn ingest_elementary_stream(ingest: &mut IngestCheck, stream: &[u8], audio: bool) {
    let start = Instant::now();
    for (i, au) in access_units(stream).into_iter().enumerate() {
        let i = u32::try_from(i).unwrap_or(u32::MAX);
        let mut annexb = Vec::new();
        for nal in au {
            annexb.extend_from_slice(&[0, 0, 0, 1]);
            annexb.extend_from_slice(nal);
        }
        let arrival = start + Duration::from_millis(u64::from(i) * 33);
        ingest.push(Depacketized {
            kind: TrackKind::Video,
            clock_rate: 90_000,
            rtp_time: i.wrapping_mul(3000),
            arrival,
            sender_report: None,
            contiguous: true,
            data: &annexb,
        });
        if audio {
            ingest.push(Depacketized {
                kind: TrackKind::Audio,
                clock_rate: 48_000,
                rtp_time: i.wrapping_mul(1600),
                arrival,
                sender_report: None,
                contiguous: true,
                data: &[0xFC, 0xFF, 0xFE],
            });
        }
    }
}

/// Depacketized frames with timestamps, arrival times, sequence numbers and
/// sender reports all from the input.
fn ingest_packets(ingest: &mut IngestCheck, input: &mut Input<'_>) {
    let start = Instant::now();
    let mut arrival_ms: i64 = 0;
    // Per track: the last RTP time and sequence number.
    let mut rtp = [0u32; 2];
    let mut seq = [0u16; 2];
    while !input.is_empty() {
        let control = input.u8();
        let kind = if control & 1 == 0 {
            TrackKind::Video
        } else {
            TrackKind::Audio
        };
        let track = usize::from(control & 1);
        // The depacketizer's `contiguous`: no sequence number skipped.
        let seq_step = if control & 0x08 != 0 { input.u16() } else { 1 };
        seq[track] = seq[track].wrapping_add(seq_step);
        let contiguous = seq_step == 1;
        rtp[track] = rtp[track].wrapping_add(input.u32());
        let clock_rate = match (control & 0x04 != 0, kind) {
            (true, _) => input.u32(),
            (false, TrackKind::Video) => 90_000,
            (false, TrackKind::Audio) => 48_000,
        };
        // Arrival goes back too (reordered or replayed packets).
        let step = i64::from(input.u16() as i16);
        arrival_ms = arrival_ms.saturating_add(step);
        let offset = Duration::from_millis(arrival_ms.unsigned_abs());
        let arrival = if arrival_ms >= 0 {
            start.checked_add(offset)
        } else {
            start.checked_sub(offset)
        }
        .unwrap_or(start);
        let sender_report = (control & 0x02 != 0).then(|| {
            let wall = Duration::new(u64::from(input.u32()), input.u32() % 1_000_000_000);
            let ntp_time = if control & 0x10 != 0 {
                UNIX_EPOCH.checked_sub(wall)
            } else {
                UNIX_EPOCH.checked_add(wall)
            }
            .unwrap_or(SystemTime::UNIX_EPOCH);
            SenderReport {
                ntp_time,
                rtp_time: input.u32(),
            }
        });
        let data = input.chunk();
        ingest.push(Depacketized {
            kind,
            clock_rate,
            rtp_time: rtp[track],
            arrival,
            sender_report,
            contiguous,
            data,
        });
    }
}

/// `h264_depacketize`: what the ingest runs on the H264 and Opus frames str0m
/// depacketizes: the stream timeline (RTP time, wrap-around, sender-report
/// lip sync), the H264 access-unit assembler (SPS/PPS/slice parsing, POC,
/// DTS), and the H264 parsers on their own.
///
/// First byte: bit 0 set, the rest is an Annex B elementary stream (AUD
/// delimited access units at 30 fps; bit 1: an Opus packet after each);
/// otherwise the rest is a sequence of depacketized frames, each a control
/// byte (bit 0 audio, bit 1 sender report follows, bit 2 explicit clock rate,
/// bit 3 explicit sequence step, bit 4 sender report before 1970), then
/// fields as [`ingest_packets`] reads them.
pub fn h264_depacketize(data: &[u8]) {
    let mut input = Input::new(data);
    let mode = input.u8();
    let mut ingest = IngestCheck::new();
    if mode & 1 == 1 {
        let stream = input.rest();
        parse_nal_units(stream);
        ingest_elementary_stream(&mut ingest, stream, mode & 2 != 0);
    } else {
        ingest_packets(&mut ingest, &mut input);
    }
    let stats = ingest.ingest.video_stats();
    assert_eq!(
        stats.frames_out,
        ingest
            .frames
            .iter()
            .filter(|(k, _)| *k == TrackKind::Video)
            .count() as u64
    );
}

/// `video_depacketize`: what the ingest runs on the VP8, VP9 and AV1 frames
/// str0m depacketizes (keyframe detection and sizes from the bitstream, the
/// wait for a keyframe after a loss, increasing times).
///
/// First byte: the codec (VP8, VP9, AV1 for 0, 1, 2 modulo 3); the rest is
/// a sequence of depacketized frames as in `h264_depacketize`.
pub fn video_depacketize(data: &[u8]) {
    video_ingest(data);
}

fn video_ingest(data: &[u8]) -> IngestCheck {
    let mut input = Input::new(data);
    let codec = Codec::TRANSCODED_VIDEO[usize::from(input.u8() % 3)];
    let mut ingest = IngestCheck::with_video(codec);
    ingest_packets(&mut ingest, &mut input);
    ingest
}

// ---------------------------------------------------------------------------
// MPEG-TS muxer, segmenter, playlist
// ---------------------------------------------------------------------------

/// Checks segments as a player would read them: whole 188-byte packets, PAT
/// and PMT first, continuity counters that go on from packet to packet (and
/// segment to segment) on every PID.
#[derive(Default)]
struct TsCheck {
    continuity: std::collections::HashMap<u16, u8>,
    next_sequence: Option<u64>,
}

impl TsCheck {
    fn segment(&mut self, segment: &Segment) {
        if let Some(expected) = self.next_sequence {
            assert_eq!(segment.sequence, expected, "sequence numbers go on");
        }
        self.next_sequence = Some(segment.sequence + 1);
        assert!(segment.duration.is_finite() && segment.duration >= 0.0);
        let ts = &segment.data;
        assert_eq!(ts.len() % PACKET_SIZE, 0, "whole packets only");
        assert!(ts.len() >= 2 * PACKET_SIZE, "PAT and PMT");
        for (i, p) in ts.chunks(PACKET_SIZE).enumerate() {
            assert_eq!(p[0], 0x47, "sync byte of packet {i}");
            let pid = u16::from(p[1] & 0x1F) << 8 | u16::from(p[2]);
            match i {
                0 => assert_eq!(pid, 0, "PAT first"),
                1 => assert_eq!(pid, PMT_PID, "PMT second"),
                _ => {}
            }
            let control = p[3] >> 4 & 3;
            assert_ne!(control, 0, "reserved adaptation_field_control");
            if control & 2 != 0 {
                let len = usize::from(p[4]);
                let max = if control & 1 != 0 { 182 } else { 183 };
                assert!(len <= max, "adaptation field of {len} bytes");
            }
            if control & 1 != 0 {
                let cc = p[3] & 0x0F;
                if let Some(prev) = self.continuity.insert(pid, cc) {
                    assert_eq!(cc, (prev + 1) & 0x0F, "continuity on PID {pid:#x}");
                }
            }
        }
    }
}

/// The same segmenter, playlist and checker, frames in.
struct HlsCheck {
    segmenter: Segmenter,
    playlist: Playlist,
    check: TsCheck,
    now_ms: i64,
}

impl HlsCheck {
    fn new(target: Duration, max: Duration, window: usize, video: bool, audio: bool) -> Self {
        Self {
            segmenter: Segmenter::new(
                SegmenterConfig {
                    target_duration: target,
                    max_duration: max,
                },
                video,
                audio,
            ),
            playlist: Playlist::new(PlaylistConfig {
                target_duration: target,
                window,
            }),
            check: TsCheck::default(),
            now_ms: 1_700_000_000_000,
        }
    }

    fn segment(&mut self, segment: Option<Segment>) {
        if let Some(s) = segment {
            self.check.segment(&s);
            let removed = self.playlist.push(&s);
            assert!(removed.len() <= 1);
            let text = self.playlist.render();
            assert!(text.starts_with("#EXTM3U"), "{text}");
        }
    }

    fn push(&mut self, kind: TrackKind, frame: &Frame) {
        let _ = self.segmenter.wants_keyframe();
        if let Ok(segment) = self.segmenter.push(kind, frame, self.now_ms) {
            self.segment(segment);
        }
    }
}

/// A timestamp step read from the input: mostly forward by up to one second,
/// sometimes back, sometimes anywhere.
fn step_clock(input: &mut Input<'_>, clock: i64) -> i64 {
    match input.u8() {
        t @ 0..=239 => clock.saturating_add(i64::from(t) * 375),
        240..=247 => clock.saturating_sub(i64::from(input.u16())),
        248 => input.i64(),
        249 => clock.saturating_add(i64::from(input.u32())),
        _ => clock,
    }
}

fn aac_params_from(input: &mut Input<'_>) -> Arc<CodecParams> {
    let asc_len = usize::from(input.u8() % 8);
    let asc = Bytes::copy_from_slice(input.bytes(asc_len));
    let rates = [48_000, 44_100, 96_000, 7_350, 0];
    let sample_rate = match input.u8() {
        r @ 0..=4 => rates[usize::from(r)],
        _ => input.u32(),
    };
    Arc::new(CodecParams::Aac {
        asc,
        sample_rate,
        channels: input.u8(),
    })
}

fn h264_params_from(input: &mut Input<'_>) -> Arc<CodecParams> {
    Arc::new(CodecParams::H264 {
        sps: Bytes::copy_from_slice(input.chunk()),
        pps: Bytes::copy_from_slice(input.chunk()),
        width: u32::from(input.u16()),
        height: u32::from(input.u16()),
    })
}

/// `ts_mux`: the MPEG-TS muxer behind the HLS segmenter, and the playlist
/// the segments go to, fed with arbitrary frames.
///
/// First bytes: track flags (bit 0 video, bit 1 audio, bit 2 elementary
/// stream mode), target and longest segment duration (ms, 16 bits each),
/// playlist window. In elementary stream mode the rest is Annex B H264 that
/// goes through the ingest's assembler first (with AAC frames when audio is
/// declared); otherwise it is a sequence of operations: video frame, audio
/// frame (codec parameters kept, new from the input, or of another codec),
/// finish, discontinuity.
pub fn ts_mux(data: &[u8]) {
    let mut input = Input::new(data);
    let flags = input.u8();
    let (video, audio) = (flags & 1 != 0, flags & 2 != 0);
    let target = Duration::from_millis(u64::from(input.u16()));
    let max = Duration::from_millis(u64::from(input.u16()));
    let window = usize::from(input.u8());
    let mut hls = HlsCheck::new(target, max, window, video, audio);
    let aac = Arc::new(CodecParams::Aac {
        asc: Bytes::from_static(&[0x11, 0x90]),
        sample_rate: 48_000,
        channels: 2,
    });

    if flags & 4 != 0 {
        let mut ingest = IngestCheck::new();
        ingest_elementary_stream(&mut ingest, input.rest(), false);
        let mut audio_pts = 0;
        for (kind, frame) in &ingest.frames {
            hls.push(*kind, frame);
            while audio && audio_pts <= frame.pts {
                let a = Frame {
                    pts: audio_pts,
                    dts: audio_pts,
                    key: true,
                    data: Bytes::from_static(&[0x21, 0x10, 0x04, 0x60, 0x8C, 0x1C]),
                    params: aac.clone(),
                };
                hls.push(TrackKind::Audio, &a);
                audio_pts += 1920;
            }
        }
        let last = hls.segmenter.finish();
        hls.segment(last);
        return;
    }

    let mut video_params: Arc<CodecParams> = Arc::new(CodecParams::H264 {
        sps: Bytes::from_static(&[0x67, 0x42, 0xC0, 0x1E, 0xD9]),
        pps: Bytes::from_static(&[0x68, 0xCE, 0x3C, 0x80]),
        width: 320,
        height: 240,
    });
    let mut audio_params = aac;
    let opus = Arc::new(CodecParams::Opus {
        sample_rate: 48_000,
        channels: 2,
    });
    let mut clock: i64 = 0;
    while !input.is_empty() {
        let op = input.u8();
        match op % 8 {
            0..=3 => {
                clock = step_clock(&mut input, clock);
                let dts = clock.saturating_sub(i64::from(input.u8()) * 375);
                let params = match op >> 4 & 3 {
                    0 => video_params.clone(),
                    1 => {
                        video_params = h264_params_from(&mut input);
                        video_params.clone()
                    }
                    2 => opus.clone(),
                    _ => audio_params.clone(),
                };
                let frame = Frame {
                    pts: clock,
                    dts,
                    key: op & 0x40 != 0,
                    data: Bytes::copy_from_slice(input.chunk()),
                    params,
                };
                hls.push(TrackKind::Video, &frame);
            }
            4 | 5 => {
                clock = step_clock(&mut input, clock);
                let params = match op >> 4 & 3 {
                    0 => audio_params.clone(),
                    1 => {
                        audio_params = aac_params_from(&mut input);
                        audio_params.clone()
                    }
                    2 => opus.clone(),
                    _ => video_params.clone(),
                };
                let frame = Frame {
                    pts: clock,
                    dts: clock,
                    key: true,
                    data: Bytes::copy_from_slice(input.chunk()),
                    params,
                };
                hls.push(TrackKind::Audio, &frame);
            }
            6 => {
                let last = if op & 0x10 != 0 {
                    hls.segmenter.mark_discontinuity()
                } else {
                    hls.segmenter.finish()
                };
                hls.segment(last);
                if op & 0x20 != 0 {
                    hls.playlist.end();
                }
            }
            _ => hls.now_ms = input.i64(),
        }
    }
    let last = hls.segmenter.finish();
    hls.segment(last);
}

// ---------------------------------------------------------------------------
// FLV
// ---------------------------------------------------------------------------

/// Checks one FLV tag as [`flv::tag`] writes it and appends it to the file.
struct FlvCheck {
    file: FlvFile,
    taken: u64,
}

impl FlvCheck {
    fn push(&mut self, kind: TagKind, timestamp_ms: u32, body: &[u8]) {
        let Ok(tag) = flv::tag(kind, timestamp_ms, body) else {
            assert!(body.len() > flv::MAX_BODY_LEN);
            return;
        };
        assert_eq!(tag.len(), 11 + body.len() + 4);
        assert_eq!(tag[0], kind as u8);
        let size = usize::from(tag[1]) << 16 | usize::from(tag[2]) << 8 | usize::from(tag[3]);
        assert_eq!(size, body.len());
        let ts = u32::from_be_bytes([tag[7], tag[4], tag[5], tag[6]]);
        assert_eq!(ts, timestamp_ms);
        let previous = u32::from_be_bytes([
            tag[tag.len() - 4],
            tag[tag.len() - 3],
            tag[tag.len() - 2],
            tag[tag.len() - 1],
        ]);
        assert_eq!(previous as usize, 11 + body.len());
        let before = self.file.len();
        self.file
            .push(kind, timestamp_ms, body)
            .expect("tag() took it");
        assert_eq!(self.file.len(), before + tag.len() as u64);
        if timestamp_ms.is_multiple_of(7) {
            self.taken += self.file.take().len() as u64;
            assert_eq!(self.taken, self.file.len());
        }
    }
}

/// Checks a video tag body from [`flv::avc_frame`]: header, composition time,
/// and NAL units behind 4-byte lengths that end exactly at the end.
fn check_avc_frame(body: &[u8], key: bool, cts: i32) {
    assert_eq!(body[0], if key { 0x17 } else { 0x27 });
    assert_eq!(body[1], 1);
    // 24-bit two's complement, sign-extended.
    let field = i32::from_be_bytes([body[2], body[3], body[4], 0]) >> 8;
    assert_eq!(field, cts.clamp(-0x80_0000, 0x7F_FFFF), "CompositionTime");
    let mut rest = &body[5..];
    let mut count = 0;
    while !rest.is_empty() {
        assert!(rest.len() >= 4, "truncated NAL length");
        let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        assert!(len > 0 && rest.len() >= 4 + len, "NAL length {len}");
        let nal = &rest[4..4 + len];
        assert!(!matches!(
            nal_type(nal),
            NAL_AUD | NAL_SPS | NAL_PPS | NAL_FILLER
        ));
        rest = &rest[4 + len..];
        count += 1;
    }
    assert!(count > 0);
}

/// Checks an AVCDecoderConfigurationRecord body from
/// [`flv::avc_sequence_header`].
fn check_avc_sequence_header(body: &[u8]) {
    assert_eq!(&body[..5], &[0x17, 0, 0, 0, 0]);
    assert_eq!(body[5], 1, "configurationVersion");
    assert_eq!(body[10], 0xE1);
    let sps_len = usize::from(u16::from_be_bytes([body[11], body[12]]));
    let sps = &body[13..13 + sps_len];
    assert_eq!(nal_type(sps), NAL_SPS);
    let parsed = Sps::parse(sps).expect("the SPS in the record parses");
    assert_eq!(
        body[6..9],
        [
            parsed.profile_idc,
            parsed.constraint_flags,
            parsed.level_idc
        ]
    );
    assert_eq!(body[13 + sps_len], 1);
    let at = 14 + sps_len;
    let pps_len = usize::from(u16::from_be_bytes([body[at], body[at + 1]]));
    let end = at + 2 + pps_len;
    assert_eq!(nal_type(&body[at + 2..end]), NAL_PPS);
    assert!(body.len() == end || body.len() == end + 4, "trailer");
}

/// The time helpers' documented relation, when not saturated.
fn check_times(pts: i64, dts: i64) {
    let cts = flv::cts_ms(pts, dts);
    let unsaturated = (pts.max(0) / 90) - (dts.max(0) / 90);
    if (-0x80_0000..=0x7F_FFFF).contains(&unsaturated) {
        assert_eq!(
            flv::timestamp_ms(dts).wrapping_add(cts as u32),
            flv::timestamp_ms(pts),
            "pts {pts} dts {dts}"
        );
    } else {
        assert!(cts == -0x80_0000 || cts == 0x7F_FFFF);
    }
}

fn metadata_from(input: &mut Input<'_>) -> Metadata {
    let flags = input.u8();
    let number = |bit: u8, input: &mut Input<'_>| {
        (flags & bit != 0).then(|| f64::from_bits(input.i64() as u64))
    };
    Metadata {
        frame_rate: number(0x01, input),
        video_bitrate_kbps: number(0x02, input),
        audio_bitrate_kbps: number(0x04, input),
        width: (flags & 0x08 != 0).then(|| input.u32()),
        height: (flags & 0x08 != 0).then(|| input.u32()),
        audio_sample_rate: (flags & 0x10 != 0).then(|| input.u32()),
        audio_channels: (flags & 0x10 != 0).then(|| input.u8()),
        has_video: flags & 0x20 != 0,
        has_audio: flags & 0x40 != 0,
    }
}

/// `flv_tag`: the FLV tag bodies RTMP push sends (AVC sequence header from
/// SPS/PPS, AVC frames, AAC, `onMetaData`), the FLV file writer and the time
/// helpers, on arbitrary frames and codec configurations.
///
/// First byte: bit 0 video, bit 1 audio (file header flags), bit 2
/// elementary stream mode: the rest is Annex B H264 that goes through the
/// ingest's assembler and then to the tags exactly as the RTMP push does
/// (where a sequence header must always be built). Otherwise the rest is a
/// sequence of operations: sequence header from SPS and PPS, access unit,
/// AAC config or frame, metadata, time conversion, raw tag.
pub fn flv_tag(data: &[u8]) {
    let mut input = Input::new(data);
    let flags = input.u8();
    let mut out = FlvCheck {
        file: FlvFile::new(flags & 1 != 0, flags & 2 != 0),
        taken: 0,
    };
    assert_eq!(out.file.len(), 13);

    if flags & 4 != 0 {
        let mut ingest = IngestCheck::new();
        ingest_elementary_stream(&mut ingest, input.rest(), false);
        let mut sent: Option<Arc<CodecParams>> = None;
        for (_, frame) in &ingest.frames {
            let CodecParams::H264 { sps, pps, .. } = &*frame.params else {
                continue;
            };
            let ts = flv::timestamp_ms(frame.dts);
            if !sent.as_ref().is_some_and(|s| Arc::ptr_eq(s, &frame.params)) {
                let header = flv::avc_sequence_header(sps, pps)
                    .expect("the assembler's SPS and PPS make a sequence header");
                check_avc_sequence_header(&header);
                out.push(TagKind::Video, ts, &header);
                sent = Some(frame.params.clone());
            }
            check_times(frame.pts, frame.dts);
            let cts = flv::cts_ms(frame.pts, frame.dts);
            let body = flv::avc_frame(&frame.data, frame.key, cts)
                .expect("an assembled access unit has a slice");
            check_avc_frame(&body, frame.key, cts);
            out.push(TagKind::Video, ts, &body);
        }
        return;
    }

    while !input.is_empty() {
        let op = input.u8();
        let timestamp = input.u32();
        match op & 0x0F {
            0 => {
                let sps = input.chunk();
                let pps = input.chunk();
                if let Ok(body) = flv::avc_sequence_header(sps, pps) {
                    check_avc_sequence_header(&body);
                    out.push(TagKind::Video, timestamp, &body);
                }
            }
            1 => {
                let key = op & 0x10 != 0;
                let cts = input.i32();
                let au = input.chunk();
                if let Ok(body) = flv::avc_frame(au, key, cts) {
                    check_avc_frame(&body, key, cts);
                    out.push(TagKind::Video, timestamp, &body);
                }
            }
            2 => {
                let data = input.chunk();
                let body = if op & 0x10 != 0 {
                    flv::aac_sequence_header(data)
                } else {
                    flv::aac_frame(data)
                };
                assert_eq!(body.len(), data.len() + 2);
                out.push(TagKind::Audio, timestamp, &body);
            }
            3 => {
                let m = metadata_from(&mut input);
                let body = flv::on_metadata(&m, op & 0x10 != 0);
                assert_eq!(body[0], 0x02, "AMF0 string first");
                assert_eq!(&body[body.len() - 3..], &[0, 0, 9], "object end");
                out.push(TagKind::Script, timestamp, &body);
            }
            4 => check_times(input.i64(), input.i64()),
            _ => {
                let kind = match op >> 4 & 3 {
                    0 => TagKind::Audio,
                    1 => TagKind::Video,
                    _ => TagKind::Script,
                };
                out.push(kind, timestamp, input.chunk());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `video_depacketize` seeds are a keyframe, an inter frame, two
    /// after a loss, a keyframe and an inter frame: four frames come out,
    /// two of them keys, and the checks above ran on them.
    #[test]
    fn video_seeds_start_on_keyframes_and_resync_after_a_loss() {
        for (name, codec) in [
            ("vp8", Codec::Vp8),
            ("vp9", Codec::Vp9),
            ("av1", Codec::Av1),
        ] {
            let path = format!(
                "{}/fuzz/seeds/video_depacketize/{name}_loss_and_keyframe",
                env!("CARGO_MANIFEST_DIR")
            );
            let ingest = video_ingest(&std::fs::read(path).unwrap());
            assert_eq!(ingest.video, codec);
            let keys: Vec<bool> = ingest
                .frames
                .iter()
                .filter(|(k, _)| *k == TrackKind::Video)
                .map(|(_, f)| f.key)
                .collect();
            assert_eq!(keys, [true, false, true, false], "{name}");
        }
    }
}
