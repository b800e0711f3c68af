//! Video to H264, for publishers whose codec the outputs cannot carry (VP8
//! from browsers) and, later, for the encoded rungs of ABR presets.
//!
//! [`ToH264`] is the synchronous core: hub frames in (VP8 or H264), H264
//! access units out on the same timeline. FFmpeg decodes; swscale converts
//! and resizes when needed; libx264 encodes with `zerolatency` (no B-frames,
//! no lookahead: a frame in, a frame out). Keyframes are forced on a fixed
//! grid of the stream timeline (`keyframe_interval`, the HLS segment
//! duration), so every encoder of a stream cuts at the same times and HLS
//! segments are whole intervals. The encoder writes SPS and PPS before every
//! IDR; its output goes through [`H264Assembler`], the code WebRTC ingest
//! uses, so the frames carry the same parameters and checks as published
//! H264. A change of the decoded size reopens the encoder (new SPS: the HLS
//! output marks a discontinuity).

use ff::format::Pixel;
use ff::software::scaling;
use ff::{Dictionary, Packet, codec, decoder, encoder, frame, picture};
use ffmpeg_next as ff;

use super::worker::Core;
use super::{TranscodeError, ffmpeg_err};
use crate::media::frame::{CLOCK_HZ, Codec, Frame};
use crate::media::h264::H264Assembler;

/// How to encode.
#[derive(Debug, Clone, PartialEq)]
pub struct VideoSettings {
    /// Output size; `None` keeps the published size. With only a height the
    /// width follows the aspect ratio (rounded to even).
    pub width: Option<u32>,
    pub height: Option<u32>,
    /// Average bits/s; `None`: 0.1 bit per pixel at 30 fps.
    pub bitrate: Option<u32>,
    /// VBV peak rate and buffer, bits/s and bits (default: 1.5 × and 2 ×
    /// the bitrate).
    pub maxrate: Option<u32>,
    pub bufsize: Option<u32>,
    /// Keyframes at every multiple of this on the stream timeline, ticks.
    pub keyframe_interval: i64,
    /// x264 `preset`, `tune` and `profile`.
    pub preset: String,
    pub tune: String,
    pub profile: String,
}

impl Default for VideoSettings {
    fn default() -> Self {
        Self {
            width: None,
            height: None,
            bitrate: None,
            maxrate: None,
            bufsize: None,
            keyframe_interval: 2 * CLOCK_HZ,
            preset: "veryfast".into(),
            tune: "zerolatency".into(),
            profile: "high".into(),
        }
    }
}

/// Counters of one video transcoder.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VideoStats {
    pub frames_in: u64,
    pub frames_out: u64,
    pub keyframes_out: u64,
    /// Input the decoder refused.
    pub undecodable: u64,
    /// Times the encoder was (re)opened for a new size.
    pub encoder_opens: u64,
}

struct Encoding {
    encoder: encoder::Video,
    width: u32,
    height: u32,
    /// Decoded frames converted to the encoder's size and format.
    scaler: Option<(Scaler, (Pixel, u32, u32))>,
}

/// A swscale context, owned by one transcoder.
struct Scaler(scaling::Context);

// SAFETY: an `SwsContext` has no thread affinity; it is only unsafe to use
// from two threads at once, and this one is owned by a single transcoder
// and only moved, with it, to that transcoder's thread.
unsafe impl Send for Scaler {}

pub struct ToH264 {
    settings: VideoSettings,
    decoder: Option<(Codec, decoder::Video)>,
    encoding: Option<Encoding>,
    assembler: H264Assembler,
    /// The next keyframe time on the grid.
    next_key: i64,
    out: Vec<Frame>,
    stats: VideoStats,
}

impl ToH264 {
    pub fn new(settings: VideoSettings) -> Result<Self, TranscodeError> {
        super::init_ffmpeg();
        if settings.keyframe_interval <= 0 {
            return Err(TranscodeError::InvalidSettings(
                "keyframe interval must be positive".into(),
            ));
        }
        if encoder::find_by_name("libx264").is_none() {
            return Err(TranscodeError::CodecNotFound("libx264 encoder"));
        }
        Ok(Self {
            settings,
            decoder: None,
            encoding: None,
            assembler: H264Assembler::new(),
            next_key: 0,
            out: Vec::new(),
            stats: VideoStats::default(),
        })
    }

    fn decoder(&mut self, codec: Codec) -> Result<&mut decoder::Video, TranscodeError> {
        if self.decoder.as_ref().is_none_or(|(c, _)| *c != codec) {
            let id = match codec {
                Codec::Vp8 => codec::Id::VP8,
                Codec::Vp9 => codec::Id::VP9,
                Codec::Av1 => codec::Id::AV1,
                Codec::H264 => codec::Id::H264,
                other => return Err(TranscodeError::WrongCodec(other)),
            };
            // FFmpeg's own AV1 decoder only drives hardware: take dav1d.
            let by_name = (codec == Codec::Av1)
                .then(|| decoder::find_by_name("libdav1d"))
                .flatten();
            let found = by_name
                .or_else(|| decoder::find(id))
                .ok_or(TranscodeError::CodecNotFound("video decoder"))?;
            let mut ctx = codec::Context::new_with_codec(found);
            ctx.set_time_base((1, CLOCK_HZ as i32));
            // One thread per stream: many streams share the cores.
            ctx.set_threading(codec::threading::Config {
                kind: codec::threading::Type::Frame,
                count: 1,
                ..Default::default()
            });
            let video = ctx
                .decoder()
                .video()
                .map_err(ffmpeg_err("open video decoder"))?;
            self.decoder = Some((codec, video));
        }
        match self.decoder.as_mut() {
            Some((_, d)) => Ok(d),
            None => Err(TranscodeError::Finished),
        }
    }

    /// The output size for a decoded `w`×`h`.
    fn target_size(&self, w: u32, h: u32) -> (u32, u32) {
        let even = |v: u32| (v.max(2) + 1) & !1;
        match (self.settings.width, self.settings.height) {
            (Some(tw), Some(th)) => (even(tw), even(th)),
            (None, Some(th)) => {
                let tw = (u64::from(w) * u64::from(th) / u64::from(h.max(1))) as u32;
                (even(tw), even(th))
            }
            _ => (even(w), even(h)),
        }
    }

    fn open_encoder(&mut self, width: u32, height: u32) -> Result<(), TranscodeError> {
        self.finish_encoder()?;
        let s = &self.settings;
        let found =
            encoder::find_by_name("libx264").ok_or(TranscodeError::CodecNotFound("libx264"))?;
        let mut enc = codec::Context::new_with_codec(found)
            .encoder()
            .video()
            .map_err(ffmpeg_err("libx264 context"))?;
        let bitrate = s
            .bitrate
            .unwrap_or_else(|| {
                (u64::from(width) * u64::from(height) * 3).min(u64::from(u32::MAX)) as u32
            })
            .max(50_000);
        enc.set_width(width);
        enc.set_height(height);
        enc.set_format(Pixel::YUV420P);
        enc.set_time_base((1, CLOCK_HZ as i32));
        enc.set_frame_rate(Some((30, 1)));
        enc.set_bit_rate(bitrate as usize);
        enc.set_max_bit_rate(s.maxrate.unwrap_or(bitrate / 2 * 3) as usize);
        // Keyframes come from the grid; x264 adds none of its own.
        enc.set_gop(u32::MAX / 2);
        let bufsize = s.bufsize.unwrap_or(bitrate.saturating_mul(2));
        let mut opts = Dictionary::new();
        opts.set("preset", &s.preset);
        opts.set("tune", &s.tune);
        opts.set("profile", &s.profile);
        opts.set("forced-idr", "1");
        opts.set(
            "x264-params",
            &format!(
                "repeat-headers=1:scenecut=0:threads=1:vbv-bufsize={}",
                bufsize / 1000
            ),
        );
        let encoder = enc.open_with(opts).map_err(ffmpeg_err("open libx264"))?;
        self.stats.encoder_opens += 1;
        self.encoding = Some(Encoding {
            encoder,
            width,
            height,
            scaler: None,
        });
        Ok(())
    }

    /// Drains and closes the current encoder, if any.
    fn finish_encoder(&mut self) -> Result<(), TranscodeError> {
        if let Some(mut e) = self.encoding.take() {
            e.encoder.send_eof().map_err(ffmpeg_err("libx264 flush"))?;
            self.drain(&mut e.encoder)?;
        }
        Ok(())
    }

    fn drain(&mut self, enc: &mut encoder::Video) -> Result<(), TranscodeError> {
        let mut packet = Packet::empty();
        while enc.receive_packet(&mut packet).is_ok() {
            let (Some(data), Some(pts)) = (packet.data(), packet.pts()) else {
                continue;
            };
            if let Some(f) = self.assembler.push(data, pts, true).frame {
                self.stats.frames_out += 1;
                self.stats.keyframes_out += u64::from(f.key);
                self.out.push(f);
            }
        }
        Ok(())
    }

    fn encode(&mut self, decoded: &frame::Video) -> Result<(), TranscodeError> {
        let Some(pts) = decoded.timestamp().or(decoded.pts()) else {
            return Ok(());
        };
        let (w, h) = self.target_size(decoded.width(), decoded.height());
        if self
            .encoding
            .as_ref()
            .is_none_or(|e| (e.width, e.height) != (w, h))
        {
            self.open_encoder(w, h)?;
        }
        let Some(mut e) = self.encoding.take() else {
            return Ok(());
        };
        let source = (decoded.format(), decoded.width(), decoded.height());
        let mut input = if source == (Pixel::YUV420P, w, h) {
            decoded.clone()
        } else {
            if e.scaler.as_ref().is_none_or(|(_, s)| *s != source) {
                let ctx = scaling::Context::get(
                    source.0,
                    source.1,
                    source.2,
                    Pixel::YUV420P,
                    w,
                    h,
                    scaling::Flags::BILINEAR,
                )
                .map_err(ffmpeg_err("swscale setup"))?;
                e.scaler = Some((Scaler(ctx), source));
            }
            let mut scaled = frame::Video::empty();
            if let Some((Scaler(ctx), _)) = e.scaler.as_mut() {
                ctx.run(decoded, &mut scaled)
                    .map_err(ffmpeg_err("swscale"))?;
            }
            scaled
        };
        input.set_pts(Some(pts));
        let interval = self.settings.keyframe_interval;
        if pts >= self.next_key {
            input.set_kind(picture::Type::I);
            self.next_key = (pts / interval + 1) * interval;
        } else {
            input.set_kind(picture::Type::None);
        }
        let sent = e
            .encoder
            .send_frame(&input)
            .map_err(ffmpeg_err("libx264 encode"));
        let drained = self.drain(&mut e.encoder);
        self.encoding = Some(e);
        sent.and(drained)
    }

    fn decode_all(&mut self) -> Result<(), TranscodeError> {
        let mut decoded = frame::Video::empty();
        loop {
            let Some((_, d)) = self.decoder.as_mut() else {
                return Ok(());
            };
            if d.receive_frame(&mut decoded).is_err() {
                return Ok(());
            }
            self.encode(&decoded)?;
        }
    }

    pub fn push(&mut self, frame: &Frame) -> Result<Vec<Frame>, TranscodeError> {
        self.stats.frames_in += 1;
        if frame.data.is_empty() {
            return Err(TranscodeError::EmptyPacket);
        }
        let mut packet = Packet::copy(&frame.data);
        packet.set_pts(Some(frame.pts));
        packet.set_dts(Some(frame.dts));
        if frame.key {
            packet.set_flags(ff::packet::Flags::KEY);
        }
        let sent = self.decoder(frame.codec())?.send_packet(&packet);
        if let Err(e) = sent {
            self.stats.undecodable += 1;
            return Err(TranscodeError::Decode(e));
        }
        self.decode_all()?;
        Ok(std::mem::take(&mut self.out))
    }

    pub fn flush(&mut self) -> Result<Vec<Frame>, TranscodeError> {
        if let Some((_, d)) = self.decoder.as_mut() {
            let _ = d.send_eof();
            self.decode_all()?;
        }
        self.finish_encoder()?;
        Ok(std::mem::take(&mut self.out))
    }

    pub fn stats(&self) -> VideoStats {
        self.stats
    }
}

impl Core for ToH264 {
    type Stats = VideoStats;
    const NAME: &'static str = "h264";

    fn push(&mut self, frame: &Frame) -> Result<Vec<Frame>, TranscodeError> {
        ToH264::push(self, frame)
    }

    fn flush(&mut self) -> Result<Vec<Frame>, TranscodeError> {
        ToH264::flush(self)
    }

    fn stats(&self) -> VideoStats {
        ToH264::stats(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::frame::CodecParams;
    use crate::media::vp8;

    /// VP8 frames of an IVF file, stamped at 30 fps.
    fn ivf_frames(ivf: &[u8]) -> Vec<Frame> {
        assert_eq!(&ivf[..4], b"DKIF");
        let header = u16::from_le_bytes([ivf[6], ivf[7]]) as usize;
        let mut at = header;
        let mut frames = Vec::new();
        let mut params = None;
        while at + 12 <= ivf.len() {
            let size = u32::from_le_bytes(ivf[at..at + 4].try_into().unwrap()) as usize;
            let data = &ivf[at + 12..at + 12 + size];
            at += 12 + size;
            if let Some((width, height)) = vp8::keyframe_size(data) {
                params = Some(Arc::new(CodecParams::Vp8 { width, height }));
            }
            let pts = frames.len() as i64 * 3000;
            frames.push(Frame {
                pts,
                dts: pts,
                key: vp8::is_keyframe(data),
                data: data.to_vec().into(),
                params: params.clone().expect("starts on a keyframe"),
            });
        }
        frames
    }

    fn vp8_sample(seconds: u32, size: &str) -> Vec<Frame> {
        let out = std::process::Command::new("ffmpeg")
            .args(["-nostdin", "-v", "error", "-f", "lavfi", "-i"])
            .arg(format!("testsrc2=size={size}:rate=30"))
            .args(["-t", &seconds.to_string(), "-c:v", "libvpx", "-deadline"])
            .args(["realtime", "-cpu-used", "8", "-g", "45", "-b:v", "800k"])
            .args(["-f", "ivf", "-"])
            .output()
            .expect("ffmpeg");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        ivf_frames(&out.stdout)
    }

    use std::sync::Arc;

    #[test]
    fn vp8_becomes_h264_with_keyframes_on_the_grid() {
        let input = vp8_sample(5, "320x240");
        assert_eq!(input.len(), 150);
        let mut t = ToH264::new(VideoSettings::default()).unwrap();
        let mut out = Vec::new();
        for f in &input {
            out.extend(t.push(f).unwrap());
        }
        out.extend(t.flush().unwrap());
        assert_eq!(out.len(), 150, "{:?}", t.stats());
        // Every frame in, one frame out, same times.
        for (i, o) in input.iter().zip(&out) {
            assert_eq!(i.pts, o.pts);
            assert_eq!(o.dts, o.pts, "zerolatency: no reordering");
        }
        // The default rate: 0.1 bit per pixel at 30 fps, 230 kbit/s here.
        let bits: usize = out.iter().map(|f| f.data.len() * 8).sum();
        let rate = bits as f64 / 5.0;
        assert!((115_000.0..370_000.0).contains(&rate), "{rate} bit/s");
        let keys: Vec<i64> = out.iter().filter(|f| f.key).map(|f| f.pts).collect();
        assert_eq!(keys, vec![0, 2 * CLOCK_HZ, 4 * CLOCK_HZ]);
        match &*out[0].params {
            CodecParams::H264 { width, height, .. } => assert_eq!((*width, *height), (320, 240)),
            p => panic!("{p:?}"),
        }
        // The stream decodes cleanly.
        let es: Vec<u8> = out.iter().flat_map(|f| f.data.to_vec()).collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.h264");
        std::fs::write(&path, es).unwrap();
        let check = std::process::Command::new("ffmpeg")
            .args(["-nostdin", "-v", "error", "-i"])
            .arg(&path)
            .args(["-f", "null", "-"])
            .output()
            .unwrap();
        assert!(
            check.status.success() && check.stderr.is_empty(),
            "{}",
            String::from_utf8_lossy(&check.stderr)
        );
    }

    #[test]
    fn a_size_change_reopens_the_encoder_and_height_keeps_aspect() {
        let mut input = vp8_sample(1, "320x240");
        let second = vp8_sample(1, "640x360");
        let offset = input.len() as i64 * 3000;
        input.extend(second.into_iter().map(|mut f| {
            f.pts += offset;
            f.dts += offset;
            f
        }));
        let settings = VideoSettings {
            height: Some(180),
            ..Default::default()
        };
        let mut t = ToH264::new(settings).unwrap();
        let mut sizes = Vec::new();
        for f in &input {
            for o in t.push(f).unwrap() {
                if let CodecParams::H264 { width, height, .. } = &*o.params {
                    if sizes.last() != Some(&(*width, *height)) {
                        assert!(o.key, "a new size starts on a keyframe");
                        sizes.push((*width, *height));
                    }
                }
            }
        }
        t.flush().unwrap();
        assert_eq!(sizes, vec![(240, 180), (320, 180)]);
        assert_eq!(t.stats().encoder_opens, 2);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut t = ToH264::new(VideoSettings::default()).unwrap();
        let junk = Frame {
            pts: 0,
            dts: 0,
            key: true,
            data: vec![0x50, 1, 2, 3, 4, 5].into(),
            params: Arc::new(CodecParams::Vp8 {
                width: 16,
                height: 16,
            }),
        };
        let _ = t.push(&junk);
        assert!(
            t.push(&Frame {
                data: Vec::new().into(),
                ..junk.clone()
            })
            .is_err()
        );
        t.flush().unwrap();
    }
}
