//! ABR ladders end to end: a real publication on a stream with the
//! `abr-720p` preset (the source copied, 480p and 360p encoded by x264)
//! gives a master playlist whose variants say what ffprobe finds in them,
//! a clean media playlist per rendition, and segment boundaries at the same
//! times in every rendition, so players switch cleanly.

mod support;

use std::process::Command;
use std::time::Duration;

use support::hls_check::{Expect, check_hls};
use support::nginx::{Nginx, check_recording};
use support::server::{MediaPlaylist, Server, ffprobe_streams, publish_cli, sample_mkv};

/// `(profile_idc, level_idc)` of the first video stream ffprobe finds.
fn h264_profile_level(input: &str) -> (u8, u8) {
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-select_streams", "v:0", "-of", "json"])
        .args(["-show_entries", "stream=profile,level", input])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let s = &v["streams"][0];
    let profile = match s["profile"].as_str() {
        Some("High") => 0x64,
        Some("Main") => 0x4d,
        Some("Baseline" | "Constrained Baseline") => 0x42,
        other => panic!("unexpected profile {other:?}"),
    };
    (profile, s["level"].as_u64().unwrap() as u8)
}

/// Start time of each segment's video, s (ffprobe on the segment file).
fn segment_starts(server: &Server, stream: &str, rendition: &str, uris: &[String]) -> Vec<f64> {
    uris.iter()
        .map(|uri| {
            let path = server.hls_dir(stream).join(rendition).join(uri);
            let out = Command::new("ffprobe")
                .args(["-v", "error", "-select_streams", "v:0", "-of", "csv=p=0"])
                .args(["-show_entries", "stream=start_time"])
                .arg(&path)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            // MPEG-TS lists the stream under its program too: same value.
            text.lines()
                .find(|l| !l.trim().is_empty())
                .and_then(|l| l.trim().parse().ok())
                .unwrap_or_else(|| panic!("{}: {text:?}", path.display()))
        })
        .collect()
}

/// A rendition of a ladder: its name and picture size.
type Rung = (&'static str, (u64, u64));

/// Every rendition of `stream`: a clean, complete H264 + AAC playlist of
/// the published 10 s, audio in sync within `sync` s.
async fn check_renditions(
    server: &Server,
    stream: &str,
    renditions: &[Rung],
    sync: f64,
) -> Vec<MediaPlaylist> {
    let mut playlists = Vec::new();
    for (name, size) in renditions {
        let expect = Expect {
            sent_secs: 10.0,
            codecs: &["h264", "aac"],
            size: Some(*size),
            lip_sync: Some((0.0, sync)),
        };
        playlists.push(check_hls(server, &format!("{stream}/{name}"), expect).await);
    }
    playlists
}

/// `/hls/STREAM/index.m3u8`, which must be a master playlist listing
/// `renditions` in order with their sizes; and its text.
async fn master_playlist(
    server: &Server,
    stream: &str,
    renditions: &[Rung],
) -> (m3u8_rs::MasterPlaylist, String) {
    let text = reqwest::get(server.url(&format!("/hls/{stream}/index.m3u8")))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let master = match m3u8_rs::parse_playlist_res(text.as_bytes()) {
        Ok(m3u8_rs::Playlist::MasterPlaylist(m)) => m,
        other => panic!("not a master playlist: {other:?}\n{text}"),
    };
    let listed: Vec<(String, u64, u64)> = master
        .variants
        .iter()
        .map(|v| {
            let r = v.resolution.expect("RESOLUTION");
            (v.uri.clone(), r.width, r.height)
        })
        .collect();
    let expected: Vec<(String, u64, u64)> = renditions
        .iter()
        .map(|(n, (w, h))| (format!("{n}/index.m3u8"), *w, *h))
        .collect();
    assert_eq!(listed, expected, "{text}");
    (master, text)
}

/// Segment boundaries at the same times in every rendition (±1 frame).
fn assert_aligned(server: &Server, stream: &str, renditions: &[Rung], playlists: &[MediaPlaylist]) {
    let starts: Vec<Vec<f64>> = renditions
        .iter()
        .zip(playlists)
        .map(|((name, _), p)| {
            let uris: Vec<String> = p.segments.iter().map(|s| s.0.clone()).collect();
            segment_starts(server, stream, name, &uris)
        })
        .collect();
    for (i, s) in starts.iter().enumerate().skip(1) {
        assert_eq!(
            s.len(),
            starts[0].len(),
            "segments per rendition: {starts:?}"
        );
        for (k, (a, b)) in starts[0].iter().zip(s).enumerate() {
            assert!(
                (a - b).abs() <= 1.0 / 30.0 + 0.002,
                "segment {k}: {} starts at {a}, {} at {b}",
                renditions[0].0,
                renditions[i].0
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abr_ladder_has_a_master_playlist_and_aligned_renditions() {
    let server = Server::start("[stream_defaults]\npreset = \"abr-720p\"\n").unwrap();
    publish_cli(
        &sample_mkv(),
        &server.url("/whip/abr"),
        &[],
        "warn",
        Duration::from_secs(40),
    )
    .await;

    // Every rendition: a clean, complete, in-sync H264 + AAC playlist. The
    // sample is 640x360: the 480p rung is not upscaled.
    let renditions = [
        ("source", (640, 360)),
        ("480p", (640, 360)),
        ("360p", (640, 360)),
    ];
    let playlists = check_renditions(&server, "abr", &renditions, 0.1).await;

    // The master playlist lists them with what they really are.
    let (master, text) = master_playlist(&server, "abr", &renditions).await;
    let mut average = Vec::new();
    for ((name, _), v) in renditions.iter().zip(&master.variants) {
        let url = server.url(&format!("/hls/abr/{name}/index.m3u8"));
        let (profile, level) = h264_profile_level(&url);
        let codecs = v.codecs.as_deref().expect("CODECS");
        let video = codecs.split(',').next().unwrap();
        assert!(
            video.starts_with(&format!("avc1.{profile:02x}"))
                && video.ends_with(&format!("{level:02x}")),
            "{name}: CODECS {codecs} vs profile {profile:#x} level {level}"
        );
        assert!(codecs.ends_with(",mp4a.40.2"), "{codecs}");
        let fps = v.frame_rate.expect("FRAME-RATE");
        assert!((fps - 30.0).abs() < 1.5, "{name}: FRAME-RATE {fps}");
        let avg = v.average_bandwidth.expect("AVERAGE-BANDWIDTH");
        assert!(avg > 100_000 && avg <= v.bandwidth, "{name}: {text}");
        average.push(avg);
    }
    // The encoded rungs keep to their bitrates' order (1.4 and 0.8 Mbit/s).
    assert!(average[1] > average[2], "{text}");

    assert_aligned(&server, "abr", &renditions, &playlists);
    assert!(!server.log().contains("panicked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_latency_renditions_report_each_other() {
    let server = Server::start(
        "[hls]\nformat = \"llhls\"\nsegment_duration = 1.0\n\
         [stream_defaults]\npreset = \"abr-720p\"\n",
    )
    .unwrap();
    let url = server.url("/whip/ll");
    let publishing = tokio::spawn(async move {
        publish_cli(
            &sample_mkv(),
            &url,
            &["--duration", "6"],
            "warn",
            Duration::from_secs(30),
        )
        .await
    });
    // While live: each rendition's playlist reports the two others, at an
    // edge close to its own.
    let client = reqwest::Client::new();
    let mut checked = 0;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let mut edges = Vec::new();
        for name in ["source", "480p", "360p"] {
            let url = server.url(&format!("/hls/ll/{name}/index.m3u8"));
            let Ok(resp) = client.get(url).send().await else {
                continue;
            };
            let text = resp.text().await.unwrap_or_default();
            let reports: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with("#EXT-X-RENDITION-REPORT:"))
                .collect();
            let own_msn = text.lines().filter(|l| l.starts_with("#EXTINF")).count();
            edges.push((name, reports.len(), own_msn, text));
        }
        if edges.len() == 3 && edges.iter().all(|(_, n, msn, _)| *n == 2 && *msn >= 2) {
            let mut reported = Vec::new();
            for (name, _, _, text) in &edges {
                for other in ["source", "480p", "360p"].iter().filter(|o| *o != name) {
                    let line = text
                        .lines()
                        .find(|l| l.contains(&format!("URI=\"../{other}/index.m3u8\"")))
                        .unwrap_or_else(|| panic!("{name} does not report {other}:\n{text}"));
                    let msn: u64 = line
                        .split("LAST-MSN=")
                        .nth(1)
                        .and_then(|v| v.split(',').next())
                        .and_then(|v| v.parse().ok())
                        .unwrap_or_else(|| panic!("{line}"));
                    assert!(line.contains(",LAST-PART="), "{line}");
                    reported.push(msn);
                }
            }
            // Segments are 1 s: the renditions' edges are close together.
            let (min, max) = (reported.iter().min(), reported.iter().max());
            assert!(max.unwrap() - min.unwrap() <= 2, "{reported:?}");
            checked += 1;
            if checked >= 3 {
                break;
            }
        }
    }
    assert!(
        checked >= 3,
        "rendition reports never seen in all three playlists"
    );
    publishing.await.unwrap();
    let master = reqwest::get(server.url("/hls/ll/index.m3u8"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        master.starts_with("#EXTM3U\n#EXT-X-VERSION:7\n"),
        "{master}"
    );
    assert_eq!(master.matches("#EXT-X-STREAM-INF:").count(), 3, "{master}");
}

/// The sample's video scaled to `size`, keyframes at the same times, as a
/// simulcast encoder makes its lower layers.
fn layer_file(dir: &std::path::Path, name: &str, size: &str) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.mkv"));
    let status = Command::new("ffmpeg")
        .args(["-nostdin", "-v", "error", "-i"])
        .arg(sample_mkv())
        .args(["-an", "-vf", &format!("scale={size}"), "-c:v", "libx264"])
        .args(["-preset", "veryfast", "-bf", "0", "-sc_threshold", "0"])
        .args(["-force_key_frames", "expr:gte(t,n_forced)", "-b:v", "300k"])
        .arg(&path)
        .status()
        .unwrap();
    assert!(status.success());
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulcast_layers_become_renditions_without_transcoding() {
    let tmp = tempfile::tempdir().unwrap();
    let mid = layer_file(tmp.path(), "mid", "320:180");
    let low = layer_file(tmp.path(), "low", "160:90");
    // The low layer is also pushed over RTMP (`#rendition=low`).
    let nginx = Nginx::start(false).unwrap();
    let server = Server::start(&format!(
        "[stream_defaults]\npreset = \"simulcast\"\npush = [\"{}#rendition=low\"]\n",
        nginx.rtmp_url("sim-low")
    ))
    .unwrap();
    let m = format!("m={}", mid.display());
    let l = format!("l={}", low.display());
    let stderr = publish_cli(
        &sample_mkv(),
        &server.url("/whip/sim"),
        &["--simulcast", &m, "--simulcast", &l],
        "warn,whipgate::publish=debug",
        Duration::from_secs(40),
    )
    .await;
    assert!(stderr.contains("a=simulcast:send h;m;l"), "{stderr}");

    let renditions = [
        ("high", (640, 360)),
        ("mid", (320, 180)),
        ("low", (160, 90)),
    ];
    let playlists = check_renditions(&server, "sim", &renditions, 0.15).await;
    master_playlist(&server, "sim", &renditions).await;
    // Copied, not encoded: no video transcoder ran.
    let log = server.log();
    assert!(!log.contains("h264-transcoder"), "{log}");
    assert_eq!(log.matches("simulcast layer started").count(), 3, "{log}");
    // The layers' keyframes are at the same times: so are the segments.
    assert_aligned(&server, "sim", &renditions, &playlists);
    // The push carried the low layer, whole.
    let recording = nginx.recording("sim-low");
    check_recording(&recording, 10.0).await.unwrap();
    let video = ffprobe_streams(recording.to_str().unwrap()).unwrap();
    let video = video.iter().find(|s| s.codec == "h264").unwrap();
    assert_eq!((video.width, video.height), (Some(160), Some(90)));
    // A push of a rendition the stream does not have: 422, naming them.
    let resp = reqwest::Client::new()
        .post(server.url("/api/v1/streams/sim/push"))
        .json(&serde_json::json!({ "url": format!("{}#rendition=nope", nginx.rtmp_url("x")) }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 422);
    let body = resp.text().await.unwrap();
    assert!(body.contains("high, mid, low"), "{body}");
}
