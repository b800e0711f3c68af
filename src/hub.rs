//! The one fan-out point of a stream. The publisher (and transcoders, which
//! put their renditions back in) call [`Hub::publish`], which never blocks:
//! every reader owns a bounded queue, and a reader that falls behind loses
//! frames (counted and logged) and, for video, skips to the next keyframe so
//! what it does get stays decodable.
//!
//! An output whose work per frame is short and never waits (the HLS muxer,
//! the stream's measurements) can instead be a [`Sink`], run inside
//! `publish` in the publisher's task: no queue, and no task to wake for every
//! frame, which at a hundred streams was a third of the kernel's time. A sink
//! that panics is detached and logged; the publisher and the other readers go
//! on.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metrics::Counter;
use tokio::sync::{mpsc, watch};

use crate::media::frame::{Codec, Frame, TrackKind};
use crate::telemetry::{self, Tally};

/// One publisher's session on the stream: which tracks it sends. A new id
/// each time someone (re)publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Publication {
    pub id: u64,
    pub video: bool,
    pub audio: bool,
}

/// A frame as readers get it: with the publication it belongs to, so a reader
/// notices a new publisher in order with the frames.
#[derive(Debug, Clone)]
pub struct HubFrame {
    pub publication: Publication,
    pub frame: Frame,
}

/// What the WebRTC side measured of the publisher's media (video when it
/// sends video, else audio), every few seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct IngressStats {
    /// Fraction of RTP packets lost, 0 to 1, after retransmissions.
    pub loss: f32,
    pub packets: u64,
    pub bytes: u64,
    /// NACKs sent to ask for lost packets again.
    pub nacks: u64,
    /// Round-trip time to the publisher, ms.
    pub rtt_ms: Option<f64>,
}

/// Asks the current publisher for a keyframe (PLI).
pub type KeyframeRequester = Box<dyn Fn() + Send + Sync>;

/// Minimum spacing of keyframe requests sent to a publisher.
const KEYFRAME_REQUEST_INTERVAL: Duration = Duration::from_millis(500);

struct Reader {
    id: u64,
    name: &'static str,
    codecs: Vec<Codec>,
    tx: mpsc::Sender<HubFrame>,
    dropped: u64,
    /// Frames this reader lost since it subscribed, shared with its
    /// [`Subscription`].
    dropped_total: Arc<AtomicU64>,
    waiting_for_key: bool,
    /// Frames lost because its queue was full.
    dropped_full: Counter,
    /// Frames handed to it.
    delivered: Tally,
    /// Frames skipped after a loss, until the next keyframe.
    dropped_gop: Counter,
}

/// An output run inside [`Hub::publish`] (see the module's doc). Its
/// methods must return quickly and never wait: anything slow (files,
/// network) goes to a queue of its own.
pub trait Sink: Send {
    /// A frame of a codec it was attached for.
    fn frame(&mut self, frame: HubFrame);
    /// The publisher `publication` left; its last frames came before.
    fn stopped(&mut self, _publication: Publication) {}
    /// It is detached: ends what it was making.
    fn finish(&mut self) {}
}

struct SinkEntry {
    id: u64,
    name: &'static str,
    codecs: Vec<Codec>,
    waiting_for_key: bool,
    sink: Box<dyn Sink>,
    delivered: Tally,
}

/// Keeps a sink attached; [`Attached::detach`] (or dropping it) takes it off.
pub struct Attached {
    hub: Arc<Hub>,
    id: u64,
}

impl Attached {
    /// Takes the sink off the hub, lets it finish, and drops it.
    pub fn detach(self) {
        let mut sinks = self.hub.lock_sinks();
        let Some(at) = sinks.iter().position(|s| s.id == self.id) else {
            return; // It panicked and was detached already.
        };
        let mut entry = sinks.remove(at);
        drop(sinks);
        if catch_unwind(AssertUnwindSafe(|| entry.sink.finish())).is_err() {
            tracing::error!(stream = %self.hub.name, output = entry.name, "output failed (panic) while finishing");
        }
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        self.hub.lock_sinks().retain(|s| s.id != self.id);
    }
}

/// Whether a reader that waits for a keyframe (`waiting`) takes `frame`:
/// video readers start, and after a loss resume, at a keyframe.
fn passes_key_gate(waiting: &mut bool, video: bool, key: bool) -> bool {
    if video && *waiting {
        if !key {
            return false;
        }
        *waiting = false;
    }
    true
}

struct Publisher {
    publication: Publication,
    keyframe: KeyframeRequester,
    last_keyframe_request: Option<Instant>,
}

pub struct Hub {
    name: String,
    readers: Mutex<Vec<Reader>>,
    sinks: Mutex<Vec<SinkEntry>>,
    publisher: Mutex<Option<Publisher>>,
    state: watch::Sender<Option<Publication>>,
    next_reader: AtomicU64,
    dropped_total: AtomicU64,
    created: Instant,
    /// Milliseconds after `created` of the last published frame.
    last_frame_ms: AtomicU64,
    ingress: Mutex<Option<IngressStats>>,
    /// Frames published, per codec (indexed by [`codec_index`]).
    published: Mutex<[Tally; 6]>,
    /// Milliseconds after `created` when the frame counts were last added
    /// to their counters.
    counted_ms: AtomicU64,
}

/// How often a hub adds its frame counts to the Prometheus counters.
const COUNT_INTERVAL_MS: u64 = 1000;

fn codec_index(codec: Codec) -> usize {
    match codec {
        Codec::H264 => 0,
        Codec::Opus => 1,
        Codec::Aac => 2,
        Codec::Vp8 => 3,
        Codec::Vp9 => 4,
        Codec::Av1 => 5,
    }
}

/// A reader's end. Dropping it removes the reader from the hub.
pub struct Subscription {
    pub frames: mpsc::Receiver<HubFrame>,
    /// The current publication, `None` when nobody publishes.
    pub state: watch::Receiver<Option<Publication>>,
    hub: Arc<Hub>,
    id: u64,
    dropped: Arc<AtomicU64>,
}

impl Subscription {
    /// Frames this reader lost (it was too slow) since it subscribed.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut readers = self.hub.readers.lock().unwrap_or_else(|p| p.into_inner());
        readers.retain(|r| r.id != self.id);
    }
}

impl Hub {
    pub fn new(name: &str) -> Arc<Self> {
        Arc::new(Self {
            name: name.to_owned(),
            readers: Mutex::new(Vec::new()),
            sinks: Mutex::new(Vec::new()),
            publisher: Mutex::new(None),
            state: watch::channel(None).0,
            next_reader: AtomicU64::new(1),
            dropped_total: AtomicU64::new(0),
            created: Instant::now(),
            last_frame_ms: AtomicU64::new(0),
            ingress: Mutex::new(None),
            published: Mutex::new(
                [
                    Codec::H264,
                    Codec::Opus,
                    Codec::Aac,
                    Codec::Vp8,
                    Codec::Vp9,
                    Codec::Av1,
                ]
                .map(|c| Tally::new(telemetry::frames_published(name, c))),
            ),
            counted_ms: AtomicU64::new(0),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Adds a reader that receives frames of `codecs`, with a queue of
    /// `capacity` frames.
    pub fn subscribe(
        self: &Arc<Self>,
        name: &'static str,
        codecs: &[Codec],
        capacity: usize,
    ) -> Subscription {
        let (tx, frames) = mpsc::channel(capacity);
        let id = self.next_reader.fetch_add(1, Ordering::Relaxed);
        let dropped = Arc::new(AtomicU64::new(0));
        self.lock_readers().push(Reader {
            id,
            name,
            codecs: codecs.to_vec(),
            tx,
            dropped: 0,
            dropped_total: dropped.clone(),
            waiting_for_key: true,
            dropped_full: telemetry::frames_dropped(&self.name, name, "queue_full"),
            delivered: Tally::new(telemetry::frames_delivered(&self.name, name)),
            // Only video readers skip to the next keyframe.
            dropped_gop: if codecs.iter().any(|c| c.kind() == TrackKind::Video) {
                telemetry::frames_dropped(&self.name, name, "gop_skipped")
            } else {
                Counter::noop()
            },
        });
        Subscription {
            frames,
            state: self.state.subscribe(),
            hub: self.clone(),
            id,
            dropped,
        }
    }

    /// Runs `sink` for every frame of `codecs` from now on (video from the
    /// next keyframe), in the publisher's task.
    pub fn attach(
        self: &Arc<Self>,
        name: &'static str,
        codecs: &[Codec],
        sink: Box<dyn Sink>,
    ) -> Attached {
        let id = self.next_reader.fetch_add(1, Ordering::Relaxed);
        self.lock_sinks().push(SinkEntry {
            id,
            name,
            codecs: codecs.to_vec(),
            waiting_for_key: true,
            sink,
            delivered: Tally::new(telemetry::frames_delivered(&self.name, name)),
        });
        Attached {
            hub: self.clone(),
            id,
        }
    }

    /// A publisher starts. Replaces any previous one.
    pub fn start(&self, publication: Publication, keyframe: KeyframeRequester) {
        *self.lock_publisher() = Some(Publisher {
            publication,
            keyframe,
            last_keyframe_request: None,
        });
        self.state.send_replace(Some(publication));
        tracing::info!(stream = %self.name, publication = publication.id, video = publication.video, audio = publication.audio, "publisher started");
    }

    /// The publisher `id` left (ignored when another one has taken over).
    pub fn stop(&self, id: u64) {
        let publication = {
            let mut publisher = self.lock_publisher();
            let publication = match publisher.as_ref() {
                Some(p) if p.publication.id == id => p.publication,
                _ => return,
            };
            *publisher = None;
            self.state.send_replace(None);
            publication
        };
        tracing::info!(stream = %self.name, publication = id, "publisher stopped");
        // Not under the publisher's lock: a sink may ask for a keyframe.
        self.run_sinks(|sink| sink.stopped(publication));
        self.flush_counts();
    }

    /// Adds the frame counts not yet added to their counters.
    fn flush_counts(&self) {
        let mut published = self.published.lock().unwrap_or_else(|p| p.into_inner());
        published.iter_mut().for_each(Tally::flush);
        drop(published);
        self.lock_readers()
            .iter_mut()
            .for_each(|r| r.delivered.flush());
        self.lock_sinks()
            .iter_mut()
            .for_each(|s| s.delivered.flush());
    }

    pub fn publication(&self) -> Option<Publication> {
        *self.state.borrow()
    }

    /// The publisher's latest receive statistics.
    pub fn set_ingress(&self, stats: IngressStats) {
        *self.ingress.lock().unwrap_or_else(|p| p.into_inner()) = Some(stats);
    }

    /// Receive statistics of the current publisher, when known.
    pub fn ingress(&self) -> Option<IngressStats> {
        self.publication()?;
        *self.ingress.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands a frame to every reader that wants its codec. Never blocks.
    pub fn publish(&self, publication: Publication, frame: Frame) {
        let now_ms = self.created.elapsed().as_millis() as u64;
        self.last_frame_ms.store(now_ms, Ordering::Relaxed);
        if now_ms >= self.counted_ms.load(Ordering::Relaxed) + COUNT_INTERVAL_MS {
            self.counted_ms.store(now_ms, Ordering::Relaxed);
            self.flush_counts();
        }
        let codec = frame.codec();
        self.published.lock().unwrap_or_else(|p| p.into_inner())[codec_index(codec)].add(1);
        let video = codec.kind() == TrackKind::Video;
        let mut want_keyframe = false;
        let mut readers = self.lock_readers();
        readers.retain_mut(|r| {
            if !r.codecs.contains(&codec) {
                return true;
            }
            if !passes_key_gate(&mut r.waiting_for_key, video, frame.key) {
                want_keyframe = true;
                if r.dropped > 0 {
                    // Part of a GOP it already lost the start of.
                    r.dropped += 1;
                    r.dropped_total.fetch_add(1, Ordering::Relaxed);
                    self.dropped_total.fetch_add(1, Ordering::Relaxed);
                    r.dropped_gop.increment(1);
                }
                return true;
            }
            let item = HubFrame {
                publication,
                frame: frame.clone(),
            };
            match r.tx.try_send(item) {
                Ok(()) => {
                    r.delivered.add(1);
                    if r.dropped > 0 {
                        tracing::warn!(stream = %self.name, reader = r.name, dropped = r.dropped, "reader is too slow, discarded frames");
                        r.dropped = 0;
                    }
                    true
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    r.dropped += 1;
                    r.dropped_total.fetch_add(1, Ordering::Relaxed);
                    self.dropped_total.fetch_add(1, Ordering::Relaxed);
                    r.dropped_full.increment(1);
                    if video {
                        // The rest of this GOP is useless to it.
                        r.waiting_for_key = true;
                    }
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
        drop(readers);
        let mut sinks = self.lock_sinks();
        self.run_locked(&mut sinks, |s| {
            if !s.codecs.contains(&codec) {
                return;
            }
            if !passes_key_gate(&mut s.waiting_for_key, video, frame.key) {
                want_keyframe = true;
                return;
            }
            s.delivered.add(1);
            s.sink.frame(HubFrame {
                publication,
                frame: frame.clone(),
            });
        });
        drop(sinks);
        if want_keyframe {
            self.request_keyframe();
        }
    }

    /// Runs `f` on every sink.
    fn run_sinks(&self, mut f: impl FnMut(&mut dyn Sink)) {
        let mut sinks = self.lock_sinks();
        self.run_locked(&mut sinks, |s| f(s.sink.as_mut()));
    }

    /// Runs `f` on each of `sinks`, detaching those that panic.
    fn run_locked(&self, sinks: &mut Vec<SinkEntry>, mut f: impl FnMut(&mut SinkEntry)) {
        sinks.retain_mut(|s| {
            if catch_unwind(AssertUnwindSafe(|| f(s))).is_ok() {
                return true;
            }
            tracing::error!(stream = %self.name, output = s.name, "output failed (panic); it is detached, the stream goes on without it");
            false
        });
    }

    /// Asks the publisher for a keyframe, at most every 500 ms.
    pub fn request_keyframe(&self) {
        let now = Instant::now();
        let mut publisher = self.lock_publisher();
        let Some(p) = publisher.as_mut() else { return };
        if p.last_keyframe_request
            .is_some_and(|t| now.duration_since(t) < KEYFRAME_REQUEST_INTERVAL)
        {
            return;
        }
        p.last_keyframe_request = Some(now);
        (p.keyframe)();
    }

    /// Time since the last frame was published (since creation when none was).
    pub fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_frame_ms.load(Ordering::Relaxed));
        self.created.elapsed().saturating_sub(last)
    }

    /// Frames discarded because readers were too slow, since start.
    pub fn dropped_frames(&self) -> u64 {
        self.dropped_total.load(Ordering::Relaxed)
    }

    fn lock_readers(&self) -> std::sync::MutexGuard<'_, Vec<Reader>> {
        self.readers.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_sinks(&self) -> std::sync::MutexGuard<'_, Vec<SinkEntry>> {
        self.sinks.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_publisher(&self) -> std::sync::MutexGuard<'_, Option<Publisher>> {
        self.publisher.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::frame::CodecParams;
    use bytes::Bytes;
    use std::sync::atomic::AtomicUsize;

    fn video(pts: i64, key: bool) -> Frame {
        Frame {
            pts,
            dts: pts,
            key,
            data: Bytes::from_static(b"x"),
            params: Arc::new(CodecParams::H264 {
                sps: Bytes::new(),
                pps: Bytes::new(),
                width: 2,
                height: 2,
            }),
        }
    }

    const P: Publication = Publication {
        id: 1,
        video: true,
        audio: false,
    };

    #[tokio::test]
    async fn slow_reader_drops_whole_gops_and_never_blocks() {
        let hub = Hub::new("t");
        let asked = Arc::new(AtomicUsize::new(0));
        let a = asked.clone();
        hub.start(
            P,
            Box::new(move || {
                a.fetch_add(1, Ordering::Relaxed);
            }),
        );
        let mut slow = hub.subscribe("slow", &[Codec::H264], 2);
        let mut fast = hub.subscribe("fast", &[Codec::H264], 100);
        // Delta frames before the first keyframe are skipped and ask for one.
        hub.publish(P, video(0, false));
        assert_eq!(asked.load(Ordering::Relaxed), 1);
        for i in 0..10 {
            hub.publish(P, video(i * 3000, i % 5 == 0));
        }
        assert_eq!(fast.frames.try_recv().unwrap().frame.pts, 0);
        // The slow reader got the keyframe and one more, then lost the rest of
        // that GOP, then resumed at the next keyframe only if room was left.
        let got: Vec<_> = std::iter::from_fn(|| slow.frames.try_recv().ok())
            .map(|f| f.frame.pts)
            .collect();
        assert_eq!(got, vec![0, 3000]);
        assert!(hub.dropped_frames() >= 8);
        assert_eq!(slow.dropped(), hub.dropped_frames());
        assert_eq!(fast.dropped(), 0);
        hub.publish(P, video(30000, false));
        assert!(slow.frames.try_recv().is_err(), "waits for a keyframe");
        hub.publish(P, video(33000, true));
        assert_eq!(slow.frames.try_recv().unwrap().frame.pts, 33000);
    }

    #[tokio::test]
    async fn state_follows_publishers_and_readers_unsubscribe() {
        let hub = Hub::new("t");
        let sub = hub.subscribe("r", &[Codec::Aac], 4);
        hub.start(P, Box::new(|| {}));
        assert_eq!(*sub.state.borrow(), Some(P));
        hub.stop(99);
        assert_eq!(hub.publication(), Some(P), "a stale stop is ignored");
        hub.stop(1);
        assert_eq!(*sub.state.borrow(), None);
        drop(sub);
        assert!(hub.lock_readers().is_empty());
    }

    /// Records what a sink is told, into a shared log.
    struct Recorder(Arc<Mutex<Vec<String>>>);

    impl Sink for Recorder {
        fn frame(&mut self, f: HubFrame) {
            self.0
                .lock()
                .unwrap()
                .push(format!("frame {}", f.frame.pts));
        }
        fn stopped(&mut self, p: Publication) {
            self.0.lock().unwrap().push(format!("stopped {}", p.id));
        }
        fn finish(&mut self) {
            self.0.lock().unwrap().push("finish".into());
        }
    }

    struct Panicky;

    impl Sink for Panicky {
        fn frame(&mut self, f: HubFrame) {
            assert!(f.frame.pts < 3000, "a bug in an output");
        }
    }

    #[test]
    fn sinks_run_inline_from_the_first_keyframe_and_a_panic_detaches_only_that_one() {
        let hub = Hub::new("t");
        hub.start(P, Box::new(|| {}));
        let log = Arc::new(Mutex::new(Vec::new()));
        let attached = hub.attach("rec", &[Codec::H264], Box::new(Recorder(log.clone())));
        let _panicky = hub.attach("bad", &[Codec::H264], Box::new(Panicky));
        let mut reader = hub.subscribe("q", &[Codec::H264], 16);
        hub.publish(P, video(0, false));
        hub.publish(P, video(3000, true));
        hub.publish(P, video(6000, false));
        // The panicking sink is gone; the publisher, the other sink and the
        // queued reader went on.
        assert_eq!(hub.lock_sinks().len(), 1);
        hub.publish(P, video(9000, false));
        hub.stop(1);
        attached.detach();
        hub.publish(P, video(12000, true));
        assert_eq!(
            *log.lock().unwrap(),
            [
                "frame 3000",
                "frame 6000",
                "frame 9000",
                "stopped 1",
                "finish"
            ]
        );
        let got: Vec<_> = std::iter::from_fn(|| reader.frames.try_recv().ok())
            .map(|f| f.frame.pts)
            .collect();
        assert_eq!(got, vec![3000, 6000, 9000, 12000]);
        assert!(hub.lock_sinks().is_empty());
    }
}
