//! From str0m's depacketized media to hub frames: RTP time onto the stream
//! timeline (with sender reports for lip sync when the publisher sends
//! them), H264 access units assembled with DTS, VP8, VP9 and AV1 frames from
//! a keyframe on, Opus packets as they are.
//! The media work is the sans-IO code in `media/`; this is the adapter.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use str0m::media::MediaData;

use crate::media::frame::{Codec, CodecParams, Frame, TrackKind};
use crate::media::h264::{AssemblerStats, H264Assembler};
use crate::media::time::{SenderReport, Timeline};
use crate::media::{av1, vp8, vp9};
use crate::telemetry::{self, MediaDrop};

pub struct Ingest {
    timeline: Timeline,
    video: Video,
    opus: Arc<CodecParams>,
}

/// The publisher's video, by codec.
enum Video {
    H264(Box<H264Assembler>),
    /// VP8, VP9 or AV1: str0m hands over whole frames.
    Whole(WholeFrames),
}

/// VP8, VP9 or AV1 frames go out as they are, from a keyframe on (after a
/// loss, the decoder would show garbage until the next one: wait for it
/// instead), with increasing times.
struct WholeFrames {
    codec: Codec,
    params: Option<Arc<CodecParams>>,
    /// A keyframe came since the start or the last loss.
    synced: bool,
    last_pts: Option<i64>,
}

/// One depacketized frame as str0m hands it over, reduced to what ingest
/// reads (so tests and fuzzing can feed it without str0m).
pub struct Depacketized<'a> {
    pub kind: TrackKind,
    pub clock_rate: u32,
    pub rtp_time: u32,
    pub arrival: Instant,
    pub sender_report: Option<SenderReport>,
    /// No packet was lost since the previous frame of the track.
    pub contiguous: bool,
    pub data: &'a [u8],
}

pub struct Ingested {
    pub frame: Option<Frame>,
    /// Video cannot be decoded until the next keyframe: ask for one.
    pub want_keyframe: bool,
}

impl Ingest {
    /// `video` is the negotiated video codec (H264, VP8, VP9 or AV1).
    pub fn new(opus_channels: u8, video: Codec) -> Self {
        Self::with_epoch(opus_channels, video, None)
    }

    /// An ingest whose stream timeline starts at `epoch` (a simulcast
    /// layer's, on its publication's clock).
    pub fn with_epoch(opus_channels: u8, video: Codec, epoch: Option<Instant>) -> Self {
        Self {
            timeline: Timeline::with_epoch(epoch),
            video: match video {
                Codec::Vp8 | Codec::Vp9 | Codec::Av1 => Video::Whole(WholeFrames {
                    codec: video,
                    params: None,
                    synced: false,
                    last_pts: None,
                }),
                Codec::H264 | Codec::Opus | Codec::Aac => Video::H264(Box::default()),
            },
            opus: Arc::new(CodecParams::Opus {
                sample_rate: 48_000,
                channels: opus_channels,
            }),
        }
    }

    /// When the stream timeline's tick 0 arrived.
    pub fn epoch(&self) -> Option<Instant> {
        self.timeline.epoch()
    }

    /// The H264 assembler's counters.
    pub fn video_stats(&self) -> AssemblerStats {
        match &self.video {
            Video::H264(a) => a.stats(),
            Video::Whole(_) => AssemblerStats::default(),
        }
    }

    /// str0m's media data in.
    pub fn push(&mut self, kind: TrackKind, d: &MediaData) -> Ingested {
        self.push_depacketized(Depacketized {
            kind,
            clock_rate: d.time.denom(),
            rtp_time: d.time.numer() as u32,
            arrival: d.network_time,
            sender_report: d.last_sender_info.as_ref().map(|si| SenderReport {
                ntp_time: si.ntp_time,
                rtp_time: si.rtp_time.numer() as u32,
            }),
            contiguous: d.contiguous,
            data: &d.data,
        })
    }

    pub fn push_depacketized(&mut self, d: Depacketized<'_>) -> Ingested {
        let kind = d.kind;
        if let Some(sr) = d.sender_report {
            self.timeline.sender_report(kind, sr);
        }
        let Some(pts) = self.timeline.map(kind, d.clock_rate, d.rtp_time, d.arrival) else {
            telemetry::media_dropped(MediaDrop::Timestamp, 1);
            return Ingested {
                frame: None,
                want_keyframe: false,
            };
        };
        match kind {
            TrackKind::Video => match &mut self.video {
                Video::H264(assembler) => h264(assembler, d.data, pts, d.contiguous),
                Video::Whole(w) => w.push(d.data, pts, d.contiguous),
            },
            TrackKind::Audio => Ingested {
                frame: Some(Frame {
                    pts,
                    dts: pts,
                    key: true,
                    data: Bytes::copy_from_slice(d.data),
                    params: self.opus.clone(),
                }),
                want_keyframe: false,
            },
        }
    }
}

fn h264(assembler: &mut H264Assembler, data: &[u8], pts: i64, contiguous: bool) -> Ingested {
    let before = assembler.stats();
    let out = assembler.push(data, pts, contiguous);
    let after = assembler.stats();
    for (why, n) in [
        (
            MediaDrop::WaitingKeyframe,
            after.dropped_waiting_idr - before.dropped_waiting_idr,
        ),
        (
            MediaDrop::BadParameterSet,
            after.bad_param_sets - before.bad_param_sets,
        ),
    ] {
        if n > 0 {
            telemetry::media_dropped(why, n);
        }
    }
    Ingested {
        frame: out.frame,
        want_keyframe: out.need_keyframe,
    }
}

impl WholeFrames {
    fn push(&mut self, data: &[u8], pts: i64, contiguous: bool) -> Ingested {
        let keyframe =
            match self.codec {
                Codec::Vp8 => vp8::keyframe_size(data)
                    .map(|(width, height)| CodecParams::Vp8 { width, height }),
                Codec::Vp9 => vp9::keyframe_size(data)
                    .map(|(width, height)| CodecParams::Vp9 { width, height }),
                Codec::Av1 => av1::keyframe_size(data)
                    .map(|(width, height)| CodecParams::Av1 { width, height }),
                Codec::H264 | Codec::Opus | Codec::Aac => None,
            };
        if self.last_pts.is_some_and(|last| pts <= last) {
            // A frame from the past (a sender's clock jumping back): the
            // outputs need increasing times, the decoder every frame.
            telemetry::media_dropped(MediaDrop::Timestamp, 1);
            self.synced = false;
            return Ingested {
                frame: None,
                want_keyframe: true,
            };
        }
        let key = keyframe.is_some();
        if let Some(new) = keyframe {
            if self.params.as_deref() != Some(&new) {
                self.params = Some(Arc::new(new));
            }
            self.synced = true;
        } else if !contiguous {
            self.synced = false;
        }
        let frame = match (&self.params, self.synced) {
            (Some(p), true) => Some(Frame {
                pts,
                dts: pts,
                key,
                data: Bytes::copy_from_slice(data),
                params: p.clone(),
            }),
            _ => {
                telemetry::media_dropped(MediaDrop::WaitingKeyframe, 1);
                None
            }
        };
        if frame.is_some() {
            self.last_pts = Some(pts);
        }
        Ingested {
            want_keyframe: frame.is_none(),
            frame,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first bytes of a VP9 keyframe (640x360) and of an inter frame.
    const VP9_KEY: [u8; 10] = [0x82, 0x49, 0x83, 0x42, 0x00, 0x27, 0xf0, 0x16, 0x76, 0x08];
    const VP9_INTER: [u8; 4] = [0x86, 0x00, 0x40, 0x92];
    /// An AV1 temporal unit with a sequence header (640x360) and a key
    /// frame, and one with an inter frame.
    const AV1_KEY: [u8; 18] = [
        0x0a, 0x0b, 0x00, 0x00, 0x00, 0x0c, 0xc4, 0xff, 0x67, 0x36, 0xbe, 0x40, 0x10, 0x32, 0x03,
        0x10, 0xaa, 0xbb,
    ];
    const AV1_INTER: [u8; 5] = [0x32, 0x03, 0x30, 0xaa, 0xbb];

    /// What came out of one frame: its key flag and size, or whether a
    /// keyframe was asked for.
    type Out = Result<(bool, (u32, u32)), bool>;

    /// Pushes video frames 1/30 s apart; `lost` marks the frames after a
    /// loss.
    fn run(codec: Codec, frames: &[(&[u8], bool)]) -> Vec<Out> {
        let mut ingest = Ingest::new(2, codec);
        let start = Instant::now();
        frames
            .iter()
            .enumerate()
            .map(|(i, (data, lost))| {
                let out = ingest.push_depacketized(Depacketized {
                    kind: TrackKind::Video,
                    clock_rate: 90_000,
                    rtp_time: 1000 + 3000 * i as u32,
                    arrival: start + std::time::Duration::from_millis(33 * i as u64),
                    sender_report: None,
                    contiguous: !lost,
                    data,
                });
                match out.frame {
                    Some(f) => {
                        assert_eq!(f.codec(), codec);
                        assert_eq!(&f.data[..], *data);
                        Ok((f.key, f.params.picture_size().unwrap()))
                    }
                    None => Err(out.want_keyframe),
                }
            })
            .collect()
    }

    #[test]
    fn vp9_and_av1_start_on_a_keyframe_and_wait_for_one_after_a_loss() {
        for (codec, key, inter) in [
            (Codec::Vp9, &VP9_KEY[..], &VP9_INTER[..]),
            (Codec::Av1, &AV1_KEY[..], &AV1_INTER[..]),
        ] {
            let out = run(
                codec,
                &[
                    (inter, false),
                    (key, false),
                    (inter, false),
                    (inter, true),
                    (inter, false),
                    (key, true),
                ],
            );
            let size = (640, 360);
            assert_eq!(
                out,
                [
                    Err(true),
                    Ok((true, size)),
                    Ok((false, size)),
                    Err(true),
                    Err(true),
                    Ok((true, size)),
                ],
                "{codec:?}"
            );
        }
    }

    #[test]
    fn a_frame_from_the_past_is_dropped_until_the_next_keyframe() {
        let mut w = WholeFrames {
            codec: Codec::Vp9,
            params: None,
            synced: false,
            last_pts: None,
        };
        let mut pts_out = |data: &[u8], pts| {
            let out = w.push(data, pts, true);
            assert_eq!(out.want_keyframe, out.frame.is_none());
            out.frame.map(|f| f.pts)
        };
        assert_eq!(pts_out(&VP9_KEY, 3000), Some(3000));
        assert_eq!(pts_out(&VP9_INTER, 6000), Some(6000));
        assert_eq!(pts_out(&VP9_INTER, 6000), None);
        assert_eq!(pts_out(&VP9_INTER, 9000), None);
        assert_eq!(pts_out(&VP9_KEY, 4000), None);
        assert_eq!(pts_out(&VP9_KEY, 12000), Some(12000));
    }

    #[test]
    fn garbage_video_never_becomes_a_frame() {
        for codec in Codec::TRANSCODED_VIDEO {
            let garbage: [&[u8]; 4] = [&[], &[0xff; 40], &[0x0a, 0xff, 0x80], &AV1_KEY[..12]];
            let frames: Vec<_> = garbage.iter().map(|g| (*g, false)).collect();
            assert!(
                run(codec, &frames).iter().all(|o| *o == Err(true)),
                "{codec:?}"
            );
        }
    }
}
