//! Video to H264: for publishers whose codec the outputs cannot carry (VP8
//! from browsers), and for the encoded rungs of ABR ladders.
//!
//! [`ToH264`] is the synchronous core: hub frames in (VP8 or H264), H264
//! access units out on the same timeline, one output per rung. The input is
//! decoded once; each rung scales (swscale) and encodes (libx264 with
//! `zerolatency`: no B-frames, no lookahead, a frame in and a frame out, or
//! a hardware encoder when the preset asks for one).
//!
//! Keyframes decide where HLS segments are cut, so every rung of a stream
//! must put them at the same instants:
//! - when the published H264 is itself a rung (copied), every encoded rung
//!   makes a keyframe exactly where the source has one, and nowhere else;
//! - otherwise every rung makes one on a fixed grid of the stream timeline
//!   (`keyframe_interval`, the HLS segment duration).
//!
//! The encoder writes SPS and PPS before every IDR; its output goes through
//! [`H264Assembler`], the code WebRTC ingest uses, so the frames carry the
//! same parameters and checks as published H264. A change of the decoded
//! size reopens the encoders (new SPS: the HLS output marks a
//! discontinuity).

use ff::format::Pixel;
use ff::software::scaling;
use ff::{Dictionary, Packet, codec, decoder, encoder, frame, picture};
use ffmpeg_next as ff;

use super::worker::Core;
use super::{TranscodeError, ffmpeg_err};
use crate::media::frame::{CLOCK_HZ, Codec, Frame, TrackKind};
use crate::media::h264::H264Assembler;

/// How to encode one rung.
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
    /// Frame rate cap: frames closer than `1 / max_fps` to the last kept one
    /// are dropped (never a keyframe instant).
    pub max_fps: Option<f64>,
    /// Keyframes at every multiple of this on the stream timeline, ticks
    /// (when the keyframes do not follow a copied source).
    pub keyframe_interval: i64,
    /// FFmpeg encoder: `libx264`, `h264_nvenc`, …, or `auto` (a hardware
    /// encoder that opens, else libx264).
    pub encoder: String,
    /// x264 `preset`, `tune` and `profile` (`profile` for every encoder).
    pub preset: String,
    pub tune: String,
    pub profile: String,
    /// H264 level, e.g. `"4.1"`.
    pub level: Option<String>,
    /// Encode published H264 too. `false` for the rung that stands in for
    /// the copied source when the publisher sends another codec (VP8).
    pub for_h264_input: bool,
}

impl Default for VideoSettings {
    fn default() -> Self {
        Self {
            width: None,
            height: None,
            bitrate: None,
            maxrate: None,
            bufsize: None,
            max_fps: None,
            keyframe_interval: 2 * CLOCK_HZ,
            encoder: "libx264".into(),
            preset: "veryfast".into(),
            tune: "zerolatency".into(),
            profile: "high".into(),
            level: None,
            for_h264_input: true,
        }
    }
}

/// Hardware encoders `auto` tries, in order, before libx264.
const AUTO_ENCODERS: &[&str] = &["h264_nvenc"];

/// Counters of one video transcoder, over all its rungs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VideoStats {
    pub frames_in: u64,
    pub frames_out: u64,
    pub keyframes_out: u64,
    /// Input the decoder refused.
    pub undecodable: u64,
    /// Times an encoder was (re)opened for a new size.
    pub encoder_opens: u64,
    /// Frames left out by a rung's frame rate cap.
    pub dropped_fps: u64,
    /// Frames a rung failed to encode (its encoder would not open).
    pub rung_errors: u64,
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

/// One output of the transcoder.
struct Rung {
    settings: VideoSettings,
    encoding: Option<Encoding>,
    assembler: H264Assembler,
    /// The next keyframe time on the grid.
    next_key: i64,
    /// Time of the last frame encoded (for the frame rate cap).
    last_kept: Option<i64>,
}

pub struct ToH264 {
    rungs: Vec<Rung>,
    decoder: Option<(Codec, decoder::Video)>,
    /// The codec the publication's video comes in (its first video frame's):
    /// frames of other codecs are not the publisher's (the H264 a VP8
    /// source is encoded to comes back through the hub) and are ignored.
    input: Option<Codec>,
    out: Vec<(usize, Frame)>,
    stats: VideoStats,
}

impl ToH264 {
    /// A transcoder with one output.
    pub fn new(settings: VideoSettings) -> Result<Self, TranscodeError> {
        Self::ladder(vec![settings])
    }

    /// A transcoder with one output per `rungs` entry, numbered in order.
    pub fn ladder(rungs: Vec<VideoSettings>) -> Result<Self, TranscodeError> {
        super::init_ffmpeg();
        if rungs.is_empty() {
            return Err(TranscodeError::InvalidSettings("no rungs".into()));
        }
        for s in &rungs {
            if s.keyframe_interval <= 0 {
                return Err(TranscodeError::InvalidSettings(
                    "keyframe interval must be positive".into(),
                ));
            }
            if s.max_fps.is_some_and(|f| !(f.is_finite() && f > 0.0)) {
                return Err(TranscodeError::InvalidSettings(
                    "max_fps must be positive".into(),
                ));
            }
        }
        if encoder::find_by_name("libx264").is_none() {
            return Err(TranscodeError::CodecNotFound("libx264 encoder"));
        }
        Ok(Self {
            rungs: rungs
                .into_iter()
                .map(|settings| Rung {
                    settings,
                    encoding: None,
                    assembler: H264Assembler::new(),
                    next_key: 0,
                    last_kept: None,
                })
                .collect(),
            decoder: None,
            input: None,
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

    /// Whether rung `rung` encodes the current input.
    fn active(&self, rung: usize) -> bool {
        self.rungs[rung].settings.for_h264_input || self.input != Some(Codec::H264)
    }

    /// Keyframes follow the source's: the published H264 is copied as a
    /// rung of its own (a rung stands in for it with other codecs).
    fn follows_source(&self) -> bool {
        self.input == Some(Codec::H264) && self.rungs.iter().any(|r| !r.settings.for_h264_input)
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
            let Some(pts) = decoded.timestamp().or(decoded.pts()) else {
                continue;
            };
            let source_key = decoded.is_key();
            let follow = self.follows_source();
            for i in 0..self.rungs.len() {
                if !self.active(i) {
                    continue;
                }
                let rung = &mut self.rungs[i];
                let key = if follow {
                    source_key
                } else {
                    pts >= rung.next_key
                };
                let interval = rung.settings.keyframe_interval;
                if !follow && key {
                    rung.next_key = (pts / interval + 1) * interval;
                }
                if !key && rung.capped(pts) {
                    self.stats.dropped_fps += 1;
                    continue;
                }
                rung.last_kept = Some(pts);
                let encoded = rung.encode(&decoded, pts, key, &mut self.stats);
                self.out.extend(encoded.frames.into_iter().map(|f| (i, f)));
                // One rung's failure (an encoder that cannot open) does not
                // stop the others, nor delay their frames: it is counted
                // and logged (the first, then every 300th).
                if let Err(error) = encoded.result {
                    if self.stats.rung_errors.is_multiple_of(300) {
                        tracing::warn!(rung = i, encoder = %rung.settings.encoder, %error, "rendition not encoded");
                    }
                    self.stats.rung_errors += 1;
                }
            }
        }
    }

    pub fn push(&mut self, frame: &Frame) -> Result<Vec<(usize, Frame)>, TranscodeError> {
        self.stats.frames_in += 1;
        let codec = frame.codec();
        if codec.kind() != TrackKind::Video {
            return Err(TranscodeError::WrongCodec(codec));
        }
        if *self.input.get_or_insert(codec) != codec {
            return Ok(Vec::new());
        }
        if !(0..self.rungs.len()).any(|i| self.active(i)) {
            return Ok(Vec::new());
        }
        if frame.data.is_empty() {
            return Err(TranscodeError::EmptyPacket);
        }
        let mut packet = Packet::copy(&frame.data);
        packet.set_pts(Some(frame.pts));
        packet.set_dts(Some(frame.dts));
        if frame.key {
            packet.set_flags(ff::packet::Flags::KEY);
        }
        let sent = self.decoder(codec)?.send_packet(&packet);
        if let Err(e) = sent {
            self.stats.undecodable += 1;
            return Err(TranscodeError::Decode(e));
        }
        self.decode_all()?;
        Ok(std::mem::take(&mut self.out))
    }

    pub fn flush(&mut self) -> Result<Vec<(usize, Frame)>, TranscodeError> {
        if let Some((_, d)) = self.decoder.as_mut() {
            let _ = d.send_eof();
            self.decode_all()?;
        }
        for i in 0..self.rungs.len() {
            let finished = self.rungs[i].finish_encoder(&mut self.stats);
            self.out.extend(finished.frames.into_iter().map(|f| (i, f)));
            finished.result?;
        }
        Ok(std::mem::take(&mut self.out))
    }

    pub fn stats(&self) -> VideoStats {
        self.stats
    }
}

/// What a rung made, and whether it failed on the way.
struct Encoded {
    frames: Vec<Frame>,
    result: Result<(), TranscodeError>,
}

impl Rung {
    /// The frame at `pts` is over the frame rate cap.
    fn capped(&self, pts: i64) -> bool {
        let (Some(max), Some(last)) = (self.settings.max_fps, self.last_kept) else {
            return false;
        };
        // 5% slack for the jitter of WebRTC timestamps.
        let gap = CLOCK_HZ as f64 / max * 0.95;
        ((pts - last) as f64) < gap
    }

    /// The output size for a decoded `w`×`h`.
    /// A rung given only a height (or width) never upscales: a smaller
    /// source is encoded at its own size (more pixels than the source has
    /// cost CPU and bits for no picture).
    fn target_size(&self, w: u32, h: u32) -> (u32, u32) {
        let even = |v: u32| (v.max(2) + 1) & !1;
        match (self.settings.width, self.settings.height) {
            (Some(tw), Some(th)) => (even(tw), even(th)),
            (None, Some(_)) | (Some(_), None) if self.upscales(w, h) => (even(w), even(h)),
            (None, Some(th)) => {
                let tw = (u64::from(w) * u64::from(th) / u64::from(h.max(1))) as u32;
                (even(tw), even(th))
            }
            (Some(tw), None) => {
                let th = (u64::from(h) * u64::from(tw) / u64::from(w.max(1))) as u32;
                (even(tw), even(th))
            }
            _ => (even(w), even(h)),
        }
    }

    fn upscales(&self, w: u32, h: u32) -> bool {
        self.settings.width.is_some_and(|tw| tw > w)
            || self.settings.height.is_some_and(|th| th > h)
    }

    fn open_encoder(
        &mut self,
        width: u32,
        height: u32,
        stats: &mut VideoStats,
    ) -> Result<encoder::Video, TranscodeError> {
        let candidates: Vec<&str> = match self.settings.encoder.as_str() {
            "auto" => AUTO_ENCODERS.iter().copied().chain(["libx264"]).collect(),
            name => vec![name],
        };
        let mut last = TranscodeError::CodecNotFound("H264 encoder");
        for name in candidates {
            match self.open_named(name, width, height) {
                Ok(e) => {
                    stats.encoder_opens += 1;
                    return Ok(e);
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn open_named(
        &self,
        name: &str,
        width: u32,
        height: u32,
    ) -> Result<encoder::Video, TranscodeError> {
        let s = &self.settings;
        let found = encoder::find_by_name(name).ok_or(TranscodeError::CodecNotFound("encoder"))?;
        let mut enc = codec::Context::new_with_codec(found)
            .encoder()
            .video()
            .map_err(ffmpeg_err("video encoder context"))?;
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
        // Keyframes are forced by us; the encoder adds none of its own.
        enc.set_gop(u32::MAX / 2);
        enc.set_max_b_frames(0);
        let bufsize = s.bufsize.unwrap_or(bitrate.saturating_mul(2));
        let mut opts = Dictionary::new();
        opts.set("profile", &s.profile);
        opts.set("forced-idr", "1");
        if let Some(level) = &s.level {
            opts.set("level", level);
        }
        if name == "libx264" {
            opts.set("preset", &s.preset);
            opts.set("tune", &s.tune);
            opts.set(
                "x264-params",
                &format!(
                    "repeat-headers=1:scenecut=0:threads=1:vbv-bufsize={}",
                    bufsize / 1000
                ),
            );
        } else {
            // NVENC: low-latency, SPS/PPS before every IDR.
            opts.set("preset", "p4");
            opts.set("tune", "ll");
            opts.set("zerolatency", "1");
            opts.set("repeat-headers", "1");
            opts.set("bufsize", &bufsize.to_string());
        }
        enc.open_with(opts)
            .map_err(ffmpeg_err("open video encoder"))
    }

    /// Drains and closes the current encoder, if any.
    fn finish_encoder(&mut self, stats: &mut VideoStats) -> Encoded {
        let mut frames = Vec::new();
        let result = match self.encoding.take() {
            Some(mut e) => e
                .encoder
                .send_eof()
                .map_err(ffmpeg_err("encoder flush"))
                .map(|()| self.drain(&mut e.encoder, &mut frames, stats)),
            None => Ok(()),
        };
        Encoded { frames, result }
    }

    fn drain(&mut self, enc: &mut encoder::Video, out: &mut Vec<Frame>, stats: &mut VideoStats) {
        let mut packet = Packet::empty();
        while enc.receive_packet(&mut packet).is_ok() {
            let (Some(data), Some(pts)) = (packet.data(), packet.pts()) else {
                continue;
            };
            if let Some(f) = self.assembler.push(data, pts, true).frame {
                stats.frames_out += 1;
                stats.keyframes_out += u64::from(f.key);
                out.push(f);
            }
        }
    }

    fn encode(
        &mut self,
        decoded: &frame::Video,
        pts: i64,
        key: bool,
        stats: &mut VideoStats,
    ) -> Encoded {
        let mut encoded = Encoded {
            frames: Vec::new(),
            result: Ok(()),
        };
        let (w, h) = self.target_size(decoded.width(), decoded.height());
        if self
            .encoding
            .as_ref()
            .is_none_or(|e| (e.width, e.height) != (w, h))
        {
            encoded = self.finish_encoder(stats);
            if encoded.result.is_err() {
                return encoded;
            }
            match self.open_encoder(w, h, stats) {
                Ok(encoder) => {
                    self.encoding = Some(Encoding {
                        encoder,
                        width: w,
                        height: h,
                        scaler: None,
                    })
                }
                Err(e) => {
                    encoded.result = Err(e);
                    return encoded;
                }
            }
        }
        let Some(mut e) = self.encoding.take() else {
            return encoded;
        };
        encoded.result = (|| {
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
            input.set_kind(if key {
                picture::Type::I
            } else {
                picture::Type::None
            });
            e.encoder
                .send_frame(&input)
                .map_err(ffmpeg_err("video encode"))
        })();
        self.drain(&mut e.encoder, &mut encoded.frames, stats);
        self.encoding = Some(e);
        encoded
    }
}

impl Core for ToH264 {
    type Stats = VideoStats;
    type Out = (usize, Frame);
    const NAME: &'static str = "h264";

    fn push(&mut self, frame: &Frame) -> Result<Vec<(usize, Frame)>, TranscodeError> {
        ToH264::push(self, frame)
    }

    fn flush(&mut self) -> Result<Vec<(usize, Frame)>, TranscodeError> {
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
            out.extend(t.push(f).unwrap().into_iter().map(|(_, f)| f));
        }
        out.extend(t.flush().unwrap().into_iter().map(|(_, f)| f));
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
            for (_, o) in t.push(f).unwrap() {
                if let CodecParams::H264 { width, height, .. } = &*o.params
                    && sizes.last() != Some(&(*width, *height))
                {
                    assert!(o.key, "a new size starts on a keyframe");
                    sizes.push((*width, *height));
                }
            }
        }
        t.flush().unwrap();
        assert_eq!(sizes, vec![(240, 180), (320, 180)]);
        assert_eq!(t.stats().encoder_opens, 2);
    }

    /// H264 from x264 with keyframes every `gop` frames, 30 fps, as frames.
    fn h264_sample(seconds: u32, gop: u32) -> Vec<Frame> {
        let out = std::process::Command::new("ffmpeg")
            .args(["-nostdin", "-v", "error", "-f", "lavfi", "-i"])
            .arg("testsrc2=size=320x240:rate=30")
            .args(["-t", &seconds.to_string(), "-c:v", "libx264", "-preset"])
            .args(["ultrafast", "-bf", "0", "-sc_threshold", "0", "-g"])
            .arg(gop.to_string())
            .args(["-bsf:v", "h264_metadata=aud=insert", "-f", "h264", "-"])
            .output()
            .expect("ffmpeg");
        assert!(out.status.success());
        crate::media::h264::elementary_stream_frames(&out.stdout, 3000).unwrap()
    }

    #[test]
    fn ladder_rungs_key_where_the_copied_source_does_and_cap_the_frame_rate() {
        // Keyframes every 40 frames (1.33 s): off the 2 s grid on purpose.
        let input = h264_sample(4, 40);
        let source_keys: Vec<i64> = input.iter().filter(|f| f.key).map(|f| f.pts).collect();
        assert_eq!(source_keys, vec![0, 120_000, 240_000]);
        let rung = |height, max_fps| VideoSettings {
            height: Some(height),
            max_fps,
            ..Default::default()
        };
        let stand_in = VideoSettings {
            for_h264_input: false,
            ..Default::default()
        };
        let mut t = ToH264::ladder(vec![rung(180, None), stand_in, rung(120, Some(15.0))]).unwrap();
        let mut out: Vec<(usize, Frame)> = Vec::new();
        for f in &input {
            out.extend(t.push(f).unwrap());
        }
        out.extend(t.flush().unwrap());
        let of = |i: usize| -> Vec<&Frame> {
            out.iter()
                .filter(|(r, _)| *r == i)
                .map(|(_, f)| f)
                .collect()
        };
        // The stand-in for the source encodes nothing: the source is H264.
        assert!(of(1).is_empty());
        for rung in [0, 2] {
            let keys: Vec<i64> = of(rung).iter().filter(|f| f.key).map(|f| f.pts).collect();
            assert_eq!(keys, source_keys, "rung {rung}");
        }
        assert_eq!(of(0).len(), 120);
        // 15 fps: every other frame (keyframes always kept).
        assert_eq!(of(2).len(), 60, "{:?}", t.stats());
        assert_eq!(t.stats().dropped_fps, 60);
        match &*of(2)[0].params {
            CodecParams::H264 { width, height, .. } => assert_eq!((*width, *height), (160, 120)),
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn a_vp8_source_gets_its_stand_in_and_the_grid() {
        let input = vp8_sample(3, "320x240");
        let stand_in = VideoSettings {
            for_h264_input: false,
            ..Default::default()
        };
        let small = VideoSettings {
            height: Some(120),
            ..Default::default()
        };
        let mut t = ToH264::ladder(vec![stand_in, small]).unwrap();
        let mut out: Vec<(usize, Frame)> = Vec::new();
        for f in &input {
            out.extend(t.push(f).unwrap());
        }
        // Our own H264 coming back through the hub is not the input.
        let own = out[0].1.clone();
        assert!(t.push(&own).unwrap().is_empty());
        out.extend(t.flush().unwrap());
        for rung in [0, 1] {
            let frames: Vec<&Frame> = out
                .iter()
                .filter(|(r, _)| *r == rung)
                .map(|(_, f)| f)
                .collect();
            assert_eq!(frames.len(), 90, "rung {rung}");
            let keys: Vec<i64> = frames.iter().filter(|f| f.key).map(|f| f.pts).collect();
            assert_eq!(keys, vec![0, 2 * CLOCK_HZ], "rung {rung}: the 2 s grid");
        }
    }

    #[test]
    fn a_rung_above_the_source_is_not_upscaled() {
        let input = vp8_sample(1, "320x240");
        let rung = |width, height| VideoSettings {
            width,
            height,
            ..Default::default()
        };
        let mut t = ToH264::ladder(vec![
            rung(None, Some(480)),
            rung(Some(1280), None),
            rung(Some(640), Some(480)),
        ])
        .unwrap();
        let mut sizes = [None; 3];
        for f in &input {
            for (i, o) in t.push(f).unwrap() {
                if let CodecParams::H264 { width, height, .. } = &*o.params {
                    sizes[i] = Some((*width, *height));
                }
            }
        }
        // Height or width alone: the source's size; both: exactly that.
        assert_eq!(
            sizes,
            [Some((320, 240)), Some((320, 240)), Some((640, 480))]
        );
    }

    #[test]
    fn auto_falls_back_to_libx264_and_a_missing_encoder_is_an_error() {
        let input = vp8_sample(1, "320x240");
        let auto = VideoSettings {
            encoder: "auto".into(),
            ..Default::default()
        };
        let missing = VideoSettings {
            encoder: "h264_nonexistent".into(),
            ..Default::default()
        };
        let mut t = ToH264::ladder(vec![auto, missing]).unwrap();
        let mut out = Vec::new();
        for f in &input {
            out.extend(t.push(f).unwrap());
        }
        out.extend(t.flush().unwrap());
        // No GPU here: `auto` encodes with libx264, every frame; the rung
        // whose encoder does not exist counts its failures and makes
        // nothing, without holding the other back.
        assert_eq!(t.stats().rung_errors, input.len() as u64);
        assert!(out.iter().all(|(rung, _)| *rung == 0));
        assert_eq!(out.len(), input.len());
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
