//! Transcoding of hub frames with FFmpeg (through `ffmpeg-next`).
//!
//! Everything here is blocking CPU work: it runs on dedicated threads, never
//! on the async runtime, and is fed by bounded queues that drop when full.

pub mod audio;
pub mod rendition;
pub mod video;
pub mod worker;

use ffmpeg_next as ff;

use crate::media::frame::Codec;

/// Initialise FFmpeg once per process. Cheap after the first call.
pub(crate) fn init_ffmpeg() {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        if let Err(e) = ffmpeg_next::init() {
            tracing::warn!(error = %e, "ffmpeg init failed");
        }
        // FFmpeg's own logger writes straight to stderr, bypassing tracing,
        // one line per bad packet ("Error parsing the packet header").
        // Errors reach us as return values and are logged (rate-limited)
        // through tracing instead.
        ffmpeg_next::log::set_level(ffmpeg_next::log::Level::Fatal);
    });
}

#[derive(Debug, thiserror::Error)]
pub enum TranscodeError {
    #[error("invalid transcode settings: {0}")]
    InvalidSettings(String),
    #[error("codec not available in this FFmpeg build: {0}")]
    CodecNotFound(&'static str),
    #[error("{what}: {source}")]
    Ffmpeg {
        what: &'static str,
        #[source]
        source: ff::Error,
    },
    #[error("empty packet")]
    EmptyPacket,
    #[error("unexpected codec {0:?}")]
    WrongCodec(Codec),
    #[error("encoder error: {0}")]
    Encode(String),
    #[error("undecodable packet: {0}")]
    Decode(#[source] ff::Error),
    #[error("transcoder already flushed")]
    Finished,
    #[error("cannot spawn transcoder thread: {0}")]
    Spawn(#[from] std::io::Error),
}

pub fn ffmpeg_err(what: &'static str) -> impl FnOnce(ff::Error) -> TranscodeError {
    move |source| TranscodeError::Ffmpeg { what, source }
}
