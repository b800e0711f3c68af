//! Simulcast from a real browser: headless Chromium publishes its fake
//! camera from `/publish/sim` with three `sendEncodings` (rids h, m, l at
//! full, half and quarter size) to a stream with the `simulcast` preset;
//! each layer must become a rendition of its own size in the master
//! playlist, with media segments, without any transcoding.

mod support;

use std::time::{Duration, Instant};

use support::browser::{Browser, chromium};
use support::server::Server;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_simulcast_layers_become_renditions() {
    let chromium = chromium();
    let server = Server::start("[streams.sim]\npreset = \"simulcast\"\n").expect("server");
    let browser = Browser::launch(&chromium).expect("chromium");
    let shots = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("browser");

    let mut page = browser
        .open(&server.url("/publish/sim"))
        .await
        .expect("publish page");
    assert!(
        page.sends_h264().await.expect("capabilities"),
        "this Chromium ({}) cannot send H264",
        chromium.display()
    );
    // Chromium sends three simulcast layers from 960x540 up.
    page.eval(
        "document.getElementById('resolution').value = '1280x720'; \
         document.getElementById('simulcast').value = 'hml'; true",
    )
    .await
    .unwrap();
    if let Err(e) = page.start_publishing().await {
        let _ = page.screenshot(&shots.join("simulcast-failed.png")).await;
        panic!("{e}\nserver:\n{}", server.log());
    }

    // Each layer: a rendition of its own size with segments. Chromium
    // ramps its bitrate up after connecting and may start the upper layers
    // late, hence the wait.
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let get = |path: String| {
        let client = client.clone();
        let url = server.url(&path);
        async move {
            let resp = client.get(url).send().await.ok()?;
            resp.status().is_success().then_some(())?;
            resp.text().await.ok()
        }
    };
    let deadline = Instant::now() + Duration::from_secs(45);
    let sizes = loop {
        let master = get("/hls/sim/index.m3u8".into()).await.unwrap_or_default();
        let sizes: Vec<(String, u64, u64)> = match m3u8_rs::parse_playlist_res(master.as_bytes()) {
            Ok(m3u8_rs::Playlist::MasterPlaylist(m)) => m
                .variants
                .iter()
                .filter_map(|v| {
                    let r = v.resolution?;
                    Some((v.uri.clone(), r.width, r.height))
                })
                .collect(),
            _ => Vec::new(),
        };
        if sizes.len() == 3 {
            break sizes;
        }
        assert!(
            Instant::now() < deadline,
            "not three renditions: {master}\nserver:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let _ = page.screenshot(&shots.join("simulcast.png")).await;
    eprintln!("simulcast renditions from Chromium: {sizes:?}");
    let uris: Vec<&str> = sizes.iter().map(|(u, _, _)| u.as_str()).collect();
    assert_eq!(
        uris,
        ["high/index.m3u8", "mid/index.m3u8", "low/index.m3u8"]
    );
    // Full, half and quarter size (Chromium rounds odd sizes down).
    let (w, h) = (sizes[0].1, sizes[0].2);
    assert!(w >= 960 && h >= 540, "{sizes:?}");
    for (i, (_, lw, lh)) in sizes.iter().enumerate().skip(1) {
        let div = 1 << i;
        assert!(
            lw.abs_diff(w / div) <= 2 && lh.abs_diff(h / div) <= 2,
            "layer {i}: {sizes:?}"
        );
    }
    for uri in &uris {
        let media = get(format!("/hls/sim/{uri}")).await.unwrap_or_default();
        assert!(media.contains("#EXTINF"), "{uri}: {media}");
    }
    let log = server.log();
    assert!(
        !log.contains("h264-transcoder"),
        "copied, not encoded: {log}"
    );
    assert!(!log.contains("panicked"), "{log}");
    page.eval("document.getElementById('stop').click(); true")
        .await
        .unwrap();
}
