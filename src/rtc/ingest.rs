//! From str0m's depacketized media to hub frames: RTP time onto the stream
//! timeline (with sender reports for lip sync when the publisher sends
//! them), H264 access units assembled with DTS, Opus packets as they are.
//! The media work is the sans-IO code in `media/`; this is the adapter.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use str0m::media::MediaData;

use crate::media::frame::{CodecParams, Frame, TrackKind};
use crate::media::h264::H264Assembler;
use crate::media::time::{SenderReport, Timeline};

pub struct Ingest {
    timeline: Timeline,
    video: H264Assembler,
    opus: Arc<CodecParams>,
}

pub struct Ingested {
    pub frame: Option<Frame>,
    /// Video cannot be decoded until the next keyframe: ask for one.
    pub want_keyframe: bool,
}

impl Ingest {
    pub fn new(opus_channels: u8) -> Self {
        Self {
            timeline: Timeline::new(),
            video: H264Assembler::new(),
            opus: Arc::new(CodecParams::Opus {
                sample_rate: 48_000,
                channels: opus_channels,
            }),
        }
    }

    pub fn push(&mut self, kind: TrackKind, d: &MediaData) -> Ingested {
        if let Some(si) = &d.last_sender_info {
            self.timeline.sender_report(
                kind,
                SenderReport {
                    ntp_time: si.ntp_time,
                    rtp_time: si.rtp_time.numer() as u32,
                },
            );
        }
        let arrival: Instant = d.network_time;
        let Some(pts) = self
            .timeline
            .map(kind, d.time.denom(), d.time.numer() as u32, arrival)
        else {
            return Ingested {
                frame: None,
                want_keyframe: false,
            };
        };
        match kind {
            TrackKind::Video => {
                let out = self.video.push(&d.data, pts, d.contiguous);
                Ingested {
                    frame: out.frame,
                    want_keyframe: out.need_keyframe,
                }
            }
            TrackKind::Audio => Ingested {
                frame: Some(Frame {
                    pts,
                    dts: pts,
                    key: true,
                    data: Bytes::copy_from_slice(&d.data),
                    params: self.opus.clone(),
                }),
                want_keyframe: false,
            },
        }
    }
}
