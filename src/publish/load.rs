//! `--sessions N`: many sessions from one process, and the figures they share (a load
//! generator).

use std::collections::BTreeMap;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::sync::watch;
use tracing::{Instrument, info, warn};

use super::lean::{self, LeanSession};
use super::source::Clip;
use super::{
    PublishOptions, PublishStats, Session, Source, Stack, http_client, parse_whip_url, session_url,
    termination_signal,
};

/// Progress of every session of a run, shared by them (counters are updated as they go).
#[derive(Default)]
pub(super) struct Live {
    pub(super) started: AtomicU64,
    up: AtomicU64,
    failed: AtomicU64,
    packets: AtomicU64,
    bytes: AtomicU64,
    post_to_201: Mutex<Vec<Duration>>,
    post_to_media: Mutex<Vec<Duration>>,
    errors: Mutex<BTreeMap<String, u64>>,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Live {
    /// A session's POST was answered after `setup`.
    pub(super) fn answered(&self, setup: Duration) {
        lock(&self.post_to_201).push(setup);
    }

    /// A session's first frame went out `post_to_media` after its POST: it is up.
    pub(super) fn media_flowing(&self, post_to_media: Duration) {
        lock(&self.post_to_media).push(post_to_media);
        self.up.fetch_add(1, Ordering::Relaxed);
    }

    /// Datagrams sent.
    pub(super) fn sent(&self, packets: u64, bytes: u64) {
        self.packets.fetch_add(packets, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(super) fn failed(&self, e: &anyhow::Error) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        *lock(&self.errors).entry(failure_kind(e)).or_default() += 1;
    }

    /// The report: one `key: name=value ...` line per figure (parsed by scripts/bench.sh).
    pub(super) fn summary(&self, total: u32, elapsed: Duration) -> String {
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
pub(super) enum FailureKind {
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
pub(super) struct Failure {
    kind: FailureKind,
    message: String,
}

impl Failure {
    pub(super) fn err(kind: FailureKind, message: String) -> anyhow::Error {
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
pub(super) async fn run_many(
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
    let lean = match opts.stack {
        Stack::Str0m => false,
        Stack::Auto => lean::supports(&clip.info, &opts),
        Stack::Lean if lean::supports(&clip.info, &opts) => true,
        Stack::Lean => bail!(
            "--stack lean sends H264 and Opus over UDP, without --ice-tcp, \
             --ice-restart-after or --simulcast"
        ),
    };
    info!(
        "sessions use the {} sender",
        if lean { "lean" } else { "str0m" }
    );
    let http = http_client()?;
    let pacers = lean::Pacers::start(sessions);
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
        let pacers = pacers.clone();
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
                let mut stats = PublishStats::default();
                let result = if lean {
                    let session = LeanSession {
                        opts: &opts,
                        url: &url,
                        http: &http,
                        live: Some(live.clone()),
                        pacers: &pacers,
                    };
                    session.run(clip, shutdown, &mut stats).await
                } else {
                    let session = Session {
                        opts: &opts,
                        url: &url,
                        http: &http,
                        info: clip.info,
                        verbose: false,
                        live: Some(live.clone()),
                    };
                    session.run(Source::Clip(clip), shutdown, &mut stats).await
                };
                if let Err(e) = result {
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

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::anyhow;

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
}
