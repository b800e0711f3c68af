//! RTMP/RTMPS push against a real nginx-rtmp that records what it receives.
//!
//! The hub is fed in-process, in real time, with the sample's frames: its
//! H264 as Annex B (split into access units by `H264Assembler`, the code the
//! WebRTC ingest uses) and its audio encoded to AAC by the ffmpeg CLI (ADTS
//! stripped). The recordings are then checked with ffprobe and a full
//! ffmpeg decode.

mod support;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use tokio::sync::watch;
use whipgate::hub::{Hub, Publication};
use whipgate::media::frame::{Codec, CodecParams, Frame};
use whipgate::rtmp::push::{self, PushHandle, PushOptions, PushState, PushStats};
use whipgate::rtmp::target::Target;

use support::nginx::{Nginx, check_recording};
use support::sample_frames::load_sample_frames;
use support::server::{ffmpeg_decode_errors, ffprobe_streams, wait_for};

/// The sample's frames on the stream timeline, in time order.
struct Media {
    frames: Vec<Frame>,
}

static MEDIA: OnceLock<Result<Arc<Media>, String>> = OnceLock::new();

fn media() -> anyhow::Result<Arc<Media>> {
    MEDIA
        .get_or_init(|| {
            load_sample_frames()
                .map(|frames| Arc::new(Media { frames }))
                .map_err(|e| format!("{e:#}"))
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// A stream with an in-process publisher.
struct Stream {
    hub: Arc<Hub>,
    keyframe_requests: Arc<AtomicUsize>,
    shutdown: watch::Sender<bool>,
}

const PUBLICATION: Publication = Publication {
    id: 7,
    video: true,
    audio: true,
};

impl Stream {
    fn new(name: &str) -> Self {
        Stream {
            hub: Hub::new(name),
            keyframe_requests: Arc::new(AtomicUsize::new(0)),
            shutdown: watch::channel(false).0,
        }
    }

    fn push(&self, url: &str, ca_file: Option<PathBuf>) -> anyhow::Result<PushHandle> {
        let target = Target::parse(url)?;
        let options = PushOptions {
            ca_file,
            ..Default::default()
        };
        Ok(push::spawn(
            self.hub.clone(),
            target,
            options,
            self.shutdown.subscribe(),
        ))
    }

    fn start(&self) {
        let asked = self.keyframe_requests.clone();
        self.hub.start(
            PUBLICATION,
            Box::new(move || {
                asked.fetch_add(1, Ordering::Relaxed);
            }),
        );
    }

    /// Publishes the frames in `[from, to)` seconds in real time, calling
    /// `at` (once) when `at_secs` of media is reached.
    async fn play(&self, from: f64, to: f64) {
        let media = media().expect("sample media");
        let first = (from * 90_000.0) as i64;
        let last = (to * 90_000.0) as i64;
        let began = tokio::time::Instant::now();
        for f in media
            .frames
            .iter()
            .filter(|f| f.dts >= first && f.dts < last)
        {
            let due = Duration::from_secs_f64((f.dts - first) as f64 / 90_000.0);
            tokio::time::sleep_until(began + due).await;
            self.hub.publish(PUBLICATION, f.clone());
        }
    }

    fn stop(&self) {
        self.hub.stop(PUBLICATION.id);
    }
}

/// Waits until the push has ended the publication (state Idle again).
async fn ended(handle: &PushHandle) -> anyhow::Result<PushStats> {
    wait_for("the push to end", Duration::from_secs(10), || {
        let s = handle.stats();
        (s.state == PushState::Idle).then_some(s)
    })
    .await
}

async fn publishing(handle: &PushHandle, within: Duration) -> anyhow::Result<()> {
    wait_for("the push to publish", within, || {
        (handle.stats().state == PushState::Publishing).then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_records_a_clean_h264_aac_stream() -> anyhow::Result<()> {
    let nginx = Nginx::start(false)?;
    let stream = Stream::new("a");
    let handle = stream.push(&nginx.rtmp_url("keyA"), None)?;
    assert_eq!(handle.stats().state, PushState::Idle);
    assert!(!handle.stats().url_masked.contains("keyA"));
    stream.start();
    stream.play(0.0, 6.0).await;
    stream.stop();
    let stats = ended(&handle).await?;
    assert!(stats.frames_sent > 300, "{stats:?}");
    assert!(stats.bytes_sent > 100_000, "{stats:?}");
    assert_eq!(stats.frames_dropped, 0, "{stats:?}");
    assert_eq!(stats.reconnects, 0, "{stats:?}");
    assert!(stream.keyframe_requests.load(Ordering::Relaxed) >= 1);
    check_recording(&nginx.recording("keyA"), 6.0)
        .await
        .with_context(|| nginx.log())?;
    handle.stopped().await;
    Ok(())
}

/// A preset whose audio is not AAC (`copy`, `drop`): the publisher's Opus
/// is left out, the target gets the video at once (no wait for AAC that
/// will not come) and the recording is video only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_without_audio_sends_video_only_at_once() -> anyhow::Result<()> {
    let nginx = Nginx::start(false)?;
    let stream = Stream::new("d");
    let options = PushOptions {
        audio: false,
        ..Default::default()
    };
    let handle = push::spawn(
        stream.hub.clone(),
        Target::parse(&nginx.rtmp_url("keyD"))?,
        options,
        stream.shutdown.subscribe(),
    );
    stream.start();
    // The audio is Opus, as a WebRTC publisher sends it.
    let opus = Arc::new(CodecParams::Opus {
        sample_rate: 48_000,
        channels: 2,
    });
    let media = media()?;
    let began = tokio::time::Instant::now();
    let mut publishing_after = None;
    for f in media
        .frames
        .iter()
        .filter(|f| (0..5 * 90_000).contains(&f.dts))
    {
        let due = Duration::from_secs_f64(f.dts as f64 / 90_000.0);
        tokio::time::sleep_until(began + due).await;
        let mut f = f.clone();
        if f.codec() == Codec::Aac {
            f.params = opus.clone();
        }
        stream.hub.publish(PUBLICATION, f);
        if publishing_after.is_none() && handle.stats().state == PushState::Publishing {
            publishing_after = Some(began.elapsed());
        }
    }
    stream.stop();
    let stats = ended(&handle).await?;
    assert!(stats.last_error.is_none(), "{stats:?}");
    let publishing_after = publishing_after.context("never published")?;
    assert!(
        publishing_after < Duration::from_millis(2500),
        "published after {publishing_after:?}"
    );
    let path = nginx.recording("keyD");
    let mut last = 0;
    wait_for("the recording to settle", Duration::from_secs(15), || {
        let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let settled = len > 0 && len == last;
        last = len;
        settled.then_some(())
    })
    .await?;
    let input = path.to_str().context("path")?;
    let codecs: Vec<_> = ffprobe_streams(input)?
        .into_iter()
        .map(|s| s.codec)
        .collect();
    assert_eq!(codecs, ["h264"], "{}", nginx.log());
    let errors = ffmpeg_decode_errors(input)?;
    assert!(errors.is_empty(), "{errors}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_target_does_not_disturb_a_good_one() -> anyhow::Result<()> {
    let nginx = Nginx::start(false)?;
    let dead_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let stream = Stream::new("b");
    let good = stream.push(&nginx.rtmp_url("keyB"), None)?;
    let bad = stream.push(&format!("rtmp://127.0.0.1:{dead_port}/live/keyBad"), None)?;
    stream.start();
    stream.play(0.0, 5.0).await;
    let bad_stats = bad.stats();
    assert!(
        matches!(bad_stats.state, PushState::Backoff | PushState::Connecting),
        "{bad_stats:?}"
    );
    assert!(bad_stats.reconnects >= 2, "{bad_stats:?}");
    assert!(bad_stats.last_error.is_some(), "{bad_stats:?}");
    assert_eq!(bad_stats.frames_sent, 0);
    assert!(!format!("{bad_stats:?}").contains("keyBad"));
    stream.stop();
    let stats = ended(&good).await?;
    assert_eq!(stats.reconnects, 0, "{stats:?}");
    assert_eq!(stats.frames_dropped, 0, "{stats:?}");
    check_recording(&nginx.recording("keyB"), 5.0)
        .await
        .with_context(|| nginx.log())?;
    // The dead one gives up when the publisher leaves.
    ended(&bad).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_resumes_after_the_server_restarts() -> anyhow::Result<()> {
    let mut nginx = Nginx::start(false)?;
    let stream = Stream::new("c");
    let handle = stream.push(&nginx.rtmp_url("keyC"), None)?;
    stream.start();
    stream.play(0.0, 3.0).await;
    assert_eq!(handle.stats().state, PushState::Publishing);
    nginx.kill();
    std::fs::remove_file(nginx.recording("keyC"))?;
    stream.play(3.0, 4.0).await;
    let down = handle.stats();
    assert!(
        matches!(down.state, PushState::Backoff | PushState::Connecting),
        "{down:?}"
    );
    assert!(down.last_error.is_some(), "{down:?}");
    nginx.restart()?;
    let restarted = Instant::now();
    let play = stream.play(4.0, 10.0);
    let resumed = async {
        // Backoff after two failed attempts: at most 2 s * 1.25, plus
        // connecting and the next keyframe.
        publishing(&handle, Duration::from_secs(4)).await?;
        anyhow::Ok(restarted.elapsed())
    };
    let ((), resumed) = tokio::join!(play, resumed);
    let resumed = resumed?;
    stream.stop();
    let stats = ended(&handle).await?;
    assert!(stats.reconnects >= 1, "{stats:?}");
    // The second recording runs from the keyframe before the reconnection
    // (the push keeps the current GOP while it reconnects; the sample has a
    // keyframe every second) to the end.
    let expected = 10.0 - (4.0 + resumed.as_secs_f64()).floor();
    let path = nginx.recording("keyC");
    let input = path.to_str().context("path")?;
    check_recording(&path, expected)
        .await
        .with_context(|| format!("resumed after {resumed:?}\n{}", nginx.log()))?;
    ensure!(ffmpeg_decode_errors(input)?.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtmps_with_a_private_ca() -> anyhow::Result<()> {
    let nginx = Nginx::start(true)?;
    let url = nginx.rtmps_url("keyD").context("TLS port")?;
    let stream = Stream::new("d");
    let handle = stream.push(&url, nginx.ca_file.clone())?;
    // Without the CA the server's certificate is not trusted.
    let untrusted = stream.push(&nginx.rtmps_url("keyE").context("TLS port")?, None)?;
    stream.start();
    stream.play(0.0, 5.0).await;
    let stats = handle.stats();
    assert_eq!(stats.state, PushState::Publishing, "{stats:?}");
    let bad = untrusted.stats();
    assert_eq!(bad.frames_sent, 0, "{bad:?}");
    let error = bad.last_error.clone().unwrap_or_default();
    assert!(
        error.contains("TLS") && error.contains("certificate"),
        "{bad:?}"
    );
    // Stopping the push while the publisher is live ends it cleanly too.
    handle.stopped().await;
    check_recording(&nginx.recording("keyD"), 5.0)
        .await
        .with_context(|| nginx.log())?;
    stream.stop();
    untrusted.stopped().await;
    Ok(())
}
