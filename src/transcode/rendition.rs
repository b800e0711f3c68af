//! Transcoders as hub readers: a transcoder reads the publisher's frames of
//! one kind from the stream's hub, transcodes them and puts the result into
//! a hub, where HLS and RTMP read it. The AAC transcoder turns Opus into AAC,
//! back into the same hub, in its reader task. The H264
//! transcoder turns VP8 into H264 (back into the same hub) and encodes the
//! rungs of ABR ladders (each into a rendition hub of its own), on a thread
//! of its own. One transcoder per publication, so a publisher coming back starts a fresh
//! decoder.

use std::sync::Arc;

use tokio::sync::watch;

use super::audio::{AacSettings, OpusToAac};
use super::video::{ToH264, VideoSettings};
use super::worker::{Core, PushError, WarnLimit, Worker};
use crate::hub::{Hub, HubFrame, Publication};
use crate::media::frame::Codec;

/// The stream's Opus → AAC transcoder. It runs in this task, not on a
/// thread of its own: a 20 ms packet costs about 60 µs (Opus decoding and
/// syom), less than the two thread hand-offs per packet it would take to run
/// it elsewhere (measured with `scripts/bench.sh`: the hand-offs were half
/// of the audio's cost per stream). When this task falls behind, its hub
/// queue (about 5 s) fills and the hub drops and counts, as for any reader.
pub async fn run_aac(hub: Arc<Hub>, settings: AacSettings, mut shutdown: watch::Receiver<bool>) {
    let span = tracing::info_span!("transcoder", stream = %hub.name(), kind = "aac");
    let mut sub = hub.subscribe("aac-transcoder", &[Codec::Opus], 256);
    let mut current: Option<(Publication, OpusToAac)> = None;
    let mut warnings = WarnLimit::default();
    // How far behind it runs: the audio still queued ahead of it.
    let lag = crate::telemetry::transcode_lag(hub.name(), "aac");
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
                    finish_aac(&hub, current.take(), &span);
                }
                continue;
            }
            _ = shutdown.changed() => break,
        };
        if current.as_ref().map(|(p, _)| p.id) != Some(hf.publication.id) {
            finish_aac(&hub, current.take(), &span);
            match OpusToAac::new(settings.clone()) {
                Ok(t) => current = Some((hf.publication, t)),
                Err(e) => {
                    tracing::error!(parent: &span, error = %e, "cannot start the AAC transcoder; this track is lost");
                    continue;
                }
            }
        }
        let Some((publication, transcoder)) = current.as_mut() else {
            continue;
        };
        lag.set(sub.frames.len() as f64 * OPUS_PACKET_SECONDS);
        match transcoder.push(&hf.frame) {
            Ok(out) => out.into_iter().for_each(|f| hub.publish(*publication, f)),
            Err(error) => {
                if let Some(suppressed) = warnings.due() {
                    tracing::warn!(parent: &span, %error, suppressed, "transcode error");
                }
            }
        }
    }
    finish_aac(&hub, current.take(), &span);
}

/// What a WebRTC Opus packet usually lasts.
const OPUS_PACKET_SECONDS: f64 = 0.02;

/// Flushes a publication's AAC transcoder into the hub.
fn finish_aac(hub: &Hub, current: Option<(Publication, OpusToAac)>, span: &tracing::Span) {
    let Some((publication, mut transcoder)) = current else {
        return;
    };
    match transcoder.flush() {
        Ok(out) => out.into_iter().for_each(|f| hub.publish(publication, f)),
        Err(error) => tracing::warn!(parent: span, %error, "transcode flush failed"),
    }
    tracing::debug!(parent: span, stats = ?transcoder.stats(), "transcoder stopped");
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
