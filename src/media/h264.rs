//! H.264 (AVC) elementary stream handling, sans-IO.
//!
//! - Annex B splitting, NAL unit helpers, emulation-prevention removal and an
//!   Exp-Golomb bit reader;
//! - SPS / PPS / slice header parsing (what we need for sizes and picture order);
//! - [`H264Assembler`]: turns the depacketized frames handed over by the WebRTC
//!   stack into access units ready for the hub (codec params, key flag, SPS/PPS in
//!   front of every IDR, no AUD, nothing undecodable);
//! - [`DtsExtractor`]: derives a decode timestamp for streams with B-frames, where
//!   the RTP timestamp is the presentation time and frames arrive in decode order.
//!
//! Nothing here panics on hostile input: every read is bounds-checked and every
//! parse returns a [`H264Error`].

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};

use crate::media::frame::{CLOCK_HZ, CodecParams, Frame};

/// Coded slice of a non-IDR picture.
pub const NAL_SLICE: u8 = 1;
/// Coded slice data partition A.
pub const NAL_SLICE_DPA: u8 = 2;
/// Coded slice of an IDR picture.
pub const NAL_IDR: u8 = 5;
/// Supplemental enhancement information.
pub const NAL_SEI: u8 = 6;
/// Sequence parameter set.
pub const NAL_SPS: u8 = 7;
/// Picture parameter set.
pub const NAL_PPS: u8 = 8;
/// Access unit delimiter.
pub const NAL_AUD: u8 = 9;
/// Filler data.
pub const NAL_FILLER: u8 = 12;

/// Upper bound for a reorder depth, in frames (the DPB never holds more than 16).
const MAX_REORDER: usize = 16;
/// Frame duration assumed until we learn better (30 fps).
const DEFAULT_FRAME_TICKS: i64 = CLOCK_HZ / 30;

/// Errors of the H.264 parsers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum H264Error {
    /// The data ended before the syntax element.
    Truncated,
    /// The NAL unit is not of the expected type.
    WrongNalType { expected: u8, found: u8 },
    /// An Exp-Golomb code longer than 32 bits.
    ExpGolombOverflow,
    /// A syntax element outside the range the standard allows.
    OutOfRange(&'static str),
    /// A slice before any SPS and PPS.
    NoParameterSets,
}

impl fmt::Display for H264Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            H264Error::Truncated => write!(f, "h264: truncated data"),
            H264Error::WrongNalType { expected, found } => {
                write!(f, "h264: expected NAL type {expected}, found {found}")
            }
            H264Error::ExpGolombOverflow => write!(f, "h264: Exp-Golomb code too long"),
            H264Error::OutOfRange(what) => write!(f, "h264: {what} out of range"),
            H264Error::NoParameterSets => write!(f, "h264: a slice before SPS and PPS"),
        }
    }
}

impl std::error::Error for H264Error {}

// ---------------------------------------------------------------------------
// NAL units
// ---------------------------------------------------------------------------

/// `nal_unit_type` of a NAL unit (0 for an empty slice).
pub fn nal_type(nal: &[u8]) -> u8 {
    nal.first().map_or(0, |b| b & 0x1f)
}

/// `nal_ref_idc` of a NAL unit (0 for an empty slice).
pub fn nal_ref_idc(nal: &[u8]) -> u8 {
    nal.first().map_or(0, |b| (b >> 5) & 0x03)
}

/// True for coded slice NAL units (types 1 to 5).
pub fn is_vcl(nal_type: u8) -> bool {
    (NAL_SLICE..=NAL_IDR).contains(&nal_type)
}

/// Iterator over the NAL units of an Annex B buffer; see [`split_annexb`].
#[derive(Debug, Clone)]
pub struct AnnexBIter<'a> {
    data: &'a [u8],
    pos: usize,
}

/// Splits an Annex B byte stream into NAL units, without their start codes.
///
/// Accepts 3- and 4-byte start codes (the extra zero byte and any
/// `trailing_zero_8bits` are trimmed), skips empty units, and yields bytes in
/// front of the first start code as a unit of their own, so a buffer holding a
/// single bare NAL unit comes out whole.
pub fn split_annexb(data: &[u8]) -> AnnexBIter<'_> {
    AnnexBIter { data, pos: 0 }
}

/// Position of the next `00 00 01` at or after `from` (memchr's SIMD
/// substring search: every frame is scanned a few times on its way to the
/// outputs, so this is on the per-byte path).
fn find_start_code(data: &[u8], from: usize) -> Option<usize> {
    let rest = data.get(from..)?;
    START_CODE.find(rest).map(|i| i + from)
}

static START_CODE: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(&[0, 0, 1]));

impl<'a> Iterator for AnnexBIter<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        while self.pos < self.data.len() {
            let (end, next) = match find_start_code(self.data, self.pos) {
                Some(sc) => (sc, sc + 3),
                None => (self.data.len(), self.data.len()),
            };
            let unit = self.data.get(self.pos..end).unwrap_or_default();
            self.pos = next;
            let trimmed_len = unit.len() - unit.iter().rev().take_while(|&&b| b == 0).count();
            let unit = unit.get(..trimmed_len).unwrap_or_default();
            if !unit.is_empty() {
                return Some(unit);
            }
        }
        None
    }
}

/// Splits an Annex B elementary stream whose access units start with an
/// AUD (as x264 with `aud=1` or ffmpeg's `h264_metadata=aud=insert` write
/// them) into access units, each a list of NAL units.
pub fn access_units(stream: &[u8]) -> Vec<Vec<&[u8]>> {
    let mut aus: Vec<Vec<&[u8]>> = Vec::new();
    for nal in split_annexb(stream) {
        if nal_type(nal) == NAL_AUD || aus.is_empty() {
            aus.push(Vec::new());
        }
        if let Some(au) = aus.last_mut() {
            au.push(nal);
        }
    }
    aus
}

/// NAL units joined with 4-byte start codes.
pub fn to_annexb(nals: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(nals.iter().map(|n| n.len() + 4).sum());
    for n in nals {
        out.extend_from_slice(&[0, 0, 0, 1]);
        out.extend_from_slice(n);
    }
    out
}

/// Presentation times of access units (from [`access_units`]) as a sender
/// stamps them, `frame_ticks` per frame: from the picture order count
/// (POC / 2 frames after the last IDR, as x264 and most encoders count), or
/// in decode order for POC type 2. For files and tests: WebRTC brings its
/// own times.
pub fn presentation_times(aus: &[Vec<&[u8]>], frame_ticks: i64) -> Result<Vec<i64>, H264Error> {
    let (mut sps, mut pps) = (None, None);
    let mut poc = PocCounter::new();
    let (mut idr_frame, mut max_frame) = (0i64, -1i64);
    let mut out = Vec::with_capacity(aus.len());
    for au in aus {
        for nal in au {
            match nal_type(nal) {
                NAL_SPS => sps = Some(Sps::parse(nal)?),
                NAL_PPS => pps = Some(Pps::parse(nal)?),
                _ => {}
            }
        }
        let slice = au
            .iter()
            .find(|n| is_vcl(nal_type(n)))
            .ok_or(H264Error::Truncated)?;
        let (Some(s), Some(p)) = (&sps, &pps) else {
            return Err(H264Error::NoParameterSets);
        };
        let header = SliceHeader::parse(slice, s, p)?;
        if header.idr {
            idr_frame = max_frame + 1;
        }
        let frame = match poc.next(s, &header) {
            Some(poc) => idr_frame + poc / 2,
            None => max_frame + 1,
        };
        max_frame = max_frame.max(frame);
        out.push(frame * frame_ticks);
    }
    Ok(out)
}

/// An Annex B elementary stream with AUDs as hub frames, in decode order:
/// times from [`presentation_times`], DTS and parameters from
/// [`H264Assembler`], the code WebRTC ingest runs.
pub fn elementary_stream_frames(stream: &[u8], frame_ticks: i64) -> Result<Vec<Frame>, H264Error> {
    let aus = access_units(stream);
    let pts = presentation_times(&aus, frame_ticks)?;
    let mut assembler = H264Assembler::new();
    Ok(aus
        .iter()
        .zip(pts)
        .filter_map(|(au, pts)| assembler.push(&to_annexb(au), pts, true).frame)
        .collect())
}

/// Removes emulation prevention bytes (`00 00 03` → `00 00`), turning a NAL
/// unit payload into its RBSP.
pub fn unescape_rbsp(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut zeros = 0usize;
    for &b in data {
        if zeros >= 2 && b == 3 {
            zeros = 0;
            continue;
        }
        zeros = if b == 0 { zeros + 1 } else { 0 };
        out.push(b);
    }
    out
}

/// MSB-first bit reader over an RBSP (emulation prevention already removed).
#[derive(Debug, Clone)]
pub struct BitReader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> BitReader<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        BitReader { data, pos: 0 }
    }

    /// Bits not read yet.
    pub fn bits_left(&self) -> usize {
        self.data.len().saturating_mul(8).saturating_sub(self.pos)
    }

    pub fn read_bit(&mut self) -> Result<bool, H264Error> {
        let byte = *self.data.get(self.pos / 8).ok_or(H264Error::Truncated)?;
        let bit = (byte >> (7 - (self.pos % 8))) & 1;
        self.pos += 1;
        Ok(bit == 1)
    }

    /// Reads `n` bits (at most 32) as an unsigned number, `u(n)`.
    pub fn read_bits(&mut self, n: u32) -> Result<u32, H264Error> {
        if n > 32 {
            return Err(H264Error::OutOfRange("bit count"));
        }
        if self.bits_left() < n as usize {
            return Err(H264Error::Truncated);
        }
        let mut v: u64 = 0;
        for _ in 0..n {
            v = (v << 1) | u64::from(self.read_bit()?);
        }
        u32::try_from(v).map_err(|_| H264Error::OutOfRange("bits"))
    }

    pub fn skip_bits(&mut self, n: usize) -> Result<(), H264Error> {
        if self.bits_left() < n {
            return Err(H264Error::Truncated);
        }
        self.pos += n;
        Ok(())
    }

    /// Unsigned Exp-Golomb, `ue(v)`.
    pub fn read_ue(&mut self) -> Result<u32, H264Error> {
        let mut zeros = 0u32;
        while !self.read_bit()? {
            zeros += 1;
            if zeros > 31 {
                return Err(H264Error::ExpGolombOverflow);
            }
        }
        let rest = u64::from(self.read_bits(zeros)?);
        u32::try_from((1u64 << zeros) - 1 + rest).map_err(|_| H264Error::ExpGolombOverflow)
    }

    /// Signed Exp-Golomb, `se(v)`.
    pub fn read_se(&mut self) -> Result<i32, H264Error> {
        let k = i64::from(self.read_ue()?);
        let v = if k % 2 == 1 { (k + 1) / 2 } else { -(k / 2) };
        i32::try_from(v).map_err(|_| H264Error::ExpGolombOverflow)
    }

    /// `ue(v)` that must not exceed `max`.
    fn read_ue_max(&mut self, max: u32, what: &'static str) -> Result<u32, H264Error> {
        let v = self.read_ue()?;
        if v > max {
            return Err(H264Error::OutOfRange(what));
        }
        Ok(v)
    }
}

/// Checks the NAL type and returns the unescaped RBSP after the header byte,
/// at most `limit` payload bytes of it (slice headers need only the front).
fn rbsp_of(nal: &[u8], expected: &[u8], limit: usize) -> Result<Vec<u8>, H264Error> {
    let found = nal_type(nal);
    if nal.is_empty() || !expected.contains(&found) {
        return Err(H264Error::WrongNalType {
            expected: expected.first().copied().unwrap_or(0),
            found,
        });
    }
    let payload = nal.get(1..).unwrap_or_default();
    let payload = payload.get(..limit.min(payload.len())).unwrap_or_default();
    Ok(unescape_rbsp(payload))
}

// ---------------------------------------------------------------------------
// SPS
// ---------------------------------------------------------------------------

/// Timing information of the VUI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VuiTiming {
    pub num_units_in_tick: u32,
    pub time_scale: u32,
    pub fixed_frame_rate: bool,
}

/// The parts of the video usability information we use.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Vui {
    pub timing: Option<VuiTiming>,
    /// From `bitstream_restriction`: frames that can precede any frame in
    /// decode order and follow it in output order.
    pub max_num_reorder_frames: Option<u32>,
    pub max_dec_frame_buffering: Option<u32>,
}

/// A parsed sequence parameter set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sps {
    pub profile_idc: u8,
    /// constraint_set0..5 flags and the two reserved bits, as in the byte stream.
    pub constraint_flags: u8,
    pub level_idc: u8,
    pub id: u32,
    pub chroma_format_idc: u32,
    pub separate_colour_plane: bool,
    pub bit_depth_luma: u32,
    pub bit_depth_chroma: u32,
    pub log2_max_frame_num: u32,
    pub pic_order_cnt_type: u32,
    /// POC type 0 only.
    pub log2_max_pic_order_cnt_lsb: u32,
    /// POC type 1 only.
    pub delta_pic_order_always_zero: bool,
    pub offset_for_non_ref_pic: i32,
    pub offset_for_top_to_bottom_field: i32,
    pub offset_for_ref_frame: Vec<i32>,
    pub max_num_ref_frames: u32,
    pub frame_mbs_only: bool,
    /// Display size, cropping applied.
    pub width: u32,
    pub height: u32,
    /// `None` when absent or unparsable (a broken VUI does not fail the SPS).
    pub vui: Option<Vui>,
}

fn skip_scaling_list(r: &mut BitReader<'_>, size: usize) -> Result<(), H264Error> {
    let mut last: i32 = 8;
    let mut next: i32 = 8;
    for _ in 0..size {
        if next != 0 {
            let delta = r.read_se()?;
            if !(-128..=127).contains(&delta) {
                return Err(H264Error::OutOfRange("delta_scale"));
            }
            next = (last + delta + 256).rem_euclid(256);
        }
        if next != 0 {
            last = next;
        }
    }
    Ok(())
}

fn skip_hrd(r: &mut BitReader<'_>) -> Result<(), H264Error> {
    let cpb_cnt = r.read_ue_max(31, "cpb_cnt_minus1")? + 1;
    r.skip_bits(8)?; // bit_rate_scale, cpb_size_scale
    for _ in 0..cpb_cnt {
        r.read_ue()?; // bit_rate_value_minus1
        r.read_ue()?; // cpb_size_value_minus1
        r.skip_bits(1)?; // cbr_flag
    }
    r.skip_bits(20) // four 5-bit lengths
}

fn parse_vui(r: &mut BitReader<'_>) -> Result<Vui, H264Error> {
    let mut vui = Vui::default();
    if r.read_bit()? {
        // aspect_ratio_info_present_flag
        let idc = r.read_bits(8)?;
        if idc == 255 {
            r.skip_bits(32)?; // sar_width, sar_height
        }
    }
    if r.read_bit()? {
        r.skip_bits(1)?; // overscan_appropriate_flag
    }
    if r.read_bit()? {
        // video_signal_type_present_flag
        r.skip_bits(4)?; // video_format, video_full_range_flag
        if r.read_bit()? {
            r.skip_bits(24)?; // colour primaries, transfer, matrix
        }
    }
    if r.read_bit()? {
        r.read_ue()?; // chroma_sample_loc_type_top_field
        r.read_ue()?; // chroma_sample_loc_type_bottom_field
    }
    if r.read_bit()? {
        vui.timing = Some(VuiTiming {
            num_units_in_tick: r.read_bits(32)?,
            time_scale: r.read_bits(32)?,
            fixed_frame_rate: r.read_bit()?,
        });
    }
    let nal_hrd = r.read_bit()?;
    if nal_hrd {
        skip_hrd(r)?;
    }
    let vcl_hrd = r.read_bit()?;
    if vcl_hrd {
        skip_hrd(r)?;
    }
    if nal_hrd || vcl_hrd {
        r.skip_bits(1)?; // low_delay_hrd_flag
    }
    r.skip_bits(1)?; // pic_struct_present_flag
    if r.read_bit()? {
        // bitstream_restriction_flag
        r.skip_bits(1)?; // motion_vectors_over_pic_boundaries_flag
        r.read_ue()?; // max_bytes_per_pic_denom
        r.read_ue()?; // max_bits_per_mb_denom
        r.read_ue()?; // log2_max_mv_length_horizontal
        r.read_ue()?; // log2_max_mv_length_vertical
        vui.max_num_reorder_frames = Some(r.read_ue()?);
        vui.max_dec_frame_buffering = Some(r.read_ue()?);
    }
    Ok(vui)
}

impl Sps {
    /// Parses an SPS NAL unit (header byte included, no start code).
    pub fn parse(nal: &[u8]) -> Result<Sps, H264Error> {
        let rbsp = rbsp_of(nal, &[NAL_SPS], usize::MAX)?;
        let mut r = BitReader::new(&rbsp);
        let profile_idc = r.read_bits(8)? as u8;
        let constraint_flags = r.read_bits(8)? as u8;
        let level_idc = r.read_bits(8)? as u8;
        let id = r.read_ue_max(31, "seq_parameter_set_id")?;

        let mut chroma_format_idc = 1;
        let mut separate_colour_plane = false;
        let mut bit_depth_luma = 8;
        let mut bit_depth_chroma = 8;
        if matches!(
            profile_idc,
            100 | 110 | 122 | 244 | 44 | 83 | 86 | 118 | 128 | 138 | 139 | 134 | 135
        ) {
            chroma_format_idc = r.read_ue_max(3, "chroma_format_idc")?;
            if chroma_format_idc == 3 {
                separate_colour_plane = r.read_bit()?;
            }
            bit_depth_luma = r.read_ue_max(6, "bit_depth_luma_minus8")? + 8;
            bit_depth_chroma = r.read_ue_max(6, "bit_depth_chroma_minus8")? + 8;
            r.skip_bits(1)?; // qpprime_y_zero_transform_bypass_flag
            if r.read_bit()? {
                // seq_scaling_matrix_present_flag
                let lists = if chroma_format_idc == 3 { 12 } else { 8 };
                for i in 0..lists {
                    if r.read_bit()? {
                        skip_scaling_list(&mut r, if i < 6 { 16 } else { 64 })?;
                    }
                }
            }
        }

        let log2_max_frame_num = r.read_ue_max(12, "log2_max_frame_num_minus4")? + 4;
        let pic_order_cnt_type = r.read_ue_max(2, "pic_order_cnt_type")?;
        let mut log2_max_pic_order_cnt_lsb = 0;
        let mut delta_pic_order_always_zero = false;
        let mut offset_for_non_ref_pic = 0;
        let mut offset_for_top_to_bottom_field = 0;
        let mut offset_for_ref_frame = Vec::new();
        match pic_order_cnt_type {
            0 => {
                log2_max_pic_order_cnt_lsb = r.read_ue_max(12, "log2_max_poc_lsb_minus4")? + 4;
            }
            1 => {
                delta_pic_order_always_zero = r.read_bit()?;
                offset_for_non_ref_pic = r.read_se()?;
                offset_for_top_to_bottom_field = r.read_se()?;
                let n = r.read_ue_max(255, "num_ref_frames_in_pic_order_cnt_cycle")?;
                for _ in 0..n {
                    offset_for_ref_frame.push(r.read_se()?);
                }
            }
            _ => {}
        }
        let max_num_ref_frames = r.read_ue_max(16, "max_num_ref_frames")?;
        r.skip_bits(1)?; // gaps_in_frame_num_value_allowed_flag
        let width_mbs = u64::from(r.read_ue()?) + 1;
        let height_map_units = u64::from(r.read_ue()?) + 1;
        let frame_mbs_only = r.read_bit()?;
        if !frame_mbs_only {
            r.skip_bits(1)?; // mb_adaptive_frame_field_flag
        }
        r.skip_bits(1)?; // direct_8x8_inference_flag
        let (mut crop_l, mut crop_r, mut crop_t, mut crop_b) = (0u64, 0u64, 0u64, 0u64);
        if r.read_bit()? {
            crop_l = u64::from(r.read_ue()?);
            crop_r = u64::from(r.read_ue()?);
            crop_t = u64::from(r.read_ue()?);
            crop_b = u64::from(r.read_ue()?);
        }
        let vui = if r.read_bit()? {
            parse_vui(&mut r).ok()
        } else {
            None
        };

        let field_factor: u64 = if frame_mbs_only { 1 } else { 2 };
        let chroma_array_type = if separate_colour_plane {
            0
        } else {
            chroma_format_idc
        };
        let (crop_unit_x, crop_unit_y) = match chroma_array_type {
            1 => (2, 2 * field_factor),
            2 => (2, field_factor),
            _ => (1, field_factor),
        };
        let full_w = width_mbs * 16;
        let full_h = height_map_units * 16 * field_factor;
        let cut_w = (crop_l + crop_r) * crop_unit_x;
        let cut_h = (crop_t + crop_b) * crop_unit_y;
        if cut_w >= full_w || cut_h >= full_h {
            return Err(H264Error::OutOfRange("frame cropping"));
        }
        let width = u32::try_from(full_w - cut_w).map_err(|_| H264Error::OutOfRange("width"))?;
        let height = u32::try_from(full_h - cut_h).map_err(|_| H264Error::OutOfRange("height"))?;

        Ok(Sps {
            profile_idc,
            constraint_flags,
            level_idc,
            id,
            chroma_format_idc,
            separate_colour_plane,
            bit_depth_luma,
            bit_depth_chroma,
            log2_max_frame_num,
            pic_order_cnt_type,
            log2_max_pic_order_cnt_lsb,
            delta_pic_order_always_zero,
            offset_for_non_ref_pic,
            offset_for_top_to_bottom_field,
            offset_for_ref_frame,
            max_num_ref_frames,
            frame_mbs_only,
            width,
            height,
            vui,
        })
    }

    /// `constraint_set<n>_flag`, n in 0..=5.
    pub fn constraint_set(&self, n: u8) -> bool {
        n <= 5 && self.constraint_flags & (0x80 >> n) != 0
    }

    /// Reorder depth (frames) the stream promises, when it says so: the VUI
    /// `max_num_reorder_frames`, or 0 when the profile or POC type rule out
    /// reordering. `None` means unknown (B-frames possible).
    pub fn reorder_hint(&self) -> Option<usize> {
        if let Some(n) = self.vui.as_ref().and_then(|v| v.max_num_reorder_frames) {
            return Some((n as usize).min(MAX_REORDER));
        }
        let no_b_frames = self.pic_order_cnt_type == 2
            || self.profile_idc == 66
            // constraint_set5: no B slices (Constrained High and friends).
            || (matches!(self.profile_idc, 77 | 88 | 100) && self.constraint_set(5))
            // constraint_set3 on these profiles: intra only.
            || (matches!(self.profile_idc, 44 | 100 | 110 | 122 | 244) && self.constraint_set(3));
        no_b_frames.then_some(0)
    }

    /// Frame duration in 90 kHz ticks from the VUI timing, when present and sane.
    pub fn frame_duration_ticks(&self) -> Option<i64> {
        let t = self.vui.as_ref()?.timing?;
        if t.num_units_in_tick == 0 || t.time_scale == 0 {
            return None;
        }
        // frame rate = time_scale / (2 * num_units_in_tick)
        let ticks = CLOCK_HZ * 2 * i64::from(t.num_units_in_tick) / i64::from(t.time_scale);
        (1..=CLOCK_HZ).contains(&ticks).then_some(ticks)
    }
}

// ---------------------------------------------------------------------------
// PPS and slice header
// ---------------------------------------------------------------------------

/// The front of a picture parameter set (what slice headers need).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pps {
    pub id: u32,
    pub sps_id: u32,
    pub entropy_coding_mode: bool,
    pub bottom_field_pic_order_in_frame_present: bool,
}

impl Pps {
    /// Parses a PPS NAL unit (header byte included, no start code).
    pub fn parse(nal: &[u8]) -> Result<Pps, H264Error> {
        let rbsp = rbsp_of(nal, &[NAL_PPS], 32)?;
        let mut r = BitReader::new(&rbsp);
        Ok(Pps {
            id: r.read_ue_max(255, "pic_parameter_set_id")?,
            sps_id: r.read_ue_max(31, "seq_parameter_set_id")?,
            entropy_coding_mode: r.read_bit()?,
            bottom_field_pic_order_in_frame_present: r.read_bit()?,
        })
    }
}

/// The front of a slice header, up to the picture order count fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SliceHeader {
    pub idr: bool,
    pub nal_ref_idc: u8,
    pub first_mb_in_slice: u32,
    /// 0..=9 (P, B, I, SP, SI; +5 when all slices of the picture share it).
    pub slice_type: u32,
    pub pps_id: u32,
    pub frame_num: u32,
    pub field_pic: bool,
    pub bottom_field: bool,
    pub pic_order_cnt_lsb: u32,
    pub delta_pic_order_cnt_bottom: i32,
    pub delta_pic_order_cnt: [i32; 2],
}

impl SliceHeader {
    /// Reads the slice PPS id only (to pick the PPS before a full parse).
    pub fn pps_id(nal: &[u8]) -> Result<u32, H264Error> {
        let rbsp = rbsp_of(nal, &[NAL_SLICE, NAL_IDR], 16)?;
        let mut r = BitReader::new(&rbsp);
        r.read_ue()?;
        r.read_ue()?;
        r.read_ue_max(255, "pic_parameter_set_id")
    }

    /// Parses the front of a slice header (NAL types 1 and 5).
    pub fn parse(nal: &[u8], sps: &Sps, pps: &Pps) -> Result<SliceHeader, H264Error> {
        let rbsp = rbsp_of(nal, &[NAL_SLICE, NAL_IDR], 64)?;
        let mut r = BitReader::new(&rbsp);
        let idr = nal_type(nal) == NAL_IDR;
        let first_mb_in_slice = r.read_ue()?;
        let slice_type = r.read_ue_max(9, "slice_type")?;
        let pps_id = r.read_ue_max(255, "pic_parameter_set_id")?;
        if sps.separate_colour_plane {
            r.skip_bits(2)?; // colour_plane_id
        }
        let frame_num = r.read_bits(sps.log2_max_frame_num)?;
        let mut field_pic = false;
        let mut bottom_field = false;
        if !sps.frame_mbs_only {
            field_pic = r.read_bit()?;
            if field_pic {
                bottom_field = r.read_bit()?;
            }
        }
        if idr {
            r.read_ue()?; // idr_pic_id
        }
        let mut pic_order_cnt_lsb = 0;
        let mut delta_pic_order_cnt_bottom = 0;
        let mut delta_pic_order_cnt = [0; 2];
        if sps.pic_order_cnt_type == 0 {
            pic_order_cnt_lsb = r.read_bits(sps.log2_max_pic_order_cnt_lsb)?;
            if pps.bottom_field_pic_order_in_frame_present && !field_pic {
                delta_pic_order_cnt_bottom = r.read_se()?;
            }
        }
        if sps.pic_order_cnt_type == 1 && !sps.delta_pic_order_always_zero {
            delta_pic_order_cnt[0] = r.read_se()?;
            if pps.bottom_field_pic_order_in_frame_present && !field_pic {
                delta_pic_order_cnt[1] = r.read_se()?;
            }
        }
        Ok(SliceHeader {
            idr,
            nal_ref_idc: nal_ref_idc(nal),
            first_mb_in_slice,
            slice_type,
            pps_id,
            frame_num,
            field_pic,
            bottom_field,
            pic_order_cnt_lsb,
            delta_pic_order_cnt_bottom,
            delta_pic_order_cnt,
        })
    }
}

/// Picture order count decoding (H.264 8.2.1) for POC types 0 and 1, fed with
/// the first slice of every picture in decode order. Memory management
/// operation 5 is not tracked (rare; the DTS logic tolerates a POC reset).
#[derive(Debug, Clone, Default)]
pub struct PocCounter {
    prev_msb: i64,
    prev_lsb: i64,
    prev_frame_num_offset: i64,
    prev_frame_num: i64,
}

impl PocCounter {
    pub fn new() -> Self {
        Self::default()
    }

    /// POC of the picture, `None` for POC type 2 (output order = decode order).
    pub fn next(&mut self, sps: &Sps, h: &SliceHeader) -> Option<i64> {
        match sps.pic_order_cnt_type {
            0 => Some(self.type0(sps, h)),
            1 => Some(self.type1(sps, h)),
            _ => None,
        }
    }

    fn type0(&mut self, sps: &Sps, h: &SliceHeader) -> i64 {
        if h.idr {
            self.prev_msb = 0;
            self.prev_lsb = 0;
        }
        let max_lsb = 1i64 << sps.log2_max_pic_order_cnt_lsb.min(16);
        let lsb = i64::from(h.pic_order_cnt_lsb);
        let msb = if lsb < self.prev_lsb && self.prev_lsb - lsb >= max_lsb / 2 {
            self.prev_msb + max_lsb
        } else if lsb > self.prev_lsb && lsb - self.prev_lsb > max_lsb / 2 {
            self.prev_msb - max_lsb
        } else {
            self.prev_msb
        };
        if h.nal_ref_idc != 0 {
            self.prev_msb = msb;
            self.prev_lsb = lsb;
        }
        let top = msb + lsb;
        if h.field_pic {
            // A field's POC is the one of its parity; bottom fields carry it in lsb.
            top
        } else {
            top.min(top + i64::from(h.delta_pic_order_cnt_bottom))
        }
    }

    fn type1(&mut self, sps: &Sps, h: &SliceHeader) -> i64 {
        let max_frame_num = 1i64 << sps.log2_max_frame_num.min(16);
        let frame_num = i64::from(h.frame_num);
        let frame_num_offset = if h.idr {
            0
        } else if self.prev_frame_num > frame_num {
            self.prev_frame_num_offset.saturating_add(max_frame_num)
        } else {
            self.prev_frame_num_offset
        };
        self.prev_frame_num_offset = frame_num_offset;
        self.prev_frame_num = frame_num;

        let cycle = &sps.offset_for_ref_frame;
        let n = cycle.len() as i64;
        let mut abs_frame_num = if n != 0 {
            frame_num_offset.saturating_add(frame_num)
        } else {
            0
        };
        if h.nal_ref_idc == 0 && abs_frame_num > 0 {
            abs_frame_num -= 1;
        }
        let mut expected: i64 = 0;
        if abs_frame_num > 0 {
            let cycle_cnt = (abs_frame_num - 1) / n;
            let in_cycle = ((abs_frame_num - 1) % n) as usize;
            let per_cycle: i64 = cycle.iter().map(|&o| i64::from(o)).sum();
            let partial: i64 = cycle.iter().take(in_cycle + 1).map(|&o| i64::from(o)).sum();
            expected = cycle_cnt.saturating_mul(per_cycle).saturating_add(partial);
        }
        if h.nal_ref_idc == 0 {
            expected = expected.saturating_add(i64::from(sps.offset_for_non_ref_pic));
        }
        let t2b = i64::from(sps.offset_for_top_to_bottom_field);
        let d0 = i64::from(h.delta_pic_order_cnt[0]);
        let d1 = i64::from(h.delta_pic_order_cnt[1]);
        if !h.field_pic {
            let top = expected.saturating_add(d0);
            let bottom = top.saturating_add(t2b).saturating_add(d1);
            top.min(bottom)
        } else if !h.bottom_field {
            expected.saturating_add(d0)
        } else {
            expected.saturating_add(t2b).saturating_add(d0)
        }
    }
}

// ---------------------------------------------------------------------------
// DTS
// ---------------------------------------------------------------------------

/// Counters of the DTS extractor.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DtsStats {
    /// DTS raised to keep it strictly increasing (and >= 0). The first
    /// frames of a B-frame stream starting at PTS 0 land here by design.
    pub dts_clamped: u64,
    /// PTS raised to the DTS because the frame came later than any reorder
    /// depth allowed (broken stream, or the depth was learned too late).
    pub pts_raised: u64,
    /// Times the reorder depth had to grow after the first frame.
    pub reorder_grown: u64,
}

/// Derives decode timestamps for a stream whose frames arrive in decode order
/// carrying presentation timestamps (RTP), with B-frames or without.
///
/// Model: a decoder that holds `D` frames before output (D = reorder depth)
/// outputs, when decoding frame `i`, the earliest PTS among the frames decoded
/// and not yet output. That output time is a valid DTS for frame `i`: it is
/// `<=` the frame's own PTS and increases when the stream respects `D`. We
/// keep the pending PTS in a min-heap: push, then pop once more than `D` are
/// pending. With `D = 0` this is exactly `DTS = PTS`.
///
/// `D` comes from the SPS ([`Sps::reorder_hint`]: VUI `max_num_reorder_frames`,
/// or 0 for profiles / POC type 2 that exclude reordering), and grows when the
/// picture order counts show reordering: a frame whose POC jumps over
/// not-yet-seen POC values tells us, before any B-frame arrives, how many
/// decoded frames the missing ones will have to wait behind. As a last resort a
/// frame arriving with a PTS below the DTS already given out grows `D` too.
///
/// Guarantees, whatever the input: DTS >= 0, strictly increasing, and
/// DTS <= PTS (the PTS is raised and counted in the impossible case).
#[derive(Debug, Clone)]
pub struct DtsExtractor {
    reorder: usize,
    pending: BinaryHeap<Reverse<i64>>,
    prev_dts: Option<i64>,
    /// No pop happened since the start or the last reset.
    fresh: bool,
    frame_ticks: i64,
    frame_ticks_hinted: bool,
    last_pts: Option<i64>,
    max_pts: Option<i64>,
    pocs: PocWindow,
    stats: DtsStats,
}

impl Default for DtsExtractor {
    fn default() -> Self {
        Self::new()
    }
}

impl DtsExtractor {
    pub fn new() -> Self {
        DtsExtractor {
            reorder: 0,
            pending: BinaryHeap::new(),
            prev_dts: None,
            fresh: true,
            frame_ticks: DEFAULT_FRAME_TICKS,
            frame_ticks_hinted: false,
            last_pts: None,
            max_pts: None,
            pocs: PocWindow::default(),
            stats: DtsStats::default(),
        }
    }

    /// Current reorder depth in frames.
    pub fn reorder(&self) -> usize {
        self.reorder
    }

    pub fn stats(&self) -> DtsStats {
        self.stats
    }

    /// Applies a new SPS's promise (call when the SPS changes, i.e. at an IDR).
    /// `Some(d)` sets the depth (dropping pending entries beyond it), `None`
    /// keeps what was learned.
    pub fn set_reorder_hint(&mut self, hint: Option<usize>) {
        if let Some(d) = hint {
            self.reorder = d.min(MAX_REORDER);
            while self.pending.len() > self.reorder {
                self.pending.pop();
            }
        }
    }

    /// Frame duration used to space the DTS of the first frames.
    pub fn set_frame_duration_hint(&mut self, ticks: Option<i64>) {
        if let Some(t) = ticks.filter(|t| (1..=CLOCK_HZ).contains(t)) {
            self.frame_ticks = t;
            self.frame_ticks_hinted = true;
        }
    }

    /// Forgets the frames in flight, after a gap: the next frame (an IDR)
    /// starts over as at the beginning, DTS still never goes back.
    pub fn reset(&mut self) {
        self.pending.clear();
        self.fresh = true;
        self.pocs = PocWindow::default();
        self.last_pts = None;
    }

    /// Next frame in decode order: its PTS and, when known, its picture order
    /// count and whether it is an IDR. Returns `(pts, dts)`; the PTS is the one
    /// given unless it had to be raised (see [`DtsStats::pts_raised`]).
    pub fn push(&mut self, pts: i64, poc: Option<(i64, bool)>) -> (i64, i64) {
        if let Some((poc, idr)) = poc {
            let need = self.pocs.observe(poc, idr).min(MAX_REORDER);
            if need > self.reorder {
                if self.prev_dts.is_some() {
                    self.stats.reorder_grown += 1;
                }
                self.reorder = need;
            }
        }
        if let Some(last) = self.last_pts {
            let step = pts.saturating_sub(last).saturating_abs();
            if !self.frame_ticks_hinted && (1..self.frame_ticks).contains(&step) {
                self.frame_ticks = step;
            }
        }
        self.last_pts = Some(pts);

        self.pending.push(Reverse(pts));
        let candidate = if self.pending.len() > self.reorder {
            self.fresh = false;
            self.pending.pop().map_or(pts, |Reverse(p)| p)
        } else if self.fresh {
            // Start: space the first frames one frame apart before the earliest PTS.
            let earliest = self.pending.peek().map_or(pts, |Reverse(p)| *p);
            let ahead = (self.reorder + 1 - self.pending.len()) as i64;
            earliest.saturating_sub(ahead.saturating_mul(self.frame_ticks))
        } else {
            // The depth grew: squeeze in just after the previous DTS.
            self.prev_dts.map_or(pts, |d| d.saturating_add(1))
        };

        let floor = self.prev_dts.map_or(0, |d| d.saturating_add(1)).max(0);
        let mut dts = candidate;
        if dts < floor {
            dts = floor;
            self.stats.dts_clamped += 1;
        }
        let mut pts = pts;
        if dts > pts {
            self.stats.pts_raised += 1;
            if self.max_pts.is_some_and(|m| pts < m) && self.reorder < MAX_REORDER {
                // A frame presented before one already decoded: more reordering
                // than we allowed for.
                self.reorder += 1;
                self.stats.reorder_grown += 1;
            }
            pts = dts;
        }
        self.max_pts = Some(self.max_pts.map_or(pts, |m| m.max(pts)));
        self.prev_dts = Some(dts);
        (pts, dts)
    }
}

/// POC values seen since the last IDR, to infer the reorder depth.
#[derive(Debug, Clone, Default)]
struct PocWindow {
    /// Sorted.
    pocs: Vec<i64>,
    base: i64,
    /// POC increment per frame: 2 unless an odd distance shows up.
    odd: bool,
}

const POC_WINDOW: usize = 128;

impl PocWindow {
    /// Adds a picture; returns the reorder depth it proves necessary.
    fn observe(&mut self, poc: i64, idr: bool) -> usize {
        if idr || self.pocs.is_empty() || poc < self.base {
            // New period (IDR, first picture, or a POC reset we did not parse).
            self.pocs.clear();
            self.base = poc;
        }
        if poc.wrapping_sub(self.base).rem_euclid(2) == 1 {
            self.odd = true;
        }
        if self.pocs.len() >= POC_WINDOW {
            self.pocs.remove(0);
            self.base = self.pocs.first().copied().unwrap_or(poc);
        }
        // Pictures already decoded that come after this one in output order.
        let greater = self.pocs.len() - self.pocs.partition_point(|&p| p <= poc);
        if let Err(at) = self.pocs.binary_search(&poc) {
            self.pocs.insert(at, poc);
        }
        // The earliest POC slot not seen yet below the largest: that picture
        // will be decoded later and wait behind every decoded one after it.
        let step = if self.odd { 1 } else { 2 };
        let mut expected = self.base;
        for &p in &self.pocs {
            if p == expected {
                expected = expected.saturating_add(step);
            } else if p > expected {
                break;
            }
        }
        let missing = match self.pocs.last() {
            Some(&max) if expected < max => {
                self.pocs.len() - self.pocs.partition_point(|&p| p <= expected)
            }
            _ => 0,
        };
        greater.max(missing)
    }
}

// ---------------------------------------------------------------------------
// Access unit assembly
// ---------------------------------------------------------------------------

/// Counters of the assembler.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AssemblerStats {
    pub frames_out: u64,
    pub keyframes_out: u64,
    /// Frames dropped while waiting for an IDR (start, gap, missing SPS/PPS).
    pub dropped_waiting_idr: u64,
    /// Inputs without any slice (SPS/PPS-only frames, SEI-only, empty).
    pub absorbed: u64,
    /// SPS or PPS that failed to parse (ignored).
    pub bad_param_sets: u64,
    /// Gaps (`contiguous == false`) that forced a wait for the next IDR.
    pub gaps: u64,
    pub dts: DtsStats,
}

/// Result of [`H264Assembler::push`].
#[derive(Debug, Clone, Default)]
pub struct Pushed {
    /// The access unit, when this input completed a decodable one.
    pub frame: Option<Frame>,
    /// The assembler is dropping input until an IDR comes (stream start, gap,
    /// missing SPS/PPS): the caller should ask for a keyframe (PLI/FIR). Stays
    /// true for every dropped frame; the caller rate-limits the requests.
    pub need_keyframe: bool,
}

struct ParamSet<T> {
    bytes: Bytes,
    parsed: T,
}

/// Turns depacketized H.264 frames (one access unit per RTP timestamp, Annex
/// B) into hub frames.
///
/// Per input frame, in arrival (decode) order, call [`H264Assembler::push`]
/// with the Annex B bytes, the frame's PTS on the stream timeline (90 kHz) and
/// the `contiguous` flag from the depacketizer. The output frame:
/// - carries `Arc<CodecParams::H264>` of the latest SPS/PPS, a new `Arc` only
///   when their bytes change;
/// - is `key` when it holds an IDR slice, and then starts with SPS and PPS
///   (inserted when the publisher sent them in an earlier frame, as OBS does);
/// - has no AUD (the TS muxer writes its own) nor filler data;
/// - has a DTS from [`DtsExtractor`] (`== pts` without B-frames).
///
/// Nothing is output before the first IDR with SPS and PPS known, nor after a
/// gap until the next IDR; meanwhile [`Pushed::need_keyframe`] is set.
/// Frames holding only SPS/PPS (or SEI) update the state and output nothing.
/// Only one SPS and one PPS are tracked (the latest of each).
pub struct H264Assembler {
    sps: Option<ParamSet<Sps>>,
    pps: Option<ParamSet<Pps>>,
    params: Option<Arc<CodecParams>>,
    synced: bool,
    poc: PocCounter,
    dts: DtsExtractor,
    stats: AssemblerStats,
}

impl Default for H264Assembler {
    fn default() -> Self {
        Self::new()
    }
}

impl H264Assembler {
    pub fn new() -> Self {
        H264Assembler {
            sps: None,
            pps: None,
            params: None,
            synced: false,
            poc: PocCounter::new(),
            dts: DtsExtractor::new(),
            stats: AssemblerStats::default(),
        }
    }

    /// Latest codec parameters, once both SPS and PPS were seen.
    pub fn params(&self) -> Option<&Arc<CodecParams>> {
        self.params.as_ref()
    }

    /// Latest parsed SPS.
    pub fn sps(&self) -> Option<&Sps> {
        self.sps.as_ref().map(|s| &s.parsed)
    }

    pub fn stats(&self) -> AssemblerStats {
        AssemblerStats {
            dts: self.dts.stats(),
            ..self.stats
        }
    }

    /// True while waiting for an IDR.
    pub fn need_keyframe(&self) -> bool {
        !self.synced
    }

    /// Feeds one depacketized frame; see the type's documentation.
    pub fn push(&mut self, annexb: &[u8], pts: i64, contiguous: bool) -> Pushed {
        let mut has_vcl = false;
        let mut key = false;
        let mut first_vcl: Option<&[u8]> = None;
        let mut has_sps = false;
        let mut has_pps = false;
        let mut params_changed = false;
        for nal in split_annexb(annexb) {
            match nal_type(nal) {
                NAL_SPS => {
                    has_sps = true;
                    params_changed |= self.update_sps(nal);
                }
                NAL_PPS => {
                    has_pps = true;
                    params_changed |= self.update_pps(nal);
                }
                t if is_vcl(t) => {
                    has_vcl = true;
                    key |= t == NAL_IDR;
                    if first_vcl.is_none() && (t == NAL_SLICE || t == NAL_IDR) {
                        first_vcl = Some(nal);
                    }
                }
                _ => {}
            }
        }
        if params_changed {
            self.rebuild_params();
        }

        if !contiguous && self.synced {
            self.synced = false;
            self.stats.gaps += 1;
            self.dts.reset();
        }
        if !has_vcl {
            self.stats.absorbed += 1;
            return Pushed {
                frame: None,
                need_keyframe: !self.synced,
            };
        }
        let Some(params) = self.params.clone() else {
            self.stats.dropped_waiting_idr += 1;
            return Pushed {
                frame: None,
                need_keyframe: true,
            };
        };
        if !self.synced {
            if !key {
                self.stats.dropped_waiting_idr += 1;
                return Pushed {
                    frame: None,
                    need_keyframe: true,
                };
            }
            self.synced = true;
        }

        let poc = first_vcl.and_then(|nal| self.picture_order(nal));
        let (pts, dts) = self.dts.push(pts, poc.map(|p| (p, key)));
        let data = self.build_au(annexb, key, has_sps, has_pps);
        self.stats.frames_out += 1;
        if key {
            self.stats.keyframes_out += 1;
        }
        Pushed {
            frame: Some(Frame {
                pts,
                dts,
                key,
                data,
                params,
            }),
            need_keyframe: false,
        }
    }

    /// Stores a new SPS; true when the stored bytes changed.
    fn update_sps(&mut self, nal: &[u8]) -> bool {
        if self.sps.as_ref().is_some_and(|s| s.bytes == nal) {
            return false;
        }
        match Sps::parse(nal) {
            Ok(parsed) => {
                self.dts.set_reorder_hint(parsed.reorder_hint());
                self.dts
                    .set_frame_duration_hint(parsed.frame_duration_ticks());
                self.sps = Some(ParamSet {
                    bytes: Bytes::copy_from_slice(nal),
                    parsed,
                });
                true
            }
            Err(_) => {
                self.stats.bad_param_sets += 1;
                false
            }
        }
    }

    /// Stores a new PPS; true when the stored bytes changed.
    fn update_pps(&mut self, nal: &[u8]) -> bool {
        if self.pps.as_ref().is_some_and(|p| p.bytes == nal) {
            return false;
        }
        match Pps::parse(nal) {
            Ok(parsed) => {
                self.pps = Some(ParamSet {
                    bytes: Bytes::copy_from_slice(nal),
                    parsed,
                });
                true
            }
            Err(_) => {
                self.stats.bad_param_sets += 1;
                false
            }
        }
    }

    fn rebuild_params(&mut self) {
        if let (Some(sps), Some(pps)) = (&self.sps, &self.pps) {
            self.params = Some(Arc::new(CodecParams::H264 {
                sps: sps.bytes.clone(),
                pps: pps.bytes.clone(),
                width: sps.parsed.width,
                height: sps.parsed.height,
            }));
        }
    }

    /// POC of the picture whose first slice is `nal`, when computable.
    fn picture_order(&mut self, nal: &[u8]) -> Option<i64> {
        let sps = &self.sps.as_ref()?.parsed;
        let pps = &self.pps.as_ref()?.parsed;
        if pps.sps_id != sps.id || SliceHeader::pps_id(nal).ok()? != pps.id {
            return None;
        }
        let header = SliceHeader::parse(nal, sps, pps).ok()?;
        self.poc.next(sps, &header)
    }

    /// The access unit as it goes on the hub: 4-byte start codes, no AUD or
    /// filler, SPS then PPS first when it is an IDR.
    fn build_au(&self, annexb: &[u8], key: bool, has_sps: bool, has_pps: bool) -> Bytes {
        const START: [u8; 4] = [0, 0, 0, 1];
        let mut out = BytesMut::with_capacity(annexb.len() + 64);
        if key {
            let inserted_sps = (!has_sps).then(|| self.sps.as_ref().map(|s| &s.bytes[..]));
            let inserted_pps = (!has_pps).then(|| self.pps.as_ref().map(|p| &p.bytes[..]));
            let sps_list = split_annexb(annexb)
                .filter(|n| nal_type(n) == NAL_SPS)
                .chain(inserted_sps.flatten());
            for nal in sps_list {
                out.put_slice(&START);
                out.put_slice(nal);
            }
            let pps_list = split_annexb(annexb)
                .filter(|n| nal_type(n) == NAL_PPS)
                .chain(inserted_pps.flatten());
            for nal in pps_list {
                out.put_slice(&START);
                out.put_slice(nal);
            }
        }
        for nal in split_annexb(annexb) {
            let t = nal_type(nal);
            let skip = t == NAL_AUD || t == NAL_FILLER || (key && (t == NAL_SPS || t == NAL_PPS));
            if !skip {
                out.put_slice(&START);
                out.put_slice(nal);
            }
        }
        out.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes bits MSB first, for hand-made parameter sets.
    #[derive(Default)]
    struct BitWriter {
        bytes: Vec<u8>,
        bits: usize,
    }

    impl BitWriter {
        fn bit(&mut self, b: bool) {
            if self.bits & 7 == 0 {
                self.bytes.push(0);
            }
            if b {
                let last = self.bytes.len() - 1;
                self.bytes[last] |= 0x80 >> (self.bits % 8);
            }
            self.bits += 1;
        }
        fn bits(&mut self, n: u32, v: u64) {
            for i in (0..n).rev() {
                self.bit((v >> i) & 1 == 1);
            }
        }
        fn ue(&mut self, v: u32) {
            let x = u64::from(v) + 1;
            let len = 64 - x.leading_zeros();
            self.bits(len - 1, 0);
            self.bits(len, x);
        }
        fn se(&mut self, v: i32) {
            let v = i64::from(v);
            let k = if v > 0 { 2 * v - 1 } else { -2 * v };
            self.ue(k as u32);
        }
        /// rbsp_trailing_bits, then emulation prevention.
        fn finish_nal(mut self, header: u8) -> Vec<u8> {
            self.bit(true);
            while self.bits & 7 != 0 {
                self.bit(false);
            }
            let mut out = vec![header];
            let mut zeros = 0;
            for b in self.bytes {
                if zeros >= 2 && b <= 3 {
                    out.push(3);
                    zeros = 0;
                }
                zeros = if b == 0 { zeros + 1 } else { 0 };
                out.push(b);
            }
            out
        }
    }

    struct SpsSpec {
        profile: u8,
        constraints: u8,
        width_mbs: u32,
        height_mbs: u32,
        crop: Option<[u32; 4]>,
        poc_type: u32,
        frame_mbs_only: bool,
        chroma_format_idc: u32,
        scaling: bool,
        reorder: Option<u32>,
    }

    impl Default for SpsSpec {
        fn default() -> Self {
            SpsSpec {
                profile: 66,
                constraints: 0xc0,
                width_mbs: 80,
                height_mbs: 45,
                crop: None,
                poc_type: 2,
                frame_mbs_only: true,
                chroma_format_idc: 1,
                scaling: false,
                reorder: None,
            }
        }
    }

    fn make_sps(s: &SpsSpec) -> Vec<u8> {
        let mut w = BitWriter::default();
        w.bits(8, u64::from(s.profile));
        w.bits(8, u64::from(s.constraints));
        w.bits(8, 31);
        w.ue(0); // sps id
        if s.profile >= 100 {
            w.ue(s.chroma_format_idc);
            if s.chroma_format_idc == 3 {
                w.bit(false);
            }
            w.ue(0);
            w.ue(0);
            w.bit(false);
            w.bit(s.scaling);
            if s.scaling {
                let lists = if s.chroma_format_idc == 3 { 12 } else { 8 };
                for i in 0..lists {
                    let present = i % 2 == 0;
                    w.bit(present);
                    if present {
                        let size = if i < 6 { 16 } else { 64 };
                        for j in 0..size {
                            w.se(if j == 0 { 8 } else { 1 });
                        }
                    }
                }
            }
        }
        w.ue(0); // log2_max_frame_num_minus4
        w.ue(s.poc_type);
        match s.poc_type {
            0 => w.ue(2),
            1 => {
                w.bit(false);
                w.se(-1);
                w.se(0);
                w.ue(2);
                w.se(2);
                w.se(4);
            }
            _ => {}
        }
        w.ue(4); // max_num_ref_frames
        w.bit(false);
        w.ue(s.width_mbs - 1);
        let map_units = if s.frame_mbs_only {
            s.height_mbs
        } else {
            s.height_mbs / 2
        };
        w.ue(map_units - 1);
        w.bit(s.frame_mbs_only);
        if !s.frame_mbs_only {
            w.bit(true);
        }
        w.bit(true);
        match s.crop {
            Some(c) => {
                w.bit(true);
                for v in c {
                    w.ue(v);
                }
            }
            None => w.bit(false),
        }
        match s.reorder {
            Some(n) => {
                w.bit(true); // vui
                w.bit(false); // aspect
                w.bit(false); // overscan
                w.bit(false); // video signal
                w.bit(false); // chroma loc
                w.bit(true); // timing
                w.bits(32, 1);
                w.bits(32, 60);
                w.bit(true);
                w.bit(false); // nal hrd
                w.bit(false); // vcl hrd
                w.bit(false); // pic struct
                w.bit(true); // bitstream restriction
                w.bit(true);
                w.ue(2);
                w.ue(1);
                w.ue(16);
                w.ue(16);
                w.ue(n);
                w.ue(n + 1);
            }
            None => w.bit(false),
        }
        w.finish_nal(0x67)
    }

    fn make_pps() -> Vec<u8> {
        let mut w = BitWriter::default();
        w.ue(0);
        w.ue(0);
        w.bit(false);
        w.bit(false);
        w.ue(0);
        w.finish_nal(0x68)
    }

    /// A slice header for the SPS from `make_sps` (log2_max_frame_num 4,
    /// log2_max_poc_lsb 6), followed by some payload.
    fn make_slice(
        idr: bool,
        slice_type: u32,
        frame_num: u32,
        poc_lsb: u32,
        ref_idc: u8,
    ) -> Vec<u8> {
        let mut w = BitWriter::default();
        w.ue(0);
        w.ue(slice_type);
        w.ue(0);
        w.bits(4, u64::from(frame_num));
        if idr {
            w.ue(0);
        }
        w.bits(6, u64::from(poc_lsb));
        w.bits(16, 0xabcd);
        let t = if idr { NAL_IDR } else { NAL_SLICE };
        w.finish_nal((ref_idc << 5) | t)
    }

    const AUD: [u8; 2] = [0x09, 0xf0];

    #[test]
    fn split_start_codes() {
        let data = [
            0, 0, 0, 1, 0x67, 1, 2, 0, 0, 1, 0x68, 3, 0, 0, 0, 0, 1, 0x65, 0, 0, 4, 0,
        ];
        let nals: Vec<&[u8]> = split_annexb(&data).collect();
        assert_eq!(nals, vec![&[0x67, 1, 2][..], &[0x68, 3], &[0x65, 0, 0, 4]]);
        assert_eq!(nal_type(nals[2]), NAL_IDR);
        assert_eq!(nal_ref_idc(nals[2]), 3);
        // A bare NAL unit without start code comes out whole.
        let bare: Vec<&[u8]> = split_annexb(&[0x41, 9, 9]).collect();
        assert_eq!(bare, vec![&[0x41, 9, 9][..]]);
        // Only start codes / zeros: nothing.
        assert_eq!(split_annexb(&[0, 0, 1, 0, 0, 0, 1]).count(), 0);
        assert_eq!(split_annexb(&[]).count(), 0);
        assert_eq!(split_annexb(&[0, 0]).count(), 0);
    }

    #[test]
    fn start_code_scan_matches_a_plain_search() {
        // Bytes drawn from {0, 1, 2, 0x65} so start codes are frequent.
        let mut x = 0x2545_f491_u32;
        for len in 0..400 {
            let data: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    [0, 0, 1, 2, 0x65][(x % 5) as usize]
                })
                .collect();
            for from in 0..len.min(8) {
                let plain = data[from..]
                    .windows(3)
                    .position(|w| w == [0, 0, 1])
                    .map(|i| i + from);
                assert_eq!(find_start_code(&data, from), plain, "{data:?} from {from}");
            }
        }
        assert_eq!(find_start_code(&[0, 0, 1], 5), None);
    }

    #[test]
    fn emulation_prevention() {
        assert_eq!(
            unescape_rbsp(&[0, 0, 3, 1, 0, 0, 3, 0, 0, 3]),
            vec![0, 0, 1, 0, 0, 0, 0]
        );
        assert_eq!(unescape_rbsp(&[1, 0, 3, 0, 0, 3]), vec![1, 0, 3, 0, 0]);
    }

    #[test]
    fn exp_golomb() {
        // 1 | 010 | 011 | 00100 | 00101 | 0000000 1 0000000
        let mut w = BitWriter::default();
        for v in [0u32, 1, 2, 3, 4, 255, u32::MAX - 1] {
            w.ue(v);
        }
        for v in [0i32, 1, -1, 7, -8, i32::MAX, -i32::MAX] {
            w.se(v);
        }
        let bytes = w.bytes;
        let mut r = BitReader::new(&bytes);
        for v in [0u32, 1, 2, 3, 4, 255, u32::MAX - 1] {
            assert_eq!(r.read_ue().unwrap(), v);
        }
        for v in [0i32, 1, -1, 7, -8, i32::MAX, -i32::MAX] {
            assert_eq!(r.read_se().unwrap(), v);
        }
        assert_eq!(
            BitReader::new(&[0, 0, 0, 0, 0xff]).read_ue(),
            Err(H264Error::ExpGolombOverflow)
        );
        assert_eq!(BitReader::new(&[0x00]).read_ue(), Err(H264Error::Truncated));
        let mut r = BitReader::new(&[0xa5]);
        assert_eq!(r.read_bits(3).unwrap(), 0b101);
        assert_eq!(r.read_bits(5).unwrap(), 0b00101);
        assert_eq!(r.read_bits(1), Err(H264Error::Truncated));
        assert!(r.read_bits(33).is_err());
    }

    #[test]
    fn sps_720p_baseline() {
        // Chrome-like constrained baseline 1280x720.
        let nal = make_sps(&SpsSpec::default());
        let sps = Sps::parse(&nal).unwrap();
        assert_eq!(
            (sps.profile_idc, sps.constraint_flags, sps.level_idc),
            (66, 0xc0, 31)
        );
        assert_eq!((sps.width, sps.height), (1280, 720));
        assert_eq!(sps.pic_order_cnt_type, 2);
        assert_eq!(sps.reorder_hint(), Some(0));
        assert!(sps.vui.is_none());
    }

    #[test]
    fn sps_1080p_cropped_high_with_scaling_lists() {
        let nal = make_sps(&SpsSpec {
            profile: 100,
            constraints: 0,
            width_mbs: 120,
            height_mbs: 68,
            crop: Some([0, 0, 0, 4]),
            poc_type: 0,
            scaling: true,
            reorder: Some(2),
            ..SpsSpec::default()
        });
        let sps = Sps::parse(&nal).unwrap();
        assert_eq!((sps.width, sps.height), (1920, 1080));
        assert_eq!(sps.profile_idc, 100);
        assert_eq!(sps.log2_max_pic_order_cnt_lsb, 6);
        let vui = sps.vui.clone().unwrap();
        assert_eq!(vui.max_num_reorder_frames, Some(2));
        assert_eq!(sps.reorder_hint(), Some(2));
        assert_eq!(sps.frame_duration_ticks(), Some(3000));
    }

    #[test]
    fn sps_interlaced_422_and_444() {
        // Field coding: map units are field MB rows, crop unit doubles.
        let nal = make_sps(&SpsSpec {
            profile: 122,
            chroma_format_idc: 2,
            width_mbs: 45,
            height_mbs: 36,
            frame_mbs_only: false,
            crop: Some([0, 0, 0, 0]),
            ..SpsSpec::default()
        });
        let sps = Sps::parse(&nal).unwrap();
        assert_eq!((sps.width, sps.height), (720, 576));
        assert!(!sps.frame_mbs_only);
        assert_eq!(sps.reorder_hint(), Some(0)); // poc type 2

        let nal = make_sps(&SpsSpec {
            profile: 244,
            chroma_format_idc: 3,
            width_mbs: 20,
            height_mbs: 10,
            crop: Some([1, 1, 1, 1]),
            poc_type: 1,
            scaling: true,
            ..SpsSpec::default()
        });
        let sps = Sps::parse(&nal).unwrap();
        assert_eq!((sps.width, sps.height), (318, 158));
        assert_eq!(sps.offset_for_ref_frame, vec![2, 4]);
        assert_eq!(sps.offset_for_non_ref_pic, -1);
        assert_eq!(sps.reorder_hint(), None);
    }

    #[test]
    fn sps_real_bytes() {
        // x264 high profile 640x360 (height cropped from 368), VUI with
        // bitstream restriction; emulation prevention in the middle.
        let nal = [
            0x67, 0x64, 0x00, 0x1e, 0xac, 0xd9, 0x40, 0xa0, 0x2f, 0xf9, 0x70, 0x11, 0x00, 0x00,
            0x03, 0x00, 0x01, 0x00, 0x00, 0x03, 0x00, 0x3c, 0x0f, 0x16, 0x2d, 0x96,
        ];
        let sps = Sps::parse(&nal).unwrap();
        assert_eq!((sps.width, sps.height), (640, 360));
        assert_eq!((sps.profile_idc, sps.level_idc), (100, 30));
        assert_eq!(sps.frame_duration_ticks(), Some(3000));
    }

    #[test]
    fn sps_hostile_input_never_panics() {
        let good = make_sps(&SpsSpec {
            profile: 100,
            scaling: true,
            reorder: Some(1),
            crop: Some([1, 2, 3, 4]),
            ..SpsSpec::default()
        });
        for cut in 0..good.len() {
            let _ = Sps::parse(&good[..cut]);
        }
        let mut seed: u32 = 12345;
        for _ in 0..20_000 {
            let len = (seed % 40) as usize;
            let mut buf = vec![0x67];
            for _ in 0..len {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                buf.push((seed >> 16) as u8);
            }
            let _ = Sps::parse(&buf);
            buf[0] = 0x68;
            let _ = Pps::parse(&buf);
            buf[0] = 0x65;
            if let Ok(sps) = Sps::parse(&good) {
                let pps = Pps {
                    id: 0,
                    sps_id: 0,
                    entropy_coding_mode: false,
                    bottom_field_pic_order_in_frame_present: true,
                };
                if let Ok(h) = SliceHeader::parse(&buf, &sps, &pps) {
                    let _ = PocCounter::new().next(&sps, &h);
                }
            }
            let mut asm = H264Assembler::new();
            let _ = asm.push(&buf, i64::from(seed), (seed >> 7) & 3 != 0);
        }
        assert_eq!(
            Sps::parse(&[]),
            Err(H264Error::WrongNalType {
                expected: 7,
                found: 0
            })
        );
        // Cropping larger than the picture.
        let bad = make_sps(&SpsSpec {
            crop: Some([400, 400, 0, 0]),
            ..SpsSpec::default()
        });
        assert_eq!(
            Sps::parse(&bad),
            Err(H264Error::OutOfRange("frame cropping"))
        );
    }

    #[test]
    fn poc_type0_wraps_lsb() {
        let sps = Sps::parse(&make_sps(&SpsSpec {
            profile: 77,
            constraints: 0,
            poc_type: 0,
            ..SpsSpec::default()
        }))
        .unwrap();
        let pps = Pps::parse(&make_pps()).unwrap();
        let mut poc = PocCounter::new();
        let mut out = Vec::new();
        // lsb is 6 bits (max 64): 0, 20, 40, 60, then wraps: 10 -> 74, 30 -> 94.
        for (idr, lsb) in [
            (true, 0),
            (false, 20),
            (false, 40),
            (false, 60),
            (false, 10),
            (false, 30),
        ] {
            let nal = make_slice(idr, 5, 0, lsb, 2);
            let h = SliceHeader::parse(&nal, &sps, &pps).unwrap();
            out.push(poc.next(&sps, &h).unwrap());
        }
        assert_eq!(out, vec![0, 20, 40, 60, 74, 94]);
        // Backwards (a B-frame), then a jump of more than half the range,
        // read as going back too, per the standard.
        let h = SliceHeader::parse(&make_slice(false, 6, 0, 4, 0), &sps, &pps).unwrap();
        assert_eq!(poc.next(&sps, &h), Some(68));
        let h = SliceHeader::parse(&make_slice(false, 5, 0, 63, 2), &sps, &pps).unwrap();
        assert_eq!(poc.next(&sps, &h), Some(63));
    }

    #[test]
    fn poc_type1() {
        let sps = Sps::parse(&make_sps(&SpsSpec {
            profile: 77,
            constraints: 0,
            poc_type: 1,
            ..SpsSpec::default()
        }))
        .unwrap();
        let pps = Pps::parse(&make_pps()).unwrap();
        let mut poc = PocCounter::new();
        let mut w = BitWriter::default();
        w.ue(0);
        w.ue(7);
        w.ue(0);
        w.bits(4, 0);
        w.ue(0);
        w.se(0);
        let idr = w.finish_nal(0x65);
        let h = SliceHeader::parse(&idr, &sps, &pps).unwrap();
        assert_eq!(poc.next(&sps, &h), Some(0));
        // frame_num 1, reference: expected = offsets[0] = 2.
        let mut w = BitWriter::default();
        w.ue(0);
        w.ue(5);
        w.ue(0);
        w.bits(4, 1);
        w.se(0);
        let p = w.finish_nal(0x41);
        let h = SliceHeader::parse(&p, &sps, &pps).unwrap();
        assert_eq!(poc.next(&sps, &h), Some(2));
        // frame_num 2, non-reference: abs 1 -> 2, then -1 = 1.
        let mut w = BitWriter::default();
        w.ue(0);
        w.ue(6);
        w.ue(0);
        w.bits(4, 2);
        w.se(0);
        let b = w.finish_nal(0x01);
        let h = SliceHeader::parse(&b, &sps, &pps).unwrap();
        assert_eq!(poc.next(&sps, &h), Some(1));
    }

    #[test]
    fn dts_equals_pts_without_reordering() {
        let mut d = DtsExtractor::new();
        d.set_reorder_hint(Some(0));
        for i in 0..100 {
            let pts = 1000 + i * 3000 + (i % 3) * 7; // jittery but increasing
            assert_eq!(d.push(pts, None), (pts, pts));
        }
        assert_eq!(d.stats(), DtsStats::default());
    }

    #[test]
    fn dts_with_hinted_reorder() {
        // I0 P3 B1 B2 P6 B4 B5 ... in 3000-tick frames, D = 1.
        let order = [0, 3, 1, 2, 6, 4, 5, 9, 7, 8];
        let mut d = DtsExtractor::new();
        d.set_reorder_hint(Some(1));
        let start = 90_000;
        let mut prev = i64::MIN;
        let mut dts_all = Vec::new();
        for f in order {
            let pts = start + f * 3000;
            let (p, dts) = d.push(pts, None);
            assert_eq!(p, pts);
            assert!(dts <= pts && dts > prev);
            prev = dts;
            dts_all.push(dts);
        }
        assert_eq!(
            dts_all,
            (0..10).map(|i| start + (i - 1) * 3000).collect::<Vec<_>>()
        );
        assert_eq!(d.stats(), DtsStats::default());
    }

    #[test]
    fn dts_learns_reorder_from_poc() {
        // No hint: the P frame's POC jump (0 -> 6) reveals the missing B's.
        let order = [0, 3, 1, 2, 6, 4, 5, 9, 7, 8];
        let mut d = DtsExtractor::new();
        let mut prev = -1;
        for (i, f) in order.into_iter().enumerate() {
            let pts = f * 3000;
            let (p, dts) = d.push(pts, Some((f * 2, i == 0)));
            assert_eq!(p, pts, "frame {i}");
            assert!(dts <= pts && dts > prev);
            prev = dts;
        }
        assert_eq!(d.reorder(), 1);
        assert_eq!(d.stats().pts_raised, 0);
    }

    #[test]
    fn dts_survives_lies() {
        // Hint says 0 but B-frames come, no POC: PTS raised at most once per
        // surprise, DTS stays strictly increasing and <= PTS.
        let order = [0, 3, 1, 2, 6, 4, 5, 9, 7, 8, 8, 8, -5];
        let mut d = DtsExtractor::new();
        d.set_reorder_hint(Some(0));
        let mut prev = -1;
        for f in order {
            let (p, dts) = d.push(f * 3000, None);
            assert!(dts <= p && dts > prev && dts >= 0);
            prev = dts;
        }
        assert!(d.stats().pts_raised >= 1);
        assert!(d.reorder() >= 1);
        // Extreme values do not overflow.
        let mut d = DtsExtractor::new();
        d.set_reorder_hint(Some(3));
        for pts in [i64::MAX, i64::MIN, 0, i64::MAX - 1, i64::MIN + 1, 7] {
            let (p, dts) = d.push(pts, Some((pts, pts == 0)));
            assert!(dts <= p);
        }
    }

    #[test]
    fn assembler_obs_style_param_sets_and_gaps() {
        let sps = make_sps(&SpsSpec::default());
        let pps = make_pps();
        let idr = make_slice(true, 7, 0, 0, 3);
        let p1 = make_slice(false, 5, 1, 0, 2);
        let mut asm = H264Assembler::new();

        // A P frame before anything: dropped, wants a keyframe.
        let out = asm.push(&to_annexb(&[&AUD, &p1]), 0, true);
        assert!(out.frame.is_none() && out.need_keyframe);

        // OBS: SPS/PPS alone, then the IDR with the same timestamp.
        let out = asm.push(&to_annexb(&[&sps, &pps]), 3000, true);
        assert!(out.frame.is_none());
        let params = asm.params().unwrap().clone();
        match &*params {
            CodecParams::H264 {
                width,
                height,
                sps: s,
                pps: p,
            } => {
                assert_eq!((*width, *height), (1280, 720));
                assert_eq!((&s[..], &p[..]), (&sps[..], &pps[..]));
            }
            other => panic!("unexpected {other:?}"),
        }
        let out = asm.push(&to_annexb(&[&AUD, &idr]), 3000, true);
        let f = out.frame.unwrap();
        assert!(f.key && !out.need_keyframe);
        assert_eq!((f.pts, f.dts), (3000, 3000));
        assert_eq!(&f.data[..], &to_annexb(&[&sps, &pps, &idr])[..]);
        assert!(Arc::ptr_eq(&f.params, &params));

        // P frame: AUD dropped, same params Arc.
        let f = asm
            .push(&to_annexb(&[&AUD, &p1]), 6000, true)
            .frame
            .unwrap();
        assert!(!f.key);
        assert_eq!(&f.data[..], &to_annexb(&[&p1])[..]);
        assert!(Arc::ptr_eq(&f.params, &params));

        // Gap: dropped until the next IDR.
        let out = asm.push(&to_annexb(&[&p1]), 9000, false);
        assert!(out.frame.is_none() && out.need_keyframe);
        let out = asm.push(&to_annexb(&[&p1]), 12000, true);
        assert!(out.frame.is_none() && out.need_keyframe);
        // IDR carrying SPS but not PPS: PPS inserted after the SPS.
        let sei = [0x06, 0x05, 0x01, 0xaa, 0x80];
        let f = asm
            .push(&to_annexb(&[&sei, &sps, &idr]), 15000, true)
            .frame
            .unwrap();
        assert!(f.key);
        assert_eq!(&f.data[..], &to_annexb(&[&sps, &pps, &sei, &idr])[..]);
        assert!(Arc::ptr_eq(&f.params, &params));

        // New SPS (resolution change): new Arc.
        let sps2 = make_sps(&SpsSpec {
            width_mbs: 40,
            height_mbs: 23,
            crop: Some([0, 0, 0, 4]),
            ..SpsSpec::default()
        });
        let f = asm
            .push(&to_annexb(&[&sps2, &pps, &idr]), 18000, true)
            .frame
            .unwrap();
        assert!(!Arc::ptr_eq(&f.params, &params));
        match &*f.params {
            CodecParams::H264 { width, height, .. } => assert_eq!((*width, *height), (640, 360)),
            other => panic!("unexpected {other:?}"),
        }
        let s = asm.stats();
        assert_eq!((s.frames_out, s.keyframes_out, s.gaps), (4, 3, 1));
        assert_eq!(s.dropped_waiting_idr, 3);
    }

    #[test]
    fn assembler_multi_slice_and_gap_on_idr() {
        let sps = make_sps(&SpsSpec::default());
        let pps = make_pps();
        let idr = make_slice(true, 7, 0, 0, 3);
        let p1 = make_slice(false, 5, 1, 0, 2);
        let mut asm = H264Assembler::new();
        // Two slices per picture, 3-byte start codes, filler dropped.
        let mut au = vec![0, 0, 1];
        for nal in [&sps[..], &pps, &idr, &idr, &[0x0c, 0xff, 0xff, 0x80]] {
            au.extend_from_slice(nal);
            au.extend_from_slice(&[0, 0, 1]);
        }
        let f = asm.push(&au, 0, false).frame.unwrap();
        assert!(f.key);
        assert_eq!(&f.data[..], &to_annexb(&[&sps, &pps, &idr, &idr])[..]);
        // A gap right before an IDR: the IDR itself is output.
        asm.push(&to_annexb(&[&p1, &p1]), 3000, true).frame.unwrap();
        let f = asm.push(&to_annexb(&[&idr]), 6000, false).frame.unwrap();
        assert!(f.key && f.dts == 6000);
        assert_eq!(&f.data[..], &to_annexb(&[&sps, &pps, &idr])[..]);
        assert_eq!(asm.stats().gaps, 1);
    }

    #[test]
    fn assembler_needs_param_sets_before_idr() {
        let idr = make_slice(true, 7, 0, 0, 3);
        let mut asm = H264Assembler::new();
        let out = asm.push(&to_annexb(&[&idr]), 0, true);
        assert!(out.frame.is_none() && out.need_keyframe);
        // Broken SPS is counted and ignored.
        let out = asm.push(&to_annexb(&[&[0x67, 0x42][..], &make_pps(), &idr]), 0, true);
        assert!(out.frame.is_none() && out.need_keyframe);
        assert_eq!(asm.stats().bad_param_sets, 1);
    }

    // --- real encoder output --------------------------------------------

    /// Encodes 2 s of test pattern with x264; `None` when ffmpeg is missing.
    fn x264(profile: &str, bframes: u32) -> Option<Vec<u8>> {
        let out = std::process::Command::new("ffmpeg")
            .args(["-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i"])
            .arg("testsrc=size=640x360:rate=30")
            .args(["-t", "2", "-pix_fmt", "yuv420p", "-c:v", "libx264"])
            .args(["-profile:v", profile, "-bf", &bframes.to_string()])
            .args(["-g", "30", "-x264-params", "aud=1", "-f", "h264", "-"])
            .output()
            .ok()?;
        (out.status.success() && !out.stdout.is_empty()).then_some(out.stdout)
    }

    fn run_real(profile: &str, bframes: u32, obs_split: bool) -> Option<Vec<Frame>> {
        let stream = x264(profile, bframes)?;
        let aus = access_units(&stream);
        assert_eq!(aus.len(), 60);
        let pts = presentation_times(&aus, 3000).unwrap();
        let mut sorted = pts.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..60).map(|i| i * 3000).collect::<Vec<_>>());

        let mut asm = H264Assembler::new();
        let mut frames = Vec::new();
        for (au, &pts) in aus.iter().zip(&pts) {
            let is_param = |n: &&&[u8]| matches!(nal_type(n), NAL_SPS | NAL_PPS);
            if obs_split && au.iter().any(|n| is_param(&n)) {
                let params: Vec<&[u8]> = au.iter().filter(is_param).copied().collect();
                assert!(asm.push(&to_annexb(&params), pts, true).frame.is_none());
                let rest: Vec<&[u8]> = au.iter().filter(|n| !is_param(n)).copied().collect();
                frames.extend(asm.push(&to_annexb(&rest), pts, true).frame);
            } else {
                frames.extend(asm.push(&to_annexb(au), pts, true).frame);
            }
        }
        assert_eq!(frames.len(), 60);
        let mut prev = i64::MIN;
        for f in &frames {
            assert!(f.dts <= f.pts, "dts {} > pts {}", f.dts, f.pts);
            assert!(f.dts > prev, "dts not increasing");
            assert!(f.dts >= 0);
            prev = f.dts;
            assert!(!f.data.starts_with(&[0, 0, 0, 1, 0x09]));
            let types: Vec<u8> = split_annexb(&f.data).map(nal_type).collect();
            assert!(!types.contains(&NAL_AUD));
            if f.key {
                assert_eq!(&types[..2], &[NAL_SPS, NAL_PPS]);
                assert!(types.contains(&NAL_IDR));
            } else {
                assert!(!types.contains(&NAL_IDR));
            }
            assert!(Arc::ptr_eq(&f.params, &frames[0].params));
        }
        assert_eq!(frames.iter().filter(|f| f.key).count(), 2); // -g 30, 2 s
        assert!(frames[0].key && frames[30].key);
        assert_eq!(asm.stats().dts.pts_raised, 0);
        match &*frames[0].params {
            CodecParams::H264 { width, height, .. } => assert_eq!((*width, *height), (640, 360)),
            other => panic!("unexpected {other:?}"),
        }
        Some(frames)
    }

    #[test]
    fn real_x264_high_with_b_frames() {
        for obs in [false, true] {
            let Some(frames) = run_real("high", 2, obs) else {
                return; // no ffmpeg here
            };
            let reordered = frames.windows(2).any(|w| w[1].pts < w[0].pts);
            assert!(reordered, "expected B-frames");
            assert!(frames.iter().any(|f| f.dts < f.pts));
            let sps = Sps::parse(match &*frames[0].params {
                CodecParams::H264 { sps, .. } => sps,
                _ => unreachable!(),
            })
            .unwrap();
            assert_eq!(sps.profile_idc, 100);
            assert!(sps.reorder_hint().unwrap_or(0) >= 1);
        }
    }

    #[test]
    fn real_x264_baseline() {
        for obs in [false, true] {
            let Some(frames) = run_real("baseline", 0, obs) else {
                return;
            };
            for f in &frames {
                assert_eq!(f.dts, f.pts);
            }
            let sps = Sps::parse(match &*frames[0].params {
                CodecParams::H264 { sps, .. } => sps,
                _ => unreachable!(),
            })
            .unwrap();
            assert_eq!(sps.profile_idc, 66);
            assert_eq!(sps.reorder_hint(), Some(0));
        }
    }

    #[test]
    fn real_x264_mutated_keeps_invariants() {
        let Some(stream) = x264("high", 2) else {
            return;
        };
        let aus = access_units(&stream);
        let mut asm = H264Assembler::new();
        let mut seed: u32 = 7;
        let mut prev = -1;
        for round in 0..20 {
            for (i, au) in aus.iter().enumerate() {
                let mut bytes = to_annexb(au);
                for _ in 0..(round % 4) {
                    seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    let at = (seed >> 8) as usize % bytes.len().min(48);
                    bytes[at] ^= (seed >> 24) as u8;
                }
                let pts = (round * 60 + i as i64) * 3000 + i64::from(seed % 5000);
                if let Some(f) = asm.push(&bytes, pts, (seed >> 5) & 7 != 0).frame {
                    assert!(f.dts <= f.pts && f.dts > prev);
                    prev = f.dts;
                }
            }
        }
        assert!(asm.stats().frames_out > 0);
    }

    #[test]
    fn real_x264_high_without_vui_hint_learns_from_poc() {
        // Strip the VUI bitstream restriction effect: feed the DTS extractor
        // with no hint, only POCs, as for an encoder that omits it.
        let Some(stream) = x264("high", 2) else {
            return;
        };
        let aus = access_units(&stream);
        let pts = presentation_times(&aus, 3000).unwrap();
        let mut sps = None;
        let mut pps = None;
        let mut poc = PocCounter::new();
        let mut d = DtsExtractor::new();
        let mut prev = -1;
        for (au, &pts) in aus.iter().zip(&pts) {
            for nal in au {
                match nal_type(nal) {
                    NAL_SPS => sps = Some(Sps::parse(nal).unwrap()),
                    NAL_PPS => pps = Some(Pps::parse(nal).unwrap()),
                    _ => {}
                }
            }
            let slice = au.iter().find(|n| is_vcl(nal_type(n))).unwrap();
            let h =
                SliceHeader::parse(slice, sps.as_ref().unwrap(), pps.as_ref().unwrap()).unwrap();
            let c = poc.next(sps.as_ref().unwrap(), &h).unwrap();
            let (p, dts) = d.push(pts, Some((c, h.idr)));
            assert!(dts <= p && dts > prev);
            prev = dts;
        }
        assert_eq!(d.stats().pts_raised, 0);
        assert!(d.reorder() >= 1);
    }
}
