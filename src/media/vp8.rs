//! The little of VP8 (RFC 6386) ingest needs: whether a frame is a keyframe
//! and, from a keyframe's header, the picture size. Decoding is FFmpeg's.

/// Keyframe start code (RFC 6386 §9.1).
const START_CODE: [u8; 3] = [0x9d, 0x01, 0x2a];

/// A frame's keyframe bit: the first bit of the frame tag is 0 on keyframes.
pub fn is_keyframe(frame: &[u8]) -> bool {
    frame.len() >= 10 && frame[0] & 1 == 0 && frame[3..6] == START_CODE
}

/// Width and height of a keyframe (14 bits each; the scaling bits above
/// them are ignored). `None` for interframes and truncated data.
pub fn keyframe_size(frame: &[u8]) -> Option<(u32, u32)> {
    if !is_keyframe(frame) {
        return None;
    }
    let w = u32::from(u16::from_le_bytes([frame[6], frame[7]]) & 0x3fff);
    let h = u32::from(u16::from_le_bytes([frame[8], frame[9]]) & 0x3fff);
    (w > 0 && h > 0).then_some((w, h))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyframe_header() {
        // Frame tag (key, version 0, show), start code, 640x360 with scale bits.
        let key = [
            0x50, 0x2a, 0x00, 0x9d, 0x01, 0x2a, 0x80, 0x42, 0x68, 0x41, 0xff,
        ];
        assert!(is_keyframe(&key));
        assert_eq!(keyframe_size(&key), Some((640, 360)));
        let mut inter = key;
        inter[0] |= 1;
        assert!(!is_keyframe(&inter));
        assert_eq!(keyframe_size(&inter), None);
        assert_eq!(keyframe_size(&key[..8]), None);
        assert_eq!(keyframe_size(&[]), None);
    }
}
