//! End to end: the real server binary, real WebRTC publishers (webrtc-rs, an
//! independent stack, and `whipgate publish`), and the HLS checked with
//! ffprobe and a full ffmpeg decode.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use support::hls_check::{Expect, check_hls, ended_playlist};
use support::server::{Server, publish_cli, read_playlist, sample_mkv, wait_for};
use support::webrtc_publisher::{PublishOpts, publish};

fn opts(server: &Server, stream: &str, dir: &Path, secs: u64) -> PublishOpts {
    let url = server.url(&format!("/whip/{stream}"));
    PublishOpts::sample(url, dir, Duration::from_secs(secs))
}

fn av(sent_secs: f64) -> Expect<'static> {
    Expect {
        sent_secs,
        codecs: &["h264", "aac"],
        size: Some((640, 360)),
        lip_sync: Some((0.0, 0.1)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webrtc_rs_publication_becomes_clean_hls() {
    let server = Server::start("").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let o = opts(&server, "cam", tmp.path(), 8);
    let started = Instant::now();
    let hls_dir = server.hls_dir("cam");
    // Watch for the first playlist while publishing, to measure latency.
    let first_segment = tokio::spawn(async move {
        wait_for("first segment", Duration::from_secs(20), || {
            hls_dir.join("index.m3u8").exists().then(Instant::now)
        })
        .await
    });
    let report = publish(o).await.unwrap();
    let first = first_segment.await.unwrap().unwrap();
    assert!(report.location.contains("/whip/cam/"));
    assert_eq!(report.video_frames_sent, 240);
    let connected = started + report.post_to_201 + report.connected_after.unwrap_or_default();
    eprintln!(
        "POST->201 {:?}; connected -> first segment listed {:?}",
        report.post_to_201,
        first.saturating_duration_since(connected)
    );
    check_hls(&server, "cam", av(8.0)).await;
    assert!(!server.log().contains("panicked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whipgate_publish_cli_becomes_clean_hls() {
    let server = Server::start("").unwrap();
    let status = tokio::process::Command::new(env!("CARGO_BIN_EXE_whipgate"))
        .arg("publish")
        .arg(sample_mkv())
        .arg(server.url("/whip/file"))
        .env("WHIPGATE_LOG", "warn")
        .status();
    let status = tokio::time::timeout(Duration::from_secs(30), status)
        .await
        .expect("publish finished in time")
        .unwrap();
    assert!(status.success(), "whipgate publish: {status}");
    check_hls(&server, "file", av(10.0)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audio_only_and_video_only_publications_have_just_their_track() {
    let server = Server::start("").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut audio = opts(&server, "audio", tmp.path(), 5);
    audio.video = false;
    let mut video = opts(&server, "video", tmp.path(), 5);
    video.audio = false;
    let (a, v) = tokio::join!(publish(audio), publish(video));
    a.unwrap();
    v.unwrap();
    let only = |codec| Expect {
        sent_secs: 5.0,
        codecs: std::slice::from_ref(codec),
        size: None,
        lip_sync: None,
    };
    check_hls(&server, "audio", only(&"aac")).await;
    check_hls(&server, "video", only(&"h264")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_coming_back_continues_with_a_discontinuity() {
    let server = Server::start("").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    publish(opts(&server, "again", tmp.path(), 4))
        .await
        .unwrap();
    let first = ended_playlist(&server, "again").await;
    publish(opts(&server, "again", tmp.path(), 4))
        .await
        .unwrap();
    let playlist = check_hls(&server, "again", av(8.0)).await;
    assert_eq!(playlist.discontinuities, 1, "{playlist:?}");
    assert!(
        playlist.segments[0].0 == first.segments[0].0,
        "sequence goes on"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vanished_publisher_is_replaced_and_sigterm_ends_playlists() {
    let mut server = Server::start("").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    // A publisher that disappears without DELETE.
    let mut gone = opts(&server, "live", tmp.path(), 3);
    gone.delete_at_end = false;
    publish(gone).await.unwrap();
    // A new publisher on the same stream gets in once the old one is
    // detected as gone (ICE/DTLS close, or media stopped: stale takeover).
    let started = Instant::now();
    let mut next = opts(&server, "live", tmp.path(), 30);
    next.delete_at_end = false;
    let publisher = tokio::spawn(async move {
        loop {
            match publish(next.clone()).await {
                Ok(r) => return Ok(r),
                Err(e) if e.to_string().contains("409") && started.elapsed().as_secs() < 25 => {
                    tokio::time::sleep(Duration::from_millis(500)).await
                }
                Err(e) => return Err(e),
            }
        }
    });
    // Media flows again: a segment of the second publication appears.
    let dir = server.hls_dir("live");
    wait_for(
        "the new publisher's segments",
        Duration::from_secs(40),
        || {
            read_playlist(&dir.join("index.m3u8"))
                .ok()
                .filter(|p| !p.ended && p.discontinuities == 1)
        },
    )
    .await
    .unwrap();
    let status = server.terminate().unwrap();
    assert!(status.success(), "clean exit on SIGTERM: {status}");
    let playlist = read_playlist(&dir.join("index.m3u8")).unwrap();
    assert!(playlist.ended, "SIGTERM ends the playlist: {playlist:?}");
    publisher.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sliding_window_deletes_old_segments_and_serves_hls_headers() {
    let server = Server::start("[hls]\nplaylist_size = 2\nkeep_extra = 1\n").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    publish(opts(&server, "win", tmp.path(), 10)).await.unwrap();
    let playlist = ended_playlist(&server, "win").await;
    let listed: Vec<_> = playlist.segments.iter().map(|s| s.0.as_str()).collect();
    assert_eq!(listed, ["seg3.ts", "seg4.ts"], "{playlist:?}");
    let mut on_disk: Vec<_> = std::fs::read_dir(server.hls_dir("win"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".ts"))
        .collect();
    on_disk.sort();
    assert_eq!(
        on_disk,
        ["seg2.ts", "seg3.ts", "seg4.ts"],
        "window + keep_extra"
    );

    let client = reqwest::Client::new();
    let get = |path: &str| client.get(server.url(path)).send();
    let m3u8 = get("/hls/win/index.m3u8").await.unwrap();
    assert_eq!(m3u8.status(), 200);
    let h = m3u8.headers();
    assert_eq!(h["content-type"], "application/vnd.apple.mpegurl");
    assert_eq!(h["cache-control"], "no-cache");
    assert_eq!(h["access-control-allow-origin"], "*");
    let seg = get("/hls/win/seg4.ts").await.unwrap();
    assert_eq!(seg.status(), 200);
    assert_eq!(seg.headers()["content-type"], "video/mp2t");
    assert!(
        seg.headers()["cache-control"]
            .to_str()
            .unwrap()
            .contains("max-age")
    );
    assert_eq!(get("/hls/win/seg0.ts").await.unwrap().status(), 404);
}

#[test]
fn bad_config_is_refused_at_start_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for (text, key) in [
        ("[hls]\nsegment_duraton = 2.0\n", "segment_duraton"),
        ("[hls]\nsegment_duration = 99\n", "hls.segment_duration"),
        (
            "[streams.a]\npush = [\"http://x/y\"]\n",
            "streams.a.push[0]",
        ),
    ] {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_whipgate"))
            .arg("serve")
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{text} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "{text}: {err}");
    }
}

#[test]
fn broken_preset_is_refused_at_start_naming_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let presets = dir.path().join("presets");
    std::fs::create_dir(&presets).unwrap();
    std::fs::write(presets.join("fine.toml"), "[audio]\nchannels = 1\n").unwrap();
    let broken = presets.join("abr-720p.toml");
    for (text, expected) in [
        (
            "[video]\nmode = \"transcode\"\n[[video.renditions]]\nname = \"480p\"\nheight = 481\nbitrate = 1400000\n",
            format!(
                "{}: invalid value for `video.renditions[0].height`: must be even",
                broken.display()
            ),
        ),
        (
            "[video]\nmode = \"copy\"\n[audio]\nbitrat = 96000\n",
            format!(
                "{}, line 4, column 1: `audio.bitrat`: unknown key",
                broken.display()
            ),
        ),
        (
            "[video\nmode = \"copy\"\n",
            format!("{}, line 1, ", broken.display()),
        ),
    ] {
        std::fs::write(&broken, text).unwrap();
        let config = dir.path().join("whipgate.toml");
        std::fs::write(
            &config,
            format!("[server]\npresets_dir = \"{}\"\n", presets.display()),
        )
        .unwrap();
        for command in ["serve", "check-config"] {
            let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_whipgate"));
            c.arg(command);
            if command == "serve" {
                c.arg("--config");
            }
            let out = c
                .arg(&config)
                .args([
                    "--http-listen",
                    "127.0.0.1:0",
                    "--udp-listen",
                    "127.0.0.1:0",
                ])
                .output()
                .unwrap();
            assert!(!out.status.success(), "{command} accepted {text}");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains(&expected), "{command}, {text}: {err}");
        }
    }
    // Fixed, the user's presets add to the shipped ones.
    std::fs::write(&broken, "[video]\nmode = \"copy\"\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_whipgate"))
        .arg("check-config")
        .args(["--presets-dir".as_ref(), presets.as_os_str()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("abr-720p, audio-only, copy-all, fine, passthrough"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preset_audio_modes_shape_the_hls() {
    let server = Server::start(
        "[streams.opus]\npreset = \"copy-all\"\n[streams.radio]\npreset = \"audio-only\"\n",
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    // Both publish H264 + Opus.
    let (copy_all, audio_only) = tokio::join!(
        publish(opts(&server, "opus", tmp.path(), 5)),
        publish(opts(&server, "radio", tmp.path(), 5)),
    );
    copy_all.unwrap();
    audio_only.unwrap();
    // copy-all: no AAC transcoder, and MPEG-TS HLS takes no Opus: video
    // only, without waiting for audio.
    check_hls(
        &server,
        "opus",
        Expect {
            sent_secs: 5.0,
            codecs: &["h264"],
            size: Some((640, 360)),
            lip_sync: None,
        },
    )
    .await;
    // audio-only: the video is dropped, the Opus becomes AAC.
    check_hls(
        &server,
        "radio",
        Expect {
            sent_secs: 5.0,
            codecs: &["aac"],
            size: None,
            lip_sync: None,
        },
    )
    .await;
    let api = |stream: &str| {
        let url = server.url(&format!("/api/v1/streams/{stream}"));
        async move {
            let r = reqwest::get(url).await.unwrap();
            r.json::<serde_json::Value>().await.unwrap()
        }
    };
    assert_eq!(api("opus").await["preset"], "copy-all");
    assert_eq!(api("radio").await["preset"], "audio-only");
}

/// The largest gap between consecutive video frames of the HLS, in s.
fn largest_video_gap(url: &str) -> f64 {
    let out = std::process::Command::new("ffprobe")
        .args(["-v", "error", "-select_streams", "v:0", "-show_entries"])
        .args(["packet=pts_time", "-of", "csv=p=0", url])
        .output()
        .expect("ffprobe");
    let mut pts: Vec<f64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().trim_end_matches(',').parse().ok())
        .collect();
    pts.sort_by(f64::total_cmp);
    assert!(pts.len() > 100, "{} video frames", pts.len());
    pts.windows(2).map(|w| w[1] - w[0]).fold(0.0, f64::max)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ice_restart_moves_media_to_a_new_path_in_the_same_session() {
    let server = Server::start("").unwrap();
    // `whipgate publish` restarts ICE from a new UDP socket 4 s in: the old
    // path is gone, so every frame after that came over the new one.
    let stderr = publish_cli(
        &sample_mkv(),
        &server.url("/whip/moving"),
        &["--ice-restart-after", "4"],
        "info",
        Duration::from_secs(30),
    )
    .await;
    assert!(
        stderr.contains("ICE restart on a new UDP socket"),
        "{stderr}"
    );
    // One session, restarted once, and one publication: no discontinuity.
    let playlist = check_hls(&server, "moving", av(10.0)).await;
    assert_eq!(playlist.discontinuities, 0, "{playlist:?}");
    let log = server.log();
    assert_eq!(log.matches("session created").count(), 1, "{log}");
    assert_eq!(
        log.matches("ICE restarted by the client").count(),
        1,
        "{log}"
    );
    let gap = largest_video_gap(&server.url("/hls/moving/index.m3u8"));
    eprintln!("largest video gap across the ICE restart: {gap:.3} s");
    assert!(
        gap < 0.2,
        "a {gap:.3} s gap in the video across the restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ice_tcp_fallback_carries_a_whole_publication() {
    let tcp = support::server::free_tcp_port();
    let server =
        Server::start_with_args("", &["--tcp-listen", &format!("127.0.0.1:{tcp}")]).unwrap();
    // A client that only has TCP: active candidates, RFC 4571 framing.
    let stderr = publish_cli(
        &sample_mkv(),
        &server.url("/whip/overtcp"),
        &["--ice-tcp"],
        "warn,whipgate::publish=debug",
        Duration::from_secs(30),
    )
    .await;
    assert!(
        stderr.contains("tcptype passive"),
        "no passive TCP candidate in the answer: {stderr}"
    );
    check_hls(&server, "overtcp", av(10.0)).await;
    let log = server.log();
    assert!(log.contains("ICE-TCP connection"), "{log}");
}

/// The sample re-encoded by FFmpeg with `encoder_args` (as a browser would
/// send it: realtime settings) and Opus copied, published with `whipgate
/// publish` to stream `name`: the HLS must be clean H264 + AAC, 640x360, the
/// whole duration, in sync, cut in whole segments; `rtpmap` must have been
/// negotiated.
async fn transcoded_publication_becomes_h264_hls(name: &str, encoder_args: &str, rtpmap: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let webm = tmp.path().join(format!("{name}.webm"));
    let started = Instant::now();
    let status = std::process::Command::new("ffmpeg")
        .args(["-nostdin", "-v", "error", "-i"])
        .arg(sample_mkv())
        .args(encoder_args.split_whitespace())
        .args(["-b:v", "1M", "-g", "90", "-c:a", "copy"])
        .arg(&webm)
        .status()
        .unwrap();
    assert!(status.success());
    eprintln!("{name}: encoded in {:?}", started.elapsed());
    let server = Server::start("").unwrap();
    let stderr = publish_cli(
        &webm,
        &server.url(&format!("/whip/{name}")),
        &[],
        "warn,whipgate::publish=debug",
        Duration::from_secs(40),
    )
    .await;
    assert!(stderr.contains(rtpmap), "{rtpmap} was negotiated: {stderr}");
    // H264 + AAC, 640x360, clean, the whole duration, in sync.
    let playlist = check_hls(&server, name, av(10.0)).await;
    // Keyframes are forced every segment duration: whole 2 s segments.
    let (_, last) = playlist.segments.split_last().unwrap();
    assert!(
        last.iter().all(|(_, d)| (d - 2.0).abs() < 0.05),
        "{playlist:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vp8_publication_becomes_h264_hls() {
    let libvpx = "-c:v libvpx -deadline realtime -cpu-used 8";
    transcoded_publication_becomes_h264_hls("vp8", libvpx, "VP8/90000").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vp9_publication_becomes_h264_hls() {
    let libvpx_vp9 = "-c:v libvpx-vp9 -deadline realtime -cpu-used 8 -row-mt 1";
    transcoded_publication_becomes_h264_hls("vp9", libvpx_vp9, "VP9/90000").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn av1_publication_becomes_h264_hls() {
    // libaom's realtime mode, as Chrome encodes AV1 (about 1 s here).
    let libaom = "-c:v libaom-av1 -usage realtime -cpu-used 8";
    transcoded_publication_becomes_h264_hls("av1", libaom, "AV1/90000").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preset_without_transcoding_refuses_vp8_vp9_and_av1() {
    let server = Server::start("[stream_defaults]\npreset = \"copy-all\"\n").unwrap();
    for codec in ["VP8", "VP9", "AV1"] {
        let offer = format!(
            "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n\
             m=video 9 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\n\
             a=sendonly\r\na=rtpmap:96 {codec}/90000\r\n"
        );
        let resp = reqwest::Client::new()
            .post(server.url("/whip/novp8"))
            .header("content-type", "application/sdp")
            .body(offer)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 422, "{codec}");
        let body = resp.text().await.unwrap();
        assert!(body.contains("does not transcode VP8, VP9"), "{body}");
    }
}
