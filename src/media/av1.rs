//! The little of AV1 ingest and the WHIP client need: the OBUs of a temporal
//! unit (low-overhead bitstream format, AV1 specification §5.2), whether it
//! starts a coded video sequence (a sequence header and a key frame) and the
//! sequence's picture size. Decoding is FFmpeg's.

use super::h264::{BitReader, H264Error};

pub const OBU_SEQUENCE_HEADER: u8 = 1;
pub const OBU_TEMPORAL_DELIMITER: u8 = 2;
pub const OBU_FRAME_HEADER: u8 = 3;
pub const OBU_FRAME: u8 = 6;

/// One OBU of a temporal unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Obu<'a> {
    /// `obu_type`.
    pub kind: u8,
    /// The whole OBU, header and size field included.
    pub bytes: &'a [u8],
    /// The OBU's payload.
    pub payload: &'a [u8],
}

/// The OBUs of `data`, each with its `obu_size` field except perhaps the
/// last (which then runs to the end). `None` when `data` is not that: a set
/// forbidden bit, a size past the end, a truncated header.
pub fn obus(data: &[u8]) -> Option<Vec<Obu<'_>>> {
    let mut out = Vec::new();
    let mut rest = data;
    while let Some(&header) = rest.first() {
        if header & 0x80 != 0 {
            return None; // obu_forbidden_bit
        }
        let mut at = 1 + usize::from(header & 0x04 != 0); // extension byte
        if rest.len() < at {
            return None;
        }
        let size = if header & 0x02 != 0 {
            let (size, n) = leb128(&rest[at..])?;
            at += n;
            usize::try_from(size).ok()?
        } else {
            rest.len() - at
        };
        let end = at.checked_add(size).filter(|&e| e <= rest.len())?;
        out.push(Obu {
            kind: (header >> 3) & 0x0f,
            bytes: &rest[..end],
            payload: &rest[at..end],
        });
        rest = &rest[end..];
    }
    Some(out)
}

/// `leb128()`: the value and the bytes it took (at most 8).
fn leb128(data: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (i, b) in data.iter().take(8).enumerate() {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// What ingest needs of a sequence header OBU's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SequenceHeader {
    /// `max_frame_width_minus_1 + 1`.
    pub width: u32,
    /// `max_frame_height_minus_1 + 1`.
    pub height: u32,
    /// Frame headers are then reduced to nothing: every frame is a key frame.
    pub reduced_still_picture_header: bool,
}

impl SequenceHeader {
    /// Parses `sequence_header_obu()` up to the maximum frame size (§5.5.1).
    pub fn parse(payload: &[u8]) -> Option<Self> {
        sequence_header(&mut BitReader::new(payload)).ok()
    }
}

fn sequence_header(r: &mut BitReader<'_>) -> Result<SequenceHeader, H264Error> {
    r.skip_bits(4)?; // seq_profile, still_picture
    let reduced = r.read_bit()?;
    if reduced {
        r.skip_bits(5)?; // seq_level_idx[0]
    } else {
        let mut buffer_delay_bits = 0;
        let timing_info_present = r.read_bit()?;
        let mut decoder_model_info_present = false;
        if timing_info_present {
            r.skip_bits(64)?; // num_units_in_display_tick, time_scale
            if r.read_bit()? {
                uvlc(r)?; // num_ticks_per_picture_minus_1
            }
            decoder_model_info_present = r.read_bit()?;
            if decoder_model_info_present {
                buffer_delay_bits = r.read_bits(5)? as usize + 1;
                r.skip_bits(32 + 5 + 5)?;
            }
        }
        let initial_display_delay_present = r.read_bit()?;
        let operating_points = r.read_bits(5)? + 1;
        for _ in 0..operating_points {
            r.skip_bits(12)?; // operating_point_idc
            if r.read_bits(5)? > 7 {
                r.skip_bits(1)?; // seq_tier
            }
            if decoder_model_info_present && r.read_bit()? {
                r.skip_bits(2 * buffer_delay_bits + 1)?;
            }
            if initial_display_delay_present && r.read_bit()? {
                r.skip_bits(4)?;
            }
        }
    }
    let width_bits = r.read_bits(4)? + 1;
    let height_bits = r.read_bits(4)? + 1;
    Ok(SequenceHeader {
        width: r.read_bits(width_bits)? + 1,
        height: r.read_bits(height_bits)? + 1,
        reduced_still_picture_header: reduced,
    })
}

/// `uvlc()`, read only to be skipped.
fn uvlc(r: &mut BitReader<'_>) -> Result<(), H264Error> {
    let mut zeros = 0;
    while !r.read_bit()? {
        zeros += 1;
    }
    if zeros < 32 {
        r.skip_bits(zeros)?;
    }
    Ok(())
}

/// The sequence header of a temporal unit that starts a coded video
/// sequence: one with a sequence header OBU and a key frame shown or
/// decoded from it. `None` for other temporal units and for anything that
/// is not AV1. (WebRTC encoders send the sequence header with every key
/// frame; a key frame without one is not a point a new decoder can start.)
pub fn keyframe(temporal_unit: &[u8]) -> Option<SequenceHeader> {
    let obus = obus(temporal_unit)?;
    let seq = obus
        .iter()
        .find(|o| o.kind == OBU_SEQUENCE_HEADER)
        .and_then(|o| SequenceHeader::parse(o.payload))?;
    let frame = obus
        .iter()
        .find(|o| o.kind == OBU_FRAME || o.kind == OBU_FRAME_HEADER)?;
    let key = seq.reduced_still_picture_header
        // show_existing_frame = 0, frame_type = KEY_FRAME (0).
        || frame.payload.first().is_some_and(|b| b & 0xe0 == 0);
    key.then_some(seq)
}

/// Width and height of a temporal unit that starts a coded video sequence.
pub fn keyframe_size(temporal_unit: &[u8]) -> Option<(u32, u32)> {
    keyframe(temporal_unit).map(|s| (s.width, s.height))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::test_input::{from_bits, noise};

    /// The sequence header OBU libaom (realtime, 640x360) writes, with its
    /// size field.
    const SEQ: [u8; 13] = [
        0x0a, 0x0b, 0x00, 0x00, 0x00, 0x0c, 0xc4, 0xff, 0x67, 0x36, 0xbe, 0x40, 0x10,
    ];

    fn temporal_unit(frame_header_byte: u8) -> Vec<u8> {
        let mut tu = SEQ.to_vec();
        // OBU_FRAME with a size field: 3 payload bytes.
        tu.extend_from_slice(&[0x32, 0x03, frame_header_byte, 0xaa, 0xbb]);
        tu
    }

    #[test]
    fn key_frame_with_a_sequence_header() {
        let tu = temporal_unit(0x10); // show_existing 0, KEY_FRAME, show_frame 1
        assert_eq!(keyframe_size(&tu), Some((640, 360)));
        let parsed = obus(&tu).unwrap();
        assert_eq!(
            parsed.iter().map(|o| o.kind).collect::<Vec<_>>(),
            [OBU_SEQUENCE_HEADER, OBU_FRAME]
        );
        assert_eq!(parsed[1].payload, [0x10, 0xaa, 0xbb]);
        assert_eq!(parsed[0].bytes, SEQ);
    }

    #[test]
    fn inter_frames_and_lone_key_frames_are_not_keyframes() {
        // frame_type INTER_FRAME (1).
        assert_eq!(keyframe_size(&temporal_unit(0x30)), None);
        // show_existing_frame.
        assert_eq!(keyframe_size(&temporal_unit(0x80)), None);
        // A key frame without its sequence header.
        assert_eq!(keyframe_size(&temporal_unit(0x10)[SEQ.len()..]), None);
        // A sequence header alone.
        assert_eq!(keyframe_size(&SEQ), None);
    }

    #[test]
    fn last_obu_without_size_and_extension_headers() {
        // Temporal delimiter (size 0), then a frame OBU with an extension
        // byte and no size field.
        let tu = [0x12, 0x00, 0x34, 0x08, 0x10, 0x01];
        let parsed = obus(&tu).unwrap();
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[0].kind, OBU_TEMPORAL_DELIMITER);
        assert_eq!(parsed[1].kind, OBU_FRAME);
        assert_eq!(parsed[1].payload, [0x10, 0x01]);
    }

    #[test]
    fn timing_info_and_decoder_model_are_skipped() {
        // seq_profile 0, timing info (display tick 1, time scale 30,
        // equal_picture_interval with uvlc 0), decoder model (delay 10
        // bits), initial display delay present, one operating point with
        // level 8 (so a tier bit), a decoder model and a display delay,
        // then 11/11 bits of 1920x1080.
        let mut bits = String::from("000" /* seq_profile */);
        bits += "0"; // still_picture
        bits += "0"; // reduced_still_picture_header
        bits += "1"; // timing_info_present_flag
        bits += &format!("{:032b}{:032b}", 1, 30);
        bits += "1" /* equal_picture_interval */;
        bits += "1" /* uvlc 0 */;
        bits += "1"; // decoder_model_info_present_flag
        bits += &format!("{:05b}", 9); // buffer_delay_length_minus_1
        bits += &format!("{:032b}", 1); // num_units_in_decoding_tick
        bits += "0000000000"; // two 5-bit lengths
        bits += "1"; // initial_display_delay_present_flag
        bits += "00000"; // operating_points_cnt_minus_1
        bits += &format!("{:012b}", 0); // operating_point_idc
        bits += &format!("{:05b}", 8); // seq_level_idx
        bits += "1"; // seq_tier
        bits += "1"; // decoder_model_present_for_this_op
        bits += &"0".repeat(21); // two 10-bit delays, low_delay_mode_flag
        bits += "1"; // initial_display_delay_present_for_this_op
        bits += "0000"; // initial_display_delay_minus_1
        bits += "10101010"; // frame_width_bits_minus_1, frame_height_bits_minus_1
        bits += &format!("{:011b}{:011b}", 1919, 1079);
        let bytes = from_bits(&bits);
        let seq = SequenceHeader::parse(&bytes).unwrap();
        assert_eq!((seq.width, seq.height), (1920, 1080));
        assert!(!seq.reduced_still_picture_header);
        assert_eq!(SequenceHeader::parse(&bytes[..bytes.len() - 2]), None);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert_eq!(obus(&[0x80]), None); // forbidden bit
        assert_eq!(obus(&[0x0a, 0x05, 0x00]), None); // size past the end
        assert_eq!(obus(&[0x0e]), None); // extension byte missing
        assert_eq!(
            obus(&[0x0a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
            None
        );
        assert_eq!(obus(&[]), Some(Vec::new()));
        let tu = temporal_unit(0x10);
        for len in 0..tu.len() {
            assert_eq!(keyframe_size(&tu[..len]), None, "{len} bytes");
        }
        for data in noise(0x9e37_79b9, 2000, 24) {
            if let Some(obus) = obus(&data) {
                assert_eq!(
                    obus.iter().map(|o| o.bytes.len()).sum::<usize>(),
                    data.len()
                );
            }
            let _ = keyframe_size(&data);
        }
    }
}
