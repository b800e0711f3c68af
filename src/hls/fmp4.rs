//! Fragmented MP4 (ISO/IEC 14496-12, CMAF-style) for HLS, sans-IO: the
//! init segment an `EXT-X-MAP` points at, and media fragments
//! (`styp` + `moof` + `mdat`) that make up segments and LL-HLS parts.
//!
//! - [`init_segment`]: `ftyp` (major brand `iso6`, compatible `iso6`, `cmfc`,
//!   `mp41`) and a `moov` with one `trak` per [`TrackConfig`] (track IDs 1, 2,
//!   … in the order given), empty sample tables, and an `mvex` with one `trex`
//!   per track. Video tracks count time in 90 kHz ticks (the hub clock), audio
//!   tracks in their sample rate.
//! - [`Fragmenter`]: frames in, [`Fragment`]s out. Each fragment is a `styp`,
//!   a `moof` (`mfhd` with a sequence number from 1, then per track with
//!   samples a `traf`: `tfhd` with default-base-is-moof, `tfdt` version 1,
//!   `trun` with data offset, per-sample durations, sizes, flags and, when a
//!   track has B-frames, signed composition time offsets) and one `mdat`
//!   holding each track's samples one run after the other.
//!
//! Sample entries: H264 as `avc1` + `avcC` (SPS and PPS live in the `avcC`
//! only; they and AUDs are stripped from the samples, which are written with
//! 4-byte NAL unit lengths), AAC as `mp4a` + `esds`, Opus as `Opus` + `dOps`
//! ("Encapsulation of Opus in ISO Base Media File Format": pre-skip 312,
//! output gain 0, channel mapping family 0, so mono or stereo). The `hvc1` +
//! `hvcC` and `av01` + `av1C` sample entries come with HEVC and AV1 ingest,
//! when the hub carries those codecs.
//!
//! A sample's duration is the distance to the next frame's DTS on its track,
//! so the fragmenter holds back the newest frame of each track until the next
//! one arrives or [`Fragmenter::finish`] gives an end time. Durations and
//! decode times are converted from 90 kHz to the track's timescale from the
//! absolute timestamps, never summed up, so they never drift (at 48 kHz,
//! 1800 ticks are exactly 960 samples).
//!
//! Nothing here reads a clock or touches a file: the caller decides where
//! fragments are cut and stores the bytes.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;

use crate::media::frame::{CLOCK_HZ, Codec, CodecParams, Frame, TrackKind};
use crate::media::h264::{NAL_AUD, NAL_IDR, NAL_PPS, NAL_SPS, Sps, nal_type, split_annexb};

/// Timescale of video tracks: the hub clock, so video times are copied as
/// they are.
pub const VIDEO_TIMESCALE: u32 = CLOCK_HZ as u32;
/// Opus pre-skip written in `dOps`, in 48 kHz samples (what libopus uses).
pub const OPUS_PRE_SKIP: u16 = 312;
/// Most sample bytes a [`Fragmenter`] holds between two fragments; beyond,
/// frames are refused with [`Fmp4Error::BufferFull`]. Keeps every box size
/// within 32 bits and every data offset within `i32`.
pub const MAX_BUFFERED_BYTES: usize = 512 << 20;

/// Timescale of the `mvhd` (its durations are all 0 in a fragmented file).
const MOVIE_TIMESCALE: u32 = 1000;
/// sample_depends_on = 2: the sample does not depend on others (a sync sample).
const SAMPLE_FLAGS_SYNC: u32 = 0x0200_0000;
/// sample_depends_on = 1 and sample_is_non_sync_sample.
const SAMPLE_FLAGS_NON_SYNC: u32 = 0x0101_0000;
/// `tfhd` flag: data offsets count from the start of the `moof`.
const TFHD_DEFAULT_BASE_IS_MOOF: u32 = 0x02_0000;
const TRUN_DATA_OFFSET: u32 = 0x000001;
const TRUN_SAMPLE_DURATION: u32 = 0x000100;
const TRUN_SAMPLE_SIZE: u32 = 0x000200;
const TRUN_SAMPLE_FLAGS: u32 = 0x000400;
const TRUN_COMPOSITION_OFFSETS: u32 = 0x000800;
/// Unity transformation matrix of `mvhd` and `tkhd`.
const MATRIX: [u32; 9] = [0x0001_0000, 0, 0, 0, 0x0001_0000, 0, 0, 0, 0x4000_0000];
/// ISO 639-2 "und", packed as three 5-bit letters.
const LANGUAGE_UND: u16 = 0x55C4;
/// H264 profiles whose `avcC` has no chroma / bit depth extension.
const AVCC_PROFILES_WITHOUT_EXTENSION: [u8; 3] = [66, 77, 88];
/// MPEG-4 ObjectTypeIndication of "Audio ISO/IEC 14496-3" (AAC).
const OBJECT_TYPE_AAC: u8 = 0x40;
/// streamType 5 (audio) << 2, upStream 0, reserved 1.
const STREAM_TYPE_AUDIO: u8 = 0x15;

/// Why a configuration or a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Fmp4Error {
    #[error("an fMP4 stream needs at least one track")]
    NoTracks,
    #[error("track {track}: {reason}")]
    InvalidConfig { track: usize, reason: &'static str },
    #[error("this stream was declared without a {0:?} track")]
    UndeclaredTrack(TrackKind),
    #[error("a {codec:?} frame was given as a {kind:?} track")]
    KindMismatch { kind: TrackKind, codec: Codec },
    #[error("the {0:?} codec parameters changed: a new init segment is needed")]
    ParamsChanged(TrackKind),
    #[error("{0:?} frame without any sample data")]
    EmptySample(TrackKind),
    #[error("negative DTS {0}")]
    NegativeDts(i64),
    #[error("{kind:?} DTS {dts} does not follow {previous}")]
    DtsNotIncreasing {
        kind: TrackKind,
        dts: i64,
        previous: i64,
    },
    #[error("more than {MAX_BUFFERED_BYTES} bytes of samples waiting for a fragment")]
    BufferFull,
}

/// One track of an fMP4 stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackConfig {
    /// Codec configuration: the sample entry is built from it, and every
    /// frame of the track must carry equal parameters.
    pub params: Arc<CodecParams>,
}

impl TrackConfig {
    pub fn new(params: Arc<CodecParams>) -> Self {
        Self { params }
    }

    pub fn kind(&self) -> TrackKind {
        self.params.codec().kind()
    }

    /// Units per second of the track's times: 90 000 for video, the sample
    /// rate for audio.
    pub fn timescale(&self) -> u32 {
        match &*self.params {
            CodecParams::H264 { .. }
            | CodecParams::Vp8 { .. }
            | CodecParams::Vp9 { .. }
            | CodecParams::Av1 { .. } => VIDEO_TIMESCALE,
            CodecParams::Opus { sample_rate, .. } | CodecParams::Aac { sample_rate, .. } => {
                *sample_rate
            }
        }
    }

    /// Checks what the boxes need to be well formed.
    fn validate(&self, track: usize) -> Result<(), Fmp4Error> {
        let invalid = |reason| Err(Fmp4Error::InvalidConfig { track, reason });
        let fits_u16 = |len: usize| u16::try_from(len).is_ok();
        match &*self.params {
            CodecParams::H264 {
                sps,
                pps,
                width,
                height,
            } => {
                if sps.len() < 4 || nal_type(sps) != NAL_SPS || !fits_u16(sps.len()) {
                    return invalid("unusable SPS");
                }
                if pps.is_empty() || nal_type(pps) != NAL_PPS || !fits_u16(pps.len()) {
                    return invalid("unusable PPS");
                }
                if u16::try_from(*width).is_err() || u16::try_from(*height).is_err() {
                    return invalid("picture size beyond 65535");
                }
            }
            CodecParams::Opus {
                sample_rate,
                channels,
            } => {
                if *sample_rate == 0 {
                    return invalid("sample rate 0");
                }
                if !(1..=2).contains(channels) {
                    return invalid("Opus channel mapping family 0 is mono or stereo");
                }
            }
            CodecParams::Aac {
                asc,
                sample_rate,
                channels,
            } => {
                if *sample_rate == 0 {
                    return invalid("sample rate 0");
                }
                if *channels == 0 {
                    return invalid("no channels");
                }
                if asc.len() < 2 || asc.len() > 0xFFFF {
                    return invalid("unusable AudioSpecificConfig");
                }
            }
            CodecParams::Vp8 { .. } | CodecParams::Vp9 { .. } | CodecParams::Av1 { .. } => {
                return invalid("VP8, VP9 and AV1 are transcoded to H264 for HLS");
            }
        }
        Ok(())
    }

    /// Frame duration assumed for a last frame when no end time helps.
    fn default_frame_ticks(&self) -> i64 {
        match &*self.params {
            CodecParams::H264 { .. }
            | CodecParams::Vp8 { .. }
            | CodecParams::Vp9 { .. }
            | CodecParams::Av1 { .. } => CLOCK_HZ / 30,
            CodecParams::Opus { .. } => CLOCK_HZ / 50,
            CodecParams::Aac { sample_rate, .. } => 1024 * CLOCK_HZ / i64::from(*sample_rate),
        }
    }
}

fn validate(tracks: &[TrackConfig]) -> Result<(), Fmp4Error> {
    if tracks.is_empty() {
        return Err(Fmp4Error::NoTracks);
    }
    for (i, track) in tracks.iter().enumerate() {
        track.validate(i)?;
        if tracks[..i].iter().any(|t| t.kind() == track.kind()) {
            return Err(Fmp4Error::InvalidConfig {
                track: i,
                reason: "a second track of the same kind",
            });
        }
    }
    Ok(())
}

/// The init segment (`ftyp` + `moov`) of a stream with these tracks, at most
/// one video and one audio track; track IDs follow their order from 1.
pub fn init_segment(tracks: &[TrackConfig]) -> Result<Vec<u8>, Fmp4Error> {
    validate(tracks)?;
    Ok(write_init(tracks))
}

/// One media fragment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fragment {
    /// The `mfhd` sequence number: 1 for the first fragment of a
    /// [`Fragmenter`], one more for each.
    pub sequence: u32,
    /// `styp` + `moof` + `mdat`.
    pub data: Vec<u8>,
    /// Decode time of the first sample of the lead track (video when the
    /// stream has it, else its only track), 90 kHz ticks: what playlist
    /// durations follow. Without a lead-track sample, the earliest of all.
    pub start_dts: i64,
    /// End (decode time plus duration) of the lead track's last sample,
    /// 90 kHz ticks; without a lead-track sample, the latest of all.
    pub end_dts: i64,
    /// Playback can start here: the video track's first sample is a
    /// keyframe (always true without a video track).
    pub independent: bool,
}

/// Sans-IO fragment writer: frames in, `moof` + `mdat` fragments out.
///
/// Push frames with [`Fragmenter::push`] (per track in decode order, tracks
/// interleaved as they come), then cut with [`Fragmenter::take_fragment`]:
/// it takes every sample whose DTS is before the given time and whose
/// duration is known. To cut a segment (or an independent LL-HLS part) on a
/// keyframe, push the keyframe first, then take up to its DTS: the pushed
/// keyframe gives the frame before it its duration and opens the next
/// fragment. An audio frame still waiting for its successor goes to the next
/// fragment, so audio can lag a fragment boundary by one frame.
///
/// A segment is the concatenation of its parts; every fragment starts with a
/// `styp`, so parts and segments are served as they are. A new init segment
/// (and a new `Fragmenter`) is needed when the codec parameters change:
/// [`Fmp4Error::ParamsChanged`] says so.
#[derive(Debug)]
pub struct Fragmenter {
    tracks: Vec<TrackState>,
    next_sequence: u32,
    buffered: usize,
}

#[derive(Debug)]
struct TrackState {
    config: TrackConfig,
    id: u32,
    timescale: u32,
    /// Newest frame, waiting for the next DTS to know its duration.
    pending: Option<Sample>,
    /// Samples with a known end, oldest first.
    ready: VecDeque<Sample>,
    last_dts: Option<i64>,
    /// Duration of the latest sample with a known end, 90 kHz ticks.
    last_ticks: i64,
}

/// One sample; times in 90 kHz ticks.
#[derive(Debug, Clone)]
struct Sample {
    dts: i64,
    pts: i64,
    /// End of the sample (the next DTS); meaningless while pending.
    end: i64,
    sync: bool,
    data: Bytes,
}

impl Fragmenter {
    /// A fragmenter for these tracks (as for [`init_segment`]).
    pub fn new(tracks: &[TrackConfig]) -> Result<Self, Fmp4Error> {
        validate(tracks)?;
        let tracks: Vec<TrackState> = tracks
            .iter()
            .zip(1..)
            .map(|(config, id)| TrackState {
                config: config.clone(),
                id,
                timescale: config.timescale(),
                pending: None,
                ready: VecDeque::new(),
                last_dts: None,
                last_ticks: config.default_frame_ticks(),
            })
            .collect();
        Ok(Self {
            tracks,
            next_sequence: 1,
            buffered: 0,
        })
    }

    /// The init segment for this fragmenter's tracks.
    pub fn init_segment(&self) -> Vec<u8> {
        let configs: Vec<TrackConfig> = self.tracks.iter().map(|t| t.config.clone()).collect();
        write_init(&configs)
    }

    /// Sample bytes waiting for a fragment.
    pub fn buffered_bytes(&self) -> usize {
        self.buffered
    }

    /// Adds one frame of the track of `kind`. A refused frame changes nothing.
    pub fn push(&mut self, kind: TrackKind, frame: &Frame) -> Result<(), Fmp4Error> {
        let codec = frame.codec();
        if codec.kind() != kind {
            return Err(Fmp4Error::KindMismatch { kind, codec });
        }
        let track = self
            .tracks
            .iter_mut()
            .find(|t| t.config.kind() == kind)
            .ok_or(Fmp4Error::UndeclaredTrack(kind))?;
        let expected = &track.config.params;
        if !Arc::ptr_eq(expected, &frame.params) && **expected != *frame.params {
            return Err(Fmp4Error::ParamsChanged(kind));
        }
        if frame.dts < 0 {
            return Err(Fmp4Error::NegativeDts(frame.dts));
        }
        if let Some(previous) = track.last_dts.filter(|&last| frame.dts <= last) {
            return Err(Fmp4Error::DtsNotIncreasing {
                kind,
                dts: frame.dts,
                previous,
            });
        }
        let (data, sync) = match codec {
            Codec::H264 => {
                let (data, has_idr) = avcc_sample(&frame.data);
                (Bytes::from(data), frame.key || has_idr)
            }
            Codec::Opus | Codec::Aac | Codec::Vp8 | Codec::Vp9 | Codec::Av1 => {
                (frame.data.clone(), true)
            }
        };
        if data.is_empty() {
            return Err(Fmp4Error::EmptySample(kind));
        }
        let buffered = self.buffered + data.len();
        if buffered > MAX_BUFFERED_BYTES {
            return Err(Fmp4Error::BufferFull);
        }
        self.buffered = buffered;
        if let Some(mut previous) = track.pending.take() {
            previous.end = frame.dts;
            track.last_ticks = frame.dts - previous.dts;
            track.ready.push_back(previous);
        }
        track.pending = Some(Sample {
            dts: frame.dts,
            pts: frame.pts,
            end: frame.dts,
            sync,
            data,
        });
        track.last_dts = Some(frame.dts);
        Ok(())
    }

    /// A fragment of every sample with a known duration whose DTS is before
    /// `until_dts` (90 kHz ticks); `None` when there is none.
    pub fn take_fragment(&mut self, until_dts: i64) -> Option<Fragment> {
        let runs: Vec<Vec<Sample>> = self
            .tracks
            .iter_mut()
            .map(|t| {
                let n = t.ready.iter().take_while(|s| s.dts < until_dts).count();
                t.ready.drain(..n).collect()
            })
            .collect();
        if runs.iter().all(Vec::is_empty) {
            return None;
        }
        let bytes: usize = runs.iter().flatten().map(|s| s.data.len()).sum();
        self.buffered -= bytes;
        Some(self.write_fragment(&runs, bytes))
    }

    /// Ends every track's newest frame at `end_dts` (90 kHz ticks; a frame
    /// at or after it gets the track's previous frame duration) and returns
    /// everything left as one fragment. Pushing can go on afterwards.
    pub fn finish(&mut self, end_dts: i64) -> Option<Fragment> {
        for track in &mut self.tracks {
            if let Some(mut last) = track.pending.take() {
                last.end = if end_dts > last.dts {
                    end_dts
                } else {
                    last.dts.saturating_add(track.last_ticks)
                };
                track.ready.push_back(last);
            }
        }
        self.take_fragment(i64::MAX)
    }

    fn write_fragment(&mut self, runs: &[Vec<Sample>], bytes: usize) -> Fragment {
        let sequence = self.next_sequence;
        self.next_sequence = self.next_sequence.wrapping_add(1);

        let count: usize = runs.iter().map(Vec::len).sum();
        let mut out = Vec::with_capacity(256 + 16 * count + bytes);
        write_box(&mut out, b"styp", |b| {
            b.extend_from_slice(b"msdh");
            put_u32(b, 0);
            b.extend_from_slice(b"msdhmsix");
        });
        let moof_start = out.len();
        // Where each trun's data_offset goes, with the track's byte count.
        let mut offsets: Vec<(usize, usize)> = Vec::new();
        write_box(&mut out, b"moof", |b| {
            write_full_box(b, b"mfhd", 0, 0, |b| put_u32(b, sequence));
            for (track, run) in self.tracks.iter().zip(runs) {
                if run.is_empty() {
                    continue;
                }
                write_box(b, b"traf", |b| {
                    let at = write_traf(b, track, run);
                    offsets.push((at, run.iter().map(|s| s.data.len()).sum()));
                });
            }
        });
        let mdat_header = 8;
        let mut data_offset = out.len() - moof_start + mdat_header;
        for (at, len) in offsets {
            // MAX_BUFFERED_BYTES keeps the offsets far below i32::MAX.
            let offset = i32::try_from(data_offset).unwrap_or(i32::MAX);
            out[at..at + 4].copy_from_slice(&offset.to_be_bytes());
            data_offset += len;
        }
        write_box(&mut out, b"mdat", |b| {
            for sample in runs.iter().flatten() {
                b.extend_from_slice(&sample.data);
            }
        });

        // The lead track: video when the stream has it, else the first one.
        let lead = self
            .tracks
            .iter()
            .position(|t| t.config.kind() == TrackKind::Video)
            .and_then(|i| runs.get(i));
        let timed = match lead.or(runs.first()) {
            Some(run) if !run.is_empty() => std::slice::from_ref(run),
            _ => runs,
        };
        let samples = || timed.iter().flatten();
        let start_dts = samples().map(|s| s.dts).min().unwrap_or(0);
        let end_dts = samples().map(|s| s.end).max().unwrap_or(start_dts);
        let independent = match lead {
            Some(run) => run.first().is_some_and(|s| s.sync),
            None => true,
        };
        Fragment {
            sequence,
            data: out,
            start_dts,
            end_dts,
            independent,
        }
    }
}

/// Writes `tfhd`, `tfdt` and `trun` of one track's run; returns the position
/// of the trun's data_offset, filled in once the `moof` size is known.
fn write_traf(b: &mut Vec<u8>, track: &TrackState, run: &[Sample]) -> usize {
    let scale = |ticks: i64| rescale(ticks, track.timescale);
    write_full_box(b, b"tfhd", 0, TFHD_DEFAULT_BASE_IS_MOOF, |b| {
        put_u32(b, track.id);
    });
    let base = run.first().map_or(0, |s| scale(s.dts));
    write_full_box(b, b"tfdt", 1, 0, |b| put_u64(b, base.max(0) as u64));

    let offsets: Vec<i64> = run.iter().map(|s| scale(s.pts) - scale(s.dts)).collect();
    let with_offsets = offsets.iter().any(|&o| o != 0);
    let mut flags = TRUN_DATA_OFFSET | TRUN_SAMPLE_DURATION | TRUN_SAMPLE_SIZE | TRUN_SAMPLE_FLAGS;
    if with_offsets {
        flags |= TRUN_COMPOSITION_OFFSETS;
    }
    // Version 1: signed composition offsets.
    let version = u8::from(with_offsets);
    let mut data_offset_at = 0;
    write_full_box(b, b"trun", version, flags, |b| {
        put_u32(b, u32::try_from(run.len()).unwrap_or(u32::MAX));
        data_offset_at = b.len();
        put_u32(b, 0);
        for (sample, &offset) in run.iter().zip(&offsets) {
            let duration = scale(sample.end) - scale(sample.dts);
            put_u32(b, u32::try_from(duration.max(0)).unwrap_or(u32::MAX));
            put_u32(b, u32::try_from(sample.data.len()).unwrap_or(u32::MAX));
            put_u32(
                b,
                if sample.sync {
                    SAMPLE_FLAGS_SYNC
                } else {
                    SAMPLE_FLAGS_NON_SYNC
                },
            );
            if with_offsets {
                let offset = offset.clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32;
                b.extend_from_slice(&offset.to_be_bytes());
            }
        }
    });
    data_offset_at
}

/// 90 kHz ticks in `timescale` units, rounded to the nearest.
fn rescale(ticks: i64, timescale: u32) -> i64 {
    if timescale == VIDEO_TIMESCALE {
        return ticks;
    }
    let scaled = (i128::from(ticks) * i128::from(timescale) + i128::from(CLOCK_HZ / 2))
        .div_euclid(i128::from(CLOCK_HZ));
    i64::try_from(scaled).unwrap_or(if ticks < 0 { i64::MIN } else { i64::MAX })
}

/// An Annex B access unit as an AVCC sample (4-byte lengths), without SPS,
/// PPS and AUD; also says whether it holds an IDR slice.
fn avcc_sample(annexb: &[u8]) -> (Vec<u8>, bool) {
    let mut out = Vec::with_capacity(annexb.len() + 16);
    let mut has_idr = false;
    for nal in split_annexb(annexb) {
        let kind = nal_type(nal);
        if matches!(kind, NAL_SPS | NAL_PPS | NAL_AUD) {
            continue;
        }
        has_idr |= kind == NAL_IDR;
        // A NAL unit of 4 GiB cannot come from a buffer we could hold.
        put_u32(&mut out, u32::try_from(nal.len()).unwrap_or(u32::MAX));
        out.extend_from_slice(nal);
    }
    (out, has_idr)
}

// ---------------------------------------------------------------------------
// Init segment
// ---------------------------------------------------------------------------

fn write_init(tracks: &[TrackConfig]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1024);
    write_box(&mut out, b"ftyp", |b| {
        b.extend_from_slice(b"iso6");
        put_u32(b, 0);
        b.extend_from_slice(b"iso6cmfcmp41");
    });
    let next_track_id = u32::try_from(tracks.len() + 1).unwrap_or(u32::MAX);
    write_box(&mut out, b"moov", |b| {
        write_full_box(b, b"mvhd", 0, 0, |b| {
            put_u32(b, 0); // creation_time
            put_u32(b, 0); // modification_time
            put_u32(b, MOVIE_TIMESCALE);
            put_u32(b, 0); // duration: unknown, fragments follow
            put_u32(b, 0x0001_0000); // rate 1.0
            put_u16(b, 0x0100); // volume 1.0
            b.extend_from_slice(&[0; 10]); // reserved
            put_matrix(b);
            b.extend_from_slice(&[0; 24]); // pre_defined
            put_u32(b, next_track_id);
        });
        for (config, id) in tracks.iter().zip(1..) {
            write_trak(b, config, id);
        }
        write_box(b, b"mvex", |b| {
            for (_, id) in tracks.iter().zip(1u32..) {
                write_full_box(b, b"trex", 0, 0, |b| {
                    put_u32(b, id);
                    put_u32(b, 1); // default_sample_description_index
                    put_u32(b, 0); // default_sample_duration
                    put_u32(b, 0); // default_sample_size
                    put_u32(b, 0); // default_sample_flags
                });
            }
        });
    });
    out
}

fn write_trak(b: &mut Vec<u8>, config: &TrackConfig, id: u32) {
    let video = config.kind() == TrackKind::Video;
    let (width, height) = match &*config.params {
        CodecParams::H264 { width, height, .. } => (*width, *height),
        _ => (0, 0),
    };
    write_box(b, b"trak", |b| {
        // Flags: track_enabled, track_in_movie.
        write_full_box(b, b"tkhd", 0, 3, |b| {
            put_u32(b, 0); // creation_time
            put_u32(b, 0); // modification_time
            put_u32(b, id);
            put_u32(b, 0); // reserved
            put_u32(b, 0); // duration
            b.extend_from_slice(&[0; 8]); // reserved
            put_u16(b, 0); // layer
            put_u16(b, 0); // alternate_group
            put_u16(b, if video { 0 } else { 0x0100 }); // volume
            put_u16(b, 0); // reserved
            put_matrix(b);
            put_u32(b, width << 16); // 16.16 fixed point
            put_u32(b, height << 16);
        });
        write_box(b, b"mdia", |b| {
            write_full_box(b, b"mdhd", 0, 0, |b| {
                put_u32(b, 0); // creation_time
                put_u32(b, 0); // modification_time
                put_u32(b, config.timescale());
                put_u32(b, 0); // duration
                put_u16(b, LANGUAGE_UND);
                put_u16(b, 0); // pre_defined
            });
            write_full_box(b, b"hdlr", 0, 0, |b| {
                put_u32(b, 0); // pre_defined
                b.extend_from_slice(if video { b"vide" } else { b"soun" });
                b.extend_from_slice(&[0; 12]); // reserved
                b.extend_from_slice(if video {
                    b"VideoHandler\0"
                } else {
                    b"SoundHandler\0"
                });
            });
            write_box(b, b"minf", |b| {
                if video {
                    // Flags 1, graphicsmode copy, opcolor 0.
                    write_full_box(b, b"vmhd", 0, 1, |b| b.extend_from_slice(&[0; 8]));
                } else {
                    // Balance 0, reserved.
                    write_full_box(b, b"smhd", 0, 0, |b| put_u32(b, 0));
                }
                write_box(b, b"dinf", |b| {
                    write_full_box(b, b"dref", 0, 0, |b| {
                        put_u32(b, 1);
                        // Flags 1: the media is in this file.
                        write_full_box(b, b"url ", 0, 1, |_| {});
                    });
                });
                write_box(b, b"stbl", |b| {
                    write_full_box(b, b"stsd", 0, 0, |b| {
                        put_u32(b, 1);
                        write_sample_entry(b, config);
                    });
                    write_full_box(b, b"stts", 0, 0, |b| put_u32(b, 0));
                    write_full_box(b, b"stsc", 0, 0, |b| put_u32(b, 0));
                    write_full_box(b, b"stsz", 0, 0, |b| {
                        put_u32(b, 0); // sample_size
                        put_u32(b, 0); // sample_count
                    });
                    write_full_box(b, b"stco", 0, 0, |b| put_u32(b, 0));
                });
            });
        });
    });
}

fn write_sample_entry(b: &mut Vec<u8>, config: &TrackConfig) {
    match &*config.params {
        CodecParams::H264 {
            sps,
            pps,
            width,
            height,
        } => write_box(b, b"avc1", |b| {
            b.extend_from_slice(&[0; 6]); // reserved
            put_u16(b, 1); // data_reference_index
            b.extend_from_slice(&[0; 16]); // pre_defined, reserved
            put_u16(b, u16::try_from(*width).unwrap_or(u16::MAX));
            put_u16(b, u16::try_from(*height).unwrap_or(u16::MAX));
            put_u32(b, 0x0048_0000); // 72 dpi
            put_u32(b, 0x0048_0000);
            put_u32(b, 0); // reserved
            put_u16(b, 1); // frame_count
            b.extend_from_slice(&[0; 32]); // compressorname
            put_u16(b, 0x0018); // depth
            put_u16(b, 0xFFFF); // pre_defined -1
            write_box(b, b"avcC", |b| write_avcc(b, sps, pps));
        }),
        CodecParams::Aac {
            asc,
            sample_rate,
            channels,
        } => write_box(b, b"mp4a", |b| {
            write_audio_entry_fields(b, *channels, *sample_rate);
            write_full_box(b, b"esds", 0, 0, |b| write_es_descriptor(b, asc));
        }),
        CodecParams::Opus {
            sample_rate,
            channels,
        } => write_box(b, b"Opus", |b| {
            // The Opus mapping fixes the entry's rate at 48 kHz.
            write_audio_entry_fields(b, *channels, 48_000);
            write_box(b, b"dOps", |b| {
                b.push(0); // Version
                b.push(*channels); // OutputChannelCount
                put_u16(b, OPUS_PRE_SKIP);
                put_u32(b, *sample_rate); // InputSampleRate
                put_u16(b, 0); // OutputGain
                b.push(0); // ChannelMappingFamily
            });
        }),
        // Refused by `TrackConfig::validate`.
        CodecParams::Vp8 { .. } | CodecParams::Vp9 { .. } | CodecParams::Av1 { .. } => {}
    }
}

/// The AudioSampleEntry fields before its child boxes.
fn write_audio_entry_fields(b: &mut Vec<u8>, channels: u8, sample_rate: u32) {
    b.extend_from_slice(&[0; 6]); // reserved
    put_u16(b, 1); // data_reference_index
    b.extend_from_slice(&[0; 8]); // reserved
    put_u16(b, u16::from(channels));
    put_u16(b, 16); // samplesize
    put_u32(b, 0); // pre_defined, reserved
    // 16.16 fixed point; rates beyond 65535 Hz do not fit (and are 0).
    put_u32(
        b,
        if sample_rate <= 0xFFFF {
            sample_rate << 16
        } else {
            0
        },
    );
}

/// AVCDecoderConfigurationRecord (ISO/IEC 14496-15 5.3.3.1).
fn write_avcc(b: &mut Vec<u8>, sps: &[u8], pps: &[u8]) {
    let profile = sps[1];
    b.extend_from_slice(&[1, profile, sps[2], sps[3]]);
    b.push(0xFF); // reserved, lengthSizeMinusOne = 3
    b.push(0xE1); // reserved, one SPS
    put_u16(b, sps.len() as u16);
    b.extend_from_slice(sps);
    b.push(1); // one PPS
    put_u16(b, pps.len() as u16);
    b.extend_from_slice(pps);
    if !AVCC_PROFILES_WITHOUT_EXTENSION.contains(&profile) {
        let (chroma, luma, chroma_depth) = Sps::parse(sps).map_or((1, 8, 8), |s| {
            (s.chroma_format_idc, s.bit_depth_luma, s.bit_depth_chroma)
        });
        b.push(0xFC | (chroma & 3) as u8);
        b.push(0xF8 | (luma.saturating_sub(8) & 7) as u8);
        b.push(0xF8 | (chroma_depth.saturating_sub(8) & 7) as u8);
        b.push(0); // numOfSequenceParameterSetExt
    }
}

/// ES_Descriptor (ISO/IEC 14496-1 7.2.6.5) with the AudioSpecificConfig.
fn write_es_descriptor(b: &mut Vec<u8>, asc: &[u8]) {
    let mut decoder_config = vec![OBJECT_TYPE_AAC, STREAM_TYPE_AUDIO];
    decoder_config.extend_from_slice(&[0; 3]); // bufferSizeDB
    decoder_config.extend_from_slice(&[0; 8]); // maxBitrate, avgBitrate
    write_descriptor(&mut decoder_config, 0x05, asc); // DecoderSpecificInfo
    let mut es = vec![0, 0, 0]; // ES_ID 0, no flags
    write_descriptor(&mut es, 0x04, &decoder_config); // DecoderConfigDescriptor
    write_descriptor(&mut es, 0x06, &[0x02]); // SLConfigDescriptor, MP4 predefined
    write_descriptor(b, 0x03, &es); // ES_Descriptor
}

/// A descriptor with its size in the 4-byte expandable form.
fn write_descriptor(b: &mut Vec<u8>, tag: u8, body: &[u8]) {
    let len = u32::try_from(body.len())
        .unwrap_or(u32::MAX)
        .min((1 << 28) - 1);
    b.push(tag);
    b.extend_from_slice(&[
        0x80 | (len >> 21) as u8 & 0x7F,
        0x80 | (len >> 14) as u8 & 0x7F,
        0x80 | (len >> 7) as u8 & 0x7F,
        len as u8 & 0x7F,
    ]);
    b.extend_from_slice(body);
}

// ---------------------------------------------------------------------------
// Box writing
// ---------------------------------------------------------------------------

/// Appends a box: size, type, then whatever `body` appends.
fn write_box(out: &mut Vec<u8>, kind: &[u8; 4], body: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    put_u32(out, 0);
    out.extend_from_slice(kind);
    body(out);
    // MAX_BUFFERED_BYTES keeps every box far below 4 GiB.
    let size = u32::try_from(out.len() - start).unwrap_or(u32::MAX);
    out[start..start + 4].copy_from_slice(&size.to_be_bytes());
}

/// Appends a full box: a box whose body starts with version and flags.
fn write_full_box(
    out: &mut Vec<u8>,
    kind: &[u8; 4],
    version: u8,
    flags: u32,
    body: impl FnOnce(&mut Vec<u8>),
) {
    write_box(out, kind, |b| {
        put_u32(b, u32::from(version) << 24 | (flags & 0x00FF_FFFF));
        body(b);
    });
}

fn put_u16(b: &mut Vec<u8>, v: u16) {
    b.extend_from_slice(&v.to_be_bytes());
}

fn put_u32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_be_bytes());
}

fn put_u64(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_be_bytes());
}

fn put_matrix(b: &mut Vec<u8>) {
    for v in MATRIX {
        put_u32(b, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // --- a tiny box walker ----------------------------------------------

    /// One parsed box; `body` excludes the 8-byte header.
    #[derive(Debug)]
    struct Mp4Box<'a> {
        kind: String,
        /// Offset of the box in the parsed buffer.
        at: usize,
        body: &'a [u8],
        children: Vec<Mp4Box<'a>>,
    }

    /// Bytes of the body before the child boxes, for boxes that have any.
    fn children_at(kind: &str) -> Option<usize> {
        match kind {
            "moov" | "trak" | "mdia" | "minf" | "dinf" | "stbl" | "mvex" | "moof" | "traf" => {
                Some(0)
            }
            "stsd" | "dref" => Some(8), // full box header + entry_count
            "avc1" => Some(78),
            "mp4a" | "Opus" => Some(28),
            _ => None,
        }
    }

    /// Parses `data` as a sequence of boxes that fill it exactly.
    fn parse_boxes(data: &[u8], base: usize) -> Vec<Mp4Box<'_>> {
        let mut boxes = Vec::new();
        let mut pos = 0;
        while pos < data.len() {
            assert!(
                data.len() - pos >= 8,
                "truncated box header at {}",
                base + pos
            );
            let size = u32::from_be_bytes(data[pos..pos + 4].try_into().unwrap()) as usize;
            let kind = String::from_utf8(data[pos + 4..pos + 8].to_vec()).unwrap();
            assert!(size >= 8, "{kind}: size {size}");
            assert!(
                pos + size <= data.len(),
                "{kind} at {} overruns",
                base + pos
            );
            let body = &data[pos + 8..pos + size];
            let children = match children_at(&kind) {
                Some(skip) => parse_boxes(&body[skip..], base + pos + 8 + skip),
                None => Vec::new(),
            };
            boxes.push(Mp4Box {
                kind,
                at: base + pos,
                body,
                children,
            });
            pos += size;
        }
        assert_eq!(pos, data.len());
        boxes
    }

    impl<'a> Mp4Box<'a> {
        /// The first descendant at this `/`-separated path.
        fn get(&self, path: &str) -> &Mp4Box<'a> {
            self.all(path)
                .into_iter()
                .next()
                .unwrap_or_else(|| panic!("no {path} in {}", self.kind))
        }

        /// Every descendant at this path.
        fn all(&self, path: &str) -> Vec<&Mp4Box<'a>> {
            let mut level = vec![self];
            for step in path.split('/') {
                level = level
                    .into_iter()
                    .flat_map(|b| b.children.iter().filter(|c| c.kind == step))
                    .collect();
            }
            level
        }

        /// Body after the version and flags of a full box.
        fn full(&self) -> (u8, u32, &'a [u8]) {
            let head = u32::from_be_bytes(self.body[..4].try_into().unwrap());
            ((head >> 24) as u8, head & 0xFF_FFFF, &self.body[4..])
        }
    }

    /// The box tree as indented type names.
    fn tree(boxes: &[Mp4Box<'_>]) -> Vec<String> {
        fn walk(boxes: &[Mp4Box<'_>], depth: usize, out: &mut Vec<String>) {
            for b in boxes {
                out.push(format!("{}{}", "  ".repeat(depth), b.kind));
                walk(&b.children, depth + 1, out);
            }
        }
        let mut out = Vec::new();
        walk(boxes, 0, &mut out);
        out
    }

    /// A root with `boxes` as children, for paths from the top.
    fn root<'a>(boxes: Vec<Mp4Box<'a>>) -> Mp4Box<'a> {
        Mp4Box {
            kind: "file".into(),
            at: 0,
            body: &[],
            children: boxes,
        }
    }

    fn be32(b: &[u8], at: usize) -> u32 {
        u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn be16(b: &[u8], at: usize) -> u16 {
        u16::from_be_bytes(b[at..at + 2].try_into().unwrap())
    }

    /// A parsed `trun`.
    #[derive(Debug, PartialEq)]
    struct Trun {
        version: u8,
        data_offset: i32,
        /// (duration, size, flags, composition offset)
        samples: Vec<(u32, u32, u32, i32)>,
    }

    fn parse_trun(b: &Mp4Box<'_>) -> Trun {
        let (version, flags, body) = b.full();
        assert_eq!(flags & !0xF01, 0, "flags {flags:#x}");
        assert_eq!(
            flags & 0x701,
            0x701,
            "data offset, durations, sizes and flags are always written"
        );
        let count = be32(body, 0) as usize;
        let data_offset = be32(body, 4) as i32;
        let with_offsets = flags & TRUN_COMPOSITION_OFFSETS != 0;
        let entry = if with_offsets { 16 } else { 12 };
        assert_eq!(body.len(), 8 + count * entry);
        let samples = body[8..]
            .chunks(entry)
            .map(|e| {
                let offset = if with_offsets { be32(e, 12) as i32 } else { 0 };
                (be32(e, 0), be32(e, 4), be32(e, 8), offset)
            })
            .collect();
        Trun {
            version,
            data_offset,
            samples,
        }
    }

    /// What one `traf` says, with its samples' bytes out of the `mdat`.
    #[derive(Debug)]
    struct Traf {
        track_id: u32,
        base: u64,
        trun: Trun,
        data: Vec<Vec<u8>>,
    }

    /// Parses a fragment: styp, moof, mdat; returns sequence and trafs.
    fn parse_fragment(data: &[u8]) -> (u32, Vec<Traf>) {
        let file = root(parse_boxes(data, 0));
        let kinds: Vec<&str> = file.children.iter().map(|b| b.kind.as_str()).collect();
        assert_eq!(kinds, ["styp", "moof", "mdat"]);
        assert_eq!(file.children[0].body, b"msdh\0\0\0\0msdhmsix");
        let moof = &file.children[1];
        let mdat = &file.children[2];
        let (_, _, mfhd) = moof.get("mfhd").full();
        let sequence = be32(mfhd, 0);
        let mut trafs = Vec::new();
        for traf in moof.all("traf") {
            let kinds: Vec<&str> = traf.children.iter().map(|b| b.kind.as_str()).collect();
            assert_eq!(kinds, ["tfhd", "tfdt", "trun"]);
            let (_, tfhd_flags, tfhd) = traf.get("tfhd").full();
            assert_eq!(tfhd_flags, TFHD_DEFAULT_BASE_IS_MOOF);
            assert_eq!(tfhd.len(), 4, "only the track ID");
            let (tfdt_version, _, tfdt) = traf.get("tfdt").full();
            assert_eq!(tfdt_version, 1);
            let trun = parse_trun(traf.get("trun"));
            let mut pos = moof.at + trun.data_offset as usize;
            let data = trun
                .samples
                .iter()
                .map(|&(_, size, _, _)| {
                    assert!(pos >= mdat.at + 8, "sample before the mdat payload");
                    let sample = data[pos..pos + size as usize].to_vec();
                    pos += size as usize;
                    sample
                })
                .collect();
            assert!(pos <= mdat.at + 8 + mdat.body.len());
            trafs.push(Traf {
                track_id: be32(tfhd, 0),
                base: u64::from_be_bytes(tfdt.try_into().unwrap()),
                trun,
                data,
            });
        }
        // The runs fill the mdat exactly, one after the other.
        let total: u32 = trafs
            .iter()
            .flat_map(|t| &t.trun.samples)
            .map(|s| s.1)
            .sum();
        assert_eq!(total as usize, mdat.body.len());
        (sequence, trafs)
    }

    // --- synthetic frames -------------------------------------------------

    /// x264 baseline 320x240 parameter sets.
    const SPS: &[u8] = &[
        0x67, 0x42, 0xC0, 0x0D, 0xD9, 0x01, 0x41, 0xFB, 0x01, 0x10, 0x00, 0x00, 0x03, 0x00, 0x10,
        0x00, 0x00, 0x03, 0x03, 0xC0, 0xF1, 0x42, 0x99, 0x20,
    ];
    const PPS: &[u8] = &[0x68, 0xCB, 0x83, 0xCB, 0x20];
    const IDR: &[u8] = &[0x65, 0x88, 0x84, 0x00, 0x33];
    const SLICE: &[u8] = &[0x41, 0x9A, 0x02, 0x04];

    fn h264_params() -> Arc<CodecParams> {
        Arc::new(CodecParams::H264 {
            sps: Bytes::from_static(SPS),
            pps: Bytes::from_static(PPS),
            width: 320,
            height: 240,
        })
    }

    fn opus_params() -> Arc<CodecParams> {
        Arc::new(CodecParams::Opus {
            sample_rate: 48_000,
            channels: 2,
        })
    }

    fn aac_params(sample_rate: u32) -> Arc<CodecParams> {
        Arc::new(CodecParams::Aac {
            asc: Bytes::from_static(&[0x11, 0x90]),
            sample_rate,
            channels: 2,
        })
    }

    fn annex_b(nals: &[&[u8]]) -> Bytes {
        nals.iter()
            .flat_map(|nal| [&[0, 0, 0, 1][..], nal].concat())
            .collect::<Vec<u8>>()
            .into()
    }

    fn avcc(nals: &[&[u8]]) -> Vec<u8> {
        nals.iter()
            .flat_map(|nal| [&(nal.len() as u32).to_be_bytes()[..], nal].concat())
            .collect()
    }

    /// A video frame: IDR with SPS/PPS (and an AUD) in front, or a slice.
    fn video(pts: i64, dts: i64, key: bool, params: &Arc<CodecParams>) -> Frame {
        let data = if key {
            annex_b(&[&[0x09, 0x10], SPS, PPS, IDR])
        } else {
            annex_b(&[SLICE])
        };
        Frame {
            pts,
            dts,
            key,
            data,
            params: Arc::clone(params),
        }
    }

    fn audio(pts: i64, n: u8, params: &Arc<CodecParams>) -> Frame {
        Frame {
            pts,
            dts: pts,
            key: true,
            data: Bytes::from(vec![0xF8, n, n, n]),
            params: Arc::clone(params),
        }
    }

    fn tracks(params: &[&Arc<CodecParams>]) -> Vec<TrackConfig> {
        params
            .iter()
            .map(|p| TrackConfig::new(Arc::clone(p)))
            .collect()
    }

    // --- init segment -----------------------------------------------------

    #[test]
    fn init_segment_box_tree_h264_and_aac() {
        let init = init_segment(&tracks(&[&h264_params(), &aac_params(48_000)])).unwrap();
        let boxes = parse_boxes(&init, 0);
        let expected_trak = |entry: &str, config: &str, header: &str| {
            [
                "  trak",
                "    tkhd",
                "    mdia",
                "      mdhd",
                "      hdlr",
                "      minf",
                &format!("        {header}"),
                "        dinf",
                "          dref",
                "            url ",
                "        stbl",
                "          stsd",
                &format!("            {entry}"),
                &format!("              {config}"),
                "          stts",
                "          stsc",
                "          stsz",
                "          stco",
            ]
            .map(String::from)
            .to_vec()
        };
        let mut expected: Vec<String> = vec!["ftyp".into(), "moov".into(), "  mvhd".into()];
        expected.extend(expected_trak("avc1", "avcC", "vmhd"));
        expected.extend(expected_trak("mp4a", "esds", "smhd"));
        expected.extend(["  mvex", "    trex", "    trex"].map(String::from));
        assert_eq!(tree(&boxes), expected);

        let file = root(boxes);
        assert_eq!(
            file.get("ftyp").body,
            b"iso6\0\0\0\0iso6cmfcmp41",
            "major brand, minor version, compatible brands"
        );
        let (_, _, mvhd) = file.get("moov/mvhd").full();
        assert_eq!(mvhd.len(), 96);
        assert_eq!(be32(mvhd, 8), 1000, "timescale");
        assert_eq!(be32(mvhd, 92), 3, "next_track_ID");

        let traks = file.all("moov/trak");
        let expected = [
            (1, 90_000, b"vide", (320, 240), 0),
            (2, 48_000, b"soun", (0, 0), 0x0100),
        ];
        for (trak, (id, timescale, handler, (w, h), volume)) in traks.iter().zip(expected) {
            let (_, flags, tkhd) = trak.get("tkhd").full();
            assert_eq!((flags, tkhd.len()), (3, 80));
            assert_eq!(be32(tkhd, 8), id, "track_ID");
            assert_eq!(be16(tkhd, 32), volume);
            assert_eq!((be32(tkhd, 72), be32(tkhd, 76)), (w << 16, h << 16));
            let (_, _, mdhd) = trak.get("mdia/mdhd").full();
            assert_eq!(be32(mdhd, 8), timescale);
            assert_eq!(be16(mdhd, 16), LANGUAGE_UND);
            let (_, _, hdlr) = trak.get("mdia/hdlr").full();
            assert_eq!(&hdlr[4..8], handler);
            let stbl = trak.get("mdia/minf/stbl");
            for (kind, len) in [("stts", 4), ("stsc", 4), ("stsz", 8), ("stco", 4)] {
                let (_, _, body) = stbl.get(kind).full();
                assert_eq!(body, vec![0; len], "{kind} is empty");
            }
        }
        let trex: Vec<(u32, u32)> = file
            .all("moov/mvex/trex")
            .iter()
            .map(|t| {
                let (_, _, body) = t.full();
                assert_eq!(&body[8..], &[0; 12], "no defaults");
                (be32(body, 0), be32(body, 4))
            })
            .collect();
        assert_eq!(trex, [(1, 1), (2, 1)]);

        // avc1: 320x240, then avcC with the SPS and PPS as they are.
        let avc1 = traks[0].get("mdia/minf/stbl/stsd/avc1");
        assert_eq!(be16(avc1.body, 6), 1, "data_reference_index");
        assert_eq!((be16(avc1.body, 24), be16(avc1.body, 26)), (320, 240));
        let avcc = avc1.get("avcC").body;
        let mut expected = vec![1, 0x42, 0xC0, 0x0D, 0xFF, 0xE1, 0, SPS.len() as u8];
        expected.extend_from_slice(SPS);
        expected.extend_from_slice(&[1, 0, PPS.len() as u8]);
        expected.extend_from_slice(PPS);
        assert_eq!(avcc, expected, "baseline: no avcC extension");

        // mp4a: stereo, 16 bits, 48 kHz; esds with the ASC.
        let mp4a = traks[1].get("mdia/minf/stbl/stsd/mp4a");
        assert_eq!(be16(mp4a.body, 16), 2, "channelcount");
        assert_eq!(be16(mp4a.body, 18), 16, "samplesize");
        assert_eq!(be32(mp4a.body, 24), 48_000 << 16, "samplerate");
        let (_, _, esds) = mp4a.get("esds").full();
        #[rustfmt::skip]
        let expected: &[u8] = &[
            0x03, 0x80, 0x80, 0x80, 34, 0, 0, 0,
                0x04, 0x80, 0x80, 0x80, 20, 0x40, 0x15, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                    0x05, 0x80, 0x80, 0x80, 2, 0x11, 0x90,
                0x06, 0x80, 0x80, 0x80, 1, 0x02,
        ];
        assert_eq!(esds, expected);
    }

    #[test]
    fn init_segment_opus_dops() {
        let init = init_segment(&tracks(&[&opus_params()])).unwrap();
        let file = root(parse_boxes(&init, 0));
        let trak = file.get("moov/trak");
        let (_, _, mdhd) = trak.get("mdia/mdhd").full();
        assert_eq!(be32(mdhd, 8), 48_000);
        assert_eq!(trak.get("mdia/minf/smhd").body, [0; 8]);
        let entry = trak.get("mdia/minf/stbl/stsd/Opus");
        assert_eq!(be16(entry.body, 16), 2, "channelcount");
        assert_eq!(be32(entry.body, 24), 48_000 << 16);
        // Version, OutputChannelCount, PreSkip 312, InputSampleRate 48000,
        // OutputGain 0, ChannelMappingFamily 0.
        assert_eq!(
            entry.get("dOps").body,
            [0, 2, 0x01, 0x38, 0, 0, 0xBB, 0x80, 0, 0, 0]
        );
        assert_eq!(be32(file.get("moov/mvhd").full().2, 92), 2);
    }

    #[test]
    fn avcc_of_high_profile_has_the_chroma_extension() {
        // x264 High, 640x360 (height cropped from 368), 4:2:0, 8 bits.
        let sps: &[u8] = &[
            0x67, 0x64, 0x00, 0x1E, 0xAC, 0xD9, 0x40, 0xA0, 0x2F, 0xF9, 0x70, 0x11, 0x00, 0x00,
            0x03, 0x00, 0x01, 0x00, 0x00, 0x03, 0x00, 0x3C, 0x0F, 0x16, 0x2D, 0x96,
        ];
        crate::media::h264::Sps::parse(sps).expect("a valid SPS");
        let mut avcc = Vec::new();
        write_avcc(&mut avcc, sps, PPS);
        assert_eq!(&avcc[..4], &[1, 0x64, 0x00, 0x1E]);
        assert_eq!(avcc.len(), 6 + 2 + sps.len() + 3 + PPS.len() + 4);
        assert_eq!(&avcc[avcc.len() - 4..], &[0xFD, 0xF8, 0xF8, 0]);
    }

    #[test]
    fn invalid_configurations_are_refused() {
        let h264 = |sps: &'static [u8], width| {
            TrackConfig::new(Arc::new(CodecParams::H264 {
                sps: Bytes::from_static(sps),
                pps: Bytes::from_static(PPS),
                width,
                height: 240,
            }))
        };
        let opus = |sample_rate, channels| {
            TrackConfig::new(Arc::new(CodecParams::Opus {
                sample_rate,
                channels,
            }))
        };
        let invalid = |track, reason| Err(Fmp4Error::InvalidConfig { track, reason });
        assert_eq!(init_segment(&[]), Err(Fmp4Error::NoTracks));
        assert_eq!(
            init_segment(&[h264(&SPS[..3], 320)]),
            invalid(0, "unusable SPS")
        );
        assert_eq!(init_segment(&[h264(PPS, 320)]), invalid(0, "unusable SPS"));
        assert_eq!(
            init_segment(&[h264(SPS, 70_000)]),
            invalid(0, "picture size beyond 65535")
        );
        assert_eq!(
            init_segment(&[h264(SPS, 320), opus(48_000, 3)]),
            invalid(1, "Opus channel mapping family 0 is mono or stereo")
        );
        assert_eq!(init_segment(&[opus(0, 2)]), invalid(0, "sample rate 0"));
        assert_eq!(
            Fragmenter::new(&[opus(48_000, 2), opus(48_000, 1)]).err(),
            Some(Fmp4Error::InvalidConfig {
                track: 1,
                reason: "a second track of the same kind"
            })
        );
        let bad_aac = TrackConfig::new(Arc::new(CodecParams::Aac {
            asc: Bytes::new(),
            sample_rate: 48_000,
            channels: 2,
        }));
        assert_eq!(
            init_segment(&[bad_aac]),
            invalid(0, "unusable AudioSpecificConfig")
        );
    }

    // --- fragments ----------------------------------------------------------

    #[test]
    fn fragment_layout_and_samples() {
        let (v, a) = (h264_params(), opus_params());
        let mut fragmenter = Fragmenter::new(&tracks(&[&v, &a])).unwrap();
        assert_eq!(
            fragmenter.init_segment(),
            init_segment(&fragmenter_tracks(&v, &a)).unwrap()
        );
        // 10 video frames (keyframe first) and 15 Opus packets, interleaved.
        let mut frames: Vec<(TrackKind, Frame)> = (0..10)
            .map(|i| (TrackKind::Video, video(i * 3000, i * 3000, i == 0, &v)))
            .chain((0..15).map(|i| (TrackKind::Audio, audio(i * 1800, i as u8, &a))))
            .collect();
        frames.sort_by_key(|(_, f)| f.dts);
        for (kind, frame) in &frames {
            fragmenter.push(*kind, frame).unwrap();
        }
        assert!(fragmenter.take_fragment(0).is_none(), "nothing before 0");
        let fragment = fragmenter.take_fragment(18_000).unwrap();
        assert_eq!(fragment.sequence, 1);
        assert_eq!((fragment.start_dts, fragment.end_dts), (0, 18_000));
        assert!(fragment.independent);

        let (sequence, trafs) = parse_fragment(&fragment.data);
        assert_eq!(sequence, 1);
        assert_eq!(trafs.len(), 2);
        let (vt, at) = (&trafs[0], &trafs[1]);
        assert_eq!((vt.track_id, vt.base), (1, 0));
        assert_eq!(vt.trun.version, 0, "no composition offsets");
        let expected: Vec<(u32, u32, u32, i32)> = (0..6)
            .map(|i| {
                let (size, flags) = if i == 0 {
                    (4 + IDR.len(), SAMPLE_FLAGS_SYNC)
                } else {
                    (4 + SLICE.len(), SAMPLE_FLAGS_NON_SYNC)
                };
                (3000, size as u32, flags, 0)
            })
            .collect();
        assert_eq!(vt.trun.samples, expected);
        // AVCC with 4-byte lengths; the AUD, SPS and PPS stay in the avcC.
        assert_eq!(vt.data[0], avcc(&[IDR]));
        assert_eq!(vt.data[1], avcc(&[SLICE]));
        // Audio: 48 kHz, so 1800 ticks are exactly 960 samples.
        assert_eq!((at.track_id, at.base), (2, 0));
        assert_eq!(at.trun.samples.len(), 10);
        for (i, (sample, data)) in at.trun.samples.iter().zip(&at.data).enumerate() {
            assert_eq!(*sample, (960, 4, SAMPLE_FLAGS_SYNC, 0));
            assert_eq!(data, &[0xF8, i as u8, i as u8, i as u8]);
        }

        // The rest: video 6..9 (9 held back), audio 10..14 (14 held back).
        let fragment = fragmenter.take_fragment(i64::MAX).unwrap();
        assert_eq!(fragment.sequence, 2);
        assert!(!fragment.independent);
        let (_, trafs) = parse_fragment(&fragment.data);
        assert_eq!((trafs[0].base, trafs[0].trun.samples.len()), (18_000, 3));
        assert_eq!((trafs[1].base, trafs[1].trun.samples.len()), (9600, 4));
        assert!(fragmenter.take_fragment(i64::MAX).is_none());
        assert_eq!(
            fragmenter.buffered_bytes(),
            4 + SLICE.len() + 4,
            "the last frame of each track"
        );

        // finish gives the held-back frames their end.
        let last = fragmenter.finish(30_000).unwrap();
        assert_eq!(last.sequence, 3);
        assert_eq!(
            (last.start_dts, last.end_dts),
            (27_000, 30_000),
            "video times"
        );
        let (_, trafs) = parse_fragment(&last.data);
        assert_eq!((trafs[0].base, trafs[0].trun.samples[0].0), (27_000, 3000));
        assert_eq!(
            (trafs[1].base, trafs[1].trun.samples[0].0),
            (13_440, 2560),
            "audio from 25 200 to 30 000 ticks"
        );
        assert_eq!(fragmenter.buffered_bytes(), 0);
        assert!(fragmenter.finish(40_000).is_none());

        // Audio alone (video stalled): timed by the audio, not independent.
        for i in 0..3 {
            let frame = audio(36_000 + i * 1800, 0, &a);
            fragmenter.push(TrackKind::Audio, &frame).unwrap();
        }
        let fragment = fragmenter.take_fragment(i64::MAX).unwrap();
        assert_eq!((fragment.start_dts, fragment.end_dts), (36_000, 39_600));
        assert!(!fragment.independent);
        let (_, trafs) = parse_fragment(&fragment.data);
        assert_eq!(trafs.len(), 1, "no empty video traf");
        assert_eq!((trafs[0].track_id, trafs[0].base), (2, 19_200));
    }

    fn fragmenter_tracks(v: &Arc<CodecParams>, a: &Arc<CodecParams>) -> Vec<TrackConfig> {
        tracks(&[v, a])
    }

    #[test]
    fn finish_before_the_last_frame_uses_the_previous_duration() {
        let a = aac_params(44_100);
        let mut fragmenter = Fragmenter::new(&tracks(&[&a])).unwrap();
        // A track that never got a second frame gets the codec's default.
        fragmenter.push(TrackKind::Audio, &audio(0, 0, &a)).unwrap();
        let (_, trafs) = parse_fragment(&fragmenter.finish(0).unwrap().data);
        assert_eq!(trafs[0].trun.samples[0].0, 1024);
        // AAC at 44.1 kHz: 1024 samples are 2089.8 ticks; the hub rounds
        // down, we round back to whole frames.
        let ticks = |n: i64| n * 1024 * CLOCK_HZ / 44_100;
        for n in 1..=3 {
            fragmenter
                .push(TrackKind::Audio, &audio(ticks(n), n as u8, &a))
                .unwrap();
        }
        let fragment = fragmenter.finish(0).unwrap();
        assert!(fragment.independent, "audio only");
        let (_, trafs) = parse_fragment(&fragment.data);
        assert_eq!(trafs[0].base, 1024);
        let durations: Vec<u32> = trafs[0].trun.samples.iter().map(|s| s.0).collect();
        assert_eq!(durations, [1024, 1024, 1024]);
    }

    #[test]
    fn b_frames_get_signed_composition_offsets() {
        let v = h264_params();
        let mut fragmenter = Fragmenter::new(&tracks(&[&v])).unwrap();
        // I P B B in decode order, 30 fps; PTS 0, 9000, 3000, 6000.
        let frames = [
            video(0, 0, true, &v),
            video(9000, 3000, false, &v),
            video(3000, 4000, false, &v),
            video(6000, 5000, false, &v),
            video(12_000, 12_000, false, &v),
        ];
        for f in &frames {
            fragmenter.push(TrackKind::Video, f).unwrap();
        }
        let (_, trafs) = parse_fragment(&fragmenter.take_fragment(i64::MAX).unwrap().data);
        let trun = &trafs[0].trun;
        assert_eq!(trun.version, 1);
        let timing: Vec<(u32, i32)> = trun.samples.iter().map(|s| (s.0, s.3)).collect();
        assert_eq!(
            timing,
            [(3000, 0), (1000, 6000), (1000, -1000), (7000, 1000)]
        );
    }

    #[test]
    fn refused_frames_change_nothing() {
        let (v, a) = (h264_params(), opus_params());
        let mut fragmenter = Fragmenter::new(&tracks(&[&v])).unwrap();
        fragmenter
            .push(TrackKind::Video, &video(3000, 3000, true, &v))
            .unwrap();
        let other_sps = Arc::new(CodecParams::H264 {
            sps: Bytes::from_static(SPS),
            pps: Bytes::from_static(PPS),
            width: 640,
            height: 360,
        });
        let mut only_params = video(6000, 6000, true, &v);
        only_params.data = annex_b(&[SPS, PPS]);
        let mut empty_audio = audio(0, 0, &a);
        empty_audio.data = Bytes::new();
        let cases = [
            (
                TrackKind::Audio,
                audio(0, 0, &a),
                Fmp4Error::UndeclaredTrack(TrackKind::Audio),
            ),
            (
                TrackKind::Video,
                audio(0, 0, &a),
                Fmp4Error::KindMismatch {
                    kind: TrackKind::Video,
                    codec: Codec::Opus,
                },
            ),
            (
                TrackKind::Video,
                video(6000, 6000, true, &other_sps),
                Fmp4Error::ParamsChanged(TrackKind::Video),
            ),
            (
                TrackKind::Video,
                video(3000, 3000, false, &v),
                Fmp4Error::DtsNotIncreasing {
                    kind: TrackKind::Video,
                    dts: 3000,
                    previous: 3000,
                },
            ),
            (
                TrackKind::Video,
                video(0, -1, false, &v),
                Fmp4Error::NegativeDts(-1),
            ),
            (
                TrackKind::Video,
                only_params,
                Fmp4Error::EmptySample(TrackKind::Video),
            ),
        ];
        for (kind, frame, error) in cases {
            assert_eq!(fragmenter.push(kind, &frame), Err(error));
        }
        let mut audio_only = Fragmenter::new(&tracks(&[&a])).unwrap();
        assert_eq!(
            audio_only.push(TrackKind::Audio, &empty_audio),
            Err(Fmp4Error::EmptySample(TrackKind::Audio))
        );
        // Equal parameters in another Arc are fine.
        let same = h264_params();
        fragmenter
            .push(TrackKind::Video, &video(6000, 6000, false, &same))
            .unwrap();
        let (_, trafs) = parse_fragment(&fragmenter.finish(9000).unwrap().data);
        assert_eq!(trafs[0].base, 3000);
        let durations: Vec<u32> = trafs[0].trun.samples.iter().map(|s| s.0).collect();
        assert_eq!(durations, [3000, 3000]);
    }

    #[test]
    fn buffer_is_bounded() {
        let a = opus_params();
        let mut fragmenter = Fragmenter::new(&tracks(&[&a])).unwrap();
        let mut big = audio(0, 0, &a);
        big.data = Bytes::from(vec![0xF8; MAX_BUFFERED_BYTES / 2]);
        fragmenter.push(TrackKind::Audio, &big).unwrap();
        big.dts = 1800;
        fragmenter.push(TrackKind::Audio, &big).unwrap();
        big.dts = 3600;
        assert_eq!(
            fragmenter.push(TrackKind::Audio, &big),
            Err(Fmp4Error::BufferFull)
        );
        let fragment = fragmenter.take_fragment(i64::MAX).unwrap();
        assert_eq!(fragmenter.buffered_bytes(), MAX_BUFFERED_BYTES / 2);
        assert!(fragment.data.len() > MAX_BUFFERED_BYTES / 2);
        fragmenter.push(TrackKind::Audio, &big).unwrap();
    }

    #[test]
    fn timescale_conversion_is_exact_and_never_drifts() {
        assert_eq!(rescale(1800, 48_000), 960);
        assert_eq!(rescale(1920, 48_000), 1024);
        assert_eq!(
            rescale(90_000 * 3600 * 24 * 365, 48_000),
            48_000 * 3600 * 24 * 365
        );
        assert_eq!(rescale(12_345, VIDEO_TIMESCALE), 12_345);
        // An hour of Opus cut into 200 ms parts: every part's tfdt is the
        // sum of all durations before it.
        let a = opus_params();
        let mut fragmenter = Fragmenter::new(&tracks(&[&a])).unwrap();
        let mut expected_base = 0u64;
        for i in 0..180_000i64 {
            fragmenter
                .push(TrackKind::Audio, &audio(i * 1800, 0, &a))
                .unwrap();
            if i % 10 != 0 {
                continue;
            }
            let Some(fragment) = fragmenter.take_fragment(i * 1800) else {
                continue;
            };
            let (_, trafs) = parse_fragment(&fragment.data);
            assert_eq!(trafs[0].base, expected_base);
            for s in &trafs[0].trun.samples {
                assert_eq!(s.0, 960);
                expected_base += u64::from(s.0);
            }
        }
        assert_eq!(expected_base, 179_990 * 960);
    }

    /// Real encoder output muxed, then read back by ffprobe and decoded by ffmpeg.
    mod real {
        use std::path::{Path, PathBuf};
        use std::process::Command;

        use super::*;

        const SAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/samples/sample.mkv");

        /// Stdout of ffmpeg, which must succeed without a word on stderr.
        fn ffmpeg(args: &[&str]) -> Vec<u8> {
            let out = Command::new("ffmpeg")
                .args(["-nostdin", "-hide_banner", "-v", "error"])
                .args(args)
                .output()
                .expect("ffmpeg is installed (scripts/install-deps.sh)");
            assert!(
                out.status.success() && out.stderr.is_empty(),
                "ffmpeg {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            out.stdout
        }

        /// Hub frames of an Annex B stream with AUDs, as the WebRTC ingest makes
        /// them: PTS from the picture order (30 fps; x264 counts 2 per frame),
        /// DTS and parameters from the assembler.
        fn video_frames(stream: &[u8]) -> Vec<Frame> {
            let frames = crate::media::h264::elementary_stream_frames(stream, 3000).unwrap();
            assert!(frames[0].key);
            frames
        }

        /// The sample's H264, access units delimited by AUDs.
        fn sample_video() -> Vec<Frame> {
            let h264 = ffmpeg(&[
                "-i",
                SAMPLE,
                "-an",
                "-c:v",
                "copy",
                "-bsf:v",
                "h264_mp4toannexb,h264_metadata=aud=insert",
                "-f",
                "h264",
                "-",
            ]);
            video_frames(&h264)
        }

        /// Raw AAC frames of an ADTS stream, stamped from their sample count.
        fn aac_frames(mut adts: &[u8]) -> Vec<Frame> {
            assert_eq!(&adts[..2], &[0xFF, 0xF1], "ADTS, MPEG-4, no CRC");
            // AAC-LC (object type 2), 48 kHz (index 3), stereo.
            assert_eq!((adts[2] >> 6, (adts[2] >> 2) & 0xF), (1, 3));
            let params = aac_params(48_000);
            let mut frames = Vec::new();
            while !adts.is_empty() {
                let len = (usize::from(adts[3] & 3) << 11)
                    | (usize::from(adts[4]) << 3)
                    | usize::from(adts[5] >> 5);
                let ticks = frames.len() as i64 * 1920;
                frames.push(Frame {
                    pts: ticks,
                    dts: ticks,
                    key: true,
                    data: Bytes::copy_from_slice(&adts[7..len]),
                    params: Arc::clone(&params),
                });
                adts = &adts[len..];
            }
            frames
        }

        /// The packets of an Ogg stream (RFC 3533).
        fn ogg_packets(mut ogg: &[u8]) -> Vec<Vec<u8>> {
            let mut packets = Vec::new();
            let mut packet = Vec::new();
            while !ogg.is_empty() {
                assert_eq!(&ogg[..4], b"OggS");
                let segments = usize::from(ogg[26]);
                let (lacing, mut body) = ogg[27..].split_at(segments);
                for &len in lacing {
                    let (data, rest) = body.split_at(usize::from(len));
                    packet.extend_from_slice(data);
                    body = rest;
                    if len < 255 {
                        packets.push(std::mem::take(&mut packet));
                    }
                }
                ogg = body;
            }
            packets
        }

        /// 48 kHz samples in an Opus packet, from its TOC (RFC 6716 3.1).
        fn opus_samples(packet: &[u8]) -> i64 {
            let config = usize::from(packet[0] >> 3);
            let frame = match config {
                0..=11 => [480, 960, 1920, 2880][config % 4],
                12..=15 => [480, 960][config % 2],
                _ => [120, 240, 480, 960][config % 4],
            };
            let count = match packet[0] & 3 {
                0 => 1,
                1 | 2 => 2,
                _ => i64::from(packet[1] & 0x3F),
            };
            frame * count
        }

        /// Opus frames of an Ogg Opus stream, stamped from their sample count.
        fn opus_frames(ogg: &[u8]) -> Vec<Frame> {
            let packets = ogg_packets(ogg);
            assert!(packets[0].starts_with(b"OpusHead") && packets[1].starts_with(b"OpusTags"));
            let params = opus_params();
            let mut samples = 0;
            packets[2..]
                .iter()
                .map(|packet| {
                    let ticks = samples * CLOCK_HZ / 48_000;
                    samples += opus_samples(packet);
                    Frame {
                        pts: ticks,
                        dts: ticks,
                        key: true,
                        data: Bytes::copy_from_slice(packet),
                        params: Arc::clone(&params),
                    }
                })
                .collect()
        }

        /// The frames of both tracks in decode order, as the hub interleaves them.
        fn interleave(video: &[Frame], audio: &[Frame]) -> Vec<(TrackKind, Frame)> {
            let mut frames: Vec<(TrackKind, Frame)> = video
                .iter()
                .map(|f| (TrackKind::Video, f.clone()))
                .chain(audio.iter().map(|f| (TrackKind::Audio, f.clone())))
                .collect();
            frames.sort_by_key(|(_, f)| f.dts);
            frames
        }

        /// Init segment and fragments, cut as an LL-HLS caller would: a part
        /// at least every 200 ms and on every keyframe (a new segment on the
        /// first keyframe 2 s after the last one), the rest at the end.
        fn mux(tracks: &[TrackConfig], frames: &[(TrackKind, Frame)]) -> (Vec<u8>, Vec<Fragment>) {
            let mut fragmenter = Fragmenter::new(tracks).unwrap();
            let init = fragmenter.init_segment();
            let mut fragments = Vec::new();
            let mut part_start = 0;
            for (kind, frame) in frames {
                fragmenter.push(*kind, frame).unwrap();
                let key = *kind == TrackKind::Video && frame.key;
                if key || frame.dts - part_start >= CLOCK_HZ / 5 {
                    part_start = frame.dts;
                    fragments.extend(fragmenter.take_fragment(frame.dts));
                }
            }
            let end = frames.iter().map(|(_, f)| f.pts).max().unwrap() + CLOCK_HZ / 30;
            fragments.extend(fragmenter.finish(end));
            let sequences: Vec<u32> = fragments.iter().map(|f| f.sequence).collect();
            assert_eq!(sequences, (1..=fragments.len() as u32).collect::<Vec<_>>());
            (init, fragments)
        }

        /// Writes the stream twice: as one file (init segment, then every
        /// fragment), and as an fMP4 HLS playlist whose `EXT-X-MAP` is the
        /// init segment and whose segments are the parts from one independent
        /// fragment at least 2 s after the previous segment's start to the next.
        fn write_stream(dir: &Path, init: &[u8], fragments: &[Fragment]) -> [PathBuf; 2] {
            let mut file = init.to_vec();
            let mut segments: Vec<(i64, i64, Vec<u8>)> = Vec::new();
            for fragment in fragments {
                file.extend_from_slice(&fragment.data);
                let new_segment = segments.last().is_none_or(|(start, _, _)| {
                    fragment.independent && fragment.start_dts - start >= 2 * CLOCK_HZ
                });
                if new_segment {
                    segments.push((fragment.start_dts, 0, Vec::new()));
                }
                let (_, end, data) = segments.last_mut().unwrap();
                *end = fragment.end_dts;
                data.extend_from_slice(&fragment.data);
            }
            let single = dir.join("stream.mp4");
            std::fs::write(&single, file).unwrap();
            std::fs::write(dir.join("init.mp4"), init).unwrap();
            let mut playlist = String::from(
                "#EXTM3U\n#EXT-X-VERSION:7\n#EXT-X-TARGETDURATION:3\n\
                 #EXT-X-MEDIA-SEQUENCE:0\n#EXT-X-PLAYLIST-TYPE:VOD\n\
                 #EXT-X-MAP:URI=\"init.mp4\"\n",
            );
            for (i, (start, end, data)) in segments.iter().enumerate() {
                std::fs::write(dir.join(format!("seg{i}.m4s")), data).unwrap();
                let seconds = (end - start) as f64 / CLOCK_HZ as f64;
                playlist.push_str(&format!("#EXTINF:{seconds:.3},\nseg{i}.m4s\n"));
            }
            playlist.push_str("#EXT-X-ENDLIST\n");
            let hls = dir.join("index.m3u8");
            std::fs::write(&hls, playlist).unwrap();
            [single, hls]
        }

        /// ffprobe's CSV output, asserting it has no warning to give.
        fn probe(path: &Path, args: &[&str]) -> Vec<String> {
            let out = Command::new("ffprobe")
                .args(["-v", "warning"])
                .args(args)
                .args(["-of", "csv=p=0"])
                .arg(path)
                .output()
                .expect("ffprobe is installed");
            assert!(out.status.success(), "ffprobe {}", path.display());
            assert!(
                out.stderr.is_empty(),
                "ffprobe {}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            let text = String::from_utf8(out.stdout).unwrap();
            text.lines().map(|l| l.trim().to_string()).collect()
        }

        /// What a muxed file must look like to ffprobe and ffmpeg.
        struct Expect<'a> {
            streams: [&'a str; 2],
            video: &'a [Frame],
            audio: &'a [Frame],
            audio_rate: i64,
        }

        /// Writes the stream as one file and as an HLS playlist, then checks
        /// both for streams, duration, every packet's timestamps and flags,
        /// and a full decode without a warning.
        fn check(init: &[u8], fragments: &[Fragment], expect: &Expect<'_>) {
            let dir = tempfile::tempdir().unwrap();
            for path in write_stream(dir.path(), init, fragments) {
                check_file(&path, expect);
            }
        }

        fn check_file(path: &Path, expect: &Expect<'_>) {
            // The HLS demuxer lists the streams again under its program.
            let streams = probe(
                path,
                &[
                    "-show_entries",
                    "stream=codec_name,width,height,sample_rate,channels",
                ],
            );
            let streams: Vec<String> = streams.into_iter().filter(|s| !s.is_empty()).collect();
            assert!(!streams.is_empty());
            for listed in streams.chunks(2) {
                assert_eq!(listed, expect.streams, "{}", path.display());
            }

            let last = expect.video.iter().map(|f| f.pts).max().unwrap();
            let expected = (last + 3000) as f64 / CLOCK_HZ as f64;
            let duration: f64 = probe(path, &["-show_entries", "format=duration"])[0]
                .parse()
                .unwrap();
            assert!(
                (duration - expected).abs() <= expected * 0.05,
                "{}: duration {duration}, expected {expected}",
                path.display()
            );

            // Video packets in decode order: our PTS, DTS and keyframes exactly.
            let packets = probe(
                path,
                &[
                    "-select_streams",
                    "v",
                    "-show_entries",
                    "packet=pts,dts,flags",
                ],
            );
            let expected: Vec<String> = expect
                .video
                .iter()
                .map(|f| {
                    let key = if f.key { "K_" } else { "__" };
                    format!("{},{},{key}", f.pts, f.dts)
                })
                .collect();
            assert_eq!(packets, expected, "{}", path.display());

            // Audio packets: every frame, in the track's timescale.
            let packets = probe(
                path,
                &["-select_streams", "a", "-show_entries", "packet=pts"],
            );
            let expected: Vec<String> = expect
                .audio
                .iter()
                .map(|f| (f.pts * expect.audio_rate / CLOCK_HZ).to_string())
                .collect();
            assert_eq!(packets, expected, "{}", path.display());

            let decode = Command::new("ffmpeg")
                .args(["-nostdin", "-hide_banner", "-v", "warning", "-i"])
                .arg(path)
                .args(["-f", "null", "-"])
                .output()
                .unwrap();
            assert!(decode.status.success(), "decoding {}", path.display());
            assert!(
                decode.stderr.is_empty(),
                "decoding {}: {}",
                path.display(),
                String::from_utf8_lossy(&decode.stderr)
            );
        }

        fn video_config(video: &[Frame]) -> TrackConfig {
            TrackConfig::new(Arc::clone(&video[0].params))
        }

        #[test]
        fn sample_h264_and_aac_probe_and_decode_cleanly() {
            let video = sample_video();
            assert_eq!(video.len(), 300);
            let adts = ffmpeg(&[
                "-i", SAMPLE, "-vn", "-c:a", "aac", "-b:a", "128k", "-ar", "48000", "-ac", "2",
                "-f", "adts", "-",
            ]);
            let audio = aac_frames(&adts);
            let tracks = [video_config(&video), TrackConfig::new(aac_params(48_000))];
            let (init, fragments) = mux(&tracks, &interleave(&video, &audio));
            assert!(fragments.len() >= 50, "{} fragments", fragments.len());
            let keys = video.iter().filter(|f| f.key).count();
            assert_eq!(keys, 10);
            assert_eq!(fragments.iter().filter(|f| f.independent).count(), keys);
            check(
                &init,
                &fragments,
                &Expect {
                    streams: ["h264,640,360", "aac,48000,2"],
                    video: &video,
                    audio: &audio,
                    audio_rate: 48_000,
                },
            );
        }

        #[test]
        fn sample_h264_and_opus_probe_and_decode_cleanly() {
            let video = sample_video();
            let ogg = ffmpeg(&["-i", SAMPLE, "-vn", "-c:a", "copy", "-f", "ogg", "-"]);
            let audio = opus_frames(&ogg);
            assert!(audio.len() >= 490, "{} Opus packets", audio.len());
            assert!(audio.windows(2).all(|w| w[1].dts - w[0].dts == 1800));
            let tracks = [video_config(&video), TrackConfig::new(opus_params())];
            let (init, fragments) = mux(&tracks, &interleave(&video, &audio));
            check(
                &init,
                &fragments,
                &Expect {
                    streams: ["h264,640,360", "opus,48000,2"],
                    video: &video,
                    audio: &audio,
                    audio_rate: 48_000,
                },
            );
        }

        #[test]
        fn x264_high_with_b_frames_keeps_pts_and_dts() {
            let h264 = ffmpeg(&[
                "-f",
                "lavfi",
                "-i",
                "testsrc2=size=640x360:rate=30",
                "-t",
                "4",
                "-pix_fmt",
                "yuv420p",
                "-c:v",
                "libx264",
                "-profile:v",
                "high",
                "-bf",
                "2",
                "-g",
                "30",
                "-x264-params",
                "aud=1",
                "-f",
                "h264",
                "-",
            ]);
            let video = video_frames(&h264);
            assert_eq!(video.len(), 120);
            assert!(video.iter().any(|f| f.pts > f.dts), "expected B-frames");
            assert!(video.windows(2).any(|w| w[1].pts < w[0].pts), "reordered");
            let ogg = ffmpeg(&[
                "-f",
                "lavfi",
                "-i",
                "sine=frequency=440:sample_rate=48000",
                "-t",
                "4",
                "-ac",
                "2",
                "-c:a",
                "libopus",
                "-f",
                "ogg",
                "-",
            ]);
            let audio = opus_frames(&ogg);
            let tracks = [video_config(&video), TrackConfig::new(opus_params())];
            let (init, fragments) = mux(&tracks, &interleave(&video, &audio));
            // Composition offsets went into version 1 truns, signed.
            let truns: Vec<Trun> = fragments
                .iter()
                .flat_map(|f| parse_fragment(&f.data).1)
                .filter(|t| t.track_id == 1)
                .map(|t| t.trun)
                .collect();
            assert!(truns.iter().all(|t| t.version == 1));
            assert!(truns.iter().flat_map(|t| &t.samples).any(|s| s.3 > 0));
            check(
                &init,
                &fragments,
                &Expect {
                    streams: ["h264,640,360", "opus,48000,2"],
                    video: &video,
                    audio: &audio,
                    audio_rate: 48_000,
                },
            );
        }
    }
}
