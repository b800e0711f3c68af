//! The unit that flows through a stream hub: one access unit (video) or one
//! audio packet, with timestamps on the stream timeline.
//!
//! Every timestamp on the hub is in 90 kHz ticks ([`CLOCK_HZ`]) counted from
//! the stream's first frame, whatever the track's own RTP clock is. 90 kHz is
//! MPEG-TS's clock and divides 48 kHz audio frames exactly (960 samples of Opus
//! = 1800 ticks, 1024 samples of AAC = 1920 ticks).

use std::sync::Arc;

use bytes::Bytes;

/// Ticks per second of the stream timeline.
pub const CLOCK_HZ: i64 = 90_000;

/// Codecs that can travel through the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Codec {
    H264,
    Opus,
    Aac,
    /// Only from publishers; outputs get it transcoded to H264.
    Vp8,
    /// Only from publishers, like VP8.
    Vp9,
    /// Only from publishers, like VP8.
    Av1,
}

impl Codec {
    /// Video that publishers send and outputs only get transcoded to H264,
    /// in the order a WHIP answer prefers them (cheapest to decode first).
    pub const TRANSCODED_VIDEO: [Codec; 3] = [Codec::Vp8, Codec::Vp9, Codec::Av1];

    pub fn kind(self) -> TrackKind {
        match self {
            Codec::H264 | Codec::Vp8 | Codec::Vp9 | Codec::Av1 => TrackKind::Video,
            Codec::Opus | Codec::Aac => TrackKind::Audio,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TrackKind {
    Video,
    Audio,
}

/// Out-of-band codec configuration of a track. A new `Arc` is made whenever
/// the publisher changes it (new SPS, new resolution), so outputs can compare
/// with `Arc::ptr_eq` to notice a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CodecParams {
    H264 {
        /// SPS NAL unit, without start code.
        sps: Bytes,
        /// PPS NAL unit, without start code.
        pps: Bytes,
        width: u32,
        height: u32,
    },
    Opus {
        sample_rate: u32,
        channels: u8,
    },
    Aac {
        /// MPEG-4 AudioSpecificConfig (2 bytes for AAC-LC).
        asc: Bytes,
        sample_rate: u32,
        channels: u8,
    },
    Vp8 {
        width: u32,
        height: u32,
    },
    Vp9 {
        width: u32,
        height: u32,
    },
    /// The size is the sequence header's maximum frame size.
    Av1 {
        width: u32,
        height: u32,
    },
}

impl CodecParams {
    pub fn codec(&self) -> Codec {
        match self {
            CodecParams::H264 { .. } => Codec::H264,
            CodecParams::Opus { .. } => Codec::Opus,
            CodecParams::Aac { .. } => Codec::Aac,
            CodecParams::Vp8 { .. } => Codec::Vp8,
            CodecParams::Vp9 { .. } => Codec::Vp9,
            CodecParams::Av1 { .. } => Codec::Av1,
        }
    }

    /// Width and height of video.
    pub fn picture_size(&self) -> Option<(u32, u32)> {
        match *self {
            CodecParams::H264 { width, height, .. }
            | CodecParams::Vp8 { width, height }
            | CodecParams::Vp9 { width, height }
            | CodecParams::Av1 { width, height } => Some((width, height)),
            CodecParams::Opus { .. } | CodecParams::Aac { .. } => None,
        }
    }
}

/// One frame on the stream timeline.
#[derive(Debug, Clone)]
pub struct Frame {
    /// Presentation time, 90 kHz ticks from the start of the stream.
    pub pts: i64,
    /// Decode time, 90 kHz ticks; `dts <= pts`, monotonic per track.
    pub dts: i64,
    /// Video: an IDR access unit (a decoder can start here). Audio: always true.
    pub key: bool,
    /// H264: one Annex B access unit (start codes, SPS/PPS in front of IDRs).
    /// AAC: one raw AAC frame (no ADTS header). Opus: one Opus packet.
    /// VP8: one frame as RFC 7741 depacketization gives it. VP9: one
    /// picture (its spatial layers one after the other). AV1: one temporal
    /// unit of OBUs with size fields, without temporal delimiter.
    pub data: Bytes,
    /// Codec configuration in force for this frame.
    pub params: Arc<CodecParams>,
}

impl Frame {
    pub fn codec(&self) -> Codec {
        self.params.codec()
    }
}
