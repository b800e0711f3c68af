//! Transcoded renditions as hub readers: a transcoder reads the publisher's
//! frames of one codec from the hub, transcodes them on its own thread and
//! puts the result back into the same hub, where HLS and RTMP read it. The
//! AAC rendition turns Opus into AAC; the H264 rendition turns VP8 into
//! H264. One transcoder per publication, so a publisher coming back starts a
//! fresh decoder.

use std::sync::Arc;

use tokio::sync::watch;

use super::TranscodeError;
use super::audio::{AacSettings, OpusToAac};
use super::video::{ToH264, VideoSettings};
use super::worker::{Core, PushError, Worker};
use crate::hub::{Hub, Publication};
use crate::media::frame::{Codec, TrackKind};

/// What one rendition reads and how much it may queue.
struct Reader {
    /// Name in metrics and logs.
    name: &'static str,
    codecs: &'static [Codec],
    /// Frames queued for the hub reader.
    hub_queue: usize,
    /// Frames queued for the transcoder thread.
    thread_queue: usize,
}

pub async fn run_aac(hub: Arc<Hub>, settings: AacSettings, shutdown: watch::Receiver<bool>) {
    let reader = Reader {
        name: "aac-transcoder",
        codecs: &[Codec::Opus],
        // About 5 s and 2 s of 20 ms packets.
        hub_queue: 256,
        thread_queue: 100,
    };
    run(
        hub,
        reader,
        move || OpusToAac::new(settings.clone()),
        shutdown,
    )
    .await;
}

pub async fn run_h264(hub: Arc<Hub>, settings: VideoSettings, shutdown: watch::Receiver<bool>) {
    let reader = Reader {
        name: "h264-transcoder",
        codecs: &Codec::TRANSCODED_VIDEO,
        // About 4 s and 2 s at 30 fps.
        hub_queue: 120,
        thread_queue: 60,
    };
    run(hub, reader, move || ToH264::new(settings.clone()), shutdown).await;
}

async fn run<C: Core>(
    hub: Arc<Hub>,
    reader: Reader,
    make: impl Fn() -> Result<C, TranscodeError>,
    mut shutdown: watch::Receiver<bool>,
) {
    let span = tracing::info_span!("transcoder", stream = %hub.name(), kind = C::NAME);
    let mut sub = hub.subscribe(reader.name, reader.codecs, reader.hub_queue);
    let mut current: Option<(Publication, Worker<C>)> = None;
    let mut dropped_reported = 0;
    // Video lost to a full queue cannot be decoded until the next keyframe.
    let mut until_keyframe = false;
    let dropped_busy = crate::telemetry::frames_dropped(hub.name(), reader.name, "transcoder_busy");
    loop {
        let hf = tokio::select! {
            f = sub.frames.recv() => match f {
                Some(f) => f,
                None => break,
            },
            changed = sub.state.changed() => {
                if changed.is_err() {
                    break;
                }
                if sub.state.borrow_and_update().is_none() {
                    // Dropping the transcoder flushes its last frames.
                    current = None;
                }
                continue;
            }
            _ = shutdown.changed() => break,
        };
        if current.as_ref().map(|(p, _)| p.id) != Some(hf.publication.id) {
            let publication = hf.publication;
            let out = hub.clone();
            let started = make().and_then(|core| {
                Worker::spawn(core, hub.name(), reader.thread_queue, move |f| {
                    out.publish(publication, f)
                })
            });
            match started {
                Ok(t) => current = Some((publication, t)),
                Err(e) => {
                    tracing::error!(parent: &span, error = %e, "cannot start the transcoder; this track is lost");
                    current = None;
                    continue;
                }
            }
        }
        let Some((_, transcoder)) = current.as_ref() else {
            continue;
        };
        let video = hf.frame.codec().kind() == TrackKind::Video;
        if until_keyframe && !hf.frame.key {
            dropped_busy.increment(1);
            continue;
        }
        until_keyframe = false;
        match transcoder.try_push(hf.frame) {
            Ok(()) => {}
            Err(PushError::Full) => {
                dropped_busy.increment(1);
                if video {
                    until_keyframe = true;
                    hub.request_keyframe();
                }
                let dropped = transcoder.dropped();
                if dropped >= dropped_reported + 50 {
                    tracing::warn!(parent: &span, dropped, "transcoder too slow, frames dropped");
                    dropped_reported = dropped;
                }
            }
            Err(PushError::Closed) => {
                tracing::error!(parent: &span, "transcoder thread stopped");
                current = None;
            }
        }
    }
}
