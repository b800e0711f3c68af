//! A transcoder core on its own thread behind a bounded queue: the caller
//! (an async hub reader) never blocks; a full queue drops the frame and
//! counts it. Closing the queue (dropping the handle) makes the thread
//! flush its core, hand over the last frames and exit.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::TranscodeError;
use crate::media::frame::Frame;

/// The synchronous part of a transcoder: frames in, frames out.
pub trait Core: Send + 'static {
    type Stats: Send + std::fmt::Debug + 'static;
    /// What comes out: frames, or frames tagged with their output.
    type Out: Send + 'static;
    /// Thread name prefix and log label.
    const NAME: &'static str;
    fn push(&mut self, frame: &Frame) -> Result<Vec<Self::Out>, TranscodeError>;
    fn flush(&mut self) -> Result<Vec<Self::Out>, TranscodeError>;
    fn stats(&self) -> Self::Stats;
}

/// Why [`Worker::try_push`] did not take a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    /// The queue is full: the frame was dropped (and counted).
    #[error("transcoder queue full, frame dropped")]
    Full,
    /// The transcoder thread has exited.
    #[error("transcoder stopped")]
    Closed,
}

/// A frame and when it was queued.
type Queued = (Frame, Instant);

pub struct Worker<C: Core> {
    tx: Option<SyncSender<Queued>>,
    dropped: Arc<AtomicU64>,
    handle: Option<JoinHandle<C::Stats>>,
}

impl<C: Core> Worker<C> {
    /// Starts `core` on a thread. `on_frame` receives every output frame on
    /// that thread (keep it cheap and non-blocking). `queue` is the input
    /// queue length in frames.
    pub fn spawn<F>(core: C, name: &str, queue: usize, on_frame: F) -> Result<Self, TranscodeError>
    where
        F: FnMut(C::Out) + Send + 'static,
    {
        let (tx, rx) = mpsc::sync_channel(queue.max(1));
        let stream = name.to_owned();
        let handle = std::thread::Builder::new()
            .name(format!("{}-{name}", C::NAME))
            .spawn(move || run(core, rx, on_frame, &stream))?;
        Ok(Worker {
            tx: Some(tx),
            dropped: Arc::new(AtomicU64::new(0)),
            handle: Some(handle),
        })
    }

    /// Queues a frame. Never blocks: a full queue drops the frame.
    pub fn try_push(&self, frame: Frame) -> Result<(), PushError> {
        let Some(tx) = self.tx.as_ref() else {
            return Err(PushError::Closed);
        };
        match tx.try_send((frame, Instant::now())) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                Err(PushError::Full)
            }
            Err(TrySendError::Disconnected(_)) => Err(PushError::Closed),
        }
    }

    /// Frames dropped so far because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Closes the queue and waits for the thread to flush and exit.
    /// Blocking: call from a blocking context.
    pub fn finish(mut self) -> Option<C::Stats> {
        self.tx = None;
        self.handle.take().and_then(|h| h.join().ok())
    }
}

impl<C: Core> Drop for Worker<C> {
    fn drop(&mut self) {
        // Closing the queue is enough: the thread flushes and exits on its
        // own; it is not joined here so dropping never blocks.
        self.tx = None;
    }
}

/// Warnings at most once per this interval per transcoder.
const WARN_INTERVAL: Duration = Duration::from_secs(5);

/// Rate limit for a transcoder's error warnings: one per [`WARN_INTERVAL`],
/// with how many were suppressed since the last.
#[derive(Default)]
pub(crate) struct WarnLimit {
    last: Option<Instant>,
    suppressed: u64,
}

impl WarnLimit {
    /// `Some(suppressed since the last warning)` when a warning is due now.
    pub(crate) fn due(&mut self) -> Option<u64> {
        if self.last.is_none_or(|t| t.elapsed() >= WARN_INTERVAL) {
            self.last = Some(Instant::now());
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

fn run<C: Core, F: FnMut(C::Out)>(
    mut core: C,
    rx: Receiver<Queued>,
    mut on_frame: F,
    stream: &str,
) -> C::Stats {
    let mut warnings = WarnLimit::default();
    let lag = crate::telemetry::transcode_lag(stream, C::NAME);
    for (frame, queued) in rx {
        lag.set(queued.elapsed().as_secs_f64());
        match core.push(&frame) {
            Ok(out) => out.into_iter().for_each(&mut on_frame),
            Err(error) => {
                if let Some(suppressed) = warnings.due() {
                    tracing::warn!(stream, transcoder = C::NAME, %error, suppressed, "transcode error");
                }
            }
        }
    }
    match core.flush() {
        Ok(out) => out.into_iter().for_each(&mut on_frame),
        Err(error) => {
            tracing::warn!(stream, transcoder = C::NAME, %error, "transcode flush failed")
        }
    }
    let stats = core.stats();
    tracing::debug!(stream, transcoder = C::NAME, ?stats, "transcoder stopped");
    stats
}
