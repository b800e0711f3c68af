//! Live sliding-window media playlist: MPEG-TS, fMP4 and Low-Latency HLS.
//!
//! Every segment carries `EXT-X-PROGRAM-DATE-TIME` (RFC 3339, milliseconds,
//! UTC); a segment after a break carries `EXT-X-DISCONTINUITY`, and
//! `EXT-X-DISCONTINUITY-SEQUENCE` counts the breaks that slid out of the
//! window. `EXT-X-TARGETDURATION` is the longest segment ever pushed rounded
//! to the nearest second (RFC 8216 §4.3.3.1 compares rounded `EXTINF`s with
//! it), never below the configured target, so it never shrinks.
//! `EXT-X-MEDIA-SEQUENCE` and `EXT-X-DISCONTINUITY-SEQUENCE` are left out
//! while they are 0, which the HLS spec defines as the same thing.
//!
//! [`PlaylistFormat::Fmp4`] (version 7) names `segN.m4s` segments and puts
//! an `EXT-X-MAP` pointing at `initN.mp4` before the first listed segment and
//! wherever the init segment changes.
//!
//! [`PlaylistFormat::LowLatency`] adds, per RFC 8216bis:
//! - `EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,CAN-SKIP-UNTIL=<6 × target
//!   duration>,PART-HOLD-BACK=<3 × part target>` and
//!   `EXT-X-PART-INF:PART-TARGET=<part target>`;
//! - `EXT-X-PART` lines (`partK.m4s`, `K` counting every part of the stream,
//!   `INDEPENDENT=YES` on parts that start with a keyframe) before the
//!   segment they make up, for the segments that start at most three target
//!   durations before the end of the playlist (§6.2.2: older part tags
//!   SHOULD go), and for the segment being built after the last complete one;
//! - `EXT-X-PRELOAD-HINT:TYPE=PART` naming the next part while the playlist
//!   is live;
//! - delta updates ([`Playlist::render_delta`]): the segments that start more
//!   than `CAN-SKIP-UNTIL` seconds before the end of the last segment are
//!   replaced by `EXT-X-SKIP:SKIPPED-SEGMENTS=n` (version 9).
//!
//! Parts are numbered across segments so that a preload hint stays right
//! whichever segment the next part ends up in. In a ladder each rendition's
//! playlist ends with an `EXT-X-RENDITION-REPORT` per other rendition
//! ([`Playlist::set_rendition_reports`]), so players switching renditions
//! know where to block.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::time::Duration;

use super::segmenter::Segment;

/// HLS protocol version of MPEG-TS playlists: decimal `EXTINF` needs 3.
const VERSION: usize = 3;
/// fMP4 playlists: `EXT-X-MAP` in a media playlist needs 6; 7 as CMAF
/// packagers write.
const VERSION_FMP4: usize = 7;
/// Playlist delta updates: `EXT-X-SKIP` needs 9.
const VERSION_SKIP: usize = 9;
const MS_PER_DAY: i64 = 86_400_000;
/// Part tags are listed for segments starting this many target durations
/// before the end of the playlist at most.
const PART_LIST_TARGETS: u64 = 3;
/// `CAN-SKIP-UNTIL`, in target durations (the spec's minimum).
const SKIP_TARGETS: u64 = 6;
/// `PART-HOLD-BACK`, in part targets (the spec's recommendation).
const PART_HOLD_BACK_PARTS: u64 = 3;

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

/// Which segments the playlist lists and which tags it writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PlaylistFormat {
    /// `segN.ts`, version 3.
    #[default]
    MpegTs,
    /// `initN.mp4` + `segN.m4s`, version 7.
    Fmp4,
    /// fMP4 with LL-HLS parts of at most `part_target`.
    LowLatency { part_target: Duration },
}

impl PlaylistFormat {
    fn is_fmp4(self) -> bool {
        self != PlaylistFormat::MpegTs
    }
}

/// What a segment says about itself in the playlist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHead {
    /// Media sequence number.
    pub sequence: u64,
    /// The segment follows a break (new publisher, new codec parameters).
    pub discontinuity: bool,
    /// Unix time of the segment's first frame, in milliseconds.
    pub program_date_time_ms: i64,
    /// The init segment (`initN.mp4`) it needs (fMP4).
    pub init: Option<u64>,
}

/// One LL-HLS part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartEntry {
    /// `K` of `partK.m4s`: counts every part of the stream.
    pub number: u64,
    pub duration_ms: u64,
    /// Starts with a keyframe (`INDEPENDENT=YES`).
    pub independent: bool,
}

/// The media playlist of one live rendition.
#[derive(Debug, Clone)]
pub struct Playlist {
    format: PlaylistFormat,
    window: usize,
    min_target_secs: u64,
    entries: VecDeque<Entry>,
    /// LL-HLS: the segment being built, with its parts so far.
    open: Option<Entry>,
    /// Number of the next part (the preload hint).
    next_part: u64,
    /// Discontinuities that have left the window.
    discontinuity_sequence: u64,
    /// Longest segment pushed so far, in milliseconds.
    longest_ms: u64,
    ended: bool,
    /// LL-HLS in a ladder: where the other renditions are.
    reports: Vec<RenditionReport>,
}

/// `EXT-X-RENDITION-REPORT`: another rendition's live edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenditionReport {
    /// Its media playlist, relative to this one.
    pub uri: String,
    /// `LAST-MSN`: the sequence number of its last segment or, with parts,
    /// of its last part's segment.
    pub last_msn: u64,
    /// `LAST-PART`: the index of its last part in that segment.
    pub last_part: Option<u32>,
}

#[derive(Debug, Clone)]
struct Entry {
    head: SegmentHead,
    duration_ms: u64,
    parts: Vec<PartEntry>,
}

/// How [`Playlist::write`] renders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Style {
    /// Everything the format has.
    Full,
    /// A Playlist Delta Update (LL-HLS).
    Delta,
    /// The format's segments without LL-HLS tags.
    Plain,
}

impl Playlist {
    /// An MPEG-TS playlist.
    pub fn new(config: PlaylistConfig) -> Self {
        Self::with_format(config, PlaylistFormat::MpegTs)
    }

    pub fn with_format(config: PlaylistConfig, format: PlaylistFormat) -> Self {
        let target_ms = u64::try_from(config.target_duration.as_millis()).unwrap_or(u64::MAX);
        Self {
            format,
            window: config.window.max(1),
            min_target_secs: target_ms.div_ceil(1000).max(1),
            entries: VecDeque::new(),
            open: None,
            next_part: 0,
            discontinuity_sequence: 0,
            longest_ms: 0,
            ended: false,
            reports: Vec::new(),
        }
    }

    pub fn format(&self) -> PlaylistFormat {
        self.format
    }

    /// The URI (and file name) of an MPEG-TS segment.
    pub fn segment_uri(sequence: u64) -> String {
        format!("seg{sequence}.ts")
    }

    /// The URI (and file name) of an fMP4 media segment.
    pub fn fmp4_segment_uri(sequence: u64) -> String {
        format!("seg{sequence}.m4s")
    }

    /// The URI (and file name) of an init segment.
    pub fn init_uri(number: u64) -> String {
        format!("init{number}.mp4")
    }

    /// The URI of an LL-HLS part.
    pub fn part_uri(number: u64) -> String {
        format!("part{number}.m4s")
    }

    /// The URI of a segment in this playlist's format.
    pub fn uri(&self, sequence: u64) -> String {
        if self.format.is_fmp4() {
            Self::fmp4_segment_uri(sequence)
        } else {
            Self::segment_uri(sequence)
        }
    }

    /// Appends a complete MPEG-TS segment; see [`Playlist::push_segment`].
    pub fn push(&mut self, segment: &Segment) -> Vec<String> {
        let head = SegmentHead {
            sequence: segment.sequence,
            discontinuity: segment.discontinuity,
            program_date_time_ms: segment.program_date_time_ms,
            init: None,
        };
        self.push_segment(head, segment.duration)
    }

    /// Appends a complete segment of `duration` seconds (with the parts
    /// pushed for it, if any). Returns the URIs of the segments that left
    /// the window, oldest first, for the caller to delete. A push after
    /// [`Playlist::end`] reopens the playlist (the publisher came back).
    pub fn push_segment(&mut self, head: SegmentHead, duration: f64) -> Vec<String> {
        let duration_ms = if duration.is_finite() && duration > 0.0 {
            // Saturating float-to-int cast.
            (duration * 1000.0).round() as u64
        } else {
            0
        };
        self.longest_ms = self.longest_ms.max(duration_ms);
        self.ended = false;
        let parts = match self.open.take() {
            Some(open) if open.head.sequence == head.sequence => open.parts,
            _ => Vec::new(),
        };
        self.entries.push_back(Entry {
            head,
            duration_ms,
            parts,
        });
        let mut removed = Vec::new();
        while self.entries.len() > self.window {
            if let Some(old) = self.entries.pop_front() {
                if old.head.discontinuity {
                    self.discontinuity_sequence += 1;
                }
                removed.push(self.uri(old.head.sequence));
            }
        }
        removed
    }

    /// Adds a part to the segment being built (LL-HLS); the first part of a
    /// segment opens it with `head`. A segment left open with parts of
    /// another sequence number is dropped (its parts were never completed).
    pub fn push_part(&mut self, head: SegmentHead, part: PartEntry) {
        self.ended = false;
        self.next_part = self.next_part.max(part.number + 1);
        match &mut self.open {
            Some(open) if open.head.sequence == head.sequence => open.parts.push(part),
            open => {
                *open = Some(Entry {
                    head,
                    duration_ms: 0,
                    parts: vec![part],
                })
            }
        }
    }

    /// Marks the playlist as complete (`EXT-X-ENDLIST`). Parts of a segment
    /// that was never completed are dropped.
    pub fn end(&mut self) {
        self.ended = true;
        self.open = None;
    }

    pub fn is_ended(&self) -> bool {
        self.ended
    }

    /// Sequence number of the first listed segment (`EXT-X-MEDIA-SEQUENCE`).
    pub fn media_sequence(&self) -> u64 {
        self.entries.front().map_or(0, |e| e.head.sequence)
    }

    /// The sequence number that follows the last pushed segment (0 before
    /// any), for a new segmenter to carry on from.
    pub fn next_sequence(&self) -> u64 {
        self.entries.back().map_or(0, |e| e.head.sequence + 1)
    }

    /// The last complete segment.
    pub fn last_segment(&self) -> Option<u64> {
        self.entries.back().map(|e| e.head.sequence)
    }

    /// The newest part: its segment's sequence number and its index in it.
    pub fn last_part(&self) -> Option<(u64, u32)> {
        let with_parts = |e: &Entry| {
            let index = u32::try_from(e.parts.len().checked_sub(1)?).unwrap_or(u32::MAX);
            Some((e.head.sequence, index))
        };
        match &self.open {
            Some(open) => with_parts(open),
            None => self.entries.back().and_then(with_parts),
        }
    }

    /// The number of the part the preload hint names.
    pub fn next_part(&self) -> u64 {
        self.next_part
    }

    /// The init segments the listed segments (and the one being built)
    /// need, oldest first, repeated per segment.
    pub fn init_numbers(&self) -> impl Iterator<Item = u64> + '_ {
        self.entries
            .iter()
            .chain(&self.open)
            .filter_map(|e| e.head.init)
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
        self.write(Style::Full)
    }

    /// A Playlist Delta Update (`_HLS_skip=YES`): as [`Playlist::render`]
    /// with the oldest segments skipped; the full playlist for formats other
    /// than LL-HLS and once the playlist has ended (§6.2.5.1).
    pub fn render_delta(&self) -> String {
        self.write(Style::Delta)
    }

    /// The segments in the playlist's format without any LL-HLS tag: what
    /// a plain HTTP server can serve from files.
    pub fn render_plain(&self) -> String {
        self.write(Style::Plain)
    }

    fn write(&self, style: Style) -> String {
        let low_latency = match self.format {
            PlaylistFormat::LowLatency { part_target } if style != Style::Plain => {
                Some(ms(part_target))
            }
            _ => None,
        };
        let target = self.target_duration();
        let skipped = match low_latency {
            Some(_) if style == Style::Delta && !self.ended => self.skippable(target),
            _ => 0,
        };
        let version = match self.format {
            PlaylistFormat::MpegTs => VERSION,
            _ if skipped > 0 => VERSION_SKIP,
            _ => VERSION_FMP4,
        };
        let mut out = String::with_capacity(128 + 96 * self.entries.len());
        out.push_str("#EXTM3U\n");
        let _ = writeln!(out, "#EXT-X-VERSION:{version}");
        let _ = writeln!(out, "#EXT-X-TARGETDURATION:{target}");
        if let Some(part_target_ms) = low_latency {
            let _ = writeln!(
                out,
                "#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,CAN-SKIP-UNTIL={},PART-HOLD-BACK={}",
                seconds(target * SKIP_TARGETS * 1000),
                seconds(part_target_ms * PART_HOLD_BACK_PARTS)
            );
            let _ = writeln!(
                out,
                "#EXT-X-PART-INF:PART-TARGET={}",
                seconds(part_target_ms)
            );
        }
        if self.media_sequence() != 0 {
            let _ = writeln!(out, "#EXT-X-MEDIA-SEQUENCE:{}", self.media_sequence());
        }
        if self.discontinuity_sequence != 0 {
            let _ = writeln!(
                out,
                "#EXT-X-DISCONTINUITY-SEQUENCE:{}",
                self.discontinuity_sequence
            );
        }
        if skipped > 0 {
            let _ = writeln!(out, "#EXT-X-SKIP:SKIPPED-SEGMENTS={skipped}");
        }

        // Parts are listed for segments starting within this many ms of the end.
        let total_ms: u64 = self.entries.iter().map(|e| e.duration_ms).sum::<u64>()
            + self.open.as_ref().map_or(0, Entry::parts_ms);
        let part_horizon_ms = target * PART_LIST_TARGETS * 1000;
        let mut start_ms: u64 = self
            .entries
            .iter()
            .take(skipped)
            .map(|e| e.duration_ms)
            .sum();
        let mut map = None;
        // The segment being built shows only through its parts.
        let open = self.open.iter().filter(|_| low_latency.is_some());
        let listed =
            (self.entries.iter().skip(skipped).map(|e| (e, true))).chain(open.map(|e| (e, false)));
        for (entry, complete) in listed {
            if entry.head.discontinuity {
                out.push_str("#EXT-X-DISCONTINUITY\n");
            }
            if self.format.is_fmp4() && entry.head.init != map {
                map = entry.head.init;
                if let Some(init) = map {
                    let _ = writeln!(out, "#EXT-X-MAP:URI=\"{}\"", Self::init_uri(init));
                }
            }
            let _ = writeln!(
                out,
                "#EXT-X-PROGRAM-DATE-TIME:{}",
                rfc3339_ms(entry.head.program_date_time_ms)
            );
            if low_latency.is_some() && total_ms - start_ms <= part_horizon_ms {
                for part in &entry.parts {
                    let _ = write!(
                        out,
                        "#EXT-X-PART:DURATION={},URI=\"{}\"",
                        seconds(part.duration_ms),
                        Self::part_uri(part.number)
                    );
                    out.push_str(if part.independent {
                        ",INDEPENDENT=YES\n"
                    } else {
                        "\n"
                    });
                }
            }
            if complete {
                let _ = writeln!(out, "#EXTINF:{},", seconds(entry.duration_ms));
                let _ = writeln!(out, "{}", self.uri(entry.head.sequence));
            }
            start_ms += entry.duration_ms;
        }
        if low_latency.is_some() && !self.ended {
            let _ = writeln!(
                out,
                "#EXT-X-PRELOAD-HINT:TYPE=PART,URI=\"{}\"",
                Self::part_uri(self.next_part)
            );
        }
        if low_latency.is_some() {
            for r in &self.reports {
                let _ = write!(
                    out,
                    "#EXT-X-RENDITION-REPORT:URI=\"{}\",LAST-MSN={}",
                    r.uri, r.last_msn
                );
                match r.last_part {
                    Some(part) => {
                        let _ = writeln!(out, ",LAST-PART={part}");
                    }
                    None => out.push('\n'),
                }
            }
        }
        if self.ended {
            out.push_str("#EXT-X-ENDLIST\n");
        }
        out
    }

    /// The other renditions' edges, written (LL-HLS only) from the next
    /// rendering on.
    pub fn set_rendition_reports(&mut self, reports: Vec<RenditionReport>) {
        self.reports = reports;
    }

    /// This playlist's edge as another rendition reports it: the last
    /// part's segment and index, else the last segment.
    pub fn report_edge(&self) -> Option<(u64, Option<u32>)> {
        match self.last_part() {
            Some((msn, part)) => Some((msn, Some(part))),
            None => self.last_segment().map(|msn| (msn, None)),
        }
    }

    /// Segments a delta update skips: those starting more than
    /// `CAN-SKIP-UNTIL` before the end of the last complete segment.
    fn skippable(&self, target: u64) -> usize {
        let boundary_ms = target * SKIP_TARGETS * 1000;
        let mut to_end: u64 = self.entries.iter().map(|e| e.duration_ms).sum();
        let mut skipped = 0;
        for entry in &self.entries {
            if to_end <= boundary_ms {
                break;
            }
            to_end -= entry.duration_ms;
            skipped += 1;
        }
        skipped
    }
}

impl Entry {
    fn parts_ms(&self) -> u64 {
        self.parts.iter().map(|p| p.duration_ms).sum()
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Milliseconds as decimal seconds, without trailing zeros: `2`, `2.033`,
/// `0.2` (as m3u8-rs wrote `EXTINF` before).
fn seconds(ms: u64) -> String {
    let (whole, frac) = (ms / 1000, ms % 1000);
    if frac == 0 {
        return whole.to_string();
    }
    let frac = format!("{frac:03}");
    format!("{whole}.{}", frac.trim_end_matches('0'))
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

    // --- fMP4 and LL-HLS -------------------------------------------------

    /// One-second segments (target 1 s); LL-HLS parts of 0.5 s.
    fn ll_playlist(window: usize) -> Playlist {
        Playlist::with_format(
            PlaylistConfig {
                target_duration: Duration::from_secs(1),
                window,
            },
            PlaylistFormat::LowLatency {
                part_target: Duration::from_millis(500),
            },
        )
    }

    fn head(sequence: u64, init: u64) -> SegmentHead {
        SegmentHead {
            sequence,
            discontinuity: false,
            program_date_time_ms: T0 + sequence as i64 * 1000,
            init: Some(init),
        }
    }

    /// Pushes `segments` complete one-second segments of two parts each
    /// (the first independent), then `open_parts` parts of the next one.
    fn fill(playlist: &mut Playlist, segments: u64, open_parts: u64) {
        for sequence in 0..=segments {
            let parts = if sequence < segments { 2 } else { open_parts };
            for i in 0..parts {
                let part = PartEntry {
                    number: sequence * 2 + i,
                    duration_ms: 500,
                    independent: i == 0,
                };
                playlist.push_part(head(sequence, 0), part);
            }
            if sequence < segments {
                let _ = playlist.push_segment(head(sequence, 0), 1.0);
            }
        }
    }

    /// `#EXT-X-PROGRAM-DATE-TIME` of second `n`.
    fn pdt(n: u64) -> String {
        format!(
            "#EXT-X-PROGRAM-DATE-TIME:{}\n",
            rfc3339_ms(T0 + n as i64 * 1000)
        )
    }

    fn parts_of(sequence: u64) -> String {
        format!(
            "#EXT-X-PART:DURATION=0.5,URI=\"part{}.m4s\",INDEPENDENT=YES\n\
             #EXT-X-PART:DURATION=0.5,URI=\"part{}.m4s\"\n",
            sequence * 2,
            sequence * 2 + 1
        )
    }

    fn seg(sequence: u64) -> String {
        format!("#EXTINF:1,\nseg{sequence}.m4s\n")
    }

    const LL_HEADER: &str = "#EXTM3U\n#EXT-X-VERSION:7\n#EXT-X-TARGETDURATION:1\n\
        #EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,CAN-SKIP-UNTIL=6,PART-HOLD-BACK=1.5\n\
        #EXT-X-PART-INF:PART-TARGET=0.5\n";

    #[test]
    fn golden_fmp4_playlist_with_maps() {
        let mut playlist = Playlist::with_format(
            PlaylistConfig {
                target_duration: Duration::from_secs(2),
                window: 3,
            },
            PlaylistFormat::Fmp4,
        );
        let heads = [
            head(0, 0),
            head(1, 0),
            SegmentHead {
                discontinuity: true,
                ..head(2, 1)
            },
            head(3, 1),
        ];
        let mut removed = Vec::new();
        for h in heads {
            removed.extend(playlist.push_segment(h, 2.0));
        }
        assert_eq!(removed, ["seg0.m4s"]);
        // Parts pushed to a playlist without LL-HLS tags are not listed.
        playlist.push_part(
            head(4, 1),
            PartEntry {
                number: 0,
                duration_ms: 200,
                independent: true,
            },
        );
        let expected = format!(
            "#EXTM3U\n#EXT-X-VERSION:7\n#EXT-X-TARGETDURATION:2\n#EXT-X-MEDIA-SEQUENCE:1\n\
             #EXT-X-MAP:URI=\"init0.mp4\"\n{}#EXTINF:2,\nseg1.m4s\n\
             #EXT-X-DISCONTINUITY\n#EXT-X-MAP:URI=\"init1.mp4\"\n{}#EXTINF:2,\nseg2.m4s\n\
             {}#EXTINF:2,\nseg3.m4s\n",
            pdt(1),
            pdt(2),
            pdt(3)
        );
        assert_eq!(playlist.render(), expected);
        assert_eq!(playlist.render_delta(), expected, "no delta without LL-HLS");
        assert_eq!(playlist.render_plain(), expected);
        let parsed = m3u8_rs::parse_media_playlist_res(expected.as_bytes()).unwrap();
        assert_eq!(parsed.segments.len(), 3);
        assert_eq!(parsed.segments[0].map.as_ref().unwrap().uri, "init0.mp4");
        assert_eq!(parsed.segments[1].map.as_ref().unwrap().uri, "init1.mp4");
        assert_eq!(playlist.init_numbers().collect::<Vec<_>>(), [0, 1, 1, 1]);
    }

    #[test]
    fn golden_rendition_reports_close_a_low_latency_playlist() {
        let mut playlist = ll_playlist(6);
        fill(&mut playlist, 0, 1);
        assert_eq!(playlist.report_edge(), Some((0, Some(0))));
        playlist.set_rendition_reports(vec![
            RenditionReport {
                uri: "../480p/index.m3u8".into(),
                last_msn: 0,
                last_part: Some(1),
            },
            RenditionReport {
                uri: "../360p/index.m3u8".into(),
                last_msn: 3,
                last_part: None,
            },
        ]);
        let expected = format!(
            "{LL_HEADER}#EXT-X-MAP:URI=\"init0.mp4\"\n{}\
             #EXT-X-PART:DURATION=0.5,URI=\"part0.m4s\",INDEPENDENT=YES\n\
             #EXT-X-PRELOAD-HINT:TYPE=PART,URI=\"part1.m4s\"\n\
             #EXT-X-RENDITION-REPORT:URI=\"../480p/index.m3u8\",LAST-MSN=0,LAST-PART=1\n\
             #EXT-X-RENDITION-REPORT:URI=\"../360p/index.m3u8\",LAST-MSN=3\n",
            pdt(0)
        );
        assert_eq!(playlist.render(), expected);
        // Not a tag of plain playlists.
        assert!(!playlist.render_plain().contains("RENDITION-REPORT"));
    }

    #[test]
    fn golden_low_latency_playlist() {
        // Before any segment: the first parts and the hint.
        let mut playlist = ll_playlist(6);
        fill(&mut playlist, 0, 1);
        let expected = format!(
            "{LL_HEADER}#EXT-X-MAP:URI=\"init0.mp4\"\n{}\
             #EXT-X-PART:DURATION=0.5,URI=\"part0.m4s\",INDEPENDENT=YES\n\
             #EXT-X-PRELOAD-HINT:TYPE=PART,URI=\"part1.m4s\"\n",
            pdt(0)
        );
        assert_eq!(playlist.render(), expected);
        assert_eq!(
            (playlist.last_segment(), playlist.last_part()),
            (None, Some((0, 0)))
        );

        // Five complete segments and one part of the sixth: 5.5 s. Parts are
        // listed for the segments starting at most 3 s before the end (3, 4
        // and the open 5); the hint names part 11.
        let mut playlist = ll_playlist(6);
        fill(&mut playlist, 5, 1);
        let mut expected = format!("{LL_HEADER}#EXT-X-MAP:URI=\"init0.mp4\"\n");
        for sequence in 0..5 {
            expected.push_str(&pdt(sequence));
            if sequence >= 3 {
                expected.push_str(&parts_of(sequence));
            }
            expected.push_str(&seg(sequence));
        }
        expected.push_str(&pdt(5));
        expected.push_str("#EXT-X-PART:DURATION=0.5,URI=\"part10.m4s\",INDEPENDENT=YES\n");
        expected.push_str("#EXT-X-PRELOAD-HINT:TYPE=PART,URI=\"part11.m4s\"\n");
        assert_eq!(playlist.render(), expected);
        assert_eq!(playlist.last_segment(), Some(4));
        assert_eq!(playlist.last_part(), Some((5, 0)));
        assert_eq!(playlist.next_part(), 11);
        // Too short to skip anything: the delta update is the playlist.
        assert_eq!(playlist.render_delta(), expected);
        // Players read the segments (and their dates, maps) through the
        // LL-HLS tags.
        let parsed = m3u8_rs::parse_media_playlist_res(expected.as_bytes()).unwrap();
        assert_eq!(parsed.segments.len(), 5);
        assert!(
            parsed
                .segments
                .iter()
                .all(|s| s.program_date_time.is_some())
        );

        // The plain rendering (the file) has the segments only.
        let mut plain = "#EXTM3U\n#EXT-X-VERSION:7\n#EXT-X-TARGETDURATION:1\n\
            #EXT-X-MAP:URI=\"init0.mp4\"\n"
            .to_owned();
        for sequence in 0..5 {
            plain.push_str(&pdt(sequence));
            plain.push_str(&seg(sequence));
        }
        assert_eq!(playlist.render_plain(), plain);

        // Segment 5 completes with its second part: part horizon moves on.
        playlist.push_part(
            head(5, 0),
            PartEntry {
                number: 11,
                duration_ms: 500,
                independent: false,
            },
        );
        let _ = playlist.push_segment(head(5, 0), 1.0);
        assert_eq!(playlist.last_part(), Some((5, 1)));
        let text = playlist.render();
        assert!(
            !text.contains("part5.m4s") && text.contains("part6.m4s"),
            "{text}"
        );
        assert!(text.ends_with(&format!(
            "{}{}#EXT-X-PRELOAD-HINT:TYPE=PART,URI=\"part12.m4s\"\n",
            parts_of(5),
            seg(5)
        )));

        // Ended: no hint, the parts of the last segments stay listed.
        playlist.end();
        let text = playlist.render();
        assert!(text.ends_with(&format!("{}{}#EXT-X-ENDLIST\n", parts_of(5), seg(5))));
        assert!(!text.contains("PRELOAD-HINT"));
    }

    #[test]
    fn golden_delta_update_skips_old_segments() {
        // Nine complete one-second segments and a part of the tenth; skip
        // boundary 6 s before the end of segment 8 (at 9 s): segments 0, 1
        // and 2 start before it.
        let mut playlist = ll_playlist(10);
        fill(&mut playlist, 9, 1);
        let mut expected = LL_HEADER.replace("VERSION:7", "VERSION:9");
        expected.push_str("#EXT-X-SKIP:SKIPPED-SEGMENTS=3\n#EXT-X-MAP:URI=\"init0.mp4\"\n");
        for sequence in 3..9 {
            expected.push_str(&pdt(sequence));
            if sequence >= 7 {
                expected.push_str(&parts_of(sequence));
            }
            expected.push_str(&seg(sequence));
        }
        expected.push_str(&pdt(9));
        expected.push_str("#EXT-X-PART:DURATION=0.5,URI=\"part18.m4s\",INDEPENDENT=YES\n");
        expected.push_str("#EXT-X-PRELOAD-HINT:TYPE=PART,URI=\"part19.m4s\"\n");
        assert_eq!(playlist.render_delta(), expected);
        // The full playlist lists them all.
        let full = playlist.render();
        assert!(full.starts_with(LL_HEADER) && full.contains("seg0.m4s"));
        assert_eq!(full.matches("#EXTINF").count(), 9);

        // A window that slid: the media sequence stays that of the full
        // playlist, and the skip counts from it.
        let _ = playlist.push_segment(head(9, 0), 1.0);
        fill_more(&mut playlist, 10, 12);
        let delta = playlist.render_delta();
        // Segments 2..=11 listed, 12 s: 2, 3, 4 and 5 start more than 6 s
        // before the end.
        assert!(
            delta.contains("#EXT-X-MEDIA-SEQUENCE:2\n#EXT-X-SKIP:SKIPPED-SEGMENTS=4\n"),
            "{delta}"
        );
        assert!(
            delta.contains(&format!("#EXT-X-MAP:URI=\"init0.mp4\"\n{}", pdt(6))),
            "{delta}"
        );

        // Once ended there is no delta update.
        playlist.end();
        assert_eq!(playlist.render_delta(), playlist.render());
        assert!(!playlist.render().contains("#EXT-X-SKIP"));
    }

    /// Complete segments `from..to` of two parts each.
    fn fill_more(playlist: &mut Playlist, from: u64, to: u64) {
        for sequence in from..to {
            for i in 0..2 {
                let part = PartEntry {
                    number: sequence * 2 + i,
                    duration_ms: 500,
                    independent: i == 0,
                };
                playlist.push_part(head(sequence, 0), part);
            }
            let _ = playlist.push_segment(head(sequence, 0), 1.0);
        }
    }

    #[test]
    fn part_list_follows_the_target_duration() {
        // A 3 s segment raises the target duration to 3: parts of segments
        // starting within 9 s of the end are listed.
        let mut playlist = ll_playlist(10);
        fill_more(&mut playlist, 0, 8);
        let text = playlist.render();
        assert_eq!(text.matches("#EXT-X-PART:").count(), 6, "{text}");
        playlist.push_part(
            head(8, 0),
            PartEntry {
                number: 16,
                duration_ms: 500,
                independent: true,
            },
        );
        let _ = playlist.push_segment(head(8, 0), 3.0);
        let text = playlist.render();
        assert!(text.contains("#EXT-X-TARGETDURATION:3\n"));
        assert!(text.contains("CAN-SKIP-UNTIL=18,"));
        // 11 s in all: segments from 2 s on (2..=7 and 8) have their parts.
        assert_eq!(text.matches("#EXT-X-PART:").count(), 13, "{text}");
    }
}
