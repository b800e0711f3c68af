//! FLV tag bodies and files, sans-IO: what RTMP messages and `.flv` files
//! carry for H.264 + AAC.
//!
//! - Tag bodies (the payload of an RTMP audio/video/data message, or of an FLV
//!   tag): [`avc_sequence_header`], [`avc_frame`], [`aac_sequence_header`],
//!   [`aac_frame`] and the AMF0 `onMetaData` script data of [`on_metadata`].
//! - FLV files: [`file_header`] and [`tag`] (tag header, body, PreviousTagSize),
//!   or the small [`FlvFile`] buffer built on them.
//! - Time: [`timestamp_ms`] and [`cts_ms`] turn the stream timeline (90 kHz
//!   ticks) into FLV/RTMP milliseconds.
//!
//! Nothing here reads a clock or touches a socket: bytes in, bytes out.
//! Nothing panics on any input; what FLV cannot express is an [`FlvError`].
//!
//! References: Adobe "Video File Format Specification" v10.1 (FLV tags,
//! VIDEODATA, AUDIODATA, SCRIPTDATA), ISO/IEC 14496-15 §5.3.3.1
//! (AVCDecoderConfigurationRecord), Adobe "Action Message Format -- AMF 0".

use bytes::{BufMut, Bytes, BytesMut};

use crate::media::frame::CLOCK_HZ;
use crate::media::h264::{
    H264Error, NAL_AUD, NAL_FILLER, NAL_PPS, NAL_SPS, Sps, nal_type, split_annexb,
};

/// Largest tag body FLV can describe (`DataSize` is 24 bits); RTMP message
/// lengths have the same limit.
pub const MAX_BODY_LEN: usize = 0xFF_FFFF;

/// Largest SPS or PPS an AVCDecoderConfigurationRecord can hold (16-bit lengths).
const MAX_PARAM_SET_LEN: usize = 0xFFFF;

/// FLV `CodecID` of AVC (H.264), in VIDEODATA and `videocodecid`.
pub const VIDEO_CODEC_AVC: u8 = 7;
/// FLV `SoundFormat` of AAC, in AUDIODATA and `audiocodecid`.
pub const AUDIO_CODEC_AAC: u8 = 10;

/// `FrameType` 1 (key frame) and `CodecID` 7 (AVC).
const AVC_KEY: u8 = 0x17;
/// `FrameType` 2 (inter frame) and `CodecID` 7 (AVC).
const AVC_INTER: u8 = 0x27;
/// `AVCPacketType` 0: AVCDecoderConfigurationRecord.
const AVC_SEQUENCE_HEADER: u8 = 0;
/// `AVCPacketType` 1: NAL units.
const AVC_NALU: u8 = 1;
/// `SoundFormat` 10 (AAC), `SoundRate` 3 (44 kHz), `SoundSize` 1 (16 bit),
/// `SoundType` 1 (stereo): the fixed first byte of every AAC AUDIODATA. The
/// real rate and channels are in the AudioSpecificConfig.
const AAC_FLAGS: u8 = 0xAF;
/// `AACPacketType` 0: AudioSpecificConfig.
const AAC_SEQUENCE_HEADER: u8 = 0;
/// `AACPacketType` 1: raw AAC frame.
const AAC_RAW: u8 = 1;

/// Range of the 24-bit signed `CompositionTime`.
const CTS_MIN: i64 = -0x80_0000;
const CTS_MAX: i64 = 0x7F_FFFF;

/// Ticks of the stream timeline per millisecond.
const TICKS_PER_MS: i64 = CLOCK_HZ / 1000;

/// What FLV cannot express.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlvError {
    /// The SPS does not parse (or is not an SPS).
    #[error("unusable SPS: {0}")]
    BadSps(#[source] H264Error),
    /// The PPS is empty or not a PPS.
    #[error("unusable PPS: {0}")]
    BadPps(&'static str),
    /// Nothing left to send once AUD, SPS, PPS and filler are dropped.
    #[error("H264 access unit without any NAL unit to send")]
    EmptyAccessUnit,
    /// A length field of the format would overflow.
    #[error("{what} of {len} bytes exceeds the FLV limit of {max}")]
    TooLarge {
        what: &'static str,
        len: usize,
        max: usize,
    },
}

fn check_len(what: &'static str, len: usize, max: usize) -> Result<(), FlvError> {
    if len > max {
        return Err(FlvError::TooLarge { what, len, max });
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Time
// ---------------------------------------------------------------------------

/// FLV/RTMP timestamp in milliseconds of a stream-timeline time (90 kHz
/// ticks): rounded down, negative times clamped to 0, and wrapping modulo 2^32
/// as RTMP timestamps do (after about 49.7 days).
pub fn timestamp_ms(ticks_90k: i64) -> u32 {
    let ms = ticks_90k.max(0) / TICKS_PER_MS;
    u32::try_from(ms.rem_euclid(1 << 32)).unwrap_or(0)
}

/// `CompositionTime` (PTS − DTS) in milliseconds, for [`avc_frame`].
///
/// Computed from the same rounded, clamped values as [`timestamp_ms`], so that
/// `timestamp_ms(dts) + cts_ms(pts, dts) == timestamp_ms(pts)` (modulo 2^32),
/// and saturated to the 24-bit signed range of the field.
pub fn cts_ms(pts: i64, dts: i64) -> i32 {
    let diff = (pts.max(0) / TICKS_PER_MS) - (dts.max(0) / TICKS_PER_MS);
    i32::try_from(diff.clamp(CTS_MIN, CTS_MAX)).unwrap_or(0)
}

// ---------------------------------------------------------------------------
// Video
// ---------------------------------------------------------------------------

/// The first NAL unit of `data`, with or without an Annex B start code.
fn first_nal(data: &[u8]) -> &[u8] {
    split_annexb(data).next().unwrap_or_default()
}

/// VIDEODATA body of an AVC sequence header: `0x17`, `AVCPacketType` 0,
/// `CompositionTime` 0 and the AVCDecoderConfigurationRecord (version 1;
/// profile, compatibility and level copied from the SPS; 4-byte NAL lengths;
/// one SPS, one PPS).
///
/// For the High profiles (`profile_idc` 100, 110, 122, 244 and the former 144)
/// the record ends with the ISO 14496-15 extension: `chroma_format`,
/// `bit_depth_luma_minus8`, `bit_depth_chroma_minus8` from the SPS and no
/// SPS extension, as ffmpeg writes it.
///
/// `sps` and `pps` are NAL units (header byte included); a leading start code
/// is tolerated. The SPS must parse: a record a decoder cannot use is worse
/// than none.
pub fn avc_sequence_header(sps: &[u8], pps: &[u8]) -> Result<Bytes, FlvError> {
    let sps = first_nal(sps);
    let pps = first_nal(pps);
    let parsed = Sps::parse(sps).map_err(FlvError::BadSps)?;
    if pps.len() < 2 {
        return Err(FlvError::BadPps("too short"));
    }
    if nal_type(pps) != NAL_PPS {
        return Err(FlvError::BadPps("not a PPS NAL unit"));
    }
    check_len("SPS", sps.len(), MAX_PARAM_SET_LEN)?;
    check_len("PPS", pps.len(), MAX_PARAM_SET_LEN)?;

    let mut b = BytesMut::with_capacity(5 + 11 + 4 + sps.len() + pps.len());
    b.put_u8(AVC_KEY);
    b.put_u8(AVC_SEQUENCE_HEADER);
    b.put_slice(&[0, 0, 0]); // CompositionTime
    b.put_u8(1); // configurationVersion
    b.put_u8(parsed.profile_idc); // AVCProfileIndication
    b.put_u8(parsed.constraint_flags); // profile_compatibility
    b.put_u8(parsed.level_idc); // AVCLevelIndication
    b.put_u8(0xFC | 3); // reserved '111111', lengthSizeMinusOne 3
    b.put_u8(0xE0 | 1); // reserved '111', numOfSequenceParameterSets 1
    b.put_u16(sps.len() as u16); // checked above
    b.put_slice(sps);
    b.put_u8(1); // numOfPictureParameterSets
    b.put_u16(pps.len() as u16);
    b.put_slice(pps);
    if matches!(parsed.profile_idc, 100 | 110 | 122 | 144 | 244) {
        // Parsed values are bounded by Sps::parse (chroma ≤ 3, depth − 8 ≤ 6).
        b.put_u8(0xFC | (parsed.chroma_format_idc & 0x03) as u8);
        b.put_u8(0xF8 | (parsed.bit_depth_luma.saturating_sub(8) & 0x07) as u8);
        b.put_u8(0xF8 | (parsed.bit_depth_chroma.saturating_sub(8) & 0x07) as u8);
        b.put_u8(0); // numOfSequenceParameterSetExt
    }
    Ok(b.freeze())
}

/// VIDEODATA body of one access unit: `0x17` (key) or `0x27`,
/// `AVCPacketType` 1, the 24-bit signed `CompositionTime` (see [`cts_ms`];
/// saturated to its range), then the NAL units in AVCC form, each behind a
/// 4-byte big-endian length (matching `lengthSizeMinusOne` 3 of
/// [`avc_sequence_header`]).
///
/// `annexb_au` is one Annex B access unit, as on the hub. Kept: slices, SEI
/// and anything else. Dropped: access unit delimiters (FLV has none), filler
/// data, and SPS/PPS: they travel in the sequence header, so the caller sends
/// a new [`avc_sequence_header`] before the first frame whenever the codec
/// parameters change (the hub makes a new `Arc<CodecParams>` then). In-band
/// copies would only duplicate them, and some CDN ingests warn about them.
pub fn avc_frame(annexb_au: &[u8], key: bool, cts_ms: i32) -> Result<Bytes, FlvError> {
    let keep = |nal: &&[u8]| !matches!(nal_type(nal), NAL_AUD | NAL_SPS | NAL_PPS | NAL_FILLER);
    let mut len = 5usize;
    let mut count = 0usize;
    for nal in split_annexb(annexb_au).filter(keep) {
        len = len.saturating_add(4).saturating_add(nal.len());
        count += 1;
    }
    if count == 0 {
        return Err(FlvError::EmptyAccessUnit);
    }
    check_len("video tag body", len, MAX_BODY_LEN)?;

    let cts = i64::from(cts_ms).clamp(CTS_MIN, CTS_MAX);
    let mut b = BytesMut::with_capacity(len);
    b.put_u8(if key { AVC_KEY } else { AVC_INTER });
    b.put_u8(AVC_NALU);
    put_i24(&mut b, cts);
    for nal in split_annexb(annexb_au).filter(keep) {
        b.put_u32(nal.len() as u32); // ≤ MAX_BODY_LEN, checked above
        b.put_slice(nal);
    }
    Ok(b.freeze())
}

/// Writes the low 24 bits of `v` (two's complement), big-endian.
fn put_i24(b: &mut BytesMut, v: i64) {
    let bytes = v.to_be_bytes();
    b.put_slice(&bytes[5..]);
}

/// Writes `v` as a 24-bit big-endian unsigned number (callers check the range).
fn put_u24(b: &mut BytesMut, v: usize) {
    let bytes = (v as u64).to_be_bytes();
    b.put_slice(&bytes[5..]);
}

// ---------------------------------------------------------------------------
// Audio
// ---------------------------------------------------------------------------

/// AUDIODATA body of an AAC sequence header: `0xAF 0x00` and the MPEG-4
/// AudioSpecificConfig (2 bytes for AAC-LC), as carried in
/// `CodecParams::Aac::asc`.
pub fn aac_sequence_header(asc: &[u8]) -> Bytes {
    aac_body(AAC_SEQUENCE_HEADER, asc)
}

/// AUDIODATA body of one raw AAC frame (no ADTS header): `0xAF 0x01` and the
/// frame. Bodies over [`MAX_BODY_LEN`] are refused by [`tag`] and by RTMP.
pub fn aac_frame(raw: &[u8]) -> Bytes {
    aac_body(AAC_RAW, raw)
}

fn aac_body(packet_type: u8, data: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(2 + data.len());
    b.put_u8(AAC_FLAGS);
    b.put_u8(packet_type);
    b.put_slice(data);
    b.freeze()
}

// ---------------------------------------------------------------------------
// Script data (AMF0)
// ---------------------------------------------------------------------------

/// What `onMetaData` announces. Only the keys that apply are written: video
/// keys with `has_video`, audio keys with `has_audio`, optional ones when known.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metadata {
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub frame_rate: Option<f64>,
    pub video_bitrate_kbps: Option<f64>,
    pub audio_bitrate_kbps: Option<f64>,
    pub audio_sample_rate: Option<u32>,
    pub audio_channels: Option<u8>,
    pub has_video: bool,
    pub has_audio: bool,
}

/// A value of the `onMetaData` ECMA array.
enum Amf {
    Number(f64),
    Bool(bool),
    String(&'static str),
}

const AMF0_NUMBER: u8 = 0x00;
const AMF0_BOOLEAN: u8 = 0x01;
const AMF0_STRING: u8 = 0x02;
const AMF0_ECMA_ARRAY: u8 = 0x08;
const AMF0_OBJECT_END: u8 = 0x09;
const AMF0_LONG_STRING: u8 = 0x0C;

fn amf_number(b: &mut BytesMut, v: f64) {
    b.put_u8(AMF0_NUMBER);
    b.put_f64(v);
}

fn amf_bool(b: &mut BytesMut, v: bool) {
    b.put_u8(AMF0_BOOLEAN);
    b.put_u8(u8::from(v));
}

/// A string value: `string` (16-bit length) or `long-string` (32-bit) when longer.
fn amf_string(b: &mut BytesMut, s: &str) {
    match u16::try_from(s.len()) {
        Ok(len) => {
            b.put_u8(AMF0_STRING);
            b.put_u16(len);
        }
        Err(_) => {
            b.put_u8(AMF0_LONG_STRING);
            b.put_u32(u32::try_from(s.len()).unwrap_or(u32::MAX));
        }
    }
    b.put_slice(s.as_bytes());
}

/// An object or ECMA-array key: `UTF-8` (16-bit length, no type marker).
fn amf_key(b: &mut BytesMut, k: &'static str) {
    // Keys are short literals of this module.
    b.put_u16(k.len() as u16);
    b.put_slice(k.as_bytes());
}

/// SCRIPTDATA body: with `set_data_frame`, the string `@setDataFrame` first
/// (what RTMP publishers send: the server stores the rest as the stream's
/// metadata), then the string `onMetaData` and an ECMA array with `width`,
/// `height`, `framerate`, `videocodecid` 7, `videodatarate` (kbit/s),
/// `audiocodecid` 10, `audiodatarate` (kbit/s), `audiosamplerate`,
/// `audiosamplesize` 16, `stereo` and `encoder` "whipgate" — the ones that
/// apply (see [`Metadata`]). Use `set_data_frame = false` in FLV files.
pub fn on_metadata(m: &Metadata, set_data_frame: bool) -> Bytes {
    let mut entries: Vec<(&'static str, Amf)> = Vec::with_capacity(11);
    if m.has_video {
        if let Some(w) = m.width {
            entries.push(("width", Amf::Number(f64::from(w))));
        }
        if let Some(h) = m.height {
            entries.push(("height", Amf::Number(f64::from(h))));
        }
        if let Some(fps) = m.frame_rate {
            entries.push(("framerate", Amf::Number(fps)));
        }
        entries.push(("videocodecid", Amf::Number(f64::from(VIDEO_CODEC_AVC))));
        if let Some(kbps) = m.video_bitrate_kbps {
            entries.push(("videodatarate", Amf::Number(kbps)));
        }
    }
    if m.has_audio {
        entries.push(("audiocodecid", Amf::Number(f64::from(AUDIO_CODEC_AAC))));
        if let Some(kbps) = m.audio_bitrate_kbps {
            entries.push(("audiodatarate", Amf::Number(kbps)));
        }
        if let Some(rate) = m.audio_sample_rate {
            entries.push(("audiosamplerate", Amf::Number(f64::from(rate))));
        }
        entries.push(("audiosamplesize", Amf::Number(16.0)));
        if let Some(ch) = m.audio_channels {
            entries.push(("stereo", Amf::Bool(ch >= 2)));
        }
    }
    entries.push(("encoder", Amf::String("whipgate")));

    let mut b = BytesMut::with_capacity(64 + entries.len() * 24);
    if set_data_frame {
        amf_string(&mut b, "@setDataFrame");
    }
    amf_string(&mut b, "onMetaData");
    b.put_u8(AMF0_ECMA_ARRAY);
    b.put_u32(entries.len() as u32); // associative-count, a dozen at most
    for (key, value) in &entries {
        amf_key(&mut b, key);
        match value {
            Amf::Number(v) => amf_number(&mut b, *v),
            Amf::Bool(v) => amf_bool(&mut b, *v),
            Amf::String(v) => amf_string(&mut b, v),
        }
    }
    b.put_slice(&[0, 0, AMF0_OBJECT_END]);
    b.freeze()
}

// ---------------------------------------------------------------------------
// FLV files
// ---------------------------------------------------------------------------

/// `TagType` of an FLV tag (also the RTMP message type id of its body).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum TagKind {
    Audio = 8,
    Video = 9,
    Script = 18,
}

/// Size of an FLV tag header.
const TAG_HEADER_LEN: usize = 11;

/// The FLV file header (`FLV`, version 1, audio/video flags, header size 9)
/// followed by `PreviousTagSize0` (0): what comes before the first [`tag`].
pub fn file_header(has_video: bool, has_audio: bool) -> Bytes {
    let flags = (u8::from(has_audio) << 2) | u8::from(has_video);
    let mut b = BytesMut::with_capacity(13);
    b.put_slice(b"FLV");
    b.put_u8(1);
    b.put_u8(flags);
    b.put_u32(9);
    b.put_u32(0);
    b.freeze()
}

/// One FLV tag: the 11-byte header (type, 24-bit size, timestamp as 24 low
/// bits plus the `TimestampExtended` high byte, stream id 0), the body and the
/// `PreviousTagSize` that follows it.
pub fn tag(kind: TagKind, timestamp_ms: u32, body: &[u8]) -> Result<Bytes, FlvError> {
    check_len("tag body", body.len(), MAX_BODY_LEN)?;
    let mut b = BytesMut::with_capacity(TAG_HEADER_LEN + body.len() + 4);
    b.put_u8(kind as u8);
    put_u24(&mut b, body.len());
    let ts = timestamp_ms.to_be_bytes();
    b.put_slice(&ts[1..]); // Timestamp, lower 24 bits
    b.put_u8(ts[0]); // TimestampExtended, upper 8 bits
    b.put_slice(&[0, 0, 0]); // StreamID
    b.put_slice(body);
    b.put_u32((TAG_HEADER_LEN + body.len()) as u32); // ≤ 11 + MAX_BODY_LEN
    Ok(b.freeze())
}

/// An FLV file being written, sans-IO: the header goes in on creation, each
/// [`FlvFile::push`] appends a tag, and [`FlvFile::take`] hands over what was
/// written so far for the caller to store.
#[derive(Debug, Clone)]
pub struct FlvFile {
    pending: BytesMut,
    written: u64,
}

impl FlvFile {
    /// Starts a file with the header announcing the given tracks.
    pub fn new(has_video: bool, has_audio: bool) -> Self {
        let header = file_header(has_video, has_audio);
        FlvFile {
            written: header.len() as u64,
            pending: BytesMut::from(&header[..]),
        }
    }

    /// Appends one tag (see [`tag`]).
    pub fn push(&mut self, kind: TagKind, timestamp_ms: u32, body: &[u8]) -> Result<(), FlvError> {
        let t = tag(kind, timestamp_ms, body)?;
        self.written = self.written.saturating_add(t.len() as u64);
        self.pending.extend_from_slice(&t);
        Ok(())
    }

    /// The bytes not taken yet.
    pub fn take(&mut self) -> Bytes {
        self.pending.split().freeze()
    }

    /// Size of the file so far, taken or not.
    pub fn len(&self) -> u64 {
        self.written
    }

    /// Never true: a file always has its header.
    pub fn is_empty(&self) -> bool {
        self.written == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// x264 (`-profile:v high`, 320x240) SPS and PPS.
    const X264_HIGH_SPS: [u8; 25] = [
        0x67, 0x64, 0x00, 0x0d, 0xac, 0xd9, 0x41, 0x41, 0xfb, 0x01, 0x10, 0x00, 0x00, 0x03, 0x00,
        0x10, 0x00, 0x00, 0x03, 0x03, 0xc0, 0xf1, 0x42, 0x99, 0x60,
    ];
    const X264_HIGH_PPS: [u8; 6] = [0x68, 0xeb, 0xe3, 0xcb, 0x22, 0xc0];
    /// x264 (`-profile:v baseline`, 640x360) SPS and PPS.
    const X264_BASE_SPS: [u8; 25] = [
        0x67, 0x42, 0xc0, 0x1e, 0xd9, 0x00, 0xa0, 0x2f, 0xf9, 0x70, 0x11, 0x00, 0x00, 0x03, 0x00,
        0x01, 0x00, 0x00, 0x03, 0x00, 0x3c, 0x0f, 0x16, 0x2e, 0x48,
    ];
    const X264_BASE_PPS: [u8; 5] = [0x68, 0xcb, 0x83, 0xcb, 0x20];

    fn cat(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    #[test]
    fn avc_sequence_header_high_matches_ffmpeg() {
        // The tag body ffmpeg 5.1's FLV muxer writes for this SPS/PPS: the
        // record of ISO 14496-15 with the High profile extension
        // (chroma_format 1, 8-bit luma and chroma, no SPS extension).
        let expected = cat(&[
            &[0x17, 0x00, 0x00, 0x00, 0x00],
            &[0x01, 0x64, 0x00, 0x0d, 0xff, 0xe1, 0x00, 0x19],
            &X264_HIGH_SPS,
            &[0x01, 0x00, 0x06],
            &X264_HIGH_PPS,
            &[0xfd, 0xf8, 0xf8, 0x00],
        ]);
        let body = avc_sequence_header(&X264_HIGH_SPS, &X264_HIGH_PPS).unwrap();
        assert_eq!(&body[..], &expected[..]);
        assert_eq!(body.len(), 0x33);
        // Start codes in front are tolerated.
        let with_sc = avc_sequence_header(
            &cat(&[&[0, 0, 0, 1], &X264_HIGH_SPS]),
            &cat(&[&[0, 0, 1], &X264_HIGH_PPS]),
        )
        .unwrap();
        assert_eq!(with_sc, body);
    }

    #[test]
    fn avc_sequence_header_baseline_has_no_extension() {
        let expected = cat(&[
            &[0x17, 0x00, 0x00, 0x00, 0x00],
            &[0x01, 0x42, 0xc0, 0x1e, 0xff, 0xe1, 0x00, 0x19],
            &X264_BASE_SPS,
            &[0x01, 0x00, 0x05],
            &X264_BASE_PPS,
        ]);
        let body = avc_sequence_header(&X264_BASE_SPS, &X264_BASE_PPS).unwrap();
        assert_eq!(&body[..], &expected[..]);
        assert_eq!(body.len(), 0x2e);
    }

    #[test]
    fn avc_sequence_header_errors() {
        assert!(matches!(
            avc_sequence_header(&[], &X264_HIGH_PPS),
            Err(FlvError::BadSps(_))
        ));
        assert!(matches!(
            avc_sequence_header(&X264_HIGH_PPS, &X264_HIGH_PPS),
            Err(FlvError::BadSps(H264Error::WrongNalType { .. }))
        ));
        assert!(matches!(
            avc_sequence_header(&X264_HIGH_SPS[..6], &X264_HIGH_PPS),
            Err(FlvError::BadSps(_))
        ));
        assert!(matches!(
            avc_sequence_header(&X264_HIGH_SPS, &[]),
            Err(FlvError::BadPps(_))
        ));
        assert!(matches!(
            avc_sequence_header(&X264_HIGH_SPS, &X264_HIGH_SPS),
            Err(FlvError::BadPps(_))
        ));
        let mut long_pps = vec![0x68; MAX_PARAM_SET_LEN + 1];
        long_pps[1] = 0xff;
        assert!(matches!(
            avc_sequence_header(&X264_HIGH_SPS, &long_pps),
            Err(FlvError::TooLarge { what: "PPS", .. })
        ));
        let e = avc_sequence_header(&X264_HIGH_SPS, &[]).unwrap_err();
        assert!(e.to_string().contains("PPS"));
    }

    #[test]
    fn avc_frame_avcc_and_filtering() {
        let aud = [0x09, 0xf0];
        let sei = [0x06, 0x05, 0x01, 0xaa, 0x80];
        let idr = [0x65, 0x88, 0x84, 0x00, 0x21];
        let filler = [0x0c, 0xff, 0xff, 0x80];
        let au = cat(&[
            &[0, 0, 0, 1],
            &aud,
            &[0, 0, 0, 1],
            &X264_HIGH_SPS,
            &[0, 0, 1],
            &X264_HIGH_PPS,
            &[0, 0, 0, 1],
            &sei,
            &[0, 0, 1],
            &idr,
            &[0, 0, 1],
            &filler,
        ]);
        let body = avc_frame(&au, true, 0).unwrap();
        let expected = cat(&[
            &[0x17, 0x01, 0x00, 0x00, 0x00],
            &[0, 0, 0, 5],
            &sei,
            &[0, 0, 0, 5],
            &idr,
        ]);
        assert_eq!(&body[..], &expected[..]);

        // Inter frame with a positive and a negative composition time.
        let p = [0x41, 0x9a, 0x02, 0x03];
        let au = cat(&[&[0, 0, 0, 1], &aud, &[0, 0, 0, 1], &p]);
        let body = avc_frame(&au, false, 67).unwrap();
        assert_eq!(&body[..9], &[0x27, 0x01, 0x00, 0x00, 0x43, 0, 0, 0, 4]);
        assert_eq!(&body[9..], &p);
        let body = avc_frame(&au, false, -2).unwrap();
        assert_eq!(&body[..5], &[0x27, 0x01, 0xff, 0xff, 0xfe]);
        // Saturated to 24 bits.
        let body = avc_frame(&au, false, i32::MAX).unwrap();
        assert_eq!(&body[2..5], &[0x7f, 0xff, 0xff]);
        let body = avc_frame(&au, false, i32::MIN).unwrap();
        assert_eq!(&body[2..5], &[0x80, 0x00, 0x00]);
        // A bare NAL unit without start code is one unit.
        let body = avc_frame(&p, false, 0).unwrap();
        assert_eq!(&body[5..], &cat(&[&[0, 0, 0, 4], &p])[..]);
    }

    #[test]
    fn avc_frame_errors() {
        assert_eq!(avc_frame(&[], true, 0), Err(FlvError::EmptyAccessUnit));
        assert_eq!(
            avc_frame(&[0, 0, 0, 1, 0x09, 0xf0, 0, 0, 0, 0], true, 0),
            Err(FlvError::EmptyAccessUnit)
        );
        let params = cat(&[&[0, 0, 0, 1], &X264_HIGH_SPS, &[0, 0, 0, 1], &X264_HIGH_PPS]);
        assert_eq!(avc_frame(&params, true, 0), Err(FlvError::EmptyAccessUnit));
        let mut big = vec![0x41; MAX_BODY_LEN];
        big[1] = 0x9a;
        assert!(matches!(
            avc_frame(&big, false, 0),
            Err(FlvError::TooLarge { .. })
        ));
    }

    #[test]
    fn aac_bodies() {
        // AAC-LC, 48 kHz, stereo: object type 2, frequency index 3, channels 2.
        let asc = [0x11, 0x90];
        assert_eq!(&aac_sequence_header(&asc)[..], &[0xaf, 0x00, 0x11, 0x90]);
        assert_eq!(
            &aac_frame(&[0x21, 0x10, 0x05])[..],
            &[0xaf, 0x01, 0x21, 0x10, 0x05]
        );
        assert_eq!(&aac_frame(&[])[..], &[0xaf, 0x01]);
    }

    #[test]
    fn amf0_values() {
        let mut b = BytesMut::new();
        amf_number(&mut b, 320.0);
        assert_eq!(&b[..], &[0x00, 0x40, 0x74, 0, 0, 0, 0, 0, 0]);
        let mut b = BytesMut::new();
        amf_number(&mut b, 29.97);
        assert_eq!(
            &b[..],
            &[0x00, 0x40, 0x3d, 0xf8, 0x51, 0xeb, 0x85, 0x1e, 0xb8]
        );
        let mut b = BytesMut::new();
        amf_bool(&mut b, true);
        amf_bool(&mut b, false);
        assert_eq!(&b[..], &[0x01, 0x01, 0x01, 0x00]);
        let mut b = BytesMut::new();
        amf_string(&mut b, "onMetaData");
        assert_eq!(&b[..3], &[0x02, 0x00, 0x0a]);
        assert_eq!(&b[3..], b"onMetaData");
        let mut b = BytesMut::new();
        amf_string(&mut b, "");
        assert_eq!(&b[..], &[0x02, 0x00, 0x00]);
        let long = "x".repeat(70_000);
        let mut b = BytesMut::new();
        amf_string(&mut b, &long);
        assert_eq!(&b[..5], &[0x0c, 0x00, 0x01, 0x11, 0x70]);
        assert_eq!(b.len(), 5 + 70_000);
        let mut b = BytesMut::new();
        amf_key(&mut b, "width");
        assert_eq!(&b[..], &[0x00, 0x05, b'w', b'i', b'd', b't', b'h']);
    }

    /// Builds the expected ECMA-array entry bytes of a number.
    fn num_entry(key: &str, v: f64) -> Vec<u8> {
        let mut out = (key.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(key.as_bytes());
        out.push(0x00);
        out.extend_from_slice(&v.to_be_bytes());
        out
    }

    #[test]
    fn on_metadata_full() {
        let m = Metadata {
            width: Some(1280),
            height: Some(720),
            frame_rate: Some(30.0),
            video_bitrate_kbps: Some(2500.0),
            audio_bitrate_kbps: Some(128.0),
            audio_sample_rate: Some(48_000),
            audio_channels: Some(2),
            has_video: true,
            has_audio: true,
        };
        let body = on_metadata(&m, true);
        let mut expected = vec![0x02, 0x00, 0x0d];
        expected.extend_from_slice(b"@setDataFrame");
        expected.extend_from_slice(&[0x02, 0x00, 0x0a]);
        expected.extend_from_slice(b"onMetaData");
        expected.extend_from_slice(&[0x08, 0, 0, 0, 11]);
        for (k, v) in [
            ("width", 1280.0),
            ("height", 720.0),
            ("framerate", 30.0),
            ("videocodecid", 7.0),
            ("videodatarate", 2500.0),
            ("audiocodecid", 10.0),
            ("audiodatarate", 128.0),
            ("audiosamplerate", 48_000.0),
            ("audiosamplesize", 16.0),
        ] {
            expected.extend_from_slice(&num_entry(k, v));
        }
        expected.extend_from_slice(&[0x00, 0x06]);
        expected.extend_from_slice(b"stereo");
        expected.extend_from_slice(&[0x01, 0x01]);
        expected.extend_from_slice(&[0x00, 0x07]);
        expected.extend_from_slice(b"encoder");
        expected.extend_from_slice(&[0x02, 0x00, 0x08]);
        expected.extend_from_slice(b"whipgate");
        expected.extend_from_slice(&[0x00, 0x00, 0x09]);
        assert_eq!(&body[..], &expected[..]);

        // Without @setDataFrame: the same from "onMetaData" on.
        let plain = on_metadata(&m, false);
        assert_eq!(&plain[..], &body[16..]);
    }

    #[test]
    fn on_metadata_only_what_applies() {
        // Audio only, mono, nothing optional but the channels.
        let m = Metadata {
            width: Some(640), // ignored without has_video
            audio_channels: Some(1),
            has_audio: true,
            ..Metadata::default()
        };
        let body = on_metadata(&m, false);
        let mut expected = vec![0x02, 0x00, 0x0a];
        expected.extend_from_slice(b"onMetaData");
        expected.extend_from_slice(&[0x08, 0, 0, 0, 4]);
        expected.extend_from_slice(&num_entry("audiocodecid", 10.0));
        expected.extend_from_slice(&num_entry("audiosamplesize", 16.0));
        expected.extend_from_slice(&[0x00, 0x06]);
        expected.extend_from_slice(b"stereo");
        expected.extend_from_slice(&[0x01, 0x00]);
        expected.extend_from_slice(&[0x00, 0x07]);
        expected.extend_from_slice(b"encoder");
        expected.extend_from_slice(&[0x02, 0x00, 0x08]);
        expected.extend_from_slice(b"whipgate");
        expected.extend_from_slice(&[0x00, 0x00, 0x09]);
        assert_eq!(&body[..], &expected[..]);

        // Video only, size unknown.
        let body = on_metadata(
            &Metadata {
                has_video: true,
                ..Metadata::default()
            },
            false,
        );
        assert_eq!(&body[13..18], &[0x08, 0, 0, 0, 2]);
        let body = String::from_utf8_lossy(&body);
        assert!(body.contains("videocodecid") && !body.contains("width"));
        assert!(!body.contains("audio") && !body.contains("stereo"));
    }

    #[test]
    fn file_header_and_tags() {
        assert_eq!(
            &file_header(true, true)[..],
            &[b'F', b'L', b'V', 1, 0x05, 0, 0, 0, 9, 0, 0, 0, 0]
        );
        assert_eq!(file_header(true, false)[4], 0x01);
        assert_eq!(file_header(false, true)[4], 0x04);
        assert_eq!(file_header(false, false)[4], 0x00);

        let t = tag(TagKind::Audio, 1000, &[0xaf, 0x01, 0x42]).unwrap();
        assert_eq!(
            &t[..],
            &[
                8, 0, 0, 3, // type, size
                0x00, 0x03, 0xe8, 0x00, // timestamp 1000, extended 0
                0, 0, 0, // stream id
                0xaf, 0x01, 0x42, // body
                0, 0, 0, 14, // PreviousTagSize
            ]
        );
        // The extended byte carries bits 24..31.
        let t = tag(TagKind::Video, 0x1234_5678, &[]).unwrap();
        assert_eq!(
            &t[..],
            &[9, 0, 0, 0, 0x34, 0x56, 0x78, 0x12, 0, 0, 0, 0, 0, 0, 11]
        );
        let t = tag(TagKind::Script, u32::MAX, &[1]).unwrap();
        assert_eq!(&t[..8], &[18, 0, 0, 1, 0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(
            tag(TagKind::Video, 0, &vec![0; MAX_BODY_LEN + 1]),
            Err(FlvError::TooLarge { .. })
        ));
        let t = tag(TagKind::Video, 0, &vec![0; MAX_BODY_LEN]).unwrap();
        assert_eq!(&t[1..4], &[0xff, 0xff, 0xff]);
        assert_eq!(&t[t.len() - 4..], &(MAX_BODY_LEN as u32 + 11).to_be_bytes());

        let mut f = FlvFile::new(true, false);
        f.push(TagKind::Video, 5, &[1, 2]).unwrap();
        assert_eq!(f.len(), 13 + 11 + 2 + 4);
        let first = f.take();
        assert_eq!(first.len(), 30);
        assert!(f.take().is_empty());
        f.push(TagKind::Video, 6, &[3]).unwrap();
        assert_eq!(f.take().len(), 16);
        assert_eq!(f.len(), 46);
        assert!(!f.is_empty());
    }

    #[test]
    fn timestamps() {
        assert_eq!(timestamp_ms(0), 0);
        assert_eq!(timestamp_ms(89), 0);
        assert_eq!(timestamp_ms(90), 1);
        assert_eq!(timestamp_ms(3000), 33);
        assert_eq!(timestamp_ms(90_000), 1000);
        assert_eq!(timestamp_ms(-1), 0);
        assert_eq!(timestamp_ms(i64::MIN), 0);
        // Wraps after 2^32 ms like RTMP timestamps.
        let wrap = (1i64 << 32) * 90;
        assert_eq!(timestamp_ms(wrap - 90), u32::MAX);
        assert_eq!(timestamp_ms(wrap), 0);
        assert_eq!(timestamp_ms(wrap + 90 * 5), 5);
        let _ = timestamp_ms(i64::MAX);

        assert_eq!(cts_ms(6000, 3000), 33);
        assert_eq!(cts_ms(3000, 3000), 0);
        assert_eq!(cts_ms(3000, 6000), -33);
        assert_eq!(cts_ms(3000, -3000), 33);
        assert_eq!(cts_ms(i64::MAX, i64::MIN), 0x7F_FFFF);
        assert_eq!(cts_ms(i64::MIN, i64::MAX), -0x80_0000);
        // timestamp + cts == presentation time, even across the wrap.
        for (pts, dts) in [(9000, 3000), (wrap + 2000, wrap - 3000), (100, 100)] {
            let ts = timestamp_ms(dts);
            assert_eq!(
                ts.wrapping_add_signed(cts_ms(pts, dts)),
                timestamp_ms(pts),
                "pts {pts} dts {dts}"
            );
        }
    }

    #[test]
    fn hostile_input_never_panics() {
        let mut seed: u32 = 0x1234_5678;
        let mut next = || {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
            seed >> 8
        };
        for round in 0..2000 {
            let len = (next() % 64) as usize;
            let mut data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if round % 3 == 0 && !data.is_empty() {
                data[0] = 0x67; // look like an SPS
            }
            if round % 5 == 0 {
                data.splice(0..0, [0, 0, 1]);
            }
            let _ = avc_sequence_header(&data, &data);
            let _ = avc_sequence_header(&X264_HIGH_SPS[..len.min(25)], &data);
            let _ = avc_frame(&data, round % 2 == 0, next() as i32);
            let _ = tag(TagKind::Video, next(), &data);
        }
        for cut in 0..X264_HIGH_SPS.len() {
            let _ = avc_sequence_header(&X264_HIGH_SPS[..cut], &X264_HIGH_PPS);
        }
    }

    // --- real parts: x264 + ffmpeg AAC into a file ffmpeg decodes -------

    mod real {
        use std::process::Command;

        use super::super::*;
        use crate::media::frame::Frame;
        use crate::media::h264;

        /// Stdout of ffmpeg with these (whitespace-separated) arguments.
        fn ffmpeg(args: &str) -> Option<Vec<u8>> {
            let out = Command::new("ffmpeg")
                .args(["-hide_banner", "-v", "error"])
                .args(args.split_whitespace())
                .output()
                .ok()?;
            (out.status.success() && !out.stdout.is_empty()).then_some(out.stdout)
        }

        /// Hub frames as a WebRTC sender would stamp them (30 fps).
        fn video_frames(stream: &[u8]) -> Vec<Frame> {
            h264::elementary_stream_frames(stream, 3000).unwrap()
        }

        /// Raw AAC frames and the AudioSpecificConfig of an ADTS stream.
        fn strip_adts(mut adts: &[u8]) -> ([u8; 2], u32, u8, Vec<&[u8]>) {
            const RATES: [u32; 13] = [
                96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000,
                7350,
            ];
            let h = &adts[..7];
            let object_type = ((h[2] >> 6) & 0x03) + 1;
            let freq_index = (h[2] >> 2) & 0x0f;
            let channels = ((h[2] & 0x01) << 2) | (h[3] >> 6);
            let asc = (u16::from(object_type) << 11)
                | (u16::from(freq_index) << 7)
                | (u16::from(channels) << 3);
            let mut frames = Vec::new();
            while adts.len() >= 7 {
                assert_eq!((adts[0], adts[1] & 0xf6), (0xff, 0xf0), "ADTS sync");
                let header_len = if adts[1] & 0x01 == 1 { 7 } else { 9 };
                let frame_len = (usize::from(adts[3] & 0x03) << 11)
                    | (usize::from(adts[4]) << 3)
                    | usize::from(adts[5] >> 5);
                assert_eq!(adts[6] & 0x03, 0, "one raw block per ADTS frame");
                frames.push(&adts[header_len..frame_len]);
                adts = &adts[frame_len..];
            }
            assert!(adts.is_empty());
            (
                asc.to_be_bytes(),
                RATES[usize::from(freq_index)],
                channels,
                frames,
            )
        }

        /// ffprobe's CSV output, asserting it succeeds without a word on stderr.
        fn probe(path: &str, args: &[&str]) -> String {
            let out = Command::new("ffprobe")
                .args(["-v", "error"])
                .args(args)
                .args(["-of", "csv=p=0", path])
                .output()
                .unwrap();
            assert!(out.status.success());
            assert!(
                out.stderr.is_empty(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        }

        #[test]
        fn x264_and_aac_flv_decodes_cleanly() {
            let Some(h264) = ffmpeg(
                "-f lavfi -i testsrc2=size=320x240:rate=30 -t 3 -pix_fmt yuv420p \
                 -c:v libx264 -g 30 -bf 2 -x264-params aud=1 -f h264 -",
            ) else {
                eprintln!("ffmpeg missing, skipped");
                return;
            };
            let adts =
                ffmpeg("-f lavfi -i sine=sample_rate=48000 -t 3 -ac 2 -c:a aac -f adts -").unwrap();

            let video = video_frames(&h264);
            assert_eq!(video.len(), 90);
            assert!(video.iter().any(|f| f.pts > f.dts), "expected B-frames");
            let (asc, rate, channels, audio) = strip_adts(&adts);
            assert_eq!((asc, rate, channels), ([0x11, 0x90], 48_000, 2));
            assert!(audio.len() >= 140);

            let (sps, pps) = match &*video[0].params {
                crate::media::frame::CodecParams::H264 { sps, pps, .. } => {
                    (sps.clone(), pps.clone())
                }
                other => panic!("unexpected {other:?}"),
            };
            let mut tags: Vec<(u32, TagKind, Bytes)> = Vec::new();
            for f in &video {
                let body = avc_frame(&f.data, f.key, cts_ms(f.pts, f.dts)).unwrap();
                tags.push((timestamp_ms(f.dts), TagKind::Video, body));
            }
            for (i, raw) in audio.iter().enumerate() {
                let ticks = i as i64 * 1024 * 90_000 / i64::from(rate);
                tags.push((timestamp_ms(ticks), TagKind::Audio, aac_frame(raw)));
            }
            tags.sort_by_key(|(ts, kind, _)| (*ts, *kind as u8));

            let mut file = FlvFile::new(true, true);
            let meta = Metadata {
                width: Some(320),
                height: Some(240),
                frame_rate: Some(30.0),
                audio_sample_rate: Some(rate),
                audio_channels: Some(channels),
                has_video: true,
                has_audio: true,
                ..Metadata::default()
            };
            file.push(TagKind::Script, 0, &on_metadata(&meta, false))
                .unwrap();
            let seq = avc_sequence_header(&sps, &pps).unwrap();
            file.push(TagKind::Video, 0, &seq).unwrap();
            file.push(TagKind::Audio, 0, &aac_sequence_header(&asc))
                .unwrap();
            for (ts, kind, body) in &tags {
                file.push(*kind, *ts, body).unwrap();
            }
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("out.flv");
            std::fs::write(&path, file.take()).unwrap();
            let path = path.to_str().unwrap();

            let streams = probe(
                path,
                &[
                    "-show_entries",
                    "stream=codec_name,width,height,sample_rate,channels",
                ],
            );
            let streams: Vec<&str> = streams.lines().map(str::trim).collect();
            assert!(streams.contains(&"h264,320,240"), "{streams:?}");
            assert!(streams.contains(&"aac,48000,2"), "{streams:?}");
            assert_eq!(streams.len(), 2);

            // Video packets as the demuxer sees them: all there, DTS never
            // going back, PTS >= DTS, keyframes where x264 put them (-g 30).
            let packets = probe(
                path,
                &[
                    "-select_streams",
                    "v",
                    "-show_entries",
                    "packet=pts_time,dts_time,flags",
                ],
            );
            let mut prev_dts = f64::MIN;
            let mut keys = Vec::new();
            let mut last_pts = 0f64;
            let lines: Vec<&str> = packets.lines().collect();
            assert_eq!(lines.len(), 90);
            for (i, line) in lines.iter().enumerate() {
                let fields: Vec<&str> = line.trim().split(',').collect();
                let pts: f64 = fields[0].parse().unwrap();
                let dts: f64 = fields[1].parse().unwrap();
                assert!(dts >= prev_dts && pts >= dts, "packet {i}: {line}");
                prev_dts = dts;
                last_pts = last_pts.max(pts);
                if fields[2].starts_with('K') {
                    keys.push(i);
                }
            }
            assert_eq!(keys, [0, 30, 60]);
            assert!((2.9..3.0).contains(&last_pts), "last video pts {last_pts}");
            let audio_packets = probe(
                path,
                &["-select_streams", "a", "-show_entries", "packet=pts_time"],
            );
            assert_eq!(audio_packets.lines().count(), audio.len());

            let decode = Command::new("ffmpeg")
                .args(["-hide_banner", "-v", "error", "-i", path, "-f", "null", "-"])
                .output()
                .unwrap();
            assert!(decode.status.success());
            assert!(
                decode.stderr.is_empty(),
                "decoder errors: {}",
                String::from_utf8_lossy(&decode.stderr)
            );

            let duration = probe(path, &["-show_entries", "format=duration"]);
            let duration: f64 = duration.trim().parse().unwrap();
            assert!((2.9..=3.2).contains(&duration), "duration {duration}");
        }
    }
}
