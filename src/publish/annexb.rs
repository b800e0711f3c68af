//! H264: AVCC (length-prefixed, avcC extradata) or Annex B in, Annex B with SPS/PPS on
//! keyframes out.

use anyhow::bail;

use crate::media::h264::{NAL_AUD, NAL_IDR, NAL_PPS, NAL_SPS, nal_type, split_annexb};

/// The start code written in front of every NAL unit.
pub(super) const START_CODE: [u8; 4] = [0, 0, 0, 1];

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct ParamSets {
    sps: Vec<Vec<u8>>,
    pps: Vec<Vec<u8>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// Each NAL unit prefixed by its big-endian length of this many bytes.
    Avcc(usize),
    AnnexB,
}

/// Rewrites H264 packets to Annex B and puts SPS/PPS in front of keyframes.
#[derive(Debug, Clone)]
pub(super) struct H264ToAnnexB {
    layout: Layout,
    params: ParamSets,
}

impl H264ToAnnexB {
    /// From the stream's extradata: an avcC record (MP4/MKV), Annex B parameter sets, or
    /// nothing (then packets must be Annex B with in-band SPS/PPS).
    pub(super) fn new(extradata: Vec<u8>) -> anyhow::Result<Self> {
        if extradata.first() == Some(&1) {
            let (len_size, params) = parse_avcc(&extradata)?;
            return Ok(Self {
                layout: Layout::Avcc(len_size),
                params,
            });
        }
        let mut params = ParamSets::default();
        for nal in split_annexb(&extradata) {
            match nal_type(nal) {
                NAL_SPS => params.sps.push(nal.to_vec()),
                NAL_PPS => params.pps.push(nal.to_vec()),
                _ => {}
            }
        }
        Ok(Self {
            layout: Layout::AnnexB,
            params,
        })
    }

    /// Knows a sequence parameter set (from the extradata or in band).
    pub(super) fn has_sps(&self) -> bool {
        !self.params.sps.is_empty()
    }

    pub(super) fn profile(&self) -> Option<u32> {
        let sps = self.params.sps.first()?;
        let b = sps.get(1..4)?;
        Some(u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]))
    }

    /// One packet (access unit) to Annex B. Returns (is keyframe, data).
    pub(super) fn convert(
        &mut self,
        data: &[u8],
        key_flag: bool,
    ) -> anyhow::Result<(bool, Vec<u8>)> {
        let nals = match self.layout {
            Layout::Avcc(n) => avcc_nal_units(data, n)?,
            Layout::AnnexB => split_annexb(data).collect(),
        };
        let mut inband = ParamSets::default();
        let mut idr = false;
        for nal in &nals {
            match nal_type(nal) {
                NAL_SPS => inband.sps.push(nal.to_vec()),
                NAL_PPS => inband.pps.push(nal.to_vec()),
                NAL_IDR => idr = true,
                _ => {}
            }
        }
        let has_inband = !inband.sps.is_empty() && !inband.pps.is_empty();
        if has_inband {
            self.params = inband;
        }
        let key = key_flag || idr;

        let size: usize = nals.iter().map(|n| n.len() + 4).sum();
        let mut out = Vec::with_capacity(size + 64);
        if key && !has_inband {
            for nal in self.params.sps.iter().chain(&self.params.pps) {
                out.extend_from_slice(&START_CODE);
                out.extend_from_slice(nal);
            }
        }
        for nal in nals {
            if nal_type(nal) == NAL_AUD {
                continue;
            }
            out.extend_from_slice(&START_CODE);
            out.extend_from_slice(nal);
        }
        Ok((key, out))
    }
}

/// Parses an AVCDecoderConfigurationRecord (ISO/IEC 14496-15 5.3.3.1).
fn parse_avcc(data: &[u8]) -> anyhow::Result<(usize, ParamSets)> {
    let mut r = Reader(data);
    let version = r.u8()?;
    if version != 1 {
        bail!("avcC version {version} is not 1");
    }
    r.take(3)?; // profile, compatibility, level
    let len_size = usize::from(r.u8()? & 0x03) + 1;
    if len_size == 3 {
        bail!("avcC NAL length size 3 is invalid");
    }
    let mut params = ParamSets::default();
    let num_sps = r.u8()? & 0x1f;
    for _ in 0..num_sps {
        let len = usize::from(r.u16()?);
        params.sps.push(r.take(len)?.to_vec());
    }
    let num_pps = r.u8()?;
    for _ in 0..num_pps {
        let len = usize::from(r.u16()?);
        params.pps.push(r.take(len)?.to_vec());
    }
    if params.sps.is_empty() || params.pps.is_empty() {
        bail!("avcC has no SPS or no PPS");
    }
    Ok((len_size, params))
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> anyhow::Result<&'a [u8]> {
        if self.0.len() < n {
            bail!("truncated H264 data");
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn u8(&mut self) -> anyhow::Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> anyhow::Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
}

/// Splits length-prefixed NAL units.
fn avcc_nal_units(data: &[u8], len_size: usize) -> anyhow::Result<Vec<&[u8]>> {
    let mut r = Reader(data);
    let mut nals = Vec::new();
    while !r.0.is_empty() {
        let len = r
            .take(len_size)?
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        let nal = r.take(len)?;
        if !nal.is_empty() {
            nals.push(nal);
        }
    }
    Ok(nals)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn avcc_record_parses() {
        let rec = [
            1, 0x42, 0xc0, 0x1f, 0xff, 0xe1, 0, 4, 0x67, 0x42, 0xc0, 0x1f, 1, 0, 2, 0x68, 0xce,
        ];
        let (len, ps) = parse_avcc(&rec).unwrap();
        assert_eq!(len, 4);
        assert_eq!(ps.sps, vec![vec![0x67, 0x42, 0xc0, 0x1f]]);
        assert_eq!(ps.pps, vec![vec![0x68, 0xce]]);
        assert!(parse_avcc(&rec[..10]).is_err());
        assert!(parse_avcc(&[]).is_err());
        assert!(parse_avcc(&[2, 0, 0, 0, 0xff, 0xe1]).is_err());
    }

    #[test]
    fn avcc_to_annexb_with_params_on_keyframes() {
        let rec = [
            1, 0x42, 0xc0, 0x1f, 0xff, 0xe1, 0, 4, 0x67, 0x42, 0xc0, 0x1f, 1, 0, 2, 0x68, 0xce,
        ];
        let mut c = H264ToAnnexB::new(rec.to_vec()).unwrap();
        assert_eq!(c.profile(), Some(0x42c01f));
        let (key, out) = c.convert(&[0, 0, 0, 3, 0x65, 0xaa, 0xbb], true).unwrap();
        assert!(key);
        assert_eq!(
            out,
            [
                0, 0, 0, 1, 0x67, 0x42, 0xc0, 0x1f, 0, 0, 0, 1, 0x68, 0xce, 0, 0, 0, 1, 0x65, 0xaa,
                0xbb
            ]
        );
        let (key, out) = c.convert(&[0, 0, 0, 2, 0x41, 0xcc], false).unwrap();
        assert!(!key);
        assert_eq!(out, [0, 0, 0, 1, 0x41, 0xcc]);
        // Truncated length prefix or body: an error, not a panic.
        assert!(c.convert(&[0, 0, 0, 9, 0x41], false).is_err());
        assert!(c.convert(&[0, 0], false).is_err());
    }

    #[test]
    fn annexb_split() {
        let data = [
            0, 0, 0, 1, 0x67, 1, 0, 0, 1, 0x68, 2, 0, 0, 0, 0, 1, 0x65, 3,
        ];
        let nals: Vec<&[u8]> = split_annexb(&data).collect();
        assert_eq!(nals, vec![&[0x67, 1][..], &[0x68, 2][..], &[0x65, 3][..]]);
        assert_eq!(split_annexb(&[0, 0]).count(), 0);
        let mut c = H264ToAnnexB::new(Vec::new()).unwrap();
        let (key, out) = c.convert(&data, false).unwrap();
        assert!(key);
        assert_eq!(
            out,
            [
                0, 0, 0, 1, 0x67, 1, 0, 0, 0, 1, 0x68, 2, 0, 0, 0, 1, 0x65, 3
            ]
        );
    }
}
