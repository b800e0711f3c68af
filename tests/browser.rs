//! The web console in a real browser: headless Chromium (Debian's, from
//! scripts/install-deps.sh) publishes its fake camera and microphone from
//! `/publish/test` with WHIP, plays `/watch/test` with hls.js until the
//! video is 5 s in, and the console at `/` lists the stream as live.
//! Screenshots of the three pages go to `target/tmp/browser/`.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use support::browser::{Browser, chromium};
use support::server::Server;

fn artifacts() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("browser")
}

async fn api(server: &Server, path: &str) -> Value {
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let resp = client.get(server.url(path)).send().await.unwrap();
    assert!(resp.status().is_success(), "GET {path}: {}", resp.status());
    resp.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_watch_and_list_from_chromium() {
    let chromium = chromium();
    let server = Server::start("").expect("server");
    let browser = Browser::launch(&chromium).expect("chromium");
    let shots = artifacts();

    let mut publish = browser
        .open(&server.url("/publish/test"))
        .await
        .expect("publish page");
    // The gateway ingests H264 only: a browser without an H264 encoder
    // cannot publish to it.
    if !publish.sends_h264().await.expect("capabilities") {
        eprintln!(
            "SKIPPED: this Chromium ({}) offers no H264 (packetization-mode 1) for sending, \
             which whipgate needs from a browser",
            chromium.display()
        );
        return;
    }

    // A small picture keeps the software encoder and decoder cheap.
    publish
        .eval("document.getElementById('resolution').value = '640x360'; true")
        .await
        .unwrap();
    if let Err(e) = publish.start_publishing().await {
        let _ = publish.screenshot(&shots.join("publish-failed.png")).await;
        panic!(
            "{e}\nserver:\n{}\nchromium:\n{}",
            server.log(),
            browser.log()
        );
    }

    // The gateway sees H264 from the browser, with its resolution.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let stream = loop {
        let v = api(&server, "/api/v1/streams/test").await;
        if v["publisher"]["video"]["frame_rate"].as_f64() > Some(0.0) {
            break v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no video measured: {v:#}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let video = &stream["publisher"]["video"];
    assert_eq!(video["codec"], "h264", "{stream:#}");
    assert!(video["width"].as_u64() > Some(0), "{stream:#}");
    assert_eq!(stream["publisher"]["audio"]["codec"], "opus", "{stream:#}");

    // hls.js plays it past 5 s.
    let mut watch = browser
        .open(&server.url("/watch/test"))
        .await
        .expect("watch page");
    watch.bring_to_front().await.unwrap();
    let played = watch.wait_playing(5.0, Duration::from_secs(60)).await;
    let _ = watch.screenshot(&shots.join("watch.png")).await;
    if let Err(e) = played {
        let state = watch
            .eval(
                "JSON.stringify({state: document.getElementById('state').textContent, \
                 t: document.getElementById('video').currentTime, \
                 err: document.getElementById('video').error && document.getElementById('video').error.message, \
                 mse: window.MediaSource && MediaSource.isTypeSupported('video/mp4; codecs=\"avc1.42E01E,mp4a.40.2\"')})",
            )
            .await;
        panic!("{e}\nwatch page: {state:?}\nserver:\n{}", server.log());
    }

    // The console lists it as live.
    let mut console = browser.open(&server.url("/")).await.expect("console");
    console
        .wait_for(
            "document.querySelector('tr[data-stream=\"test\"][data-live=\"true\"]') !== null",
            Duration::from_secs(10),
        )
        .await
        .expect("the console lists the stream as live");
    let row = console
        .eval("document.querySelector('tr[data-stream=\"test\"]').textContent")
        .await
        .unwrap();
    assert!(
        row.as_str().is_some_and(|r| r.contains("h264")),
        "console row: {row}"
    );
    console
        .screenshot(&shots.join("console.png"))
        .await
        .unwrap();
    publish.bring_to_front().await.unwrap();
    publish
        .screenshot(&shots.join("publish.png"))
        .await
        .unwrap();

    // Stop: the session is deleted, the stream is no longer live.
    publish
        .eval("document.getElementById('stop').click(); true")
        .await
        .unwrap();
    publish
        .wait_for(
            "document.getElementById('state').textContent === 'stopped'",
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let v = api(&server, "/api/v1/streams/test").await;
        if v["live"] == false && v["session"].is_null() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still live: {v:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The page's other choices: audio only (no camera), and VP8, which the
    // default preset encodes to H264. Each must reach the HLS.
    for (stream, setup, video_codec) in [
        (
            "voice",
            "document.getElementById('camera').value = 'none'",
            None,
        ),
        (
            "vp8cam",
            "document.getElementById('codec').value = 'video/vp8'; \
             document.getElementById('resolution').value = '640x360'",
            Some("vp8"),
        ),
    ] {
        let mut page = browser
            .open(&server.url(&format!("/publish/{stream}")))
            .await
            .expect("publish page");
        page.eval(&format!("{setup}; true")).await.unwrap();
        page.start_publishing()
            .await
            .unwrap_or_else(|e| panic!("{stream}: {e}\nserver:\n{}", server.log()));
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let v = api(&server, &format!("/api/v1/streams/{stream}")).await;
            let publisher = &v["publisher"];
            let seen_video = publisher["video"]["codec"].as_str();
            let audio_ok = publisher["audio"]["codec"] == "opus";
            if audio_ok && seen_video == video_codec {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{stream}: {v:#}");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        // The HLS playlist exists (audio only: AAC; VP8: encoded H264).
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let resp = client
                .get(server.url(&format!("/hls/{stream}/index.m3u8")))
                .send()
                .await
                .unwrap();
            if resp.status().is_success() && resp.text().await.unwrap().contains("#EXTINF") {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{stream}: no HLS segment\n{}",
                server.log()
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        page.eval("document.getElementById('stop').click(); true")
            .await
            .unwrap();
    }

    let log = server.log();
    assert!(!log.contains("panicked"), "{log}");
    eprintln!("screenshots in {}", shots.display());
}
