//! From str0m's depacketized media to hub frames: RTP time onto the stream
//! timeline (with sender reports for lip sync when the publisher sends
//! them), H264 access units assembled with DTS, Opus packets as they are.
//! The media work is the sans-IO code in `media/`; this is the adapter.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use str0m::media::MediaData;

use crate::media::frame::{Codec, CodecParams, Frame, TrackKind};
use crate::media::h264::{AssemblerStats, H264Assembler};
use crate::media::time::{SenderReport, Timeline};
use crate::media::vp8;
use crate::telemetry::{self, MediaDrop};

pub struct Ingest {
    timeline: Timeline,
    video: Video,
    opus: Arc<CodecParams>,
}

/// The publisher's video, by codec.
enum Video {
    H264(Box<H264Assembler>),
    Vp8 {
        params: Option<Arc<CodecParams>>,
        /// A keyframe came since the start or the last loss.
        synced: bool,
    },
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
    /// `video` is the negotiated video codec (H264 or VP8).
    pub fn new(opus_channels: u8, video: Codec) -> Self {
        Self {
            timeline: Timeline::new(),
            video: match video {
                Codec::Vp8 => Video::Vp8 {
                    params: None,
                    synced: false,
                },
                _ => Video::H264(Box::default()),
            },
            opus: Arc::new(CodecParams::Opus {
                sample_rate: 48_000,
                channels: opus_channels,
            }),
        }
    }

    /// The H264 assembler's counters.
    pub fn video_stats(&self) -> AssemblerStats {
        match &self.video {
            Video::H264(a) => a.stats(),
            Video::Vp8 { .. } => AssemblerStats::default(),
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
                Video::Vp8 { params, synced } => vp8(params, synced, d.data, pts, d.contiguous),
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

/// VP8 frames go out as they are, from a keyframe on (after a loss, the
/// decoder would show garbage until the next one: wait for it instead).
fn vp8(
    params: &mut Option<Arc<CodecParams>>,
    synced: &mut bool,
    data: &[u8],
    pts: i64,
    contiguous: bool,
) -> Ingested {
    let key = vp8::is_keyframe(data);
    if key {
        if let Some((width, height)) = vp8::keyframe_size(data) {
            let new = CodecParams::Vp8 { width, height };
            if params.as_deref() != Some(&new) {
                *params = Some(Arc::new(new));
            }
            *synced = true;
        }
    } else if !contiguous {
        *synced = false;
    }
    let frame = match (&*params, *synced) {
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
    Ingested {
        want_keyframe: frame.is_none(),
        frame,
    }
}
