//! Opus → AAC-LC, for outputs that cannot carry Opus (MPEG-TS HLS players, RTMP).
//!
//! [`OpusToAac`] is the synchronous core: Opus packets in, raw AAC frames out,
//! on the hub's 90 kHz timeline. The server runs one per publication in the
//! stream's AAC reader task (`rendition::run_aac`); it is also a worker
//! [`Core`], for running it on a thread of its own.
//!
//! Pipeline: FFmpeg's Opus decoder (native, libopus as fallback), always
//! decoding to stereo (mono-coded Opus packets are upmixed by the decoder) →
//! swresample to the encoder's planar float layout/rate when needed → a FIFO
//! that cuts exactly `frame_size` (1024) samples per encoder call → an AAC-LC
//! encoder: [syom](https://crates.io/crates/syom) (pure Rust, the default)
//! or FFmpeg's native `aac` encoder (see [`AacCoder`] for how they compare).
//!
//! Timestamps: output frame `k` of a run is stamped `anchor + k * 1024`
//! samples (1920 ticks at 48 kHz), where the anchor is the pts of the first
//! input packet; the input pts are only compared with that position:
//! - within [`SYNC_TOLERANCE`] (20 ms): taken as continuous;
//! - ahead by up to [`RESYNC_THRESHOLD`] (100 ms, a lost packet): the hole
//!   is filled with silence, the output stays continuous and in sync;
//! - ahead by more (DTX silence, a publisher pause): the partial frame in
//!   the FIFO is padded with silence and a new anchor is taken at the input
//!   pts; the output jumps forward;
//! - behind by [`SYNC_TOLERANCE`] or more (the timeline was pulled back,
//!   e.g. by a lip-sync correction): packets are dropped until it catches
//!   up; beyond [`MAX_CATCHUP`] (1 s) the input timeline is treated as reset
//!   and re-based, so the output stays continuous.
//!
//! Output timestamps never go backwards.
//!
//! The encoder's 1024-sample priming delay is not subtracted (that would make
//! the first pts negative): the decoded audio sits ~21 ms after its stamps,
//! well inside lip-sync tolerance.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use ff::format::Sample;
use ff::format::sample::Type as SampleType;
use ff::software::resampling;
use ff::util::error::EAGAIN;
use ff::{ChannelLayout, Packet, codec, decoder, encoder, frame};
use ffmpeg_next as ff;

use super::worker::Core;
use crate::media::frame::{CLOCK_HZ, Codec, CodecParams, Frame};

/// Input/output misalignment (90 kHz ticks) that triggers a resync: 100 ms.
pub const RESYNC_THRESHOLD: i64 = CLOCK_HZ / 10;

/// Misalignment (90 kHz ticks, 20 ms = one usual Opus packet) below which
/// the input is taken as continuous. Between this and [`RESYNC_THRESHOLD`]
/// a hole in the input is filled with silence and input that is behind is
/// dropped, so the output stays continuous and within 20 ms of the input.
pub const SYNC_TOLERANCE: i64 = CLOCK_HZ / 50;

/// Input behind the output by more than this (90 kHz ticks, 1 s) is taken as
/// a timeline reset rather than something to catch up with by dropping.
pub const MAX_CATCHUP: i64 = CLOCK_HZ;

/// Sample rate of decoded Opus.
const OPUS_RATE: u32 = 48_000;

/// Which AAC-LC encoder, and for FFmpeg's, which search strategy (its
/// `aac_coder` option).
///
/// Measured with `examples/aac_quality.rs` on this project's 2-core EPYC
/// machine (the whole transcode minus Opus decoding, 48 kHz stereo at
/// 128 kb/s), in % of one core:
///
/// | encoder | the sample's test tone | music |
/// |---|---|---|
/// | `Syom` | 0.17 | 0.60 |
/// | `Fast` | 1.33 | 0.77 |
/// | `TwoLoop` | 2.08 | 1.92 |
///
/// On music syom's noise-to-mask ratio equals `Fast`'s; on pure tones
/// FFmpeg's coders leave less noise (README, "Audio encoder").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AacCoder {
    /// syom's AAC-LC encoder (pure Rust): psychoacoustic model, block
    /// switching, per-band M/S stereo, ABR within a few % of the bitrate.
    #[default]
    Syom,
    /// FFmpeg's native encoder, `aac_coder=fast`.
    Fast,
    /// FFmpeg's native encoder with its default `twoloop` coder.
    TwoLoop,
}

impl AacCoder {
    pub fn as_str(self) -> &'static str {
        match self {
            AacCoder::Syom => "syom",
            AacCoder::Fast => "fast",
            AacCoder::TwoLoop => "twoloop",
        }
    }
}

/// What the AAC output looks like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AacSettings {
    /// Bits per second. Default 128 kb/s: near-transparent for stereo
    /// AAC-LC and the encoder held it exactly (measured 128 kb/s average,
    /// 96 kb/s when asked for 96); bitrate barely changes CPU cost.
    pub bitrate: u32,
    /// Output sample rate; 48 000 keeps frames on whole 90 kHz ticks (1920).
    pub sample_rate: u32,
    /// 1 or 2.
    pub channels: u8,
    pub coder: AacCoder,
}

impl Default for AacSettings {
    fn default() -> Self {
        AacSettings {
            bitrate: 128_000,
            sample_rate: 48_000,
            channels: 2,
            coder: AacCoder::default(),
        }
    }
}

pub use super::{TranscodeError, ffmpeg_err};

/// Counters of one transcoder, for logs and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TranscodeStats {
    /// Opus packets accepted by `push` (including undecodable ones).
    pub packets_in: u64,
    /// AAC frames produced.
    pub frames_out: u64,
    /// Packets the decoder rejected.
    pub decode_errors: u64,
    /// Forward jumps of the input timeline followed by the output.
    pub resyncs: u64,
    /// Short holes in the input filled with silence.
    pub silence_filled: u64,
    /// Packets dropped because they were behind the output timeline.
    pub dropped_late: u64,
    /// Backward jumps treated as a timeline reset.
    pub rebases: u64,
}

/// Output sample index (at the output rate) mapped to a hub pts.
#[derive(Debug, Clone, Copy)]
struct Anchor {
    samples: i64,
    pts: i64,
}

/// Opus → AAC-LC transcoder. Synchronous; not tied to any runtime.
pub struct OpusToAac {
    settings: AacSettings,
    decoder: decoder::Audio,
    resampler: Option<resampling::Context>,
    encoder: AacEncoder,
    params: Arc<CodecParams>,
    out_layout: ChannelLayout,
    frame_size: usize,
    /// Encoder delay in samples: packet pts + priming = first sample of the
    /// encoder input frame the packet belongs to.
    priming: i64,
    /// One FIFO per output channel; holds less than `frame_size` samples
    /// between calls.
    fifo: Vec<Vec<f32>>,
    /// Output sample index of `fifo[_][0]`.
    samples_encoded: i64,
    /// Sample index of the next packet if the encoder gives no pts.
    next_packet_pos: i64,
    anchors: VecDeque<Anchor>,
    /// Added to input pts after a timeline reset.
    offset: i64,
    last_out: Option<i64>,
    /// Frames produced but not yet returned (returned by the next
    /// successful call, so an error never loses output).
    pending: Vec<Frame>,
    finished: bool,
    stats: TranscodeStats,
}

impl OpusToAac {
    pub fn new(settings: AacSettings) -> Result<Self, TranscodeError> {
        super::init_ffmpeg();
        let out_layout = match settings.channels {
            1 => ChannelLayout::MONO,
            2 => ChannelLayout::STEREO,
            n => {
                return Err(TranscodeError::InvalidSettings(format!(
                    "AAC channels must be 1 or 2, not {n}"
                )));
            }
        };
        if !(8_000..=96_000).contains(&settings.sample_rate) {
            return Err(TranscodeError::InvalidSettings(format!(
                "AAC sample rate {} out of range",
                settings.sample_rate
            )));
        }
        if !(8_000..=512_000).contains(&settings.bitrate) {
            return Err(TranscodeError::InvalidSettings(format!(
                "AAC bitrate {} out of range",
                settings.bitrate
            )));
        }

        let decoder = open_opus_decoder()?;
        let (encoder, asc) = AacEncoder::open(&settings, out_layout)?;
        let frame_size = encoder.frame_size();
        let priming = encoder.priming();
        let asc = trim_lc_asc(asc);
        if asc.is_empty() {
            return Err(TranscodeError::InvalidSettings(
                "AAC encoder produced no AudioSpecificConfig".into(),
            ));
        }
        let params = Arc::new(CodecParams::Aac {
            asc,
            sample_rate: settings.sample_rate,
            channels: settings.channels,
        });

        Ok(OpusToAac {
            fifo: vec![Vec::with_capacity(frame_size * 2); usize::from(settings.channels)],
            settings,
            decoder,
            resampler: None,
            encoder,
            params,
            out_layout,
            frame_size,
            priming,
            samples_encoded: 0,
            next_packet_pos: 0,
            anchors: VecDeque::new(),
            offset: 0,
            last_out: None,
            pending: Vec::new(),
            finished: false,
            stats: TranscodeStats::default(),
        })
    }

    /// Codec parameters carried by every output frame (the same `Arc`).
    pub fn params(&self) -> Arc<CodecParams> {
        self.params.clone()
    }

    pub fn settings(&self) -> &AacSettings {
        &self.settings
    }

    pub fn stats(&self) -> TranscodeStats {
        self.stats
    }

    /// Transcode one Opus packet. Returns the AAC frames that became ready
    /// (often none or one). An `Err` concerns this packet only: the
    /// transcoder stays usable.
    pub fn push(&mut self, frame: &Frame) -> Result<Vec<Frame>, TranscodeError> {
        if self.finished {
            return Err(TranscodeError::Finished);
        }
        if frame.codec() != Codec::Opus {
            return Err(TranscodeError::WrongCodec(frame.codec()));
        }
        if frame.data.is_empty() {
            // An empty packet would put the FFmpeg decoder in draining mode.
            return Err(TranscodeError::EmptyPacket);
        }
        self.stats.packets_in += 1;

        let in_pts = frame.pts.saturating_add(self.offset);
        if self.anchors.is_empty() {
            self.anchors.push_back(Anchor {
                samples: self.queued_samples(),
                pts: in_pts,
            });
        } else {
            let expected = self.position(self.queued_samples());
            let drift = in_pts.saturating_sub(expected);
            if drift > RESYNC_THRESHOLD {
                self.pad_to_frame()?;
                tracing::debug!(drift, pts = in_pts, "aac: input jumped ahead, resync");
                self.anchors.push_back(Anchor {
                    samples: self.queued_samples(),
                    pts: in_pts,
                });
                self.stats.resyncs += 1;
            } else if drift < -MAX_CATCHUP {
                tracing::debug!(drift, "aac: input timeline went back, rebasing");
                self.offset = self.offset.saturating_sub(drift);
                self.stats.rebases += 1;
            } else if drift <= -SYNC_TOLERANCE {
                // Behind the output: skip input until caught up.
                self.stats.dropped_late += 1;
                return Ok(std::mem::take(&mut self.pending));
            } else if drift >= SYNC_TOLERANCE {
                // A short hole (a lost packet): fill it with silence, the
                // output stays continuous and in sync.
                let samples = drift * i64::from(self.settings.sample_rate) / CLOCK_HZ;
                for channel in &mut self.fifo {
                    channel.resize(channel.len() + samples as usize, 0.0);
                }
                self.stats.silence_filled += 1;
            }
        }

        if let Err(e) = self.decode(&frame.data) {
            if matches!(e, TranscodeError::Decode(_)) {
                self.stats.decode_errors += 1;
            }
            return Err(e);
        }
        self.encode_ready()?;
        Ok(std::mem::take(&mut self.pending))
    }

    /// End of stream: encode what is buffered and drain the encoder. After
    /// this, `push` returns [`TranscodeError::Finished`].
    pub fn flush(&mut self) -> Result<Vec<Frame>, TranscodeError> {
        if self.finished {
            return Ok(std::mem::take(&mut self.pending));
        }
        self.finished = true;
        if self.resampler.as_ref().is_some_and(|r| r.delay().is_some()) {
            let mut out = new_planar_frame(
                4096,
                self.out_layout,
                self.settings.channels,
                self.settings.sample_rate,
            )?;
            if let Some(resampler) = self.resampler.as_mut() {
                resampler
                    .flush(&mut out)
                    .map_err(ffmpeg_err("swresample flush"))?;
                append_planar(&mut self.fifo, &out)?;
            }
        }
        self.pad_to_frame()?;
        self.encoder.send_eof()?;
        self.drain_encoder()?;
        Ok(std::mem::take(&mut self.pending))
    }

    /// Output sample index of the next sample to enter the FIFO.
    fn queued_samples(&self) -> i64 {
        self.samples_encoded + self.fifo.first().map_or(0, |c| c.len() as i64)
    }

    /// Hub pts of output sample index `samples`, on the latest anchor.
    fn position(&self, samples: i64) -> i64 {
        let Some(a) = self.anchors.back() else {
            return 0;
        };
        a.pts
            .saturating_add(ticks(samples - a.samples, self.settings.sample_rate))
    }

    fn decode(&mut self, data: &[u8]) -> Result<(), TranscodeError> {
        let packet = Packet::copy(data);
        self.decoder
            .send_packet(&packet)
            .map_err(TranscodeError::Decode)?;
        let mut decoded = frame::Audio::empty();
        loop {
            match self.decoder.receive_frame(&mut decoded) {
                Ok(()) => self.queue_decoded(&decoded)?,
                Err(ff::Error::Other { errno }) if errno == EAGAIN => return Ok(()),
                Err(ff::Error::Eof) => return Ok(()),
                Err(e) => return Err(TranscodeError::Decode(e)),
            }
        }
    }

    /// Convert one decoded frame to the output layout and append it to the
    /// FIFO.
    fn queue_decoded(&mut self, decoded: &frame::Audio) -> Result<(), TranscodeError> {
        let samples = decoded.samples();
        if samples == 0 {
            return Ok(());
        }
        let mut layout = decoded.channel_layout();
        if layout.is_empty() {
            layout = ChannelLayout::default(i32::from(decoded.channels()));
        }
        let input = resampling::context::Definition {
            format: decoded.format(),
            channel_layout: layout,
            rate: decoded.rate(),
        };
        let out_format = Sample::F32(SampleType::Planar);
        if input.format == out_format
            && input.channel_layout == self.out_layout
            && input.rate == self.settings.sample_rate
        {
            return append_planar(&mut self.fifo, decoded);
        }

        if self.resampler.as_ref().is_none_or(|r| *r.input() != input) {
            let r = resampling::Context::get(
                input.format,
                input.channel_layout,
                input.rate,
                out_format,
                self.out_layout,
                self.settings.sample_rate,
            )
            .map_err(ffmpeg_err("swresample setup"))?;
            self.resampler = Some(r);
        }
        let Some(resampler) = self.resampler.as_mut() else {
            return Ok(());
        };
        let capacity =
            samples * self.settings.sample_rate as usize / input.rate.max(1) as usize + 256;
        let mut out = new_planar_frame(
            capacity,
            self.out_layout,
            self.settings.channels,
            self.settings.sample_rate,
        )?;
        resampler
            .run(decoded, &mut out)
            .map_err(ffmpeg_err("swresample"))?;
        append_planar(&mut self.fifo, &out)
    }

    /// Pad a partial frame in the FIFO with silence and encode it, so the
    /// next sample starts a new encoder frame.
    fn pad_to_frame(&mut self) -> Result<(), TranscodeError> {
        let len = self.fifo.first().map_or(0, Vec::len);
        let target = len.div_ceil(self.frame_size) * self.frame_size;
        if target != len {
            for channel in &mut self.fifo {
                channel.resize(target, 0.0);
            }
        }
        self.encode_ready()
    }

    /// Feed every whole `frame_size` chunk of the FIFO to the encoder.
    fn encode_ready(&mut self) -> Result<(), TranscodeError> {
        let n = self.frame_size;
        while self.fifo.first().is_some_and(|c| c.len() >= n) {
            let result = self.encoder.send(&self.fifo, n, self.samples_encoded);
            for channel in &mut self.fifo {
                channel.drain(..n);
            }
            self.samples_encoded += n as i64;
            result?;
            self.drain_encoder()?;
        }
        Ok(())
    }

    fn drain_encoder(&mut self) -> Result<(), TranscodeError> {
        while let Some((pts, data)) = self.encoder.receive()? {
            let pos = pts.map_or(self.next_packet_pos, |p| p + self.priming);
            self.next_packet_pos = pos + self.frame_size as i64;
            if data.is_empty() {
                continue;
            }
            let Some(pts) = self.stamp(pos) else {
                continue;
            };
            self.stats.frames_out += 1;
            self.pending.push(Frame {
                pts,
                dts: pts,
                key: true,
                data,
                params: self.params.clone(),
            });
        }
        Ok(())
    }

    /// Hub pts of the encoder frame starting at output sample `pos`.
    fn stamp(&mut self, pos: i64) -> Option<i64> {
        while self.anchors.len() > 1 && self.anchors[1].samples <= pos {
            self.anchors.pop_front();
        }
        let a = *self.anchors.front()?;
        let mut pts = a
            .pts
            .saturating_add(ticks(pos - a.samples, self.settings.sample_rate));
        match self.last_out {
            Some(last) if pts <= last => pts = last.saturating_add(1),
            _ => {}
        }
        self.last_out = Some(pts);
        Some(pts)
    }
}

/// FFmpeg's AAC encoder appends an explicit "no SBR" sync extension
/// (0x2b7) to its AudioSpecificConfig: `11 90 56 e5 00` for 48 kHz stereo.
/// When the first two bytes are a complete AAC-LC config (object type 2, no
/// escaped rate, GASpecificConfig flags all zero) keep just those: the
/// canonical form (HLS `mp4a.40.2`, FLV sequence headers, ADTS derivation).
fn trim_lc_asc(asc: Bytes) -> Bytes {
    if asc.len() > 2
        && asc[0] >> 3 == 2
        && (asc[0] & 0x07) << 1 | asc[1] >> 7 != 15
        && asc[1] & 0x07 == 0
    {
        asc.slice(..2)
    } else {
        asc
    }
}

/// `samples` at `rate` in 90 kHz ticks (rounded toward zero).
fn ticks(samples: i64, rate: u32) -> i64 {
    samples.saturating_mul(CLOCK_HZ) / i64::from(rate.max(1))
}

fn open_opus_decoder() -> Result<decoder::Audio, TranscodeError> {
    let codec = decoder::find_by_name("opus")
        .or_else(|| decoder::find_by_name("libopus"))
        .ok_or(TranscodeError::CodecNotFound("opus decoder"))?;
    let mut ctx = codec::Context::new_with_codec(codec);
    // SAFETY: setting plain fields of a codec context we own, before open.
    // No channel count and no extradata: both FFmpeg Opus decoders then
    // decode to stereo (mono-coded packets are upmixed), which is what a
    // WebRTC `opus/48000/2` track is anyway. (Fields that exist in every
    // FFmpeg version only, so this builds against FFmpeg 7 too.)
    unsafe {
        let p = ctx.as_mut_ptr();
        (*p).sample_rate = OPUS_RATE as i32;
        // libopus honours this (native decoder ignores it and gives fltp).
        (*p).request_sample_fmt = Sample::F32(SampleType::Packed).into();
    }
    let mut dec = ctx.decoder();
    dec.set_packet_time_base((1, OPUS_RATE as i32));
    dec.audio().map_err(ffmpeg_err("open opus decoder"))
}

/// The AAC-LC encoder behind [`OpusToAac`]: whole frames of planar float
/// in, raw AAC frames out (with the encoder's pts, when it gives one).
enum AacEncoder {
    Syom {
        encoder: Box<syom::Encoder>,
        /// The frame being fed, clamped to what syom accepts.
        scratch: Vec<Vec<f32>>,
        ready: VecDeque<Bytes>,
    },
    Ffmpeg {
        encoder: encoder::Audio,
        layout: ChannelLayout,
        settings: AacSettings,
    },
}

impl AacEncoder {
    /// Opens the encoder `settings.coder` names; also returns its
    /// AudioSpecificConfig.
    fn open(
        settings: &AacSettings,
        layout: ChannelLayout,
    ) -> Result<(Self, Bytes), TranscodeError> {
        if settings.coder == AacCoder::Syom {
            let opts = syom::EncodeOptions::raw().with_bitrate_bps(settings.bitrate);
            let channels = usize::from(settings.channels);
            let encoder = syom::Encoder::new(settings.sample_rate, channels, &opts)
                .map_err(|e| TranscodeError::InvalidSettings(format!("AAC encoder (syom): {e}")))?;
            let asc = Bytes::copy_from_slice(encoder.asc());
            let syom = AacEncoder::Syom {
                encoder: Box::new(encoder),
                scratch: vec![vec![0.0; SYOM_FRAME]; channels],
                ready: VecDeque::new(),
            };
            return Ok((syom, asc));
        }
        let encoder = open_ffmpeg_aac(settings, layout)?;
        if encoder.frame_size() == 0 {
            return Err(TranscodeError::InvalidSettings(
                "AAC encoder reports no frame size".into(),
            ));
        }
        // SAFETY: reading plain fields of an open codec context we own;
        // extradata is valid for extradata_size bytes when non-null.
        let asc = unsafe {
            let ctx = encoder.as_ptr();
            if (*ctx).extradata.is_null() || (*ctx).extradata_size <= 0 {
                Bytes::new()
            } else {
                Bytes::copy_from_slice(std::slice::from_raw_parts(
                    (*ctx).extradata,
                    (*ctx).extradata_size as usize,
                ))
            }
        };
        let ffmpeg = AacEncoder::Ffmpeg {
            encoder,
            layout,
            settings: settings.clone(),
        };
        Ok((ffmpeg, asc))
    }

    /// Samples per channel in each frame `send` takes.
    fn frame_size(&self) -> usize {
        match self {
            AacEncoder::Syom { .. } => SYOM_FRAME,
            AacEncoder::Ffmpeg { encoder, .. } => encoder.frame_size() as usize,
        }
    }

    /// Encoder delay in samples (its first frame decodes to this much
    /// silence).
    fn priming(&self) -> i64 {
        match self {
            AacEncoder::Syom { .. } => SYOM_FRAME as i64,
            // SAFETY: a plain field of an open codec context we own.
            AacEncoder::Ffmpeg { encoder, .. } => unsafe {
                i64::from((*encoder.as_ptr()).initial_padding)
            },
        }
    }

    /// Encodes the first `n` (= `frame_size`) samples of each plane;
    /// `pts` is the output sample index of the first.
    fn send(&mut self, planes: &[Vec<f32>], n: usize, pts: i64) -> Result<(), TranscodeError> {
        match self {
            AacEncoder::Syom {
                encoder,
                scratch,
                ready,
            } => {
                for (dst, src) in scratch.iter_mut().zip(planes) {
                    for (d, s) in dst.iter_mut().zip(&src[..n]) {
                        // syom refuses samples outside [-1, 1] and NaN; a
                        // loud Opus decode can overshoot a little.
                        *d = if s.is_finite() {
                            s.clamp(-1.0, 1.0)
                        } else {
                            0.0
                        };
                    }
                }
                // One or two channels (checked in `OpusToAac::new`): no
                // allocation per frame.
                let refs = [&scratch[0][..n], &scratch[scratch.len() - 1][..n]];
                let fed = encoder.feed(&refs[..scratch.len()], |f| {
                    ready.push_back(Bytes::copy_from_slice(f.payload));
                    Ok(())
                });
                fed.map(|_| ()).map_err(|e| {
                    // A failed syom encoder refuses everything until reset.
                    let _ = encoder.reset();
                    TranscodeError::Encode(format!("syom: {e}"))
                })
            }
            AacEncoder::Ffmpeg {
                encoder,
                layout,
                settings,
            } => {
                let mut chunk =
                    new_planar_frame(n, *layout, settings.channels, settings.sample_rate)?;
                for (i, channel) in planes.iter().enumerate() {
                    chunk.plane_mut::<f32>(i)[..n].copy_from_slice(&channel[..n]);
                }
                chunk.set_pts(Some(pts));
                encoder.send_frame(&chunk).map_err(ffmpeg_err("aac encode"))
            }
        }
    }

    /// End of input: the frames still held come out of `receive`.
    fn send_eof(&mut self) -> Result<(), TranscodeError> {
        match self {
            AacEncoder::Syom { encoder, ready, .. } => encoder
                .finish(|f| {
                    ready.push_back(Bytes::copy_from_slice(f.payload));
                    Ok(())
                })
                .map(|_| ())
                .map_err(|e| TranscodeError::Encode(format!("syom flush: {e}"))),
            AacEncoder::Ffmpeg { encoder, .. } => {
                encoder.send_eof().map_err(ffmpeg_err("aac encoder flush"))
            }
        }
    }

    /// The next encoded frame, with the encoder's pts when it gives one.
    fn receive(&mut self) -> Result<Option<(Option<i64>, Bytes)>, TranscodeError> {
        match self {
            AacEncoder::Syom { ready, .. } => Ok(ready.pop_front().map(|b| (None, b))),
            AacEncoder::Ffmpeg { encoder, .. } => {
                let mut packet = Packet::empty();
                match encoder.receive_packet(&mut packet) {
                    Ok(()) => {
                        let data = packet
                            .data()
                            .map(Bytes::copy_from_slice)
                            .unwrap_or_default();
                        Ok(Some((packet.pts(), data)))
                    }
                    Err(ff::Error::Other { errno }) if errno == EAGAIN => Ok(None),
                    Err(ff::Error::Eof) => Ok(None),
                    Err(e) => Err(TranscodeError::Ffmpeg {
                        what: "aac encode",
                        source: e,
                    }),
                }
            }
        }
    }
}

/// Samples per channel of an AAC-LC frame.
const SYOM_FRAME: usize = 1024;

fn open_ffmpeg_aac(
    settings: &AacSettings,
    layout: ChannelLayout,
) -> Result<encoder::Audio, TranscodeError> {
    let codec = encoder::find_by_name("aac").ok_or(TranscodeError::CodecNotFound("aac encoder"))?;
    let mut enc = codec::Context::new_with_codec(codec)
        .encoder()
        .audio()
        .map_err(ffmpeg_err("aac encoder context"))?;
    enc.set_rate(settings.sample_rate as i32);
    enc.set_format(Sample::F32(SampleType::Planar));
    enc.set_channel_layout(layout);
    enc.set_channels(i32::from(settings.channels));
    enc.set_bit_rate(settings.bitrate as usize);
    enc.set_time_base((1, settings.sample_rate as i32));
    enc.set_flags(codec::Flags::GLOBAL_HEADER);
    let mut opts = ff::Dictionary::new();
    opts.set("aac_coder", settings.coder.as_str());
    enc.open_with(opts).map_err(ffmpeg_err("open aac encoder"))
}

/// A writable planar-float frame of `samples` samples.
fn new_planar_frame(
    samples: usize,
    layout: ChannelLayout,
    channels: u8,
    rate: u32,
) -> Result<frame::Audio, TranscodeError> {
    let mut f = frame::Audio::new(Sample::F32(SampleType::Planar), samples, layout);
    f.set_channels(u16::from(channels));
    f.set_rate(rate);
    if f.planes() < usize::from(channels) || f.samples() < samples {
        return Err(TranscodeError::Ffmpeg {
            what: "audio frame allocation",
            source: ff::Error::Other {
                errno: ff::util::error::ENOMEM,
            },
        });
    }
    Ok(f)
}

/// Append a planar-float frame with one plane per FIFO channel.
fn append_planar(fifo: &mut [Vec<f32>], f: &frame::Audio) -> Result<(), TranscodeError> {
    let samples = f.samples();
    if samples == 0 {
        return Ok(());
    }
    if f.format() != Sample::F32(SampleType::Planar) || f.planes() < fifo.len() {
        return Err(TranscodeError::Ffmpeg {
            what: "unexpected decoded audio layout",
            source: ff::Error::InvalidData,
        });
    }
    for (i, channel) in fifo.iter_mut().enumerate() {
        let plane = f.plane::<f32>(i);
        channel.extend_from_slice(&plane[..samples.min(plane.len())]);
    }
    Ok(())
}

impl Core for OpusToAac {
    type Stats = TranscodeStats;
    type Out = Frame;
    const NAME: &'static str = "aac";

    fn push(&mut self, frame: &Frame) -> Result<Vec<Frame>, TranscodeError> {
        OpusToAac::push(self, frame)
    }

    fn flush(&mut self) -> Result<Vec<Frame>, TranscodeError> {
        OpusToAac::flush(self)
    }

    fn stats(&self) -> TranscodeStats {
        OpusToAac::stats(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transcode::worker::{PushError, Worker};
    use std::sync::mpsc;

    const AMP: f32 = 0.5;
    const FREQ: f32 = 440.0;

    fn opus_params(channels: u8) -> Arc<CodecParams> {
        Arc::new(CodecParams::Opus {
            sample_rate: 48_000,
            channels,
        })
    }

    /// `count` 20 ms Opus packets of a 440 Hz sine (amplitude 0.5), encoded
    /// with FFmpeg's libopus (or native opus) encoder.
    fn opus_packets(channels: u8, count: usize) -> Vec<Bytes> {
        crate::transcode::init_ffmpeg();
        let (codec, experimental) = match encoder::find_by_name("libopus") {
            Some(c) => (c, false),
            None => (encoder::find_by_name("opus").expect("opus encoder"), true),
        };
        let mut ctx = codec::Context::new_with_codec(codec);
        if experimental {
            ctx.compliance(codec::Compliance::Experimental);
        }
        let mut enc = ctx.encoder().audio().expect("opus encoder ctx");
        let layout = ChannelLayout::default(i32::from(channels));
        let format = if experimental {
            Sample::F32(SampleType::Planar)
        } else {
            Sample::F32(SampleType::Packed)
        };
        enc.set_rate(48_000);
        enc.set_format(format);
        enc.set_channel_layout(layout);
        enc.set_channels(i32::from(channels));
        enc.set_bit_rate(96_000);
        enc.set_time_base((1, 48_000));
        let mut enc = enc.open().expect("open opus encoder");
        let n = 960;
        let mut out = Vec::new();
        let mut packet = Packet::empty();
        let mut t = 0usize;
        while out.len() < count {
            let mut f = frame::Audio::new(format, n, layout);
            f.set_channels(u16::from(channels));
            f.set_rate(48_000);
            f.set_pts(Some(t as i64));
            let ch = usize::from(channels);
            for i in 0..n {
                let v = AMP * (2.0 * std::f32::consts::PI * FREQ * (t + i) as f32 / 48_000.0).sin();
                if experimental {
                    for c in 0..ch {
                        f.plane_mut::<f32>(c)[i] = v;
                    }
                } else {
                    for c in 0..ch {
                        f.plane_mut::<f32>(0)[i * ch + c] = v;
                    }
                }
            }
            t += n;
            enc.send_frame(&f).expect("opus send");
            while enc.receive_packet(&mut packet).is_ok() {
                out.push(Bytes::copy_from_slice(packet.data().expect("opus data")));
            }
        }
        out.truncate(count);
        out
    }

    fn opus_frame(data: Bytes, pts: i64, channels: u8) -> Frame {
        Frame {
            pts,
            dts: pts,
            key: true,
            data,
            params: opus_params(channels),
        }
    }

    /// Decode raw AAC frames back to planar float, one Vec per channel.
    fn decode_aac(frames: &[Frame]) -> Vec<Vec<f32>> {
        let CodecParams::Aac { asc, .. } = &*frames[0].params else {
            panic!("not AAC");
        };
        let codec = decoder::find_by_name("aac").expect("aac decoder");
        let mut ctx = codec::Context::new_with_codec(codec);
        // SAFETY: extradata allocated with av_mallocz (padded) and owned by
        // the context from here on.
        unsafe {
            let p = ctx.as_mut_ptr();
            let size = asc.len() + ff::ffi::AV_INPUT_BUFFER_PADDING_SIZE as usize;
            let buf = ff::ffi::av_mallocz(size) as *mut u8;
            std::ptr::copy_nonoverlapping(asc.as_ptr(), buf, asc.len());
            (*p).extradata = buf;
            (*p).extradata_size = asc.len() as i32;
        }
        let mut dec = ctx.decoder().audio().expect("open aac decoder");
        let mut out: Vec<Vec<f32>> = Vec::new();
        let mut f = frame::Audio::empty();
        let mut drain = |dec: &mut decoder::Audio, out: &mut Vec<Vec<f32>>| {
            while dec.receive_frame(&mut f).is_ok() {
                assert_eq!(f.format(), Sample::F32(SampleType::Planar));
                out.resize(usize::from(f.channels()), Vec::new());
                for (c, ch) in out.iter_mut().enumerate() {
                    ch.extend_from_slice(&f.plane::<f32>(c)[..f.samples()]);
                }
            }
        };
        for fr in frames {
            dec.send_packet(&Packet::copy(&fr.data))
                .expect("aac decode");
            drain(&mut dec, &mut out);
        }
        dec.send_eof().expect("aac eof");
        drain(&mut dec, &mut out);
        out
    }

    fn rms(x: &[f32]) -> f32 {
        (x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32).sqrt()
    }

    fn zero_crossings(x: &[f32]) -> usize {
        x.windows(2)
            .filter(|w| (w[0] < 0.0) != (w[1] < 0.0))
            .count()
    }

    fn run_all(tc: &mut OpusToAac, frames: impl IntoIterator<Item = Frame>) -> Vec<Frame> {
        let mut out = Vec::new();
        for f in frames {
            out.extend(tc.push(&f).expect("push"));
        }
        out.extend(tc.flush().expect("flush"));
        out
    }

    fn assert_sine(frames: &[Frame]) {
        assert_sine_at(frames, 48_000);
    }

    fn assert_sine_at(frames: &[Frame], rate: usize) {
        let pcm = decode_aac(frames);
        assert_eq!(pcm.len(), 2, "stereo output");
        for ch in &pcm {
            // Skip codec priming and the tail; look at 1.5 s in the middle.
            let mid = &ch[4096..4096 + rate * 3 / 2];
            let r = rms(mid);
            let expected = AMP / std::f32::consts::SQRT_2;
            assert!(
                (r - expected).abs() < 0.1 * expected,
                "rms {r} vs {expected}"
            );
            // 440 Hz: 880 zero crossings per second.
            let zc = zero_crossings(mid) as f32 / 1.5;
            assert!((zc - 880.0).abs() < 20.0, "zero crossings/s {zc}");
        }
    }

    fn assert_steps(frames: &[Frame], first: i64) {
        assert_eq!(frames[0].pts, first);
        for w in frames.windows(2) {
            assert_eq!(w[1].pts - w[0].pts, 1920, "pts step");
        }
    }

    #[test]
    fn stereo_sine_two_seconds() {
        let packets = opus_packets(2, 100);
        let mut tc = OpusToAac::new(AacSettings::default()).expect("new");
        let start = 3_000;
        let out = run_all(
            &mut tc,
            packets
                .into_iter()
                .enumerate()
                .map(|(i, p)| opus_frame(p, start + i as i64 * 1800, 2)),
        );
        assert!((93..=95).contains(&out.len()), "{} frames", out.len());
        assert_steps(&out, start);
        let params = tc.params();
        for f in &out {
            assert!(f.key);
            assert_eq!(f.pts, f.dts);
            assert!(Arc::ptr_eq(&f.params, &params));
            assert!(!f.data.is_empty());
            // Raw AAC, not ADTS.
            assert!(!(f.data.len() > 1 && f.data[0] == 0xFF && f.data[1] & 0xF0 == 0xF0));
        }
        assert_eq!(
            *params,
            CodecParams::Aac {
                asc: Bytes::from_static(&[0x11, 0x90]),
                sample_rate: 48_000,
                channels: 2,
            }
        );
        assert_sine(&out);
        let stats = tc.stats();
        assert_eq!(stats.packets_in, 100);
        assert_eq!(stats.frames_out, out.len() as u64);
        assert_eq!(stats.resyncs, 0);
        assert!(matches!(
            tc.push(&opus_frame(Bytes::from_static(&[0xF8]), 0, 2)),
            Err(TranscodeError::Finished)
        ));
    }

    #[test]
    fn mono_input_gives_stereo() {
        let packets = opus_packets(1, 100);
        let mut tc = OpusToAac::new(AacSettings::default()).expect("new");
        let out = run_all(
            &mut tc,
            packets
                .into_iter()
                .enumerate()
                .map(|(i, p)| opus_frame(p, i as i64 * 1800, 1)),
        );
        assert!((93..=95).contains(&out.len()), "{} frames", out.len());
        assert_steps(&out, 0);
        assert_sine(&out);
    }

    #[test]
    fn resamples_to_44100() {
        let packets = opus_packets(2, 100);
        let settings = AacSettings {
            sample_rate: 44_100,
            bitrate: 96_000,
            ..AacSettings::default()
        };
        let mut tc = OpusToAac::new(settings).expect("new");
        let out = run_all(
            &mut tc,
            packets
                .into_iter()
                .enumerate()
                .map(|(i, p)| opus_frame(p, i as i64 * 1800, 2)),
        );
        // 2 s at 44.1 kHz = 86.1 frames, plus the flush.
        assert!((86..=88).contains(&out.len()), "{} frames", out.len());
        assert_eq!(out[0].pts, 0);
        for (k, f) in out.iter().enumerate() {
            // No drift: frame k is exactly k * 1024 samples in.
            assert_eq!(f.pts, k as i64 * 1024 * 90_000 / 44_100);
        }
        let CodecParams::Aac { asc, .. } = &*tc.params() else {
            panic!("not AAC");
        };
        assert_eq!(&asc[..], &[0x12, 0x10]);
        assert_eq!(tc.stats().resyncs + tc.stats().silence_filled, 0);
        assert_sine_at(&out, 44_100);
    }

    #[test]
    fn gap_resyncs_forward() {
        let packets = opus_packets(2, 100);
        let mut tc = OpusToAac::new(AacSettings::default()).expect("new");
        // Packets 25..50 (500 ms) never arrive.
        let out = run_all(
            &mut tc,
            packets
                .into_iter()
                .enumerate()
                .filter(|(i, _)| !(25..50).contains(i))
                .map(|(i, p)| opus_frame(p, i as i64 * 1800, 2)),
        );
        assert_eq!(tc.stats().resyncs, 1);
        let jumps: Vec<(i64, i64)> = out
            .windows(2)
            .filter(|w| w[1].pts - w[0].pts != 1920)
            .map(|w| (w[0].pts, w[1].pts))
            .collect();
        assert_eq!(jumps.len(), 1, "{jumps:?}");
        let (before, after) = jumps[0];
        // The first frame after the gap sits exactly on the input timeline.
        assert_eq!(after, 50 * 1800);
        // 25 packets = 24 000 samples -> 24 frames (last padded) before it.
        assert_eq!(before, 23 * 1920);
        assert!(after - before > 1920 && after - before < 1920 + 500 * 90);
        // ~1.5 s of audio in total.
        assert!((70..=73).contains(&out.len()), "{} frames", out.len());
    }

    #[test]
    fn jitter_does_not_resync() {
        let packets = opus_packets(2, 100);
        let mut tc = OpusToAac::new(AacSettings::default()).expect("new");
        let jitter = [0, 900, -700, 1300, -1000, 50];
        let out = run_all(
            &mut tc,
            packets
                .into_iter()
                .enumerate()
                .map(|(i, p)| opus_frame(p, 9000 + i as i64 * 1800 + jitter[i % 6], 2)),
        );
        assert_steps(&out, 9000);
        assert_eq!(tc.stats().resyncs, 0);
    }

    #[test]
    fn backward_jump_never_goes_back() {
        let packets = opus_packets(2, 100);
        let mut tc = OpusToAac::new(AacSettings::default()).expect("new");
        // From packet 50 on, the input timeline is pulled back by 300 ms;
        // from packet 80 on, by 10 s more (a reset).
        let out = run_all(
            &mut tc,
            packets.into_iter().enumerate().map(|(i, p)| {
                let mut pts = 90_000 * 20 + i as i64 * 1800;
                if i >= 50 {
                    pts -= 27_000;
                }
                if i >= 80 {
                    pts -= 900_000;
                }
                opus_frame(p, pts, 2)
            }),
        );
        for w in out.windows(2) {
            assert!(w[1].pts > w[0].pts, "{} then {}", w[0].pts, w[1].pts);
        }
        let stats = tc.stats();
        // 300 ms behind: 15 packets dropped to catch up.
        assert!((14..=16).contains(&stats.dropped_late), "{stats:?}");
        assert_eq!(stats.rebases, 1);
    }

    #[test]
    fn garbage_packets_are_errors_not_fatal() {
        let packets = opus_packets(2, 100);
        let mut tc = OpusToAac::new(AacSettings::default()).expect("new");
        let mut out = Vec::new();
        for (i, p) in packets.iter().enumerate().take(10) {
            out.extend(
                tc.push(&opus_frame(p.clone(), i as i64 * 1800, 2))
                    .expect("good"),
            );
        }
        // Code-3 packet with a frame count of 0: invalid.
        let bad = opus_frame(Bytes::from_static(&[0xFF, 0x00]), 10 * 1800, 2);
        assert!(matches!(tc.push(&bad), Err(TranscodeError::Decode(_))));
        let empty = opus_frame(Bytes::new(), 10 * 1800, 2);
        assert!(matches!(tc.push(&empty), Err(TranscodeError::EmptyPacket)));
        let mut wrong = opus_frame(Bytes::from_static(&[1, 2, 3]), 10 * 1800, 2);
        wrong.params = Arc::new(CodecParams::H264 {
            sps: Bytes::new(),
            pps: Bytes::new(),
            width: 0,
            height: 0,
        });
        assert!(matches!(
            tc.push(&wrong),
            Err(TranscodeError::WrongCodec(Codec::H264))
        ));
        for (i, p) in packets.iter().enumerate().skip(11) {
            out.extend(
                tc.push(&opus_frame(p.clone(), i as i64 * 1800, 2))
                    .expect("good"),
            );
        }
        out.extend(tc.flush().expect("flush"));
        assert_eq!(tc.stats().decode_errors, 1);
        // The 20 ms the bad packet should have covered is filled with
        // silence: still continuous, still 2 s.
        assert_eq!(tc.stats().silence_filled, 1);
        assert_steps(&out, 0);
        assert!((93..=95).contains(&out.len()), "{} frames", out.len());
    }

    #[test]
    fn random_garbage_never_panics() {
        let packets = opus_packets(2, 20);
        let mut tc = OpusToAac::new(AacSettings::default()).expect("new");
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut pts = 0;
        for _ in 0..500 {
            let len = (next() % 300) as usize;
            let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let _ = tc.push(&opus_frame(Bytes::from(data), pts, 2));
            pts += 1800;
        }
        let mut ok = 0;
        for p in packets {
            if let Ok(out) = tc.push(&opus_frame(p, pts, 2)) {
                ok += out.len();
            }
            pts += 1800;
        }
        assert!(ok >= 15, "{ok} frames after garbage");
        tc.flush().expect("flush");
    }

    #[test]
    fn absurd_timestamps_never_panic() {
        let packets = opus_packets(2, 12);
        let mut tc = OpusToAac::new(AacSettings::default()).expect("new");
        let pts = [i64::MAX, i64::MIN, 0, i64::MAX - 10, -5, i64::MIN + 1];
        let mut out = Vec::new();
        for (p, pts) in packets.into_iter().zip(pts.iter().cycle()) {
            out.extend(tc.push(&opus_frame(p, *pts, 2)).expect("push"));
        }
        out.extend(tc.flush().expect("flush"));
        // Saturated at i64::MAX, so not strictly increasing, but never back.
        assert!(!out.is_empty());
        for w in out.windows(2) {
            assert!(w[1].pts >= w[0].pts);
        }
    }

    #[test]
    fn thread_wrapper_flushes_on_close() {
        let packets = opus_packets(2, 100);
        let (tx, rx) = mpsc::channel();
        let t = Worker::<OpusToAac>::spawn(
            OpusToAac::new(AacSettings::default()).unwrap(),
            "test",
            200,
            move |f| {
                let _ = tx.send(f);
            },
        )
        .expect("spawn");
        for (i, p) in packets.into_iter().enumerate() {
            t.try_push(opus_frame(p, i as i64 * 1800, 2))
                .expect("queued");
        }
        let stats = t.finish().expect("stats");
        let out: Vec<Frame> = rx.try_iter().collect();
        assert!((93..=95).contains(&out.len()), "{} frames", out.len());
        assert_eq!(stats.frames_out, out.len() as u64);
        assert_steps(&out, 0);
    }

    #[test]
    fn thread_wrapper_drops_when_full() {
        let packets = opus_packets(2, 50);
        let (gate_tx, gate_rx) = mpsc::channel::<()>();
        let t = Worker::<OpusToAac>::spawn(
            OpusToAac::new(AacSettings::default()).unwrap(),
            "full",
            2,
            move |_f| {
                // Block the worker on its first output so the queue fills up.
                let _ = gate_rx.recv();
            },
        )
        .expect("spawn");
        let mut full = 0;
        for (i, p) in packets.into_iter().enumerate() {
            if t.try_push(opus_frame(p, i as i64 * 1800, 2)) == Err(PushError::Full) {
                full += 1;
            }
        }
        assert!(full > 0);
        assert_eq!(t.dropped(), full);
        drop(gate_tx);
        t.finish().expect("stats");
    }

    #[test]
    fn invalid_settings() {
        let bad = AacSettings {
            channels: 6,
            ..AacSettings::default()
        };
        assert!(matches!(
            OpusToAac::new(bad),
            Err(TranscodeError::InvalidSettings(_))
        ));
    }
}
