//! `whipgate publish`: a WHIP client (RFC 9725) that sends a media file in real time.
//!
//! The file is demuxed with FFmpeg on a blocking thread; H264 is rewritten to Annex B (SPS/PPS in
//! front of every keyframe) and Opus packets go out as they are: nothing is decoded or re-encoded.
//! Frames are paced by their timestamps and handed to a str0m `Rtc` (full ICE, controlling) that
//! talks to the WHIP server over one UDP socket.
//!
//! With `--sessions N` (N > 1) the file is demuxed once into memory and N sessions replay it
//! concurrently from one process (a load generator): each has its own str0m `Rtc` (SSRCs,
//! ICE/DTLS/SRTP) and UDP socket, and shares the frames (`Arc<[u8]>`, no copy per session).
//! `{n}` in the URL becomes the session number (0-based), so each session can publish its own
//! stream. Plain RFC 9725: it works against any WHIP server.
//!
//! Use from code (tests):
//! ```text
//! let opts = PublishOptions::new("samples/sample.mkv", "http://127.0.0.1:8080/whip/test");
//! let stats = publish(opts, tokio::time::sleep(Duration::from_secs(3))).await?;
//! ```

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use ffmpeg_next as ffmpeg;
use str0m::change::{SdpAnswer, SdpPendingOffer};
use str0m::format::{Codec, PayloadParams};
use str0m::media::{
    Direction, Frequency, MediaKind, MediaTime, Mid, Pt, Rid, Simulcast, SimulcastLayer,
};
use str0m::net::{Protocol, Receive, TcpType};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc, RtcConfig};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tracing::{Instrument, debug, info, warn};
use url::Url;

use crate::media::av1;
use crate::rtc::tcp::TcpLinks;

/// Command line arguments of `whipgate publish`.
#[derive(Debug, Clone, clap::Args)]
pub struct PublishArgs {
    /// Media file with H264, VP8, VP9 or AV1 video and/or Opus audio (MKV, MP4, WebM, ...).
    pub file: PathBuf,
    /// WHIP endpoint URL, e.g. http://127.0.0.1:8080/whip/mystream
    pub url: String,
    /// Bearer token for the WHIP endpoint.
    #[arg(long, env = "WHIP_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Start over at the end of the file (timestamps keep going forward).
    #[arg(long = "loop")]
    pub loop_: bool,
    /// Stop after this many seconds.
    #[arg(long, value_name = "SECONDS")]
    pub duration: Option<f64>,
    /// Give up when ICE + DTLS are not connected after this many seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
    pub connect_timeout: f64,
    /// Concurrent WHIP sessions replaying the file (load generator); `{n}` in the URL becomes
    /// the session number, 0-based. With more than one, `--duration` counts per session from
    /// its start.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub sessions: u32,
    /// New sessions started per second (default: all at once).
    #[arg(long, value_name = "PER_SECOND")]
    pub ramp: Option<f64>,
    /// Restart ICE this many seconds after media starts, from a new UDP socket (a new network
    /// path, as when a phone moves from Wi-Fi to cellular): a WHIP `PATCH` with
    /// `If-Match: "*"` (RFC 9725 §4.3.2). Media goes on in the same session.
    #[arg(long, value_name = "SECONDS")]
    pub ice_restart_after: Option<f64>,
    /// Use ICE over TCP (RFC 6544) only: active TCP candidates towards the server's passive
    /// ones, as a client behind a UDP-blocking firewall would.
    #[arg(long)]
    pub ice_tcp: bool,
    /// Publish simulcast (RFC 8853): the FILE's video is the first layer, RID `h`, and each
    /// `RID=FILE` adds a layer with that file's video (encode the files with keyframes at the
    /// same times, as a simulcast encoder does). The offer lists the layers in this order.
    #[arg(long, value_name = "RID=FILE")]
    pub simulcast: Vec<String>,
}

/// Everything [`publish`] needs.
#[derive(Debug, Clone)]
pub struct PublishOptions {
    /// Media file with H264, VP8, VP9 or AV1 video and/or Opus audio.
    pub file: PathBuf,
    /// WHIP endpoint URL.
    pub url: String,
    /// Bearer token (sent as `Authorization: Bearer ...`).
    pub token: Option<String>,
    /// Loop the file forever (until shutdown).
    pub loop_: bool,
    /// Time allowed from the POST answer until ICE + DTLS are up.
    pub connect_timeout: Duration,
    /// How often progress is logged.
    pub progress_interval: Duration,
    /// Restart ICE on a new UDP socket this long after media starts.
    pub ice_restart_after: Option<Duration>,
    /// ICE over TCP only.
    pub ice_tcp: bool,
    /// Extra simulcast layers (RID, file with the layer's video); the main
    /// file's video is then layer `h`.
    pub simulcast: Vec<(String, PathBuf)>,
}

impl PublishOptions {
    /// Options with defaults: no token, no loop, 10 s connect timeout, progress every 5 s.
    pub fn new(file: impl Into<PathBuf>, url: impl Into<String>) -> Self {
        Self {
            file: file.into(),
            url: url.into(),
            token: None,
            loop_: false,
            connect_timeout: Duration::from_secs(10),
            progress_interval: Duration::from_secs(5),
            ice_restart_after: None,
            ice_tcp: false,
            simulcast: Vec::new(),
        }
    }
}

/// What a publish session did.
#[derive(Debug, Clone, Default)]
pub struct PublishStats {
    /// The WHIP session URL (`Location`), once the server accepted the offer.
    pub location: Option<Url>,
    /// True once ICE and DTLS were up and media could flow.
    pub connected: bool,
    /// Video frames (access units) handed to the RTP packetizer.
    pub video_frames: u64,
    /// Of those, keyframes (each carrying SPS/PPS).
    pub keyframes: u64,
    /// Opus packets handed to the RTP packetizer.
    pub audio_frames: u64,
    /// Media payload bytes (Annex B video + Opus), without RTP/SRTP overhead.
    pub bytes: u64,
    /// PLI/FIR received from the server (logged, cannot be honoured without re-encoding).
    pub keyframe_requests: u64,
    /// How many times the file was restarted (`--loop`), counting frames actually sent.
    pub loops: u64,
    /// True when the whole file (without loop) was sent.
    pub finished: bool,
    /// Time media was flowing (from connection to the end).
    pub media_time: Duration,
    /// From sending the POST to its `201 Created` answer (body read).
    pub post_to_201: Option<Duration>,
    /// From sending the POST to the first frame handed to str0m after ICE + DTLS came up.
    pub post_to_media: Option<Duration>,
    /// UDP datagrams sent (STUN, DTLS, SRTP, SRTCP).
    pub packets_sent: u64,
    /// Bytes of those datagrams.
    pub packet_bytes_sent: u64,
    /// ICE restarts done (`ice_restart_after`).
    pub ice_restarts: u64,
}

/// CLI entry point: publish until end of file (or forever with `--loop`), Ctrl-C, SIGTERM, or
/// `--duration`; with `--sessions N`, N sessions at once. Prints a summary on stdout at the end.
pub async fn run(args: PublishArgs) -> anyhow::Result<()> {
    if !args.connect_timeout.is_finite() || args.connect_timeout <= 0.0 {
        bail!("--connect-timeout must be a positive number of seconds");
    }
    let limit = match args.duration {
        Some(d) if !d.is_finite() || d <= 0.0 => {
            bail!("--duration must be a positive number of seconds")
        }
        Some(d) => Some(Duration::try_from_secs_f64(d).context("--duration is out of range")?),
        None => None,
    };
    let ramp = match args.ramp {
        Some(r) if !r.is_finite() || r <= 0.0 => {
            bail!("--ramp must be a positive number of sessions per second")
        }
        r => r,
    };
    let mut opts = PublishOptions::new(args.file, args.url);
    opts.token = args.token;
    opts.loop_ = args.loop_;
    opts.connect_timeout = Duration::try_from_secs_f64(args.connect_timeout)
        .context("--connect-timeout is out of range")?;
    opts.ice_tcp = args.ice_tcp;
    for layer in &args.simulcast {
        let Some((rid, file)) = layer.split_once('=') else {
            bail!("--simulcast takes RID=FILE, not {layer:?}");
        };
        let valid = (1..=16).contains(&rid.len())
            && rid
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'));
        if !valid || rid == MAIN_RID || opts.simulcast.iter().any(|(r, _)| r == rid) {
            bail!(
                "--simulcast: {rid:?} is not a new RID (letters, digits, '-', '_'; `h` is the main file's)"
            );
        }
        opts.simulcast.push((rid.to_owned(), PathBuf::from(file)));
    }
    if !opts.simulcast.is_empty() && args.sessions > 1 {
        bail!("--simulcast publishes one session");
    }
    if args.ice_tcp && args.ice_restart_after.is_some() {
        bail!(
            "--ice-restart-after moves to a new UDP socket: it cannot be combined with --ice-tcp"
        );
    }
    opts.ice_restart_after = match args.ice_restart_after {
        Some(s) if !s.is_finite() || s < 0.0 => {
            bail!("--ice-restart-after must be a number of seconds")
        }
        Some(s) => Some(Duration::from_secs_f64(s)),
        None => None,
    };
    if args.sessions > 1 {
        return run_many(opts, args.sessions, ramp, limit).await;
    }

    opts.url = session_url(&opts.url, 0);
    let shutdown = async move {
        let limit = async {
            match limit {
                Some(d) => {
                    tokio::time::sleep(d).await;
                    info!("duration limit of {d:?} reached");
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = termination_signal() => {},
            _ = limit => {},
        }
    };
    let live = Arc::new(Live::default());
    live.started.store(1, Ordering::Relaxed);
    let started = Instant::now();
    let result = publish_with(opts, shutdown, Some(live.clone()), true).await;
    match &result {
        Ok(stats) => {
            if stats.location.is_some() && !stats.connected {
                warn!("the WHIP session never connected");
            }
            info!(
                video_frames = stats.video_frames,
                keyframes = stats.keyframes,
                audio_frames = stats.audio_frames,
                bytes = stats.bytes,
                loops = stats.loops,
                keyframe_requests = stats.keyframe_requests,
                whole_file = stats.finished,
                "publish done after {:.1} s of media",
                stats.media_time.as_secs_f64()
            );
        }
        Err(e) => live.failed(e),
    }
    println!("{}", live.summary(1, started.elapsed()));
    result.map(|_| ())
}

/// The URL of session `n`: every `{n}` replaced by the number.
pub fn session_url(template: &str, n: u32) -> String {
    template.replace("{n}", &n.to_string())
}

/// Progress of every session of a run, shared by them (counters are updated as they go).
#[derive(Default)]
struct Live {
    started: AtomicU64,
    up: AtomicU64,
    failed: AtomicU64,
    packets: AtomicU64,
    bytes: AtomicU64,
    post_to_201: Mutex<Vec<Duration>>,
    post_to_media: Mutex<Vec<Duration>>,
    errors: Mutex<BTreeMap<String, u64>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Live {
    fn failed(&self, e: &anyhow::Error) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        *lock(&self.errors).entry(failure_kind(e)).or_default() += 1;
    }

    /// The report: one `key: name=value ...` line per figure (parsed by scripts/bench.sh).
    fn summary(&self, total: u32, elapsed: Duration) -> String {
        let mut setup = lock(&self.post_to_201).clone();
        let mut media = lock(&self.post_to_media).clone();
        let errors = lock(&self.errors);
        let errors = if errors.is_empty() {
            "none".to_owned()
        } else {
            errors
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let bytes = self.bytes.load(Ordering::Relaxed);
        let secs = elapsed.as_secs_f64().max(0.001);
        format!(
            "sessions: total={total} started={} up={} failed={}\n\
             POST->201 ms: {}\n\
             POST->media ms: {}\n\
             sent: packets={} bytes={bytes} kbit_s={:.0} elapsed_s={secs:.1}\n\
             errors: {errors}",
            self.started.load(Ordering::Relaxed),
            self.up.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            percentiles(&mut setup, &[50, 95, 99]),
            percentiles(&mut media, &[50, 99]),
            self.packets.load(Ordering::Relaxed),
            bytes as f64 * 8.0 / secs / 1000.0,
        )
    }
}

/// `n=COUNT p50=MS ...` (nearest rank), or `n=0` without samples.
fn percentiles(samples: &mut [Duration], ps: &[usize]) -> String {
    samples.sort_unstable();
    let mut out = format!("n={}", samples.len());
    if samples.is_empty() {
        return out;
    }
    for p in ps {
        let rank = (samples.len() * p).div_ceil(100).clamp(1, samples.len());
        let ms = samples[rank - 1].as_secs_f64() * 1000.0;
        out.push_str(&format!(" p{p}={ms:.1}"));
    }
    out
}

/// Why a session failed, as a short tag for counting (`http_503`, `connect_timeout`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FailureKind {
    HttpStatus(u16),
    ConnectTimeout,
    IceFailed,
    Closed,
}

impl std::fmt::Display for FailureKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::HttpStatus(s) => write!(f, "http_{s}"),
            Self::ConnectTimeout => f.write_str("connect_timeout"),
            Self::IceFailed => f.write_str("ice_failed"),
            Self::Closed => f.write_str("connection_closed"),
        }
    }
}

/// An error carrying its [`FailureKind`]; the message is what the user sees.
#[derive(Debug)]
struct Failure {
    kind: FailureKind,
    message: String,
}

impl Failure {
    fn err(kind: FailureKind, message: String) -> anyhow::Error {
        anyhow::Error::new(Self { kind, message })
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

fn failure_kind(e: &anyhow::Error) -> String {
    for cause in e.chain() {
        if let Some(f) = cause.downcast_ref::<Failure>() {
            return f.kind.to_string();
        }
        if let Some(r) = cause.downcast_ref::<reqwest::Error>() {
            return if r.is_timeout() {
                "http_timeout"
            } else if r.is_connect() {
                "http_connect"
            } else {
                "http_error"
            }
            .to_owned();
        }
    }
    "other".to_owned()
}

/// How often the load generator logs its progress.
const LOAD_PROGRESS_INTERVAL: Duration = Duration::from_secs(5);

/// `--sessions N` (N > 1): demuxes the file once, then starts the sessions (`ramp` per second,
/// or all at once), each stopping after `limit` from its own start, at the end of the file
/// (without loop) or on Ctrl-C/SIGTERM.
async fn run_many(
    opts: PublishOptions,
    sessions: u32,
    ramp: Option<f64>,
    limit: Option<Duration>,
) -> anyhow::Result<()> {
    // Check every URL before loading anything.
    for n in [0, sessions - 1] {
        parse_whip_url(&session_url(&opts.url, n))?;
    }
    let file = opts.file.clone();
    let clip = tokio::task::spawn_blocking(move || Clip::load(&file))
        .await
        .context("demuxer thread failed")??;
    let clip = Arc::new(clip);
    info!(
        file = %opts.file.display(),
        video = clip.info.video,
        audio = clip.info.audio,
        frames = clip.frames.len(),
        bytes = clip.bytes,
        "file loaded; starting {sessions} sessions towards {}",
        opts.url
    );
    let http = http_client()?;
    let live = Arc::new(Live::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let started = Instant::now();
    let t0 = tokio::time::Instant::now();

    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..sessions {
        let at = match ramp {
            Some(r) => t0 + Duration::from_secs_f64(f64::from(n) / r),
            None => t0,
        };
        let mut opts = opts.clone();
        opts.url = session_url(&opts.url, n);
        let (clip, http, live, mut stop) =
            (clip.clone(), http.clone(), live.clone(), stop_rx.clone());
        let span = tracing::info_span!("session", n);
        tasks.spawn(
            async move {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                live.started.fetch_add(1, Ordering::Relaxed);
                let shutdown = async move {
                    let limit = async {
                        match limit {
                            Some(d) => tokio::time::sleep(d).await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        _ = stop.wait_for(|s| *s) => {}
                        _ = limit => {}
                    }
                };
                let url = match parse_whip_url(&opts.url) {
                    Ok(u) => u,
                    Err(e) => {
                        warn!("{e:#}");
                        live.failed(&e);
                        return;
                    }
                };
                let session = Session {
                    opts: &opts,
                    url: &url,
                    http: &http,
                    info: clip.info,
                    verbose: false,
                    live: Some(live.clone()),
                };
                let mut stats = PublishStats::default();
                if let Err(e) = session.run(Source::Clip(clip), shutdown, &mut stats).await {
                    warn!("session failed: {e:#}");
                    live.failed(&e);
                }
            }
            .instrument(span),
        );
    }

    let mut signal = pin!(termination_signal());
    let mut progress =
        tokio::time::interval_at(t0 + LOAD_PROGRESS_INTERVAL, LOAD_PROGRESS_INTERVAL);
    let mut stopping = false;
    loop {
        tokio::select! {
            joined = tasks.join_next() => match joined {
                Some(Ok(())) => {}
                Some(Err(e)) => {
                    warn!("a session task ended abnormally: {e}");
                    live.failed.fetch_add(1, Ordering::Relaxed);
                    *lock(&live.errors).entry("panic".to_owned()).or_default() += 1;
                }
                None => break,
            },
            _ = &mut signal, if !stopping => {
                stopping = true;
                let _ = stop_tx.send(true);
            }
            _ = progress.tick() => {
                let running = tasks.len();
                info!(
                    "{running} sessions running; {}",
                    live.summary(sessions, started.elapsed()).replace('\n', "; ")
                );
            }
        }
    }
    println!("{}", live.summary(sessions, started.elapsed()));
    let failed = live.failed.load(Ordering::Relaxed);
    if failed > 0 {
        bail!("{failed} of {sessions} sessions failed");
    }
    Ok(())
}

/// Resolves on Ctrl-C or (on Unix) SIGTERM; never resolves if signals cannot be installed.
async fn termination_signal() {
    let ctrl_c = async {
        match tokio::signal::ctrl_c().await {
            Ok(()) => info!("Ctrl-C received, stopping"),
            Err(e) => {
                warn!("cannot listen for Ctrl-C: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(unix)]
    let term = async {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
                info!("SIGTERM received, stopping");
            }
            Err(e) => {
                warn!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Publishes `opts.file` to the WHIP endpoint until end of file (unless looping) or until
/// `shutdown` resolves, then DELETEs the WHIP session.
///
/// Returns an error for HTTP failures (with status and body), unreadable or unsupported files,
/// and ICE/DTLS failures. Stopping through `shutdown` is a success.
pub async fn publish(opts: PublishOptions, shutdown: impl Future) -> anyhow::Result<PublishStats> {
    publish_with(opts, shutdown, None, true).await
}

async fn publish_with(
    opts: PublishOptions,
    shutdown: impl Future,
    live: Option<Arc<Live>>,
    verbose: bool,
) -> anyhow::Result<PublishStats> {
    let url = parse_whip_url(&opts.url)?;

    // Open the file first: a bad file should fail before we talk to the server.
    let file = opts.file.clone();
    let demuxer = tokio::task::spawn_blocking(move || Demuxer::open(&file))
        .await
        .context("demuxer thread failed")??;
    let info = demuxer.info();
    info!(
        file = %opts.file.display(),
        video = info.video,
        audio = info.audio,
        "publishing to {url}"
    );
    let http = http_client()?;
    let session = Session {
        opts: &opts,
        url: &url,
        http: &http,
        info,
        verbose,
        live,
    };
    let source = if opts.simulcast.is_empty() {
        Source::Demux(demuxer)
    } else {
        drop(demuxer);
        let (file, layers) = (opts.file.clone(), opts.simulcast.clone());
        let clip = tokio::task::spawn_blocking(move || Clip::load_simulcast(&file, &layers))
            .await
            .context("demuxer thread failed")??;
        Source::Clip(Arc::new(clip))
    };
    let mut stats = PublishStats::default();
    session
        .run(source, shutdown, &mut stats)
        .await
        .map(|()| stats)
}

/// The RID of the main file's video when publishing simulcast.
const MAIN_RID: &str = "h";

/// The simulcast RIDs, layer 0 (the main file) first.
fn simulcast_rids(opts: &PublishOptions) -> impl Iterator<Item = &str> {
    std::iter::once(MAIN_RID).chain(opts.simulcast.iter().map(|(rid, _)| rid.as_str()))
}

fn parse_whip_url(s: &str) -> anyhow::Result<Url> {
    let url = Url::parse(s).with_context(|| format!("invalid WHIP URL {s:?}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        bail!("WHIP URL must be http:// or https://, got {url}");
    }
    Ok(url)
}

fn http_client() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(30))
        .build()
        .context("building HTTP client")
}

/// Logs at info for a lone session, at debug for one of many (`--sessions`).
macro_rules! note {
    ($verbose:expr, $($arg:tt)+) => {
        if $verbose {
            info!($($arg)+)
        } else {
            debug!($($arg)+)
        }
    };
}

/// Where a session's frames come from.
enum Source {
    /// Read from the file as we go, on a blocking thread (one session).
    Demux(Demuxer),
    /// Demuxed once into memory, shared by every session.
    Clip(Arc<Clip>),
}

/// One WHIP session: its signalling, its `Rtc`, its socket.
struct Session<'a> {
    opts: &'a PublishOptions,
    url: &'a Url,
    http: &'a reqwest::Client,
    info: MediaInfo,
    verbose: bool,
    live: Option<Arc<Live>>,
}

impl Session<'_> {
    async fn run(
        &self,
        source: Source,
        shutdown: impl Future,
        stats: &mut PublishStats,
    ) -> anyhow::Result<()> {
        let (opts, url, info) = (self.opts, self.url, self.info);
        let mut shutdown = pin!(shutdown);
        let socket = UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))
            .await
            .context("binding a UDP socket")?;
        let port = socket.local_addr().context("UDP socket address")?.port();

        let mut rtc = RtcConfig::new()
            .set_crypto_provider(Arc::new(str0m::crypto::from_feature_flags()))
            .clear_codecs()
            .enable_h264(info.video_codec == Codec::H264)
            .enable_vp8(info.video_codec == Codec::Vp8)
            .enable_vp9(info.video_codec == Codec::Vp9)
            .enable_av1(info.video_codec == Codec::Av1)
            .enable_opus(true, false)
            .build(Instant::now());

        let mut locals = LocalAddrs::new(port);
        let remote_ips = resolve_host(url).await?;
        for ip in &remote_ips {
            locals.route_to(*ip);
        }
        for addr in locals.candidates() {
            add_host_candidate(&mut rtc, addr, opts.ice_tcp);
        }

        let mut api = rtc.sdp_api();
        let simulcast = (!opts.simulcast.is_empty()).then(|| {
            let mut s = Simulcast::new();
            for rid in simulcast_rids(opts) {
                s.add_send_layer(SimulcastLayer::new(rid));
            }
            s
        });
        let video_mid = info
            .video
            .then(|| api.add_media(MediaKind::Video, Direction::SendOnly, None, None, simulcast));
        let audio_mid = info
            .audio
            .then(|| api.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None));
        let (offer, pending) = api
            .apply()
            .ok_or_else(|| anyhow!("str0m produced no SDP offer"))?;
        let offer = offer.to_sdp_string();
        debug!("SDP offer:\n{offer}");

        let posted = Instant::now();
        let session = tokio::select! {
            r = post_offer(self.http, url, opts.token.as_deref(), offer) => r?,
            _ = &mut shutdown => {
                note!(self.verbose, "stopped before the WHIP server answered");
                return Ok(());
            }
        };
        let setup = posted.elapsed();
        stats.post_to_201 = Some(setup);
        if let Some(live) = &self.live {
            lock(&live.post_to_201).push(setup);
        }
        note!(self.verbose, location = %session.location, "WHIP session created");
        stats.location = Some(session.location.clone());

        let result = async {
            accept_answer(&mut rtc, pending, &session.answer)?;
            for ip in remote_candidate_ips(&session.answer) {
                if let Some(addr) = locals.route_to(ip) {
                    add_host_candidate(&mut rtc, addr, opts.ice_tcp);
                }
            }
            let video =
                video_mid.map(|mid| Track::new(&mut rtc, mid, info.video_codec, info.h264_profile));
            let audio = audio_mid.map(|mid| Track::new(&mut rtc, mid, Codec::Opus, None));
            if video.as_ref().is_none_or(|t| t.pt.is_none())
                && audio.as_ref().is_none_or(|t| t.pt.is_none())
            {
                bail!(
                    "the WHIP server accepted neither {} video nor Opus audio",
                    info.video_codec
                );
            }
            let driver = Driver {
                rtc,
                socket,
                tcp: opts.ice_tcp.then(TcpLinks::default),
                locals,
                signalling: Signalling {
                    http: self.http,
                    location: session.location.clone(),
                    token: opts.token.as_deref(),
                    answer: session.answer.clone(),
                    remote_ips,
                },
                video,
                audio,
                opts,
                stats: &mut *stats,
                verbose: self.verbose,
                live: self.live.as_deref(),
                posted,
            };
            driver.run(source, shutdown.as_mut()).await
        }
        .await;

        delete_session(
            self.http,
            &session.location,
            opts.token.as_deref(),
            self.verbose,
        )
        .await;
        result
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP (WHIP signalling)

struct WhipSession {
    location: Url,
    answer: String,
}

const MAX_ERROR_BODY: usize = 2000;

async fn post_offer(
    http: &reqwest::Client,
    url: &Url,
    token: Option<&str>,
    offer: String,
) -> anyhow::Result<WhipSession> {
    let mut req = http
        .post(url.clone())
        .header(reqwest::header::CONTENT_TYPE, "application/sdp")
        .header(reqwest::header::ACCEPT, "application/sdp")
        .body(offer);
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    let resp = req
        .send()
        .await
        .with_context(|| format!("POST {url} failed"))?;
    let status = resp.status();
    // Relative Locations resolve against the URL that answered (after any 307).
    let base = resp.url().clone();
    let location = resp
        .headers()
        .get(reqwest::header::LOCATION)
        .map(|v| v.to_str().map(str::to_owned));
    let content_type = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = resp
        .text()
        .await
        .with_context(|| format!("reading the answer to POST {url}"))?;
    if status != reqwest::StatusCode::CREATED {
        return Err(Failure::err(
            FailureKind::HttpStatus(status.as_u16()),
            format!(
                "WHIP server refused the offer: POST {url} returned {status}{}",
                error_body(&body)
            ),
        ));
    }
    let location = match location {
        Some(Ok(l)) => base
            .join(&l)
            .with_context(|| format!("bad Location header {l:?}"))?,
        Some(Err(_)) => bail!("WHIP server sent a Location header that is not text"),
        None => bail!("WHIP server answered 201 without a Location header"),
    };
    if !content_type
        .as_deref()
        .is_some_and(|c| c.to_ascii_lowercase().starts_with("application/sdp"))
    {
        warn!("WHIP answer has Content-Type {content_type:?}, expected application/sdp");
    }
    debug!("SDP answer:\n{body}");
    Ok(WhipSession {
        location,
        answer: body,
    })
}

fn error_body(body: &str) -> String {
    let body = body.trim();
    if body.is_empty() {
        return String::new();
    }
    let mut end = body.len().min(MAX_ERROR_BODY);
    while !body.is_char_boundary(end) {
        end -= 1;
    }
    let more = if end < body.len() { " ..." } else { "" };
    format!(": {}{more}", &body[..end])
}

async fn delete_session(
    http: &reqwest::Client,
    location: &Url,
    token: Option<&str>,
    verbose: bool,
) {
    let mut req = http
        .delete(location.clone())
        .timeout(Duration::from_secs(5));
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    match req.send().await {
        Ok(resp) if resp.status().is_success() => note!(verbose, "WHIP session deleted"),
        Ok(resp) => {
            let status = resp.status();
            let body = resp.text().await.unwrap_or_default();
            warn!("DELETE {location} returned {status}{}", error_body(&body));
        }
        Err(e) => warn!("DELETE {location} failed: {e}"),
    }
}

/// What a session needs to talk to the WHIP server after the POST.
struct Signalling<'a> {
    http: &'a reqwest::Client,
    location: Url,
    token: Option<&'a str>,
    /// The server's SDP answer, with the ICE credentials now in use.
    answer: String,
    /// The server's addresses, to choose local candidates towards.
    remote_ips: Vec<IpAddr>,
}

impl Signalling<'_> {
    /// Sends an ICE restart `PATCH` and returns the server's fragment.
    async fn restart(&self, fragment: &str) -> anyhow::Result<crate::rtc::trickle::Fragment> {
        let mut req = self
            .http
            .patch(self.location.clone())
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/trickle-ice-sdpfrag",
            )
            .header(reqwest::header::IF_MATCH, "*")
            .timeout(Duration::from_secs(5))
            .body(fragment.to_owned());
        if let Some(token) = self.token {
            req = req.bearer_auth(token);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("ICE restart PATCH {} failed", self.location))?;
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        if status != reqwest::StatusCode::OK {
            bail!(
                "WHIP server refused the ICE restart: PATCH {} returned {status}{}",
                self.location,
                error_body(&body)
            );
        }
        crate::rtc::trickle::parse(&body)
            .map_err(|e| anyhow!("WHIP server's ICE restart answer is malformed: {e}"))
    }
}

/// The client's ICE restart fragment (RFC 9725 §4.3.2): the ICE lines of the restart offer
/// (new ufrag/pwd per media section) with our new `candidates` in the first section.
fn restart_fragment(offer: &str, candidates: &[String]) -> String {
    let ice = crate::rtc::trickle::ice_fragment(offer);
    let mut out = String::new();
    let mut sections = 0;
    for line in ice.lines() {
        if line.starts_with("a=candidate:") || line == "a=end-of-candidates" {
            continue; // the offer's candidates are the old ones
        }
        if line.starts_with("m=") {
            sections += 1;
        }
        out.push_str(line);
        out.push_str("\r\n");
        if sections == 1 && line.starts_with("a=ice-pwd:") {
            for c in candidates {
                out.push_str("a=");
                out.push_str(c);
                out.push_str("\r\n");
            }
            out.push_str("a=end-of-candidates\r\n");
        }
    }
    out
}

fn accept_answer(rtc: &mut Rtc, pending: SdpPendingOffer, answer: &str) -> anyhow::Result<()> {
    let answer = SdpAnswer::from_sdp_string(answer)
        .map_err(|e| anyhow!("WHIP server sent an SDP answer we cannot parse: {e}"))?;
    rtc.sdp_api()
        .accept_answer(pending, answer)
        .map_err(|e| anyhow!("cannot use the WHIP server's SDP answer: {e}"))
}

/// The IP addresses of the UDP and TCP candidates in an SDP (mDNS names are skipped).
fn remote_candidate_ips(sdp: &str) -> Vec<IpAddr> {
    let mut ips = Vec::new();
    for line in sdp.lines() {
        let Some(rest) = line.trim().strip_prefix("a=candidate:") else {
            continue;
        };
        // foundation component transport priority address port typ type ...
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let (Some(transport), Some(addr)) = (fields.get(2), fields.get(4)) else {
            continue;
        };
        if !(transport.eq_ignore_ascii_case("udp") || transport.eq_ignore_ascii_case("tcp")) {
            continue;
        }
        match addr.parse::<IpAddr>() {
            Ok(ip) if !ips.contains(&ip) => ips.push(ip),
            _ => {}
        }
    }
    ips
}

async fn resolve_host(url: &Url) -> anyhow::Result<Vec<IpAddr>> {
    let port = url.port_or_known_default().unwrap_or(80);
    let ips = match url.host() {
        Some(url::Host::Ipv4(ip)) => vec![IpAddr::V4(ip)],
        Some(url::Host::Ipv6(ip)) => vec![IpAddr::V6(ip)],
        Some(url::Host::Domain(name)) => tokio::net::lookup_host((name, port))
            .await
            .with_context(|| format!("cannot resolve {name}"))?
            .map(|a| a.ip())
            .collect(),
        None => bail!("WHIP URL {url} has no host"),
    };
    Ok(ips)
}

// ---------------------------------------------------------------------------------------------
// Local addresses: one socket on 0.0.0.0, one host candidate per local IPv4 address we route from

/// The local addresses our single `0.0.0.0:port` socket is reachable at, learnt from the
/// kernel's routing decision towards each remote address.
struct LocalAddrs {
    port: u16,
    by_remote: HashMap<IpAddr, Option<SocketAddr>>,
    candidates: Vec<SocketAddr>,
}

impl LocalAddrs {
    fn new(port: u16) -> Self {
        Self {
            port,
            by_remote: HashMap::new(),
            candidates: Vec::new(),
        }
    }

    /// The local address used to reach `remote`; a new one is returned only the first time it
    /// is seen (so the caller adds it as a candidate once).
    fn route_to(&mut self, remote: IpAddr) -> Option<SocketAddr> {
        let local = *self
            .by_remote
            .entry(remote)
            .or_insert_with(|| route_local_ip(remote).map(|ip| SocketAddr::new(ip, self.port)));
        let local = local?;
        if self.candidates.contains(&local) {
            None
        } else {
            self.candidates.push(local);
            Some(local)
        }
    }

    fn candidates(&self) -> Vec<SocketAddr> {
        self.candidates.clone()
    }

    /// Our address as seen by a datagram from `source` (the socket is bound to 0.0.0.0).
    fn destination_for(&mut self, source: SocketAddr) -> SocketAddr {
        let ip = source.ip();
        if let Some(Some(local)) = self.by_remote.get(&ip) {
            return *local;
        }
        let local = route_local_ip(ip).map(|l| SocketAddr::new(l, self.port));
        self.by_remote.insert(ip, local);
        local
            .or_else(|| self.candidates.first().copied())
            .unwrap_or_else(|| SocketAddr::from((Ipv4Addr::LOCALHOST, self.port)))
    }
}

/// The IPv4 address the OS would send from to reach `remote` (no packet is sent).
fn route_local_ip(remote: IpAddr) -> Option<IpAddr> {
    let IpAddr::V4(v4) = remote else {
        debug!("skipping IPv6 address {remote}: publish uses IPv4 only");
        return None;
    };
    if v4.is_loopback() {
        return Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    let probe = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
    probe.connect((v4, 9)).ok()?;
    let ip = probe.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then_some(ip)
}

/// A UDP host candidate at `addr`, or with `tcp` an active TCP one at its IP (port 9, as
/// RFC 6544 §4.5 has active candidates).
fn add_host_candidate(rtc: &mut Rtc, addr: SocketAddr, tcp: bool) {
    let candidate = if tcp {
        Candidate::builder()
            .tcp()
            .host(SocketAddr::new(addr.ip(), ACTIVE_TCP_PORT))
            .tcptype(TcpType::Active)
            .build()
    } else {
        Candidate::host(addr, "udp")
    };
    match candidate {
        Ok(c) => {
            debug!("local host candidate {addr}");
            rtc.add_local_candidate(c);
        }
        Err(e) => debug!("skipping local address {addr}: {e}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The str0m driver

struct Track {
    mid: Mid,
    pt: Option<Pt>,
    clock: Frequency,
}

impl Track {
    fn new(rtc: &mut Rtc, mid: Mid, codec: Codec, h264_profile: Option<u32>) -> Self {
        let pt = rtc
            .writer(mid)
            .and_then(|w| choose_pt(w.payload_params(), codec, h264_profile));
        match pt {
            Some(pt) => debug!(%mid, ?pt, "sending {codec}"),
            None => warn!(%mid, "the WHIP server did not accept {codec}; not sending it"),
        }
        let clock = if codec == Codec::Opus {
            Frequency::FORTY_EIGHT_KHZ
        } else {
            Frequency::NINETY_KHZ
        };
        Self { mid, pt, clock }
    }
}

/// Picks the payload type for `codec`; for H264 prefers packetization-mode 1 and the file's
/// profile.
fn choose_pt<'a>(
    params: impl Iterator<Item = &'a PayloadParams>,
    codec: Codec,
    h264_profile: Option<u32>,
) -> Option<Pt> {
    params
        .filter(|p| p.spec().codec == codec)
        .enumerate()
        .max_by_key(|(i, p)| {
            let f = p.spec().format;
            let mut score = 0;
            if codec == Codec::H264 {
                if f.packetization_mode == Some(1) {
                    score += 4;
                }
                match (h264_profile, f.profile_level_id) {
                    (Some(want), Some(have)) if want >> 16 == have >> 16 => {
                        score += 2;
                        // Constrained baseline (constraint_set1) matches 42e0xx best.
                        if (want >> 8) & 0x40 == (have >> 8) & 0x40 {
                            score += 1;
                        }
                    }
                    _ => {}
                }
            }
            // Earlier entries win ties (max_by_key keeps the last maximum).
            (score, std::cmp::Reverse(*i))
        })
        .map(|(_, p)| p.pt())
}

/// The port active TCP candidates carry (they connect from any port).
const ACTIVE_TCP_PORT: u16 = 9;

struct Driver<'a> {
    rtc: Rtc,
    socket: UdpSocket,
    /// ICE over TCP instead of the UDP socket (`--ice-tcp`).
    tcp: Option<TcpLinks>,
    locals: LocalAddrs,
    signalling: Signalling<'a>,
    video: Option<Track>,
    audio: Option<Track>,
    opts: &'a PublishOptions,
    stats: &'a mut PublishStats,
    /// Lone session: progress and state changes at info.
    verbose: bool,
    /// Shared counters of a multi-session run.
    live: Option<&'a Live>,
    /// When the POST was sent.
    posted: Instant,
}

const FRAME_QUEUE: usize = 64;
/// Frames a session writes back to back, and rounds of due work it gives
/// str0m at once, before it lets the runtime run others.
const MAX_BURST: usize = 8;
/// Sessions' timers and frames are due on the lines of one grid with this
/// step, so a hundred sessions wake the runtime together instead of one by
/// one: a frame leaves at most this much late.
const WAKE_STEP: Duration = Duration::from_millis(5);

fn wake_grid() -> &'static crate::rtc::TimerGrid {
    static GRID: std::sync::OnceLock<crate::rtc::TimerGrid> = std::sync::OnceLock::new();
    GRID.get_or_init(|| crate::rtc::TimerGrid::new(WAKE_STEP))
}

/// How long a lost ICE connection may take to come back.
const DISCONNECT_GRACE: Duration = Duration::from_secs(5);

impl Driver<'_> {
    async fn run(
        mut self,
        source: Source,
        mut shutdown: std::pin::Pin<&mut impl Future>,
    ) -> anyhow::Result<()> {
        let loop_ = self.opts.loop_;
        let (mut frames, demux_task) = match source {
            Source::Demux(demuxer) => {
                let (tx, rx) = mpsc::channel::<MediaFrame>(FRAME_QUEUE);
                let task = tokio::task::spawn_blocking(move || {
                    let mut demuxer = demuxer;
                    demuxer.pump(&tx, loop_)
                });
                (Frames::Channel(rx), Some(task))
            }
            Source::Clip(clip) => (Frames::Clip(ClipCursor::new(clip, loop_)), None),
        };

        let result = self.event_loop(&mut frames, shutdown.as_mut()).await;
        // Stop the demuxer (its next send fails) and collect its outcome.
        drop(frames);
        let demux_result = match demux_task {
            Some(task) => task.await,
            None => Ok(Ok(())),
        };
        self.rtc.disconnect();
        result?;
        match demux_result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.context("reading the media file")),
            Err(e) => Err(anyhow!("demuxer thread failed: {e}")),
        }
    }

    async fn event_loop(
        &mut self,
        frames: &mut Frames,
        mut shutdown: std::pin::Pin<&mut impl Future>,
    ) -> anyhow::Result<()> {
        let mut buf = vec![0u8; 2048];
        let connect_deadline = tokio::time::Instant::now() + self.opts.connect_timeout;
        let mut media_start: Option<Instant> = None;
        let mut pending: Option<MediaFrame> = None;
        let mut disconnected_since: Option<tokio::time::Instant> = None;
        let mut next_progress = tokio::time::Instant::now() + self.opts.progress_interval;
        let mut eof = false;
        let mut restart_after = self.opts.ice_restart_after;
        let mut burst = 0;
        // One timer for str0m's next timeout and the next frame, reset only
        // when its deadline moves.
        let wake = tokio::time::sleep_until(tokio::time::Instant::now());
        tokio::pin!(wake);

        loop {
            let timeout = self
                .drain(&mut disconnected_since, &mut media_start)
                .await?;
            if !self.rtc.is_alive() {
                return Err(Failure::err(
                    FailureKind::Closed,
                    "the WebRTC connection was closed".to_owned(),
                ));
            }
            if eof && pending.is_none() {
                self.stats.finished = true;
                note!(self.verbose, "end of file reached");
                break;
            }
            let connected = media_start.is_some();
            // A frame that is due goes out now, without a trip through the
            // runtime's timers (a few at a time, so a late session does not
            // keep its worker from the others).
            if let Some(start) = media_start
                && burst < MAX_BURST
            {
                if pending.is_none()
                    && !eof
                    && let Some(next) = frames.try_next()
                {
                    match next {
                        Some(frame) => pending = Some(frame),
                        None => {
                            eof = true;
                            continue;
                        }
                    }
                }
                if let Some(frame) = pending.take_if(|f| start + f.send_at <= Instant::now()) {
                    burst += 1;
                    self.write(frame, start)?;
                    continue;
                }
            }
            burst = 0;
            let restart_due = media_start
                .zip(restart_after)
                .map(|(start, after)| tokio::time::Instant::from_std(start + after));
            let next = match (&pending, media_start) {
                (Some(f), Some(start)) => timeout.min(start + f.send_at),
                _ => timeout,
            };
            let at = tokio::time::Instant::from_std(wake_grid().place(next, Instant::now()));
            if wake.deadline() != at {
                wake.as_mut().reset(at);
            }

            tokio::select! {
                biased;
                _ = &mut shutdown => {
                    note!(self.verbose, "stopping");
                    break;
                }
                _ = tokio::time::sleep_until(connect_deadline), if !connected => {
                    return Err(Failure::err(
                        FailureKind::ConnectTimeout,
                        format!(
                            "no ICE/DTLS connection to the WHIP server after {:?}",
                            self.opts.connect_timeout
                        ),
                    ));
                }
                _ = sleep_until_opt(disconnected_since.map(|t| t + DISCONNECT_GRACE)),
                    if disconnected_since.is_some() =>
                {
                    return Err(Failure::err(
                        FailureKind::IceFailed,
                        "ICE connection to the WHIP server failed (no working candidate pair)"
                            .to_owned(),
                    ));
                }
                r = self.socket.recv_from(&mut buf) => match r {
                    Ok((n, source)) => self.receive(&buf[..n], source, Protocol::Udp)?,
                    Err(e) => debug!("UDP receive error: {e}"),
                },
                Some((source, data)) = tcp_recv(&mut self.tcp) => {
                    self.receive(&data, source, Protocol::Tcp)?;
                }
                _ = &mut wake => {
                    // A due frame goes out at the top of the loop.
                    let now = Instant::now();
                    if timeout <= now {
                        self.rtc
                            .handle_input(Input::Timeout(now))
                            .map_err(|e| anyhow!("WebRTC error: {e}"))?;
                    }
                }
                f = frames.next(), if pending.is_none() && connected && !eof => match f {
                    Some(frame) => pending = Some(frame),
                    None => eof = true,
                },
                _ = sleep_until_opt(restart_due), if restart_due.is_some() => {
                    restart_after = None;
                    self.ice_restart().await?;
                }
                _ = tokio::time::sleep_until(next_progress), if connected && self.verbose => {
                    next_progress += self.opts.progress_interval;
                    self.log_progress(media_start);
                }
            }
        }
        if let Some(start) = media_start {
            self.stats.media_time = start.elapsed();
        }
        // Push out what the last write produced.
        let _ = self.drain(&mut disconnected_since, &mut media_start).await;
        Ok(())
    }

    /// Moves the session to a new UDP socket with an ICE restart (RFC 9725 §4.3.2): new
    /// credentials and the new socket's candidates go to the server in a `PATCH` with
    /// `If-Match: "*"`; its answer brings the server's new credentials and candidates. The old
    /// socket is closed, so media can only go on over the new path.
    async fn ice_restart(&mut self) -> anyhow::Result<()> {
        let socket = UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))
            .await
            .context("binding a UDP socket for the ICE restart")?;
        let mut locals = LocalAddrs::new(socket.local_addr()?.port());
        for ip in &self.signalling.remote_ips {
            locals.route_to(*ip);
        }
        let candidates: Vec<Candidate> = locals
            .candidates()
            .into_iter()
            .filter_map(|a| Candidate::host(a, "udp").ok())
            .collect();
        let mut api = self.rtc.sdp_api();
        api.ice_restart(false);
        let (offer, pending) = api
            .apply()
            .ok_or_else(|| anyhow!("str0m produced no ICE restart offer"))?;
        let lines: Vec<String> = candidates.iter().map(|c| c.to_sdp_string()).collect();
        let fragment = restart_fragment(&offer.to_sdp_string(), &lines);
        note!(self.verbose, "ICE restart on a new UDP socket");
        let server = self.signalling.restart(&fragment).await?;
        let (Some(ufrag), Some(pwd)) = (server.ufrag, server.pwd) else {
            bail!("the WHIP server's ICE restart answer has no ice-ufrag/ice-pwd");
        };
        let answer = crate::rtc::trickle::restart_offer(&self.signalling.answer, &ufrag, &pwd);
        accept_answer(&mut self.rtc, pending, &answer)?;
        // str0m restarted its ICE agent with the answer, without candidates.
        for c in candidates {
            self.rtc.add_local_candidate(c);
        }
        for c in &server.candidates {
            match Candidate::from_sdp_string(c) {
                Ok(c) => {
                    self.rtc.add_remote_candidate(c);
                }
                Err(e) => debug!("skipping the server's candidate {c}: {e}"),
            }
        }
        self.signalling.answer = answer;
        self.socket = socket;
        self.locals = locals;
        self.stats.ice_restarts += 1;
        Ok(())
    }

    /// Drains str0m's output: sends datagrams, handles events. Returns the next timeout.
    async fn drain(
        &mut self,
        disconnected_since: &mut Option<tokio::time::Instant>,
        media_start: &mut Option<Instant>,
    ) -> anyhow::Result<Instant> {
        let mut immediate = 0;
        loop {
            match self
                .rtc
                .poll_output()
                .map_err(|e| anyhow!("WebRTC error: {e}"))?
            {
                Output::Timeout(t) => {
                    // Work due now (a frame just written, to packetize) is
                    // done at once, not after a trip through the runtime's
                    // timers; a few rounds at most.
                    let now = Instant::now();
                    if t > now || immediate == MAX_BURST {
                        return Ok(t);
                    }
                    immediate += 1;
                    self.rtc
                        .handle_input(Input::Timeout(now))
                        .map_err(|e| anyhow!("WebRTC error: {e}"))?;
                }
                Output::Transmit(t) if t.proto == Protocol::Tcp => {
                    let n = t.contents.len();
                    let Some(tcp) = self.tcp.as_mut() else {
                        continue;
                    };
                    match tcp.send(t.destination, t.contents.to_vec()).await {
                        Ok(()) => self.count_sent(n),
                        Err(e) => debug!("ICE-TCP connection to {} failed: {e}", t.destination),
                    }
                }
                Output::Transmit(t) => {
                    match self.socket.send_to(&t.contents, t.destination).await {
                        Ok(n) => self.count_sent(n),
                        Err(e) => debug!("UDP send to {} failed: {e}", t.destination),
                    }
                }
                Output::Event(e) => match e {
                    Event::Connected => {
                        if media_start.is_none() {
                            note!(self.verbose, "connected (ICE + DTLS), sending media");
                            *media_start = Some(Instant::now());
                            self.stats.connected = true;
                        }
                    }
                    Event::IceConnectionStateChange(state) => {
                        debug!("ICE state {state:?}");
                        if state == IceConnectionState::Disconnected {
                            if disconnected_since.is_none() {
                                warn!("ICE disconnected");
                                *disconnected_since = Some(tokio::time::Instant::now());
                            }
                        } else {
                            if disconnected_since.is_some() && media_start.is_some() {
                                info!("ICE {state:?} again");
                            }
                            *disconnected_since = None;
                        }
                    }
                    Event::KeyframeRequest(req) => {
                        self.stats.keyframe_requests += 1;
                        if self.stats.keyframe_requests == 1 && self.verbose {
                            info!(
                                mid = %req.mid,
                                kind = ?req.kind,
                                "server asked for a keyframe; keyframes come from the file \
                                 (publish does not re-encode), further requests logged at debug"
                            );
                        } else {
                            debug!(mid = %req.mid, kind = ?req.kind, "keyframe request");
                        }
                    }
                    other => debug!("event {other:?}"),
                },
            }
        }
    }

    fn count_sent(&mut self, bytes: usize) {
        self.stats.packets_sent += 1;
        self.stats.packet_bytes_sent += bytes as u64;
        if let Some(live) = self.live {
            live.packets.fetch_add(1, Ordering::Relaxed);
            live.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        }
    }

    fn receive(&mut self, data: &[u8], source: SocketAddr, proto: Protocol) -> anyhow::Result<()> {
        let contents = match data.try_into() {
            Ok(c) => c,
            Err(e) => {
                debug!("ignoring {} bytes from {source}: {e:?}", data.len());
                return Ok(());
            }
        };
        let mut destination = self.locals.destination_for(source);
        if proto == Protocol::Tcp {
            destination.set_port(ACTIVE_TCP_PORT);
        }
        let input = Input::Receive(
            Instant::now(),
            Receive {
                proto,
                source,
                destination,
                contents,
            },
        );
        if !self.rtc.accepts(&input) {
            debug!("ignoring datagram from {source}");
            return Ok(());
        }
        self.rtc
            .handle_input(input)
            .map_err(|e| anyhow!("WebRTC error: {e}"))
    }

    fn write(&mut self, frame: MediaFrame, start: Instant) -> anyhow::Result<()> {
        let track = match frame.kind {
            FrameKind::Video => self.video.as_ref(),
            FrameKind::Audio => self.audio.as_ref(),
        };
        let Some((mid, pt, clock)) = track.and_then(|t| Some((t.mid, t.pt?, t.clock))) else {
            return Ok(());
        };
        let ticks = rescale(frame.pts_us, clock.get());
        let len = frame.data.len() as u64;
        let Some(mut writer) = self.rtc.writer(mid) else {
            return Ok(());
        };
        if frame.kind == FrameKind::Video && !self.opts.simulcast.is_empty() {
            let rid = simulcast_rids(self.opts).nth(usize::from(frame.layer));
            writer = writer.rid(Rid::from(rid.unwrap_or(MAIN_RID)));
        }
        writer
            .write(
                pt,
                start + frame.send_at,
                MediaTime::new(ticks, clock),
                frame.data,
            )
            .map_err(|e| anyhow!("writing {:?} frame: {e}", frame.kind))?;
        if self.stats.post_to_media.is_none() {
            let t = self.posted.elapsed();
            self.stats.post_to_media = Some(t);
            if let Some(live) = self.live {
                lock(&live.post_to_media).push(t);
                live.up.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.stats.bytes += len;
        self.stats.loops = self.stats.loops.max(frame.pass);
        match frame.kind {
            FrameKind::Video => {
                self.stats.video_frames += 1;
                if frame.key {
                    self.stats.keyframes += 1;
                }
            }
            FrameKind::Audio => self.stats.audio_frames += 1,
        }
        Ok(())
    }

    fn log_progress(&self, media_start: Option<Instant>) {
        let secs = media_start.map_or(0.0, |s| s.elapsed().as_secs_f64());
        let kbps = if secs > 0.0 {
            self.stats.bytes as f64 * 8.0 / secs / 1000.0
        } else {
            0.0
        };
        info!(
            video_frames = self.stats.video_frames,
            keyframes = self.stats.keyframes,
            audio_frames = self.stats.audio_frames,
            bytes = self.stats.bytes,
            keyframe_requests = self.stats.keyframe_requests,
            "{secs:.0} s sent, {kbps:.0} kbit/s"
        );
    }
}

/// The next ICE-TCP packet; never without ICE-TCP.
async fn tcp_recv(tcp: &mut Option<TcpLinks>) -> Option<(SocketAddr, Vec<u8>)> {
    match tcp {
        Some(t) => t.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Microseconds to ticks of a `clock` Hz clock, rounded to nearest.
fn rescale(us: u64, clock: u32) -> u64 {
    let ticks = (u128::from(us) * u128::from(clock) + 500_000) / 1_000_000;
    u64::try_from(ticks).unwrap_or(u64::MAX)
}

// ---------------------------------------------------------------------------------------------
// Demuxing (blocking; runs on its own thread)

/// Which elementary stream a frame belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    Video,
    Audio,
}

/// One access unit ready for the RTP packetizer.
#[derive(Debug, Clone)]
pub struct MediaFrame {
    pub kind: FrameKind,
    /// Keyframe (video only); such frames start with SPS and PPS.
    pub key: bool,
    /// When to send it, relative to the first frame (decode order, looping included).
    pub send_at: Duration,
    /// Presentation time in microseconds on the same timeline (used for the RTP timestamp).
    pub pts_us: u64,
    /// Annex B H264 access unit, or one Opus packet (shared, never copied per session).
    pub data: Arc<[u8]>,
    /// Pass through the file: 0 the first time, 1 after the first restart (`--loop`), ...
    pub pass: u64,
    /// Simulcast layer: 0 the main file's, `n` the `n`th `--simulcast` file's.
    pub layer: u8,
}

/// What the file offers.
#[derive(Debug, Clone, Copy)]
pub struct MediaInfo {
    pub video: bool,
    pub audio: bool,
    /// `profile_idc << 16 | constraint flags << 8 | level_idc` from the first SPS.
    pub h264_profile: Option<u32>,
    /// The video's codec: H264, VP8, VP9 or AV1 (sent as it is).
    pub video_codec: Codec,
}

/// Frames for the event loop: from the demuxer thread, or replayed from memory.
enum Frames {
    Channel(mpsc::Receiver<MediaFrame>),
    Clip(ClipCursor),
}

impl Frames {
    /// The next frame; `None` at the end. Cancel-safe.
    async fn next(&mut self) -> Option<MediaFrame> {
        match self {
            Self::Channel(rx) => rx.recv().await,
            Self::Clip(c) => c.next(),
        }
    }

    /// [`Frames::next`] when it is ready without waiting.
    fn try_next(&mut self) -> Option<Option<MediaFrame>> {
        match self {
            Self::Channel(rx) => match rx.try_recv() {
                Ok(f) => Some(Some(f)),
                Err(mpsc::error::TryRecvError::Empty) => None,
                Err(mpsc::error::TryRecvError::Disconnected) => Some(None),
            },
            Self::Clip(c) => Some(c.next()),
        }
    }
}

/// Largest file `--sessions` holds in memory.
const MAX_CLIP_BYTES: u64 = 1 << 30;

/// A whole file demuxed into memory, shared by the sessions of a load run.
pub struct Clip {
    pub info: MediaInfo,
    /// One pass, in file order, on a timeline starting at 0.
    pub frames: Vec<MediaFrame>,
    /// Length of one pass (end of its latest frame): the offset added per loop.
    pub pass_len_us: u64,
    /// Payload bytes of all frames.
    pub bytes: u64,
}

impl Clip {
    /// Demuxes `path` to the end (blocking).
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let mut demuxer = Demuxer::open(path)?;
        let mut frames = Vec::new();
        let mut bytes = 0u64;
        while let Some(frame) = demuxer.next_frame()? {
            bytes += frame.data.len() as u64;
            if bytes > MAX_CLIP_BYTES {
                bail!(
                    "{} holds more than {} MiB of media: too large to replay from memory with                      --sessions",
                    path.display(),
                    MAX_CLIP_BYTES >> 20
                );
            }
            frames.push(frame);
        }
        if frames.is_empty() {
            bail!("{} has no H264 or Opus frames", path.display());
        }
        Ok(Self {
            info: demuxer.info(),
            frames,
            pass_len_us: demuxer.end_us.max(0).unsigned_abs(),
            bytes,
        })
    }
}

impl Clip {
    /// The main file, and the video of each simulcast layer's file as
    /// layers 1, 2, …, merged in sending order.
    pub fn load_simulcast(main: &Path, layers: &[(String, PathBuf)]) -> anyhow::Result<Self> {
        let mut clip = Self::load(main)?;
        if clip.info.video_codec != Codec::H264 || !clip.info.video {
            bail!("--simulcast needs H264 video in {}", main.display());
        }
        for (n, (rid, path)) in layers.iter().enumerate() {
            let layer = Self::load(path)?;
            if layer.info.video_codec != Codec::H264 || !layer.info.video {
                bail!("simulcast layer {rid}: no H264 video in {}", path.display());
            }
            let number = u8::try_from(n + 1).context("too many simulcast layers")?;
            clip.bytes += layer.bytes;
            clip.pass_len_us = clip.pass_len_us.max(layer.pass_len_us);
            clip.frames.extend(
                layer
                    .frames
                    .into_iter()
                    .filter(|f| f.kind == FrameKind::Video)
                    .map(|f| MediaFrame { layer: number, ..f }),
            );
        }
        clip.frames.sort_by_key(|f| f.send_at);
        Ok(clip)
    }
}

/// A session's position in a shared [`Clip`]; looping shifts timestamps by one pass each time,
/// as [`Demuxer::restart`] does.
struct ClipCursor {
    clip: Arc<Clip>,
    index: usize,
    pass: u64,
    loop_: bool,
}

impl ClipCursor {
    fn new(clip: Arc<Clip>, loop_: bool) -> Self {
        Self {
            clip,
            index: 0,
            pass: 0,
            loop_,
        }
    }

    fn next(&mut self) -> Option<MediaFrame> {
        if self.index >= self.clip.frames.len() {
            if !self.loop_ || self.clip.frames.is_empty() {
                return None;
            }
            self.index = 0;
            self.pass += 1;
        }
        let f = &self.clip.frames[self.index];
        self.index += 1;
        let offset_us = self.clip.pass_len_us.saturating_mul(self.pass);
        Some(MediaFrame {
            kind: f.kind,
            key: f.key,
            send_at: f.send_at + Duration::from_micros(offset_us),
            pts_us: f.pts_us.saturating_add(offset_us),
            data: f.data.clone(),
            pass: self.pass,
            layer: f.layer,
        })
    }
}

struct StreamSel {
    index: usize,
    kind: FrameKind,
    time_base: (i64, i64),
    /// Packet duration to assume when the container gives none, in µs.
    default_duration_us: i64,
}

/// Reads H264 and Opus packets from a file and turns them into [`MediaFrame`]s.
pub struct Demuxer {
    path: PathBuf,
    input: ffmpeg::format::context::Input,
    streams: Vec<StreamSel>,
    video: VideoPackets,
    info: MediaInfo,
    /// First packet's time of the current pass, in µs of the file's timeline.
    origin_us: Option<i64>,
    /// When the previous video frame is sent (µs, as `send_at`).
    last_video_send_us: Option<i64>,
    /// Offset of the current pass on the output timeline (µs).
    pass_offset_us: i64,
    /// End of the latest frame on the output timeline (µs).
    end_us: i64,
    loops: u64,
}

impl Demuxer {
    /// Opens `path` and picks the best H264 video stream and the best Opus audio stream.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let (input, streams, video, info) = open_input(path)?;
        Ok(Self {
            path: path.to_owned(),
            input,
            streams,
            video,
            info,
            origin_us: None,
            last_video_send_us: None,
            pass_offset_us: 0,
            end_us: 0,
            loops: 0,
        })
    }

    pub fn info(&self) -> MediaInfo {
        self.info
    }

    /// How many times the file was restarted.
    pub fn loops(&self) -> u64 {
        self.loops
    }

    /// Restarts from the beginning; timestamps continue after the last frame.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        let (input, streams, video, _) = open_input(&self.path)?;
        self.input = input;
        self.streams = streams;
        if let (VideoPackets::H264(old), VideoPackets::H264(new)) = (&mut self.video, video) {
            // Keep the parameter sets learnt so far only if the new pass brings none.
            if !new.params.sps.is_empty() {
                *old = new;
            }
        }
        self.origin_us = None;
        self.last_video_send_us = None;
        self.pass_offset_us = self.end_us;
        self.loops += 1;
        Ok(())
    }

    /// The next frame in file order, `None` at the end of the file.
    pub fn next_frame(&mut self) -> anyhow::Result<Option<MediaFrame>> {
        loop {
            let mut packet = ffmpeg::Packet::empty();
            match packet.read(&mut self.input) {
                Ok(()) => {}
                Err(ffmpeg::Error::Eof) => return Ok(None),
                Err(e) => return Err(anyhow!("reading {}: {e}", self.path.display())),
            }
            let Some(sel) = self.streams.iter().find(|s| s.index == packet.stream()) else {
                continue;
            };
            let Some(data) = packet.data().filter(|d| !d.is_empty()) else {
                continue;
            };
            let Some(pts) = packet.pts().or(packet.dts()) else {
                debug!("skipping a packet without timestamps");
                continue;
            };
            let dts = packet.dts().unwrap_or(pts);
            let to_us = |v: i64| rescale_signed(v, sel.time_base);
            let (pts_us, dts_us) = (to_us(pts), to_us(dts));
            let origin = *self.origin_us.get_or_insert(dts_us.min(pts_us));
            let duration_us = match to_us(packet.duration()) {
                d if d > 0 => d,
                _ => sel.default_duration_us,
            };

            let kind = sel.kind;
            let (key, data) = match kind {
                FrameKind::Video => match &mut self.video {
                    VideoPackets::H264(conv) => match conv.convert(data, packet.is_key()) {
                        Ok(au) => au,
                        Err(e) => {
                            warn!("skipping a bad H264 packet: {e}");
                            continue;
                        }
                    },
                    VideoPackets::Av1 { sequence_header } => (
                        packet.is_key(),
                        av1_temporal_unit(data, packet.is_key(), sequence_header),
                    ),
                    VideoPackets::AsIs => (packet.is_key(), data.to_vec()),
                },
                FrameKind::Audio => (false, data.to_vec()),
            };
            if data.is_empty() {
                continue;
            }
            let pass = self.pass_offset_us;
            let pts_out = (pts_us - origin).max(0).saturating_add(pass);
            let mut send_out = (dts_us - origin).max(0).saturating_add(pass);
            if kind == FrameKind::Video {
                // Matroska leaves the DTS of the first frames unset; falling
                // back to their PTS would hold back a reordered frame (and
                // the audio queued behind it) by the reorder delay. Send it
                // right after the previous frame instead.
                if packet.dts().is_none()
                    && let Some(last) = self.last_video_send_us
                {
                    send_out = last;
                }
                self.last_video_send_us = Some(send_out);
            }
            self.end_us = self.end_us.max(pts_out.saturating_add(duration_us));
            return Ok(Some(MediaFrame {
                kind,
                key,
                send_at: Duration::from_micros(send_out.max(0).unsigned_abs()),
                pts_us: pts_out.max(0).unsigned_abs(),
                data: data.into(),
                pass: self.loops,
                layer: 0,
            }));
        }
    }

    /// Sends every frame into `tx` (blocking), looping when asked. Returns when the file ends
    /// (without loop) or the receiver is gone.
    pub fn pump(&mut self, tx: &mpsc::Sender<MediaFrame>, loop_: bool) -> anyhow::Result<()> {
        let mut sent_this_pass = 0u64;
        loop {
            match self.next_frame()? {
                Some(frame) => {
                    sent_this_pass += 1;
                    if tx.blocking_send(frame).is_err() {
                        return Ok(());
                    }
                }
                None if loop_ && sent_this_pass > 0 => {
                    info!("end of file, starting over (pass {})", self.loops() + 2);
                    self.restart()?;
                    sent_this_pass = 0;
                }
                None => return Ok(()),
            }
        }
    }
}

type Opened = (
    ffmpeg::format::context::Input,
    Vec<StreamSel>,
    VideoPackets,
    MediaInfo,
);

/// How the video's packets become the frames sent.
enum VideoPackets {
    /// AVCC or Annex B to Annex B with parameter sets on keyframes.
    H264(H264ToAnnexB),
    /// Temporal units; keyframes get the sequence header OBU of the
    /// stream's `av1C` in front when the container left it out.
    Av1 { sequence_header: Vec<u8> },
    /// VP8, VP9: each packet is one frame, sent as it is.
    AsIs,
}

/// An AV1 temporal unit to send. A keyframe must carry the sequence header
/// OBU: str0m's packetizer marks a new coded video sequence on it, and a
/// receiver can only start decoding there.
fn av1_temporal_unit(data: &[u8], key: bool, sequence_header: &[u8]) -> Vec<u8> {
    let has_header =
        av1::obus(data).is_some_and(|obus| obus.iter().any(|o| o.kind == av1::OBU_SEQUENCE_HEADER));
    if key && !has_header {
        [sequence_header, data].concat()
    } else {
        data.to_vec()
    }
}

/// The sequence header OBU among an `av1C` record's configOBUs.
fn av1c_sequence_header(av1c: &[u8]) -> Vec<u8> {
    av1c.get(4..)
        .and_then(av1::obus)
        .and_then(|obus| {
            obus.into_iter()
                .find(|o| o.kind == av1::OBU_SEQUENCE_HEADER)
        })
        .map(|o| o.bytes.to_vec())
        .unwrap_or_default()
}

fn open_input(path: &Path) -> anyhow::Result<Opened> {
    // ffmpeg-next panics on paths that are not UTF-8 or contain NUL; check first.
    match path.to_str() {
        Some(s) if !s.contains('\0') => {}
        _ => bail!("file name {} is not valid UTF-8", path.display()),
    }
    if !path.is_file() {
        bail!("{} is not a readable file", path.display());
    }
    ffmpeg::init().map_err(|e| anyhow!("initialising FFmpeg: {e}"))?;
    let input =
        ffmpeg::format::input(path).map_err(|e| anyhow!("cannot open {}: {e}", path.display()))?;

    let mut streams = Vec::new();
    let mut video = VideoPackets::AsIs;
    let mut info = MediaInfo {
        video: false,
        audio: false,
        h264_profile: None,
        video_codec: Codec::H264,
    };
    for stream in input.streams() {
        let params = stream.parameters();
        let tb = stream.time_base();
        let time_base = (
            i64::from(tb.numerator()),
            i64::from(tb.denominator()).max(1),
        );
        match (params.medium(), params.id()) {
            (
                ffmpeg::media::Type::Video,
                id @ (ffmpeg::codec::Id::H264
                | ffmpeg::codec::Id::VP8
                | ffmpeg::codec::Id::VP9
                | ffmpeg::codec::Id::AV1),
            ) if !info.video => {
                (info.video_codec, video) = match id {
                    ffmpeg::codec::Id::H264 => {
                        let conv = H264ToAnnexB::new(extradata(&params))
                            .with_context(|| format!("H264 stream #{}", stream.index()))?;
                        info.h264_profile = conv.profile();
                        (Codec::H264, VideoPackets::H264(conv))
                    }
                    ffmpeg::codec::Id::AV1 => {
                        let sequence_header = av1c_sequence_header(&extradata(&params));
                        (Codec::Av1, VideoPackets::Av1 { sequence_header })
                    }
                    ffmpeg::codec::Id::VP9 => (Codec::Vp9, VideoPackets::AsIs),
                    _ => (Codec::Vp8, VideoPackets::AsIs),
                };
                info.video = true;
                let rate = stream.avg_frame_rate();
                let default_duration_us = if rate.numerator() > 0 && rate.denominator() > 0 {
                    1_000_000 * i64::from(rate.denominator()) / i64::from(rate.numerator())
                } else {
                    33_333
                };
                streams.push(StreamSel {
                    index: stream.index(),
                    kind: FrameKind::Video,
                    time_base,
                    default_duration_us,
                });
            }
            (ffmpeg::media::Type::Audio, ffmpeg::codec::Id::OPUS) if !info.audio => {
                info.audio = true;
                streams.push(StreamSel {
                    index: stream.index(),
                    kind: FrameKind::Audio,
                    time_base,
                    default_duration_us: 20_000,
                });
            }
            (ffmpeg::media::Type::Video | ffmpeg::media::Type::Audio, id) => {
                warn!(
                    "ignoring {:?} stream #{} ({id:?}): publish sends one H264, VP8, VP9 or AV1 \
                     and one Opus stream without re-encoding",
                    params.medium(),
                    stream.index()
                );
            }
            _ => {}
        }
    }
    if streams.is_empty() {
        bail!(
            "{} has neither H264, VP8, VP9 or AV1 video nor Opus audio (publish does not \
             re-encode)",
            path.display()
        );
    }
    Ok((input, streams, video, info))
}

fn extradata(params: &ffmpeg::codec::Parameters) -> Vec<u8> {
    // SAFETY: `params` wraps a valid AVCodecParameters for as long as it lives; FFmpeg keeps
    // `extradata` either null or pointing at `extradata_size` readable bytes.
    unsafe {
        let p = params.as_ptr();
        if p.is_null() || (*p).extradata.is_null() || (*p).extradata_size <= 0 {
            return Vec::new();
        }
        let len = usize::try_from((*p).extradata_size).unwrap_or(0);
        std::slice::from_raw_parts((*p).extradata, len).to_vec()
    }
}

fn rescale_signed(v: i64, (num, den): (i64, i64)) -> i64 {
    let r = i128::from(v) * i128::from(num) * 1_000_000 / i128::from(den.max(1));
    i64::try_from(r).unwrap_or(if r < 0 { i64::MIN } else { i64::MAX })
}

// ---------------------------------------------------------------------------------------------
// H264: AVCC (length-prefixed, avcC extradata) or Annex B in, Annex B with SPS/PPS on keyframes out

const START_CODE: [u8; 4] = [0, 0, 0, 1];
const NAL_IDR: u8 = 5;
const NAL_SPS: u8 = 7;
const NAL_PPS: u8 = 8;
const NAL_AUD: u8 = 9;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct ParamSets {
    sps: Vec<Vec<u8>>,
    pps: Vec<Vec<u8>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// Each NAL unit prefixed by its big-endian length of this many bytes.
    Avcc(usize),
    AnnexB,
}

/// Rewrites H264 packets to Annex B and puts SPS/PPS in front of keyframes.
#[derive(Debug, Clone)]
struct H264ToAnnexB {
    layout: Layout,
    params: ParamSets,
}

impl H264ToAnnexB {
    /// From the stream's extradata: an avcC record (MP4/MKV), Annex B parameter sets, or
    /// nothing (then packets must be Annex B with in-band SPS/PPS).
    fn new(extradata: Vec<u8>) -> anyhow::Result<Self> {
        if extradata.first() == Some(&1) {
            let (len_size, params) = parse_avcc(&extradata)?;
            return Ok(Self {
                layout: Layout::Avcc(len_size),
                params,
            });
        }
        let mut params = ParamSets::default();
        for nal in annexb_nal_units(&extradata) {
            match nal_type(nal) {
                NAL_SPS => params.sps.push(nal.to_vec()),
                NAL_PPS => params.pps.push(nal.to_vec()),
                _ => {}
            }
        }
        Ok(Self {
            layout: Layout::AnnexB,
            params,
        })
    }

    fn profile(&self) -> Option<u32> {
        let sps = self.params.sps.first()?;
        let b = sps.get(1..4)?;
        Some(u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]))
    }

    /// One packet (access unit) to Annex B. Returns (is keyframe, data).
    fn convert(&mut self, data: &[u8], key_flag: bool) -> anyhow::Result<(bool, Vec<u8>)> {
        let nals = match self.layout {
            Layout::Avcc(n) => avcc_nal_units(data, n)?,
            Layout::AnnexB => annexb_nal_units(data),
        };
        let mut inband = ParamSets::default();
        let mut idr = false;
        for nal in &nals {
            match nal_type(nal) {
                NAL_SPS => inband.sps.push(nal.to_vec()),
                NAL_PPS => inband.pps.push(nal.to_vec()),
                NAL_IDR => idr = true,
                _ => {}
            }
        }
        let has_inband = !inband.sps.is_empty() && !inband.pps.is_empty();
        if has_inband {
            self.params = inband;
        }
        let key = key_flag || idr;

        let size: usize = nals.iter().map(|n| n.len() + 4).sum();
        let mut out = Vec::with_capacity(size + 64);
        if key && !has_inband {
            for nal in self.params.sps.iter().chain(&self.params.pps) {
                out.extend_from_slice(&START_CODE);
                out.extend_from_slice(nal);
            }
        }
        for nal in nals {
            if nal_type(nal) == NAL_AUD {
                continue;
            }
            out.extend_from_slice(&START_CODE);
            out.extend_from_slice(nal);
        }
        Ok((key, out))
    }
}

fn nal_type(nal: &[u8]) -> u8 {
    nal.first().map_or(0, |b| b & 0x1f)
}

/// Parses an AVCDecoderConfigurationRecord (ISO/IEC 14496-15 5.3.3.1).
fn parse_avcc(data: &[u8]) -> anyhow::Result<(usize, ParamSets)> {
    let mut r = Reader(data);
    let version = r.u8()?;
    if version != 1 {
        bail!("avcC version {version} is not 1");
    }
    r.take(3)?; // profile, compatibility, level
    let len_size = usize::from(r.u8()? & 0x03) + 1;
    if len_size == 3 {
        bail!("avcC NAL length size 3 is invalid");
    }
    let mut params = ParamSets::default();
    let num_sps = r.u8()? & 0x1f;
    for _ in 0..num_sps {
        let len = usize::from(r.u16()?);
        params.sps.push(r.take(len)?.to_vec());
    }
    let num_pps = r.u8()?;
    for _ in 0..num_pps {
        let len = usize::from(r.u16()?);
        params.pps.push(r.take(len)?.to_vec());
    }
    if params.sps.is_empty() || params.pps.is_empty() {
        bail!("avcC has no SPS or no PPS");
    }
    Ok((len_size, params))
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> anyhow::Result<&'a [u8]> {
        if self.0.len() < n {
            bail!("truncated H264 data");
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn u8(&mut self) -> anyhow::Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> anyhow::Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
}

/// Splits length-prefixed NAL units.
fn avcc_nal_units(data: &[u8], len_size: usize) -> anyhow::Result<Vec<&[u8]>> {
    let mut r = Reader(data);
    let mut nals = Vec::new();
    while !r.0.is_empty() {
        let len = r
            .take(len_size)?
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        let nal = r.take(len)?;
        if !nal.is_empty() {
            nals.push(nal);
        }
    }
    Ok(nals)
}

/// Splits an Annex B byte stream at its start codes (3 or 4 bytes).
fn annexb_nal_units(data: &[u8]) -> Vec<&[u8]> {
    let mut nals = Vec::new();
    let mut start: Option<usize> = None;
    let mut i = 0;
    while i + 3 <= data.len() {
        if data[i] == 0 && data[i + 1] == 0 && data[i + 2] == 1 {
            if let Some(s) = start {
                nals.push(trim_trailing_zeros(&data[s..i]));
            }
            i += 3;
            start = Some(i);
        } else {
            i += 1;
        }
    }
    if let Some(s) = start {
        nals.push(trim_trailing_zeros(&data[s..]));
    }
    nals.retain(|n| !n.is_empty());
    nals
}

fn trim_trailing_zeros(nal: &[u8]) -> &[u8] {
    let end = nal.iter().rposition(|b| *b != 0).map_or(0, |p| p + 1);
    &nal[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("samples/sample.mkv")
    }

    fn sample_path() -> PathBuf {
        // The scratch crate lives outside the repo; the sample sits next to this file's crate.
        let p = sample();
        if p.exists() {
            p
        } else {
            Path::new(file!())
                .parent()
                .and_then(Path::parent)
                .map(|d| d.join("samples/sample.mkv"))
                .unwrap_or(p)
        }
    }

    #[test]
    fn avcc_record_parses() {
        let rec = [
            1, 0x42, 0xc0, 0x1f, 0xff, 0xe1, 0, 4, 0x67, 0x42, 0xc0, 0x1f, 1, 0, 2, 0x68, 0xce,
        ];
        let (len, ps) = parse_avcc(&rec).unwrap();
        assert_eq!(len, 4);
        assert_eq!(ps.sps, vec![vec![0x67, 0x42, 0xc0, 0x1f]]);
        assert_eq!(ps.pps, vec![vec![0x68, 0xce]]);
        assert!(parse_avcc(&rec[..10]).is_err());
        assert!(parse_avcc(&[]).is_err());
        assert!(parse_avcc(&[2, 0, 0, 0, 0xff, 0xe1]).is_err());
    }

    #[test]
    fn avcc_to_annexb_with_params_on_keyframes() {
        let rec = [
            1, 0x42, 0xc0, 0x1f, 0xff, 0xe1, 0, 4, 0x67, 0x42, 0xc0, 0x1f, 1, 0, 2, 0x68, 0xce,
        ];
        let mut c = H264ToAnnexB::new(rec.to_vec()).unwrap();
        assert_eq!(c.profile(), Some(0x42c01f));
        let (key, out) = c.convert(&[0, 0, 0, 3, 0x65, 0xaa, 0xbb], true).unwrap();
        assert!(key);
        assert_eq!(
            out,
            [
                0, 0, 0, 1, 0x67, 0x42, 0xc0, 0x1f, 0, 0, 0, 1, 0x68, 0xce, 0, 0, 0, 1, 0x65, 0xaa,
                0xbb
            ]
        );
        let (key, out) = c.convert(&[0, 0, 0, 2, 0x41, 0xcc], false).unwrap();
        assert!(!key);
        assert_eq!(out, [0, 0, 0, 1, 0x41, 0xcc]);
        // Truncated length prefix or body: an error, not a panic.
        assert!(c.convert(&[0, 0, 0, 9, 0x41], false).is_err());
        assert!(c.convert(&[0, 0], false).is_err());
    }

    #[test]
    fn annexb_split() {
        let data = [
            0, 0, 0, 1, 0x67, 1, 0, 0, 1, 0x68, 2, 0, 0, 0, 0, 1, 0x65, 3,
        ];
        let nals = annexb_nal_units(&data);
        assert_eq!(nals, vec![&[0x67, 1][..], &[0x68, 2][..], &[0x65, 3][..]]);
        assert!(annexb_nal_units(&[0, 0]).is_empty());
        let mut c = H264ToAnnexB::new(Vec::new()).unwrap();
        let (key, out) = c.convert(&data, false).unwrap();
        assert!(key);
        assert_eq!(
            out,
            [
                0, 0, 0, 1, 0x67, 1, 0, 0, 0, 1, 0x68, 2, 0, 0, 0, 1, 0x65, 3
            ]
        );
    }

    #[test]
    fn candidate_lines() {
        let sdp = "v=0\r\na=candidate:1 1 UDP 2130706431 192.0.2.7 5000 typ host\r\n\
                   a=candidate:2 1 tcp 1 192.0.2.8 9 typ host tcptype passive\r\n\
                   a=candidate:3 1 udp 1 abc.local 5000 typ host\r\n\
                   a=candidate:4 1 udp 1 192.0.2.7 5002 typ host\r\n";
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // UDP and TCP addresses, once each; mDNS names skipped.
        assert_eq!(
            remote_candidate_ips(sdp),
            vec![ip("192.0.2.7"), ip("192.0.2.8")]
        );
    }

    #[test]
    fn rescale_clocks() {
        assert_eq!(rescale(1_000_000, 90_000), 90_000);
        assert_eq!(rescale(20_000, 48_000), 960);
        assert_eq!(rescale(33_333, 90_000), 3000);
        assert_eq!(rescale_signed(40, (1, 1000)), 40_000);
        assert_eq!(rescale_signed(-7, (1, 1000)), -7_000);
    }

    #[test]
    fn sample_demuxes_to_annexb() {
        let mut d = Demuxer::open(&sample_path()).unwrap();
        let info = d.info();
        assert!(info.video && info.audio);
        assert_eq!(info.h264_profile.map(|p| p >> 16), Some(0x42));

        let mut video = Vec::new();
        let mut audio = Vec::new();
        while let Some(f) = d.next_frame().unwrap() {
            match f.kind {
                FrameKind::Video => video.push(f),
                FrameKind::Audio => audio.push(f),
            }
        }
        assert_eq!(video.len(), 300);
        assert!((499..=502).contains(&audio.len()), "{}", audio.len());
        for (i, f) in video.iter().enumerate() {
            assert_eq!(f.key, i % 30 == 0, "frame {i}");
            let nals = annexb_nal_units(&f.data);
            assert!(f.data.starts_with(&START_CODE));
            if f.key {
                assert_eq!(nal_type(nals[0]), NAL_SPS);
                assert_eq!(nal_type(nals[1]), NAL_PPS);
                assert!(nals.iter().any(|n| nal_type(n) == NAL_IDR));
            } else {
                assert!(nals.iter().all(|n| nal_type(n) != NAL_SPS));
            }
        }
        // Pacing: 30 fps video and 20 ms audio on one timeline starting at 0.
        let first = video.first().unwrap().send_at.min(audio[0].send_at);
        assert_eq!(first, Duration::ZERO);
        let last = video.last().unwrap().send_at;
        assert!(
            last > Duration::from_millis(9900) && last < Duration::from_millis(10_050),
            "{last:?}"
        );
        for w in video.windows(2) {
            let gap = w[1].send_at - w[0].send_at;
            assert!(gap >= Duration::from_millis(32) && gap <= Duration::from_millis(35));
        }
        for w in audio.windows(2).skip(1) {
            assert_eq!(w[1].pts_us - w[0].pts_us, 20_000);
        }
    }

    #[test]
    fn sample_loops_forward() {
        let mut d = Demuxer::open(&sample_path()).unwrap();
        let mut last_first_pass = Duration::ZERO;
        while let Some(f) = d.next_frame().unwrap() {
            last_first_pass = last_first_pass.max(f.send_at);
        }
        d.restart().unwrap();
        assert_eq!(d.loops(), 1);
        let f = d.next_frame().unwrap().unwrap();
        assert!(f.send_at > last_first_pass, "{:?}", f.send_at);
        assert!(f.send_at < last_first_pass + Duration::from_millis(60));
    }

    #[test]
    fn clip_replays_like_the_demuxer() {
        let clip = Arc::new(Clip::load(&sample_path()).unwrap());
        let mut d = Demuxer::open(&sample_path()).unwrap();
        let mut cursor = ClipCursor::new(clip.clone(), true);
        for pass in 0..2 {
            while let Some(want) = d.next_frame().unwrap() {
                let got = cursor.next().unwrap();
                assert_eq!(
                    (got.send_at, got.pts_us, got.pass),
                    (want.send_at, want.pts_us, pass)
                );
                assert_eq!(
                    (got.kind, got.key, &got.data),
                    (want.kind, want.key, &want.data)
                );
            }
            d.restart().unwrap();
        }
        let mut once = ClipCursor::new(clip.clone(), false);
        assert_eq!(
            std::iter::from_fn(|| once.next()).count(),
            clip.frames.len()
        );
    }

    #[test]
    fn summary_figures() {
        let mut ms: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentiles(&mut ms, &[50, 99]), "n=100 p50=50.0 p99=99.0");
        assert_eq!(percentiles(&mut [], &[50]), "n=0");
        assert_eq!(
            session_url("http://h/whip/s{n}?a={n}", 7),
            "http://h/whip/s7?a=7"
        );
        let e = Failure::err(FailureKind::HttpStatus(503), "busy".into()).context("POST");
        assert_eq!(failure_kind(&e), "http_503");
        assert_eq!(failure_kind(&anyhow!("x")), "other");
    }

    #[test]
    fn av1_keyframes_get_the_sequence_header() {
        let seq = [0x0a, 0x03, 0x00, 0x00, 0x00];
        // av1C: marker/version, profile/level, flags, delay; then configOBUs.
        let av1c = [&[0x81, 0x00, 0x0c, 0x00][..], &seq].concat();
        assert_eq!(av1c_sequence_header(&av1c), seq);
        assert!(av1c_sequence_header(&av1c[..4]).is_empty());
        assert!(av1c_sequence_header(&[0x81, 0, 0, 0, 0x80]).is_empty());
        let frame = [0x32, 0x02, 0x10, 0xaa];
        let with = [&seq[..], &frame].concat();
        assert_eq!(av1_temporal_unit(&frame, true, &seq), with);
        // Already there, or not a keyframe: as it is.
        assert_eq!(av1_temporal_unit(&with, true, &seq), with);
        assert_eq!(av1_temporal_unit(&frame, false, &seq), frame);
    }

    #[test]
    fn bad_files_are_errors() {
        assert!(Demuxer::open(Path::new("/nonexistent/file.mkv")).is_err());
        let dir = std::env::temp_dir().join(format!("whipgate-publish-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk.mkv");
        std::fs::write(&junk, b"this is not a media file").unwrap();
        assert!(Demuxer::open(&junk).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
