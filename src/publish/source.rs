//! Where frames come from: the file demuxed with FFmpeg (blocking; on its own thread), or a
//! whole file demuxed once into memory and replayed by every session of a load run.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use ffmpeg_next as ffmpeg;
use str0m::format::Codec;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::annexb::H264ToAnnexB;
use crate::media::av1;

/// Which elementary stream a frame belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    Video,
    Audio,
}

/// One access unit ready for the RTP packetizer.
#[derive(Debug, Clone)]
pub struct MediaFrame {
    pub kind: FrameKind,
    /// Keyframe (video only); such frames start with SPS and PPS.
    pub key: bool,
    /// When to send it, relative to the first frame (decode order, looping included).
    pub send_at: Duration,
    /// Presentation time in microseconds on the same timeline (used for the RTP timestamp).
    pub pts_us: u64,
    /// Annex B H264 access unit, or one Opus packet (shared, never copied per session).
    pub data: Arc<[u8]>,
    /// Pass through the file: 0 the first time, 1 after the first restart (`--loop`), ...
    pub pass: u64,
    /// Simulcast layer: 0 the main file's, `n` the `n`th `--simulcast` file's.
    pub layer: u8,
}

/// What the file offers.
#[derive(Debug, Clone, Copy)]
pub struct MediaInfo {
    pub video: bool,
    pub audio: bool,
    /// `profile_idc << 16 | constraint flags << 8 | level_idc` from the first SPS.
    pub h264_profile: Option<u32>,
    /// The video's codec: H264, VP8, VP9 or AV1 (sent as it is).
    pub video_codec: Codec,
}

/// Frames for the event loop: from the demuxer thread, or replayed from memory.
pub(super) enum Frames {
    Channel(mpsc::Receiver<MediaFrame>),
    Clip(ClipCursor),
}

impl Frames {
    /// The next frame; `None` at the end. Cancel-safe.
    pub(super) async fn next(&mut self) -> Option<MediaFrame> {
        match self {
            Self::Channel(rx) => rx.recv().await,
            Self::Clip(c) => c.next(),
        }
    }

    /// [`Frames::next`] when it is ready without waiting.
    pub(super) fn try_next(&mut self) -> Option<Option<MediaFrame>> {
        match self {
            Self::Channel(rx) => match rx.try_recv() {
                Ok(f) => Some(Some(f)),
                Err(mpsc::error::TryRecvError::Empty) => None,
                Err(mpsc::error::TryRecvError::Disconnected) => Some(None),
            },
            Self::Clip(c) => Some(c.next()),
        }
    }
}

/// Largest file `--sessions` holds in memory.
const MAX_CLIP_BYTES: u64 = 1 << 30;

/// A whole file demuxed into memory, shared by the sessions of a load run.
pub struct Clip {
    pub info: MediaInfo,
    /// One pass, in file order, on a timeline starting at 0.
    pub frames: Vec<MediaFrame>,
    /// Length of one pass (end of its latest frame): the offset added per loop.
    pub pass_len_us: u64,
    /// Payload bytes of all frames.
    pub bytes: u64,
}

impl Clip {
    /// Demuxes `path` to the end (blocking).
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let mut demuxer = Demuxer::open(path)?;
        let mut frames = Vec::new();
        let mut bytes = 0u64;
        while let Some(frame) = demuxer.next_frame()? {
            bytes += frame.data.len() as u64;
            if bytes > MAX_CLIP_BYTES {
                bail!(
                    "{} holds more than {} MiB of media: too large to replay from memory with                      --sessions",
                    path.display(),
                    MAX_CLIP_BYTES >> 20
                );
            }
            frames.push(frame);
        }
        if frames.is_empty() {
            bail!("{} has no H264 or Opus frames", path.display());
        }
        Ok(Self {
            info: demuxer.info(),
            frames,
            pass_len_us: demuxer.end_us.max(0).unsigned_abs(),
            bytes,
        })
    }
}

impl Clip {
    /// The main file, and the video of each simulcast layer's file as
    /// layers 1, 2, …, merged in sending order.
    pub fn load_simulcast(main: &Path, layers: &[(String, PathBuf)]) -> anyhow::Result<Self> {
        let mut clip = Self::load(main)?;
        if clip.info.video_codec != Codec::H264 || !clip.info.video {
            bail!("--simulcast needs H264 video in {}", main.display());
        }
        for (n, (rid, path)) in layers.iter().enumerate() {
            let layer = Self::load(path)?;
            if layer.info.video_codec != Codec::H264 || !layer.info.video {
                bail!("simulcast layer {rid}: no H264 video in {}", path.display());
            }
            let number = u8::try_from(n + 1).context("too many simulcast layers")?;
            clip.bytes += layer.bytes;
            clip.pass_len_us = clip.pass_len_us.max(layer.pass_len_us);
            clip.frames.extend(
                layer
                    .frames
                    .into_iter()
                    .filter(|f| f.kind == FrameKind::Video)
                    .map(|f| MediaFrame { layer: number, ..f }),
            );
        }
        clip.frames.sort_by_key(|f| f.send_at);
        Ok(clip)
    }
}

/// A session's position in a shared [`Clip`]; looping shifts timestamps by one pass each time,
/// as [`Demuxer::restart`] does.
pub(super) struct ClipCursor {
    clip: Arc<Clip>,
    index: usize,
    pass: u64,
    loop_: bool,
}

impl ClipCursor {
    pub(super) fn new(clip: Arc<Clip>, loop_: bool) -> Self {
        Self {
            clip,
            index: 0,
            pass: 0,
            loop_,
        }
    }

    pub(super) fn next(&mut self) -> Option<MediaFrame> {
        if self.index >= self.clip.frames.len() {
            if !self.loop_ || self.clip.frames.is_empty() {
                return None;
            }
            self.index = 0;
            self.pass += 1;
        }
        let f = &self.clip.frames[self.index];
        self.index += 1;
        let offset_us = self.clip.pass_len_us.saturating_mul(self.pass);
        Some(MediaFrame {
            kind: f.kind,
            key: f.key,
            send_at: f.send_at + Duration::from_micros(offset_us),
            pts_us: f.pts_us.saturating_add(offset_us),
            data: f.data.clone(),
            pass: self.pass,
            layer: f.layer,
        })
    }
}

struct StreamSel {
    index: usize,
    kind: FrameKind,
    time_base: (i64, i64),
    /// Packet duration to assume when the container gives none, in µs.
    default_duration_us: i64,
}

/// Reads H264 and Opus packets from a file and turns them into [`MediaFrame`]s.
pub struct Demuxer {
    path: PathBuf,
    input: ffmpeg::format::context::Input,
    streams: Vec<StreamSel>,
    video: VideoPackets,
    info: MediaInfo,
    /// First packet's time of the current pass, in µs of the file's timeline.
    origin_us: Option<i64>,
    /// When the previous video frame is sent (µs, as `send_at`).
    last_video_send_us: Option<i64>,
    /// Offset of the current pass on the output timeline (µs).
    pass_offset_us: i64,
    /// End of the latest frame on the output timeline (µs).
    end_us: i64,
    loops: u64,
}

impl Demuxer {
    /// Opens `path` and picks the best H264 video stream and the best Opus audio stream.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let (input, streams, video, info) = open_input(path)?;
        Ok(Self {
            path: path.to_owned(),
            input,
            streams,
            video,
            info,
            origin_us: None,
            last_video_send_us: None,
            pass_offset_us: 0,
            end_us: 0,
            loops: 0,
        })
    }

    pub fn info(&self) -> MediaInfo {
        self.info
    }

    /// How many times the file was restarted.
    pub fn loops(&self) -> u64 {
        self.loops
    }

    /// Restarts from the beginning; timestamps continue after the last frame.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        let (input, streams, video, _) = open_input(&self.path)?;
        self.input = input;
        self.streams = streams;
        if let (VideoPackets::H264(old), VideoPackets::H264(new)) = (&mut self.video, video) {
            // Keep the parameter sets learnt so far only if the new pass brings none.
            if new.has_sps() {
                *old = new;
            }
        }
        self.origin_us = None;
        self.last_video_send_us = None;
        self.pass_offset_us = self.end_us;
        self.loops += 1;
        Ok(())
    }

    /// The next frame in file order, `None` at the end of the file.
    pub fn next_frame(&mut self) -> anyhow::Result<Option<MediaFrame>> {
        loop {
            let mut packet = ffmpeg::Packet::empty();
            match packet.read(&mut self.input) {
                Ok(()) => {}
                Err(ffmpeg::Error::Eof) => return Ok(None),
                Err(e) => return Err(anyhow!("reading {}: {e}", self.path.display())),
            }
            let Some(sel) = self.streams.iter().find(|s| s.index == packet.stream()) else {
                continue;
            };
            let Some(data) = packet.data().filter(|d| !d.is_empty()) else {
                continue;
            };
            let Some(pts) = packet.pts().or(packet.dts()) else {
                debug!("skipping a packet without timestamps");
                continue;
            };
            let dts = packet.dts().unwrap_or(pts);
            let to_us = |v: i64| rescale_signed(v, sel.time_base);
            let (pts_us, dts_us) = (to_us(pts), to_us(dts));
            let origin = *self.origin_us.get_or_insert(dts_us.min(pts_us));
            let duration_us = match to_us(packet.duration()) {
                d if d > 0 => d,
                _ => sel.default_duration_us,
            };

            let kind = sel.kind;
            let (key, data) = match kind {
                FrameKind::Video => match &mut self.video {
                    VideoPackets::H264(conv) => match conv.convert(data, packet.is_key()) {
                        Ok(au) => au,
                        Err(e) => {
                            warn!("skipping a bad H264 packet: {e}");
                            continue;
                        }
                    },
                    VideoPackets::Av1 { sequence_header } => (
                        packet.is_key(),
                        av1_temporal_unit(data, packet.is_key(), sequence_header),
                    ),
                    VideoPackets::AsIs => (packet.is_key(), data.to_vec()),
                },
                FrameKind::Audio => (false, data.to_vec()),
            };
            if data.is_empty() {
                continue;
            }
            let pass = self.pass_offset_us;
            let pts_out = (pts_us - origin).max(0).saturating_add(pass);
            let mut send_out = (dts_us - origin).max(0).saturating_add(pass);
            if kind == FrameKind::Video {
                // Matroska leaves the DTS of the first frames unset; falling
                // back to their PTS would hold back a reordered frame (and
                // the audio queued behind it) by the reorder delay. Send it
                // right after the previous frame instead.
                if packet.dts().is_none()
                    && let Some(last) = self.last_video_send_us
                {
                    send_out = last;
                }
                self.last_video_send_us = Some(send_out);
            }
            self.end_us = self.end_us.max(pts_out.saturating_add(duration_us));
            return Ok(Some(MediaFrame {
                kind,
                key,
                send_at: Duration::from_micros(send_out.max(0).unsigned_abs()),
                pts_us: pts_out.max(0).unsigned_abs(),
                data: data.into(),
                pass: self.loops,
                layer: 0,
            }));
        }
    }

    /// Sends every frame into `tx` (blocking), looping when asked. Returns when the file ends
    /// (without loop) or the receiver is gone.
    pub fn pump(&mut self, tx: &mpsc::Sender<MediaFrame>, loop_: bool) -> anyhow::Result<()> {
        let mut sent_this_pass = 0u64;
        loop {
            match self.next_frame()? {
                Some(frame) => {
                    sent_this_pass += 1;
                    if tx.blocking_send(frame).is_err() {
                        return Ok(());
                    }
                }
                None if loop_ && sent_this_pass > 0 => {
                    info!("end of file, starting over (pass {})", self.loops() + 2);
                    self.restart()?;
                    sent_this_pass = 0;
                }
                None => return Ok(()),
            }
        }
    }
}

type Opened = (
    ffmpeg::format::context::Input,
    Vec<StreamSel>,
    VideoPackets,
    MediaInfo,
);

/// How the video's packets become the frames sent.
enum VideoPackets {
    /// AVCC or Annex B to Annex B with parameter sets on keyframes.
    H264(H264ToAnnexB),
    /// Temporal units; keyframes get the sequence header OBU of the
    /// stream's `av1C` in front when the container left it out.
    Av1 { sequence_header: Vec<u8> },
    /// VP8, VP9: each packet is one frame, sent as it is.
    AsIs,
}

/// An AV1 temporal unit to send. A keyframe must carry the sequence header
/// OBU: str0m's packetizer marks a new coded video sequence on it, and a
/// receiver can only start decoding there.
fn av1_temporal_unit(data: &[u8], key: bool, sequence_header: &[u8]) -> Vec<u8> {
    let has_header =
        av1::obus(data).is_some_and(|obus| obus.iter().any(|o| o.kind == av1::OBU_SEQUENCE_HEADER));
    if key && !has_header {
        [sequence_header, data].concat()
    } else {
        data.to_vec()
    }
}

/// The sequence header OBU among an `av1C` record's configOBUs.
fn av1c_sequence_header(av1c: &[u8]) -> Vec<u8> {
    av1c.get(4..)
        .and_then(av1::obus)
        .and_then(|obus| {
            obus.into_iter()
                .find(|o| o.kind == av1::OBU_SEQUENCE_HEADER)
        })
        .map(|o| o.bytes.to_vec())
        .unwrap_or_default()
}

fn open_input(path: &Path) -> anyhow::Result<Opened> {
    // ffmpeg-next panics on paths that are not UTF-8 or contain NUL; check first.
    match path.to_str() {
        Some(s) if !s.contains('\0') => {}
        _ => bail!("file name {} is not valid UTF-8", path.display()),
    }
    if !path.is_file() {
        bail!("{} is not a readable file", path.display());
    }
    ffmpeg::init().map_err(|e| anyhow!("initialising FFmpeg: {e}"))?;
    let input =
        ffmpeg::format::input(path).map_err(|e| anyhow!("cannot open {}: {e}", path.display()))?;

    let mut streams = Vec::new();
    let mut video = VideoPackets::AsIs;
    let mut info = MediaInfo {
        video: false,
        audio: false,
        h264_profile: None,
        video_codec: Codec::H264,
    };
    for stream in input.streams() {
        let params = stream.parameters();
        let tb = stream.time_base();
        let time_base = (
            i64::from(tb.numerator()),
            i64::from(tb.denominator()).max(1),
        );
        match (params.medium(), params.id()) {
            (
                ffmpeg::media::Type::Video,
                id @ (ffmpeg::codec::Id::H264
                | ffmpeg::codec::Id::VP8
                | ffmpeg::codec::Id::VP9
                | ffmpeg::codec::Id::AV1),
            ) if !info.video => {
                (info.video_codec, video) = match id {
                    ffmpeg::codec::Id::H264 => {
                        let conv = H264ToAnnexB::new(extradata(&params))
                            .with_context(|| format!("H264 stream #{}", stream.index()))?;
                        info.h264_profile = conv.profile();
                        (Codec::H264, VideoPackets::H264(conv))
                    }
                    ffmpeg::codec::Id::AV1 => {
                        let sequence_header = av1c_sequence_header(&extradata(&params));
                        (Codec::Av1, VideoPackets::Av1 { sequence_header })
                    }
                    ffmpeg::codec::Id::VP9 => (Codec::Vp9, VideoPackets::AsIs),
                    _ => (Codec::Vp8, VideoPackets::AsIs),
                };
                info.video = true;
                let rate = stream.avg_frame_rate();
                let default_duration_us = if rate.numerator() > 0 && rate.denominator() > 0 {
                    1_000_000 * i64::from(rate.denominator()) / i64::from(rate.numerator())
                } else {
                    33_333
                };
                streams.push(StreamSel {
                    index: stream.index(),
                    kind: FrameKind::Video,
                    time_base,
                    default_duration_us,
                });
            }
            (ffmpeg::media::Type::Audio, ffmpeg::codec::Id::OPUS) if !info.audio => {
                info.audio = true;
                streams.push(StreamSel {
                    index: stream.index(),
                    kind: FrameKind::Audio,
                    time_base,
                    default_duration_us: 20_000,
                });
            }
            (ffmpeg::media::Type::Video | ffmpeg::media::Type::Audio, id) => {
                warn!(
                    "ignoring {:?} stream #{} ({id:?}): publish sends one H264, VP8, VP9 or AV1 \
                     and one Opus stream without re-encoding",
                    params.medium(),
                    stream.index()
                );
            }
            _ => {}
        }
    }
    if streams.is_empty() {
        bail!(
            "{} has neither H264, VP8, VP9 or AV1 video nor Opus audio (publish does not \
             re-encode)",
            path.display()
        );
    }
    Ok((input, streams, video, info))
}

fn extradata(params: &ffmpeg::codec::Parameters) -> Vec<u8> {
    // SAFETY: `params` wraps a valid AVCodecParameters for as long as it lives; FFmpeg keeps
    // `extradata` either null or pointing at `extradata_size` readable bytes.
    unsafe {
        let p = params.as_ptr();
        if p.is_null() || (*p).extradata.is_null() || (*p).extradata_size <= 0 {
            return Vec::new();
        }
        let len = usize::try_from((*p).extradata_size).unwrap_or(0);
        std::slice::from_raw_parts((*p).extradata, len).to_vec()
    }
}

fn rescale_signed(v: i64, (num, den): (i64, i64)) -> i64 {
    let r = i128::from(v) * i128::from(num) * 1_000_000 / i128::from(den.max(1));
    i64::try_from(r).unwrap_or(if r < 0 { i64::MIN } else { i64::MAX })
}

#[cfg(test)]
mod tests {
    use super::super::annexb::START_CODE;
    use super::*;
    use crate::media::h264::{NAL_IDR, NAL_PPS, NAL_SPS, nal_type, split_annexb};

    fn sample() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("samples/sample.mkv")
    }

    fn sample_path() -> PathBuf {
        // The scratch crate lives outside the repo; the sample sits next to this file's crate.
        let p = sample();
        if p.exists() {
            p
        } else {
            Path::new(file!())
                .parent()
                .and_then(Path::parent)
                .map(|d| d.join("samples/sample.mkv"))
                .unwrap_or(p)
        }
    }

    #[test]
    fn sample_demuxes_to_annexb() {
        let mut d = Demuxer::open(&sample_path()).unwrap();
        let info = d.info();
        assert!(info.video && info.audio);
        assert_eq!(info.h264_profile.map(|p| p >> 16), Some(0x42));

        let mut video = Vec::new();
        let mut audio = Vec::new();
        while let Some(f) = d.next_frame().unwrap() {
            match f.kind {
                FrameKind::Video => video.push(f),
                FrameKind::Audio => audio.push(f),
            }
        }
        assert_eq!(video.len(), 300);
        assert!((499..=502).contains(&audio.len()), "{}", audio.len());
        for (i, f) in video.iter().enumerate() {
            assert_eq!(f.key, i % 30 == 0, "frame {i}");
            let nals: Vec<&[u8]> = split_annexb(&f.data).collect();
            assert!(f.data.starts_with(&START_CODE));
            if f.key {
                assert_eq!(nal_type(nals[0]), NAL_SPS);
                assert_eq!(nal_type(nals[1]), NAL_PPS);
                assert!(nals.iter().any(|n| nal_type(n) == NAL_IDR));
            } else {
                assert!(nals.iter().all(|n| nal_type(n) != NAL_SPS));
            }
        }
        // Pacing: 30 fps video and 20 ms audio on one timeline starting at 0.
        let first = video.first().unwrap().send_at.min(audio[0].send_at);
        assert_eq!(first, Duration::ZERO);
        let last = video.last().unwrap().send_at;
        assert!(
            last > Duration::from_millis(9900) && last < Duration::from_millis(10_050),
            "{last:?}"
        );
        for w in video.windows(2) {
            let gap = w[1].send_at - w[0].send_at;
            assert!(gap >= Duration::from_millis(32) && gap <= Duration::from_millis(35));
        }
        for w in audio.windows(2).skip(1) {
            assert_eq!(w[1].pts_us - w[0].pts_us, 20_000);
        }
    }

    #[test]
    fn sample_loops_forward() {
        let mut d = Demuxer::open(&sample_path()).unwrap();
        let mut last_first_pass = Duration::ZERO;
        while let Some(f) = d.next_frame().unwrap() {
            last_first_pass = last_first_pass.max(f.send_at);
        }
        d.restart().unwrap();
        assert_eq!(d.loops(), 1);
        let f = d.next_frame().unwrap().unwrap();
        assert!(f.send_at > last_first_pass, "{:?}", f.send_at);
        assert!(f.send_at < last_first_pass + Duration::from_millis(60));
    }

    #[test]
    fn clip_replays_like_the_demuxer() {
        let clip = Arc::new(Clip::load(&sample_path()).unwrap());
        let mut d = Demuxer::open(&sample_path()).unwrap();
        let mut cursor = ClipCursor::new(clip.clone(), true);
        for pass in 0..2 {
            while let Some(want) = d.next_frame().unwrap() {
                let got = cursor.next().unwrap();
                assert_eq!(
                    (got.send_at, got.pts_us, got.pass),
                    (want.send_at, want.pts_us, pass)
                );
                assert_eq!(
                    (got.kind, got.key, &got.data),
                    (want.kind, want.key, &want.data)
                );
            }
            d.restart().unwrap();
        }
        let mut once = ClipCursor::new(clip.clone(), false);
        assert_eq!(
            std::iter::from_fn(|| once.next()).count(),
            clip.frames.len()
        );
    }

    #[test]
    fn av1_keyframes_get_the_sequence_header() {
        let seq = [0x0a, 0x03, 0x00, 0x00, 0x00];
        // av1C: marker/version, profile/level, flags, delay; then configOBUs.
        let av1c = [&[0x81, 0x00, 0x0c, 0x00][..], &seq].concat();
        assert_eq!(av1c_sequence_header(&av1c), seq);
        assert!(av1c_sequence_header(&av1c[..4]).is_empty());
        assert!(av1c_sequence_header(&[0x81, 0, 0, 0, 0x80]).is_empty());
        let frame = [0x32, 0x02, 0x10, 0xaa];
        let with = [&seq[..], &frame].concat();
        assert_eq!(av1_temporal_unit(&frame, true, &seq), with);
        // Already there, or not a keyframe: as it is.
        assert_eq!(av1_temporal_unit(&with, true, &seq), with);
        assert_eq!(av1_temporal_unit(&frame, false, &seq), frame);
    }

    #[test]
    fn bad_files_are_errors() {
        assert!(Demuxer::open(Path::new("/nonexistent/file.mkv")).is_err());
        let dir = std::env::temp_dir().join(format!("whipgate-publish-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk.mkv");
        std::fs::write(&junk, b"this is not a media file").unwrap();
        assert!(Demuxer::open(&junk).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn rescale_signed_time_bases() {
        assert_eq!(rescale_signed(40, (1, 1000)), 40_000);
        assert_eq!(rescale_signed(-7, (1, 1000)), -7_000);
    }
}
