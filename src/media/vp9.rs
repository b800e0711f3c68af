//! The little of VP9 ingest needs: whether a frame is a keyframe and, from a
//! keyframe's uncompressed header (VP9 bitstream specification §6.2), the
//! picture size. Decoding is FFmpeg's.

use super::h264::{BitReader, H264Error};

/// `frame_sync_code` of keyframes (§6.2.1).
const SYNC_CODE: u32 = 0x49_83_42;
/// `color_space` value of RGB, which has no `color_range` bit.
const CS_RGB: u32 = 7;

/// Width and height of a keyframe. `None` for inter, intra-only and
/// show-existing frames, and for anything that is not a VP9 frame header.
/// A superframe (several frames with an index at the end) is judged by its
/// first frame, which starts at byte 0; so is a WebRTC picture whose spatial
/// layers come one after the other.
pub fn keyframe_size(frame: &[u8]) -> Option<(u32, u32)> {
    header(&mut BitReader::new(frame)).ok().flatten()
}

fn header(r: &mut BitReader<'_>) -> Result<Option<(u32, u32)>, H264Error> {
    if r.read_bits(2)? != 2 {
        return Ok(None); // frame_marker
    }
    let low = r.read_bits(1)?;
    let profile = (r.read_bits(1)? << 1) | low;
    if profile == 3 && r.read_bit()? {
        return Ok(None); // reserved_zero
    }
    let show_existing_frame = r.read_bit()?;
    let inter = r.read_bit()?; // frame_type: 0 is KEY_FRAME
    if show_existing_frame || inter {
        return Ok(None);
    }
    r.skip_bits(2)?; // show_frame, error_resilient_mode
    if r.read_bits(24)? != SYNC_CODE {
        return Ok(None);
    }
    // color_config()
    if profile >= 2 {
        r.skip_bits(1)?; // ten_or_twelve_bit
    }
    let color_space = r.read_bits(3)?;
    let odd_profile = profile == 1 || profile == 3;
    if color_space != CS_RGB {
        r.skip_bits(1)?; // color_range
        if odd_profile {
            r.skip_bits(3)?; // subsampling_x, subsampling_y, reserved_zero
        }
    } else if odd_profile {
        r.skip_bits(1)?; // reserved_zero
    }
    // frame_size()
    let width = r.read_bits(16)? + 1;
    let height = r.read_bits(16)? + 1;
    Ok(Some((width, height)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::test_input::{from_bits, noise};

    /// The first bytes of a libvpx-vp9 keyframe (profile 0, BT.601,
    /// 640x360), as FFmpeg writes it into WebM.
    const KEY: [u8; 10] = [0x82, 0x49, 0x83, 0x42, 0x00, 0x27, 0xf0, 0x16, 0x76, 0x08];

    #[test]
    fn keyframe_header() {
        assert_eq!(keyframe_size(&KEY), Some((640, 360)));
        // frame_type 1: an inter frame.
        let mut inter = KEY;
        inter[0] |= 0x04;
        assert_eq!(keyframe_size(&inter), None);
        // show_existing_frame.
        let mut existing = KEY;
        existing[0] |= 0x08;
        assert_eq!(keyframe_size(&existing), None);
        // Wrong sync code.
        let mut unsynced = KEY;
        unsynced[2] = 0;
        assert_eq!(keyframe_size(&unsynced), None);
    }

    #[test]
    fn profile_1_reads_the_subsampling_bits() {
        // Profile 1 (low bit set), color space 2, range, subsampling 0 0,
        // reserved 0, then 1280x720: 0x04ff and 0x02cf.
        let mut bits = String::from("10" /* marker */);
        bits += "10"; // profile_low_bit, profile_high_bit
        bits += "0000"; // show_existing, frame_type, show_frame, error_res
        bits += "010010011000001101000010"; // sync code
        bits += "010" /* color_space */;
        bits += "1000"; // color_range, subsampling_x, subsampling_y, reserved
        bits += &format!("{:016b}{:016b}", 1279, 719);
        assert_eq!(keyframe_size(&from_bits(&bits)), Some((1280, 720)));
    }

    #[test]
    fn garbage_is_not_a_keyframe() {
        assert_eq!(keyframe_size(&[]), None);
        assert_eq!(keyframe_size(&KEY[..6]), None);
        assert_eq!(keyframe_size(&[0xff; 32]), None);
        // The header ends in the 9th byte.
        assert!(keyframe_size(&KEY[..9]).is_some());
        for len in 0..9 {
            assert_eq!(keyframe_size(&KEY[..len]), None, "{len} bytes");
        }
        for data in noise(0x1234_5678, 1000, 16) {
            if let Some((w, h)) = keyframe_size(&data) {
                assert!(w > 0 && h > 0 && w <= 65536 && h <= 65536);
            }
        }
    }
}
