mod support;

// End to end, publisher quirks: the real server binary, publishers that do
// what real encoders do (an RSA DTLS certificate like GStreamer, B-frames
// like OBS, a resolution change mid-stream), and the HLS checked with
// ffprobe and a full ffmpeg decode.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::hls_check::{Expect, av_offset, check_hls, check_lip_sync};
use support::server::{Server, ffmpeg_decode_errors, ffprobe_streams};
use support::webrtc_publisher::{
    PublishExtra, PublishOpts, extract_sample, publish_with, rsa_certificate,
};

fn opts(server: &Server, stream: &str, h264: PathBuf, ogg: PathBuf, secs: u64) -> PublishOpts {
    let url = server.url(&format!("/whip/{stream}"));
    PublishOpts::new(url, (h264, ogg), Duration::from_secs(secs))
}

/// Runs a command and returns its stdout; fails on a non-zero exit.
fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temporary path")
}

/// ffprobe's JSON for `-show_entries ENTRIES` of the first video stream.
fn probe_video(input: &str, entries: &str, frames: bool) -> serde_json::Value {
    let mut args = vec!["-v", "error", "-of", "json", "-select_streams", "v:0"];
    if frames {
        args.push("-show_frames");
    }
    args.extend(["-show_entries", entries, input]);
    serde_json::from_str(&run("ffprobe", &args)).unwrap()
}

/// GStreamer's webrtcbin brings an RSA-2048 DTLS certificate (OpenSSL
/// default); the server must take it like the usual ECDSA one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gstreamer_style_rsa_dtls_certificate_is_accepted() {
    let server = Server::start("").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (h264, ogg) = extract_sample(tmp.path()).unwrap();

    let certificate = rsa_certificate().unwrap();
    // The certificate really is RSA, and its fingerprint is the one offered.
    let der = tmp.path().join("cert.der");
    std::fs::write(&der, &certificate.dtls_certificate.certificate[0]).unwrap();
    let text = run(
        "openssl",
        &[
            "x509",
            "-inform",
            "DER",
            "-in",
            path_str(&der),
            "-noout",
            "-text",
            "-fingerprint",
            "-sha256",
        ],
    );
    assert!(text.contains("rsaEncryption"), "{text}");
    assert!(text.contains("(2048 bit)"), "{text}");
    let fingerprint = text
        .lines()
        .find_map(|l| l.strip_prefix("sha256 Fingerprint="))
        .or_else(|| {
            text.lines()
                .find_map(|l| l.strip_prefix("SHA256 Fingerprint="))
        })
        .unwrap_or_else(|| panic!("no SHA-256 fingerprint in:\n{text}"))
        .trim()
        .to_ascii_uppercase();

    let extra = PublishExtra {
        certificate: Some(certificate),
    };
    let report = publish_with(opts(&server, "gst", h264, ogg, 4), extra)
        .await
        .unwrap();
    let offered: Vec<_> = report
        .offer_sdp
        .lines()
        .filter_map(|l| l.strip_prefix("a=fingerprint:sha-256 "))
        .map(|f| f.trim().to_ascii_uppercase())
        .collect();
    assert!(!offered.is_empty(), "no fingerprint offered");
    assert!(
        offered.iter().all(|f| *f == fingerprint),
        "offered {offered:?}, the RSA certificate is {fingerprint}"
    );
    assert_eq!(report.video_frames_sent, 120);
    check_hls(
        &server,
        "gst",
        Expect {
            sent_secs: 4.0,
            codecs: &["h264", "aac"],
            size: Some((640, 360)),
            lip_sync: Some((0.0, 0.1)),
        },
    )
    .await;
}

/// OBS with B-frames on (x264 `high`, `bf=2`): `whipgate publish` sends RTP
/// timestamps from the PTS, so frames arrive out of presentation order.
///
/// `container` is `mkv` (no DTS stored: the demuxer guesses them, none for the
/// first packets) or `mp4` (DTS stored).
async fn b_frames_case(container: &str) {
    let server = Server::start("").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join(format!("bframes.{container}"));
    run(
        "ffmpeg",
        &[
            "-nostdin",
            "-v",
            "error",
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=640x360:rate=30",
            "-f",
            "lavfi",
            "-i",
            "sine=frequency=440:sample_rate=48000",
            "-t",
            "6",
            "-c:v",
            "libx264",
            "-profile:v",
            "high",
            "-bf",
            "2",
            "-g",
            "30",
            "-pix_fmt",
            "yuv420p",
            "-c:a",
            "libopus",
            "-ac",
            "2",
            path_str(&file),
        ],
    );
    let b_frames = |input: &str| {
        let v = probe_video(input, "frame=pict_type", true);
        v["frames"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["pict_type"] == "B")
            .count()
    };
    let source_b = b_frames(path_str(&file));
    assert!(source_b > 60, "the source has {source_b} B-frames");

    let status = tokio::process::Command::new(env!("CARGO_BIN_EXE_whipgate"))
        .arg("publish")
        .arg(&file)
        .arg(server.url(&format!("/whip/{container}")))
        .env("WHIPGATE_LOG", "warn")
        .status();
    let status = tokio::time::timeout(Duration::from_secs(30), status)
        .await
        .expect("publish finished in time")
        .unwrap();
    assert!(status.success(), "whipgate publish: {status}");
    check_hls(
        &server,
        container,
        Expect {
            sent_secs: 6.0,
            codecs: &["h264", "aac"],
            size: Some((640, 360)),
            lip_sync: None,
        },
    )
    .await;

    let url = server.url(&format!("/hls/{container}/index.m3u8"));
    let v = probe_video(&url, "stream=profile,has_b_frames", false);
    assert_eq!(v["streams"][0]["profile"], "High", "{v}");
    // The B-frames went through as they are, reordering and all.
    let hls_b = b_frames(&url);
    assert!(
        hls_b * 10 >= source_b * 9,
        "{hls_b} B-frames in the HLS, {source_b} published"
    );
    // DTS strictly increasing, PTS never before DTS.
    let packets = run(
        "ffprobe",
        &[
            "-v",
            "error",
            "-of",
            "csv=p=0",
            "-select_streams",
            "v:0",
            "-show_entries",
            "packet=pts,dts",
            &url,
        ],
    );
    let mut last_dts = i64::MIN;
    let mut reordered = 0;
    for line in packets.lines().filter(|l| !l.trim().is_empty()) {
        // `pts,dts,` (a trailing comma for the empty side data).
        let mut fields = line.trim().split(',').map(|f| f.parse::<i64>());
        let (Some(Ok(pts)), Some(Ok(dts))) = (fields.next(), fields.next()) else {
            panic!("bad ffprobe packet line {line:?}");
        };
        assert!(dts > last_dts, "DTS {dts} after {last_dts}:\n{packets}");
        assert!(pts >= dts, "PTS {pts} before DTS {dts}:\n{packets}");
        reordered += usize::from(pts != dts);
        last_dts = dts;
    }
    assert!(reordered > 60, "only {reordered} packets with PTS != DTS");
    // Lip sync as in the file (audio starts 14 ms before video there), within
    // the 100 ms the issue asks for. Without sender reports the server anchors
    // each track on its first frame's arrival, and with B-frames the first
    // video frame arrives the reorder delay (2 frames, 67 ms) before its PTS:
    // a known offset of up to that much (without B-frames it is a few ms).
    check_lip_sync(&url, av_offset(path_str(&file)), 0.1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b_frames_from_mkv_become_clean_hls() {
    b_frames_case("mkv").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b_frames_from_mp4_become_clean_hls() {
    b_frames_case("mp4").await;
}

/// Makes `secs` seconds of 30 fps baseline H.264 (Annex B) at `size`.
fn annexb(path: &Path, size: &str, secs: &str) {
    run(
        "ffmpeg",
        &[
            "-nostdin",
            "-v",
            "error",
            "-f",
            "lavfi",
            "-i",
            &format!("testsrc2=size={size}:rate=30"),
            "-t",
            secs,
            "-c:v",
            "libx264",
            "-profile:v",
            "baseline",
            "-g",
            "30",
            "-pix_fmt",
            "yuv420p",
            "-bsf:v",
            "h264_mp4toannexb",
            "-f",
            "h264",
            path_str(path),
        ],
    );
}

/// The segments of a playlist file, each with whether it follows an
/// `EXT-X-DISCONTINUITY`.
fn segments_with_discontinuity(path: &Path) -> Vec<(String, bool)> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut out = Vec::new();
    let mut pending = false;
    for line in text.lines().map(str::trim) {
        if line == "#EXT-X-DISCONTINUITY" {
            pending = true;
        } else if !line.is_empty() && !line.starts_with('#') {
            out.push((line.to_owned(), std::mem::take(&mut pending)));
        }
    }
    out
}

/// A publisher whose encoder switches resolution (new SPS at an IDR) halfway:
/// the new size starts a new segment after a discontinuity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolution_change_mid_stream_starts_a_discontinuity() {
    let server = Server::start("").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (_, ogg) = extract_sample(tmp.path()).unwrap();
    let (big, small) = (tmp.path().join("big.h264"), tmp.path().join("small.h264"));
    annexb(&big, "640x360", "3");
    annexb(&small, "320x180", "3");
    let both = tmp.path().join("both.h264");
    let mut bytes = std::fs::read(&big).unwrap();
    bytes.extend(std::fs::read(&small).unwrap());
    std::fs::write(&both, bytes).unwrap();

    let report = publish_with(
        opts(&server, "switch", both, ogg, 6),
        PublishExtra::default(),
    )
    .await
    .unwrap();
    assert_eq!(report.video_frames_sent, 180);
    let playlist = check_hls(
        &server,
        "switch",
        Expect {
            sent_secs: 6.0,
            codecs: &["h264", "aac"],
            size: None,
            lip_sync: Some((0.0, 0.1)),
        },
    )
    .await;
    assert!(playlist.discontinuities >= 1, "{playlist:?}");

    // Each segment on its own: 640x360 before the switch (3 s), 320x180 after.
    let dir = server.hls_dir("switch");
    let marked = segments_with_discontinuity(&dir.join("index.m3u8"));
    assert_eq!(marked.len(), playlist.segments.len());
    let mut start = 0.0;
    let mut probed = Vec::new();
    for ((uri, duration), (_, discontinuity)) in playlist.segments.iter().zip(&marked) {
        let file = dir.join(uri);
        let streams = ffprobe_streams(path_str(&file)).unwrap();
        let size = streams
            .iter()
            .find(|s| s.codec == "h264")
            .map(|v| (v.width.unwrap_or(0), v.height.unwrap_or(0)));
        let errors = ffmpeg_decode_errors(path_str(&file)).unwrap();
        probed.push((uri, start, *duration, *discontinuity, size, errors));
        start += duration;
    }
    let report = probed
        .iter()
        .map(|(uri, start, d, disc, size, errors)| {
            format!("{uri} at {start:.3} s, {d:.3} s, discontinuity {disc}, {size:?} {errors}")
        })
        .collect::<Vec<_>>()
        .join("\n");
    eprintln!("{report}");
    for (uri, start, duration, discontinuity, size, errors) in &probed {
        if start + duration <= 3.05 {
            assert_eq!(
                *size,
                Some((640, 360)),
                "{uri} before the switch:\n{report}"
            );
        } else if *start >= 2.95 {
            assert_eq!(*size, Some((320, 180)), "{uri} after the switch:\n{report}");
        } else {
            panic!("{uri} straddles the switch at 3 s:\n{report}");
        }
        let at_switch = (start - 3.0).abs() < 0.05;
        assert_eq!(
            *discontinuity, at_switch,
            "{uri}: the discontinuity is exactly at the switch:\n{report}"
        );
        assert!(errors.trim().is_empty(), "{uri} decode errors:\n{report}");
    }
}
