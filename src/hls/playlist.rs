//! Live sliding-window media playlist, rendered with `m3u8-rs`.
//!
//! Every segment carries `EXT-X-PROGRAM-DATE-TIME` (RFC 3339, milliseconds,
//! UTC); a segment after a break carries `EXT-X-DISCONTINUITY`, and
//! `EXT-X-DISCONTINUITY-SEQUENCE` counts the breaks that slid out of the
//! window. `EXT-X-TARGETDURATION` is the longest segment ever pushed rounded
//! to the nearest second (RFC 8216 §4.3.3.1 compares rounded `EXTINF`s with
//! it), never below the configured target, so it never shrinks.
//!
//! `m3u8-rs` leaves out `EXT-X-MEDIA-SEQUENCE` and
//! `EXT-X-DISCONTINUITY-SEQUENCE` while they are 0, which the HLS spec
//! defines as the same thing.

use std::collections::VecDeque;
use std::time::Duration;

use m3u8_rs::{ExtTag, MediaPlaylist, MediaSegment};

use super::segmenter::Segment;

/// HLS protocol version written: decimal `EXTINF` needs 3.
const VERSION: usize = 3;
const MS_PER_DAY: i64 = 86_400_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlaylistConfig {
    /// The segmenter's target duration; the floor of `EXT-X-TARGETDURATION`.
    pub target_duration: Duration,
    /// Segments listed at once (at least 1).
    pub window: usize,
}

impl Default for PlaylistConfig {
    fn default() -> Self {
        Self {
            target_duration: Duration::from_secs(2),
            window: 6,
        }
    }
}

/// The media playlist of one live rendition.
#[derive(Debug, Clone)]
pub struct Playlist {
    window: usize,
    min_target_secs: u64,
    entries: VecDeque<Entry>,
    /// Discontinuities that have left the window.
    discontinuity_sequence: u64,
    /// Longest segment pushed so far, in milliseconds.
    longest_ms: u64,
    ended: bool,
}

#[derive(Debug, Clone)]
struct Entry {
    sequence: u64,
    duration_ms: u64,
    discontinuity: bool,
    program_date_time_ms: i64,
}

impl Playlist {
    pub fn new(config: PlaylistConfig) -> Self {
        let target_ms = u64::try_from(config.target_duration.as_millis()).unwrap_or(u64::MAX);
        Self {
            window: config.window.max(1),
            min_target_secs: target_ms.div_ceil(1000).max(1),
            entries: VecDeque::new(),
            discontinuity_sequence: 0,
            longest_ms: 0,
            ended: false,
        }
    }

    /// The URI (and file name) of a segment.
    pub fn segment_uri(sequence: u64) -> String {
        format!("seg{sequence}.ts")
    }

    /// Appends a complete segment. Returns the URIs of the segments that left
    /// the window, oldest first, for the caller to delete. A push after
    /// [`Playlist::end`] reopens the playlist (the publisher came back).
    pub fn push(&mut self, segment: &Segment) -> Vec<String> {
        let duration_ms = if segment.duration.is_finite() && segment.duration > 0.0 {
            // Saturating float-to-int cast.
            (segment.duration * 1000.0).round() as u64
        } else {
            0
        };
        self.longest_ms = self.longest_ms.max(duration_ms);
        self.ended = false;
        self.entries.push_back(Entry {
            sequence: segment.sequence,
            duration_ms,
            discontinuity: segment.discontinuity,
            program_date_time_ms: segment.program_date_time_ms,
        });
        let mut removed = Vec::new();
        while self.entries.len() > self.window {
            if let Some(old) = self.entries.pop_front() {
                if old.discontinuity {
                    self.discontinuity_sequence += 1;
                }
                removed.push(Self::segment_uri(old.sequence));
            }
        }
        removed
    }

    /// Marks the playlist as complete (`EXT-X-ENDLIST`).
    pub fn end(&mut self) {
        self.ended = true;
    }

    pub fn is_ended(&self) -> bool {
        self.ended
    }

    /// Sequence number of the first listed segment (`EXT-X-MEDIA-SEQUENCE`).
    pub fn media_sequence(&self) -> u64 {
        self.entries.front().map_or(0, |e| e.sequence)
    }

    /// The sequence number that follows the last pushed segment (0 before
    /// any), for a new segmenter to carry on from.
    pub fn next_sequence(&self) -> u64 {
        self.entries.back().map_or(0, |e| e.sequence + 1)
    }

    /// `EXT-X-TARGETDURATION` in seconds.
    pub fn target_duration(&self) -> u64 {
        self.longest_ms
            .saturating_add(500)
            .checked_div(1000)
            .unwrap_or(0)
            .max(self.min_target_secs)
    }

    /// The playlist text.
    pub fn render(&self) -> String {
        let playlist = MediaPlaylist {
            version: Some(VERSION),
            target_duration: self.target_duration(),
            media_sequence: self.media_sequence(),
            discontinuity_sequence: self.discontinuity_sequence,
            end_list: self.ended,
            segments: self.entries.iter().map(Entry::to_media_segment).collect(),
            ..MediaPlaylist::default()
        };
        let mut text = Vec::new();
        // Writing into a Vec cannot fail.
        let _ = playlist.write_to(&mut text);
        String::from_utf8_lossy(&text).into_owned()
    }
}

impl Entry {
    fn to_media_segment(&self) -> MediaSegment {
        MediaSegment {
            uri: Playlist::segment_uri(self.sequence),
            duration: self.duration_ms as f32 / 1000.0,
            discontinuity: self.discontinuity,
            // m3u8-rs's own date field would need chrono; this renders the same line.
            unknown_tags: vec![ExtTag {
                tag: "X-PROGRAM-DATE-TIME".to_owned(),
                rest: Some(rfc3339_ms(self.program_date_time_ms)),
            }],
            ..MediaSegment::default()
        }
    }
}

/// Unix milliseconds as `YYYY-MM-DDThh:mm:ss.sssZ`.
fn rfc3339_ms(unix_ms: i64) -> String {
    let days = unix_ms.div_euclid(MS_PER_DAY);
    let ms_of_day = unix_ms.rem_euclid(MS_PER_DAY);
    let (year, month, day) = civil_from_days(days);
    let seconds = ms_of_day / 1000;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60,
        ms_of_day % 1000
    )
}

/// Proleptic Gregorian date of a count of days since 1970-01-01
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_700_000_000_000;

    fn segment(sequence: u64, duration: f64, discontinuity: bool) -> Segment {
        Segment {
            sequence,
            duration,
            data: Vec::new(),
            discontinuity,
            program_date_time_ms: T0 + sequence as i64 * 2000,
            starts_with_keyframe: true,
        }
    }

    fn twos(count: u64) -> Vec<Segment> {
        (0..count).map(|i| segment(i, 2.0, false)).collect()
    }

    #[test]
    fn golden_playlists() {
        let window = |window| PlaylistConfig {
            window,
            ..PlaylistConfig::default()
        };
        let cases: Vec<(&str, PlaylistConfig, Vec<Segment>, bool, &str)> = vec![
            (
                "empty",
                PlaylistConfig::default(),
                vec![],
                false,
                "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:2\n",
            ),
            (
                "two segments, target is the rounded longest",
                PlaylistConfig::default(),
                vec![segment(0, 2.0, false), segment(1, 2.0333, false)],
                false,
                "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:2\n\
                 #EXT-X-PROGRAM-DATE-TIME:2023-11-14T22:13:20.000Z\n#EXTINF:2,\nseg0.ts\n\
                 #EXT-X-PROGRAM-DATE-TIME:2023-11-14T22:13:22.000Z\n#EXTINF:2.033,\nseg1.ts\n",
            ),
            (
                "configured target is the floor",
                PlaylistConfig {
                    target_duration: Duration::from_millis(4500),
                    window: 6,
                },
                vec![segment(0, 1.5, false)],
                false,
                "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:5\n\
                 #EXT-X-PROGRAM-DATE-TIME:2023-11-14T22:13:20.000Z\n#EXTINF:1.5,\nseg0.ts\n",
            ),
            (
                "sliding window",
                window(2),
                twos(5),
                false,
                "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:2\n#EXT-X-MEDIA-SEQUENCE:3\n\
                 #EXT-X-PROGRAM-DATE-TIME:2023-11-14T22:13:26.000Z\n#EXTINF:2,\nseg3.ts\n\
                 #EXT-X-PROGRAM-DATE-TIME:2023-11-14T22:13:28.000Z\n#EXTINF:2,\nseg4.ts\n",
            ),
            (
                "discontinuity in the window",
                window(3),
                vec![
                    segment(0, 2.0, false),
                    segment(1, 1.0, false),
                    segment(2, 2.0, true),
                ],
                false,
                "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:2\n\
                 #EXT-X-PROGRAM-DATE-TIME:2023-11-14T22:13:20.000Z\n#EXTINF:2,\nseg0.ts\n\
                 #EXT-X-PROGRAM-DATE-TIME:2023-11-14T22:13:22.000Z\n#EXTINF:1,\nseg1.ts\n\
                 #EXT-X-DISCONTINUITY\n\
                 #EXT-X-PROGRAM-DATE-TIME:2023-11-14T22:13:24.000Z\n#EXTINF:2,\nseg2.ts\n",
            ),
            (
                "discontinuity slid out",
                window(2),
                vec![
                    segment(0, 2.0, false),
                    segment(1, 2.0, true),
                    segment(2, 2.0, false),
                    segment(3, 2.0, true),
                ],
                false,
                "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:2\n#EXT-X-MEDIA-SEQUENCE:2\n\
                 #EXT-X-DISCONTINUITY-SEQUENCE:1\n\
                 #EXT-X-PROGRAM-DATE-TIME:2023-11-14T22:13:24.000Z\n#EXTINF:2,\nseg2.ts\n\
                 #EXT-X-DISCONTINUITY\n\
                 #EXT-X-PROGRAM-DATE-TIME:2023-11-14T22:13:26.000Z\n#EXTINF:2,\nseg3.ts\n",
            ),
            (
                "ended",
                window(6),
                twos(1),
                true,
                "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:2\n\
                 #EXT-X-PROGRAM-DATE-TIME:2023-11-14T22:13:20.000Z\n#EXTINF:2,\nseg0.ts\n\
                 #EXT-X-ENDLIST\n",
            ),
        ];
        for (name, config, segments, ended, expected) in cases {
            let mut playlist = Playlist::new(config);
            for segment in &segments {
                let _ = playlist.push(segment);
            }
            if ended {
                playlist.end();
            }
            let text = playlist.render();
            assert_eq!(text, expected, "{name}");
            // What we write, a parser reads back.
            let parsed = m3u8_rs::parse_media_playlist_res(text.as_bytes()).expect(name);
            assert_eq!(
                parsed.segments.len(),
                segments.len().min(config.window),
                "{name}"
            );
            assert!(
                parsed
                    .segments
                    .iter()
                    .all(|s| s.program_date_time.is_some())
            );
            assert_eq!(parsed.end_list, ended, "{name}");
        }
    }

    #[test]
    fn sliding_out_returns_removed_uris() {
        let mut playlist = Playlist::new(PlaylistConfig::default());
        let removed: Vec<Vec<String>> = twos(8).iter().map(|s| playlist.push(s)).collect();
        assert!(removed[..6].iter().all(Vec::is_empty));
        assert_eq!(removed[6], ["seg0.ts"]);
        assert_eq!(removed[7], ["seg1.ts"]);
        assert_eq!(playlist.media_sequence(), 2);
        assert_eq!(playlist.next_sequence(), 8);
        assert_eq!(Playlist::new(PlaylistConfig::default()).next_sequence(), 0);

        // A window of 0 behaves as 1.
        let mut tiny = Playlist::new(PlaylistConfig {
            window: 0,
            ..PlaylistConfig::default()
        });
        assert!(tiny.push(&segment(0, 2.0, false)).is_empty());
        assert_eq!(tiny.push(&segment(1, 2.0, false)), ["seg0.ts"]);
    }

    #[test]
    fn target_duration_never_shrinks_and_push_reopens() {
        let mut playlist = Playlist::new(PlaylistConfig {
            window: 1,
            ..PlaylistConfig::default()
        });
        let _ = playlist.push(&segment(0, 7.2, false));
        let _ = playlist.push(&segment(1, 2.0, false));
        assert_eq!(playlist.target_duration(), 7);
        let _ = playlist.push(&segment(2, 7.6, false));
        assert_eq!(playlist.target_duration(), 8);
        playlist.end();
        assert!(playlist.is_ended());
        let _ = playlist.push(&segment(3, 2.0, true));
        assert!(!playlist.is_ended());
        assert!(!playlist.render().contains("ENDLIST"));
        // Nonsense durations are listed as 0 rather than breaking anything.
        let _ = playlist.push(&segment(3, f64::NAN, false));
        assert!(playlist.render().contains("#EXTINF:0,"));
    }

    #[test]
    fn dates_are_rfc3339_utc_with_milliseconds() {
        for (ms, text) in [
            (0, "1970-01-01T00:00:00.000Z"),
            (T0 + 123, "2023-11-14T22:13:20.123Z"),
            (1_709_164_800_000, "2024-02-29T00:00:00.000Z"),
            (951_868_799_999, "2000-02-29T23:59:59.999Z"),
            (-1, "1969-12-31T23:59:59.999Z"),
        ] {
            assert_eq!(rfc3339_ms(ms), text);
        }
        // Extremes format without overflowing.
        let _ = rfc3339_ms(i64::MAX);
        let _ = rfc3339_ms(i64::MIN);
    }
}
