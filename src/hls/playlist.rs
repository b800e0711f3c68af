//! Live sliding-window media playlist, rendered with `m3u8-rs`.
//!
//! Every segment carries `EXT-X-PROGRAM-DATE-TIME` (RFC 3339, milliseconds,
//! UTC); a segment after a break carries `EXT-X-DISCONTINUITY`, and
//! `EXT-X-DISCONTINUITY-SEQUENCE` counts the breaks that slid out of the
//! window. `EXT-X-TARGETDURATION` is the ceiling of the longest segment ever
//! pushed, and never below the configured target, so it never shrinks.
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

    /// `EXT-X-TARGETDURATION` in seconds.
    pub fn target_duration(&self) -> u64 {
        self.longest_ms.div_ceil(1000).max(self.min_target_secs)
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
