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
//! With `--stack lean` (the default for `--sessions` above 1 with H264/Opus files) a session
//! is `lean::LeanSession` instead: str0m's ICE agent and DTLS, but its own RTP packetizing and
//! SRTP, at a fraction of the CPU per packet.
//!
//! Files: `whip.rs` (HTTP signalling), `candidates.rs` (local addresses as ICE candidates),
//! `driver.rs` (a session's str0m `Rtc`, socket and pacing), `source.rs` (demuxing, the shared
//! clip), `annexb.rs` (H264 to Annex B), `load.rs` (`--sessions`: many sessions and their
//! figures), `lean/` (the lean sender).
//!
//! Use from code (tests):
//! ```text
//! let opts = PublishOptions::new("samples/sample.mkv", "http://127.0.0.1:8080/whip/test");
//! let stats = publish(opts, tokio::time::sleep(Duration::from_secs(3))).await?;
//! ```

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use str0m::RtcConfig;
use str0m::format::Codec;
use str0m::media::{Direction, MediaKind, Simulcast, SimulcastLayer};
use tokio::net::UdpSocket;
use tracing::{debug, info, warn};
use url::Url;

use crate::rtc::tcp::TcpLinks;
use candidates::{LocalAddrs, add_host_candidate};
use driver::{Driver, Track};
use load::{Live, run_many};
use source::{Clip, Demuxer, MediaInfo};
use whip::{
    Signalling, accept_answer, delete_session, post_offer, remote_candidate_ips, resolve_host,
};

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

mod annexb;
mod candidates;
mod driver;
mod lean;
mod load;
mod source;
mod whip;

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
    /// The WebRTC sender of each session: `str0m` (a full endpoint: NACK retransmissions,
    /// congestion control, every codec), `lean` (H264 and Opus over UDP, no retransmissions:
    /// a fraction of the CPU per packet, for load runs) or `auto`: `lean` for more than one
    /// session when the file and options allow it, else `str0m`.
    #[arg(long, value_enum, default_value_t = Stack::Auto)]
    pub stack: Stack,
}

/// Which WebRTC sender a session uses (`--stack`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Stack {
    #[default]
    Auto,
    Str0m,
    Lean,
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
    /// The WebRTC sender.
    pub stack: Stack,
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
            stack: Stack::Auto,
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
    opts.stack = args.stack;
    if args.sessions > 1 || opts.stack == Stack::Lean {
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
            .set_crypto_provider(Arc::clone(crate::rtc::crypto::provider()))
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
            live.answered(setup);
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
