//! Plain RTP out of frames (RFC 3550): one SSRC's header state, the H264 payload format's
//! single NAL unit and FU-A packets (RFC 6184, packetization-mode 1), Opus as one packet per
//! frame (RFC 7587), and the sender report that pairs the RTP clock with the wall clock.
//!
//! Sans-IO: packets are written into a caller's buffer and handed to a closure.

use crate::media::h264::split_annexb;

/// RTP payload bytes per packet at most: a 1200-byte datagram less the RTP header (12 bytes),
/// its `mid` and TWCC extensions (12) and the SRTP tag (16).
pub(super) const MAX_PAYLOAD: usize = 1140;
/// The one-byte header extension profile (RFC 8285).
const ONE_BYTE_EXT: u16 = 0xBEDE;
const FU_A: u8 = 28;

/// One outgoing RTP stream: its SSRC, payload type, sequence numbers and counters.
pub(super) struct RtpStream {
    ssrc: u32,
    pt: u8,
    /// The next sequence number.
    seq: u16,
    /// Times `seq` wrapped (the SRTP rollover counter).
    roc: u32,
    /// Clock rate in Hz.
    clock: u32,
    /// Added to every timestamp (random, RFC 3550 §5.1).
    ts_offset: u32,
    /// The `urn:ietf:params:rtp-hdrext:sdes:mid` extension: its id and the mid.
    mid: Option<(u8, Vec<u8>)>,
    /// The id of the transport-wide sequence number extension (TWCC).
    twcc: Option<u8>,
    /// Packets and payload octets sent, for the sender report.
    packets: u32,
    octets: u32,
    /// The RTP timestamp of the last frame and when (µs of media time) it was due.
    last: Option<(u32, u64)>,
}

impl RtpStream {
    /// `mid` is the `mid` extension's id and value, `twcc` the transport-wide sequence
    /// number extension's id (each when the answer kept it).
    pub(super) fn new(
        ssrc: u32,
        pt: u8,
        clock: u32,
        mid: Option<(u8, &str)>,
        twcc: Option<u8>,
    ) -> Self {
        Self {
            ssrc,
            pt,
            seq: rand::random(),
            roc: 0,
            clock,
            ts_offset: rand::random(),
            mid: mid.map(|(id, m)| (id, m.as_bytes().to_vec())),
            twcc,
            packets: 0,
            octets: 0,
            last: None,
        }
    }

    /// The RTP timestamp of a presentation time in microseconds.
    pub(super) fn timestamp(&self, pts_us: u64) -> u32 {
        let ticks = crate::publish::driver::rescale(pts_us, self.clock);
        // RTP timestamps wrap: keep the low 32 bits.
        self.ts_offset.wrapping_add(ticks as u32)
    }

    /// Writes the header of the next packet into `buf`; returns its length and the rollover
    /// counter of its sequence number. `twcc_seq` is the session's transport-wide sequence
    /// number, shared by its streams.
    fn header(
        &mut self,
        buf: &mut [u8],
        marker: bool,
        ts: u32,
        twcc_seq: &mut u16,
    ) -> (usize, u32) {
        buf[1] = self.pt | if marker { 0x80 } else { 0 };
        buf[2..4].copy_from_slice(&self.seq.to_be_bytes());
        buf[4..8].copy_from_slice(&ts.to_be_bytes());
        buf[8..12].copy_from_slice(&self.ssrc.to_be_bytes());
        // One-byte header extensions (RFC 8285): id << 4 | (length - 1), then the data.
        let mut at = 16;
        if let Some((id, mid)) = &self.mid {
            buf[at] = (id << 4) | (mid.len() as u8 - 1);
            buf[at + 1..at + 1 + mid.len()].copy_from_slice(mid);
            at += 1 + mid.len();
        }
        if let Some(id) = self.twcc {
            buf[at] = (id << 4) | 1;
            buf[at + 1..at + 3].copy_from_slice(&twcc_seq.to_be_bytes());
            *twcc_seq = twcc_seq.wrapping_add(1);
            at += 3;
        }
        let len = if at > 16 {
            let padded = at.next_multiple_of(4);
            buf[at..padded].fill(0);
            buf[12..14].copy_from_slice(&ONE_BYTE_EXT.to_be_bytes());
            buf[14..16].copy_from_slice(&(((padded - 16) / 4) as u16).to_be_bytes());
            buf[0] = 0x90;
            padded
        } else {
            buf[0] = 0x80;
            12
        };
        let roc = self.roc;
        self.seq = self.seq.wrapping_add(1);
        if self.seq == 0 {
            self.roc = self.roc.wrapping_add(1);
        }
        (len, roc)
    }

    /// Packetizes one frame: `emit(packet, header_len, roc)` gets each plain RTP packet, built
    /// in `buf`. H264 (`h264`) is an Annex B access unit; anything else is one packet.
    pub(super) fn packetize<E>(
        &mut self,
        frame: &[u8],
        pts_us: u64,
        h264: bool,
        twcc_seq: &mut u16,
        buf: &mut [u8],
        mut emit: impl FnMut(&[u8], usize, u32) -> Result<(), E>,
    ) -> Result<(), E> {
        let ts = self.timestamp(pts_us);
        self.last = Some((ts, pts_us));
        let mut packet = |rtp: &mut Self, marker: bool, prefix: &[u8], body: &[u8]| {
            let (h, roc) = rtp.header(buf, marker, ts, twcc_seq);
            let end = h + prefix.len() + body.len();
            buf[h..h + prefix.len()].copy_from_slice(prefix);
            buf[h + prefix.len()..end].copy_from_slice(body);
            rtp.packets = rtp.packets.wrapping_add(1);
            rtp.octets = rtp.octets.wrapping_add((end - h) as u32);
            emit(&buf[..end], h, roc)
        };
        if !h264 {
            return packet(self, false, &[], frame);
        }
        let mut nals = split_annexb(frame).filter(|n| !n.is_empty()).peekable();
        while let Some(nal) = nals.next() {
            let last_nal = nals.peek().is_none();
            if nal.len() <= MAX_PAYLOAD {
                packet(self, last_nal, &[], nal)?;
                continue;
            }
            // FU-A: the NAL header's F and NRI bits in the indicator, its type in the header.
            let indicator = (nal[0] & 0xE0) | FU_A;
            let nal_type = nal[0] & 0x1F;
            let mut chunks = nal[1..].chunks(MAX_PAYLOAD - 2).peekable();
            let mut first = true;
            while let Some(chunk) = chunks.next() {
                let end = chunks.peek().is_none();
                let header = nal_type | if first { 0x80 } else { 0 } | if end { 0x40 } else { 0 };
                packet(self, last_nal && end, &[indicator, header], chunk)?;
                first = false;
            }
        }
        Ok(())
    }

    /// A sender report (RFC 3550 §6.4.1) for `now_us` of media time at wall clock `ntp`
    /// (64-bit NTP format), without report blocks; `None` before the first frame.
    pub(super) fn sender_report(&self, now_us: u64, ntp: u64) -> Option<[u8; 28]> {
        let (ts, at_us) = self.last?;
        let ahead = i128::from(now_us) - i128::from(at_us);
        let ticks = ahead * i128::from(self.clock) / 1_000_000;
        let rtp_now = ts.wrapping_add(ticks as u32);
        let mut sr = [0u8; 28];
        sr[0] = 0x80;
        sr[1] = 200;
        sr[2..4].copy_from_slice(&6u16.to_be_bytes());
        sr[4..8].copy_from_slice(&self.ssrc.to_be_bytes());
        sr[8..16].copy_from_slice(&ntp.to_be_bytes());
        sr[16..20].copy_from_slice(&rtp_now.to_be_bytes());
        sr[20..24].copy_from_slice(&self.packets.to_be_bytes());
        sr[24..28].copy_from_slice(&self.octets.to_be_bytes());
        Some(sr)
    }
}

/// A wall-clock time as 64-bit NTP (seconds since 1900 and a binary fraction).
pub(super) fn ntp_time(t: std::time::SystemTime) -> u64 {
    const UNIX_TO_NTP: u64 = 2_208_988_800;
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let frac = (u64::from(d.subsec_nanos()) << 32) / 1_000_000_000;
    ((d.as_secs() + UNIX_TO_NTP) << 32) | frac
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packets(rtp: &mut RtpStream, frame: &[u8], h264: bool) -> Vec<(Vec<u8>, usize)> {
        let mut out = Vec::new();
        let mut buf = [0u8; 1500];
        rtp.packetize::<()>(frame, 40_000, h264, &mut 0, &mut buf, |p, h, _| {
            out.push((p.to_vec(), h));
            Ok(())
        })
        .unwrap();
        out
    }

    #[test]
    fn h264_small_nals_go_whole_and_the_last_carries_the_marker() {
        let mut rtp = RtpStream::new(0x1234_5678, 96, 90_000, Some((3, "0")), None);
        let frame = [
            0, 0, 0, 1, 0x67, 1, 2, 0, 0, 0, 1, 0x68, 3, 0, 0, 1, 0x65, 4, 5, 6,
        ];
        let out = packets(&mut rtp, &frame, true);
        assert_eq!(out.len(), 3);
        let (first, h) = (&out[0].0, out[0].1);
        assert_eq!(h, 20, "12 bytes of header and 8 of mid extension");
        assert_eq!(first[0], 0x90, "version 2 with the extension bit");
        assert_eq!(&first[12..17], &[0xBE, 0xDE, 0, 1, 0x30]);
        assert_eq!(first[17], b'0');
        assert_eq!(&first[8..12], &0x1234_5678u32.to_be_bytes());
        assert_eq!(&first[h..], &[0x67, 1, 2]);
        assert_eq!(out[0].0[1], 96, "no marker before the last NAL");
        assert_eq!(out[2].0[1], 96 | 0x80);
        assert_eq!(&out[2].0[20..], &[0x65, 4, 5, 6]);
        let seq = |p: &[u8]| u16::from_be_bytes([p[2], p[3]]);
        assert_eq!(seq(&out[1].0), seq(&out[0].0).wrapping_add(1));
        let ts = |p: &[u8]| u32::from_be_bytes([p[4], p[5], p[6], p[7]]);
        assert_eq!(ts(&out[0].0), ts(&out[2].0));
        assert_eq!(ts(&out[0].0), rtp.timestamp(40_000));
    }

    #[test]
    fn mid_and_transport_wide_sequence_share_one_extension_block() {
        let mut rtp = RtpStream::new(5, 111, 48_000, Some((4, "1")), Some(3));
        let mut buf = [0u8; 64];
        let mut twcc = 0xFFFF;
        let mut seen = Vec::new();
        for _ in 0..2 {
            rtp.packetize::<()>(&[7], 0, false, &mut twcc, &mut buf, |p, h, _| {
                seen.push((p.to_vec(), h));
                Ok(())
            })
            .unwrap();
        }
        let (p, h) = &seen[0];
        assert_eq!(
            *h, 24,
            "12 bytes of header, 4 of extension header, 5 of data and 3 of padding"
        );
        assert_eq!(&p[12..20], &[0xBE, 0xDE, 0, 2, 0x40, b'1', 0x31, 0xFF]);
        assert_eq!(
            &p[20..24],
            &[0xFF, 0, 0, 0],
            "the sequence's low byte, then padding"
        );
        assert_eq!(p[24], 7);
        assert_eq!(&seen[1].0[19..21], &[0, 0], "the session counter wrapped");
        assert_eq!(twcc, 1);
    }

    #[test]
    fn h264_large_nals_become_fu_a_fragments() {
        let mut rtp = RtpStream::new(1, 102, 90_000, None, None);
        let mut frame = vec![0, 0, 0, 1, 0x65];
        frame.extend((0..3000u32).map(|i| (i % 251) as u8 | 1));
        let out = packets(&mut rtp, &frame, true);
        assert_eq!(out.len(), 3);
        let mut nal = vec![0x65];
        for (i, (p, h)) in out.iter().enumerate() {
            assert_eq!(*h, 12);
            assert!(p.len() - h <= MAX_PAYLOAD);
            assert_eq!(p[12], 0x60 | FU_A, "F and NRI of the NAL, type 28");
            let start = i == 0;
            let end = i == out.len() - 1;
            assert_eq!(p[13] & 0x80 != 0, start);
            assert_eq!(p[13] & 0x40 != 0, end);
            assert_eq!(p[13] & 0x1F, 5);
            assert_eq!(p[1] & 0x80 != 0, end, "marker on the last fragment only");
            nal.extend_from_slice(&p[14..]);
        }
        assert_eq!(nal, frame[4..]);
    }

    #[test]
    fn opus_is_one_packet_and_sequence_numbers_roll_over() {
        let mut rtp = RtpStream::new(7, 111, 48_000, None, None);
        rtp.seq = u16::MAX;
        let out = packets(&mut rtp, &[1, 2, 3], false);
        assert_eq!(out.len(), 1);
        assert_eq!(&out[0].0[12..], &[1, 2, 3]);
        assert_eq!(rtp.seq, 0);
        assert_eq!(rtp.roc, 1);
        let mut rolled = None;
        let mut buf = [0u8; 64];
        rtp.packetize::<()>(&[9], 60_000, false, &mut 0, &mut buf, |_, _, roc| {
            rolled = Some(roc);
            Ok(())
        })
        .unwrap();
        assert_eq!(rolled, Some(1));
    }

    #[test]
    fn sender_report_extrapolates_the_rtp_clock() {
        let mut rtp = RtpStream::new(9, 111, 48_000, None, None);
        assert!(rtp.sender_report(0, 0).is_none());
        packets(&mut rtp, &[1, 2, 3], false);
        let sr = rtp.sender_report(60_000, 0x0102_0304_0506_0708).unwrap();
        assert_eq!(&sr[..4], &[0x80, 200, 0, 6]);
        assert_eq!(&sr[8..16], &0x0102_0304_0506_0708u64.to_be_bytes());
        let rtp_ts = u32::from_be_bytes([sr[16], sr[17], sr[18], sr[19]]);
        assert_eq!(rtp_ts, rtp.timestamp(40_000).wrapping_add(960));
        assert_eq!(&sr[20..24], &1u32.to_be_bytes());
        assert_eq!(&sr[24..28], &3u32.to_be_bytes());
    }

    #[test]
    fn ntp_of_the_unix_epoch() {
        assert_eq!(ntp_time(std::time::UNIX_EPOCH), 2_208_988_800u64 << 32);
    }
}
