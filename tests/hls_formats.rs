//! fMP4 (CMAF) and Low-Latency HLS end to end: the real server binary, real
//! WebRTC publishers (webrtc-rs and `whipgate publish`), the HLS read over
//! HTTP as players read it, probed and fully decoded by ffmpeg.

mod support;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use support::hls_check::{Expect, LlPlaylist, check_hls, check_hls_target, parse_ll_playlist};
use support::server::{Server, sample_mkv};
use support::webrtc_publisher::{PublishOpts, publish};

fn opts(server: &Server, stream: &str, dir: &std::path::Path, secs: u64) -> PublishOpts {
    let url = server.url(&format!("/whip/{stream}"));
    PublishOpts::sample(url, dir, Duration::from_secs(secs))
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

async fn get_text(client: &reqwest::Client, url: &str) -> (u16, String) {
    let r = client.get(url).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fmp4_h264_aac_and_h264_opus_become_clean_hls() {
    // fMP4 for every stream; `opus` copies the Opus as published.
    let server =
        Server::start("[hls]\nformat = \"fmp4\"\n[streams.opus]\npreset = \"copy-all\"\n").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (aac, opus) = tokio::join!(
        publish(opts(&server, "cam", tmp.path(), 8)),
        publish(opts(&server, "opus", tmp.path(), 8)),
    );
    aac.unwrap();
    opus.unwrap();
    let av = |audio| Expect {
        sent_secs: 8.0,
        codecs: match audio {
            "aac" => &["h264", "aac"],
            _ => &["h264", "opus"],
        },
        size: Some((640, 360)),
        lip_sync: Some((0.0, 0.1)),
    };
    check_hls(&server, "cam", av("aac")).await;
    check_hls(&server, "opus", av("opus")).await;

    let client = client();
    for stream in ["cam", "opus"] {
        let url = server.url(&format!("/hls/{stream}/index.m3u8"));
        let (status, text) = get_text(&client, &url).await;
        assert_eq!(status, 200);
        let playlist = parse_ll_playlist(&text);
        assert_eq!(playlist.version, 7, "{text}");
        assert_eq!(playlist.maps, ["init0.mp4"], "one init segment: {text}");
        assert!(playlist.server_control.is_none() && playlist.parts.is_empty());
        assert!(playlist.segments.iter().all(|s| s.1.ends_with(".m4s")));
        assert!(playlist.ended);
        // The file playlist is the same.
        let on_disk = std::fs::read_to_string(server.hls_dir(stream).join("index.m3u8")).unwrap();
        assert_eq!(on_disk, text);

        for (file, content_type) in [
            ("init0.mp4", "video/mp4"),
            ("seg1.m4s", "video/iso.segment"),
        ] {
            let r = client
                .get(server.url(&format!("/hls/{stream}/{file}")))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{file}");
            assert_eq!(r.headers()["content-type"], content_type, "{file}");
            assert!(
                r.headers()["cache-control"]
                    .to_str()
                    .unwrap()
                    .contains("immutable")
            );
            let body = r.bytes().await.unwrap();
            let file = std::fs::read(server.hls_dir(stream).join(file)).unwrap();
            assert_eq!(body, file, "memory and disk agree");
        }
        // Without LL-HLS the delivery directives are ignored: no blocking.
        let asked = Instant::now();
        let (status, again) = get_text(&client, &format!("{url}?_HLS_msn=999&_HLS_skip=YES")).await;
        assert_eq!((status, again.as_str()), (200, text.as_str()));
        assert!(asked.elapsed() < Duration::from_secs(1));
        assert_eq!(
            client
                .get(server.url(&format!("/hls/{stream}/part0.m4s")))
                .send()
                .await
                .unwrap()
                .status(),
            404
        );
    }
}

/// p50, p95 and max of `values`, in ms.
fn percentiles(values: &[f64]) -> (f64, f64, f64) {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.95), v[v.len() - 1])
}

fn unix_ms_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        * 1000.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ll_hls_parts_follow_the_live_edge_with_blocking_reloads() {
    // One-second segments (the sample has a keyframe every second), parts of
    // 200 ms, a window long enough for delta updates to skip segments.
    let server = Server::start(
        "[hls]\nsegment_duration = 1.0\nplaylist_size = 20\n[streams.ll]\nhls.format = \"llhls\"\n",
    )
    .unwrap();
    const SENT: u64 = 14;
    let publisher = tokio::process::Command::new(env!("CARGO_BIN_EXE_whipgate"))
        .arg("publish")
        .arg(sample_mkv())
        .arg(server.url("/whip/ll"))
        .args(["--loop", "--duration", &SENT.to_string()])
        .env("WHIPGATE_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .status();
    let publisher = tokio::spawn(publisher);
    let client = client();
    let url = server.url("/hls/ll/index.m3u8");

    // The stream runs once a first segment is complete.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut playlist = loop {
        assert!(
            Instant::now() < deadline,
            "no LL-HLS playlist with a segment"
        );
        let (status, text) = get_text(&client, &url).await;
        if status == 200 {
            let p = parse_ll_playlist(&text);
            if !p.segments.is_empty() {
                break p;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let part_target = playlist.part_target.expect("EXT-X-PART-INF");
    assert_eq!(part_target, 0.2);
    assert_eq!(playlist.version, 7);
    assert_eq!(
        playlist.server_control.as_deref(),
        Some("CAN-BLOCK-RELOAD=YES,CAN-SKIP-UNTIL=6,PART-HOLD-BACK=0.6")
    );
    assert_eq!(playlist.maps, ["init0.mp4"]);

    // Requests the spec refuses at once.
    let last = playlist.segments.last().unwrap().0;
    for query in [
        "_HLS_part=1".to_owned(),
        format!("_HLS_msn={}", last + 3),
        format!("_HLS_msn={}&_HLS_part=40", last + 1),
        "_HLS_msn=x".to_owned(),
    ] {
        let asked = Instant::now();
        let (status, _) = get_text(&client, &format!("{url}?{query}")).await;
        assert_eq!(status, 400, "{query}");
        assert!(asked.elapsed() < Duration::from_millis(500), "{query}");
    }
    assert_eq!(
        client
            .get(server.url("/hls/ll/part999999.m4s"))
            .send()
            .await
            .unwrap()
            .status(),
        404,
        "a part that is not the preload hint"
    );

    // Follow the live edge: ask for the part after the newest one with a
    // blocking reload, and for the hinted part, at once, right after the
    // previous one came.
    let mut waits = Vec::new();
    let mut hint_waits = Vec::new();
    let mut since_media = Vec::new();
    let mut since_end = Vec::new();
    let mut parts_seen = 0;
    let followed = Instant::now();
    while followed.elapsed() < Duration::from_secs(7) {
        let newest = playlist
            .last_part()
            .expect("parts at the live edge")
            .clone();
        let hint = playlist.preload_hint.clone().expect("EXT-X-PRELOAD-HINT");
        let reload_url = format!(
            "{url}?_HLS_msn={}&_HLS_part={}",
            newest.msn,
            newest.index + 1
        );
        let hint_url = server.url(&format!("/hls/ll/{hint}"));
        let asked = Instant::now();
        let (reload, hinted) = tokio::join!(
            async {
                let r = client.get(&reload_url).send().await.unwrap();
                let (status, text) = (r.status().as_u16(), r.text().await.unwrap());
                (status, text, asked.elapsed(), unix_ms_now())
            },
            async {
                let r = client.get(&hint_url).send().await.unwrap();
                (
                    r.status().as_u16(),
                    r.bytes().await.unwrap(),
                    asked.elapsed(),
                )
            }
        );
        let (status, text, waited, arrived_ms) = reload;
        assert_eq!(status, 200, "{reload_url}: {text}");
        let (hint_status, hint_body, hint_waited) = hinted;
        assert_eq!(hint_status, 200, "{hint_url}");
        let next = parse_ll_playlist(&text);
        let new: Vec<_> = next
            .parts
            .iter()
            .filter(|p| (p.msn, p.index) > (newest.msn, newest.index))
            .collect();
        let first = new
            .first()
            .unwrap_or_else(|| panic!("{reload_url} gave no new part: {text}"));
        // The hint named the part that came next, wherever it ended up.
        assert_eq!(first.uri, hint, "{text}");
        assert!(
            first.index == newest.index + 1 || (first.msn == newest.msn + 1 && first.index == 0)
        );
        let again = client
            .get(server.url(&format!("/hls/ll/{hint}")))
            .send()
            .await
            .unwrap();
        assert_eq!(again.bytes().await.unwrap(), hint_body);
        if parts_seen > 0 {
            waits.push(waited.as_secs_f64() * 1000.0);
            hint_waits.push(hint_waited.as_secs_f64() * 1000.0);
            since_media.push(arrived_ms - first.start_unix_ms);
            since_end.push(arrived_ms - first.start_unix_ms - first.duration * 1000.0);
        }
        parts_seen += new.len();
        playlist = next;
    }
    assert!(parts_seen >= 25, "{parts_seen} parts in 7 s");

    // Every part fits the part target; parts start segments independent;
    // parts are listed for the last few segments only (3 target durations
    // of segments, and the one being built).
    for part in &playlist.parts {
        assert!(part.duration <= part_target + 1e-9, "{part:?}");
        if part.index == 0 {
            assert!(part.independent, "{part:?}");
        }
    }
    let mut with_parts: Vec<u64> = playlist.parts.iter().map(|p| p.msn).collect();
    with_parts.dedup();
    assert!((2..=5).contains(&with_parts.len()), "{}", playlist.text);
    assert!(
        playlist.segments.len() > with_parts.len(),
        "{}",
        playlist.text
    );

    // A delta update: the segments that start more than 6 s before the end
    // are skipped.
    let (status, text) = get_text(&client, &format!("{url}?_HLS_skip=YES")).await;
    assert_eq!(status, 200);
    let delta = parse_ll_playlist(&text);
    assert!(delta.skipped >= 2, "{text}");
    assert_eq!(delta.version, 9);
    assert_eq!(delta.media_sequence, 0);
    assert_eq!(delta.segments[0].1, format!("seg{}.m4s", delta.skipped));
    assert_eq!(delta.maps, ["init0.mp4"]);
    let shown: f64 = delta.segments.iter().map(|s| s.2).sum();
    assert!(shown <= 6.0 + 1.0 + 1e-9, "{text}");

    let (p50, p95, max) = percentiles(&waits);
    let (h50, h95, hmax) = percentiles(&hint_waits);
    let (m50, m95, mmax) = percentiles(&since_media);
    let (e50, e95, emax) = percentiles(&since_end);
    eprintln!(
        "LL-HLS, part target {part_target} s, {} blocking reloads: wait for the next part \
         p50 {p50:.0} ms, p95 {p95:.0} ms, max {max:.0} ms; hinted part p50 {h50:.0} ms, \
         p95 {h95:.0} ms, max {hmax:.0} ms; part listed after its first media \
         p50 {m50:.0} ms, p95 {m95:.0} ms, max {mmax:.0} ms, after its last media \
         p50 {e50:.1} ms, p95 {e95:.1} ms, max {emax:.1} ms",
        waits.len()
    );
    let limit = 1.5 * part_target * 1000.0 + 50.0;
    assert!(
        max <= limit,
        "a part took {max:.0} ms (limit {limit} ms): {waits:?}"
    );
    assert!(
        hmax <= limit,
        "a hinted part took {hmax:.0} ms: {hint_waits:?}"
    );
    assert!(
        mmax <= limit,
        "a part came {mmax:.0} ms after its media: {since_media:?}"
    );

    let status = tokio::time::timeout(Duration::from_secs(30), publisher)
        .await
        .expect("publish finished in time")
        .unwrap()
        .unwrap();
    assert!(status.success(), "whipgate publish: {status}");
    // The whole publication, as ffmpeg plays it (it skips the LL-HLS tags).
    let ended = check_hls_target(
        &server,
        "ll",
        Expect {
            sent_secs: SENT as f64,
            codecs: &["h264", "aac"],
            size: Some((640, 360)),
            lip_sync: Some((0.0, 0.1)),
        },
        1,
    )
    .await;
    assert_eq!(ended.discontinuities, 0);
    // Ended: the directives are ignored, no hint is left.
    let asked = Instant::now();
    let (status, text) = get_text(&client, &format!("{url}?_HLS_msn=9999&_HLS_part=3")).await;
    assert_eq!(status, 200);
    assert!(asked.elapsed() < Duration::from_secs(1));
    let last: LlPlaylist = parse_ll_playlist(&text);
    assert!(last.ended && last.preload_hint.is_none(), "{text}");
}
