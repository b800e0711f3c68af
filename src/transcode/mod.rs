//! Transcoding of hub frames with FFmpeg (through `ffmpeg-next`).
//!
//! Everything here is blocking CPU work: it runs on dedicated threads, never
//! on the async runtime, and is fed by bounded queues that drop when full.

pub mod audio;
pub mod rendition;

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
