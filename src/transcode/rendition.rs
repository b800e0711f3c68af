//! Transcoded renditions as hub readers: the AAC rendition reads the
//! publisher's Opus from the hub, transcodes it on its own thread and puts
//! the AAC frames back into the same hub, where HLS (and later RTMP) read
//! them. One transcoder per publication, so a publisher coming back starts a
//! fresh decoder.

use std::sync::Arc;

use tokio::sync::watch;

use super::audio::{AacSettings, AudioTranscoder, PushError};
use crate::hub::{Hub, Publication};
use crate::media::frame::Codec;

/// Opus packets queued for the hub reader (about 5 s of 20 ms packets).
const HUB_QUEUE: usize = 256;
/// Opus packets queued for the transcoder thread (about 2 s).
const THREAD_QUEUE: usize = 100;

pub async fn run_aac(hub: Arc<Hub>, settings: AacSettings, mut shutdown: watch::Receiver<bool>) {
    let span = tracing::info_span!("aac", stream = %hub.name());
    let mut sub = hub.subscribe("aac-transcoder", &[Codec::Opus], HUB_QUEUE);
    let mut current: Option<(Publication, AudioTranscoder)> = None;
    let mut dropped_reported = 0;
    let dropped_busy =
        crate::telemetry::frames_dropped(hub.name(), "aac-transcoder", "transcoder_busy");
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
            match AudioTranscoder::spawn(settings.clone(), hub.name(), THREAD_QUEUE, move |f| {
                out.publish(publication, f)
            }) {
                Ok(t) => current = Some((publication, t)),
                Err(e) => {
                    tracing::error!(parent: &span, error = %e, "cannot start the Opus to AAC transcoder; audio is lost");
                    current = None;
                    continue;
                }
            }
        }
        let Some((_, transcoder)) = current.as_ref() else {
            continue;
        };
        match transcoder.try_push(hf.frame) {
            Ok(()) => {}
            Err(PushError::Full) => {
                dropped_busy.increment(1);
                let dropped = transcoder.dropped();
                if dropped >= dropped_reported + 50 {
                    tracing::warn!(parent: &span, dropped, "transcoder too slow, Opus packets dropped");
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
