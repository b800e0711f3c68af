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
    wait_for("EXT-X-ENDLIST", Duration::from_secs(30), || {
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
    check_hls_target(server, stream, expect, 2).await
}

/// [`check_hls`] for a stream whose `EXT-X-TARGETDURATION` is
/// `target_duration` (other segment durations than the default 2 s).
pub async fn check_hls_target(
    server: &Server,
    stream: &str,
    expect: Expect<'_>,
    target_duration: u64,
) -> MediaPlaylist {
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
    assert_eq!(playlist.target_duration, target_duration, "{playlist:?}");
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
    // A declared audio stream must carry audio (ffprobe gives an empty
    // one a sample rate of 0).
    for s in streams
        .iter()
        .filter(|s| matches!(s.codec.as_str(), "aac" | "opus"))
    {
        assert!(
            s.sample_rate > Some(0),
            "{url}: audio without samples: {s:?}"
        );
    }
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

/// One `EXT-X-PART` of an LL-HLS playlist.
#[derive(Debug, Clone, PartialEq)]
pub struct LlPart {
    /// Media sequence number of its segment.
    pub msn: u64,
    /// Index in its segment.
    pub index: u64,
    pub uri: String,
    /// Seconds.
    pub duration: f64,
    pub independent: bool,
    /// Unix time of the part's first frame, in ms: its segment's
    /// `EXT-X-PROGRAM-DATE-TIME` plus the parts before it.
    pub start_unix_ms: f64,
}

/// What the LL-HLS tests read in a media playlist.
#[derive(Debug, Clone, Default)]
pub struct LlPlaylist {
    pub text: String,
    pub version: u64,
    pub media_sequence: u64,
    pub skipped: u64,
    /// Complete segments listed: (msn, URI, seconds).
    pub segments: Vec<(u64, String, f64)>,
    pub parts: Vec<LlPart>,
    pub part_target: Option<f64>,
    /// `EXT-X-SERVER-CONTROL` attributes, as written.
    pub server_control: Option<String>,
    pub preload_hint: Option<String>,
    pub maps: Vec<String>,
    pub ended: bool,
}

impl LlPlaylist {
    /// The newest part: its segment and index.
    pub fn last_part(&self) -> Option<&LlPart> {
        self.parts.last()
    }
}

/// The `NAME=value` attribute of a tag's attribute list (quotes removed).
pub fn attribute<'a>(attributes: &'a str, name: &str) -> Option<&'a str> {
    let mut rest = attributes;
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let (value, next) = if let Some(quoted) = after.strip_prefix('"') {
            let end = quoted.find('"')?;
            (&quoted[..end], quoted[end + 1..].trim_start_matches(','))
        } else {
            match after.split_once(',') {
                Some((v, n)) => (v, n),
                None => (after, ""),
            }
        };
        if key == name {
            return Some(value);
        }
        rest = next;
    }
    None
}

/// Parses a (LL-)HLS media playlist line by line; panics on what the
/// gateway would never write.
pub fn parse_ll_playlist(text: &str) -> LlPlaylist {
    let mut p = LlPlaylist {
        text: text.to_owned(),
        ..LlPlaylist::default()
    };
    assert!(text.starts_with("#EXTM3U\n"), "{text}");
    let (mut msn, mut index, mut pdt, mut offset) = (None::<u64>, 0, f64::NAN, 0.0);
    let mut extinf = None;
    for line in text.lines().skip(1) {
        let next_msn = |p: &LlPlaylist| p.media_sequence + p.skipped + p.segments.len() as u64;
        if let Some(v) = line.strip_prefix("#EXT-X-VERSION:") {
            p.version = v.parse().unwrap();
        } else if let Some(v) = line.strip_prefix("#EXT-X-MEDIA-SEQUENCE:") {
            p.media_sequence = v.parse().unwrap();
        } else if let Some(v) = line.strip_prefix("#EXT-X-SKIP:") {
            p.skipped = attribute(v, "SKIPPED-SEGMENTS").unwrap().parse().unwrap();
        } else if let Some(v) = line.strip_prefix("#EXT-X-PART-INF:") {
            p.part_target = Some(attribute(v, "PART-TARGET").unwrap().parse().unwrap());
        } else if let Some(v) = line.strip_prefix("#EXT-X-SERVER-CONTROL:") {
            p.server_control = Some(v.to_owned());
        } else if let Some(v) = line.strip_prefix("#EXT-X-MAP:") {
            p.maps.push(attribute(v, "URI").unwrap().to_owned());
        } else if let Some(v) = line.strip_prefix("#EXT-X-PROGRAM-DATE-TIME:") {
            pdt = rfc3339_unix_ms(v);
            offset = 0.0;
        } else if let Some(v) = line.strip_prefix("#EXT-X-PART:") {
            let current = next_msn(&p);
            if msn != Some(current) {
                (msn, index) = (Some(current), 0);
            }
            let duration: f64 = attribute(v, "DURATION").unwrap().parse().unwrap();
            p.parts.push(LlPart {
                msn: current,
                index,
                uri: attribute(v, "URI").unwrap().to_owned(),
                duration,
                independent: attribute(v, "INDEPENDENT") == Some("YES"),
                start_unix_ms: pdt + offset * 1000.0,
            });
            index += 1;
            offset += duration;
        } else if let Some(v) = line.strip_prefix("#EXT-X-PRELOAD-HINT:") {
            assert_eq!(attribute(v, "TYPE"), Some("PART"));
            p.preload_hint = Some(attribute(v, "URI").unwrap().to_owned());
        } else if let Some(v) = line.strip_prefix("#EXTINF:") {
            extinf = Some(v.trim_end_matches(',').parse::<f64>().unwrap());
        } else if line == "#EXT-X-ENDLIST" {
            p.ended = true;
        } else if !line.starts_with('#') && !line.is_empty() {
            let seconds = extinf.take().expect("EXTINF before a URI");
            let current = next_msn(&p);
            p.segments.push((current, line.to_owned(), seconds));
        }
    }
    p
}

/// `YYYY-MM-DDThh:mm:ss.sssZ` as Unix milliseconds.
pub fn rfc3339_unix_ms(text: &str) -> f64 {
    let n = |range: std::ops::Range<usize>| -> i64 { text[range].parse().unwrap() };
    assert!(text.len() >= 20 && text.ends_with('Z'), "{text}");
    let (year, month, day) = (n(0..4), n(5..7), n(8..10));
    let seconds: f64 = text[17..text.len() - 1].parse().unwrap();
    // Howard Hinnant's days_from_civil.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + n(11..13) * 3600 + n(14..16) * 60;
    (secs as f64 + seconds) * 1000.0
}
