//! MPEG-TS muxer (ISO/IEC 13818-1) for HLS segments.
//!
//! One program (number 1, PMT on PID 0x1000) with up to two elementary
//! streams: H264 video on PID 0x100 and AAC (ADTS) audio on PID 0x101. Only
//! the tracks declared at construction appear in the PMT.
//!
//! What the writer does for players (the details that hls.js, Safari and
//! ffmpeg care about):
//! - every H264 access unit starts with an access unit delimiter (NAL 9), and
//!   its NAL units are written back with 4-byte start codes;
//! - IDR access units carry SPS and PPS (taken from [`CodecParams::H264`]
//!   when the access unit lacks them);
//! - AAC frames are wrapped in ADTS headers built from the AudioSpecificConfig;
//! - the PCR rides on the leading track (video if present, else audio), in the
//!   first packet of each of its PES packets, 100 ms behind the DTS;
//! - the random access indicator is set on keyframes;
//! - [`TIMESTAMP_OFFSET`] is added to every PTS/DTS so that the PCR and early
//!   B-frame DTS never go below zero.
//!
//! Only H264 and AAC frames can be written; any other codec is refused with
//! [`TsError::UnsupportedCodec`]. A refused frame writes nothing.

use crate::media::frame::{CLOCK_HZ, Codec, CodecParams, Frame, TrackKind};
use crate::media::h264::{NAL_AUD, NAL_IDR, NAL_PPS, NAL_SPS, nal_type, split_annexb};

/// Size of one transport stream packet.
pub const PACKET_SIZE: usize = 188;
/// PID of the program map table.
pub const PMT_PID: u16 = 0x1000;
/// PID of the H264 elementary stream.
pub const VIDEO_PID: u16 = 0x100;
/// PID of the AAC elementary stream.
pub const AUDIO_PID: u16 = 0x101;
/// Added to every stream timestamp before it is written (1 s), so the PCR
/// (DTS - 100 ms) and DTS slightly below zero stay positive.
pub const TIMESTAMP_OFFSET: i64 = CLOCK_HZ;

const SYNC_BYTE: u8 = 0x47;
const PAT_PID: u16 = 0x0000;
/// The PCR PID of a program without any stream.
const NULL_PID: u16 = 0x1FFF;
const PROGRAM_NUMBER: u16 = 1;
const TRANSPORT_STREAM_ID: u16 = 1;
const STREAM_TYPE_H264: u8 = 0x1B;
const STREAM_TYPE_AAC_ADTS: u8 = 0x0F;
const STREAM_ID_VIDEO: u8 = 0xE0;
const STREAM_ID_AUDIO: u8 = 0xC0;
/// How far the PCR runs behind the DTS of the packet that carries it.
const PCR_LEAD: i64 = CLOCK_HZ / 10;
/// PTS, DTS and the PCR base are 33-bit counters.
const TIMESTAMP_MODULO: i64 = 1 << 33;
/// Payload bytes after the 4-byte packet header.
const PACKET_PAYLOAD: usize = PACKET_SIZE - 4;

/// An AUD with primary_pic_type 7 (any slice type) and its stop bit.
const AUD_NAL: [u8; 2] = [NAL_AUD, 0xF0];
const START_CODE: [u8; 4] = [0, 0, 0, 1];

const ADTS_HEADER_LEN: usize = 7;
/// ADTS frame_length is a 13-bit field that counts the header too.
const ADTS_MAX_FRAME_LEN: usize = (1 << 13) - 1;
const AAC_SAMPLE_RATES: [u32; 13] = [
    96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350,
];

/// Why a frame could not be written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TsError {
    #[error("{0:?} cannot be written to MPEG-TS (only H264 and AAC)")]
    UnsupportedCodec(Codec),
    #[error("a {codec:?} frame was given as a {kind:?} track")]
    KindMismatch { kind: TrackKind, codec: Codec },
    #[error("this stream was declared without a {0:?} track")]
    UndeclaredTrack(TrackKind),
    #[error("H264 access unit without any NAL unit")]
    EmptyAccessUnit,
    #[error("unusable AAC configuration: {0}")]
    InvalidAudioConfig(&'static str),
    #[error("AAC frame of {0} bytes is too large for ADTS")]
    AacFrameTooLarge(usize),
}

/// Sans-IO MPEG-TS writer: appends whole 188-byte packets to a caller's buffer.
#[derive(Debug, Clone)]
pub struct TsMuxer {
    has_video: bool,
    has_audio: bool,
    continuity: Continuity,
}

impl TsMuxer {
    /// A muxer whose PMT lists exactly the tracks that exist.
    pub fn new(has_video: bool, has_audio: bool) -> Self {
        Self {
            has_video,
            has_audio,
            continuity: Continuity::default(),
        }
    }

    /// The PID that carries the PCR: video if present, else audio.
    pub fn pcr_pid(&self) -> u16 {
        if self.has_video {
            VIDEO_PID
        } else if self.has_audio {
            AUDIO_PID
        } else {
            NULL_PID
        }
    }

    /// Appends a PAT and a PMT (one packet each). Call at the start of every
    /// segment so each segment can be decoded on its own.
    pub fn write_tables(&mut self, out: &mut Vec<u8>) {
        let pmt_pid = [0xE0 | (PMT_PID >> 8) as u8, PMT_PID as u8];
        let mut pat = PROGRAM_NUMBER.to_be_bytes().to_vec();
        pat.extend_from_slice(&pmt_pid);
        let cc = self.continuity.next(PAT_PID);
        write_section(out, PAT_PID, cc, 0x00, TRANSPORT_STREAM_ID, &pat);

        let pcr_pid = self.pcr_pid();
        // PCR PID, then program_info_length 0.
        let mut pmt = vec![0xE0 | (pcr_pid >> 8) as u8, pcr_pid as u8, 0xF0, 0x00];
        let streams = [
            (self.has_video, STREAM_TYPE_H264, VIDEO_PID),
            (self.has_audio, STREAM_TYPE_AAC_ADTS, AUDIO_PID),
        ];
        for (_, stream_type, pid) in streams.into_iter().filter(|s| s.0) {
            // stream_type, elementary PID, ES_info_length 0.
            pmt.extend_from_slice(&[stream_type, 0xE0 | (pid >> 8) as u8, pid as u8, 0xF0, 0x00]);
        }
        let cc = self.continuity.next(PMT_PID);
        write_section(out, PMT_PID, cc, 0x02, PROGRAM_NUMBER, &pmt);
    }

    /// Appends one frame as one PES packet. On error nothing is written.
    pub fn write_frame(
        &mut self,
        kind: TrackKind,
        frame: &Frame,
        out: &mut Vec<u8>,
    ) -> Result<(), TsError> {
        let codec = frame.codec();
        if codec.kind() != kind {
            return Err(TsError::KindMismatch { kind, codec });
        }
        let declared = match kind {
            TrackKind::Video => self.has_video,
            TrackKind::Audio => self.has_audio,
        };
        if !declared {
            return Err(TsError::UndeclaredTrack(kind));
        }
        let (pid, pes, random_access) = match &*frame.params {
            CodecParams::H264 { sps, pps, .. } => {
                let (pes, has_idr) = video_pes(frame, sps, pps)?;
                (VIDEO_PID, pes, frame.key || has_idr)
            }
            CodecParams::Aac {
                asc,
                sample_rate,
                channels,
            } => {
                let adts = AdtsConfig::new(asc, *sample_rate, *channels)?;
                (AUDIO_PID, audio_pes(frame, &adts)?, true)
            }
            _ => return Err(TsError::UnsupportedCodec(codec)),
        };
        let pcr = (pid == self.pcr_pid()).then(|| to_ts_clock(frame.dts.wrapping_sub(PCR_LEAD)));
        // Only the first packet of the PES signals anything.
        let fields =
            (random_access || pcr.is_some()).then_some(AdaptationFields { random_access, pcr });
        let mut rest = pes.as_slice();
        let mut unit_start = true;
        while !rest.is_empty() {
            let cc = self.continuity.next(pid);
            let first_fields = fields.as_ref().filter(|_| unit_start);
            let used = write_packet(out, pid, cc, unit_start, first_fields, rest);
            rest = rest.get(used..).unwrap_or_default();
            unit_start = false;
        }
        Ok(())
    }
}

/// Continuity counters, one per PID, each 4 bits.
#[derive(Debug, Clone, Default)]
struct Continuity {
    pat: u8,
    pmt: u8,
    video: u8,
    audio: u8,
}

impl Continuity {
    /// The counter for the next packet with a payload on `pid`.
    fn next(&mut self, pid: u16) -> u8 {
        let counter = match pid {
            PAT_PID => &mut self.pat,
            PMT_PID => &mut self.pmt,
            VIDEO_PID => &mut self.video,
            _ => &mut self.audio,
        };
        let value = *counter;
        *counter = (value + 1) & 0x0F;
        value
    }
}

/// The optional parts of an adaptation field this writer uses.
#[derive(Debug, Clone, Copy)]
struct AdaptationFields {
    random_access: bool,
    /// PCR base in 90 kHz ticks (the 27 MHz extension is always 0).
    pcr: Option<u64>,
}

/// Writes one packet carrying as much of `payload` as fits, stuffing the
/// adaptation field when it does not fill the packet. Returns the payload
/// bytes used.
fn write_packet(
    out: &mut Vec<u8>,
    pid: u16,
    cc: u8,
    unit_start: bool,
    fields: Option<&AdaptationFields>,
    payload: &[u8],
) -> usize {
    let pcr = fields.and_then(|f| f.pcr);
    // Length byte + flags byte + PCR, when there is something to signal.
    let fields_len = match fields {
        None => 0,
        Some(_) => 2 + if pcr.is_some() { 6 } else { 0 },
    };
    let room = PACKET_PAYLOAD - fields_len;
    let used = payload.len().min(room);
    let stuffing = room - used;
    // Whole adaptation field, its length byte included.
    let adaptation_len = fields_len + stuffing;

    let control = if adaptation_len > 0 { 0b11 } else { 0b01 };
    out.push(SYNC_BYTE);
    out.push(u8::from(unit_start) << 6 | ((pid >> 8) as u8 & 0x1F));
    out.push(pid as u8);
    out.push(control << 4 | (cc & 0x0F));
    if adaptation_len > 0 {
        out.push((adaptation_len - 1) as u8);
    }
    if adaptation_len > 1 {
        let random_access = fields.is_some_and(|f| f.random_access);
        out.push(u8::from(random_access) << 6 | u8::from(pcr.is_some()) << 4);
        if let Some(base) = pcr {
            out.extend_from_slice(&[
                (base >> 25) as u8,
                (base >> 17) as u8,
                (base >> 9) as u8,
                (base >> 1) as u8,
                ((base & 1) as u8) << 7 | 0x7E,
                0x00,
            ]);
        }
        let filled = 2 + if pcr.is_some() { 6 } else { 0 };
        out.resize(out.len() + (adaptation_len - filled), 0xFF);
    }
    out.extend_from_slice(&payload[..used]);
    used
}

/// Writes a PSI section (PAT or PMT) in a single packet, with its CRC.
fn write_section(
    out: &mut Vec<u8>,
    pid: u16,
    cc: u8,
    table_id: u8,
    table_id_extension: u16,
    body: &[u8],
) {
    // 5 bytes after section_length up to the body, then the CRC.
    let section_length = 5 + body.len() + 4;
    let mut payload = Vec::with_capacity(PACKET_PAYLOAD);
    payload.push(0x00); // pointer_field
    payload.push(table_id);
    // section_syntax_indicator, '0', reserved, 12-bit length.
    payload.push(0xB0 | ((section_length >> 8) as u8 & 0x0F));
    payload.push(section_length as u8);
    payload.extend_from_slice(&table_id_extension.to_be_bytes());
    payload.push(0xC1); // reserved, version 0, current_next_indicator
    payload.push(0x00); // section_number
    payload.push(0x00); // last_section_number
    payload.extend_from_slice(body);
    let crc = crc32_mpeg2(&payload[1..]);
    payload.extend_from_slice(&crc.to_be_bytes());
    // PSI pads the rest of the packet with 0xFF in the payload itself.
    payload.resize(PACKET_PAYLOAD, 0xFF);
    write_packet(out, pid, cc, true, None, &payload);
}

/// CRC-32/MPEG-2: polynomial 0x04C11DB7, initial value all ones, no reflection.
fn crc32_mpeg2(data: &[u8]) -> u32 {
    let mut crc = u32::MAX;
    for &byte in data {
        crc ^= u32::from(byte) << 24;
        for _ in 0..8 {
            crc = if crc & 0x8000_0000 != 0 {
                (crc << 1) ^ 0x04C1_1DB7
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// A stream timestamp as a 33-bit MPEG clock value, offset by [`TIMESTAMP_OFFSET`].
fn to_ts_clock(ticks: i64) -> u64 {
    ticks
        .wrapping_add(TIMESTAMP_OFFSET)
        .rem_euclid(TIMESTAMP_MODULO) as u64
}

/// Appends a 5-byte PTS or DTS field with its 4-bit prefix and marker bits.
fn push_timestamp(buf: &mut Vec<u8>, prefix: u8, ts: u64) {
    buf.extend_from_slice(&[
        prefix << 4 | ((ts >> 29) as u8 & 0x0E) | 1,
        (ts >> 22) as u8,
        ((ts >> 14) as u8 & 0xFE) | 1,
        (ts >> 7) as u8,
        (ts << 1) as u8 | 1,
    ]);
}

/// Starts a PES packet: header with PTS (and DTS when it differs).
/// `payload_len` is the elementary stream size, or `None` for "unbounded"
/// (allowed for video only).
fn pes_header(stream_id: u8, frame: &Frame, payload_len: Option<usize>) -> Vec<u8> {
    let with_dts = frame.dts != frame.pts;
    let header_data_len: usize = if with_dts { 10 } else { 5 };
    let mut buf = Vec::with_capacity(9 + header_data_len + payload_len.unwrap_or(0));
    buf.extend_from_slice(&[0x00, 0x00, 0x01, stream_id]);
    // Bytes after the length field: 3 header bytes, header data, payload.
    let packet_len = payload_len
        .map(|len| 3 + header_data_len + len)
        .and_then(|len| u16::try_from(len).ok())
        .unwrap_or(0);
    buf.extend_from_slice(&packet_len.to_be_bytes());
    buf.push(0x84); // '10', data_alignment_indicator
    buf.push(if with_dts { 0xC0 } else { 0x80 }); // PTS_DTS_flags
    buf.push(header_data_len as u8);
    if with_dts {
        push_timestamp(&mut buf, 0b0011, to_ts_clock(frame.pts));
        push_timestamp(&mut buf, 0b0001, to_ts_clock(frame.dts));
    } else {
        push_timestamp(&mut buf, 0b0010, to_ts_clock(frame.pts));
    }
    buf
}

/// Builds the PES packet of one H264 access unit: AUD first, SPS and PPS in
/// front of an IDR that lacks them. Also says whether the unit has an IDR.
fn video_pes(frame: &Frame, sps: &[u8], pps: &[u8]) -> Result<(Vec<u8>, bool), TsError> {
    let nals: Vec<&[u8]> = split_annexb(&frame.data).collect();
    let has = |wanted: u8| nals.iter().any(|nal| nal_type(nal) == wanted);
    let has_idr = has(NAL_IDR);
    let add_params = (frame.key || has_idr)
        && !(has(NAL_SPS) && has(NAL_PPS))
        && !sps.is_empty()
        && !pps.is_empty();
    let (aud, rest) = match nals.split_first() {
        None => return Err(TsError::EmptyAccessUnit),
        Some((first, rest)) if nal_type(first) == NAL_AUD => (*first, rest),
        Some(_) => (&AUD_NAL[..], &nals[..]),
    };

    let mut pes = pes_header(STREAM_ID_VIDEO, frame, None);
    pes.reserve(frame.data.len() + sps.len() + pps.len() + 4 * (nals.len() + 3));
    let params: &[&[u8]] = if add_params { &[sps, pps] } else { &[] };
    for nal in std::iter::once(&aud).chain(params).chain(rest) {
        pes.extend_from_slice(&START_CODE);
        pes.extend_from_slice(nal);
    }
    Ok((pes, has_idr))
}

/// Builds the PES packet of one raw AAC frame behind its ADTS header.
fn audio_pes(frame: &Frame, adts: &AdtsConfig) -> Result<Vec<u8>, TsError> {
    let frame_len = ADTS_HEADER_LEN + frame.data.len();
    if frame_len > ADTS_MAX_FRAME_LEN {
        return Err(TsError::AacFrameTooLarge(frame.data.len()));
    }
    let mut pes = pes_header(STREAM_ID_AUDIO, frame, Some(frame_len));
    pes.extend_from_slice(&adts.header(frame_len));
    pes.extend_from_slice(&frame.data);
    Ok(pes)
}

/// What an ADTS header needs from the AudioSpecificConfig.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AdtsConfig {
    /// Audio object type minus one (ADTS can only say 1..=4).
    profile: u8,
    sampling_index: u8,
    channel_config: u8,
}

impl AdtsConfig {
    /// Reads the AudioSpecificConfig (ISO/IEC 14496-3 1.6.2.1). With explicit
    /// SBR/PS signalling the core object type and rate are used, as ADTS wants.
    /// An empty config falls back to AAC-LC with `sample_rate` and `channels`.
    fn new(asc: &[u8], sample_rate: u32, channels: u8) -> Result<Self, TsError> {
        if asc.is_empty() {
            return Ok(Self {
                profile: 1,
                sampling_index: sampling_index(sample_rate)?,
                channel_config: channel_config(channels)?,
            });
        }
        let mut bits = BitReader::new(asc);
        let mut object_type = read_object_type(&mut bits)?;
        // With explicit SBR this first rate is already the core's.
        let index = read_sampling_index(&mut bits)?;
        let channel_bits = bits.read(4)? as u8;
        if object_type == 5 || object_type == 29 {
            // Explicit SBR (and PS): extension rate, then the core object type.
            read_sampling_index(&mut bits)?;
            object_type = read_object_type(&mut bits)?;
        }
        if !(1..=4).contains(&object_type) {
            return Err(TsError::InvalidAudioConfig(
                "audio object type not expressible in ADTS",
            ));
        }
        let channel_config = match channel_bits {
            0 => channel_config(channels)?,
            1..=7 => channel_bits,
            _ => {
                return Err(TsError::InvalidAudioConfig(
                    "reserved channel configuration",
                ));
            }
        };
        Ok(Self {
            profile: object_type as u8 - 1,
            sampling_index: index,
            channel_config,
        })
    }

    /// The 7-byte ADTS header (no CRC) for a frame of `frame_len` bytes,
    /// header included.
    fn header(&self, frame_len: usize) -> [u8; ADTS_HEADER_LEN] {
        let len = frame_len & ADTS_MAX_FRAME_LEN;
        // Sync word, MPEG-4, layer 0, no CRC; profile, rate, private bit,
        // channels, four zero flags; 13-bit length; buffer fullness 0x7FF
        // (VBR); one raw data block.
        [
            0xFF,
            0xF1,
            self.profile << 6 | self.sampling_index << 2 | (self.channel_config >> 2 & 1),
            (self.channel_config & 3) << 6 | (len >> 11) as u8,
            (len >> 3) as u8,
            ((len & 7) as u8) << 5 | 0x1F,
            0xFC,
        ]
    }
}

fn read_object_type(bits: &mut BitReader<'_>) -> Result<u32, TsError> {
    match bits.read(5)? {
        31 => Ok(32 + bits.read(6)?),
        object_type => Ok(object_type),
    }
}

fn read_sampling_index(bits: &mut BitReader<'_>) -> Result<u8, TsError> {
    match bits.read(4)? {
        15 => sampling_index(bits.read(24)?),
        index @ 0..=12 => Ok(index as u8),
        _ => Err(TsError::InvalidAudioConfig("reserved sampling index")),
    }
}

fn sampling_index(sample_rate: u32) -> Result<u8, TsError> {
    AAC_SAMPLE_RATES
        .iter()
        .position(|&rate| rate == sample_rate)
        .map(|index| index as u8)
        .ok_or(TsError::InvalidAudioConfig(
            "sample rate not expressible in ADTS",
        ))
}

fn channel_config(channels: u8) -> Result<u8, TsError> {
    match channels {
        1..=6 => Ok(channels),
        8 => Ok(7),
        _ => Err(TsError::InvalidAudioConfig(
            "channel count not expressible in ADTS",
        )),
    }
}

/// Reads big-endian bit fields.
struct BitReader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> BitReader<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self { data, pos: 0 }
    }

    /// The next `count` (at most 32) bits; an error past the end.
    fn read(&mut self, count: usize) -> Result<u32, TsError> {
        let mut value = 0u32;
        for _ in 0..count {
            let byte = self
                .data
                .get(self.pos / 8)
                .ok_or(TsError::InvalidAudioConfig("AudioSpecificConfig too short"))?;
            let bit = (byte >> (7 - self.pos % 8)) & 1;
            value = value << 1 | u32::from(bit);
            self.pos += 1;
        }
        Ok(value)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use bytes::Bytes;

    use super::*;

    /// One parsed transport packet.
    #[derive(Debug, Clone)]
    pub(crate) struct Packet {
        pub pid: u16,
        pub unit_start: bool,
        pub cc: u8,
        /// Adaptation field after its length byte (flags first), if any.
        pub adaptation: Option<Vec<u8>>,
        pub payload: Vec<u8>,
    }

    impl Packet {
        pub fn random_access(&self) -> bool {
            self.adaptation
                .as_ref()
                .is_some_and(|a| a.first().is_some_and(|f| f & 0x40 != 0))
        }

        pub fn pcr(&self) -> Option<u64> {
            let a = self.adaptation.as_ref()?;
            if a.first()? & 0x10 == 0 {
                return None;
            }
            let b: Vec<u64> = a.get(1..7)?.iter().map(|&x| u64::from(x)).collect();
            Some(b[0] << 25 | b[1] << 17 | b[2] << 9 | b[3] << 1 | b[4] >> 7)
        }
    }

    /// Splits a TS buffer into packets, asserting the basic structure.
    pub(crate) fn parse_packets(ts: &[u8]) -> Vec<Packet> {
        assert_eq!(ts.len() % PACKET_SIZE, 0, "whole packets only");
        ts.chunks(PACKET_SIZE)
            .map(|p| {
                assert_eq!(p[0], SYNC_BYTE);
                let pid = u16::from(p[1] & 0x1F) << 8 | u16::from(p[2]);
                let control = p[3] >> 4 & 3;
                let mut at = 4;
                let adaptation = if control & 2 != 0 {
                    let len = usize::from(p[4]);
                    at = 5 + len;
                    assert!(at <= PACKET_SIZE);
                    Some(p[5..at].to_vec())
                } else {
                    None
                };
                assert!(control & 1 != 0, "every packet here carries a payload");
                Packet {
                    pid,
                    unit_start: p[1] & 0x40 != 0,
                    cc: p[3] & 0x0F,
                    adaptation,
                    payload: p[at..].to_vec(),
                }
            })
            .collect()
    }

    /// One reassembled PES packet.
    #[derive(Debug, Clone)]
    pub(crate) struct Pes {
        pub pid: u16,
        pub pts: u64,
        pub dts: Option<u64>,
        pub random_access: bool,
        pub pcr: Option<u64>,
        pub payload: Vec<u8>,
    }

    pub(crate) fn decode_timestamp(b: &[u8]) -> u64 {
        assert_eq!(b[0] & 1, 1);
        assert_eq!(b[2] & 1, 1);
        assert_eq!(b[4] & 1, 1);
        u64::from(b[0] >> 1 & 7) << 30
            | u64::from(b[1]) << 22
            | u64::from(b[2] >> 1) << 15
            | u64::from(b[3]) << 7
            | u64::from(b[4] >> 1)
    }

    /// Reassembles the PES packets of the elementary stream PIDs, in the
    /// order they start.
    pub(crate) fn parse_pes(ts: &[u8]) -> Vec<Pes> {
        let mut done = Vec::new();
        let mut open: HashMap<u16, (usize, Packet, Vec<u8>)> = HashMap::new();
        let finish = |at: usize, first: Packet, data: Vec<u8>, done: &mut Vec<(usize, Pes)>| {
            assert_eq!(&data[..3], &[0, 0, 1]);
            let declared = usize::from(u16::from_be_bytes([data[4], data[5]]));
            let flags = data[7];
            let header_len = usize::from(data[8]);
            let pts = decode_timestamp(&data[9..14]);
            let dts = (flags & 0x40 != 0).then(|| decode_timestamp(&data[14..19]));
            if declared != 0 {
                assert_eq!(declared, data.len() - 6, "PES_packet_length");
            }
            done.push((
                at,
                Pes {
                    pid: first.pid,
                    pts,
                    dts,
                    random_access: first.random_access(),
                    pcr: first.pcr(),
                    payload: data[9 + header_len..].to_vec(),
                },
            ));
        };
        for (at, packet) in parse_packets(ts).into_iter().enumerate() {
            if packet.pid == PAT_PID || packet.pid == PMT_PID {
                continue;
            }
            if packet.unit_start {
                if let Some((start, first, data)) = open.remove(&packet.pid) {
                    finish(start, first, data, &mut done);
                }
                let data = packet.payload.clone();
                open.insert(packet.pid, (at, packet, data));
            } else if let Some((_, _, data)) = open.get_mut(&packet.pid) {
                data.extend_from_slice(&packet.payload);
            }
        }
        for (start, first, data) in open.into_values() {
            finish(start, first, data, &mut done);
        }
        done.sort_by_key(|(at, _)| *at);
        done.into_iter().map(|(_, pes)| pes).collect()
    }

    pub(crate) fn h264_params() -> Arc<CodecParams> {
        Arc::new(CodecParams::H264 {
            sps: Bytes::from_static(&[0x67, 0x42, 0xC0, 0x1E, 0xD9]),
            pps: Bytes::from_static(&[0x68, 0xCE, 0x3C, 0x80]),
            width: 320,
            height: 240,
        })
    }

    pub(crate) fn aac_params() -> Arc<CodecParams> {
        Arc::new(CodecParams::Aac {
            asc: Bytes::from_static(&[0x11, 0x90]),
            sample_rate: 48000,
            channels: 2,
        })
    }

    pub(crate) fn video_frame(pts: i64, key: bool, params: &Arc<CodecParams>) -> Frame {
        let slice: &[u8] = if key {
            &[0, 0, 0, 1, 0x65, 0x88, 0x84, 0x00, 0x33]
        } else {
            &[0, 0, 1, 0x41, 0x9A, 0x02, 0x04]
        };
        Frame {
            pts,
            dts: pts,
            key,
            data: Bytes::copy_from_slice(slice),
            params: Arc::clone(params),
        }
    }

    pub(crate) fn audio_frame(pts: i64, params: &Arc<CodecParams>) -> Frame {
        Frame {
            pts,
            dts: pts,
            key: true,
            data: Bytes::from_static(&[0x21, 0x10, 0x04, 0x60, 0x8C, 0x1C]),
            params: Arc::clone(params),
        }
    }

    fn mux(muxer: &mut TsMuxer, frames: &[(TrackKind, Frame)]) -> Vec<u8> {
        let mut out = Vec::new();
        muxer.write_tables(&mut out);
        for (kind, frame) in frames {
            muxer.write_frame(*kind, frame, &mut out).expect("frame");
        }
        out
    }

    /// Two seconds of 30 fps video (keyframe each second) and 48 kHz AAC.
    fn av_frames() -> Vec<(TrackKind, Frame)> {
        let (video, audio) = (h264_params(), aac_params());
        let mut frames: Vec<_> = (0..60)
            .map(|i| (TrackKind::Video, video_frame(i * 3000, i % 30 == 0, &video)))
            .chain((0..94).map(|i| (TrackKind::Audio, audio_frame(i * 1920, &audio))))
            .collect();
        frames.sort_by_key(|(_, f)| f.dts);
        frames
    }

    #[test]
    fn packets_are_188_bytes_with_sync_and_continuity_per_pid() {
        let mut muxer = TsMuxer::new(true, true);
        let mut ts = mux(&mut muxer, &av_frames());
        // A second segment's tables continue the table counters.
        muxer.write_tables(&mut ts);
        let packets = parse_packets(&ts);
        let mut last: HashMap<u16, u8> = HashMap::new();
        for p in &packets {
            if let Some(previous) = last.insert(p.pid, p.cc) {
                assert_eq!(p.cc, (previous + 1) % 16, "CC on PID {:#x}", p.pid);
            }
        }
        let pids: Vec<u16> = {
            let mut pids: Vec<u16> = last.keys().copied().collect();
            pids.sort_unstable();
            pids
        };
        assert_eq!(pids, [PAT_PID, VIDEO_PID, AUDIO_PID, PMT_PID]);
    }

    #[test]
    fn tables_list_only_existing_tracks_with_valid_crc() {
        for (has_video, has_audio, streams, pcr_pid) in [
            (
                true,
                true,
                vec![(0x1B, VIDEO_PID), (0x0F, AUDIO_PID)],
                VIDEO_PID,
            ),
            (true, false, vec![(0x1B, VIDEO_PID)], VIDEO_PID),
            (false, true, vec![(0x0F, AUDIO_PID)], AUDIO_PID),
        ] {
            let mut out = Vec::new();
            TsMuxer::new(has_video, has_audio).write_tables(&mut out);
            let packets = parse_packets(&out);
            assert_eq!(packets.len(), 2);
            let (pat, pmt) = (&packets[0], &packets[1]);
            assert_eq!((pat.pid, pmt.pid), (PAT_PID, PMT_PID));
            assert!(pat.unit_start && pmt.unit_start);

            let section = |p: &Packet| {
                assert_eq!(p.payload[0], 0, "pointer_field");
                let len = usize::from(u16::from_be_bytes([p.payload[2], p.payload[3]]) & 0x0FFF);
                let section = p.payload[1..4 + len].to_vec();
                assert_eq!(crc32_mpeg2(&section), 0, "CRC over a section with its CRC");
                assert!(p.payload[4 + len..].iter().all(|&b| b == 0xFF));
                section
            };
            let pat = section(pat);
            assert_eq!(pat[0], 0x00);
            assert_eq!(&pat[8..12], &[0x00, 0x01, 0xF0, 0x00]);
            let pmt = section(pmt);
            assert_eq!(pmt[0], 0x02);
            assert_eq!(u16::from_be_bytes([pmt[8], pmt[9]]) & 0x1FFF, pcr_pid);
            let listed: Vec<(u8, u16)> = pmt[12..pmt.len() - 4]
                .chunks(5)
                .map(|s| (s[0], u16::from_be_bytes([s[1], s[2]]) & 0x1FFF))
                .collect();
            assert_eq!(listed, streams);
        }
    }

    #[test]
    fn pcr_rides_on_every_video_pes_100ms_behind_dts() {
        let pes = parse_pes(&mux(&mut TsMuxer::new(true, true), &av_frames()));
        let video: Vec<&Pes> = pes.iter().filter(|p| p.pid == VIDEO_PID).collect();
        assert_eq!(video.len(), 60);
        assert!(
            pes.iter()
                .filter(|p| p.pid == AUDIO_PID)
                .all(|p| p.pcr.is_none())
        );
        let mut last_pcr = 0;
        for p in video {
            let pcr = p.pcr.expect("PCR on the leading track");
            assert!(pcr > last_pcr, "PCR monotonic");
            assert_eq!(pcr + 9000, p.dts.unwrap_or(p.pts));
            last_pcr = pcr;
        }
        // Audio-only: the PCR moves to audio.
        let audio = aac_params();
        let frames = [(TrackKind::Audio, audio_frame(0, &audio))];
        let pes = parse_pes(&mux(&mut TsMuxer::new(false, true), &frames));
        assert_eq!(pes[0].pcr, Some(81_000));
    }

    #[test]
    fn pts_and_dts_are_encoded_with_offset_and_markers() {
        let mut buf = Vec::new();
        push_timestamp(&mut buf, 0b0010, to_ts_clock(0));
        assert_eq!(buf, [0x21, 0x00, 0x05, 0xBF, 0x21]);
        for ts in [0, 1, 90_000, (1 << 32) + 12345, (1 << 33) - 1] {
            let mut buf = Vec::new();
            push_timestamp(&mut buf, 0b0011, ts);
            assert_eq!(buf[0] >> 4, 0b0011);
            assert_eq!(decode_timestamp(&buf), ts);
        }
        assert_eq!(to_ts_clock(-90_000), 0);
        assert_eq!(to_ts_clock(-90_001), (1 << 33) - 1);

        let video = h264_params();
        let mut frame = video_frame(6000, false, &video);
        frame.dts = 3000;
        let pes = parse_pes(&mux(
            &mut TsMuxer::new(true, false),
            &[(TrackKind::Video, frame)],
        ));
        assert_eq!(pes[0].pts, 96_000);
        assert_eq!(pes[0].dts, Some(93_000));
        // Without B-frames, DTS is left out.
        let frame = video_frame(6000, false, &video);
        let pes = parse_pes(&mux(
            &mut TsMuxer::new(true, false),
            &[(TrackKind::Video, frame)],
        ));
        assert_eq!((pes[0].pts, pes[0].dts), (96_000, None));
    }

    #[test]
    fn adts_header_for_48khz_stereo_aac_lc() {
        let adts = AdtsConfig::new(&[0x11, 0x90], 48000, 2).expect("ASC");
        assert_eq!(
            adts,
            AdtsConfig {
                profile: 1,
                sampling_index: 3,
                channel_config: 2
            }
        );
        assert_eq!(adts.header(17), [0xFF, 0xF1, 0x4C, 0x80, 0x02, 0x3F, 0xFC]);
        assert_eq!(adts.header(8191)[3..6], [0x83, 0xFF, 0xFF]);

        let audio = aac_params();
        let frame = audio_frame(0, &audio);
        let pes = parse_pes(&mux(
            &mut TsMuxer::new(false, true),
            &[(TrackKind::Audio, frame)],
        ));
        assert_eq!(
            pes[0].payload[..7],
            [0xFF, 0xF1, 0x4C, 0x80, 0x01, 0xBF, 0xFC]
        );
        assert_eq!(pes[0].payload[7..], [0x21, 0x10, 0x04, 0x60, 0x8C, 0x1C]);
        assert!(pes[0].random_access);
    }

    #[test]
    fn adts_config_variants() {
        // HE-AAC with explicit SBR: core AAC-LC at 24 kHz, stereo.
        let he = AdtsConfig::new(&[0x2B, 0x11, 0x88], 48000, 2).expect("HE-AAC");
        assert_eq!(
            (he.profile, he.sampling_index, he.channel_config),
            (1, 6, 2)
        );
        // No ASC: AAC-LC from the rate and channel count.
        let bare = AdtsConfig::new(&[], 44100, 1).expect("fallback");
        assert_eq!(
            (bare.profile, bare.sampling_index, bare.channel_config),
            (1, 4, 1)
        );
        // Broken or inexpressible configs are errors, not panics.
        for asc in [&[0x11][..], &[0xF8, 0x00], &[0x17, 0x80], &[0x11, 0xF8]] {
            assert!(AdtsConfig::new(asc, 48000, 2).is_err(), "{asc:02x?}");
        }
        assert!(AdtsConfig::new(&[], 12345, 2).is_err());
    }

    #[test]
    fn h264_gets_aud_and_parameter_sets_on_idr() {
        /// NAL units behind 4-byte start codes.
        fn annex_b(nals: &[&[u8]]) -> Vec<u8> {
            nals.iter()
                .flat_map(|nal| [&START_CODE[..], nal].concat())
                .collect()
        }
        let video = h264_params();
        let (sps, pps): (&[u8], &[u8]) =
            (&[0x67, 0x42, 0xC0, 0x1E, 0xD9], &[0x68, 0xCE, 0x3C, 0x80]);
        let (idr, slice): (&[u8], &[u8]) =
            (&[0x65, 0x88, 0x84, 0x00, 0x33], &[0x41, 0x9A, 0x02, 0x04]);
        let own_aud: &[u8] = &[9, 0x10];

        let key = video_frame(0, true, &video);
        let delta = video_frame(3000, false, &video);
        let mut with_aud = video_frame(6000, true, &video);
        // A 3-byte start code in front of the slice.
        with_aud.data = Bytes::from([&annex_b(&[own_aud])[..], &[0, 0, 1], idr].concat());
        let mut complete = video_frame(9000, true, &video);
        complete.data = Bytes::from(annex_b(&[own_aud, &[0x67, 1], &[0x68, 2], idr]));
        let frames = [key, delta, with_aud, complete.clone()].map(|f| (TrackKind::Video, f));
        let pes = parse_pes(&mux(&mut TsMuxer::new(true, false), &frames));

        let expected = [
            annex_b(&[&AUD_NAL, sps, pps, idr]),
            annex_b(&[&AUD_NAL, slice]),
            annex_b(&[own_aud, sps, pps, idr]),
            complete.data.to_vec(),
        ];
        let payloads: Vec<Vec<u8>> = pes.iter().map(|p| p.payload.clone()).collect();
        assert_eq!(payloads, expected);
        let random_access: Vec<bool> = pes.iter().map(|p| p.random_access).collect();
        assert_eq!(random_access, [true, false, true, true]);
    }

    #[test]
    fn adaptation_field_stuffing_fills_every_size() {
        let fields = AdaptationFields {
            random_access: true,
            pcr: Some(0x1_2345_6789),
        };
        for len in 0..=200 {
            let payload = vec![0xAB; len];
            for with_fields in [false, true] {
                let mut out = Vec::new();
                let f = with_fields.then_some(&fields);
                let used = write_packet(&mut out, VIDEO_PID, 0, true, f, &payload);
                assert_eq!(out.len(), PACKET_SIZE, "len {len}");
                let room = if with_fields { 184 - 8 } else { 184 };
                assert_eq!(used, len.min(room));
                if len == 0 {
                    continue;
                }
                let packet = &parse_packets(&out)[0];
                assert_eq!(packet.payload, payload[..used]);
                if with_fields {
                    assert!(packet.random_access());
                    assert_eq!(packet.pcr(), Some(0x1_2345_6789));
                }
            }
        }
    }

    #[test]
    fn refused_frames_write_nothing() {
        let opus = Arc::new(CodecParams::Opus {
            sample_rate: 48000,
            channels: 2,
        });
        let mut muxer = TsMuxer::new(true, false);
        let mut out = Vec::new();
        let mut empty = video_frame(0, true, &h264_params());
        empty.data = Bytes::from_static(&[0, 0, 1, 0, 0]);
        let mut huge = audio_frame(0, &aac_params());
        huge.data = Bytes::from(vec![0; 9000]);
        let cases = [
            (
                TrackKind::Audio,
                audio_frame(0, &aac_params()),
                TsError::UndeclaredTrack(TrackKind::Audio),
            ),
            (
                TrackKind::Video,
                audio_frame(0, &aac_params()),
                TsError::KindMismatch {
                    kind: TrackKind::Video,
                    codec: Codec::Aac,
                },
            ),
            (TrackKind::Video, empty, TsError::EmptyAccessUnit),
        ];
        for (kind, frame, error) in cases {
            assert_eq!(muxer.write_frame(kind, &frame, &mut out), Err(error));
        }
        let mut audio_muxer = TsMuxer::new(false, true);
        assert_eq!(
            audio_muxer.write_frame(TrackKind::Audio, &audio_frame(0, &opus), &mut out),
            Err(TsError::UnsupportedCodec(Codec::Opus))
        );
        assert_eq!(
            audio_muxer.write_frame(TrackKind::Audio, &huge, &mut out),
            Err(TsError::AacFrameTooLarge(9000))
        );
        assert!(out.is_empty());
    }
}
