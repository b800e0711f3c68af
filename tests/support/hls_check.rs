//! The HLS checks the end-to-end tests share.
#![allow(dead_code)]

use std::time::Duration;

use super::server::{
    MediaPlaylist, Server, ffmpeg_decode_errors, ffprobe_streams, read_playlist, wait_for,
};

pub fn total(p: &MediaPlaylist) -> f64 {
    p.segments.iter().map(|s| s.1).sum()
}

/// Waits (bounded) for the playlist to get `EXT-X-ENDLIST`, written once the
/// last segment is flushed after the publisher left.
pub async fn ended_playlist(server: &Server, stream: &str) -> MediaPlaylist {
    let path = server.hls_dir(stream).join("index.m3u8");
    wait_for("EXT-X-ENDLIST", Duration::from_secs(5), || {
        read_playlist(&path).ok().filter(|p| p.ended)
    })
    .await
    .unwrap()
}

/// What a finished publication's HLS must show.
pub struct Expect<'a> {
    /// Seconds of media published; the playlist lists this within 10%.
    pub sent_secs: f64,
    /// Codecs ffprobe finds, in order.
    pub codecs: &'a [&'a str],
    /// The video resolution, when it is a single one.
    pub size: Option<(u64, u64)>,
    /// Expected audio start minus video start and the tolerance, in s.
    pub lip_sync: Option<(f64, f64)>,
}

/// The checks every finished publication must pass: `EXT-X-ENDLIST`,
/// duration, segment durations within the target, a program date time per
/// segment, the codecs, size and lip sync ffprobe finds, a full decode
/// without errors, and no panic in the server log.
pub async fn check_hls(server: &Server, stream: &str, expect: Expect<'_>) -> MediaPlaylist {
    let Expect {
        sent_secs,
        codecs,
        size,
        lip_sync,
    } = expect;
    let playlist = ended_playlist(server, stream).await;
    let listed = total(&playlist);
    assert!(
        (listed - sent_secs).abs() <= sent_secs * 0.1,
        "listed {listed:.3} s, sent {sent_secs} s: {playlist:?}"
    );
    assert_eq!(playlist.target_duration, 2, "{playlist:?}");
    for (uri, d) in &playlist.segments {
        assert!(
            d.round() as u64 <= playlist.target_duration,
            "{uri} lasts {d} s, over the target duration"
        );
    }
    assert_eq!(playlist.program_date_times, playlist.segments.len());

    let url = server.url(&format!("/hls/{stream}/index.m3u8"));
    let streams = ffprobe_streams(&url).unwrap();
    let found: Vec<_> = streams.iter().map(|s| s.codec.as_str()).collect();
    assert_eq!(found, codecs, "streams in the HLS");
    if let Some((w, h)) = size {
        let video = streams.iter().find(|s| s.codec == "h264").expect("video");
        assert_eq!((video.width, video.height), (Some(w), Some(h)));
    }
    if let Some((expected, tolerance)) = lip_sync {
        check_lip_sync(&url, expected, tolerance);
    }
    let errors = ffmpeg_decode_errors(&url).unwrap();
    assert!(errors.trim().is_empty(), "decode errors:\n{errors}");
    assert!(!server.log().contains("panicked"), "{}", server.log());
    playlist
}

/// Audio start minus video start, in s, as ffprobe sees them.
pub fn av_offset(input: &str) -> f64 {
    let streams = ffprobe_streams(input).unwrap();
    let start = |codec: &[&str]| {
        streams
            .iter()
            .find(|s| codec.contains(&s.codec.as_str()))
            .unwrap_or_else(|| panic!("no {codec:?} in {input}: {streams:?}"))
            .start_time
    };
    start(&["aac", "opus"]) - start(&["h264"])
}

/// Audio and video start `expected` s apart (audio minus video), within
/// `tolerance`.
pub fn check_lip_sync(input: &str, expected: f64, tolerance: f64) {
    let offset = av_offset(input);
    assert!(
        (offset - expected).abs() <= tolerance,
        "audio starts {offset:.3} s after video in the HLS, expected {expected:.3} s \
         (±{tolerance} s): audio/video out of sync by {:.0} ms",
        (offset - expected) * 1000.0
    );
}
