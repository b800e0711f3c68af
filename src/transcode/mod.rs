//! Transcoding of hub frames with FFmpeg (through `ffmpeg-next`).
//!
//! Everything here is blocking CPU work: it runs on dedicated threads, never
//! on the async runtime, and is fed by bounded queues that drop when full.

pub mod audio;

/// Initialise FFmpeg once per process. Cheap after the first call.
pub(crate) fn init_ffmpeg() {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        if let Err(e) = ffmpeg_next::init() {
            tracing::warn!(error = %e, "ffmpeg init failed");
        }
    });
}
