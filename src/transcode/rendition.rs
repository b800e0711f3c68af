//! Transcoders as hub readers: a transcoder reads the publisher's frames of
//! one kind from the stream's hub, transcodes them on its own thread and
//! puts the result into a hub, where HLS and RTMP read it. The AAC
//! transcoder turns Opus into AAC, back into the same hub. The H264
//! transcoder turns VP8 into H264 (back into the same hub) and encodes the
//! rungs of ABR ladders (each into a rendition hub of its own). One
//! transcoder per publication, so a publisher coming back starts a fresh
//! decoder.

use std::sync::Arc;

use tokio::sync::watch;

use super::TranscodeError;
use super::audio::{AacSettings, OpusToAac};
use super::video::{ToH264, VideoSettings};
use super::worker::{Core, PushError, Worker};
use crate::hub::{Hub, HubFrame, Publication};
use crate::media::frame::{Codec, Frame, TrackKind};

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

/// Video codecs the outputs cannot carry: published in one of them, the
/// video is decoded and encoded to H264.
pub const NON_H264_INPUTS: &[Codec] = &Codec::TRANSCODED_VIDEO;

/// One output of the video transcoder: the hub its frames go to and how
/// they are encoded.
pub struct Rung {
    pub hub: Arc<Hub>,
    pub settings: VideoSettings,
}

/// A rendition hub's publication: started with the stream's, stopped when
/// the last holder lets go (the video transcoder's thread, once it has
/// handed over its last frames), so a rendition's HLS ends after its last
/// frame, not before.
struct Live {
    hubs: Vec<Arc<Hub>>,
    id: u64,
}

impl Drop for Live {
    fn drop(&mut self) {
        for hub in &self.hubs {
            hub.stop(self.id);
        }
    }
}

/// The video transcoder of a stream: decodes the publisher's video once and
/// encodes each rung (its own thread, one bounded queue). Rungs whose hub is
/// another than `main` are renditions: their hubs get the stream's
/// publication from here (the stream puts its audio on them), so each
/// carries a complete program (an HLS variant, a push).
pub async fn run_h264(main: Arc<Hub>, rungs: Vec<Rung>, mut shutdown: watch::Receiver<bool>) {
    let mut renditions: Vec<Arc<Hub>> = Vec::new();
    for r in &rungs {
        if !Arc::ptr_eq(&r.hub, &main) && !renditions.iter().any(|h| Arc::ptr_eq(h, &r.hub)) {
            renditions.push(r.hub.clone());
        }
    }
    let mut codecs = NON_H264_INPUTS.to_vec();
    if rungs.iter().any(|r| r.settings.for_h264_input) {
        codecs.push(Codec::H264);
    }
    // About 4 s of video.
    let mut sub = main.subscribe("h264-transcoder", &codecs, 320);
    let mut ladder = Ladder {
        span: tracing::info_span!("transcoder", stream = %main.name(), kind = ToH264::NAME),
        dropped_busy: crate::telemetry::frames_dropped(
            main.name(),
            "h264-transcoder",
            "transcoder_busy",
        ),
        targets: rungs.iter().map(|r| r.hub.clone()).collect(),
        settings: rungs.into_iter().map(|r| r.settings).collect(),
        main,
        renditions,
        live: None,
        ended: None,
        worker: None,
        dropped_reported: 0,
        until_keyframe: false,
    };
    loop {
        tokio::select! {
            f = sub.frames.recv() => match f {
                Some(f) => ladder.frame(f),
                None => break,
            },
            changed = sub.state.changed() => {
                if changed.is_err() {
                    break;
                }
                if sub.state.borrow_and_update().is_none() {
                    // Frames the publisher sent before leaving come first.
                    while let Ok(f) = sub.frames.try_recv() {
                        ladder.frame(f);
                    }
                    ladder.end();
                }
            }
            _ = shutdown.changed() => break,
        }
    }
    ladder.end();
}

/// The state of [`run_h264`].
struct Ladder {
    span: tracing::Span,
    main: Arc<Hub>,
    renditions: Vec<Arc<Hub>>,
    /// The hub of each rung.
    targets: Arc<[Arc<Hub>]>,
    settings: Vec<VideoSettings>,
    live: Option<Arc<Live>>,
    /// The publication that ended last: its late frames are ignored.
    ended: Option<u64>,
    worker: Option<Worker<ToH264>>,
    dropped_busy: metrics::Counter,
    dropped_reported: u64,
    /// Video lost to a full queue cannot be decoded until the next keyframe.
    until_keyframe: bool,
}

impl Ladder {
    /// The publication ended: the worker flushes on its thread, and the
    /// renditions stop once it is done with them.
    fn end(&mut self) {
        if let Some(live) = self.live.take() {
            self.ended = Some(live.id);
        }
        self.worker = None;
    }

    fn frame(&mut self, hf: HubFrame) {
        let publication = hf.publication;
        if self.ended == Some(publication.id) {
            return;
        }
        if self.live.as_ref().map(|l| l.id) != Some(publication.id) {
            self.end();
            for hub in &self.renditions {
                let main = self.main.clone();
                hub.start(publication, Box::new(move || main.request_keyframe()));
            }
            self.live = Some(Arc::new(Live {
                hubs: self.renditions.clone(),
                id: publication.id,
            }));
            self.until_keyframe = false;
        }
        if self.worker.is_none() && !self.start_worker(publication) {
            return;
        }
        let Some(w) = self.worker.as_ref() else {
            return;
        };
        if self.until_keyframe && !hf.frame.key {
            self.dropped_busy.increment(1);
            return;
        }
        self.until_keyframe = false;
        match w.try_push(hf.frame) {
            Ok(()) => {}
            Err(PushError::Full) => {
                self.dropped_busy.increment(1);
                self.until_keyframe = true;
                self.main.request_keyframe();
                let dropped = w.dropped();
                if dropped >= self.dropped_reported + 50 {
                    tracing::warn!(parent: &self.span, dropped, "video transcoder too slow, frames dropped");
                    self.dropped_reported = dropped;
                }
            }
            Err(PushError::Closed) => {
                tracing::error!(parent: &self.span, "video transcoder thread stopped");
                self.worker = None;
            }
        }
    }

    fn start_worker(&mut self, publication: Publication) -> bool {
        let (Some(live), targets) = (self.live.clone(), self.targets.clone()) else {
            return false;
        };
        let started = ToH264::ladder(self.settings.clone()).and_then(|core| {
            // The rungs' frames, then (when the thread is done) the stop.
            Worker::spawn(core, self.main.name(), 60, move |(i, f)| {
                let _stops_when_done = &live;
                if let Some(hub) = targets.get(i) {
                    hub.publish(publication, f);
                }
            })
        });
        match started {
            Ok(w) => {
                self.worker = Some(w);
                true
            }
            Err(e) => {
                tracing::error!(parent: &self.span, error = %e, "cannot start the video transcoder; its renditions get no video");
                false
            }
        }
    }
}

async fn run<C: Core<Out = Frame>>(
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
