//! One RTMP/RTMPS push target: a hub reader task that keeps a publication
//! flowing to a CDN or origin for as long as the stream is published.
//!
//! - Waits for a live publication, checks that its tracks can go over classic
//!   RTMP (H264 video, AAC audio; the AAC rendition of an Opus publisher
//!   counts), then connects: TCP, or TLS with rustls (webpki roots plus an
//!   optional extra CA file), RTMP handshake, connect, createStream, publish.
//! - Starts on a keyframe: the frames since the last keyframe are kept while
//!   connecting and sent first, and the publisher is asked for a new one.
//!   `onMetaData` and the AVC/AAC sequence headers go before the first frame
//!   and again whenever the codec parameters change. Timestamps are the
//!   stream timeline in milliseconds, monotonic per track.
//! - On error or disconnect it reconnects for as long as the publisher is live,
//!   with exponential backoff and jitter (0.5 s doubling to 10 s, reset after
//!   a minute of success). When the publisher leaves, or on [`PushHandle::stop`],
//!   the publication ends cleanly (`FCUnpublish`, `deleteStream`).
//! - It is an ordinary hub reader with a bounded queue: a slow or dead target
//!   loses whole GOPs (counted in `frames_dropped`), never delays the hub.
//!
//! The stream key never appears in logs or stats: everything uses
//! [`Target::masked`].

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::Rng;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls;
use tracing::Instrument;

use super::flv::{self, FlvError, Metadata};
use super::session::{PublishSession, SessionError, SessionEvent};
use super::target::Target;
use crate::hub::{Hub, HubFrame, Publication, Subscription};
use crate::media::frame::{CLOCK_HZ, Codec, CodecParams, Frame, TrackKind};
use crate::media::h264::Sps;

/// Codecs the push reads from the hub: what it can send, and Opus to notice
/// a publication whose audio never becomes AAC.
const READ_CODECS: &[Codec] = &[Codec::H264, Codec::Aac, Codec::Opus];
/// How long a publication may show only unsendable codecs on a track before
/// the target gives up on it.
const PROBE_GRACE: Duration = Duration::from_secs(3);
/// Frames kept from the last keyframe while (re)connecting.
const GOP_CACHE_MAX: usize = 1500;
/// Longest GOP kept (90 kHz ticks): 5 s.
const GOP_CACHE_SPAN: i64 = 5 * CLOCK_HZ;
/// Audio frames kept while connecting to an audio-only publication.
const AUDIO_CACHE_MAX: usize = 100;
/// Spacing of keyframe requests while waiting for one.
const KEYFRAME_RETRY: Duration = Duration::from_secs(1);
/// Time given to the clean end of a publication.
const FINISH_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct PushOptions {
    /// Extra CA certificates (PEM) trusted for `rtmps://`, on top of the
    /// webpki roots.
    pub ca_file: Option<PathBuf>,
    /// Frames queued between the hub and this target (about 10 s by default).
    pub queue: usize,
    /// TCP + TLS + RTMP handshake, connect and publish, in all.
    pub connect_timeout: Duration,
    /// A write that takes longer means the target is gone.
    pub write_timeout: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// A connection that published this long resets the backoff.
    pub backoff_reset_after: Duration,
    /// Push the publication's video (a preset may drop it).
    pub video: bool,
    /// Push the publication's audio (the stream's preset makes it AAC);
    /// false: the target gets video only, whatever the publisher sends.
    pub audio: bool,
}

impl Default for PushOptions {
    fn default() -> Self {
        Self {
            ca_file: None,
            queue: 1024,
            connect_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(10),
            backoff_reset_after: Duration::from_secs(60),
            video: true,
            audio: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PushState {
    /// No publication (or stopped).
    Idle,
    Connecting,
    Publishing,
    /// Waiting before the next connection attempt.
    Backoff,
    /// This publication cannot be pushed (codecs, TLS setup); see `last_error`.
    Failed,
}

#[derive(Debug, Clone, Serialize)]
pub struct PushStats {
    pub state: PushState,
    /// The target URL with the stream key masked.
    pub url_masked: String,
    /// Bytes written to the server (RTMP chunks, before TLS).
    pub bytes_sent: u64,
    /// Video and audio frames sent.
    pub frames_sent: u64,
    /// Frames the hub discarded because this target was too slow.
    pub frames_dropped: u64,
    /// Connection attempts after a failure or disconnect.
    pub reconnects: u64,
    pub last_error: Option<String>,
}

struct Shared {
    stats: Mutex<PushStats>,
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut PushStats)) {
        let mut s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s);
    }

    fn set_state(&self, state: PushState) {
        self.update(|s| s.state = state);
    }
}

/// The handle of a running push. Dropping it stops the push (cleanly).
pub struct PushHandle {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl PushHandle {
    pub fn stats(&self) -> PushStats {
        self.shared
            .stats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Ends the push: a live publication gets `FCUnpublish` + `deleteStream`,
    /// then the task exits. Returns at once; see [`PushHandle::stopped`].
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }

    /// Stops the push and waits until its task has ended.
    pub async fn stopped(self) {
        self.stop();
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

/// Starts pushing the publications of `hub` to `target`. The task ends on
/// [`PushHandle::stop`], when the handle is dropped, or on `shutdown`.
pub fn spawn(
    hub: Arc<Hub>,
    target: Target,
    options: PushOptions,
    shutdown: watch::Receiver<bool>,
) -> PushHandle {
    let shared = Arc::new(Shared {
        stats: Mutex::new(PushStats {
            state: PushState::Idle,
            url_masked: target.masked().to_owned(),
            bytes_sent: 0,
            frames_sent: 0,
            frames_dropped: 0,
            reconnects: 0,
            last_error: None,
        }),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    // Subscribed now, so no frame published after `spawn` returns is missed.
    let codecs: &'static [Codec] = match (options.video, options.audio) {
        (true, false) => &[Codec::H264],
        (false, true) => &[Codec::Aac, Codec::Opus],
        _ => READ_CODECS,
    };
    let sub = hub.subscribe("rtmp-push", codecs, options.queue.max(16));
    let span = tracing::info_span!("rtmp_push", stream = %hub.name(), url = %target.masked());
    let worker = Worker {
        hub,
        sub,
        target,
        options,
        shared: shared.clone(),
        stop: Stop {
            shutdown,
            stop: stop_rx,
        },
        tls: None,
        backoff: Backoff::default(),
    };
    let task = tokio::spawn(worker.run().instrument(span));
    PushHandle {
        shared,
        stop: stop_tx,
        task: Mutex::new(Some(task)),
    }
}

// ---------------------------------------------------------------------------
// The task
// ---------------------------------------------------------------------------

/// Why a publication stopped being served.
enum Outcome {
    /// The publisher left (or another took over): wait for the next one.
    Ended,
    /// Stop or shutdown: the task ends.
    Stop,
}

enum Input {
    Frame(Frame),
    /// A frame of another publication, or a state change that changes nothing.
    Nothing,
    Ended,
    Stop,
}

struct Stop {
    shutdown: watch::Receiver<bool>,
    stop: watch::Receiver<bool>,
}

impl Stop {
    fn requested(&self) -> bool {
        *self.shutdown.borrow() || *self.stop.borrow()
    }

    /// Resolves when a stop is requested (or the handle or server is gone).
    async fn wait(&mut self) {
        loop {
            if self.requested() {
                return;
            }
            tokio::select! {
                r = self.shutdown.changed() => if r.is_err() { return },
                r = self.stop.changed() => if r.is_err() { return },
            }
        }
    }
}

/// The next thing that happens for `publication`, frames first.
async fn next_input(sub: &mut Subscription, stop: &mut Stop, publication: u64) -> Input {
    tokio::select! {
        biased;
        _ = stop.wait() => Input::Stop,
        f = sub.frames.recv() => match f {
            Some(HubFrame { publication: p, frame }) if p.id == publication => Input::Frame(frame),
            Some(_) => Input::Nothing,
            None => Input::Stop,
        },
        changed = sub.state.changed() => {
            if changed.is_err() {
                return Input::Stop;
            }
            match *sub.state.borrow_and_update() {
                Some(p) if p.id == publication => Input::Nothing,
                _ => Input::Ended,
            }
        }
    }
}

/// While no connection is up, a frame goes to the probe and the GOP cache;
/// the end of the publication, or a stop, ends the wait.
fn hold(input: Input, probe: &mut Probe, cache: &mut GopCache, video: bool) -> Option<Outcome> {
    match input {
        Input::Frame(f) => {
            probe.observe(&f);
            cache.push(f, video);
            None
        }
        Input::Nothing => None,
        Input::Ended => Some(Outcome::Ended),
        Input::Stop => Some(Outcome::Stop),
    }
}

struct Worker {
    hub: Arc<Hub>,
    sub: Subscription,
    target: Target,
    options: PushOptions,
    shared: Arc<Shared>,
    stop: Stop,
    tls: Option<TlsConnector>,
    backoff: Backoff,
}

impl Worker {
    async fn run(mut self) {
        if self.target.tls {
            match tls_connector(self.options.ca_file.as_deref()) {
                Ok(c) => self.tls = Some(c),
                Err(e) => {
                    tracing::error!(error = %e, "cannot set up TLS; push disabled");
                    self.shared.update(|s| {
                        s.state = PushState::Failed;
                        s.last_error = Some(e);
                    });
                    self.stop.wait().await;
                    return;
                }
            }
        }
        loop {
            let Some(publication) = self.wait_live().await else {
                break;
            };
            tracing::info!(publication = publication.id, "publication live, pushing");
            match self.serve(publication).await {
                Outcome::Ended => tracing::info!(publication = publication.id, "publication ended"),
                Outcome::Stop => break,
            }
        }
        self.shared.set_state(PushState::Idle);
        tracing::info!("push stopped");
    }

    /// Waits for a live publication, discarding frames meanwhile.
    async fn wait_live(&mut self) -> Option<Publication> {
        self.shared.set_state(PushState::Idle);
        loop {
            if self.stop.requested() {
                return None;
            }
            if let Some(p) = *self.sub.state.borrow_and_update() {
                return Some(p);
            }
            tokio::select! {
                _ = self.stop.wait() => return None,
                f = self.sub.frames.recv() => {
                    f?;
                }
                changed = self.sub.state.changed() => if changed.is_err() { return None },
            }
        }
    }

    async fn input(&mut self, publication: u64) -> Input {
        next_input(&mut self.sub, &mut self.stop, publication).await
    }

    /// Serves one publication until it ends or the push is stopped.
    async fn serve(&mut self, publication: Publication) -> Outcome {
        // Tracks the options leave out are not waited for nor sent.
        let publication = Publication {
            video: publication.video && self.options.video,
            audio: publication.audio && self.options.audio,
            ..publication
        };
        self.backoff = Backoff::new(self.options.backoff_min, self.options.backoff_max);
        let mut probe = Probe::new(publication);
        let mut cache = GopCache::default();
        let probe_deadline = tokio::time::Instant::now() + PROBE_GRACE;
        // Know what we send before connecting.
        while !probe.ready() {
            tokio::select! {
                input = self.input(publication.id) => {
                    if let Some(end) = hold(input, &mut probe, &mut cache, publication.video) {
                        return end;
                    }
                }
                _ = tokio::time::sleep_until(probe_deadline) => break,
            }
        }
        if let Some(e) = probe.unsendable() {
            tracing::error!(error = %e, "publication cannot be pushed over RTMP");
            self.shared.update(|s| {
                s.state = PushState::Failed;
                s.last_error = Some(e);
            });
            return self.idle_until_end(publication.id).await;
        }

        let mut attempt: u64 = 0;
        loop {
            if attempt > 0 {
                self.shared.update(|s| s.reconnects += 1);
                crate::telemetry::counters().push_reconnects.increment(1);
            }
            attempt += 1;
            self.shared.set_state(PushState::Connecting);
            tracing::info!(attempt, "connecting");
            self.hub.request_keyframe();
            let opened = {
                let connect = tokio::time::timeout(
                    self.options.connect_timeout,
                    open(&self.target, self.tls.as_ref(), &self.shared),
                );
                tokio::pin!(connect);
                loop {
                    tokio::select! {
                        r = &mut connect => break match r {
                            Ok(r) => r,
                            Err(_) => Err(PushError::Timeout("connecting")),
                        },
                        input = next_input(&mut self.sub, &mut self.stop, publication.id) => {
                            if let Some(end) = hold(input, &mut probe, &mut cache, publication.video) {
                                return end;
                            }
                        }
                    }
                }
            };
            let error = match opened {
                Ok(conn) => {
                    tracing::info!(attempt, "publishing");
                    self.shared.update(|s| {
                        s.state = PushState::Publishing;
                    });
                    let started = Instant::now();
                    let (result, end) = self
                        .publish(conn, publication, &mut probe, &mut cache)
                        .await;
                    if started.elapsed() >= self.options.backoff_reset_after {
                        self.backoff =
                            Backoff::new(self.options.backoff_min, self.options.backoff_max);
                    }
                    match (result, end) {
                        (_, Some(outcome)) => return outcome,
                        (Err(e), None) => e,
                        (Ok(()), None) => PushError::Closed,
                    }
                }
                Err(e) => e,
            };
            let delay = self.backoff.next_delay();
            let message = error.to_string();
            tracing::warn!(attempt, error = %message, retry_in_ms = delay.as_millis() as u64, "push failed");
            self.shared.update(|s| {
                s.state = PushState::Backoff;
                s.last_error = Some(message);
            });
            let wake = tokio::time::Instant::now() + delay;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(wake) => break,
                    input = self.input(publication.id) => {
                        if let Some(end) = hold(input, &mut probe, &mut cache, publication.video) {
                            return end;
                        }
                    }
                }
            }
        }
    }

    /// Failed publication: discards frames until it ends.
    async fn idle_until_end(&mut self, publication: u64) -> Outcome {
        loop {
            match self.input(publication).await {
                Input::Frame(_) | Input::Nothing => {}
                Input::Ended => return Outcome::Ended,
                Input::Stop => return Outcome::Stop,
            }
        }
    }

    /// Sends the publication over an open connection. Returns the
    /// connection's end (an error to retry on) and, when the publication or
    /// the push itself ended, the outcome (the connection was then closed
    /// cleanly).
    async fn publish(
        &mut self,
        mut conn: Conn,
        publication: Publication,
        probe: &mut Probe,
        cache: &mut GopCache,
    ) -> (Result<(), PushError>, Option<Outcome>) {
        let mut mux = Mux::new(publication, probe.aac.clone());
        let write_timeout = self.options.write_timeout;
        for f in cache.take() {
            if let Err(e) = self.send(&mut conn, &mut mux, &f).await {
                return (Err(e), None);
            }
        }
        let mut keyframe_retry = tokio::time::interval(KEYFRAME_RETRY);
        keyframe_retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            tokio::select! {
                biased;
                input = next_input(&mut self.sub, &mut self.stop, publication.id) => match input {
                    Input::Frame(f) => {
                        probe.observe(&f);
                        if let Err(e) = self.send(&mut conn, &mut mux, &f).await {
                            return (Err(e), None);
                        }
                    }
                    Input::Nothing => {}
                    Input::Ended => {
                        // What the publisher sent before leaving goes first.
                        while let Ok(hf) = self.sub.frames.try_recv() {
                            if hf.publication.id == publication.id
                                && let Err(e) = self.send(&mut conn, &mut mux, &hf.frame).await {
                                    return (Err(e), Some(Outcome::Ended));
                                }
                        }
                        return (conn.finish(write_timeout).await, Some(Outcome::Ended));
                    }
                    Input::Stop => return (conn.finish(write_timeout).await, Some(Outcome::Stop)),
                },
                read = conn.rd.read(&mut buf) => {
                    let n = match read {
                        Ok(0) => return (Err(PushError::Closed), None),
                        Ok(n) => n,
                        Err(e) => return (Err(PushError::Io(e.to_string())), None),
                    };
                    let r = conn.session.handle_input(&buf[..n]).map_err(PushError::from);
                    let r = match r {
                        Ok(()) => conn.flush(write_timeout).await,
                        Err(e) => Err(e),
                    };
                    if let Err(e) = r {
                        return (Err(e), None);
                    }
                    while let Some(ev) = conn.session.poll_event() {
                        if let SessionEvent::Status(code) = ev {
                            tracing::debug!(code, "server status");
                        }
                    }
                }
                _ = keyframe_retry.tick(), if !mux.started() => self.hub.request_keyframe(),
            }
        }
    }

    async fn send(
        &mut self,
        conn: &mut Conn,
        mux: &mut Mux,
        frame: &Frame,
    ) -> Result<(), PushError> {
        let messages = match mux.push(frame) {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(error = %e, "frame not sent");
                return Ok(());
            }
        };
        if messages.is_empty() {
            return Ok(());
        }
        let mut media = 0;
        for m in messages {
            match m.kind {
                MessageKind::Metadata => conn.session.send_metadata(m.body, m.timestamp_ms)?,
                MessageKind::Video => conn.session.send_video(m.body, m.timestamp_ms)?,
                MessageKind::Audio => conn.session.send_audio(m.body, m.timestamp_ms)?,
            }
            media += u64::from(m.is_frame);
        }
        conn.flush(self.options.write_timeout).await?;
        let dropped = self.sub.dropped();
        self.shared.update(|s| {
            s.frames_sent += media;
            s.frames_dropped = dropped;
        });
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Connection
// ---------------------------------------------------------------------------

#[derive(Debug, thiserror::Error)]
enum PushError {
    #[error("{0}")]
    Io(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error("timed out {0}")]
    Timeout(&'static str),
    #[error("connection closed by the server")]
    Closed,
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

struct Conn {
    rd: ReadHalf<Box<dyn Io>>,
    wr: WriteHalf<Box<dyn Io>>,
    session: PublishSession,
    shared: Arc<Shared>,
}

impl Conn {
    /// Writes what the session has to say.
    async fn flush(&mut self, limit: Duration) -> Result<(), PushError> {
        let out = self.session.take_output();
        if out.is_empty() {
            return Ok(());
        }
        let write = async {
            self.wr.write_all(&out).await?;
            self.wr.flush().await
        };
        match tokio::time::timeout(limit, write).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(PushError::Io(format!("write: {e}"))),
            Err(_) => return Err(PushError::Timeout("writing")),
        }
        let n = out.len() as u64;
        self.shared.update(|s| s.bytes_sent += n);
        crate::telemetry::counters().push_bytes.increment(n);
        Ok(())
    }

    /// `FCUnpublish` + `deleteStream`, then close.
    async fn finish(&mut self, limit: Duration) -> Result<(), PushError> {
        self.session.finish()?;
        self.flush(limit.min(FINISH_TIMEOUT)).await?;
        let _ = tokio::time::timeout(FINISH_TIMEOUT, self.wr.shutdown()).await;
        tracing::info!("publication ended cleanly (FCUnpublish, deleteStream)");
        Ok(())
    }
}

/// Connects and runs the RTMP exchange up to `NetStream.Publish.Start`.
async fn open(
    target: &Target,
    tls: Option<&TlsConnector>,
    shared: &Arc<Shared>,
) -> Result<Conn, PushError> {
    let tcp = TcpStream::connect(target.address())
        .await
        .map_err(|e| PushError::Io(format!("connect to {}: {e}", target.address())))?;
    let _ = tcp.set_nodelay(true);
    let io: Box<dyn Io> = match tls {
        Some(connector) => {
            let name = rustls::pki_types::ServerName::try_from(target.host.clone())
                .map_err(|e| PushError::Tls(format!("bad server name: {e}")))?;
            let stream = connector
                .connect(name, tcp)
                .await
                .map_err(|e| PushError::Tls(e.to_string()))?;
            Box::new(stream)
        }
        None => Box::new(tcp),
    };
    let (rd, wr) = tokio::io::split(io);
    let session = PublishSession::new(&target.app, &target.key, &target.tc_url)?;
    let mut conn = Conn {
        rd,
        wr,
        session,
        shared: shared.clone(),
    };
    let limit = Duration::from_secs(3600);
    conn.flush(limit).await?;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = conn
            .rd
            .read(&mut buf)
            .await
            .map_err(|e| PushError::Io(format!("read: {e}")))?;
        if n == 0 {
            return Err(PushError::Closed);
        }
        conn.session.handle_input(&buf[..n])?;
        conn.flush(limit).await?;
        while let Some(ev) = conn.session.poll_event() {
            match ev {
                SessionEvent::Publishing { .. } => return Ok(conn),
                SessionEvent::Status(code) => tracing::debug!(code, "server status"),
                SessionEvent::HandshakeDone | SessionEvent::Connected => {}
            }
        }
    }
}

/// rustls with the webpki roots and, when given, the certificates of
/// `ca_file` (PEM).
fn tls_connector(ca_file: Option<&Path>) -> Result<TlsConnector, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("cannot read CA file {}: {e}", path.display()))?;
        let mut added = 0;
        for cert in certs {
            let cert = cert.map_err(|e| format!("bad CA file {}: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("bad certificate in {}: {e}", path.display()))?;
            added += 1;
        }
        if added == 0 {
            return Err(format!("no certificate in CA file {}", path.display()));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

// ---------------------------------------------------------------------------
// Backoff
// ---------------------------------------------------------------------------

/// Exponential backoff with ±25 % jitter.
#[derive(Debug, Clone)]
struct Backoff {
    next: Duration,
    min: Duration,
    max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        let o = PushOptions::default();
        Self::new(o.backoff_min, o.backoff_max)
    }
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Self {
        Self {
            next: min,
            min,
            max: max.max(min),
        }
    }

    fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let jitter = rand::rng().random_range(0.75..1.25);
        base.mul_f64(jitter).min(self.max).max(self.min / 2)
    }
}

// ---------------------------------------------------------------------------
// Codec probe and GOP cache
// ---------------------------------------------------------------------------

/// What codecs a publication's tracks arrive in.
struct Probe {
    publication: Publication,
    h264: bool,
    /// Latest AAC parameters seen.
    aac: Option<Arc<CodecParams>>,
    other_video: Option<Codec>,
    other_audio: Option<Codec>,
}

impl Probe {
    fn new(publication: Publication) -> Self {
        Self {
            publication,
            h264: false,
            aac: None,
            other_video: None,
            other_audio: None,
        }
    }

    fn observe(&mut self, f: &Frame) {
        match (f.codec(), f.codec().kind()) {
            (Codec::H264, _) => self.h264 = true,
            (Codec::Aac, _) => self.aac = Some(f.params.clone()),
            (c, TrackKind::Video) => self.other_video = Some(c),
            (c, TrackKind::Audio) => self.other_audio = Some(c),
        }
    }

    /// Every announced track showed up in a codec RTMP carries.
    fn ready(&self) -> bool {
        (!self.publication.video || self.h264) && (!self.publication.audio || self.aac.is_some())
    }

    /// A track that only came in a codec classic RTMP cannot carry.
    fn unsendable(&self) -> Option<String> {
        if let (false, Some(c)) = (self.h264, self.other_video) {
            return Some(format!(
                "video is {c:?}; RTMP needs H264 (choose a preset that transcodes to H264)"
            ));
        }
        if let (None, Some(c)) = (&self.aac, self.other_audio) {
            return Some(format!(
                "audio is {c:?} and no AAC rendition is on the stream; RTMP needs AAC"
            ));
        }
        None
    }
}

/// Frames since the last video keyframe, sent first after (re)connecting so
/// the push starts at once on a keyframe.
#[derive(Default)]
struct GopCache {
    frames: Vec<Frame>,
    has_key: bool,
}

impl GopCache {
    fn push(&mut self, f: Frame, has_video: bool) {
        match f.codec().kind() {
            TrackKind::Video if f.key => {
                self.frames.clear();
                self.has_key = true;
                self.frames.push(f);
            }
            _ if self.has_key => {
                let span = self.frames.first().map_or(0, |k| f.dts - k.dts);
                if self.frames.len() >= GOP_CACHE_MAX || span > GOP_CACHE_SPAN {
                    // Too old to start a push with (WebRTC encoders send
                    // keyframes only when asked): wait for a fresh one.
                    self.frames.clear();
                    self.has_key = false;
                } else {
                    self.frames.push(f);
                }
            }
            TrackKind::Audio if !has_video => {
                if self.frames.len() >= AUDIO_CACHE_MAX {
                    self.frames.remove(0);
                }
                self.frames.push(f);
            }
            _ => {}
        }
    }

    fn take(&mut self) -> Vec<Frame> {
        self.has_key = false;
        std::mem::take(&mut self.frames)
    }
}

// ---------------------------------------------------------------------------
// Hub frames → RTMP messages (sans-IO)
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MessageKind {
    Metadata,
    Video,
    Audio,
}

#[derive(Debug, Clone)]
struct Message {
    kind: MessageKind,
    timestamp_ms: u32,
    body: Bytes,
    /// A media frame (not a header or metadata).
    is_frame: bool,
}

/// Turns one connection's hub frames into RTMP message bodies: starts at a
/// video keyframe, puts `onMetaData` and sequence headers first and again
/// on changes, keeps timestamps monotonic per track.
struct Mux {
    has_video: bool,
    started: bool,
    /// AAC parameters known before the start (from frames seen while
    /// connecting), announced with the first keyframe.
    aac_known: Option<Arc<CodecParams>>,
    video_sent: Option<Arc<CodecParams>>,
    audio_sent: Option<Arc<CodecParams>>,
    metadata_sent: Option<Metadata>,
    last_video_ms: Option<u32>,
    last_audio_ms: Option<u32>,
}

impl Mux {
    fn new(publication: Publication, aac_known: Option<Arc<CodecParams>>) -> Self {
        Self {
            has_video: publication.video,
            started: false,
            aac_known,
            video_sent: None,
            audio_sent: None,
            metadata_sent: None,
            last_video_ms: None,
            last_audio_ms: None,
        }
    }

    fn started(&self) -> bool {
        self.started
    }

    fn push(&mut self, f: &Frame) -> Result<Vec<Message>, FlvError> {
        let mut out = Vec::new();
        match f.params.as_ref() {
            CodecParams::H264 { sps, pps, .. } => {
                if !self.started && !f.key {
                    return Ok(out);
                }
                let ts = monotonic(&mut self.last_video_ms, flv::timestamp_ms(f.dts));
                let body = flv::avc_frame(&f.data, f.key, flv::cts_ms(f.pts, f.dts))?;
                let changed = self.video_sent.as_ref().is_none_or(|p| **p != *f.params);
                let header = if changed {
                    Some(flv::avc_sequence_header(sps, pps)?)
                } else {
                    None
                };
                if !self.started {
                    self.started = true;
                    if let Some(aac) = self.aac_known.clone() {
                        self.audio_header(&aac, ts, &mut out);
                    }
                }
                if let Some(header) = header {
                    self.video_sent = Some(f.params.clone());
                    self.metadata(ts, &mut out);
                    // Metadata first, then the headers.
                    out.rotate_right(1);
                    out.push(Message {
                        kind: MessageKind::Video,
                        timestamp_ms: ts,
                        body: header,
                        is_frame: false,
                    });
                }
                out.push(Message {
                    kind: MessageKind::Video,
                    timestamp_ms: ts,
                    body,
                    is_frame: true,
                });
            }
            CodecParams::Aac { .. } => {
                self.aac_known = Some(f.params.clone());
                if !self.started {
                    if self.has_video {
                        return Ok(out);
                    }
                    self.started = true;
                }
                let ts = monotonic(&mut self.last_audio_ms, flv::timestamp_ms(f.pts));
                if self.audio_sent.as_ref().is_none_or(|p| **p != *f.params) {
                    let params = f.params.clone();
                    self.audio_header(&params, ts, &mut out);
                    if self.metadata_sent.as_ref() != Some(&self.metadata_now()) {
                        self.metadata(ts, &mut out);
                        out.rotate_right(1);
                    }
                }
                out.push(Message {
                    kind: MessageKind::Audio,
                    timestamp_ms: ts,
                    body: flv::aac_frame(&f.data),
                    is_frame: true,
                });
            }
            CodecParams::Opus { .. }
            | CodecParams::Vp8 { .. }
            | CodecParams::Vp9 { .. }
            | CodecParams::Av1 { .. } => {}
        }
        Ok(out)
    }

    fn audio_header(&mut self, params: &Arc<CodecParams>, ts: u32, out: &mut Vec<Message>) {
        if let CodecParams::Aac { asc, .. } = params.as_ref() {
            self.audio_sent = Some(params.clone());
            out.push(Message {
                kind: MessageKind::Audio,
                timestamp_ms: ts,
                body: flv::aac_sequence_header(asc),
                is_frame: false,
            });
        }
    }

    /// `onMetaData` of what is known now; appended to `out`.
    fn metadata(&mut self, ts: u32, out: &mut Vec<Message>) {
        let m = self.metadata_now();
        out.push(Message {
            kind: MessageKind::Metadata,
            timestamp_ms: ts,
            body: flv::on_metadata(&m, true),
            is_frame: false,
        });
        self.metadata_sent = Some(m);
    }

    fn metadata_now(&self) -> Metadata {
        let mut m = Metadata::default();
        if let Some(CodecParams::H264 {
            sps, width, height, ..
        }) = self.video_sent.as_deref()
        {
            m.has_video = true;
            m.width = Some(*width);
            m.height = Some(*height);
            m.frame_rate = Sps::parse(sps)
                .ok()
                .and_then(|s| s.frame_duration_ticks())
                .filter(|t| *t > 0)
                .map(|t| (CLOCK_HZ as f64 / t as f64 * 1000.0).round() / 1000.0);
        }
        if let Some(CodecParams::Aac {
            sample_rate,
            channels,
            ..
        }) = self.audio_sent.as_deref().or(self.aac_known.as_deref())
        {
            m.has_audio = true;
            m.audio_sample_rate = Some(*sample_rate);
            m.audio_channels = Some(*channels);
        }
        m
    }
}

/// `ts`, or the track's last timestamp when `ts` went back (but not across
/// the 2^32 ms wrap).
fn monotonic(last: &mut Option<u32>, ts: u32) -> u32 {
    let ts = match *last {
        Some(l) if ts.wrapping_sub(l) > u32::MAX / 2 => l,
        _ => ts,
    };
    *last = Some(ts);
    ts
}

#[cfg(test)]
mod tests {
    use super::*;

    const AV: Publication = Publication {
        id: 1,
        video: true,
        audio: true,
    };

    fn h264_params(width: u32) -> Arc<CodecParams> {
        // A real 640x360 Constrained Baseline SPS/PPS; `width` only tells
        // parameter sets apart.
        Arc::new(CodecParams::H264 {
            sps: Bytes::from_static(&[
                0x67, 0x42, 0xc0, 0x1f, 0xd9, 0x00, 0xa0, 0x2f, 0xf9, 0x70, 0x11, 0x00, 0x00, 0x03,
                0x00, 0x01, 0x00, 0x00, 0x03, 0x00, 0x3c, 0x8f, 0x18, 0x32, 0x48,
            ]),
            pps: Bytes::from_static(&[0x68, 0xcb, 0x8c, 0xb2]),
            width,
            height: 360,
        })
    }

    fn aac_params() -> Arc<CodecParams> {
        Arc::new(CodecParams::Aac {
            asc: Bytes::from_static(&[0x11, 0x90]),
            sample_rate: 48_000,
            channels: 2,
        })
    }

    fn video(params: &Arc<CodecParams>, ms: i64, key: bool) -> Frame {
        let data: &'static [u8] = if key {
            &[0, 0, 0, 1, 0x65, 0x88, 0x84]
        } else {
            &[0, 0, 0, 1, 0x41, 0x9a, 0x02]
        };
        Frame {
            pts: ms * 90,
            dts: ms * 90,
            key,
            data: Bytes::from_static(data),
            params: params.clone(),
        }
    }

    fn audio(ms: i64) -> Frame {
        Frame {
            pts: ms * 90,
            dts: ms * 90,
            key: true,
            data: Bytes::from_static(&[0x21, 0x10]),
            params: aac_params(),
        }
    }

    fn kinds(m: &[Message]) -> Vec<(MessageKind, u32, bool)> {
        m.iter()
            .map(|m| (m.kind, m.timestamp_ms, m.is_frame))
            .collect()
    }

    #[test]
    fn starts_on_a_keyframe_with_metadata_and_headers_first() {
        let v = h264_params(640);
        let mut mux = Mux::new(AV, None);
        assert!(
            mux.push(&audio(0)).unwrap().is_empty(),
            "audio waits for video"
        );
        assert!(mux.push(&video(&v, 0, false)).unwrap().is_empty());
        let m = mux.push(&video(&v, 33, true)).unwrap();
        use MessageKind::*;
        assert_eq!(
            kinds(&m),
            vec![
                (Metadata, 33, false),
                (Audio, 33, false),
                (Video, 33, false),
                (Video, 33, true)
            ]
        );
        assert_eq!(
            &m[1].body[..],
            &[0xaf, 0x00, 0x11, 0x90],
            "AAC sequence header"
        );
        assert_eq!(m[2].body[..2], [0x17, 0x00], "AVC sequence header");
        assert_eq!(m[3].body[..2], [0x17, 0x01], "AVC NALU");
        let meta = &m[0].body;
        for key in [
            &b"width"[..],
            b"height",
            b"audiosamplerate",
            b"@setDataFrame",
        ] {
            assert!(meta.windows(key.len()).any(|w| w == key));
        }
        assert!(mux.started());
        // Same parameters: no new headers.
        assert_eq!(
            kinds(&mux.push(&audio(40)).unwrap()),
            vec![(Audio, 40, true)]
        );
        assert_eq!(
            kinds(&mux.push(&video(&v, 66, false)).unwrap()),
            vec![(Video, 66, true)]
        );
        // New SPS (same bytes but a new resolution here): metadata and header again.
        let v2 = h264_params(1280);
        let m = mux.push(&video(&v2, 100, true)).unwrap();
        assert_eq!(
            kinds(&m),
            vec![
                (Metadata, 100, false),
                (Video, 100, false),
                (Video, 100, true)
            ]
        );
        // Timestamps never go back on a track.
        assert_eq!(
            kinds(&mux.push(&audio(20)).unwrap()),
            vec![(Audio, 40, true)]
        );
    }

    #[test]
    fn aac_seen_while_connecting_is_announced_at_start() {
        let mut mux = Mux::new(AV, Some(aac_params()));
        let m = mux.push(&video(&h264_params(640), 0, true)).unwrap();
        assert_eq!(m.len(), 4);
        assert_eq!(m[1].kind, MessageKind::Audio);
        let audio_only = Publication {
            id: 2,
            video: false,
            audio: true,
        };
        let mut mux = Mux::new(audio_only, None);
        let m = mux.push(&audio(5)).unwrap();
        use MessageKind::*;
        assert_eq!(
            kinds(&m),
            vec![(Metadata, 5, false), (Audio, 5, false), (Audio, 5, true)]
        );
    }

    #[test]
    fn probe_reports_unsendable_codecs() {
        let mut p = Probe::new(AV);
        assert!(!p.ready());
        p.observe(&video(&h264_params(640), 0, true));
        let opus = Frame {
            params: Arc::new(CodecParams::Opus {
                sample_rate: 48_000,
                channels: 2,
            }),
            ..audio(0)
        };
        p.observe(&opus);
        assert!(!p.ready());
        let e = p.unsendable().unwrap();
        assert!(e.contains("Opus") && e.contains("AAC"), "{e}");
        p.observe(&audio(20));
        assert!(p.ready());
        assert_eq!(p.unsendable(), None);
    }

    #[test]
    fn gop_cache_keeps_the_last_gop() {
        let v = h264_params(640);
        let mut c = GopCache::default();
        c.push(audio(0), true);
        c.push(video(&v, 0, false), true);
        assert!(c.frames.is_empty(), "nothing before a keyframe");
        c.push(video(&v, 33, true), true);
        c.push(audio(40), true);
        c.push(video(&v, 66, true), true);
        c.push(video(&v, 99, false), true);
        let pts: Vec<_> = c.take().iter().map(|f| f.pts / 90).collect();
        assert_eq!(pts, vec![66, 99]);
        assert!(c.take().is_empty());
        // A GOP longer than 5 s is given up.
        c.push(video(&v, 0, true), true);
        c.push(video(&v, 4_000, false), true);
        assert_eq!(c.frames.len(), 2);
        c.push(video(&v, 5_100, false), true);
        assert!(c.take().is_empty());
    }

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
        let delays: Vec<_> = (0..8).map(|_| b.next_delay().as_millis()).collect();
        assert!((375..=625).contains(&delays[0]), "{delays:?}");
        assert!((750..=1250).contains(&delays[1]), "{delays:?}");
        assert!(delays[7] <= 10_000 && delays[7] >= 7_500, "{delays:?}");
    }

    #[test]
    fn monotonic_per_track_across_wrap() {
        let mut last = None;
        assert_eq!(monotonic(&mut last, 100), 100);
        assert_eq!(monotonic(&mut last, 90), 100);
        assert_eq!(monotonic(&mut last, 200), 200);
        let mut last = Some(u32::MAX - 5);
        assert_eq!(monotonic(&mut last, 3), 3, "wraps forward");
    }

    #[test]
    fn tls_ca_file_errors_are_clear() {
        let e = tls_connector(Some(Path::new("/nonexistent/ca.pem")))
            .err()
            .unwrap();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
        assert!(tls_connector(None).is_ok());
    }
}
